"""``pio``: one port-I/O exit round trip -- qkio's vCPU loop vs the same loop in C vs QEMU.

Method
------
One guest (``pio-loop``, from :mod:`qkio.guests`, a Multiboot ELF): read
``count=N`` and ``port=P`` from the command line, do N one-byte ``out %al,
%dx`` to port P in a four-instruction loop, then write 0x10 to
isa-debug-exit (0xf4).  Each OUT is one ``KVM_EXIT_IO``: the guest exits,
``KVM_RUN`` returns to the VMM, the VMM handles the access and calls
``KVM_RUN`` again.  Two ports, each in qkio and in QEMU:

* a **device's** port, 0x3ff: the scratch register of the 16550 UART at
  0x3f8 -- qkio's ``Serial``, QEMU's ``serial`` (``-serial null``) -- a
  register that only stores the byte;
* a port **nobody owns**, 0x500: qkio's ``PortBus`` reports it once and
  drops the writes (after the first, in the native loop's C); QEMU's
  unassigned region drops them too.

The same ELF runs in

* **qkio**: a ``Machine`` in this process, its vCPU thread looping in
  ``CpuThread._cpu_loop`` with the native exit loop (:mod:`qkio.native`):
  in C, the global lock dropped around ``KVM_RUN`` and retaken, the OUT
  completed by calling the Python device's ``io_write``, found in
  ``PortBus``'s port table (for the unowned port: completed in C);
* **qkio-python**: the same machine with ``exit_path="python"``: every one
  of those steps in Python (``handle_io`` -> ``PortBus.write`` -> the same
  device).  Not a target; shown because the difference is what the
  interpreter costs per exit on this host, and it is why the native loop
  exists;
* **C**: ``pio_ref.c``, compiled with ``gcc -O2`` on first use -- the same
  VM shape (irqchip, PIT), the same segments loaded, a KVM_RUN loop that
  only looks at ``exit_reason`` and ``io.port``.  The floor: nothing a VMM
  can do per exit costs less (it runs the device port's count);
* **QEMU**: ``qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host
  -nodefaults -display none -device isa-debug-exit,iobase=0xf4,iosize=0x04
  -serial null -kernel pio-loop.elf -append "count=N port=P"``
  (:mod:`qkio.bench.guest_run` says why microvm).

Per-exit cost = (T(N) - T(small)) / (N - small) for each (see
:mod:`qkio.bench.guest_run` for what T is in each), which removes start-up.
QEMU's T is a whole process run; its start-up (some 40 ms with microvm)
varies from run to run -- an error that the differencing cannot remove,
only dilute.  So QEMU gets a larger N (its per-exit error is start-up
jitter / (N - small)); the spread of its T(small) is reported as
``qemu_startup_s`` to show the size of that jitter.
The runs are **interleaved**: each round runs every variant (small, then
N) back to back, and the rounds repeat, so a change in the machine's load
hits all alike; the ratios are taken within each round and their median
reported.  Exit counts are checked (N + 1 IO exits for qkio and C).

Targets: qkio <= 1.10 x C and <= 1.05 x QEMU on the device's port, and
<= 1.05 x QEMU on the unowned port.  If the native loop cannot be built
here, "qkio" is the Python loop, the result says so (``qkio_exit_path``),
and the comparison is made all the same.
"""

from __future__ import annotations

from typing import Any

from .build import build_guest
from .guest_run import DEVICE_PORT, UNOWNED_PORT, have_qemu, run_c, run_qemu, run_qkio
from .stats import median, summarize

NAME = "pio"
TITLE = "port-I/O exit round trip: qkio vs C (the floor) vs QEMU, to a device and to nobody"
METHOD = ("same Multiboot guest doing N OUTs to a port (0x3ff: the UART's scratch register; 0x500: "
          "nobody's); per exit = (T(N) - T(small)) / (N - small); qkio / qkio-python / C / QEMU "
          "interleaved in each round; ratios per round")
#: variant -> (implementation, port)
VARIANTS = {
    "qkio": ("qkio", DEVICE_PORT),
    "qkio-python": ("qkio-python", DEVICE_PORT),
    "c": ("c", DEVICE_PORT),
    "qemu": ("qemu", DEVICE_PORT),
    "qkio unowned": ("qkio", UNOWNED_PORT),
    "qemu unowned": ("qemu", UNOWNED_PORT),
}
TARGETS = {"qkio/c": 1.10, "qkio/qemu": 1.05, "qkio unowned/qemu unowned": 1.05}


def _checked_qkio(elf, n, port, exit_path=None, seen=None):
    seconds, info = run_qkio(elf, n, exit_path=exit_path, port=port)
    io_exits = info["exits"].get(2, 0)
    if io_exits != n + 1:
        raise RuntimeError(f"qkio took {io_exits} IO exits for count={n}, expected {n + 1}")
    if seen is not None:
        seen.add(info["exit_path"])
    return seconds


def _checked_c(elf, n, port):
    seconds, info = run_c(elf, n, port=port)
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
    paths: set[str] = set()
    impls = {"qkio": lambda e, k, p: _checked_qkio(e, k, p, seen=paths),
             "qkio-python": lambda e, k, p: _checked_qkio(e, k, p, exit_path="python"),
             "c": _checked_c,
             "qemu": lambda e, k, p: run_qemu(e, k, port=p)[0]}
    variants = {v: (impls[impl], port) for v, (impl, port) in VARIANTS.items()
                if qemu or impl != "qemu"}
    counts = {v: n_qemu if VARIANTS[v][0] == "qemu" else n for v in variants}
    per_exit: dict[str, list[float]] = {v: [] for v in variants}
    startup = []
    for r in range(rounds):
        for v, (fn, port) in variants.items():
            big = counts[v]
            if progress:
                progress(f"round {r + 1}/{rounds}: {v}, count={small} and {big}")
            t_small = fn(elf, small, port)
            t_n = fn(elf, big, port)
            per_exit[v].append((t_n - t_small) / (big - small) * 1e6)
            if VARIANTS[v][0] == "qemu":
                startup.append(t_small)
    result: dict[str, Any] = {"method": METHOD, "count": counts, "small": small, "rounds": rounds, "quick": quick,
              "ports": {v: VARIANTS[v][1] for v in variants},
              "per_exit_us": {v: summarize(x) for v, x in per_exit.items()},
              "rounds_us": {v: [round(x, 3) for x in xs] for v, xs in per_exit.items()},
              "ratios": {}, "targets": {}}
    from qkio import native
    result["qkio_exit_path"] = "/".join(sorted(paths))
    if "python" in paths:
        result["qkio_exit_path_why"] = native.unavailable_reason
    python_vs_c = [p / c for p, c in zip(per_exit["qkio-python"], per_exit["c"])]
    result["ratios"]["qkio-python/c"] = summarize(python_vs_c)
    for key, target in TARGETS.items():
        a, b = key.split("/")
        if a in per_exit and b in per_exit:
            ratios = [x / y for x, y in zip(per_exit[a], per_exit[b])]
            result["ratios"][key] = summarize(ratios)
            result["targets"][key] = {"target": target, "median": round(median(ratios), 3),
                                      "met": median(ratios) <= target}
    if startup:
        result["qemu_startup_s"] = summarize(startup)
    if not qemu:
        result["qemu"] = f"skipped: {'qemu-system-x86_64 not found' if not have_qemu() else 'not asked for'}"
    return result


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for v, d in result["per_exit_us"].items():
        port = result.get("ports", {}).get(v)
        rows.append((v, f"{d['p50']:.3g} µs per exit (min {d['min']:.3g}, max {d['max']:.3g}; "
                        f"{d['n']} rounds)" + (f"; port {port:#x}" if port is not None else "")))
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
