"""qkio's demo guests (qkio/guests): they build, they are cached, and each one
does on real KVM what its description says.

The build tests need only binutils.  The run tests use an in-process
``Machine`` (``signals=None``, console captured) except where the point is
the path through the VMM's stdin, which only a child process has.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from helpers.vmm import Vmm, demo_guest, require_binutils, run_qkio
from qkio import guests
from qkio.boot import multiboot as mb
from qkio.boot.elf import EM_386, parse_elf
from qkio.errors import QkioError
from qkio.kvm.constants import ExitReason
from qkio.machine import STATUS_TIMEOUT, Machine

HELLO = b"Hello from qkio's guest\n"
ECHO_BANNER = b"echo-irq: type; q quits\n"


# --- building -------------------------------------------------------------------

def test_every_guest_has_a_source_and_a_description():
    sources = {p.stem for p in guests.GUEST_DIR.glob("*.s")}
    assert sources == set(guests.GUESTS)
    assert sources >= {"hello", "echo-irq", "flood", "pio-loop", "smp", "spin",
                       "cmdline", "echo", "mbinfo", "triple", "unassigned", "count-loop"}
    for name, line in guests.GUESTS.items():
        assert line and "\n" not in line, name


@pytest.mark.parametrize("name", sorted(guests.GUESTS))
def test_guest_builds_to_a_multiboot_elf32(name, tmp_path):
    require_binutils()
    path = guests.build_guest(name, cache=tmp_path)
    assert path.parent == tmp_path and path.name.startswith(f"{name}-")
    image = path.read_bytes()
    header = mb.find_header(image)
    assert header.offset < 8192 and not header.has_addresses
    elf = parse_elf(image)
    assert (elf.elf_class, elf.machine) == (32, EM_386)
    assert all(ph.paddr >= 0x100000 for ph in elf.load_segments)


def test_build_is_cached_by_source_hash(tmp_path):
    require_binutils()
    src = tmp_path / "src"
    shutil.copytree(guests.GUEST_DIR, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    cache = tmp_path / "cache"
    first = guests.build_guest("hello", cache=cache, source_dir=src)
    mtime = first.stat().st_mtime_ns
    assert guests.build_guest("hello", cache=cache, source_dir=src) == first
    assert first.stat().st_mtime_ns == mtime  # not rebuilt
    # A change to a shared include is a new guest, with a new name.
    (src / "uart.inc").write_text((src / "uart.inc").read_text() + "\n# changed\n")
    second = guests.build_guest("hello", cache=cache, source_dir=src)
    assert second != first and second.exists() and first.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])  # no scratch left


def test_cache_is_qkio_cache_else_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("QKIO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert guests.cache_dir() == tmp_path / "qkio"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert guests.cache_dir() == tmp_path / "home" / ".cache" / "qkio"
    monkeypatch.setenv("QKIO_CACHE", str(tmp_path / "elsewhere"))
    assert guests.cache_dir() == tmp_path / "elsewhere"


def test_cached_guest_needs_no_binutils(tmp_path, monkeypatch):
    require_binutils()
    built = guests.build_guest("spin", cache=tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert guests.build_guest("spin", cache=tmp_path) == built


def test_assembler_error_is_a_qkio_error_with_the_tools_message(tmp_path):
    require_binutils()
    src = tmp_path / "src"
    shutil.copytree(guests.GUEST_DIR, src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (src / "hello.s").write_text('.include "multiboot.inc"\n_start:\n        movl %bogus, %eax\n')
    with pytest.raises(QkioError) as info:
        guests.build_guest("hello", cache=tmp_path / "cache", source_dir=src)
    message = str(info.value)
    assert "'hello'" in message and "as failed" in message
    assert "bogus" in message  # the assembler's own words
    assert not any(p.suffix == ".elf" for p in (tmp_path / "cache").iterdir())


def test_missing_assembler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(QkioError, match=r"needs as and ld \(binutils"):
        guests.build_guest("hello", cache=tmp_path / "cache")


@pytest.mark.kvm
def test_missing_assembler_through_the_cli(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path / "empty"), "QKIO_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "qkio", "run", "--kernel", "hello"],
                            capture_output=True, text=True, env=env, timeout=60,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "needs as and ld" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_guest_name():
    with pytest.raises(KeyError, match="no demo guest 'nonesuch'"):
        guests.build_guest("nonesuch")


# --- running, in process ------------------------------------------------------------

def run_guest(name: str, append: str = "", *, smp: int = 1, timeout: float = 30,
              stdin_fd: int | None = None, setup=None):
    """Run demo guest ``name`` to the end; return (status, console bytes, facts)."""
    path = demo_guest(name)
    out = bytearray()
    machine = Machine(memory_mib=4, smp=smp, console=out.extend, log=lambda msg: None)
    with machine:
        machine.load_multiboot(path, append=append)
        if setup:
            setup(machine)
        if stdin_fd is not None:
            machine.attach_stdin(stdin_fd)
        status = machine.run(timeout=timeout)
        facts = SimpleNamespace(message=machine.exit_message,
                                exit_counts=[dict(c.exit_counts) for c in machine.cpus])
    return status, bytes(out), facts


@pytest.mark.kvm
def test_hello():
    status, out, _ = run_guest("hello")
    assert (status, out) == (33, HELLO)


def _flood_text(count: int) -> bytes:
    return bytes(10 if i % 64 == 63 else ord("a") + (i % 64) % 26 for i in range(count))


@pytest.mark.parametrize("append,count", [("count=1000", 1000), ("", 10000), ("count=0", 0),
                                          ("xcount=5 count=70", 70)])
@pytest.mark.kvm
def test_flood_prints_count_bytes(append, count):
    status, out, _ = run_guest("flood", append)
    assert status == 33
    assert out == _flood_text(count)


class _PortLog:
    """A device that records what is written to it (for pio-loop's port 0x80)."""

    def __init__(self):
        self.values = []

    def io_read(self, offset, size):
        return 0xFF

    def io_write(self, offset, size, value):
        self.values.append(value)


@pytest.mark.kvm
def test_pio_loop_writes_port_0x80_count_times():
    log = _PortLog()
    status, out, machine = run_guest("pio-loop", "count=3000",
                                     setup=lambda m: m.bus.register(0x80, 1, log, "post"))
    assert (status, out) == (33, b"")
    assert log.values == [n & 0xFF for n in range(3000, 0, -1)]  # none lost, none twice


@pytest.mark.kvm
def test_spin_is_stopped_by_the_timeout():
    start = time.monotonic()
    status, out, machine = run_guest("spin", timeout=0.5)
    assert status == STATUS_TIMEOUT and out == b""
    assert time.monotonic() - start < 5
    assert "--timeout" in machine.message


@pytest.mark.kvm
@pytest.mark.parametrize("smp", [1, 2, 3])
def test_smp_starts_every_cpu(smp):
    status, out, machine = run_guest("smp", "count=4096", smp=smp)
    text = out.decode()
    assert status == 33, text
    lines = text.splitlines()
    assert lines[0] == f"smp: running on {smp} CPU(s)"
    counts = {int(m[1]): int(m[2]) for m in (re.fullmatch(r"cpu (\d+): (\d+)", line) for line in lines[1:])}
    assert sorted(counts) == list(range(smp))
    assert counts[0] >= 4096 and counts[0] % 256 == 0
    # The APs were counting while the BSP did: they got somewhere.
    assert all(n > 0 for n in counts.values())


@pytest.mark.kvm
def test_echo_irq_in_process_through_a_pipe():
    r, w = os.pipe()
    try:
        os.write(w, b"hello, interrupts\nq")
        status, out, machine = run_guest("echo-irq", stdin_fd=r, timeout=30)
    finally:
        os.close(r)
        os.close(w)
    assert status == 1
    assert out == ECHO_BANNER + b"hello, interrupts\nq"
    # The guest took no exit for its HLTs (in-kernel irqchip): its exits are
    # the port accesses of the banner and the echo, nothing else.
    assert set(machine.exit_counts[0]) <= {ExitReason.IO, ExitReason.INTR}


# --- through the CLI ------------------------------------------------------------------

@pytest.mark.kvm
def test_cli_runs_a_demo_guest_by_name():
    demo_guest("hello")
    result = run_qkio("--kernel", "hello")
    assert (result.returncode, result.stdout, result.stderr) == (33, HELLO, b"")


def test_cli_unknown_guest_name():
    result = run_qkio("--kernel", "no-such-guest-or-file")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "no such kernel file" in err and "hello" in err


@pytest.mark.kvm
def test_cli_smp_runs_both_vcpus():
    demo_guest("smp")
    result = run_qkio("--kernel", "smp", "--smp", "2", "--append", "count=20000")
    out = result.stdout.decode()
    assert result.returncode == 33, (out, result.stderr)
    assert out.startswith("smp: running on 2 CPU(s)\n")
    cpu1 = int(re.search(r"^cpu 1: (\d+)$", out, re.M)[1])
    assert cpu1 > 0


@pytest.mark.kvm
def test_echo_irq_through_the_vmm_stdin():
    """Bytes written to ``qkio run``'s stdin come back, one chunk at a time:
    stdin -> io thread (select, the UART's can-read poll) -> IRQ 4 -> the
    guest's ISR -> THR -> stdout.  Each chunk is sent only after the
    previous one came back, so this is the interactive path, not a batch."""
    demo_guest("echo-irq")
    with Vmm("--kernel", "echo-irq", "--timeout", "60", stdin=subprocess.PIPE) as vmm:
        vmm.wait_for_output(ECHO_BANNER)
        expected = ECHO_BANNER
        for chunk in (b"a", b"bc", b"hello\n", bytes(range(32, 112)), b"\x00\xff\x7f"):
            vmm.proc.stdin.write(chunk)
            vmm.proc.stdin.flush()
            expected += chunk
            vmm.wait_for_output(expected)
            assert vmm.stdout() == expected
        vmm.proc.stdin.write(b"q-not-echoed")
        vmm.proc.stdin.flush()
        assert vmm.wait(10) == 1
        assert vmm.stdout() == expected + b"q"
        assert "Traceback" not in vmm.stderr()
