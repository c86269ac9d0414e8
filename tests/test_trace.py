"""The tracer: per-thread logs exported as Chrome/Perfetto trace-event JSON."""

import json
import os
import threading
import time

from qkio import trace
from qkio.bql import GlobalMutex
from qkio.threads import start_thread


def test_disabled_tracer_records_nothing_and_is_cheap():
    tr = trace.Tracer(enabled=False)
    t0 = time.perf_counter()
    for _ in range(100_000):
        tr.instant("x", a=1)
    per_call = (time.perf_counter() - t0) / 100_000
    assert tr.events() == []
    assert per_call < 5e-6


def test_default_tracer_starts_disabled():
    assert trace.default.enabled is False


def test_events_from_threads_are_ordered_and_named():
    tr = trace.Tracer()

    def work(n):
        with tr.span("work", n=n) as out:
            out["done"] = True
        tr.instant("after", n=n)

    threads = [start_thread(f"worker-{i}", work, i) for i in range(3)]
    for t in threads:
        t.join()
    ev = tr.events()
    assert [e["ts_ns"] for e in ev] == sorted(e["ts_ns"] for e in ev)
    assert {e["thread"] for e in ev} == {"worker-0", "worker-1", "worker-2"}
    ends = [e for e in ev if e["ph"] == "E"]
    assert all(e["args"] == {"done": True} for e in ends)


def test_chrome_json_round_trip(tmp_path):
    tr = trace.Tracer()
    tr.begin("outer")
    tr.instant("point", fd=3, obj=object())
    t0 = time.monotonic_ns()
    tr.complete("slice", t0, t0 + 1500)
    tr.end("outer")
    start_thread("qkio-other", tr.instant, "there").join()
    path = tmp_path / "t.json"
    tr.write(path)
    doc = json.loads(path.read_text())
    evs = doc["traceEvents"]
    pid = os.getpid()
    assert all(e["pid"] == pid for e in evs)
    assert {e["ph"] for e in evs} == {"M", "B", "E", "X", "i"}
    meta = {e["tid"]: e["args"]["name"] for e in evs if e["name"] == "thread_name"}
    assert threading.get_native_id() in meta
    assert "qkio-other" in meta.values()
    for e in evs:
        if e["ph"] != "M":
            assert e["tid"] in meta and isinstance(e["ts"], float)
    x = [e for e in evs if e["ph"] == "X"][0]
    assert x["dur"] == 1.5  # microseconds
    assert isinstance([e for e in evs if e["name"] == "point"][0]["args"]["obj"], str)


def test_lock_wait_is_recorded_only_when_it_blocks():
    tr = trace.Tracer()
    m = GlobalMutex(tracer=tr)
    with m:
        pass
    assert tr.events() == []  # uncontended: nothing
    held = threading.Event()
    release = threading.Event()

    def holder():
        with m:
            held.set()
            release.wait()

    h = start_thread("holder", holder)
    held.wait()
    threading.Timer(0.05, release.set).start()
    with m:
        assert m.held_by_me()
    h.join()
    waits = [e for e in tr.events() if e["name"] == "lock waited for"]
    assert len(waits) == 1
    assert waits[0]["args"]["holder"] == "holder"
    assert waits[0]["dur_ns"] >= 40_000_000


def test_global_mutex_rules():
    m = GlobalMutex()
    m.lock()
    try:
        import pytest
        with pytest.raises(RuntimeError):
            m.lock()  # not recursive
        err = []
        t = threading.Thread(target=lambda: err.append(_try_unlock(m)))
        t.start()
        t.join()
        assert err == [True]  # only the holder may unlock
        with m.released():
            assert not m.held_by_me() and not m.locked()
        assert m.held_by_me()
    finally:
        m.unlock()


def _try_unlock(m):
    try:
        m.unlock()
    except RuntimeError:
        return True
    return False
