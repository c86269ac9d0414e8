"""Assemble and link qkio's test kernels: tiny 32-bit Multiboot ELF files.

Each kernel is one ``<name>.s`` file in GNU assembler syntax that
``.include``s the shared header (``multiboot.inc``) and, if it talks,
the polled UART routines (``serial.inc``); ``kernel.ld`` puts it at 1 MiB.

``build_kernel(name, outdir)`` returns the path of the linked ELF.  The
file name carries a hash of everything that went into it -- sources, link
script, this file and the tool versions -- so a rebuild happens exactly
when something changed, and test sessions sharing ``outdir`` reuse work.

Run as a script to build them all: ``python tests/kernels/build.py OUTDIR``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
KERNELS = ("hello", "cmdline", "echo", "unassigned", "spin", "triple", "mbinfo")
_SHARED_INPUTS = ("multiboot.inc", "serial.inc", "kernel.ld", "build.py")

AS = ("as", "--32")
LD = ("ld", "-m", "elf_i386", "-T", str(KERNEL_DIR / "kernel.ld"),
      "-z", "max-page-size=0x1000", "--build-id=none", "--no-warn-rwx-segments")


class BuildError(RuntimeError):
    """The assembler or linker failed; the message carries its output."""


def _tool_versions() -> bytes:
    out = b""
    for tool in ("as", "ld"):
        try:
            out += subprocess.run([tool, "--version"], capture_output=True, check=True).stdout.split(b"\n")[0]
        except (OSError, subprocess.CalledProcessError) as e:
            raise BuildError(f"{tool} is needed to build the test kernels: {e}") from None
    return out


def source_hash(name: str) -> str:
    digest = hashlib.sha256(_tool_versions())
    for part in (f"{name}.s", *_SHARED_INPUTS):
        digest.update(part.encode() + b"\0" + (KERNEL_DIR / part).read_bytes())
    return digest.hexdigest()[:16]


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise BuildError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")


def build_kernel(name: str, outdir: str | os.PathLike) -> Path:
    """Build kernel ``name`` into ``outdir`` (cached) and return the ELF's path."""
    if name not in KERNELS:
        raise ValueError(f"unknown test kernel {name!r}; there are {', '.join(KERNELS)}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / f"{name}-{source_hash(name)}.elf"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=outdir) as scratch:
        obj = Path(scratch) / f"{name}.o"
        elf = Path(scratch) / f"{name}.elf"
        _run([*AS, "-I", str(KERNEL_DIR), "-o", str(obj), str(KERNEL_DIR / f"{name}.s")])
        _run([*LD, "-o", str(elf), str(obj)])
        os.replace(elf, target)  # atomic, so a concurrent build never sees half a file
    return target


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "build/kernels"
    for kernel in KERNELS:
        print(build_kernel(kernel, out))
