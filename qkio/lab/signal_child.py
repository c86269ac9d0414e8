"""A tiny io thread for signal experiments, run as a child process:
``python -m qkio.lab.signal_child [--echo SIG ...]``.

Signal experiments cannot run inside a notebook's kernel or pytest's own
process: those may have threads with their own masks and default handlers,
and a stray SIGTERM would end them.  This is a VMM without vCPUs: it blocks the VMM's signals
before any thread exists, sets up a MainLoop and a SignalSource, and then

* prints JSON lines on stdout (``ready``, ``signal`` for SIGTERM, ``got`` for
  each signal named with ``--echo`` (time it was handled, for latency), ``report``,
  ``busy``/``busy_done``, ``exit``);
* takes JSON commands on stdin, which is itself an fd in the main loop:
  ``{"cmd": "report"}``, ``{"cmd": "busy", "seconds": s}`` (hold the io thread
  and the global lock in a handler), ``{"cmd": "exit"}``.

SIGTERM has a handler that reports and stops the loop; every other signal is
only counted.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

from qkio import signals as sigmod
from qkio.main_loop import MainLoop
from qkio.threads import set_thread_name, thread_names
from qkio.trace import Tracer


def emit(**obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="signalfd")
    ap.add_argument("--backend", default="select")
    ap.add_argument("--rt", type=int, default=0, help="also take SIGRTMIN+8 .. +8+N-1")
    ap.add_argument("--force-signalfd-failure", action="store_true")
    ap.add_argument("--trace", default="")
    ap.add_argument("--echo", type=int, action="append", default=[],
                    help="emit a 'got' line (with CLOCK_MONOTONIC time) for each such signal")
    args = ap.parse_args()

    rt = tuple(signal.SIGRTMIN + 8 + i for i in range(args.rt))
    wanted = sigmod.VMM_SIGNALS + rt
    # First, before any thread: every thread created later inherits this mask.
    sigmod.block_vmm_signals(wanted)
    set_thread_name("qkio-io")

    tracer = Tracer(enabled=bool(args.trace))
    loop = MainLoop(backend=args.backend, tracer=tracer)
    src = sigmod.SignalSource(args.method, wanted,
                              force_signalfd_failure=args.force_signalfd_failure,
                              tracer=tracer)
    src.attach(loop)

    contexts = set()  # (thread that ran the handler, held the lock?)

    def count(info):
        contexts.add((threading.current_thread().name, loop.lock.held_by_me()))

    def on_term(info):
        count(info)
        emit(event="signal", signo=info.signo, path=info.path, sender=info.pid,
             thread=threading.current_thread().name, t=time.monotonic())
        loop.request_exit()

    def echo(info):
        t = time.monotonic()
        count(info)
        emit(event="got", signo=info.signo, path=info.path, t=t,
             cpu=time.process_time())

    for s in wanted:
        src.add_handler(s, echo if s in args.echo else count)
    src.add_handler(signal.SIGTERM, on_term)

    pending = b""

    def on_stdin(opaque):
        nonlocal pending
        data = os.read(0, 65536)
        if not data:
            loop.request_exit()
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            command(json.loads(line))

    def command(c):
        if c["cmd"] == "report":
            if src.path != "async":
                src.sigfd_handler()  # collect whatever is pending right now
            emit(event="report", path=src.path,
                 received={str(k): v for k, v in src.received.items()},
                 tasks=thread_names(), contexts=sorted(contexts),
                 blocked_in_io=sorted(sigmod.blocked_signals()))
        elif c["cmd"] == "busy":
            emit(event="busy")
            end = time.monotonic() + c["seconds"]
            while (left := end - time.monotonic()) > 0:
                time.sleep(left)  # async handlers may run in here
            emit(event="busy_done")
        elif c["cmd"] == "exit":
            loop.request_exit()

    loop.set_fd_handler(0, on_stdin, None)
    emit(event="ready", pid=os.getpid(), path=src.path, tasks=thread_names(),
         signalfd_error=str(src.signalfd_error) if src.signalfd_error else None)
    loop.run(timeout_ms=1000)
    src.close()
    loop.close()
    if args.trace:
        tracer.write(args.trace)
    emit(event="exit")


if __name__ == "__main__":
    main()
