"""Summaries of repeated measurements: medians with their spread.

Every benchmark reports a distribution, never one number: ``summarize``
gives the count, min, p50 (the median), p90, p99, max, mean and the
interquartile range (p75 - p25), all in the unit the samples were in.
Percentiles are the standard library's, ``statistics.quantiles(method=
"inclusive")``: linear interpolation between the closest ranks (numpy's
default), so a single sample is its own every percentile.
"""

from __future__ import annotations

import os
import statistics


def percentiles(samples) -> list[float]:
    """The 1st to 99th percentiles of ``samples`` (``[p1, ..., p99]``; non-empty)."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("percentiles of no samples")
    if len(values) == 1:  # quantiles() wants two points before Python 3.13
        return values * 99
    return statistics.quantiles(values, n=100, method="inclusive")


def summarize(samples, digits: int = 3) -> dict:
    """``{"n", "min", "p50", "p90", "p99", "max", "mean", "iqr"}`` of ``samples``."""
    values = [float(v) for v in samples]
    if not values:
        return {"n": 0}
    q = percentiles(values)
    r = lambda v: round(v, digits)  # noqa: E731
    return {
        "n": len(values),
        "min": r(min(values)),
        "p50": r(q[49]),
        "p90": r(q[89]),
        "p99": r(q[98]),
        "max": r(max(values)),
        "mean": r(statistics.fmean(values)),
        "iqr": r(q[74] - q[24]),
    }


def median(samples) -> float:
    return statistics.median(samples)


def fmt_dist(d: dict, unit: str = "µs") -> str:
    """``p50 12.3 µs (p90 15, p99 40, max 80; n=1000)`` for the printed table."""
    if not d.get("n"):
        return "no samples"
    return (f"p50 {d['p50']:.3g} {unit} (p90 {d['p90']:.3g}, p99 {d['p99']:.3g}, "
            f"max {d['max']:.3g}; n={d['n']})")


def host_steal_ms() -> float | None:
    """CPU time the host has taken from this (virtual) machine's CPUs since boot, in ms.

    The eighth number of ``/proc/stat``'s ``cpu`` line: time a vCPU of this
    machine was ready to run but the hypervisor ran something else.  It is
    the one kind of delay no code in the VMM can cause or avoid, so the
    benchmarks report how much of it fell inside each run -- next to a
    latency outlier, it says whether the outlier could be the host's.
    None where the kernel does not report it.
    """
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def steal_between(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 1)


def verdict(a: str, a_result: dict, b: str, b_result: dict, unit: str = "µs") -> dict:
    """Compare two results of one interleaved run; name a winner only if the data allow it.

    Each result has ``latency_us`` (a :func:`summarize` dict) and
    ``round_p50_us`` (its median in each round of the run).  The run's own
    spread is the wider of the two ranges of per-round medians: how far a
    median moved from one round to the next with nothing changed but the
    host.  The lower median wins only when the two medians differ by more
    than that spread; otherwise the two are indistinguishable in this run.
    Returns ``{"winner": name or None, "diff", "spread", "text"}``; the text
    is a sentence fragment, in Markdown, with the figures.
    """
    pa, pb = a_result["latency_us"]["p50"], b_result["latency_us"]["p50"]
    spread = max(max(r["round_p50_us"]) - min(r["round_p50_us"]) for r in (a_result, b_result))
    diff = abs(pa - pb)
    figures = (f"`{a}` {pa:.1f} {unit}, `{b}` {pb:.1f} {unit} at the median; the medians of "
               f"single rounds moved by up to {spread:.1f} {unit}")
    if diff > spread:
        winner, loser = (a, b) if pa < pb else (b, a)
        text = (f"`{winner}` was faster than `{loser}` by {diff:.1f} {unit}, more than the "
                f"run's own spread ({figures})")
    else:
        winner = None
        text = f"`{a}` and `{b}` were indistinguishable here ({figures})"
    return {"winner": winner, "diff": round(diff, 3), "spread": round(spread, 3), "text": text}
