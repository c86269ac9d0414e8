"""The x86 port I/O bus: which device answers an IN or OUT to a port.

Every ``KVM_EXIT_IO`` the vCPU thread takes ends here, so this is the hottest
Python in qkio after the ``KVM_RUN`` loop itself.  The design follows from that:

* Ownership is a flat table with one slot per port (64 Ki entries).  An access
  costs one list index, one tuple unpack and one call into the device.  Nothing
  is allocated per access; the tuples in the table are built once, in
  :meth:`PortBus.register`.

* A device is any object with ``io_read(offset, size) -> int`` and
  ``io_write(offset, size, value)``; ``offset`` is relative to the base the
  device was registered at, so one UART class serves COM1 at 0x3f8 and COM2 at
  0x2f8 alike.

* A device made of byte registers (the UART) may also offer one handler per
  register: ``byte_readers`` and ``byte_writers``, tuples with an entry per
  port of its range, ``byte_readers[offset]() -> int`` answering exactly what
  ``io_read(offset, 1)`` would and ``byte_writers[offset](value)`` doing
  exactly what ``io_write(offset, 1, value)`` would.  A one-byte access then
  costs one call instead of two (``io_write`` finding the register's handler
  and calling it): qemu-kvm 0.12 kept a function per port and access size
  (``ioport_write_table`` in qemu-kvm-0.12.3's ioport.c).

* A device only ever sees an access that is naturally aligned (``offset`` a
  multiple of ``size``) and lies wholly inside its range.  Anything else -- a
  4-byte OUT that runs off the end of a device, an unaligned 2-byte IN -- is cut
  into pieces the way QEMU's memory core cuts it (``flatview_read_continue`` /
  ``memory_access_size`` in QEMU 7.2): a piece never crosses the boundary of
  the region it starts in, is at most 4 bytes, no wider than the alignment of
  its offset inside that region, and a power of two.  The pieces are put back
  together little-endian.  This only happens on the slow path.

* A port nobody owns behaves like QEMU's ``unassigned_io_ops`` (softmmu/
  ioport.c): reads return all ones of the access size, writes vanish.  That is
  what a guest sees on a PC with nothing on the bus, and what probing code
  such as the 8250 driver's expects.  (Under KVM, a VMM that forgets to fill
  the IN buffer gives 0x00 instead -- KVM zero-fills it -- so being explicit
  here matters.)  The first access to each such port is reported once through
  :attr:`PortBus.on_unassigned`, so that a missing device shows up in the log
  without flooding it from a guest that polls.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from qkio.errors import QkioError

# typing only for the type checker: importing it costs `qkio run` start-up
# time (see qkio.record).  At run time PortDevice is a plain class that
# documents the interface; no device inherits from it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object

#: Number of x86 I/O ports.
PORT_COUNT = 0x10000

#: All ones of each access size: what an unowned port reads as.
_ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}

_SIZES = frozenset(_ALL_ONES)


class PortConflict(QkioError, ValueError):
    """A device was registered over ports another device already owns."""


class PortDevice(Protocol):
    """What :class:`PortBus` needs from a device."""

    def io_read(self, offset: int, size: int) -> int: ...

    def io_write(self, offset: int, size: int, value: int) -> None: ...


#: A port's entry in :attr:`PortBus.table`: (device, base, length, byte_readers, byte_writers).
Entry = tuple  # a plain alias: the precise tuple type would need typing at run time


def _byte_handlers(device, attr: str, length: int, name: str) -> tuple | None:
    """``device.<attr>`` checked: None, or a tuple of ``length`` callables."""
    handlers = getattr(device, attr, None)
    if handlers is None:
        return None
    if type(handlers) is not tuple or len(handlers) != length or not all(map(callable, handlers)):
        raise ValueError(f"cannot register {name}: its {attr} must be a tuple of {length} "
                         f"callables, one per port, not {handlers!r}")
    return handlers


def log_unassigned(port: int, size: int, is_write: bool) -> None:
    """Default :attr:`PortBus.on_unassigned`: one line on stderr."""
    unit = "byte" if size == 1 else "bytes"
    if is_write:
        outcome = "is dropped"
        kind = "write"
    else:
        outcome = f"reads as {_ALL_ONES[size]:#x}"
        kind = "read"
    print(f"qkio: unassigned port {port:#06x} ({kind}, {size} {unit}) {outcome}",
          file=sys.stderr)


class PortBus:
    """Routes port reads and writes to the devices that own the ports.

    ``on_unassigned(port, size, is_write)`` is called the first time each
    unowned port is touched; it defaults to :func:`log_unassigned`.
    """

    def __init__(self,
                 on_unassigned: Callable[[int, int, bool], None] = log_unassigned):
        self.on_unassigned = on_unassigned
        # One slot per port, plus 3 so an access starting at 0xffff can look at
        # the ports it would run into without a bounds check; those extra
        # slots are never owned.  Each owned slot holds (device, base, length,
        # byte_readers, byte_writers): see `table`.
        self._slots: list[Entry | None] = [None] * (PORT_COUNT + 3)
        self._names: dict[int, str] = {}      # base -> name, for messages and regions()
        # One flag per port: 1 once the port, unowned, has been reported.  A
        # bytearray rather than a set so that qkio.native's exit loop can read
        # it: an access to unowned ports already reported is completed there,
        # without coming back to Python (writes dropped, reads all ones).
        self.reported = bytearray(PORT_COUNT + 3)

    # -- set-up ---------------------------------------------------------------

    def register(self, base: int, length: int, device: PortDevice, name: str) -> None:
        """Give ports ``base .. base+length-1`` to ``device``.

        Raises :class:`PortConflict` if any of those ports is already owned, and
        ``ValueError`` if the range does not fit in the 64 KiB port space.
        """
        if length < 1 or base < 0 or base + length > PORT_COUNT:
            raise ValueError(
                f"cannot register {name}: ports {base:#x}+{length:#x} are outside "
                f"0x0..{PORT_COUNT - 1:#x}")
        for port in range(base, base + length):
            owner = self._slots[port]
            if owner is not None:
                other_base, other_len = owner[1], owner[2]
                raise PortConflict(
                    f"cannot register {name} at {base:#x}..{base + length - 1:#x}: "
                    f"port {port:#x} already belongs to {self._names[other_base]} "
                    f"({other_base:#x}..{other_base + other_len - 1:#x})")
        entry = (device, base, length, _byte_handlers(device, "byte_readers", length, name),
                 _byte_handlers(device, "byte_writers", length, name))
        for port in range(base, base + length):
            self._slots[port] = entry
        self._names[base] = name

    @property
    def table(self) -> list[Entry | None]:
        """The port table itself, for the native exit loop (``qkio/native/cpu_exec.c``).

        This is the bus's contract with that file, documented on both sides:
        a ``list`` (exactly) of at least :data:`PORT_COUNT` entries, where
        entry ``port`` is None (nobody owns the port) or the tuple ``(device,
        base, length, byte_readers, byte_writers)`` of the device that owns
        ``base .. base+length-1``, the last two being the device's tuples of
        byte handlers (module docstring), or None if it has none.  The loop
        completes an access itself only when it is one of 1, 2 or 4 bytes,
        lies wholly inside its owner's range and is naturally aligned there
        -- the conditions of :meth:`read`'s and :meth:`write`'s fast paths --
        by calling ``byte_readers[offset]()`` or ``byte_writers[offset](value)``
        for a byte where the device has them, else ``device.io_read(offset,
        size)`` or ``device.io_write(offset, size, value)``; everything else
        comes back to Python.  Read it, never change it: only
        :meth:`register` does.
        """
        return self._slots

    def regions(self) -> list[tuple[int, int, str]]:
        """``(base, length, name)`` of every registered device, by base."""
        out = []
        for base, name in sorted(self._names.items()):
            entry = self._slots[base]
            assert entry is not None
            out.append((base, entry[2], name))
        return out

    # -- the hot path -----------------------------------------------------------

    def read(self, port: int, size: int) -> int:
        """An IN of ``size`` bytes (1, 2 or 4) from ``port``."""
        if size in _SIZES and 0 <= port < PORT_COUNT:
            entry = self._slots[port]
            if entry is not None:
                device, base, length, readers, _ = entry
                offset = port - base
                if size == 1 and readers is not None:
                    return readers[offset]()
                if offset + size <= length and not offset & (size - 1):
                    return device.io_read(offset, size)
        return self._read_slow(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        """An OUT of ``size`` bytes (1, 2 or 4) of ``value`` to ``port``.

        Bits of ``value`` above the access size are ignored.
        """
        if size in _SIZES and 0 <= port < PORT_COUNT:
            entry = self._slots[port]
            if entry is not None:
                device, base, length, _, writers = entry
                offset = port - base
                if size == 1 and writers is not None:
                    writers[offset](value & 0xFF)
                    return
                if offset + size <= length and not offset & (size - 1):
                    device.io_write(offset, size, value & _ALL_ONES[size])
                    return
        self._write_slow(port, size, value)

    # -- the slow path: unowned ports and accesses that must be split -------------

    def _check(self, port: int, size: int) -> None:
        if size not in _SIZES:
            raise ValueError(f"port access size must be 1, 2 or 4, not {size!r}")
        if not 0 <= port < PORT_COUNT:
            raise ValueError(f"port {port!r} is outside 0x0..{PORT_COUNT - 1:#x}")

    def _pieces(self, port: int, size: int):
        """Yield ``(entry, offset, piece_size, shift)`` for each piece of an access.

        ``entry`` is None for an unowned piece, whose ``offset`` is then the port
        itself (QEMU's unassigned region spans the whole space from port 0).
        ``shift`` is where the piece's bytes sit in the whole access's value.
        """
        done = 0
        while done < size:
            p = port + done
            entry = self._slots[p]
            if entry is None:
                # An unowned run ends where the next owned port begins.
                end = p + 1
                while end < port + size and self._slots[end] is None:
                    end += 1
                offset, room = p, end - p
            else:
                offset, room = p - entry[1], entry[1] + entry[2] - p
            n = min(size - done, room)
            if offset & 1:
                n = 1
            elif offset & 2:
                n = min(n, 2)
            if n == 3:
                n = 2
            yield entry, offset, n, 8 * done
            done += n

    def _report(self, port: int, size: int, is_write: bool) -> None:
        if port >= PORT_COUNT:
            # The bytes of an access at 0xfffe or 0xffff that fall past the
            # last port: there is no port 0x10000 to name, and the access was
            # already reported by its first piece.
            return
        end = min(port + size, PORT_COUNT)
        reported = self.reported
        if not all(reported[port:end]):
            reported[port:end] = b"\x01" * (end - port)
            self.on_unassigned(port, size, is_write)

    def _read_slow(self, port: int, size: int) -> int:
        self._check(port, size)
        value = 0
        for entry, offset, n, shift in self._pieces(port, size):
            if entry is None:
                self._report(offset, n, False)
                piece = _ALL_ONES[n]
            else:
                piece = entry[0].io_read(offset, n)
            value |= piece << shift
        return value

    def _write_slow(self, port: int, size: int, value: int) -> None:
        self._check(port, size)
        for entry, offset, n, shift in self._pieces(port, size):
            if entry is None:
                self._report(offset, n, True)
            else:
                entry[0].io_write(offset, n, (value >> shift) & _ALL_ONES[n])

