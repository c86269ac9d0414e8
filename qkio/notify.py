"""The event notifier: how any thread wakes the io thread.

The io thread spends its idle time asleep in ``select()``, and ``select()``
wakes only for an fd.  So when another thread changes something the io thread
must act on -- schedules a bottom half, adds an fd handler, asks for shutdown
-- a plain variable is not enough: nobody would look at it until ``select()``
times out (a second, in qemu-kvm).  qemu-kvm's answer, which this module
copies, is a doorbell fd:

* ``kvm_main_loop`` calls ``qemu_eventfd(fds)``.  With ``CONFIG_EVENTFD`` that
  is *one* eventfd returned twice, the second time as a ``dup()``; without it, a
  pipe.  Both fds are made non-blocking.
* The read end is registered as an fd handler whose callback,
  ``io_thread_wakeup``, just reads until nothing is left.  It handles no
  request: its only job is to have made ``select()`` return, after which the
  loop looks at timers, bottom halves and flags as usual.
* The write end is the global ``io_thread_fd``.  ``qemu_kvm_notify_work``
  writes a 64-bit 1 to it; its one caller is ``qemu_notify_event``, which is
  called by whoever changed main-loop state -- very often a vCPU thread in the
  middle of device emulation.  That is the answer to the article's "who writes
  the event pipe" (S3); the trace records the writer's thread name so the book
  can show it happening.

What is written does not matter.  The doorbell carries no message: the request
itself is in memory protected by the global lock (``bh.scheduled``, a shutdown
flag, the handler list).  Hence two simplifications that look like bugs but
are not:

* **EAGAIN on write is ignored.**  A full pipe (or an eventfd counter at its
  maximum) means the reader has not drained yet, so the fd is *already*
  readable and ``select()`` is *already* going to return; one more byte could
  add nothing.  Blocking instead would be wrong: a vCPU thread holding the
  global lock would wait for the io thread, which needs that lock to drain --
  a deadlock.
* **Many notifications collapse into one wake-up.**  An eventfd adds the
  written values to a counter, a pipe queues bytes; either way one ``drain``
  consumes them all, and the loop handles all pending work in one pass.

An eventfd is one kernel object with an 8-byte counter instead of a pipe's
buffer pages; reads must be 8 bytes and return the whole count at once.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import threading

from qkio import trace

__all__ = ["EventNotifier"]

_ONE = (1).to_bytes(8, sys.byteorder)  # a native uint64_t, as eventfd(2) wants
_COUNTER = struct.Struct("=Q")          # what an eventfd read returns: the same


class EventNotifier:
    """A doorbell fd pair: ``notify()`` from any thread, ``drain()`` in the io thread.

    ``kind="eventfd"`` (qemu-kvm with CONFIG_EVENTFD): ``read_fd`` is an
    eventfd and ``write_fd`` a ``dup()`` of it.  ``kind="pipe"``: a pipe.
    """

    # Slots: drain() runs on every wake-up of the io thread (see MainLoop's).
    __slots__ = ("kind", "tracer", "read_fd", "write_fd", "_bell", "closed")

    def __init__(self, kind: str = "eventfd", tracer: trace.Tracer | None = None) -> None:
        if kind not in ("eventfd", "pipe"):
            raise ValueError(f"EventNotifier kind must be 'eventfd' or 'pipe', not {kind!r}")
        self.kind = kind
        self.tracer = tracer if tracer is not None else trace.default
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            # The dup shares the open file description, so O_NONBLOCK (a
            # file *status* flag) carries over; close-on-exec is per-fd and
            # os.dup sets it by default.
            self.read_fd, self.write_fd = fd, os.dup(fd)
        else:
            self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._bell = _ONE if kind == "eventfd" else b"\x01"  # what notify() writes
        self.closed = False

    def fileno(self) -> int:
        return self.read_fd

    def notify(self, reason: str = "") -> None:
        """Ring the doorbell (``qemu_kvm_notify_work``).  Safe from any thread,
        with or without the global lock; never blocks."""
        tracer = self.tracer
        if tracer.enabled:
            tracer.instant("notify sent", by=threading.current_thread().name,
                           fd=self.write_fd, reason=reason)
        try:
            os.write(self.write_fd, self._bell)  # PEP 475: EINTR is retried for us
        except BlockingIOError:
            pass  # already readable: see the module comment

    def drain(self, opaque: object = None) -> int:
        """Empty the doorbell (``io_thread_wakeup``); returns how many
        notifications were consumed.  Used as the read handler, hence ``opaque``.

        qemu-kvm 0.12.3's ``io_thread_wakeup`` reads 4096 bytes at a time
        until a read fails with EAGAIN.  This stops one read earlier: an
        eventfd's one read returns its whole counter and zeroes it, and a
        pipe read that returns less than asked for found the pipe emptied.
        The read 0.12 adds could only fail -- in Python, an exception raised
        and caught on every wake-up of the io thread.  A notification that
        arrives after our last read leaves the fd readable, so the next
        ``select()`` returns at once and it is drained then: none is lost.
        """
        count = 0
        try:
            if self.kind == "eventfd":
                count = _COUNTER.unpack(os.read(self.read_fd, 8))[0]
            else:
                while True:
                    n = len(os.read(self.read_fd, 4096))
                    count += n
                    if n < 4096:  # emptied (or, if 0, the write end is closed)
                        break
        except BlockingIOError:
            pass  # nothing (more) to read: an earlier pass took it
        except OSError as e:
            if e.errno != errno.EBADF or not self.closed:
                raise
        if self.tracer.enabled:
            self.tracer.instant("notify drained", count=count)
        return count

    # The names this doorbell has in qemu-kvm 0.12, so that grep finds them
    # here.  qemu-kvm.c's qemu_kvm_notify_work writes kvm_main_loop's event fd
    # and io_thread_wakeup drains it.  vl.c's qemu_event_increment writes to a
    # second pipe of vl.c's own (qemu_event_init), which 0.12 created even
    # under KVM; qkio has one doorbell, so both writers are notify().
    qemu_kvm_notify_work = notify
    qemu_event_increment = notify
    io_thread_wakeup = drain

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        os.close(self.read_fd)
        os.close(self.write_fd)

    def __enter__(self) -> "EventNotifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
