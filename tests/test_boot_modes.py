"""Initial CPU state for real, protected and long mode (qkio.boot.modes)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkio.boot import modes
from qkio.boot.modes import CpuState, Segment, apply_writes, long_mode_state, protected_mode_state, real_mode_state
from qkio.kvm.memory import GuestMemory

# Descriptors every OS developer has seen, and what they mean.
FLAT_CODE32 = 0x00CF9B000000FFFF
FLAT_DATA = 0x00CF93000000FFFF
CODE64 = 0x00AF9B000000FFFF


def test_well_known_descriptors_decode():
    code = Segment.from_gdt_entry(FLAT_CODE32, selector=0x08)
    assert (code.base, code.limit, code.type, code.s, code.dpl, code.present) == (0, 0xFFFFFFFF, 0xB, 1, 0, 1)
    assert (code.db, code.l, code.g, code.avl) == (1, 0, 1, 0)
    code64 = Segment.from_gdt_entry(CODE64)
    assert (code64.l, code64.db) == (1, 0)
    data = Segment.from_gdt_entry(FLAT_DATA)
    assert data.type == 0x3 and data.db == 1


@pytest.mark.parametrize("entry", [FLAT_CODE32, FLAT_DATA, CODE64, 0, 0x00409A0100000FFF, 0xFF8F92FFFFFF0000])
def test_descriptor_round_trip_examples(entry):
    assert Segment.from_gdt_entry(entry).to_gdt_entry() == entry


def _valid_descriptor(entry: int) -> bool:
    flags = entry >> 52 & 0xF
    return not (flags & 0b0010 and flags & 0b0100)  # L and D/B together is reserved


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1).filter(_valid_descriptor))
def test_descriptor_round_trip_any(entry):
    assert Segment.from_gdt_entry(entry).to_gdt_entry() == entry


def test_segment_encodes_fields_where_the_manual_puts_them():
    seg = Segment(selector=0, base=0x12345678, limit=0xABCDE, type=0x9, present=1, dpl=3,
                  db=0, s=0, l=0, g=0, avl=1)
    entry = seg.to_gdt_entry()
    assert entry & 0xFFFF == 0xBCDE                 # limit 15:0
    assert entry >> 16 & 0xFFFFFF == 0x345678      # base 23:0
    assert entry >> 40 & 0xFF == 0x9 | 3 << 5 | 1 << 7  # type, S=0, DPL, P
    assert entry >> 48 & 0xF == 0xA                 # limit 19:16
    assert entry >> 52 & 0xF == 0b0001              # AVL
    assert entry >> 56 == 0x12                      # base 31:24


@pytest.mark.parametrize("kwargs", [
    dict(limit=0xFFFFF000, g=1),       # page-granular limit must end in fff
    dict(limit=0x100000, g=0),         # byte-granular limit has 20 bits
    dict(type=0x10),
    dict(dpl=4),
    dict(l=1, db=1),
    dict(present=2),
])
def test_segment_rejects_impossible_values(kwargs):
    base = dict(selector=0, base=0, limit=0xFFFF, type=3, present=1, dpl=0, db=0, s=1, l=0, g=0)
    with pytest.raises(ValueError):
        Segment(**{**base, **kwargs})


def test_cpu_state_always_has_reserved_rflags_bit_and_copies_regs():
    regs = {"rip": 0x1000}
    state, _ = protected_mode_state(0x1000)
    state2 = CpuState(**{**state.__dict__, "regs": regs})
    regs["rip"] = 0
    assert state2.regs["rip"] == 0x1000 and state2.regs["rflags"] & 0x2
    with pytest.raises(ValueError, match="reserved"):
        state.with_regs(rflags=0)
    with pytest.raises(ValueError, match="unknown register"):
        state.with_regs(eax=1)


def test_real_mode():
    state, writes = real_mode_state(0x1000, 0x0200, ss=0x2000, sp=0xFFF0)
    assert writes == []
    assert state.mode == "real"
    assert state.cs.selector == 0x1000 and state.cs.base == 0x10000 and state.cs.limit == 0xFFFF
    assert state.ds.base == 0x10000 and state.ss.base == 0x20000
    assert state.cr0 == modes.CR0_ET  # explicitly: no CD|NW left over from reset
    assert (state.cr3, state.cr4, state.efer) == (0, 0, 0)
    assert state.idt == (0, 0x3FF)
    assert state.regs == {"rip": 0x200, "rsp": 0xFFF0, "rflags": 0x2}
    assert not any(seg.db or seg.g or seg.l for seg in state.segments.values())


def test_protected_mode():
    state, writes = protected_mode_state(0x100000, stack=0x7000)
    assert state.mode == "protected"
    assert state.cr0 == 0x11  # PE|ET, paging off, caches on
    assert (state.cr3, state.cr4, state.efer) == (0, 0, 0)
    assert state.cs.to_gdt_entry() == FLAT_CODE32 and state.cs.selector == 0x08
    for seg in (state.ds, state.es, state.fs, state.gs, state.ss):
        assert seg.to_gdt_entry() == FLAT_DATA and seg.selector == 0x10
    assert state.regs == {"rip": 0x100000, "rsp": 0x7000, "rflags": 0x2}
    assert state.gdt == (modes.GDT_BASE, 4 * 8 - 1)
    assert writes == [(modes.GDT_BASE, modes.flat_gdt())]


def test_gdt_slots_match_the_selectors_in_the_state():
    """What the CPU would reload from the GDT equals the cached segment."""
    for make in (protected_mode_state, long_mode_state):
        state, writes = make(0x100000)
        gdt = dict(writes)[modes.GDT_BASE]
        for seg in state.segments.values():
            entry = struct.unpack_from("<Q", gdt, seg.selector)[0]
            assert Segment.from_gdt_entry(entry, seg.selector) == seg
        assert struct.unpack_from("<Q", gdt, 0)[0] == 0  # the null descriptor


def test_long_mode_registers():
    state, _ = long_mode_state(0x200000, stack=0x8FF0)
    assert state.mode == "long"
    assert state.cr0 == 0x80000011  # PE|ET|PG, never OR-ed into the reset value
    assert state.cr4 == modes.CR4_PAE
    assert state.efer == 0x500      # LME|LMA
    assert state.cr3 == modes.PAGE_TABLE_BASE
    assert state.cs.l == 1 and state.cs.db == 0 and state.cs.selector == 0x18
    assert state.cs.to_gdt_entry() == CODE64
    assert state.regs == {"rip": 0x200000, "rsp": 0x8FF0, "rflags": 0x2}


def _translate(memory: GuestMemory, cr3: int, vaddr: int) -> int:
    """Walk the tables as the MMU would (4-level, 2 MiB leaves only)."""
    pml4e = struct.unpack("<Q", memory.read(cr3 + (vaddr >> 39 & 511) * 8, 8))[0]
    assert pml4e & 0b11 == 0b11, "PML4 entry not present+writable"
    pdpte = struct.unpack("<Q", memory.read((pml4e & ~0xFFF) + (vaddr >> 30 & 511) * 8, 8))[0]
    assert pdpte & 0b11 == 0b11 and not pdpte & 0x80, "PDPT entry not a present table pointer"
    pde = struct.unpack("<Q", memory.read((pdpte & ~0xFFF) + (vaddr >> 21 & 511) * 8, 8))[0]
    assert pde & 0x83 == 0x83, "PD entry not a present, writable 2 MiB page"
    return (pde & ~0x1FFFFF & (2**52 - 1)) | (vaddr & 0x1FFFFF)


def test_long_mode_page_tables_identity_map():
    state, writes = long_mode_state(0x100000, identity_map_gib=4)
    memory = GuestMemory(1 << 20)
    apply_writes(memory, writes)
    for vaddr in (0, 0x1234, 0x100000, 0x1FFFFF, 0x200000, 0x3FFFFFFF, 0x40000000, 0xFFFFFFFF, 0xFEC00000):
        assert _translate(memory, state.cr3, vaddr) == vaddr
    # The first PD entries are exactly (i << 21) | 0x83.
    pd = memory.read(modes.PAGE_TABLE_BASE + 2 * 0x1000, 16)
    assert struct.unpack("<2Q", pd) == (0x83, 0x200083)
    # Nothing maps the fifth GiB.
    pdpt = memory.read(modes.PAGE_TABLE_BASE + 0x1000, 8 * 5)
    assert struct.unpack("<5Q", pdpt)[4] == 0


def test_long_mode_tables_stay_in_their_place():
    _, writes = long_mode_state(0x100000)
    for gpa, data in writes:
        assert gpa + len(data) <= modes.LOW_MEMORY_END
        assert not (gpa < 0x9558 and 0x9000 < gpa + len(data)), "must not touch the Multiboot info area"
    with pytest.raises(ValueError):
        long_mode_state(0x100000, identity_map_gib=600)
    with pytest.raises(ValueError, match="collide"):
        long_mode_state(0x100000, page_table_base=0x9E000)


def test_apply_writes_is_bounds_checked():
    from qkio.errors import GuestMemoryError
    memory = GuestMemory(0x1000)
    with pytest.raises(GuestMemoryError):
        apply_writes(memory, [(0xFF0, b"x" * 32)])
