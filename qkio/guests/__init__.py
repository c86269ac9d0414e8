"""qkio's demo guests: tiny Multiboot kernels kept as source, built on first use.

Each guest is one GNU assembler file in this directory, ``<name>.s``, that
``.include``\\ s what it needs from the shared pieces:

``multiboot.inc``  the Multiboot v1 header, a stack, ``exit_vmm`` (isa-debug-exit)
``uart.inc``       polled output on COM1 (``putc``, ``puts``, ``putdec``)
``cmdline.inc``    ``cmdline_number``: read ``key=N`` from the command line
``gdt.inc``        a GDT of the guest's own, for guests that take interrupts
``kernel.ld``      the link script: everything at 1 MiB

:func:`build_guest` runs ``as --32`` and ``ld -m elf_i386`` -- the same
binutils that build any i386 kernel -- and caches the ELF under
``$XDG_CACHE_HOME/qkio/guests`` (or ``~/.cache/qkio/guests``).  The file name
carries a hash of every input and of the tool flags, so a rebuilt guest gets a
new name exactly when its sources change, an old cache entry is never
mistaken for a new one, and a cached guest runs on a machine without
binutils.  Why source and not prebuilt binaries in the package: the book
shows the source of every guest it runs, and what runs is built from exactly
that text.

Why these guests are assembly and not C: each one exists to make the VMM do
one thing -- take exits as fast as possible, sleep in HLT until an
interrupt, start a second CPU -- and in assembly the instructions that cause
each exit are there on the page.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import QkioError

GUEST_DIR = Path(__file__).resolve().parent

#: name -> one line about what the guest does (``qkio run --kernel NAME``).
GUESTS: dict[str, str] = {
    "hello": "prints one line on COM1 and exits with status 33",
    "echo-irq": "echoes COM1 input from its IRQ 4 handler, sleeping in HLT between bytes; 'q' exits (status 1)",
    "flood": "prints count=N bytes (default 10000) on COM1 as fast as it can, then exits 33",
    "pio-loop": "writes port 0x80 count=N times (default 10000), one exit each, then exits 33",
    "smp": "starts the other CPUs with INIT/SIPI; all count and report to port 0x501; count=N iterations (0: forever)",
    "spin": "loops forever with interrupts off, touching nothing: only the VMM can stop it",
}

#: The include files and link script every guest may use; all are hashed.
SHARED_INPUTS = ("multiboot.inc", "uart.inc", "cmdline.inc", "gdt.inc", "kernel.ld")

AS_FLAGS = ("--32",)
LD_FLAGS = ("-m", "elf_i386", "-z", "max-page-size=0x1000", "--build-id=none")


class GuestBuildError(QkioError):
    """A demo guest could not be built; the message carries the tool's own words."""


def cache_dir() -> Path:
    """Where built guests are kept: ``$XDG_CACHE_HOME/qkio/guests``, as the XDG spec says."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qkio" / "guests"


def source_path(name: str, source_dir: Path = GUEST_DIR) -> Path:
    return source_dir / f"{name}.s"


def source_hash(name: str, source_dir: Path = GUEST_DIR) -> str:
    """A hash of everything the ELF is made from: sources, link script, tool flags."""
    digest = hashlib.sha256(" ".join((*AS_FLAGS, "|", *LD_FLAGS)).encode())
    for part in (f"{name}.s", *SHARED_INPUTS):
        path = source_dir / part
        digest.update(part.encode() + b"\0")
        digest.update(path.read_bytes() if path.exists() else b"(missing)")
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_guest(name: str, *, cache: str | os.PathLike | None = None,
                source_dir: str | os.PathLike | None = None) -> Path:
    """Build demo guest ``name`` (cached) and return the path of its ELF file.

    ``cache`` defaults to :func:`cache_dir`; ``source_dir`` to this package
    (tests point it elsewhere).  Raises :class:`KeyError` for an unknown name
    and :class:`GuestBuildError` (a :class:`QkioError`) if binutils are
    missing or fail.
    """
    src_dir = Path(source_dir) if source_dir is not None else GUEST_DIR
    if not source_path(name, src_dir).exists():
        raise KeyError(f"no demo guest {name!r}; there are {', '.join(GUESTS)}")
    out_dir = Path(cache) if cache is not None else cache_dir()
    target = out_dir / f"{name}-{source_hash(name, src_dir)}.elf"
    if target.exists():
        return target
    tools = {tool: shutil.which(tool) for tool in ("as", "ld")}
    missing = [tool for tool, path in tools.items() if path is None]
    if missing:
        raise GuestBuildError(
            f"building the demo guest {name!r} needs GNU {' and '.join(missing)} "
            f"(binutils; on Debian: apt-get install binutils), not found on PATH")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Build in a scratch directory inside the cache, then rename: rename
        # is atomic, so a second qkio building the same guest at the same
        # time never runs half a file, and a failed build leaves nothing.
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as scratch:
            obj = Path(scratch) / f"{name}.o"
            elf = Path(scratch) / f"{name}.elf"
            _run(name, [tools["as"], *AS_FLAGS, "-I", str(src_dir), "-o", str(obj),
                        str(source_path(name, src_dir))])
            _run(name, [tools["ld"], *LD_FLAGS, "-T", str(src_dir / "kernel.ld"),
                        "-o", str(elf), str(obj)])
            os.replace(elf, target)
    except OSError as e:
        raise GuestBuildError(f"cannot build the demo guest {name!r} in {out_dir}: {e}") from None
    return target


def _run(name: str, argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        tool = os.path.basename(argv[0])
        output = (result.stdout + result.stderr).strip()
        raise GuestBuildError(f"building the demo guest {name!r}: {tool} failed "
                              f"(exit status {result.returncode}):\n{output}")
