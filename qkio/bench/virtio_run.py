"""Running the virtio-blk guest on qkio and on QEMU's microvm, the same way each time.

Shared by the tests, the book and ``qkio bench virtio``.  QEMU gets the
command line of issue 14 (the microvm machine, no ACPI, virtio-mmio in its
1.x layout, the disk on a virtio-blk-device, optionally in an IOThread).
"""

from __future__ import annotations

import os
import resource
import subprocess
import time

from .guest_run import QEMU  # the one reference QEMU, found on PATH

GUEST = "virtio-blk"


def qemu_microvm_argv(kernel, image, *, iothread: bool = False, count: int | None = None,
                      serial: str | None = None) -> list[str]:
    device = "virtio-blk-device,drive=d0" + (",iothread=io0" if iothread else "") \
        + (f",serial={serial}" if serial else "")
    argv = [QEMU, "-M", "microvm,acpi=off", "-accel", "kvm", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", str(kernel),
            "-drive", f"id=d0,file={image},if=none,format=raw", "-device", device]
    if iothread:
        argv += ["-object", "iothread,id=io0"]
    if count is not None:
        argv += ["-append", f"count={count}"]
    return argv


def run_qemu(kernel, image, *, iothread: bool = False, count: int | None = None,
             serial: str | None = None, timeout: float = 120) -> dict:
    """Run QEMU to the guest's exit: status, output, wall seconds, and the CPU time
    (user + system) of the whole QEMU process, from ``wait4``'s rusage."""
    argv = qemu_microvm_argv(kernel, image, iothread=iothread, count=count, serial=serial)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    wall = time.monotonic() - t0
    # communicate() reaped it; the children's rusage grows by exactly that child.
    return {"status": proc.returncode, "output": out.decode("latin-1"), "stderr": err.decode("latin-1"),
            "wall_s": wall}


def run_qemu_cpu(kernel, image, **kw) -> dict:
    """:func:`run_qemu` plus ``cpu_s``: the QEMU process's user+system CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_qemu(kernel, image, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def guest_report(output: str) -> list[str]:
    """The guest's lines that must be equal on every VMM: all but the TSC timing and, with
    irq=1, the number of interrupts taken (a completion that lands before the guest
    reaches HLT needs none, so that number depends on timing)."""
    return [line for line in output.splitlines()
            if line.startswith("virtio-blk:") and "tsc cycles" not in line
            and not line.startswith("virtio-blk: interrupts")]


def fresh_image(path, sectors: int = 128) -> str:
    """A zeroed raw image of ``sectors`` sectors at ``path``."""
    with open(path, "wb") as f:
        f.truncate(sectors * 512)
    return os.fspath(path)
