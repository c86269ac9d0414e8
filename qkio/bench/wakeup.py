"""``wakeup``: how fast another thread can wake the io thread (eventfd vs pipe).

Method
------
An io thread (a plain Python thread, holding the loop's global lock except
while it waits, as qkio's io thread does) calls ``MainLoop.main_loop_wait``
over and over.  The sending thread reads CLOCK_MONOTONIC and calls
``loop.notifier.notify()`` -- ``qemu_notify_event``: an 8-byte write to the
eventfd, or a 1-byte write to the pipe.  The io thread reads CLOCK_MONOTONIC
as soon as ``main_loop_wait`` returns having called a handler (the
notifier's ``drain``) and writes that time back on an acknowledgement pipe,
on which the sender is blocked.  One sample = *wait returned - before
notify*.  After each acknowledgement the sender sleeps ~100 µs so that the
io thread is asleep in ``select()`` again before the next notification.

What it shows: a wake-up is a kernel wake-up plus a Python thread taking the
GIL.  The sender blocks (in ``read``) right after notifying, so it hands the
GIL over at once; if it kept running Python instead, the io thread would wait
for the interpreter's switch interval (5 ms) -- the stall reported as
``over_5ms``.  Next to it, ``host_steal_ms``: how long the hypervisor kept
this machine's vCPUs from running during the run (``/proc/stat``), the one
cause of a stall that no thread here controls.  Also reported: the io thread's own CPU time per wake-up
(``time.thread_time`` over the run); with ``samples=True``, every latency in
order (``samples_us``), for plotting the whole distribution.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time

from qkio.main_loop import MainLoop

from .stats import fmt_dist, host_steal_ms, steal_between, summarize

NAME = "wakeup"
TITLE = "EventNotifier.notify() in one thread -> main_loop_wait returns in the io thread"
METHOD = ("io thread loops on MainLoop.main_loop_wait; another thread reads CLOCK_MONOTONIC, "
          "notify(), blocks on an ack pipe; io thread stamps when the wait returns; "
          "~100 µs between notifications")
KINDS = ("eventfd", "pipe")
STALL_US = 5000.0  # sys.getswitchinterval() by default
_NS = struct.Struct("=Q")


def wake_latency(loop: MainLoop, count: int, warmup: int = 50, gap_s: float = 100e-6,
                 busy_after_notify_s: float = 0.0) -> dict:
    """Measure ``count`` notify -> main_loop_wait-returned wake-ups of ``loop``'s io thread.

    ``busy_after_notify_s``: instead of blocking at once, the sender keeps
    running Python for that long after each notify -- the notifier that
    holds on to the GIL, whose cost the switch interval bounds.

    The io thread is started here and stopped before returning.  Returns
    ``{"latency_us": summary, "samples_us": [...], "io_cpu_us_per_wake": ...,
    "wakeups": n}``.
    """
    ack_r, ack_w = os.pipe()
    stop = False
    cpu = {}

    def io_thread() -> None:
        now = time.monotonic_ns
        pack = _NS.pack
        cpu0 = time.thread_time_ns()
        wakes = 0
        with loop.lock:
            while not stop:
                called = loop.main_loop_wait(1000)
                t = now()
                if called and not stop:
                    wakes += 1
                    os.write(ack_w, pack(t))
        cpu["ns"] = time.thread_time_ns() - cpu0
        cpu["wakes"] = wakes

    thread = threading.Thread(target=io_thread, name="qkio-io (bench)", daemon=True)
    thread.start()
    samples = []
    try:
        time.sleep(0.01)
        now, read, unpack = time.monotonic_ns, os.read, _NS.unpack
        notify = loop.notifier.notify
        busy_ns = int(busy_after_notify_s * 1e9)
        for i in range(warmup + count):
            t0 = now()
            notify()
            while busy_ns and now() - t0 < busy_ns:
                pass  # pure Python: this thread keeps the GIL until asked to drop it
            (t1,) = unpack(read(ack_r, 8))
            if i >= warmup:
                samples.append((t1 - t0) / 1000)
            if gap_s:
                time.sleep(gap_s)
    finally:
        stop = True
        loop.notify_event("stop")
        thread.join(10)
        os.close(ack_r)
        os.close(ack_w)
    wakes = cpu.get("wakes", 0)
    return {
        "latency_us": summarize(samples),
        "samples_us": samples,
        "io_cpu_us_per_wake": round(cpu["ns"] / wakes / 1000, 2) if wakes else None,
        "wakeups": wakes,
    }


def run(quick: bool = False, progress=None, count: int | None = None,
        samples: bool = False) -> dict:
    count = count if count is not None else (1000 if quick else 10000)
    result = {"method": METHOD, "count": count, "switch_interval_s": sys.getswitchinterval(),
              "kinds": {}}
    for kind in KINDS:
        if progress:
            progress(f"{kind}: {count} wake-ups")
        steal0 = host_steal_ms()
        with MainLoop(backend="select", notifier=kind) as loop:
            r = wake_latency(loop, count)
        r["host_steal_ms"] = steal_between(steal0, host_steal_ms())
        lat = r.pop("samples_us")
        r["max_us"] = r["latency_us"]["max"]
        r["over_5ms"] = sum(1 for s in lat if s > STALL_US)
        if samples:
            r["samples_us"] = [round(x, 3) for x in lat]
        r["target_p50_under_50us"] = r["latency_us"]["p50"] < 50
        result["kinds"][kind] = r
    return result


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for kind, r in result["kinds"].items():
        steal = r.get("host_steal_ms")
        rows.append((kind, f"{fmt_dist(r['latency_us'])}; {r['over_5ms']} over 5 ms"
                           + (f" (host steal in the run: {steal:g} ms)" if steal is not None else "")
                           + f"; io thread CPU {r['io_cpu_us_per_wake']} µs/wake"))
    ev = result["kinds"].get("eventfd")
    if ev:
        ok = ev["target_p50_under_50us"] and ev["over_5ms"] == 0
        rows.append(("target", f"eventfd p50 < 50 µs and no stall > 5 ms: {'met' if ok else 'MISSED'}"))
    return rows
