"""``qkio bench``: measure the costs the book talks about, on this machine.

``qkio bench [NAMES...] [--quick] [--json FILE]`` runs the benchmarks named
(all of them by default), shows progress on stderr when it is a terminal,
prints a table, and with ``--json`` writes every result together with what
it ran on (kernel, CPU, Python, the host's KVM module).

One module per benchmark; each has ``NAME``, ``TITLE``, ``run(quick,
progress) -> dict`` (JSON-serialisable, distributions as
:func:`qkio.bench.stats.summarize` dicts) and ``table(result) -> rows``.
Each module's docstring says exactly how it measures.

=============  ==========================================================
``signal``     kill() -> handler in the io thread: signalfd, signal thread
               + pipe, asynchronous handler (latency, CPU per signal);
               each path also in C (signal_ref.c), interleaved
``wakeup``     EventNotifier.notify() -> main_loop_wait returns: eventfd
               vs pipe; each also between two C threads (wake_ref.c)
``wait``       select vs poll vs epoll with 1..1000 idle fds
``pio``        a port-I/O exit round trip: qkio vs C vs QEMU, interleaved (and an MMIO one)
``startup``    the whole run of a trivial kernel: qkio run vs QEMU microvm
               vs python -c pass, interleaved
``ioeventfd``  a guest OUT through KVM_IOEVENTFD vs an exit to qkio
``serial``     guest -> UART -> stdout pipe throughput, qkio vs QEMU
``virtio``     a virtio-blk request: CPU by thread, exits, notify -> interrupt,
               per notify mode (vcpu, main, iothread; sync or paio), qkio vs QEMU
``timers``     a QEMUTimer's lateness: --clock alarm (0.12's SIGALRM) vs
               deadline (modern), on each --signals path, in rounds
=============  ==========================================================

``--quick`` runs each in a few seconds (what the book uses); the numbers
are then indicative only.  A host's KVM may run guest code far slower than
its CPU runs the same code (``qkio.bench.guest_rate`` measures by how much),
and the cores are shared: absolute numbers move with the load, which is why
comparisons are interleaved in the same run.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

from .progress import Progress, Silent
from .stats import host_steal_ms, steal_between

#: Benchmark name -> its module (imported when first used).
BENCHMARKS = {"signal": "signal_latency", "wakeup": "wakeup", "wait": "wait", "pio": "pio",
              "startup": "startup",
              "ioeventfd": "ioeventfd", "serial": "serial_throughput", "virtio": "virtio",
              "timers": "timer_lateness"}


def benchmark(name: str):
    """The module of benchmark ``name``."""
    return importlib.import_module(f"{__name__}.{BENCHMARKS[name]}")

__all__ = ["BENCHMARKS", "benchmark", "main", "machine_info", "run_benchmarks"]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    modules = sorted(m for m in os.listdir("/sys/module")
                     if m == "kvm" or m.startswith("kvm_")) if os.path.isdir("/sys/module") else []
    qemu = None
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, timeout=10).stdout
        qemu = out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        pass
    loadavg = _read("/proc/loadavg")
    return {
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "kvm_modules": modules,
        "kvm_pvm": "kvm_pvm" in modules,
        "qemu": qemu,
        "loadavg": loadavg.split()[:3] if loadavg else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_benchmarks(names=None, quick: bool = False, progress=None) -> dict:
    """Run the named benchmarks (all if none); ``{"machine", "quick", "results", "errors"}``."""
    names = list(names) if names else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; there are {', '.join(BENCHMARKS)}")
    progress = progress if progress is not None else Silent()
    out: dict[str, Any] = {"machine": machine_info(), "quick": quick, "results": {}, "errors": {}}
    for name in names:
        progress.start(name)
        t0, steal0 = time.monotonic(), host_steal_ms()
        try:
            result = benchmark(name).run(quick=quick, progress=progress)
            result["wall_s"] = round(time.monotonic() - t0, 2)
            result["host_steal_ms"] = steal_between(steal0, host_steal_ms())
            out["results"][name] = result
        except Exception as e:  # one failing benchmark must not lose the others
            out["errors"][name] = f"{type(e).__name__}: {e}"
        finally:
            progress.done()
    return out


def format_table(report: dict) -> str:
    lines = []
    m = report["machine"]
    lines.append(f"qkio bench on {m['cpu_model']} ({m['cpus']} CPUs), Linux {m['kernel']}, "
                 f"Python {m['python']}, KVM modules {', '.join(m['kvm_modules']) or 'none'}"
                 + (" (quick)" if report["quick"] else ""))
    for name, result in report["results"].items():
        module = benchmark(name)
        lines.append("")
        steal = result.get("host_steal_ms")
        lines.append(f"{name}: {module.TITLE}  [{result.get('wall_s', '?')} s"
                     + (f"; host steal {steal:g} ms" if steal is not None else "") + "]")
        rows = module.table(result)
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            lines.append(f"  {key:<{width}}  {value}")
    for name, err in report["errors"].items():
        lines.append("")
        lines.append(f"{name}: FAILED: {err}")
    return "\n".join(lines)


def main(args) -> int:
    """Entry point of ``qkio bench`` (``args``: ``names``, ``quick``, ``json``)."""
    try:
        report = run_benchmarks(args.names, quick=args.quick, progress=Progress())
    except ValueError as e:
        print(f"qkio: error: {e}", file=sys.stderr)
        return 1
    print(format_table(report), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 1 if report["errors"] else 0
