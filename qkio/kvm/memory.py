"""Guest physical memory: an anonymous mmap that KVM maps into the guest.

The same object backs ``KVM_SET_USER_MEMORY_REGION`` and is what loaders and
devices write through, so every access is bounds-checked here: a bad ELF
header or a confused device gets a ``GuestMemoryError``, never a write past
the end of the mapping.  Nothing here needs /dev/kvm, so loaders are tested
on a ``GuestMemory`` that no VM ever sees.
"""

from __future__ import annotations

import ctypes
import mmap

from ..errors import GuestMemoryError


class GuestMemory:
    """``size`` bytes of zeroed, page-aligned host memory for guest RAM."""

    def __init__(self, size: int):
        if size <= 0 or size % mmap.PAGESIZE:
            raise GuestMemoryError(f"guest memory size must be a positive multiple of {mmap.PAGESIZE}, not {size}")
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # The host virtual address KVM needs (kvm_userspace_memory_region.userspace_addr).
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.host_address = ctypes.addressof(self._anchor)

    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(
                f"guest access [{gpa:#x}, {gpa + length:#x}) is outside guest memory [0, {self.size:#x})")

    def read(self, gpa: int, length: int) -> bytes:
        """``length`` bytes of guest memory from guest-physical address ``gpa``."""
        self._check(gpa, length)
        return self._map[gpa:gpa + length]

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``gpa``, all of it or nothing."""
        self._check(gpa, len(data))
        self._map[gpa:gpa + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable window on ``length`` bytes at ``gpa``, for ``preadv``/``pwritev`` straight
        into or out of guest RAM (a virtio-blk request, with no copy).  Release it
        (``view.release()``) before :meth:`close`."""
        self._check(gpa, length)
        return memoryview(self._map)[gpa:gpa + length]

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes from ``gpa`` to ``byte`` (zeroing a BSS, say).

        Zeroing whole pages is ``madvise(MADV_DONTNEED)``: for a private
        anonymous mapping the kernel drops the pages, and the next touch
        finds a fresh zero page -- so a 2 GiB BSS costs no host memory and no
        time, and only the partial pages at either end are written.  (KVM
        sees the change through its MMU notifier, as it does for any unmap.)
        """
        self._check(gpa, length)
        if byte == 0 and length >= 4 * mmap.PAGESIZE:
            page = mmap.PAGESIZE
            start = -(-gpa // page) * page
            end = (gpa + length) // page * page
            self._map[gpa:start] = bytes(start - gpa)
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
            self._map[end:gpa + length] = bytes(gpa + length - end)
            return
        self._map[gpa:gpa + length] = bytes([byte]) * length

    def read_u32(self, gpa: int) -> int:
        """The little-endian 32-bit value at ``gpa``."""
        return int.from_bytes(self.read(gpa, 4), "little")

    def close(self) -> None:
        """Unmap the memory (idempotent).  Unregister its KVM slot, or close the VM, first."""
        if self._map is not None:
            del self._anchor  # drop the exported buffer, or mmap.close() raises BufferError
            self._map.close()
            self._map = None  # type: ignore[assignment]  # closed: any later access fails

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
