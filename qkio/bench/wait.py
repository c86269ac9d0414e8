"""``wait``: select vs poll vs epoll as the number of idle fds grows.

Method
------
For each backend and for 1, 10, 100 and 1000 *idle* fds -- eventfds that
are registered in the main loop with a read handler but never written --
two measurements:

* ``wake``: the :mod:`~qkio.bench.wakeup` measurement (another thread calls
  ``notify()``; the io thread's ``main_loop_wait`` returns), giving the
  wake-up latency and the io thread's CPU time per wake-up.  This is the
  whole of ``main_loop_wait``: building the fd lists in Python, the system
  call, and dispatch.
* ``call``: one thread calls ``main_loop_wait(0)`` in a tight loop -- a zero
  timeout, nothing ready, no sleeping, no other thread -- so what is left is
  the cost of one pass with N fds watched: wall µs per call.
* ``syscall``: the bare system call from Python with the same fds, set up
  once, one of them ready -- ``select.select(fds, [], [], 0)``, a
  pre-registered ``poll`` object's ``poll(0)``, a pre-registered epoll's
  ``poll(0)`` -- to separate the kernel's cost from qkio's per-call Python.

Costs that grow with N are what separates the three: ``select`` copies and
scans three bitmaps up to the highest fd, and Python rebuilds the lists each
time; ``poll`` copies an array of N entries in and out; ``epoll`` keeps the
interest set in the kernel, so its system call does not grow with N -- but
qkio's epoll backend still diffs the fd lists in Python on every call.

``select`` cannot take an fd >= FD_SETSIZE (1024): glibc's ``fd_set`` is a
fixed 1024-bit map.  The idle fds are opened before anything else so their
numbers stay low; if the highest fd is still >= 1024 (a process with many
fds open already), select is reported N/A with that reason rather than run.
RLIMIT_NOFILE is raised to the hard limit if the soft limit is too low.
"""

from __future__ import annotations

import os
import resource
import select
import time
from collections.abc import Callable
from typing import Any

from qkio.main_loop import MainLoop

from .stats import summarize
from .wakeup import wake_latency

NAME = "wait"
TITLE = "main_loop_wait with N idle fds: select vs poll vs epoll"
METHOD = ("N idle eventfds registered with read handlers; 'wake' = notify from another thread "
          "-> main_loop_wait returns (latency, io-thread CPU per wake-up); 'call' = "
          "main_loop_wait(0), µs per call; 'syscall' = the bare select/poll/epoll call, one fd ready")
BACKENDS = ("select", "poll", "epoll")
FD_COUNTS = (1, 10, 100, 1000)
FD_SETSIZE = 1024


def _ensure_nofile(n: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        new = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return {"soft": soft, "hard": hard}


def _noop(opaque) -> None:
    pass


def measure(backend: str, idle: int, wakes: int, calls: int) -> dict:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(idle)]
    loop = None
    try:
        loop = MainLoop(backend=backend, notifier="eventfd")
        highest = max(fds + [loop.notifier.read_fd, loop.notifier.write_fd])
        if backend == "select" and highest >= FD_SETSIZE:
            return {"na": f"highest fd is {highest}; select() cannot watch fds >= "
                          f"FD_SETSIZE ({FD_SETSIZE})", "highest_fd": highest}
        for fd in fds:
            loop.set_fd_handler(fd, _noop, None)
        loop.notifier.drain()
        wake = wake_latency(loop, wakes, warmup=20)
        wake.pop("samples_us")
        # call: a zero timeout, so the wait returns at once with nothing ready.
        with loop.lock:
            for _ in range(min(50, calls)):
                loop.main_loop_wait(0)
            per_call = []
            batch = max(1, calls // 20)
            for _ in range(20):
                t0 = time.perf_counter_ns()
                for _ in range(batch):
                    loop.main_loop_wait(0)
                per_call.append((time.perf_counter_ns() - t0) / batch / 1000)
        loop.notifier.notify()  # readable again, for the bare system calls
        syscall = _syscall_cost(backend, fds + [loop.notifier.read_fd], calls)
        return {"wake_latency_us": wake["latency_us"], "syscall_us": syscall,
                "io_cpu_us_per_wake": wake["io_cpu_us_per_wake"],
                "call_us": summarize(per_call), "highest_fd": highest}
    finally:
        if loop is not None:
            loop.close()
        for fd in fds:
            os.close(fd)


def _syscall_cost(backend: str, fds: list[int], calls: int) -> dict:
    """µs per bare select/poll/epoll_wait call over ``fds`` (the last one is readable)."""
    call: Callable[[], object]
    if backend == "select":
        call = lambda: select.select(fds, [], [], 0)  # noqa: E731
        closer = None
    elif backend == "poll":
        p = select.poll()
        for fd in fds:
            p.register(fd, select.POLLIN)
        call, closer = (lambda: p.poll(0)), None
    else:
        ep = select.epoll()
        for fd in fds:
            ep.register(fd, select.EPOLLIN)
        call, closer = (lambda: ep.poll(0)), ep.close
    try:
        assert call(), "the notifier should be readable"
        per_call = []
        batch = max(1, calls // 20)
        for _ in range(20):
            t0 = time.perf_counter_ns()
            for _ in range(batch):
                call()
            per_call.append((time.perf_counter_ns() - t0) / batch / 1000)
        return summarize(per_call)
    finally:
        if closer:
            closer()


def run(quick: bool = False, progress=None, fd_counts=FD_COUNTS) -> dict:
    wakes = 200 if quick else 2000
    calls = 400 if quick else 4000
    limit = _ensure_nofile(max(fd_counts) + 256)
    result: dict[str, Any] = {"method": METHOD, "wakeups": wakes, "calls": calls, "rlimit_nofile": limit,
              "fd_setsize": FD_SETSIZE, "results": {}}
    for backend in BACKENDS:
        result["results"][backend] = {}
        for n in fd_counts:
            if progress:
                progress(f"{backend} with {n} idle fds")
            result["results"][backend][str(n)] = measure(backend, n, wakes, calls)
    return result


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for backend, per_n in result["results"].items():
        for n, r in per_n.items():
            key = f"{backend:<6} {n:>4} fds"
            if "na" in r:
                rows.append((key, f"N/A: {r['na']}"))
                continue
            rows.append((key, f"syscall {r['syscall_us']['p50']:.3g} µs; "
                              f"main_loop_wait {r['call_us']['p50']:.3g} µs; wake p50 "
                              f"{r['wake_latency_us']['p50']:.3g} µs (p99 "
                              f"{r['wake_latency_us']['p99']:.3g}); io CPU "
                              f"{r['io_cpu_us_per_wake']} µs/wake"))
    return rows
