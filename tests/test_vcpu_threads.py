"""The threads of a running VM, with real KVM, real threads and real signals.

* which threads a ``qkio run`` has, by name, for each signal path;
* process-directed SIGTERM and SIGHUP reaching the io thread;
* two vCPUs in KVM_RUN at the same time;
* 10,000 kicks and pauses per kick style, none lost, no deadlock;
* the io thread sleeping while a vCPU thread works flat out.

Kicks, pauses and the SMP overlap use an in-process ``Machine`` (the test
needs its objects); everything about signals and /proc uses a child process
(``helpers.vmm.Vmm``), since process-directed signals must not reach pytest.
"""

from __future__ import annotations

import collections
import signal
import threading
import time

import pytest

from helpers.vmm import Vmm, demo_guest, run_in_thread, task_cpu_ticks, test_kernel, wait_until
from qkio import trace
from qkio.cpus import KICK_STYLES
from qkio.kvm.constants import ExitReason
from qkio.machine import STATUS_TIMEOUT, Machine

pytestmark = pytest.mark.kvm


def _running_spin(method: str) -> Vmm:
    """A ``qkio run --kernel spin`` whose vCPU thread is in the guest (it has
    burnt CPU time), so every thread the run will ever have exists."""
    vmm = Vmm("--kernel", str(test_kernel("spin")), "--signals", method)
    tid = vmm.wait_for_thread("CPU 0/KVM")
    wait_until(lambda: task_cpu_ticks(vmm.pid).get(tid, ("", 0))[1] > 0, 10, "the vCPU thread to run")
    return vmm


# --- which threads --------------------------------------------------------------

def test_signal_threads_are_the_only_extra_threads():
    names = {}
    for method in ("signalfd", "thread", "async"):
        with _running_spin(method) as vmm:
            names[method] = collections.Counter(vmm.threads().values())
            assert vmm.proc.poll() is None
    # Kernel workers KVM attaches to the VM's process (kvm-nx-lpage-recovery)
    # appear in every configuration alike, so they cancel out.
    # Compat mode has two signal threads, as 0.12 had: the machine's and the
    # AIO pool's (posix-aio-compat's own qemu_signalfd for SIGUSR2).
    compat = collections.Counter({"qkio-sigwait": 1, "qkio-aio-sigwt": 1})
    assert names["thread"] - names["signalfd"] == compat
    assert names["signalfd"] - names["thread"] == collections.Counter()
    assert sum(names["thread"].values()) == sum(names["signalfd"].values()) + 2
    assert names["async"] == names["signalfd"]
    for method, counter in names.items():
        assert counter["qkio-io"] == 1 and counter["CPU 0/KVM"] == 1, (method, counter)
        qkio_threads = {n for n in counter if n.startswith(("qkio", "CPU "))}
        expected = {"qkio-io", "CPU 0/KVM"} | (set(compat) if method == "thread" else set())
        assert qkio_threads == expected, method


def test_smp_has_a_thread_per_vcpu():
    with Vmm("--kernel", str(test_kernel("spin")), "--smp", "3") as vmm:
        for i in range(3):
            vmm.wait_for_thread(f"CPU {i}/KVM")
        assert sorted(n for n in vmm.threads().values() if n.startswith("CPU")) == \
            ["CPU 0/KVM", "CPU 1/KVM", "CPU 2/KVM"]


# --- signals ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["signalfd", "thread", "async"])
def test_sighup_reports_and_sigterm_ends_cleanly(method):
    with _running_spin(method) as vmm:
        vmm.proc.send_signal(signal.SIGHUP)  # kill(pid, ...): process-directed
        wait_until(lambda: "CPU 0/KVM: RIP=0x" in vmm.stderr(), 5, f"the SIGHUP report; {vmm.stderr()!r}")
        time.sleep(0.2)
        assert vmm.proc.poll() is None, "SIGHUP ended the run"
        assert "exits:" in vmm.stderr()

        start = time.monotonic()
        vmm.proc.send_signal(signal.SIGTERM)
        status = vmm.wait(5)
        elapsed = time.monotonic() - start
        assert status == 0, vmm.stderr()
        assert elapsed < 1.0, f"SIGTERM took {elapsed:.2f} s to end the run"
        err = vmm.stderr()
        assert "terminating on signal 15" in err and "Traceback" not in err


def test_sigint_ends_cleanly():
    with _running_spin("signalfd") as vmm:
        vmm.proc.send_signal(signal.SIGINT)
        assert vmm.wait(5) == 0
        assert "terminating on signal 2" in vmm.stderr()


# --- two vCPUs at once ----------------------------------------------------------------

def _slices(events, name):
    """(tid -> [(begin_ns, end_ns, end_args)]) for B/E slices called ``name``."""
    stacks, out = collections.defaultdict(list), collections.defaultdict(list)
    for ev in events:
        if ev["ph"] == "B":
            stacks[ev["tid"]].append((ev["name"], ev["ts_ns"]))
        elif ev["ph"] == "E" and stacks[ev["tid"]]:
            began_name, began = stacks[ev["tid"]].pop()
            if began_name == name:
                out[ev["tid"]].append((began, ev["ts_ns"], ev["args"]))
    return out


def _overlap_ns(a, b):
    """Total time during which a slice of ``a`` and a slice of ``b`` both ran (both sorted)."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def test_two_vcpus_run_and_exit_at_the_same_time():
    tracer = trace.Tracer(enabled=True)
    machine = Machine(memory_mib=4, smp=2, tracer=tracer, console=lambda data: None, log=lambda m: None)
    samples = []

    def sample():
        samples.append([c.exit_counts[ExitReason.IO] for c in machine.cpus])

    timers = [threading.Timer(t, sample) for t in (0.4, 0.7, 1.0)]
    with machine:
        machine.load_multiboot(demo_guest("smp"), append="count=0")  # count forever
        for t in timers:
            t.start()
        status = machine.run(timeout=1.3)
        for t in timers:
            t.join()
    assert status == STATUS_TIMEOUT
    # Exit counts sampled mid-run: both vCPUs kept taking exits in every window.
    assert len(samples) == 3
    for before, after in zip(samples, samples[1:]):
        assert after[0] > before[0] and after[1] > before[1], samples

    events = tracer.events()
    tids = {ev["thread"]: ev["tid"] for ev in events}
    runs = _slices(events, "KVM_RUN")
    cpu0, cpu1 = runs[tids["CPU 0/KVM"]], runs[tids["CPU 1/KVM"]]
    io_exits = [sum(1 for *_, args in r if args.get("exit_reason") == "IO") for r in (cpu0, cpu1)]
    assert min(io_exits) > 100, io_exits
    # Both threads were inside KVM_RUN at the same time for most of the run;
    # with one global lock held around KVM_RUN this would be zero.
    span = max(cpu0[-1][1], cpu1[-1][1]) - max(cpu0[0][0], cpu1[0][0])
    # (cpu1 starts once the BSP has sent SIPI; measure from then.)
    assert _overlap_ns(cpu0, cpu1) > 0.3 * span
    # And exits of the two interleave: an IO exit of CPU 1 falls between two of CPU 0.
    ends0 = [e for _, e, args in cpu0 if args.get("exit_reason") == "IO"]
    ends1 = [e for _, e, args in cpu1 if args.get("exit_reason") == "IO"]
    assert any(ends0[0] < e < ends0[-1] for e in ends1)


# --- kicks and pauses -------------------------------------------------------------------

KICKS = 10_000
PAUSES = 5_000  # pause() of the machine pauses both vCPUs: 10,000 vCPU pauses


@pytest.fixture(params=KICK_STYLES)
def spinning_machine(request):
    """Two vCPUs: CPU 0 spins in the guest, CPU 1 waits for a SIPI that never
    comes (its thread sleeps inside KVM_RUN, in the kernel).  Both kinds of
    "in KVM_RUN" must be kickable."""
    machine = Machine(memory_mib=4, smp=2, kick=request.param, log=lambda m: None)
    machine.load_multiboot(test_kernel("spin"))
    machine.start()
    yield machine
    run_in_thread(machine.close, 30, "closing the machine")
    for cpu_thread in threading.enumerate():
        assert not cpu_thread.name.startswith("CPU "), "a vCPU thread outlived close()"


def test_10000_run_on_cpu_each_completes(spinning_machine):
    machine = spinning_machine
    done = collections.Counter()
    on = [None]

    def work():
        done[threading.current_thread().name] += 1
        return on[0]

    def kicks():
        for i in range(KICKS):
            cpu = machine.cpus[i % 2]
            on[0] = i
            assert cpu.run_on_cpu(work) == i
    run_in_thread(kicks, 120, f"{KICKS} run_on_cpu")
    assert done == {"CPU 0/KVM": KICKS // 2, "CPU 1/KVM": KICKS // 2}
    for cpu in machine.cpus:
        # Every kick was taken (none was lost), and none was counted twice.
        assert cpu.kicks_received <= cpu.kicks_sent
        assert cpu.kicks_sent >= KICKS // 2
        assert not cpu.finished.is_set()
    # CPU 0 is still running its guest: the spin loop.
    rip = machine.cpus[0].run_on_cpu(lambda: machine.cpus[0].vcpu.get_regs().rip)
    assert 0x100000 <= rip < 0x101000


def test_5000_pause_resume_cycles(spinning_machine):
    machine = spinning_machine

    def cycles():
        for _ in range(PAUSES):
            machine.pause()
            assert all(cpu.paused for cpu in machine.cpus)
            machine.resume()
    run_in_thread(cycles, 120, f"{PAUSES} pause/resume cycles")
    # While paused, the guest does not run: its exit counts stand still.
    machine.pause()
    frozen = [dict(c.exit_counts) for c in machine.cpus]
    time.sleep(0.1)
    assert [dict(c.exit_counts) for c in machine.cpus] == frozen
    machine.resume()
    assert not any(cpu.paused for cpu in machine.cpus)


def test_concurrent_kickers_and_a_pauser(spinning_machine):
    """Two threads queue work on CPU 0 while a third pauses and resumes the
    machine: requests published from three threads, one kick each."""
    machine = spinning_machine
    cpu = machine.cpus[0]
    count = collections.Counter()

    def kicker(name):
        for _ in range(1500):
            cpu.run_on_cpu(lambda: count.update([name]))

    def pauser():
        for _ in range(300):
            machine.pause()
            machine.resume()

    workers = [threading.Thread(target=kicker, args=(n,), daemon=True) for n in ("a", "b")]
    workers.append(threading.Thread(target=pauser, daemon=True))
    for w in workers:
        w.start()
    deadline = time.monotonic() + 120
    for w in workers:
        w.join(max(0, deadline - time.monotonic()))
        assert not w.is_alive(), "deadlock: a kicker or the pauser never finished"
    assert count == {"a": 1500, "b": 1500}


# --- the io thread does not spin ----------------------------------------------------------

def test_io_thread_sleeps_while_a_vcpu_floods_the_console():
    """Under ``flood``, every exit is handled on the vCPU thread; the io thread
    has nothing to do and must be asleep in select(), not polling."""
    demo_guest("flood")  # built (and cached) here, so the run below starts at once
    with Vmm("--kernel", "flood", "--append", "count=30000") as vmm:
        vcpu = vmm.wait_for_thread("CPU 0/KVM")
        first = task_cpu_ticks(vmm.pid)  # start-up (imports, building the VM) is done by now
        last = first
        while vmm.proc.poll() is None:
            try:
                sample = task_cpu_ticks(vmm.pid)
            except FileNotFoundError:  # exited between poll() and the listing
                break
            if vcpu not in sample:  # the run is over, the vCPU thread gone
                break
            last = sample
            time.sleep(0.05)
        assert vmm.wait(60) == 33
        assert len(vmm.stdout()) == 30000
    io = vmm.pid  # the main thread is the io thread
    io_used = last[io][1] - first[io][1]
    vcpu_used = last[vcpu][1] - first[vcpu][1]
    assert last[io][0] == "qkio-io"
    assert vcpu_used >= 20, f"the flood was too short to measure ({vcpu_used} ticks)"
    assert io_used <= max(2, vcpu_used // 20), (io_used, vcpu_used)


def test_io_thread_waits_rarely_during_a_flood():
    """The same, counted from the trace: main_loop_wait iterations during a
    flood are a handful (the 1 s timeout, the exit request), not thousands."""
    tracer = trace.Tracer(enabled=True)
    out = bytearray()
    with Machine(memory_mib=4, tracer=tracer, console=out.extend, log=lambda m: None) as machine:
        machine.load_multiboot(demo_guest("flood"), append="count=8000")
        start = time.monotonic()
        assert machine.run(timeout=60) == 33
        elapsed = time.monotonic() - start
    assert len(out) == 8000
    events = tracer.events()
    waits = [ev for ev in events if ev["ph"] == "B" and ev["name"] == "main_loop_wait"]
    kvm_runs = [ev for ev in events if ev["ph"] == "B" and ev["name"] == "KVM_RUN"]
    assert len(kvm_runs) >= 16000
    assert len(waits) <= 3 + 2 * elapsed, (len(waits), elapsed)
