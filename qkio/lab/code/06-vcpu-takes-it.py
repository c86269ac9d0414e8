"""A qkio machine in which the kernel, not the VMM, picks the thread for a signal.

Chapter 6 of the qkio book runs this as a child process:

    python 06-vcpu-takes-it.py KERNEL TRACE_FILE

It builds a two-vCPU machine running KERNEL, gives SIGUSR2 a Python handler,
and starts the vCPU threads while no signal is blocked, so they inherit an
empty mask.  Only then does the io thread (the main thread) block SIGUSR2,
which changes its own mask and nobody else's.  A SIGUSR2 sent to the process
can therefore only be taken by a vCPU thread, in the middle of KVM_RUN.

What it prints on stdout, one JSON object a line:

  ready           the thread ids by name
  python handler  the thread the Python-level handler ran in, and when
                  (CLOCK_MONOTONIC, comparable with the parent's clock)
  report          per vCPU: KVM_RUN calls that ended in EINTR, kicks qkio
                  itself sent (answers a line "report" on stdin)

Closing stdin ends the run; the trace (qkio.trace events) goes to TRACE_FILE.
"""

import json
import os
import signal
import sys
import threading
import time

from qkio import guests
from qkio.kvm.constants import ExitReason
from qkio.machine import STATUS_POWEROFF, Machine
from qkio.threads import set_thread_name, thread_names
from qkio.trace import Tracer


def emit(**obj):
    os.write(1, (json.dumps(obj) + "\n").encode())  # one write: one whole line


def main():
    kernel, trace_file = sys.argv[1], sys.argv[2]
    if not os.path.exists(kernel):  # a demo guest's name, as `qkio run --kernel` takes it
        kernel = str(guests.build_guest(kernel))
    set_thread_name("qkio-io")
    tracer = Tracer(enabled=True)

    def on_sigusr2(signo, frame):
        # CPython calls this in the main thread, whichever thread the kernel
        # interrupted: its C-level handler only noted that SIGUSR2 arrived.
        now = time.monotonic()
        tracer.instant("signal received", signo=signo, path="python handler")
        emit(event="python handler", thread=threading.current_thread().name, t=now)

    signal.signal(signal.SIGUSR2, on_sigusr2)

    machine = Machine(memory_mib=16, smp=2, signals=None, tracer=tracer,
                      console=lambda data: None)
    try:
        machine.load_multiboot(kernel)
        machine.start()  # the vCPU threads copy this thread's mask: nothing blocked
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})  # this thread only

        def on_stdin(_):
            data = os.read(0, 4096)
            if not data:
                machine.request_exit(STATUS_POWEROFF, "stdin closed")
            for line in data.split():
                if line == b"report":
                    emit(event="report", cpus={
                        cpu.name: {"EINTR": cpu.exit_counts[ExitReason.INTR],
                                   "kicks sent": cpu.kicks_sent}
                        for cpu in machine.cpus})

        machine.loop.set_fd_handler(0, on_stdin, None)
        emit(event="ready", pid=os.getpid(),
             threads={name: tid for tid, name in thread_names().items()})
        machine.run()
    finally:
        machine.close()
        tracer.write(trace_file)


if __name__ == "__main__":
    main()
