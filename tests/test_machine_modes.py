"""A guest entered in each of the three modes qkio sets up runs on real KVM.

The pure functions in qkio.boot.modes are unit-tested without KVM; this is
the other half: the state they describe, written into a vCPU by
qkio.cpu_init, is one the CPU accepts and executes.  Each guest is the same
four instructions encoded for its mode -- print one letter, then write 0x10
to isa-debug-exit -- so a wrong CR0, EFER, segment or page table shows up as
an entry failure, a triple fault or a wrong byte instead of status 33.
"""

import pytest

from qkio.machine import Machine

pytestmark = pytest.mark.kvm

# mov al, LETTER; mov dx, 0x3f8; out dx, al; mov dx, 0xf4; mov eax, 0x10; out dx, eax
# The operand-size prefixes (0x66) differ: 16-bit code needs one for the
# 32-bit mov/out, 32- and 64-bit code need one for the 16-bit mov to DX.
GUESTS = {
    "real": (0x1000, bytes([0xB0, ord("R"), 0xBA, 0xF8, 0x03, 0xEE, 0xBA, 0xF4, 0x00,
                            0x66, 0xB8, 0x10, 0, 0, 0, 0x66, 0xEF])),
    "protected": (0x100000, bytes([0xB0, ord("P"), 0x66, 0xBA, 0xF8, 0x03, 0xEE, 0x66, 0xBA, 0xF4, 0x00,
                                   0xB8, 0x10, 0, 0, 0, 0xEF])),
    "long": (0x100000, bytes([0xB0, ord("L"), 0x66, 0xBA, 0xF8, 0x03, 0xEE, 0x66, 0xBA, 0xF4, 0x00,
                              0xB8, 0x10, 0, 0, 0, 0xEF])),
}


@pytest.mark.parametrize("mode", list(GUESTS))
def test_guest_runs_in_mode(mode):
    address, code = GUESTS[mode]
    out = bytearray()
    with Machine(console=out.extend) as machine:
        machine.load_flat(code, mode=mode, address=address)
        status = machine.run(timeout=10)
        sregs = machine.cpus[0].vcpu.get_sregs()
    assert (status, bytes(out)) == (33, mode[0].upper().encode())
    # The mode really is the one asked for, as the CPU reports it.
    protected = bool(sregs.cr0 & 1)
    long_mode = bool(sregs.efer & (1 << 10))
    assert (protected, long_mode) == {"real": (False, False), "protected": (True, False),
                                      "long": (True, True)}[mode]
    # Caches on: KVM's reset CR0 has CD (bit 30) and NW (bit 29) set.
    assert sregs.cr0 & (3 << 29) == 0


def test_unknown_mode_is_refused():
    with Machine() as machine, pytest.raises(ValueError, match="mode must be"):
        machine.load_flat(b"\x90", mode="virtual8086")
