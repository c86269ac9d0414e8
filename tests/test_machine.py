"""``qkio.machine.Machine`` in process: how a run ends, control from other
threads while it runs, and that a machine gives back every fd and thread it
took -- 500 times over.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

from helpers.vmm import demo_guest, open_fds, run_in_thread, saved_sigmask, test_kernel
from qkio.errors import BadKernel
from qkio.kvm.constants import ExitReason
from qkio.machine import STATUS_GUEST_FAILED, STATUS_POWEROFF, STATUS_TIMEOUT, Machine, MachineConfig

pytestmark = pytest.mark.kvm


def quiet_machine(**kw) -> tuple[Machine, bytearray]:
    out = bytearray()
    kw.setdefault("memory_mib", 4)
    return Machine(console=out.extend, log=lambda msg: None, **kw), out


# --- how a run ends -------------------------------------------------------------

def test_guest_exit_status_and_output():
    machine, out = quiet_machine()
    with machine:
        machine.load_multiboot(test_kernel("hello"))
        assert machine.run(timeout=30) == 33
    assert out == b"Hello from qkio's guest\n"
    assert "isa-debug-exit" in machine.exit_message


def test_triple_fault_is_a_guest_failure_with_rip():
    machine, out = quiet_machine()
    with machine:
        machine.load_multiboot(test_kernel("triple"))
        assert machine.run(timeout=30) == STATUS_GUEST_FAILED
    assert "triple-faulted" in machine.exit_message and "RIP=0x" in machine.exit_message


def test_timeout():
    machine, _ = quiet_machine()
    with machine:
        machine.load_multiboot(test_kernel("spin"))
        start = time.monotonic()
        assert machine.run(timeout=0.3) == STATUS_TIMEOUT
        assert time.monotonic() - start < 3


def test_bad_kernel_leaves_a_closable_machine(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    machine, _ = quiet_machine()
    with machine:
        with pytest.raises(BadKernel):
            machine.load_multiboot(bad)
    machine.close()  # idempotent


@pytest.mark.parametrize("kw", [{"smp": 0}, {"smp": 65}, {"memory_mib": 0}, {"memory_mib": 4096},
                                {"kick": "shout"}, {"backend": "kqueue"}, {"notify": "smoke"}])
def test_bad_arguments_are_refused_without_leaking(kw):
    before = open_fds()
    with pytest.raises(ValueError):
        quiet_machine(**kw)
    assert open_fds() == before


# --- control from another thread while the io thread runs -----------------------------

def test_pause_resume_and_request_exit_from_another_thread():
    machine, _ = quiet_machine(smp=2)
    seen = {}

    def controller():
        time.sleep(0.2)
        cpu = machine.cpus[0]
        machine.pause()
        frozen = dict(cpu.exit_counts)
        time.sleep(0.1)
        seen["frozen"] = dict(cpu.exit_counts) == frozen
        seen["paused"] = all(c.paused for c in machine.cpus)
        machine.resume()
        seen["report"] = machine.describe_cpu(cpu)  # runs on the vCPU thread
        machine.request_exit(STATUS_POWEROFF, "test says stop")

    with machine:
        machine.load_multiboot(test_kernel("spin"))
        t = threading.Thread(target=controller)
        t.start()
        status = machine.run(timeout=30)
        t.join()
    assert status == STATUS_POWEROFF and machine.exit_message == "test says stop"
    assert seen["frozen"] and seen["paused"]
    assert seen["report"].startswith("CPU 0/KVM: RIP=0x10") and "INTR=" in seen["report"]


def test_exit_counts_of_a_pio_guest():
    machine, _ = quiet_machine()
    with machine:
        machine.load_multiboot(demo_guest("pio-loop"), append="count=500")
        assert machine.run(timeout=30) == 33
        counts = machine.cpus[0].exit_counts
        # 500 OUTs to port 0x80 and one to isa-debug-exit, each one exit.
        assert counts[ExitReason.IO] == 501


# --- 500 machines, no leaks -------------------------------------------------------------

def _variant(i: int) -> dict:
    """Vary what a machine is built with, so every kind of fd and thread is covered."""
    kw = {"memory_mib": 2, "smp": 1 + (i % 3 == 0)}
    kw["kick"] = ("immediate_exit", "signal_mask")[i % 2]
    kw["notify"] = ("eventfd", "pipe")[(i // 2) % 2]
    kw["backend"] = ("select", "poll", "epoll")[i % 3]
    if i % 50 == 7:
        kw["signals"] = ("signalfd", "thread")[(i // 50) % 2]
    return kw


def test_500_machines_leak_no_fd_and_no_thread():
    hello = test_kernel("hello")
    spin = test_kernel("spin")
    # One machine first, so that lazily created process-wide things (the
    # SIG_IPI handler, imported modules' fds) exist before we count.
    quiet_machine()[0].close()
    fds, threads = open_fds(), set(threading.enumerate())
    tasks = len(os.listdir("/proc/self/task"))

    def churn():
        ran = 0
        with saved_sigmask():  # signals="..." blocks the VMM's signals in this thread
            for i in range(500):
                machine, out = quiet_machine(**_variant(i))
                try:
                    if i % 25 == 0:  # 20 of them run a guest to its end
                        machine.load_multiboot(hello)
                        assert machine.run(timeout=30) == 33 and out.startswith(b"Hello")
                        ran += 1
                    elif i % 25 == 12:  # 20 start their vCPU threads and are stopped
                        machine.load_multiboot(spin)
                        machine.start()
                finally:
                    machine.close()
        return ran

    assert run_in_thread(churn, 150, "500 machines") == 20
    # Threads are joined in close(); the kernel may take a moment to reap them.
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/task")) > tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() == fds
    assert set(threading.enumerate()) == threads
    assert len(os.listdir("/proc/self/task")) == tasks


def test_a_config_object_and_keywords_build_the_same_machine():
    config = MachineConfig(memory_mib=4, smp=2, exit_path="python")
    with Machine(config) as a, Machine(memory_mib=4, smp=2, exit_path="python") as b, \
            Machine(config, smp=1) as c:
        assert a.config == b.config == config and c.config == config._replace(smp=1)
        assert (len(a.cpus), len(b.cpus), len(c.cpus)) == (2, 2, 1)
        assert a.cpus[0].exit_path == "python"
    with pytest.raises(TypeError, match="unexpected field 'smpp'"):
        Machine(smpp=2)
    with pytest.raises(ValueError, match="--smp must be between 1 and 64"):
        MachineConfig(smp=65)


def test_qemu_kvm_names_lead_to_their_counterparts():
    from qkio.bql import GlobalMutex
    from qkio.main_loop import MainLoop
    from qkio.notify import EventNotifier
    from qkio.signals import SignalSource
    assert Machine.kvm_main_loop is Machine.run
    assert Machine.pause_all_vcpus is Machine.pause_all_threads is Machine.pause
    assert Machine.resume_all_vcpus is Machine.resume
    assert GlobalMutex.qemu_mutex_lock_iothread is GlobalMutex.lock
    assert GlobalMutex.qemu_mutex_unlock_iothread is GlobalMutex.unlock
    assert EventNotifier.qemu_event_increment is EventNotifier.qemu_kvm_notify_work is EventNotifier.notify
    assert MainLoop.qemu_notify_event is MainLoop.notify_event
    with SignalSource("signalfd", [signal.SIGUSR2], force_signalfd_failure=True) as source:
        assert source.path == "thread" and source.signalfd_error.errno == errno.ENOSYS
        assert callable(source.qemu_signalfd) and callable(source.qemu_signalfd_compat)
