"""The io thread's main loop: fd handlers, timers, bottom halves.

This is qemu-kvm 0.12's ``vl.c`` main loop, reduced to what qkio's devices use.
The io thread calls ``main_loop_wait`` over and over; one call

1. works out how long it may sleep: the caller's timeout, cut to the next
   timer's deadline, cut to zero if a bottom half is scheduled;
2. builds the read and write fd sets from the handler registry -- a reader
   enters only if it has no ``fd_read_poll`` or its ``fd_read_poll(opaque)``
   returns non-zero (that is flow control: a serial port whose FIFO is full
   says "not now" and its fd is simply not watched);
3. releases the global lock, blocks in ``select()``, takes the lock again;
4. calls the handler of every fd ``select()`` left set, then frees the records
   that were deleted;
5. runs the timers whose deadline has passed;
6. runs the scheduled bottom halves.

Things worth knowing about it
-----------------------------

**Deleted records are freed after dispatch, not at once.**  In qemu, a handler
often removes itself (a char device whose peer hung up).  The dispatch loop is
walking the very list being changed, so ``qemu_set_fd_handler2`` with both
callbacks NULL only sets ``deleted = 1``; the walk skips deleted records and
frees them when it passes them.  qkio keeps that rule: removing a handler
never disturbs a dispatch in progress, and a removed handler is never called
again, even if its fd was already in this round's ready set.

**Changing the registry wakes the loop.**  ``qemu_set_fd_handler2`` ends with
``qemu_notify_event()``, because the io thread may be asleep in ``select()``
with an fd set built before the change -- a new fd would not be watched until
the timeout.  Same here, through the ``EventNotifier``.

**Timers: two clocks.**  In qemu-kvm 0.12 timers were driven by an alarm
signal: ``main_loop_wait(1000)`` never shortened its timeout for a timer, and
a POSIX timer raising SIGALRM came back to the io thread through the signal
pipe, where ``host_alarm_handler`` rang the doorbell.  ``init_timer_alarm``
gives a loop that clock (:mod:`qkio.alarm_timer`, ``--clock alarm``).  By
default (``--clock deadline``) the loop folds the next deadline into the
wait's timeout instead, as modern QEMU does; then ``mod_timer`` from another
thread rings the doorbell so the sleeping io thread recomputes its timeout.

**Bottom halves** are callbacks that the io thread runs at the end of an
iteration.  ``schedule()`` may be called from any thread (it sets a flag and
notifies, once: scheduling a bottom half that is already scheduled does
nothing, as in 0.12); that is the standard way for a vCPU thread to hand work to the io
thread.  Like ``qemu_bh_new``, new bottom halves go to the *front* of the
list, so several scheduled at once run newest first.

**Backends.**  ``select`` is what qemu-kvm used and what the article describes
(S5): sets are rebuilt every time and the kernel clears the bits of fds that
are not ready.  It cannot watch fds >= FD_SETSIZE (1024).  ``poll`` takes an
array instead and has no such limit.  ``epoll`` keeps the interest set in the
kernel; since the sets here change every iteration (flow control), the epoll
backend diffs them against what it last registered.  All three give
``main_loop_wait`` the same answer: which watched fds are ready.

**Never spin.**  Every wait blocks in the kernel; a zero timeout happens only
when there is work to do right now (a scheduled bottom half).
"""

from __future__ import annotations

import _signal as signal  # signal's C half: the same calls, plain ints, no enums built at import
import errno
import itertools
import select
import threading
import time
from collections.abc import Callable
from threading import get_ident

from qkio import trace
from qkio.bql import GlobalMutex
from qkio.notify import EventNotifier

__all__ = ["IOHandlerRecord", "QEMUTimer", "QEMUBH", "MainLoop", "BACKENDS", "make_backend"]

# Names for annotations only: ``typing`` is not imported at run time, since
# ``qkio run`` would pay for it at start-up (see qkio.record), and with
# ``from __future__ import annotations`` no annotation is ever evaluated.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from qkio.alarm_timer import DynticksAlarm  # imported by init_timer_alarm, for --clock alarm only
    IOHandler = Callable[[Any], Any]
    IOCanReadHandler = Callable[[Any], int]


class IOHandlerRecord:
    """One fd's entry in the handler registry (vl.c ``IOHandlerRecord``).

    A class with slots (the loop reads these fields on every pass), not a
    dataclass (start-up time: see :mod:`qkio.record`)."""

    __slots__ = ("fd", "fd_read_poll", "fd_read", "fd_write", "opaque", "deleted")

    def __init__(self, fd: int, fd_read_poll: IOCanReadHandler | None, fd_read: IOHandler | None,
                 fd_write: IOHandler | None, opaque: Any, deleted: bool = False) -> None:
        self.fd = fd
        self.fd_read_poll = fd_read_poll
        self.fd_read = fd_read
        self.fd_write = fd_write
        self.opaque = opaque
        self.deleted = deleted

    def __repr__(self) -> str:
        return ("IOHandlerRecord(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
                + ")")


# --- wait backends -----------------------------------------------------------


# Every backend's ``wait(rfds, wfds, xfds, timeout_s)`` has select()'s
# signature and returns its three collections of ready fds, so that the
# select backend's wait can be select() itself: no Python frame between the
# woken io thread and its dispatch (``qkio bench wakeup`` measures that path).
# select() hands back lists of the ready fds: few, so ``in`` on them is as
# quick as on a set.


class _SelectBackend:
    name = "select"
    wait = staticmethod(select.select)

    def close(self) -> None:
        pass


# An fd that has hung up or has an error is "readable" for select(): a read
# returns 0 or the error.  poll and epoll report those as separate bits, which
# we fold back into "readable" (and "writable") so that handlers see the same
# thing under every backend.
_POLL_R = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_POLL_W = select.POLLOUT | select.POLLERR


class _PollBackend:
    name = "poll"

    def wait(self, rfds: list[int], wfds: list[int], xfds: object, timeout_s: float | None):
        p = select.poll()
        masks: dict[int, int] = {}
        for fd in rfds:
            masks[fd] = masks.get(fd, 0) | select.POLLIN | select.POLLPRI
        for fd in wfds:
            masks[fd] = masks.get(fd, 0) | select.POLLOUT
        for fd, m in masks.items():
            p.register(fd, m)
        ms = None if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
        r: set[int] = set()
        w: set[int] = set()
        for fd, ev in p.poll(ms):
            if ev & select.POLLNVAL:
                raise OSError(errno.EBADF, f"poll: fd {fd} is not open")
            if ev & _POLL_R and masks[fd] & select.POLLIN:
                r.add(fd)
            if ev & _POLL_W and masks[fd] & select.POLLOUT:
                w.add(fd)
        return r, w, ()

    def close(self) -> None:
        pass


class _EpollBackend:
    """epoll with the interest set kept in sync by diffing.

    The trap with epoll (Trio's ``_io_epoll.py`` explains it at length) is that
    the kernel registers the *open file description*, not the fd number.
    Closing an fd removes it from the epoll set only when no other fd refers
    to the same description; a closed-and-reused fd number may therefore be
    unknown to epoll (ENOENT on modify) or already known (EEXIST on add).
    Both are handled by falling back to the other call.

    The same trap defeats the shortcut "the lists are the ones of last time,
    so nothing changed": a handler removed, its fd closed and reopened under
    the same number, and a handler set again, all between two waits, hands
    over identical lists while epoll has silently dropped the old file.  So
    the loop calls :meth:`handlers_changed` whenever the registry changes,
    and the next wait re-declares every fd (one ``epoll_ctl`` each) instead of
    trusting its record.

    Regular files and /dev/null cannot be watched at all: ``epoll_ctl``
    refuses them with EPERM, since they are always ready.  select and poll
    say exactly that for them, so this backend does too: such an fd is kept
    aside, reported ready on every wait, and the wait does not block while
    one is wanted.
    """

    name = "epoll"

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._registered: dict[int, int] = {}
        self._always: dict[int, int] = {}   # fd -> mask, for fds epoll refuses (EPERM)
        self._last: tuple[list[int], list[int]] | None = None
        self._want: dict[int, int] = {}
        self._verify = False

    def handlers_changed(self) -> None:
        """The registry changed: distrust what was registered (see the class comment)."""
        self._verify = True

    def wait(self, rfds: list[int], wfds: list[int], xfds: object, timeout_s: float | None):
        # main_loop_wait hands over fresh lists every time, and they are
        # nearly always the ones of the time before: comparing two lists is
        # much cheaper than diffing the interest set fd by fd.
        if self._verify or (rfds, wfds) != self._last:
            verify, self._verify = self._verify, False
            self._want = self._sync(rfds, wfds, verify)
            self._last = (rfds, wfds)
        want = self._want
        r: set[int] = set()
        w: set[int] = set()
        if self._always:
            timeout_s = 0
            for fd, mask in self._always.items():
                if mask & select.EPOLLIN:
                    r.add(fd)
                if mask & select.EPOLLOUT:
                    w.add(fd)
        for fd, ev in self._ep.poll(-1 if timeout_s is None else timeout_s):
            mask = want.get(fd, 0)
            if ev & (select.EPOLLIN | select.EPOLLPRI | select.EPOLLHUP | select.EPOLLERR) \
                    and mask & select.EPOLLIN:
                r.add(fd)
            if ev & (select.EPOLLOUT | select.EPOLLERR) and mask & select.EPOLLOUT:
                w.add(fd)
        return r, w, ()

    def _sync(self, rfds: list[int], wfds: list[int], verify: bool = False) -> dict[int, int]:
        """Make the kernel's interest set match ``rfds``/``wfds``; return fd -> event mask."""
        want: dict[int, int] = {}
        for fd in rfds:
            want[fd] = want.get(fd, 0) | select.EPOLLIN | select.EPOLLPRI
        for fd in wfds:
            want[fd] = want.get(fd, 0) | select.EPOLLOUT
        for fd in list(self._registered):
            if fd not in want:
                try:
                    self._ep.unregister(fd)
                except OSError:
                    pass  # closed already (EBADF) or gone from the set (ENOENT)
                del self._registered[fd]
        self._always = {}
        for fd, mask in want.items():
            old = self._registered.get(fd)
            if old == mask and not verify:
                continue
            try:
                if old is None:
                    try:
                        self._ep.register(fd, mask)
                    except FileExistsError:
                        self._ep.modify(fd, mask)
                else:
                    try:
                        self._ep.modify(fd, mask)
                    except FileNotFoundError:
                        self._ep.register(fd, mask)
            except PermissionError:  # EPERM: a regular file or /dev/null, always ready
                self._registered.pop(fd, None)
                self._always[fd] = mask
                continue
            self._registered[fd] = mask
        return want

    def close(self) -> None:
        self._ep.close()


BACKENDS = {"select": _SelectBackend, "poll": _PollBackend, "epoll": _EpollBackend}


def make_backend(name: str):
    """The wait backend called ``name``: ``select``, ``poll`` or ``epoll``."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown main loop backend {name!r}; "
                         f"choose one of {', '.join(BACKENDS)}") from None


# --- timers and bottom halves ------------------------------------------------


class QEMUTimer:
    """A one-shot timer on CLOCK_MONOTONIC (``QEMUTimer`` on the host clock).

    Made by ``MainLoop.timer_new``; armed with ``mod_timer(deadline_ns)``
    (absolute, from ``time.monotonic_ns()``), disarmed with ``del_timer``.
    The callback runs in the io thread with the global lock held.
    """

    def __init__(self, loop: "MainLoop", cb: Callable[[Any], Any], opaque: Any) -> None:
        self._loop = loop
        self.cb = cb
        self.opaque = opaque
        self.expire_ns: int | None = None
        self._gen = 0  # bumped on every mod/del; stale heap entries are skipped

    def mod_timer(self, deadline_ns: int) -> None:
        """``qemu_mod_timer``: (re)arm for ``deadline_ns``.  Any thread."""
        self._loop._mod_timer(self, deadline_ns)

    def del_timer(self) -> None:
        """``qemu_del_timer``: disarm."""
        self._loop._del_timer(self)

    def pending(self) -> bool:
        """``qemu_timer_pending``."""
        return self.expire_ns is not None

    # vl.c's names, for grep
    qemu_mod_timer = mod_timer
    qemu_del_timer = del_timer
    qemu_timer_pending = pending


class QEMUBH:
    """A bottom half: a callback the io thread runs at the end of an iteration."""

    def __init__(self, loop: "MainLoop", cb: Callable[[Any], Any], opaque: Any) -> None:
        self._loop = loop
        self.cb = cb
        self.opaque = opaque
        self.scheduled = False
        self.idle = False
        self.deleted = False

    def schedule(self) -> None:
        """Run soon (``qemu_bh_schedule``).  Any thread may call it.

        As in qemu-kvm 0.12.3 (async.c), a bottom half that is already
        scheduled is left alone: no second doorbell, since the first one has
        already made (or will make) the io thread look at its bottom halves.
        So a hundred calls before the io thread runs it ring once.  0.12 also
        returns early for one scheduled *idle*, leaving it idle; so does this.

        Why no lock is needed: the io thread clears ``scheduled`` *before* it
        calls ``cb``, so a call that sees True and returns is served by a run
        that has not started yet.  Two threads that both see False both ring,
        which only costs a spare doorbell.
        """
        if self.scheduled:
            return
        self.idle = False
        self.scheduled = True
        self._loop.notify_event("bh")

    def schedule_idle(self) -> None:
        """Run within about 10 ms, without waking the io thread (``qemu_bh_schedule_idle``)."""
        if self.scheduled:
            return
        self.idle = True
        self.scheduled = True

    def cancel(self) -> None:
        self.scheduled = False

    def delete(self) -> None:
        self.scheduled = False
        self.deleted = True


# --- the loop ----------------------------------------------------------------


class MainLoop:
    """The io thread's state: handler registry, timers, BHs, notifier, lock, backend.

    The notifier's read end is registered at once with its ``drain`` as read
    handler (qemu-kvm's ``io_thread_wakeup``).

    :param backend: how ``main_loop_wait`` waits: ``"select"``, ``"poll"`` or ``"epoll"``.
    :param notifier: the doorbell other threads ring, ``"eventfd"`` or ``"pipe"``
        (qemu-kvm's event pipe), or an :class:`~qkio.notify.EventNotifier` to share.
    :param lock: the global mutex (default: a new
        :class:`~qkio.bql.GlobalMutex`); a machine passes the one its vCPU
        threads share.
    :param tracer: a :class:`qkio.trace.Tracer` (default: the process's).
    """

    # Slots, not a __dict__: a woken io thread reads several of these before
    # it is done, each a fixed offset in the object instead of a lookup in a
    # dict that has gone cold while it slept (qkio bench wakeup measures it).
    __slots__ = ("tracer", "lock", "backend", "notifier", "_handlers", "_timers", "_seq", "_bhs",
                 "_deleted_records", "_exit_requested", "io_thread", "alarm_timer", "iterations",
                 "_doorbell_only")

    def __init__(self, backend: str = "select", notifier: str | EventNotifier = "eventfd",
                 lock: GlobalMutex | None = None, tracer: trace.Tracer | None = None) -> None:
        self.tracer = tracer if tracer is not None else trace.default
        self.lock = lock if lock is not None else GlobalMutex(tracer=self.tracer)
        self.backend = make_backend(backend)
        self.notifier = (notifier if isinstance(notifier, EventNotifier)
                         else EventNotifier(notifier, tracer=self.tracer))
        self._handlers: list[IOHandlerRecord] = []
        self._timers: list[tuple[int, int, int, QEMUTimer]] = []  # (expire, seq, gen, timer)
        self._seq = itertools.count()
        self._bhs: list[QEMUBH] = []
        self._deleted_records = False  # some record in _handlers is marked deleted
        self._exit_requested = False
        self.io_thread: int | None = None  # threading.get_ident() of the last waiter
        self.alarm_timer: DynticksAlarm | None = None  # set by init_timer_alarm (--clock alarm)
        self.iterations = 0
        self._doorbell_only: list[int] | None = [self.notifier.read_fd]  # see main_loop_wait
        # Registered directly: nobody can be waiting yet, so no doorbell.
        self._handlers.append(IOHandlerRecord(self.notifier.read_fd, None,
                                              self.notifier.drain, None, None))

    # -- the handler registry -----------------------------------------------

    def set_fd_handler2(self, fd: int, fd_read_poll: IOCanReadHandler | None,
                        fd_read: IOHandler | None, fd_write: IOHandler | None,
                        opaque: Any = None) -> int:
        """``qemu_set_fd_handler2``: set or remove fd's handlers.

        Both ``fd_read`` and ``fd_write`` None marks the record deleted (freed
        after the current dispatch).  Callers hold the global lock, as in qemu.
        Always wakes the io thread.  Returns 0.
        """
        if fd == self.notifier.read_fd:
            self._doorbell_only = None  # the doorbell's handler is no longer only drain()
        if fd_read is None and fd_write is None:
            for rec in self._handlers:
                if rec.fd == fd:
                    rec.deleted = True
                    self._deleted_records = True  # main_loop_wait frees it after dispatch
                    break
        else:
            for rec in self._handlers:
                if rec.fd == fd:
                    break
            else:
                rec = IOHandlerRecord(fd, None, None, None, None)
                # A new list, not an insert: main_loop_wait may be iterating
                # the old one (this can be called from a handler), and
                # replacing the list spares every pass a defensive copy.
                self._handlers = [rec, *self._handlers]
            rec.fd_read_poll = fd_read_poll
            rec.fd_read = fd_read
            rec.fd_write = fd_write
            rec.opaque = opaque
            rec.deleted = False
        changed = getattr(self.backend, "handlers_changed", None)
        if changed is not None:
            changed()
        self.notify_event("fd handlers changed")
        return 0

    def set_fd_handler(self, fd: int, fd_read: IOHandler | None,
                       fd_write: IOHandler | None, opaque: Any = None) -> int:
        """``qemu_set_fd_handler``: ``set_fd_handler2`` without a can-read poll."""
        return self.set_fd_handler2(fd, None, fd_read, fd_write, opaque)

    def handlers(self) -> list[IOHandlerRecord]:
        """The registry as it stands (deleted-but-not-yet-freed records included)."""
        return list(self._handlers)

    # -- timers and bottom halves -------------------------------------------

    def timer_new(self, cb: Callable[[Any], Any], opaque: Any = None) -> QEMUTimer:
        return QEMUTimer(self, cb, opaque)

    @property
    def clock(self) -> str:
        """``"alarm"`` after :meth:`init_timer_alarm`, else ``"deadline"``."""
        return "deadline" if self.alarm_timer is None else "alarm"

    def init_timer_alarm(self, source) -> DynticksAlarm:
        """Drive the timers by alarm signal, as 0.12 did (``init_timer_alarm``).

        ``source`` is the :class:`~qkio.signals.SignalSource` that takes
        SIGALRM (attached to this loop, or ``"async"``).  From now on the wait's
        timeout ignores the timers; a POSIX timer's SIGALRM, handled by
        ``host_alarm_handler``, wakes the loop instead.
        """
        if self.alarm_timer is not None:
            raise RuntimeError("this loop already has an alarm timer")
        if signal.SIGALRM not in source.signals:
            raise ValueError("the alarm clock needs a signal source that takes SIGALRM")
        from qkio.alarm_timer import DynticksAlarm  # here: a run with --clock deadline never loads it
        alarm = DynticksAlarm(self)
        alarm.start(source)
        self.alarm_timer = alarm
        alarm.qemu_rearm_alarm_timer()
        return alarm

    def _mod_timer(self, t: QEMUTimer, deadline_ns: int) -> None:
        t._gen += 1
        t.expire_ns = deadline_ns
        import heapq  # here and below, not at the top: a run that arms no timer never loads it
        heapq.heappush(self._timers, (deadline_ns, next(self._seq), t._gen, t))
        if self.alarm_timer is not None:
            # qemu_mod_timer: re-arm the alarm if this timer is now the first;
            # no doorbell -- the alarm's signal is what wakes the loop.
            if self._next_deadline() == deadline_ns:
                self.alarm_timer.timer_modified()
            return
        if threading.get_ident() != self.io_thread and self._next_deadline() == deadline_ns:
            # The io thread may be asleep with a longer timeout.
            self.notify_event("timer")

    def _del_timer(self, t: QEMUTimer) -> None:
        t._gen += 1
        t.expire_ns = None

    def _next_deadline(self) -> int | None:
        timers = self._timers
        while timers and timers[0][2] != timers[0][3]._gen:
            import heapq  # loaded by _mod_timer, which put the timer there
            heapq.heappop(timers)  # stale: re-armed or deleted since pushed
        return timers[0][0] if timers else None

    def qemu_next_deadline(self) -> int | None:
        """ns until the first armed timer is due (0 if it is overdue), or None
        when no timer is armed (vl.c ``qemu_next_deadline``, which capped the
        answer at INT32_MAX instead)."""
        deadline = self._next_deadline()
        return None if deadline is None else max(0, deadline - time.monotonic_ns())

    def qemu_run_timers(self, current_ns: int | None = None) -> int:
        """Run every timer due at ``current_ns`` (default: now), each taken off
        the list before its callback runs (vl.c ``qemu_run_timers``), so a
        callback may re-arm its own timer.  Returns how many ran."""
        now = time.monotonic_ns() if current_ns is None else current_ns
        ran = 0
        while True:
            deadline = self._next_deadline()
            if deadline is None or deadline > now:
                return ran
            import heapq  # loaded by _mod_timer
            _, _, _, t = heapq.heappop(self._timers)
            t.expire_ns = None
            t._gen += 1
            self._call("timer", t.cb, t.opaque, late_us=(now - deadline) / 1000)
            ran += 1

    def bh_new(self, cb: Callable[[Any], Any], opaque: Any = None) -> QEMUBH:
        bh = QEMUBH(self, cb, opaque)
        self._bhs.insert(0, bh)
        return bh

    # -- waking -----------------------------------------------------------

    def notify_event(self, reason: str = "") -> None:
        """``qemu_notify_event``: make the io thread's wait return.  Any thread."""
        self.notifier.notify(reason)

    qemu_notify_event = notify_event  # vl.c's name, for grep

    def request_exit(self) -> None:
        """Make ``run()`` return after the current iteration.  Any thread."""
        self._exit_requested = True
        self.notify_event("exit")

    # -- one iteration ------------------------------------------------------

    def main_loop_wait(self, timeout_ms: int) -> int:
        """One iteration; returns the number of fd handlers called.

        Called by the io thread with the global lock held, as in qemu-kvm.  A
        caller that does not hold it (a test, a notebook cell) gets it taken
        for the duration of the call.

        Written for a pass with nothing to do but the doorbell: everything
        not needed then is skipped by one test (no bottom half, no timer, no
        deleted record), and with tracing off a handler is called directly.
        Such a pass is what every wake-up of the io thread costs, so each
        step it takes is Python time between the kernel waking the thread
        and the thread being done (``qkio bench wakeup`` measures it against
        the same loop in C).
        """
        lock = self.lock
        me = get_ident()
        if lock.owner != me:
            with lock:
                return self.main_loop_wait(timeout_ms)
        self.io_thread = me
        self.iterations += 1
        tracing = self.tracer.enabled

        # 1. how long may we sleep?
        timeout_ns = max(0, int(timeout_ms)) * 1_000_000
        for bh in self._bhs:
            if bh.scheduled and not bh.deleted:
                timeout_ns = min(timeout_ns, 10_000_000 if bh.idle else 0)
        if self._timers and self.alarm_timer is None:  # --clock deadline; 0.12 (alarm) never did this
            deadline = self._next_deadline()
            if deadline is not None:
                timeout_ns = min(timeout_ns, max(0, deadline - time.monotonic_ns()))

        # 2. the fd sets
        rfds: list[int] = []
        wfds: list[int] = []
        for rec in self._handlers:
            if rec.deleted:
                continue
            if rec.fd_read and (rec.fd_read_poll is None or rec.fd_read_poll(rec.opaque)):
                rfds.append(rec.fd)
            if rec.fd_write:
                wfds.append(rec.fd)

        # 3. sleep without the lock
        if tracing:
            self.tracer.begin("main_loop_wait", backend=self.backend.name, rfds=rfds,
                              wfds=wfds, timeout_ms=timeout_ns / 1e6)
        # lock.unlock(), inlined as the lock() below is: the holder check it
        # would make was made on entry, where this thread took the lock or had it
        lock.owner = None
        lock.raw_lock.release()
        try:
            ready_r, ready_w, _ = self.backend.wait(rfds, wfds, (), timeout_ns / 1e9)
        finally:
            # lock.lock(), inlined (GlobalMutex's documented raw_lock/owner
            # contract): this is the first thing a woken io thread does
            if not lock.raw_lock.acquire(False):
                lock.lock_contended()
            lock.owner = me
        if tracing:
            self.tracer.end("main_loop_wait", ready_r=sorted(ready_r), ready_w=sorted(ready_w),
                            timed_out=not (ready_r or ready_w))

        # 4. dispatch, then free what was deleted (possibly by the handlers)
        called = 0
        if ready_r == self._doorbell_only and not (ready_w or tracing):
            # Only the doorbell is ready: the pass every wake-up of the io
            # thread makes.  Its handler is the notifier's drain (qemu-kvm's
            # io_thread_wakeup) and nothing else can be called, so the list
            # is not walked (vl.c walks it every time).  What this saves was
            # measured (qkio bench wakeup): a woken thread's every lookup is
            # slow.  select() returns lists; poll's and epoll's sets never
            # compare equal here, and take the general path.
            self.notifier.drain()
            called = 1
        elif ready_r or ready_w:
            # No copy needed: handlers that add records replace the list
            # (set_fd_handler2), and removal only marks a record deleted.
            for rec in self._handlers:
                # ``fd in ready`` first: it is false for most records
                if rec.fd in ready_r and rec.fd_read and not rec.deleted:
                    if tracing:
                        self._call("fd_read", rec.fd_read, rec.opaque, fd=rec.fd)
                    else:
                        rec.fd_read(rec.opaque)
                    called += 1
                if ready_w and rec.fd in ready_w and rec.fd_write and not rec.deleted:
                    if tracing:
                        self._call("fd_write", rec.fd_write, rec.opaque, fd=rec.fd)
                    else:
                        rec.fd_write(rec.opaque)
                    called += 1
        if self._deleted_records:
            self._deleted_records = False
            self._handlers = [rec for rec in self._handlers if not rec.deleted]

        # 5. timers (with the alarm clock, first "rearm timer, if not periodic")
        if self.alarm_timer is not None:
            self.alarm_timer.after_wait()
        if self._timers:
            self.qemu_run_timers()

        # 6. bottom halves
        if self._bhs:
            for bh in self._bhs[:]:
                if bh.scheduled and not bh.deleted:
                    bh.scheduled = False
                    self._call("bh", bh.cb, bh.opaque)
            if any(bh.deleted for bh in self._bhs):
                self._bhs = [bh for bh in self._bhs if not bh.deleted]
        return called

    def _call(self, kind: str, fn: Callable[[Any], Any], opaque: Any, **args: Any) -> None:
        if self.tracer.enabled:
            with self.tracer.span(f"{kind} {getattr(fn, '__qualname__', fn)!s}", **args):
                fn(opaque)
        else:
            fn(opaque)

    # -- running ------------------------------------------------------------

    def run_until(self, predicate: Callable[[], bool], timeout_ms: int = 1000,
                  deadline_s: float | None = None) -> bool:
        """Iterate until ``predicate()`` is true (checked with the lock held,
        before each wait).  Returns False if ``deadline_s`` seconds pass first."""
        end = None if deadline_s is None else time.monotonic() + deadline_s
        taken = not self.lock.held_by_me()
        if taken:
            self.lock.lock()
        try:
            while not predicate():
                wait_ms = timeout_ms
                if end is not None:
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    wait_ms = min(timeout_ms, int(left * 1000) + 1)
                self.main_loop_wait(wait_ms)
            return True
        finally:
            if taken:
                self.lock.unlock()

    def run(self, timeout_ms: int = 1000) -> None:
        """``kvm_main_loop``'s loop: iterate until ``request_exit()``."""
        self.run_until(lambda: self._exit_requested, timeout_ms)
        self._exit_requested = False

    def close(self) -> None:
        if self.alarm_timer is not None:
            self.alarm_timer.stop()
        self.backend.close()
        self.notifier.close()

    def __enter__(self) -> "MainLoop":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

