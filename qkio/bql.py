"""The global lock: qemu-kvm's ``qemu_mutex``.

In qemu-kvm 0.12 one plain pthread mutex, ``qemu_mutex``, protects all device
and main-loop state.  Whoever runs device code holds it:

* the io thread holds it all the time, except around its ``select()``
  (``main_loop_wait`` unlocks, selects, locks again);
* a vCPU thread holds it except around ``ioctl(KVM_RUN)`` (``pre_kvm_run``
  unlocks, ``post_kvm_run`` locks), so guest code runs unlocked and every exit
  -- a port write to the serial device, say -- is handled locked.

So at any moment at most one thread is emulating devices, and device models
need no locks of their own.  Upstream QEMU later renamed the idea the "big QEMU
lock" (BQL), hence this module's name.

Why a ``threading.Lock`` and not an ``RLock``: ``qemu_mutex`` is not recursive,
and taking it twice in one thread is a bug we want to see as a deadlock in a
test rather than hide.  ``lock()`` refuses it outright with an error, which is
kinder than hanging.

Why record waits: contention on this lock is where a VMM's threads stop
overlapping -- a vCPU exit that wants the lock while the io thread dispatches a
slow handler.  Acquiring first tries without blocking, which costs nothing when
the lock is free; only when that fails is the wait timed and written to the
trace as ``lock waited for``, with the waiting and the holding thread.

The native exit loop (``qkio/native/cpu_exec.c``) takes and releases this
lock too, once per guest exit, by repeating :meth:`GlobalMutex.lock`'s and
:meth:`GlobalMutex.unlock`'s fast paths in C.  Its contract with this class
is three public names, documented on both sides (see :class:`GlobalMutex`):
``raw_lock``, ``owner`` and :meth:`GlobalMutex.lock_contended`.

Fairness: neither a pthread mutex nor Python's lock is fair.  A thread that
unlocks and immediately locks again (a vCPU thread looping on fast exits) can
starve another waiter; qemu-kvm had that property too.
"""

from __future__ import annotations

import threading
import time
from threading import get_ident

from qkio import trace

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs start-up time (qkio.record); annotations are strings here
    from typing import Any

__all__ = ["GlobalMutex"]


def _raw_lock():
    """The lock under a GlobalMutex: the native module's ``QemuMutex`` when it is
    available (the native exit loop then takes it without a Python call; see
    ``qkio/native/cpu_exec.c``), else a ``threading.Lock``.  Both are plain,
    non-recursive locks with ``acquire(blocking)``, ``release()`` and ``locked()``,
    and both wait with the GIL released."""
    from qkio import native  # an import only: the module was compiled at install, never here
    module = native.load()
    return module.QemuMutex() if module is not None else threading.Lock()


class GlobalMutex:
    """qemu-kvm's ``qemu_mutex``: ``lock()``, ``unlock()``, ``with``, ``held_by_me()``.

    The contract with the native exit loop (``qkio/native/cpu_exec.c``), which
    drops and retakes this lock around every ``KVM_RUN`` without calling
    :meth:`lock`/:meth:`unlock`:

    ``raw_lock``
        the plain lock underneath (a ``QemuMutex`` when :mod:`qkio.native` is
        built, else a ``threading.Lock``): ``acquire(blocking)``, ``release()``.
    ``owner``
        ``threading.get_ident()`` of the holder, None when free.  Whoever takes
        ``raw_lock`` sets it after; whoever releases clears it first.
    :meth:`lock_contended`
        called, holding the GIL and not ``raw_lock``, when a non-blocking
        acquire failed: blocks until the lock is taken (GIL released) and
        records the wait in the trace.  The caller then sets ``owner``.
    """

    # Slots, not a __dict__: ``owner`` is written twice per guest exit, by
    # the Python loop and by the native one (which goes through the generic
    # attribute protocol); a slot store is a pointer write, a dict store a
    # hash-table update -- measurably slower on the per-exit path.
    __slots__ = ("raw_lock", "_acquire", "_release", "owner", "name", "tracer")

    def __init__(self, tracer: trace.Tracer | None = None, name: str = "qemu_mutex") -> None:
        self.raw_lock = _raw_lock()
        self._acquire = self.raw_lock.acquire
        self._release = self.raw_lock.release
        self.owner: int | None = None  # threading.get_ident() of the holder
        self.name = name
        self.tracer = tracer if tracer is not None else trace.default

    # lock() and unlock() run twice per vCPU exit, so the uncontended path is
    # one non-blocking acquire and one store.  Everything else -- the
    # recursion check, the holder's name, timing the wait -- happens only
    # when that first acquire fails, where it costs nothing that matters.

    def lock(self) -> None:
        """Take the lock, blocking if another thread holds it."""
        if not self._acquire(False):
            self.lock_contended()
        self.owner = get_ident()

    def lock_contended(self) -> None:
        holder = self.owner
        if holder == get_ident():
            raise RuntimeError(f"{self.name} is not recursive and this thread holds it")
        holder_thread = next((t for t in threading.enumerate() if t.ident == holder), None)
        t0 = time.monotonic_ns()
        self._acquire()
        self.tracer.complete("lock waited for", t0, lock=self.name,
                             holder=holder_thread.name if holder_thread else "")

    def unlock(self) -> None:
        """Release the lock; only the holder may."""
        if self.owner != get_ident():
            raise RuntimeError(f"{self.name} released by a thread that does not hold it")
        self.owner = None
        self._release()

    # qemu-kvm 0.12's names for the two calls above (qemu-kvm.c:
    # qemu_mutex_lock_iothread -> kvm_mutex_lock -> pthread_mutex_lock(&qemu_mutex),
    # what main_loop_wait does around select()), so that grep finds them here.
    qemu_mutex_lock_iothread = lock
    qemu_mutex_unlock_iothread = unlock

    def held_by_me(self) -> bool:
        """True if the calling thread holds the lock."""
        return self.owner == threading.get_ident()

    def locked(self) -> bool:
        """True if any thread holds the lock (a snapshot, for tests and asserts)."""
        return self.raw_lock.locked()

    def __enter__(self) -> "GlobalMutex":
        self.lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unlock()

    class _Released:
        def __init__(self, m: "GlobalMutex") -> None:
            self.m = m

        def __enter__(self) -> None:
            self.m.unlock()

        def __exit__(self, *exc: Any) -> None:
            self.m.lock()

    def released(self) -> "GlobalMutex._Released":
        """``with lock.released(): blocking_call()`` -- the unlock/relock pair
        around ``select()`` and ``KVM_RUN``.  The caller must hold the lock."""
        return GlobalMutex._Released(self)
