"""``signal``: how long a signal takes to reach its handler in the io thread, three ways.

Method
------
The VMM side runs in a child process (:mod:`qkio.bench.signal_child`),
started with ``start_new_session=True`` so that nothing else can send it a
signal and it cannot send one to us.  As in ``qkio run``, it blocks the VMM's
signals before it starts any thread, then runs a real ``MainLoop`` with a
``SignalSource`` attached, using one of the three paths:

* ``signalfd``: the io thread's ``select()`` watches a signalfd;
* ``thread``: a ``qkio-sigwait`` thread in ``sigwaitinfo()`` writes a
  record into a pipe that the io thread watches (qemu-kvm's compatfd);
* ``async``: a Python signal handler, unblocked in the io (main) thread
  only; CPython's C handler sets a flag, ``select()`` fails with EINTR, and
  the Python handler runs before ``select()`` is retried.

The sender (this process) sends SIGUSR2 with ``kill()`` one at a time:
read CLOCK_MONOTONIC, ``kill``, then wait for the child's acknowledgement
on a pipe.  The child's handler reads CLOCK_MONOTONIC first thing and
writes it back, so each sample is *handler start - time before kill*, paired
by sequence (one signal in flight at a time; standard signals would coalesce
otherwise).  Between two signals the sender sleeps ~100 µs so that the io
thread is back asleep in ``select()`` -- every sample is a real wake-up.
The first ``warmup`` signals are not counted.

CPU time per signal is the child's CPU time (CLOCK_PROCESS_CPUTIME_ID, all
threads, nanosecond-precise) over the counted signals, divided by their
number; ``getrusage``'s user/system split is given too, but it is only as
fine as the scheduler tick.  It includes the
main loop's own work and the acknowledgement ``write()``, which are the same
for all three paths; the differences between paths are the paths.

Results: per path, latency in µs (p50/p90/p99/max/IQR), CPU µs per signal,
the child's thread count, and how many signals arrived (must be all); with
``samples=True`` also every counted latency, in sending order (``samples_us``),
for plotting the whole distribution.

The C reference
---------------
``signal_ref.c`` (compiled with ``gcc -O2`` on first use) is the same child
in C: the same arguments and protocol, the VMM's signals blocked before any
thread, a mutex dropped around the wait, and the same three paths
(``signalfd``; a ``sigwaitinfo`` thread writing 128-byte records into a
pipe; for ``async``, a handler that sets a flag and a ``pselect()`` that
unblocks SIGUSR2 only while waiting).  The sender above is the same for
both, so the difference is the VMM side: what the mechanism costs in C, and
what Python adds.  Everything runs **interleaved**: ``rounds`` rounds, each
running every path, qkio's child then the C child, so a change in the
machine's load hits all of them; each path's ``round_p50_us`` lists its
median in each round, the run's own spread;
``c_reference`` has the C child's figures (same keys as ``paths``) and
``ratios`` qkio p50 / C p50, over all samples and per round.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

from .build import build_c
from .stats import fmt_dist, summarize

NAME = "signal"
TITLE = "a signal reaching its handler in the io thread"
METHODS = ("signalfd", "thread", "async")
METHOD = ("child process in its own session, signals blocked before threads, real MainLoop + "
          "SignalSource; kill(SIGUSR2) one at a time, ~100 µs apart; latency = handler's "
          "CLOCK_MONOTONIC - sender's before kill(); CPU = child's process CPU time / signals; "
          "the same child in C (signal_ref.c), interleaved in rounds")


class ChildFailed(RuntimeError):
    pass


def _read_exact(fd: int, n: int, timeout: float = 10.0) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while len(buf) < n:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise ChildFailed(f"child sent {len(buf)} of {n} bytes before timing out")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise ChildFailed(f"child closed its output after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def measure(method: str, count: int, warmup: int = 50, gap_s: float = 100e-6,
            samples: bool = False, impl: str = "qkio") -> dict:
    """Send ``warmup + count`` SIGUSR2s to a child using ``method``; return latencies and CPU.

    ``impl="qkio"``: the child is :mod:`qkio.bench.signal_child`; ``"c"``: the
    C reference ``signal_ref.c`` (same protocol, same sender).
    ``samples=True`` adds ``samples_us``: every counted latency, in sending order."""
    if impl == "c":
        cmd = [str(build_c("signal_ref"))]
    elif impl == "qkio":
        cmd = [sys.executable, "-m", "qkio.bench.signal_child"]
    else:
        raise ValueError(f"impl must be 'qkio' or 'c', not {impl!r}")
    cmd += ["--method", method, "--count", str(count), "--warmup", str(warmup)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env)
    assert child.stdout is not None  # stdout=PIPE
    fd = child.stdout.fileno()
    latencies = []
    try:
        if _read_exact(fd, 1, timeout=30) != b"R":
            raise ChildFailed("child did not say it was ready")
        time.sleep(0.01)  # let it reach select()
        kill, now, unpack = os.kill, time.monotonic_ns, struct.Struct("=Q").unpack
        pid, sig = child.pid, signal.SIGUSR2
        for i in range(warmup + count):
            t0 = now()
            kill(pid, sig)
            (t1,) = unpack(_read_exact(fd, 8))
            if i >= warmup:
                latencies.append((t1 - t0) / 1000)
            if gap_s:
                time.sleep(gap_s)
        line = b""
        while not line.endswith(b"\n"):
            line += _read_exact(fd, 1)
        report = json.loads(line)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    out = {
        "latency_us": summarize(latencies),
        "cpu_us_per_signal": round(report["cpu_ns"] / count / 1e3, 2) if count else None,
        "user_us_per_signal": round(report["user_s"] / count * 1e6, 2) if count else None,
        "system_us_per_signal": round(report["system_s"] / count * 1e6, 2) if count else None,
        "sent": warmup + count,
        "handled": report["seen"],
        "path": report["path"],
        "threads": report["threads"],
    }
    if samples:
        out["samples_us"] = [round(x, 3) for x in latencies]
    return out


def _merge(parts: list[dict], samples: bool) -> dict:
    """One path's result from its interleaved chunks: all samples, CPU over all signals."""
    lat = [x for p in parts for x in p["samples_us"]]
    counted = len(lat)
    out = {
        "latency_us": summarize(lat),
        "cpu_us_per_signal": round(sum(p["cpu_us_per_signal"] * len(p["samples_us"])
                                       for p in parts) / counted, 2) if counted else None,
        "user_us_per_signal": round(sum(p["user_us_per_signal"] * len(p["samples_us"])
                                        for p in parts) / counted, 2) if counted else None,
        "system_us_per_signal": round(sum(p["system_us_per_signal"] * len(p["samples_us"])
                                          for p in parts) / counted, 2) if counted else None,
        "sent": sum(p["sent"] for p in parts),
        "handled": sum(p["handled"] for p in parts),
        "path": parts[0]["path"],
        "threads": max(p["threads"] for p in parts),
        # Each round's median: how far the same path moved within this run,
        # the spread a comparison between paths must exceed (stats.verdict).
        "round_p50_us": [p["latency_us"]["p50"] for p in parts],
    }
    if samples:
        out["samples_us"] = lat
    return out


def run(quick: bool = False, progress=None, count: int | None = None,
        samples: bool = False, rounds: int | None = None, c_reference: bool = True) -> dict:
    """``rounds`` rounds; in each, every path in turn, qkio's child then the C reference's.

    ``paths[method]`` is qkio's (all chunks together), ``c_reference[method]``
    the C child's, ``ratios[method]`` qkio p50 / C p50 (over all samples and
    per round).  ``c_reference=False`` runs qkio's children only.
    """
    count = count if count is not None else (1000 if quick else 10000)
    rounds = max(1, min(rounds or (2 if quick else 5), count))
    result: dict[str, Any] = {"method": METHOD, "signals_per_path": count, "rounds": rounds, "paths": {}}
    if c_reference:
        result["c_reference"] = {}
        result["ratios"] = {}
    impls = ("qkio", "c") if c_reference else ("qkio",)
    chunks = [count // rounds + (1 if i < count % rounds else 0) for i in range(rounds)]
    # Rounds outside, paths inside: every round runs every path and both
    # implementations, so a change in the host's load hits all of them alike
    # and the paths can be compared with each other, not only with C.
    all_parts: dict[str, Any] = {method: {impl: [] for impl in impls} for method in METHODS}
    for i, n in enumerate(chunks):
        for method in METHODS:
            for impl in impls:
                if progress:
                    progress(f"round {i + 1}/{rounds}: {n} signals to {impl} ({method})")
                all_parts[method][impl].append(measure(method, n, samples=True, impl=impl))
    for method in METHODS:
        parts = all_parts[method]
        result["paths"][method] = _merge(parts["qkio"], samples)
        if c_reference:
            result["c_reference"][method] = _merge(parts["c"], samples)
            per_round = [q["latency_us"]["p50"] / c["latency_us"]["p50"]
                         for q, c in zip(parts["qkio"], parts["c"])]
            ratio = (result["paths"][method]["latency_us"]["p50"]
                     / result["c_reference"][method]["latency_us"]["p50"])
            result["ratios"][method] = {"p50_over_c_p50": round(ratio, 3),
                                        "per_round": summarize(per_round)}
    return result


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for method, r in result["paths"].items():
        rows.append((f"{method} ({r['threads']} threads)",
                     f"{fmt_dist(r['latency_us'])}; CPU {r['cpu_us_per_signal']} µs/signal; "
                     f"{r['handled']}/{r['sent']} handled"))
        c = result.get("c_reference", {}).get(method)
        if c:
            rows.append((f"{method} (C, {c['threads']} threads)",
                         f"{fmt_dist(c['latency_us'])}; CPU {c['cpu_us_per_signal']} µs/signal; "
                         f"{c['handled']}/{c['sent']} handled"))
            q = result["ratios"][method]
            rows.append((f"{method} qkio/C", f"{q['p50_over_c_p50']:.2f} at the median (per round "
                                             f"{q['per_round']['min']:.2f}..{q['per_round']['max']:.2f})"))
    return rows
