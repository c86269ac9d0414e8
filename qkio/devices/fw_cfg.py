"""QEMU's firmware configuration device (fw_cfg), legacy port I/O interface.

fw_cfg is how QEMU hands facts to firmware (SeaBIOS, OVMF, a test kernel):
RAM size, CPU count, the kernel command line, named files like "etc/e820".
Each fact is an *item* under a 16-bit key.  On the pc machine the guest talks
to it through two ports (QEMU 7.2, hw/nvram/fw_cfg.c, ``fw_cfg_comb_mem_ops``
registered at 0x510 with size ``FW_CFG_CTL_SIZE`` = 2)::

    out 0x510, ax    ; 16-bit write: select item `key`, rewind to its byte 0
    in  al, 0x511    ; 8-bit read: next byte of the item; 0 past its end

The two ports are one 2-byte region with one set of handlers, and the access
*width* decides what happens, not the port:

* a 16-bit write selects (only at 0x510: a 16-bit write at 0x511 would run
  past the region, and QEMU cuts it into bytes);
* an 8-bit read returns the next data byte -- at 0x510 as well as 0x511;
* an 8-bit write is a data write, which QEMU has ignored since 2.4, so
  ``out 0x510, al`` does *not* select anything;
* any other width is refused by the region's ``valid.accepts`` check; QEMU's
  memory core then reads 0 and drops writes, and so does this model.  Note
  that a 32-bit access at 0x510 never gets that far: it runs past the 2-byte
  region, so the bus (like QEMU's) cuts it into a 16-bit access at 0x510 --
  a 32-bit OUT selects its low half -- and two bytes for ports 0x512-0x513.

Items are byte strings.  Multi-byte numbers are little-endian (QEMU's
``fw_cfg_add_i16/i32/i64``), except in the file directory, whose count and
entries are big-endian.  The selected item's bytes are read one at a time,
byte 0 first; past the end, reads return 0 and the offset stays put.  Keys
with no item (or beyond the key space) read as all zeros.

Bit 15 of a key (``FW_CFG_ARCH_LOCAL``) picks a second, architecture-specific
table; bit 14 (``FW_CFG_WRITE_CHANNEL``) is ignored when selecting.  After
reset the signature item is selected, so reading 0x511 straight away gives
"QEMU".

Left out: the DMA interface at 0x514 (QEMU's pc machine has it; FW_CFG_ID
then has bit 1 set).  Without it, firmware falls back to the byte-at-a-time
port, which is all a small guest needs, and FW_CFG_ID says "traditional
interface only".  Also left out: the items pc adds that qkio has no use for
(ACPI tables, e820, SMBIOS, boot menu files).
"""

from __future__ import annotations

import struct

from qkio.errors import QkioError

# Keys, from QEMU's include/standard-headers/linux/qemu_fw_cfg.h.
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_KERNEL_CMDLINE = 0x09
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_DEVICE = 0x0C
FW_CFG_NUMA = 0x0D
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_CMDLINE_ADDR = 0x13
FW_CFG_CMDLINE_SIZE = 0x14
FW_CFG_CMDLINE_DATA = 0x15
FW_CFG_SETUP_ADDR = 0x16
FW_CFG_SETUP_SIZE = 0x17
FW_CFG_SETUP_DATA = 0x18
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20

FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0xFFFF & ~(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL)

#: FW_CFG_ID feature bits.
FW_CFG_VERSION = 0x01       # the traditional selector/data interface
FW_CFG_VERSION_DMA = 0x02   # the DMA interface (not modelled)

#: QEMU 7.2's default number of file slots (``x-file-slots``); keys from
#: FW_CFG_FILE_FIRST up to FW_CFG_FILE_FIRST + slots are selectable.
FW_CFG_FILE_SLOTS = 0x20

#: Where the pc machine puts the selector/data pair, and how many ports it spans.
FW_CFG_IO_BASE = 0x510
FW_CFG_CTL_SIZE = 0x02


class FwCfgError(QkioError, ValueError):
    """An item was added under a key that is taken or cannot be selected."""


class FwCfg:
    """The fw_cfg selector/data ports, with the items QEMU's pc machine sets.

    ``nb_cpus`` is what QEMU's pc machine puts in FW_CFG_NB_CPUS: the CPUs
    running at boot (``-smp cpus=``).  FW_CFG_MAX_CPUS holds, for old-BIOS
    compatibility, the APIC ID limit -- one more than the highest APIC ID a
    CPU may have.  With qkio's flat topology (APIC ID = CPU index) that is
    ``max_cpus`` (``-smp maxcpus=``), which defaults to ``nb_cpus`` as in QEMU.
    """

    def __init__(self, ram_size: int, nb_cpus: int, max_cpus: int | None = None):
        if max_cpus is None:
            max_cpus = nb_cpus
        if not 1 <= nb_cpus <= max_cpus <= 0xFFFF:
            raise FwCfgError(
                f"need 1 <= nb_cpus <= max_cpus <= 65535, got {nb_cpus} and {max_cpus}")
        self._entries: dict[int, bytes] = {}
        self.cur_entry = -1
        self.cur_offset = 0
        self._cur_data = b""
        self.add_bytes(FW_CFG_SIGNATURE, b"QEMU")
        self.add_i32(FW_CFG_ID, FW_CFG_VERSION)
        self.add_bytes(FW_CFG_UUID, bytes(16))  # QEMU's default, no -uuid
        self.add_i64(FW_CFG_RAM_SIZE, ram_size)
        self.add_i16(FW_CFG_NOGRAPHIC, 1)       # qkio has no display
        self.add_i16(FW_CFG_NB_CPUS, nb_cpus)
        self.add_i16(FW_CFG_BOOT_MENU, 0)
        self.add_i16(FW_CFG_MAX_CPUS, max_cpus)
        # The file directory: a big-endian count, then 64-byte entries.  No
        # files, so just the count.  (QEMU sizes it for every slot; the extra
        # bytes are zeros, which is also what reading past the end gives.)
        self.add_bytes(FW_CFG_FILE_DIR, struct.pack(">I", 0))
        self.reset()

    def reset(self) -> None:
        """Select the signature, as QEMU's fw_cfg_reset does."""
        self.select(FW_CFG_SIGNATURE)

    # -- items -----------------------------------------------------------------

    @staticmethod
    def _slot(key: int) -> int:
        """The table slot a key selects, or -1 if it selects nothing."""
        key &= 0xFFFF
        if key & FW_CFG_ENTRY_MASK >= FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS:
            return -1
        return key & ~FW_CFG_WRITE_CHANNEL

    def add_bytes(self, key: int, data: bytes) -> None:
        """Add an item.  Raises :class:`FwCfgError` if the key is taken (QEMU
        asserts) or outside the selectable keys."""
        slot = self._slot(key) if 0 <= key <= 0xFFFF else -1
        if slot < 0 or key & FW_CFG_WRITE_CHANNEL:
            raise FwCfgError(f"fw_cfg key {key:#x} cannot be selected by a guest")
        if slot in self._entries:
            raise FwCfgError(f"fw_cfg key {key:#x} already has an item")
        self._entries[slot] = bytes(data)
        if self.cur_entry == slot:
            self._cur_data = self._entries[slot]

    def add_i16(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<H", value))

    def add_i32(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<I", value))

    def add_i64(self, key: int, value: int) -> None:
        self.add_bytes(key, struct.pack("<Q", value))

    def item(self, key: int) -> bytes | None:
        """The bytes stored under ``key``, or None."""
        slot = self._slot(key)
        return self._entries.get(slot) if slot >= 0 else None

    # -- the guest's view ---------------------------------------------------------

    def select(self, key: int) -> None:
        """What a 16-bit write to the selector does."""
        self.cur_offset = 0
        slot = self._slot(key)
        self.cur_entry = slot  # -1 plays QEMU's FW_CFG_INVALID
        self._cur_data = self._entries.get(slot, b"")

    def read_data(self) -> int:
        """What an 8-bit read of the data port does."""
        data, offset = self._cur_data, self.cur_offset
        if offset < len(data):
            self.cur_offset = offset + 1
            return data[offset]
        return 0

    def io_read(self, offset: int, size: int) -> int:
        if size == 1:
            return self.read_data()
        return 0  # a refused access

    def io_write(self, offset: int, size: int, value: int) -> None:
        if size == 2:
            self.select(value)
        # size 1: a data write, ignored since QEMU 2.4; size 4: refused.
