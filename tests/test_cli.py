"""``qkio run`` as a user runs it: a child process (``python -m qkio run``, in
its own session), each test guest, and what comes out -- stdout,
stderr, the exit status.

The contract, from the run parser's epilog: status (V << 1) | 1 when the
guest writes V to isa-debug-exit, 0 on shutdown or SIGTERM/SIGINT, 1 for a
bad command line or a file that is not a kernel, 2 when the guest fails,
124 on --timeout.  Every failure a user can cause is one line on stderr
starting ``qkio: error:`` or ``qkio:`` -- never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from helpers.vmm import QKIO_RUN, run_qkio, test_kernel

pytestmark = pytest.mark.kvm


def _no_traceback(result):
    assert b"Traceback" not in result.stderr, result.stderr.decode()


def test_hello():
    result = run_qkio("--kernel", str(test_kernel("hello")))
    assert (result.returncode, result.stdout, result.stderr) == (33, b"Hello from qkio's guest\n", b"")


@pytest.mark.parametrize("append", ["a b", "", "console=ttyS0 x='1 2'"])
def test_cmdline_is_path_space_append(append):
    kernel = str(test_kernel("cmdline"))
    args = ["--kernel", kernel] + (["--append", append] if append else [])
    result = run_qkio(*args)
    assert result.returncode == 33
    # As QEMU: the kernel's path, one space, the -append text (even when empty).
    assert result.stdout.decode() == f"cmdline='{kernel} {append}'\n"


def test_echo_returns_piped_bytes_and_exits_after_q():
    data = b"Hello, echo!\n\x01\x7f" + bytes(range(0x80, 0x90)) + b"q"
    result = run_qkio("--kernel", str(test_kernel("echo")), "--timeout", "60", input=data + b"after q")
    assert result.returncode == 1  # the guest wrote 0: (0 << 1) | 1
    assert result.stdout == data
    _no_traceback(result)


def test_unassigned_port_reads_ff_and_is_logged_once():
    result = run_qkio("--kernel", str(test_kernel("unassigned")))
    assert (result.returncode, result.stdout) == (33, b"ff\n")
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "0x1234" in lines[0] and "unassigned port" in lines[0]


def test_spin_is_stopped_by_timeout():
    start = time.monotonic()
    result = run_qkio("--kernel", str(test_kernel("spin")), "--timeout", "1")
    elapsed = time.monotonic() - start
    assert result.returncode == 124
    assert result.stdout == b""
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "--timeout 1" in err and "stopped" in err
    assert 1 <= elapsed < 6


def test_triple_fault_is_status_2_with_a_message():
    result = run_qkio("--kernel", str(test_kernel("triple")))
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1
    assert "triple-fault" in err and "KVM_EXIT_SHUTDOWN" in err and "RIP=0x" in err
    _no_traceback(result)


def _bad_kernels(tmp_path):
    hello = test_kernel("hello").read_bytes()
    files = {
        "garbage": b"this is not a kernel at all\n" * 100,
        "empty": b"",
        "truncated": hello[: len(hello) // 2],   # the header is there, the segments are not
        "truncated-header": hello[:40],          # not even a whole ELF header
    }
    out = {}
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        out[name] = path
    out["missing"] = tmp_path / "no-such-file"
    out["directory"] = tmp_path
    return out


@pytest.mark.parametrize("which", ["garbage", "empty", "truncated", "truncated-header", "missing", "directory"])
def test_bad_kernel_file_is_one_line_status_1(tmp_path, which):
    path = _bad_kernels(tmp_path)[which]
    result = run_qkio("--kernel", str(path))
    assert result.returncode == 1, result.stderr
    assert result.stdout == b""
    err = result.stderr.decode()
    assert err.startswith("qkio: error: ") and err.count("\n") == 1, err
    _no_traceback(result)


def test_bad_command_line_is_one_line_status_1():
    # qkio's parser reports a malformed command line as one line and status 1
    # (not argparse's usage text and 2, which is the guest-failed status).
    result = run_qkio("--kernel")
    assert result.returncode == 1 and result.stderr.decode().count("\n") == 1
    assert result.stderr.decode().startswith("qkio run: error: argument --kernel")
    result = run_qkio("--kernel", str(test_kernel("hello")), "--smp", "0")
    assert result.returncode == 1 and "--smp: must be an integer from 1 to 64" in result.stderr.decode()


def test_trace_file_is_valid_trace_event_json(tmp_path):
    trace = tmp_path / "trace.json"
    # The echo kernel, fed through stdin: the io thread has bytes to hand over,
    # so it must wait and dispatch (a guest as short as hello can finish
    # before the io thread's first wait, and then there is none to record).
    result = run_qkio("--kernel", str(test_kernel("echo")), "--trace", str(trace), input=b"hi\nq")
    assert result.returncode == 1 and result.stdout == b"hi\nq"
    doc = json.loads(trace.read_text())
    events = doc["traceEvents"]
    assert isinstance(events, list) and events
    for ev in events:
        assert ev["ph"] in "BEXiM" and isinstance(ev["name"], str)
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        if ev["ph"] != "M":
            assert isinstance(ev["ts"], (int, float))
    names = {ev["tid"]: ev["args"]["name"] for ev in events if ev["ph"] == "M" and ev["name"] == "thread_name"}
    by_name = {name: tid for tid, name in names.items()}
    assert {"qkio-io", "CPU 0/KVM"} <= set(by_name)

    slices = defaultdict(list)  # (tid, name) -> [(begin, end)]
    stacks = defaultdict(list)  # tid -> open B events: B/E nest per thread
    for ev in events:
        if ev["ph"] == "B":
            stacks[ev["tid"]].append((ev["name"], ev["ts"]))
        elif ev["ph"] == "E":
            name, begin = stacks[ev["tid"]].pop()
            assert ev["name"] in ("", name)
            slices[ev["tid"], name].append((begin, ev["ts"]))
    cpu, io = by_name["CPU 0/KVM"], by_name["qkio-io"]
    kvm_runs = slices[cpu, "KVM_RUN"]
    # echo: at least an LSR poll and an RBR read per byte in, a THR write per byte out.
    assert len(kvm_runs) >= 3 * 4
    assert all(b <= e for b, e in kvm_runs)
    assert slices[io, "main_loop_wait"], "the io thread recorded no main_loop_wait"
    assert not slices[io, "KVM_RUN"] and not slices[cpu, "main_loop_wait"]
    # Exit reasons ride on the E events of KVM_RUN.
    reasons = {ev.get("args", {}).get("exit_reason") for ev in events if ev["ph"] == "E" and ev["tid"] == cpu}
    assert "IO" in reasons


@pytest.mark.parametrize("exit_path", ["native", "python"])
def test_either_exit_path_runs_the_guest_the_same(exit_path):
    result = run_qkio("--kernel", str(test_kernel("hello")), "--exit-path", exit_path)
    assert (result.returncode, result.stdout, result.stderr) == (33, b"Hello from qkio's guest\n", b"")


def test_without_the_native_loop_a_run_says_so_or_refuses():
    env = {**os.environ, "QKIO_NATIVE": "0"}
    argv = [*QKIO_RUN, "--kernel", str(test_kernel("hello"))]
    auto = subprocess.run(argv, capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert auto.returncode == 33
    assert auto.stderr == b"qkio: note: using the Python exit loop (QKIO_NATIVE=0 in the environment)\n"
    insist = subprocess.run([*argv, "--exit-path", "native"], capture_output=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    assert insist.returncode == 1 and insist.stdout == b""
    assert b"the native exit loop is not available: QKIO_NATIVE=0" in insist.stderr
    assert insist.stderr.count(b"\n") == 1 and b"Traceback" not in insist.stderr


def test_qkio_run_imports_only_what_it_uses():
    """Start-up time is a feature (qkio bench startup): a plain ``qkio run`` of
    a kernel file imports none of these.  A law, not a timing: each one was
    once on the run path and cost milliseconds of every run."""
    code = ("import sys, qkio.cli\n"
            "status = qkio.cli.main(['run', '--kernel', sys.argv[1]])\n"
            "print(status, ' '.join(sorted(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code, str(test_kernel("hello"))],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    status, modules = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert status == "33", result.stderr
    loaded = set(modules.split())
    unwanted = {"dataclasses", "typing", "inspect", "subprocess", "tempfile", "shutil", "hashlib",
                "json", "socket", "sysconfig", "qkio.virtio", "qkio.bench", "qkio.build",
                # the command line is read without argparse (qkio.cli._parse_run_plainly), and
                # termios is for a stdin that is a terminal
                "argparse", "gettext", "locale", "termios",
                # extension modules (each a shared object to map: about half a millisecond
                # of this book's host) for what a plain run does not do: the native loop's
                # stale-build check when the source is not newer (zlib), one counter (array),
                # fds 0-2 closed (fcntl), an MMIO device (bisect)
                "zlib", "array", "fcntl", "bisect",
                # qkio calls _signal, the C half: signal would build three enums at import
                # and turn every mask it returns into enum members
                "signal",
                # the alarm clock is for --clock alarm; the timer heap for a run that arms a timer
                "qkio.alarm_timer", "heapq"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_qkio_run_collects_no_garbage_while_starting_and_all_of_it_while_running():
    """Start-up makes only objects that live as long as the run (qkio.cli._pause_gc):
    no collection runs between the command line and the guest's start; from then
    on the collector is on, with start-up's objects frozen out of its way."""
    code = ("import gc, sys\n"
            "import qkio.cli, qkio.machine\n"
            "seen = []\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start' and seen.append(info['generation']))\n"
            "run = qkio.machine.Machine.run\n"
            "def checked(self, *args, **kwargs):\n"
            "    print(len(seen), gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr, flush=True)\n"
            "    return run(self, *args, **kwargs)\n"
            "qkio.machine.Machine.run = checked\n"
            "sys.argv[1:] = ['run', '--kernel', sys.argv[1]]\n"
            "qkio.cli.main()\n")
    result = subprocess.run([sys.executable, "-c", code, str(test_kernel("hello"))],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 33, result.stderr
    assert result.stderr == "0 True True\n"


def test_version_is_the_one_version_number():
    import importlib.metadata

    import qkio
    result = subprocess.run([*QKIO_RUN[:-1], "--version"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"qkio {qkio.__version__}\n")
    assert importlib.metadata.version("qkio") == qkio.__version__  # pyproject reads it from qkio
