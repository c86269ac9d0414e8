"""``qkio``: the command line, in the spirit of ``qemu-system-x86_64``.

``qkio run --kernel FILE [--append ARGS] [--initrd FILES] [--smp N]
[--memory MiB] [--timeout S] [--signals ...] [--notify ...] [--drive file=IMG]
[--virtio-notify vcpu|main|iothread] [--trace FILE]``

The order of the first steps of :func:`run_main` is the point of the whole
design, so it is spelled out there: signals are blocked before any thread
exists, because every thread created later inherits the mask of the thread
that created it (qemu-kvm 0.12 blocked them in ``kvm_main_loop``, after its
vCPU threads had already blocked everything for themselves).
"""

from __future__ import annotations

import argparse
import os
import sys
import termios

from .errors import QkioError

EPILOG = """\
exit status:
  (V << 1) | 1   the guest wrote V to isa-debug-exit (port 0xf4), as with QEMU
  0              the guest shut down, or SIGTERM/SIGINT ended the run
  1              bad command line, unusable /dev/kvm, or a file that is not a kernel
  2              the guest failed: triple fault, emulation failure, failed VM entry
  124            --timeout expired
  70             an internal error in qkio (a bug: please report it)
signals:
  SIGTERM, SIGINT  power the guest off and exit 0
  SIGHUP, SIGUSR2  print each vCPU's registers and exit counts, and the signals
                   taken so far, to stderr
  SIGRTMIN..SIGRTMAX  counted; they queue, so none is lost through signalfd or
                   the signal thread (Python's async handlers coalesce a burst)
"""


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it ($COLUMNS, stdout, 80)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _formatter(base=argparse.HelpFormatter):
    """``base``, told the width: left to itself argparse imports ``shutil`` (and
    with it ``bz2``, ``lzma``, ``zlib``) on every ``add_argument`` to ask the
    terminal -- start-up time every ``qkio run`` would pay (qkio bench startup)."""
    return lambda prog: base(prog, width=_columns() - 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkio", description="A small KVM VMM, threaded like qemu-kvm 0.12.",
                                     formatter_class=_formatter())
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a guest", epilog=EPILOG,
                         formatter_class=_formatter(argparse.RawDescriptionHelpFormatter))
    run.add_argument("--kernel", required=True, metavar="FILE",
                     help="a Multiboot (v1) ELF kernel, or the name of a qkio demo guest")
    run.add_argument("--append", default="", metavar="ARGS", help="kernel command line (after the kernel's path)")
    run.add_argument("--initrd", metavar="FILES", help="Multiboot modules, comma-separated, as QEMU's -initrd")
    run.add_argument("--smp", type=int, default=1, metavar="N", help="number of vCPUs (default 1)")
    run.add_argument("--memory", "-m", type=int, default=128, metavar="MiB", help="guest RAM (default 128)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="stop a guest still running after this long")
    run.add_argument("--signals", choices=("signalfd", "thread", "async"), default="signalfd",
                     help="how the io thread takes signals (default signalfd)")
    run.add_argument("--notify", choices=("eventfd", "pipe"), default="eventfd",
                     help="the event notifier behind qemu_notify_event (default eventfd)")
    run.add_argument("--backend", choices=("select", "poll", "epoll"), default="select",
                     help="the wait in main_loop_wait (default select)")
    run.add_argument("--kick", choices=("immediate_exit", "signal_mask"), default="immediate_exit",
                     help="how vCPUs are kicked out of KVM_RUN (default immediate_exit)")
    run.add_argument("--exit-path", choices=("native", "python"), default=None,
                     help="who completes port I/O exits: the C loop of qkio.native or the pure-Python "
                          "loop (default: native when it can be built, else python, with a note)")
    run.add_argument("--drive", action="append", default=[], metavar="file=IMG[,readonly=on][,serial=S]",
                     help="a raw disk image as a virtio-blk device on virtio-mmio, placed as QEMU's microvm "
                          "places them (first at 0xfeb00e00, IRQ 12); may be repeated")
    run.add_argument("--virtio-notify", default="vcpu", metavar="MODE",
                     help="who takes a virtio queue notify: vcpu (an MMIO exit in the vCPU thread), main "
                          "(KVM_IOEVENTFD, the io thread under the global lock) or iothread (KVM_IOEVENTFD "
                          "and KVM_IRQFD in an IOThread that never takes the lock); QEMU-like spellings "
                          "ioeventfd=off, ioeventfd=on, iothread=io0 mean the same (default vcpu)")
    run.add_argument("--virtio-aio", default="sync", metavar="MODE",
                     help="who does a virtio-blk request's I/O: sync (preadv/pwritev in the thread that took "
                          "the notify) or paio (qemu-kvm 0.12's posix-aio-compat workers, completing through "
                          "SIGUSR2 and the io thread; not with --virtio-notify iothread) (default sync)")
    run.add_argument("--pit", action="store_true",
                     help="also create KVM's in-kernel PIT, as qemu-kvm 0.12 did (off: no demo guest uses "
                          "it, and stopping its kernel thread makes every run end later)")
    run.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace-event JSON file")
    bench = sub.add_parser("bench", help="run the benchmarks", formatter_class=_formatter())
    bench.add_argument("names", nargs="*")
    bench.add_argument("--quick", action="store_true", help="fewer iterations (as the book uses)")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        status = run_main(args)
        if argv is None:  # this process's own command line: nothing left to do but exit
            _exit(status)
        return status
    from .bench import main as bench_main
    return bench_main(args)


def _exit(status: int) -> None:
    """Exit now, as QEMU does with ``exit()``: flush stdout and stderr, then ``_exit``.

    By the time ``run_main`` returns, the machine is closed: every vCPU and
    helper thread joined, every fd qkio opened closed, the trace written.
    What the interpreter's own shutdown would add is freeing every object
    one by one (about 6 ms of CPU on this book's host, measured with
    ``qkio bench startup``), work the kernel does at once when the process
    ends.  A flush that fails (stdout closed early) changes nothing: the
    status says how the guest ended."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _error(message: str) -> int:
    print(f"qkio: error: {message}", file=sys.stderr, flush=True)
    return 1


def _internal_error(exc: Exception) -> int:
    print(f"qkio: internal error: {type(exc).__name__}: {exc} (QKIO_DEBUG=1 shows where)",
          file=sys.stderr, flush=True)
    return 70  # EX_SOFTWARE


def run_main(args) -> int:
    # 1. Block the VMM's signals while this is the only thread: every thread
    #    created from here on (vCPUs, the signal thread) inherits the mask,
    #    so a process-directed SIGTERM can only be taken by the path chosen.
    from .signals import REALTIME_SIGNALS, VMM_SIGNALS, block_vmm_signals
    block_vmm_signals(VMM_SIGNALS + REALTIME_SIGNALS)
    # 2. This thread is the io thread; name it so ps -L shows it.
    from .threads import set_thread_name
    set_thread_name("qkio-io")

    from . import trace
    from .machine import Machine

    tracer = trace.Tracer(enabled=True) if args.trace else None
    kernel = args.kernel
    if not os.path.exists(kernel):
        from . import guests
        if kernel in guests.GUESTS:
            try:
                kernel = str(guests.build_guest(kernel))
            except QkioError as e:
                return _error(str(e))
        else:
            return _error(f"no such kernel file {kernel!r} (demo guests: {', '.join(guests.GUESTS)})")
    try:
        drives, virtio_notify, virtio_aio = [], "vcpu", "sync"
        if args.drive or args.virtio_notify != virtio_notify or args.virtio_aio != virtio_aio:
            # Only then: importing the virtio devices is start-up time a run without them
            # need not pay (qkio bench startup).
            from .virtio.blk import parse_drive_option
            from .virtio.board import parse_aio_mode, parse_notify_mode
            drives = [parse_drive_option(text) for text in args.drive]
            virtio_notify = parse_notify_mode(args.virtio_notify)
            virtio_aio = parse_aio_mode(args.virtio_aio)
        machine = Machine(memory_mib=args.memory, smp=args.smp, signals=args.signals,
                          notify=args.notify, backend=args.backend, kick=args.kick,
                          exit_path=args.exit_path, tracer=tracer, drives=drives,
                          virtio_notify=virtio_notify, virtio_aio=virtio_aio, pit=args.pit)
    except (QkioError, ValueError) as e:
        return _error(str(e))
    if args.exit_path is None and machine.cpus[0].exit_path == "python":
        from . import native
        print(f"qkio: note: using the Python exit loop ({native.unavailable_reason})", file=sys.stderr)
    tty = _Terminal(0)
    try:
        try:
            machine.load_multiboot(kernel, append=args.append, initrd=args.initrd)
        except QkioError as e:
            return _error(str(e))
        if _is_open(0):
            machine.attach_stdin(0)
        tty.enter()
        try:
            status = machine.run(timeout=args.timeout)
        except Exception as e:  # a bug in qkio: one line (the traceback with QKIO_DEBUG=1)
            if os.environ.get("QKIO_DEBUG"):
                raise
            return _internal_error(e)
        if machine.exit_message and not machine.exit_message.startswith("guest wrote to isa-debug-exit"):
            print(f"qkio: {machine.exit_message}", file=sys.stderr, flush=True)
        return status
    finally:
        tty.restore()
        machine.close()
        if tracer is not None:
            tracer.write(args.trace)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class _Terminal:
    """Raw-ish input for a guest on a terminal, as QEMU's ``-serial stdio``: keys go
    to the guest one at a time, unechoed; Ctrl-C still signals the VMM (ISIG kept)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.saved = None

    def enter(self) -> None:
        if not (_is_open(self.fd) and os.isatty(self.fd)):
            return
        self.saved = termios.tcgetattr(self.fd)
        mode = termios.tcgetattr(self.fd)
        mode[3] &= ~(termios.ICANON | termios.ECHO)  # lflags
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)

    def restore(self) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
            self.saved = None


if __name__ == "__main__":
    sys.exit(main())
