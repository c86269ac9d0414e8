"""``ioeventfd``: a guest OUT that never leaves the kernel vs one that exits to qkio.

Method
------
The ``pio-loop`` guest (N one-byte OUTs to port 0x80, then isa-debug-exit) runs
in a qkio ``Machine`` twice per round:

* **exit**: port 0x80 is a null device on qkio's port bus, so every OUT is
  a ``KVM_EXIT_IO`` handled by the vCPU thread (as in ``bench pio``);
* **ioeventfd**: before the run, ``Vm.ioeventfd(efd, 0x80, 1, pio=True)``
  tells KVM to complete one-byte OUTs to port 0x80 itself by adding 1 to
  the eventfd ``efd`` -- the guest never leaves the kernel for them.  After
  the run the eventfd's counter must be N: every write was signalled.

Per-write cost = (T(N) - T(small)) / (N - small), as in ``bench pio``; the
two variants alternate within each round.  The C reference (``pio_ref``)
is run both ways too, to show how much of the difference is the kernel's.
An ioeventfd is what virtio's doorbell (queue notify) is built on: the
device thread waits on the eventfd instead of the vCPU thread handling an
exit.
"""

from __future__ import annotations

import os
from typing import Any

from .build import build_guest
from .guest_run import BENCH_PORT, run_c, run_qkio
from .stats import median, summarize

NAME = "ioeventfd"
TITLE = "guest OUT via KVM_IOEVENTFD vs a userspace exit"
METHOD = ("pio-loop guest, N OUTs to port 0x80; 'exit' = qkio handles each KVM_EXIT_IO; "
          "'ioeventfd' = KVM_IOEVENTFD on 0x80 (counter checked = N); per write = "
          "(T(N) - T(small)) / (N - small), alternated per round; same for the C reference")


def _with_ioeventfd(machine):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    machine.vm.ioeventfd(efd, BENCH_PORT, 1, pio=True)

    def collect(machine):
        try:
            return {"eventfd_count": os.eventfd_read(efd)}
        except BlockingIOError:
            return {"eventfd_count": 0}
        finally:
            os.close(efd)
    return collect


def run(quick: bool = False, progress=None, n: int | None = None, small: int | None = None,
        rounds: int | None = None) -> dict:
    n = n or (20_000 if quick else 200_000)
    small = small or (1_000 if quick else 2_000)
    rounds = rounds or (3 if quick else 5)
    elf = build_guest("pio-loop")
    variants = {
        "qkio exit": lambda k: run_qkio(elf, k),
        "qkio ioeventfd": lambda k: run_qkio(elf, k, setup=_with_ioeventfd),
        "c exit": lambda k: run_c(elf, k),
        "c ioeventfd": lambda k: run_c(elf, k, ioeventfd_port=BENCH_PORT),
    }
    per_write: dict[str, Any] = {v: [] for v in variants}
    checks: dict[str, Any] = {"qkio ioeventfd counts": [], "qkio exit IO exits": [], "c ioeventfd exits": []}
    for r in range(rounds):
        for name, fn in variants.items():
            if progress:
                progress(f"round {r + 1}/{rounds}: {name}")
            t_small, _ = fn(small)
            t_n, info = fn(n)
            per_write[name].append((t_n - t_small) / (n - small) * 1e6)
            if name == "qkio ioeventfd":
                checks["qkio ioeventfd counts"].append(info["setup"]["eventfd_count"])
            elif name == "qkio exit":
                checks["qkio exit IO exits"].append(info["exits"].get(2, 0))
            elif name == "c ioeventfd":
                checks["c ioeventfd exits"].append(info["exits"])
    bad = [c for c in checks["qkio ioeventfd counts"] if c != n]
    if bad:
        raise RuntimeError(f"the eventfd counted {bad[0]} writes, the guest made {n}")
    speedup = [e / i for e, i in zip(per_write["qkio exit"], per_write["qkio ioeventfd"])]
    return {"method": METHOD, "count": n, "small": small, "rounds": rounds,
            "per_write_us": {v: summarize(x) for v, x in per_write.items()},
            "rounds_us": {v: [round(y, 3) for y in x] for v, x in per_write.items()},
            "qkio_exit_over_ioeventfd": round(median(speedup), 2),
            "checks": checks}


def table(result: dict) -> list[tuple[str, str]]:
    rows = [(v, f"{d['p50']:.3g} µs per write (min {d['min']:.3g}, max {d['max']:.3g}; "
                f"{d['n']} rounds)") for v, d in result["per_write_us"].items()]
    rows.append(("exit / ioeventfd", f"{result['qkio_exit_over_ioeventfd']}x (qkio, median of rounds); "
                                     f"eventfd counted {result['checks']['qkio ioeventfd counts'][-1]} "
                                     f"of {result['count']} writes"))
    return rows
