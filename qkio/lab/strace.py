"""Watching a ``qkio run``'s system calls, thread by thread, with ``strace -f``.

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

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["strace_threads", "strace_threads_signalled", "sanitize_syscall"]

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
        assert m is not None  # _LINE matches any line
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
    from ..threads import thread_names
    try:
        return list(thread_names(pid).values())
    except FileNotFoundError:
        return []
