"""The signal pipe, with real signals sent to a child process.

Every test here starts ``qkio.lab.signal_child`` in its own session
(so a signal meant for it can never reach pytest), sends process-directed
signals with ``os.kill`` and reads what the child reports as JSON lines.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from qkio.signals import SIGNALFD_SIGINFO_SIZE, SigInfo, signal_name

CHILD = ("-m", "qkio.lab.signal_child")  # shipped with qkio: chapter 7 runs it too
RT0 = signal.SIGRTMIN + 8  # the child's first real-time signal


class Child:
    def __init__(self, *args, trace=None):
        cmd = [sys.executable, *CHILD, *args]
        if trace:
            cmd += ["--trace", str(trace)]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  start_new_session=True)
        self.buf = b""
        self.ready = self.expect("ready")
        self.pid = self.ready["pid"]

    def line(self, timeout=10.0):
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.p.stdout], [], [], left)[0]:
                raise TimeoutError("child said nothing")
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"child exited (rc={self.p.wait()})")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        return json.loads(raw)

    def expect(self, event, timeout=10.0):
        while True:
            msg = self.line(timeout)
            if msg["event"] == event:
                return msg

    def send(self, **cmd):
        self.p.stdin.write((json.dumps(cmd) + "\n").encode())
        self.p.stdin.flush()

    def report(self):
        self.send(cmd="report")
        return self.expect("report")

    def received(self, signo):
        return self.report()["received"].get(str(int(signo)), 0)

    def wait_received(self, want, timeout=20.0):
        """Poll reports until the counts reach ``want`` ({signo: n}) or time out."""
        end = time.monotonic() + timeout
        while True:
            rep = self.report()
            got = {s: rep["received"].get(str(int(s)), 0) for s in want}
            if all(got[s] >= n for s, n in want.items()) or time.monotonic() > end:
                return got
            time.sleep(0.05)

    def kill(self, sig):
        # Real-time signals queue up to RLIMIT_SIGPENDING; past that kill()
        # fails with EAGAIN and we wait for the child to catch up.
        while True:
            try:
                os.kill(self.pid, sig)
                return
            except BlockingIOError:
                time.sleep(0.001)

    def close(self):
        if self.p.poll() is None:
            try:
                self.send(cmd="exit")
                self.p.wait(timeout=5)
            except Exception:
                self.p.kill()
                self.p.wait()
        self.p.stdin.close()
        self.p.stdout.close()


@pytest.fixture
def child():
    children = []

    def start(*args, **kw):
        c = Child(*args, **kw)
        children.append(c)
        return c

    yield start
    for c in children:
        c.close()


def test_siginfo_record_round_trip():
    info = SigInfo(signo=12, code=0, pid=1234, uid=1000, value=7, path="x")
    rec = info.to_record()
    assert len(rec) == SIGNALFD_SIGINFO_SIZE
    assert SigInfo.from_record(rec, "x") == info
    assert SigInfo(signal.SIGRTMIN + 3).name == "SIGRTMIN+3"


@pytest.mark.parametrize("method", ["signalfd", "thread"])
def test_ten_thousand_realtime_signals_none_lost(child, method):
    c = child("--method", method, "--rt", "4")
    assert c.ready["path"] == method
    sent = {RT0 + i: 0 for i in range(4)}
    t0 = time.monotonic()
    for n in range(10_000):
        s = RT0 + n % 4
        c.kill(s)
        sent[s] += 1
    got = c.wait_received(sent)
    elapsed = time.monotonic() - t0
    assert got == sent, f"{method}: lost {sum(sent.values()) - sum(got.values())}"
    print(f"{method}: 10000 RT signals in {elapsed:.2f}s")


@pytest.mark.parametrize("method", ["signalfd", "thread"])
def test_standard_signals_coalesce_realtime_signals_queue(child, method):
    c = child("--method", method, "--rt", "1")
    c.send(cmd="busy", seconds=0.5)
    c.expect("busy")
    for _ in range(500):
        c.kill(signal.SIGUSR2)
        c.kill(RT0)
    c.expect("busy_done")
    got = c.wait_received({RT0: 500, signal.SIGUSR2: 1})
    assert got[RT0] == 500  # every real-time signal queued
    assert 1 <= got[signal.SIGUSR2] <= 500
    if method == "signalfd":
        # Nobody dequeued while the io thread was busy: one pending bit.
        assert got[signal.SIGUSR2] < 500
        assert got[signal.SIGUSR2] <= 2


def test_signal_thread_coalesces_once_the_pipe_is_full(child):
    # With the io thread busy, the signal thread fills the pipe (64 KiB = 512
    # records) and then blocks in write(); from then on SIGUSR2 waits in the
    # kernel as one pending bit.
    c = child("--method", "thread")
    c.send(cmd="busy", seconds=1.5)
    c.expect("busy")
    for _ in range(3000):
        c.kill(signal.SIGUSR2)
    c.expect("busy_done")
    time.sleep(0.2)
    got = c.received(signal.SIGUSR2)
    assert 1 <= got < 3000


def test_thread_method_has_exactly_one_more_thread(child):
    by_fd = child("--method", "signalfd")
    by_thread = child("--method", "thread")
    fd_names = sorted(by_fd.ready["tasks"].values())
    th_names = sorted(by_thread.ready["tasks"].values())
    # Also counted from outside, as `ps -L` would.
    assert len(os.listdir(f"/proc/{by_fd.pid}/task")) == len(fd_names)
    assert len(os.listdir(f"/proc/{by_thread.pid}/task")) == len(th_names)
    assert len(th_names) == len(fd_names) + 1
    assert fd_names == ["qkio-io"]
    assert th_names == ["qkio-io", "qkio-sigwait"]


def test_signalfd_failure_falls_back_to_the_signal_thread(child):
    c = child("--method", "signalfd", "--force-signalfd-failure", "--rt", "1")
    assert c.ready["path"] == "thread"
    assert "forced failure" in c.ready["signalfd_error"]
    assert sorted(c.ready["tasks"].values()) == ["qkio-io", "qkio-sigwait"]
    for _ in range(100):
        c.kill(RT0)
    assert c.wait_received({RT0: 100}) == {RT0: 100}


@pytest.mark.parametrize("method", ["signalfd", "thread", "async"])
def test_sigterm_handled_within_a_second(child, method):
    c = child("--method", method)
    t0 = time.monotonic()
    os.kill(c.pid, signal.SIGTERM)
    msg = c.expect("signal", timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert msg["signo"] == signal.SIGTERM
    assert msg["path"] == method
    assert msg["thread"] == "qkio-io"
    if method != "async":
        assert msg["sender"] == os.getpid()  # from the siginfo
    c.expect("exit")
    assert c.p.wait(timeout=5) == 0


@pytest.mark.parametrize("method", ["signalfd", "thread"])
def test_sync_handlers_run_in_io_thread_with_lock_held(child, method):
    c = child("--method", method)
    c.kill(signal.SIGHUP)
    c.wait_received({signal.SIGHUP: 1})
    assert c.report()["contexts"] == [["qkio-io", True]]


def test_async_handler_interrupts_whatever_the_main_thread_does(child):
    # The io thread is the main thread here; while it sits in a device
    # handler holding the lock, an async handler runs right inside it.
    c = child("--method", "async")
    c.send(cmd="busy", seconds=0.5)
    c.expect("busy")
    c.kill(signal.SIGHUP)
    c.expect("busy_done")
    rep = c.report()
    assert rep["path"] == "async"
    assert rep["received"][str(int(signal.SIGHUP))] == 1
    assert rep["contexts"] == [["qkio-io", True]]
    assert signal.SIGHUP not in rep["blocked_in_io"]


def test_trace_of_the_signal_path_is_valid_chrome_json(child, tmp_path):
    path = tmp_path / "trace.json"
    c = child("--method", "thread", trace=path)
    c.kill(signal.SIGHUP)
    c.wait_received({signal.SIGHUP: 1})
    os.kill(c.pid, signal.SIGTERM)
    c.expect("exit")
    c.p.wait(timeout=5)
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    for ev in events:
        assert ev["ph"] in {"B", "E", "X", "i", "M"}
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], (int, float))
    names = {ev["args"]["name"] for ev in events if ev["ph"] == "M" and ev["name"] == "thread_name"}
    assert {"qkio-io", "qkio-sigwait"} <= names
    tid_of = {ev["args"]["name"]: ev["tid"] for ev in events
              if ev["ph"] == "M" and ev["name"] == "thread_name"}
    got = [ev for ev in events if ev["name"] == "sigwaitinfo returned"]
    assert got and got[0]["tid"] == tid_of["qkio-sigwait"]
    recv = [ev for ev in events if ev["name"] == "signal received"]
    assert recv and all(ev["tid"] == tid_of["qkio-io"] for ev in recv)


def test_sigprocmask_reaches_only_the_calling_thread():
    # The article's S7 says sigprocmask blocks a signal for the whole process.
    # In a threaded process it changes only the caller's mask: a thread that
    # already exists keeps its own.  (Checked in this process's /proc; the
    # mask is restored afterwards.)
    import threading

    from qkio.signals import blocked_signals
    from qkio.threads import gettid

    stop = threading.Event()
    tids = []

    def worker():
        tids.append(gettid())
        stop.wait()

    t = threading.Thread(target=worker)
    t.start()
    while not tids:
        time.sleep(0.001)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        assert signal.SIGUSR2 in blocked_signals()
        assert signal.SIGUSR2 not in blocked_signals(tids[0])
        if signal.SIGUSR2 not in old:
            late = []
            t2 = threading.Thread(target=lambda: late.append(blocked_signals(gettid())))
            t2.start()
            t2.join()
            assert signal.SIGUSR2 in late[0]  # a thread created now inherits it
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        stop.set()
        t.join()


def test_block_vmm_signals_refuses_when_threads_exist():
    import threading

    from qkio.signals import block_vmm_signals

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(RuntimeError, match="before any other thread"):
            block_vmm_signals()
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize("method", ["signalfd", "thread", "async"])
def test_signal_latency_per_path(child, method):
    # Time from kill() in this process to the handler in the child, both on
    # CLOCK_MONOTONIC (system-wide).  Reported, and bounded loosely: the book
    # makes the comparison; this only checks that every path is prompt.
    c = child("--method", method, "--echo", str(int(signal.SIGHUP)))
    lat = []
    for _ in range(50):
        t0 = time.monotonic()
        os.kill(c.pid, signal.SIGHUP)
        msg = c.expect("got", timeout=5)
        lat.append(msg["t"] - t0)
        assert msg["path"] == method
    lat.sort()
    median = lat[len(lat) // 2]
    print(f"\n{method}: median {median * 1e6:.0f} us, max {lat[-1] * 1e6:.0f} us")
    assert median < 0.05


def test_signal_names_are_the_signal_modules():
    """qkio names signals without the stdlib's ``signal`` module (its enums cost start-up
    time): the names are the ones ``signal.Signals`` gives, real-time ones as SIGRTMIN+n."""
    for signo in range(1, signal.SIGRTMAX + 1):
        try:
            expected = signal.Signals(signo).name
        except ValueError:
            expected = f"SIGRTMIN+{signo - signal.SIGRTMIN}"
        assert signal_name(signo) == expected
