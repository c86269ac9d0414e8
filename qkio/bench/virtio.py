"""``virtio``: what the VMM spends per virtio-blk request, per notify mode, qkio and QEMU.

Method
------
The ``virtio-blk`` guest (qkio/guests/virtio-blk.s) writes ``count`` sectors
and reads each back, one request in flight, polling the used ring.  Every
configuration runs it with ``count=N`` and ``count=small`` pairs in each
round, alternating configurations within the round, on a fresh 64 KiB image
each time.  A pair is two requests (OUT + IN), so

    per request = (X(N) - X(small)) / (2 * (N - small))

for each measure X -- which cancels everything that does not grow with N
(start-up, loading the guest, the probe, FLUSH and GET_ID, shutdown):

* **process CPU** (user + system, from ``wait4``'s rusage): ``qkio run`` and
  ``qemu-system-x86_64 -M microvm`` as child processes, the same way;
* **wall time**, of the same child processes;
* **CPU by thread**, of the same child processes, both VMMs alike: every 2 ms
  the bench reads ``/proc/PID/task/*/schedstat`` (nanoseconds on CPU) and
  ``comm``, and groups threads by role -- vCPU (``CPU 0/KVM``), main loop
  (``qkio-io``, ``qemu-system-x86``), IOThread (``IO io0``), AIO workers
  (``qkio-aio*``, QEMU's ``worker``), other; QEMU gets ``-name
  debug-threads=on`` so that its threads carry those names;
* **qkio's CPU by thread** (in this process, ``Machine`` API, sync I/O,
  and the guest's ``irq=1``: it sleeps in HLT until the interrupt instead of
  polling, so the vCPU thread's CPU is the guest's own work plus the exits
  qkio handles for it, not a spin): the vCPU thread (``time.thread_time_ns``
  when it ends; the guest runs in that thread), the io thread (around
  ``Machine.run``), the IOThread (when it ends);
* **the guest's own clock**: the TSC cycles it counts per write+read pair
  (halved: per request), from its notify to seeing the used ring move, its
  own work included -- the one latency measured the same way inside both
  VMMs (with this host's slow guests, mostly the guest's own work);
* **notify exits** per request, differenced the same way: QueueNotify writes
  that reached qkio as ``KVM_EXIT_MMIO`` -- 1 per request in ``vcpu`` mode,
  0 when the notify goes through ``KVM_IOEVENTFD`` -- and all MMIO exits
  (the guest's InterruptACK after each completion adds one in every mode);
* **notify to completion** inside qkio: from the moment the thread that took
  the notify starts handling it to the moment it raises the interrupt (or,
  with ``paio``, from submission to the completion callback's interrupt).

QEMU's three modes: ``-global virtio-mmio.ioeventfd=off`` (the vCPU thread
handles the notify's exit), the default (ioeventfd, main loop), and
``iothread=io0``.  The guest runs at kvm_pvm speed (about a thousand times
slower than hardware), and it *polls*: the vCPU thread's CPU is mostly the
guest's own, in both VMMs alike.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

from . import guest_run
from .stats import median, summarize
from .virtio_run import fresh_image, guest_report, qemu_microvm_argv

NAME = "virtio"
TITLE = "virtio-blk request: host CPU and time per request by notify mode, qkio vs QEMU"
METHOD = ("virtio-blk guest, count=N vs count=small write+read pairs, polling the used ring; per request = "
          "(X(N) - X(small)) / (2 (N - small)); process CPU from rusage of child processes (qkio run, "
          "qemu microvm), per-thread CPU from an in-process Machine; configurations alternate per round")

QKIO_MODES = (("vcpu", "sync"), ("main", "sync"), ("iothread", "sync"), ("vcpu", "paio"), ("main", "paio"))
QEMU_MODES = {"vcpu": ["-global", "virtio-mmio.ioeventfd=off"], "main": [], "iothread": None}


#: Thread name (``comm``, as ``ps -L`` shows it) -> the role it plays, in either VMM.
#: QEMU's names need ``-name debug-threads=on``; its main thread keeps the
#: program's name, cut to 15 characters by the kernel.
ROLES = {"CPU 0/KVM": "vCPU", "qkio-io": "main loop", "qemu-system-x86": "main loop",
         "IO io0": "IOThread"}


def role(comm: str) -> str:
    if comm in ROLES:
        return ROLES[comm]
    if comm.startswith("qkio-aio") and comm != "qkio-aio-sigwt" or comm == "worker":
        return "AIO workers"   # posix-aio-compat's (qkio) or the thread pool's (QEMU)
    return "other"


def _sample_threads(pid: int, into: dict) -> None:
    """Each thread's CPU so far (``/proc/PID/task/TID/schedstat``: nanoseconds on CPU),
    by tid; a thread that has gone keeps its last sample."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        into[tid] = (comm, ns)


def _child(argv, timeout=300) -> dict:
    """Run a VMM to the guest's exit: process CPU (rusage), wall time, the guest's
    report, and CPU by thread role, sampled every 2 ms while it runs (the last
    sample is at most 2 ms before the end; the bit lost is start-up-or-shutdown-like
    and mostly cancels in the N - small difference)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    samples: dict = {}
    chunks: dict = {"out": [], "err": []}

    def drain(stream, key):
        for chunk in iter(lambda: stream.read(4096), b""):
            chunks[key].append(chunk)
    import threading
    readers = [threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True)]
    for r in readers:
        r.start()
    deadline = t0 + timeout
    while proc.poll() is None:
        _sample_threads(proc.pid, samples)
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{os.path.basename(argv[0])} still running after {timeout} s")
        time.sleep(0.002)
    for r in readers:
        r.join(5)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = b"".join(chunks["out"]).decode("latin-1")
    if proc.returncode != 33:
        raise RuntimeError(f"{os.path.basename(argv[0])} exited {proc.returncode}: "
                           f"{(out + b''.join(chunks['err']).decode('latin-1')).strip()[-300:]}")
    tsc = [int(line.split()[-1]) for line in out.splitlines()
           if line.startswith("virtio-blk: tsc cycles per write+read ")]
    by_role: dict = {}
    for comm, ns in samples.values():
        by_role[role(comm)] = by_role.get(role(comm), 0) + ns
    return {"cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "wall_s": wall, "report": guest_report(out), "tsc_per_pair": tsc[0] if tsc else None,
            "thread_ns": by_role}


def qkio_argv(elf, image, mode, aio, count):
    return [sys.executable, "-m", "qkio", "run", "--kernel", str(elf), "--drive", f"file={image}",
            "--virtio-notify", mode, "--virtio-aio", aio, "--append", f"count={count}"]


def qemu_argv(elf, image, mode, count):
    argv = qemu_microvm_argv(elf, image, iothread=mode == "iothread", count=count)
    return argv + (QEMU_MODES[mode] or []) + ["-name", "debug-threads=on"]


def run_in_process(elf, image, mode, count) -> dict:
    """One run in a Machine of this process: CPU by thread, MMIO exits, handling times."""
    from qkio.kvm.constants import ExitReason
    from qkio.machine import Machine
    out = bytearray()
    with Machine(memory_mib=8, console=out.extend, log=lambda msg: None,
                 drives=[(image, False, b"")], virtio_notify=mode) as machine:
        machine.load_multiboot(elf, append=f"count={count} irq=1")
        board = machine.virtio
        iothread = board.iothread
        io0 = time.thread_time_ns()
        status = machine.run(timeout=300)
        io_ns = time.thread_time_ns() - io0
        runner = board.runners[0]
        facts = {"status": status, "vcpu_ns": machine.cpus[0].cpu_time_ns, "io_ns": io_ns,
                 "mmio_exits": machine.cpus[0].exit_counts.get(ExitReason.MMIO, 0),
                 "notify_exits": board.runners[0].transport.mmio_notifies,
                 "handling_ns": list(runner.batches_ns), "with_lock": runner.requests_with_lock,
                 "requests": sum(runner.requests_by_type.values()),
                 "threads": dict(runner.requests_by_thread)}
    facts["iothread_ns"] = iothread.cpu_time_ns if iothread is not None else 0
    if status != 33:
        raise RuntimeError(f"the guest failed under qkio ({mode}): {out.decode(errors='replace')[-300:]}")
    return facts


def run(quick: bool = False, progress=None, n: int | None = None, small: int | None = None,
        rounds: int | None = None) -> dict:
    from qkio.guests import build_guest
    n = n or (104 if quick else 204)
    small = small or (4 if quick else 4)
    rounds = rounds or (3 if quick else 5)
    elf = build_guest("virtio-blk")
    have_qemu = guest_run.have_qemu()
    per_req = 2 * (n - small)
    configs: dict[str, tuple[str, str, str | None]] = {
        f"qkio {m}" + (" paio" if a == "paio" else ""): ("qkio", m, a) for m, a in QKIO_MODES}
    if have_qemu:
        configs.update({f"qemu {m}": ("qemu", m, None) for m in QEMU_MODES})
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    guest_tsc: dict[str, list[float]] = {c: [] for c in configs}
    roles = ("vCPU", "main loop", "IOThread", "AIO workers", "other")
    by_role: dict[str, dict[str, list[float]]] = {c: {r: [] for r in roles} for c in configs}
    wall: dict[str, list[float]] = {c: [] for c in configs}
    threads: dict[str, dict[str, list[float]]] = {
        m: {"vCPU": [], "io thread": [], "IOThread": []} for m, a in QKIO_MODES if a == "sync"}
    exits: dict[str, list[float]] = {m: [] for m in threads}
    notify_exits: dict[str, list[float]] = {m: [] for m in threads}
    handling: dict[str, list[float]] = {m: [] for m in threads}
    lock_free = {m: [0, 0] for m in threads}
    reports: set[tuple[str, ...]] = set()
    with tempfile.TemporaryDirectory(prefix="qkio-bench-virtio-") as tmp:
        for r in range(rounds):
            for name, (vmm, mode, aio) in configs.items():
                if progress:
                    progress(f"round {r + 1}/{rounds}: {name}")
                res = {}
                for count in (small, n):
                    image = fresh_image(os.path.join(tmp, "disk.img"), sectors=128)
                    argv = (qkio_argv(elf, image, mode, aio or "sync", count) if vmm == "qkio"
                            else qemu_argv(elf, image, mode, count))
                    res[count] = _child(argv)
                    if count == n:
                        reports.add(tuple(res[count]["report"]))
                        if res[count]["tsc_per_pair"]:
                            # A request as the guest sees it: notify to used ring, plus its own work.
                            guest_tsc[name].append(res[count]["tsc_per_pair"] / 2)
                cpu[name].append((res[n]["cpu_s"] - res[small]["cpu_s"]) / per_req * 1e6)
                for role_name in roles:
                    ns = res[n]["thread_ns"].get(role_name, 0) - res[small]["thread_ns"].get(role_name, 0)
                    by_role[name][role_name].append(ns / per_req / 1e3)
                wall[name].append((res[n]["wall_s"] - res[small]["wall_s"]) / per_req * 1e6)
            for mode in threads:
                if progress:
                    progress(f"round {r + 1}/{rounds}: qkio {mode}, in process, by thread")
                res = {count: run_in_process(elf, fresh_image(os.path.join(tmp, "p.img")), mode, count)
                       for count in (small, n)}
                for key, field in (("vCPU", "vcpu_ns"), ("io thread", "io_ns"), ("IOThread", "iothread_ns")):
                    threads[mode][key].append((res[n][field] - res[small][field]) / per_req / 1e3)
                exits[mode].append((res[n]["mmio_exits"] - res[small]["mmio_exits"]) / per_req)
                notify_exits[mode].append((res[n]["notify_exits"] - res[small]["notify_exits"]) / per_req)
                handling[mode].extend(ns / 1e3 for ns in res[n]["handling_ns"])
                lock_free[mode][0] += res[n]["requests"] - res[n]["with_lock"]
                lock_free[mode][1] += res[n]["requests"]
    if len(reports) != 1:
        raise RuntimeError(f"the guest reported different data on different runs: {sorted(reports)}")
    result = {"method": METHOD, "count": n, "small": small, "rounds": rounds, "qemu": have_qemu,
              "guest_report": list(next(iter(reports))),
              "cpu_us_per_request": {c: summarize(v) for c, v in cpu.items()},
              "wall_us_per_request": {c: summarize(v) for c, v in wall.items()},
              "guest_tsc_cycles_per_request": {c: summarize(v, digits=0) for c, v in guest_tsc.items()},
              "role_cpu_us_per_request": {c: {r: summarize(v) for r, v in d.items()}
                                          for c, d in by_role.items()},
              "rounds_cpu_us": {c: [round(x, 2) for x in v] for c, v in cpu.items()},
              "thread_cpu_us_per_request": {m: {k: summarize(v) for k, v in d.items()}
                                            for m, d in threads.items()},
              "mmio_exits_per_request": {m: summarize(v) for m, v in exits.items()},
              "notify_exits_per_request": {m: summarize(v) for m, v in notify_exits.items()},
              "notify_to_interrupt_us": {m: summarize(v) for m, v in handling.items()},
              "requests_without_lock": {m: {"without": a, "of": b} for m, (a, b) in lock_free.items()}}
    if have_qemu:
        result["qkio_over_qemu_cpu"] = {m: verdict(cpu[f"qkio {m}"], cpu[f"qemu {m}"]) for m in QEMU_MODES}
    return result


def verdict(ours: list[float], theirs: list[float]) -> dict:
    """Median ratio, and whether the two ranges are apart (a winner only then)."""
    ratio = median(ours) / median(theirs) if median(theirs) > 0 else None
    apart = min(ours) > max(theirs) or max(ours) < min(theirs)
    return {"ratio": round(ratio, 2) if ratio is not None else None, "ranges_apart": apart}


def _clean(v: float) -> float:
    """A thread with no work per request differences to ±1 µs of noise: 0, not -0."""
    return v if abs(v) >= 0.5 else 0.0


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for c, d in result["cpu_us_per_request"].items():
        w = result["wall_us_per_request"][c]
        t = result.get("guest_tsc_cycles_per_request", {}).get(c, {})
        rows.append((f"{c}", f"CPU {d['p50']:.0f} µs/request (min {d['min']:.0f}, max {d['max']:.0f}); "
                             f"wall {w['p50']:.0f} µs"
                             + (f"; guest TSC {t['p50'] / 1e3:.0f}k cycles/request" if t.get("n") else "")))
    for c, d in result.get("role_cpu_us_per_request", {}).items():
        rows.append((f"{c} by thread", ", ".join(
            f"{r} {_clean(v['p50']):.0f}" for r, v in d.items() if v.get("n")) + " µs/request"))
    for m, d in result["thread_cpu_us_per_request"].items():
        parts = ", ".join(f"{k} {_clean(v['p50']):.0f}" for k, v in d.items())
        e = result["notify_exits_per_request"][m]["p50"]
        a = result["mmio_exits_per_request"][m]["p50"]
        h = result["notify_to_interrupt_us"][m]
        lf = result["requests_without_lock"][m]
        rows.append((f"qkio {m}, irq=1, in process", f"{parts} µs/request; notify exits/request {e:g} "
                                            f"(all MMIO {a:g}); "
                                            f"notify->interrupt p50 {h.get('p50', 0):.0f} µs; "
                                            f"{lf['without']}/{lf['of']} requests without the lock"))
    for m, v in result.get("qkio_over_qemu_cpu", {}).items():
        rows.append((f"qkio/qemu CPU, {m}", f"{v['ratio']}x" + ("" if v["ranges_apart"] else
                                                                 " (ranges overlap: no winner)")))
    return rows
