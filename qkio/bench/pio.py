"""``pio``: one port-I/O exit round trip -- qkio's vCPU loop vs the same loop in C vs QEMU.

Method
------
One guest (``pio-loop``, from :mod:`qkio.guests`, a Multiboot ELF): read
``count=N`` from the command line, do N one-byte ``out %al, %dx`` to port
0x80 in a four-instruction loop, then write 0x10 to isa-debug-exit (0xf4).  Each OUT is one
``KVM_EXIT_IO``: the guest exits, ``KVM_RUN`` returns to the VMM, the VMM
handles the access and calls ``KVM_RUN`` again.

The same ELF runs in

* **qkio**: a ``Machine`` in this process, its vCPU thread looping in
  ``CpuThread._cpu_loop`` with the native exit loop (:mod:`qkio.native`):
  in C, the global lock dropped around ``KVM_RUN`` and retaken, the OUT
  completed by calling the Python device's ``io_write`` -- a null device on
  port 0x80 -- found in ``PortBus``'s port table;
* **qkio-python**: the same machine with ``exit_path="python"``: every one
  of those steps in Python (``handle_io`` -> ``PortBus.write`` -> the same
  device).  Not a target; shown because the difference is what the
  interpreter costs per exit on this host, and it is why the native loop
  exists;
* **C**: ``pio_ref.c``, compiled with ``gcc -O2`` on first use -- the same
  VM shape (irqchip, PIT), the same segments loaded, a KVM_RUN loop that
  only looks at ``exit_reason`` and ``io.port``.  The floor: nothing a VMM
  can do per exit costs less;
* **QEMU**: ``qemu-system-x86_64 -accel kvm -M pc -nodefaults -display none
  -device isa-debug-exit,iobase=0xf4,iosize=0x04 -kernel pio.elf -append
  count=N`` (port 0x80 is QEMU's ``ioport80``, which ignores writes).

Per-exit cost = (T(N) - T(small)) / (N - small) for all three (see
:mod:`qkio.bench.guest_run` for what T is in each), which removes start-up.
QEMU's T is a whole process run, about 3 s of it SeaBIOS and loading, and
that start-up varies from run to run by tens of ms -- an error that the
differencing cannot remove, only dilute.  So QEMU gets a larger N (its
per-exit error is start-up jitter / (N - small)); the spread of its T(small)
is reported as ``qemu_startup_s`` to show the size of that jitter.
The runs are **interleaved**: each round runs qkio, C and QEMU (small, then
N) back to back, and the rounds repeat, so a change in the machine's load
hits all three alike; the ratios are taken within each round and their
median reported.  Exit counts are checked (N + 1 IO exits for qkio and C).

Targets (issue "Measure it"): qkio <= 1.10 x C and <= 1.05 x QEMU.  If the
native loop cannot be built here, "qkio" is the Python loop, the result says
so (``qkio_exit_path``), and the comparison is made all the same.
"""

from __future__ import annotations

from .build import build_guest
from .guest_run import have_qemu, run_c, run_qemu, run_qkio
from .stats import median, summarize

NAME = "pio"
TITLE = "port-I/O exit round trip: qkio vs C (the floor) vs QEMU"
METHOD = ("same Multiboot guest doing N OUTs to port 0x80; per exit = (T(N) - T(small)) / "
          "(N - small); qkio / qkio-python / C / QEMU interleaved in each round; ratios per round")
TARGETS = {"qkio/c": 1.10, "qkio/qemu": 1.05}


def _checked_qkio(elf, n, exit_path=None, seen=None):
    seconds, info = run_qkio(elf, n, exit_path=exit_path)
    io_exits = info["exits"].get(2, 0)
    if io_exits != n + 1:
        raise RuntimeError(f"qkio took {io_exits} IO exits for count={n}, expected {n + 1}")
    if seen is not None:
        seen.add(info["exit_path"])
    return seconds


def _checked_c(elf, n):
    seconds, info = run_c(elf, n)
    if info["exits"] != n + 1:
        raise RuntimeError(f"pio_ref took {info['exits']} exits for count={n}, expected {n + 1}")
    return seconds


def run(quick: bool = False, progress=None, n: int | None = None, small: int | None = None,
        rounds: int | None = None, qemu: bool | None = None, n_qemu: int | None = None) -> dict:
    n = n or (20_000 if quick else 100_000)
    n_qemu = n_qemu or (100_000 if quick else 400_000)
    small = small or (1_000 if quick else 2_000)
    rounds = rounds or (3 if quick else 9)
    qemu = have_qemu() if qemu is None else qemu
    elf = build_guest("pio-loop")
    paths = set()
    runners = {"qkio": lambda e, k: _checked_qkio(e, k, seen=paths),
               "qkio-python": lambda e, k: _checked_qkio(e, k, exit_path="python"),
               "c": _checked_c}
    if qemu:
        runners["qemu"] = lambda e, k: run_qemu(e, k)[0]
    counts = {"qkio": n, "qkio-python": n, "c": n, "qemu": n_qemu}
    per_exit = {impl: [] for impl in runners}
    startup = []
    for r in range(rounds):
        for impl, fn in runners.items():
            big = counts[impl]
            if progress:
                progress(f"round {r + 1}/{rounds}: {impl}, count={small} and {big}")
            t_small = fn(elf, small)
            t_n = fn(elf, big)
            per_exit[impl].append((t_n - t_small) / (big - small) * 1e6)
            if impl == "qemu":
                startup.append(t_small)
    result = {"method": METHOD, "count": {k: counts[k] for k in runners}, "small": small,
              "rounds": rounds, "quick": quick,
              "per_exit_us": {impl: summarize(v) for impl, v in per_exit.items()},
              "rounds_us": {impl: [round(x, 3) for x in v] for impl, v in per_exit.items()},
              "ratios": {}, "targets": {}}
    from qkio import native
    result["qkio_exit_path"] = "/".join(sorted(paths))
    if "python" in paths:
        result["qkio_exit_path_why"] = native.unavailable_reason
    python_vs_c = [p / c for p, c in zip(per_exit["qkio-python"], per_exit["c"])]
    result["ratios"]["qkio-python/c"] = summarize(python_vs_c)
    for other in ("c", "qemu"):
        if other in per_exit:
            key = f"qkio/{other}"
            ratios = [q / o for q, o in zip(per_exit["qkio"], per_exit[other])]
            result["ratios"][key] = summarize(ratios)
            result["targets"][key] = {"target": TARGETS[key], "median": round(median(ratios), 3),
                                      "met": median(ratios) <= TARGETS[key]}
    if startup:
        result["qemu_startup_s"] = summarize(startup)
    if not qemu:
        result["qemu"] = f"skipped: {'qemu-system-x86_64 not found' if not have_qemu() else 'not asked for'}"
    return result


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for impl, d in result["per_exit_us"].items():
        rows.append((impl, f"{d['p50']:.3g} µs per exit (min {d['min']:.3g}, max {d['max']:.3g}; "
                           f"{d['n']} rounds)"))
    for key, t in result["targets"].items():
        d = result["ratios"][key]
        rows.append((key, f"{t['median']:.3f} (min {d['min']:.3f}, max {d['max']:.3f}); "
                          f"target <= {t['target']}: {'met' if t['met'] else 'MISSED'}"))
    d = result["ratios"]["qkio-python/c"]
    rows.append(("qkio-python/c", f"{d['p50']:.3f} (min {d['min']:.3f}, max {d['max']:.3f}); "
                                  "the same loop in pure Python, for comparison"))
    path = result.get("qkio_exit_path")
    if path and path != "native":
        rows.append(("qkio exit path", f"{path} ({result.get('qkio_exit_path_why')})"))
    if "qemu_startup_s" in result:
        d = result["qemu_startup_s"]
        err = (d["max"] - d["min"]) / (result["count"]["qemu"] - result["small"]) * 1e6
        rows.append(("qemu start-up", f"{d['p50']:.3g} s (min {d['min']:.3g}, max {d['max']:.3g}): "
                                      f"its jitter alone is ±{err / 2:.2g} µs per exit"))
    if "qemu" in result:
        rows.append(("qemu", result["qemu"]))
    if result.get("quick"):
        rows.append(("note", "quick mode: few rounds and small counts, indicative only"))
    return rows
