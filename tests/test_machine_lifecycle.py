"""``Machine``'s lifecycle (issue 10, section 6): created -> (started) -> running
-> stopped -> closed, every call checked against the state and the calling
thread, one exception type (``MachineStateError``) for every misuse.

Every call that could hang runs through ``run_in_thread`` with a bound, so a
regression shows up as a failure, not a stuck suite.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from helpers.vmm import ROOT, demo_guest, run_in_thread
from qkio.errors import MachineStateError
from qkio.machine import STATUS_POWEROFF, Machine

pytestmark = pytest.mark.kvm


def _machine(**kw) -> Machine:
    return Machine(**{"memory_mib": 4, "console": lambda data: None, "log": lambda msg: None, **kw})


def _run_in_background(machine: Machine, **kw):
    result: dict = {}

    def body():
        try:
            result["status"] = machine.run(**kw)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e
    t = threading.Thread(target=body, name="test-io-thread")
    t.start()
    deadline = time.monotonic() + 10
    while machine.state != "running" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert machine.state == "running"
    return t, result


def test_the_states_of_a_whole_life():
    machine = _machine()
    assert machine.state == "created"
    machine.load_multiboot(demo_guest("hello"))
    assert machine.run(timeout=30) == 33
    assert machine.state == "stopped"
    machine.stop()  # nothing to do
    machine.close()
    assert machine.state == "closed"
    machine.close()  # idempotent


@pytest.mark.parametrize("call", ["pause", "resume"])
def test_pause_or_resume_before_anything_runs_is_refused_not_a_hang(call):
    with _machine() as machine:
        with pytest.raises(MachineStateError, match="'created'"):
            run_in_thread(getattr(machine, call), 10, call)


def test_stop_from_another_thread_ends_a_run_without_timeout():
    with _machine() as machine:
        machine.load_multiboot(demo_guest("spin"))
        t, result = _run_in_background(machine)
        run_in_thread(machine.stop, 15, "stop()")
        assert machine.state == "stopped"  # stop() returned after run() did
        t.join(5)
        assert result == {"status": STATUS_POWEROFF}
        assert machine.exit_message == "stopped by Machine.stop()"


def test_close_from_another_thread_during_run_stops_it_first():
    machine = _machine()
    machine.load_multiboot(demo_guest("spin"))
    t, result = _run_in_background(machine)
    run_in_thread(machine.close, 15, "close()")
    t.join(5)
    assert result == {"status": STATUS_POWEROFF}, result
    assert machine.state == "closed"
    assert not [th for th in threading.enumerate() if th.name.startswith("CPU ")]


def test_run_from_a_second_thread_is_refused_and_starts_nothing():
    with _machine() as machine:
        machine.load_multiboot(demo_guest("spin"))
        t, result = _run_in_background(machine)
        threads = [c.thread for c in machine.cpus]
        with pytest.raises(MachineStateError, match="already running"):
            machine.run(timeout=1)
        assert [c.thread for c in machine.cpus] == threads
        machine.stop()
        t.join(5)


def test_a_machine_runs_once():
    with _machine() as machine:
        machine.load_multiboot(demo_guest("hello"))
        assert machine.run(timeout=30) == 33
        with pytest.raises(MachineStateError, match="runs once"):
            machine.run(timeout=1)


def test_stop_before_run_means_it_never_runs():
    with _machine() as machine:
        machine.stop()
        assert machine.state == "stopped"
        with pytest.raises(MachineStateError):
            machine.run(timeout=1)


def test_request_exit_before_run_makes_run_return_at_once():
    with _machine() as machine:
        machine.load_multiboot(demo_guest("spin"))
        machine.request_exit(7, "asked early")
        assert run_in_thread(lambda: machine.run(), 15, "run()") == 7


def test_started_machine_pauses_resumes_stops():
    with _machine(smp=2) as machine:
        machine.load_multiboot(demo_guest("spin"))
        machine.start()
        assert machine.state == "started"
        run_in_thread(machine.pause, 15, "pause()")
        assert all(c.paused for c in machine.cpus)
        run_in_thread(machine.resume, 15, "resume()")
        with pytest.raises(MachineStateError):
            machine.load_multiboot(demo_guest("spin"))
        run_in_thread(machine.stop, 15, "stop()")
        assert machine.state == "stopped"


@pytest.mark.parametrize("call", ["run", "load_multiboot", "load_flat", "attach_stdin", "pause", "resume",
                                  "stop", "start", "request_exit"])
def test_after_close_every_call_but_close_raises_one_clear_error(call):
    machine = _machine()
    machine.close()
    args = {"load_multiboot": ("x",), "load_flat": (b"\xf4",), "request_exit": (0,)}.get(call, ())
    with pytest.raises(MachineStateError, match="'closed'"):
        getattr(machine, call)(*args)


def test_loading_while_running_is_refused():
    with _machine() as machine:
        machine.load_multiboot(demo_guest("spin"))
        t, _ = _run_in_background(machine)
        with pytest.raises(MachineStateError, match="'running'"):
            machine.load_flat(b"\xf4")
        machine.stop()
        t.join(5)


def test_pause_or_close_from_a_handler_is_refused_not_a_deadlock():
    """A device model runs with the global lock held; pause() from there would wait
    for vCPUs that need that lock.  It is refused, and the run ends on time."""
    errors = []
    with _machine() as machine:
        class Pauser:
            def io_read(self, offset, size):
                return 0

            def io_write(self, offset, size, value):
                for call in (machine.pause, machine.close):
                    try:
                        call()
                    except MachineStateError as e:
                        errors.append(str(e))
                machine.request_exit(5, "device done")
        machine.bus.register(0x100, 1, Pauser(), "pauser")
        machine.load_flat(b"\xba\x00\x01\xee\xeb\xfe", mode="real")  # mov dx, 0x100; out dx, al; jmp $
        assert run_in_thread(lambda: machine.run(timeout=30), 40, "run()") == 5
    assert len(errors) == 2 and "global lock" in errors[0] and "inside run()" in errors[1], errors


def test_machine_in_a_non_main_thread_with_no_signals_runs_and_stops():
    """Built and run in a thread of a fresh interpreter, where no SIG_IPI handler
    can be installed: the vCPUs keep SIG_IPI blocked outside KVM_RUN, and stop()
    still kicks them out of a spinning guest."""
    code = """
import threading, sys
from qkio.guests import build_guest
from qkio.machine import Machine
out = {}
def body():
    m = Machine(memory_mib=4, console=lambda d: None)
    m.load_multiboot(build_guest("spin"))
    t = threading.Timer(0.5, m.stop)
    t.start()
    out["status"] = m.run()
    out["handler"] = m._ipi_handler
    m.close()
th = threading.Thread(target=body)
th.start(); th.join(60)
print(out)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'status': 0, 'handler': False}", result.stdout + result.stderr


def test_async_signals_outside_the_main_thread_is_one_clear_error():
    def build():
        with pytest.raises(MachineStateError, match="main thread"):
            _machine(signals="async")
    run_in_thread(build, 30, "Machine(signals='async') in a thread")


# --- loading costs what is copied, not what is declared (issue 10, section 3) ------


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))


def test_a_2_gib_bss_costs_no_host_memory(tmp_path):
    """A 4 KB ELF whose data segment has p_memsz 2 GiB, in 3 GiB of guest RAM:
    the BSS is zeroed with MADV_DONTNEED, so loading it allocates nothing
    (it used to cost 6.3 GB and 11 s: the buffer, its copy, the guest's pages)."""
    from kernels import synthetic
    kernel = tmp_path / "bss.elf"
    kernel.write_bytes(synthetic.multiboot_elf(bss_size=2 << 30))
    with _machine(memory_mib=3072) as machine:
        machine.memory.write(0x101000 + 4096 * 100, b"dirty")  # a page the BSS must zero
        before = _rss_mib()
        boot = machine.load_multiboot(kernel)
        grown = _rss_mib() - before
        assert boot.kernel_range[1] - boot.kernel_range[0] > 2 << 30
        assert machine.memory.read(0x101000 + 4096 * 100, 5) == bytes(5)
        assert machine.memory.read(0x101000, 4) == b"DATA"
    assert grown < 64, f"loading a 2 GiB BSS grew the RSS by {grown} MiB"


def test_a_2_gb_sparse_initrd_costs_what_its_data_costs(tmp_path):
    """A 2 GB module that is one hole but for a few bytes: mapped, and only its data
    extents (SEEK_DATA) copied; the rest of its range is zero at no cost."""
    from helpers.vmm import demo_guest as guest
    module = tmp_path / "sparse.img"
    with open(module, "wb") as f:
        f.truncate(2_000_000_000)
        f.seek(1_000_000_000)
        f.write(b"middle")
    with _machine(memory_mib=3072) as machine:
        before, start = _rss_mib(), time.monotonic()
        boot = machine.load_multiboot(guest("hello"), initrd=str(module))
        took, grown = time.monotonic() - start, _rss_mib() - before
        mod = boot.modules[0]
        assert mod.end - mod.start == 2_000_000_000
        assert machine.memory.read(mod.start + 1_000_000_000, 6) == b"middle"
        assert machine.memory.read(mod.start + 1_500_000_000, 6) == bytes(6)
    assert grown < 64, f"loading a sparse 2 GB module grew the RSS by {grown} MiB"
    assert took < 10, took
