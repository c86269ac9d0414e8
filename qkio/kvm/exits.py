"""What ``KVM_RUN`` came back with, decoded: one errno mapping, typed exits, port I/O.

After ``KVM_RUN`` returns, the reason is in ``kvm_run.exit_reason`` and the
details in the ``kvm_run.exit`` union, whose meaning depends on the reason
(``Documentation/virt/kvm/api.rst``, "The kvm_run structure").  Everything
that reads that union by offset lives in this module, so nothing above the
KVM layer does.

* :func:`reason_for_errno` -- the one mapping of a failed ``KVM_RUN``: EINTR is
  a kick (``ExitReason.INTR``), EAGAIN an application processor that was woken
  by INIT while it waited for SIPI (:data:`EXIT_AGAIN`), anything else a
  :class:`~qkio.errors.KvmError`.  :meth:`qkio.kvm.Vcpu.run` and the native
  exit loop's ``-errno`` result both go through it.
* :func:`decode_exit` -- the exit as a small typed value, the way rust-vmm's
  kvm-ioctls returns ``VcpuExit::IoOut(port, data)``: :class:`IoOut`,
  :class:`IoIn`, :class:`Mmio`, :class:`Shutdown`, :class:`InternalError`...
  (:meth:`qkio.kvm.Vcpu.exit`).
* :func:`handle_io` and :func:`handle_mmio` -- the fast twins of decoding
  :class:`IoOut`/:class:`IoIn` and :class:`Mmio` and answering them: they
  complete a ``KVM_EXIT_IO`` against a port bus, a ``KVM_EXIT_MMIO`` against
  an MMIO bus, straight from the page, because they run once per access the
  guest makes and a typed value per exit would cost more than the exit's own
  dispatch.
* :func:`describe_failure` -- one line for an exit that ends the run.
"""

from __future__ import annotations

import ctypes
import errno
import struct

from ..errors import KvmError
from ..record import Record
from .constants import KVM_INTERNAL_ERROR_EMULATION, ExitReason
from .structs import kvm_run, kvm_run_exit, kvm_run_io

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from ..devices.ioport import PortBus
    from ..devices.mmio import MmioBus

#: ``KVM_RUN`` failing with EAGAIN is not an error.  An application processor
#: starts in the "wait for SIPI" state (KVM_MP_STATE_UNINITIALIZED); its
#: ``KVM_RUN`` sleeps in the kernel until an INIT or SIPI arrives, and then
#: returns -EAGAIN instead of entering the guest, so that userspace can look
#: at the new state first.  QEMU's ``kvm_cpu_exec`` treats it like EINTR ("io
#: window exit") and simply calls ``KVM_RUN`` again; so does qkio.  Not a KVM
#: exit reason: a value no exit reason has.
EXIT_AGAIN = -1

_EXIT_INTR = int(ExitReason.INTR)


def reason_for_errno(err: int) -> int:
    """The exit reason of a ``KVM_RUN`` that returned -1 with ``errno == err``.

    EINTR (an unblocked signal, or ``immediate_exit`` set before entry) is a
    kick and comes back as ``ExitReason.INTR`` -- the kernel leaves
    ``exit_reason`` stale after immediate_exit, so it is not read; EAGAIN is
    :data:`EXIT_AGAIN`; anything else raises :class:`KvmError`.
    """
    if err == errno.EINTR:
        return _EXIT_INTR
    if err == errno.EAGAIN:
        return EXIT_AGAIN
    raise KvmError("KVM_RUN", err)


def exit_name(reason: int) -> str:
    """``"IO"``, ``"INTR"``, ``"EAGAIN"``..., or the number for a reason qkio has no name for."""
    if reason == EXIT_AGAIN:
        return "EAGAIN"
    known = ExitReason._value2member_map_.get(reason)
    return known.name if known is not None else str(reason)


# --- typed exits ------------------------------------------------------------------
#
# Records (qkio.record), not dataclasses: this module is on `qkio run`'s
# start-up path, and importing dataclasses costs milliseconds there.


class IoOut(Record):
    """``KVM_EXIT_IO``, direction out: the guest wrote ``data`` (``count * size`` bytes) to ``port``."""
    port: int
    size: int
    data: bytes


class IoIn(Record):
    """``KVM_EXIT_IO``, direction in: the guest reads ``count`` values of ``size`` bytes from
    ``port``; the VMM writes them at ``data_offset`` in the ``kvm_run`` page before the next
    ``KVM_RUN``."""
    port: int
    size: int
    count: int
    data_offset: int


class Mmio(Record):
    """``KVM_EXIT_MMIO``: an access of ``length`` bytes at guest-physical ``addr`` that no
    memory slot backs; for a write, ``data`` holds the bytes written."""
    addr: int
    length: int
    is_write: bool
    data: bytes


class Intr(Record):
    """``KVM_RUN`` returned EINTR: a kick (a signal, or ``immediate_exit``)."""


class Again(Record):
    """``KVM_RUN`` returned EAGAIN: an AP left wait-for-SIPI (:data:`EXIT_AGAIN`)."""


class Hlt(Record):
    """``KVM_EXIT_HLT``: the guest halted (only without an in-kernel irqchip)."""


class Shutdown(Record):
    """``KVM_EXIT_SHUTDOWN``: a triple fault; the vCPU cannot go on."""


class FailEntry(Record):
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused to enter the guest."""
    hardware_entry_failure_reason: int
    cpu: int


class InternalError(Record):
    """``KVM_EXIT_INTERNAL_ERROR``: KVM could not go on, e.g. an instruction it cannot emulate."""
    suberror: int
    data: tuple[int, ...]


class SystemEvent(Record):
    """``KVM_EXIT_SYSTEM_EVENT``: shutdown, reset or crash requested through the platform."""
    type: int


class Other(Record):
    """Any exit reason qkio does not decode further (``reason`` is KVM's number)."""
    reason: int


VcpuExit = IoOut | IoIn | Mmio | Intr | Again | Hlt | Shutdown | FailEntry | InternalError | SystemEvent | Other


def decode_exit(run: kvm_run, page, reason: int) -> VcpuExit:
    """The exit ``KVM_RUN`` just returned with ``reason``, as a typed value.

    ``run`` is the ctypes view of ``struct kvm_run``, ``page`` the whole
    mapping (port I/O data lives in it at ``data_offset``).  Read it before
    the next ``KVM_RUN``: the kernel reuses the page.
    """
    if reason == ExitReason.IO:
        io = run.exit.io
        if io.direction == kvm_run_io.KVM_EXIT_IO_OUT:
            start = io.data_offset
            return IoOut(io.port, io.size, bytes(page[start:start + io.size * io.count]))
        return IoIn(io.port, io.size, io.count, io.data_offset)
    if reason == ExitReason.MMIO:
        m = run.exit.mmio
        return Mmio(m.phys_addr, m.len, bool(m.is_write), bytes(m.data)[:m.len])
    if reason == _EXIT_INTR:
        return Intr()
    if reason == EXIT_AGAIN:
        return Again()
    if reason == ExitReason.HLT:
        return Hlt()
    if reason == ExitReason.SHUTDOWN:
        return Shutdown()
    if reason == ExitReason.FAIL_ENTRY:
        f = run.exit.fail_entry
        return FailEntry(f.hardware_entry_failure_reason, f.cpu)
    if reason == ExitReason.INTERNAL_ERROR:
        i = run.exit.internal
        return InternalError(i.suberror, tuple(i.data[:min(i.ndata, len(i.data))]))
    if reason == ExitReason.SYSTEM_EVENT:
        return SystemEvent(run.exit.system_event.type)
    return Other(reason)


# --- completing port I/O ---------------------------------------------------------------


# KVM_EXIT_IO's five fields (``struct kvm_run.io``: u8 direction, u8 size,
# u16 port, u32 count, u64 data_offset) and where they sit in the kvm_run page.
_IO_FIELDS = struct.Struct("=BBHIQ")
_IO_AT = kvm_run.exit.offset + kvm_run_exit.io.offset
assert _IO_FIELDS.size == ctypes.sizeof(kvm_run_io)
_OUT = kvm_run_io.KVM_EXIT_IO_OUT


def handle_io(bus: PortBus, data, _unpack=_IO_FIELDS.unpack_from) -> None:
    """KVM_EXIT_IO: carry ``count`` accesses of ``size`` bytes between ``data`` and ``bus``
    (anything with :class:`~qkio.devices.PortBus`'s ``read(port, size)`` and
    ``write(port, size, value)``).

    ``data`` is the mmap'ed kvm_run page; the bytes sit at ``data_offset`` in it.
    """
    # This runs once per port access the guest makes -- the exit `qkio bench
    # pio` times -- so it reads the five fields with one unpack_from on the
    # page rather than through the ctypes view (run.exit.io builds two ctypes
    # objects per exit, then one more call per field), and the usual case, a
    # single access (count == 1; only rep outs/rep ins give more), takes the
    # short branch.
    direction, size, port, count, offset = _unpack(data, _IO_AT)
    if count == 1:
        if direction == _OUT:
            bus.write(port, size, data[offset] if size == 1
                      else int.from_bytes(data[offset:offset + size], "little"))
        else:
            data[offset:offset + size] = bus.read(port, size).to_bytes(size, "little")
        return
    if direction == _OUT:
        for i in range(count):
            start = offset + i * size
            bus.write(port, size, int.from_bytes(data[start:start + size], "little"))
    else:
        for i in range(count):
            start = offset + i * size
            data[start:start + size] = bus.read(port, size).to_bytes(size, "little")


# KVM_EXIT_MMIO's fields (struct kvm_run.mmio: u64 phys_addr, u8 data[8],
# u32 len, u8 is_write) and where they sit in the kvm_run page.
_MMIO_FIELDS = struct.Struct("=Q8sIB")
_MMIO_AT = kvm_run.exit.offset + kvm_run_exit.mmio.offset
_MMIO_DATA = _MMIO_AT + 8
_MMIO_SIZES = (1, 2, 4, 8)


def handle_mmio(bus: MmioBus, page, _unpack=_MMIO_FIELDS.unpack_from) -> None:
    """KVM_EXIT_MMIO: carry one access between the ``kvm_run`` page and ``bus``
    (:class:`qkio.devices.mmio.MmioBus`): a write's bytes to the bus, a read's
    value into ``kvm_run.mmio.data``, which the next ``KVM_RUN`` completes.

    The fast twin of decoding :class:`Mmio`, as :func:`handle_io` is for port I/O.
    A length KVM would never report (not 1, 2, 4 or 8) is not trusted: it is an
    unassigned access (reads as 0, as an address nobody owns does) and nothing
    is dispatched.
    """
    addr, data, length, is_write = _unpack(page, _MMIO_AT)
    if length not in _MMIO_SIZES:
        bus.report_unassigned(addr, length, bool(is_write))
        if not is_write:
            page[_MMIO_DATA:_MMIO_DATA + 8] = bytes(8)
        return
    if is_write:
        bus.write(addr, length, int.from_bytes(data[:length], "little"))
    else:
        page[_MMIO_DATA:_MMIO_DATA + length] = bus.read(addr, length).to_bytes(length, "little")


def describe_failure(vcpu, exit: VcpuExit | int) -> str:
    """A one-line message for an exit that ends the run, naming it and the guest's RIP.

    ``exit`` is a decoded exit, or a reason that :meth:`Vcpu.exit` decodes here."""
    if isinstance(exit, int):
        exit = vcpu.exit(exit)
    assert isinstance(exit, Record)
    try:
        rip = vcpu.get_regs().rip
        where = f"at RIP={rip:#x}"
    except Exception:  # the vCPU may be in no state to answer
        where = "(RIP unavailable)"
    if isinstance(exit, Shutdown):
        return f"guest triple-faulted (KVM_EXIT_SHUTDOWN) on vCPU {vcpu.id} {where}"
    if isinstance(exit, InternalError):
        what = ("emulation failure" if exit.suberror == KVM_INTERNAL_ERROR_EMULATION
                else f"suberror {exit.suberror}")
        return f"KVM internal error: {what} (KVM_EXIT_INTERNAL_ERROR) on vCPU {vcpu.id} {where}"
    if isinstance(exit, FailEntry):
        return (f"VM entry failed, hardware reason {exit.hardware_entry_failure_reason:#x} "
                f"(KVM_EXIT_FAIL_ENTRY) on vCPU {vcpu.id} {where}")
    reason = {IoOut: ExitReason.IO, IoIn: ExitReason.IO, Mmio: ExitReason.MMIO, Hlt: ExitReason.HLT,
              SystemEvent: ExitReason.SYSTEM_EVENT, Intr: ExitReason.INTR}.get(type(exit))
    name = reason.name if reason is not None else exit_name(getattr(exit, "reason", EXIT_AGAIN))
    return f"unexpected exit KVM_EXIT_{name} on vCPU {vcpu.id} {where}"
