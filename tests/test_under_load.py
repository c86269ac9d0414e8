"""scripts/under-load: the busy-host check runs its command beside one hog per
CPU and leaves no hog behind, however the command or the script ends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "under-load"


def hog_pids(stderr: str) -> list[int]:
    m = re.search(r"CPU hog\(s\) \(pids ([\d ]+)\)", stderr)
    assert m, stderr
    return [int(p) for p in m.group(1).split()]


def gone(pids, within=5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_runs_the_command_beside_one_hog_per_cpu_and_passes_its_status_on():
    r = subprocess.run([str(SCRIPT), "sh", "-c", "exit 3"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3
    pids = hog_pids(r.stderr)
    assert len(pids) == len(os.sched_getaffinity(0))
    assert gone(pids)


def test_bad_use_is_one_line():
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "usage" in r.stderr
    r = subprocess.run([str(SCRIPT), "no-such-command-here"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 127 and r.stderr.count("\n") == 1


def test_hogs_die_with_the_script_even_if_it_is_killed():
    p = subprocess.Popen([str(SCRIPT), "sleep", "30"], stderr=subprocess.PIPE, text=True)
    command: list[int] = []
    try:
        pids = hog_pids(p.stderr.readline())
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        command += [int(c) for c in children if int(c) not in pids]   # the sleep
        p.send_signal(signal.SIGKILL)   # no trap can run: PR_SET_PDEATHSIG must do it
        p.wait(10)
        assert gone(pids)
    finally:
        for pid in command:
            try:
                os.kill(pid, signal.SIGKILL)   # the command itself is not ours to outlive
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
