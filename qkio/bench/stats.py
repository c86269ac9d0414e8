"""Summaries of repeated measurements: medians with their spread.

Every benchmark reports a distribution, never one number: ``summarize``
gives the count, min, p50 (the median), p90, p99, max, mean and the
interquartile range (p75 - p25), all in the unit the samples were in.
Percentiles are taken by linear interpolation between the closest ranks
(numpy's default, ``statistics.quantiles(method="inclusive")``), so a
single sample is its own every percentile.
"""

from __future__ import annotations

import math
import os


def percentile(sorted_values: list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of an already sorted, non-empty list."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    k = (len(sorted_values) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return float(sorted_values[lo])
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize(samples, digits: int = 3) -> dict:
    """``{"n", "min", "p50", "p90", "p99", "max", "mean", "iqr"}`` of ``samples``."""
    values = sorted(float(v) for v in samples)
    if not values:
        return {"n": 0}
    r = lambda v: round(v, digits)  # noqa: E731
    return {
        "n": len(values),
        "min": r(values[0]),
        "p50": r(percentile(values, 50)),
        "p90": r(percentile(values, 90)),
        "p99": r(percentile(values, 99)),
        "max": r(values[-1]),
        "mean": r(sum(values) / len(values)),
        "iqr": r(percentile(values, 75) - percentile(values, 25)),
    }


def median(samples) -> float:
    return percentile(sorted(samples), 50)


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
