"""The signal pipe: turning the VMM's signals into fd events for the io thread.

A signal is the kernel interrupting a thread.  If a VMM lets that happen
whenever a signal arrives, the handler runs in the middle of whatever the
chosen thread was doing -- halfway through emulating a device, holding or not
holding the global lock -- and may touch only async-signal-safe state.  qemu-kvm
0.12 avoids that: the signals it cares about are *blocked*, so the kernel
leaves them pending, and the io thread collects them as ordinary fd events in
its ``select()``, then runs the handler in the io thread with the global lock
held, like any other fd handler.  This module builds that path in three ways,
chosen at run time with ``SignalSource(method=...)``:

``"signalfd"`` -- ``signalfd(2)`` (qemu-kvm ``qemu_signalfd`` under
    CONFIG_SIGNALFD).  The kernel gives the blocked signals a file descriptor:
    the fd is readable while one of them is pending, and each ``read`` dequeues
    signals as 128-byte ``struct signalfd_siginfo`` records.  No extra thread.

``"thread"`` -- a signal thread plus a pipe (compatfd.c ``qemu_signalfd_compat``
    and ``sigwait_compat``, used when the signalfd syscall fails).  A thread
    named ``qkio-sigwait`` loops in ``sigwaitinfo()``, which dequeues one
    pending signal at a time, and writes a 128-byte record shaped like
    ``signalfd_siginfo`` into a pipe whose read end the io thread watches.  We
    fill in what ``sigwaitinfo`` told us (signo, code, errno, pid, uid, status,
    band).  qemu-kvm 0.12 copied only the signal number into the first four
    bytes and wrote the other 124 bytes of its stack buffer as they happened
    to be; its readers only ever looked at ``ssi_signo``.  The write end is
    blocking, as in qemu: if the io thread falls 512 records behind, the pipe
    is full and the signal thread stops taking signals, so they wait in the
    kernel instead (where the two kinds behave differently; see below).

``"async"`` -- no pipe at all, for contrast: classic asynchronous handlers
    installed with ``signal.signal``.  In C an asynchronous handler runs *in
    the interrupted thread, at the interrupted instruction*.  CPython never
    does that with Python code: its C-level handler only records "signal N
    tripped" and wakes the main thread, and the Python handler runs later, in
    the **main thread**, between two bytecodes -- whatever the main thread was
    doing (sitting in ``select()`` with the lock released, or in the middle of
    a device handler holding it).  It also receives no siginfo (no sender pid),
    and because "tripped" is one flag per signal number, a burst of queued
    real-time signals can run the Python handler fewer times than they were
    sent.  Each delivery is recorded with the thread it ran in and whether that
    thread held the global lock, so the book can show it.

Blocking comes first: ``block_vmm_signals``
-------------------------------------------

Both synchronous methods need the signals *blocked in every thread* -- a
signal that some thread leaves unblocked is delivered to that thread (with the
default action, SIGTERM kills the process) and never reaches the fd.  POSIX
gives each thread its own signal mask; a new thread starts with a copy of its
creator's.  On Linux ``sigprocmask`` in a multi-threaded process changes only
the *calling* thread's mask -- it is the same system call as
``pthread_sigmask`` -- so the article's S7 claim that ``sigprocmask`` makes the
whole process stop accepting a signal is wrong once threads exist.  The only
reliable order is: the main thread blocks the VMM's signals before any other
thread exists, and every thread created afterwards inherits the mask.
``block_vmm_signals`` therefore refuses to run if the process already has
more than one thread (counted in /proc/self/task, which sees threads Python
did not start too).

Standard signals coalesce, real-time signals queue
--------------------------------------------------

While blocked, a standard signal (SIGUSR2, SIGTERM, ...) is one pending *bit*:
sending it ten times before anyone dequeues it leaves it pending once.
Real-time signals (SIGRTMIN..SIGRTMAX) are *queued*: each ``kill`` adds an
entry (up to RLIMIT_SIGPENDING per user, after which ``kill`` fails with
EAGAIN) and each one is dequeued separately, in order.  ``SignalSource``
counts what it receives per signal number, so a test can send a burst of each
kind while the io thread is busy and compare.

Process-directed vs thread-directed: ``kill(pid, sig)`` makes a signal pending
for the process, and any thread (or a signalfd read in any thread) may take
it.  ``pthread_kill`` makes it pending for one thread only, and only that
thread's ``signalfd`` read or ``sigwaitinfo`` can take it.
"""

from __future__ import annotations

import _signal as signal  # signal's C half: the same calls, plain ints, no enums built at import
import ctypes
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterable

from qkio import trace
from qkio.libc import libc as _libc
from qkio.threads import start_thread

__all__ = ["VMM_SIGNALS", "SIGNALFD_SIGINFO_SIZE", "SigInfo", "SignalSource",
           "block_vmm_signals", "blocked_signals", "signalfd", "thread_count", "threads_taking"]

#: The signals a qkio VMM takes synchronously: qemu-kvm 0.12's -- SIGIO and
#: SIGALRM (the clock), SIGBUS (memory errors) in ``kvm_main_loop``'s signal fd,
#: SIGUSR2 (posix-aio-compat completions) in ``paio_init``'s -- plus the
#: termination signals, so that shutdown is also handled in the io thread --
#: SIGQUIT too, so that Ctrl-\ restores the terminal as Ctrl-C does.
VMM_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                signal.SIGUSR2, signal.SIGALRM, signal.SIGIO, signal.SIGQUIT,
                                signal.SIGBUS)

#: The POSIX real-time signals (SIGRTMIN..SIGRTMAX as glibc numbers them; the
#: two below SIGRTMIN are glibc's own).  ``qkio run`` takes them too, and only
#: counts them: unlike the standard signals above they *queue* -- ten thousand
#: sent are ten thousand received -- so they are how a test or a chapter shows
#: that a signal path loses nothing.
REALTIME_SIGNALS: tuple[int, ...] = tuple(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))



def signal_name(signo: int) -> str:
    """``SIGTERM``, or ``SIGRTMIN+3`` for a real-time signal (which have no names of their own)."""
    # The name signal.Signals would give: of several names for one number
    # (SIGABRT and SIGIOT), the first in alphabetical order.
    names = [name for name, value in vars(signal).items()
             if name.startswith("SIG") and not name.startswith("SIG_") and value == signo]
    return min(names) if names else f"SIGRTMIN+{signo - signal.SIGRTMIN}"


#: ``sizeof(struct signalfd_siginfo)``: every record is exactly this long.
SIGNALFD_SIGINFO_SIZE = 128

# struct signalfd_siginfo (<sys/signalfd.h>), the fields up to ssi_addr:
#   u32 signo; s32 errno; s32 code; u32 pid; u32 uid; s32 fd; u32 tid;
#   u32 band; u32 overrun; u32 trapno; s32 status; s32 int; u64 ptr;
#   u64 utime; u64 stime; u64 addr; ... padding to 128 bytes.
_SSI = struct.Struct("=IiiIIiIIIIiiQQQQ")
_READ_BATCH = 64  # records per read(); signalfd returns as many as fit


class SigInfo:
    """One received signal, from a ``signalfd_siginfo``-shaped record.

    ``path`` says how it came: ``"signalfd"``, ``"thread"`` or ``"async"``.
    ``value`` is ``ssi_int`` (the ``sigqueue`` value).  For ``"async"`` only
    ``signo`` is known: Python handlers are not given a siginfo.

    A plain class with slots rather than a dataclass: one is made per
    signal, in the io thread, and ``dataclasses`` costs start-up time
    (see :mod:`qkio.record`).  Compared by value, like a dataclass.
    """

    __slots__ = ("signo", "code", "pid", "uid", "errno", "status", "band", "value", "path")

    def __init__(self, signo: int, code: int = 0, pid: int = 0, uid: int = 0, errno: int = 0,
                 status: int = 0, band: int = 0, value: int = 0, path: str = "") -> None:
        self.signo = signo
        self.code = code
        self.pid = pid
        self.uid = uid
        self.errno = errno
        self.status = status
        self.band = band
        self.value = value
        self.path = path

    def _astuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        return "SigInfo(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"

    def __eq__(self, other):
        return self._astuple() == other._astuple() if type(other) is SigInfo else NotImplemented

    def __hash__(self) -> int:
        return hash(self._astuple())

    @property
    def name(self) -> str:
        return signal_name(self.signo)

    @classmethod
    def from_record(cls, rec: bytes, path: str) -> "SigInfo":
        (signo, err, code, pid, uid, _fd, _tid, band, _overrun, _trapno, status,
         value, _ptr, _utime, _stime, _addr) = _SSI.unpack_from(rec)
        return cls(signo, code, pid, uid, err, status, band, value, path)

    def to_record(self) -> bytes:
        head = _SSI.pack(self.signo, self.errno, self.code, self.pid, self.uid, 0, 0,
                         self.band & 0xFFFFFFFF, 0, 0, self.status, self.value, 0, 0, 0, 0)
        return head + bytes(SIGNALFD_SIGINFO_SIZE - len(head))


# --- signalfd(2) through ctypes -----------------------------------------------



class _sigset_t(ctypes.Structure):
    # glibc's sigset_t: 1024 bits.  The kernel reads only the first _NSIG/8 = 8
    # bytes (64 signals); glibc's signalfd() passes that size for us.
    _fields_ = [("val", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]


_libc.signalfd.argtypes = [ctypes.c_int, ctypes.POINTER(_sigset_t), ctypes.c_int]
_libc.signalfd.restype = ctypes.c_int
_libc.sigemptyset.argtypes = [ctypes.POINTER(_sigset_t)]
_libc.sigaddset.argtypes = [ctypes.POINTER(_sigset_t), ctypes.c_int]

SFD_NONBLOCK = os.O_NONBLOCK
SFD_CLOEXEC = os.O_CLOEXEC


def signalfd(signals: Iterable[int], flags: int = SFD_NONBLOCK | SFD_CLOEXEC) -> int:
    """``signalfd(-1, mask, flags)``: a new fd from which the given (blocked)
    signals can be read.  Raises OSError with the kernel's errno."""
    mask = _sigset_t()
    _libc.sigemptyset(ctypes.byref(mask))
    for s in signals:
        if _libc.sigaddset(ctypes.byref(mask), int(s)) != 0:
            raise ValueError(f"bad signal number {s}")
    fd = _libc.signalfd(-1, ctypes.byref(mask), flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"signalfd: {os.strerror(err)}")
    return fd


# --- masks and threads ----------------------------------------------------------


def thread_count() -> int:
    """How many threads this process has, as the kernel sees it."""
    return len(os.listdir("/proc/self/task"))


def block_vmm_signals(signals: Iterable[int] = VMM_SIGNALS, *, check: bool = True) -> set[int]:
    """Block ``signals`` in the calling thread, which must be the only thread.

    Call it first thing in ``main``, before any thread is started, so that all
    threads inherit the mask (see the module comment for why sigprocmask does
    not reach threads that already exist).  Returns the previous mask.
    ``check=False`` skips the only-thread check (for demonstrating what goes
    wrong without it).
    """
    if check and thread_count() != 1:
        raise RuntimeError(
            f"block_vmm_signals must run before any other thread exists; this "
            f"process already has {thread_count()} threads, which keep their "
            f"own masks and could still take these signals")
    return signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))


def threads_taking(signo: int) -> list[int]:
    """The threads of this process that do not block ``signo`` (a process-directed
    ``signo`` may be delivered to any of them)."""
    open_to_it = []
    for tid in os.listdir("/proc/self/task"):
        try:
            if signo not in blocked_signals(tid):
                open_to_it.append(int(tid))
        except FileNotFoundError:  # the thread ended while we looked
            pass
    return sorted(open_to_it)


def blocked_signals(tid: int | str = "self", pid: int | str = "self") -> set[int]:
    """The signals blocked by thread ``tid`` of process ``pid`` (SigBlk in /proc).

    ``tid="self"`` with another ``pid`` reads that process's main thread."""
    if tid == "self":
        path = f"/proc/{pid}/status"
    else:
        path = f"/proc/{pid}/task/{tid}/status"
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith("SigBlk:"):
                bits = int(line.split()[1], 16)
                return {n + 1 for n in range(64) if bits >> n & 1}
    return set()


# --- the source -------------------------------------------------------------------

SigHandler = Callable[[SigInfo], object]


class SignalSource:
    """The VMM's signals, delivered to per-signal handlers in the io thread.

    ``SignalSource(method="signalfd"|"thread"|"async", signals=VMM_SIGNALS,
    *, force_signalfd_failure=False, tracer=None, thread_name="qkio-sigwait",
    wakeup_fd=True)``

    ``method`` is what was asked for and ``path`` what is in use: a failing
    ``signalfd`` falls back to ``"thread"`` as ``qemu_signalfd`` does
    (``force_signalfd_failure=True`` makes it fail with ENOSYS, as on a
    pre-2.6.22 kernel).  For the synchronous paths, call ``attach(loop)`` to
    register ``sigfd_handler`` on ``read_fd``; handlers then run in the io
    thread with the global lock held.  For ``"async"`` the handlers are
    installed with ``signal.signal`` (main thread only) and the signals are
    unblocked in the main thread alone, so that no other thread takes them,
    and ``attach`` gives the loop a wake-up fd (``signal.set_wakeup_fd``) so
    that a signal never waits for ``select()``'s timeout (``wakeup_fd=False``
    leaves it out).
    """

    def __init__(self, method: str = "signalfd", signals: Iterable[int] = VMM_SIGNALS, *,
                 force_signalfd_failure: bool = False,
                 tracer: trace.Tracer | None = None, thread_name: str = "qkio-sigwait",
                 wakeup_fd: bool = True) -> None:
        if method not in ("signalfd", "thread", "async"):
            raise ValueError(f"signal method must be signalfd, thread or async, not {method!r}")
        self.method = method
        self.signals = tuple(dict.fromkeys(int(s) for s in signals))
        self.tracer = tracer if tracer is not None else trace.default
        self.handlers: dict[int, SigHandler] = {}
        self.received: dict[int, int] = {}  # signo -> count, every path
        self.unhandled = 0
        self.read_fd = -1
        self._write_fd = -1
        self.thread: threading.Thread | None = None
        self.signalfd_error: OSError | None = None
        self._closing = False
        self._loop = None
        self._lock = None  # the global lock, once attached (for "async" records)
        # A second source (posix-aio-compat's, for SIGUSR2) names its thread
        # differently, so the census of compat mode tells the two apart.
        self.thread_name = thread_name
        self.wakeup_fd = wakeup_fd
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup_fd = -1

        if method == "async":
            self.path = "async"
            return
        self.read_fd = self.qemu_signalfd(force_signalfd_failure)

    def qemu_signalfd(self, force_failure: bool = False) -> int:
        """compatfd.c's ``qemu_signalfd``: an fd that yields one 128-byte record per signal.

        A ``signalfd(2)`` when the method is ``"signalfd"`` and the kernel has
        it; otherwise -- asked for ``"thread"``, or signalfd failed (ENOSYS on a
        kernel before 2.6.22; ``force_failure`` fakes that) -- the read end of
        :meth:`qemu_signalfd_compat`'s pipe.  Sets :attr:`path` to what it chose.
        """
        if self.method == "signalfd":
            try:
                if force_failure:
                    raise OSError(errno.ENOSYS, "signalfd: forced failure (test)")
                fd = signalfd(self.signals)
                self.path = "signalfd"
                return fd
            except OSError as e:
                self.signalfd_error = e
                self.tracer.instant("signalfd failed, using a signal thread", error=str(e))
        self.path = "thread"
        return self.qemu_signalfd_compat()

    # -- the signal thread (compatfd.c) ----------------------------------------

    def qemu_signalfd_compat(self) -> int:
        """compatfd.c's ``qemu_signalfd_compat``: a pipe and a thread (``sigwait_compat``,
        here :meth:`_sigwait_loop`) that writes a record into it per signal; returns the
        pipe's read end."""
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)  # the io thread reads until EAGAIN
        self._write_fd = w
        self.thread = start_thread(self.thread_name, self._sigwait_loop, daemon=True)
        return r

    def _sigwait_loop(self) -> None:
        # sigwaitinfo only takes signals that are blocked; blocking them again
        # here is harmless when block_vmm_signals ran first, and keeps this
        # thread from ever running a handler for them if it did not.
        signal.pthread_sigmask(signal.SIG_BLOCK, set(self.signals))
        wanted = set(self.signals)
        tracer = self.tracer
        while True:
            si = signal.sigwaitinfo(wanted)  # PEP 475 retries EINTR
            if self._closing:
                return
            if tracer.enabled:
                tracer.instant("sigwaitinfo returned", signo=si.si_signo, pid=si.si_pid)
            rec = SigInfo(si.si_signo, si.si_code, si.si_pid, si.si_uid, si.si_errno,
                          si.si_status, si.si_band, 0, "thread").to_record()
            try:
                os.write(self._write_fd, rec)  # < PIPE_BUF, so written whole
            except OSError:
                return  # pipe closed under us: the source is shutting down

    # -- wiring into the main loop -------------------------------------------

    def add_handler(self, signo: int, fn: SigHandler) -> None:
        """Call ``fn(siginfo)`` for each ``signo`` received.  For ``"async"``
        this installs a Python signal handler (main thread only)."""
        signo = int(signo)
        if signo not in self.signals:
            raise ValueError(f"signal {signo} is not one of this source's signals")
        self.handlers[signo] = fn
        if self.path == "async":
            signal.signal(signo, self._async_handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signo})

    def attach(self, loop) -> None:
        """Register ``sigfd_handler`` on ``loop`` for ``read_fd`` (synchronous
        paths); for ``"async"``, remember the loop's lock for the records and
        give the loop a wake-up fd for the signals (see :meth:`_attach_wakeup_fd`)."""
        self._loop = loop
        self._lock = loop.lock
        if self.path != "async":
            loop.set_fd_handler(self.read_fd, self.sigfd_handler, None, self)
        elif self.wakeup_fd:
            self._attach_wakeup_fd(loop)

    def _attach_wakeup_fd(self, loop) -> None:
        """``signal.set_wakeup_fd`` on a pipe the loop watches: the self-pipe trick.

        CPython runs a Python handler only when the main thread next checks
        for tripped signals.  A signal that lands after the last check but
        before ``select()`` starts is therefore not acted on until ``select()``
        returns for another reason -- with nothing else to do, the whole
        timeout (a second for ``main_loop_wait(1000)``; measured: an alarm
        clock timer 1.0 s late, twice in 210 firings).  In C, the handler
        itself would write to a pipe (0.12's ``host_alarm_handler`` calls
        ``qemu_event_increment`` for that reason); CPython's C-level handler
        does that write for us when given a wake-up fd, so ``select()``
        returns and the Python handler runs at once.  One per process: if the
        loop already watches the current wake-up fd (another source's), keep it.
        """
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        if old != -1 and any(rec.fd == old or rec.opaque == old for rec in loop.handlers()):
            signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return
        self._old_wakeup_fd = old
        self._wakeup = (r, w)
        loop.set_fd_handler(r, self._drain_wakeup, None, w)

    def detach_wakeup_fd(self) -> None:
        """Stop using the wake-up fd (restore the previous one); for showing the race."""
        if self._wakeup is not None:
            if self._loop is not None:
                self._loop.set_fd_handler(self._wakeup[0], None, None)
            signal.set_wakeup_fd(self._old_wakeup_fd)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _drain_wakeup(self, opaque: object = None) -> None:
        try:
            while self._wakeup is not None and os.read(self._wakeup[0], 512):
                pass
        except BlockingIOError:
            pass

    def sigfd_handler(self, opaque: object = None) -> int:
        """The io thread's read handler: read records until EAGAIN and dispatch
        each one (qemu-kvm ``sigfd_handler``).  Returns how many were read.

        Runs with the global lock held when called from the main loop.  Also
        safe to call directly to collect what is pending.
        """
        n = 0
        tracer = self.tracer
        while True:
            try:
                buf = os.read(self.read_fd, SIGNALFD_SIGINFO_SIZE * _READ_BATCH)
            except BlockingIOError:
                break
            if not buf:
                break
            if len(buf) % SIGNALFD_SIGINFO_SIZE:
                raise OSError(errno.EIO, f"short signal record ({len(buf)} bytes)")
            for off in range(0, len(buf), SIGNALFD_SIGINFO_SIZE):
                info = SigInfo.from_record(buf[off:off + SIGNALFD_SIGINFO_SIZE], self.path)
                n += 1
                if tracer.enabled:
                    tracer.instant("signal received", signo=info.signo, path=self.path,
                                   sender=info.pid)
                self._dispatch(info)
        return n

    def _dispatch(self, info: SigInfo) -> None:
        self.received[info.signo] = self.received.get(info.signo, 0) + 1
        fn = self.handlers.get(info.signo)
        if fn is None:
            self.unhandled += 1
            return
        fn(info)

    def _async_handler(self, signo: int, frame: object) -> None:
        lock_held = self._lock.held_by_me() if self._lock is not None else None
        if self.tracer.enabled:
            self.tracer.instant("signal received", signo=signo, path="async",
                                lock_held=lock_held)
        self.last_async_context = (threading.current_thread().name, lock_held)
        self._dispatch(SigInfo(signo, path="async"))

    last_async_context: tuple[str, bool | None] = ("", None)

    # -- shutting down -------------------------------------------------------

    def close(self) -> None:
        """Detach from the loop, stop the signal thread, close the fds."""
        if self._loop is not None and self.path != "async":
            self._loop.set_fd_handler(self.read_fd, None, None)
        self.detach_wakeup_fd()
        if self.thread is not None and self.thread.is_alive():
            self._closing = True
            # Wake the thread out of sigwaitinfo with one of its own signals,
            # aimed at it alone; it sees _closing and returns without writing.
            signal.pthread_kill(self.thread.ident or 0, self.signals[0])  # alive: ident is set
            self.thread.join(timeout=5)
        for fd in (self.read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self.read_fd = self._write_fd = -1
        if self.path == "async" and self.handlers:
            # Block again before restoring the default action, so a late
            # signal stays pending instead of killing the process.
            signal.pthread_sigmask(signal.SIG_BLOCK, set(self.handlers))
            for signo in self.handlers:
                signal.signal(signo, signal.SIG_DFL)

    def __enter__(self) -> "SignalSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
