"""Build qkio's one C extension, the native exit loop (qkio/native/cpu_exec.c).

Everything else about the package is in pyproject.toml; only the extension
needs code.  Why it is built here, at install time, and not on first use:
a wheel then carries it, and qkio runs it on a machine with no compiler
and no Python headers.

* ``optional=True``: a machine that cannot compile it (no gcc, no Python.h,
  a compiler that rejects something) still installs qkio, which then runs
  its pure-Python exit loop and says why (``qkio.native.unavailable_reason``).
  In the project's own CI (``CI`` set in the environment) the build is
  required and warnings are errors, so a change that breaks or dirties it
  fails there and nowhere else.
* The compiler and its flags are the interpreter's own (sysconfig's CC,
  CFLAGS, ...), which setuptools uses by default; we only add ``-Wall``.
* The module records a CRC-32 of the source it was built from, so that a
  checkout whose cpu_exec.c changed after the build (an editable install
  builds in place) is noticed instead of silently running old code.
"""

import os
import zlib

from setuptools import Extension, setup

SOURCE = "qkio/native/cpu_exec.c"
IN_CI = os.environ.get("CI", "") not in ("", "0", "false")

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), SOURCE), "rb") as f:
    source_crc32 = zlib.crc32(f.read())

setup(ext_modules=[
    Extension(
        "qkio.native._cpu_exec",
        [SOURCE],
        define_macros=[("QKIO_SOURCE_CRC32", f"{source_crc32:#010x}UL")],
        extra_compile_args=["-Wall", *(["-Werror"] if IN_CI else [])],
        optional=not IN_CI,
    ),
])
