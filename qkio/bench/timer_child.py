"""The VMM side of ``qkio bench timers``: a real machine and one periodic QEMUTimer.

Run as ``python -m qkio.bench.timer_child --signals PATH --clock CLOCK
--count N --period-us P [--warmup W] [--trace FILE]``.  It does what
``qkio run`` does first (block the VMM's signals while it is the only
thread, name itself ``qkio-io``), builds a :class:`~qkio.machine.Machine`
running the ``spin`` demo guest on one vCPU with the chosen signal path and
clock, and arms a timer that re-arms itself ``P`` µs after each firing.  Each
firing records its lateness -- CLOCK_MONOTONIC when the callback starts minus
the deadline it was armed for -- and after ``W + N`` firings the run ends.
Prints one JSON line: the ``N`` counted latenesses in µs and the counters of
the loop and of the alarm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qkio.bench.timer_child")
    ap.add_argument("--signals", choices=("signalfd", "thread", "async"), default="signalfd")
    ap.add_argument("--clock", choices=("deadline", "alarm"), default="deadline")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--period-us", type=int, default=2000)
    ap.add_argument("--trace", default="")
    ap.add_argument("--no-wakeup-fd", action="store_true",
                    help="async path without signal.set_wakeup_fd (shows the race it closes)")
    args = ap.parse_args(argv)

    from qkio.signals import REALTIME_SIGNALS, VMM_SIGNALS, block_vmm_signals
    block_vmm_signals(VMM_SIGNALS + REALTIME_SIGNALS)
    from qkio import guests, trace
    from qkio.machine import Machine
    from qkio.threads import set_thread_name
    set_thread_name("qkio-io")

    tracer = trace.Tracer(enabled=True) if args.trace else None
    machine = Machine(memory_mib=8, signals=args.signals, clock=args.clock,
                      console=lambda data: None, tracer=tracer)
    assert machine.signal_source is not None  # signals= is required here
    if args.no_wakeup_fd:
        machine.signal_source.detach_wakeup_fd()
        if machine.paio is not None and machine.paio.source is not None:
            machine.paio.source.detach_wakeup_fd()
    late_ns: list[int] = []
    total = args.warmup + args.count
    period = args.period_us * 1000
    due = [0]

    def tick(_opaque) -> None:
        now = time.monotonic_ns()
        late_ns.append(now - due[0])
        if len(late_ns) >= total:
            machine.request_exit(0, "done")
            return
        due[0] = now + period
        timer.mod_timer(due[0])

    try:
        machine.load_multiboot(guests.build_guest("spin"))
        timer = machine.loop.timer_new(tick)
        cpu0 = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)
        due[0] = time.monotonic_ns() + period
        timer.mod_timer(due[0])
        # Bounded, but never by the experiment itself: without the wake-up fd
        # a firing may wait for main_loop_wait's whole 1000 ms timeout.
        status = machine.run(timeout=30 + total * (1.1 if args.no_wakeup_fd else 0.1))
        cpu = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID) - cpu0
        alarm = machine.loop.alarm_timer
        out = {
            "signals": args.signals, "clock": args.clock, "status": status,
            "path": machine.signal_source.path,
            "late_us": [round(x / 1000, 3) for x in late_ns[args.warmup:]],
            "firings": len(late_ns),
            "iterations": machine.loop.iterations,
            "alarm_signals": alarm.signals if alarm else 0,
            "rearms": alarm.rearms if alarm else 0,
            "kept": alarm.kept if alarm else 0,
            "cpu_ms": round(cpu / 1e6, 1),
        }
    finally:
        machine.close()
        if tracer is not None:
            tracer.write(args.trace)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
