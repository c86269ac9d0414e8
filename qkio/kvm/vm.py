"""``Vm``: one KVM virtual machine fd -- memory slots, irqchip, PIT, IRQ lines, eventfds."""

from __future__ import annotations

import ctypes
import os

from . import ioctl as io
from . import structs as s
from .constants import (
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_PIT_SPEAKER_DUMMY,
)

# Where qkio (like kvmtool and QEMU) puts the pages Intel VMX needs for
# real-mode emulation: three pages for the TSS and one for the identity map,
# just below the 4 GiB BIOS area, where no guest RAM will ever be.
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000


class Vm:
    """A VM fd returned by ``KVM_CREATE_VM``.  Owns its fd; vCPUs own theirs."""

    def __init__(self, kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory, flags: int = 0) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: map ``memory`` (a GuestMemory) at ``guest_phys_addr``.

        The kernel pins nothing: it faults host pages in as the guest touches
        them, so the mmap must outlive the slot.  A size of 0 deletes the slot.
        """
        region = s.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
            memory_size=memory.size if memory is not None else 0,
            userspace_addr=memory.host_address if memory is not None else 0)
        io.ioctl(self.fd, io.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int = TSS_ADDR) -> None:
        """``KVM_SET_TSS_ADDR``: three pages of guest-physical space for VMX's real-mode TSS.

        Passed by value -- and above INT_MAX, the reason qkio calls ioctl through ctypes.
        """
        io.ioctl(self.fd, io.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int = IDENTITY_MAP_ADDR) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page for VMX's unrestricted-guest page table (by pointer)."""
        io.ioctl(self.fd, io.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC pair, IOAPIC and a LAPIC per vCPU created later.

        With it, HLT no longer exits to userspace: the kernel parks the vCPU
        until an interrupt arrives.
        """
        io.ioctl(self.fd, io.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        """``KVM_CREATE_PIT2``: an in-kernel i8254 on ports 0x40-0x43 (and 0x61 with the dummy speaker)."""
        io.ioctl(self.fd, io.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags))

    def set_irq_line(self, irq: int, level: int) -> None:
        """``KVM_IRQ_LINE``: drive GSI ``irq`` of the in-kernel irqchip to ``level``."""
        io.ioctl(self.fd, io.KVM_IRQ_LINE, s.kvm_irq_level(irq=irq, level=level))

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = True,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """``KVM_IOEVENTFD``: let a guest write to ``addr`` signal eventfd ``fd`` in the kernel.

        The write completes without leaving the kernel: no exit to userspace,
        no vCPU thread wake-up -- the doorbell idea of virtio, measured in the book.
        """
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        io.ioctl(self.fd, io.KVM_IOEVENTFD, arg)

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """``KVM_IRQFD``: a write to eventfd ``fd`` pulses GSI ``gsi`` (delivered in the kernel)."""
        arg = s.kvm_irqfd(fd=fd, gsi=gsi, flags=KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        io.ioctl(self.fd, io.KVM_IRQFD, arg)

    def create_vcpu(self, vcpu_id: int):
        """``KVM_CREATE_VCPU``: a vCPU with APIC ID ``vcpu_id``, and its mmap'ed ``kvm_run``."""
        from .vcpu import Vcpu
        fd = io.ioctl(self.fd, io.KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(self, fd, vcpu_id)

    def close(self) -> None:
        """Close the VM fd (idempotent); the kernel frees the VM once its vCPU fds are closed too."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
