"""Helpers for the book's experiments: a VMM in a child process, its trace, its syscalls.

The chapters make claims about threads and signals, and the honest way to
check such a claim is to run a real ``qkio run`` and look at it from outside:
list its threads in ``/proc``, send it signals, read the trace it wrote, watch
its system calls with ``strace``.  This module is the small toolbox for that.

Why the VMM runs in a child process, in its own session
-------------------------------------------------------

A notebook's code runs inside ipykernel, a process that already has half a
dozen threads the book does not control, each with its own signal mask.  A
process-directed signal sent there may be taken by any of them, and an
interrupt from Jupyter (the stop button, nbval's timeout) is a SIGINT sent to
the kernel's whole *process group*.  So every experiment that sends a VMM
process-directed signals runs the VMM as a child:

* started with ``setsid`` (a new session, hence a new process group), so a
  SIGINT aimed at the notebook's group never reaches it;
* started with an **empty signal mask** and the default action for the
  signals qkio cares about.  A child inherits both from the thread that
  starts it (a blocked signal stays blocked across ``exec``, an ignored one
  stays ignored), and the thread running a notebook cell may have blocked
  some for an in-process experiment.  ``subprocess.Popen`` cannot reset the
  mask, so :func:`spawn_vmm` uses ``os.posix_spawn``, which can
  (``setsigmask``, ``setsigdef``, ``setsid``), and keeps the command line
  exactly ``python -m qkio run ...``;
* its stdout and stderr go to pipes that two background threads drain, so a
  chatty guest can never block on a full pipe, and a cell can read what the
  child said so far at any time.

:class:`VmmProcess` is a context manager that kills and reaps the child on
the way out, whatever happened -- an experiment must never leave a VMM behind.

Reading a trace
---------------

``qkio run --trace FILE`` writes Chrome trace-event JSON (see
:mod:`qkio.trace` for the event names).  :func:`load_trace` turns it into a
flat list of events with thread names resolved and timestamps in
microseconds; :func:`slices` pairs each thread's ``B``/``E`` events into
intervals; :func:`plot_timeline` draws one row per thread.

Watching system calls
---------------------

:func:`strace_threads` runs ``qkio run`` under ``strace -f`` and groups the
lines by the name of the thread that made the call, so a chapter can show,
say, that only ``qkio-io`` calls ``select`` and only ``CPU 0/KVM`` calls
``ioctl(KVM_RUN)``.  Thread names are learned from the
``prctl(PR_SET_NAME, ...)`` each qkio thread makes as its first act (see
:mod:`qkio.threads`), so ``prctl`` is always traced too.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

__all__ = ["VmmProcess", "spawn_vmm", "demo_kernel", "load_trace", "slices", "instants",
           "plot_timeline", "strace_threads", "sanitize_syscall"]

#: Signals whose disposition a spawned VMM gets reset to the default: what a
#: VMM blocks or handles, plus SIGPIPE (Python itself ignores it).
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                  signal.SIGALRM, signal.SIGIO, signal.SIGPIPE, signal.SIGXFSZ)



def demo_kernel(name: str) -> str:
    """What to pass to ``--kernel`` for guest ``name`` (``"spin"``, ``"hello"``...):
    the name itself, which ``qkio run`` builds from :mod:`qkio.guests`."""
    from .guests import GUESTS
    if name not in GUESTS:
        raise LookupError(f"no guest {name!r} in qkio.guests; there are {', '.join(GUESTS)}")
    return name


# --- a VMM in a child process ----------------------------------------------------------


class _Drain(threading.Thread):
    """Read a pipe until EOF, keeping everything read (a child never blocks on it)."""

    def __init__(self, fd: int, label: str):
        super().__init__(name=f"qkio.lab {label} reader", daemon=True)
        self.fd = fd
        self.chunks: list[bytes] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            while True:
                data = os.read(self.fd, 65536)
                if not data:
                    return
                with self._lock:
                    self.chunks.append(data)
        finally:
            os.close(self.fd)

    def text(self) -> str:
        with self._lock:
            return b"".join(self.chunks).decode("utf-8", "replace")


class VmmProcess:
    """A running ``qkio run`` child (see :func:`spawn_vmm`).

    ``pid``, ``argv``, ``returncode`` (None while running); ``stdin`` is the
    write end of its stdin when spawned with ``stdin=subprocess.PIPE``.
    """

    def __init__(self, argv: list[str], stdin: Any = subprocess.DEVNULL,
                 env: dict[str, str] | None = None):
        self.argv = argv
        self.returncode: int | None = None
        self.stdin: int | None = None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child_fds = [out_w, err_w]
        if stdin == subprocess.DEVNULL:
            in_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            child_fds.append(in_fd)
        elif stdin == subprocess.PIPE:
            in_fd, self.stdin = os.pipe()
            child_fds.append(in_fd)
        elif stdin is None:
            in_fd = 0
        else:
            in_fd = stdin if isinstance(stdin, int) else stdin.fileno()
        # dup2 onto 0/1/2 clears close-on-exec there; every other fd Python
        # opened is close-on-exec (PEP 446), so the child gets just these three.
        actions = [(os.POSIX_SPAWN_DUP2, in_fd, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                   (os.POSIX_SPAWN_DUP2, err_w, 2)]
        try:
            self.pid = os.posix_spawn(sys.executable, argv, os.environ if env is None else env,
                                      file_actions=actions, setsid=True, setsigmask=(),
                                      setsigdef=_RESET_SIGNALS)
        except BaseException:
            for fd in (out_r, err_r, *child_fds) + ((self.stdin,) if self.stdin is not None else ()):
                os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        self._pidfd = os.pidfd_open(self.pid)
        self._out = _Drain(out_r, "stdout")
        self._err = _Drain(err_r, "stderr")
        self._out.start()
        self._err.start()

    # -- looking at it ---------------------------------------------------------

    def threads(self) -> dict[int, str]:
        """``{tid: name}`` of the child's threads now, from ``/proc/PID/task/*/comm``."""
        from .threads import thread_names
        try:
            return thread_names(self.pid)
        except FileNotFoundError:
            return {}

    def thread_names(self) -> list[str]:
        """The child's thread names, sorted (the same name may appear more than once)."""
        return sorted(self.threads().values())

    def wait_for_threads(self, names: Iterable[str], timeout: float = 10) -> dict[int, str]:
        """Wait until a thread of every name in ``names`` exists; return ``threads()``.

        Raises ``TimeoutError`` (with what is there and the child's stderr) if
        they do not all appear, or ``RuntimeError`` if the child exits first.
        """
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while True:
            now = self.threads()
            if wanted <= set(now.values()):
                return now
            if self.poll() is not None:
                raise RuntimeError(f"qkio exited with status {self.returncode} before threads "
                                   f"{sorted(wanted - set(now.values()))} appeared; stderr:\n"
                                   f"{self.stderr_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"threads {sorted(wanted - set(now.values()))} did not appear "
                                   f"in {timeout:g} s; have {sorted(now.values())}; stderr:\n"
                                   f"{self.stderr_text()}")
            time.sleep(0.02)

    def stdout_text(self) -> str:
        """Everything the child wrote to stdout so far (the guest's console)."""
        return self._out.text()

    def stderr_text(self) -> str:
        """Everything the child wrote to stderr so far (qkio's messages)."""
        return self._err.text()

    # -- acting on it ----------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """``kill(pid, sig)``: a process-directed signal (a no-op once it has exited)."""
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def poll(self) -> int | None:
        """The exit status if the child has exited (reaping it), else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit and return its status (``-N`` if signal N killed it).

        Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds.  Also
        waits for the child's output to be read to the end.
        """
        if self.returncode is None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.argv, timeout)
            _, status = os.waitpid(self.pid, 0)
            self._reaped(status)
        self._out.join(5)
        self._err.join(5)
        return self.returncode

    def _reaped(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)
        self._pidfd = -1
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def kill(self) -> int:
        """SIGKILL the child's whole process group (it leads its own) and reap it."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait()
        return self.returncode

    def __enter__(self) -> "VmmProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def __del__(self) -> None:  # last resort; the with statement is the real contract
        try:
            if getattr(self, "returncode", 0) is None:
                self.kill()
        except Exception:
            pass


def spawn_vmm(*qkio_run_args: str, trace: str | os.PathLike | None = None,
              stdin: Any = subprocess.DEVNULL, env: dict[str, str] | None = None) -> VmmProcess:
    """Start ``python -m qkio run ARGS...`` as a child in its own session.

    ``trace``: a file for ``--trace``.  ``stdin``: ``subprocess.DEVNULL``
    (default; the guest's UART gets EOF), ``subprocess.PIPE`` (write to
    ``proc.stdin``), None (inherit), or an fd or file.  Use it as a context
    manager::

        with spawn_vmm("--kernel", "spin", "--timeout", "5") as vm:
            vm.wait_for_threads({"qkio-io", "CPU 0/KVM"})
            print(vm.thread_names())
    """
    argv = [sys.executable, "-m", "qkio", "run", *map(str, qkio_run_args)]
    if trace is not None:
        argv += ["--trace", os.fspath(trace)]
    return VmmProcess(argv, stdin=stdin, env=env)


# --- traces ----------------------------------------------------------------------------


def load_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``qkio run --trace`` file: its events, oldest first, metadata dropped.

    Each event is a dict with ``ph`` (``B``, ``E``, ``X``, ``i``), ``name``,
    ``ts`` (microseconds, CLOCK_MONOTONIC), ``dur`` (``X`` only, else 0),
    ``tid``, ``thread`` (the OS thread name from the ``thread_name``
    metadata) and ``args`` (a dict, maybe empty).
    """
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    events = raw["traceEvents"] if isinstance(raw, dict) else raw
    names = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    out = []
    for e in events:
        if e.get("ph") == "M":
            continue
        out.append({"ph": e["ph"], "name": e["name"], "ts": float(e["ts"]),
                    "dur": float(e.get("dur", 0.0)), "tid": e["tid"],
                    "thread": names.get(e["tid"], str(e["tid"])), "args": e.get("args", {})})
    out.sort(key=lambda e: e["ts"])  # stable: B/E at one timestamp keep their order
    return out


def slices(trace: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    """Intervals from a loaded trace: each ``B``/``E`` pair (matched per thread,
    innermost first) and each ``X`` event, as dicts with ``name``, ``thread``,
    ``tid``, ``start``, ``end`` (µs) and ``args`` (begin's and end's merged).
    Slices still open when the trace ended are left out.  ``name`` filters."""
    stacks: dict[int, list[dict[str, Any]]] = {}
    out = []
    for e in trace:
        if e["ph"] == "B":
            stacks.setdefault(e["tid"], []).append(e)
        elif e["ph"] == "E":
            stack = stacks.get(e["tid"])
            if not stack:
                continue
            b = stack.pop()
            out.append({"name": b["name"], "thread": b["thread"], "tid": b["tid"],
                        "start": b["ts"], "end": e["ts"], "args": {**b["args"], **e["args"]}})
        elif e["ph"] == "X":
            out.append({"name": e["name"], "thread": e["thread"], "tid": e["tid"],
                        "start": e["ts"], "end": e["ts"] + e["dur"], "args": dict(e["args"])})
    out.sort(key=lambda s: s["start"])
    return [s for s in out if name is None or s["name"] == name]


def instants(trace: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    """The instant (``i``) events of a loaded trace, optionally only those called ``name``."""
    return [e for e in trace if e["ph"] == "i" and (name is None or e["name"] == name)]


# Colours per slice kind and markers per instant kind, so every figure in the
# book uses the same legend.
_SLICE_STYLE = {"KVM_RUN": "tab:green", "main_loop_wait": "tab:blue", "lock waited for": "tab:red"}
_SLICE_OTHER = "tab:orange"   # fd handlers, timers, bottom halves
_MARKERS = {"notify sent": ("v", "tab:purple"), "notify drained": ("^", "tab:purple"),
            "kick sent": ("x", "black"), "kick received": ("+", "black"),
            "signal received": ("*", "tab:red"), "sigwaitinfo returned": ("D", "tab:red")}


def _slice_kind(name: str) -> str:
    if name in _SLICE_STYLE:
        return name
    if name.split(" ", 1)[0] in ("fd_read", "fd_write", "timer", "bh"):
        return "handler"
    return name


def plot_timeline(trace: list[dict[str, Any]] | str | os.PathLike, ax=None,
                  threads: Iterable[str] | None = None,
                  window: tuple[float, float] | None = None, title: str | None = None):
    """Draw a per-thread timeline of a trace; returns the matplotlib Axes.

    One row per thread, labelled with its OS name (``threads`` picks and
    orders them; default: the order they first appear).  Slices are bars:
    ``KVM_RUN`` green, ``main_loop_wait`` blue, fd handlers / timers /
    bottom halves orange, lock waits red.  Instants are markers (notify,
    kick, signal).  Time is in milliseconds from the first event;
    ``window=(start_ms, end_ms)`` zooms in.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    if not isinstance(trace, list):
        trace = load_trace(trace)
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 2.2))
    t0 = trace[0]["ts"] if trace else 0.0
    order = list(threads) if threads is not None else list(dict.fromkeys(e["thread"] for e in trace))
    row = {name: i for i, name in enumerate(order)}
    height = 0.6
    kinds_seen: dict[str, str] = {}
    for s in slices(trace):
        if s["thread"] not in row:
            continue
        kind = _slice_kind(s["name"])
        colour = _SLICE_STYLE.get(kind, _SLICE_OTHER)
        kinds_seen.setdefault("fd handler" if kind == "handler" else kind, colour)
        start, end = (s["start"] - t0) / 1000, (s["end"] - t0) / 1000
        y = row[s["thread"]]
        ax.broken_barh([(start, max(end - start, 1e-3))], (y - height / 2, height),
                       facecolors=colour, edgecolors=colour, linewidth=0.5)
    marks_seen = {}
    for e in instants(trace):
        if e["thread"] not in row or e["name"] not in _MARKERS:
            continue
        marker, colour = _MARKERS[e["name"]]
        marks_seen[e["name"]] = (marker, colour)
        ax.plot([(e["ts"] - t0) / 1000], [row[e["thread"]] + height / 2 + 0.12], marker=marker,
                color=colour, markersize=6, linestyle="none")
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(-0.7, len(order) - 0.2)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    if window is not None:
        ax.set_xlim(*window)
    if title:
        ax.set_title(title)
    handles = [Patch(color=c, label=k) for k, c in kinds_seen.items()]
    handles += [Line2D([], [], marker=m, color=c, linestyle="none", label=n)
                for n, (m, c) in marks_seen.items()]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize="small", frameon=False)
    return ax


# --- strace ----------------------------------------------------------------------------

_PRCTL_NAME = re.compile(r'prctl\(PR_SET_NAME, "([^"]*)"')
# "-o FILE -f" prefixes each line with the tid ("1234 "); on stderr it is "[pid 1234] ".
_LINE = re.compile(r"^(?:\[pid\s+(\d+)\]\s+|(\d+)\s+)?(.*)$")
_SANITIZE = [
    (re.compile(r"0x[0-9a-f]{9,16}"), "0x<ADDR>"),           # host pointers
    (re.compile(r"\b(pid|tid)=\d+"), r"\1=<ID>"),
    (re.compile(r"\b(si_pid|si_uid|ssi_pid|ssi_uid)=\d+"), r"\1=<ID>"),
    (re.compile(r"\)\s{2,}= "), ") = "),                    # strace's column padding
    (re.compile(r"\{tv_sec=\d+, tv_usec=\d+\}"), "{tv_sec=<N>, tv_usec=<N>}"),
    (re.compile(r"\{tv_sec=\d+, tv_nsec=\d+\}"), "{tv_sec=<N>, tv_nsec=<N>}"),
    # qkio run also takes every real-time signal; thirty-one names in a row
    # say less than their range does.
    (re.compile(r"\bRT_(\d+)(?: RT_\d+)* RT_(\d+)\b"), r"RT_\1..RT_\2"),
]


def sanitize_syscall(line: str) -> str:
    """Blank the parts of an strace line that change from run to run
    (host addresses, pids, timeouts left), keeping fds, names and results."""
    for pattern, repl in _SANITIZE:
        line = pattern.sub(repl, line)
    return line


def _strace_argv(out: Path, syscalls: Iterable[str], qkio_run_args: Iterable[str],
                 inject: Iterable[str] = ()) -> list[str]:
    """``strace -f`` of ``qkio run ARGS``, tracing ``syscalls`` into the file ``out``."""
    strace = shutil.which("strace")
    if strace is None:
        raise FileNotFoundError("strace is not installed")
    return [strace, "-f", "-qq", "-o", str(out), "-e", "trace=" + ",".join(sorted(syscalls)),
            *(arg for spec in inject for arg in ("-e", f"inject={spec}")),
            sys.executable, "-m", "qkio", "run", *map(str, qkio_run_args)]


def strace_threads(qkio_run_args: Iterable[str], syscalls: Iterable[str] = (
        "ioctl", "select", "pselect6", "read", "write", "rt_sigtimedwait", "signalfd4",
        "eventfd2", "pipe2"),
        timeout: float = 60, stdin: Any = subprocess.DEVNULL,
        inject: Iterable[str] = (), keep_raw: bool = False) -> dict[str, list[str]]:
    """Run ``qkio run ARGS`` under ``strace -f -qq -e trace=SYSCALLS`` and group
    the calls by thread name.

    Returns ``{thread name: [sanitized syscall line, ...]}`` in call order,
    threads in the order they first appear.  A call strace shows in two
    halves (``<unfinished ...>`` then ``<... resumed>``, because another
    thread's call came in between) is joined back into one line.  Signals
    delivered to a thread appear as strace's ``--- SIGUSR1 {...} ---`` lines.

    Calls made by a thread before it named itself go under the name its
    ``prctl(PR_SET_NAME)`` later gave it; a thread that never names itself
    keeps ``"tid <n>"`` with ``n`` counted from 1.  The io thread is the
    process's main thread and names itself ``qkio-io``.  Only threads of the
    VMM process are kept: ``strace -f`` also follows child *processes* (the
    helpers ``ctypes.util.find_library`` runs, for one), and those are
    dropped -- ``clone``/``clone3`` are traced so that a thread (created with
    ``CLONE_THREAD``) can be told from a process.

    ``inject``: strace fault-injection specs, each passed as ``-e
    inject=SPEC`` -- ``"signalfd4:error=ENOSYS"`` makes every ``signalfd4``
    call fail as on a kernel older than 2.6.22, without touching qkio.  The
    injected calls are marked ``(INJECTED)`` in the output.  ``keep_raw=True``
    adds the unsanitized output under ``"<raw>"``.

    strace slows every traced call a lot; give the run a ``--timeout`` or a
    guest that exits, and keep ``syscalls`` short.
    """
    wanted = set(syscalls) | {"prctl", "clone", "clone3"}
    with tempfile.TemporaryDirectory(prefix="qkio-strace-") as tmp:
        out = Path(tmp) / "strace.out"
        argv = _strace_argv(out, wanted, qkio_run_args, inject)
        # Its own session for the same reason as spawn_vmm: no stray SIGINT.
        subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=timeout, start_new_session=True, check=False)
        text = out.read_text(encoding="utf-8", errors="replace")
    grouped = _group_strace(text, hide=set(wanted) - set(syscalls))
    if keep_raw:
        grouped["<raw>"] = text.splitlines()
    return grouped


_CALL_NAME = re.compile(r"^([a-z_0-9]+)\(")
_RESUMED = re.compile(r"^<\.\.\. ([a-z_0-9]+) resumed>(.*)$")


def _group_strace(text: str, hide: Iterable[str] = ()) -> dict[str, list[str]]:
    """Group ``strace -f -o`` output by thread name (see :func:`strace_threads`).

    Calls named in ``hide`` are used (prctl for names, clone for threads) but
    not returned.
    """
    hide = set(hide)
    calls: list[tuple[int, str]] = []          # (tid, whole line), in order
    pending: dict[int, tuple[int, str]] = {}   # tid -> (index in calls, first half)
    names: dict[int, str] = {}
    main: int | None = None
    threads: set[int] = set()
    for raw in text.splitlines():
        m = _LINE.match(raw)
        tid_text = m.group(1) or m.group(2)
        body = m.group(3)
        if body.startswith("+++"):
            continue
        tid = int(tid_text) if tid_text else (main if main is not None else 0)
        if main is None:
            main = tid
            threads.add(tid)
        resumed = _RESUMED.match(body)
        if resumed and tid in pending:
            index, first = pending.pop(tid)
            body = first + resumed.group(2)
            calls[index] = (tid, body)
        elif body.endswith("<unfinished ...>"):
            first = body[: -len("<unfinished ...>")].rstrip()
            pending[tid] = (len(calls), first + " " if first.endswith(",") else first)
            calls.append((tid, body))
            continue
        else:
            calls.append((tid, body))
        named = _PRCTL_NAME.search(body)
        if named:
            names[tid] = named.group(1)
        if tid in threads and body.startswith(("clone(", "clone3(")) and "CLONE_THREAD" in body:
            result = re.search(r"=\s*(\d+)\s*$", body)
            if result:
                threads.add(int(result.group(1)))
    anonymous: dict[int, str] = {}
    grouped: dict[str, list[str]] = {}
    for tid, body in calls:
        if tid not in threads:
            continue
        call = _CALL_NAME.match(body)
        if call and call.group(1) in hide:
            continue
        name = names.get(tid)
        if name is None:
            name = anonymous.setdefault(tid, f"tid {len(anonymous) + 1}")
        grouped.setdefault(name, []).append(sanitize_syscall(body))
    return grouped


def strace_threads_signalled(qkio_run_args: Iterable[str], signals: Iterable[int],
                             syscalls: Iterable[str] = ("select", "pselect6", "read", "write",
                                                        "rt_sigtimedwait"),
                             ready: Iterable[str] = ("qkio-io",), gap: float = 0.2,
                             timeout: float = 60) -> dict[str, list[str]]:
    """:func:`strace_threads`, with process-directed signals sent to the VMM mid-run.

    Starts ``qkio run ARGS`` under ``strace -f`` (in its own session), waits
    until threads with every name in ``ready`` exist, then sends each of
    ``signals`` to the VMM's pid with ``kill()``, ``gap`` seconds apart
    (also before the first, so the threads are asleep again).  The run ends
    the way its arguments say (a ``--timeout``, or a SIGTERM among
    ``signals``).  Returns the calls grouped by thread name, sanitized.
    """
    wanted = set(syscalls) | {"prctl", "clone", "clone3"}
    with tempfile.TemporaryDirectory(prefix="qkio-strace-") as tmp:
        out = Path(tmp) / "strace.out"
        argv = _strace_argv(out, wanted, qkio_run_args)
        tracer = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            vmm = None
            while vmm is None or not set(ready) <= set(_names_of(vmm)):
                if tracer.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the VMM under strace never had threads {sorted(ready)}"
                                       f" (vmm={vmm}, strace status={tracer.poll()}, have {_names_of(vmm) if vmm else []})")
                if vmm is None:
                    vmm = _qkio_child(tracer.pid)
                time.sleep(0.02)
            for sig in signals:
                time.sleep(gap)
                os.kill(vmm, sig)
            tracer.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if tracer.poll() is None:
                os.killpg(tracer.pid, signal.SIGKILL)
                tracer.wait()
        text = out.read_text(encoding="utf-8", errors="replace")
    return _group_strace(text, hide=set(wanted) - set(syscalls))


def _qkio_child(pid: int) -> int | None:
    """The child of ``pid`` that runs ``python -m qkio run``, if it has started.
    strace forks short-lived test processes of its own when it starts (copies
    of itself, with its command line), so its first child is not necessarily
    the one it traces."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        pids = children.read_text().split()
    except OSError:
        return None
    for child in pids:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # A fork of strace has strace's command line; the VMM has exec'd Python.
        if argv[:4] == [os.fsencode(sys.executable), b"-m", b"qkio", b"run"]:
            return int(child)
    return None


def _names_of(pid: int) -> list[str]:
    from .threads import thread_names
    try:
        return list(thread_names(pid).values())
    except FileNotFoundError:
        return []
