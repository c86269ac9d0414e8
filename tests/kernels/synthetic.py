"""Multiboot kernels made from bytes in Python, for tests that need no toolchain.

They are laid out as ``ld`` would lay them out -- ELF header, program
headers, then the segment data at a page-aligned file offset -- but the code
in them is never run, so it is filler.  What matters is that they are
valid, so that every corruption a fuzzer makes is a change to a valid file.
"""

from __future__ import annotations

import struct

MB_MAGIC = 0x1BADB002
AOUT_KLUDGE = 1 << 16


def multiboot_header(flags: int = 0, *, header_addr=0, load_addr=0, load_end_addr=0,
                     bss_end_addr=0, entry_addr=0) -> bytes:
    checksum = -(MB_MAGIC + flags) & 0xFFFFFFFF
    head = struct.pack("<III", MB_MAGIC, flags, checksum)
    if flags & AOUT_KLUDGE:
        head += struct.pack("<5I", header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr)
    return head


def elf32(segments: list[tuple[int, bytes, int]], entry: int, *, machine: int = 3,
          data_offset: int = 0x1000) -> bytes:
    """An ELF32 executable; each segment is ``(paddr, file bytes, memsz)``.

    Segment data is packed from ``data_offset`` on, each at a 16-byte
    aligned offset.
    """
    ehsize, phentsize = 52, 32
    phdrs, blobs, offset = [], [], data_offset
    for paddr, data, memsz in segments:
        phdrs.append(struct.pack("<8I", 1, offset, paddr, paddr, len(data), memsz, 7, 0x1000))
        blobs.append((offset, data))
        offset = (offset + len(data) + 15) & ~15
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, ehsize, 0, 0,
                                 ehsize, phentsize, len(phdrs), 40, 0, 0)
    image = bytearray(header + b"".join(phdrs))
    for off, data in blobs:
        image[len(image):off] = bytes(max(0, off - len(image)))
        image[off:off + len(data)] = data
    return bytes(image)


def multiboot_elf(*, load_addr: int = 0x100000, text_size: int = 0x80, bss_size: int = 0x1000,
                  data: bytes | None = None, extra_segment: bool = True) -> bytes:
    """A small valid Multiboot ELF: header + filler text at ``load_addr``,
    and optionally a data segment with BSS one page further up."""
    text = multiboot_header() + bytes([0x90]) * (text_size - 12)  # nops
    segments = [(load_addr, text, len(text))]
    if extra_segment:
        blob = data if data is not None else b"DATA" * 8
        segments.append((load_addr + 0x1000, blob, len(blob) + bss_size))
    return elf32(segments, entry=load_addr + 12)


def aout_kernel(*, load_addr: int = 0x100000, text: bytes = b"\x90" * 0x40, bss_size: int = 0x200,
                header_offset: int = 0) -> bytes:
    """A flat binary using the a.out kludge: the header says where it goes.

    The file is loaded from offset 0 at ``load_addr``; the header sits at
    ``header_offset`` within it.
    """
    size = max(header_offset + 32, len(text))
    body = bytearray(text.ljust(size, b"\0"))
    head = multiboot_header(AOUT_KLUDGE, header_addr=load_addr + header_offset, load_addr=load_addr,
                            load_end_addr=load_addr + size, bss_end_addr=load_addr + size + bss_size,
                            entry_addr=load_addr + header_offset + 32)
    body[header_offset:header_offset + 32] = head
    return bytes(body)
