"""``Vcpu``: one vCPU fd and its shared ``kvm_run`` page.

This is the *fd-level* vCPU: registers, CPUID, MSRs, LAPIC and qkio's one
``KVM_RUN`` (:meth:`Vcpu.run`; the native exit loop in ``qkio/native/cpu_exec.c``
is its C twin, and maps its errors the same way).  What an exit means is
decoded in :mod:`qkio.kvm.exits`.  The thread that loops on it, the global
lock and kicks live in :mod:`qkio.cpus`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from ..errors import KvmError
from . import ioctl as io
from . import structs as s
from .exits import VcpuExit, decode_exit, reason_for_errno


class Vcpu:
    """A vCPU fd from ``KVM_CREATE_VCPU`` and its mmap'ed ``struct kvm_run``.

    ``run_page`` is the whole shared mapping (``KVM_GET_VCPU_MMAP_SIZE``
    bytes: ``kvm_run``, then the PIO data page, then the coalesced-MMIO
    ring); ``kvm_run`` is a ctypes view of its head.  Port I/O data lives in
    ``run_page`` at ``kvm_run.exit.io.data_offset``.
    """

    def __init__(self, vm, fd: int, vcpu_id: int):
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        size = vm.kvm.get_vcpu_mmap_size()
        # kvm_run is shared with the kernel: MAP_SHARED, and read after every KVM_RUN.
        self.run_page = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run = s.kvm_run.from_buffer(self.run_page)
        # KVM_RUN takes no argument; keep the bound call to a minimum on the hot path.
        self._run_request = io.KVM_RUN

    # --- running ---------------------------------------------------------------

    def run(self) -> int:
        """``KVM_RUN``: enter the guest until it exits; return ``kvm_run.exit_reason``.

        An unblocked signal, or ``immediate_exit`` set before entry, makes the
        kernel return EINTR; that is a kick, not an error, and comes back as
        ``ExitReason.INTR``.  EAGAIN (an AP woken by INIT) comes back as
        :data:`qkio.kvm.exits.EXIT_AGAIN`; any other error raises
        :class:`KvmError` (:func:`qkio.kvm.exits.reason_for_errno`).  The
        guest runs with the GIL released (a ctypes call).  :meth:`exit`
        decodes what the reason means: ``vcpu.exit(vcpu.run())`` is, for a
        guest that writes "H" to COM1, ``IoOut(port=1016, size=1, data=b'H')``.
        """
        if io.libc_ioctl(self.fd, self._run_request, 0) < 0:
            return reason_for_errno(ctypes.get_errno())
        return self.kvm_run.exit_reason

    def exit(self, reason: int) -> VcpuExit:
        """The exit :meth:`run` returned ``reason`` for, decoded from ``kvm_run`` into a
        typed value (:mod:`qkio.kvm.exits`: ``IoOut(port, size, data)``, ``Mmio(...)``,
        ``Shutdown()``...).  Call it before the next :meth:`run`."""
        return decode_exit(self.kvm_run, self.run_page, reason)

    def run_exit(self) -> VcpuExit:
        """:meth:`run`, then :meth:`exit`: kvm-ioctls' ``VcpuFd::run()``, for callers off the hot path."""
        return self.exit(self.run())

    @property
    def immediate_exit(self) -> int:
        """``kvm_run.immediate_exit``: if set when ``KVM_RUN`` starts, it returns EINTR at once."""
        return self.kvm_run.immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value: int) -> None:
        self.kvm_run.immediate_exit = value

    def io_data(self) -> memoryview:
        """The bytes of the current KVM_EXIT_IO: ``size * count`` at ``kvm_run + data_offset``."""
        exit_io = self.kvm_run.exit.io
        start = exit_io.data_offset
        return memoryview(self.run_page)[start:start + exit_io.size * exit_io.count]

    # --- state -----------------------------------------------------------------

    def get_regs(self) -> s.kvm_regs:
        """``KVM_GET_REGS``: the general-purpose registers, RIP and RFLAGS."""
        regs = s.kvm_regs()
        io.ioctl(self.fd, io.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        """``KVM_SET_REGS``."""
        io.ioctl(self.fd, io.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        """``KVM_GET_SREGS``: segments, descriptor tables, control registers, EFER, APIC base."""
        sregs = s.kvm_sregs()
        io.ioctl(self.fd, io.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        """``KVM_SET_SREGS``."""
        io.ioctl(self.fd, io.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.kvm_fpu:
        """``KVM_GET_FPU``: x87 and SSE state."""
        fpu = s.kvm_fpu()
        io.ioctl(self.fd, io.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        """``KVM_SET_FPU``."""
        io.ioctl(self.fd, io.KVM_SET_FPU, fpu)

    def set_cpuid2(self, cpuid) -> None:
        """``KVM_SET_CPUID2``: what CPUID reports inside the guest (usually the supported set)."""
        io.ioctl(self.fd, io.KVM_SET_CPUID2, cpuid)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``: read MSRs; the kernel returns how many it read, in order."""
        buf = s.msrs_with([(index, 0) for index in indices])
        count = io.ioctl(self.fd, io.KVM_GET_MSRS, buf)
        return {e.index: e.data for e in buf.entries[:count]}

    def set_msrs(self, values: dict[int, int]) -> int:
        """``KVM_SET_MSRS``: write MSRs.  The kernel stops at the first one it refuses and
        returns the count written -- a short count is an error, not a partial success."""
        buf = s.msrs_with(list(values.items()))
        count = io.ioctl(self.fd, io.KVM_SET_MSRS, buf)
        if count != len(values):
            bad = list(values)[count]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was refused")
        return count

    def get_lapic(self) -> s.kvm_lapic_state:
        """``KVM_GET_LAPIC``: the in-kernel local APIC's 1 KiB register page."""
        lapic = s.kvm_lapic_state()
        io.ioctl(self.fd, io.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        """``KVM_SET_LAPIC``."""
        io.ioctl(self.fd, io.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``: runnable, halted, waiting for INIT/SIPI..."""
        state = s.kvm_mp_state()
        io.ioctl(self.fd, io.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        """``KVM_SET_MP_STATE``."""
        io.ioctl(self.fd, io.KVM_SET_MP_STATE, s.kvm_mp_state(mp_state=mp_state))

    def set_signal_mask(self, sigset: bytes | None) -> None:
        """``KVM_SET_SIGNAL_MASK``: the signal mask in force *while inside* ``KVM_RUN``.

        ``sigset`` is the kernel's 8-byte sigset (bit n-1 = signal n).  This is
        the pre-``immediate_exit`` way to kick: keep the kick signal blocked in
        the thread, unblocked only during ``KVM_RUN``, so a kick sent while the
        thread is outside the guest stays pending and ends the next entry at once.
        ``None`` removes the mask.
        """
        if sigset is None:
            io.ioctl(self.fd, io.KVM_SET_SIGNAL_MASK, 0)
        else:
            io.ioctl(self.fd, io.KVM_SET_SIGNAL_MASK, s.signal_mask_with(sigset))

    def close(self) -> None:
        """Close the vCPU fd and unmap ``kvm_run``.

        Any ctypes view of ``kvm_run`` -- ``kvm_run.exit.io`` kept in a local
        variable, say -- or an ``io_data()`` memoryview still alive holds the
        mmap's buffer, and ``mmap.close()`` would raise BufferError.  Then the
        mapping (and the fd that mmap dup'ed, which keeps the vCPU alive in the
        kernel) goes away with the last view instead; the vCPU fd is closed either way.
        """
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.kvm_run = None  # type: ignore[assignment]  # drop our own view of the mapping first
            try:
                self.run_page.close()
            except BufferError:
                pass
            self.run_page = None  # type: ignore[assignment]
