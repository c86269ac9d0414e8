"""An IOThread: a thread with an event loop of its own (QEMU's ``-object iothread``).

qemu-kvm 0.12 had one io thread, and every device ran in it or in a vCPU
thread, under ``qemu_mutex``.  QEMU 1.4 gave virtio-blk a thread of its own
("dataplane"), QEMU 2.0 made it a user-visible object (``-object
iothread,id=io0`` and ``iothread=io0`` on the device), and today each IOThread
runs an ``AioContext``: an event loop that the global lock has no part in.

This one is that idea at its smallest: an ``epoll`` set of eventfds, each with
a handler, waited on by one thread named ``IO <id>`` (QEMU's naming, so ``ps
-L`` reads the same).  It never takes the global lock -- which is only safe
because what its handlers touch (one virtqueue, guest RAM, the image fd, an
irqfd) is touched by no other thread while the device runs; see
:mod:`qkio.virtio.board`.  Handlers can be added and removed from any thread,
and :meth:`IOThread.run_sync` runs a function inside the loop and waits, which
is how the device is stopped safely on a reset.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Callable

from ..threads import gettid, start_thread


class IOThread:
    def __init__(self, ident: str = "io0", tracer=None):
        from .. import trace
        self.ident = ident
        self.name = f"IO {ident}"
        self.tracer = tracer if tracer is not None else trace.default
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._calls: list[tuple[Callable[[], object], threading.Event]] = []
        self._calls_lock = threading.Lock()   # guards _calls only; never the global lock
        self._stop = False
        self.tid: int | None = None
        self.error: BaseException | None = None
        self.cpu_time_ns: int | None = None  # this thread's CPU time, set when it ends
        self.thread = start_thread(self.name, self._run)

    def set_fd_handler(self, fd: int, handler: Callable[[int], None] | None) -> None:
        """Watch ``fd`` for reading and call ``handler(fd)`` in this thread (None: stop watching)."""
        if handler is None:
            if self._handlers.pop(fd, None) is not None:
                self._epoll.unregister(fd)
            return
        if fd in self._handlers:
            self._handlers[fd] = handler
        else:
            self._handlers[fd] = handler
            self._epoll.register(fd, select.EPOLLIN)

    def run_sync(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the IOThread between two handlers, and wait for it."""
        if threading.current_thread() is self.thread or not self.thread.is_alive():
            fn()
            return
        done = threading.Event()
        with self._calls_lock:
            self._calls.append((fn, done))
        os.eventfd_write(self._wake, 1)
        done.wait()

    def _run(self) -> None:
        self.tid = gettid()
        poll, handlers = self._epoll.poll, self._handlers
        try:
            while not self._stop:
                for fd, _ in poll():
                    if fd == self._wake:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                        self._run_calls()
                        continue
                    handler = handlers.get(fd)
                    if handler is not None:
                        handler(fd)
        except BaseException as e:  # a device bug: keep it for close() to report
            self.error = e
        finally:
            self._run_calls()
            self.cpu_time_ns = time.thread_time_ns()

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, done in calls:
            try:
                fn()
            finally:
                done.set()

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._stop = True
        os.eventfd_write(self._wake, 1)
        self.thread.join(5)
        self._epoll.close()
        os.close(self._wake)
