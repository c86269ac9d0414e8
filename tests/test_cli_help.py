"""``qkio run --help`` and ``qkio bench --help`` say what there is to run."""

from __future__ import annotations

import subprocess
import sys

from qkio.bench import BENCHMARKS
from qkio.guests import GUESTS


def _help(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "qkio", *args, "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return r.stdout


def _listed(text: str, title: str) -> dict[str, str]:
    """The "name  what it is" lines under ``title`` in a help text."""
    lines = text.split("\n" + title, 1)[1].splitlines()[1:]
    out = {}
    for line in lines:
        if not line.startswith("  ") or not line.strip():
            break
        name, _, what = line.strip().partition(" ")
        out[name] = what.strip()
    return out


def test_run_help_lists_every_demo_guest():
    listed = _listed(_help("run"), "demo guests")
    assert listed == {name: what for name, what in GUESTS.items()}


def test_bench_help_lists_every_benchmark_in_one_line():
    listed = _listed(_help("bench"), "benchmarks")
    assert list(listed) == list(BENCHMARKS)
    for name, what in listed.items():
        assert len(what.split()) >= 4, f"{name}: {what!r} says too little"
