"""How fast this host's KVM runs guest instructions, measured, not assumed.

Method
------
The ``count-loop`` demo guest (``qkio/guests/count-loop.s``) runs ``count=N``
iterations of two instructions, ``dec %ecx; jnz``, that touch no memory and
no port, then writes isa-debug-exit.  It is run by ``pio_ref`` (the C VMM of
the port-I/O benchmark), whose clock covers only its ``KVM_RUN`` loop, once
with N and once with N = 0; the difference, divided into 2N instructions, is
the guest's instruction rate, with start-up and the one exit cancelled out.
``pio_ref``'s exit count must be 1 (the isa-debug-exit write): the loop made
no exit, so the time is guest execution and whatever the host's KVM does to
run it.  The same loop then runs on the host (``host_loop.c``), timed the
same differential way, and the ratio of the two rates is reported per round.

A rate says nothing by itself about *how* the host's KVM runs guest code;
it is what a reader can compare with a processor's instructions per second.
"""

from __future__ import annotations

import json
import subprocess

from qkio.guests import build_guest

from .build import build_c
from .guest_run import RunFailed, run_c
from .stats import summarize

INSTRUCTIONS_PER_ITERATION = 2   # dec, jnz


def _host_seconds(count: int) -> float:
    r = subprocess.run([str(build_c("host_loop")), str(count)], capture_output=True, text=True,
                       timeout=600)
    if r.returncode:
        raise RunFailed(f"host_loop failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout)["seconds"]


def run(n: int = 200_000, host_n: int = 200_000_000, rounds: int = 3) -> dict:
    """``rounds`` rounds of: guest with N and 0 iterations, host with ``host_n`` and 0.

    Returns ``{"guest_ips": summary, "host_ips": summary, "host_over_guest":
    summary, "rounds": {...per-round lists...}, "exits": [...]}``; the rates
    are instructions per second.
    """
    elf = build_guest("count-loop")
    guest, host, ratio, exits = [], [], [], []
    for _ in range(rounds):
        t_n, info_n = run_c(elf, n)
        t_0, info_0 = run_c(elf, 0)
        exits += [info_n["exits"], info_0["exits"]]
        g = INSTRUCTIONS_PER_ITERATION * n / (t_n - t_0)
        h = INSTRUCTIONS_PER_ITERATION * host_n / (_host_seconds(host_n) - _host_seconds(0))
        guest.append(g)
        host.append(h)
        ratio.append(h / g)
    return {"n": n, "host_n": host_n, "rounds": rounds, "exits": exits,
            "guest_ips": summarize(guest), "host_ips": summarize(host),
            "host_over_guest": summarize(ratio),
            "per_round": {"guest_ips": guest, "host_ips": host, "host_over_guest": ratio}}
