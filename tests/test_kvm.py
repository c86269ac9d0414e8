"""The KVM layer against the real /dev/kvm, with tiny hand-assembled guests.

Each test builds what it needs -- a VM, 64 KiB of guest RAM, one vCPU in real
mode with CS base 0 and RIP at ``CODE`` -- runs a few guest instructions and
checks what comes back through ``kvm_run``.  The guests are bytes, assembled
by hand and commented line by line; they are a dozen instructions at most,
because this host may interpret guests at about a million instructions a second.

Two rules for the guests:

* With an in-kernel irqchip, HLT does not exit to userspace (the kernel parks
  the vCPU until an interrupt), so no guest here ends in HLT.  A guest ends
  with an OUT, which always exits, or spins in ``jmp $`` until the test kicks it.
* Every fd is closed at teardown; ``test_every_fd_is_closed`` counts them.

Everything that needs /dev/kvm has the ``kvm`` marker: skipped with
:func:`qkio.kvm.probe`'s reason where KVM cannot create a VM.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import threading
import time

import pytest

from qkio.errors import KvmError, KvmUnavailable
from qkio.kvm import Cap, ExitReason, GuestMemory, Kvm, exits, probe
from qkio.kvm import constants as c
from qkio.kvm import structs as s
from qkio.kvm.ioctl import KVM_SET_TSS_ADDR
from qkio.kvm.vm import IDENTITY_MAP_ADDR, TSS_ADDR

RAM_SIZE = 0x10000
CODE = 0x1000      # where the guest's first instruction goes
COUNTER = 0x2000   # a 16-bit word some guests increment, to prove they ran
SPARE_PORT = 0x500  # no device anywhere claims it

IN, OUT = s.kvm_run_io.KVM_EXIT_IO_IN, s.kvm_run_io.KVM_EXIT_IO_OUT

# --- guests (16-bit real mode) --------------------------------------------------

TWO_OUTS = bytes([
    0xB0, 0x42,              # mov al, 0x42
    0xE6, 0x10,              # out 0x10, al          -> exit: port 0x10, 1 byte, 42
    0xB8, 0x34, 0x12,        # mov ax, 0x1234
    0xBA, 0xF8, 0x03,        # mov dx, 0x3f8
    0xEF,                    # out dx, ax            -> exit: port 0x3f8, 2 bytes, 34 12
])

IN_THEN_ECHO = bytes([
    0xBA, 0x60, 0x00,        # mov dx, 0x60
    0xEC,                    # in al, dx             -> exit: IN port 0x60, 1 byte
    0xE6, 0x11,              # out 0x11, al          -> exit: echoes the VMM's byte
    0x66, 0xED,              # in eax, dx            -> exit: IN port 0x60, 4 bytes
    0x66, 0xE7, 0x12,        # out 0x12, eax         -> exit: echoes the VMM's dword
])

COUNT_THEN_OUT = bytes([
    0xFF, 0x06, 0x00, 0x20,  # inc word [0x2000]
    0xE6, 0x11,              # out 0x11, al          -> exit
])

COUNT_FOREVER = bytes([
    0xFF, 0x06, 0x00, 0x20,  # again: inc word [0x2000]
    0xEB, 0xFA,              #        jmp again      (never exits by itself)
])

N_DOORBELLS = 5
DOORBELLS = bytes([
    0xBA, 0x00, 0x05,        # mov dx, 0x500
    0xB0, 0x01,              # mov al, 1
    0xB9, N_DOORBELLS, 0x00,  # mov cx, N_DOORBELLS
    0xEE,                    # again: out dx, al     (ioeventfd: no exit)
    0xE2, 0xFD,              #        loop again
    0xE6, 0x11,              # out 0x11, al          -> exit: the first one userspace sees
    0xEE,                    # out dx, al            -> exit once the ioeventfd is gone
])


class Machine:
    """A VM with ``RAM_SIZE`` bytes at guest-physical 0 and one real-mode vCPU."""

    def __init__(self, stack: contextlib.ExitStack, *, irqchip: bool = False):
        self.kvm = stack.enter_context(Kvm())
        self.vm = stack.enter_context(self.kvm.create_vm())
        self.vm.set_tss_addr()
        if irqchip:
            self.vm.create_irqchip()  # before any vCPU, so each gets an in-kernel LAPIC
        self.mem = stack.enter_context(GuestMemory(RAM_SIZE))
        self.vm.set_user_memory_region(0, 0, self.mem)
        self.vcpu = self.vm.create_vcpu(0)
        stack.callback(self.vcpu.close)

    def load(self, code: bytes) -> None:
        """Put ``code`` at ``CODE`` and point CS:IP at it (the reset state has CS at 0xf000:fff0)."""
        self.mem.write(CODE, code)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 0x2  # bit 1 of RFLAGS is always set
        self.vcpu.set_regs(regs)

    def run_to_io(self) -> tuple[int, int, int, bytes]:
        """Run until an exit, which must be KVM_EXIT_IO; return (direction, port, size, data)."""
        reason = self.vcpu.run()
        assert reason == ExitReason.IO, f"expected KVM_EXIT_IO, got {ExitReason(reason)!r}"
        io = self.vcpu.kvm_run.exit.io
        assert io.count == 1
        return io.direction, io.port, io.size, bytes(self.vcpu.io_data())

    def counter(self) -> int:
        return int.from_bytes(self.mem.read(COUNTER, 2), "little")


@pytest.fixture
def machine():
    with contextlib.ExitStack() as stack:
        yield Machine(stack)


@pytest.fixture
def irqchip_machine():
    with contextlib.ExitStack() as stack:
        yield Machine(stack, irqchip=True)


@pytest.fixture
def kvm():
    with Kvm() as k:
        yield k


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- /dev/kvm ---------------------------------------------------------------------

@pytest.mark.kvm
def test_api_version_is_12(kvm):
    assert kvm.get_api_version() == c.KVM_API_VERSION == 12


@pytest.mark.kvm
def test_capabilities(kvm):
    caps = kvm.capabilities()
    assert set(caps) == {cap.name for cap in Cap}
    # What the rest of qkio, and these tests, rely on.
    for name in ("USER_MEMORY", "SET_TSS_ADDR", "IRQCHIP", "IOEVENTFD", "IMMEDIATE_EXIT", "MP_STATE"):
        assert caps[name] > 0, f"KVM_CAP_{name} is missing"
    assert 1 <= caps["NR_VCPUS"] <= caps["MAX_VCPUS"]
    assert caps["NR_MEMSLOTS"] >= 1
    assert kvm.check_extension(0xFFFF) == 0  # an unknown capability is "absent", not an error


@pytest.mark.kvm
def test_vcpu_mmap_size(kvm):
    size = kvm.get_vcpu_mmap_size()
    assert size % mmap.PAGESIZE == 0
    assert size >= ctypes.sizeof(s.kvm_run)


@pytest.mark.kvm
def test_supported_cpuid(kvm):
    cpuid = kvm.get_supported_cpuid()
    assert 0 < cpuid.nent <= len(cpuid.entries)
    leaves = {(e.function, e.index): e for e in cpuid.entries[:cpuid.nent]}
    leaf0 = leaves[(0, 0)]
    vendor = b"".join(v.to_bytes(4, "little") for v in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    assert len(vendor) == 12 and vendor.isascii(), vendor
    assert leaf0.eax >= 1 and (1, 0) in leaves  # the highest basic leaf, and leaf 1 itself


def test_missing_device_is_kvm_unavailable():
    with pytest.raises(KvmUnavailable, match="/nonexistent does not exist"):
        Kvm("/nonexistent")


def test_non_kvm_device_is_kvm_unavailable():
    before = open_fds()
    with pytest.raises(KvmUnavailable) as info:
        Kvm("/dev/null")
    message = str(info.value)
    assert "/dev/null is not a KVM device" in message
    assert "KVM_GET_API_VERSION" in message and os.strerror(errno.ENOTTY) in message
    assert open_fds() == before  # the fd it opened to find out is closed again


# --- VM ioctls ----------------------------------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("slot, gpa", [(0, 0x20001), (0xFFFF, 0x20000)],
                         ids=["unaligned-address", "slot-out-of-range"])
def test_failing_ioctl_raises_kvm_error_naming_ioctl_and_errno(kvm, slot, gpa):
    with kvm.create_vm() as vm, GuestMemory(0x1000) as mem:
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(slot, gpa, mem)
    e = info.value
    assert e.errno == errno.EINVAL and e.ioctl_name == "KVM_SET_USER_MEMORY_REGION"
    assert str(e) == f"KVM_SET_USER_MEMORY_REGION failed: EINVAL ({os.strerror(errno.EINVAL)})"


@pytest.mark.kvm
def test_set_tss_addr_above_int_max(kvm):
    """0xfffbd000 > INT_MAX: fcntl.ioctl cannot pass it by value, qkio's ctypes call can."""
    assert TSS_ADDR == 0xFFFBD000 > 2**31 - 1
    with kvm.create_vm() as vm:
        with pytest.raises(OverflowError):
            fcntl.ioctl(vm.fd, KVM_SET_TSS_ADDR, TSS_ADDR)
        vm.set_tss_addr(TSS_ADDR)
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)


@pytest.mark.kvm
def test_irq_line_needs_an_irqchip(machine):
    with pytest.raises(KvmError) as info:
        machine.vm.set_irq_line(4, 1)
    assert info.value.errno == errno.ENXIO and info.value.ioctl_name == "KVM_IRQ_LINE"


@pytest.mark.kvm
def test_irq_line_after_create_irqchip(irqchip_machine):
    vm = irqchip_machine.vm
    for irq in (0, 4, 15):
        vm.set_irq_line(irq, 1)
        vm.set_irq_line(irq, 0)  # an edge is 1 then 0


@pytest.mark.kvm
def test_pit2_and_irqfd(irqchip_machine):
    vm = irqchip_machine.vm
    vm.create_pit2()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        vm.irqfd(efd, 5)
        os.eventfd_write(efd, 1)  # pulses GSI 5 inside the kernel
        vm.irqfd(efd, 5, deassign=True)
    finally:
        os.close(efd)


@pytest.mark.kvm
def test_ioeventfd_completes_guest_writes_in_the_kernel(machine):
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        machine.vm.ioeventfd(efd, SPARE_PORT, 1)
        machine.load(DOORBELLS)
        # The N OUTs to SPARE_PORT never reach userspace: the first exit is port 0x11.
        assert machine.run_to_io()[:2] == (OUT, 0x11)
        assert os.eventfd_read(efd) == N_DOORBELLS
        machine.vm.ioeventfd(efd, SPARE_PORT, 1, deassign=True)
        # Without the ioeventfd, the same OUT is an ordinary exit.
        assert machine.run_to_io() == (OUT, SPARE_PORT, 1, b"\x01")
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
    finally:
        os.close(efd)


# --- running the guest ---------------------------------------------------------------

@pytest.mark.kvm
def test_out_exits_carry_port_size_direction_and_data(machine):
    machine.load(TWO_OUTS)
    assert machine.run_to_io() == (OUT, 0x10, 1, b"\x42")
    assert machine.run_to_io() == (OUT, 0x3F8, 2, b"\x34\x12")
    assert machine.vcpu.get_regs().rip == CODE + len(TWO_OUTS)


@pytest.mark.kvm
def test_in_reads_what_the_vmm_wrote_into_io_data(machine):
    machine.load(IN_THEN_ECHO)
    assert machine.run_to_io()[:3] == (IN, 0x60, 1)
    machine.vcpu.io_data()[:] = b"\xa5"  # the answer, completed by the next KVM_RUN
    assert machine.run_to_io() == (OUT, 0x11, 1, b"\xa5")
    assert machine.run_to_io()[:3] == (IN, 0x60, 4)
    machine.vcpu.io_data()[:] = b"\x01\x02\x03\x04"
    assert machine.run_to_io() == (OUT, 0x12, 4, b"\x01\x02\x03\x04")
    assert machine.vcpu.get_regs().rax & 0xFFFFFFFF == 0x04030201


@pytest.mark.kvm
def test_exits_decode_into_typed_values(machine):
    machine.load(IN_THEN_ECHO)
    vcpu = machine.vcpu
    first = vcpu.run_exit()
    assert isinstance(first, exits.IoIn) and (first.port, first.size, first.count) == (0x60, 1, 1)
    vcpu.run_page[first.data_offset] = 0x5A  # the IN's answer, as handle_io would write it
    assert vcpu.run_exit() == exits.IoOut(port=0x11, size=1, data=b"\x5a")
    vcpu.immediate_exit = 1
    assert vcpu.run_exit() == exits.Intr()
    vcpu.immediate_exit = 0


@pytest.mark.kvm
def test_a_triple_fault_decodes_as_shutdown_and_is_described(machine):
    # lidt with limit 0, then int3: no IDT entry -> #GP -> #DF -> shutdown.
    # (A divide error first: this host's kvm_pvm cannot emulate int3.)
    machine.mem.write(0x3000, bytes(6))  # the empty IDT descriptor
    machine.load(bytes([0x0F, 0x01, 0x1E, 0x00, 0x30,   # lidt [0x3000]
                        0x31, 0xC9,                     # xor cx, cx
                        0xF7, 0xF1,                     # div cx
                        0xCC]))                         # int3
    reason = machine.vcpu.run()
    exit = machine.vcpu.exit(reason)
    assert exit == exits.Shutdown()
    message = exits.describe_failure(machine.vcpu, exit)
    assert message.startswith("guest triple-faulted (KVM_EXIT_SHUTDOWN) on vCPU 0 at RIP=")


def test_kvm_run_errno_mapping():
    import errno
    assert exits.reason_for_errno(errno.EINTR) == ExitReason.INTR
    assert exits.reason_for_errno(errno.EAGAIN) == exits.EXIT_AGAIN
    with pytest.raises(KvmError, match="KVM_RUN failed: EBADF"):
        exits.reason_for_errno(errno.EBADF)
    assert exits.exit_name(exits.EXIT_AGAIN) == "EAGAIN" and exits.exit_name(2) == "IO"


@pytest.mark.kvm
def test_immediate_exit_returns_intr_without_running_the_guest(machine):
    machine.load(COUNT_THEN_OUT)
    vcpu = machine.vcpu
    vcpu.immediate_exit = 1
    assert vcpu.run() == ExitReason.INTR
    assert machine.counter() == 0 and vcpu.get_regs().rip == CODE  # not one instruction ran
    assert vcpu.run() == ExitReason.INTR  # it stays set until the VMM clears it
    vcpu.immediate_exit = 0
    assert machine.run_to_io()[:2] == (OUT, 0x11)
    assert machine.counter() == 1


@pytest.mark.kvm
@pytest.mark.timeout(60)
def test_pthread_kill_kicks_a_thread_out_of_kvm_run(machine):
    """A signal with a (no-op) handler interrupts KVM_RUN in the thread it is sent to.

    Python runs the handler itself later, in the main thread; what matters is
    the kernel: the targeted thread's ioctl returns EINTR.  A signal that
    lands before the thread has entered KVM_RUN is lost for this purpose, so
    the test kicks until the thread comes out (qkio's real kick also sets
    ``immediate_exit`` first, which closes that window).
    """
    machine.load(COUNT_FOREVER)
    vcpu, results = machine.vcpu, []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        thread = threading.Thread(target=lambda: results.append(vcpu.run()),
                                  name="vcpu0", daemon=True)
        thread.start()
        deadline = time.monotonic() + 5
        while machine.counter() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the guest is demonstrably running
        while thread.is_alive() and time.monotonic() < deadline:
            signal.pthread_kill(thread.ident, signal.SIGUSR1)
            thread.join(0.05)
        if thread.is_alive():  # do not leave a spinning thread behind
            vcpu.immediate_exit = 1
            signal.pthread_kill(thread.ident, signal.SIGUSR1)
            thread.join(5)
            pytest.fail("SIGUSR1 did not interrupt KVM_RUN within 5 s")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert results == [ExitReason.INTR]
    assert vcpu.kvm_run.exit_reason == ExitReason.INTR  # a signal, unlike immediate_exit, sets it
    assert machine.counter() > 0


@pytest.mark.kvm
def test_set_signal_mask(machine):
    machine.vcpu.set_signal_mask(bytes(8))  # the kernel's sigset_t is 8 bytes on x86-64
    blocked = (1 << (signal.SIGUSR1 - 1)).to_bytes(8, "little")
    machine.vcpu.set_signal_mask(blocked)
    with pytest.raises(KvmError) as info:
        machine.vcpu.set_signal_mask(bytes(16))  # glibc's 128-byte sigset_t size is not it either
    assert info.value.errno == errno.EINVAL and info.value.ioctl_name == "KVM_SET_SIGNAL_MASK"
    machine.vcpu.set_signal_mask(None)


# --- vCPU state ------------------------------------------------------------------------

@pytest.mark.kvm
def test_regs_round_trip(machine):
    vcpu = machine.vcpu
    regs = s.kvm_regs()
    names = [name for name, *_ in s.kvm_regs._fields_]
    for i, name in enumerate(names):
        setattr(regs, name, 0x1111_0000_0000_0000 * (i % 15 + 1) + i)
    regs.rip, regs.rflags = 0x1234, 0x202
    vcpu.set_regs(regs)
    assert bytes(vcpu.get_regs()) == bytes(regs)


@pytest.mark.kvm
def test_sregs_round_trip(machine):
    vcpu = machine.vcpu
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0x12340, 0x1234
    sregs.ds.base, sregs.ds.selector = 0x5670, 0x567
    sregs.gdt.base, sregs.gdt.limit = 0x3000, 0x27
    sregs.idt.base, sregs.idt.limit = 0x4000, 0x3FF
    sregs.cr2 = 0xDEAD000
    vcpu.set_sregs(sregs)
    back = vcpu.get_sregs()
    assert (back.cs.base, back.cs.selector, back.ds.base, back.ds.selector) == (0x12340, 0x1234, 0x5670, 0x567)
    assert (back.gdt.base, back.gdt.limit, back.idt.base, back.idt.limit) == (0x3000, 0x27, 0x4000, 0x3FF)
    assert back.cr2 == 0xDEAD000 and back.cr0 == sregs.cr0 and back.efer == sregs.efer
    vcpu.set_sregs(back)
    assert bytes(vcpu.get_sregs()) == bytes(back)  # and unchanged when written back as read


@pytest.mark.kvm
def test_fpu_round_trip(machine):
    vcpu = machine.vcpu
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x027F
    fpu.xmm[0][:] = bytes(range(16))
    fpu.xmm[15][:] = bytes(range(16, 32))
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)
    back = vcpu.get_fpu()
    assert back.fcw == 0x027F
    assert bytes(back.xmm[0]) == bytes(range(16)) and bytes(back.xmm[15]) == bytes(range(16, 32))


@pytest.mark.kvm
def test_lapic_round_trip(irqchip_machine):
    vcpu = irqchip_machine.vcpu
    lapic = vcpu.get_lapic()
    regs = bytearray(bytes(lapic.regs))
    regs[0x80:0x84] = (0x20).to_bytes(4, "little")   # TPR
    regs[0xF0:0xF4] = (0x1FF).to_bytes(4, "little")  # spurious vector 0xff, APIC enabled
    ctypes.memmove(lapic.regs, bytes(regs), len(regs))
    vcpu.set_lapic(lapic)
    back = bytes(vcpu.get_lapic().regs)
    assert back[0x80:0x84] == (0x20).to_bytes(4, "little")
    assert back[0xF0:0xF4] == (0x1FF).to_bytes(4, "little")


@pytest.mark.kvm
def test_mp_state_round_trip(irqchip_machine):
    vcpu = irqchip_machine.vcpu
    assert vcpu.get_mp_state() == c.KVM_MP_STATE_RUNNABLE  # vCPU 0 is the boot processor
    vcpu.set_mp_state(c.KVM_MP_STATE_HALTED)
    assert vcpu.get_mp_state() == c.KVM_MP_STATE_HALTED
    vcpu.set_mp_state(c.KVM_MP_STATE_RUNNABLE)
    assert vcpu.get_mp_state() == c.KVM_MP_STATE_RUNNABLE


IA32_SYSENTER_CS = 0x174


@pytest.mark.kvm
def test_msrs_round_trip(machine):
    vcpu = machine.vcpu
    assert vcpu.set_msrs({IA32_SYSENTER_CS: 0x10}) == 1
    assert vcpu.get_msrs([IA32_SYSENTER_CS]) == {IA32_SYSENTER_CS: 0x10}


@pytest.mark.kvm
def test_set_msrs_with_a_bogus_index_names_the_msr(machine):
    with pytest.raises(KvmError) as info:
        machine.vcpu.set_msrs({IA32_SYSENTER_CS: 0x10, 0xDEADBEEF: 1})
    assert info.value.ioctl_name == "KVM_SET_MSRS"
    assert "MSR 0xdeadbeef" in str(info.value)


# --- ownership -------------------------------------------------------------------------

@pytest.mark.kvm
def test_every_fd_is_closed():
    """A whole life -- open, map, run, ioeventfd, close -- leaves the fd table as it found it."""
    before = open_fds()
    with contextlib.ExitStack() as stack:
        m = Machine(stack, irqchip=True)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        stack.callback(os.close, efd)
        m.vm.ioeventfd(efd, SPARE_PORT, 1)
        m.load(DOORBELLS)
        assert m.run_to_io()[:2] == (OUT, 0x11)
        assert len(open_fds()) >= len(before) + 5  # kvm, vm, vcpu (+ the mmap's dup), eventfd
    assert open_fds() == before
    assert (m.kvm.fd, m.vm.fd, m.vcpu.fd) == (-1, -1, -1)
    m.vcpu.close(), m.vm.close(), m.kvm.close(), m.mem.close()  # closing twice is harmless


@pytest.mark.kvm
def test_vcpu_close_with_a_live_view_of_kvm_run():
    """A view of kvm_run held past close() does not make close() fail; the mapping goes with it."""
    before = open_fds()
    with contextlib.ExitStack() as stack:
        m = Machine(stack)
        m.load(TWO_OUTS)
        m.run_to_io()
        io = m.vcpu.kvm_run.exit.io  # a ctypes view into the mmap, kept alive
    assert m.vcpu.fd == -1 and io.port == 0x10  # still mapped: readable, no crash
    del io
    assert open_fds() == before


def test_probe_honours_qkio_no_kvm(monkeypatch):
    monkeypatch.setenv("QKIO_NO_KVM", "1")
    assert probe() == "QKIO_NO_KVM is set in the environment"
    monkeypatch.setenv("QKIO_NO_KVM", "0")
    assert probe() is None or "QKIO_NO_KVM" not in probe()


def test_probe_names_a_missing_device(tmp_path, monkeypatch):
    monkeypatch.delenv("QKIO_NO_KVM", raising=False)
    reason = probe(str(tmp_path / "kvm"))
    assert reason is not None and "does not exist" in reason and "\n" not in reason
