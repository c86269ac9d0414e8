"""vCPU threads: one thread per vCPU looping on ``KVM_RUN``, and how to kick them.

qemu-kvm 0.12 names: ``ap_main_loop`` (the thread), ``kvm_main_loop_cpu`` /
``kvm_cpu_exec`` (the loop), ``pre_kvm_run``/``post_kvm_run`` (dropping and
retaking ``qemu_mutex`` around the ioctl), ``on_vcpu`` (run a function on a
vCPU's thread), ``pause_all_threads``/``resume_all_threads``, and ``SIG_IPI``
(the kick).

Kicks, and the race they must not lose
--------------------------------------
Another thread often needs a vCPU to stop running guest code *now*: to run a
function on it, to pause it, to stop the machine.  A vCPU thread inside
``KVM_RUN`` is in the kernel, so the only way to get its attention is a
signal aimed at that thread (``pthread_kill``): an unblocked signal makes
``KVM_RUN`` return EINTR.

The danger is the gap between *checking for work* and *entering the guest*::

    vCPU thread                         kicker
    -----------                         ------
    queue empty? yes
                                        queue.append(work); pthread_kill()
                                        (the signal arrives now, while the
                                         vCPU is still in Python: nothing
                                         to interrupt, so it is simply taken)
    ioctl(KVM_RUN)   <- sleeps in the guest with work queued: a lost kick

Two cures, both here, selected by ``kick=``:

* ``"signal_mask"`` -- qemu-kvm 0.12's way.  SIG_IPI stays *blocked* in the
  vCPU thread, and ``KVM_SET_SIGNAL_MASK`` gives the kernel a mask to use
  only while inside ``KVM_RUN`` in which SIG_IPI is unblocked.  A kick sent
  in the gap stays pending; the next ``KVM_RUN`` installs the guest mask,
  sees the pending signal and returns EINTR at once.  Afterwards the thread
  consumes the pending signal with ``sigtimedwait`` (qemu's
  ``kvm_eat_signals``).  Cost: the kernel swaps signal masks, under a lock,
  on every entry.
* ``"immediate_exit"`` -- modern QEMU's way (``KVM_CAP_IMMEDIATE_EXIT``,
  Linux 4.11).  The kicker sets ``kvm_run.immediate_exit = 1`` *before*
  signalling.  (QEMU sets it in the signal handler, ``kvm_ipi_signal``, in
  the target thread; qkio cannot, since CPython runs Python signal handlers
  only in the main thread.)  If the vCPU is in the guest, the signal throws it out; if it
  is in the gap, ``KVM_RUN`` checks the flag on entry and returns EINTR
  without running the guest.  The thread clears the flag and looks at its
  queue again.  Nothing is swapped on the fast path.

Either way: the request is published (queue, flags) *before* the kick, and
the vCPU clears the kick state *before* it reads the requests, so every
request is seen by the check that follows the last kick.

SIG_IPI is SIGUSR1, as in QEMU since 1.1 (qemu-kvm 0.12 used SIGRTMIN+4).
Python runs its handler later, in the main thread; the handler does
nothing -- what matters is that the kernel interrupts the target thread's
``KVM_RUN``.  A handler must be installed: with SIG_DFL the signal would
kill the process, and with SIG_IGN the kernel discards it before it can
interrupt anything.
"""

from __future__ import annotations

import _signal as signal  # signal's C half: the same calls, plain ints, no enums built at import
import collections
import errno
import threading
import time
from collections.abc import Callable

from . import native
from . import trace as _trace
from .errors import GuestFailure, QkioError
from .kvm.constants import ExitReason
from .kvm.exits import EXIT_AGAIN, exit_name, handle_io, reason_for_errno
from .threads import gettid, start_thread

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from .bql import GlobalMutex
    from .devices.ioport import PortBus
    from .devices.mmio import MmioBus
    from .kvm.vcpu import Vcpu

SIG_IPI = signal.SIGUSR1
KICK_STYLES = ("immediate_exit", "signal_mask")
EXIT_PATHS = ("native", "python")

_EXIT_IO = int(ExitReason.IO)      # plain ints: compared on every exit
_EXIT_INTR = int(ExitReason.INTR)
_EXIT_MMIO = int(ExitReason.MMIO)


def install_sig_ipi_handler() -> bool:
    """Give SIG_IPI a do-nothing handler; True if it has one.

    Python installs handlers from the main thread only.  Called elsewhere
    with no handler in place, this returns False, and the vCPU threads must
    then keep SIG_IPI blocked outside ``KVM_RUN`` (``CpuThread(ipi_blocked=True)``):
    a blocked signal still ends ``KVM_RUN``, through the mask
    ``KVM_SET_SIGNAL_MASK`` gives the kernel, and is never delivered, so no
    handler is needed -- whereas an unblocked one with SIG_DFL would kill the
    process.
    """
    if signal.getsignal(SIG_IPI) in (signal.SIG_DFL, signal.SIG_IGN, None):
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(SIG_IPI, _sig_ipi_handler)
    return True


def _sig_ipi_handler(signo, frame):  # the kick's work is done by the kernel's EINTR
    pass


def choose_exit_path(exit_path: str | None):
    """The native module for ``exit_path``, or None for the Python loop.

    ``None`` means "native if it can be had, else Python" (:mod:`qkio.native`
    says why not); ``"native"`` insists and raises if it cannot be built.
    """
    if exit_path not in (None, *EXIT_PATHS):
        raise ValueError(f"exit path must be one of {EXIT_PATHS}, not {exit_path!r}")
    if exit_path == "python":
        return None
    module = native.load()
    if module is None and exit_path == "native":
        raise QkioError(f"the native exit loop is not available: {native.unavailable_reason}")
    return module


def _sigset_bytes(signals) -> bytes:
    """The kernel's 64-bit sigset (bit n-1 for signal n), as KVM_SET_SIGNAL_MASK wants it."""
    bits = 0
    for signo in signals:
        bits |= 1 << (int(signo) - 1)
    return bits.to_bytes(8, "little")


class _Work:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn):
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None


#: ``on_exit(cpu, reason)``: every exit the loop does not handle itself (it
#: handles port I/O, kicks and EAGAIN), with the lock held; may raise GuestFailure.
ExitHandler = Callable[["CpuThread", int], None]
#: ``on_failure(cpu, failure)``: the run cannot go on (a GuestFailure, or a device bug).
FailureHandler = Callable[["CpuThread", GuestFailure], None]
#: ``on_sigbus(cpu, siginfo)``: a SIGBUS directed at this vCPU thread, taken by
#: it with ``sigtimedwait`` (qemu-kvm's ``kvm_on_sigbus``), lock held.
SigbusHandler = Callable[["CpuThread", object], None]


class CpuThread:
    """A vCPU and the thread that runs it (qemu-kvm's ``ap_main_loop``).

    It is given what it uses, not the machine: the ``vcpu``, the global
    ``lock`` (``qemu_mutex``), the port ``bus`` its port-I/O exits go to,
    ``on_exit`` for every other exit and ``on_failure`` for one that ends the
    run (:class:`qkio.machine.Machine` passes its ``handle_exit`` and
    ``guest_failed``).  ``mmio_bus``, if given, is the MMIO bus ``on_exit``
    sends ``KVM_EXIT_MMIO`` to; the native loop reads its
    :attr:`~qkio.devices.mmio.MmioBus.unowned_pages` to complete accesses to
    memory nobody owns without calling ``on_exit``.
    """

    def __init__(self, vcpu: Vcpu, *, lock: GlobalMutex, bus: PortBus, on_exit: ExitHandler,
                 on_failure: FailureHandler, tracer: _trace.Tracer | None = None,
                 kick: str = "immediate_exit", exit_path: str | None = None, ipi_blocked: bool = False,
                 on_sigbus: SigbusHandler | None = None, mmio_bus: MmioBus | None = None):
        if kick not in KICK_STYLES:
            raise ValueError(f"kick style must be one of {KICK_STYLES}, not {kick!r}")
        # SIG_IPI blocked outside KVM_RUN: the signal_mask style's way, and the
        # only safe one when SIG_IPI has no handler (install_sig_ipi_handler).
        self._mask_ipi = kick == "signal_mask" or ipi_blocked
        self._native = choose_exit_path(exit_path)
        #: ``"native"`` (the C port-I/O loop of :mod:`qkio.native`) or ``"python"``.
        self.exit_path = "python" if self._native is None else "native"
        self.vcpu = vcpu
        self.index = vcpu.id
        self.kick_style = kick
        self.name = f"CPU {vcpu.id}/KVM"  # QEMU's thread name
        self.lock = lock
        self.bus = bus
        self.mmio_bus = mmio_bus
        self.on_exit = on_exit
        self.on_failure = on_failure
        self.on_sigbus = on_sigbus
        self.sigbus_taken = 0  # SIGBUSes this thread took itself (signal_mask style)
        self.tracer = tracer if tracer is not None else _trace.default
        self.thread: threading.Thread | None = None
        self.tid: int | None = None
        # Exits by reason, one slot per reason: a list index is the cheapest
        # counter there is, and this one is bumped on every exit.
        self._tally = [0] * 64
        # Port accesses (slot 0) and MMIO accesses (slot 1) the native loop
        # completed: it bumps these in place (aligned uint64s; a memoryview,
        # not array('Q'), which would load the array extension module on
        # every run's start-up for two counters).
        self._native_io_exits = memoryview(bytearray(16)).cast("Q")
        self.kicks_sent = 0
        self.kicks_received = 0
        self.last_exit: int | None = None
        # Requests from other threads.  Published before the kick; read by
        # the vCPU thread after it clears the kick state (see module comment).
        self._work: collections.deque[_Work] = collections.deque()
        self._stop = False
        self._pause = False
        # "Look at the requests": set after any of the three above changes and
        # before the kick; the loop tests this one flag per exit.
        self._pending = False
        self.paused = False
        self._state = threading.Condition()  # pause/resume handshakes
        self.finished = threading.Event()
        self.cpu_time_ns: int | None = None  # set when the thread ends

    # --- the thread ------------------------------------------------------------

    def start(self) -> None:
        self.thread = start_thread(self.name, self._thread_main)

    def _thread_main(self) -> None:
        self.tid = gettid()
        if self._mask_ipi:
            # Blocked here, unblocked only inside KVM_RUN (module comment).
            signal.pthread_sigmask(signal.SIG_BLOCK, {SIG_IPI})
            # setup_kernel_sigmask: inside KVM_RUN only SIG_IPI and SIGBUS may
            # interrupt the guest -- SIGBUS because a memory error on a page
            # this thread touched is sent to this thread, and only it can take it.
            inside = signal.pthread_sigmask(signal.SIG_BLOCK, set()) - {SIG_IPI, signal.SIGBUS}
            self.vcpu.set_signal_mask(_sigset_bytes(inside))
        else:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {SIG_IPI})
        lock = self.lock
        lock.lock()
        try:
            self._cpu_loop()
        except GuestFailure as failure:
            self.on_failure(self, failure)
        except BaseException as exc:  # a bug in a device model: end the run, say where
            self.on_failure(self, GuestFailure(
                f"vCPU {self.index}: internal error handling exit {self.last_exit}: "
                f"{type(exc).__name__}: {exc}"))
        finally:
            if lock.held_by_me():
                lock.unlock()
            # This thread's CPU time, guest time included (KVM_RUN runs the guest
            # in this thread): what `qkio bench virtio` charges to the vCPU.
            self.cpu_time_ns = time.thread_time_ns()
            self.finished.set()

    def _cpu_loop(self) -> None:
        """qemu-kvm's ``kvm_main_loop_cpu``: enter the guest, handle the exit, repeat.

        This loop runs once per guest exit -- 100,000 times a second on a
        fast host -- so it is written for that: everything it touches is
        bound to a local first, and the commonest exit, port I/O, is
        dispatched before anything else (:func:`qkio.kvm.exits.handle_io`,
        straight from the ``kvm_run`` page).

        With the native loop (:mod:`qkio.native`, ``exit_path="native"``), the
        first four steps -- drop the lock, ``KVM_RUN``, retake the lock,
        complete a port access on its device (or an access to memory nobody
        owns, once reported: ``mmio_bus``) -- run in C, over and over,
        until an exit the C code does not handle; that exit (or the EINTR of
        a kick) comes back here and is handled below exactly as on the
        Python path.  With tracing on, every ``KVM_RUN`` goes through
        :meth:`_run_traced` instead, so that each one is in the trace.
        """
        vcpu, lock, tracer, bus = self.vcpu, self.lock, self.tracer, self.bus
        page, fd, vcpu_run = vcpu.run_page, vcpu.fd, vcpu.run
        unlock, relock = lock.unlock, lock.lock
        handle = self.on_exit
        tally = self._tally
        native_run = self._native.run if self._native is not None else None
        native_args: tuple = (fd, page, lock, bus.table, self._native_io_exits, bus.reported)
        if self.mmio_bus is not None:
            native_args += (self.mmio_bus.unowned_pages,)
        while True:
            if self._pending:
                self._pending = False  # before reading the requests (module comment)
                if self._service_requests():
                    return
            if tracer.enabled:
                reason = self._run_traced()
            elif native_run is not None:
                self.last_exit = _EXIT_IO  # what it was handling if a device raises
                ret = native_run(*native_args)
                reason = ret if ret >= 0 else reason_for_errno(-ret)
            else:
                unlock()  # pre_kvm_run: the guest runs without the lock
                reason = vcpu_run()  # a KvmError leaves without the lock: _thread_main copes
                relock()  # post_kvm_run: exits are handled with it
            self.last_exit = reason  # named in the message if a device model raises
            if reason == _EXIT_IO:
                tally[_EXIT_IO] += 1
                handle_io(bus, page)
                continue
            if reason == EXIT_AGAIN:
                continue
            if 0 <= reason < len(tally):
                tally[reason] += 1
            if reason == _EXIT_INTR:
                self._kicked()
            else:
                handle(self, reason)

    @property
    def exit_counts(self) -> collections.Counter:
        """Exits taken so far, by reason (``ExitReason`` where KVM's number has a name)."""
        names = ExitReason._value2member_map_
        tally = list(self._tally)
        tally[_EXIT_IO] += self._native_io_exits[0]
        tally[_EXIT_MMIO] += self._native_io_exits[1]
        return collections.Counter({names.get(reason, reason): n
                                    for reason, n in enumerate(tally) if n})

    def _run_traced(self) -> int:
        """One ``KVM_RUN`` with the lock dropped, recorded as a ``KVM_RUN`` slice."""
        self.lock.unlock()
        self.tracer.begin("KVM_RUN", cpu=self.index)
        name = "error"
        try:
            reason = self.vcpu.run()
            name = exit_name(reason)
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else "error"
            raise
        finally:
            self.tracer.end("KVM_RUN", exit_reason=name)
            self.lock.lock()
        return reason

    def _kicked(self) -> None:
        """After EINTR: clear the kick state before looking at the requests."""
        self.kicks_received += 1
        if self.tracer.enabled:
            self.tracer.instant("kick received", cpu=self.index)
        if self.kick_style == "immediate_exit":
            self.vcpu.immediate_exit = 0
        if self._mask_ipi:
            # qemu-kvm's kvm_main_loop_wait / QEMU's kvm_eat_signals: take the
            # pending SIG_IPI so it does not end the next KVM_RUN too.
            while signal.sigtimedwait({SIG_IPI}, 0) is not None:
                pass
            # ... and a SIGBUS sent to this thread (kvm_main_loop_wait waits
            # for {SIG_IPI, SIGBUS} and hands a SIGBUS to kvm_on_sigbus).
            while (info := signal.sigtimedwait({signal.SIGBUS}, 0)) is not None:
                self.sigbus_taken += 1
                if self.tracer.enabled:
                    self.tracer.instant("SIGBUS taken", cpu=self.index, code=info.si_code)
                if self.on_sigbus is not None:
                    self.on_sigbus(self, info)

    def _service_requests(self) -> bool:
        """Run queued work, honour pause and stop.  True means: leave the loop."""
        while self._work:
            work = self._work.popleft()
            try:
                work.result = work.fn()
            except BaseException as exc:
                work.error = exc
            work.done.set()
        if self._stop:
            return True
        if self._pause:
            with self.lock.released():
                with self._state:
                    self.paused = True
                    self._state.notify_all()
                    while self._pause and not self._stop:
                        self._state.wait()
                    self.paused = False
                    self._state.notify_all()
            return self._stop
        return False

    # --- requests from other threads ----------------------------------------------

    def kick(self) -> None:
        """Force the vCPU out of ``KVM_RUN`` (a no-op if the thread has ended)."""
        if self.thread is None or self.finished.is_set():
            return
        if self.kick_style == "immediate_exit":
            self.vcpu.immediate_exit = 1
        self.kicks_sent += 1
        if self.tracer.enabled:
            self.tracer.instant("kick sent", target=self.name)
        try:
            signal.pthread_kill(self.thread.ident or 0, SIG_IPI)  # started: ident is set
        except ProcessLookupError:
            pass  # it ended between the check and the kill

    def run_on_cpu(self, fn):
        """Run ``fn()`` on this vCPU's thread, with the global lock held, and return its result
        (qemu-kvm's ``on_vcpu``).  Drops the caller's lock while waiting, if it holds it."""
        if threading.current_thread() is self.thread:
            return fn()
        if self.finished.is_set():
            raise RuntimeError(f"{self.name} has stopped")
        work = _Work(fn)
        self._work.append(work)
        self._pending = True
        self.kick()
        if self.lock.held_by_me():
            with self.lock.released():
                self._wait_done(work)
        else:
            self._wait_done(work)
        if work.error is not None:
            raise work.error
        return work.result

    def _wait_done(self, work) -> None:
        while not work.done.wait(0.5):
            if self.finished.is_set() and not work.done.is_set():
                raise RuntimeError(f"{self.name} stopped before running the work")

    def pause(self) -> None:
        """Stop running guest code and wait until the thread says it is paused."""
        with self._state:
            self._pause = True
            self._pending = True
        self.kick()
        with self._state:
            while not self.paused and not self.finished.is_set():
                self._state.wait(0.5)
                if not self.paused:
                    self.kick()  # harmless if the first one was seen

    def resume(self) -> None:
        with self._state:
            self._pause = False
            self._state.notify_all()
            while self.paused:
                self._state.wait(0.5)

    def stop(self) -> None:
        """Ask the thread to leave its loop; :meth:`join` waits for it."""
        with self._state:
            self._stop = True
            self._pending = True
            self._state.notify_all()
        self.kick()

    def join(self, timeout: float = 5.0) -> bool:
        if self.thread is None:
            return True
        deadline_step = 0.1
        waited = 0.0
        while not self.finished.wait(deadline_step):
            waited += deadline_step
            self.kick()  # a vCPU sleeping in the kernel (e.g. waiting for SIPI) needs one
            if waited >= timeout:
                return False
        self.thread.join(timeout)
        return not self.thread.is_alive()
