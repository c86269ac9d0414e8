"""fw_cfg through the pc machine's ports 0x510/0x511, as QEMU 7.2 answers them."""

import struct

import pytest

from qkio.devices.fw_cfg import (
    FW_CFG_ARCH_LOCAL,
    FW_CFG_CTL_SIZE,
    FW_CFG_FILE_DIR,
    FW_CFG_ID,
    FW_CFG_IO_BASE,
    FW_CFG_MAX_CPUS,
    FW_CFG_NB_CPUS,
    FW_CFG_NOGRAPHIC,
    FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE,
    FW_CFG_WRITE_CHANNEL,
    FwCfg,
    FwCfgError,
)
from qkio.devices.ioport import PortBus
from qkio.errors import QkioError

SEL, DATA = 0x510, 0x511


def machine(ram=128 << 20, cpus=2, max_cpus=None):
    fw = FwCfg(ram, cpus, max_cpus)
    bus = PortBus(on_unassigned=lambda *a: None)
    bus.register(FW_CFG_IO_BASE, FW_CFG_CTL_SIZE, fw, "fw_cfg")
    return fw, bus


def read_item(bus, key, n):
    bus.write(SEL, 2, key)
    return bytes(bus.read(DATA, 1) for _ in range(n))


def test_signature():
    _, bus = machine()
    assert read_item(bus, FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_signature_is_selected_after_reset():
    fw, bus = machine()
    assert bytes(bus.read(DATA, 1) for _ in range(4)) == b"QEMU"
    bus.write(SEL, 2, FW_CFG_RAM_SIZE)
    fw.reset()
    assert bus.read(DATA, 1) == ord("Q")


def test_id_says_traditional_interface_only():
    _, bus = machine()
    assert struct.unpack("<I", read_item(bus, FW_CFG_ID, 4)) == (1,)


def test_ram_size_is_u64_le():
    _, bus = machine(ram=0x1_2345_6000)
    assert struct.unpack("<Q", read_item(bus, FW_CFG_RAM_SIZE, 8)) == (0x1_2345_6000,)


def test_cpus_boot_and_max():
    _, bus = machine(cpus=2, max_cpus=8)
    assert struct.unpack("<H", read_item(bus, FW_CFG_NB_CPUS, 2)) == (2,)
    assert struct.unpack("<H", read_item(bus, FW_CFG_MAX_CPUS, 2)) == (8,)


def test_max_cpus_defaults_to_nb_cpus():
    _, bus = machine(cpus=3)
    assert struct.unpack("<H", read_item(bus, FW_CFG_MAX_CPUS, 2)) == (3,)


def test_nographic():
    _, bus = machine()
    assert read_item(bus, FW_CFG_NOGRAPHIC, 2) == b"\x01\x00"


def test_file_dir_is_a_big_endian_zero_count():
    _, bus = machine()
    assert read_item(bus, FW_CFG_FILE_DIR, 4) == b"\0\0\0\0"


def test_reading_past_the_end_gives_zeros():
    _, bus = machine()
    assert read_item(bus, FW_CFG_SIGNATURE, 8) == b"QEMU\0\0\0\0"


def test_selecting_rewinds():
    _, bus = machine()
    bus.write(SEL, 2, FW_CFG_SIGNATURE)
    bus.read(DATA, 1)
    bus.read(DATA, 1)
    assert read_item(bus, FW_CFG_SIGNATURE, 2) == b"QE"


@pytest.mark.parametrize("key", [0x0006, 0x001F, 0x0020, 0x003F, 0x0040, 0x3FFF,
                                 FW_CFG_ARCH_LOCAL, 0xFFFF])
def test_unknown_keys_read_zero(key):
    _, bus = machine()
    assert read_item(bus, key, 4) == b"\0\0\0\0"


def test_write_channel_bit_is_ignored_when_selecting():
    _, bus = machine()
    assert read_item(bus, FW_CFG_WRITE_CHANNEL | FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_arch_local_keys_are_a_separate_table():
    fw, bus = machine()
    fw.add_bytes(FW_CFG_ARCH_LOCAL | 0x03, b"e820")
    assert read_item(bus, FW_CFG_ARCH_LOCAL | 0x03, 4) == b"e820"
    assert struct.unpack("<Q", read_item(bus, FW_CFG_RAM_SIZE, 8)) == (128 << 20,)


def test_data_port_read_at_the_selector_port_too():
    # QEMU's combined region reads data at either port.
    _, bus = machine()
    bus.write(SEL, 2, FW_CFG_SIGNATURE)
    assert bytes([bus.read(SEL, 1), bus.read(DATA, 1)]) == b"QE"


def test_8bit_write_to_selector_does_not_select():
    _, bus = machine()
    bus.write(SEL, 2, FW_CFG_RAM_SIZE)
    bus.write(SEL, 1, FW_CFG_SIGNATURE)     # a data write: ignored
    bus.write(DATA, 1, 0x55)                # likewise
    assert struct.unpack("<Q", bytes(bus.read(DATA, 1) for _ in range(8))) == (128 << 20,)


def test_wide_reads_are_refused_and_read_zero():
    _, bus = machine()
    bus.write(SEL, 2, FW_CFG_SIGNATURE)
    assert bus.read(SEL, 2) == 0
    assert bus.read(DATA, 1) == ord("Q")    # the refused read moved nothing


def test_32bit_access_is_cut_at_the_end_of_the_region():
    # The region is 2 bytes, so a 4-byte OUT at 0x510 becomes a 2-byte select
    # of the low half plus 2 bytes to the unowned ports 0x512-0x513, just as
    # QEMU's flatview_write_continue cuts it.
    _, bus = machine()
    bus.write(SEL, 2, FW_CFG_RAM_SIZE)
    bus.write(SEL, 4, 0xABCD0000 | FW_CFG_SIGNATURE)
    assert bus.read(DATA, 1) == ord("Q")
    # A 4-byte IN: a refused 2-byte read (0) plus two unowned ports.
    assert bus.read(SEL, 4) == 0xFFFF0000
    assert bus.read(DATA, 1) == ord("E")


def test_direct_refused_accesses():
    fw = FwCfg(1 << 20, 1)
    fw.io_write(0, 4, FW_CFG_RAM_SIZE)
    assert fw.io_read(0, 4) == 0
    assert fw.io_read(1, 1) == ord("Q")


def test_add_bytes_and_helpers():
    fw, bus = machine()
    fw.add_bytes(0x20, b"hello")
    fw.add_i32(0x0A, 0xDEADBEEF)
    assert read_item(bus, 0x20, 6) == b"hello\0"
    assert read_item(bus, 0x0A, 4) == bytes.fromhex("efbeadde")
    assert fw.item(0x20) == b"hello"
    assert fw.item(0x21) is None


def test_adding_to_the_selected_key_is_visible():
    fw, bus = machine()
    bus.write(SEL, 2, 0x09)
    fw.add_bytes(0x09, b"console=ttyS0")
    assert bus.read(DATA, 1) == ord("c")


@pytest.mark.parametrize("key", [FW_CFG_SIGNATURE, 0x40, 0x4005, -1, 0x10000])
def test_add_bytes_refuses_taken_or_unselectable_keys(key):
    fw, _ = machine()
    with pytest.raises(FwCfgError) as exc:
        fw.add_bytes(key, b"x")
    assert isinstance(exc.value, QkioError)


@pytest.mark.parametrize("cpus,max_cpus", [(0, None), (4, 2), (1, 0x10000)])
def test_bad_cpu_counts(cpus, max_cpus):
    with pytest.raises(FwCfgError):
        FwCfg(1 << 20, cpus, max_cpus)
