"""qkio's guests (qkio/guests) as kernels: qkio's loader places them as the ELF
says, and QEMU -- the reference qkio must match -- runs them as expected.
(That they build, are cached and are Multiboot ELF32 files is tests/test_guests.py.)

No KVM run happens through qkio here; that belongs to the VM's own tests.
The QEMU tests are the other half of the contract: they show what a guest
sees under ``qemu-system-x86_64 -kernel``, and pin the loader's choices to
it.  What QEMU 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18) printed on this
project's machine:

* ``hello``:   ``Hello from qkio's guest``, exit status 33.
* ``cmdline`` (at ``/img/cmdline.elf``; any path) without ``-append``: ``cmdline='/img/cmdline.elf '`` -- the
  kernel's path and a space, even when nothing is appended.
* ``cmdline -append "a b"``: ``cmdline='/img/cmdline.elf a b'``.
* ``unassigned``: ``ff``.
* ``echo``: gives back what it is sent once it runs; a byte typed during
  SeaBIOS is lost.  After ``q``, exit status 1.
* ``triple`` with ``-no-reboot``: no output, exit status 0.  (An ``int3``
  first instead stops QEMU with "KVM internal error. Suberror: 1" on this
  host's kvm_pvm, hence the divide by zero; see kvm-facts.md.)
* At the kernel's entry ESP was 0x6f08, left over from SeaBIOS: Multiboot
  leaves the stack undefined, and every test kernel sets its own.
* ``mbinfo`` (``-m 128``): flags 0x24f, mem_lower 0x27f, mem_upper 0x1fb80,
  boot_device 0x8000ffff, mmap at 0x9000 with 8 entries of size 20 --
  [0, 0x9fc00) RAM, [0x9fc00, 0xa0000) reserved, [0xf0000, 0x100000)
  reserved, [0x100000, 0x7fe0000) RAM, then reserved: 0x7fe0000 (128 KiB,
  SeaBIOS), 0xfeffc000 (16 KiB, KVM TSS), 0xfffc0000 (256 KiB, BIOS ROM)
  and 0xfd00000000 (12 GiB, the AMD HyperTransport hole) -- and the boot
  loader name 'qemu'.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from helpers.vmm import needs_qemu
from qkio import guests
from qkio.bench.guest_run import QEMU
from qkio.boot import multiboot as mb
from qkio.boot.elf import parse_elf
from qkio.kvm.memory import GuestMemory

QEMU_TIMEOUT = 120  # seconds; SeaBIOS plus a tiny kernel take about 3 s here
HELLO = "Hello from qkio's guest\n"

needs_toolchain = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                     reason="GNU as and ld are needed to build the guests")


@pytest.fixture(scope="session")
def kernels():
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU as and ld are needed to build the guests")
    return {name: guests.build_guest(name) for name in guests.GUESTS}


@needs_toolchain
@pytest.mark.parametrize("name", sorted(guests.GUESTS))
def test_kernel_loads(kernels, name):
    image = kernels[name].read_bytes()
    parsed = parse_elf(image)
    with GuestMemory(8 << 20) as memory:
        boot = mb.load_multiboot(image, memory, kernel_path=str(kernels[name]), append="x=1")
        start, end = boot.kernel_range
        assert start == 0x100000 and start <= boot.entry < end
        assert boot.entry == parsed.entry
        for ph in parsed.load_segments:
            assert memory.read(ph.paddr, ph.filesz) == ph.data(image)
            assert memory.read(ph.paddr + ph.filesz, ph.memsz - ph.filesz) == bytes(ph.memsz - ph.filesz)
        assert boot.cmdline == f"{kernels[name]} x=1"
        assert boot.cpu_state.regs["rip"] == boot.entry


def run_qemu(kernel: Path, *extra: str, stdin: bytes = b"", memory_mib: int | None = None,
             timeout: float = QEMU_TIMEOUT):
    argv = [QEMU, "-accel", "kvm", "-M", "pc", "-nodefaults", "-nographic", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(kernel), *extra]
    if memory_mib:
        argv += ["-m", str(memory_mib)]
    result = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
    out = result.stdout.decode("latin-1")
    # SeaBIOS clears the screen and says where it boots from; the kernel's
    # output is everything after that.  On a busy host it sometimes prints a
    # third dot and a line break before the kernel starts ("Booting from
    # ROM...\r\n", seen once in CI), so the dots and that break go too.
    parts = re.split(r"Booting from ROM\.+(?:\r\n)?", out, maxsplit=1)
    return result.returncode, parts[1] if len(parts) == 2 else out


@needs_toolchain
@needs_qemu
def test_qemu_hello(kernels):
    status, out = run_qemu(kernels["hello"])
    assert out == HELLO
    assert status == 33  # (0x10 << 1) | 1 from isa-debug-exit


@needs_toolchain
@needs_qemu
@pytest.mark.parametrize("append", [None, "", "a b", "console=ttyS0  two  spaces"])
def test_qemu_cmdline_matches_the_loader(kernels, append):
    kernel = kernels["cmdline"]
    status, out = run_qemu(kernel, *(["-append", append] if append is not None else []))
    assert status == 33
    with GuestMemory(8 << 20) as memory:
        boot = mb.load_multiboot(kernel.read_bytes(), memory, kernel_path=str(kernel), append=append or "")
    assert out == f"cmdline='{boot.cmdline}'\n"
    assert boot.cmdline == f"{kernel} {append or ''}"  # a trailing space when nothing is appended


@needs_toolchain
@needs_qemu
def test_qemu_unassigned_port_reads_ff(kernels):
    status, out = run_qemu(kernels["unassigned"])
    assert (status, out) == (33, "ff\n")


@needs_toolchain
@needs_qemu
def test_qemu_echo(kernels):
    # Type only once the kernel runs: a byte sent earlier is lost to the
    # firmware before the guest ever polls the UART.
    argv = [QEMU, "-accel", "kvm", "-M", "pc", "-nodefaults", "-nographic", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(kernels["echo"])]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as qemu:
        watchdog = threading.Timer(QEMU_TIMEOUT, qemu.kill)  # the reads below block
        watchdog.start()
        try:
            seen = b""
            while not seen.endswith(b"Booting from ROM.."):
                byte = qemu.stdout.read(1)
                assert byte, f"QEMU ended before the kernel started: {seen!r}"
                seen += byte
            qemu.stdin.write(b"echo me q")
            qemu.stdin.flush()
            out = qemu.stdout.read()
            status = qemu.wait(timeout=QEMU_TIMEOUT)
        finally:
            watchdog.cancel()
            qemu.kill()
    assert out == b"echo me q"
    assert status == 1  # value 0 -> (0 << 1) | 1


@needs_toolchain
@needs_qemu
def test_qemu_triple_fault(kernels):
    # -no-reboot turns the shutdown a triple fault causes into QEMU exiting 0.
    status, out = run_qemu(kernels["triple"], "-no-reboot")
    assert (status, out) == (0, "")


@needs_toolchain
@needs_qemu
def test_qemu_spin_never_exits(kernels):
    with pytest.raises(subprocess.TimeoutExpired):
        run_qemu(kernels["spin"], timeout=8)  # SeaBIOS alone takes about 3 s


def _parse_mbinfo(out: str):
    words = {int(k, 16): int(v, 16) for k, v in re.findall(r"^mbi\+([0-9a-f]{2})=([0-9a-f]{8})$", out, re.M)}
    modules = [(int(a, 16), int(b, 16), line)
               for a, b, line in re.findall(r"^module ([0-9a-f]{8})-([0-9a-f]{8}) '(.*)'$", out, re.M)]
    mmap = [(int(s, 16), int(b, 16), int(n, 16), int(t, 16))
            for s, b, n, t in re.findall(r"^mmap size=(\w+) base=(\w+) len=(\w+) type=(\w+)$", out, re.M)]
    loader = re.search(r"^loader='(.*)'$", out, re.M).group(1)
    return words, modules, mmap, loader


@needs_toolchain
@needs_qemu
def test_qemu_information_structure_matches_the_loader(kernels, tmp_path):
    """Everything but the memory map and mem_upper is laid out exactly as QEMU lays it out."""
    kernel = kernels["mbinfo"]
    (tmp_path / "m1").write_bytes(b"abc")
    (tmp_path / "m2,z").write_bytes(bytes(range(256)) * 20)
    initrd = f"{tmp_path}/m1 x=1 y,{tmp_path}/m2,,z"
    status, out = run_qemu(kernel, "-initrd", initrd, "-append", "a b", memory_mib=64)
    assert status == 33
    words, modules, mmap, loader = _parse_mbinfo(out)
    assert len(words) == 22

    with GuestMemory(64 << 20) as memory:
        boot = mb.load_multiboot(
            kernel.read_bytes(), memory, kernel_path=str(kernel), append="a b",
            modules=[(Path(mb.module_file(item)).read_bytes(), item) for item in mb.split_initrd_option(initrd)])
        ours = dict(enumerate(struct.unpack("<22I", memory.read(mb.INFO_ADDR, mb.INFO_SIZE))))
    ours = {i * 4: v for i, v in ours.items()}

    differs = {0x08, 0x2C}  # mem_upper and mmap_length: SeaBIOS's map vs ours (see multiboot.py)
    assert {k: v for k, v in words.items() if k not in differs} == {k: v for k, v in ours.items() if k not in differs}
    assert modules == [(m.start, m.end, m.cmdline) for m in boot.modules]
    assert loader == mb.BOOTLOADER_NAME == "qemu"
    # The map differs only above the 1 MiB RAM entry's start: the low part is the same.
    assert mmap[:3] == [(20, r.base, r.length, r.type) for r in boot.memory_map[:3]]
    assert mmap[3][1] == boot.memory_map[3].base == 0x100000
