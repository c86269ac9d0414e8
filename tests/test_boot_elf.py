"""The strict ELF reader (qkio.boot.elf): good files parse, bad ones say why in one line."""

from __future__ import annotations

import struct

import pytest

from kernels import synthetic
from qkio.boot.elf import PT_LOAD, parse_elf
from qkio.errors import BadKernel


def elf64(entry=0x1000, segments=((0x1000, b"abc", 0x10),), machine=62) -> bytes:
    phdrs = b"".join(struct.pack("<IIQQQQQQ", PT_LOAD, 5, 0x1000 + i * 0x100, paddr, paddr, len(data), memsz, 8)
                     for i, (paddr, data, memsz) in enumerate(segments))
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, 64, 0, 0, 64, 56, len(segments), 64, 0, 0)
    image = bytearray((header + phdrs).ljust(0x1000, b"\0"))
    for i, (_, data, _) in enumerate(segments):
        image[0x1000 + i * 0x100:0x1000 + i * 0x100 + len(data)] = data
    return bytes(image)


def test_parses_elf32():
    image = synthetic.multiboot_elf(bss_size=0x500)
    parsed = parse_elf(image)
    assert (parsed.elf_class, parsed.machine, parsed.type, parsed.entry) == (32, 3, 2, 0x10000C)
    text, data = parsed.load_segments
    assert text.paddr == 0x100000 and text.filesz == text.memsz == 0x80
    assert data.paddr == 0x101000 and data.memsz == data.filesz + 0x500
    assert text.data(image)[:4] == struct.pack("<I", 0x1BADB002)


def test_parses_elf64():
    parsed = parse_elf(elf64())
    assert parsed.elf_class == 64 and parsed.machine == 62
    (seg,) = parsed.load_segments
    assert (seg.paddr, seg.filesz, seg.memsz) == (0x1000, 3, 0x10)


def test_empty_load_segments_are_not_loaded():
    image = synthetic.elf32([(0x100000, b"x", 1), (0x200000, b"", 0)], entry=0x100000)
    assert len(parse_elf(image).load_segments) == 1


def _patch(image: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


GOOD = synthetic.multiboot_elf()
PH0 = 52  # first program header


@pytest.mark.parametrize("image, message", [
    (b"", "only 0 bytes"),
    (b"\x7fEL", "only 3 bytes"),
    (b"MZ" + bytes(100), "magic"),
    (_patch(GOOD, 4, "B", 3), "EI_CLASS 3"),
    (_patch(GOOD, 5, "B", 2), "little-endian"),
    (_patch(GOOD, 6, "B", 0), "EI_VERSION"),
    (GOOD[:40], "file header alone needs 52"),
    (_patch(GOOD, 20, "<I", 7), "e_version"),
    (_patch(GOOD, 40, "<H", 20), "e_ehsize"),
    (_patch(GOOD, 42, "<H", 16), "e_phentsize"),
    (_patch(GOOD, 44, "<H", 0xFFFF), "extended numbering"),
    (_patch(GOOD, 28, "<I", 8), "inside the 52-byte file header"),
    (_patch(GOOD, 28, "<I", 0xFFFFFFF0), "program header table"),
    (GOOD[:PH0 + 40], "program header table"),
    (_patch(GOOD, PH0 + 16, "<I", 0x100000), "p_filesz"),                # filesz > memsz
    (_patch(GOOD, PH0 + 4, "<I", 0x7FFFFFFF), "past the end"),          # p_offset
    (GOOD[:0x1000 + 0x40], "past the end"),                             # segment data truncated
    (_patch(_patch(GOOD, PH0 + 12, "<I", 0xFFFFFFF0), PH0 + 8, "<I", 0), "p_paddr"),  # wraps 4 GiB
    (_patch(GOOD, PH0 + 8, "<I", 0xFFFFFFF0), "p_vaddr"),
])
def test_rejects_malformed(image, message):
    with pytest.raises(BadKernel, match=message) as info:
        parse_elf(image)
    assert "\n" not in str(info.value)


def test_elf64_segment_overflow():
    with pytest.raises(BadKernel, match="64-bit address space"):
        parse_elf(elf64(segments=((2**64 - 8, b"", 0x10),)))
