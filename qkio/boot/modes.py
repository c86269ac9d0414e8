"""The CPU state a guest starts in: real mode, 32-bit protected mode, long mode.

A VMM has no firmware to switch modes for it, so it hands KVM the finished
result: segment registers (KVM_SET_SREGS), control registers and EFER, and
general registers (KVM_SET_REGS).  Protected and long mode also need tables
in guest memory -- a GDT, and for long mode page tables -- because the CPU
reads them again later: on every segment load, and on every TLB miss.

Everything here is a pure function.  Each ``*_state`` function returns a
``CpuState`` and a list of ``(gpa, bytes)`` writes; ``apply_writes`` puts
the bytes in a ``GuestMemory``.  Nothing needs /dev/kvm, so it is all
checked by unit tests, and the vCPU layer only has to copy fields into
``kvm_sregs`` and ``kvm_regs``.

Why CR0 is always written in full
---------------------------------
A vCPU comes out of KVM_CREATE_VCPU with CR0 = 0x60000010: ET plus CD|NW,
caches disabled.  OR-ing PE (or PE|PG) into that value gives a guest that
runs with the caches off -- correct, and very slow.  So every state below
sets CR0 to exactly the bits it means.

Low memory layout
-----------------
The tables live in the first megabyte, clear of the places a Multiboot
kernel and its loader use (see ``qkio.boot.multiboot``)::

    0x00000 - 0x004ff   real-mode interrupt vectors and BIOS data area (untouched)
    0x00500 - 0x0051f   GDT: null, 32-bit code, data, 64-bit code  (GDT_BASE)
    0x07000 - 0x07fff   initial stack, growing down from BOOT_STACK_TOP
    0x09000 - 0x09fff   Multiboot memory map and information structure
    0x10000 - ...       long-mode page tables: PML4, PDPT, one PD per GiB
    0x9fc00 - 0xfffff   EBDA, VGA window and ROMs: never guest RAM
    0x100000            where Multiboot kernels are loaded

The GDT is shared by both 32- and 64-bit entry, so its selectors are fixed:
0x08 is the flat 32-bit code segment and 0x10 the flat data segment -- the
same selectors QEMU's Multiboot option ROM uses -- and 0x18 is 64-bit code.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from ..record import Record

# --- The layout ------------------------------------------------------------

GDT_BASE = 0x500
BOOT_STACK_TOP = 0x8000
PAGE_TABLE_BASE = 0x10000
LOW_MEMORY_END = 0x9FC00  # the EBDA starts here; nothing of ours may reach it

# Selectors in the GDT that ``flat_gdt`` builds.
SELECTOR_CODE32 = 0x08
SELECTOR_DATA = 0x10
SELECTOR_CODE64 = 0x18

# --- Architectural bits ----------------------------------------------------

CR0_PE = 1 << 0   # protection enable
CR0_ET = 1 << 4   # extension type: hard-wired to 1 on every CPU since the 486
CR0_PG = 1 << 31  # paging
CR4_PAE = 1 << 5  # physical address extension: long mode requires it
EFER_LME = 1 << 8   # long mode enable
EFER_LMA = 1 << 10  # long mode active: set by the CPU on a real switch,
                    # so a VMM that skips the switch must set it itself

RFLAGS_RESERVED = 1 << 1  # bit 1 of RFLAGS always reads as 1
RFLAGS_IF = 1 << 9

# Descriptor types (the 4-bit type field, with S=1: code or data).
TYPE_DATA_RW_ACCESSED = 0x3
TYPE_CODE_RX_ACCESSED = 0xB
# The accessed bit is set up front: VMX refuses to enter a guest whose CS
# type lacks it, and a CPU would set it on the first load anyway.

# Page table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # in a PD entry: this entry maps a 2 MiB page

PAGE_SIZE = 0x1000
LARGE_PAGE = 2 << 20
ENTRIES_PER_TABLE = 512

REGISTER_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags")


class Segment(Record):
    """One segment register as KVM's ``struct kvm_segment`` sees it.

    ``limit`` is the effective limit in bytes, as in ``kvm_segment``: with
    ``g=1`` the descriptor stores ``limit >> 12`` and the CPU fills in the
    low 12 bits with ones, so such a limit must end in 0xfff.  ``type`` is
    the 4-bit descriptor type and ``s`` says code/data (1) or system (0).
    """

    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 -- the architectural name of the 64-bit code bit
    g: int
    avl: int = 0

    def __post_init__(self):
        if not 0 <= self.selector <= 0xFFFF:
            raise ValueError(f"selector {self.selector:#x} is not 16 bits")
        if not 0 <= self.type <= 0xF:
            raise ValueError(f"segment type {self.type:#x} is not 4 bits")
        if not 0 <= self.dpl <= 3:
            raise ValueError(f"dpl {self.dpl} is not 0..3")
        for name in ("present", "db", "s", "l", "g", "avl"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"segment flag {name} must be 0 or 1")
        if self.l and self.db:
            raise ValueError("a segment cannot be both 64-bit (L) and 32-bit (D/B)")
        if self.g:
            if self.limit & 0xFFF != 0xFFF or not 0 <= self.limit <= 0xFFFF_FFFF:
                raise ValueError(f"page-granular limit {self.limit:#x} must be 0xfff.. 0xffffffff ending in fff")
        elif not 0 <= self.limit <= 0xF_FFFF:
            raise ValueError(f"byte-granular limit {self.limit:#x} does not fit in 20 bits")

    def to_gdt_entry(self) -> int:
        """The 8-byte descriptor for this segment, as a little-endian integer.

        The base is truncated to 32 bits: descriptors cannot hold more, and
        in long mode the base of code and data segments is ignored anyway.
        """
        base = self.base & 0xFFFF_FFFF
        raw_limit = self.limit >> 12 if self.g else self.limit
        access = (self.type | self.s << 4 | self.dpl << 5 | self.present << 7)
        flags = (self.avl | self.l << 1 | self.db << 2 | self.g << 3)
        return (
            (raw_limit & 0xFFFF)
            | (base & 0xFF_FFFF) << 16
            | access << 40
            | (raw_limit >> 16) << 48
            | flags << 52
            | (base >> 24) << 56
        )

    @classmethod
    def from_gdt_entry(cls, entry: int, selector: int = 0) -> "Segment":
        """Decode an 8-byte descriptor; the selector is not in it, so pass it."""
        if not 0 <= entry < 1 << 64:
            raise ValueError(f"descriptor {entry:#x} is not 64 bits")
        raw_limit = (entry & 0xFFFF) | ((entry >> 48) & 0xF) << 16
        base = ((entry >> 16) & 0xFF_FFFF) | ((entry >> 56) & 0xFF) << 24
        access = (entry >> 40) & 0xFF
        flags = (entry >> 52) & 0xF
        g = flags >> 3 & 1
        return cls(
            selector=selector,
            base=base,
            limit=(raw_limit << 12 | 0xFFF) if g else raw_limit,
            type=access & 0xF,
            s=access >> 4 & 1,
            dpl=access >> 5 & 3,
            present=access >> 7 & 1,
            avl=flags & 1,
            l=flags >> 1 & 1,
            db=flags >> 2 & 1,
            g=g,
        )


class CpuState(Record):
    """Everything a vCPU needs besides memory to start running a guest.

    ``gdt`` and ``idt`` are ``(base, limit)`` as loaded by LGDT/LIDT.
    ``regs`` holds general registers by their 64-bit names; a register not
    named is zero.  ``rflags`` is always present and always has bit 1 set.
    """

    mode: str
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    gdt: tuple[int, int]
    idt: tuple[int, int]
    cr0: int
    cr3: int
    cr4: int
    efer: int
    regs: Mapping[str, int] = MappingProxyType({})  # copied into a dict of its own

    def __post_init__(self):
        if self.mode not in ("real", "protected", "long"):
            raise ValueError(f"unknown CPU mode {self.mode!r}")
        regs = {"rflags": RFLAGS_RESERVED, **self.regs}
        unknown = set(regs) - set(REGISTER_NAMES)
        if unknown:
            raise ValueError(f"unknown register(s): {', '.join(sorted(unknown))}")
        for name, value in regs.items():
            if not 0 <= value < 1 << 64:
                raise ValueError(f"{name}={value:#x} is not a 64-bit value")
        if not regs["rflags"] & RFLAGS_RESERVED:
            raise ValueError("rflags bit 1 is reserved and must be set")
        # Our own copy, so a caller's dict cannot change a frozen state.
        object.__setattr__(self, "regs", regs)

    @property
    def segments(self) -> dict[str, Segment]:
        return {"cs": self.cs, "ds": self.ds, "es": self.es,
                "fs": self.fs, "gs": self.gs, "ss": self.ss}

    def with_regs(self, **regs: int) -> "CpuState":
        """A copy with some general registers replaced."""
        return self._replace(regs={**self.regs, **regs})


class Zeros:
    """``length`` zero bytes, not allocated: a write of it is ``memory.fill(gpa, length, 0)``."""

    __slots__ = ("length",)

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"Zeros({self.length:#x})"


#: One write a loader wants made: ``(guest-physical address, bytes or Zeros)``.
Write = tuple[int, bytes | memoryview | Zeros]


def apply_writes(memory, writes: Iterable[Write]) -> None:
    """Copy each ``(gpa, bytes)`` into guest memory (bounds-checked there); a
    :class:`Zeros` is a fill, which costs nothing on pages never written."""
    for gpa, data in writes:
        if isinstance(data, Zeros):
            memory.fill(gpa, len(data), 0)
        else:
            memory.write(gpa, data)


# --- Segments --------------------------------------------------------------

def _flat_code32() -> Segment:
    return Segment(selector=SELECTOR_CODE32, base=0, limit=0xFFFF_FFFF,
                   type=TYPE_CODE_RX_ACCESSED, present=1, dpl=0, db=1, s=1, l=0, g=1)


def _flat_data(selector: int = SELECTOR_DATA) -> Segment:
    return Segment(selector=selector, base=0, limit=0xFFFF_FFFF,
                   type=TYPE_DATA_RW_ACCESSED, present=1, dpl=0, db=1, s=1, l=0, g=1)


def _code64() -> Segment:
    # Base and limit are ignored in long mode; the flat values keep the
    # descriptor identical to what Linux and most loaders put in a GDT.
    return Segment(selector=SELECTOR_CODE64, base=0, limit=0xFFFF_FFFF,
                   type=TYPE_CODE_RX_ACCESSED, present=1, dpl=0, db=0, s=1, l=1, g=1)


def flat_gdt() -> bytes:
    """The GDT both 32- and 64-bit entry load: null, code32, data, code64."""
    entries = [0, _flat_code32().to_gdt_entry(), _flat_data().to_gdt_entry(),
               _code64().to_gdt_entry()]
    return struct.pack(f"<{len(entries)}Q", *entries)


def _real_mode_segment(selector: int, code: bool) -> Segment:
    # In real mode a segment's base is selector * 16 and its limit 64 KiB.
    # KVM checks these cached fields, not a descriptor, so they must agree
    # with the selector.
    return Segment(selector=selector, base=selector << 4, limit=0xFFFF,
                   type=TYPE_CODE_RX_ACCESSED if code else TYPE_DATA_RW_ACCESSED,
                   present=1, dpl=0, db=0, s=1, l=0, g=0)


# --- The three modes -------------------------------------------------------

def real_mode_state(cs: int, ip: int, *, ss: int = 0, sp: int = BOOT_STACK_TOP) -> tuple[CpuState, list[Write]]:
    """Start at ``cs:ip`` in 16-bit real mode, all data segments = ``cs``.

    No tables are written: the interrupt vector table at 0 is the IDT
    (limit 0x3ff), and real mode has no GDT.
    """
    if not 0 <= ip <= 0xFFFF or not 0 <= sp <= 0xFFFF:
        raise ValueError(f"ip {ip:#x} and sp {sp:#x} must be 16-bit offsets")
    data = _real_mode_segment(cs, code=False)
    state = CpuState(
        mode="real",
        cs=_real_mode_segment(cs, code=True), ds=data, es=data, fs=data, gs=data,
        ss=_real_mode_segment(ss, code=False),
        gdt=(0, 0xFFFF), idt=(0, 0x3FF),
        cr0=CR0_ET, cr3=0, cr4=0, efer=0,
        regs={"rip": ip, "rsp": sp, "rflags": RFLAGS_RESERVED},
    )
    return state, []


def protected_mode_state(entry: int, *, stack: int = BOOT_STACK_TOP,
                         gdt_base: int = GDT_BASE) -> tuple[CpuState, list[Write]]:
    """Start at ``entry`` in flat 32-bit protected mode with paging off.

    CS is selector 0x08 and every data segment 0x10, each with base 0 and
    a 4 GiB limit -- the machine state the Multiboot spec promises.  The
    IDT is empty (limit 0): until the guest loads its own, any interrupt or
    exception is a triple fault, which is easier to diagnose than a jump
    through whatever garbage a real-mode IVT would look like as gates.
    Interrupts are off (IF=0).
    """
    if not 0 <= entry <= 0xFFFF_FFFF or not 0 <= stack <= 0xFFFF_FFFF:
        raise ValueError(f"entry {entry:#x} and stack {stack:#x} must be 32-bit addresses")
    gdt = flat_gdt()
    data = _flat_data()
    state = CpuState(
        mode="protected",
        cs=_flat_code32(), ds=data, es=data, fs=data, gs=data, ss=data,
        gdt=(gdt_base, len(gdt) - 1), idt=(0, 0),
        cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0,
        regs={"rip": entry, "rsp": stack, "rflags": RFLAGS_RESERVED},
    )
    return state, [(gdt_base, gdt)]


def identity_page_tables(base: int, gib: int) -> list[Write]:
    """Page tables mapping virtual = physical for the first ``gib`` GiB.

    Four-level paging with 2 MiB pages stops at the page directory, so the
    tables are one PML4 at ``base``, one PDPT at ``base + 4 KiB`` and one
    page directory per GiB after that, all writable, all supervisor.
    """
    if not 1 <= gib <= ENTRIES_PER_TABLE:
        raise ValueError(f"can identity-map 1..512 GiB with one PDPT, not {gib}")
    if base % PAGE_SIZE:
        raise ValueError(f"page tables must be page aligned, not at {base:#x}")
    pml4, pdpt, first_pd = base, base + PAGE_SIZE, base + 2 * PAGE_SIZE
    table_flags = PTE_PRESENT | PTE_WRITABLE
    writes: list[Write] = [
        (pml4, struct.pack("<Q", pdpt | table_flags).ljust(PAGE_SIZE, b"\0")),
        (pdpt, struct.pack(f"<{gib}Q", *(first_pd + i * PAGE_SIZE | table_flags for i in range(gib)))
         .ljust(PAGE_SIZE, b"\0")),
    ]
    for i in range(gib):
        first_page = i * ENTRIES_PER_TABLE
        entries = ((first_page + j) * LARGE_PAGE | PTE_PRESENT | PTE_WRITABLE | PTE_PAGE_SIZE
                   for j in range(ENTRIES_PER_TABLE))
        writes.append((first_pd + i * PAGE_SIZE, struct.pack(f"<{ENTRIES_PER_TABLE}Q", *entries)))
    return writes


def page_tables_size(gib: int) -> int:
    """Bytes ``identity_page_tables(base, gib)`` occupies from ``base``."""
    return (2 + gib) * PAGE_SIZE


def long_mode_state(entry: int, *, stack: int = BOOT_STACK_TOP, page_table_base: int = PAGE_TABLE_BASE,
                    gdt_base: int = GDT_BASE, identity_map_gib: int = 4) -> tuple[CpuState, list[Write]]:
    """Start at ``entry`` in 64-bit long mode, identity-mapped.

    The switch a guest would make -- PAE on, CR3 loaded, EFER.LME set, then
    CR0.PG -- is written as its result: CR0 = PE|ET|PG, CR4 = PAE and
    EFER = LME|LMA (0x500).  LMA must be set by hand because no CPU ever
    executed the MOV to CR0 that would have set it.  CS is selector 0x18
    with L=1; data segments are 0x10.  The first ``identity_map_gib`` GiB are
    mapped one to one with 2 MiB pages.
    """
    if not 0 <= entry < 1 << 64 or not 0 <= stack < 1 << 64:
        raise ValueError(f"entry {entry:#x} and stack {stack:#x} must be 64-bit addresses")
    end = page_table_base + page_tables_size(identity_map_gib)
    if page_table_base < LOW_MEMORY_END < end or (page_table_base <= gdt_base < end):
        raise ValueError(f"page tables [{page_table_base:#x}, {end:#x}) collide with the GDT or the EBDA")
    gdt = flat_gdt()
    data = _flat_data()
    state = CpuState(
        mode="long",
        cs=_code64(), ds=data, es=data, fs=data, gs=data, ss=data,
        gdt=(gdt_base, len(gdt) - 1), idt=(0, 0),
        cr0=CR0_PE | CR0_ET | CR0_PG, cr3=page_table_base, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
        regs={"rip": entry, "rsp": stack, "rflags": RFLAGS_RESERVED},
    )
    return state, [(gdt_base, gdt), *identity_page_tables(page_table_base, identity_map_gib)]
