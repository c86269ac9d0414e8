"""Giving a fresh vCPU the state it needs to run a guest.

The pure functions in :mod:`qkio.boot.modes` describe *what* a CPU should look
like when a guest starts (a :class:`~qkio.boot.modes.CpuState`); this module
writes that description into a real vCPU, plus the pieces every x86 vCPU
needs whatever the guest: CPUID, the FPU's reset state, and the local APIC's
LINT0/LINT1 wiring.  QEMU does the same work in ``kvm_arch_init_vcpu`` and
``x86_cpu_reset``.
"""

from __future__ import annotations

import ctypes
import struct

from .boot.modes import CpuState, Segment
from .kvm import structs as s

# CR0 bits.  KVM's reset CR0 is 0x60000010 (CD|NW|ET): OR-ing PE into it
# would leave the caches disabled, so every mode sets CR0 from scratch.

# Local APIC register offsets and LVT delivery modes (Intel SDM vol. 3, 11.5.1).
APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_DM_NMI, APIC_DM_EXTINT = 0x400, 0x700


def _segment(seg: Segment) -> s.kvm_segment:
    return s.kvm_segment(base=seg.base, limit=seg.limit, selector=seg.selector, type=seg.type,
                         present=seg.present, dpl=seg.dpl, db=seg.db, s=seg.s, l=seg.l, g=seg.g,
                         avl=seg.avl, unusable=0 if seg.present else 1)


def apply_cpu_state(vcpu, state: CpuState) -> None:
    """Load ``state`` into ``vcpu``: segments, descriptor tables, control registers, then registers."""
    sregs = vcpu.get_sregs()  # keeps KVM's TR, LDT and APIC base as reset left them
    for name, seg in state.segments.items():
        setattr(sregs, name, _segment(seg))
    sregs.gdt.base, sregs.gdt.limit = state.gdt
    sregs.idt.base, sregs.idt.limit = state.idt
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    regs = s.kvm_regs()
    for name, value in state.regs.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)


def setup_cpuid(vcpu, supported) -> None:
    """Give the guest the CPUID KVM supports, with this vCPU's APIC ID in leaf 1 (EBX[31:24]).

    ``supported`` is :meth:`Kvm.get_supported_cpuid`'s result; it is edited
    per vCPU and handed to ``KVM_SET_CPUID2``.  Leaf 0xB (x2APIC topology)
    carries the APIC ID in EDX.
    """
    for entry in supported.entries[:supported.nent]:
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x00FFFFFF) | (vcpu.id << 24)
        elif entry.function == 0xB:
            entry.edx = vcpu.id
    vcpu.set_cpuid2(supported)


def setup_fpu(vcpu) -> None:
    """The FPU state FNINIT and a reset leave: control word 0x37f, MXCSR 0x1f80."""
    fpu = s.kvm_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    vcpu.set_fpu(fpu)


def setup_lint(vcpu) -> None:
    """Wire LINT0 to ExtINT and LINT1 to NMI, as a BIOS leaves them ("virtual wire" mode).

    With KVM's in-kernel irqchip the 8259 PIC's output reaches the boot CPU
    through its LAPIC's LINT0, so without this the PIC's interrupts (the
    UART's IRQ 4 among them) would never be delivered.
    """
    lapic = vcpu.get_lapic()
    raw = bytearray(lapic.regs)
    for offset, mode in ((APIC_LVT0, APIC_DM_EXTINT), (APIC_LVT1, APIC_DM_NMI)):
        old = struct.unpack_from("<I", raw, offset)[0]
        # Clear mask (bit 16) and delivery mode (bits 8-10), then set the mode.
        struct.pack_into("<I", raw, offset, (old & ~0x10700) | mode)
    ctypes.memmove(lapic.regs, bytes(raw), len(raw))
    vcpu.set_lapic(lapic)
