"""qkio.lab: a VMM in a child process, its trace, its system calls -- with real children."""

import os
import shutil
import signal
import subprocess
import time

import pytest

from qkio import lab
from qkio.lab.strace import _group_strace
from qkio.signals import REALTIME_SIGNALS, VMM_SIGNALS, blocked_signals

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


@pytest.fixture(scope="module")
def spin():
    return lab.demo_kernel("spin")


def _sigblk(pid, tid):
    return blocked_signals(tid, pid=pid)


@pytest.mark.kvm
def test_spawn_names_threads_and_terminates_on_sigterm(spin):
    with lab.spawn_vmm("--kernel", spin, "--timeout", "20", "--smp", "2") as vm:
        threads = vm.wait_for_threads({"qkio-io", "CPU 0/KVM", "CPU 1/KVM"})
        assert threads[vm.pid] == "qkio-io"  # the io thread is the main thread
        assert os.getsid(vm.pid) == vm.pid  # a session (and process group) of its own
        vm.send_signal(signal.SIGTERM)
        assert vm.wait(10) == 0
        assert "terminating on signal 15" in vm.stderr_text()
        assert vm.threads() == {}
        vm.send_signal(signal.SIGTERM)  # after the exit: a no-op, not an error


@pytest.mark.kvm
def test_child_starts_with_a_clean_mask_whatever_the_caller_blocked(spin):
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGWINCH})
    try:
        with lab.spawn_vmm("--kernel", spin, "--timeout", "20") as vm:
            vm.wait_for_threads({"qkio-io", "CPU 0/KVM"})
            # qkio blocks exactly its own signals in the io thread, nothing inherited.
            assert _sigblk(vm.pid, vm.pid) == set(VMM_SIGNALS) | set(REALTIME_SIGNALS)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@pytest.mark.kvm
def test_context_manager_kills_and_reaps(spin):
    with lab.spawn_vmm("--kernel", spin, "--timeout", "60") as vm:
        vm.wait_for_threads({"CPU 0/KVM"})
        pid = vm.pid
    assert vm.returncode == -signal.SIGKILL
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: no zombie left


@pytest.mark.kvm
def test_context_manager_kills_on_error(spin):
    with pytest.raises(ZeroDivisionError):
        with lab.spawn_vmm("--kernel", spin, "--timeout", "60") as vm:
            raise ZeroDivisionError("an experiment failed")
    assert vm.returncode is not None


@pytest.mark.kvm
def test_wait_timeout_and_stdin_pipe(spin):
    with lab.spawn_vmm("--kernel", spin, "--timeout", "20", stdin=subprocess.PIPE) as vm:
        with pytest.raises(subprocess.TimeoutExpired):
            vm.wait(0.2)
        assert vm.stdin is not None
        os.write(vm.stdin, b"x")
    assert vm.stdin is None


def test_bad_kernel_reports_on_stderr():
    with lab.spawn_vmm("--kernel", "/nonexistent/kernel.elf") as vm:
        assert vm.wait(30) == 1
        assert "no such kernel file" in vm.stderr_text()
        with pytest.raises(RuntimeError):
            vm.wait_for_threads({"CPU 0/KVM"}, timeout=1)


@pytest.mark.kvm
def test_trace_loads_pairs_and_plots(spin, tmp_path):
    path = tmp_path / "t.json"
    with lab.spawn_vmm("--kernel", spin, "--timeout", "0.3", trace=path) as vm:
        assert vm.wait(20) == 124
    trace = lab.load_trace(path)
    assert [e["ts"] for e in trace] == sorted(e["ts"] for e in trace)
    runs = lab.slices(trace, "KVM_RUN")
    assert runs and {s["thread"] for s in runs} == {"CPU 0/KVM"}
    assert all(s["end"] >= s["start"] for s in runs)
    assert runs[-1]["args"]["exit_reason"] == "INTR"  # the stop kick
    waits = lab.slices(trace, "main_loop_wait")
    assert waits and {s["thread"] for s in waits} == {"qkio-io"}
    assert {e["name"] for e in lab.instants(trace)} >= {"kick sent", "kick received"}

    import matplotlib
    matplotlib.use("Agg")
    ax = lab.plot_timeline(trace, threads=["qkio-io", "CPU 0/KVM"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["qkio-io", "CPU 0/KVM"]
    import matplotlib.pyplot as plt
    plt.close(ax.figure)


def test_slices_pairs_nested_begin_end_per_thread():
    def ev(ph, name, ts, tid, **a):
        return {"ph": ph, "name": name, "ts": ts, "dur": 0.0, "tid": tid, "thread": f"t{tid}", "args": a}
    trace = [ev("B", "outer", 0, 1), ev("B", "KVM_RUN", 1, 2), ev("B", "inner", 2, 1, x=1),
             ev("E", "", 3, 1, y=2), ev("E", "", 4, 2, exit_reason="IO"), ev("E", "", 5, 1),
             ev("B", "open", 6, 1)]
    got = [(s["name"], s["thread"], s["start"], s["end"], s["args"]) for s in lab.slices(trace)]
    assert got == [("outer", "t1", 0, 5, {}), ("KVM_RUN", "t2", 1, 4, {"exit_reason": "IO"}),
                   ("inner", "t1", 2, 3, {"x": 1, "y": 2})]


def test_group_strace_names_threads_joins_halves_and_drops_child_processes():
    text = "\n".join([
        '100 prctl(PR_SET_NAME, "qkio-io") = 0',
        '100 clone3({flags=CLONE_VM|CLONE_FS|CLONE_THREAD|CLONE_SYSVSEM, child_tid=0x7f0012345678}, 88) = 101',
        '100 clone(child_stack=NULL, flags=CLONE_VM|CLONE_VFORK|SIGCHLD) = 200',
        '200 write(1, "ldconfig noise", 14) = 14',
        '101 ioctl(7, KVM_RUN <unfinished ...>',
        '100 pselect6(10, [5 9], NULL, NULL, {tv_sec=0, tv_nsec=999000}, NULL) = 0 (Timeout)',
        '101 prctl(PR_SET_NAME, "CPU 0/KVM") = 0',
        '101 <... ioctl resumed>, 0)       = -1 EINTR (Interrupted system call)',
        '101 --- SIGUSR1 {si_signo=SIGUSR1, si_code=SI_TKILL, si_pid=100, si_uid=0} ---',
        '100 +++ exited with 0 +++',
    ])
    got = _group_strace(text, hide={"prctl", "clone", "clone3"})
    assert got == {
        "qkio-io": ["pselect6(10, [5 9], NULL, NULL, {tv_sec=<N>, tv_nsec=<N>}, NULL) = 0 (Timeout)"],
        "CPU 0/KVM": ["ioctl(7, KVM_RUN, 0) = -1 EINTR (Interrupted system call)",
                      "--- SIGUSR1 {si_signo=SIGUSR1, si_code=SI_TKILL, si_pid=<ID>, si_uid=<ID>} ---"],
    }


@pytest.mark.kvm
@needs_strace
def test_strace_threads_groups_a_real_run(spin):
    t0 = time.monotonic()
    got = lab.strace_threads(["--kernel", spin, "--timeout", "0.5", "--signals", "thread"],
                             syscalls=("ioctl", "rt_sigtimedwait"))
    assert time.monotonic() - t0 < 30
    assert {"qkio-io", "CPU 0/KVM", "qkio-sigwait"} <= set(got)
    assert any("KVM_RUN" in line for line in got["CPU 0/KVM"])
    assert not any("KVM_RUN" in line for line in got["qkio-io"])
    assert all(line.startswith("rt_sigtimedwait(") for line in got["qkio-sigwait"])
