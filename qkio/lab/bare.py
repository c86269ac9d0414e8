"""The bare KVM API, by hand: what chapter 1 and its appendix drive guests with.

No threads, no devices, no firmware: a real-mode program assembled from
source, one VM, one vCPU, and a loop that calls ``KVM_RUN`` and looks at each
exit.  Chapter 1 shows these functions as it uses them; the appendix on the
KVM API reuses them for its smaller guests.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from ..kvm import ExitReason, GuestMemory, Kvm

#: Guest physical address where the programs are loaded (segment 0x0100).
LOAD_ADDRESS = 0x1000
#: RAM of a VM made by :func:`real_mode_vm`, from guest physical address 0.
MEMORY_SIZE = 64 * 1024
#: ``kvm_run.io.direction``.
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
#: isa-debug-exit's port: the guests write here when they are done.
DEBUG_EXIT_PORT = 0xF4

class Exit(NamedTuple):
    """One exit as :func:`run_by_hand` saw it."""
    reason: str
    direction: str | None = None
    port: int | None = None
    size: int | None = None
    data: bytes | None = None


def assemble(source: str) -> tuple[bytes, dict[str, int]]:
    """Assemble GNU ``as`` source; return the .text bytes and each label's offset."""
    with tempfile.TemporaryDirectory() as scratch:
        src, obj, raw = (Path(scratch, name) for name in ("guest.s", "guest.o", "guest.bin"))
        src.write_text(source)
        subprocess.run(["as", "--32", "-o", obj, src], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, raw], check=True)
        nm = subprocess.run(["nm", obj], check=True, capture_output=True, text=True).stdout
        labels = {name: int(value, 16) for value, _, name in map(str.split, nm.splitlines())}
        return raw.read_bytes(), labels


def enter_real_mode(vcpu, segment: int, ip: int = 0) -> None:
    """Point CS:IP at segment:ip, with DS = CS, in real mode."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds):
        seg.selector, seg.base = segment, segment << 4
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = ip, 0x2
    vcpu.set_regs(regs)


def run_by_hand(vcpu, *, answer_in: int | None = None, limit: int = 1000) -> list[Exit]:
    """KVM_RUN until the guest writes to port 0xf4 or exits for another reason.

    Returns every exit taken. An IN gets ``answer_in`` if it is given;
    otherwise we leave the data as the kernel handed it to us.
    """
    exits: list[Exit] = []
    while len(exits) < limit:
        reason = ExitReason(vcpu.run())
        if reason != ExitReason.IO:
            exits.append(Exit(reason.name))
            return exits
        io = vcpu.kvm_run.exit.io
        direction = "out" if io.direction == KVM_EXIT_IO_OUT else "in"
        data = vcpu.io_data()  # the io.size * io.count bytes at data_offset
        if direction == "in" and answer_in is not None:
            data[:] = bytes([answer_in]) * len(data)
        exits.append(Exit("IO", direction, io.port, io.size, bytes(data)))
        if direction == "out" and io.port == DEBUG_EXIT_PORT:
            return exits
    raise RuntimeError(f"the guest is still running after {limit} exits")


@contextlib.contextmanager
def real_mode_vm(code: bytes, *, irqchip: bool = False):
    """A VM with 64 KiB of RAM, ``code`` at 0x1000, and one vCPU about to run it.

    ``irqchip`` creates the in-kernel interrupt controllers before the vCPU
    (KVM_CREATE_IRQCHIP gives a local APIC to the vCPUs created after it).
    Every fd is closed when the block ends: vCPU, VM, memory, /dev/kvm.
    """
    with Kvm() as kvm, GuestMemory(MEMORY_SIZE) as memory, kvm.create_vm() as vm:
        vm.set_tss_addr()
        if irqchip:
            vm.create_irqchip()
        vm.set_user_memory_region(slot=0, guest_phys_addr=0, memory=memory)
        memory.write(LOAD_ADDRESS, code)
        vcpu = vm.create_vcpu(0)
        try:
            enter_real_mode(vcpu, LOAD_ADDRESS >> 4)
            yield vcpu
        finally:
            vcpu.close()
