"""qkio's one piece of C: the port-I/O exit loop (``cpu_exec.c``), built on first use.

Why there is any C at all is explained at the top of ``cpu_exec.c`` and in the
book's measurement chapter: on a host where a guest exit already costs
microseconds, the interpreter's own work per exit -- a ctypes call, the
``qemu_mutex`` pair, decoding and dispatching the OUT -- added 15-30 % on top
of the kernel's cost.  The C loop does those steps and nothing else; devices,
the main loop, signals and every other exit stay in Python.

Like the guests, the module is kept as source and compiled with the machine's
``gcc`` against the running interpreter's headers on first use, then cached in
``$XDG_CACHE_HOME/qkio/native`` under a name that carries a hash of the
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

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "cpu_exec.c"
MODULE = "_cpu_exec"
CFLAGS = ("-O2", "-Wall", "-Werror", "-shared", "-fPIC")

#: Why :func:`load` returned None (None while it has not been asked, or when it succeeded).
unavailable_reason: str | None = None

_loaded = None
_tried = False
_guard = threading.Lock()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qkio" / "native"


def _gcc_version(gcc: str) -> bytes:
    return subprocess.run([gcc, "--version"], capture_output=True, check=True).stdout.split(b"\n")[0]


def build(out_dir: Path | None = None) -> Path:
    """Compile ``cpu_exec.c`` if no cached build matches; return the extension's path.

    Raises RuntimeError with the cause (missing tool or header, compiler output)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found (Debian: apt-get install gcc)")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        raise RuntimeError(f"Python.h not found in {include} (Debian: apt-get install python3-dev)")
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _gcc_version(gcc), " ".join(CFLAGS).encode(),
                 include.encode(), suffix.encode(), sys.version.encode()):
        digest.update(part + b"\0")
    out_dir = out_dir or cache_dir()
    target = out_dir / f"{MODULE}-{digest.hexdigest()[:16]}{suffix}"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        tmp = Path(scratch) / f"{MODULE}{suffix}"
        r = subprocess.run([gcc, *CFLAGS, f"-I{include}", "-o", str(tmp), str(SOURCE)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"gcc failed on {SOURCE.name}:\n{r.stderr.strip()}")
        os.replace(tmp, target)
    return target


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
            unavailable_reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc)
            return None
        _loaded = module
        return module
