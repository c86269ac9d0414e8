"""The MMIO bus: dispatch by address, unassigned accesses, and a real guest's
``KVM_EXIT_MMIO`` accesses reaching a device through :class:`qkio.machine.Machine`."""

from __future__ import annotations

import subprocess

import pytest

from helpers.vmm import demo_guest
from qkio.bench.guest_run import GUEST_EXIT_STATUS, QEMU, QEMU_ARGS, qemu_unusable_reason
from qkio.devices.mmio import REPORT_LIMIT, MmioBus, MmioConflict
from qkio.kvm.constants import ExitReason
from qkio.kvm.exits import handle_mmio
from qkio.kvm.structs import kvm_run


class Recorder:
    """A device that remembers writes and answers reads with base_value + offset."""

    def __init__(self, base_value: int = 0x12345678):
        self.base_value = base_value
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []

    def io_read(self, offset, size):
        self.reads.append((offset, size))
        return self.base_value + offset

    def io_write(self, offset, size, value):
        self.writes.append((offset, size, value))


def quiet_bus():
    seen = []
    return MmioBus(on_unassigned=lambda *a: seen.append(a)), seen


def test_accesses_reach_the_owner_with_offsets():
    bus, _ = quiet_bus()
    a, b = Recorder(0x100), Recorder(0x200)
    bus.register(0xFEB00000, 0x200, a, "a")
    bus.register(0xFEB00200, 0x200, b, "b")
    assert bus.read(0xFEB00004, 4) == 0x104
    assert bus.read(0xFEB00208, 2) == 0x208
    bus.write(0xFEB003FC, 4, 0xDEADBEEF)
    bus.write(0xFEB00000, 8, 0x1122334455667788)
    assert b.writes == [(0x1FC, 4, 0xDEADBEEF)]
    assert a.writes == [(0, 8, 0x1122334455667788)]
    assert bus.regions() == [(0xFEB00000, 0x200, "a"), (0xFEB00200, 0x200, "b")]


def test_overlap_is_refused_and_names_both():
    bus, _ = quiet_bus()
    bus.register(0x1000, 0x100, Recorder(), "first")
    with pytest.raises(MmioConflict, match="first"):
        bus.register(0x10FF, 0x10, Recorder(), "second")
    bus.register(0x1100, 0x10, Recorder(), "adjacent")  # touching is fine
    with pytest.raises(ValueError):
        bus.register(-1, 4, Recorder(), "negative")
    with pytest.raises(ValueError):
        bus.register((1 << 64) - 2, 4, Recorder(), "wraps")


def test_unassigned_reads_0_and_is_reported_once_per_page():
    bus, seen = quiet_bus()
    dev = Recorder()
    bus.register(0x2000, 0x10, dev, "dev")
    assert bus.read(0x5000, 4) == 0
    assert bus.read(0x5004, 8) == 0
    bus.write(0x5008, 1, 7)
    # Running off the end of a device is unassigned too, and the device never sees it.
    assert bus.read(0x200E, 4) == 0
    assert dev.reads == []
    assert seen == [(0x5000, 4, False), (0x200E, 4, False)]
    with pytest.raises(ValueError):
        bus.read(0x2000, 3)


def test_handle_mmio_on_a_kvm_run_page():
    import struct
    bus, _ = quiet_bus()
    dev = Recorder(0xA0B0C0D0)
    bus.register(0xFEB00000, 0x200, dev, "dev")
    page = bytearray(4096)
    at = kvm_run.exit.offset  # the exit union: kvm_run.mmio is at its start
    struct.pack_into("=Q8sIB", page, at, 0xFEB00010, b"\0" * 8, 4, 0)
    handle_mmio(bus, page)
    assert int.from_bytes(page[at + 8:at + 12], "little") == 0xA0B0C0E0
    struct.pack_into("=Q8sIB", page, at, 0xFEB00020, (0x55AA).to_bytes(8, "little"), 2, 1)
    handle_mmio(bus, page)
    assert dev.writes == [(0x20, 2, 0x55AA)]
    # A length KVM never reports is not trusted: 0, nothing dispatched.
    struct.pack_into("=Q8sIB", page, at, 0xFEB00020, b"\x5a" * 8, 3, 0)
    handle_mmio(bus, page)
    assert page[at + 8:at + 16] == bytes(8) and len(dev.reads) == 1


# A protected-mode guest: read 4 bytes at 0xfeb00000, add 1, store them at
# +8; read 1 byte at +3, store it at +0xc; read unassigned 0xd0000000 and
# store what came back at +0x10; then isa-debug-exit 0x10.
MMIO_GUEST = bytes([
    0xA1, 0x00, 0x00, 0xB0, 0xFE,        # mov eax, [0xfeb00000]
    0x40,                                # inc eax
    0xA3, 0x08, 0x00, 0xB0, 0xFE,        # mov [0xfeb00008], eax
    0xA0, 0x03, 0x00, 0xB0, 0xFE,        # mov al, [0xfeb00003]
    0xA2, 0x0C, 0x00, 0xB0, 0xFE,        # mov [0xfeb0000c], al
    0xA1, 0x00, 0x00, 0x00, 0xD0,        # mov eax, [0xd0000000]
    0xA3, 0x10, 0x00, 0xB0, 0xFE,        # mov [0xfeb00010], eax
    0x66, 0xBA, 0xF4, 0x00,              # mov dx, 0xf4
    0xB8, 0x10, 0x00, 0x00, 0x00,        # mov eax, 0x10
    0xEF,                                # out dx, eax
])


@pytest.mark.kvm
def test_guest_mmio_exits_reach_the_device():
    from qkio.machine import Machine
    logged = []
    dev = Recorder(0x12345678)
    with Machine(memory_mib=4, console=lambda d: None, log=logged.append) as machine:
        machine.mmio_bus.register(0xFEB00000, 0x200, dev, "recorder")
        machine.load_flat(MMIO_GUEST, mode="protected", address=0x100000)
        assert machine.run(timeout=30) == 33
        exits = machine.cpus[0].exit_counts
    assert dev.reads == [(0, 4), (3, 1)]
    assert dev.writes == [(8, 4, 0x12345679), (0xC, 1, 0x7B), (0x10, 4, 0)]
    assert exits[ExitReason.MMIO] == 6
    assert logged == ["unassigned memory 0xd0000000 (read, 4 bytes) reads as 0"]


def test_unassigned_reports_are_bounded(capsys):
    """A guest scanning the 4 GiB hole: REPORT_LIMIT pages reported, one line saying
    so, the rest only counted -- the record does not grow without bound."""
    from qkio.devices.mmio import REPORT_LIMIT, MmioBus
    seen = []
    bus = MmioBus(on_unassigned=lambda addr, size, w: seen.append(addr))
    for page in range(10_000):
        assert bus.read(0xC000_0000 + page * 4096, 4) == 0
    assert len(seen) == REPORT_LIMIT and len(bus._reported) == REPORT_LIMIT
    assert bus.unreported == 10_000 - REPORT_LIMIT
    assert capsys.readouterr().err.count("\n") == 1


def test_unowned_pages_hold_reported_pages_no_device_touches():
    """What the native loop may answer for itself: a page once reported, with no byte
    of any device on it -- a device registered there later takes the page back."""
    bus, seen = quiet_bus()
    bus.register(0xFEB00000, 0x200, Recorder(), "dev")
    pages = bus.unowned_pages
    assert pages[0] == 0 and len(pages) == 1 + REPORT_LIMIT
    bus.read(0xD0000010, 4)
    bus.read(0xD0000020, 8)           # the same page: nothing new
    bus.read(0xFEB001FE, 4)           # off the device's end: reported, but its page holds the device
    bus.write(0xD0001000, 2, 1)
    assert seen == [(0xD0000010, 4, False), (0xFEB001FE, 4, False), (0xD0001000, 2, True)]
    assert list(pages[:pages[0] + 1]) == [2, 0xD0000, 0xD0001]
    bus.register(0xD0000F00, 0x100, Recorder(), "late")
    assert list(pages[:pages[0] + 1]) == [1, 0xD0001]
    assert bus.read(0xD0000F00, 4) == 0x12345678  # the late device answers; no report


def test_port_access_past_0xffff_is_reported_at_its_own_port():
    from qkio.devices.ioport import PortBus
    seen = []
    bus = PortBus(on_unassigned=lambda port, size, w: seen.append((port, size)))
    assert bus.read(0xFFFE, 4) == 0xFFFFFFFF
    bus.write(0xFFFF, 2, 0x1234)
    assert seen == [(0xFFFE, 2)] and all(port < 0x10000 for port, _ in seen)


# What QEMU 7.2 printed for the unassigned-mmio guest (-M microvm,acpi=off,
# Debian 7.2.22, on this project's machine): an address nobody owns reads as
# 0 at every size, even right after an 8-byte store of 0x5a's there.
UNASSIGNED_MMIO_COUNT = 200
UNASSIGNED_MMIO_OUTPUT = ("mmio 0xd0000000: 1=00 2=0000 4=00000000 8=0000000000000000\n"
                          f"count={UNASSIGNED_MMIO_COUNT} or=00000000\n")


def run_unassigned_mmio_on_qkio(exit_path=None, count=UNASSIGNED_MMIO_COUNT):
    """The unassigned-mmio guest in an in-process Machine: status, output, log, exits, the CPU."""
    from qkio.machine import Machine
    out, logged = bytearray(), []
    with Machine(memory_mib=4, console=out.extend, log=logged.append, exit_path=exit_path) as machine:
        machine.load_multiboot(demo_guest("unassigned-mmio"), append=f"count={count}")
        status = machine.run(timeout=60)
        cpu = machine.cpus[0]
        return status, out.decode(), logged, cpu.exit_counts, cpu


@pytest.mark.kvm
def test_unassigned_mmio_reads_as_qemu_microvm_reads_it():
    """The same guest on QEMU 7.2 microvm and on qkio prints the same values: 0 at
    every size (QEMU's unassigned_mem_read), where port I/O reads all ones."""
    status, out, logged, _, _ = run_unassigned_mmio_on_qkio()
    assert (status, out) == (GUEST_EXIT_STATUS, UNASSIGNED_MMIO_OUTPUT)
    assert logged == ["unassigned memory 0xd0000000 (write, 8 bytes)"]  # once for the page
    reason = qemu_unusable_reason()
    if reason is not None:
        pytest.skip(f"qkio checked against the recorded answer; no live QEMU: {reason}")
    r = subprocess.run([QEMU, *QEMU_ARGS, "-serial", "stdio", "-kernel", str(demo_guest("unassigned-mmio")),
                        "-append", f"count={UNASSIGNED_MMIO_COUNT}"],
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout.decode("latin-1")) == (GUEST_EXIT_STATUS, UNASSIGNED_MMIO_OUTPUT)
