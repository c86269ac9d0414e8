"""``serial``: console throughput, guest -> 8250 UART -> the VMM's stdout pipe.

Method
------
The ``flood`` guest (from :mod:`qkio.guests`) sends N bytes (lines of 63
letters ``a``..``z`` repeating, then a newline) the way a polled console driver does: read LSR until THRE is
set, write THR -- two exits per byte.  The VMM's stdout is a pipe that this
process drains as fast as it can, stamping CLOCK_MONOTONIC on every read.
Throughput = (bytes - 1) / (time of the read that completed the output -
time of the read that brought the first byte), so VMM start-up and shutdown
are outside it.  The received bytes are checked: exactly N, in the expected
pattern.

Runs ``qkio run --kernel flood.elf --append count=N`` as a child process
(``python -m qkio``, the real command line: signals blocked, io thread,
vCPU thread writing each byte to fd 1 with the global lock held) and, when
QEMU is installed, ``qemu-system-x86_64 ... -serial stdio`` with the same
ELF, alternating, several rounds.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from typing import Any

from .build import build_guest
from .guest_run import QEMU, QEMU_ARGS, have_qemu
from .stats import summarize

NAME = "serial"
TITLE = "serial console throughput: guest polling LSR -> THR -> stdout pipe"
METHOD = ("flood guest writes N bytes polling LSR.THRE; VMM stdout is a pipe drained here; "
          "bytes/s = (N - 1) / (last read - first read); qkio (qkio run) and QEMU "
          "(-serial stdio) alternate per round")


def expected_output(n: int) -> bytes:
    """What qkio/guests/flood.s prints for count=N: lines of 63 letters, a..z
    over and over from each line's start, and a newline."""
    line = bytes(ord("a") + i % 26 for i in range(63)) + b"\n"
    return (line * (n // len(line) + 1))[:n]


def _drain(argv: list[str], n: int, timeout: float = 300.0) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t_start = time.monotonic()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True, env=env)
    assert child.stdout is not None and child.stderr is not None  # both PIPE
    fd = child.stdout.fileno()
    chunks, first, last, reads = [], None, None, 0
    got = 0
    try:
        while True:
            left = t_start + timeout - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{argv[0]}: no end of output after {timeout} s")
            if not select.select([fd], [], [], left)[0]:
                continue
            data = os.read(fd, 65536)
            now = time.monotonic()
            if not data:
                break
            reads += 1
            if first is None:
                first = now
            got += len(data)
            if got <= n:
                last = now
            chunks.append(data)
        status = child.wait(timeout=30)
        err = child.stderr.read().decode(errors="replace")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    out = b"".join(chunks)
    if status != 33 or out != expected_output(n):
        raise RuntimeError(f"{argv[0]}: status {status}, {len(out)} of {n} bytes"
                           f"{', wrong bytes' if len(out) == n else ''}; stderr: {err.strip()[-300:]}")
    seconds = (last - first) if first is not None and last is not None else 0.0
    return {"bytes": len(out), "seconds": seconds, "reads": reads,
            "bytes_per_s": (n - 1) / seconds if seconds > 0 else None,
            "wall_s": time.monotonic() - t_start}


def run(quick: bool = False, progress=None, n: int | None = None, rounds: int | None = None,
        qemu: bool | None = None) -> dict:
    n = n or (5_000 if quick else 50_000)
    rounds = rounds or (1 if quick else 3)
    qemu = have_qemu() if qemu is None else qemu
    elf = os.fspath(build_guest("flood"))
    commands = {"qkio": [sys.executable, "-m", "qkio", "run", "--kernel", elf,
                         "--append", f"count={n}"]}
    if qemu:
        commands["qemu"] = [QEMU, *QEMU_ARGS, "-serial", "stdio", "-kernel", elf,
                            "-append", f"count={n}"]
    samples: dict[str, Any] = {k: [] for k in commands}
    reads: dict[str, Any] = {k: [] for k in commands}
    for r in range(rounds):
        for name, argv in commands.items():
            if progress:
                progress(f"round {r + 1}/{rounds}: {name}, {n} bytes")
            out = _drain(argv, n)
            samples[name].append(out["bytes_per_s"])
            reads[name].append(out["reads"])
    # A round whose bytes all came in one read has no first-to-last interval,
    # so no rate (a reader kept off the CPU for the whole run, on a busy host):
    # it is counted, not averaged in.
    rates = {k: [x for x in v if x is not None] for k, v in samples.items()}
    result = {"method": METHOD, "bytes": n, "rounds": rounds,
              "bytes_per_s": {k: summarize(v, digits=0) for k, v in rates.items()},
              "us_per_byte": {k: summarize([1e6 / x for x in v]) for k, v in rates.items()},
              "unmeasured_rounds": {k: len(samples[k]) - len(v) for k, v in rates.items()},
              "pipe_reads": reads}
    if not qemu:
        result["qemu"] = "skipped: qemu-system-x86_64 not found" if not have_qemu() else "skipped"
    return result


def table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for name, d in result["bytes_per_s"].items():
        if not d["n"]:
            rows.append((name, "no rate: every round's bytes came in one read"))
            continue
        us = result["us_per_byte"][name]
        rows.append((name, f"{d['p50'] / 1000:.1f} kB/s = {us['p50']:.3g} µs/byte "
                           f"(min {d['min'] / 1000:.1f}, max {d['max'] / 1000:.1f} kB/s; "
                           f"{d['n']} rounds of {result['bytes']} bytes)"))
    if "qemu" in result:
        rows.append(("qemu", result["qemu"]))
    return rows
