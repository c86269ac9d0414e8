"""``qkio bench``: every benchmark runs in a tiny mode and returns well-formed results.

Not a timed test: no speed targets are asserted here (the machine is shared
and may interpret its guests).  What is asserted is that each benchmark
measured what it says -- every signal sent was handled, every wake-up
acknowledged, every guest write counted -- and that its result is the
JSON-serialisable shape the CLI and the book rely on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers.vmm import run_qkio
from qkio import bench
from qkio.bench import stats
from qkio.bench.build import build_guest
from qkio.bench.guest_run import RunFailed, chunk_cycles, have_qemu
from qkio.machine import Machine

CPUS_AT_START = os.sched_getaffinity(0)

needs_tools = pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "ld", "gcc")),
                                 reason="as, ld and gcc are needed to build the guests and pio_ref")
DIST_KEYS = {"n", "min", "p50", "p90", "p99", "max", "mean", "iqr"}


def well_formed(dist, n=None):
    assert set(dist) == DIST_KEYS
    assert dist["min"] <= dist["p50"] <= dist["p90"] <= dist["p99"] <= dist["max"]
    assert dist["iqr"] >= 0
    if n is not None:
        assert dist["n"] == n


def test_summarize():
    d = stats.summarize(range(1, 101))
    assert d["n"] == 100 and d["min"] == 1 and d["max"] == 100
    assert d["p50"] == 50.5 and d["iqr"] == pytest.approx(49.5)
    assert stats.summarize([7.0])["p99"] == 7.0
    assert stats.summarize([]) == {"n": 0}


def test_every_benchmark_is_registered_and_documented():
    for name in bench.BENCHMARKS:
        module = bench.benchmark(name)
        assert module.NAME == name
        assert "Method" in module.__doc__
        assert callable(module.run) and callable(module.table)


def test_unknown_benchmark_is_an_error(capsys):
    class Args:
        names, quick, json = ["nope"], True, None
    assert bench.main(Args) == 1
    assert "unknown benchmark nope" in capsys.readouterr().err


def test_signal():
    r = bench.benchmark("signal").run(count=30, rounds=1)
    json.dumps(r)
    assert set(r["paths"]) == set(r["c_reference"]) == set(r["ratios"]) == {"signalfd", "thread", "async"}
    for impl in ("paths", "c_reference"):
        for method, p in r[impl].items():
            assert p["handled"] == p["sent"] == 30 + 50, (impl, method)  # 50 warm-up signals
            assert p["path"] == method
            well_formed(p["latency_us"], 30)
            assert p["cpu_us_per_signal"] > 0
        # the signal thread is the only extra thread, in Python as in C
        assert r[impl]["signalfd"]["threads"] == r[impl]["async"]["threads"] == 1
        assert r[impl]["thread"]["threads"] == 2
        assert all("samples_us" not in p for p in r[impl].values())
    for q in r["ratios"].values():
        assert q["p50_over_c_p50"] > 0 and q["per_round"]["n"] == 1


def test_signal_rounds_interleave_and_add_up():
    r = bench.benchmark("signal").run(count=21, rounds=3)
    for impl in ("paths", "c_reference"):
        for p in r[impl].values():
            well_formed(p["latency_us"], 21)
            assert p["handled"] == p["sent"] == 21 + 3 * 50  # each round's child warms up
    assert all(q["per_round"]["n"] == 3 for q in r["ratios"].values())


def test_signal_and_wakeup_keep_samples_when_asked():
    r = bench.benchmark("signal").run(count=20, samples=True)
    for p in r["paths"].values():
        assert len(p["samples_us"]) == 20 and min(p["samples_us"]) > 0
        assert max(p["samples_us"]) == pytest.approx(p["latency_us"]["max"], abs=1e-3)
    w = bench.benchmark("wakeup").run(count=20, samples=True)
    for k in w["kinds"].values():
        assert len(k["samples_us"]) == 20
        assert k["over_5ms"] == sum(1 for s in k["samples_us"] if s > 5000)


def test_wakeup():
    r = bench.benchmark("wakeup").run(count=50, rounds=2)
    json.dumps(r)
    for kind in ("eventfd", "pipe"):
        for impl in ("kinds", "c_reference"):
            k = r[impl][kind]
            well_formed(k["latency_us"], 50)
            assert k["wakeups"] >= 50 + 2 * 50  # samples + each round's warm-up, all acknowledged
            assert k["over_5ms"] >= 0 and k["max_us"] == k["latency_us"]["max"]
            assert k["io_cpu_us_per_wake"] > 0
        assert r["ratios"][kind]["per_round"]["n"] == 2
    t = r["targets"]["eventfd p50 / C p50"]
    assert t["met"] == (t["value"] <= t["target"])
    for kind in ("eventfd", "pipe"):
        pc = r["pass_cost"][kind]
        assert pc["main_loop_wait_us"]["n"] == 2 and pc["main_loop_wait_us"]["min"] > 0
    if len(os.sched_getaffinity(0)) >= 2:
        assert r["placement"]["sender_cpu"] != r["placement"]["io_thread_cpu"]
        for who in ("qkio", "c", "floor"):
            well_formed(r["same_cpu"]["eventfd"][who], 50)
    assert os.sched_getaffinity(0) == CPUS_AT_START  # the sender's pinning was undone


def test_wake_ref_keeps_each_thread_to_its_cpu():
    """wake_ref.c's optional CPU arguments pin the threads: a CPU it may not use is an error."""
    from qkio.bench.build import build_c
    exe = build_c("wake_ref")
    ok = subprocess.run([str(exe), "eventfd", "5", "1", "100", "0", "0"], capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0 and json.loads(ok.stdout)["wakeups"] >= 5
    bad = subprocess.run([str(exe), "eventfd", "5", "1", "100", "0", str(os.cpu_count() + 64)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "sched_setaffinity" in bad.stderr


def test_wait_with_few_fds_and_select_limit():
    r = bench.benchmark("wait").run(quick=True, fd_counts=(1, 10))
    json.dumps(r)
    for backend in ("select", "poll", "epoll"):
        for n in ("1", "10"):
            m = r["results"][backend][n]
            well_formed(m["call_us"])
            well_formed(m["syscall_us"])
            well_formed(m["wake_latency_us"])


def test_wait_reports_select_na_above_fd_setsize():
    import os
    wait = bench.benchmark("wait")
    wait._ensure_nofile(2300)
    hog = [os.eventfd(0) for _ in range(1100)]  # push new fds past 1023
    try:
        m = wait.measure("select", 5, wakes=5, calls=20)
    finally:
        for fd in hog:
            os.close(fd)
    assert "FD_SETSIZE" in m["na"] and m["highest_fd"] >= 1024


@pytest.mark.kvm
@needs_tools
def test_pio():
    r = bench.benchmark("pio").run(n=2000, chunk=500, rounds=1, qemu=have_qemu())
    json.dumps(r)
    for d in list(r["per_exit_us"].values()) + list(r["median_chunk_us"].values()):
        well_formed(d, 1)
    # The laws: run() checks every exit count (N + 1 IO exits plus two per byte
    # the guest prints, for qkio and C) and that each guest timed N / K chunks;
    # a chunk's cycles come from the guest's own TSC, so no figure can be <= 0,
    # and a run's fastest chunk is never slower than its median chunk.  No sign
    # of a difference between implementations is asserted: a busy host flips it.
    for v in r["per_exit_us"]:
        assert all(0 < f <= m for f, m in zip(r["rounds_us"][v], r["rounds_median_chunk_us"][v]))
    assert r["count"] == 2000 and r["chunk"] == 500 and r["tsc_khz"] > 0
    assert r["ports"]["qkio"] == 0x3FF and r["ports"]["qkio unowned"] == 0x500
    assert r["ports"]["qkio unowned mmio"] == 0xD0000000  # an address: run() checked N MMIO exits
    assert "qkio/c" in r["ratios"] and r["targets"]["qkio/c"]["target"] == 1.10
    assert set(r["verdicts"]) == set(r["targets"])
    if "qemu" in r["per_exit_us"]:
        assert set(r["targets"]) == {"qkio/c", "qkio/qemu", "qkio unowned/qemu unowned",
                                     "qkio unowned mmio/qemu unowned mmio"}


@pytest.mark.kvm
@needs_tools
def test_pio_guest_refuses_more_chunks_than_it_can_keep():
    out = bytearray()
    with Machine(memory_mib=8, console=out.extend, log=lambda m: None) as machine:
        machine.load_multiboot(build_guest("pio-loop"), append="count=5000 chunk=1")
        status = machine.run(timeout=60)
    assert status == 3 and b"more than 4096 chunks" in out
    with pytest.raises(RunFailed, match="no 'pio-loop: chunk=' line"):
        chunk_cycles(out.decode())
    assert chunk_cycles("x\npio-loop: chunk=10 cycles: 5 7\n") == (10, [5, 7])


@pytest.mark.kvm
@needs_tools
def test_ioeventfd_counts_every_write():
    r = bench.benchmark("ioeventfd").run(n=500, small=100, rounds=1)
    json.dumps(r)
    assert r["checks"]["qkio ioeventfd counts"] == [500]
    assert r["checks"]["qkio exit IO exits"] == [501]
    assert r["checks"]["c ioeventfd exits"] == [1]  # only the isa-debug-exit OUT left the kernel
    for d in r["per_write_us"].values():
        well_formed(d, 1)


@pytest.mark.kvm
@needs_tools
def test_serial_gets_every_byte():
    # Enough bytes that they cannot all wait in the pipe for one read, even
    # with the reader kept off the CPU by a busy host (n=300 did, once).
    r = bench.benchmark("serial").run(n=5000, rounds=1, qemu=False)
    json.dumps(r)
    assert r["unmeasured_rounds"]["qkio"] == 0
    well_formed(r["bytes_per_s"]["qkio"], 1)
    assert r["bytes_per_s"]["qkio"]["p50"] > 0


@pytest.mark.kvm
def test_serial_expected_output_is_what_the_flood_guest_prints():
    expected = bench.benchmark("serial").expected_output(130)
    assert expected[:3] == b"abc" and expected[63:64] == b"\n" and len(expected) == 130
    result = run_qkio("--kernel", "flood", "--append", "count=130")
    assert (result.returncode, result.stdout) == (33, expected), result.stderr


def test_cli_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "qkio", "bench", "wakeup", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wakeup:" in r.stdout and "eventfd" in r.stdout
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "quick", "results", "errors"}
    assert data["quick"] is True and not data["errors"]
    for key in ("kernel", "cpu_model", "python", "kvm_modules"):
        assert key in data["machine"]
    assert data["results"]["wakeup"]["kinds"]["eventfd"]["wakeups"] >= 1000


def test_verdict_names_a_winner_only_beyond_the_spread():
    def result(p50, rounds):
        return {"latency_us": {"p50": p50}, "round_p50_us": rounds}

    clear = stats.verdict("a", result(10.0, [9.0, 11.0]), "b", result(20.0, [19.0, 21.0]))
    assert clear["winner"] == "a" and clear["spread"] == 2.0 and "faster" in clear["text"]
    close = stats.verdict("a", result(10.0, [5.0, 15.0]), "b", result(12.0, [11.0, 13.0]))
    assert close["winner"] is None and "indistinguishable here" in close["text"]
    reverse = stats.verdict("a", result(30.0, [30.0]), "b", result(20.0, [20.0]))
    assert reverse["winner"] == "b"


def test_runs_keep_each_rounds_median():
    r = bench.benchmark("wakeup").run(count=20, rounds=2)
    for kind in ("eventfd", "pipe"):
        for side in (r["kinds"], r["c_reference"]):
            assert len(side[kind]["round_p50_us"]) == 2


def test_busy_notifier_keeping_the_gil_waits_a_switch_interval():
    # A law of CPython's GIL, so it holds on a loaded host; run in a fresh
    # interpreter, where no third thread can make the sender let go early.
    code = ("import json, sys; from qkio.bench import wakeup; "
            "json.dump(wakeup.busy_notifier(count=5, busy_s=0.02), sys.stdout)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    kept = data["ways"]["write keeping the GIL"]
    assert kept["wakeups"] >= 5 and kept["under_interval"] == 0
    assert kept["latency_us"]["min"] >= data["switch_interval_s"] * 1e6
    assert data["ways"]["os.write"]["wakeups"] >= 5


@pytest.mark.kvm
@needs_tools
def test_guest_rate_counts_guest_instructions_without_exits():
    from qkio.bench import guest_rate

    r = guest_rate.run(n=20_000, host_n=2_000_000, rounds=1)
    assert r["exits"] == [1, 1]   # only the isa-debug-exit write, with and without the loop
    for key in ("guest_ips", "host_ips", "host_over_guest"):
        well_formed(r[key], 1)
        assert r[key]["min"] > 0


def test_startup_runs_each_command_and_checks_it():
    r = bench.benchmark("startup").run(rounds=2, qemu=have_qemu())
    json.dumps(r)
    assert r["qkio_bytecode"] == "up to date"
    for name, d in r["wall_ms"].items():
        well_formed(d, 2)
        assert d["min"] > 0 and r["cpu_ms"][name]["min"] > 0, name
    # qkio's whole run includes starting the interpreter: it cannot beat it
    # (a law, however loaded the machine: the same process does more)
    assert r["cpu_ms"]["qkio"]["min"] > r["cpu_ms"]["python"]["min"]
    assert r["qkio_own_ms"]["n"] == r["pit_cost_ms"]["n"] == 2
    assert "--kernel" in r["commands"]["qkio"] and "--pit" in r["commands"]["qkio --pit"]


@pytest.mark.kvm
def test_timers_every_firing_never_early_and_a_verdict_per_path():
    from qkio.bench import timer_lateness
    res = timer_lateness.run(rounds=1, count=8)
    assert set(res["runs"]) == {f"{c}/{p}" for c in ("deadline", "alarm")
                                for p in ("signalfd", "thread", "async")} | {timer_lateness.RACE}
    for key, r in res["runs"].items():
        assert r["statuses"] == [0] and r["counted"] == 8 and r["min_us"] >= 0
        assert (r["alarm_signals"] > r["firings"]) if key.startswith("alarm") else r["alarm_signals"] == 0
    assert set(res["verdicts"]) == {"signalfd", "thread", "async"}
    assert all(row[1] for row in timer_lateness.table(res))


@pytest.mark.kvm
@needs_tools
def test_virtio_reports_every_mode_and_the_laws():
    said = []
    r = bench.benchmark("virtio").run(n=8, small=4, rounds=2, progress=said.append)
    assert said[0] == "round 1/2: qkio vcpu" and said[-1].startswith("round 2/2: ")
    modes = ("vcpu", "main", "iothread")
    assert {f"qkio {m}" for m in modes} | {"qkio vcpu paio", "qkio main paio"} <= set(r["cpu_us_per_request"])
    if r["qemu"]:
        assert {f"qemu {m}" for m in modes} <= set(r["cpu_us_per_request"])
        assert set(r["qkio_over_qemu_cpu"]) == set(modes)
    assert r["guest_report"][3] == "virtio-blk: writes 8 reads 8 verified 8 errors 0"
    assert r["notify_exits_per_request"]["vcpu"]["p50"] == 1.0
    assert r["notify_exits_per_request"]["main"]["p50"] == r["notify_exits_per_request"]["iothread"]["p50"] == 0.0
    assert r["requests_without_lock"]["iothread"]["without"] == r["requests_without_lock"]["iothread"]["of"] > 0
    assert r["requests_without_lock"]["vcpu"]["without"] == 0
    assert bench.benchmark("virtio").table(r)
