"""Helpers for the book's experiments: a VMM in a child process, its trace, its syscalls.

The chapters make claims about threads and signals, and the honest way to
check such a claim is to run a real ``qkio run`` and look at it from outside:
list its threads in ``/proc``, send it signals, read the trace it wrote, watch
its system calls with ``strace``.  This module is the small toolbox for that.

The toolbox is split by concern:

* :mod:`qkio.lab.vmm` -- a ``qkio run`` in a child process (:func:`spawn_vmm`,
  :class:`VmmProcess`), and why it runs there;
* :mod:`qkio.lab.traces` -- reading a ``--trace`` file (:func:`load_trace`,
  :func:`slices`, :func:`instants`) and drawing it (:func:`plot_timeline`;
  matplotlib is imported only then);
* :mod:`qkio.lab.strace` -- a run's system calls by thread (:func:`strace_threads`);
* :mod:`qkio.lab.signal_child` -- a VMM without vCPUs for signal experiments
  (``python -m qkio.lab.signal_child``), and :data:`CODE`, the programs the
  chapters compile or run beside qkio, shipped with the package so that a
  downloaded notebook runs outside a checkout.

Every name is also here, as ``lab.spawn_vmm`` and so on.
"""

from __future__ import annotations

from pathlib import Path

from .strace import sanitize_syscall, strace_threads, strace_threads_signalled
from .traces import instants, load_trace, plot_timeline, slices
from .vmm import VmmProcess, demo_kernel, spawn_vmm

#: Where the chapters' own programs live (``06-which-thread.c``, ...): package data.
CODE = Path(__file__).resolve().parent / "code"

__all__ = ["CODE", "VmmProcess", "spawn_vmm", "demo_kernel", "load_trace", "slices", "instants",
           "plot_timeline", "strace_threads", "strace_threads_signalled", "sanitize_syscall"]
