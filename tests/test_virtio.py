"""virtio-mmio and virtio-blk without a VM: the transport's registers, the split
virtqueue, and what each kind of request -- honest or lying -- gets back.

The guest's side is played by :class:`Driver`, which writes descriptors and
rings into a :class:`GuestMemory` exactly where a guest would, and pokes the
transport's registers as a guest's MMIO accesses would.
"""

from __future__ import annotations

import os
import struct

import pytest

from qkio.errors import QkioError
from qkio.kvm.memory import GuestMemory
from qkio.virtio import mmio as R
from qkio.virtio.blk import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    DriveError,
    VirtIOBlock,
    parse_drive_option,
)
from qkio.virtio.board import NOTIFY_MODES, parse_notify_mode, transport_slots
from qkio.virtio.mmio import VirtioMMIO, config_u64

MEM = 64 * 1024
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
QSIZE = 8
HDR, DATA, STATUS = 0x4000, 0x5000, 0x6000


class Driver:
    """The guest's half: set up queue 0 and submit chains."""

    def __init__(self, transport: VirtioMMIO, memory: GuestMemory, features_hi: int = 1):
        self.t, self.m = transport, memory
        self.irqs: list[int] = []
        transport.set_irq = self.irqs.append
        w = transport.io_write
        w(R.STATUS, 4, 0)
        w(R.STATUS, 4, R.ACKNOWLEDGE | R.DRIVER)
        w(R.DRIVER_FEATURES_SEL, 4, 1)
        w(R.DRIVER_FEATURES, 4, features_hi)
        w(R.STATUS, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
        self.accepted = bool(transport.io_read(R.STATUS, 4) & R.FEATURES_OK)
        w(R.QUEUE_SEL, 4, 0)
        w(R.QUEUE_NUM, 4, QSIZE)
        for reg, addr in ((R.QUEUE_DESC_LOW, DESC), (R.QUEUE_AVAIL_LOW, AVAIL), (R.QUEUE_USED_LOW, USED)):
            w(reg, 4, addr)
        w(R.QUEUE_READY, 4, 1)
        w(R.STATUS, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
        self.avail_idx = 0

    def desc(self, i, addr, length, flags, nxt=0):
        self.m.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head: int) -> None:
        self.m.write(AVAIL + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.m.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def request(self, rtype, sector, data_len=512, write_data=None, data_flags=None):
        """Chain 0-1-2: header, data, status; returns (status byte, used len)."""
        self.m.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
        if write_data is not None:
            self.m.write(DATA, write_data)
        self.m.write(STATUS, b"\xee")
        flags = data_flags if data_flags is not None else (0 if rtype == 1 else 2)
        self.desc(0, HDR, 16, 1, 1)
        self.desc(1, DATA, data_len, flags | 1, 2)
        self.desc(2, STATUS, 1, 2)
        self.offer(0)
        return self.run()

    def run(self):
        before = self.used_idx()
        self.t.device.handle_queue(self.t)
        after = self.used_idx()
        if after == before:
            return None
        _id, length = struct.unpack("<II", self.m.read(USED + 4 + 8 * ((after - 1) % QSIZE), 8))
        return self.m.read(STATUS, 1)[0], length

    def used_idx(self):
        return struct.unpack("<H", self.m.read(USED + 2, 2))[0]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 32)  # 8 KiB: 16 sectors
    return path


@pytest.fixture
def blk(image):
    memory = GuestMemory(MEM)
    device = VirtIOBlock(str(image), serial=b"qkio0")
    device.memory = memory
    transport = VirtioMMIO(0xFEB00E00, 12, device, memory=memory)
    yield transport, memory
    device.close()
    memory.close()


# --- the register file ------------------------------------------------------------

def test_identification_registers(blk):
    t, _ = blk
    assert t.io_read(R.MAGIC_VALUE, 4) == 0x74726976
    assert t.io_read(R.VERSION, 4) == 2
    assert t.io_read(R.DEVICE_ID, 4) == 2
    assert t.io_read(R.VENDOR_ID, 4) == 0x554D4551
    t.io_write(R.DEVICE_FEATURES_SEL, 4, 1)
    assert t.io_read(R.DEVICE_FEATURES, 4) == 1          # VIRTIO_F_VERSION_1 is bit 32
    t.io_write(R.DEVICE_FEATURES_SEL, 4, 0)
    low = t.io_read(R.DEVICE_FEATURES, 4)
    assert low & (1 << 9) and low & (1 << 6) and not low & (1 << 5)  # FLUSH, BLK_SIZE, not RO
    assert config_u64(t, 0) == 16                         # capacity in sectors
    assert t.io_read(R.CONFIG + 20, 4) == 512             # blk_size
    assert t.io_read(R.QUEUE_NUM_MAX, 4) == 256
    t.io_write(R.QUEUE_SEL, 4, 1)
    assert t.io_read(R.QUEUE_NUM_MAX, 4) == 0             # virtio-blk has one queue
    assert t.io_read(R.MAGIC_VALUE, 2) == 0               # not 32-bit: ignored, as QEMU


def test_an_empty_transport_answers_magic_version_and_device_0():
    t = VirtioMMIO(0xFEB00000, 5)
    assert [t.io_read(off, 4) for off in (R.MAGIC_VALUE, R.VERSION, R.DEVICE_ID)] == [0x74726976, 2, 0]
    t.io_write(R.STATUS, 4, 1)
    assert t.io_read(R.STATUS, 4) == 0


def test_feature_negotiation_needs_version_1_and_offered_bits_only(blk):
    t, m = blk
    assert Driver(t, m, features_hi=1).accepted
    assert not Driver(t, m, features_hi=0).accepted      # legacy: refused
    assert not Driver(t, m, features_hi=1 | 2).accepted  # bit 33 was not offered


def test_microvm_placement():
    slots = transport_slots()
    assert slots[0] == (0xFEB00E00, 12) and slots[-1] == (0xFEB00000, 5) and len(slots) == 8
    assert {parse_notify_mode(m) for m in NOTIFY_MODES} == set(NOTIFY_MODES)
    assert parse_notify_mode("iothread=io0") == "iothread"
    with pytest.raises(QkioError, match="vcpu, main, iothread"):
        parse_notify_mode("threads")


def test_drive_option():
    assert parse_drive_option("file=a.img") == ("a.img", False, b"")
    assert parse_drive_option("file=a.img,readonly=on,format=raw,serial=s1") == ("a.img", True, b"s1")
    for bad in ("a.img", "readonly=on", "file=a,readonly=1", "file=a,format=qcow2", "file=a,cache=none",
                "file=a,serial=" + "x" * 21):
        with pytest.raises(DriveError):
            parse_drive_option(bad)


def test_drive_that_is_not_a_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        with pytest.raises(DriveError, match="not a regular file"):
            VirtIOBlock(str(path), readonly=True)
    with pytest.raises(DriveError, match="Is a directory"):
        VirtIOBlock(str(tmp_path))
    with pytest.raises(DriveError, match="cannot open"):
        VirtIOBlock(str(tmp_path / "missing.img"))


# --- honest requests ------------------------------------------------------------------

def test_write_read_flush_get_id(blk, image):
    t, m = blk
    d = Driver(t, m)
    pattern = bytes((i * 7) & 0xFF for i in range(512))
    assert d.request(1, 3, write_data=pattern) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[3 * 512:4 * 512] == pattern
    m.write(DATA, b"\0" * 512)
    assert d.request(0, 3) == (VIRTIO_BLK_S_OK, 513)
    assert m.read(DATA, 512) == pattern
    assert d.request(4, 0, data_len=0, data_flags=0) == (VIRTIO_BLK_S_OK, 1)  # FLUSH
    assert d.request(8, 0, data_len=20) == (VIRTIO_BLK_S_OK, 7)         # "qkio0" + NUL + status
    assert m.read(DATA, 6) == b"qkio0\0"
    assert d.irqs and d.irqs[-1] == 1 and t.io_read(R.INTERRUPT_STATUS, 4) == 1
    t.io_write(R.INTERRUPT_ACK, 4, 1)
    assert t.io_read(R.INTERRUPT_STATUS, 4) == 0 and d.irqs[-1] == 0


# --- lying requests: an error status, the device untouched ----------------------------

@pytest.mark.parametrize("rtype, sector, length, expect", [
    (0, 16, 512, VIRTIO_BLK_S_IOERR),     # IN at the first sector past the end
    (1, 15, 1024, VIRTIO_BLK_S_IOERR),    # OUT that runs past the end
    (0, 2**63, 512, VIRTIO_BLK_S_IOERR),  # a sector whose byte offset overflows 64 bits
    (0, 0, 100, VIRTIO_BLK_S_IOERR),      # not a whole sector
    (2, 0, 512, VIRTIO_BLK_S_UNSUPP),     # SCSI_CMD (legacy): unknown here
    (0xFFFFFFFF, 0, 512, VIRTIO_BLK_S_UNSUPP),
])
def test_bad_requests_get_an_error_status(blk, image, rtype, sector, length, expect):
    t, m = blk
    before = image.read_bytes()
    d = Driver(t, m)
    status, used_len = d.request(rtype, sector, data_len=length, write_data=b"\xaa" * length
                                 if rtype == 1 else None)
    assert (status, used_len) == (expect, 1)
    assert image.read_bytes() == before
    assert not t.broken


def test_read_only_drive_refuses_writes(image):
    memory = GuestMemory(MEM)
    device = VirtIOBlock(str(image), readonly=True)
    device.memory = memory
    t = VirtioMMIO(0xFEB00E00, 12, device, memory=memory)
    t.io_write(R.DEVICE_FEATURES_SEL, 4, 0)
    assert t.io_read(R.DEVICE_FEATURES, 4) & (1 << 5)    # VIRTIO_BLK_F_RO offered
    before = image.read_bytes()
    assert Driver(t, memory).request(1, 0, write_data=b"\x55" * 512) == (VIRTIO_BLK_S_IOERR, 1)
    assert image.read_bytes() == before
    device.close()
    memory.close()


@pytest.mark.parametrize("lie", ["head", "next", "loop", "outside", "order", "indirect", "no-status",
                                 "short-header", "avail-ahead"])
def test_broken_chains_need_a_reset(blk, image, lie):
    t, m = blk
    d = Driver(t, m)
    before = image.read_bytes()
    d.m.write(HDR, struct.pack("<IIQ", 1, 0, 0))
    d.desc(0, HDR, 16, 1, 1)
    d.desc(1, DATA, 512, 1, 2)
    d.desc(2, STATUS, 1, 2)
    head = 0
    if lie == "head":
        head = QSIZE
    elif lie == "next":
        d.desc(1, DATA, 512, 1, QSIZE + 3)
    elif lie == "loop":
        d.desc(2, STATUS, 1, 2 | 1, 1)
        d.desc(1, DATA, 512, 2 | 1, 2)
    elif lie == "outside":
        d.desc(1, MEM - 256, 512, 1, 2)
    elif lie == "order":
        d.desc(0, HDR, 16, 2 | 1, 1)   # writable header, then readable data
    elif lie == "indirect":
        d.desc(1, DATA, 512, 4 | 1, 2)
    elif lie == "no-status":
        d.desc(2, STATUS, 1, 0)        # readable: no status byte anywhere
    elif lie == "short-header":
        d.desc(0, HDR, 8, 1, 1)
        d.desc(1, DATA, 4, 1, 2)       # 12 readable bytes in all
    if lie == "avail-ahead":
        m.write(AVAIL + 2, struct.pack("<H", QSIZE + 1))
    else:
        d.offer(head)
    assert d.run() is None                               # nothing returned used
    assert t.broken and t.io_read(R.STATUS, 4) & R.DEVICE_NEEDS_RESET
    assert t.io_read(R.INTERRUPT_STATUS, 4) & R.INT_CONFIG  # configuration change sent
    assert image.read_bytes() == before
    # Ignored until reset; a reset brings it back.
    d.offer(0)
    assert d.run() is None
    t.io_write(R.STATUS, 4, 0)
    assert t.io_read(R.STATUS, 4) == 0 and not t.broken
    d2 = Driver(t, m)
    assert d2.request(1, 0, write_data=b"\x11" * 512) == (VIRTIO_BLK_S_OK, 1)


def test_queue_outside_memory_is_refused_at_ready(blk):
    t, m = blk
    t.io_write(R.STATUS, 4, R.ACKNOWLEDGE | R.DRIVER)
    t.io_write(R.QUEUE_NUM, 4, QSIZE)
    t.io_write(R.QUEUE_USED_LOW, 4, MEM - 8)
    t.io_write(R.QUEUE_READY, 4, 1)
    assert t.io_read(R.QUEUE_READY, 4) == 0 and t.broken
