"""``timers``: how late a QEMUTimer runs, on each clock and each signal path.

Method
------
Each measurement is a child process (:mod:`qkio.bench.timer_child`) started
with ``start_new_session=True``: it blocks the VMM's signals first, as
``qkio run`` does, builds a real machine running the ``spin`` guest on one
vCPU with the chosen ``--signals`` path and ``--clock``, and arms one
QEMUTimer that re-arms itself ``period_us`` after each firing.  Each firing
records CLOCK_MONOTONIC at the start of its callback minus the deadline it
was armed for; the first ``warmup`` firings are not counted.

* ``deadline`` clock: the next deadline is ``main_loop_wait``'s timeout, so a
  firing is a ``select()`` that times out (modern QEMU's way).
* ``alarm`` clock: ``main_loop_wait(1000)`` is never shortened for a timer; a
  POSIX timer (``timer_create``, SIGALRM) armed by ``dynticks_rearm_timer``
  wakes it through the signal path and ``host_alarm_handler`` (qemu-kvm 0.12's
  way, :mod:`qkio.alarm_timer`).

The six combinations of clock and signal path are run in rounds: every round
runs each combination once, in the same order, so a change in the host's load
touches all of them alike.  A seventh configuration, the alarm clock on the
async path *without* ``signal.set_wakeup_fd``, shows the race that fd closes
(a timer then waits for the whole 1000 ms timeout when SIGALRM lands just
before ``select()``); it is reported but not compared, and runs at most 15
firings per round, since each one may cost a second.

Results: per configuration, lateness in µs over all rounds
(:func:`~qkio.bench.stats.summarize`), the median of each round
(``round_p50_us``), how many firings were 0.9 s late or more, and the
counters (SIGALRMs taken, loop iterations, firings); per signal path, a
:func:`~qkio.bench.stats.verdict` of alarm against deadline, which names a
winner only when the medians differ by more than the rounds' own spread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .stats import fmt_dist, summarize, verdict

NAME = "timers"
TITLE = "a QEMUTimer's lateness: alarm (0.12) vs deadline (modern) clock, per signal path"
METHOD = __doc__.split("Method\n------\n", 1)[1].split("\n\nResults:", 1)[0]

CLOCKS = ("deadline", "alarm")
PATHS = ("signalfd", "thread", "async")
RACE = "alarm/async, no wake-up fd"
RACE_FIRINGS = 15  # per round, at most

__all__ = ["NAME", "TITLE", "measure", "run", "table"]


def measure(clock: str, path: str, count: int, period_us: int = 2000, warmup: int = 5,
            no_wakeup_fd: bool = False, trace: str | None = None) -> dict:
    """One child: ``count`` counted firings; returns its JSON report."""
    cmd = [sys.executable, "-m", "qkio.bench.timer_child", "--signals", path, "--clock", clock,
           "--count", str(count), "--warmup", str(warmup), "--period-us", str(period_us)]
    if no_wakeup_fd:
        cmd.append("--no-wakeup-fd")
    if trace:
        cmd += ["--trace", str(trace)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                       start_new_session=True)
    if p.returncode != 0:
        raise RuntimeError(f"timer child ({clock}, {path}) failed: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)


def run(quick: bool = False, progress=None, rounds: int | None = None,
        count: int | None = None, period_us: int = 2000) -> dict:
    rounds = rounds if rounds is not None else 3
    count = count if count is not None else (50 if quick else 300)
    # The race configuration can lose a whole second per firing (on a busy
    # host, most of them): it gets fewer firings, so the run stays bounded.
    configs = [(f"{c}/{p}", c, p, False, count) for c in CLOCKS for p in PATHS]
    configs.append((RACE, "alarm", "async", True, min(count, RACE_FIRINGS)))
    raw: dict[str, list[dict]] = {key: [] for key, *_ in configs}
    for r in range(rounds):
        for key, clock, path, no_fd, n in configs:
            if progress:
                progress(f"round {r + 1}/{rounds}: {key}, {n} firings")
            raw[key].append(measure(clock, path, n, period_us, no_wakeup_fd=no_fd))
    runs = {}
    for key, reports in raw.items():
        late = [x for rep in reports for x in rep["late_us"]]
        runs[key] = {
            "latency_us": summarize(late),
            "round_p50_us": [summarize(rep["late_us"])["p50"] for rep in reports],
            "min_us": min(late),
            "late_900ms": sum(x >= 900_000 for x in late),
            "firings": sum(rep["firings"] for rep in reports),
            "counted": len(late),
            "alarm_signals": sum(rep["alarm_signals"] for rep in reports),
            "iterations": sum(rep["iterations"] for rep in reports),
            "statuses": sorted({rep["status"] for rep in reports}),
            "paths": sorted({rep["path"] for rep in reports}),
        }
    verdicts = {p: verdict("alarm", runs[f"alarm/{p}"], "deadline", runs[f"deadline/{p}"])
                for p in PATHS}
    return {"method": METHOD, "rounds": rounds, "firings_per_round": count,
            "race_firings_per_round": min(count, RACE_FIRINGS),
            "period_us": period_us, "runs": runs, "verdicts": verdicts}


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for key, r in result["runs"].items():
        rows.append((key, f"{fmt_dist(r['latency_us'])}; {r['alarm_signals']} SIGALRMs, "
                          f"{r['iterations']} iterations for {r['firings']} firings; "
                          f"{r['late_900ms']} >= 0.9 s late"))
    for path, v in result["verdicts"].items():
        rows.append((f"alarm vs deadline, {path}", v["text"].replace("`", "")))
    return rows
