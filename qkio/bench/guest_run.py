"""Running a benchmark guest: in qkio (in this process), in C, in QEMU.

Each ``run_*`` boots the same Multiboot ELF with ``count=N`` (and, for
``pio-loop``, ``port=P``) on its command line and returns the seconds the
run took, measured the way that implementation allows:

* qkio: wall time of ``Machine.run()`` (vCPU thread start, the guest's
  exits, the stop), in this process;
* C (``pio_ref.c``): the program's own CLOCK_MONOTONIC around its KVM_RUN
  loop;
* QEMU: wall time of the whole ``qemu-system-x86_64`` process, loading
  included.  The machine is ``microvm`` (``-M microvm,acpi=off``): QEMU's
  smallest, which loads a Multiboot kernel itself -- no SeaBIOS, no PCI,
  tens of milliseconds from exec to the guest's first instruction instead
  of the seconds of ``-M pc``, whose start-up jitter blurred per-exit
  figures (``qkio bench startup`` times it).
  ``-cpu host``, as qkio gives the guest the host's CPUID.  With
  ``-serial stdio`` its UART sits at 0x3f8 as qkio's does, and what the
  guest prints there comes out on QEMU's stdout, which is read.

The benchmarks that time from outside difference two runs,
``(T(N) - T(small)) / (N - small)``, which removes every cost that does not
grow with N (start-up, loading, shutdown), applied to all three so that they
are treated alike.  ``pio`` does better: ``pio-loop`` with ``chunk=K`` times
itself with its TSC and prints the figures, which every ``run_*`` returns
as the guest's output (``info["console"]``; :func:`chunk_cycles` reads them).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from .build import build_c

BENCH_PORT = 0x80   # qkio/guests/pio-loop.s writes here unless given port=P
DEVICE_PORT = 0x3FF  # the UART's scratch register, in qkio and in QEMU: a device's port
UNOWNED_PORT = 0x500  # nobody's, in qkio and in QEMU microvm


class MmioAddress(int):
    """Where a port number would go, a guest-physical address: ``pio-loop`` then
    stores to it (``mmio=A``) instead of doing OUTs."""


UNOWNED_MMIO = MmioAddress(0xD0000000)  # nobody's, in qkio and in QEMU microvm (unassigned-mmio.s)
QEMU = "qemu-system-x86_64"
QEMU_ARGS = ("-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-nodefaults",
             "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04")
GUEST_EXIT_STATUS = 33  # the guests write 0x10 to isa-debug-exit: (0x10 << 1) | 1


class NullDevice:
    """A port that swallows writes and reads as 0 (QEMU's ioport80 does the same)."""

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        pass


class RunFailed(RuntimeError):
    pass


def cmdline(count: int, port: int | None = None, chunk: int | None = None) -> str:
    """The guest's command line: ``count=N``, and ``port=P`` (decimal; ``mmio=A``
    for an :class:`MmioAddress`) and ``chunk=K`` (``pio-loop`` times its OUTs in
    chunks of K) if given."""
    key = "mmio" if isinstance(port, MmioAddress) else "port"
    return (f"count={count}" + (f" {key}={int(port)}" if port is not None else "")
            + (f" chunk={chunk}" if chunk else ""))


def chunk_cycles(console: str) -> tuple[int, list[int]]:
    """``(K, [cycles of each chunk])`` from ``pio-loop``'s report line (``chunk=K``).

    Raises :class:`RunFailed` if the output holds no such line (the guest was
    not asked to time itself, or its output was lost).
    """
    for line in console.splitlines():
        if line.startswith("pio-loop: chunk="):
            head, _, tail = line.partition(" cycles:")
            return int(head.split("=", 1)[1]), [int(x) for x in tail.split()]
    raise RunFailed(f"no 'pio-loop: chunk=' line in the guest's output: {console[-200:]!r}")


def qkio_machine(elf, count: int, console=None, port: int | None = None,
                 chunk: int | None = None, **kw):
    """A qkio Machine with the guest loaded and a null device on the benchmark port."""
    from qkio.machine import Machine
    machine = Machine(memory_mib=8, console=console or (lambda data: None), **kw)
    try:
        machine.bus.register(BENCH_PORT, 1, NullDevice(), "bench-null")
        machine.load_multiboot(elf, append=cmdline(count, port, chunk))
    except BaseException:
        machine.close()
        raise
    return machine


def run_qkio(elf, count: int, setup=None, exit_path: str | None = None,
             port: int | None = None, chunk: int | None = None) -> tuple[float, dict]:
    """Seconds of ``Machine.run()``, the vCPU's exit counts and the guest's COM1
    output (``info["console"]``).  ``setup(machine)`` runs before the clock
    starts (e.g. to register an ioeventfd).  ``exit_path``: see
    :class:`qkio.machine.Machine` (None: native if it was built at install).  An
    unowned ``port`` is reported once, silently (a benchmark has no log)."""
    out = bytearray()
    machine = qkio_machine(elf, count, exit_path=exit_path, port=port, chunk=chunk,
                           console=out.extend, log=lambda message: None)
    machine.bus.on_unassigned = lambda *access: None
    try:
        extra = setup(machine) if setup else None
        t0 = time.perf_counter()
        status = machine.run(timeout=600)
        seconds = time.perf_counter() - t0
        if status != GUEST_EXIT_STATUS:
            raise RunFailed(f"qkio: guest ended with status {status}: {machine.exit_message}")
        info = {"exits": {int(k): v for k, v in machine.cpus[0].exit_counts.items()},
                "exit_path": machine.cpus[0].exit_path,
                "console": out.decode("ascii", errors="replace")}
        if extra is not None:
            info["setup"] = extra(machine) if callable(extra) else extra
        return seconds, info
    finally:
        machine.close()


def run_c(elf, count: int, ioeventfd_port: int | None = None,
          port: int | None = None, chunk: int | None = None) -> tuple[float, dict]:
    """Seconds of ``pio_ref``'s KVM_RUN loop, its exit count, the guest's TSC rate
    (``tsc_khz``) and COM1 output (``console``)."""
    argv = [str(build_c("pio_ref")), os.fspath(elf), cmdline(count, port, chunk)]
    if ioeventfd_port is not None:
        argv.append(hex(ioeventfd_port))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RunFailed(f"pio_ref failed ({r.returncode}): {r.stderr.strip()}")
    out = json.loads(r.stdout)
    return out["seconds"], {"exits": out["exits"], "tsc_khz": out["tsc_khz"],
                            "console": out["console"]}


def run_qemu(elf, count: int, port: int | None = None,
             chunk: int | None = None) -> tuple[float, dict]:
    """Wall seconds of a whole QEMU run of the guest, and its COM1 output
    (``info["console"]``: ``-serial stdio``, read from QEMU's stdout)."""
    argv = [QEMU, *QEMU_ARGS, "-serial", "stdio", "-kernel", os.fspath(elf),
            "-append", cmdline(count, port, chunk)]
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=600)
    seconds = time.perf_counter() - t0
    if r.returncode != GUEST_EXIT_STATUS:
        raise RunFailed(f"QEMU ended with status {r.returncode}: {r.stderr.decode(errors='replace').strip()}")
    return seconds, {"console": r.stdout.decode("ascii", errors="replace")}


def qemu_unusable_reason() -> str | None:
    """Why the reference QEMU cannot run here (not installed; no usable
    /dev/kvm for ``-accel kvm``), or None: the one probe the benchmarks and
    the tests ask before starting QEMU."""
    from shutil import which
    if which(QEMU) is None:
        return f"{QEMU} is not installed (Debian package qemu-system-x86)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not usable, and the reference runs use -accel kvm"
    return None


def have_qemu() -> bool:
    return qemu_unusable_reason() is None
