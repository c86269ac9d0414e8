"""virtio-mmio on a qkio machine: where the transports sit, and who answers the notify.

Placement follows QEMU 7.2's ``microvm`` machine (hw/i386/microvm.c,
``microvm_devices_init``): with ACPI off and so one IOAPIC, it creates
``virtio_num_transports = 8`` transports at ``VIRTIO_MMIO_BASE`` 0xfeb00000,
512 bytes apart, transport *i* on GSI ``virtio_irq_base + i`` = 5 + *i*.
Devices fill them from the top: QEMU's first ``-device virtio-blk-device``
lands on the last transport created, 0xfeb00e00, IRQ 12 (``bus_add_child``,
hw/core/qdev.c, inserts each new transport at the head of the system bus's
children, and the device goes on the first free virtio bus found there).  qkio does the same, so one guest finds its disk at the same address
on both VMMs -- but a guest should probe all eight, and the demo guest does.
Like QEMU's ``microvm_fix_kernel_cmdline`` (and Firecracker), qkio
appends ``virtio_mmio.device=512@0xfeb00e00:12`` to the kernel command line,
the form Linux's virtio_mmio driver parses.

Notify modes -- who takes the guest's QueueNotify write and runs the request:

``vcpu``
    No ioeventfd.  The write is a ``KVM_EXIT_MMIO`` handled by the vCPU
    thread, with the global lock, right in the exit (QEMU before ioeventfd,
    and qemu-kvm 0.12).  The interrupt goes in with ``KVM_IRQ_LINE``.
``main``
    ``KVM_IOEVENTFD`` on the notify register (4 bytes, datamatch queue 0):
    KVM completes the guest's write in the kernel and signals an eventfd,
    which the io thread's main loop watches; its handler runs under the
    global lock (QEMU's virtio-blk without ``iothread=``).  ``KVM_IRQ_LINE``.
``iothread``
    The same ioeventfd, watched by an :class:`~qkio.virtio.iothread.IOThread`
    instead, which runs the request without the global lock and completes
    through ``KVM_IRQFD``: a write to an eventfd the kernel turns into an
    edge on the GSI, no ioctl and no lock (QEMU's ``iothread=io0``).

In the ``iothread`` mode the queue belongs to the IOThread from DRIVER_OK on:
the vCPU thread, under the global lock, still owns the registers, and the one
register both touch, InterruptStatus, has its own small lock in the
transport.  A reset (Status = 0) first stops the IOThread's handling with
:meth:`IOThread.run_sync`, so the queue is never reset under a running request.
"""

from __future__ import annotations

import collections
import os
import threading
import time

from ..errors import QkioError
from .blk import TYPE_NAMES, VirtIOBlock
from .iothread import IOThread
from .mmio import QUEUE_NOTIFY, VIRTIO_MMIO_SIZE, VirtioMMIO

MICROVM_VIRTIO_MMIO_BASE = 0xFEB00000
MICROVM_VIRTIO_TRANSPORTS = 8
MICROVM_VIRTIO_IRQ_BASE = 5

#: ``--virtio-notify``: the three modes; QEMU-like spellings accepted for the same.
NOTIFY_MODES = ("vcpu", "main", "iothread")
NOTIFY_ALIASES = {"ioeventfd=off": "vcpu", "ioeventfd=on": "main", "iothread=io0": "iothread"}

#: ``--virtio-aio``: who does the I/O of a request.  ``sync``: the thread that took
#: the notify, with ``preadv``/``pwritev`` (what a QEMU IOThread does with
#: io_uring or Linux AIO, minus the asynchrony).  ``paio``: qemu-kvm 0.12's
#: posix-aio-compat pool (:mod:`qkio.posix_aio_compat`): workers do the I/O and
#: ``kill(getpid(), SIGUSR2)``; the signal reaches the io thread through its own
#: signal fd, and the request completes there, under the global lock.
AIO_MODES = ("sync", "paio")


def parse_aio_mode(text: str) -> str:
    if text not in AIO_MODES:
        raise QkioError(f"--virtio-aio must be one of {', '.join(AIO_MODES)}, not {text!r}")
    return text


def transport_slots() -> list[tuple[int, int]]:
    """``(base, irq)`` of every transport, in the order devices fill them (top first)."""
    return [(MICROVM_VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE, MICROVM_VIRTIO_IRQ_BASE + i)
            for i in reversed(range(MICROVM_VIRTIO_TRANSPORTS))]


def parse_notify_mode(text: str) -> str:
    mode = NOTIFY_ALIASES.get(text, text)
    if mode not in NOTIFY_MODES:
        raise QkioError(f"--virtio-notify must be one of {', '.join(NOTIFY_MODES)} "
                        f"(or {', '.join(NOTIFY_ALIASES)}), not {text!r}")
    return mode


class BlkRunner:
    """One virtio-blk device on one transport, and the counts that show who did what."""

    def __init__(self, board, transport: VirtioMMIO, device: VirtIOBlock):
        self.board, self.transport, self.device = board, transport, device
        self.queue = transport.queues[0]
        self.ioeventfd: int | None = None
        self.irqfd: int | None = None
        self.requests_by_type: collections.Counter = collections.Counter()
        self.requests_by_thread: collections.Counter = collections.Counter()
        self.notifies_by_thread: collections.Counter = collections.Counter()
        self.irqs_by_thread: collections.Counter = collections.Counter()
        self.requests_with_lock = 0
        self.eventfd_notifies = 0
        self.batches_ns: list[int] = []   # notify taken -> interrupt raised, per batch
        self.completions_by_thread: collections.Counter = collections.Counter()  # paio only
        self.generation = 0   # bumped at every device reset; stale completions are dropped

    # -- the notify, from whichever thread the mode gives it to ------------------------

    def handle_output(self, via: str) -> None:
        """Take every available request, run it, return it used, raise the interrupt once."""
        board, transport = self.board, self.transport
        me = threading.current_thread().name
        locked = board.lock.held_by_me()
        tracer = board.tracer
        t0 = time.monotonic_ns()
        self.notifies_by_thread[me] += 1
        if tracer.enabled:
            tracer.instant("virtio notify", via=via, bql_held=locked)

        def counted(request, r0):
            name = TYPE_NAMES.get(request.type, str(request.type))
            self.requests_by_type[name] += 1
            self.requests_by_thread[me] += 1
            self.requests_with_lock += locked
            if tracer.enabled:
                tracer.complete("virtio request", r0, type=name, sector=request.sector,
                                status=request.status, bql_held=locked)

        submit = self._submit if board.paio is not None else None
        done = self.device.handle_queue(transport, counted, submit)
        if done:
            self.irqs_by_thread[me] += 1
            self.batches_ns.append(time.monotonic_ns() - t0)
            if tracer.enabled:
                tracer.instant("virtio interrupt", gsi=transport.irq, via=board.irq_method,
                               bql_held=locked)

    # -- qemu-kvm 0.12's way: the posix-aio-compat pool ---------------------------

    def _submit(self, request) -> bool:
        """Hand an IN, OUT or FLUSH to the pool; False (do it here) for an empty transfer."""
        from ..posix_aio_compat import QEMU_AIO_FLUSH, QEMU_AIO_READ, QEMU_AIO_WRITE
        from .blk import SECTOR_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN
        if request.type == VIRTIO_BLK_T_FLUSH:
            views, kind = [], QEMU_AIO_FLUSH
        else:
            views = request.views()
            if not views:
                return False
            kind = QEMU_AIO_READ if request.type == VIRTIO_BLK_T_IN else QEMU_AIO_WRITE
        self.board.paio.paio_submit(self.device.fd, request.sector * SECTOR_SIZE, views, kind,
                                    self._aio_done, (request, views, time.monotonic_ns(), self.generation))
        return True

    def _aio_done(self, opaque, ret: int) -> None:
        """The pool's completion callback: io thread, global lock held (posix_aio_process_queue)."""
        from .blk import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_IN
        request, views, t0, generation = opaque
        for v in views:
            v.release()
        if ret < 0:
            request.status = VIRTIO_BLK_S_IOERR
        elif request.type == VIRTIO_BLK_T_IN:
            request.written = request.length()
        me = threading.current_thread().name
        locked = self.board.lock.held_by_me()
        if generation != self.generation or self.transport.broken or not self.queue.ready:
            # The device was reset while this was in flight: the chain belongs to a
            # queue that no longer exists (a new one may sit at the same address).
            return
        self.device.complete(request, self.queue)
        self.completions_by_thread[me] += 1
        self.transport.raise_used()
        self.irqs_by_thread[me] += 1
        self.batches_ns.append(time.monotonic_ns() - t0)
        tracer = self.board.tracer
        if tracer.enabled:
            tracer.instant("virtio complete", status=request.status, bql_held=locked)
            tracer.instant("virtio interrupt", gsi=self.transport.irq, via=self.board.irq_method,
                           bql_held=locked)

    def _eventfd_readable(self, fd: int) -> None:
        try:
            count = os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.eventfd_notifies += count
        self.handle_output("ioeventfd")

    # -- life cycle -------------------------------------------------------------

    def start_ioeventfd(self) -> None:
        """At DRIVER_OK (as QEMU's virtio_mmio starts ioeventfd then): route the notify."""
        board = self.board
        if board.notify == "vcpu" or self.ioeventfd is not None:
            return
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            board.vm.ioeventfd(fd, self.transport.base + QUEUE_NOTIFY, 4, pio=False, datamatch=0)
        except OSError as e:
            os.close(fd)
            board.refusals.append(f"KVM_IOEVENTFD on MMIO {self.transport.base + QUEUE_NOTIFY:#x}: "
                                  f"{e}; the notify stays an MMIO exit")
            return
        self.ioeventfd = fd
        if board.notify == "main":
            board.loop.set_fd_handler(fd, self._eventfd_readable, None, fd)
        else:
            board.iothread.set_fd_handler(fd, self._eventfd_readable)

    def reset(self) -> None:
        """The driver wrote 0 to Status: stop taking notifies, forget requests in flight."""
        self.generation += 1
        self.stop_ioeventfd()

    def stop_ioeventfd(self) -> None:
        fd, self.ioeventfd = self.ioeventfd, None
        if fd is None:
            return
        board = self.board
        if board.notify == "main":
            board.loop.set_fd_handler(fd, None, None, None)
        else:
            board.iothread.run_sync(lambda: board.iothread.set_fd_handler(fd, None))
        try:
            board.vm.ioeventfd(fd, self.transport.base + QUEUE_NOTIFY, 4, pio=False, datamatch=0,
                               deassign=True)
        except OSError:
            pass  # the VM is going away
        os.close(fd)

    def close(self) -> None:
        self.stop_ioeventfd()
        if self.irqfd is not None:
            try:
                self.board.vm.irqfd(self.irqfd, self.transport.irq, deassign=True)
            except OSError:
                pass
            os.close(self.irqfd)
            self.irqfd = None
        self.device.close()


class VirtioBoard:
    """The eight microvm transports on ``machine.mmio_bus``, with block devices on the top ones."""

    def __init__(self, machine, drives: list[tuple[str, bool, bytes]], notify: str = "vcpu",
                 aio: str = "sync"):
        self.notify = parse_notify_mode(notify)
        self.aio = parse_aio_mode(aio)
        if self.aio == "paio" and self.notify == "iothread":
            raise QkioError("--virtio-aio paio completes requests in the io thread under the global "
                            "lock (qemu-kvm 0.12 had no IOThread); use it with --virtio-notify vcpu "
                            "or main, or --virtio-aio sync with iothread")
        if len(drives) > MICROVM_VIRTIO_TRANSPORTS:
            raise QkioError(f"at most {MICROVM_VIRTIO_TRANSPORTS} drives (one per virtio-mmio transport)")
        self.machine = machine
        self.vm, self.loop, self.lock, self.tracer = machine.vm, machine.loop, machine.lock, machine.tracer
        self.refusals: list[str] = []   # what this host's KVM would not do, and what was used instead
        self.iothread: IOThread | None = None
        self.irq_method = "KVM_IRQ_LINE"
        self.runners: list[BlkRunner] = []
        self.transports: list[VirtioMMIO] = []
        self.paio = None
        try:
            if self.aio == "paio":
                from ..posix_aio_compat import paio_init
                # One pool and one SIGUSR2 signal fd per process, as 0.12's
                # posix_aio_state: a second signalfd for SIGUSR2 would race the
                # machine's for every completion.  (Closing it twice is harmless.)
                self.paio = (machine.paio if getattr(machine, "paio", None) is not None
                             else paio_init(machine.loop, tracer=self.tracer))
            if self.notify == "iothread":
                self.iothread = IOThread("io0", tracer=self.tracer)
                self.irq_method = "KVM_IRQFD"
            for k, (base, irq) in enumerate(transport_slots()):
                device = VirtIOBlock(*drives[k]) if k < len(drives) else None
                transport = VirtioMMIO(base, irq, device, memory=machine.memory)
                transport.log = machine.log
                if device is not None:
                    device.memory = machine.memory
                    self._plug(transport, device)
                self.transports.append(transport)
                machine.mmio_bus.register(base, VIRTIO_MMIO_SIZE, transport, f"virtio-mmio@{base:#x}")
        except BaseException:
            self.close()
            raise

    def _plug(self, transport: VirtioMMIO, device: VirtIOBlock) -> None:
        runner = BlkRunner(self, transport, device)
        self.runners.append(runner)
        vm = self.vm
        transport.on_notify = lambda index: runner.handle_output("mmio exit")
        transport.on_driver_ok = runner.start_ioeventfd
        transport.on_reset = runner.reset
        level = {"v": 0}

        def set_irq_line(value: int, gsi=transport.irq) -> None:
            if value != level["v"]:
                level["v"] = value
                vm.set_irq_line(gsi, value)
        transport.set_irq = set_irq_line
        if self.notify == "iothread":
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                vm.irqfd(fd, transport.irq)
            except OSError as e:
                os.close(fd)
                self.refusals.append(f"KVM_IRQFD on GSI {transport.irq}: {e}; "
                                     f"the IOThread raises the line with KVM_IRQ_LINE instead")
                self.irq_method = "KVM_IRQ_LINE"
                return
            runner.irqfd = fd

            def pulse(value: int) -> None:
                # An irqfd write is an edge: raise the line only on a rising request.
                if value:
                    os.eventfd_write(fd, 1)
            transport.set_irq = pulse

    def cmdline(self) -> str:
        """What qkio appends to the kernel command line, one entry per device."""
        return "".join(f" virtio_mmio.device={VIRTIO_MMIO_SIZE}@{r.transport.base:#x}:{r.transport.irq}"
                       for r in self.runners)

    def close(self) -> None:
        if self.paio is not None:  # first: its workers write into guest RAM and the images
            self.paio.close()
            self.paio = None
        for runner in self.runners:
            runner.close()
        self.runners = []
        if self.iothread is not None:
            self.iothread.close()
            self.iothread = None
