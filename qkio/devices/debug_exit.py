"""QEMU's ``isa-debug-exit``: a port a test guest writes to in order to stop.

A guest that wants to end a test run -- and say whether it passed -- writes a
value V of any width to the device's ports.  QEMU 7.2 (hw/misc/debugexit.c)
then calls ``exit((V << 1) | 1)`` on the spot.  The shift-and-set-bit-0 means
the status is always odd, so a guest can never make QEMU exit 0: a test
harness can tell "the guest asked to stop" (odd) from "QEMU itself ended
normally" (0).  The usual convention is V=0 -> 1 for success, V=1 -> 3 for
failure.  A process exit status is 8 bits, so the kernel keeps only the low
byte of what ``exit`` was given: V=0x80 ends QEMU with status 1, as does
V=0x80000000.

Reads do nothing and return 0, as QEMU's do.  That is the only way a guest can
probe for the device: an unassigned port would read as all ones.

QEMU's defaults are iobase=0x501, iosize=2; the common invocation
``-device isa-debug-exit,iobase=0xf4,iosize=0x04`` is what qkio mirrors.  A
write to any of the ``iosize`` ports exits.  The bus cuts a write that is
unaligned or runs past the last port into pieces, so ``on_exit`` can be called
more than once for one OUT; the first call is the one QEMU would have acted
on.
"""

from __future__ import annotations

from collections.abc import Callable

#: Where qkio puts the device, as ``-device isa-debug-exit,iobase=0xf4,iosize=0x04``.
ISA_DEBUG_EXIT_IOBASE = 0xF4
ISA_DEBUG_EXIT_IOSIZE = 0x04


def exit_status(value: int) -> int:
    """The status QEMU's process ends with after the guest writes ``value``."""
    return ((value << 1) | 1) & 0xFF


class IsaDebugExit:
    """Calls ``on_exit(status)`` when the guest writes to it.

    ``status`` is :func:`exit_status` of the written value, already cut to the
    8 bits a process can return, so ``sys.exit(status)`` reproduces QEMU.
    ``last_value`` keeps the full value written, for reports.
    """

    def __init__(self, on_exit: Callable[[int], None]):
        self.on_exit = on_exit
        self.last_value: int | None = None

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.last_value = value
        self.on_exit(exit_status(value))
