"""Reading and drawing a ``qkio run --trace`` file.

Reading a trace
---------------

``qkio run --trace FILE`` writes Chrome trace-event JSON (see
:mod:`qkio.trace` for the event names).  :func:`load_trace` turns it into a
flat list of events with thread names resolved and timestamps in
microseconds; :func:`slices` pairs each thread's ``B``/``E`` events into
intervals; :func:`plot_timeline` draws one row per thread.

matplotlib is imported by :func:`plot_timeline` only, when a chapter draws.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

__all__ = ["load_trace", "slices", "instants", "plot_timeline"]


def load_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``qkio run --trace`` file: its events, oldest first, metadata dropped.

    Each event is a dict with ``ph`` (``B``, ``E``, ``X``, ``i``), ``name``,
    ``ts`` (microseconds, CLOCK_MONOTONIC), ``dur`` (``X`` only, else 0),
    ``tid``, ``thread`` (the OS thread name from the ``thread_name``
    metadata) and ``args`` (a dict, maybe empty).
    """
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    events = raw["traceEvents"] if isinstance(raw, dict) else raw
    names = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out = []
    for e in events:
        if e.get("ph") == "M":
            continue
        out.append({"ph": e["ph"], "name": e["name"], "ts": float(e["ts"]),
                    "dur": float(e.get("dur", 0.0)), "tid": e["tid"],
                    "thread": names.get(e["tid"], str(e["tid"])), "args": e.get("args", {})})
    out.sort(key=lambda e: e["ts"])  # stable: B/E at one timestamp keep their order
    return out


def slices(trace: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    """Intervals from a loaded trace: each ``B``/``E`` pair (matched per thread,
    innermost first) and each ``X`` event, as dicts with ``name``, ``thread``,
    ``tid``, ``start``, ``end`` (µs) and ``args`` (begin's and end's merged).
    Slices still open when the trace ended are left out.  ``name`` filters."""
    stacks: dict[int, list[dict[str, Any]]] = {}
    out = []
    for e in trace:
        if e["ph"] == "B":
            stacks.setdefault(e["tid"], []).append(e)
        elif e["ph"] == "E":
            stack = stacks.get(e["tid"])
            if not stack:
                continue
            b = stack.pop()
            out.append({"name": b["name"], "thread": b["thread"], "tid": b["tid"],
                        "start": b["ts"], "end": e["ts"], "args": {**b["args"], **e["args"]}})
        elif e["ph"] == "X":
            out.append({"name": e["name"], "thread": e["thread"], "tid": e["tid"],
                        "start": e["ts"], "end": e["ts"] + e["dur"], "args": dict(e["args"])})
    out.sort(key=lambda s: s["start"])
    return [s for s in out if name is None or s["name"] == name]


def instants(trace: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    """The instant (``i``) events of a loaded trace, optionally only those called ``name``."""
    return [e for e in trace if e["ph"] == "i" and (name is None or e["name"] == name)]


# Colours per slice kind and markers per instant kind, so every figure in the
# book uses the same legend.
_SLICE_STYLE = {"KVM_RUN": "tab:green", "main_loop_wait": "tab:blue", "lock waited for": "tab:red"}
_SLICE_OTHER = "tab:orange"   # fd handlers, timers, bottom halves
_MARKERS = {"notify sent": ("v", "tab:purple"), "notify drained": ("^", "tab:purple"),
            "kick sent": ("x", "black"), "kick received": ("+", "black"),
            "signal received": ("*", "tab:red"), "sigwaitinfo returned": ("D", "tab:red")}


def _slice_kind(name: str) -> str:
    if name in _SLICE_STYLE:
        return name
    if name.split(" ", 1)[0] in ("fd_read", "fd_write", "timer", "bh"):
        return "handler"
    return name


def plot_timeline(trace: list[dict[str, Any]] | str | os.PathLike, ax=None,
                  threads: Iterable[str] | None = None,
                  window: tuple[float, float] | None = None, title: str | None = None):
    """Draw a per-thread timeline of a trace; returns the matplotlib Axes.

    One row per thread, labelled with its OS name (``threads`` picks and
    orders them; default: the order they first appear).  Slices are bars:
    ``KVM_RUN`` green, ``main_loop_wait`` blue, fd handlers / timers /
    bottom halves orange, lock waits red.  Instants are markers (notify,
    kick, signal).  Time is in milliseconds from the first event;
    ``window=(start_ms, end_ms)`` zooms in.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not isinstance(trace, list):
        trace = load_trace(trace)
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 2.2))
    t0 = trace[0]["ts"] if trace else 0.0
    order = list(threads) if threads is not None else list(dict.fromkeys(e["thread"] for e in trace))
    row = {name: i for i, name in enumerate(order)}
    height = 0.6
    kinds_seen: dict[str, str] = {}
    for s in slices(trace):
        if s["thread"] not in row:
            continue
        kind = _slice_kind(s["name"])
        colour = _SLICE_STYLE.get(kind, _SLICE_OTHER)
        kinds_seen.setdefault("fd handler" if kind == "handler" else kind, colour)
        start, end = (s["start"] - t0) / 1000, (s["end"] - t0) / 1000
        y = row[s["thread"]]
        ax.broken_barh([(start, max(end - start, 1e-3))], (y - height / 2, height),
                       facecolors=colour, edgecolors=colour, linewidth=0.5)
    marks_seen = {}
    for e in instants(trace):
        if e["thread"] not in row or e["name"] not in _MARKERS:
            continue
        marker, colour = _MARKERS[e["name"]]
        marks_seen[e["name"]] = (marker, colour)
        ax.plot([(e["ts"] - t0) / 1000], [row[e["thread"]] + height / 2 + 0.12], marker=marker,
                color=colour, markersize=6, linestyle="none")
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(-0.7, len(order) - 0.2)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    if window is not None:
        ax.set_xlim(*window)
    if title:
        ax.set_title(title)
    handles: list[Any] = [Patch(color=c, label=k) for k, c in kinds_seen.items()]
    handles += [Line2D([], [], marker=m, color=c, linestyle="none", label=n)
                for n, (m, c) in marks_seen.items()]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize="small", frameon=False)
    return ax
