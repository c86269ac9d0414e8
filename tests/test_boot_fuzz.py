"""Fuzzing the ELF reader and the Multiboot loader with damaged kernels.

Each example starts from a valid kernel and breaks it: truncation, random
bytes, or "interesting" 32-bit values (0, -1, 4 GiB - 16, 1 MiB, the info
area...) dropped onto header fields.  Half of the time the Multiboot
checksum is repaired afterwards, so that the damage gets past the header
search and reaches the address arithmetic behind it.

Whatever happens, two things must hold:

* the only exception is ``BadKernel`` (one line), and a failed load has
  written nothing;
* a successful load wrote only where the kernel claims to live (its ELF
  segments or a.out range, then the page or so of command lines after it),
  in the Multiboot information area and in the GDT -- checked both by
  recording every write and by comparing a memory snapshot.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kernels import synthetic
from qkio.boot import multiboot as mb
from qkio.boot.elf import parse_elf
from qkio.boot.modes import GDT_BASE
from qkio.errors import BadKernel
from qkio.kvm.memory import GuestMemory

RAM = 4 << 20
PATTERN = 0x5A
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SEEDS = [
    synthetic.multiboot_elf(),
    synthetic.multiboot_elf(extra_segment=False),
    synthetic.multiboot_elf(load_addr=0x200000, bss_size=0x3000),
    synthetic.aout_kernel(),
    synthetic.aout_kernel(load_addr=0x180000, header_offset=0x20, bss_size=0x1000),
]

INTERESTING = [0, 1, 4, 0x20, 0x34, 0x1000, 0x9000, 0x9500, 0x9FC00, 0x100000, 0x100010, 0x3FFFFF,
               0x400000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF]


class RecordingMemory(GuestMemory):
    """GuestMemory that remembers every range written."""

    def __init__(self, size):
        super().__init__(size)
        self.written: list[tuple[int, int]] = []

    def write(self, gpa, data):
        self.written.append((gpa, gpa + len(data)))
        super().write(gpa, data)

    def fill(self, gpa, length, byte=0):
        self.written.append((gpa, gpa + length))
        super().fill(gpa, length, byte)


@pytest.fixture(scope="module")
def memory():
    with RecordingMemory(RAM) as m:
        yield m


def _reset(memory):
    memory._map[:] = bytes([PATTERN]) * memory.size  # fast; bypasses the recorder on purpose
    memory.written.clear()


def _header_offsets(image: bytes) -> list[int]:
    return [i for i in range(0, min(len(image), 8192) - 3, 4)
            if struct.unpack_from("<I", image, i)[0] == synthetic.MB_MAGIC]


def _repair_checksum(image: bytearray) -> None:
    for i in _header_offsets(bytes(image)):
        if i + 12 <= len(image):
            flags = struct.unpack_from("<I", image, i + 4)[0]
            struct.pack_into("<I", image, i + 8, -(synthetic.MB_MAGIC + flags) & 0xFFFFFFFF)


mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 0x1100), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, 0x1100 // 4), st.sampled_from(INTERESTING) | st.integers(0, 2**32 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, 0x1200), st.just(0)),
)


@st.composite
def damaged_kernels(draw):
    image = bytearray(draw(st.sampled_from(SEEDS)))
    for kind, where, value in draw(st.lists(mutation, min_size=1, max_size=4)):
        if kind == "byte" and where < len(image):
            image[where] = value
        elif kind == "u32" and where * 4 + 4 <= len(image):
            struct.pack_into("<I", image, where * 4, value)
        elif kind == "truncate":
            del image[where:]
    if draw(st.booleans()):
        _repair_checksum(image)
    return bytes(image)


def _claimed_ranges(image: bytes, header: mb.MultibootHeader) -> list[tuple[int, int]]:
    """Where the kernel says it lives, worked out independently of the loader."""
    if header.has_addresses:
        end = header.bss_end_addr or header.load_end_addr or (header.load_addr + len(image))
        return [(header.load_addr, end)]
    return [(ph.paddr, ph.paddr + ph.memsz) for ph in parse_elf(image).load_segments]


def _inside(start, end, ranges):
    return any(lo <= start and end <= hi for lo, hi in ranges)


def _check_load(image: bytes, memory: RecordingMemory, **kwargs):
    _reset(memory)
    try:
        boot = mb.load_multiboot(image, memory, kernel_path="/k", **kwargs)
    except BadKernel as e:
        assert "\n" not in str(e)
        assert memory.written == [], "a failed load must not touch guest memory"
        event(f"BadKernel: {str(e).split(':')[0]}")  # see --hypothesis-show-statistics
        return None
    event("loaded")

    claimed = _claimed_ranges(image, mb.find_header(image))
    kernel_start = min(lo for lo, _ in claimed)
    kernel_end = max(hi for _, hi in claimed)
    assert boot.kernel_range == (kernel_start, kernel_end)
    # After the kernel: module list, command lines and loader name, at most
    # a page for these short strings, plus the modules themselves.  Like
    # QEMU, the loader rounds sizes up to pages, not addresses: a kernel at
    # an odd address keeps everything after it just as odd.
    used = mb._page_align(kernel_end - kernel_start) + 0x1000
    for data, _ in kwargs.get("modules", ()):
        used = mb._page_align(used + len(data))
    after_kernel = kernel_start + used
    allowed = [(GDT_BASE, GDT_BASE + 32), (mb.MMAP_ADDR, mb.INFO_ADDR + mb.INFO_SIZE),
               (kernel_start, after_kernel)]
    for start, end in memory.written:
        assert _inside(start, end, allowed), f"write [{start:#x}, {end:#x}) outside {allowed}"
        assert end <= RAM and not (0x9FC00 < end and start < 0x100000)
    assert sorted(memory.written) == sorted(boot.loaded_ranges)

    # The snapshot agrees: every byte outside the written ranges is untouched.
    snapshot = bytearray(memory.read(0, RAM))
    for start, end in memory.written:
        snapshot[start:end] = bytes([PATTERN]) * (end - start)
    assert snapshot == bytes([PATTERN]) * RAM
    return boot


@FUZZ
@given(image=damaged_kernels())
def test_damaged_kernels(memory, image):
    _check_load(image, memory)


@FUZZ
@given(image=damaged_kernels(), modules=st.lists(st.tuples(st.binary(max_size=5000), st.text(max_size=20)),
                                                 max_size=3),
       append=st.text(max_size=40))
def test_damaged_kernels_with_modules(memory, image, modules, append):
    try:
        _check_load(image, memory, modules=modules, append=append)
    except ValueError as e:  # only the loader's own NUL check may say no to a string
        assert isinstance(e, BadKernel), e


@FUZZ
@given(data=st.binary(max_size=0x1100))
def test_random_bytes_with_a_header(memory, data):
    """Random bytes around a valid header: a.out fields and ELF alike are garbage."""
    image = bytearray(data)
    offset = len(image) // 2 & ~3
    image[offset:offset] = synthetic.multiboot_header(synthetic.AOUT_KLUDGE if len(data) % 2 else 0)
    _check_load(bytes(image), memory)


@FUZZ
@given(image=damaged_kernels())
def test_elf_reader_only_raises_bad_kernel(image):
    try:
        parsed = parse_elf(image)
    except BadKernel as e:
        assert "\n" not in str(e)
        return
    for ph in parsed.load_segments:
        assert ph.offset + ph.filesz <= len(image) and ph.filesz <= ph.memsz
