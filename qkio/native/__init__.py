"""qkio's one piece of C: the port-I/O exit loop (``cpu_exec.c``), built on first use.

Why there is any C at all is explained at the top of ``cpu_exec.c`` and in the
book's measurement chapter: on a host where a guest exit already costs
microseconds, the interpreter's own work per exit -- a ctypes call, the
``qemu_mutex`` pair, decoding and dispatching the OUT -- added 15-30 % on top
of the kernel's cost.  The C loop does those steps and nothing else; devices,
the main loop, signals and every other exit stay in Python.

Like the guests, the module is kept as source and compiled with the machine's
``gcc`` against the running interpreter's headers on first use, then cached in
qkio's cache (:mod:`qkio.build`) under a name that carries a hash of the
source, the compiler's version and the interpreter's ABI -- so it is rebuilt
exactly when one of those changes, and two processes building at once never
see half a file (each builds under a temporary name and renames).

:func:`load` returns the module, or None when it cannot be had; then
:data:`unavailable_reason` says why (no gcc, no ``Python.h``, a compile error,
or ``QKIO_NATIVE=0`` in the environment) and qkio runs its pure-Python loop,
which behaves the same, only slower.  Nothing is silent: ``qkio run`` prints
a note when it falls back, and ``qkio bench pio`` reports which loop ran.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

from ..build import BuildError, cached_build, find_tools, run_tool

SOURCE = Path(__file__).resolve().parent / "cpu_exec.c"
MODULE = "_cpu_exec"
CFLAGS = ("-O2", "-Wall", "-Werror", "-shared", "-fPIC")

#: Why :func:`load` returned None (None while it has not been asked, or when it succeeded).
unavailable_reason: str | None = None

_loaded = None
_tried = False
_guard = threading.Lock()


def build(out_dir: Path | None = None) -> Path:
    """Compile ``cpu_exec.c`` if no cached build matches; return the extension's path.

    Raises :class:`qkio.build.BuildError` with the cause (missing tool or header,
    compiler output)."""
    what = "the native exit loop (qkio/native/cpu_exec.c)"
    (gcc,) = find_tools(("gcc",), what, "gcc")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        raise BuildError(f"Python.h not found in {include} (Debian: apt-get install python3-dev)")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    gcc_version = subprocess.run([gcc, "--version"], capture_output=True).stdout.split(b"\n")[0]

    def recipe(output: Path, scratch: Path) -> None:
        run_tool([gcc, *CFLAGS, f"-I{include}", "-o", str(output), str(SOURCE)], what)

    return cached_build(MODULE, suffix, [SOURCE], recipe, what=what, cache=out_dir,
                        key=[gcc_version, " ".join(CFLAGS), include, suffix, sys.version])


def load():
    """The ``_cpu_exec`` module, built if need be; None (see :data:`unavailable_reason`) if not."""
    global _loaded, _tried, unavailable_reason
    with _guard:
        if _tried:
            return _loaded
        _tried = True
        if os.environ.get("QKIO_NATIVE", "1") == "0":
            unavailable_reason = "QKIO_NATIVE=0 in the environment"
            return None
        try:
            path = build()
            loader = importlib.machinery.ExtensionFileLoader(f"qkio.native.{MODULE}", str(path))
            spec = importlib.util.spec_from_file_location(f"qkio.native.{MODULE}", path, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        except Exception as exc:  # any cause: fall back to Python, and say why
            unavailable_reason = str(exc) if isinstance(exc, BuildError) else f"{type(exc).__name__}: {exc}"
            return None
        _loaded = module
        return module
