"""PortBus: ownership, unowned ports, and how accesses are cut into pieces."""

import pytest

from qkio.devices.ioport import PortBus, PortConflict, log_unassigned
from qkio.errors import QkioError


class Recorder:
    """A device that logs every access and reads back a fixed pattern."""

    def __init__(self):
        self.log = []

    def io_read(self, offset, size):
        self.log.append(("r", offset, size))
        # Byte at offset k reads as 0x10 + k, so pieces can be checked.
        return sum((0x10 + offset + i) << (8 * i) for i in range(size))

    def io_write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def quiet_bus():
    reports = []
    bus = PortBus(on_unassigned=lambda *a: reports.append(a))
    return bus, reports


def test_read_and_write_reach_the_device_with_relative_offsets():
    bus, _ = quiet_bus()
    dev = Recorder()
    bus.register(0x3F8, 8, dev, "com1")
    assert bus.read(0x3FD, 1) == 0x15
    bus.write(0x3F8, 1, 0x41)
    bus.write(0x3FC, 4, 0x12345678)
    assert dev.log == [("r", 5, 1), ("w", 0, 1, 0x41), ("w", 4, 4, 0x12345678)]


def test_write_value_is_cut_to_the_access_size():
    bus, _ = quiet_bus()
    dev = Recorder()
    bus.register(0x80, 4, dev, "d")
    bus.write(0x80, 1, 0x1FF)
    bus.write(0x80, 2, -1)
    assert dev.log == [("w", 0, 1, 0xFF), ("w", 0, 2, 0xFFFF)]


def test_overlap_is_refused_with_both_names():
    bus, _ = quiet_bus()
    bus.register(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(PortConflict) as exc:
        bus.register(0x3FF, 2, Recorder(), "intruder")
    msg = str(exc.value)
    assert "intruder" in msg and "com1" in msg and "0x3ff" in msg
    assert isinstance(exc.value, QkioError)
    # The failed registration left nothing behind.
    bus.register(0x400, 1, Recorder(), "next door")
    assert [r[2] for r in bus.regions()] == ["com1", "next door"]


@pytest.mark.parametrize("base,length", [(-1, 2), (0xFFFF, 2), (0, 0), (0x10000, 1)])
def test_ranges_outside_the_port_space_are_refused(base, length):
    bus, _ = quiet_bus()
    with pytest.raises(ValueError):
        bus.register(base, length, Recorder(), "bad")


def test_adjacent_devices_are_fine():
    bus, _ = quiet_bus()
    bus.register(0x510, 2, Recorder(), "a")
    bus.register(0x512, 2, Recorder(), "b")
    bus.register(0x50F, 1, Recorder(), "c")


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_unowned_ports_read_all_ones_and_are_reported_once(size, ones):
    bus, reports = quiet_bus()
    assert bus.read(0x1234, size) == ones
    assert bus.read(0x1234, size) == ones
    bus.write(0x1234, size, 0)
    assert reports == [(0x1234, size, False)]


def test_each_unowned_port_is_reported_once():
    bus, reports = quiet_bus()
    bus.write(0xCF8, 4, 0x80000000)
    bus.read(0xCFC, 1)
    bus.read(0xCF9, 1)   # already covered by the 4-byte write
    bus.read(0xCFD, 1)
    assert reports == [(0xCF8, 4, True), (0xCFC, 1, False), (0xCFD, 1, False)]


def test_default_report_is_one_line_on_stderr(capsys):
    bus = PortBus()
    assert bus.on_unassigned is log_unassigned
    bus.read(0x1234, 1)
    bus.read(0x1234, 1)
    bus.write(0x80, 2, 7)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "qkio: unassigned port 0x1234 (read, 1 byte) reads as 0xff",
        "qkio: unassigned port 0x0080 (write, 2 bytes) is dropped",
    ]


@pytest.mark.parametrize("size", [0, 3, 8, -1])
def test_bad_sizes_are_value_errors(size):
    bus, _ = quiet_bus()
    bus.register(0x10, 8, Recorder(), "d")
    with pytest.raises(ValueError):
        bus.read(0x10, size)
    with pytest.raises(ValueError):
        bus.write(0x10, size, 0)


@pytest.mark.parametrize("port", [-1, 0x10000])
def test_bad_ports_are_value_errors(port):
    bus, _ = quiet_bus()
    with pytest.raises(ValueError):
        bus.read(port, 1)
    with pytest.raises(ValueError):
        bus.write(port, 1, 0)


def test_access_running_off_the_end_is_split_at_the_boundary():
    # A 4-byte read at the last two ports of a device: 2 bytes from the device
    # (aligned at offset 6), 2 from the unowned ports after it.
    bus, reports = quiet_bus()
    dev = Recorder()
    bus.register(0x3F8, 8, dev, "com1")
    assert bus.read(0x3FE, 4) == 0xFFFF0000 | 0x1716
    assert dev.log == [("r", 6, 2)]
    assert reports == [(0x400, 2, False)]


def test_unaligned_access_is_cut_into_aligned_pieces():
    bus, _ = quiet_bus()
    dev = Recorder()
    bus.register(0x100, 8, dev, "d")
    bus.write(0x101, 4, 0x44332211)
    assert dev.log == [("w", 1, 1, 0x11), ("w", 2, 2, 0x3322), ("w", 4, 1, 0x44)]


def test_access_starting_before_a_device_reaches_it():
    # As in QEMU: one unowned byte, then a 2-byte piece at the device's start.
    bus, reports = quiet_bus()
    dev = Recorder()
    bus.register(0x510, 2, dev, "fw_cfg")
    bus.write(0x50F, 4, 0xDDCCBBAA)
    assert dev.log == [("w", 0, 2, 0xCCBB)]
    assert reports == [(0x50F, 1, True), (0x512, 1, True)]


def test_access_at_the_top_of_the_port_space():
    bus, reports = quiet_bus()
    dev = Recorder()
    bus.register(0xFFFE, 2, dev, "top")
    assert bus.read(0xFFFF, 2) == 0xFF11
    assert dev.log == [("r", 1, 1)]


class ByteRegisters(Recorder):
    """A Recorder with a handler per byte register (as the UART has)."""

    def __init__(self, length=2):
        super().__init__()
        self.byte_readers = tuple(lambda o=o: self._readb(o) for o in range(length))
        self.byte_writers = tuple(lambda v, o=o: self.log.append(("wb", o, v)) for o in range(length))

    def _readb(self, offset):
        self.log.append(("rb", offset))
        return 0x40 + offset


def test_byte_accesses_use_the_byte_handlers_and_wider_ones_io_read_write():
    bus, _ = quiet_bus()
    dev = ByteRegisters()
    bus.register(0x60, 2, dev, "kbd")
    assert bus.read(0x61, 1) == 0x41
    bus.write(0x60, 1, 0x1FF)           # cut to the byte, as for io_write
    bus.read(0x60, 2)
    bus.write(0x60, 2, 0xBEEF)
    assert dev.log == [("rb", 1), ("wb", 0, 0xFF), ("r", 0, 2), ("w", 0, 2, 0xBEEF)]
    assert bus.table[0x61] == (dev, 0x60, 2, dev.byte_readers, dev.byte_writers)
    bus.register(0x70, 1, Recorder(), "plain")
    assert bus.table[0x70][3:] == (None, None)


@pytest.mark.parametrize("handlers", [[print, print], (print,), (print, 3)])
def test_byte_handlers_must_be_a_tuple_of_one_callable_per_port(handlers):
    dev = Recorder()
    dev.byte_writers = handlers
    with pytest.raises(ValueError, match="byte_writers must be a tuple of 2 callables"):
        quiet_bus()[0].register(0x60, 2, dev, "kbd")
