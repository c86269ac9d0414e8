"""Loading a Multiboot (version 1) kernel the way QEMU's ``-kernel`` does.

QEMU has no Multiboot loader in the guest.  ``hw/i386/multiboot.c`` lays
the kernel, its modules and their command lines out in one buffer on the
host and hands it, with an 88-byte information structure, to a small
option ROM (``pc-bios/optionrom/multiboot.S``).  The ROM asks the BIOS for
the memory map, copies everything into place, switches to protected mode
and jumps to the kernel.  qkio has no BIOS, so this module does both
halves at once: it writes the finished result into guest memory and
returns the CPU state the ROM would have left behind.

What a kernel sees, as under QEMU 7.2
-------------------------------------
* The information structure at 0x9500 and the memory map at 0x9000, the
  addresses QEMU uses.
* ``flags`` = 0x24f: mem_lower/upper, boot_device (0x8000ffff: "first BIOS
  disk, no partition"), cmdline, mods, mmap, boot_loader_name ("qemu").
* The kernel command line is the kernel's path, a space, and the
  ``-append`` text -- so with nothing appended it ends in a space.  For the
  ``cmdline`` test kernel at ``/img/cmdline.elf`` run without ``-append``,
  QEMU itself prints ``cmdline='/img/cmdline.elf '`` (the test suite runs it under QEMU).
* Right after the kernel, at the next page boundary, one buffer holds the
  module list (16 bytes per module), then the modules' command lines, then
  the kernel's, then the boot loader's name.  The modules follow, each on a
  page boundary.  A module's command line is its whole ``-initrd`` item:
  file name, and after a space its arguments.
* EAX = 0x2BADB002, EBX = 0x9500, flat 32-bit segments, paging and
  interrupts off.

Where qkio differs, and why
---------------------------
* The memory map.  Under QEMU it comes from SeaBIOS, which also reserves
  the top 128 KiB of RAM for itself, and QEMU adds entries for its KVM TSS
  page and BIOS ROM near 4 GiB.  qkio has no firmware living in RAM, so
  RAM runs from 1 MiB to the end of RAM, and ``mem_upper`` is 128 KiB
  larger than QEMU's for the same ``-m``.  A caller that keeps pages of its
  own (say the KVM TSS) passes them as ``reserved``.
* QEMU copies whatever the kernel asks for wherever it asks.  qkio refuses
  a kernel or module that would land outside RAM, in the BIOS hole below
  1 MiB, or on top of the GDT or the information area, so that no bad
  image can scribble over the boot state: every such image is a
  ``BadKernel`` with a one-line reason, and guest memory is not touched.
* Header flags the loader does not support (video mode, bit 2) are ignored,
  as QEMU ignores them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

from ..errors import BadKernel, GuestMemoryError
from ..record import Record
from . import elf
from .modes import GDT_BASE, CpuState, Write, Zeros, apply_writes, flat_gdt, protected_mode_state

# --- Numbers from the Multiboot 0.6.96 specification -------------------------

HEADER_MAGIC = 0x1BADB002      # in the kernel's Multiboot header
BOOTLOADER_MAGIC = 0x2BADB002  # in EAX when the kernel starts
HEADER_SEARCH_SIZE = 8192      # the header must start in the first 8 KiB
HEADER_ALIGN = 4

HEADER_FLAG_PAGE_ALIGN = 1 << 0   # modules on 4 KiB boundaries (always done)
HEADER_FLAG_MEMORY_INFO = 1 << 1  # mem_* and mmap_* wanted (always given)
HEADER_FLAG_VIDEO_MODE = 1 << 2   # not supported, by QEMU or by qkio
HEADER_FLAG_AOUT_KLUDGE = 1 << 16  # addresses come from the header, not ELF

INFO_FLAG_MEMORY = 1 << 0
INFO_FLAG_BOOT_DEVICE = 1 << 1
INFO_FLAG_CMDLINE = 1 << 2
INFO_FLAG_MODULES = 1 << 3
INFO_FLAG_MMAP = 1 << 6
INFO_FLAG_BOOTLOADER_NAME = 1 << 9
INFO_FLAGS = (INFO_FLAG_MEMORY | INFO_FLAG_BOOT_DEVICE | INFO_FLAG_CMDLINE | INFO_FLAG_MODULES
              | INFO_FLAG_MMAP | INFO_FLAG_BOOTLOADER_NAME)  # 0x24f, QEMU's choice

# Offsets in the information structure.
MBI_FLAGS = 0
MBI_MEM_LOWER = 4
MBI_MEM_UPPER = 8
MBI_BOOT_DEVICE = 12
MBI_CMDLINE = 16
MBI_MODS_COUNT = 20
MBI_MODS_ADDR = 24
MBI_MMAP_LENGTH = 44
MBI_MMAP_ADDR = 48
MBI_BOOT_LOADER_NAME = 64
INFO_SIZE = 88

MODULE_ENTRY_SIZE = 16     # mod_start, mod_end, cmdline, reserved
MMAP_ENTRY_SIZE = 20       # the "size" field: base, length, type; not itself
MMAP_TYPE_RAM = 1
MMAP_TYPE_RESERVED = 2

# --- Where things go, as in QEMU -------------------------------------------

MMAP_ADDR = 0x9000
INFO_ADDR = 0x9500                # MMAP_ADDR + 0x500, room for 53 map entries
MMAP_CAPACITY = (INFO_ADDR - MMAP_ADDR) // (4 + MMAP_ENTRY_SIZE)
BOOT_DEVICE = 0x8000FFFF
BOOTLOADER_NAME = "qemu"  # what QEMU says; a guest that checks sees no change

PAGE_SIZE = 0x1000
EBDA_START = 0x9FC00      # conventional memory ends here (639 KiB)
BIOS_ROM_START = 0xF0000
HIGH_MEMORY_START = 0x100000
FOUR_GIB = 1 << 32

LINUX_HEADER_OFFSET = 0x202  # "HdrS": QEMU boots such a file as Linux, never as Multiboot
LINUX_HEADER_MAGIC = b"HdrS"


def _page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


# --- The header --------------------------------------------------------------

class MultibootHeader(Record):
    """The kernel's Multiboot header; address fields only mean something with
    the a.out kludge flag (bit 16)."""

    offset: int  # in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def has_addresses(self) -> bool:
        return bool(self.flags & HEADER_FLAG_AOUT_KLUDGE)


def _scan_for_header(image: bytes | memoryview) -> tuple[int | None, int | None]:
    """(offset of the first valid header, offset of the first bad-checksum one).

    QEMU stops at 8192 - 48 so that all twelve header words lie inside the
    8 KiB it read; a header starting later is not seen, here either.
    """
    bad_checksum = None
    limit = min(HEADER_SEARCH_SIZE - 48, len(image) - 12 + 1)
    # bytes.find visits the candidates, not every aligned word: a kernel's
    # header sits after its ELF headers, a thousand words in.
    window, magic_bytes = bytes(image[:HEADER_SEARCH_SIZE]), HEADER_MAGIC.to_bytes(4, "little")
    offset = window.find(magic_bytes)
    while 0 <= offset < limit:
        if offset % HEADER_ALIGN == 0:
            magic, flags, checksum = struct.unpack_from("<III", image, offset)
            if (magic + flags + checksum) & 0xFFFF_FFFF == 0:
                return offset, bad_checksum
            if bad_checksum is None:
                bad_checksum = offset
        offset = window.find(magic_bytes, offset + 1)
    return None, bad_checksum


def _is_linux(image: bytes | memoryview) -> bool:
    return image[LINUX_HEADER_OFFSET:LINUX_HEADER_OFFSET + 4] == LINUX_HEADER_MAGIC


def find_header(image: bytes | memoryview) -> MultibootHeader:
    """Find and decode the Multiboot header, or raise ``BadKernel``."""
    image = memoryview(image)  # a view: a mapped file is not read beyond its first 8 KiB
    offset, bad_checksum = _scan_for_header(image)
    if offset is None:
        if bad_checksum is not None:
            raise BadKernel(f"not a Multiboot kernel: the header at file offset {bad_checksum:#x} "
                            f"has a bad checksum")
        raise BadKernel("not a Multiboot kernel: no header (magic 0x1BADB002) in the first 8 KiB")
    flags = struct.unpack_from("<I", image, offset + 4)[0]
    if not flags & HEADER_FLAG_AOUT_KLUDGE:
        return MultibootHeader(offset=offset, flags=flags)
    if offset + 32 > len(image):
        raise BadKernel(f"truncated Multiboot header at file offset {offset:#x}: "
                        f"the address fields run past the end of the {len(image)}-byte file")
    header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr = struct.unpack_from("<5I", image, offset + 12)
    return MultibootHeader(offset, flags, header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr)


def is_multiboot(image: bytes | memoryview) -> bool:
    """Would QEMU's ``-kernel`` boot ``image`` as a Multiboot kernel?

    QEMU checks for a Linux boot header first, so a bzImage that happens to
    carry a Multiboot header too is still Linux.
    """
    image = memoryview(image)
    return not _is_linux(image) and _scan_for_header(image)[0] is not None


# --- Turning the image into bytes at an address ------------------------------

class _KernelImage(Record):
    """Where a kernel goes and what to copy there, not yet copied anywhere.

    ``size`` is the whole memory image, BSS included; ``pieces`` are file
    bytes (views of the image, not copies) at offsets from ``load_addr``, and
    everything else in the image is zero.  Keeping the pieces apart means a
    huge sparse image costs nothing until it has been checked against RAM,
    and a huge BSS costs nothing at all (see :meth:`GuestMemory.fill`).
    """

    load_addr: int
    size: int
    entry: int
    pieces: tuple[tuple[int, int, int], ...]  # (offset from load_addr, file offset, length)


def _kernel_from_header(image: bytes | memoryview, header: MultibootHeader) -> _KernelImage:
    """The a.out kludge: the header says which file bytes go where.

    The checks are QEMU's, in its order, with its 32-bit arithmetic.
    """
    h = header
    if h.header_addr < h.load_addr:
        raise BadKernel(f"bad Multiboot header: header_addr {h.header_addr:#x} is below load_addr {h.load_addr:#x}")
    if h.header_addr - h.load_addr > h.offset:
        raise BadKernel(f"bad Multiboot header: header_addr - load_addr = {h.header_addr - h.load_addr:#x} "
                        f"but the header is at file offset {h.offset:#x}")
    text_offset = h.offset - (h.header_addr - h.load_addr)  # file offset loaded at load_addr
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise BadKernel(f"bad Multiboot header: load_end_addr {h.load_end_addr:#x} "
                            f"is below load_addr {h.load_addr:#x}")
        load_size = h.load_end_addr - h.load_addr
    else:
        load_size = len(image) - text_offset  # 0 means "to the end of the file"
    if load_size > 0xFFFF_FFFF - h.load_addr:
        raise BadKernel(f"bad Multiboot header: {load_size:#x} bytes at {h.load_addr:#x} run past 4 GiB")
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + load_size:
            raise BadKernel(f"bad Multiboot header: bss_end_addr {h.bss_end_addr:#x} "
                            f"is below the end of the loaded text {h.load_addr + load_size:#x}")
        kernel_size = h.bss_end_addr - h.load_addr
    else:
        kernel_size = load_size
    if text_offset + load_size > len(image):
        raise BadKernel(f"truncated kernel: the header asks for {load_size:#x} bytes from file offset "
                        f"{text_offset:#x}, but the file is {len(image):#x} bytes")
    return _KernelImage(h.load_addr, kernel_size, h.entry_addr, ((0, text_offset, load_size),))


def _kernel_from_elf(image: bytes | memoryview) -> _KernelImage:
    """No a.out kludge: load the ELF32 PT_LOAD segments at their physical addresses."""
    # QEMU looks at e_machine before anything else and names the problem.
    if image[:4] == elf.ELF_MAGIC and (
            (len(image) > 4 and image[4] == elf.ELFCLASS64)
            or image[18:20] == struct.pack("<H", elf.EM_X86_64)):
        raise BadKernel("cannot boot a 64-bit (x86-64) ELF as a Multiboot kernel: give a 32-bit one")
    try:
        parsed = elf.parse_elf(image)
    except BadKernel as e:
        raise BadKernel(f"Multiboot kernel without the a.out kludge must be ELF: {e}") from None
    if parsed.machine != elf.EM_386:
        raise BadKernel(f"ELF e_machine {parsed.machine} is not EM_386 (3)")
    if parsed.type != elf.ET_EXEC:
        raise BadKernel(f"ELF e_type {parsed.type} is not ET_EXEC (2)")
    segments = sorted(parsed.load_segments, key=lambda ph: ph.paddr)
    if not segments:
        raise BadKernel("ELF kernel has no PT_LOAD segment to load")
    for before, after in zip(segments, segments[1:]):
        if before.paddr + before.memsz > after.paddr:
            raise BadKernel(f"ELF segments overlap: [{before.paddr:#x}, {before.paddr + before.memsz:#x}) "
                            f"and [{after.paddr:#x}, {after.paddr + after.memsz:#x})")
    low = segments[0].paddr
    high = max(ph.paddr + ph.memsz for ph in segments)
    # Like QEMU, the kernel is the one range [low, high): gaps between
    # segments and each segment's BSS are zeros.
    return _KernelImage(low, high - low, parsed.entry,
                        tuple((ph.paddr - low, ph.offset, ph.filesz) for ph in segments))


# --- The memory map ------------------------------------------------------------

class MemoryRegion(Record):
    base: int
    length: int
    type: int  # MMAP_TYPE_RAM or MMAP_TYPE_RESERVED

    @property
    def end(self) -> int:
        return self.base + self.length


def memory_map(ram_size: int, reserved: Sequence[tuple[int, int]] = ()) -> list[MemoryRegion]:
    """The BIOS-style (e820) map of a PC with ``ram_size`` bytes of RAM at 0.

    Conventional memory stops at the EBDA (639 KiB); the EBDA and the
    system BIOS ROM are reserved, as SeaBIOS reports them; the VGA window
    and option ROMs between them are simply absent.  Above 1 MiB, RAM runs
    to ``ram_size``.  ``reserved`` adds ``(base, length)`` regions the VMM
    keeps for itself.
    """
    if ram_size <= HIGH_MEMORY_START:
        raise ValueError(f"ram_size {ram_size:#x} must be above 1 MiB")
    regions = [
        MemoryRegion(0, EBDA_START, MMAP_TYPE_RAM),
        MemoryRegion(EBDA_START, 0xA0000 - EBDA_START, MMAP_TYPE_RESERVED),
        MemoryRegion(BIOS_ROM_START, HIGH_MEMORY_START - BIOS_ROM_START, MMAP_TYPE_RESERVED),
        MemoryRegion(HIGH_MEMORY_START, ram_size - HIGH_MEMORY_START, MMAP_TYPE_RAM),
    ]
    regions += [MemoryRegion(base, length, MMAP_TYPE_RESERVED) for base, length in reserved]
    if len(regions) > MMAP_CAPACITY:
        raise ValueError(f"{len(regions)} memory map entries do not fit in the {MMAP_CAPACITY} slots at {MMAP_ADDR:#x}")
    return regions


def _mmap_bytes(regions: Sequence[MemoryRegion]) -> bytes:
    return b"".join(struct.pack("<IQQI", MMAP_ENTRY_SIZE, r.base, r.length, r.type) for r in regions)


def _upper_memory_kib(regions: Sequence[MemoryRegion]) -> int:
    """KiB of RAM from 1 MiB up to the first hole, as the option ROM counts it."""
    end = HIGH_MEMORY_START
    grown = True
    while grown:  # the map need not be sorted, so rescan after each extension
        grown = False
        for r in regions:
            if r.type == MMAP_TYPE_RAM and r.base < FOUR_GIB and r.base <= end < r.end:
                end, grown = r.end, True
    return (min(end, FOUR_GIB) - HIGH_MEMORY_START) >> 10


# --- Modules and command lines -------------------------------------------------

def split_initrd_option(option: str) -> list[str]:
    """Split QEMU's ``-initrd`` value into one string per module.

    Items are separated by commas and a doubled comma stands for a comma in
    a name, as in all QEMU option values.  Each item is a file name,
    optionally followed by a space and the module's arguments.
    """
    items, current, i = [], [], 0
    while i < len(option):
        if option[i] == ",":
            if option[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(option[i])
        i += 1
    items.append("".join(current))
    return items


def module_file(module_cmdline: str) -> str:
    """The file part of a module's command line: everything before the first space."""
    return module_cmdline.split(" ", 1)[0]


def _c_string(text: str, what: str) -> bytes:
    raw = os.fsencode(text)  # the bytes QEMU would have seen in argv
    if b"\0" in raw:
        raise BadKernel(f"{what} contains a NUL byte")
    return raw + b"\0"


# --- The result ------------------------------------------------------------------

class Module(Record):
    start: int
    end: int  # one past the last byte, as QEMU writes mod_end
    cmdline_addr: int
    cmdline: str


class MultibootBoot(Record):
    """A loaded Multiboot kernel, ready to run.

    ``writes`` have already been applied to guest memory; they are kept so
    a caller can see (or a test can check) exactly what was written.
    ``loaded_ranges`` lists every ``[start, end)`` range that was written.
    """

    entry: int
    info_addr: int
    kernel_range: tuple[int, int]
    cmdline: str
    cmdline_addr: int
    modules: tuple[Module, ...]
    memory_map: tuple[MemoryRegion, ...]
    cpu_state: CpuState
    writes: tuple[Write, ...]

    @property
    def loaded_ranges(self) -> list[tuple[int, int]]:
        return [(gpa, gpa + len(data)) for gpa, data in self.writes]


# Low-memory ranges the loader itself fills in; a kernel may not land on them.
BOOT_AREAS = (
    ("GDT", GDT_BASE, GDT_BASE + len(flat_gdt())),
    ("Multiboot information", MMAP_ADDR, INFO_ADDR + INFO_SIZE),
)


# --- The loader -------------------------------------------------------------------

def load_multiboot(image: bytes | memoryview, memory, *, kernel_path: str, append: str = "",
                   modules: Sequence[tuple[bytes, str]] = (), ram_size: int | None = None,
                   reserved: Sequence[tuple[int, int]] = ()) -> MultibootBoot:
    """Load ``image`` into ``memory`` as QEMU's ``-kernel`` would load it.

    ``kernel_path`` and ``append`` make the kernel's command line, as
    ``-kernel`` and ``-append`` do.  Each module is ``(data, cmdline)``,
    where ``cmdline`` is one ``-initrd`` item (see ``split_initrd_option``).
    ``ram_size`` defaults to all of ``memory``.  Any problem with the image
    raises ``BadKernel`` before guest memory is touched.
    """
    source, image = image, memoryview(image)  # views from here on: the file is copied once, into guest RAM
    if ram_size is None:
        ram_size = memory.size
    if ram_size > memory.size:
        raise ValueError(f"ram_size {ram_size:#x} is larger than guest memory ({memory.size:#x})")
    regions = memory_map(ram_size, reserved)

    if _is_linux(image):
        raise BadKernel("this is a Linux boot image (HdrS at 0x202), not a Multiboot kernel")
    header = find_header(image)
    kernel = _kernel_from_header(image, header) if header.has_addresses else _kernel_from_elf(image)
    load_addr, kernel_size = kernel.load_addr, kernel.size

    # One buffer from load_addr: kernel, page-aligned; module list; command
    # lines (modules' first); boot loader name.  Space for the command lines
    # is reckoned as QEMU reckons it, from the undivided -initrd string, so
    # the boot loader name lands where it would under QEMU.
    module_lines = [_c_string(line, "module command line") for _, line in modules]
    kernel_line = f"{kernel_path} {append}"
    kernel_line_bytes = _c_string(kernel_line, "kernel command line")
    cmdlines_size = len(os.fsencode(kernel_path)) + 1 + len(os.fsencode(append)) + 1
    if modules:
        initrd_option = ",".join(line.replace(",", ",,") for _, line in modules)
        cmdlines_size += len(os.fsencode(initrd_option)) + 1
    name_bytes = _c_string(BOOTLOADER_NAME, "boot loader name")

    info_offset = _page_align(kernel_size)
    cmdlines_offset = info_offset + MODULE_ENTRY_SIZE * len(modules)
    name_offset = cmdlines_offset + cmdlines_size
    buffer_size = _page_align(name_offset + len(name_bytes))
    module_offsets = []
    for data, _ in modules:
        module_offsets.append(buffer_size)
        buffer_size = _page_align(buffer_size + len(data))
    load_end = load_addr + buffer_size

    # Refuse anything that would not fit, before building a single byte.
    what = "kernel and modules" if modules else "kernel"
    if load_end > FOUR_GIB:
        raise BadKernel(f"{what} [{load_addr:#x}, {load_end:#x}) runs past 4 GiB")
    _check_placement(what, load_addr, load_end, regions)

    # The buffer is written as QEMU builds it, but never built whole: it is
    # zeroed in guest RAM (free for fresh pages), then the file pieces are
    # copied straight from the image, and the small part QEMU fills in
    # itself -- module list, command lines, loader name -- is one short write.
    meta = bytearray(name_offset + len(name_bytes) - info_offset)
    loaded_modules = []
    cursor = cmdlines_offset
    for index, ((data, line), raw, offset) in enumerate(zip(modules, module_lines, module_offsets)):
        meta[cursor - info_offset:cursor - info_offset + len(raw)] = raw
        module = Module(load_addr + offset, load_addr + offset + len(data), load_addr + cursor, line)
        struct.pack_into("<IIII", meta, MODULE_ENTRY_SIZE * index,
                         module.start, module.end, module.cmdline_addr, 0)
        loaded_modules.append(module)
        cursor += len(raw)
    cmdline_addr = load_addr + cursor
    meta[cursor - info_offset:cursor - info_offset + len(kernel_line_bytes)] = kernel_line_bytes
    meta[name_offset - info_offset:] = name_bytes
    buffer_writes: list[Write] = [(load_addr, Zeros(buffer_size))]
    for offset, file_offset, length in kernel.pieces:
        buffer_writes += _file_writes(source, image, load_addr + offset, file_offset, length)
    buffer_writes.append((load_addr + info_offset, bytes(meta)))
    for (data, _), offset in zip(modules, module_offsets):
        buffer_writes += _file_writes(data, memoryview(data), load_addr + offset, 0, len(data))

    mmap = _mmap_bytes(regions)
    info = bytearray(INFO_SIZE)
    struct.pack_into("<I", info, MBI_FLAGS, INFO_FLAGS)
    struct.pack_into("<I", info, MBI_MEM_LOWER, EBDA_START >> 10)
    struct.pack_into("<I", info, MBI_MEM_UPPER, _upper_memory_kib(regions))
    struct.pack_into("<I", info, MBI_BOOT_DEVICE, BOOT_DEVICE)
    struct.pack_into("<I", info, MBI_CMDLINE, cmdline_addr)
    struct.pack_into("<I", info, MBI_MODS_COUNT, len(modules))
    struct.pack_into("<I", info, MBI_MODS_ADDR, load_addr + info_offset)
    struct.pack_into("<I", info, MBI_MMAP_LENGTH, len(mmap))
    struct.pack_into("<I", info, MBI_MMAP_ADDR, MMAP_ADDR)
    struct.pack_into("<I", info, MBI_BOOT_LOADER_NAME, load_addr + name_offset)

    state, mode_writes = protected_mode_state(kernel.entry)
    # Multiboot's promise: the magic in EAX, the information in EBX.
    state = state.with_regs(rax=BOOTLOADER_MAGIC, rbx=INFO_ADDR)
    writes: tuple[Write, ...] = (*mode_writes, (MMAP_ADDR, mmap), (INFO_ADDR, bytes(info)), *buffer_writes)
    try:
        apply_writes(memory, writes)
    except GuestMemoryError as e:  # cannot happen after the checks above; say where if it does
        raise BadKernel(f"loading the Multiboot kernel {kernel_path}: {e}") from None

    return MultibootBoot(
        entry=kernel.entry, info_addr=INFO_ADDR, kernel_range=(load_addr, load_addr + kernel_size),
        cmdline=kernel_line, cmdline_addr=cmdline_addr, modules=tuple(loaded_modules),
        memory_map=tuple(regions), cpu_state=state, writes=writes,
    )


def _file_writes(source, view, gpa: int, file_offset: int, length: int) -> list[tuple[int, bytes]]:
    """``(gpa, bytes)`` writes copying ``length`` file bytes from ``file_offset`` to ``gpa``.

    A source that knows its ``data_extents`` (a mapped sparse file, see
    :func:`qkio.machine.map_file`) gives only the ranges that hold data: a
    hole reads as zeros, and the range is zeroed already, so a 2 GB sparse
    initrd costs what its data costs, not 2 GB."""
    end = file_offset + length
    extents = getattr(source, "data_extents", None)
    if extents is None:
        return [(gpa, view[file_offset:end])] if length else []
    out = []
    for start, stop in extents:
        lo, hi = max(start, file_offset), min(stop, end)
        if lo < hi:
            out.append((gpa + lo - file_offset, view[lo:hi]))
    return out


def _check_placement(what: str, start: int, end: int, regions: Sequence[MemoryRegion]) -> None:
    if end == start:
        return
    if not any(r.type == MMAP_TYPE_RAM and r.base <= start and end <= r.end for r in regions):
        raise BadKernel(f"{what} [{start:#x}, {end:#x}) is not inside guest RAM "
                        f"(RAM is [0, {EBDA_START:#x}) and [{HIGH_MEMORY_START:#x}, "
                        f"{max(r.end for r in regions if r.type == MMAP_TYPE_RAM):#x}))")
    for r in regions:
        if r.type != MMAP_TYPE_RAM and start < r.end and r.base < end:
            raise BadKernel(f"{what} [{start:#x}, {end:#x}) overlaps reserved memory [{r.base:#x}, {r.end:#x})")
    for name, area_start, area_end in BOOT_AREAS:
        if start < area_end and area_start < end:
            raise BadKernel(f"{what} [{start:#x}, {end:#x}) overlaps the {name} at [{area_start:#x}, {area_end:#x})")
