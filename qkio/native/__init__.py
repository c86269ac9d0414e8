"""qkio's one piece of C: the port-I/O (and unowned-MMIO) exit loop (``cpu_exec.c``), built at install.

Why there is any C at all is explained at the top of ``cpu_exec.c`` and in the
book's measurement chapter: on a host where a guest exit already costs
microseconds, the interpreter's own work per exit -- a ctypes call, the
``qemu_mutex`` pair, decoding and dispatching the OUT -- added 15-30 % on top
of the kernel's cost.  The C loop does those steps and nothing else; devices,
the main loop, signals and every other exit stay in Python.

It is a setuptools extension (``setup.py``), compiled by ``pip install`` with
the interpreter's own compiler settings, so a wheel carries it and qkio never
compiles anything at run time.  It is *optional*: where it could not be
built, qkio installs all the same and runs its pure-Python loop, which
behaves the same, only slower.

:func:`load` returns the module, or None; then :data:`unavailable_reason`
says why (not built at install, ``QKIO_NATIVE=0`` in the environment, or a
build from another version of ``cpu_exec.c``).  Nothing is silent: ``qkio
run`` prints a note when it falls back, ``qkio run --exit-path native`` says
in one line why it cannot, and ``qkio bench pio`` reports which loop ran.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "cpu_exec.c"
MODULE = "_cpu_exec"

#: Why :func:`load` returned None (None while it has not been asked, or when it succeeded).
unavailable_reason: str | None = None

_loaded = None
_tried = False
_guard = threading.Lock()


def load():
    """The compiled ``_cpu_exec`` module, or None (see :data:`unavailable_reason`).

    Only imports: it never runs a compiler.  In a source checkout (an editable
    install builds the module in place) a module built from another
    ``cpu_exec.c`` than the one beside it is refused, so that a changed
    source is never tested against an old build; ``scripts/setup-env``
    rebuilds it.  The source is read and compared only when it was written
    after the module was built (:func:`_source_is_newer`).
    """
    global _loaded, _tried, unavailable_reason
    with _guard:
        if _tried:
            return _loaded
        _tried = True
        if os.environ.get("QKIO_NATIVE", "1") == "0":
            unavailable_reason = "QKIO_NATIVE=0 in the environment"
            return None
        try:
            from . import _cpu_exec as module
        except ImportError as exc:
            unavailable_reason = (f"qkio.native.{MODULE} was not built when qkio was installed ({exc}); "
                                  "reinstall qkio where gcc and the Python headers are present")
            return None
        if _source_is_newer(module.__file__) and not _built_from_source(module):
            unavailable_reason = (f"qkio.native.{MODULE} was built from another cpu_exec.c than "
                                  f"{SOURCE} (rebuild it: scripts/setup-env, or pip install -e .)")
            return None
        _loaded = module
        return module


def _source_is_newer(built: str | None) -> bool:
    """Whether ``cpu_exec.c`` was written after the module file ``built``.

    Only then can the module be from another source: every build writes the
    module after reading the source, and changing the source (an edit, a
    checkout, a rebase) writes it later.  Checking the dates and nothing
    else keeps the source's read and CRC-32 -- and zlib, an extension
    module a run would otherwise load only for this -- off every ``qkio
    run``'s start-up (``qkio bench startup``)."""
    try:
        return built is None or os.stat(SOURCE).st_mtime_ns > os.stat(built).st_mtime_ns
    except OSError:  # an install without the source: nothing to compare
        return False


def _built_from_source(module) -> bool:
    """Whether ``module`` records the CRC-32 of the ``cpu_exec.c`` beside it."""
    import zlib
    built_from = getattr(module, "SOURCE_CRC32", None)
    try:
        return built_from == zlib.crc32(SOURCE.read_bytes())
    except OSError:  # the source went away meanwhile: nothing to compare
        return True
