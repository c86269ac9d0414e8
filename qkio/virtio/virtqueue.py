"""The split virtqueue, device side (virtio 1.x, section 2.7 "Split Virtqueues").

Three areas in guest memory, placed by the driver:

* the **descriptor table**: ``size`` entries of 16 bytes -- le64 addr, le32
  len, le16 flags (NEXT=1, WRITE=2, INDIRECT=4), le16 next;
* the **driver area** (available ring): le16 flags, le16 idx, le16 ring[size];
* the **device area** (used ring): le16 flags, le16 idx, then ``size`` elements
  of le32 id (the chain's head) and le32 len (bytes the device wrote).

The driver writes chains and bumps ``avail.idx``; the device takes chains in
order (:meth:`VirtQueue.pop`), does the work, writes a used element and bumps
``used.idx`` (:meth:`VirtQueue.push`).  Both indices are free-running 16-bit
counters; a slot is ``idx % size``.

Everything here is read from memory the guest controls while it runs, so
nothing is trusted.  A driver that breaks the ring's rules -- a head or
``next`` past the table, a chain longer than the table (a loop), a buffer
outside guest RAM, a device-readable buffer after a device-writable one,
``INDIRECT`` without the feature, ``avail.idx`` more than ``size`` ahead --
gets :class:`VirtqueueError`.  The device then stops using the queue and
sets ``DEVICE_NEEDS_RESET`` (section 2.1.2), as QEMU's ``virtio_error`` does.
Guest memory is only ever touched through :class:`GuestMemory`, which checks
every access, so a lying driver cannot make the VMM read or write anything
but guest RAM.
"""

from __future__ import annotations

import struct

from ..errors import GuestMemoryError, QkioError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class VirtqueueError(QkioError):
    """The driver broke the virtqueue's rules; the device needs a reset."""


class Chain:
    """One descriptor chain: its head index and its buffers, device-readable first.

    ``readable`` and ``writable`` are lists of ``(guest address, length)``;
    the order is the chain's.
    """

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[tuple[int, int]], writable: list[tuple[int, int]]):
        self.head, self.readable, self.writable = head, readable, writable

    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def __repr__(self) -> str:
        return f"Chain(head={self.head}, readable={self.readable}, writable={self.writable})"


class VirtQueue:
    """One split virtqueue over ``memory`` (a :class:`~qkio.kvm.memory.GuestMemory`)."""

    def __init__(self, memory, max_size: int = 256):
        self.memory = memory
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size   # QueueNum: the driver may lower it
        self.ready = False
        self.desc = self.avail = self.used = 0
        self.last_avail_idx = 0     # next avail slot the device will take
        self.used_idx = 0           # next used slot the device will fill
        self.popped = self.pushed = 0

    # -- reading what the driver wrote ------------------------------------------

    def _u16(self, gpa: int) -> int:
        return _U16.unpack(self.memory.read(gpa, 2))[0]

    def avail_idx(self) -> int:
        try:
            return self._u16(self.avail + 2)
        except GuestMemoryError as e:
            raise VirtqueueError(f"available ring outside guest memory: {e}") from None

    def has_work(self) -> bool:
        return self.avail_idx() != self.last_avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, or None if the driver has made none available."""
        avail_idx = self.avail_idx()
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"avail.idx {avail_idx} is {pending} ahead of the device's "
                                 f"{self.last_avail_idx}, more than the queue's {self.size} entries")
        try:
            head = self._u16(self.avail + 4 + 2 * (self.last_avail_idx % self.size))
        except GuestMemoryError as e:
            raise VirtqueueError(f"available ring outside guest memory: {e}") from None
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        self.popped += 1
        return chain

    def _walk(self, head: int) -> Chain:
        size, memory = self.size, self.memory
        if head >= size:
            raise VirtqueueError(f"chain head {head} is outside the {size}-entry descriptor table")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        index = head
        for _ in range(size):  # a chain can use each descriptor once: more is a loop
            try:
                addr, length, flags, nxt = _DESC.unpack(memory.read(self.desc + 16 * index, 16))
            except GuestMemoryError as e:
                raise VirtqueueError(f"descriptor table outside guest memory: {e}") from None
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise VirtqueueError(f"descriptor {index} is INDIRECT, a feature the device did not offer")
            if addr + length > memory.size or addr < 0:
                raise VirtqueueError(f"descriptor {index} points at [{addr:#x}, {addr + length:#x}), "
                                     f"outside guest memory [0, {memory.size:#x})")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtqueueError(f"descriptor {index} is device-readable but follows a "
                                     f"device-writable one (section 2.7.4.2)")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            if nxt >= size:
                raise VirtqueueError(f"descriptor {index}'s next is {nxt}, outside the "
                                     f"{size}-entry table")
            index = nxt
        raise VirtqueueError(f"the chain from head {head} is longer than the table: a loop")

    # -- giving chains back ------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written into its writable buffers.

        The element is stored before the index, so a driver that sees the new
        ``used.idx`` also sees the element (x86 keeps stores in order).
        """
        slot = self.used_idx % self.size
        try:
            self.memory.write(self.used + 4 + 8 * slot, _USED_ELEM.pack(head, written))
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            self.memory.write(self.used + 2, _U16.pack(self.used_idx))
        except GuestMemoryError as e:
            raise VirtqueueError(f"used ring outside guest memory: {e}") from None
        self.pushed += 1

    def check_layout(self) -> None:
        """Refuse rings that do not lie in guest RAM or are misaligned (section 2.7, table 2.4)."""
        size, end = self.size, self.memory.size
        areas = (("descriptor table", self.desc, 16 * size, 16),
                 ("driver area", self.avail, 6 + 2 * size, 2),
                 ("device area", self.used, 6 + 8 * size, 4))
        for name, addr, length, align in areas:
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if addr + length > end:
                raise VirtqueueError(f"{name} [{addr:#x}, {addr + length:#x}) is outside guest memory")
