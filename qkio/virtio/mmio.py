"""The virtio-mmio transport, register layout version 2 (virtio 1.x, section 4.2).

One transport is a 512-byte window of 32-bit registers followed by the
device's configuration space at 0x100.  The offsets and their meaning are the
specification's (section 4.2.2, table "MMIO Device Register Layout"); the
names are Linux's (include/uapi/linux/virtio_mmio.h).  Where the
specification lets the device choose, this one behaves like QEMU 7.2's
``virtio-mmio`` with ``force-legacy=false`` (hw/virtio/virtio-mmio.c):

* a transport with no device behind it still answers MagicValue, Version and
  VendorID, with DeviceID 0 -- which is how a driver skips empty slots;
* a control register access that is not 4 bytes wide reads as 0 and is
  otherwise ignored (the driver "MUST only use 32 bit wide and aligned reads
  and writes" to them, section 4.2.2.2);
* setting FEATURES_OK with features the device did not offer, or without
  VIRTIO_F_VERSION_1, is refused: the status write is dropped, so the driver
  reads FEATURES_OK back as clear (section 3.1.1, step 5-6);
* after an error the device sets DEVICE_NEEDS_RESET and, if DRIVER_OK was
  set, raises a configuration-change interrupt (section 2.1.2); it ignores
  the queue until the driver resets it by writing 0 to Status.

The interrupt status is the one piece of state two threads change at once --
the thread completing requests sets bit 0, the vCPU thread clears it through
InterruptACK -- so it has a lock of its own (QEMU uses an atomic OR).
"""

from __future__ import annotations

import threading
from typing import Callable

from .virtqueue import VirtQueue, VirtqueueError

VIRT_MAGIC = 0x74726976          # "virt", little-endian
VIRT_VERSION = 2
VIRT_VENDOR = 0x554D4551         # "QEMU", as QEMU's transports report
VIRTIO_F_VERSION_1 = 32
VIRTIO_MMIO_SIZE = 0x200

# Register offsets (Linux's names)
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_AVAIL_LOW = 0x090
QUEUE_AVAIL_HIGH = 0x094
QUEUE_USED_LOW = 0x0A0
QUEUE_USED_HIGH = 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (section 2.1)
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 64, 128
# InterruptStatus bits (section 4.2.2)
INT_VRING, INT_CONFIG = 1, 2

_QUEUE_ADDR = {QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
               QUEUE_AVAIL_LOW: ("avail", 0), QUEUE_AVAIL_HIGH: ("avail", 32),
               QUEUE_USED_LOW: ("used", 0), QUEUE_USED_HIGH: ("used", 32)}


class VirtioMMIO:
    """One transport.  ``device`` is None (an empty slot) or a device such as
    :class:`~qkio.virtio.blk.VirtIOBlock`.

    Hooks the board sets: ``on_notify(queue_index)`` for a QueueNotify that
    arrives as an MMIO write, ``on_driver_ok()`` and ``on_reset()`` around the
    device's life, ``set_irq(level)`` for the interrupt line, ``log(msg)``.
    """

    def __init__(self, base: int, irq: int, device=None, memory=None, queue_size: int = 256):
        self.base, self.irq, self.device = base, irq, device
        self.memory = memory
        self.queues = [VirtQueue(memory, queue_size) for _ in range(device.num_queues if device else 0)]
        self.on_notify: Callable[[int], None] = lambda index: None
        self.on_driver_ok: Callable[[], None] = lambda: None
        self.on_reset: Callable[[], None] = lambda: None
        self.set_irq: Callable[[int], None] = lambda level: None
        self.log: Callable[[str], None] = lambda msg: None
        self._isr_lock = threading.Lock()
        self.mmio_notifies = 0       # QueueNotify writes that reached this object (MMIO exits)
        self.errors: list[str] = []  # why the device asked for a reset, in order
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.isr = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.broken = False
        for q in self.queues:
            q.reset()

    @property
    def device_features(self) -> int:
        return (self.device.features | (1 << VIRTIO_F_VERSION_1)) if self.device else 0

    @property
    def notify_address(self) -> int:
        return self.base + QUEUE_NOTIFY

    # -- the register file -----------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            config = self.device.config() if self.device else b""
            piece = config[offset - CONFIG:offset - CONFIG + size]
            return int.from_bytes(piece.ljust(size, b"\0"), "little")
        if size != 4 or offset & 3:
            return 0
        if self.device is None:
            return {MAGIC_VALUE: VIRT_MAGIC, VERSION: VIRT_VERSION, VENDOR_ID: VIRT_VENDOR}.get(offset, 0)
        if offset == MAGIC_VALUE:
            return VIRT_MAGIC
        if offset == VERSION:
            return VIRT_VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID:
            return VIRT_VENDOR
        if offset == DEVICE_FEATURES:
            sel = self.device_features_sel
            return (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            q = self._queue()
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            q = self._queue()
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.isr
        if offset == STATUS:
            return self.status
        if offset in _QUEUE_ADDR:
            q = self._queue()
            if q is None:
                return 0
            field, shift = _QUEUE_ADDR[offset]
            return (getattr(q, field) >> shift) & 0xFFFFFFFF
        return 0  # CONFIG_GENERATION (the configuration never changes) and write-only registers

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG or self.device is None or size != 4 or offset & 3:
            return  # virtio-blk's config has nothing qkio lets the driver change
        if offset == QUEUE_NOTIFY:
            self.mmio_notifies += 1
            if value < len(self.queues):
                self.on_notify(value)
        elif offset == INTERRUPT_ACK:
            with self._isr_lock:
                self.isr &= ~value
                level = int(self.isr != 0)
            self.set_irq(level)
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & FEATURES_OK:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        else:
            q = self._queue()
            if q is None or self.status & DRIVER_OK:
                return  # no such queue, or the driver changes a live queue: ignored
            if offset == QUEUE_NUM:
                if 0 < value <= q.max_size and not value & (value - 1):
                    q.size = value  # split queues are a power of 2 (section 2.7)
            elif offset == QUEUE_READY:
                q.ready = bool(value & 1)
                if q.ready:
                    try:
                        q.check_layout()
                    except VirtqueueError as e:
                        q.ready = False
                        self.needs_reset(str(e))
            elif offset in _QUEUE_ADDR:
                field, shift = _QUEUE_ADDR[offset]
                old = getattr(q, field)
                setattr(q, field, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _queue(self) -> VirtQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.on_reset()
            self._reset_state()
            self.set_irq(0)
            return
        old = self.status
        if value & FEATURES_OK and not old & FEATURES_OK:
            offered = self.device_features
            wanted = self.driver_features
            if wanted & ~offered or not wanted >> VIRTIO_F_VERSION_1 & 1:
                self.log(f"virtio-mmio@{self.base:#x}: driver features {wanted:#x} refused "
                         f"(offered {offered:#x}; VIRTIO_F_VERSION_1 is required)")
                return
        self.status = value | (old & DEVICE_NEEDS_RESET)
        if value & DRIVER_OK and not old & DRIVER_OK:
            self.on_driver_ok()

    # -- the device's side -----------------------------------------------------

    def raise_used(self) -> None:
        """Used buffer notification: InterruptStatus bit 0, and the line (any thread)."""
        with self._isr_lock:
            self.isr |= INT_VRING
        self.set_irq(1)

    def needs_reset(self, reason: str) -> None:
        """Enter the error state of section 2.1.2: DEVICE_NEEDS_RESET, and a
        configuration-change interrupt if the driver is running."""
        if self.broken:
            return
        self.broken = True
        self.errors.append(reason)
        self.log(f"virtio-mmio@{self.base:#x}: device needs reset: {reason}")
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            with self._isr_lock:
                self.isr |= INT_CONFIG
            self.set_irq(1)


def config_u64(transport: VirtioMMIO, offset: int) -> int:
    """A 64-bit config field read as a driver does it: two 32-bit halves."""
    low = transport.io_read(CONFIG + offset, 4)
    high = transport.io_read(CONFIG + offset + 4, 4)
    return low | high << 32


__all__ = ["VirtioMMIO", "VIRTIO_MMIO_SIZE", "config_u64"]
