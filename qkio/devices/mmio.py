"""The MMIO bus: which device answers a guest load or store outside RAM.

KVM hands userspace every guest access to a physical address that no memory
slot backs as a ``KVM_EXIT_MMIO`` (address, 1-8 bytes, direction, data in the
``kvm_run`` page).  This bus does for those what :class:`~qkio.devices.ioport.PortBus`
does for port I/O: find the device that owns the address, call it with the
offset from the device's base, and put the answer back in the ``kvm_run`` page.

The differences from the port bus follow from the address space:

* it is 64 bits wide, so ownership is a short sorted list of ranges searched
  with :func:`bisect.bisect_right`, not a table with a slot per address (a
  PC has a handful of MMIO devices: here the virtio-mmio transports);
* accesses are 1, 2, 4 or 8 bytes (KVM's ``kvm_run.mmio.len``), the same
  device protocol otherwise: ``io_read(offset, size) -> int`` and
  ``io_write(offset, size, value)``;
* an access that touches no device, or runs off the end of one, reads as 0
  and its write vanishes.  That is what QEMU 7.2 answers, checked in its
  source and live (``tests/test_devices_mmio.py`` runs the
  ``unassigned-mmio`` guest on both): a guest-physical address outside
  every region is ``io_mem_unassigned`` (softmmu/physmem.c, ``io_mem_init``),
  whose ``unassigned_mem_ops`` (softmmu/memory.c) accept nothing, so
  ``memory_region_dispatch_read`` answers with ``unassigned_mem_read``,
  which returns 0, and ``kvm_cpu_exec`` (accel/kvm/kvm-all.c) passes those
  bytes back for ``KVM_EXIT_MMIO`` without looking at the error.  (Port I/O
  differs: QEMU's ``unassigned_io_ops``, softmmu/ioport.c, read all ones,
  and so does :class:`~qkio.devices.ioport.PortBus`.)  One difference
  remains: QEMU hands an access that starts inside a device and runs off
  its end to that device whole (``address_space_translate_internal`` clamps
  only RAM accesses to their region; its comment says why), where qkio's
  devices never see such an access.
* only the first unassigned access to each 4 KiB page is reported, and only
  for the first :data:`REPORT_LIMIT` pages, so that a probing guest (one
  scanning the 4 GiB hole touches a million pages) neither floods the log
  nor grows the record without bound -- the port bus is bounded by its
  64 Ki ports; this bound plays that part.  (The device itself decides
  about unaligned or odd-sized accesses inside its range; a virtio-mmio
  transport, for one, ignores them as QEMU's does.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from qkio.devices.ioport import PortDevice
from qkio.errors import QkioError

#: Sizes KVM reports in ``kvm_run.mmio.len``, and the mask of each.
_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
#: What a load from an address nobody owns reads as (QEMU's ``unassigned_mem_read``).
UNASSIGNED_VALUE = 0
ADDRESS_LIMIT = 1 << 64
#: Distinct pages whose unassigned accesses are reported; later ones are only counted.
REPORT_LIMIT = 64


class MmioConflict(QkioError, ValueError):
    """A device was registered over addresses another device already owns."""


def log_unassigned(addr: int, size: int, is_write: bool) -> None:
    """Default :attr:`MmioBus.on_unassigned`: one line on stderr."""
    what = "write" if is_write else "read"
    tail = "" if is_write else f" reads as {UNASSIGNED_VALUE}"
    print(f"qkio: unassigned memory {addr:#x} ({what}, {size} bytes){tail}", file=sys.stderr)


class MmioBus:
    """Routes guest-physical loads and stores outside RAM to devices."""

    def __init__(self, on_unassigned: Callable[[int, int, bool], None] = log_unassigned):
        self.on_unassigned = on_unassigned
        self._bases: list[int] = []                                # sorted
        self._entries: list[tuple[int, int, PortDevice, str]] = []  # (base, end, device, name), same order
        self._reported: set[int] = set()                           # pages already reported
        self.unreported = 0  # unassigned accesses to pages beyond REPORT_LIMIT
        # The reported pages no device touches, for qkio.native's exit loop
        # (see unowned_pages): slot 0 the count n, slots 1..n the page
        # numbers.  A memoryview of a bytearray rather than an array('Q'):
        # a plain run would load the array extension for it (qkio.record).
        self._unowned = memoryview(bytearray(8 * (1 + REPORT_LIMIT))).cast("Q")

    def register(self, base: int, length: int, device: PortDevice, name: str) -> None:
        """Give guest-physical ``base .. base+length-1`` to ``device``."""
        if length < 1 or base < 0 or base + length > ADDRESS_LIMIT:
            raise ValueError(f"cannot register {name}: {base:#x}+{length:#x} is not a 64-bit range")
        end = base + length
        for other_base, other_end, _, other in self._entries:
            if base < other_end and other_base < end:
                raise MmioConflict(
                    f"cannot register {name} at {base:#x}..{end - 1:#x}: it overlaps "
                    f"{other} ({other_base:#x}..{other_end - 1:#x})")
        import bisect  # here and in find(): a run with no MMIO device never loads the extension
        at = bisect.bisect_right(self._bases, base)
        self._bases.insert(at, base)
        self._entries.insert(at, (base, end, device, name))
        # A page the native loop may answer for must not hold this device.
        pages = self._unowned
        kept = [page for page in pages[1:1 + pages[0]]
                if not (base < (page + 1) << 12 and page << 12 < end)]
        for i, page in enumerate(kept, 1):
            pages[i] = page
        pages[0] = len(kept)

    @property
    def unowned_pages(self) -> memoryview:
        """The pages whose unassigned accesses the native exit loop may complete.

        This is the bus's contract with ``qkio/native/cpu_exec.c``, as
        :attr:`PortBus.table <qkio.devices.ioport.PortBus.table>` is for
        ports: a buffer of native-endian uint64, slot 0 the count *n*, slots
        1 to *n* page numbers (address >> 12) -- pages this bus has already
        reported (:meth:`report_unassigned`) and on which no device owns a
        byte.  The loop completes a ``KVM_EXIT_MMIO`` of 1, 2, 4 or 8 bytes
        whose first and last byte lie on such pages itself, as :meth:`read`
        and :meth:`write` would (a read is :data:`UNASSIGNED_VALUE`, a write
        vanishes), without coming back to Python; everything else comes
        back.  It holds at most :data:`REPORT_LIMIT` pages, whatever the
        guest does: a page is added only when it is reported, so the
        once-per-page and :data:`REPORT_LIMIT` rules are this bus's alone,
        and an access to a page past the limit still comes here to be
        counted in :attr:`unreported`.  Changed only by :meth:`register` and
        :meth:`report_unassigned`, in place, with the global lock held (the
        loop reads it with the lock held too).
        """
        return self._unowned

    def regions(self) -> list[tuple[int, int, str]]:
        """``(base, length, name)`` of every registered device, by base."""
        return [(base, end - base, name) for base, end, _, name in self._entries]

    def find(self, addr: int, size: int = 1):
        """``(device, offset)`` owning ``addr .. addr+size-1`` wholly, or None."""
        if not self._bases:
            return None
        import bisect  # loaded by register() already
        at = bisect.bisect_right(self._bases, addr) - 1
        if at >= 0:
            base, end, device, _ = self._entries[at]
            if addr + size <= end:
                return device, addr - base
        return None

    def read(self, addr: int, size: int) -> int:
        if size not in _MASKS:
            raise ValueError(f"MMIO access size must be 1, 2, 4 or 8, not {size!r}")
        hit = self.find(addr, size)
        if hit is None:
            self.report_unassigned(addr, size, False)
            return UNASSIGNED_VALUE
        return hit[0].io_read(hit[1], size) & _MASKS[size]

    def write(self, addr: int, size: int, value: int) -> None:
        if size not in _MASKS:
            raise ValueError(f"MMIO access size must be 1, 2, 4 or 8, not {size!r}")
        hit = self.find(addr, size)
        if hit is None:
            self.report_unassigned(addr, size, True)
            return
        hit[0].io_write(hit[1], size, value & _MASKS[size])

    def report_unassigned(self, addr: int, size: int, is_write: bool) -> None:
        """Report an access nobody owns through :attr:`on_unassigned` (once per page,
        :data:`REPORT_LIMIT` pages at most).  :func:`qkio.kvm.exits.handle_mmio`
        calls it for an access of a length KVM never reports."""
        page = addr >> 12
        if page in self._reported:
            return
        if len(self._reported) >= REPORT_LIMIT:
            self.unreported += 1
            return
        self._reported.add(page)
        start, end = page << 12, (page + 1) << 12
        if not any(base < end and start < other_end for base, other_end, _, _ in self._entries):
            pages = self._unowned
            pages[1 + pages[0]] = page  # room: one slot per page of _reported
            pages[0] += 1
        self.on_unassigned(addr, size, is_write)
        if len(self._reported) == REPORT_LIMIT:
            print(f"qkio: unassigned memory: {REPORT_LIMIT} pages reported; "
                  f"accesses to further pages are not", file=sys.stderr)
