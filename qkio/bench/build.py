"""Building what the benchmarks run: the guests (as/ld) and the C reference (gcc).

Everything is kept as source in this package and built on first use into a
cache directory (``$QKIO_BENCH_CACHE``, else ``$XDG_CACHE_HOME/qkio-bench``,
else ``~/.cache/qkio-bench``).  An output's file name carries a hash of its
inputs and of the tool's version line, so it is rebuilt exactly when one of
them changed, and concurrent runs never see half a file (each build goes to a
temporary name and is renamed into place).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guests"
GUESTS = ("pio", "flood")


class BuildError(RuntimeError):
    """A tool is missing or failed; the message carries its output."""


def cache_dir() -> Path:
    if os.environ.get("QKIO_BENCH_CACHE"):
        d = Path(os.environ["QKIO_BENCH_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = Path(base) / "qkio-bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _version(tool: str) -> bytes:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"{tool} is needed to build the benchmarks: {e}") from None
    return out.split(b"\n")[0]


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise BuildError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")


def _target(name: str, suffix: str, inputs: list[Path], tools: tuple[str, ...]) -> Path:
    digest = hashlib.sha256()
    for tool in tools:
        digest.update(_version(tool))
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return cache_dir() / f"{name}-{digest.hexdigest()[:16]}{suffix}"


def build_guest(name: str) -> Path:
    """Assemble and link guest ``name`` (``guests/<name>.s``); return the ELF's path."""
    if name not in GUESTS:
        raise ValueError(f"unknown benchmark guest {name!r}; there are {', '.join(GUESTS)}")
    inputs = [GUEST_DIR / f"{name}.s", GUEST_DIR / "multiboot.inc", GUEST_DIR / "kernel.ld"]
    target = _target(name, ".elf", inputs, ("as", "ld"))
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        obj, elf = Path(scratch) / f"{name}.o", Path(scratch) / f"{name}.elf"
        _run(["as", "--32", "-I", str(GUEST_DIR), "-o", str(obj), str(inputs[0])])
        _run(["ld", "-m", "elf_i386", "-T", str(inputs[2]), "-z", "max-page-size=0x1000",
              "--build-id=none", "--no-warn-rwx-segments", "-o", str(elf), str(obj)])
        os.replace(elf, target)
    return target


def build_c(name: str) -> Path:
    """Compile ``<name>.c`` from this package with ``gcc -O2``; return the executable's path."""
    source = HERE / f"{name}.c"
    target = _target(name, "", [source], ("gcc",))
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        exe = Path(scratch) / name
        _run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(source)])
        os.replace(exe, target)
    return target
