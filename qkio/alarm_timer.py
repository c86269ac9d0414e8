"""The alarm clock: qemu-kvm 0.12's dynticks timer, a POSIX timer that raises SIGALRM.

How 0.12 woke up for a timer
----------------------------
Under KVM, ``kvm_main_loop`` calls ``main_loop_wait(1000)`` over and over, and
``main_loop_wait`` (vl.c) shortens that second only for bottom halves
(``qemu_bh_update_timeout``): it never looks at the timer list before
``select()``.  A QEMUTimer due in 3 ms is served because something *else*
makes ``select()`` return in time -- the alarm timer:

* ``init_timer_alarm`` starts the first alarm timer that works, "dynticks" on
  Linux: ``dynticks_start_timer`` makes a POSIX timer with ``timer_create``
  and ``SIGEV_SIGNAL``/``SIGALRM`` (the "hpet" and "rtc" alternatives raise
  SIGIO instead, through ``enable_sigio_timer``).
* ``dynticks_rearm_timer`` arms it one-shot for the nearest deadline
  (``qemu_next_deadline_dyntick``, never less than ``MIN_TIMER_REARM_US``,
  250 µs), unless ``timer_gettime`` shows it already armed to fire sooner.
  ``qemu_mod_timer`` calls it when the timer it changed became the first of
  its list and the alarm is not marked expired.
* The SIGALRM is process-directed.  Every thread blocks it, so it stays
  pending until the io thread's signal fd (``qemu_signalfd``, with SIGIO,
  SIGALRM and SIGBUS) makes ``select()`` return; ``sigfd_handler`` then calls
  the handler installed for it, ``host_alarm_handler``, *in the io thread*.
* ``host_alarm_handler`` rings the event pipes (``qemu_event_increment`` and
  ``qemu_notify_event``) and sets ``ALARM_FLAG_EXPIRED``.  Back in
  ``main_loop_wait``, after the fd handlers, an expired alarm is re-armed and
  ``qemu_run_timers`` runs every timer whose time has come.

Two consequences are visible live (chapter 8): the doorbell rung by
``host_alarm_handler`` from the io thread itself is still unread when the
timers have run, so the *next* ``select()`` returns at once, an iteration
with nothing to do; and because the alarm is re-armed *before*
``qemu_run_timers`` removes the expired timer, the nearest deadline is then
in the past and the alarm is armed for 250 µs later -- a second SIGALRM after
each firing.

qkio's ``--clock alarm`` is that design, through whichever signal path
``--signals`` chose; ``--clock deadline`` is modern QEMU's, where the wait's
own timeout is the next deadline (:mod:`qkio.main_loop`).

The POSIX timer here counts CLOCK_MONOTONIC, the clock qkio's timers use;
0.12 made it on CLOCK_REALTIME.  Both are armed with relative times, so the
two differ only when the wall clock is stepped while the alarm is armed.
"""

from __future__ import annotations

import _signal as signal  # signal's C half: the same calls, plain ints, no enums built at import
import ctypes
import os

from qkio.libc import libc as _libc

__all__ = ["MIN_TIMER_REARM_US", "ALARM_FLAG_DYNTICKS", "ALARM_FLAG_EXPIRED",
           "DynticksAlarm", "CLOCKS"]

#: The two clocks ``qkio run --clock`` offers.
CLOCKS = ("deadline", "alarm")

MIN_TIMER_REARM_US = 250        # vl.c: the alarm is never armed closer than this
ALARM_FLAG_DYNTICKS = 0x1
ALARM_FLAG_EXPIRED = 0x2

CLOCK_MONOTONIC = 1
SIGEV_SIGNAL = 0


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


class _sigevent(ctypes.Structure):
    # glibc's struct sigevent on Linux: sigval, signo, notify, then a union
    # padding the whole to 64 bytes.
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("_pad", ctypes.c_int * 12)]


_timer_t = ctypes.c_void_p
_libc.timer_create.argtypes = [ctypes.c_int, ctypes.POINTER(_sigevent), ctypes.POINTER(_timer_t)]
_libc.timer_settime.argtypes = [_timer_t, ctypes.c_int, ctypes.POINTER(_itimerspec),
                                ctypes.POINTER(_itimerspec)]
_libc.timer_gettime.argtypes = [_timer_t, ctypes.POINTER(_itimerspec)]
_libc.timer_delete.argtypes = [_timer_t]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class DynticksAlarm:
    """The "dynticks" ``qemu_alarm_timer`` of one :class:`~qkio.main_loop.MainLoop`.

    Made by ``MainLoop.init_timer_alarm(source)``: ``start()`` creates the
    POSIX timer and registers :meth:`host_alarm_handler` for SIGALRM (and
    SIGIO, which 0.12 routed to the same handler) on the signal source.
    Counters for the book: ``signals`` (alarm signals handled), ``rearms``
    (``timer_settime`` calls), ``kept`` (re-arms skipped because the alarm was
    already due sooner).
    """

    name = "dynticks"

    def __init__(self, loop, signo: int = signal.SIGALRM) -> None:
        self.loop = loop
        self.signo = signo
        self.flags = ALARM_FLAG_DYNTICKS
        self.timer_alarm_pending = False
        self._timer = _timer_t()
        self._started = False
        self.signals = 0
        self.rearms = 0
        self.kept = 0

    def start(self, source) -> None:
        """``dynticks_start_timer``: the POSIX timer, and the handler on ``source``."""
        ev = _sigevent()
        ev.sigev_notify = SIGEV_SIGNAL
        ev.sigev_signo = self.signo
        _check(_libc.timer_create(CLOCK_MONOTONIC, ctypes.byref(ev), ctypes.byref(self._timer)),
               "timer_create")
        self._started = True
        for signo in (signal.SIGALRM, signal.SIGIO):
            if signo in source.signals:
                source.add_handler(signo, self.host_alarm_handler)

    def stop(self) -> None:
        """``dynticks_stop_timer``: delete the POSIX timer (idempotent)."""
        if self._started:
            self._started = False
            _libc.timer_delete(self._timer)

    # -- the handler (the io thread, or the main thread on the async path) ----

    def host_alarm_handler(self, info=None) -> None:
        """Mark the alarm expired and ring the doorbell, as 0.12's did under dynticks.

        Takes no lock and touches only flags and the notifier, so it is also
        safe where the async path runs it: in the main thread, between any
        two bytecodes.
        """
        self.signals += 1
        self.flags |= ALARM_FLAG_EXPIRED
        self.timer_alarm_pending = True
        tracer = self.loop.tracer
        if tracer.enabled:
            tracer.instant("host_alarm_handler", signo=getattr(info, "signo", self.signo))
        self.loop.notify_event("host_alarm_handler")

    # -- arming ---------------------------------------------------------------

    def expired(self) -> bool:
        return bool(self.flags & ALARM_FLAG_EXPIRED)

    def qemu_next_deadline_dyntick(self) -> int | None:
        """µs until the nearest deadline, rounded up, never under MIN_TIMER_REARM_US
        (an overdue timer gives 250); None when no timer is armed."""
        delta_ns = self.loop.qemu_next_deadline()
        if delta_ns is None:
            return None
        return max(MIN_TIMER_REARM_US, -(-delta_ns // 1000))

    def qemu_rearm_alarm_timer(self) -> None:
        """``dynticks_rearm_timer``: arm the POSIX timer for the nearest deadline."""
        if not self._started:
            return
        nearest_us = self.qemu_next_deadline_dyntick()
        if nearest_us is None:
            return  # no active timer: leave the alarm as it is
        cur = _itimerspec()
        _check(_libc.timer_gettime(self._timer, ctypes.byref(cur)), "timer_gettime")
        current_us = cur.it_value.tv_sec * 1_000_000 + cur.it_value.tv_nsec // 1000
        if current_us and current_us <= nearest_us:
            self.kept += 1
            return  # already due sooner
        new = _itimerspec()
        new.it_value.tv_sec, rem = divmod(nearest_us, 1_000_000)
        new.it_value.tv_nsec = rem * 1000
        _check(_libc.timer_settime(self._timer, 0, ctypes.byref(new), None), "timer_settime")
        self.rearms += 1
        tracer = self.loop.tracer
        if tracer.enabled:
            tracer.instant("dynticks_rearm_timer", in_us=nearest_us)

    def after_wait(self) -> None:
        """``main_loop_wait``'s "rearm timer, if not periodic", before the timers run."""
        if self.flags & ALARM_FLAG_EXPIRED:
            self.flags &= ~ALARM_FLAG_EXPIRED
            self.qemu_rearm_alarm_timer()

    def timer_modified(self) -> None:
        """``qemu_mod_timer``'s tail: the changed timer is now the first one."""
        if not self.flags & ALARM_FLAG_EXPIRED:
            self.qemu_rearm_alarm_timer()


def check_clock(clock: str) -> str:
    """``clock`` if it is one of :data:`CLOCKS`, else a one-line ValueError."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be {' or '.join(CLOCKS)}, not {clock!r}")
    return clock

