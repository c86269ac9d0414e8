"""``--clock alarm|deadline`` and the signals qemu-kvm 0.12 routed: real timers, signals, threads.

The timer runs happen in child processes (:mod:`qkio.bench.timer_child`, a
real machine running the ``spin`` guest): the alarm clock's SIGALRM is
process-directed and must never reach pytest.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys

import pytest

from helpers.vmm import Vmm, run_qkio, wait_until
from qkio.alarm_timer import MIN_TIMER_REARM_US
from qkio.libc import libc

COUNT = 40


def timer_run(signals, clock, count=COUNT, *extra):
    p = subprocess.run([sys.executable, "-m", "qkio.bench.timer_child", "--signals", signals,
                        "--clock", clock, "--count", str(count), "--warmup", "2", *extra],
                       capture_output=True, text=True, timeout=120, start_new_session=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.kvm
@pytest.mark.parametrize("signals", ["signalfd", "thread", "async"])
@pytest.mark.parametrize("clock", ["deadline", "alarm"])
def test_every_timer_fires_never_early(signals, clock):
    out = timer_run(signals, clock)
    assert out["status"] == 0 and out["path"] == signals
    assert out["firings"] == COUNT + 2
    # A timer runs only once its deadline has passed, on either clock.
    assert min(out["late_us"]) >= 0
    if clock == "deadline":
        assert out["alarm_signals"] == 0 and out["rearms"] == 0
    else:
        # Every firing was preceded by an alarm being armed and taken.
        assert out["alarm_signals"] >= 1 and out["rearms"] >= 1
        # 0.12's order: the alarm is re-armed *before* qemu_run_timers removes
        # the expired timer, so it is armed for MIN_TIMER_REARM_US later -- an
        # extra SIGALRM per firing, on top of the one that served it.
        assert out["alarm_signals"] > out["firings"]
        # Each alarm's host_alarm_handler rings the doorbell from the io thread,
        # so the loop goes round more often than it fires timers.
        assert out["iterations"] > out["firings"]


def test_min_timer_rearm_is_0_12s():
    assert MIN_TIMER_REARM_US == 250  # vl.c, qemu-kvm-0.12.3


@pytest.mark.kvm
def test_alarm_clock_needs_a_signal_path():
    from qkio.machine import Machine
    with pytest.raises(ValueError, match="--clock alarm needs a signal path"):
        Machine(memory_mib=8, clock="alarm")
    with pytest.raises(ValueError, match="clock must be deadline or alarm"):
        Machine(memory_mib=8, clock="sundial")


def test_cli_rejects_an_unknown_clock():
    p = run_qkio("--kernel", "spin", "--clock", "sundial")
    assert p.returncode == 1  # "bad command line" (qkio run --help)
    assert b"invalid choice: 'sundial'" in p.stderr and b"Traceback" not in p.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("clock", ["deadline", "alarm"])
def test_cli_runs_with_each_clock(clock):
    p = run_qkio("--kernel", "spin", "--clock", clock, "--timeout", "1")
    assert p.returncode == 124, p.stderr


def _report(vmm):
    seen = vmm.stderr().count("signals taken through")
    os.kill(vmm.pid, signal.SIGHUP)
    wait_until(lambda: vmm.stderr().count("signals taken through") > seen, 10, "a SIGHUP report")
    line = [x for x in vmm.stderr().splitlines() if x.startswith("signals taken through")][-1]
    return dict(kv.split("=") for kv in line.split(": ", 1)[1].split())


def _tgkill(pid, tid, sig):
    if libc.tgkill(pid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pending(pid, tid):
    """(thread-pending, process-pending) signal numbers of one thread, from /proc."""
    sets = {}
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("SigPnd", "ShdPnd"):
                bits = int(val, 16)
                sets[key] = {n + 1 for n in range(64) if bits >> n & 1}
    return sets["SigPnd"], sets["ShdPnd"]


@pytest.mark.kvm
@pytest.mark.parametrize("path", ["signalfd", "thread"])
def test_compat_census_and_the_aio_signal(path):
    """SIGUSR2 has its own signal fd: in compat mode, its own signal thread."""
    with Vmm("--kernel", "spin", "--signals", path) as vmm:
        vmm.wait_for_thread("CPU 0/KVM")
        names = sorted(vmm.threads().values())
        if path == "thread":
            assert names.count("qkio-sigwait") == 1 and names.count("qkio-aio-sigwt") == 1
        else:
            assert "qkio-sigwait" not in names and "qkio-aio-sigwt" not in names
        os.kill(vmm.pid, signal.SIGUSR2)
        wait_until(lambda: _report(vmm).get("SIGUSR2") == "1", 10, "SIGUSR2 taken")
        vmm.proc.send_signal(signal.SIGTERM)
        assert vmm.wait(10) == 0


@pytest.mark.kvm
@pytest.mark.parametrize("path", ["signalfd", "thread"])
def test_a_thread_directed_sigbus_never_reaches_the_io_thread(path):
    """signalfd's scope: only signals pending for the reader or for the process."""
    with Vmm("--kernel", "spin", "--signals", path) as vmm:
        tid = vmm.wait_for_thread("CPU 0/KVM")
        _tgkill(vmm.pid, tid, signal.SIGBUS)
        # Pending for that thread alone, which blocks it; never for the process.
        wait_until(lambda: signal.SIGBUS in _pending(vmm.pid, tid)[0], 10, "SIGBUS pending")
        assert signal.SIGBUS not in _pending(vmm.pid, tid)[1]
        # The io thread has taken other signals since, but not that one.
        os.kill(vmm.pid, signal.SIGUSR2)
        wait_until(lambda: _report(vmm).get("SIGUSR2") == "1", 10, "SIGUSR2 taken")
        assert "SIGBUS" not in _report(vmm)
        assert vmm.proc.poll() is None
        # A process-directed SIGBUS does reach it: sigbus_handler re-raises it,
        # as 0.12's sigbus_reraise did, and the VMM dies of it.
        os.kill(vmm.pid, signal.SIGBUS)
        assert vmm.wait(10) == -signal.SIGBUS
        assert "SIGBUS (si_code 0) is not a memory error: re-raised" in vmm.stderr()


@pytest.mark.kvm
def test_sigalrm_from_outside_is_harmless_on_either_clock():
    for clock in ("deadline", "alarm"):
        with Vmm("--kernel", "spin", "--clock", clock) as vmm:
            vmm.wait_for_thread("CPU 0/KVM")
            os.kill(vmm.pid, signal.SIGALRM)
            os.kill(vmm.pid, signal.SIGIO)
            wait_until(lambda: {"SIGALRM", "SIGIO"} <= set(_report(vmm)), 10, "both taken")
            vmm.proc.send_signal(signal.SIGTERM)
            assert vmm.wait(10) == 0


def test_next_deadline_dyntick_is_never_under_250_us():
    """dynticks never arms closer than MIN_TIMER_REARM_US: an overdue timer gives 250."""
    import time

    from qkio.alarm_timer import DynticksAlarm
    from qkio.main_loop import MainLoop
    with MainLoop() as loop:
        alarm = DynticksAlarm(loop)          # not started: no POSIX timer, no signal
        assert alarm.qemu_next_deadline_dyntick() is None and loop.qemu_next_deadline() is None
        t = loop.timer_new(lambda _: None)
        t.qemu_mod_timer(time.monotonic_ns() - 5_000_000)
        assert loop.qemu_next_deadline() == 0
        assert alarm.qemu_next_deadline_dyntick() == MIN_TIMER_REARM_US
        t.qemu_mod_timer(time.monotonic_ns() + 50_000_000)
        assert 40_000 <= alarm.qemu_next_deadline_dyntick() <= 50_000


def test_qemu_run_timers_takes_a_timer_off_before_its_callback():
    """A callback that re-arms its own timer for 'now' is not run again in the same call."""
    import time

    from qkio.main_loop import MainLoop
    with MainLoop() as loop:
        calls = []

        def cb(_):
            calls.append(t.qemu_timer_pending())
            t.qemu_mod_timer(time.monotonic_ns() + 10_000_000_000)
        t = loop.timer_new(cb)
        t.qemu_mod_timer(time.monotonic_ns() - 1)
        with loop.lock:
            assert loop.qemu_run_timers() == 1
        assert calls == [False] and t.qemu_timer_pending()


@pytest.mark.kvm
def test_with_signal_mask_kicks_the_vcpu_thread_takes_its_own_sigbus():
    """0.12's setup_kernel_sigmask lets SIGBUS interrupt KVM_RUN, and the vCPU
    thread takes it itself (kvm_main_loop_wait -> kvm_on_sigbus); the io
    thread's signalfd never sees that one."""
    with Vmm("--kernel", "spin", "--kick", "signal_mask") as vmm:
        tid = vmm.wait_for_thread("CPU 0/KVM")
        _tgkill(vmm.pid, tid, signal.SIGBUS)
        # Not a memory error: the vCPU thread re-raises it, as 0.12's
        # kvm_on_sigbus -> sigbus_reraise did, and the VMM dies of it.  The
        # kernel says SI_TKILL (-6); glibc's sigtimedwait folds that into
        # SI_USER (0) (sysdeps/unix/sysv/linux/sigtimedwait.c), a signalfd would not.
        assert vmm.wait(10) == -signal.SIGBUS
        assert "CPU 0/KVM: SIGBUS (si_code 0) is not a memory error: re-raised" in vmm.stderr()
