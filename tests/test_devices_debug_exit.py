"""isa-debug-exit: QEMU 7.2 calls exit((V << 1) | 1) on any write."""

import pytest

from qkio.devices.debug_exit import (
    ISA_DEBUG_EXIT_IOBASE,
    ISA_DEBUG_EXIT_IOSIZE,
    IsaDebugExit,
    exit_status,
)
from qkio.devices.ioport import PortBus


def machine():
    statuses = []
    dev = IsaDebugExit(statuses.append)
    bus = PortBus(on_unassigned=lambda *a: None)
    bus.register(ISA_DEBUG_EXIT_IOBASE, ISA_DEBUG_EXIT_IOSIZE, dev, "isa-debug-exit")
    return dev, bus, statuses


@pytest.mark.parametrize("value,status", [
    (0, 1), (1, 3), (0x10, 0x21), (0x31, 0x63), (0x7F, 0xFF),
    (0x80, 0x01),                     # only the low 8 bits of the status survive
])
def test_byte_writes(value, status):
    _, bus, statuses = machine()
    bus.write(0xF4, 1, value)
    assert statuses == [status]


@pytest.mark.parametrize("value,status", [
    (0x00000000, 1), (0x00000001, 3), (0x12345678, 0xF1),
    (0x80000000, 1), (0xFFFFFFFF, 0xFF),
])
def test_32bit_writes(value, status):
    dev, bus, statuses = machine()
    bus.write(0xF4, 4, value)
    assert statuses == [status]
    assert dev.last_value == value


def test_16bit_write_and_other_ports():
    _, bus, statuses = machine()
    bus.write(0xF6, 2, 0x0008)
    bus.write(0xF7, 1, 2)
    assert statuses == [0x11, 0x05]


def test_status_is_always_odd():
    assert all(exit_status(v) & 1 for v in range(1024))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_reads_return_zero_and_do_not_exit(size):
    _, bus, statuses = machine()
    assert bus.read(0xF4, size) == 0
    assert statuses == []
