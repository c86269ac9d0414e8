"""Fuzzing ``qkio run`` as a whole (issue 10): random combinations of stdin and
stdout states, option values, file kinds and a signal at a random moment.

Each case runs ``python -m qkio run`` as a child and asserts the contract of
the run parser's epilog: the run ends within its bound, with a documented
status (never 70, never death by a signal), and with no traceback -- at most
one line on stderr unless SIGHUP asked for a report.

The signal's moment is drawn from the first 200 ms *after qkio's main() has
blocked the VMM's signals* (seen in /proc/PID/status): before that the
Python interpreter itself is starting, and a signal there has its default
effect, as the epilog says; qkio cannot run code earlier than its first line.

The loop is seeded (``QKIO_FUZZ_SEED`` repeats a run; the seed is in every
failure message) and bounded in time (``QKIO_FUZZ_SECONDS``, default 40), so
it costs the suite a fixed budget however slow the host is.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from helpers.vmm import QKIO_RUN, ROOT, demo_guest, sigterm_blocked

pytestmark = pytest.mark.kvm

BUDGET_S = float(os.environ.get("QKIO_FUZZ_SECONDS", "40"))
DOCUMENTED = {0, 1, 2, 124, 33}  # 33: hello and flood write 16 to isa-debug-exit
F_SETPIPE_SZ = 1031




def _case(rng: random.Random, tmp) -> dict:
    kernel = rng.choice(["hello", "flood", "spin", "fifo", "dev-zero", "directory", "missing", "garbage"])
    paths = {"fifo": str(tmp / "fifo"), "dev-zero": "/dev/zero", "directory": str(tmp),
             "missing": str(tmp / "none"), "garbage": str(tmp / "garbage")}
    args = ["--kernel", str(demo_guest(kernel)) if kernel in ("hello", "flood", "spin") else paths[kernel]]
    if kernel == "flood":
        args += ["--append", f"count={rng.choice([100, 5000, 10**8])}"]
    timeout = rng.choice([None, "1", "2", "nan", "-1", "inf", "0.3"])
    if timeout is not None:
        args.append(f"--timeout={timeout}")
    for option, values in (("--memory", ["1", "2", "16", "3073"]), ("--smp", ["0", "1", "2", "65"]),
                           ("--signals", ["signalfd", "thread", "async"]),
                           ("--backend", ["select", "poll", "epoll"]),
                           ("--initrd", [",", paths["fifo"], "/dev/zero", str(tmp / "garbage")])):
        if rng.random() < 0.4:
            args.append(f"{option}={rng.choice(values)}")
    if rng.random() < 0.1:
        args.append(f"--trace={rng.choice([str(tmp / 't.json'), '/dev/full', str(tmp)])}")
    return {
        "args": args,
        "stdin": rng.choice(["devnull", "closed", "file", "pipe"]),
        "stdout": rng.choice(["drained", "never-read", "closed", "dev-full", "file"]),
        "signal": rng.choice([None, None, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP]),
        "delay": rng.uniform(0, 0.2),
    }


def _run(case: dict, tmp) -> tuple[int | None, str, float]:
    """Run one case; returns (status or None if it overran its bound, stderr, seconds)."""
    closers, pass_fds = [], []
    stdin = stdout = None
    if case["stdin"] == "devnull":
        stdin = subprocess.DEVNULL
    elif case["stdin"] == "file":
        stdin = open(tmp / "garbage", "rb")
        closers.append(stdin)
    elif case["stdin"] == "pipe":
        r, w = os.pipe()
        stdin = r
        closers += [r, w]
    drain = None
    if case["stdout"] in ("drained", "never-read"):
        r, w = os.pipe2(os.O_CLOEXEC)
        if case["stdout"] == "never-read":
            fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
        else:
            drain = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(r, 65536), b"")],
                                     daemon=True)
        stdout = w
        closers.append(r)
        pass_fds.append(w)
    elif case["stdout"] == "dev-full":
        stdout = open("/dev/full", "wb")
        closers.append(stdout)
    elif case["stdout"] == "file":
        stdout = open(tmp / "out", "wb")
        closers.append(stdout)
    # Closed: the shell's n>&- , done in the child before exec.
    close_in_child = [fd for fd, what in ((0, case["stdin"]), (1, case["stdout"])) if what == "closed"]

    def preexec():
        for fd in close_in_child:
            os.close(fd)
    start = time.monotonic()
    proc = subprocess.Popen([*QKIO_RUN, *case["args"]], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                            cwd=ROOT, start_new_session=True, preexec_fn=preexec if close_in_child else None)
    if isinstance(stdout, int):
        os.close(stdout)
    if drain is not None:
        drain.start()
    try:
        bound = 8.0
        if case["signal"] is not None:
            while not sigterm_blocked(proc.pid) and proc.poll() is None and time.monotonic() - start < 5:
                time.sleep(0.001)
            time.sleep(case["delay"])
            if proc.poll() is None:
                proc.send_signal(case["signal"])
        try:
            status = proc.wait(max(0.1, start + 4 - time.monotonic()))
        except subprocess.TimeoutExpired:
            # Still running (a guest with no end and no --timeout): SIGTERM must end it within 1 s.
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(1.0 + max(0.0, start + bound - 1 - time.monotonic()))
            except subprocess.TimeoutExpired:
                status = None
        elapsed = time.monotonic() - start
        err = proc.stderr.read().decode(errors="replace")
        return status, err, elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        for c in closers:
            c.close() if hasattr(c, "close") else os.close(c)


def test_qkio_run_under_random_hostile_conditions(tmp_path):
    seed = int(os.environ.get("QKIO_FUZZ_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "garbage").write_bytes(b"not a kernel\n" * 50)
    for name in ("hello", "flood", "spin"):
        demo_guest(name)  # built before the clock starts
    deadline = time.monotonic() + BUDGET_S
    runs = 0
    while time.monotonic() < deadline or runs < 8:  # at least 8 cases, however slow the host
        case = _case(rng, tmp_path)
        status, err, elapsed = _run(case, tmp_path)
        runs += 1
        where = f"seed {seed}, run {runs}: {case}, status {status}, {elapsed:.2f} s, stderr {err!r}"
        assert status is not None, f"did not end within its bound; {where}"
        assert status in DOCUMENTED, f"undocumented status; {where}"
        assert "Traceback" not in err, where
        if case["signal"] != signal.SIGHUP:
            assert err.count("\n") <= 1, f"more than one line on stderr; {where}"
