"""posix-aio-compat: real preadv/pwritev in worker threads, completions reported with SIGUSR2.

Each scenario runs in a child process (tests/helpers/paio_child.py) that
blocks the VMM's signals before it starts any thread: the workers' SIGUSR2 is
process-directed and must not reach pytest.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = Path(__file__).parent / "helpers" / "paio_child.py"
METHODS = ["signalfd", "thread", "async"]


def run_child(scenario, path, *args, timeout=60):
    p = subprocess.run([sys.executable, str(CHILD), scenario, str(path), *args],
                       capture_output=True, text=True, timeout=timeout, start_new_session=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture
def disk(tmp_path):
    f = tmp_path / "disk.img"
    f.write_bytes(bytes(256 * 1024))
    return f


@pytest.mark.parametrize("method", METHODS)
def test_roundtrip_through_workers(disk, method):
    n = 32
    out = run_child("roundtrip", disk, "--method", method, "--requests", str(n))
    assert out["path"] == method
    # Every byte written by pwritev in a worker is where it should be ...
    data = disk.read_bytes()
    for i in range(n):
        want = bytes([i % 251]) * 1000 + b"x" * 24 + bytes([(i + 7) % 251]) * 3072
        assert data[i * 4096:(i + 1) * 4096] == want
    # ... and preadv into two buffers per request read it back.
    assert out["read_ok"]
    # All full transfers: callbacks got 0, ran in the io thread with the lock held.
    assert out["rets"] == [0]
    assert out["callbacks"] == 2 * n + 1 == out["completed"]
    assert out["where"] == [["MainThread", True]]
    # One SIGUSR2 per finished request was sent; standard signals merge while
    # pending, so at most that many were taken -- and nothing was lost.
    assert 1 <= out["signals_taken"] <= out["signals_sent"] == 2 * n + 1
    assert 1 <= out["threads_started"] <= 64


def test_workers_start_with_every_signal_blocked(disk):
    out = run_child("roundtrip", disk, "--requests", "8")
    assert out["worker_masks"], "no worker thread was seen"
    # glibc keeps 32 and 33 for itself and the kernel never blocks SIGKILL/SIGSTOP.
    want = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP, 32, 33}
    for name, mask in out["worker_masks"].items():
        assert want <= set(mask), (name, sorted(want - set(mask)))


def test_compat_mode_has_two_signal_threads(disk):
    out = run_child("roundtrip", disk, "--method", "thread", "--requests", "8")
    census = out["census"]
    assert census.count("qkio-sigwait") == 1      # kvm_main_loop's SIGIO/SIGALRM/SIGBUS
    assert census.count("qkio-aio-sigwt") == 1    # paio_init's SIGUSR2
    sf = run_child("roundtrip", disk, "--method", "signalfd", "--requests", "8")
    assert "qkio-sigwait" not in sf["census"] and "qkio-aio-sigwt" not in sf["census"]
    # Every thread is gone once the pool and the sources are closed.
    for o in (out, sf):
        assert o["census_at_end"] == [o["census"][0]]


def test_errors_come_back_as_negative_errno(disk):
    out = run_child("errors", disk)
    assert out["rets"]["short"] == -out["EINVAL"]   # 10 of 100 bytes before EOF
    assert out["rets"]["badf"] == -out["EBADF"]     # a read on a write-only fd


def test_an_idle_worker_exits(disk):
    out = run_child("idle-exit", disk)
    assert out["workers_after_flush"] == 1
    assert out["workers_after_idle"] == 0
    assert not any(n.startswith("qkio-aio") and n != "qkio-aio-sigwt"
                   for n in out["census_after_idle"])


def test_cancel_a_queued_request(disk):
    out = run_child("cancel", disk)
    # Cancelled requests never call back, whether or not a worker had them.
    assert out["callbacks"] == ["big"]
    # The one worker is nearly always still writing 32 MiB when the cancel
    # comes, so the request is dropped from the queue; should the worker have
    # been quicker, cancel waits for it instead and ret is its 10 bytes.
    assert out["cancelled_ret"] in (-out["ECANCELED"], 10)


def test_paio_init_refuses_when_a_thread_takes_sigusr2(disk):
    out = run_child("unblocked-thread", disk)
    assert out["refused"] and "SIGUSR2" in out["refused"]
    assert out["workers"] == 0  # refused before any worker could send it
