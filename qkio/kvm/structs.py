"""The structs of <linux/kvm.h> that qkio passes to the kernel, as ctypes.

Each class mirrors the kernel's struct field for field, in the same order and
with the same C types, so ctypes lays it out as the C compiler does.  Nothing
here is trusted by eye: the test suite's layout test (``test_kvm_layout.py``) compiles a C program
against the installed ``<linux/kvm.h>`` and compares every size and every
field offset with these classes.

Variable-length structs (``kvm_cpuid2``, ``kvm_msrs``, ``kvm_signal_mask``)
are declared with their fixed header only, as the kernel sizes them in ioctl
numbers; :func:`cpuid2_with` and friends build a header plus N entries.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

u8, u16, u32, u64, s32 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32

KVM_NR_INTERRUPTS = 256


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_
                           if not name.startswith("pad"))
        return f"{type(self).__name__}({fields})"


class kvm_regs(_Struct):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16),
                ("type", u8), ("present", u8), ("dpl", u8), ("db", u8), ("s", u8),
                ("l", u8), ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(_Struct):
    _fields_ = ([(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
                + [(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))])


class kvm_userspace_memory_region(_Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32),
                ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(_Struct):
    _fields_ = [("nent", u32), ("padding", u32)]  # followed by nent kvm_cpuid_entry2


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]  # followed by nmsrs kvm_msr_entry


class kvm_fpu(_Struct):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_lapic_state(_Struct):
    # The kernel says ``char regs[1024]``; bytes, not a C string (c_char
    # arrays would stop reading at the first NUL), so u8 here.
    KVM_APIC_REG_SIZE = 0x400
    _fields_ = [("regs", u8 * 0x400)]


class kvm_irq_level(_Struct):
    # The kernel has a union {irq; status} here; qkio only ever writes irq.
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_ioeventfd(_Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
                ("flags", u32), ("pad", u8 * 36)]


class kvm_irqfd(_Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_signal_mask(_Struct):
    _fields_ = [("len", u32)]  # followed by len bytes of sigset


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


# --- struct kvm_run: the page shared by the kernel and the vCPU thread ---------

class kvm_run_io(_Struct):
    """``kvm_run.io``, for KVM_EXIT_IO.  The data lives at ``kvm_run + data_offset``."""
    KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_ex(_Struct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [("hw", kvm_run_hw), ("fail_entry", kvm_run_fail_entry), ("ex", kvm_run_ex),
                ("io", kvm_run_io), ("mmio", kvm_run_mmio), ("internal", kvm_run_internal),
                ("system_event", kvm_run_system_event), ("padding", ctypes.c_char * 256)]


class kvm_run(_Struct):
    """The head of the mmap'ed ``struct kvm_run`` (the register-sync area after it is unused)."""
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", kvm_run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64)]


def cpuid2_with(nent: int):
    """A ``kvm_cpuid2`` header followed by room for ``nent`` entries."""
    class kvm_cpuid2_n(_Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]
    buf = kvm_cpuid2_n()
    buf.nent = nent
    return buf


def msrs_with(entries: list[tuple[int, int]]):
    """A ``kvm_msrs`` header followed by the given ``(index, data)`` entries."""
    class kvm_msrs_n(_Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * max(1, len(entries)))]
    buf = kvm_msrs_n()
    buf.nmsrs = len(entries)
    for slot, (index, data) in zip(buf.entries, entries):
        slot.index, slot.data = index, data
    return buf


def signal_mask_with(sigset: bytes):
    """A ``kvm_signal_mask`` whose ``len`` is the kernel's sigset size (8 on x86-64)."""
    class kvm_signal_mask_n(_Struct):
        _fields_ = [("len", u32), ("sigset", u8 * len(sigset))]
    buf = kvm_signal_mask_n()
    buf.len = len(sigset)
    ctypes.memmove(buf.sigset, sigset, len(sigset))
    return buf
