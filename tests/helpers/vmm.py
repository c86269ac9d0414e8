"""Shared helpers for the tests that run real guests: in-process machines and
``qkio run`` child processes.

Why child processes run in their own session
--------------------------------------------
The CLI tests send process-directed signals (``kill -TERM``) to a running
``qkio run``.  Each child is started with ``start_new_session=True``, so it
has its own process group: a Ctrl-C at the terminal running pytest never
reaches it, and a signal we send it never reaches pytest.  A child inherits
the signal mask of the thread that forks it, so :func:`spawn` refuses to run
from a thread that has one of the VMM's signals blocked (an in-process
``Machine(signals=...)`` does that to the main thread) -- the child would
otherwise start with the signal already blocked, which is not what a user
gets from a shell.

Why in-process machines use ``signals=None``
--------------------------------------------
``Machine(signals=...)`` blocks SIGTERM and friends in the calling thread,
which here is pytest's main thread.  The tests that need the signal paths
run them in a child instead; in-process tests that do use them restore the
mask themselves (:func:`saved_sigmask`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from qkio.bench.guest_run import qemu_unusable_reason

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
QKIO_RUN = (sys.executable, "-m", "qkio", "run")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --- skipping (needing KVM is the `kvm` marker: see the root conftest.py) ------------

#: Skip a test that needs the reference QEMU when it cannot run here, saying why
#: (the one probe: :func:`qkio.bench.guest_run.qemu_unusable_reason`).
needs_qemu = pytest.mark.skipif(qemu_unusable_reason() is not None,
                                reason=qemu_unusable_reason() or "")


def require_binutils() -> None:
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU as and ld are needed to build guests")


# --- guests -----------------------------------------------------------------------

def demo_guest(name: str) -> Path:
    """The ELF of guest ``name`` from qkio's one guest tree (qkio/guests), from qkio's cache."""
    require_binutils()
    from qkio.guests import build_guest
    return build_guest(name)


#: The tests' older name for :func:`demo_guest`: there is one guest tree.
test_kernel = demo_guest
test_kernel.__test__ = False  # a helper, not a test, despite the name


# --- child processes ----------------------------------------------------------------

def _check_mask() -> None:
    from qkio.signals import VMM_SIGNALS
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set()) & set(VMM_SIGNALS)
    assert not blocked, f"this thread has {sorted(blocked)} blocked; a child would inherit that"


def run_qkio(*args: str, input: bytes | None = None, timeout: float = 60,
             stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """``python -m qkio run ARGS`` to completion; bytes out, in its own session."""
    _check_mask()
    return subprocess.run([*QKIO_RUN, *args], input=input,
                          stdin=None if input is not None else stdin,
                          capture_output=True, timeout=timeout, start_new_session=True,
                          cwd=ROOT)


class Vmm:
    """A running ``qkio run`` child.  Its stdout and stderr go to files (a
    chatty guest can never block on a full pipe, and we can read what it said
    so far at any time).  The context manager kills it on the way out."""

    def __init__(self, *args: str, stdin=subprocess.DEVNULL, tmpdir: str | None = None):
        _check_mask()
        self._dir = tempfile.TemporaryDirectory(dir=tmpdir, prefix="qkio-vmm-")
        self.out_path = Path(self._dir.name) / "stdout"
        self.err_path = Path(self._dir.name) / "stderr"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([*QKIO_RUN, *args], stdin=stdin, stdout=self._out,
                                     stderr=self._err, start_new_session=True, cwd=ROOT)
        self.pid = self.proc.pid

    def stdout(self) -> bytes:
        return self.out_path.read_bytes()

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def threads(self) -> dict[int, str]:
        from qkio.threads import thread_names
        return thread_names(self.pid)

    def wait_for_thread(self, name: str, timeout: float = 10) -> int:
        """Wait until the child has a thread called ``name``; return its tid."""
        found: list[int] = []

        def look():
            found[:] = [tid for tid, n in self.threads().items() if n == name]
            return bool(found)
        wait_until(look, timeout, f"thread {name!r} in pid {self.pid}; stderr: {self.stderr()!r}")
        return found[0]

    def wait_for_output(self, text: bytes, timeout: float = 10) -> None:
        wait_until(lambda: text in self.stdout(), timeout,
                   f"{text!r} on stdout; got {self.stdout()[-200:]!r}, stderr {self.stderr()!r}")

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        self._err.close()
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def task_cpu_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """``{tid: (name, utime + stime)}`` for each thread, in clock ticks (/proc/PID/task/TID/stat)."""
    out = {}
    base = f"/proc/{pid}/task"
    for entry in os.listdir(base):
        try:
            with open(f"{base}/{entry}/stat") as f:
                stat = f.read()
            with open(f"{base}/{entry}/comm") as f:
                name = f.read().rstrip("\n")
        except (FileNotFoundError, ProcessLookupError):
            continue
        # comm is in parentheses and may contain spaces: split after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
        out[int(entry)] = (name, utime + stime)
    return out


# --- waiting and threads ---------------------------------------------------------

def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def run_in_thread(fn, timeout: float, what: str):
    """Run ``fn()`` in a helper thread and return its result; fail (instead of
    hanging the suite) if it has not finished after ``timeout`` seconds --
    which is how a deadlock or a lost kick shows up."""
    result: list = []
    error: list = []

    def body():
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller
            error.append(e)
    t = threading.Thread(target=body, name=f"test: {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{what} did not finish in {timeout} s (deadlock or lost kick?)")
    if error:
        raise error[0]
    return result[0] if result else None


@contextlib.contextmanager
def saved_sigmask():
    """Restore this thread's signal mask afterwards (Machine(signals=...) changes it)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    try:
        yield
    finally:
        # Anything that arrived while blocked is still pending: take it now,
        # while it is blocked, rather than let it hit pytest on unblocking.
        from qkio.signals import VMM_SIGNALS
        pending = signal.sigpending() & set(VMM_SIGNALS)
        while pending and signal.sigtimedwait(pending, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def open_fds() -> set[str]:
    """This process's fds, each as 'fd -> target', so a swapped fd shows up too."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except FileNotFoundError:  # the fd listdir itself used
            pass
    return out


def sigterm_blocked(pid: int) -> bool:
    """Whether ``pid``'s main thread blocks SIGTERM yet (False once it is gone):
    ``qkio run`` blocks the VMM's signals as the first thing ``main()`` does."""
    from qkio.signals import blocked_signals
    try:
        return signal.SIGTERM in blocked_signals(pid=pid)
    except OSError:
        return False
