"""A ``qkio run`` in a child process: :class:`VmmProcess`, :func:`spawn_vmm`.

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
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["VmmProcess", "spawn_vmm", "demo_kernel"]

#: Signals whose disposition a spawned VMM gets reset to the default: what a
#: VMM blocks or handles, plus SIGPIPE (Python itself ignores it).
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                  signal.SIGALRM, signal.SIGIO, signal.SIGPIPE, signal.SIGXFSZ)


def demo_kernel(name: str) -> str:
    """What to pass to ``--kernel`` for guest ``name`` (``"spin"``, ``"hello"``...):
    the name itself, which ``qkio run`` builds from :mod:`qkio.guests`."""
    from ..guests import GUESTS
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
        from ..threads import thread_names
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
                raise subprocess.TimeoutExpired(self.argv, timeout or 0.0)
            _, status = os.waitpid(self.pid, 0)
            self._reaped(status)
        self._out.join(5)
        self._err.join(5)
        assert self.returncode is not None  # reaped above
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
            return self.wait()
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
