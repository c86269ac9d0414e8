"""A strict reader for the parts of an ELF file a kernel loader needs.

A loader needs the file header (class, machine, entry point) and the
program headers (what to copy where).  Sections, symbols and everything
else are for linkers and debuggers, so they are not read at all.

"Strict" means every number that will later steer a copy into guest
memory is checked here first: the program header table and every
segment's bytes must lie inside the file, a segment's file image cannot be
bigger than its memory image, and no segment may wrap around the address
space of its class.  Each problem is a ``BadKernel`` whose message is one
line naming the field and its value, since the user who sees it is
probably looking at ``readelf -lh`` output.

Only little-endian files are accepted: the one machine qkio emulates is
x86.
"""

from __future__ import annotations

import struct

from ..errors import BadKernel
from ..record import Record

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1

ET_EXEC = 2
ET_DYN = 3

EM_386 = 3
EM_X86_64 = 62

PT_NULL = 0
PT_LOAD = 1

PN_XNUM = 0xFFFF  # "the real count is elsewhere": an extension no kernel needs

# e_ident is followed by the rest of the file header; only its layout
# differs between classes.  Fields: type, machine, version, entry, phoff,
# shoff, flags, ehsize, phentsize, phnum, shentsize, shnum, shstrndx.
_EHDR = {ELFCLASS32: struct.Struct("<HHIIIIIHHHHHH"), ELFCLASS64: struct.Struct("<HHIQQQIHHHHHH")}
# Program header fields differ in order as well as width between classes.
_PHDR32 = struct.Struct("<IIIIIIII")  # type offset vaddr paddr filesz memsz flags align
_PHDR64 = struct.Struct("<IIQQQQQQ")  # type flags offset vaddr paddr filesz memsz align
_EI_NIDENT = 16


class ProgramHeader(Record):
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int

    def data(self, image: bytes | memoryview) -> bytes | memoryview:
        """The segment's bytes from the file (``filesz`` of them; a view if ``image`` is one)."""
        return image[self.offset:self.offset + self.filesz]


class ElfImage(Record):
    elf_class: int  # 32 or 64
    type: int
    machine: int
    entry: int
    phoff: int
    program_headers: tuple[ProgramHeader, ...]

    @property
    def load_segments(self) -> tuple[ProgramHeader, ...]:
        """PT_LOAD segments that occupy memory, in file order.

        Empty PT_LOAD segments (memsz 0) are dropped, as QEMU's ELF loader
        drops them: some linkers emit them and they load nothing.
        """
        return tuple(ph for ph in self.program_headers if ph.type == PT_LOAD and ph.memsz)


def parse_elf(image: bytes | memoryview) -> ElfImage:
    """Read and check the file header and program headers of ``image``.

    ``image`` may be any bytes-like object -- a mapped file, say: only the
    headers are read, never the whole file."""
    image = memoryview(image)
    if len(image) < _EI_NIDENT:
        raise BadKernel(f"not an ELF file: only {len(image)} bytes, less than the 16-byte e_ident")
    if image[:4] != ELF_MAGIC:
        raise BadKernel(f"not an ELF file: magic is {bytes(image[:4])!r}, not {ELF_MAGIC!r}")
    ei_class, ei_data, ei_version = image[4], image[5], image[6]
    if ei_class not in _EHDR:
        raise BadKernel(f"bad ELF: EI_CLASS {ei_class} is neither 1 (32-bit) nor 2 (64-bit)")
    if ei_data != ELFDATA2LSB:
        raise BadKernel(f"bad ELF: EI_DATA {ei_data} is not 1 (little-endian)")
    if ei_version != EV_CURRENT:
        raise BadKernel(f"bad ELF: EI_VERSION {ei_version} is not 1")
    bits = 32 if ei_class == ELFCLASS32 else 64
    ehdr = _EHDR[ei_class]
    header_size = _EI_NIDENT + ehdr.size
    if len(image) < header_size:
        raise BadKernel(f"truncated ELF{bits}: {len(image)} bytes, the file header alone needs {header_size}")
    (e_type, e_machine, e_version, e_entry, e_phoff, _shoff, _flags, e_ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(image, _EI_NIDENT)
    if e_version != EV_CURRENT:
        raise BadKernel(f"bad ELF{bits}: e_version {e_version} is not 1")
    if e_ehsize < header_size:
        raise BadKernel(f"bad ELF{bits}: e_ehsize {e_ehsize} is smaller than the {header_size}-byte header")

    phdr = _PHDR32 if ei_class == ELFCLASS32 else _PHDR64
    if e_phnum == PN_XNUM:
        raise BadKernel(f"bad ELF{bits}: e_phnum {PN_XNUM:#x} (extended numbering) is not supported")
    headers = []
    if e_phnum:
        if e_phentsize < phdr.size:
            raise BadKernel(f"bad ELF{bits}: e_phentsize {e_phentsize} is smaller than a {phdr.size}-byte program header")
        table_end = e_phoff + e_phnum * e_phentsize
        if e_phoff < header_size:
            # Tiny hand-made ELFs overlap the two tables; real kernels never do.
            raise BadKernel(f"bad ELF{bits}: e_phoff {e_phoff:#x} points inside the {header_size}-byte file header")
        if table_end > len(image):
            raise BadKernel(f"bad ELF{bits}: program header table [{e_phoff:#x}, {table_end:#x}) "
                            f"is outside the {len(image):#x}-byte file")
        for index in range(e_phnum):
            fields = phdr.unpack_from(image, e_phoff + index * e_phentsize)
            if ei_class == ELFCLASS32:
                p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align = fields
            else:
                p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = fields
            ph = ProgramHeader(p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)
            if ph.type == PT_LOAD:
                _check_load_segment(ph, index, bits, len(image))
            headers.append(ph)
    return ElfImage(elf_class=bits, type=e_type, machine=e_machine, entry=e_entry,
                    phoff=e_phoff, program_headers=tuple(headers))


def _check_load_segment(ph: ProgramHeader, index: int, bits: int, file_size: int) -> None:
    where = f"bad ELF{bits}: segment {index}"
    if ph.filesz > ph.memsz:
        raise BadKernel(f"{where}: p_filesz {ph.filesz:#x} is larger than p_memsz {ph.memsz:#x}")
    if ph.offset + ph.filesz > file_size:
        raise BadKernel(f"{where}: file bytes [{ph.offset:#x}, {ph.offset + ph.filesz:#x}) "
                        f"run past the end of the {file_size:#x}-byte file")
    for name, addr in (("p_paddr", ph.paddr), ("p_vaddr", ph.vaddr)):
        if addr + ph.memsz > 1 << bits:
            raise BadKernel(f"{where}: {name} {addr:#x} + p_memsz {ph.memsz:#x} "
                            f"overflows the {bits}-bit address space")
