"""Hypothesis fuzzing of the virtio-mmio register file, as a hostile driver drives it.

Random sequences of 1-, 2-, 4- and 8-byte reads and writes anywhere in the
512-byte window (and its configuration space), random notifies, random guest
memory under the rings, and resets in between.  The transport must never
raise, and after every step:

* a read returns a value of the access's width;
* Status never shows FEATURES_OK with features the device did not offer, or
  without VIRTIO_F_VERSION_1;
* DEVICE_NEEDS_RESET, once set, stays until the driver writes 0 to Status,
  and a broken device never completes a request;
* the queue size is a power of two no larger than QueueNumMax;
* the image keeps its size.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkio.kvm.memory import GuestMemory
from qkio.virtio import mmio as R
from qkio.virtio.blk import VirtIOBlock
from qkio.virtio.mmio import VirtioMMIO

MEM = 0x8000
REGS = [R.MAGIC_VALUE, R.VERSION, R.DEVICE_ID, R.VENDOR_ID, R.DEVICE_FEATURES, R.DEVICE_FEATURES_SEL,
        R.DRIVER_FEATURES, R.DRIVER_FEATURES_SEL, R.QUEUE_SEL, R.QUEUE_NUM_MAX, R.QUEUE_NUM,
        R.QUEUE_READY, R.QUEUE_NOTIFY, R.INTERRUPT_STATUS, R.INTERRUPT_ACK, R.STATUS,
        R.QUEUE_DESC_LOW, R.QUEUE_DESC_HIGH, R.QUEUE_AVAIL_LOW, R.QUEUE_AVAIL_HIGH,
        R.QUEUE_USED_LOW, R.QUEUE_USED_HIGH, R.CONFIG_GENERATION]
OFFSETS = st.one_of(st.sampled_from(REGS), st.integers(0, 0x1FF))
VALUES = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0xB, 0xF, 0x40, 0x80, 0xFF, 256, 0x1000,
                                    MEM - 64, 0xFFFFFFFF]), st.integers(0, (1 << 64) - 1))
OPS = st.lists(st.one_of(
    st.tuples(st.just("read"), OFFSETS, st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("write"), OFFSETS, st.sampled_from([1, 2, 4, 8]), VALUES),
    st.tuples(st.just("poke"), st.integers(0, MEM - 16), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("notify")),
), max_size=60)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_register_file_survives_any_driver(tmp_path_factory, ops):
    image = tmp_path_factory.mktemp("img") / "disk.img"
    image.write_bytes(bytes(4096))
    memory = GuestMemory(MEM)
    device = VirtIOBlock(str(image))
    device.memory = memory
    t = VirtioMMIO(0xFEB00E00, 12, device, memory=memory)
    completed = []
    t.on_notify = lambda index: completed.append(device.handle_queue(t))
    try:
        was_broken = False
        for op in ops:
            if op[0] == "read":
                _, offset, size = op
                if offset + size <= 0x200:
                    assert 0 <= t.io_read(offset, size) < (1 << (8 * size))
            elif op[0] == "write":
                _, offset, size, value = op
                if offset + size <= 0x200:
                    t.io_write(offset, size, value & ((1 << (8 * size)) - 1))
            elif op[0] == "poke":
                memory.write(op[1], op[2])
            else:
                before = len(completed)
                t.io_write(R.QUEUE_NOTIFY, 4, 0)
                if was_broken and t.broken:
                    assert completed[before:] in ([], [0])
            status = t.io_read(R.STATUS, 4)
            if status & R.FEATURES_OK:
                offered = t.device_features
                assert not t.driver_features & ~offered
                assert t.driver_features >> 32 & 1
            if was_broken and status != 0:
                assert status & R.DEVICE_NEEDS_RESET
            was_broken = t.broken
            q = t.queues[0]
            assert 0 < q.size <= q.max_size and not q.size & (q.size - 1)
        assert image.stat().st_size == 4096
    finally:
        device.close()
        memory.close()
