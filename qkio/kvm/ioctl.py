"""ioctl numbers, built the way <asm-generic/ioctl.h> builds them, and the call itself.

An ioctl request number packs four fields into 32 bits::

    bits 31..30  direction  (0 none, 1 write = user->kernel, 2 read = kernel->user)
    bits 29..16  size of the argument struct
    bits 15..8   "type", the driver's magic: 0xAE for KVM
    bits  7..0   "nr", the command number

so ``KVM_GET_REGS = _IOR(KVMIO, 0x81, struct kvm_regs)`` is only correct if our
``kvm_regs`` has the kernel's size.  The test suite's layout test (``test_kvm_layout.py``) compiles a C
program against the real ``<linux/kvm.h>`` and checks every number below.

Why ctypes and not ``fcntl.ioctl``
----------------------------------
* ``fcntl.ioctl(fd, req, int)`` passes an int argument as a *signed C int*:
  ``KVM_SET_TSS_ADDR(0xfffbd000)`` raises OverflowError.  We pass ``c_ulong``.
* From Python 3.14 ``fcntl.ioctl`` retries on EINTR (PEP 475 style).  A vCPU
  thread is kicked out of ``KVM_RUN`` *by* EINTR; a retry would swallow every
  kick.  ``libc.ioctl`` through ctypes returns -1/EINTR and we surface it.
* A ctypes call into a ``CDLL`` releases the GIL, so a vCPU thread blocked in
  ``KVM_RUN`` lets every other Python thread run.
"""

from __future__ import annotations

import ctypes

from ..errors import KvmError
from ..libc import libc as _libc
from . import structs as s

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


KVMIO = 0xAE

# /dev/kvm ("system") ioctls
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, s.kvm_cpuid2)
# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, s.kvm_irq_level)
KVM_IRQFD = _IOW(KVMIO, 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, s.kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, s.kvm_ioeventfd)
# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, s.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, s.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, s.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, s.kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, s.kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, s.kvm_msrs)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, s.kvm_signal_mask)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, s.kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, s.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, s.kvm_mp_state)

#: name -> number, for messages and for the layout test.
IOCTLS = {name: value for name, value in globals().items()
          if name.startswith("KVM_") and isinstance(value, int)}
_NAMES = {value: name for name, value in IOCTLS.items()}

#: ``int ioctl(int fd, unsigned long request, unsigned long arg)``.  Pointers are
#: passed as their address, so one prototype serves both argument styles.
libc_ioctl = _libc.ioctl
libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
libc_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg=0) -> int:
    """Issue ``ioctl(fd, request, arg)``; return its non-negative result.

    ``arg`` is an int (passed by value as ``unsigned long``) or a ctypes object
    (passed by address).  Failure raises :class:`KvmError` naming the ioctl
    and the errno.  (``KVM_RUN``, where EINTR is a kick and not an error, is
    :meth:`qkio.kvm.Vcpu.run`.)
    """
    address = arg if isinstance(arg, int) else ctypes.addressof(arg)
    ret = libc_ioctl(fd, request, address)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(_NAMES.get(request, hex(request)), err)
    return ret
