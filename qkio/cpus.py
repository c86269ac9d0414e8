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

import array
import collections
import ctypes
import errno
import signal
import struct
import threading

from . import native
from .errors import GuestFailure, KvmError, QkioError
from .kvm.constants import KVM_INTERNAL_ERROR_EMULATION, ExitReason
from .kvm.ioctl import KVM_RUN, libc_ioctl
from .kvm.structs import kvm_run, kvm_run_exit, kvm_run_io
from .threads import gettid, start_thread

SIG_IPI = signal.SIGUSR1
KICK_STYLES = ("immediate_exit", "signal_mask")
EXIT_PATHS = ("native", "python")

#: ``KVM_RUN`` failing with EAGAIN is not an error.  An application
#: processor starts in the "wait for SIPI" state (KVM_MP_STATE_UNINITIALIZED);
#: its ``KVM_RUN`` sleeps in the kernel until an INIT or SIPI arrives, and then
#: returns -EAGAIN instead of entering the guest, so that userspace can look at
#: the new state first.  QEMU's ``kvm_cpu_exec`` treats it like EINTR ("io
#: window exit") and simply calls ``KVM_RUN`` again; so does qkio.
EXIT_AGAIN = -1  # not a KVM exit reason: "KVM_RUN returned EAGAIN"
_EXIT_IO = int(ExitReason.IO)      # plain ints: compared on every exit
_EXIT_INTR = int(ExitReason.INTR)


def install_sig_ipi_handler() -> None:
    """Give SIG_IPI a do-nothing handler (must run in the main thread)."""
    if signal.getsignal(SIG_IPI) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(SIG_IPI, _sig_ipi_handler)


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


class CpuThread:
    """A vCPU and the thread that runs it (qemu-kvm's ``ap_main_loop``)."""

    def __init__(self, machine, vcpu, kick: str = "immediate_exit", exit_path: str | None = None):
        if kick not in KICK_STYLES:
            raise ValueError(f"kick style must be one of {KICK_STYLES}, not {kick!r}")
        self._native = choose_exit_path(exit_path)
        #: ``"native"`` (the C port-I/O loop of :mod:`qkio.native`) or ``"python"``.
        self.exit_path = "python" if self._native is None else "native"
        self.machine = machine
        self.vcpu = vcpu
        self.index = vcpu.id
        self.kick_style = kick
        self.name = f"CPU {vcpu.id}/KVM"  # QEMU's thread name
        self.lock = machine.lock
        self.tracer = machine.tracer
        self.thread: threading.Thread | None = None
        self.tid: int | None = None
        # Exits by reason, one slot per reason: a list index is the cheapest
        # counter there is, and this one is bumped on every exit.
        self._tally = [0] * 64
        # Port accesses the native loop completed: it bumps this in place.
        self._native_io_exits = array.array("Q", [0])
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

    # --- the thread ------------------------------------------------------------

    def start(self) -> None:
        self.thread = start_thread(self.name, self._thread_main)

    def _thread_main(self) -> None:
        self.tid = gettid()
        if self.kick_style == "signal_mask":
            # Blocked here, unblocked only inside KVM_RUN (module comment).
            signal.pthread_sigmask(signal.SIG_BLOCK, {SIG_IPI})
            inside = signal.pthread_sigmask(signal.SIG_BLOCK, set()) - {SIG_IPI}
            self.vcpu.set_signal_mask(_sigset_bytes(inside))
        else:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {SIG_IPI})
        lock = self.lock
        lock.lock()
        try:
            self._cpu_loop()
        except GuestFailure as failure:
            self.machine.guest_failed(self, failure)
        except BaseException as exc:  # a bug in a device model: end the run, say where
            self.machine.guest_failed(self, GuestFailure(
                f"vCPU {self.index}: internal error handling exit {self.last_exit}: "
                f"{type(exc).__name__}: {exc}"))
        finally:
            if lock.held_by_me():
                lock.unlock()
            self.finished.set()

    def _cpu_loop(self) -> None:
        """qemu-kvm's ``kvm_main_loop_cpu``: enter the guest, handle the exit, repeat.

        This loop runs once per guest exit -- 100,000 times a second on a
        fast host -- so it is written for that: everything it touches is
        bound to a local first, ``KVM_RUN`` is issued directly rather than
        through :meth:`Vcpu.run` (same call, one Python frame less), and the
        commonest exit, port I/O, is dispatched before anything else.

        With the native loop (:mod:`qkio.native`, ``exit_path="native"``), the
        first four steps -- drop the lock, ``KVM_RUN``, retake the lock,
        complete a port access on its device -- run in C, over and over,
        until an exit the C code does not handle; that exit (or the EINTR of
        a kick) comes back here and is handled below exactly as on the
        Python path.  With tracing on, every ``KVM_RUN`` goes through
        :meth:`_run_traced` instead, so that each one is in the trace.
        """
        vcpu, lock, tracer, machine = self.vcpu, self.lock, self.tracer, self.machine
        run, page, bus = vcpu.kvm_run, vcpu.run_page, machine.bus
        fd, kvm_run_ioctl, get_errno = vcpu.fd, libc_ioctl, ctypes.get_errno
        unlock, relock = lock.unlock, lock.lock
        handle = machine.handle_exit
        tally = self._tally
        native_run = self._native.run if self._native is not None else None
        slots, native_io = bus._slots, self._native_io_exits
        while True:
            if self._pending:
                self._pending = False  # before reading the requests (module comment)
                if self._service_requests():
                    return
            if tracer.enabled:
                reason = self._run_traced()
            elif native_run is not None:
                self.last_exit = _EXIT_IO  # what it was handling if a device raises
                ret = native_run(fd, page, lock, slots, native_io)
                reason = ret if ret >= 0 else self._run_failed(-ret)
            else:
                unlock()  # pre_kvm_run: the guest runs without the lock
                ret = kvm_run_ioctl(fd, KVM_RUN, 0)
                err = get_errno() if ret < 0 else 0
                relock()  # post_kvm_run: exits are handled with it
                reason = run.exit_reason if ret >= 0 else self._run_failed(err)
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
                self._kicked(run)
            else:
                handle(self, reason)

    @property
    def exit_counts(self) -> collections.Counter:
        """Exits taken so far, by reason (``ExitReason`` where KVM's number has a name)."""
        names = ExitReason._value2member_map_
        tally = list(self._tally)
        tally[_EXIT_IO] += self._native_io_exits[0]
        return collections.Counter({names.get(reason, reason): n
                                    for reason, n in enumerate(tally) if n})

    def _run_failed(self, err: int):
        """``KVM_RUN`` returned -1: a kick (EINTR), an AP woken by INIT (EAGAIN), or an error."""
        if err == errno.EINTR:
            return _EXIT_INTR
        if err == errno.EAGAIN:
            return EXIT_AGAIN  # an AP that got INIT while waiting to start; see EXIT_AGAIN
        raise KvmError("KVM_RUN", err)

    def _run_traced(self):
        """One ``KVM_RUN`` with the lock dropped, recorded as a ``KVM_RUN`` slice."""
        self.lock.unlock()
        self.tracer.begin("KVM_RUN", cpu=self.index)
        ret = libc_ioctl(self.vcpu.fd, KVM_RUN, 0)
        err = ctypes.get_errno() if ret < 0 else 0
        if ret >= 0:
            reason = self.vcpu.kvm_run.exit_reason
            known = ExitReason._value2member_map_.get(reason)
            name = known.name if known is not None else str(reason)
        else:
            reason = {errno.EINTR: _EXIT_INTR, errno.EAGAIN: EXIT_AGAIN}.get(err)
            name = {errno.EINTR: "INTR", errno.EAGAIN: "EAGAIN"}.get(err) or errno.errorcode.get(err, str(err))
        self.tracer.end("KVM_RUN", exit_reason=name)
        self.lock.lock()
        if reason is None:
            raise KvmError("KVM_RUN", err)
        return reason

    def _kicked(self, run) -> None:
        """After EINTR: clear the kick state before looking at the requests."""
        self.kicks_received += 1
        if self.tracer.enabled:
            self.tracer.instant("kick received", cpu=self.index)
        if self.kick_style == "immediate_exit":
            run.immediate_exit = 0
        else:
            # qemu-kvm's kvm_main_loop_wait / QEMU's kvm_eat_signals: take the
            # pending SIG_IPI so it does not end the next KVM_RUN too.
            while signal.sigtimedwait({SIG_IPI}, 0) is not None:
                pass

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
            self.vcpu.kvm_run.immediate_exit = 1
        self.kicks_sent += 1
        if self.tracer.enabled:
            self.tracer.instant("kick sent", target=self.name)
        try:
            signal.pthread_kill(self.thread.ident, SIG_IPI)
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


# KVM_EXIT_IO's five fields (``struct kvm_run.io``: u8 direction, u8 size,
# u16 port, u32 count, u64 data_offset) and where they sit in the kvm_run page.
_IO_FIELDS = struct.Struct("=BBHIQ")
_IO_AT = kvm_run.exit.offset + kvm_run_exit.io.offset
assert _IO_FIELDS.size == ctypes.sizeof(kvm_run_io)
_OUT = kvm_run_io.KVM_EXIT_IO_OUT


def handle_io(bus, data, _unpack=_IO_FIELDS.unpack_from) -> None:
    """KVM_EXIT_IO: carry ``count`` accesses of ``size`` bytes between ``data`` and the port bus.

    ``data`` is the mmap'ed kvm_run page; the bytes sit at ``data_offset`` in it.

    This runs once per port access the guest makes -- the exit ``qkio bench pio``
    times -- so it reads the five fields with one ``unpack_from`` on the page
    rather than through the ctypes view (``run.exit.io`` builds two ctypes
    objects per exit, then one more call per field), and the usual case, a
    single access (``count == 1``; only ``rep outs``/``rep ins`` give more),
    takes the short branch.
    """
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


def describe_failure(vcpu, reason: int) -> str:
    """A one-line message for an exit that ends the run, naming it and the guest's RIP."""
    run = vcpu.kvm_run
    try:
        rip = vcpu.get_regs().rip
        where = f"at RIP={rip:#x}"
    except Exception:  # the vCPU may be in no state to answer
        where = "(RIP unavailable)"
    if reason == ExitReason.SHUTDOWN:
        return f"guest triple-faulted (KVM_EXIT_SHUTDOWN) on vCPU {vcpu.id} {where}"
    if reason == ExitReason.INTERNAL_ERROR:
        sub = run.exit.internal.suberror
        what = "emulation failure" if sub == KVM_INTERNAL_ERROR_EMULATION else f"suberror {sub}"
        return f"KVM internal error: {what} (KVM_EXIT_INTERNAL_ERROR) on vCPU {vcpu.id} {where}"
    if reason == ExitReason.FAIL_ENTRY:
        hw = run.exit.fail_entry.hardware_entry_failure_reason
        return f"VM entry failed, hardware reason {hw:#x} (KVM_EXIT_FAIL_ENTRY) on vCPU {vcpu.id} {where}"
    name = ExitReason(reason).name if reason in ExitReason._value2member_map_ else str(reason)
    return f"unexpected exit KVM_EXIT_{name} on vCPU {vcpu.id} {where}"
