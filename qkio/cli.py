"""``qkio``: the command line, in the spirit of ``qemu-system-x86_64``.

``qkio run --kernel FILE [--append ARGS] [--initrd FILES] [--smp N]
[--memory MiB] [--timeout S] [--signals ...] [--clock ...] [--notify ...] [--drive file=IMG]
[--virtio-notify vcpu|main|iothread] [--trace FILE]``

The order of the first steps of ``run_main`` (its comments) is the point of the whole
design, so it is spelled out there: signals are blocked before any thread
exists, because every thread created later inherits the mask of the thread
that created it (qemu-kvm 0.12 blocked them in ``kvm_main_loop``, after its
vCPU threads had already blocked everything for themselves).
"""

from __future__ import annotations

# Only modules the interpreter has already loaded at start-up are imported
# here: ``main`` must block the VMM's signals before any import that takes
# time (see ``_block_run_signals``), and everything else is imported after.
import os
import sys

EPILOG = """\
exit status:
  (V << 1) | 1   the guest wrote V to isa-debug-exit (port 0xf4), as with QEMU
  0              the guest shut down, or SIGTERM/SIGINT/SIGQUIT ended the run
                 (also when the signal came before the guest started)
  1              bad command line or option value, unusable /dev/kvm, a file
                 that is not a kernel, or a --trace file that cannot be written
  2              the guest failed: triple fault, emulation failure, failed VM entry
  124            --timeout expired
  70             an internal error in qkio (a bug: please report it)
signals (all taken by the io thread through the --signals path):
  SIGTERM, SIGINT, SIGQUIT  power the guest off and exit 0 (the terminal is
                   restored); blocked from the first thing qkio does, so one
                   sent during start-up ends the run the same way.  A signal
                   sent while the Python interpreter itself is still starting,
                   before qkio's first line runs (tens of ms; more on a busy
                   host), has its default effect: SIGTERM kills the process,
                   SIGINT is Python's KeyboardInterrupt.
  SIGHUP           print each vCPU's registers and exit counts, and the signals
                   taken so far, to stderr
  SIGALRM, SIGIO   with --clock alarm, the alarm clock (host_alarm_handler);
                   otherwise counted
  SIGUSR2          the AIO pool's completion signal (a second signal fd, as
                   posix-aio-compat in qemu-kvm 0.12); from outside, harmless
  SIGBUS           qemu-kvm 0.12's sigbus_handler: a memory error that is
                   action-optional is ignored, action-required ends the run
                   (status 2), any other SIGBUS is re-raised and kills qkio
  SIGRTMIN..SIGRTMAX  counted; they queue, so none is lost through signalfd or
                   the signal thread (Python's async handlers coalesce a burst)
console:
  Guest output goes to stdout through the io thread and never blocks the VMM:
  while stdout is not being read, the UART reports a busy transmitter and the
  guest waits.  At the end at most half a second is spent writing what is
  left; bytes a reader never took are counted in the closing line.  If stdout
  fails (reader gone, disk full), the rest of the output is dropped and the
  run goes on.  A closed stdin is no input; a closed stdout is no output.
"""

#: Limits of the run options (checked by the parser, named in its messages).
SMP_RANGE = (1, 64)
MEMORY_RANGE = (2, 3072)        # MiB: a Multiboot kernel loads at 1 MiB
TIMEOUT_MAX = 1_000_000.0       # seconds (11.6 days): beyond that, omit --timeout


def _block_run_signals() -> None:
    """Block the signals ``qkio run`` takes through its signal path, now.

    The first thing ``main`` does for ``run``, before any import that can be
    avoided: until the signal path exists, a blocked signal just stays
    pending, and the path takes it as soon as it is built -- so SIGTERM in the
    first milliseconds ends the run exactly as it would later, instead of
    killing the process (SIGTERM's default) or raising KeyboardInterrupt
    somewhere in an import (SIGINT's, under Python).  ``_signal`` is the
    interpreter's built-in module, already loaded; ``signal`` would import
    ``enum`` first.  The set is a superset of ``qkio.signals.VMM_SIGNALS``
    and the real-time signals (a test checks it).
    """
    import _signal as s
    s.pthread_sigmask(s.SIG_BLOCK, _early_signals())


def _early_signals() -> set[int]:
    import _signal as s
    return {s.SIGTERM, s.SIGINT, s.SIGQUIT, s.SIGHUP, s.SIGUSR2, s.SIGALRM, s.SIGIO, s.SIGBUS,
            *range(s.SIGRTMIN, s.SIGRTMAX + 1)}


def main(argv: list[str] | None = None) -> int:
    """The ``qkio`` command: ``qkio run ...`` or ``qkio bench ...``.

    :param argv: the arguments after the program's name (default: ``sys.argv[1:]``).
    :returns: the exit status (``qkio run --help`` lists them).  For this
        process's own command line (``argv`` None), ``qkio run`` exits with
        it instead, as QEMU does.
    """
    own_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["run"]:
        return bench_main_checked(build_parser().parse_args(argv))
    _block_run_signals()
    if own_command_line:
        _pause_gc()
    try:
        closed = _cover_closed_stdio()
        args = _parse_run_plainly(argv[1:]) or build_parser().parse_args(argv)
        status = run_main(args, closed=closed)
    except KeyboardInterrupt:
        # SIGINT taken by Python's own handler before the block above: the
        # run ends as a SIGINT would end it later.
        print("qkio: terminating on signal 2 before the guest started", file=sys.stderr, flush=True)
        status = 0
    finally:
        _resume_gc()
    if own_command_line:  # this process's own command line: nothing left to do but exit
        _exit(status)
    return status


_gc_paused = False


def _pause_gc() -> None:
    """No cyclic garbage collection while the VMM starts (resumed by :func:`_resume_gc`).

    Start-up -- the imports, the parser, the machine -- makes some ten
    thousand objects that all live as long as the run and no garbage cycles,
    so each collection the allocations would trigger (seven young ones and a
    middle one in a plain run, 1.8 ms of this book's host, timed with
    ``gc.callbacks``) searches them for garbage that is not there.  Only for
    qkio's own process: a program calling :func:`main` keeps its collector
    as it is."""
    global _gc_paused
    import gc  # built into the interpreter
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def _resume_gc() -> None:
    """Collect again, from now on, what the run makes: what start-up made is
    moved out of the collector's way first (``gc.freeze``), since it lives as
    long as the process."""
    global _gc_paused
    if _gc_paused:
        import gc
        gc.freeze()
        gc.enable()
        _gc_paused = False


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
            if stream is not None:  # None: the fd was closed when Python started
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _cover_closed_stdio() -> frozenset[int]:
    """Open /dev/null onto whichever of fds 0, 1, 2 is closed; return which were.

    A process started with ``<&-`` or ``>&-`` has a free slot at 0 or 1, and
    the next ``open`` -- of /dev/kvm, say -- would land there: the UART would
    then read stdin from /dev/kvm, and guest output would be written into it.
    Covering the slots first means no fd of qkio's can ever be 0, 1 or 2;
    the run treats a closed stdin as no input and a closed stdout as no output.
    """
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:  # a lower slot was free too and got it; can only be one of ours
            os.dup2(null, fd)
            os.close(null)
    if 2 in closed and sys.stderr is None:
        # Python found fd 2 closed and set sys.stderr to None, and print(file=None)
        # writes to *stdout*: qkio's messages must not land in the guest's output.
        sys.stderr = open(2, "w", closefd=False)
    return frozenset(closed)


class _OneLineParser:
    """Mixin: a command-line error is one line and status 1 (not argparse's usage + 2)."""

    def error(self, message):  # noqa: D401 - argparse's name
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_range(name: str, lo: int, hi: int, unit: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise _argparse().ArgumentTypeError(f"must be an integer from {lo} to {hi}{unit}, not {text!r}")
        return value
    return parse


def _seconds(text: str) -> float:
    """--timeout: a finite number of seconds, more than 0 and at most TIMEOUT_MAX."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= TIMEOUT_MAX:  # NaN fails both comparisons
        raise _argparse().ArgumentTypeError(
            f"must be a number of seconds more than 0 and at most {TIMEOUT_MAX:g}, not {text!r}")
    return value


def _option(*flags: str, **settings) -> tuple[tuple[str, ...], dict]:
    """One ``qkio run`` option: its flags and ``add_argument``'s keywords, kept
    as data so that argparse (``build_parser``) and ``_parse_run_plainly`` read
    the one table."""
    return flags, settings


# qkio run's options, in --help's order (one table: build_parser and _parse_run_plainly read it).
RUN_OPTIONS = (
    _option("--kernel", required=True, metavar="FILE",
            help="a Multiboot (v1) ELF kernel, or the name of a qkio demo guest"),
    _option("--append", default="", metavar="ARGS", help="kernel command line (after the kernel's path)"),
    _option("--initrd", metavar="FILES", help="Multiboot modules, comma-separated, as QEMU's -initrd"),
    _option("--smp", type=_int_range("--smp", *SMP_RANGE), default=1, metavar="N",
            help=f"number of vCPUs, {SMP_RANGE[0]} to {SMP_RANGE[1]} (default 1)"),
    _option("--memory", "-m", type=_int_range("--memory", *MEMORY_RANGE, " MiB"), default=128,
            metavar="MiB", help=f"guest RAM, {MEMORY_RANGE[0]} to {MEMORY_RANGE[1]} MiB (default 128)"),
    _option("--timeout", type=_seconds, metavar="SECONDS",
            help=f"stop a guest still running after this long (0 < SECONDS <= {TIMEOUT_MAX:g})"),
    _option("--signals", choices=("signalfd", "thread", "async"), default="signalfd",
            help="how the io thread takes signals (default signalfd)"),
    _option("--notify", choices=("eventfd", "pipe"), default="eventfd",
            help="the event notifier behind qemu_notify_event (default eventfd)"),
    _option("--backend", choices=("select", "poll", "epoll"), default="select",
            help="the wait in main_loop_wait (default select)"),
    _option("--kick", choices=("immediate_exit", "signal_mask"), default="immediate_exit",
            help="how vCPUs are kicked out of KVM_RUN (default immediate_exit)"),
    _option("--clock", choices=("deadline", "alarm"), default="deadline",
            help="what wakes the io thread for a timer: deadline = the next timer's deadline "
                 "is the wait's timeout (modern QEMU; default); alarm = a POSIX timer's "
                 "SIGALRM through the --signals path (qemu-kvm 0.12's dynticks)"),
    _option("--exit-path", choices=("native", "python"), default=None,
            help="who completes port I/O exits: the C loop of qkio.native or the pure-Python "
                 "loop (default: native when it was built at install, else python, with a note)"),
    _option("--drive", action="append", default=[], metavar="file=IMG[,readonly=on][,serial=S]",
            help="a raw disk image as a virtio-blk device on virtio-mmio, placed as QEMU's microvm "
                 "places them (first at 0xfeb00e00, IRQ 12); may be repeated"),
    _option("--virtio-notify", default="vcpu", metavar="MODE",
            help="who takes a virtio queue notify: vcpu (an MMIO exit in the vCPU thread), main "
                 "(KVM_IOEVENTFD, the io thread under the global lock) or iothread (KVM_IOEVENTFD "
                 "and KVM_IRQFD in an IOThread that never takes the lock); QEMU-like spellings "
                 "ioeventfd=off, ioeventfd=on, iothread=io0 mean the same (default vcpu)"),
    _option("--virtio-aio", default="sync", metavar="MODE",
            help="who does a virtio-blk request's I/O: sync (preadv/pwritev in the thread that took "
                 "the notify) or paio (qemu-kvm 0.12's posix-aio-compat workers, completing through "
                 "SIGUSR2 and the io thread; not with --virtio-notify iothread) (default sync)"),
    _option("--pit", action="store_true",
            help="also create KVM's in-kernel PIT, as qemu-kvm 0.12 did (off: no demo guest uses "
                 "it, and stopping its kernel thread makes every run end later)"),
    _option("--trace", metavar="FILE", help="write a Chrome/Perfetto trace-event JSON file "
            "(a regular file; checked before the guest starts)"),
)


def _parse_run_plainly(argv: list[str]):
    """``qkio run``'s options (``argv`` after ``run``) read without argparse, or
    None: then argparse reads them, and gives its verdict and its message.

    Why: importing argparse (and the gettext and locale it brings) and building
    the parser was the largest single piece of what qkio adds to a run's
    start-up (``qkio bench startup``), and a well-formed command line does not
    need it.  Only what argparse would read the same way is taken here: each
    option spelled in full (``--name value``, ``--name=value``, ``-m value``),
    no value that starts with a dash or is empty, every value through the
    option's own ``type`` and ``choices``, ``--kernel`` present.  Anything
    else -- ``--help``, an abbreviation, a mistake -- is argparse's, so no
    message changes.  A test checks the result against argparse's.
    """
    import types  # the interpreter has loaded it already
    by_flag = {flag: (flags, settings) for flags, settings in RUN_OPTIONS for flag in flags}
    values: dict = {}  # option -> value, of each option's own type
    for flags, settings in RUN_OPTIONS:
        default = settings.get("default", False if settings.get("action") == "store_true" else None)
        values[_dest(flags)] = list(default) if isinstance(default, list) else default
    given = set()
    i = 0
    while i < len(argv):
        name, equals, value = argv[i].partition("=") if argv[i].startswith("--") else (argv[i], "", "")
        i += 1
        if name not in by_flag:
            return None
        flags, settings = by_flag[name]
        dest, action = _dest(flags), settings.get("action")
        given.add(dest)
        if action == "store_true":
            if equals:
                return None
            values[dest] = True
            continue
        if not equals:
            if i == len(argv):
                return None
            value = argv[i]
            i += 1
        if not value or value.startswith("-"):
            return None
        if "type" in settings:
            try:
                value = settings["type"](value)
            except Exception:  # argparse's own message, from argparse
                return None
        if value not in settings.get("choices", (value,)):
            return None
        if action == "append":
            values[dest].append(value)
        else:
            values[dest] = value
    if any(settings.get("required") and _dest(flags) not in given for flags, settings in RUN_OPTIONS):
        return None
    return types.SimpleNamespace(command="run", **values)


def _dest(flags: tuple[str, ...]) -> str:
    """The attribute an option is stored in, named as argparse names it (first long flag)."""
    long = next(flag for flag in flags if flag.startswith("--"))
    return long[2:].replace("-", "_")


def _argparse():
    import argparse  # here, not at the top: main() blocks signals first
    return argparse


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it ($COLUMNS, stdout, 80)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(1).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _formatter(base=None):
    """``base``, told the width: left to itself argparse imports ``shutil`` (and
    with it ``bz2``, ``lzma``, ``zlib``) on every ``add_argument`` to ask the
    terminal -- start-up time every ``qkio run`` would pay (qkio bench startup)."""
    base = base or _argparse().HelpFormatter
    return lambda prog: base(prog, width=_columns() - 2)


def _demo_guests() -> dict:
    from .guests import GUESTS
    return GUESTS


def _benchmarks() -> dict:
    """Each benchmark's name and the first line of its module's docstring."""
    import importlib

    from .bench import BENCHMARKS
    out = {}
    for name, module in BENCHMARKS.items():
        doc = (importlib.import_module(f"qkio.bench.{module}").__doc__ or "").strip()
        line = doc.splitlines()[0] if doc else ""
        # Docstrings open with ``name``: ...; the name is already in the first column.
        out[name] = line.split(": ", 1)[1] if line.startswith("``") and ": " in line else line
    return out


def _list_in_help(parser, title: str, items) -> None:
    """Put a "title: name  what" list after the parser's help, computed when help is asked for.

    Computed then, not when the parser is built, so that ``qkio run`` does not
    import every benchmark on its way to starting a guest.
    """
    plain = parser.format_help

    def format_help() -> str:
        listed = items()
        width = max(map(len, listed), default=0) + 2
        lines = [f"{title}:"] + [f"  {name:<{width}}{what}" for name, what in listed.items()]
        return plain().rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"

    parser.format_help = format_help


def build_parser():
    argparse = _argparse()

    class Parser(_OneLineParser, argparse.ArgumentParser):
        pass

    parser = Parser(prog="qkio", description="A small KVM VMM, threaded like qemu-kvm 0.12.",
                    formatter_class=_formatter())
    from . import __version__
    parser.add_argument("--version", action="version", version=f"qkio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="run a guest", epilog=EPILOG,
                         formatter_class=_formatter(argparse.RawDescriptionHelpFormatter))
    for flags, settings in RUN_OPTIONS:
        run.add_argument(*flags, **settings)
    _list_in_help(run, "demo guests (--kernel NAME; built from source on first use)", _demo_guests)
    bench = sub.add_parser("bench", help="run the benchmarks",
                           formatter_class=_formatter(argparse.RawDescriptionHelpFormatter))
    _list_in_help(bench, "benchmarks (all of them when no name is given)", _benchmarks)
    bench.add_argument("names", nargs="*", metavar="name", help="benchmarks to run (listed below)")
    bench.add_argument("--quick", action="store_true", help="fewer iterations (as the book uses)")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON (checked before benchmarking)")
    return parser


def bench_main_checked(args) -> int:
    if args.json:
        try:
            os.close(open_output_file(args.json, "--json"))
        except OutputFileError as e:
            return _error(str(e))
    from .bench import main as bench_main
    return bench_main(args)


def _error(message: str) -> int:
    print(f"qkio: error: {message}", file=sys.stderr, flush=True)
    return 1


def _internal_error(exc: BaseException) -> int:
    print(f"qkio: internal error: {type(exc).__name__}: {exc} (QKIO_DEBUG=1 shows where)",
          file=sys.stderr, flush=True)
    return 70  # EX_SOFTWARE


class OutputFileError(Exception):
    pass


def open_output_file(path: str, option: str) -> int:
    """Open ``path`` for writing before any work is done; return the fd (3 or more).

    Refuses what is not, or cannot become, a regular file -- a FIFO (opened
    without blocking, so a FIFO with no reader cannot hang us), a directory,
    a device such as /dev/full -- and paths that cannot be created, with one
    line.  Nothing is truncated yet: that happens when the results are written.
    """
    import stat
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OutputFileError(f"cannot write {option} file {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OutputFileError(f"{option} file {path} is not a regular file")
    if fd < 3:
        import fcntl
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(fd)
        fd = new
    os.set_blocking(fd, True)
    return fd


def _write_trace(tracer, fd: int, path: str) -> str | None:
    """Write the trace through ``fd`` (truncating first); return an error line or None."""
    import json
    try:
        os.ftruncate(fd, 0)
        # json.dumps, not json.dump: only the one-shot form uses CPython's C
        # encoder; dump's pure-Python one took over 4 s for a 4 s traced
        # flood run, after a SIGTERM that must end the run at once.
        text = json.dumps(tracer.to_chrome_json())
        with os.fdopen(fd, "w", encoding="utf-8", closefd=True) as f:
            f.write(text)
    except OSError as e:
        return f"cannot write --trace file {path}: {e.strerror}"
    return None


def run_main(args, closed: frozenset[int] = frozenset()) -> int:
    # 1. The VMM's signals were blocked by main() while this was the only
    #    thread (again here, for callers that come straight to run_main):
    #    every thread created from here on (vCPUs, the signal thread)
    #    inherits the mask, so a process-directed SIGTERM can only be taken
    #    by the path chosen.
    import _signal as signal  # as main() does: the stdlib's signal would build its enums

    from .signals import REALTIME_SIGNALS, VMM_SIGNALS, block_vmm_signals
    block_vmm_signals(VMM_SIGNALS + REALTIME_SIGNALS)
    # ... and exactly those: what main() blocked beyond them goes back to normal.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _early_signals() - set(VMM_SIGNALS + REALTIME_SIGNALS))
    # 2. This thread is the io thread; name it so ps -L shows it.
    from .threads import set_thread_name
    set_thread_name("qkio-io")

    from . import trace
    from .errors import QkioError
    from .machine import Machine

    trace_fd = None
    if args.trace:
        try:
            trace_fd = open_output_file(args.trace, "--trace")
        except OutputFileError as e:
            return _error(str(e))
    try:
        return _run_machine(args, closed, trace, QkioError, Machine, trace_fd)
    finally:
        if trace_fd is not None:
            os.close(trace_fd)


def _run_machine(args, closed, trace, QkioError, Machine, trace_fd) -> int:
    tracer = trace.Tracer(enabled=True) if trace_fd is not None else None
    kernel = args.kernel
    if not os.path.lexists(kernel):
        from . import guests
        if kernel in guests.GUESTS:
            try:
                kernel = str(guests.build_guest(kernel))
            except QkioError as e:
                return _error(str(e))
        else:
            return _error(f"no such kernel file {kernel!r} (demo guests: {', '.join(guests.GUESTS)})")
    console = (lambda data: None) if 1 in closed else None
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
                          virtio_notify=virtio_notify, virtio_aio=virtio_aio, pit=args.pit,
                          console=console, clock=args.clock)
    except (QkioError, ValueError) as e:
        return _error(str(e))
    if args.exit_path is None and machine.cpus[0].exit_path == "python":
        from . import native
        print(f"qkio: note: using the Python exit loop ({native.unavailable_reason})", file=sys.stderr)
    tty = _Terminal(0)
    status = None
    try:
        try:
            machine.load_multiboot(kernel, append=args.append, initrd=args.initrd)
        except QkioError as e:
            return _error(str(e))
        if 0 not in closed:
            machine.attach_stdin(0)
        tty.enter()
        try:
            _resume_gc()  # the guest runs as long as it likes: its garbage is collected
            status = machine.run(timeout=args.timeout)
        except Exception as e:  # a bug in qkio: one line (the traceback with QKIO_DEBUG=1)
            if os.environ.get("QKIO_DEBUG"):
                raise
            return _internal_error(e)
        line = closing_line(machine)
        if line:
            print(f"qkio: {line}", file=sys.stderr, flush=True)
        return status
    finally:
        tty.restore()
        machine.close()
        if tracer is not None:
            problem = _write_trace(tracer, os.dup(trace_fd), args.trace)
            if problem:
                print(f"qkio: error: {problem}", file=sys.stderr, flush=True)


def closing_line(machine) -> str:
    """The run's one closing line: why it ended (unless the guest said so itself),
    and what became of guest output stdout did not take."""
    parts = []
    if machine.exit_message and not machine.exit_message.startswith("guest wrote to isa-debug-exit"):
        parts.append(machine.exit_message)
    out = machine.console_report
    if out:
        parts.append(out)
    return "; ".join(parts)


class _Terminal:
    """Raw-ish input for a guest on a terminal, as QEMU's ``-serial stdio``: keys go
    to the guest one at a time, unechoed; Ctrl-C still signals the VMM (ISIG kept)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.saved: list | None = None

    def enter(self) -> None:
        if not os.isatty(self.fd):
            return
        # Only now: a run whose stdin is not a terminal does not load termios at all.
        import termios
        self.saved = termios.tcgetattr(self.fd)
        mode = termios.tcgetattr(self.fd)
        mode[3] &= ~(termios.ICANON | termios.ECHO)  # lflags
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)

    def restore(self) -> None:
        if self.saved is not None:
            import termios  # loaded by enter(), which saved the mode
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
            self.saved = None


if __name__ == "__main__":
    sys.exit(main())
