"""posix-aio-compat: a pool of worker threads doing blocking file I/O, reporting with SIGUSR2.

qemu-kvm 0.12's raw block driver did not block the io thread on ``read()``:
``paio_submit`` (posix-aio-compat.c) queued a request and returned, and a pool
of worker threads (``aio_thread``) took requests off the queue and did the
``preadv``/``pwritev`` themselves.  A worker that finished stored the result
in the request and then told the io thread with ``kill(getpid(), SIGUSR2)`` --
a *process-directed* signal.  ``paio_init`` had blocked SIGUSR2 and made a
second ``qemu_signalfd`` for it alone (the first, ``kvm_main_loop``'s, has
SIGIO, SIGALRM and SIGBUS), so the signal surfaced as one more readable fd in
``select()``; its read handler ``posix_aio_read`` consumed a record and ran
``posix_aio_process_queue``, which walked the list of submitted requests and
called the completion callback of every one that was no longer in progress.

This module is that pool, with the same names:

* :func:`paio_init` -- block SIGUSR2, open the signal fd (signalfd, or the
  compat signal thread when signalfd fails or ``method="thread"`` is asked
  for -- which is why compat mode has *two* signal threads), register its
  read handler with the main loop.
* :meth:`PosixAioState.paio_submit` -- queue a read, write or flush of a list
  of buffers at a file offset; spawn a worker if none is idle (at most
  ``max_threads``, 64 as in 0.12).  Returns the request (``qemu_paiocb``).
* the workers -- started with every signal blocked (``spawn_thread``
  blocks them in the creating thread around the creation, so there is no
  instant at which the new thread could take one), exit after ``idle_timeout``
  seconds without work (10 s in 0.12).
* :meth:`PosixAioState.posix_aio_process_queue` -- run in the io thread with
  the global lock held: the callback of each finished request, as
  ``cb(opaque, ret)`` with ``ret`` 0 when every byte was transferred, else a
  negative errno (``-EINVAL`` for a short transfer, as 0.12 reported it).

Why a signal can be "lost" here without losing a completion
-----------------------------------------------------------
SIGUSR2 is a standard signal: while it is pending, more ``kill``\\ s merge into
it.  Ten workers finishing at once may leave a single record in the signal
fd.  Nothing is lost, because the signal carries no data: the results are in
the requests, and ``posix_aio_process_queue`` looks at *all* of them.  The
signal is a doorbell, like the event notifier (the counters
``signals_taken`` and ``completed`` show the difference live).

The process-directed signal is also why the pool only works in a process
whose every thread blocks SIGUSR2 -- ``qkio run`` (which blocks it first
thing) or a child made for the purpose.  In a process with a thread that does
not block it (a Jupyter kernel's), SIGUSR2 would be delivered to that thread
with its default action, which terminates the process.  The first
``paio_submit`` checks the threads' masks in /proc and refuses, rather than
let that happen.

The "virtio" work (issue 14) uses this pool for its block device; its API is
:func:`paio_init`, :meth:`~PosixAioState.paio_submit`,
:meth:`~PosixAioState.paio_cancel`, :meth:`~PosixAioState.qemu_aio_flush` and
:meth:`~PosixAioState.close`.
"""

from __future__ import annotations

import _signal as signal  # signal's C half: the same calls, plain ints, no enums built at import
import errno
import os
import threading
import time
from collections import deque

from qkio import trace
from qkio.signals import SignalSource, threads_taking
from qkio.threads import start_thread

__all__ = ["QEMU_AIO_READ", "QEMU_AIO_WRITE", "QEMU_AIO_FLUSH", "AIO_SIGNAL",
           "QemuPaiocb", "PosixAioState", "paio_init"]

# aio_type values (block/raw-posix-aio.h names them the same way).
QEMU_AIO_READ = 0x0001
QEMU_AIO_WRITE = 0x0002
QEMU_AIO_FLUSH = 0x0008

#: The completion signal: ``acb->ev_signo = SIGUSR2`` in ``paio_submit``.
AIO_SIGNAL = signal.SIGUSR2

_TYPE_NAMES = {QEMU_AIO_READ: "read", QEMU_AIO_WRITE: "write", QEMU_AIO_FLUSH: "flush"}

class QemuPaiocb:
    """One request (``struct qemu_paiocb``).

    ``ret`` is ``-EINPROGRESS`` until a worker finishes it; then the number of
    bytes transferred or a negative errno (``-ECANCELED`` once cancelled).
    ``active`` is set when a worker has taken it off the queue.  A plain class
    with slots, not a dataclass: this module is on ``qkio run``'s start-up
    path (see :mod:`qkio.record`).
    """

    __slots__ = ("aio_fildes", "aio_iov", "aio_offset", "aio_type", "cb", "opaque",
                 "aio_nbytes", "ret", "active", "done", "submitted_ns", "finished_ns", "worker")

    def __init__(self, aio_fildes: int, aio_iov: list, aio_offset: int, aio_type: int,
                 cb, opaque, aio_nbytes: int = 0, submitted_ns: int = 0) -> None:
        self.aio_fildes = aio_fildes
        self.aio_iov = aio_iov
        self.aio_offset = aio_offset
        self.aio_type = aio_type
        self.cb = cb                    # cb(opaque, ret) in the io thread, or None
        self.opaque = opaque
        self.aio_nbytes = aio_nbytes
        self.ret = -errno.EINPROGRESS
        self.active = False
        self.done = False               # the callback has run (or the request was cancelled)
        self.submitted_ns = submitted_ns
        self.finished_ns = 0            # when the worker stored ret
        self.worker = ""

    def __repr__(self) -> str:
        return (f"QemuPaiocb({_TYPE_NAMES.get(self.aio_type, self.aio_type)} fd={self.aio_fildes} "
                f"offset={self.aio_offset} nbytes={self.aio_nbytes} ret={self.ret})")


def _aio_error(acb: QemuPaiocb) -> int:
    """``qemu_paio_error``: EINPROGRESS, ECANCELED, an errno, or 0 when finished."""
    return -acb.ret if acb.ret < 0 else 0


class PosixAioState:
    """The pool and its signal fd (``PosixAioState`` plus posix-aio-compat.c's globals).

    Made by :func:`paio_init`; callbacks run in the io thread with the
    global lock held.
    """

    def __init__(self, loop, *, method: str = "signalfd", max_threads: int = 64,
                 idle_timeout: float = 10.0, force_signalfd_failure: bool = False,
                 check_masks: bool = True, tracer: trace.Tracer | None = None) -> None:
        if not 1 <= max_threads <= 1024:
            raise ValueError(f"max_threads must be between 1 and 1024, not {max_threads}")
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        self.loop = loop
        self.tracer = tracer if tracer is not None else getattr(loop, "tracer", trace.default)
        self.max_threads = max_threads
        self.idle_timeout = idle_timeout
        self._mutex = threading.Lock()  # posix-aio-compat.c's own `lock`, not qemu_mutex
        self._cond = threading.Condition(self._mutex)
        self._request_list: deque[QemuPaiocb] = deque()
        self.first_aio: list[QemuPaiocb] = []  # submitted, callback not yet run
        self.cur_threads = 0
        self.idle_threads = 0
        self.threads_started = 0
        self.completed = 0        # callbacks run
        self.signals_sent = 0     # kill(getpid(), SIGUSR2) calls by workers
        self.signals_taken = 0    # records read from the signal fd
        self._closing = False
        self._workers: list[threading.Thread] = []
        self.source: SignalSource | None = None

        # "Make sure to block AIO signal" -- in the calling thread.  Whether
        # every other thread blocks it too is checked before the first worker
        # exists (paio_submit): until then nobody sends SIGUSR2.
        signal.pthread_sigmask(signal.SIG_BLOCK, {AIO_SIGNAL})
        self._check_masks = check_masks and method != "async"
        self.source = SignalSource(method, (AIO_SIGNAL,), tracer=self.tracer,
                                   force_signalfd_failure=force_signalfd_failure,
                                   thread_name="qkio-aio-sigwt")
        # On the async path the handler runs in the main thread between any
        # two bytecodes -- possibly while that thread holds the pool's mutex
        # in paio_submit, which posix_aio_process_queue takes too: a
        # deadlock.  So there it only schedules a bottom half (a flag and a
        # doorbell, no lock), and the queue is walked at a safe point.
        self._bh = loop.bh_new(lambda _: self.posix_aio_process_queue())
        handler = self.posix_aio_read if self.source.path != "async" else self._posix_aio_signal
        try:
            self.source.add_handler(AIO_SIGNAL, handler)
            self.source.attach(loop)
        except BaseException:
            self.source.close()
            raise

    @property
    def path(self) -> str:
        """How SIGUSR2 reaches the io thread: signalfd, thread or async."""
        assert self.source is not None
        return self.source.path

    @property
    def fd(self) -> int:
        """The signal fd (``s->fd``), -1 for the async path."""
        assert self.source is not None
        return self.source.read_fd

    # -- submitting (any thread, usually a vCPU thread emulating a disk) -------

    def paio_submit(self, fd: int, offset: int, iov, aio_type: int, cb=None,
                    opaque=None) -> QemuPaiocb:
        """Queue ``preadv``/``pwritev`` of ``iov`` at ``offset`` in ``fd`` (or a flush).

        ``iov`` is a list of buffers (writable ones for a read).  ``cb(opaque,
        ret)`` runs later in the io thread.  Never blocks on the I/O itself.
        """
        if self._closing:
            raise RuntimeError("paio_submit on a closed pool")
        if aio_type not in _TYPE_NAMES:
            raise ValueError(f"aio_type must be QEMU_AIO_READ, _WRITE or _FLUSH, not {aio_type!r}")
        if offset < 0:
            raise ValueError(f"offset must not be negative, not {offset}")
        if self._check_masks:
            # The compat signal thread shows SIGUSR2 unblocked while it sits in
            # sigwaitinfo (the kernel lifts the waited set from the mask for
            # the wait): it is the one thread that is meant to take it.
            thread = self.source.thread if self.source is not None else None
            own = thread.native_id if thread is not None else None
            open_to_it = [t for t in threads_taking(AIO_SIGNAL) if t != own]
            if open_to_it:
                raise RuntimeError(
                    f"paio_submit: thread(s) {', '.join(map(str, open_to_it))} of this process "
                    f"do not block SIGUSR2, so a worker's kill(getpid(), SIGUSR2) could be "
                    f"delivered there (default action: terminate); block it before starting "
                    f"threads (qkio.signals.block_vmm_signals) or use the pool in a child process")
            self._check_masks = False
        views = [memoryview(b).cast("B") for b in iov]
        if aio_type == QEMU_AIO_READ and any(v.readonly for v in views):
            raise ValueError("a read needs writable buffers (bytearray, memoryview of one, mmap)")
        acb = QemuPaiocb(fd, views, offset, aio_type, cb, opaque,
                         aio_nbytes=sum(v.nbytes for v in views),
                         submitted_ns=time.monotonic_ns())
        self.first_aio.append(acb)
        if self.tracer.enabled:
            self.tracer.instant("paio_submit", type=_TYPE_NAMES[aio_type], fd=fd,
                                offset=offset, nbytes=acb.aio_nbytes,
                                by=threading.current_thread().name)
        with self._cond:
            if self.idle_threads == 0 and self.cur_threads < self.max_threads:
                self._spawn_thread()
            self._request_list.append(acb)
            self._cond.notify()
        return acb

    def _spawn_thread(self) -> None:
        """Start a worker with every signal blocked (called with the pool mutex held)."""
        self.cur_threads += 1
        self.idle_threads += 1
        self.threads_started += 1
        # Blocked in *this* thread around the creation, as 0.12's spawn_thread
        # did: the new thread inherits the full mask from its first instruction.
        old = signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
        try:
            t = start_thread(f"qkio-aio{self.threads_started}", self._aio_thread, daemon=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._workers.append(t)

    # -- the workers ----------------------------------------------------------

    def _aio_thread(self) -> None:
        """``aio_thread``: take a request, do it, store the result, kill(getpid(), SIGUSR2)."""
        pid = os.getpid()
        name = threading.current_thread().name
        while True:
            with self._cond:
                end = time.monotonic() + self.idle_timeout
                while not self._request_list and not self._closing:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._request_list:  # idle too long, or closing
                    self.idle_threads -= 1
                    self.cur_threads -= 1
                    return
                acb = self._request_list.popleft()
                acb.active = True
                self.idle_threads -= 1

            ret = self._handle_aiocb(acb)

            with self._cond:
                acb.ret = ret
                acb.finished_ns = time.monotonic_ns()
                acb.worker = name
                self.idle_threads += 1
                self.signals_sent += 1
            os.kill(pid, AIO_SIGNAL)

    @staticmethod
    def _handle_aiocb(acb: QemuPaiocb) -> int:
        """``handle_aiocb_rw``/``handle_aiocb_flush``: bytes transferred or -errno.

        Short transfers are continued from where they stopped; a read that
        meets end-of-file stops there (and is reported short).
        """
        try:
            if acb.aio_type == QEMU_AIO_FLUSH:
                os.fdatasync(acb.aio_fildes)
                return 0
            done = 0
            iov = acb.aio_iov
            while iov:
                if acb.aio_type == QEMU_AIO_WRITE:
                    n = os.pwritev(acb.aio_fildes, iov, acb.aio_offset + done)
                else:
                    n = os.preadv(acb.aio_fildes, iov, acb.aio_offset + done)
                if n == 0:
                    break  # end of file
                done += n
                while iov and n >= iov[0].nbytes:  # drop what is complete
                    n -= iov[0].nbytes
                    iov = iov[1:]
                if n:
                    iov = [iov[0][n:], *iov[1:]]
            return done
        except OSError as e:
            return -(e.errno or errno.EIO)

    # -- completion (the io thread) -----------------------------------------

    def posix_aio_read(self, info=None) -> None:
        """The signal fd's handler: one SIGUSR2 record taken, now look at every request."""
        self.signals_taken += 1
        self.posix_aio_process_queue()

    def _posix_aio_signal(self, info=None) -> None:
        """The async path's handler: count, and leave the work to a bottom half."""
        self.signals_taken += 1
        self._bh.schedule()

    def posix_aio_process_queue(self) -> int:
        """Call the callback of every finished request; returns how many ran."""
        ran = 0
        for acb in list(self.first_aio):
            with self._mutex:
                err = _aio_error(acb)
            if err == errno.EINPROGRESS:
                continue
            self.first_aio.remove(acb)
            acb.done = True
            if err == errno.ECANCELED:
                continue
            ret = (0 if acb.ret == acb.aio_nbytes else -errno.EINVAL) if err == 0 else -err
            self.completed += 1
            ran += 1
            if self.tracer.enabled:
                self.tracer.instant("paio complete", type=_TYPE_NAMES[acb.aio_type],
                                    ret=ret, worker=acb.worker)
            if acb.cb is not None:
                acb.cb(acb.opaque, ret)
        return ran

    def paio_cancel(self, acb: QemuPaiocb) -> None:
        """Cancel a request: dropped if no worker has it yet, else waited for.
        Its callback is not called either way."""
        with self._cond:
            if not acb.active and acb in self._request_list:
                self._request_list.remove(acb)
                acb.ret = -errno.ECANCELED
                active = False
            else:
                active = acb.ret == -errno.EINPROGRESS
        while active:  # 0.12 spun here; a short sleep gives the worker the GIL
            time.sleep(0.0005)
            with self._mutex:
                active = acb.ret == -errno.EINPROGRESS
        if acb in self.first_aio:
            self.first_aio.remove(acb)
        acb.done = True

    def qemu_aio_flush(self, timeout: float = 30.0) -> None:
        """Run the main loop until every submitted request's callback has run.

        Call from the io thread (or any thread when no io thread is running).
        """
        end = time.monotonic() + timeout
        while self.first_aio:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self.first_aio)} AIO request(s) still in progress "
                                   f"after {timeout:g} s")
            self.loop.main_loop_wait(100)

    def close(self) -> None:
        """Stop the workers (after the requests they hold) and close the signal fd."""
        if self._closing and self.source is None:
            return
        self._closing = True
        with self._cond:
            for acb in self._request_list:
                acb.ret = -errno.ECANCELED
            self._request_list.clear()
            self._cond.notify_all()
        for t in self._workers:
            t.join(timeout=10)
        self._workers = [t for t in self._workers if t.is_alive()]
        # A worker's last SIGUSR2 may still be pending with nobody left to read
        # it; take it now, so that it cannot surface later in a thread that
        # unblocks SIGUSR2 (default action: terminate).
        if self.path != "async":
            while signal.sigtimedwait({AIO_SIGNAL}, 0) is not None:
                pass
        if self.source is not None:
            self.source.close()
            self.source = None
        self._bh.delete()

    def __enter__(self) -> "PosixAioState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def paio_init(loop, *, method: str = "signalfd", max_threads: int = 64,
              idle_timeout: float = 10.0, force_signalfd_failure: bool = False,
              check_masks: bool = True, tracer: trace.Tracer | None = None) -> PosixAioState:
    """Set up the pool on ``loop``: block SIGUSR2, open its signal fd, register the handler.

    ``method`` is how SIGUSR2 reaches the io thread (as ``--signals``):
    ``"signalfd"`` (falling back to a signal thread when signalfd fails),
    ``"thread"`` (the compat signal thread, named ``qkio-aio-sigwt``) or
    ``"async"`` (a Python handler in the main thread).  ``check_masks=False``
    skips the check that every thread blocks SIGUSR2.
    """
    return PosixAioState(loop, method=method, max_threads=max_threads,
                         idle_timeout=idle_timeout, force_signalfd_failure=force_signalfd_failure,
                         check_masks=check_masks, tracer=tracer)
