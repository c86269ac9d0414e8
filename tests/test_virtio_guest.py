"""The virtio-blk guest, unchanged, on qkio in each notify mode and on QEMU's microvm
(with and without an IOThread): the same verified report everywhere, and in qkio
the thread that took each notify is the one the mode promises."""

from __future__ import annotations

import pytest

from helpers.vmm import demo_guest, needs_qemu, run_qkio
from qkio.bench.virtio_run import fresh_image, guest_report, run_qemu
from qkio.kvm.constants import ExitReason
from qkio.machine import Machine
from qkio.virtio.board import NOTIFY_MODES

COUNT = 6
EXPECTED = [
    "virtio-blk: found at 0xfeb00e00",
    "virtio-blk: capacity (sectors) 128",
    "virtio-blk: id qkio0",
    f"virtio-blk: writes {COUNT} reads {COUNT} verified {COUNT} errors 0",
]


pytestmark = pytest.mark.kvm


def run_machine(image, mode, count=COUNT):
    out = bytearray()
    logs = []
    with Machine(memory_mib=8, console=out.extend, log=logs.append,
                 drives=[(image, False, b"qkio0")], virtio_notify=mode) as m:
        m.load_multiboot(demo_guest("virtio-blk"), append=f"count={count}")
        status = m.run(timeout=60)
        runner = m.virtio.runners[0]
        facts = {"status": status, "output": out.decode(), "runner": runner,
                 "exits": m.cpus[0].exit_counts, "cmdline": m.virtio.cmdline(),
                 "refusals": list(m.virtio.refusals), "logs": logs}
    return facts


@pytest.mark.parametrize("mode", NOTIFY_MODES)
def test_guest_on_qkio(tmp_path, mode):
    image = fresh_image(tmp_path / "disk.img")
    r = run_machine(image, mode)
    assert r["status"] == 33, r["output"]
    report = guest_report(r["output"])
    assert report[:4] == EXPECTED
    assert r["cmdline"] == " virtio_mmio.device=512@0xfeb00e00:12"
    runner = r["runner"]
    requests = 2 * COUNT + 2          # writes, reads, one FLUSH, one GET_ID
    assert sum(runner.requests_by_type.values()) == requests
    assert runner.requests_by_type["OUT"] == COUNT and runner.requests_by_type["IN"] == COUNT
    if mode == "vcpu":
        assert runner.transport.mmio_notifies == requests and runner.eventfd_notifies == 0
        assert set(runner.requests_by_thread) == {"CPU 0/KVM"}
        assert runner.requests_with_lock == requests
    else:
        # Every notify went through the ioeventfd: no exit to userspace for any of them.
        assert runner.transport.mmio_notifies == 0
        assert runner.eventfd_notifies >= 1
        if mode == "main":
            assert set(runner.requests_by_thread) == {"MainThread"}
            assert runner.requests_with_lock == requests
        else:
            assert set(runner.requests_by_thread) == {"IO io0"}
            assert runner.requests_with_lock == 0
    # The data really is on the disk: sector i holds pattern i.
    data = open(image, "rb").read()
    for i in range(COUNT):
        first = int.from_bytes(data[i * 512:i * 512 + 4], "little")
        assert first == (i * 0x01000193) & 0xFFFFFFFF


def test_mmio_exits_per_request_drop_to_zero_with_ioeventfd(tmp_path):
    """Same guest, two counts: the extra MMIO exits per extra request pair are 2 in
    vcpu mode (the two notifies) and 0 with an ioeventfd."""
    per_pair = {}
    for mode in ("vcpu", "iothread"):
        small = run_machine(fresh_image(tmp_path / f"{mode}-s.img"), mode, count=2)["exits"]
        big = run_machine(fresh_image(tmp_path / f"{mode}-b.img"), mode, count=8)["exits"]
        per_pair[mode] = (big[ExitReason.MMIO] - small[ExitReason.MMIO]) / 6
    assert per_pair == {"vcpu": 2.0, "iothread": 0.0}


def test_qkio_run_cli(tmp_path):
    image = fresh_image(tmp_path / "disk.img")
    result = run_qkio("--kernel", str(demo_guest("virtio-blk")), "--drive", f"file={image},serial=qkio0",
                      "--virtio-notify", "iothread", "--append", f"count={COUNT}")
    assert result.returncode == 33, result.stderr
    assert guest_report(result.stdout.decode())[:4] == EXPECTED
    bad = run_qkio("--kernel", str(demo_guest("virtio-blk")), "--drive", f"file={tmp_path}")
    assert bad.returncode == 1 and bad.stderr.decode().count("\n") == 1
    assert b"Traceback" not in bad.stderr


def test_no_drive_no_device(tmp_path):
    result = run_qkio("--kernel", str(demo_guest("virtio-blk")))
    assert result.returncode == 35
    assert b"no virtio-mmio version 2 block device" in result.stdout


@pytest.mark.parametrize("iothread", [False, True], ids=["main-loop", "iothread"])
@needs_qemu
def test_same_guest_on_qemu_microvm(tmp_path, iothread):
    qemu_img = fresh_image(tmp_path / "q.img")
    q = run_qemu(demo_guest("virtio-blk"), qemu_img, iothread=iothread, count=COUNT, serial="qkio0")
    assert q["status"] == 33, q["output"] + q["stderr"]
    qkio_img = fresh_image(tmp_path / "k.img")
    k = run_machine(qkio_img, "iothread" if iothread else "main")
    # Same lines, checksum included; and the same bytes on both disks.
    assert guest_report(q["output"]) == guest_report(k["output"])
    assert open(qemu_img, "rb").read() == open(qkio_img, "rb").read()


def trace_events(path):
    import json
    events = json.load(open(path))["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    return [(names.get(e["tid"], str(e["tid"])), e) for e in events if e.get("ph") != "M"]


@pytest.mark.parametrize("mode", ["vcpu", "main"])
def test_paio_completes_through_sigusr2_in_the_io_thread(tmp_path, mode):
    """qemu-kvm 0.12's path: a worker does the I/O, kill(getpid(), SIGUSR2), the io
    thread reads the signal fd and completes the request under the global lock."""
    image = fresh_image(tmp_path / "disk.img")
    trace = tmp_path / "trace.json"
    result = run_qkio("--kernel", str(demo_guest("virtio-blk")), "--drive", f"file={image},serial=qkio0",
                      "--virtio-notify", mode, "--virtio-aio", "paio", "--append", f"count={COUNT}",
                      "--trace", str(trace))
    assert result.returncode == 33, result.stderr
    assert guest_report(result.stdout.decode())[:4] == EXPECTED
    events = trace_events(trace)
    completes = [(t, e) for t, e in events if e["name"] == "paio complete"]
    assert len(completes) == 2 * COUNT + 1               # writes, reads, the FLUSH
    assert {t for t, _ in completes} == {"qkio-io"}
    assert all(e["args"]["worker"].startswith("qkio-aio") for _, e in completes)
    usr2 = [e for t, e in events if e["name"] == "signal received" and e["args"]["signo"] == 12]
    assert usr2 and all(t == "qkio-io" for t, e in events if e["name"] == "signal received")
    assert all(e["args"]["bql_held"] for t, e in events if e["name"] == "virtio complete")
    submitted_by = {e["args"]["by"] for _, e in events if e["name"] == "paio_submit"}
    assert submitted_by == ({"CPU 0/KVM"} if mode == "vcpu" else {"qkio-io"})


def test_paio_with_iothread_is_refused(tmp_path):
    image = fresh_image(tmp_path / "disk.img")
    result = run_qkio("--kernel", str(demo_guest("virtio-blk")), "--drive", f"file={image}",
                      "--virtio-notify", "iothread", "--virtio-aio", "paio")
    assert result.returncode == 1 and b"no IOThread" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("mode", NOTIFY_MODES)
def test_every_fd_and_thread_is_released(tmp_path, mode):
    """Image fd, ioeventfd, irqfd, the IOThread's epoll and wake-up fd: all gone after close."""
    import threading

    from helpers.vmm import open_fds
    image = fresh_image(tmp_path / "disk.img")
    run_machine(image, mode)      # warm-up: whatever is created once per process
    fds, threads = open_fds(), set(threading.enumerate())
    r = run_machine(image, mode)
    assert r["status"] == 33
    assert open_fds() == fds
    assert not {t.name for t in set(threading.enumerate()) - threads if t.is_alive()}


def test_a_bad_drive_leaves_nothing_behind(tmp_path):
    from helpers.vmm import open_fds
    from qkio.virtio.blk import DriveError
    fds = open_fds()
    with pytest.raises(DriveError):
        Machine(memory_mib=4, console=lambda d: None, log=lambda m: None,
                drives=[(str(fresh_image(tmp_path / "ok.img")), False, b""),
                        (str(tmp_path / "missing.img"), False, b"")], virtio_notify="iothread")
    assert open_fds() == fds


def test_two_drives_fill_transports_from_the_top(tmp_path):
    a, b = fresh_image(tmp_path / "a.img"), fresh_image(tmp_path / "b.img", sectors=64)
    out = bytearray()
    with Machine(memory_mib=8, console=out.extend, log=lambda m: None,
                 drives=[(a, False, b"a"), (b, False, b"b")]) as m:
        assert m.virtio.cmdline() == (" virtio_mmio.device=512@0xfeb00e00:12"
                                      " virtio_mmio.device=512@0xfeb00c00:11")
        m.load_multiboot(demo_guest("virtio-blk"), append="count=2")
        assert m.run(timeout=60) == 33
    # The guest probes upwards, so it finds the second drive first.
    assert guest_report(out.decode())[:3] == ["virtio-blk: found at 0xfeb00c00",
                                              "virtio-blk: capacity (sectors) 64", "virtio-blk: id b"]


def interrupts_taken(output: str) -> int:
    lines = [line for line in output.splitlines() if line.startswith("virtio-blk: interrupts ")]
    assert len(lines) == 1, output
    return int(lines[0].split()[-1])


@pytest.mark.parametrize("mode", NOTIFY_MODES)
def test_guest_waits_for_the_interrupt(tmp_path, mode, monkeypatch):
    """irq=1: the guest sleeps in HLT until IRQ 12.  The device is slowed down by 20 ms
    per notify, so the guest is asleep when the completion comes and only the
    interrupt -- KVM_IRQ_LINE from the io thread, or the IOThread's irqfd -- can wake
    it.  In vcpu mode the request completes inside the notify's exit, so the guest
    never has to wait and takes no interrupt at all."""
    import time as _time

    from qkio.virtio.board import BlkRunner
    real = BlkRunner.handle_output

    def slow(self, via):
        _time.sleep(0.02)
        real(self, via)
    monkeypatch.setattr(BlkRunner, "handle_output", slow)
    out = bytearray()
    with Machine(memory_mib=8, console=out.extend, log=lambda m: None,
                 drives=[(fresh_image(tmp_path / "d.img"), False, b"qkio0")], virtio_notify=mode) as m:
        m.load_multiboot(demo_guest("virtio-blk"), append=f"count={COUNT} irq=1")
        assert m.run(timeout=120) == 33, out.decode()
    text = out.decode()
    assert guest_report(text)[:4] == EXPECTED
    if mode == "vcpu":
        assert interrupts_taken(text) == 0
    else:
        assert interrupts_taken(text) >= 1


@pytest.mark.parametrize("iothread", [False, True], ids=["main-loop", "iothread"])
@needs_qemu
def test_interrupt_mode_on_qemu_microvm(tmp_path, iothread):
    import subprocess

    from qkio.bench.virtio_run import qemu_microvm_argv
    image = fresh_image(tmp_path / "q.img")
    argv = qemu_microvm_argv(demo_guest("virtio-blk"), image, iothread=iothread, serial="qkio0")
    argv += ["-append", f"count={COUNT} irq=1"]
    result = subprocess.run(argv, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    text = result.stdout.decode()
    assert result.returncode == 33, text + result.stderr.decode()
    assert guest_report(text)[:4] == EXPECTED
    assert interrupts_taken(text) >= 1


@pytest.mark.parametrize("refuse", ["ioeventfd", "irqfd"])
def test_a_refusing_kvm_gets_the_nearest_thing_that_works(tmp_path, monkeypatch, refuse):
    """If KVM says no to KVM_IOEVENTFD on MMIO (the notify stays an MMIO exit) or to
    KVM_IRQFD (the IOThread raises the line with KVM_IRQ_LINE), the run still
    completes, and the refusal is recorded with its errno."""
    import errno

    from qkio.kvm.vm import Vm

    def no(self, *args, **kw):
        raise OSError(errno.ENOTSUP, f"{refuse} refused (simulated)")
    monkeypatch.setattr(Vm, refuse, no)
    r = run_machine(fresh_image(tmp_path / "d.img"), "iothread")
    assert r["status"] == 33 and guest_report(r["output"])[:4] == EXPECTED
    assert len(r["refusals"]) == 1 and "Errno 95" in r["refusals"][0]
    runner = r["runner"]
    if refuse == "ioeventfd":
        assert "stays an MMIO exit" in r["refusals"][0]
        assert runner.transport.mmio_notifies == 2 * COUNT + 2
        assert set(runner.requests_by_thread) == {"CPU 0/KVM"}
    else:
        assert "KVM_IRQ_LINE" in r["refusals"][0]
        assert set(runner.requests_by_thread) == {"IO io0"} and runner.requests_with_lock == 0
