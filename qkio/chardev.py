"""The console's host side: guest output that can never block a vCPU thread.

Why a vCPU thread must not write to stdout itself
-------------------------------------------------
A vCPU thread emulates the UART with the global lock held.  If it wrote each
byte to stdout directly, a reader that stops reading (``| sleep 60``, a pager
left unscrolled) would fill the pipe, the ``write`` would block, and the
thread would sleep *holding the lock*: the io thread could then take no
signal and notice no ``--timeout``, and only SIGKILL would end the VMM.

QEMU never lets that happen.  Its chardev backends write without blocking,
and the UART copes with a backend that takes nothing: ``serial_xmit`` in
``hw/char/serial.c`` (QEMU 2.x and later) keeps the byte when
``qemu_chr_fe_write`` does not take it, adds a ``G_IO_OUT`` watch on the
backend with ``qemu_chr_fe_add_watch``, and tries again from the main loop
once the fd is writable; until then the transmitter stays busy and the guest,
polling LSR, waits.  qkio does the same in two halves:

* :class:`CharOutput` writes to a non-blocking fd.  While the fd takes the
  bytes, the vCPU thread's write is the whole story, as in QEMU (one
  ``write`` per byte, the io thread asleep).  What the fd does not take goes
  into a bounded buffer, and a write handler on the main loop makes the io
  thread write it out when ``select`` says the fd is writable; ``write``
  returns False while the buffer is full, and the io thread tells the UART
  when there is room again.
* :class:`qkio.devices.serial.Serial` keeps a byte the buffer refused in THR
  with LSR.THRE clear, so a polling guest sees a busy transmitter and waits
  (busily, in exits that release the lock) instead of a thread stalling.

Non-blocking, without touching anyone else's file
-------------------------------------------------
``O_NONBLOCK`` belongs to the *open file description*, which stdout shares
with the shell and, on a terminal, with stdin and stderr too: setting it on
fd 1 would make the shell's later reads fail with EAGAIN, and a SIGKILL would
leave it set.  So for a pipe, FIFO or terminal qkio opens
``/proc/self/fd/1`` again -- a new description of the same pipe or tty --
and makes only that one non-blocking.  A regular file never blocks and keeps
fd 1 (reopening would start a second file offset at 0); a socket is written
with ``send(MSG_DONTWAIT)``; an fd that is already non-blocking is used as it
is (EAGAIN is then simply "not now").

Host-side output errors are not guest failures
----------------------------------------------
EPIPE (the reader went away: ``| head -c 10``), ENOSPC (``>/dev/full``) or
EIO end the output, not the run: the buffer is dropped, :attr:`error` says
why, and from then on the console takes and discards every byte, like a UART
whose cable was pulled.  ``qkio run`` reports it in its one closing line.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time
from collections.abc import Callable

# socket and typing are imported only where needed (a socket as stdout; the
# type checker): every `qkio run` would otherwise pay for importing them at
# start-up (qkio bench startup; see qkio.record).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket

#: Bytes held for a reader that is slower than the guest.  The pipe or tty
#: behind stdout is the real buffer (64 KiB for a pipe by default); this one
#: only lets the vCPU run on while the io thread gets round to writing, and
#: its bound is what keeps a never-reading reader from costing memory.
OUTPUT_LIMIT = 4096


def open_nonblocking_writer(fd: int) -> tuple[int, bool, str]:
    """A descriptor for writing to ``fd`` without ever blocking.

    Returns ``(wfd, owned, kind)``: ``owned`` says ``wfd`` is a new fd the
    caller must close; ``kind`` is ``"file"``, ``"socket"``, ``"nonblocking"``
    (fd itself already was), ``"reopened"``, ``"gone"`` (a pipe with no
    reader left: writing would only give EPIPE) or ``"closed"`` (fd is not
    open: there is no output, and every byte is taken and dropped).
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        if e.errno == errno.EBADF:
            return fd, False, "closed"
        raise
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return fd, False, "file"
    if stat.S_ISSOCK(mode):
        return fd, False, "socket"
    if os.get_blocking(fd) is False:
        return fd, False, "nonblocking"
    try:
        wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO opened non-blocking for writing with no reader
            return fd, False, "gone"
        raise
    if wfd < 3:  # the caller left 0/1/2 closed: never let an fd of ours take one
        new = _dup_above_2(wfd)
        os.close(wfd)
        wfd = new
    return wfd, True, "reopened"


def _dup_above_2(fd: int) -> int:
    """A close-on-exec duplicate of ``fd`` numbered 3 or more."""
    import fcntl  # only when 0, 1 or 2 was closed: an extension module costs every run start-up
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


class CharOutput:
    """A bounded, non-blocking output channel drained by the io thread.

    ``CharOutput(loop, fd=1, limit=OUTPUT_LIMIT, on_room=None)``.
    :meth:`write` is called with the global lock held (by the UART, on a vCPU
    thread) and never blocks; ``on_room()`` is called in the io thread, lock
    held, when a refused write would now fit.
    """

    def __init__(self, loop, fd: int = 1, limit: int = OUTPUT_LIMIT,
                 on_room: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.fd = fd
        self.limit = limit
        self.on_room = on_room or (lambda: None)
        self.buffer = bytearray()
        self.written = 0        # bytes that reached the fd
        self.refused = 0        # write() calls refused because the buffer was full
        self.discarded = 0      # bytes dropped after an output error
        self.error: OSError | None = None
        self._watching = False
        self._stalled = False   # a write was refused; call on_room when there is room
        self._sock: socket.socket | None = None
        self.wfd, self._owned, self.kind = open_nonblocking_writer(fd)
        if self.kind == "closed":
            self.error = OSError(errno.EBADF, "not open")
        elif self.kind == "gone":
            self._fail(OSError(errno.EPIPE, os.strerror(errno.EPIPE)))
        elif self.kind == "socket":
            import socket
            self._sock = socket.socket(fileno=_dup_above_2(fd))
            self._dontwait = socket.MSG_DONTWAIT

    # -- the guest's side (vCPU thread, lock held) ------------------------------

    def write(self, data: bytes) -> bool:
        """Queue ``data``; False (nothing queued) if the buffer is full."""
        if self.error is not None:
            self.discarded += len(data)
            return True
        if len(self.buffer) >= self.limit:
            self.refused += 1
            self._stalled = True
            return False
        if not self.buffer:
            # Nothing queued: try the fd at once, without blocking (QEMU's
            # qemu_chr_fe_write from the vCPU thread).  Usually it takes the
            # byte and the io thread never hears of it; only what it does not
            # take is queued for the io thread.
            try:
                n = self._send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._fail(e)
                self.discarded += len(data)
                return True
            self.written += n
            if n == len(data):
                return True
            data = data[n:]
        self.buffer += data
        if not self._watching:
            self._watching = True
            self.loop.set_fd_handler(self.wfd, None, self._writable, None)
        return True

    # -- the io thread's side -----------------------------------------------------

    def _send(self, data) -> int:
        if self._sock is not None:
            return self._sock.send(data, self._dontwait)
        return os.write(self.wfd, data)

    def _writable(self, _opaque=None) -> None:
        """The fd is writable: write what fits, and stop watching once the buffer is empty."""
        try:
            n = self._send(self.buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(e)
            return
        del self.buffer[:n]
        self.written += n
        if not self.buffer:
            self._unwatch()
        if self._stalled and len(self.buffer) < self.limit:
            self._stalled = False
            self.on_room()

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self.loop.set_fd_handler(self.wfd, None, None, None)

    def _fail(self, e: OSError) -> None:
        self.error = e
        self.discarded += len(self.buffer)
        self.buffer.clear()
        self._unwatch()
        if self._stalled:
            self._stalled = False
            self.on_room()

    def flush(self, patience_s: float = 0.1, limit_s: float = 0.5) -> int:
        """Write out what is left at the end of a run; return the bytes given up on.

        Keeps going while the reader takes data, and gives up after
        ``patience_s`` without progress or ``limit_s`` in all: a reader that
        never reads must not keep the VMM from exiting.  Called after the
        vCPUs stopped (no lock needed: nobody else touches the buffer).
        """
        end = time.monotonic() + limit_s
        while self.buffer and self.error is None:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                ready = select.poll()
                ready.register(self.wfd, select.POLLOUT)
                if not ready.poll(int(min(patience_s, left) * 1000) + 1):
                    break
            except OSError:
                break
            before = len(self.buffer)
            self._writable()
            if len(self.buffer) == before and self.error is None:
                break
        left_over = len(self.buffer)
        self.buffer.clear()
        self._unwatch()
        return left_over

    def close(self) -> None:
        """Release the fds this object opened (idempotent); the buffer is dropped."""
        self.buffer.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._owned:
            os.close(self.wfd)
            self._owned = False
