"""OS threads with names you can see from outside the process.

The article counts qemu-kvm's threads with ``ps`` and the book does the same
with qkio, so every thread qkio starts must be recognisable there.  Python's
``threading.Thread(name=...)`` does not do that: the name lives only inside
the interpreter, and ``ps -L``, ``top -H``, ``gdb`` and ``/proc/PID/task/TID/comm``
all show the name the *kernel* keeps for the task, which a new thread inherits
from its creator (so every Python thread is called ``python3``).

The kernel's name is set with ``prctl(PR_SET_NAME, name)``, which names only
the *calling* thread.  That is why ``start_thread`` does not set the name from
the parent: it wraps the target so that the new thread names itself as the
first thing it runs.  The kernel keeps at most 15 bytes plus a NUL
(TASK_COMM_LEN is 16) and silently cuts longer names, so we cut them ourselves
and return what was really set.  QEMU's vCPU threads are named ``CPU 0/KVM``;
qkio follows that.

Naming the *main* thread renames the process as ``ps`` (without ``-L``) shows
it, because a process's comm is its main thread's comm.  That is what qemu-kvm's
io thread, being the main thread, would look like if it named itself.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

from qkio import trace
from qkio.libc import libc as _libc

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs start-up time (qkio.record); annotations are strings here
    from typing import Any

__all__ = ["TASK_COMM_LEN", "set_thread_name", "get_thread_name", "gettid",
           "start_thread", "thread_names"]

#: Size of the kernel's task name buffer, NUL included (include/linux/sched.h).
TASK_COMM_LEN = 16
PR_SET_NAME = 15  # <linux/prctl.h>

_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def gettid() -> int:
    """The calling thread's kernel thread id (what ``/proc/PID/task/`` lists)."""
    return threading.get_native_id()


def set_thread_name(name: str) -> str:
    """Name the calling OS thread; returns the name the kernel kept (<= 15 bytes).

    Also renames the Python ``threading.Thread`` object (to the full name) and
    tells ``qkio.trace`` so trace files use the same name.
    """
    raw = name.encode("utf-8")[: TASK_COMM_LEN - 1]
    kept = raw.decode("utf-8", "ignore")
    if _libc.prctl(PR_SET_NAME, kept.encode("utf-8"), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NAME, {kept!r}): {os.strerror(err)}")
    threading.current_thread().name = name
    trace.note_thread_name(gettid(), kept)
    return kept


def get_thread_name(tid: int | None = None) -> str:
    """The kernel's name for thread ``tid`` of this process (default: caller)."""
    if tid is None:
        tid = gettid()
    with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
        return f.read().rstrip("\n")


def thread_names(pid: int | str = "self") -> dict[int, str]:
    """``{tid: name}`` for every thread of process ``pid``, from /proc.

    A thread may exit between listing the directory and reading its comm; such
    threads are simply left out.
    """
    out: dict[int, str] = {}
    base = f"/proc/{pid}/task"
    for entry in os.listdir(base):
        try:
            with open(f"{base}/{entry}/comm", encoding="utf-8", errors="replace") as f:
                out[int(entry)] = f.read().rstrip("\n")
        except FileNotFoundError:
            pass
    return out


def start_thread(name: str, target: Callable[..., Any], *args: Any,
                 daemon: bool = True, **kwargs: Any) -> threading.Thread:
    """Start a ``threading.Thread`` running ``target(*args, **kwargs)``, whose
    OS thread is named ``name`` before ``target`` runs.

    The new thread inherits the caller's signal mask (POSIX: a thread starts
    with its creator's mask), which is why ``qkio.signals.block_vmm_signals``
    must run before the first call to this.  ``start_thread`` returns once the
    thread has named itself, so a caller that lists /proc right afterwards sees
    the name, not ``python3``.
    """
    named = threading.Event()

    def run() -> None:
        set_thread_name(name)
        named.set()
        target(*args, **kwargs)

    t = threading.Thread(target=run, name=name, daemon=daemon)
    t.start()
    named.wait()
    return t
