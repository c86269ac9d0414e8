"""Which CPU a benchmark's threads run on.

Why pin at all: on this book's host (two vCPUs of a hypervisor) a thread
woken on the CPU its waker runs on was woken two to three times as fast as one
woken on the other CPU (``qkio bench wakeup`` measures both, every run).
Left to itself, the scheduler places a woken thread sometimes on one CPU
and sometimes on the other, so an unpinned run measures a mixture whose
proportions change from run to run.  A benchmark that compares qkio
with a C reference pins both the same way, so that the comparison is of the
same placement; ``qkio bench wakeup`` shows the two placements side by side.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

__all__ = ["cpu_pair", "pin_thread", "pinned"]


def cpu_pair() -> tuple[int, int] | None:
    """Two CPUs this process may run on (the two lowest), or None if it may use only one."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


def pin_thread(cpu: int) -> None:
    """Keep the calling thread on ``cpu`` (Linux: pid 0 is the calling thread, not the process)."""
    os.sched_setaffinity(0, {cpu})


@contextmanager
def pinned(cpu: int | None):
    """Run the block with the calling thread on ``cpu`` (None: leave it alone), then restore."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    pin_thread(cpu)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
