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
GIL over at once.  A sender that kept running Python instead could make the
io thread wait for the interpreter's switch interval (5 ms) -- the stall
reported as ``over_5ms``; :func:`busy_notifier` shows when it does and when
it does not.  Next to it, ``host_steal_ms``: how long the hypervisor kept
this machine's vCPUs from running during the run (``/proc/stat``), the one
cause of a stall that no thread here controls.  Also reported: the io thread's own CPU time per wake-up
(``time.thread_time`` over the run); with ``samples=True``, every latency in
order (``samples_us``), for plotting the whole distribution.

Placement
---------
The sender is pinned to one CPU and the io thread to another
(:mod:`qkio.bench.affinity`), in qkio's run, the C reference's and the
Python floor's alike.  Left unpinned, the scheduler sometimes wakes the io
thread on the sender's CPU and sometimes on the other, and on this host the
two cost very differently (``same_cpu`` below measures it), so an unpinned
run is a mixture that changes from run to run.
Across CPUs is the case the doorbell is for: a vCPU thread that goes on
running while the io thread wakes beside it.  For the eventfd, the same
three are also measured with both threads on one CPU (``same_cpu``), to
show the difference.

The C reference
---------------
``wake_ref.c`` (compiled with ``gcc -O2`` on first use) does the same thing
between two C threads: the io thread drops a mutex around ``select()`` on the
notifier and takes it back, drains, stamps, acknowledges; the sender stamps,
rings, blocks on the acknowledgement, sleeps ~100 µs.  It is what the kernel
mechanism costs on this machine; qkio's figure minus it is what Python adds.
The two run in the same benchmark, **interleaved**: ``rounds`` chunks, each
qkio's then C's, so a change in the machine's load hits both.  Reported:
``c_reference`` (same keys as ``kinds``), ``ratios`` (qkio p50 / C p50 over
all samples, and per round) and ``targets`` (eventfd: <= 2 x C).
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from qkio.main_loop import MainLoop
from qkio.notify import EventNotifier

from .affinity import cpu_pair, pin_thread, pinned
from .build import build_c
from .stats import fmt_dist, host_steal_ms, median, steal_between, summarize

NAME = "wakeup"
TITLE = "EventNotifier.notify() in one thread -> main_loop_wait returns in the io thread"
METHOD = ("io thread loops on MainLoop.main_loop_wait; another thread reads CLOCK_MONOTONIC, "
          "notify(), blocks on an ack pipe; io thread stamps when the wait returns; "
          "~100 µs between notifications; sender and io thread pinned to two different CPUs; "
          "the same between two C threads (wake_ref.c), interleaved in rounds")
KINDS = ("eventfd", "pipe")
STALL_US = 5000.0  # sys.getswitchinterval() by default
#: The issue's target: qkio's eventfd wake-up p50 <= this x the C threads' in the same run.
TARGET_VS_C = 2.0
_NS = struct.Struct("=Q")


#: System calls in which the io thread may be asleep in ``main_loop_wait``
#: (x86-64 numbers): select, pselect6, poll, ppoll, epoll_wait, epoll_pwait,
#: epoll_pwait2.  glibc's ``select()`` is pselect6 underneath.
_WAIT_SYSCALLS = frozenset({23, 270, 7, 271, 232, 281, 441})


def _asleep_in_wait(tid: int) -> bool:
    """Is thread ``tid`` of this process blocked in one of the wait system calls?

    ``/proc/<pid>/task/<tid>/syscall`` names the system call a blocked thread
    is in ("running" if it is not blocked).  A thread waiting for the GIL
    is in ``futex``, not in a wait, so this tells "asleep in select" from
    "woken, now queueing for the GIL".
    """
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            first = f.read().split(maxsplit=1)[0]
    except (OSError, IndexError):
        return False
    return first.isdigit() and int(first) in _WAIT_SYSCALLS


def _timed_wakeups(io_loop, ring, count: int, warmup: int, gap_s: float,
                   cpus: tuple[int, int] | None, thread_name: str, busy_ns: int = 0,
                   wait_until_asleep: bool = False) -> dict:
    """The sender's side of every Python wake-up measurement here, and the io
    thread's bookkeeping around ``io_loop``.

    ``io_loop(ack_w, state)`` is the io thread's loop: it waits, reads
    CLOCK_MONOTONIC when its wait is over, writes that time to ``ack_w``,
    and returns the number of wake-ups it acknowledged once ``state["stop"]``
    is set.  ``ring()`` wakes it.  The sender reads the clock, rings, keeps
    running Python for ``busy_ns`` if asked, blocks on the acknowledgement,
    and sleeps ``gap_s``; one sample is acknowledged time - time before the
    ring.  ``cpus``: (the sender's CPU, the io thread's CPU), each thread kept
    to its own (:mod:`qkio.bench.affinity`).
    """
    ack_r, ack_w = os.pipe()
    state: dict[str, Any] = {"stop": False}

    def io_thread() -> None:
        if cpus:
            pin_thread(cpus[1])
        cpu0 = time.thread_time_ns()
        state["wakes"] = io_loop(ack_w, state)
        state["cpu_ns"] = time.thread_time_ns() - cpu0

    thread = threading.Thread(target=io_thread, name=thread_name, daemon=True)
    thread.start()
    samples = []
    try:
        time.sleep(0.01)
        with pinned(cpus[0] if cpus else None):
            now, read, unpack = time.monotonic_ns, os.read, _NS.unpack
            for i in range(warmup + count):
                if wait_until_asleep:
                    while not _asleep_in_wait(thread.native_id or 0):  # started: native_id is set
                        time.sleep(gap_s or 50e-6)
                t0 = now()
                ring()
                while busy_ns and now() - t0 < busy_ns:
                    pass  # pure Python: this thread keeps the GIL until asked to drop it
                (t1,) = unpack(read(ack_r, 8))
                if i >= warmup:
                    samples.append((t1 - t0) / 1000)
                if gap_s:
                    time.sleep(gap_s)
    finally:
        state["stop"] = True
        ring()
        thread.join(10)
        os.close(ack_r)
        os.close(ack_w)
    wakes = state.get("wakes", 0)
    return {
        "latency_us": summarize(samples),
        "samples_us": samples,
        "io_cpu_us_per_wake": round(state["cpu_ns"] / wakes / 1000, 2) if wakes else None,
        "wakeups": wakes,
    }


def wake_latency(loop: MainLoop, count: int, warmup: int = 50, gap_s: float = 100e-6,
                 busy_after_notify_s: float = 0.0, notify=None,
                 wait_until_asleep: bool = False, cpus: tuple[int, int] | None = None) -> dict:
    """Measure ``count`` notify -> main_loop_wait-returned wake-ups of ``loop``'s io thread.

    ``busy_after_notify_s``: instead of blocking at once, the sender keeps
    running Python for that long after each notify -- a notifier that goes
    on holding the GIL.  ``notify``: the call that rings (default
    ``loop.notifier.notify``).  ``wait_until_asleep``: before each
    notification, wait until the io thread is blocked in its wait system
    call (``/proc``), so that it cannot already be queueing for the GIL when
    the clock starts.  ``cpus``: (the sender's CPU, the io thread's CPU), each
    thread kept to its own for the run (:mod:`qkio.bench.affinity`); None
    leaves placement to the scheduler.

    The io thread is started here and stopped before returning.  Returns
    ``{"latency_us": summary, "samples_us": [...], "io_cpu_us_per_wake": ...,
    "wakeups": n}``.
    """
    def io_loop(ack_w: int, state: dict) -> int:
        now, write, pack = time.monotonic_ns, os.write, _NS.pack
        wakes = 0
        with loop.lock:
            while not state["stop"]:
                called = loop.main_loop_wait(1000)
                t = now()
                if called and not state["stop"]:
                    wakes += 1
                    write(ack_w, pack(t))
        return wakes

    return _timed_wakeups(io_loop, notify if notify is not None else loop.notifier.notify,
                          count, warmup, gap_s, cpus, "qkio-io (bench)",
                          busy_ns=int(busy_after_notify_s * 1e9),
                          wait_until_asleep=wait_until_asleep)


def c_wake_latency(kind: str, count: int, warmup: int = 50, gap_s: float = 100e-6,
                   cpus: tuple[int, int] | None = None) -> dict:
    """The same wake-up between two C threads (``wake_ref.c``); same keys as :func:`wake_latency`."""
    exe = build_c("wake_ref")
    placement = [str(cpus[0]), str(cpus[1])] if cpus else []
    out = subprocess.run([str(exe), kind, str(count), str(warmup), str(round(gap_s * 1e6)),
                          *placement],
                         capture_output=True, text=True, timeout=60 + count * 0.01)
    if out.returncode:
        raise RuntimeError(f"wake_ref failed ({out.returncode}): {out.stderr.strip()}")
    report = json.loads(out.stdout)
    samples = [ns / 1000 for ns in report["samples_ns"]]
    wakes = report["wakeups"]
    return {
        "latency_us": summarize(samples),
        "samples_us": samples,
        "io_cpu_us_per_wake": round(report["io_cpu_ns"] / wakes / 1000, 2) if wakes else None,
        "wakeups": wakes,
    }


def _finish(r: dict, lat: list[float], samples: bool) -> dict:
    r["latency_us"] = summarize(lat)
    r["max_us"] = r["latency_us"]["max"]
    r["over_5ms"] = sum(1 for s in lat if s > STALL_US)
    if samples:
        r["samples_us"] = [round(x, 3) for x in lat]
    return r


def busy_notifier(count: int = 30, busy_s: float = 0.02) -> dict:
    """A sender that keeps running Python for ``busy_s`` after each notify, two ways.

    * ``"os.write"``: ``EventNotifier.notify``, an ``os.write``.  CPython
      releases the GIL around the system call, so the io thread, woken by
      the write, can take the GIL before the sender takes it back; or it
      loses that race and must wait until the sender is made to let go.
    * ``"write keeping the GIL"``: the same 8-byte write through
      ``ctypes.PyDLL``, which calls C *without* releasing the GIL.  The io
      thread, woken, finds the GIL held and waits.  CPython's ``take_gil``
      waits one switch interval (``sys.getswitchinterval()``) before it asks
      the holder to drop the GIL, and a thread running pure Python drops it
      only when asked, so no wake-up can complete in less than one interval
      after the write.  With ``wait_until_asleep`` the io thread is asleep
      in ``select()`` when the clock starts, so its wait for the GIL starts
      after the write: that bound is a law of the interpreter, whatever the
      host's load.  Run this in a process with no other thread that wants
      the GIL (the benchmark's child, not a notebook kernel): a third
      thread's request could make the sender let go earlier.

    Returns ``{"switch_interval_s": s, "ways": {way: {"latency_us":
    summary, "samples_us": [...], "under_interval": n}}}``.
    """
    import ctypes

    libc_with_gil = ctypes.PyDLL(None)   # PyDLL: the GIL stays held during the call
    libc_with_gil.write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
    one = (1).to_bytes(8, sys.byteorder)
    interval_us = sys.getswitchinterval() * 1e6
    ways = {}
    with MainLoop(backend="select", notifier="eventfd") as loop:
        fd = loop.notifier.write_fd
        for way, notify in (("os.write", None),
                            ("write keeping the GIL", lambda: libc_with_gil.write(fd, one, 8))):
            r = wake_latency(loop, count, warmup=3, busy_after_notify_s=busy_s, notify=notify,
                             wait_until_asleep=True)
            r["under_interval"] = sum(1 for x in r["samples_us"] if x < interval_us)
            r["samples_us"] = [round(x, 3) for x in r["samples_us"]]
            ways[way] = r
    return {"switch_interval_s": sys.getswitchinterval(), "busy_s": busy_s, "count": count,
            "ways": ways}


def floor_wake_latency(kind: str, count: int, warmup: int = 50, gap_s: float = 100e-6,
                       cpus: tuple[int, int] | None = None) -> dict:
    """The same wake-up with the least any Python io thread can do: the floor under qkio's.

    The sender is the same (``EventNotifier.notify`` on the same kind of
    notifier); the io thread is bare Python: drop a lock, ``select()`` on the
    notifier, take the lock, one read to drain it, read the clock,
    acknowledge.  No main loop, no handler registry, no dispatch.  What it
    costs beyond the C reference is the interpreter's own share of a
    wake-up -- mostly the woken thread taking the GIL -- which no Python
    main loop can go under.  Same keys as :func:`wake_latency`.
    """
    notifier = EventNotifier(kind)
    lock = threading.Lock()

    def io_loop(ack_w: int, state: dict) -> int:
        now, sel, read, write, pack = time.monotonic_ns, select.select, os.read, os.write, _NS.pack
        fd, size, fds = notifier.read_fd, 8 if kind == "eventfd" else 4096, [notifier.read_fd]
        wakes = 0
        lock.acquire()
        while not state["stop"]:
            lock.release()
            ready, _, _ = sel(fds, [], [], 1.0)
            lock.acquire()
            if ready:
                read(fd, size)
                t = now()
                if not state["stop"]:
                    wakes += 1
                    write(ack_w, pack(t))
        lock.release()
        return wakes

    with notifier:
        return _timed_wakeups(io_loop, notifier.notify, count, warmup, gap_s, cpus,
                              "python floor (bench)")


def pass_cost(kind: str = "eventfd", passes: int = 2000, chunks: int = 10) -> dict:
    """What one pass with nothing to do but the doorbell costs, in one thread, no wake-up.

    Each pass rings the notifier and then either runs
    ``MainLoop.main_loop_wait(0)`` (the doorbell is ready, so ``select()``
    returns at once and the pass drains it) or the Python floor's steps
    (drop a lock, ``select()``, take it, one read).  No thread sleeps or
    wakes, so this is the interpreter's and the system calls' work alone,
    with warm caches: the difference is the Python that qkio's pass adds.
    The passes are timed in ``chunks`` chunks, qkio's and the floor's
    alternating, and each figure is the median chunk's time per pass, so that
    the thread being preempted during one chunk moves neither.  Returns
    ``{"main_loop_wait_us", "floor_us", "python_beyond_floor_us"}``.
    """
    per_chunk = max(1, passes // chunks)
    qkio_us: list[float] = []
    floor_us: list[float] = []
    with MainLoop(backend="select", notifier=kind) as loop, EventNotifier(kind) as notifier:
        fd, size, fds = notifier.read_fd, 8 if kind == "eventfd" else 4096, [notifier.read_fd]
        lock = threading.Lock()
        sel, read, clock = select.select, os.read, time.perf_counter_ns
        for _ in range(chunks):
            ring, mlw = loop.notifier.notify, loop.main_loop_wait
            with loop.lock:
                t0 = clock()
                for _ in range(per_chunk):
                    ring()
                    mlw(0)
                qkio_us.append((clock() - t0) / per_chunk / 1000)
            ring = notifier.notify
            lock.acquire()
            t0 = clock()
            for _ in range(per_chunk):
                ring()
                lock.release()
                sel(fds, [], [], 0)
                lock.acquire()
                read(fd, size)
            floor_us.append((clock() - t0) / per_chunk / 1000)
            lock.release()
    q, f = median(qkio_us), median(floor_us)
    return {"main_loop_wait_us": round(q, 3), "floor_us": round(f, 3),
            "python_beyond_floor_us": round(q - f, 3)}


def run(quick: bool = False, progress=None, count: int | None = None,
        samples: bool = False, rounds: int | None = None) -> dict:
    """``rounds`` rounds; in each, every notifier kind, qkio's wake-ups then the C ones.

    ``kinds[kind]`` is qkio's (all chunks together), ``c_reference[kind]``
    the C threads', ``ratios[kind]`` qkio p50 / C p50 per round, and
    ``targets`` the issue's: qkio's eventfd p50 <= 2 x C's in the same run.
    """
    count = count if count is not None else (1000 if quick else 10000)
    rounds = max(1, min(rounds or (4 if quick else 10), count))
    result: dict[str, Any] = {"method": METHOD, "count": count, "rounds": rounds,
              "switch_interval_s": sys.getswitchinterval(),
              "kinds": {}, "c_reference": {}, "python_floor": {}, "ratios": {}, "targets": {},
              "pass_cost": {}}
    chunks = [count // rounds + (1 if i < count % rounds else 0) for i in range(rounds)]
    # Pinned: the sender on one CPU, the io thread on another, in all three
    # (qkio, C, floor) -- the case the doorbell is for, a thread that goes on
    # running waking the io thread elsewhere.  Unpinned, the scheduler mixes
    # that with same-CPU wake-ups from run to run (affinity.py); the same-CPU
    # figures are measured beside it, for the eventfd, so the book can show both.
    cpus = cpu_pair()
    result["placement"] = ({"sender_cpu": cpus[0], "io_thread_cpu": cpus[1]} if cpus
                           else "one CPU only: placement left to the scheduler")
    same = (cpus[0], cpus[0]) if cpus else None
    same_lat: dict[str, list[float]] = {"qkio": [], "c": [], "floor": []}
    acc: dict[str, Any] = {kind: {"q_lat": [], "c_lat": [], "q_cpu": 0.0, "c_cpu": 0.0, "q_wakes": 0,
                  "c_wakes": 0, "per_round": [], "q_round_p50": [], "c_round_p50": [],
                  "f_lat": [], "f_cpu": 0.0, "f_wakes": 0, "f_round_p50": [],
                  "steal": None, "pass_beyond_floor": [], "pass_qkio": []} for kind in KINDS}
    # Rounds outside, kinds inside: every round runs both notifiers, qkio's
    # then C's, so a change in the host's load hits all four alike and the
    # eventfd can be compared with the pipe, not only with C.
    for i, n in enumerate(chunks):
        for kind in KINDS:
            a = acc[kind]
            if progress:
                progress(f"round {i + 1}/{rounds}: {kind}, {n} wake-ups each, qkio, C, Python floor")
            steal0 = host_steal_ms()
            with MainLoop(backend="select", notifier=kind) as loop:
                q = wake_latency(loop, n, cpus=cpus)
            c = c_wake_latency(kind, n, cpus=cpus)
            f = floor_wake_latency(kind, n, cpus=cpus)
            pc = pass_cost(kind)
            a["pass_beyond_floor"].append(pc["python_beyond_floor_us"])
            a["pass_qkio"].append(pc["main_loop_wait_us"])
            if same and kind == "eventfd":
                with MainLoop(backend="select", notifier=kind) as loop:
                    same_lat["qkio"] += wake_latency(loop, n, cpus=same)["samples_us"]
                same_lat["c"] += c_wake_latency(kind, n, cpus=same)["samples_us"]
                same_lat["floor"] += floor_wake_latency(kind, n, cpus=same)["samples_us"]
            a["f_lat"] += f["samples_us"]
            a["f_cpu"] += (f["io_cpu_us_per_wake"] or 0) * f["wakeups"]
            a["f_wakes"] += f["wakeups"]
            a["f_round_p50"].append(f["latency_us"]["p50"])
            steal = steal_between(steal0, host_steal_ms())
            if steal is not None:
                a["steal"] = (a["steal"] or 0) + steal
            a["q_lat"] += q["samples_us"]
            a["c_lat"] += c["samples_us"]
            a["q_cpu"] += (q["io_cpu_us_per_wake"] or 0) * q["wakeups"]
            a["c_cpu"] += (c["io_cpu_us_per_wake"] or 0) * c["wakeups"]
            a["q_wakes"] += q["wakeups"]
            a["c_wakes"] += c["wakeups"]
            a["per_round"].append(q["latency_us"]["p50"] / c["latency_us"]["p50"])
            a["q_round_p50"].append(q["latency_us"]["p50"])
            a["c_round_p50"].append(c["latency_us"]["p50"])
    for kind in KINDS:
        a = acc[kind]
        q_wakes, c_wakes = a["q_wakes"], a["c_wakes"]
        result["kinds"][kind] = _finish(
            {"wakeups": q_wakes, "io_cpu_us_per_wake": round(a["q_cpu"] / q_wakes, 2) if q_wakes else None,
             "host_steal_ms": a["steal"], "round_p50_us": a["q_round_p50"]}, a["q_lat"], samples)
        result["kinds"][kind]["target_p50_under_50us"] = result["kinds"][kind]["latency_us"]["p50"] < 50
        result["c_reference"][kind] = _finish(
            {"wakeups": c_wakes, "io_cpu_us_per_wake": round(a["c_cpu"] / c_wakes, 2) if c_wakes else None,
             "round_p50_us": a["c_round_p50"]},
            a["c_lat"], samples)
        f_wakes = a["f_wakes"]
        result["python_floor"][kind] = _finish(
            {"wakeups": f_wakes, "io_cpu_us_per_wake": round(a["f_cpu"] / f_wakes, 2) if f_wakes else None,
             "round_p50_us": a["f_round_p50"]}, a["f_lat"], samples)
        q50 = result["kinds"][kind]["latency_us"]["p50"]
        c50 = result["c_reference"][kind]["latency_us"]["p50"]
        f50 = result["python_floor"][kind]["latency_us"]["p50"]
        result["pass_cost"][kind] = {"main_loop_wait_us": summarize(a["pass_qkio"]),
                                     "python_beyond_floor_us": summarize(a["pass_beyond_floor"])}
        result["ratios"][kind] = {"p50_over_c_p50": round(q50 / c50, 3),
                                  "per_round": summarize(a["per_round"]),
                                  "floor_p50_over_c_p50": round(f50 / c50, 3),
                                  "qkio_minus_floor_p50_us": round(q50 - f50, 3)}
    if same:
        result["same_cpu"] = {"eventfd": {who: summarize(lat) for who, lat in same_lat.items()}}
    ev = result["ratios"].get("eventfd")
    if ev:
        result["targets"]["eventfd p50 / C p50"] = {
            "target": TARGET_VS_C, "value": ev["p50_over_c_p50"],
            "met": ev["p50_over_c_p50"] <= TARGET_VS_C}
    return result


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for kind, r in result["kinds"].items():
        steal = r.get("host_steal_ms")
        rows.append((kind, f"{fmt_dist(r['latency_us'])}; {r['over_5ms']} over 5 ms"
                           + (f" (host steal in the run: {steal:g} ms)" if steal is not None else "")
                           + f"; io thread CPU {r['io_cpu_us_per_wake']} µs/wake"))
        c = result.get("c_reference", {}).get(kind)
        if c:
            rows.append((f"{kind} (C)", f"{fmt_dist(c['latency_us'])}; "
                                        f"io thread CPU {c['io_cpu_us_per_wake']} µs/wake"))
            fl = result.get("python_floor", {}).get(kind)
            if fl:
                rows.append((f"{kind} (Python floor)", f"{fmt_dist(fl['latency_us'])}; "
                                                       f"io thread CPU {fl['io_cpu_us_per_wake']} µs/wake"))
            q = result["ratios"][kind]
            if "floor_p50_over_c_p50" in q:
                rows.append((f"{kind} floor/C", f"{q['floor_p50_over_c_p50']:.2f} at the median: no Python "
                                                f"io thread does better; qkio adds "
                                                f"{q['qkio_minus_floor_p50_us']:.1f} µs to it"))
            rows.append((f"{kind} qkio/C", f"{q['p50_over_c_p50']:.2f} at the median (per round "
                                           f"{q['per_round']['min']:.2f}..{q['per_round']['max']:.2f})"))
    for kind, pc in result.get("pass_cost", {}).items():
        rows.append((f"{kind}, one pass", f"main_loop_wait with only the doorbell, in one thread: "
                     f"{pc['main_loop_wait_us']['p50']:.2f} µs, of which "
                     f"{pc['python_beyond_floor_us']['p50']:.2f} µs is Python beyond the floor's "
                     "(median of the rounds)"))
    place = result.get("placement")
    if isinstance(place, dict):
        rows.append(("placement", f"sender on CPU {place['sender_cpu']}, io thread on CPU "
                                  f"{place['io_thread_cpu']} (qkio, C and floor alike)"))
    same = result.get("same_cpu", {}).get("eventfd")
    if same:
        rows.append(("eventfd, same CPU", "p50 qkio {:.3g} µs, C {:.3g} µs, Python floor {:.3g} µs "
                     "(both threads on the sender's CPU)".format(
                         same["qkio"]["p50"], same["c"]["p50"], same["floor"]["p50"])))
    ev = result["kinds"].get("eventfd")
    if ev:
        ok = ev["target_p50_under_50us"] and ev["over_5ms"] == 0
        rows.append(("target", f"eventfd p50 < 50 µs and no stall > 5 ms: {'met' if ok else 'MISSED'}"))
    for key, t in result.get("targets", {}).items():
        rows.append(("target", f"{key} <= {t['target']}: {t['value']:.2f}, "
                               f"{'met' if t['met'] else 'MISSED'}"))
    return rows
