"""Hypothesis fuzzing of the virtqueue parser and virtio-blk behind it.

A random "driver" fills the descriptor table, the available ring and request
headers with anything at all -- heads and ``next`` links past the table,
loops, buffers straddling or outside guest memory, INDIRECT, readable after
writable, short headers, any type and sector, ``avail.idx`` anywhere -- and
rings the doorbell.  Whatever it wrote, these must hold:

* nothing escapes: the device either completes requests or enters
  DEVICE_NEEDS_RESET (and then raises the configuration-change bit);
* the only guest bytes that change are in buffers the chains marked
  device-writable, or in the used ring;
* the image keeps its size, and changes only when an OUT request succeeded;
* every completed request's status byte is OK, IOERR or UNSUPP, and the
  length it reports never exceeds the chain's writable bytes.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkio.kvm.memory import GuestMemory
from qkio.virtio import mmio as R
from qkio.virtio.blk import VirtIOBlock
from qkio.virtio.mmio import VirtioMMIO

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
MEM = 0x10000
QSIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
BUFS = [0x4000, 0x4010, 0x5000, 0x5200, 0x6000]
IMAGE_SECTORS = 16

ADDRS = st.one_of(st.sampled_from(BUFS + [0, MEM - 1, MEM - 16, MEM, MEM + 512, DESC, USED, (1 << 64) - 1]),
                  st.integers(0, MEM), st.integers(0, (1 << 64) - 1))
LENS = st.one_of(st.sampled_from([0, 1, 8, 15, 16, 17, 20, 511, 512, 513, 1024]),
                 st.integers(0, 0xFFFFFFFF))
ANY_DESC = st.tuples(ADDRS, LENS, st.integers(0, 7), st.integers(0, QSIZE + 2))
# A table that starts with a well-formed request (header, data, status), so
# that the request paths -- not just the ring checks -- are fuzzed too.
WELL_FORMED = st.tuples(
    st.just((BUFS[0], 16, 1, 1)),
    st.tuples(st.just(BUFS[2]), st.sampled_from([0, 20, 100, 512, 1024]), st.sampled_from([1, 3]), st.just(2)),
    st.just((BUFS[4], 1, 2, 0)),
    st.lists(ANY_DESC, min_size=QSIZE - 3, max_size=QSIZE - 3)).map(lambda t: [t[0], t[1], t[2], *t[3]])
DESCS = st.lists(ANY_DESC, min_size=QSIZE, max_size=QSIZE)
HEADERS = st.tuples(st.sampled_from([0, 1, 4, 8, 2, 11, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF),
                    st.sampled_from([0, 1, IMAGE_SECTORS - 1, IMAGE_SECTORS, 1 << 55, (1 << 64) - 1])
                    | st.integers(0, (1 << 64) - 1))


def chain_writable(memory, head):
    """The device-writable ranges the chain from ``head`` declares, walked as the
    spec says but without trusting it (bounded, out-of-range links stop)."""
    out, index = [], head
    for _ in range(QSIZE):
        if index >= QSIZE:
            break
        addr, length, flags, nxt = struct.unpack("<QIHH", memory.read(DESC + 16 * index, 16))
        if flags & 2:
            out.append((addr, addr + length))
        if not flags & 1:
            break
        index = nxt
    return out


HEADS = st.lists(st.integers(0, QSIZE + 1), min_size=QSIZE, max_size=QSIZE)
HEADER_LISTS = st.lists(HEADERS, min_size=len(BUFS), max_size=len(BUFS))


@FUZZ
@given(descs=DESCS, heads=HEADS, headers=HEADER_LISTS,
       avail_idx=st.one_of(st.integers(0, QSIZE + 2), st.integers(0, 0xFFFF)))
def test_any_ring_contents_end_as_the_specification_says(tmp_path_factory, descs, heads, headers, avail_idx):
    check_ring(tmp_path_factory, descs, heads, headers, avail_idx)


@FUZZ
@given(descs=WELL_FORMED, headers=HEADER_LISTS, avail_idx=st.integers(1, QSIZE))
def test_well_formed_chains_with_any_request(tmp_path_factory, descs, headers, avail_idx):
    """Chain 0 is header + data + status every time, offered ``avail_idx`` times:
    every one completes with a status of its own, the device stays usable."""
    completed, requests, broken = check_ring(tmp_path_factory, descs, [0] * QSIZE, headers, avail_idx)
    assert completed == avail_idx and not broken


def check_ring(tmp_path_factory, descs, heads, headers, avail_idx):
    image_path = tmp_path_factory.mktemp("img") / "disk.img"
    image_path.write_bytes(b"\x5a" * (IMAGE_SECTORS * 512))
    memory = GuestMemory(MEM)
    device = VirtIOBlock(str(image_path))
    device.memory = memory
    try:
        t = VirtioMMIO(0xFEB00E00, 12, device, memory=memory)
        w = t.io_write
        w(R.STATUS, 4, R.ACKNOWLEDGE | R.DRIVER)
        w(R.DRIVER_FEATURES_SEL, 4, 1)
        w(R.DRIVER_FEATURES, 4, 1)
        w(R.STATUS, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK)
        w(R.QUEUE_NUM, 4, QSIZE)
        w(R.QUEUE_DESC_LOW, 4, DESC)
        w(R.QUEUE_AVAIL_LOW, 4, AVAIL)
        w(R.QUEUE_USED_LOW, 4, USED)
        w(R.QUEUE_READY, 4, 1)
        w(R.STATUS, 4, R.ACKNOWLEDGE | R.DRIVER | R.FEATURES_OK | R.DRIVER_OK)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            memory.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        for i, head in enumerate(heads):
            memory.write(AVAIL + 4 + 2 * i, struct.pack("<H", head))
        memory.write(AVAIL + 2, struct.pack("<H", avail_idx))
        for buf, (rtype, sector) in zip(BUFS, headers):
            memory.write(buf, struct.pack("<IIQ", rtype, 0, sector))
        before = memory.read(0, MEM)
        image_before = image_path.read_bytes()
        # What the driver declared writable, per head it offered (before the device runs).
        allowed = [(USED, USED + 6 + 8 * QSIZE)]
        for head in heads:
            allowed += chain_writable(memory, head)

        t.on_notify = lambda index: None
        requests = []
        completed = device.handle_queue(t, lambda r, start: requests.append(r))  # must not raise

        after = memory.read(0, MEM)
        changed = [i for i in range(MEM) if before[i] != after[i]]
        for i in changed:
            assert any(lo <= i < hi for lo, hi in allowed), f"byte {i:#x} changed outside writable buffers"
        image_after = image_path.read_bytes()
        assert len(image_after) == len(image_before)
        used_idx = struct.unpack("<H", memory.read(USED + 2, 2))[0]
        assert used_idx == completed
        for slot in range(completed):
            head, length = struct.unpack("<II", memory.read(USED + 4 + 8 * slot, 8))
            writable = sum(hi - lo for lo, hi in chain_writable(memory, head))
            assert 1 <= length <= writable
        if t.broken:
            assert t.io_read(R.STATUS, 4) & R.DEVICE_NEEDS_RESET
            assert t.io_read(R.INTERRUPT_STATUS, 4) & R.INT_CONFIG
        if completed:
            assert t.io_read(R.INTERRUPT_STATUS, 4) & R.INT_VRING
        assert len(requests) == completed
        for r in requests:
            assert r.status in (0, 1, 2)
            assert memory.read(r.status_addr, 1)[0] == r.status
        if image_after != image_before:
            # Only a successful OUT may have changed the image.
            assert any(r.type == 1 and r.status == 0 for r in requests)
        return completed, requests, t.broken
    finally:
        device.close()
        memory.close()

