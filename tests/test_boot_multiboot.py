"""The Multiboot loader (qkio.boot.multiboot), checked against what QEMU 7.2 does.

The expected addresses below are what the ``mbinfo`` test kernel printed
under ``qemu-system-x86_64 -kernel /img/mbinfo.elf -initrd "/img/m1 x=1
y,/img/m2,,z"`` (QEMU 7.2.22, Debian 12; the files lived in a directory whose name had
the same length as /img), with a 3-byte m1 and a
5000-byte m2 -- see test_boot_kernels.py for the run that checks it live.
"""

from __future__ import annotations

import struct

import pytest

from kernels import synthetic
from qkio.boot import multiboot as mb
from qkio.boot.modes import GDT_BASE
from qkio.errors import BadKernel
from qkio.kvm.memory import GuestMemory

MIB = 1 << 20


@pytest.fixture
def memory():
    with GuestMemory(16 * MIB) as m:
        yield m


def u32(memory, gpa):
    return memory.read_u32(gpa)


def c_string(memory, gpa, limit=4096):
    raw = memory.read(gpa, limit)
    return raw[:raw.index(b"\0")].decode()


def info_fields(memory):
    return struct.unpack("<22I", memory.read(mb.INFO_ADDR, mb.INFO_SIZE))


def test_header_search():
    image = bytes(0x400) + synthetic.multiboot_header() + bytes(64)
    assert mb.find_header(image).offset == 0x400
    assert mb.is_multiboot(image)
    assert not mb.is_multiboot(bytes(0x400) + synthetic.multiboot_header()[:8] + b"\0\0\0\0")
    # Not 4-byte aligned: not a header.
    assert not mb.is_multiboot(bytes(0x402) + synthetic.multiboot_header() + bytes(64))
    # QEMU looks no further than 8192 - 48.
    assert mb.is_multiboot(bytes(8192 - 52) + synthetic.multiboot_header() + bytes(64))
    assert not mb.is_multiboot(bytes(8192 - 48) + synthetic.multiboot_header() + bytes(64))


def test_bzimage_is_linux_even_with_a_multiboot_header():
    image = bytearray(synthetic.multiboot_header() + bytes(0x400))
    image[0x202:0x206] = b"HdrS"
    assert not mb.is_multiboot(bytes(image))
    with GuestMemory(4 * MIB) as m, pytest.raises(BadKernel, match="Linux"):
        mb.load_multiboot(bytes(image), m, kernel_path="bz")


def test_layout_matches_qemu(memory):
    # Same shape as mbinfo.elf: one segment, 0x40d0 bytes in memory from 1 MiB.
    image = synthetic.elf32([(0x100000, synthetic.multiboot_header() + bytes(0xb5), 0x40D0)], entry=0x10008A)
    boot = mb.load_multiboot(image, memory, kernel_path="/img/mbinfo.elf",
                             modules=[(b"abc", "/img/m1 x=1 y"), (bytes(5000), "/img/m2,z")])
    f = info_fields(memory)
    assert f[0] == 0x24F                          # flags
    assert f[1] == 0x27F                          # mem_lower: 639 KiB
    assert f[3] == 0x8000FFFF                     # boot_device
    assert f[4] == 0x105038 == boot.cmdline_addr  # cmdline
    assert (f[5], f[6]) == (2, 0x105000)          # mods_count, mods_addr
    assert f[12] == 0x9000                        # mmap_addr
    assert f[16] == 0x10504A                      # boot_loader_name
    assert c_string(memory, 0x105038) == "/img/mbinfo.elf "
    assert c_string(memory, 0x10504A) == "qemu"
    mods = struct.unpack("<8I", memory.read(0x105000, 32))
    assert mods[:3] == (0x106000, 0x106003, 0x105020)
    assert mods[4:7] == (0x107000, 0x108388, 0x10502E)
    assert c_string(memory, 0x105020) == "/img/m1 x=1 y"
    assert c_string(memory, 0x10502E) == "/img/m2,z"
    assert memory.read(0x106000, 3) == b"abc"
    assert boot.kernel_range == (0x100000, 0x1040D0)
    assert boot.entry == 0x10008A and boot.info_addr == 0x9500


def test_memory_map_and_upper_memory(memory):
    boot = mb.load_multiboot(synthetic.multiboot_elf(), memory, kernel_path="k", ram_size=8 * MIB,
                             reserved=[(0xFFFBD000, 0x3000)])
    f = info_fields(memory)
    assert f[2] == (8 * MIB - MIB) // 1024  # mem_upper: up to the end of RAM
    assert f[11] == 5 * 24                  # mmap_length
    entries = [struct.unpack_from("<IQQI", memory.read(0x9000, 5 * 24), i * 24) for i in range(5)]
    assert entries == [
        (20, 0, 0x9FC00, 1),
        (20, 0x9FC00, 0x400, 2),
        (20, 0xF0000, 0x10000, 2),
        (20, 0x100000, 7 * MIB, 1),
        (20, 0xFFFBD000, 0x3000, 2),
    ]
    assert [r.type for r in boot.memory_map] == [1, 2, 2, 1, 2]


def test_cmdline_with_append(memory):
    boot = mb.load_multiboot(synthetic.multiboot_elf(), memory, kernel_path="/k", append="console=ttyS0 x")
    assert boot.cmdline == "/k console=ttyS0 x"
    assert c_string(memory, u32(memory, mb.INFO_ADDR + 16)) == "/k console=ttyS0 x"


def test_cpu_state_is_multiboot_machine_state(memory):
    boot = mb.load_multiboot(synthetic.multiboot_elf(), memory, kernel_path="k")
    s = boot.cpu_state
    assert s.mode == "protected" and s.cr0 == 0x11
    assert s.regs["rax"] == 0x2BADB002 and s.regs["rbx"] == 0x9500
    assert s.regs["rip"] == 0x10000C
    assert s.regs["rflags"] == 0x2  # IF=0
    assert s.cs.base == 0 and s.cs.limit == 0xFFFFFFFF and s.cs.db == 1
    assert s.ss.limit == 0xFFFFFFFF and s.ds.type == 0x3
    assert memory.read(GDT_BASE + 8, 8) == struct.pack("<Q", 0x00CF9B000000FFFF)


def test_elf_segments_and_bss(memory):
    memory.fill(0x100000, 0x3000, 0xAA)  # BSS and gaps must be zeroed, not left as found
    image = synthetic.multiboot_elf(data=b"DATA", bss_size=0x20)
    boot = mb.load_multiboot(image, memory, kernel_path="k")
    assert memory.read(0x100000, 4) == struct.pack("<I", 0x1BADB002)
    assert memory.read(0x100080, 0x1000 - 0x80) == bytes(0xF80)  # gap between segments
    assert memory.read(0x101000, 4) == b"DATA"
    assert memory.read(0x101004, 0x20) == bytes(0x20)              # BSS
    assert boot.kernel_range == (0x100000, 0x101024)


def test_aout_kludge(memory):
    image = synthetic.aout_kernel(load_addr=0x200000, header_offset=0x10, bss_size=0x100)
    boot = mb.load_multiboot(image, memory, kernel_path="flat")
    assert boot.entry == 0x200030
    assert memory.read(0x200000, len(image)) == image
    assert boot.kernel_range == (0x200000, 0x200000 + len(image) + 0x100)
    assert boot.cmdline_addr == 0x201000  # next page after kernel + BSS


def test_aout_kludge_wins_over_elf(memory):
    """Flag 16 set in an ELF file: QEMU uses the header's addresses, not the ELF's."""
    elf = bytearray(synthetic.multiboot_elf())
    head = synthetic.multiboot_header(synthetic.AOUT_KLUDGE, header_addr=0x300000 + 0x1000, load_addr=0x300000,
                                      load_end_addr=0x300000 + 0x1080, entry_addr=0x300000 + 0x1020)
    elf[0x1000:0x1000 + len(head)] = head
    boot = mb.load_multiboot(bytes(elf), memory, kernel_path="k")
    assert boot.kernel_range == (0x300000, 0x301080)
    assert memory.read(0x300000, 0x1080) == bytes(elf[:0x1080])


def test_split_initrd_option():
    assert mb.split_initrd_option("a") == ["a"]
    assert mb.split_initrd_option("/m1 x=1 y,/m2,,z") == ["/m1 x=1 y", "/m2,z"]
    assert mb.split_initrd_option("a,,,b") == ["a,", "b"]
    assert mb.module_file("/m1 x=1 y") == "/m1"


def _assert_untouched(memory):
    assert memory.read(0, memory.size) == bytes(memory.size)


@pytest.mark.parametrize("image, message", [
    (b"", "no header"),
    (bytes(9000), "no header"),
    (struct.pack("<III", 0x1BADB002, 0, 0) + bytes(64), "bad checksum"),
    (synthetic.multiboot_header() + bytes(64), "must be ELF"),
    (synthetic.multiboot_header(synthetic.AOUT_KLUDGE)[:20], "truncated Multiboot header"),
    (synthetic.elf32([(0x100000, synthetic.multiboot_header(), 12)], entry=0, machine=62), "64-bit"),
    (synthetic.elf32([(0x100000, synthetic.multiboot_header(), 12)], entry=0, machine=40), "EM_386"),
    (synthetic.elf32([(0x100000, synthetic.multiboot_header(), 12), (0x100008, b"", 8)], entry=0), "overlap"),
    (synthetic.multiboot_elf(load_addr=0x9000), "Multiboot information"),
    (synthetic.multiboot_elf(load_addr=0), "GDT"),
    (synthetic.multiboot_elf(load_addr=0x9F000), "not inside guest RAM"),
    (synthetic.multiboot_elf(load_addr=0xF0000), "not inside guest RAM"),
    (synthetic.multiboot_elf(load_addr=0xFFF000), "not inside guest RAM"),
    (synthetic.multiboot_elf(bss_size=0x7FFFFFFF), "not inside guest RAM"),
    (synthetic.aout_kernel(load_addr=0x100000)[:-4], "truncated kernel"),  # load_end_addr past the file
])
def test_rejects(image, message):
    with GuestMemory(16 * MIB) as memory:
        with pytest.raises(BadKernel, match=message) as info:
            mb.load_multiboot(image, memory, kernel_path="k")
        assert "\n" not in str(info.value)
        _assert_untouched(memory)


@pytest.mark.parametrize("fields, message", [
    (dict(header_addr=0x100000, load_addr=0x100010), "below load_addr"),
    (dict(header_addr=0x100040, load_addr=0x100000), "header is at file offset"),
    (dict(header_addr=0x100000, load_addr=0x100000, load_end_addr=0xFFFFF), "load_end_addr"),
    (dict(header_addr=0x100000, load_addr=0x100000, load_end_addr=0x100020, bss_end_addr=0x100010), "bss_end_addr"),
    (dict(header_addr=0xFFFFFFF0, load_addr=0xFFFFFFF0, load_end_addr=0), "past 4 GiB"),
    (dict(header_addr=0x100000, load_addr=0x100000, bss_end_addr=0xFFFFFFFF), "past 4 GiB"),
    (dict(header_addr=0x100000, load_addr=0x100000, bss_end_addr=0xFFFFF000), "not inside guest RAM"),
])
def test_rejects_bad_aout_headers(fields, message):
    image = synthetic.multiboot_header(synthetic.AOUT_KLUDGE, **fields) + bytes(0x40)
    with GuestMemory(16 * MIB) as memory:
        with pytest.raises(BadKernel, match=message):
            mb.load_multiboot(image, memory, kernel_path="k")
        _assert_untouched(memory)


def test_modules_that_do_not_fit(memory):
    with pytest.raises(BadKernel, match="kernel and modules"):
        mb.load_multiboot(synthetic.multiboot_elf(), memory, kernel_path="k",
                          modules=[(bytes(16 * MIB), "big")])
    _assert_untouched(memory)


def test_nul_in_command_line(memory):
    with pytest.raises(BadKernel, match="NUL"):
        mb.load_multiboot(synthetic.multiboot_elf(), memory, kernel_path="k", append="a\0b")


def test_ram_size_larger_than_memory(memory):
    with pytest.raises(ValueError):
        mb.load_multiboot(synthetic.multiboot_elf(), memory, kernel_path="k", ram_size=memory.size * 2)
