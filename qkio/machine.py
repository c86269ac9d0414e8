"""The machine: one VM, its memory, devices, vCPU threads and the io thread.

This is qemu-kvm 0.12's ``vl.c`` ``main()`` plus ``kvm_main_loop`` in one
object.  Data flows one way: the caller (the CLI, a notebook) builds a
``Machine``; the machine owns the KVM fds, the guest memory, the port bus and
its devices, the main loop and the vCPU threads, and releases every one of
them in :meth:`close`.

Threads, and who holds the global lock
--------------------------------------
* The thread that calls :meth:`run` becomes the **io thread** (in qemu-kvm
  the process's main thread): it sits in ``main_loop_wait`` and dispatches
  fd handlers -- the event notifier, the signal pipe, stdin for the UART.
* Each vCPU has a **vCPU thread** (:mod:`qkio.cpus`) that drops the global
  lock around ``KVM_RUN`` and takes it again to emulate the device an exit
  touched.
* With ``signals="thread"`` there are also two **signal threads**, as in
  0.12's compat mode: ``qkio-sigwait`` for the VMM's own signal fd (SIGIO,
  SIGALRM, SIGBUS and qkio's SIGTERM/SIGINT/SIGQUIT/SIGHUP) and
  ``qkio-aio-sigwt`` for the AIO pool's SIGUSR2 (:mod:`qkio.signals`,
  :mod:`qkio.posix_aio_compat`).
* A machine that takes signals has the **AIO pool** (``machine.paio``); its
  worker threads ``qkio-aioN`` exist while there is I/O to do.

A device model therefore always runs with the lock held, whichever thread
got there, so the models need no locking of their own.
"""

from __future__ import annotations

import _signal  # signal's C half: the same calls, plain ints, no enums built at import
import errno
import mmap
import os
import sys
import threading
from collections.abc import Callable

from . import trace as _trace
from .boot import modes
from .boot.multiboot import load_multiboot, module_file, split_initrd_option
from .bql import GlobalMutex
from .chardev import CharOutput
from .cpu_init import apply_cpu_state, setup_cpuid, setup_fpu, setup_lint
from .cpus import CpuThread, install_sig_ipi_handler
from .devices import FwCfg, IsaDebugExit, PortBus, Serial
from .devices.debug_exit import ISA_DEBUG_EXIT_IOBASE, ISA_DEBUG_EXIT_IOSIZE
from .devices.fw_cfg import FW_CFG_CTL_SIZE, FW_CFG_IO_BASE
from .devices.mmio import UNASSIGNED_VALUE, MmioBus
from .errors import BadKernel, GuestFailure, MachineStateError, QkioError
from .kvm import GuestMemory, Kvm
from .kvm.constants import ExitReason
from .kvm.exits import SystemEvent, describe_failure, handle_mmio
from .kvm.vm import IDENTITY_MAP_ADDR, TSS_ADDR, Vm
from .main_loop import MainLoop
from .posix_aio_compat import AIO_SIGNAL, PosixAioState, paio_init
from .record import Record
from .signals import REALTIME_SIGNALS, VMM_SIGNALS, SignalSource, signal_name

COM1_BASE, COM1_IRQ = 0x3F8, 4
BUS_MCEERR_AR, BUS_MCEERR_AO = 4, 5  # <asm-generic/siginfo.h>: si_code of a memory-error SIGBUS
_EXIT_MMIO = int(ExitReason.MMIO)

# Exit statuses of a run (``qkio run`` exits with these; see its --help).
# isa-debug-exit gives odd statuses, (V << 1) | 1, so qkio's own are even.
STATUS_POWEROFF = 0         # guest shutdown, or SIGTERM/SIGINT/SIGQUIT (as QEMU: "terminating on signal")
STATUS_GUEST_FAILED = 2     # triple fault, emulation failure, failed VM entry
STATUS_TIMEOUT = 124        # --timeout expired (the status timeout(1) uses)


class MappedFile(mmap.mmap):
    """A read-only mapping of a file that knows where its data is (``data_extents``,
    None for "everywhere"): the loader copies those ranges and nothing else."""

    data_extents: list[tuple[int, int]] | None = None


def _data_extents(fd: int, size: int, limit: int = 4096) -> list[tuple[int, int]] | None:
    """The ``[start, end)`` ranges of ``fd`` that hold data (SEEK_DATA/SEEK_HOLE), or
    None (read it all) when the file system cannot say or the file is too fragmented."""
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but a hole from pos to the end
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, min(end, size)))
            if len(extents) > limit:
                return None
            pos = end
    except OSError:
        return None
    return extents


def map_file(path: str, what: str):
    """The contents of the regular file ``path``, mapped, not read.

    Anything else is refused with one line: opening a FIFO for reading would
    block until a writer came (with every signal blocked, only SIGKILL could
    end the wait), so the open is non-blocking and the kind is checked on the
    opened file; /dev/zero would be read until memory ran out.  The file is
    mapped read-only and private: pages cost nothing until the loader copies
    them, and only the bytes it copies are ever read.
    """
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise BadKernel(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise BadKernel(f"cannot read {what} {path}: {kind}")
        if st.st_size == 0:
            return b""
        mapped = MappedFile(fd, st.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        mapped.data_extents = _data_extents(fd, st.st_size)
        return mapped
    except OSError as e:
        raise BadKernel(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)


class MachineConfig(Record):
    """Everything a :class:`Machine` is built from, in one value (as Firecracker's
    ``VmConfig``): ``Machine(MachineConfig(smp=2, signals="thread"))``.

    :param memory_mib: guest RAM, 2..3072 MiB.
    :param smp: vCPUs, 1..64.
    :param signals: ``None`` (the machine takes no signals; right for a library
        or a notebook), or ``"signalfd"``, ``"thread"``, ``"async"``
        (:class:`qkio.signals.SignalSource`).
    :param notify: the io thread's doorbell, ``"eventfd"`` or ``"pipe"``.
    :param backend: the io thread's wait, ``"select"``, ``"poll"`` or ``"epoll"``.
    :param kick: ``"immediate_exit"`` or ``"signal_mask"`` (:mod:`qkio.cpus`).
    :param exit_path: ``"native"`` (port I/O completed in C, :mod:`qkio.native`),
        ``"python"``, or None for native when it was built at install.
    :param console: called with each chunk the UART transmits (default: stdout,
        written by the io thread through :class:`qkio.chardev.CharOutput`).
    :param tracer: a :class:`qkio.trace.Tracer` (default: the process's).
    :param force_signalfd_failure: make signalfd fail as on a pre-2.6.22 kernel.
    :param log: called with one-line messages (default: stderr, ``qkio:`` first).
    :param drives: virtio-blk disks, each ``(path, readonly, serial)``
        (:class:`qkio.virtio.blk.VirtIOBlock`).
    :param virtio_notify: which thread takes a virtqueue notify: ``"vcpu"``,
        ``"main"`` or ``"iothread"`` (``--virtio-notify``, :mod:`qkio.virtio.board`).
    :param virtio_aio: which thread does a request's I/O: ``"sync"`` or
        ``"paio"`` (``--virtio-aio``, :mod:`qkio.virtio.board`).
    :param pit: also create KVM's in-kernel PIT (i8254), as qemu-kvm 0.12 did.
        Off by default: no qkio guest programs the timer, and the PIT is a
        kernel worker thread (``kvm-pit/<pid>``) whose stop, when the VM is
        destroyed, takes longer on this book's host than the rest of a whole
        run's teardown (see ``qkio bench startup``).  Without it the PIT's
        ports are owned by nobody: writes are dropped, reads return all ones.
    :param clock: ``"deadline"`` (the next timer deadline is the wait's
        timeout, as modern QEMU) or ``"alarm"`` (0.12's dynticks: a POSIX
        timer's SIGALRM through the signal path; needs ``signals``),
        :mod:`qkio.alarm_timer`.
    :raises ValueError: a field out of range, or ``clock="alarm"`` without ``signals``.
    """
    memory_mib: int = 32
    smp: int = 1
    signals: str | None = None
    notify: str = "eventfd"
    backend: str = "select"
    kick: str = "immediate_exit"
    exit_path: str | None = None
    console: Callable[[bytes], object] | None = None
    tracer: _trace.Tracer | None = None
    force_signalfd_failure: bool = False
    log: Callable[[str], object] | None = None
    drives: list[tuple[str, bool, bytes]] | None = None
    virtio_notify: str = "vcpu"
    virtio_aio: str = "sync"
    pit: bool = False
    clock: str = "deadline"

    def __post_init__(self) -> None:
        if not 1 <= self.smp <= 64:
            raise ValueError(f"--smp must be between 1 and 64, not {self.smp}")
        if not 2 <= self.memory_mib <= 3072:  # RAM must reach above 1 MiB, where a kernel loads
            raise ValueError(f"--memory must be between 2 and 3072 MiB, not {self.memory_mib}")
        if self.clock != "deadline":  # the default needs no alarm timer; anything else is its to check
            from .alarm_timer import check_clock
            check_clock(self.clock)
        if self.clock == "alarm" and self.signals is None:
            raise ValueError("--clock alarm needs a signal path (signals=signalfd, thread or "
                             "async): its SIGALRM reaches the io thread through it")


class Machine:
    """A KVM virtual machine run the qemu-kvm way.

    ``Machine(smp=2)`` is ``Machine(MachineConfig(smp=2))``, and
    ``Machine(config, smp=2)`` is ``config`` with ``smp`` changed;
    ``machine.config`` is what it was built from.

    :param config: what to build (default: ``MachineConfig()``).
    :param fields: :class:`MachineConfig` fields, given or changed as keywords.
    :raises ValueError: a field out of range (:class:`MachineConfig`).
    :raises ~qkio.errors.KvmUnavailable: ``/dev/kvm`` cannot be used.
    :raises ~qkio.errors.MachineStateError: ``signals="async"`` outside the main thread.

    Lifecycle
    ---------
    A machine runs once.  :attr:`state` is one of

    ``"created"``
        built; load a guest (``load_multiboot``, ``load_flat``),
        ``attach_stdin``; then ``run()`` (or ``start()``).
    ``"started"``
        ``start()`` has started the vCPU threads with no io thread
        (tests drive them directly): ``pause``/``resume``, ``run()``.
    ``"running"``
        inside ``run()``, whose caller is the io thread.  From other
        threads: ``pause``/``resume``, ``request_exit``, ``stop()``
        (ends the run, status 0, and waits for ``run()`` to return),
        ``close()`` (the same, then releases everything).
    ``"stopped"``
        the run is over (or ``stop()`` came first): read
        :attr:`exit_status`; ``stop()`` again does nothing.
    ``"closed"``
        every fd and thread released; ``close()`` again does nothing.

    Any other call raises :class:`~qkio.errors.MachineStateError`, as do
    ``pause``/``resume``/``close`` from a thread that holds the global lock
    (a device model or fd handler: the vCPUs need the lock to reach the point
    where they pause or stop) and ``run()`` from a second thread.  A machine
    can be built in any thread; ``signals="async"`` needs the main thread
    (Python runs signal handlers there and nowhere else).
    """
    # What _build makes.  They are None before it and after close() (hence the
    # "type: ignore"s where they are set to None): in between, which is when
    # any method but close() runs, they are always there.
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    loop: MainLoop
    signal_source: SignalSource | None
    paio: PosixAioState | None

    def __init__(self, config: MachineConfig | None = None, /, **fields):
        if config is None:
            config = MachineConfig(**fields)
        elif fields:
            config = config._replace(**fields)
        self.config = config
        self.tracer = config.tracer if config.tracer is not None else _trace.default
        self.log = config.log or (lambda msg: print(f"qkio: {msg}", file=sys.stderr, flush=True))
        self.exit_status: int | None = None
        self.exit_message = ""
        self.cpus: list[CpuThread] = []
        self.kvm = self.vm = self.memory = self.loop = None  # type: ignore[assignment]
        self.signal_source = self.paio = None
        self.virtio = None
        self.console_out: CharOutput | None = None
        self.console_unwritten = 0  # guest output given up on at the end of the run
        self._stdin_fd: int | None = None
        self._irq_levels: dict[int, int] = {}
        self.state = "created"
        self._life = threading.Lock()        # guards state changes
        self._run_thread: int | None = None  # ident of the thread inside run()
        self._run_done = threading.Event()
        try:
            self._build(config)
            if config.drives:
                from .virtio.board import VirtioBoard
                self.virtio = VirtioBoard(self, config.drives, notify=config.virtio_notify,
                                          aio=config.virtio_aio)
        except BaseException:
            self.close()
            raise

    def _build(self, config: MachineConfig) -> None:
        memory_mib, smp, signals, kick, exit_path = (config.memory_mib, config.smp, config.signals,
                                                     config.kick, config.exit_path)
        console, pit = config.console, config.pit
        if signals == "async" and threading.current_thread() is not threading.main_thread():
            raise MachineStateError("signals='async' needs the main thread: Python runs signal "
                                    "handlers there only (use signalfd or thread, or signals=None)")
        # False in a thread other than the main one, where no handler can be
        # installed: the vCPUs then keep SIG_IPI blocked outside KVM_RUN (qkio.cpus).
        self._ipi_handler = install_sig_ipi_handler()
        if signals is not None:
            # No-op in `qkio run`, which blocked them before any thread existed;
            # here for library callers, in whose main thread this is the best we can do.
            _signal.pthread_sigmask(_signal.SIG_BLOCK, set(VMM_SIGNALS + REALTIME_SIGNALS))
        self.kvm = Kvm()
        self.vm = vm = self.kvm.create_vm()
        # Order matters: TSS and identity map, irqchip and PIT before any vCPU.
        vm.set_tss_addr(TSS_ADDR)
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        if pit:
            vm.create_pit2()
        self.pit = pit
        self.ram_size = memory_mib << 20
        self.memory = GuestMemory(self.ram_size)
        vm.set_user_memory_region(0, 0, self.memory)

        self.lock = GlobalMutex(tracer=self.tracer)
        self.loop = MainLoop(backend=config.backend, notifier=config.notify, lock=self.lock,
                             tracer=self.tracer)

        if console is None:
            # Guest output goes to stdout through the io thread, never blocking
            # a vCPU (qkio.chardev says why).
            self.console_out = CharOutput(self.loop, 1, on_room=lambda: self.serial.transmit_ready())
            write_console: Callable[[bytes], object] = self.console_out.write
        else:
            write_console = console
        self.bus = PortBus()
        # KVM_EXIT_MMIO goes here, by address, as port I/O goes to self.bus.
        self.mmio_bus = MmioBus(on_unassigned=self._log_unassigned_mmio)
        self.serial = Serial(write_console, irq=self._serial_irq,
                             accept_input=lambda: self.loop.notify_event("serial accepts input"))
        self.bus.register(COM1_BASE, 8, self.serial, "serial")
        self.debug_exit = IsaDebugExit(self._debug_exit)
        self.bus.register(ISA_DEBUG_EXIT_IOBASE, ISA_DEBUG_EXIT_IOSIZE, self.debug_exit, "isa-debug-exit")
        self.fw_cfg = FwCfg(self.ram_size, smp)
        self.bus.register(FW_CFG_IO_BASE, FW_CFG_CTL_SIZE, self.fw_cfg, "fw_cfg")

        supported = self.kvm.get_supported_cpuid()
        for index in range(smp):
            vcpu = vm.create_vcpu(index)
            try:
                cpu = CpuThread(vcpu, lock=self.lock, bus=self.bus, on_exit=self.handle_exit,
                                on_failure=self.guest_failed, tracer=self.tracer,
                                kick=kick, exit_path=exit_path, ipi_blocked=not self._ipi_handler,
                                on_sigbus=self.kvm_on_sigbus, mmio_bus=self.mmio_bus)
            except BaseException:  # e.g. a bad kick style: close() only knows vCPUs in self.cpus
                vcpu.close()
                raise
            self.cpus.append(cpu)
            setup_cpuid(vcpu, supported)
            setup_fpu(vcpu)
        setup_lint(self.cpus[0].vcpu)

        if signals is not None:
            # Two signal fds, as in 0.12: kvm_main_loop's (here with qkio's own
            # signals too) and paio_init's, for SIGUSR2 alone.
            own = tuple(s for s in VMM_SIGNALS if s != AIO_SIGNAL) + REALTIME_SIGNALS
            self.signal_source = source = SignalSource(
                signals, own, tracer=self.tracer, force_signalfd_failure=config.force_signalfd_failure)
            source.attach(self.loop)
            for signo in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGQUIT):
                source.add_handler(signo, self._terminate_on_signal)
            source.add_handler(_signal.SIGHUP, self._report_state)
            source.add_handler(_signal.SIGBUS, self.sigbus_handler)
            for rt in REALTIME_SIGNALS:  # counted by the source, nothing more
                source.add_handler(rt, lambda info: None)
            if config.clock == "alarm":
                self.loop.init_timer_alarm(source)
            else:  # SIGALRM/SIGIO from outside: counted, nothing more
                for signo in (_signal.SIGALRM, _signal.SIGIO):
                    source.add_handler(signo, lambda info: None)
            self.paio = paio_init(self.loop, method=signals, tracer=self.tracer,
                                  force_signalfd_failure=config.force_signalfd_failure)

    # --- loading a guest ---------------------------------------------------------

    def load_multiboot(self, kernel: str | os.PathLike, append: str = "", initrd: str | None = None):
        """Load a Multiboot kernel file as ``qemu -kernel FILE -append ARGS -initrd MODS`` does."""
        self._require("created", what="load_multiboot()")
        path = os.fspath(kernel)
        image = map_file(path, "kernel")
        modules = []
        for item in split_initrd_option(initrd) if initrd else []:
            name = module_file(item)
            if not name:
                raise BadKernel(f"empty module name in --initrd {initrd!r} (modules are comma-separated files)")
            modules.append((map_file(name, "module"), item))
        if self.virtio is not None:
            append += self.virtio.cmdline()  # as QEMU's microvm_fix_kernel_cmdline
        boot = load_multiboot(image, self.memory, kernel_path=path, append=append,
                              modules=modules, ram_size=self.ram_size)
        apply_cpu_state(self.cpus[0].vcpu, boot.cpu_state)
        return boot

    def load_flat(self, code: bytes, *, mode: str = "real", address: int = 0x1000):
        """Load raw machine code at ``address`` and enter it in ``mode`` (real, protected, long)."""
        self._require("created", what="load_flat()")
        if mode == "real":
            state, writes = modes.real_mode_state(address >> 4, address & 0xF)
        elif mode == "protected":
            state, writes = modes.protected_mode_state(address)
        elif mode == "long":
            state, writes = modes.long_mode_state(address)
        else:
            raise ValueError(f"mode must be real, protected or long, not {mode!r}")
        modes.apply_writes(self.memory, writes)
        self.memory.write(address, code)
        apply_cpu_state(self.cpus[0].vcpu, state)
        return state

    # --- the console's input -------------------------------------------------

    def attach_stdin(self, fd: int = 0) -> None:
        """Feed bytes from ``fd`` to the UART, through the io thread.

        The read handler is guarded by the UART's ``can_receive`` as qemu's
        ``fd_read_poll``: while the receive FIFO is full, ``fd`` is left out
        of the select set, and what the guest has not taken stays in the
        pipe or tty -- flow control for free.
        """
        self._require("created", "started", what="attach_stdin()")
        self._stdin_fd = fd
        self.loop.set_fd_handler2(fd, lambda _: self.serial.can_receive(), self._stdin_readable, None, fd)

    def _stdin_readable(self, fd: int) -> None:
        room = self.serial.can_receive()
        if room <= 0:
            return
        try:
            data = os.read(fd, room)
        except BlockingIOError:
            return
        if not data:  # EOF: stop watching, the guest keeps running
            self.loop.set_fd_handler2(fd, None, None, None, None)
            self._stdin_fd = None
            return
        self.serial.receive(data)

    @property
    def console_report(self) -> str:
        """What became of guest output stdout did not take ("" when all of it was written)."""
        out = self.console_out
        if out is None:
            return ""
        if out.error is not None and out.kind != "closed":
            return (f"guest output stopped after {out.written} bytes: stdout: {out.error.strerror}"
                    f" ({out.discarded} bytes dropped)")
        if self.console_unwritten:
            return f"{self.console_unwritten} bytes of guest output not written: stdout is not being read"
        return ""

    # --- device glue -----------------------------------------------------------

    def _serial_irq(self, level: int) -> None:
        """The UART's interrupt output, into the in-kernel 8259 as an edge.

        The PIC input is edge-triggered: a rising edge raises IRQ 4, and the
        line must fall again before the next edge can count, so each rise is
        sent as a pulse (raise, then lower).
        """
        if level and not self._irq_levels.get(COM1_IRQ):
            self.vm.set_irq_line(COM1_IRQ, 1)
            self.vm.set_irq_line(COM1_IRQ, 0)
        self._irq_levels[COM1_IRQ] = level

    def _debug_exit(self, status: int) -> None:
        self.request_exit(status, f"guest wrote to isa-debug-exit: status {status}")

    def handle_exit(self, cpu: CpuThread, reason: int) -> None:
        """Called by a vCPU thread, lock held, for every exit its loop does not handle
        itself (it handles port I/O, kicks and EAGAIN)."""
        if reason == _EXIT_MMIO:  # the one that comes often: straight from the page
            self._handle_mmio(cpu)
            return
        exit = cpu.vcpu.exit(reason)
        if isinstance(exit, SystemEvent):
            self.request_exit(STATUS_POWEROFF, "guest requested a system event (shutdown/reset)")
            cpu.stop()
        else:  # Shutdown (triple fault), InternalError, FailEntry, anything unexpected
            raise GuestFailure(describe_failure(cpu.vcpu, exit))

    def _handle_mmio(self, cpu: CpuThread) -> None:
        handle_mmio(self.mmio_bus, cpu.vcpu.run_page)

    def _log_unassigned_mmio(self, addr: int, size: int, is_write: bool) -> None:
        what = "write" if is_write else "read"
        self.log(f"unassigned memory {addr:#x} ({what}, {size} bytes)"
                 + ("" if is_write else f" reads as {UNASSIGNED_VALUE}"))

    # --- signals -----------------------------------------------------------------

    def _terminate_on_signal(self, info) -> None:
        self.request_exit(STATUS_POWEROFF, f"terminating on signal {info.signo} from pid {info.pid}")

    def _report_state(self, info) -> None:
        """SIGHUP: each vCPU's registers and exits, and the signals taken so far."""
        for cpu in self.cpus:
            print(self.describe_cpu(cpu), file=sys.stderr, flush=True)
        source = self.signal_source
        assert source is not None  # SIGHUP comes through it
        received = dict(source.received)
        if self.paio is not None and self.paio.source is not None:
            received.update(self.paio.source.received)
        taken = " ".join(f"{signal_name(signo)}={n}" for signo, n in sorted(received.items()))
        print(f"signals taken through {source.path}: {taken}", file=sys.stderr, flush=True)

    def kvm_on_sigbus(self, cpu: CpuThread, si) -> None:
        """A SIGBUS that a vCPU thread took itself (``--kick signal_mask``, where
        SIGBUS may interrupt ``KVM_RUN`` as in 0.12): qemu-kvm's ``kvm_on_sigbus``
        without MCE emulation, which decides as :meth:`sigbus_handler` does: a
        SIGBUS that is not a memory error is re-raised in this thread with its
        default action (``sigbus_reraise``), which ends the process.  (It is
        not handed to the process instead: this thread's ``sigtimedwait``
        takes process-directed SIGBUSes too, so it would take it back.)"""
        code = si.si_code
        if code == BUS_MCEERR_AO:
            self.log(f"{cpu.name}: SIGBUS: action-optional memory error, ignored")
        elif code == BUS_MCEERR_AR:
            self.request_exit(STATUS_GUEST_FAILED, f"{cpu.name}: Hardware memory error!")
        else:
            # Python can restore a default action only from the main thread;
            # qkio installs no SIGBUS handler, so it is normally still SIG_DFL.
            if _signal.getsignal(_signal.SIGBUS) == _signal.SIG_DFL:
                self.log(f"{cpu.name}: SIGBUS (si_code {code}) is not a memory error: re-raised")
                _signal.raise_signal(_signal.SIGBUS)    # pending for this thread, blocked
                _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGBUS})
            self.request_exit(STATUS_GUEST_FAILED,
                              f"{cpu.name}: SIGBUS (si_code {code}) is not a memory error, "
                              f"and could not be re-raised (SIGBUS has a handler)")

    def sigbus_handler(self, info) -> None:
        """SIGBUS taken by the io thread: what qemu-kvm 0.12's ``sigbus_handler`` did
        without MCE emulation (qkio has none): an action-optional memory error
        (``BUS_MCEERR_AO``) is ignored, an action-required one (``BUS_MCEERR_AR``)
        ends the run (status 2; 0.12 exited), any other SIGBUS is re-raised with
        the default action (``sigbus_reraise``), which ends the process."""
        if info.code == BUS_MCEERR_AO:
            self.log(f"SIGBUS from pid {info.pid}: action-optional memory error, ignored")
        elif info.code == BUS_MCEERR_AR:
            self.request_exit(STATUS_GUEST_FAILED, "Hardware memory error!")
        else:
            self.log(f"SIGBUS (si_code {info.code}) is not a memory error: re-raised")
            _signal.signal(_signal.SIGBUS, _signal.SIG_DFL)
            _signal.raise_signal(_signal.SIGBUS)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGBUS})
            raise QkioError("failed to re-raise SIGBUS")

    def describe_cpu(self, cpu: CpuThread) -> str:
        if cpu.finished.is_set() or cpu.thread is None:
            regs = cpu.vcpu.get_regs()
        else:
            regs = cpu.run_on_cpu(cpu.vcpu.get_regs)
        exits = ", ".join(f"{ExitReason(r).name if r in ExitReason._value2member_map_ else r}={n}"
                          for r, n in sorted(cpu.exit_counts.items()))
        return (f"{cpu.name}: RIP={regs.rip:#x} RSP={regs.rsp:#x} RFLAGS={regs.rflags:#x} "
                f"exits: {exits or 'none'}")

    # --- running -----------------------------------------------------------------

    def _require(self, *states: str, what: str) -> None:
        if self.state not in states:
            allowed = " or ".join(repr(st) for st in states)
            raise MachineStateError(f"Machine.{what}: the machine is {self.state!r}; "
                                    f"allowed when {allowed}")

    def _require_unlocked(self, what: str) -> None:
        if self.lock.held_by_me():
            raise MachineStateError(f"Machine.{what} cannot be called with the global lock held "
                                    f"(from a device model or fd handler): the vCPUs need it")

    def request_exit(self, status: int, message: str = "") -> None:
        """End the run with ``status`` (first request wins); callable from any thread.
        Before ``run()`` it makes ``run()`` return at once with that status."""
        if self.state == "closed":
            raise MachineStateError("Machine.request_exit(): the machine is 'closed'")
        if self.exit_status is None:
            self.exit_status = status
            self.exit_message = message
            self.loop.notify_event("machine exit requested")

    def guest_failed(self, cpu: CpuThread, failure: GuestFailure) -> None:
        self.request_exit(STATUS_GUEST_FAILED, str(failure))

    def start(self) -> None:
        """Start the vCPU threads without an io thread ("created" -> "started")."""
        with self._life:
            self._require("created", "started", what="start()")
            self.state = "started"
        for cpu in self.cpus:
            if cpu.thread is None:
                cpu.start()

    def run(self, timeout: float | None = None) -> int:
        """Run until the guest exits, fails, a signal ends it, ``stop()`` is called, or
        ``timeout`` seconds pass (qemu-kvm 0.12's ``kvm_main_loop``, also reachable by
        that name).

        The calling thread is the io thread until the run ends.  Returns the
        exit status; :attr:`exit_message` says why.  A machine runs once.
        """
        with self._life:
            if self.state == "running":
                raise MachineStateError("Machine.run(): already running in another thread "
                                        "(a machine has one io thread)")
            if self.state == "stopped":
                raise MachineStateError(f"Machine.run(): this machine has already run (status "
                                        f"{self.exit_status}); a machine runs once, build another")
            self._require("created", "started", what="run()")
            self.state = "running"
            self._run_thread = threading.get_ident()
        try:
            for cpu in self.cpus:
                if cpu.thread is None:
                    cpu.start()
            finished = self.loop.run_until(lambda: self.exit_status is not None,
                                           timeout_ms=1000, deadline_s=timeout)
            if not finished:
                self.request_exit(STATUS_TIMEOUT, f"guest still running after --timeout {timeout:g} s; stopped it")
            self._stop_vcpus()
            if self.console_out is not None:
                self.console_unwritten += self.console_out.flush()
            assert self.exit_status is not None  # run_until's predicate, or request_exit above
            return self.exit_status
        finally:
            with self._life:
                self.state = "stopped"
                self._run_thread = None
            self._run_done.set()

    def pause(self) -> None:
        """Stop every vCPU and wait until each says it is paused: qemu-kvm 0.12's
        ``pause_all_threads`` (qemu-kvm.c), upstream vl.c's ``pause_all_vcpus``."""
        self._require("started", "running", what="pause()")
        self._require_unlocked("pause()")
        for cpu in self.cpus:
            cpu.pause()

    def resume(self) -> None:
        """Let every paused vCPU run again: qemu-kvm 0.12's ``resume_all_threads``,
        upstream vl.c's ``resume_all_vcpus``."""
        self._require("started", "running", what="resume()")
        self._require_unlocked("resume()")
        for cpu in self.cpus:
            cpu.resume()

    # qemu-kvm 0.12's and upstream QEMU's names for the calls above, so that
    # grepping the book's function names lands here.
    kvm_main_loop = run
    pause_all_threads = pause_all_vcpus = pause
    resume_all_threads = resume_all_vcpus = resume

    def stop(self, timeout: float = 10) -> None:
        """End the machine's run.

        While ``run()`` is in progress, from another thread: ask it to end
        (status 0, "stopped by Machine.stop()", unless an exit was already
        requested) and wait until it has returned.  From the io thread or a
        device model (the global lock held): only ask.  "started": stop the vCPU threads.  "created":
        the machine will never run.  "stopped": nothing to do.
        """
        with self._life:
            state = self.state
            if state == "closed":
                raise MachineStateError("Machine.stop(): the machine is 'closed'")
            if state in ("created", "started"):
                self.state = "stopped"
        if state == "started":
            self._stop_vcpus()
        elif state == "running":
            self.request_exit(STATUS_POWEROFF, "stopped by Machine.stop()")
            # Waiting is for outsiders: the io thread, or a vCPU thread in a
            # device model (lock held), would wait for itself.
            if self._run_thread != threading.get_ident() and not self.lock.held_by_me():
                if not self._run_done.wait(timeout):
                    raise MachineStateError(f"Machine.stop(): run() did not return within {timeout} s")

    def _stop_vcpus(self) -> None:
        """Stop every vCPU thread and wait for it."""
        held = self.lock.held_by_me() if self.loop else False
        if held:
            self.lock.unlock()
        try:
            for cpu in self.cpus:
                cpu.stop()
            for cpu in self.cpus:
                if not cpu.join(timeout=10):
                    raise QkioError(f"{cpu.name} did not stop")
        finally:
            if held:
                self.lock.lock()

    def close(self) -> None:
        """Release every thread and fd the machine owns (idempotent).

        During ``run()``, from another thread: stops the run first (``stop()``)."""
        with self._life:
            state = self.state
            if state == "closed":
                return
            if state == "running" and (self._run_thread == threading.get_ident() or self.lock.held_by_me()):
                raise MachineStateError("Machine.close() from inside run() (a device model or handler, "
                                        "holding the global lock): call stop(), and close() after "
                                        "run() returns")
        if state == "running":
            self.stop()
        with self._life:
            self.state = "closed"
        if self.cpus and any(c.thread is not None and not c.finished.is_set() for c in self.cpus):
            self._stop_vcpus()
        if self.paio is not None:  # first: its workers may still be writing guest RAM
            self.paio.close()
            self.paio = None
        if self.signal_source is not None:
            self.signal_source.close()
            self.signal_source = None
        if self.virtio is not None:  # its eventfds are registered with the VM: before the VM goes
            self.virtio.close()
            self.virtio = None
        for cpu in self.cpus:
            cpu.vcpu.close()
        self.cpus = []
        if self.console_out is not None:
            self.console_out.close()
            self.console_out = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None  # type: ignore[assignment]
        if self.vm is not None:
            self.vm.close()
            self.vm = None  # type: ignore[assignment]
        if self.memory is not None:
            self.memory.close()
            self.memory = None  # type: ignore[assignment]
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None  # type: ignore[assignment]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
