"""A thin, documented layer over /dev/kvm.

One class per fd the kernel hands out, one method per ioctl, each named after
the ioctl it wraps (the shape of rust-vmm's kvm-ioctls):

* :class:`Kvm`  -- ``/dev/kvm``: API version, capabilities, supported CPUID;
* :class:`Vm`   -- a VM fd: memory slots, irqchip, PIT, IRQ lines, ioeventfd, irqfd;
* :class:`Vcpu` -- a vCPU fd: registers, CPUID, MSRs, LAPIC, ``KVM_RUN``;
* :mod:`~qkio.kvm.exits` -- what ``KVM_RUN`` returned, decoded into typed exits;
* :class:`GuestMemory` -- the mmap that backs guest RAM.
"""

from . import exits
from .constants import Cap, ExitReason
from .memory import GuestMemory
from .system import Kvm, probe
from .vcpu import Vcpu
from .vm import Vm

__all__ = ["Cap", "ExitReason", "GuestMemory", "Kvm", "Vm", "Vcpu", "exits", "probe"]
