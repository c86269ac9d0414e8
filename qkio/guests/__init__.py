"""qkio's guests: tiny Multiboot kernels kept as source, built on first use.

This is the one guest tree: the book, ``qkio run --kernel NAME``, the
benchmarks and the test suite all run these.  Each guest is one GNU
assembler file in this directory, ``<name>.s``, that ``.include``\\ s what it
needs from the shared pieces:

``multiboot.inc``  the Multiboot v1 header, a stack, ``exit_vmm`` (isa-debug-exit)
``uart.inc``       polled output on COM1 (``putc``, ``puts``, ``putdec``, ``puthex8/32``)
``cmdline.inc``    ``cmdline_number``: read ``key=N`` from the command line
``gdt.inc``        a GDT of the guest's own, for guests that take interrupts
``pic.inc``        the 8259 pair and an IDT (``init_pics``, ``fill_idt``), after ``gdt.inc``
``kernel.ld``      the link script: everything at 1 MiB

:func:`build_guest` runs ``as --32`` and ``ld -m elf_i386`` -- the same
binutils that build any i386 kernel -- through :func:`qkio.build.cached_build`,
so the ELF lands in qkio's cache under a name that carries a hash of every
input and of the tool flags: a rebuilt guest gets a new name exactly when its
sources change, and a cached guest runs on a machine without binutils.  Why
source and not prebuilt binaries in the package: the book shows the source of
every guest it runs, and what runs is built from exactly that text.

Why these guests are assembly and not C: each one exists to make the VMM do
one thing -- take exits as fast as possible, sleep in HLT until an
interrupt, start a second CPU, die by triple fault -- and in assembly the
instructions that cause each exit are there on the page.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..build import BuildError, cached_build, find_tools, input_hash, run_tool

GUEST_DIR = Path(__file__).resolve().parent

#: name -> one line about what the guest does (``qkio run --kernel NAME``).
GUESTS: dict[str, str] = {
    "hello": "prints one line on COM1 and exits with status 33",
    "echo-irq": "echoes COM1 input from its IRQ 4 handler, sleeping in HLT between bytes; 'q' exits (status 1)",
    "flood": "prints count=N bytes (default 10000) on COM1 as fast as it can, then exits 33",
    "count-loop": "runs a loop of count=N iterations (default 1000000), two instructions each, with no exit; then exits 33",
    "pio-loop": "writes port 0x80 (or port=P, decimal) count=N times (default 10000), one exit each, then exits 33; "
                "chunk=K times every K writes with the TSC and prints the cycles",
    "smp": "starts the other CPUs with INIT/SIPI; all count and report to port 0x501; count=N iterations (0: forever)",
    "virtio-blk": "finds a virtio-blk disk on virtio-mmio, writes count=N sectors (default 8) and reads "
                  "them back, polling (or with irq=1 sleeping until IRQ 12); needs --drive file=IMG",
    "spin": "loops forever with interrupts off, touching nothing: only the VMM can stop it",
    # The guests the test suite runs under qkio and under QEMU, to pin qkio to QEMU's behaviour.
    "cmdline": "prints the Multiboot command line between quotes, then exits 33",
    "echo": "echoes COM1 input by polling LSR; after a 'q' it exits with status 1",
    "mbinfo": "prints the Multiboot information structure: fields, modules, memory map, loader name",
    "triple": "dies by triple fault (a divide error with an empty IDT): KVM_EXIT_SHUTDOWN",
    "unassigned": "reads port 0x1234, which nothing claims, and prints the byte in hex (ff on a PC)",
    "unassigned-mmio": "stores to and loads 1/2/4/8 bytes from 0xd0000000 (or addr=A), which nothing "
                       "claims, and prints what came back; count=N more loads, ORed",
}

#: The include files and link script every guest may use; all are hashed.
SHARED_INPUTS = ("multiboot.inc", "uart.inc", "cmdline.inc", "gdt.inc", "pic.inc", "kernel.ld")

AS_FLAGS = ("--32",)
LD_FLAGS = ("-m", "elf_i386", "-z", "max-page-size=0x1000", "--build-id=none")


#: Kept for callers that catch it by this name: a guest's build error is a :class:`BuildError`.
GuestBuildError = BuildError


def cache_dir() -> Path:
    """Where built guests are kept: qkio's one cache (:func:`qkio.build.cache_dir`)."""
    from ..build import cache_dir as _cache_dir
    return _cache_dir()


def source_path(name: str, source_dir: Path = GUEST_DIR) -> Path:
    return source_dir / f"{name}.s"


def source_hash(name: str, source_dir: Path = GUEST_DIR) -> str:
    """A hash of everything the ELF is made from: sources, link script, tool flags."""
    return input_hash([source_dir / f"{name}.s", *(source_dir / p for p in SHARED_INPUTS)],
                      key=[" ".join((*AS_FLAGS, "|", *LD_FLAGS))])


def build_guest(name: str, *, cache: str | os.PathLike | None = None,
                source_dir: str | os.PathLike | None = None) -> Path:
    """Build guest ``name`` (cached) and return the path of its ELF file.

    ``cache`` defaults to qkio's cache folder; ``source_dir`` to this package
    (tests point it elsewhere).  Raises :class:`KeyError` for an unknown name
    and :class:`BuildError` (a :class:`~qkio.errors.QkioError`) if binutils
    are missing or fail.
    """
    src_dir = Path(source_dir) if source_dir is not None else GUEST_DIR
    source = source_path(name, src_dir)
    if not source.exists():
        raise KeyError(f"no demo guest {name!r}; there are {', '.join(GUESTS)}")
    what = f"the demo guest {name!r}"

    def recipe(elf: Path, scratch: Path) -> None:
        assembler, linker = find_tools(("as", "ld"), what, "binutils")
        obj = scratch / f"{name}.o"
        run_tool([assembler, *AS_FLAGS, "-I", str(src_dir), "-o", str(obj), str(source)], what)
        run_tool([linker, *LD_FLAGS, "-T", str(src_dir / "kernel.ld"), "-o", str(elf), str(obj)], what)

    return cached_build(name, ".elf", [source, *(src_dir / p for p in SHARED_INPUTS)], recipe,
                        key=[" ".join((*AS_FLAGS, "|", *LD_FLAGS))], what=what, cache=cache)
