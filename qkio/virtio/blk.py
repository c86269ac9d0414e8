"""virtio-blk (device ID 2) backed by a raw image file (virtio 1.x, section 5.2).

A request is one descriptor chain: a 16-byte device-readable header (le32
type, le32 reserved, le64 sector), the data, and one device-writable status
byte at the very end.  Types: IN (0, read sectors into the data buffers), OUT
(1, write them), FLUSH (4), GET_ID (8, up to 20 bytes of serial).  Statuses:
OK 0, IOERR 1, UNSUPP 2.

Handling is cut in three, so that who runs each part can change (the notify
modes of :mod:`qkio.virtio.board`) while what it does cannot:

* :meth:`VirtIOBlock.parse` turns a chain into a :class:`BlkRequest`, or
  refuses it; it touches guest memory only to read the header;
* :meth:`BlkRequest.execute` does the I/O: ``preadv``/``pwritev`` between
  the image and guest RAM, with no copy (the iovecs are views of guest
  memory), or ``fdatasync``; it may run on any thread, a worker included;
* :meth:`VirtIOBlock.complete` writes the status byte and returns the chain
  to the used ring.

What a lying driver gets, following QEMU 7.2's ``virtio_blk_handle_request``
(hw/block/virtio-blk.c) where the specification leaves the choice to the
device: a chain without room for the header or the status byte is not a
request at all -- :class:`~qkio.virtio.virtqueue.VirtqueueError`, so
``DEVICE_NEEDS_RESET``; IN or OUT data that is not a whole number of
512-byte sectors, or that runs past the end of the image, or a write to a
read-only drive, gets ``IOERR`` (section 5.2.6.2: "A device MUST set the
status byte to VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO
feature if offered"); an unknown type gets ``UNSUPP``.  The image is
only ever read or written inside ``[0, capacity * 512)``.
"""

from __future__ import annotations

import os
import stat
import struct
import time

from ..errors import QkioError
from .virtqueue import Chain, VirtqueueError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from ..kvm.memory import GuestMemory

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20

# Feature bits (section 5.2.3)
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

# Request types and statuses (section 5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

TYPE_NAMES = {VIRTIO_BLK_T_IN: "IN", VIRTIO_BLK_T_OUT: "OUT", VIRTIO_BLK_T_FLUSH: "FLUSH",
              VIRTIO_BLK_T_GET_ID: "GET_ID"}

_HEADER = struct.Struct("<IIQ")
#: Segments per request the device accepts (config ``seg_max``): the header
#: and the status byte take two of a queue's descriptors.
SEG_MAX = 126


class DriveError(QkioError):
    """``--drive`` names something qkio cannot use as a disk image."""


def parse_drive_option(text: str) -> tuple[str, bool, bytes]:
    """``file=IMG[,readonly=on|off][,serial=S]`` (QEMU's spellings) -> ``(path, readonly, serial)``."""
    path, readonly, serial = None, False, b""
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise DriveError(f"--drive: expected key=value, got {item!r} (e.g. file=disk.img,readonly=on)")
        if key == "file":
            path = value
        elif key == "readonly":
            if value not in ("on", "off"):
                raise DriveError(f"--drive: readonly must be on or off, not {value!r}")
            readonly = value == "on"
        elif key == "serial":
            serial = value.encode()
            if len(serial) > VIRTIO_BLK_ID_BYTES:
                raise DriveError(f"--drive: serial is at most {VIRTIO_BLK_ID_BYTES} bytes, not {len(serial)}")
        elif key == "format":
            if value != "raw":
                raise DriveError(f"--drive: only format=raw is supported, not {value!r}")
        else:
            raise DriveError(f"--drive: unknown option {key!r} (qkio knows file, readonly, serial, format)")
    if not path:
        raise DriveError("--drive: file=IMG is required")
    return path, readonly, serial


class BlkRequest:
    """One parsed request: everything :meth:`execute` needs, nothing it must look up."""

    __slots__ = ("head", "type", "sector", "data", "status_addr", "status", "written", "device")

    def __init__(self, device, head, rtype, sector, data, status_addr):
        self.device, self.head, self.type, self.sector = device, head, rtype, sector
        self.data = data               # [(gpa, len)] of the data buffers
        self.status_addr = status_addr
        self.status = VIRTIO_BLK_S_OK
        self.written = 0               # bytes written into device-writable buffers, status excluded

    def refused(self) -> bool:
        """Check an IN or OUT against the image and the drive's mode; on failure set
        IOERR and say so.  Runs before any I/O, in the thread that parsed the request."""
        dev = self.device
        if self.type not in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            return False
        length = self.length()
        offset = self.sector * SECTOR_SIZE
        if (length % SECTOR_SIZE or self.sector >= dev.capacity
                or offset + length > dev.capacity * SECTOR_SIZE
                or (self.type == VIRTIO_BLK_T_OUT and dev.readonly)):
            self.status = VIRTIO_BLK_S_IOERR
            return True
        return False

    def length(self) -> int:
        return sum(n for _, n in self.data)

    def views(self) -> list[memoryview]:
        """The data buffers as windows on guest RAM (bounds-checked), for preadv/pwritev."""
        return [self.device.memory.view(gpa, n) for gpa, n in self.data if n]

    def finish_io(self, done: int) -> None:
        """Record the outcome of the transfer: ``done`` bytes, or a negative errno."""
        if done != self.length():
            self.status = VIRTIO_BLK_S_IOERR
        elif self.type == VIRTIO_BLK_T_IN:
            self.written = done

    def execute(self) -> None:
        """Do the request synchronously and set :attr:`status`.  Any thread; no lock
        needed (the image fd is shared, but ``preadv``/``pwritev`` carry their own offset)."""
        dev = self.device
        if self.type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            if self.refused():
                return
            views = self.views()
            offset = self.sector * SECTOR_SIZE
            try:
                if not views:
                    done = 0
                elif self.type == VIRTIO_BLK_T_IN:
                    done = os.preadv(dev.fd, views, offset)
                else:
                    done = os.pwritev(dev.fd, views, offset)
            except OSError as e:
                done = -(e.errno or 5)
            finally:
                for v in views:
                    v.release()
            self.finish_io(done)
        elif self.type == VIRTIO_BLK_T_FLUSH:
            try:
                if not dev.readonly:
                    os.fdatasync(dev.fd)
            except OSError:
                self.status = VIRTIO_BLK_S_IOERR
        elif self.type == VIRTIO_BLK_T_GET_ID:
            # As QEMU 7.2: the serial and its NUL, cut to the buffer and to 20 bytes
            # (a 20-byte serial has no NUL, as the specification allows).
            room = sum(n for _, n in self.data)
            ident = (dev.serial + b"\0")[:min(room, VIRTIO_BLK_ID_BYTES)]
            at = 0
            for gpa, n in self.data:
                piece = ident[at:at + n]
                if not piece:
                    break
                dev.memory.write(gpa, piece)
                at += len(piece)
            self.written = at
        else:
            self.status = VIRTIO_BLK_S_UNSUPP


class VirtIOBlock:
    """The device half of virtio-blk: features, configuration space, requests."""

    device_id = VIRTIO_ID_BLOCK
    num_queues = 1

    def __init__(self, path: str, readonly: bool = False, serial: bytes = b""):
        flags = os.O_RDONLY if readonly else os.O_RDWR
        try:
            # O_NONBLOCK: a FIFO named by mistake must not hang the open (it is
            # refused just below); on a regular file the flag does nothing.
            self.fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise DriveError(f"cannot open drive image {path}: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise DriveError(f"drive image {path} is not a regular file")
            self.size = st.st_size
        except BaseException:
            os.close(self.fd)
            raise
        self.path = path
        self.readonly = readonly
        self.serial = serial
        self.capacity = self.size // SECTOR_SIZE   # sectors; a partial last sector is not used
        # Set when plugged into a transport (qkio.virtio.board); no request comes before.
        self.memory: GuestMemory = None  # type: ignore[assignment]
        self.features = ((1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
                         | (1 << VIRTIO_BLK_F_FLUSH) | ((1 << VIRTIO_BLK_F_RO) if readonly else 0))

    def config(self) -> bytes:
        """``struct virtio_blk_config`` up to ``blk_size``: capacity, size_max, seg_max,
        geometry (unused), blk_size."""
        return struct.pack("<QIIHBBI", self.capacity, 0, SEG_MAX, 0, 0, 0, SECTOR_SIZE)

    def parse(self, chain: Chain) -> BlkRequest:
        """Turn a chain into a request; a chain that cannot be one raises VirtqueueError."""
        if chain.readable_len() < _HEADER.size:
            raise VirtqueueError(f"request {chain.head} has {chain.readable_len()} device-readable "
                                 f"bytes, fewer than the 16-byte header")
        if not chain.writable or chain.writable_len() < 1:
            raise VirtqueueError(f"request {chain.head} has no device-writable status byte")
        header = b"".join(self.memory.read(gpa, n) for gpa, n in chain.readable)[:_HEADER.size] \
            if chain.readable[0][1] < _HEADER.size else self.memory.read(chain.readable[0][0], _HEADER.size)
        rtype, _reserved, sector = _HEADER.unpack(header)
        # The status byte is the last byte of the last writable buffer.
        last_addr, last_len = chain.writable[-1]
        status_addr = last_addr + last_len - 1
        writable = chain.writable[:-1] + ([(last_addr, last_len - 1)] if last_len > 1 else [])
        if rtype == VIRTIO_BLK_T_OUT:
            data = _skip(chain.readable, _HEADER.size)
        elif rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID):
            data = writable
        else:
            data = []
        return BlkRequest(self, chain.head, rtype, sector, data, status_addr)

    def complete(self, request: BlkRequest, queue) -> None:
        """Write the status byte and return the chain used (the caller raises the interrupt)."""
        self.memory.write(request.status_addr, bytes([request.status]))
        queue.push(request.head, request.written + 1)

    def handle_queue(self, transport, on_request=None, submit=None) -> int:
        """Run every request the driver has made available on ``transport``'s queue 0.

        Pops, parses, executes and completes them in order; ``on_request(request,
        start_ns)`` is called after each (for counts and traces).  A chain that
        breaks the rules puts the transport in DEVICE_NEEDS_RESET and stops the
        queue.  Raises the used-buffer interrupt once if anything completed.
        Returns the number of requests completed.

        ``submit(request)``, if given, may take IN, OUT and FLUSH requests that
        passed their checks (it returns True) and complete them later, from
        another thread (the posix-aio-compat pool of :mod:`qkio.virtio.board`);
        the rest still complete here.
        """
        queue = transport.queues[0]
        if transport.broken or not queue.ready:
            return 0
        done = 0
        try:
            while True:
                chain = queue.pop()
                if chain is None:
                    break
                request = self.parse(chain)
                start = time.monotonic_ns()
                if (submit is not None and request.type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                                            VIRTIO_BLK_T_FLUSH)
                        and not request.refused() and submit(request)):
                    continue
                request.execute()
                self.complete(request, queue)
                done += 1
                if on_request is not None:
                    on_request(request, start)
        except VirtqueueError as e:
            transport.needs_reset(str(e))
        if done:
            transport.raise_used()
        return done

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _skip(buffers: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """``buffers`` without their first ``count`` bytes."""
    out = []
    for gpa, n in buffers:
        if count >= n:
            count -= n
            continue
        out.append((gpa + count, n - count))
        count = 0
    return out
