"""The VMM side of ``qkio bench signal``: an io thread that acknowledges signals.

Run as ``python -m qkio.bench.signal_child --method M --count N --warmup W``
by :mod:`qkio.bench.signal_latency`, in its own session.  Like ``qkio run`` it
blocks the VMM's signals *first*, while it is the only thread, then builds a
real :class:`~qkio.main_loop.MainLoop` and :class:`~qkio.signals.SignalSource`
(signalfd, signal thread + pipe, or asynchronous handlers) and sits in
``main_loop_wait``.

Protocol, binary on stdout:

* ``R`` once the loop is about to wait for the first time;
* for every SIGUSR2 the handler runs: 8 bytes, the CLOCK_MONOTONIC time in
  nanoseconds at which the handler started (read first thing in it);
* after ``W + N`` of them, one JSON line: the process CPU time (all
  threads: CLOCK_PROCESS_CPUTIME_ID, and getrusage's user/system split) spent from the end of the warm-up to the last
  handler, the number of threads, the path in use; then it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import struct
import sys
import time
from typing import Any

from qkio import signals as sigmod

_NS = struct.Struct("=Q")


def _cpu() -> tuple[int, float, float]:
    """(CPU ns of all threads, precise; user s; system s, tick-grained)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.process_time_ns(), ru.ru_utime, ru.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qkio.bench.signal_child")
    ap.add_argument("--method", choices=("signalfd", "thread", "async"), required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--backend", default="select")
    args = ap.parse_args(argv)

    # 1. Before any thread exists (see qkio.signals).
    sigmod.block_vmm_signals(sigmod.VMM_SIGNALS)
    from qkio.main_loop import MainLoop
    from qkio.threads import set_thread_name
    set_thread_name("qkio-io")

    loop = MainLoop(backend=args.backend)
    source = sigmod.SignalSource(args.method, sigmod.VMM_SIGNALS)
    source.attach(loop)
    out = sys.stdout.buffer.raw if hasattr(sys.stdout.buffer, "raw") else sys.stdout.buffer
    out_fd = out.fileno()
    total = args.warmup + args.count
    state: dict[str, Any] = {"seen": 0, "cpu0": _cpu()}
    monotonic_ns = time.monotonic_ns
    pack = _NS.pack

    def on_signal(info) -> None:
        t = monotonic_ns()
        os.write(out_fd, pack(t))
        state["seen"] += 1
        if state["seen"] == args.warmup:
            state["cpu0"] = _cpu()
        if state["seen"] == total:
            loop.request_exit()

    source.add_handler(signal.SIGUSR2, on_signal)
    os.write(out_fd, b"R")
    if total:
        loop.run(timeout_ms=1000)
    c1, u1, s1 = _cpu()
    c0, u0, s0 = state["cpu0"]
    report = {"cpu_ns": c1 - c0, "user_s": u1 - u0, "system_s": s1 - s0, "seen": state["seen"],
              "path": source.path, "threads": sigmod.thread_count(),
              "received": {str(k): v for k, v in source.received.items()}}
    source.close()
    loop.close()
    os.write(out_fd, (json.dumps(report) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
