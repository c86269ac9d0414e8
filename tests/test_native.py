"""The native exit loop (qkio/native/cpu_exec.c) does what the Python loop does.

Every other test runs machines on the default path, which is the native one
when it can be built (it can in CI: gcc and Python.h are there), so kicks,
pause/resume, run_on_cpu, SMP and the CLI are already exercised through it.
This file checks what only the native path could get wrong: port accesses of
every size in both directions reach the device with the same values as on the
Python path, the accesses the C code must hand back (unaligned, straddling a
device's end, unowned ports) still get the Python bus's treatment, a device
that raises or answers nonsense ends the run cleanly, the device runs with the
global lock held and the guest runs without it, and when the module cannot be
had the reason is given and the Python path runs instead.
"""

from __future__ import annotations

import array
import os
import subprocess
import sys
import threading
import time

import pytest

from helpers.vmm import demo_guest
from qkio import native
from qkio.kvm.constants import ExitReason
from qkio.machine import STATUS_GUEST_FAILED, Machine


def _require_native():
    """Skip where it was switched off, or (outside CI) not built at install; a stale
    build, or a missing one in CI, fails."""
    if native.load() is None:
        reason = native.unavailable_reason or ""
        in_ci = os.environ.get("CI", "") not in ("", "0", "false")
        if reason.startswith("QKIO_NATIVE=0") or ("was not built" in reason and not in_ci):
            pytest.skip(f"native exit loop unavailable: {reason}")
        pytest.fail(f"native exit loop unusable: {reason}")


pytestmark = pytest.mark.kvm


@pytest.fixture(autouse=True)
def _native():
    _require_native()


class Recorder:
    """Ports 0x100..0x107: reads answer a pattern, every access is logged with the lock state."""

    def __init__(self, machine):
        self.machine = machine
        self.log = []

    def io_read(self, offset, size):
        self.log.append(("r", offset, size, self.machine.lock.held_by_me()))
        return int.from_bytes(bytes(0xA0 + offset + i for i in range(size)), "little")

    def io_write(self, offset, size, value):
        self.log.append(("w", offset, size, value, self.machine.lock.held_by_me()))


def _mov_dx(port):
    return bytes([0xBA, port & 0xFF, port >> 8])


# Real-mode code at 0x1000: IN of 1, 2 and 4 bytes, OUT of them back, then the
# accesses the C loop must hand to Python, then isa-debug-exit with 0x10 (status 33).
MIXED_IO = b"".join([
    _mov_dx(0x100), b"\xEC",              # in al, dx
    _mov_dx(0x102), b"\xED",              # in ax, dx
    b"\x89\xC3",                          # mov bx, ax
    _mov_dx(0x104), b"\x66\xED",          # in eax, dx
    _mov_dx(0x100), b"\x66\xEF",          # out dx, eax
    b"\x89\xD8",                          # mov ax, bx
    _mov_dx(0x102), b"\xEF",              # out dx, ax
    _mov_dx(0x101), b"\xEF",              # out dx, ax   -- unaligned: split into two bytes
    _mov_dx(0x107), b"\xEF",              # out dx, ax   -- runs off the device's end
    _mov_dx(0x200), b"\xEC",              # in al, dx    -- nobody owns 0x200: 0xff
    _mov_dx(0x100), b"\xEE",              # out dx, al   -- so this writes 0xff
    _mov_dx(0xF4), b"\x66\xB8\x10\x00\x00\x00", b"\x66\xEF",  # mov eax, 0x10; out dx, eax
])


def _run_with_recorder(program, exit_path):
    """``program`` (real mode) with a Recorder on ports 0x100-0x107: status,
    what the recorder saw, IO exits, unassigned reports, the exit path taken
    and how many IO exits the C loop completed."""
    unassigned = []
    machine = Machine(memory_mib=2, console=lambda data: None, log=lambda msg: None,
                      exit_path=exit_path)
    with machine:
        machine.bus.on_unassigned = lambda *a: unassigned.append(a)
        rec = Recorder(machine)
        machine.bus.register(0x100, 8, rec, "recorder")
        machine.load_flat(program, mode="real")
        status = machine.run(timeout=30)
        cpu = machine.cpus[0]
        return (status, rec.log, cpu.exit_counts[ExitReason.IO], unassigned, cpu.exit_path,
                cpu._native_io_exits[0])


def test_every_access_size_both_ways_matches_the_python_path():
    native_run = _run_with_recorder(MIXED_IO, "native")
    python_run = _run_with_recorder(MIXED_IO, "python")
    assert native_run[4] == "native" and python_run[4] == "python"
    assert native_run[:4] == python_run[:4]
    status, log, io_exits, unassigned = native_run[:4]
    assert status == 33
    assert log == [
        ("r", 0, 1, True), ("r", 2, 2, True), ("r", 4, 4, True),
        ("w", 0, 4, 0xA7A6A5A4, True),          # the 4-byte IN, written back
        ("w", 2, 2, 0xA3A2, True),              # the 2-byte IN, written back
        ("w", 1, 1, 0xA2, True), ("w", 2, 1, 0xA3, True),   # unaligned OUT, split by the bus
        ("w", 7, 1, 0xA2, True),                # the half that lands on the device
        ("w", 0, 1, 0xFF, True),                # what the unowned port read as
    ]
    assert io_exits == 10  # one per IN/OUT instruction, whoever completed it
    assert [(port, is_write) for port, _, is_write in unassigned] == [(0x108, True), (0x200, False)]


class ByteRegisters(Recorder):
    """The Recorder with a handler per byte register, as the UART has: byte
    accesses must go through them, wider ones through io_read/io_write."""

    def __init__(self, machine):
        super().__init__(machine)
        self.byte_readers = tuple(lambda o=o: self._readb(o) for o in range(8))
        self.byte_writers = tuple(lambda v, o=o: self._writeb(o, v) for o in range(8))

    def _readb(self, offset):
        self.log.append(("rb", offset, self.machine.lock.held_by_me()))
        return 0xA0 + offset

    def _writeb(self, offset, value):
        self.log.append(("wb", offset, value, self.machine.lock.held_by_me()))


def _run_byte_registers(exit_path):
    with Machine(memory_mib=2, console=lambda data: None, log=lambda msg: None,
                 exit_path=exit_path) as machine:
        machine.bus.on_unassigned = lambda *a: None
        dev = ByteRegisters(machine)
        machine.bus.register(0x100, 8, dev, "byte-registers")
        machine.load_flat(MIXED_IO, mode="real")
        return machine.run(timeout=30), dev.log


def test_byte_accesses_go_to_the_byte_handlers_on_both_paths():
    native_run, python_run = _run_byte_registers("native"), _run_byte_registers("python")
    assert native_run == python_run
    status, log = native_run
    assert status == 33
    assert log == [
        ("rb", 0, True), ("r", 2, 2, True), ("r", 4, 4, True),
        ("w", 0, 4, 0xA7A6A5A4, True), ("w", 2, 2, 0xA3A2, True),
        ("w", 1, 1, 0xA2, True), ("w", 2, 1, 0xA3, True),   # split by the bus's slow path,
        ("w", 7, 1, 0xA2, True),                            # which calls io_write
        ("wb", 0, 0xFF, True),
    ]


class BadByteReader:
    byte_readers = (lambda: 0x100,)
    byte_writers = None

    def io_read(self, offset, size):
        return 0

    def io_write(self, offset, size, value):
        pass


def test_a_byte_reader_answering_more_than_a_byte_ends_the_run():
    with Machine(memory_mib=2, console=lambda d: None, log=lambda m: None,
                 exit_path="native") as machine:
        machine.bus.register(0x100, 1, BadByteReader(), "bad")
        machine.load_flat(_mov_dx(0x100) + b"\xEC\xEB\xFE", mode="real")  # in al, dx
        assert machine.run(timeout=30) == STATUS_GUEST_FAILED
        assert "OverflowError" in machine.exit_message and "not a byte" in machine.exit_message


# Ports nobody owns, each touched twice: the first access is reported (once per
# port, by PortBus, on the Python path), the second is completed in C.
UNOWNED_IO = b"".join([
    _mov_dx(0x200), b"\xEC",              # in al, dx    -- reported: Python
    _mov_dx(0x200), b"\xEC",              # in al, dx    -- again: C, 0xff
    _mov_dx(0x100), b"\xEE",              # out dx, al   -- to the recorder: 0xff
    _mov_dx(0x200), b"\xEE",              # out dx, al   -- dropped in C
    _mov_dx(0x300), b"\xEF",              # out dx, ax   -- 0x300-0x301 reported: Python
    _mov_dx(0x300), b"\x66\xED",          # in eax, dx   -- 0x302-0x303 are new: Python
    _mov_dx(0x300), b"\x66\xED",          # in eax, dx   -- all reported: C, 0xffffffff
    _mov_dx(0x104), b"\x66\xEF",          # out dx, eax  -- to the recorder
    _mov_dx(0xF4), b"\x66\xB8\x10\x00\x00\x00", b"\x66\xEF",  # isa-debug-exit, status 33
])


def test_unowned_ports_once_reported_are_completed_in_c():
    status, log, io_exits, unassigned, _, in_c = _run_with_recorder(UNOWNED_IO, "native")
    assert (status, log, io_exits, unassigned) == _run_with_recorder(UNOWNED_IO, "python")[:4]
    assert status == 33 and io_exits == 9
    assert log == [("w", 0, 1, 0xFF, True), ("w", 4, 4, 0xFFFFFFFF, True)]  # all ones, both sizes
    assert unassigned == [(0x200, 1, False), (0x300, 2, True), (0x300, 4, False)]  # once per port
    # In C: the two recorder OUTs, isa-debug-exit's and the three accesses to
    # ports already reported; the three that reported something went to Python.
    assert in_c == 6


# Protected-mode code at 0x100000: two 4-byte loads from each of PAGES pages
# from 0xd0000000 up, memory nobody owns, then isa-debug-exit with 0x10.
MMIO_PAGES = 100
SCAN_MMIO = b"".join([
    b"\xB9" + MMIO_PAGES.to_bytes(4, "little"),  # mov ecx, PAGES
    b"\xBF\x00\x00\x00\xD0",                # mov edi, 0xd0000000
    b"\x8B\x07",                              # 1: mov eax, [edi]  -- the page's first access
    b"\x8B\x07",                              #    mov eax, [edi]  -- its second
    b"\x81\xC7\x00\x10\x00\x00",              #    add edi, 0x1000
    b"\x49",                                  #    dec ecx
    b"\x75\xF3",                              #    jnz 1b
    b"\x66\xBA\xF4\x00", b"\xB8\x10\x00\x00\x00", b"\xEF",  # isa-debug-exit, status 33
])


def _scan_mmio(exit_path):
    from qkio.devices.mmio import REPORT_LIMIT
    reported = []
    with Machine(memory_mib=2, console=lambda data: None, log=lambda msg: None,
                 exit_path=exit_path) as machine:
        bus = machine.mmio_bus
        bus.on_unassigned = lambda *access: reported.append(access)
        machine.load_flat(SCAN_MMIO, mode="protected", address=0x100000)
        status = machine.run(timeout=60)
        cpu = machine.cpus[0]
        pages = bus.unowned_pages
        assert pages[0] == len(set(bus._reported)) == REPORT_LIMIT == len(pages) - 1
        return (status, reported, bus.unreported, cpu.exit_counts[ExitReason.MMIO]), cpu._native_io_exits[1]


def test_unowned_mmio_once_reported_is_completed_in_c(capsys):
    """A guest that loads twice from each of 100 pages nobody owns: the bus reports
    the first 64 pages once each and counts the rest; the native loop answers the
    second load of each reported page itself, and nothing else differs from the
    Python path -- the same reports, the same count, the same exits."""
    from qkio.devices.mmio import REPORT_LIMIT
    native_run, in_c = _scan_mmio("native")
    python_run, in_python_loop = _scan_mmio("python")
    assert native_run == python_run and in_python_loop == 0
    status, reported, unreported, mmio_exits = native_run
    assert status == 33 and mmio_exits == 2 * MMIO_PAGES
    assert reported == [(0xD0000000 + page * 4096, 4, False) for page in range(REPORT_LIMIT)]
    # Pages past the limit come back to Python to be counted, both loads.
    assert unreported == 2 * (MMIO_PAGES - REPORT_LIMIT)
    assert in_c == REPORT_LIMIT
    assert capsys.readouterr().err.count("pages reported") == 2  # once per run


def test_the_same_unowned_mmio_address_n_times_is_one_report_and_n_completions():
    """The unassigned-mmio guest with count=N: one report line, and every access
    after it (its four loads of 1-8 bytes and N more) answered 0 in C."""
    from test_devices_mmio import run_unassigned_mmio_on_qkio
    n = 3000
    status, out, logged, exits, cpu = run_unassigned_mmio_on_qkio("native", count=n)
    assert status == 33 and out.endswith(f"count={n} or=00000000\n")
    assert logged == ["unassigned memory 0xd0000000 (write, 8 bytes)"]
    assert exits[ExitReason.MMIO] == 1 + 4 + n  # the 8-byte store, four loads, N loads
    assert cpu._native_io_exits[1] == 4 + n     # all but the store that was reported


class Null:
    def io_read(self, offset, size):
        return 0

    def io_write(self, offset, size, value):
        pass


def _pio_machine(count):
    """pio-loop writing port 0x80 ``count`` times, with a device there so C completes each OUT."""
    machine = Machine(memory_mib=4, console=lambda d: None, exit_path="native")
    machine.bus.register(0x80, 1, Null(), "null")
    machine.load_multiboot(demo_guest("pio-loop"), append=f"count={count}")
    return machine


def test_a_long_pio_run_counts_every_exit():
    with _pio_machine(20000) as machine:
        assert machine.run(timeout=60) == 33
        assert machine.cpus[0].exit_counts[ExitReason.IO] == 20001


class Raising:
    def io_read(self, offset, size):
        return 1 << 40  # not a value of any access size

    def io_write(self, offset, size, value):
        raise RuntimeError("device model bug")


@pytest.mark.parametrize("exit_path", ["native", "python"])
@pytest.mark.parametrize("code, message", [
    (_mov_dx(0x100) + b"\xEE", "RuntimeError: device model bug"),   # out dx, al
    (_mov_dx(0x100) + b"\xEC", "OverflowError"),                    # in al, dx
])
def test_a_device_that_raises_ends_the_run_with_its_message(exit_path, code, message):
    with Machine(memory_mib=2, console=lambda d: None, log=lambda m: None,
                 exit_path=exit_path) as machine:
        machine.bus.register(0x100, 1, Raising(), "raising")
        machine.load_flat(code + b"\xEB\xFE", mode="real")
        assert machine.run(timeout=30) == STATUS_GUEST_FAILED
        assert message in machine.exit_message
        assert "handling exit 2" in machine.exit_message  # KVM_EXIT_IO
        assert not machine.lock.locked()  # the failing vCPU let go of qemu_mutex


def test_the_guest_runs_without_the_lock_while_exits_stream():
    """Another thread takes qemu_mutex 50 times while the vCPU takes ~100,000 exits/s."""
    with _pio_machine(100_000_000) as machine:
        machine.start()
        took = []
        t0 = time.monotonic()
        for _ in range(50):
            with machine.lock:
                took.append(machine.cpus[0].exit_counts[ExitReason.IO])
            time.sleep(0.002)
        elapsed = time.monotonic() - t0
        machine.stop()
    assert elapsed < 20
    assert took[-1] > took[0]  # the guest kept exiting between our turns


def test_the_python_path_when_asked_and_the_reason_when_native_is_refused():
    code = ("import qkio.native as n, qkio.cpus as c\n"
            "assert n.load() is None\n"
            "print(n.unavailable_reason)\n"
            "assert c.choose_exit_path(None) is None\n"
            "try:\n    c.choose_exit_path('native')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "QKIO_NATIVE": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "QKIO_NATIVE=0 in the environment",
        "QkioError the native exit loop is not available: QKIO_NATIVE=0 in the environment"]
    with pytest.raises(ValueError, match="exit path must be one of"):
        Machine(exit_path="fast")


def test_a_build_older_than_a_changed_source_is_refused(tmp_path):
    """The stale-build check reads the source only when it was written after the
    build -- and then refuses a build from other source; an older source is not read."""
    changed = tmp_path / "cpu_exec.c"
    changed.write_text("/* not the source the module was built from */\n")
    code = ("import os, sys, qkio.native as n\n"
            "from pathlib import Path\n"
            "n.SOURCE = Path(sys.argv[1])\n"
            "os.utime(n.SOURCE, ns=(int(sys.argv[2]), int(sys.argv[2])))\n"
            "m = n.load()\n"
            "print(m is not None, n.unavailable_reason, 'zlib' in sys.modules)\n")
    later, earlier = time.time_ns() + 3600 * 10**9, 10**9  # source written after the build / long before
    newer = subprocess.run([sys.executable, "-c", code, str(changed), str(later)],
                           capture_output=True, text=True, timeout=60)
    assert newer.returncode == 0, newer.stderr
    assert newer.stdout.startswith("False qkio.native._cpu_exec was built from another cpu_exec.c")
    older = subprocess.run([sys.executable, "-c", code, str(changed), str(earlier)],
                           capture_output=True, text=True, timeout=60)
    assert (older.returncode, older.stdout) == (0, "True None False\n"), older.stderr


def test_bad_arguments_are_refused():
    run = native.load().run
    with Machine(memory_mib=2) as machine:
        vcpu = machine.cpus[0].vcpu
        counter = array.array("Q", [0])
        with pytest.raises(TypeError, match="5 to 7 arguments"):
            run(vcpu.fd)
        table, reported, pages = machine.bus.table, machine.bus.reported, machine.mmio_bus.unowned_pages
        with pytest.raises(ValueError, match="aligned 16-byte buffer with mmio_pages"):
            run(vcpu.fd, vcpu.run_page, machine.lock, table, counter, reported, pages)
        with pytest.raises(ValueError, match="mmio_pages must be"):
            run(vcpu.fd, vcpu.run_page, machine.lock, table, array.array("Q", [0, 0]), reported, bytes(8))
        with pytest.raises(ValueError, match="reported must be"):
            run(vcpu.fd, vcpu.run_page, machine.lock, machine.bus.table, counter, bytearray(10))
        with pytest.raises(TypeError, match="table must be"):
            run(vcpu.fd, vcpu.run_page, machine.lock, [None] * 10, counter)
        with pytest.raises(ValueError, match="smaller than struct kvm_run"):
            run(vcpu.fd, bytearray(16), machine.lock, machine.bus.table, counter)
        with pytest.raises(ValueError, match="aligned 8-byte buffer"):
            run(vcpu.fd, vcpu.run_page, machine.lock, machine.bus.table, bytearray(4))
        with pytest.raises(BufferError, match="not writable"):
            run(vcpu.fd, vcpu.run_page, machine.lock, machine.bus.table, b"read-only")


def test_kicks_reach_a_vcpu_in_the_native_loop():
    """run_on_cpu while the vCPU streams exits through C: every call comes back."""
    with _pio_machine(100_000_000) as machine:
        machine.start()
        cpu = machine.cpus[0]
        me = threading.get_ident()
        ran_on = {cpu.run_on_cpu(threading.get_ident) for _ in range(200)}
        machine.stop()
    assert ran_on == {cpu.thread.ident} and me not in ran_on
    # Each call's kick ended a KVM_RUN (kicks that land while the vCPU is
    # already in Python are taken by the next entry, so none is lost).
    assert cpu.kicks_received >= 1


def test_qemu_mutex_is_a_plain_lock_that_waits_without_the_gil():
    QemuMutex = native.load().QemuMutex
    from qkio.bql import GlobalMutex
    assert type(GlobalMutex().raw_lock) is QemuMutex  # what every qemu_mutex is built on here
    lock = QemuMutex()
    assert lock.acquire(False) and lock.locked() and not lock.acquire(False)
    got = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire()))
    waiter.start()
    # The waiter is blocked in acquire(); this thread still runs Python, so
    # the wait does not hold the GIL.
    t0 = time.monotonic()
    spins = 0
    while time.monotonic() - t0 < 0.2:
        spins += 1
    assert spins > 1000 and got == []
    lock.release()
    waiter.join(5)
    assert got == [True] and lock.locked()
    lock.release()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        lock.release()
    with pytest.raises(TypeError):
        QemuMutex(1)
