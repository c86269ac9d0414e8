"""``startup``: the whole run of a trivial kernel -- qkio vs QEMU microvm vs ``python -c pass``.

Method
------
The guest is qkio's ``hello`` (:mod:`qkio.guests`): it prints one line on
COM1 and writes 0x10 to isa-debug-exit, so the VMM exits with status 33.
Three commands are timed from ``fork`` to ``wait`` as whole processes, stdin
from /dev/null, stdout and stderr into pipes:

* **qkio**: ``qkio run --kernel hello.elf`` (the installed console script,
  else ``python -m qkio``), everything a user's run does: the interpreter,
  the imports, the VM, loading, the run, the shutdown;
* **qemu**: ``qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host
  -nodefaults -display none -serial stdio -device isa-debug-exit,...
  -kernel hello.elf``.  ``microvm`` boots a Multiboot kernel directly, with
  no SeaBIOS and no PCI, which makes it QEMU's fastest start;
* **python**: ``python -c pass`` with the same interpreter qkio runs on: the
  floor that no Python program can go under;
* **c**: ``pio_ref.c`` running the same ELF in a VM of qkio's shape
  (irqchip, 128 MiB, no PIT), answering the UART's status reads with all
  ones: the whole run of a VMM with nothing in it but KVM's work -- making,
  running and destroying the VM, which no VMM can avoid;
* **qkio --pit**: qkio with KVM's in-kernel PIT as well, as qemu-kvm 0.12
  had it: what that device costs a run (its kernel thread is started when
  the PIT is made and stopped when the VM is destroyed).

Each round runs the three once each, in an order that rotates from round to
round, so that a change in the machine's load hits all three alike; the
ratio qkio/qemu and the difference qkio - python (qkio's own part: all that
is not the interpreter starting and stopping) are taken within each round,
and their medians reported with their spread.  Every run's exit status
(33) and output (the guest's line) are checked.  CPU time (user + system,
from ``wait4``) is reported next to the wall time.

Targets (issue "As fast as QEMU"): qkio <= 1.0 x QEMU microvm, or, where
floors outside qkio's control stop that -- the interpreter's start and stop
(python), KVM's work (c) -- qkio's own part, qkio - python - c within each
round, <= 15 ms.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from .build import build_c
from .guest_run import QEMU, QEMU_ARGS, have_qemu
from .stats import fmt_dist, median, summarize

NAME = "startup"
TITLE = "whole run of a trivial kernel: qkio run vs QEMU microvm vs python -c pass"
METHOD = ("hello guest (prints a line, exits 33); each process timed fork -> wait; "
          "qkio / qemu microvm / python -c pass once per round, order rotated; "
          "ratios and differences per round")
GREETING = b"Hello from qkio's guest"
TARGETS = {"qkio/qemu": 1.0, "qkio own part (ms)": 15.0}


def qkio_command() -> list[str]:
    """How a user starts qkio: the console script beside this interpreter, else ``-m qkio``."""
    script = os.path.join(os.path.dirname(sys.executable), "qkio")
    if os.access(script, os.X_OK):
        return [script]
    found = shutil.which("qkio")
    return [found] if found else [sys.executable, "-m", "qkio"]


def commands(elf: str) -> dict[str, list[str]]:
    return {
        "qkio": [*qkio_command(), "run", "--kernel", elf],
        "qkio --pit": [*qkio_command(), "run", "--pit", "--kernel", elf],
        "qemu": [QEMU, *QEMU_ARGS, "-serial", "stdio", "-kernel", elf],
        "python": [sys.executable, "-c", "pass"],
        "c": [str(build_c("pio_ref")), elf, "0", "--no-pit", "--ram-mib=128"],
    }


def time_process(argv: list[str], expect_status: int | None = None,
                 expect_output: bytes | None = None) -> dict:
    """Run ``argv`` once: ``{"wall_s", "cpu_s"}``; raise if status or output is not as expected."""
    # Output into files rather than pipes: nothing to drain while it runs, and
    # wait4() (for the child's CPU time) then reaps it, not Popen.
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        t0 = time.perf_counter()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    child.returncode = os.waitstatus_to_exitcode(status)
    if expect_status is not None and child.returncode != expect_status:
        raise RuntimeError(f"{os.path.basename(argv[0])} exited {child.returncode}, "
                           f"expected {expect_status}: {err.decode(errors='replace').strip()[-300:]}")
    if expect_output is not None and expect_output not in out:
        raise RuntimeError(f"{os.path.basename(argv[0])} did not print {expect_output!r}: {out[-200:]!r}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def ensure_bytecode() -> str:
    """Compile qkio's modules to bytecode where it is missing or stale; say what was done.

    ``pip install`` compiles a package's modules when it installs them, so a
    user's ``qkio run`` loads bytecode.  An editable install compiles each
    module on first import and caches the result only if it may write it
    (not under ``PYTHONDONTWRITEBYTECODE``, which this book's build sets):
    otherwise every run compiles every module again, which is not what is
    being measured here."""
    import compileall

    import qkio
    try:
        ok = compileall.compile_dir(os.path.dirname(qkio.__file__), quiet=2)
    except OSError as e:
        return f"could not compile: {e}"
    return "up to date" if ok else "some modules could not be compiled"


def run(quick: bool = False, progress=None, rounds: int | None = None,
        qemu: bool | None = None) -> dict:
    from qkio.guests import build_guest
    bytecode = ensure_bytecode()
    rounds = rounds or (8 if quick else 30)
    qemu = have_qemu() if qemu is None else qemu
    elf = str(build_guest("hello"))
    cmds = commands(elf)
    if not qemu:
        del cmds["qemu"]
    checks = {"qkio": (33, GREETING), "qkio --pit": (33, GREETING), "qemu": (33, GREETING),
              "c": (0, b'"exits"'),
              "python": (0, None)}
    names = list(cmds)
    # One untimed run each: the page cache, the guest build, gcc-built helpers.
    for name in names:
        time_process(cmds[name], *checks[name])
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if progress:
            progress(f"round {r + 1}/{rounds}: {', '.join(order)}")
        for name in order:
            t = time_process(cmds[name], *checks[name])
            wall[name].append(t["wall_s"])
            cpu[name].append(t["cpu_s"])
    result: dict[str, Any] = {"method": METHOD, "rounds": rounds, "quick": quick, "qkio_bytecode": bytecode,
              "commands": {n: " ".join(c) for n, c in cmds.items()},
              "wall_ms": {n: summarize([x * 1e3 for x in v]) for n, v in wall.items()},
              "cpu_ms": {n: summarize([x * 1e3 for x in v]) for n, v in cpu.items()},
              "ratios": {}, "targets": {}}
    own = [(q - p) * 1e3 for q, p in zip(wall["qkio"], wall["python"])]
    result["qkio_own_ms"] = summarize(own)
    result["pit_cost_ms"] = summarize([(p - q) * 1e3 for p, q in zip(wall["qkio --pit"], wall["qkio"])])
    # The floors outside qkio's control: the interpreter starting and stopping
    # (python -c pass) and KVM making, running and destroying the same VM
    # (the C reference's whole run).  What is left is qkio's own part.
    beyond = [(q - p - c) * 1e3 for q, p, c in zip(wall["qkio"], wall["python"], wall["c"])]
    result["qkio_own_beyond_floors_ms"] = summarize(beyond)
    # The same in CPU time (user + system), which the host's load disturbs far
    # less than the wall clock: what qkio's process itself spends.
    result["qkio_own_beyond_floors_cpu_ms"] = summarize(
        [(q - p - c) * 1e3 for q, p, c in zip(cpu["qkio"], cpu["python"], cpu["c"])])
    key = "qkio own part (ms)"
    result["targets"][key] = {"target": TARGETS[key], "median": round(median(beyond), 2),
                              "met": median(beyond) <= TARGETS[key]}
    if qemu:
        ratios = [q / e for q, e in zip(wall["qkio"], wall["qemu"])]
        result["ratios"]["qkio/qemu"] = summarize(ratios)
        result["ratios"]["python/qemu"] = summarize([p / e for p, e in zip(wall["python"], wall["qemu"])])
        result["targets"]["qkio/qemu"] = {"target": TARGETS["qkio/qemu"],
                                          "median": round(median(ratios), 3),
                                          "met": median(ratios) <= TARGETS["qkio/qemu"]}
    else:
        result["qemu"] = "skipped: qemu-system-x86_64 not found" if not have_qemu() else "skipped"
    return result


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for name, d in result["wall_ms"].items():
        rows.append((name, f"{fmt_dist(d, 'ms')}; CPU p50 {result['cpu_ms'][name]['p50']:.3g} ms"))
    d = result["qkio_own_ms"]
    rows.append(("qkio - python", f"{fmt_dist(d, 'ms')}: what qkio adds to the interpreter"))
    d = result["qkio_own_beyond_floors_ms"]
    rows.append(("qkio - python - c", f"{fmt_dist(d, 'ms')}: qkio's own part, beyond the "
                                      "interpreter's and KVM's"))
    d = result["qkio_own_beyond_floors_cpu_ms"]
    rows.append(("  in CPU time", f"{fmt_dist(d, 'ms')}"))
    d = result["pit_cost_ms"]
    rows.append(("--pit - qkio", f"{fmt_dist(d, 'ms')}: what KVM's in-kernel PIT adds"))
    for key, t in result["targets"].items():
        d = result["ratios"].get(key)
        spread = f" (min {d['min']:.3g}, max {d['max']:.3g})" if d else ""
        rows.append((key, f"{t['median']:.3g}{spread}; target <= {t['target']:g}: "
                          f"{'met' if t['met'] else 'MISSED'}"))
    if "python/qemu" in result["ratios"]:
        rows.append(("python/qemu", f"{result['ratios']['python/qemu']['p50']:.3g}: "
                                    "the interpreter alone, against QEMU's whole run"))
    if "qemu" in result:
        rows.append(("qemu", result["qemu"]))
    return rows
