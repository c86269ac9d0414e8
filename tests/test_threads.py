"""Thread names as the kernel (and ps -L) sees them."""

import os
import subprocess
import threading

from qkio import trace
from qkio.threads import get_thread_name, gettid, set_thread_name, start_thread, thread_names


def test_gettid_is_a_task_of_this_process():
    assert str(gettid()) in os.listdir("/proc/self/task")


def test_start_thread_names_the_os_thread():
    done = threading.Event()
    seen = {}

    def body(x, y=0):
        seen["tid"] = gettid()
        seen["args"] = (x, y)
        done.wait()

    t = start_thread("CPU 0/KVM", body, 1, y=2)
    try:
        # start_thread returns after the name is set: /proc already shows it.
        assert thread_names()[seen["tid"]] == "CPU 0/KVM"
        assert get_thread_name(seen["tid"]) == "CPU 0/KVM"
        assert t.name == "CPU 0/KVM"
        assert seen["args"] == (1, 2)
        assert t.daemon
        # ... and so does ps, from outside the process.
        out = subprocess.run(["ps", "-L", "-o", "tid=,comm=", "-p", str(os.getpid())],
                             capture_output=True, text=True).stdout
        assert f"{seen['tid']} CPU 0/KVM" in " ".join(out.split())
    finally:
        done.set()
        t.join()


def test_long_names_are_cut_to_15_bytes():
    result = {}

    def body():
        result["kept"] = set_thread_name("a-very-long-thread-name")
        result["comm"] = get_thread_name()
        result["python"] = threading.current_thread().name

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert result["kept"] == "a-very-long-thr"
    assert result["comm"] == "a-very-long-thr"
    assert result["python"] == "a-very-long-thread-name"


def test_name_is_given_to_the_tracer():
    tr = trace.Tracer(enabled=True)
    t = start_thread("qkio-test", tr.instant, "hello")
    t.join()
    meta = [e for e in tr.to_chrome_json()["traceEvents"] if e["name"] == "thread_name"]
    assert {"name": "qkio-test"} in [m["args"] for m in meta]
