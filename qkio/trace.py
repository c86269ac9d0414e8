"""Trace events: what every thread did, and when.

The book has to *show* the threads of a VM at work -- the io thread asleep in
``select()``, a vCPU thread writing the event pipe, the signal thread handing a
signal on -- and the only honest way to show that is to record it while it
happens.  This module is that recorder.

Why it is shaped like this
--------------------------

* **A per-thread list, appended to without a lock.**  Recording must be cheap
  enough to leave on while measuring a signal's latency, and must never make
  two threads wait for each other (that would change the very interleaving we
  are trying to observe).  Each thread gets its own list, found through a
  ``threading.local``; ``list.append`` on a list only one thread writes to needs
  no lock.  A lock is taken once per thread, when its list is first created and
  put in the tracer's directory of lists, and when the trace is exported.

* **Monotonic nanoseconds.**  ``time.monotonic_ns()`` is CLOCK_MONOTONIC, the
  clock the main loop's timers use too, so a timer's deadline and the trace
  line saying it fired can be compared directly.  Exported timestamps are in
  microseconds because that is what the trace-event format wants.

* **Off by default, and then nearly free.**  The module-level ``default``
  tracer starts disabled; each recording method starts with one attribute test
  and returns.  Hot paths that would build arguments first can test
  ``tracer.enabled`` themselves.

* **Thread names come from the OS.**  ``qkio.threads.set_thread_name`` tells
  this module the name it gave a thread with ``prctl(PR_SET_NAME)``, so the
  trace shows the same names as ``ps -L`` (``qkio-io``, ``CPU 0/KVM``,
  ``qkio-sigwait``), not Python's ``Thread-3``.

Event names
-----------

So that a trace reads the same whoever wrote the code, qkio uses these names:

========================  ====  =============================================
name                      ph    recorded by / args
========================  ====  =============================================
``main_loop_wait``        B/E   io thread around its wait; B: backend, rfds,
                                wfds, timeout_ms; E: ready_r, ready_w,
                                timed_out
``fd_read <handler>``     B/E   dispatch of a read handler (also
                                ``fd_write``, ``timer``, ``bh``); args: fd
``notify sent``           i     any thread ringing the event notifier; by,
                                fd, reason
``notify drained``        i     io thread, ``io_thread_wakeup``; count
``sigwaitinfo returned``  i     the ``qkio-sigwait`` thread; signo, pid
``signal received``       i     whoever ran the handler; signo, path, sender
``lock waited for``       X     a thread whose lock() blocked; lock, holder
``KVM_RUN``               B/E   vCPU thread; E: exit_reason
``kick sent``             i     the kicker; target
``kick received``         i     the kicked vCPU thread
========================  ====  =============================================

The export format is the Chrome "Trace Event Format" (the JSON object form,
``{"traceEvents": [...]}``), which ui.perfetto.dev and chrome://tracing open
directly: ``ph`` is the phase (``B``/``E`` begin and end a slice on a thread,
``X`` is a complete slice with a ``dur``, ``i`` an instant, ``M`` metadata such
as ``thread_name``), ``ts`` and ``dur`` are microseconds, ``pid``/``tid`` place
the event on a track.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs start-up time (qkio.record); annotations are strings here
    from typing import Any

__all__ = ["Tracer", "default", "note_thread_name"]

# Names given to OS threads by qkio.threads.set_thread_name, by native tid.
# Written once per thread at start-up, read at export: a plain dict is enough.
_thread_names: dict[int, str] = {}


def note_thread_name(tid: int, name: str) -> None:
    """Remember that OS thread ``tid`` is called ``name`` (for ``M`` events)."""
    _thread_names[tid] = name


class _ThreadLog:
    """The events of one thread.  Only that thread appends to ``events``."""

    __slots__ = ("tid", "python_name", "events")

    def __init__(self) -> None:
        self.tid = threading.get_native_id()
        self.python_name = threading.current_thread().name
        # Each event is a tuple (ph, name, ts_ns, dur_ns, args): tuples are
        # cheaper to build than dicts, and are turned into dicts at export.
        self.events: list[tuple[str, str, int, int, dict[str, Any] | None]] = []

    @property
    def name(self) -> str:
        return _thread_names.get(self.tid, self.python_name)


class Tracer:
    """An in-memory recorder of trace events from any number of threads.

    ``Tracer(enabled=True)`` records; ``Tracer(enabled=False)`` (and the
    module-level ``default`` until someone calls ``default.enable()``) costs a
    method call and an attribute test per event.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._local = threading.local()
        self._logs: list[_ThreadLog] = []
        self._logs_lock = threading.Lock()
        self.pid = os.getpid()

    # -- switching -------------------------------------------------------

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def clear(self) -> None:
        """Forget every recorded event (threads keep their logs, emptied)."""
        with self._logs_lock:
            for log in self._logs:
                log.events.clear()

    # -- recording -------------------------------------------------------

    def _log(self) -> _ThreadLog:
        try:
            return self._local.log
        except AttributeError:
            log = _ThreadLog()
            self._local.log = log
            with self._logs_lock:
                self._logs.append(log)
            return log

    def instant(self, name: str, **args: Any) -> None:
        """Record that something happened now on this thread."""
        if not self.enabled:
            return
        self._log().events.append(("i", name, time.monotonic_ns(), 0, args or None))

    def begin(self, name: str, **args: Any) -> None:
        """Open a slice on this thread; close it with ``end`` on the same thread."""
        if not self.enabled:
            return
        self._log().events.append(("B", name, time.monotonic_ns(), 0, args or None))

    def end(self, name: str = "", **args: Any) -> None:
        """Close the innermost open slice of this thread; ``args`` are merged in."""
        if not self.enabled:
            return
        self._log().events.append(("E", name, time.monotonic_ns(), 0, args or None))

    def complete(self, name: str, start_ns: int, end_ns: int | None = None, **args: Any) -> None:
        """Record a slice that is already over (``X``), from monotonic timestamps.

        Useful when whether to record is only known afterwards -- the global
        lock records a wait only when it turned out to block.
        """
        if not self.enabled:
            return
        if end_ns is None:
            end_ns = time.monotonic_ns()
        self._log().events.append(("X", name, start_ns, end_ns - start_ns, args or None))

    @contextlib.contextmanager
    def span(self, name: str, **args: Any) -> Iterator[dict[str, Any]]:
        """``with tracer.span("select", fds=[3]) as out: ...`` records B and E.

        The yielded dict is passed as the ``E`` event's args, so a slice can be
        told how it ended (``out["ready"] = [3]``).
        """
        if not self.enabled:
            yield {}
            return
        self.begin(name, **args)
        out: dict[str, Any] = {}
        try:
            yield out
        finally:
            self.end(name, **out)

    # -- reading ---------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """All events so far, oldest first, as dicts with native timestamps.

        Keys: ``ph``, ``name``, ``ts_ns``, ``dur_ns``, ``tid``, ``thread``,
        ``args``.  This is the form tests and book cells use; ``to_chrome_json``
        is the form Perfetto uses.
        """
        with self._logs_lock:
            logs = list(self._logs)
        out = []
        for log in logs:
            name = log.name
            for ph, ev_name, ts, dur, args in list(log.events):
                out.append({"ph": ph, "name": ev_name, "ts_ns": ts, "dur_ns": dur,
                            "tid": log.tid, "thread": name, "args": args or {}})
        out.sort(key=lambda e: e["ts_ns"])  # type: ignore[arg-type,return-value]  # always an int
        return out

    def to_chrome_json(self) -> dict[str, Any]:
        """The trace in Chrome/Perfetto trace-event JSON (object form)."""
        with self._logs_lock:
            logs = list(self._logs)
        trace_events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0,
             "args": {"name": "qkio"}},
        ]
        for log in logs:
            trace_events.append({"ph": "M", "name": "thread_name", "pid": self.pid,
                                 "tid": log.tid, "args": {"name": log.name}})
        for log in logs:
            for ph, name, ts, dur, args in list(log.events):
                ev: dict[str, Any] = {"ph": ph, "name": name, "ts": ts / 1000.0,
                                      "pid": self.pid, "tid": log.tid}
                if ph == "X":
                    ev["dur"] = dur / 1000.0
                elif ph == "i":
                    ev["s"] = "t"  # scope: this thread's track
                if args:
                    ev["args"] = {k: _jsonable(v) for k, v in args.items()}
                trace_events.append(ev)
        return {"traceEvents": trace_events, "displayTimeUnit": "ns"}

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_chrome_json()`` to ``path``; open it in ui.perfetto.dev."""
        with open(path, "w", encoding="utf-8") as f:
            import json  # here: only a traced run pays for importing it
            json.dump(self.to_chrome_json(), f)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


#: The process-wide tracer every qkio object uses unless given another one.
#: Disabled (near-free) until ``default.enable()``.
default = Tracer(enabled=False)
