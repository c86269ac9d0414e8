"""The io thread's main loop, on real fds and real threads, under every backend."""

import os
import socket
import threading
import time

import pytest

from qkio.main_loop import BACKENDS, MainLoop
from qkio.trace import Tracer


@pytest.fixture(params=sorted(BACKENDS))
def loop(request):
    with MainLoop(backend=request.param) as lp:
        yield lp


def settle(loop):
    """Consume the doorbell rung by registering handlers (as qemu does, every
    registration wakes the loop), so the next wait really waits."""
    loop.notifier.drain()


@pytest.fixture
def pipe():
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        MainLoop(backend="kqueue")


def test_read_handler_called_with_opaque(loop, pipe):
    r, w = pipe
    seen = []
    loop.set_fd_handler(r, lambda opaque: seen.append((opaque, os.read(r, 10))), None, "op")
    settle(loop)
    os.write(w, b"hi")
    assert loop.main_loop_wait(1000) == 1
    assert seen == [("op", b"hi")]


def test_write_handler_called_when_writable(loop, pipe):
    r, w = pipe
    seen = []
    loop.set_fd_handler(w, None, lambda opaque: seen.append(opaque), 7)
    loop.main_loop_wait(1000)
    assert seen == [7]


def test_deleted_record_is_freed_after_dispatch(loop, pipe):
    r, w = pipe
    calls = []

    def reader(opaque):
        calls.append(os.read(r, 10))
        loop.set_fd_handler(r, None, None)  # a handler removing itself
        # Marked, not yet freed: the dispatch walk is still going.
        assert [rec.deleted for rec in loop.handlers() if rec.fd == r] == [True]

    loop.set_fd_handler(r, reader, None)
    os.write(w, b"x")
    loop.main_loop_wait(1000)
    assert calls == [b"x"]
    assert r not in [rec.fd for rec in loop.handlers()]  # freed after dispatch
    os.write(w, b"y")
    loop.main_loop_wait(0)
    assert calls == [b"x"]  # never called again


def test_removed_handler_not_called_even_if_fd_ready_this_round(loop):
    # Two readable fds; whichever handler runs first removes the other one.
    # The other fd is in this round's ready set, but its handler must not run.
    a_r, a_w = os.pipe2(os.O_NONBLOCK)
    b_r, b_w = os.pipe2(os.O_NONBLOCK)
    try:
        calls = []

        def on(fd, other):
            def handler(opaque):
                calls.append(fd)
                loop.set_fd_handler(other, None, None)
            return handler

        loop.set_fd_handler(a_r, on(a_r, b_r), None)
        loop.set_fd_handler(b_r, on(b_r, a_r), None)
        os.write(a_w, b"1")
        os.write(b_w, b"1")
        loop.main_loop_wait(1000)
        assert len(calls) == 1
    finally:
        for fd in (a_r, a_w, b_r, b_w):
            os.close(fd)


def test_reregistering_a_deleted_fd_revives_it(loop, pipe):
    r, w = pipe
    calls = []
    loop.set_fd_handler(r, lambda o: calls.append("old"), None)
    loop.set_fd_handler(r, None, None)
    loop.set_fd_handler(r, lambda o: calls.append(os.read(r, 10)), None)
    os.write(w, b"z")
    loop.main_loop_wait(1000)
    assert calls == [b"z"]


def test_can_read_poll_zero_keeps_readable_fd_out_of_the_wait(loop, pipe):
    r, w = pipe
    can_read = [0]
    calls = []
    loop.set_fd_handler2(r, lambda o: can_read[0], lambda o: calls.append(os.read(r, 10)), None)
    os.write(w, b"data")
    settle(loop)
    # The fd IS readable ...
    import select
    assert select.select([r], [], [], 0)[0] == [r]
    # ... but flow control says no, so it is not watched and not dispatched;
    # the wait runs to its timeout.
    t0 = time.monotonic()
    assert loop.main_loop_wait(50) == 0
    assert time.monotonic() - t0 >= 0.04
    assert calls == []
    can_read[0] = 1
    assert loop.main_loop_wait(1000) == 1
    assert calls == [b"data"]


def test_lock_released_while_waiting(loop):
    got_it = threading.Event()

    def other():
        with loop.lock:  # would block forever if select() ran locked
            got_it.set()
        loop.notify_event("done")

    settle(loop)
    with loop.lock:
        t = threading.Thread(target=other)
        t.start()
        t0 = time.monotonic()
        loop.main_loop_wait(10_000)
        assert got_it.is_set()
        assert loop.lock.held_by_me()  # taken again after the wait
    assert time.monotonic() - t0 < 2
    t.join()


def test_notify_from_another_thread_wakes_a_long_wait(loop):
    settle(loop)
    def later():
        time.sleep(0.1)
        loop.notify_event("test")

    t = threading.Thread(target=later)
    t.start()
    t0 = time.monotonic()
    loop.main_loop_wait(10_000)
    elapsed = time.monotonic() - t0
    t.join()
    assert 0.05 < elapsed < 1.0


def test_registering_an_fd_wakes_the_loop(loop, pipe):
    r, w = pipe
    calls = []
    os.write(w, b"!")

    def later():
        time.sleep(0.1)
        with loop.lock:
            loop.set_fd_handler(r, lambda o: calls.append(os.read(r, 10)), None)

    t = threading.Thread(target=later)
    t.start()
    assert loop.run_until(lambda: calls, timeout_ms=10_000, deadline_s=5)
    t.join()
    assert calls == [b"!"]


def test_timers_then_bottom_halves_in_order(loop):
    order = []
    now = time.monotonic_ns()
    t1 = loop.timer_new(lambda o: order.append(o), "t1")
    t2 = loop.timer_new(lambda o: order.append(o), "t2")
    t3 = loop.timer_new(lambda o: order.append(o), "t3")
    t2.mod_timer(now + 20_000_000)
    t1.mod_timer(now + 10_000_000)
    t3.mod_timer(now + 15_000_000)
    t3.del_timer()
    bh_a = loop.bh_new(lambda o: order.append(o), "bh_a")
    bh_b = loop.bh_new(lambda o: order.append(o), "bh_b")
    bh_c = loop.bh_new(lambda o: order.append(o), "bh_c")
    time.sleep(0.03)
    bh_a.schedule()
    bh_b.schedule()
    bh_c.schedule()
    bh_c.cancel()
    loop.main_loop_wait(1000)
    # Timers by deadline, then BHs newest-first (qemu_bh_new prepends).
    assert order == ["t1", "t2", "bh_b", "bh_a"]
    assert not t1.pending() and not t3.pending()


def test_timer_deadline_shortens_the_wait(loop):
    fired = []
    t = loop.timer_new(lambda o: fired.append(time.monotonic_ns()))
    deadline = time.monotonic_ns() + 50_000_000
    t.mod_timer(deadline)
    assert loop.run_until(lambda: fired, timeout_ms=10_000, deadline_s=5)
    assert fired[0] >= deadline
    assert fired[0] - deadline < 200_000_000


def test_timer_armed_from_another_thread_wakes_the_loop(loop):
    fired = []

    def arm():
        time.sleep(0.05)
        with loop.lock:
            t = loop.timer_new(lambda o: fired.append(1))
            t.mod_timer(time.monotonic_ns() + 20_000_000)

    th = threading.Thread(target=arm)
    th.start()
    t0 = time.monotonic()
    assert loop.run_until(lambda: fired, timeout_ms=10_000, deadline_s=5)
    th.join()
    assert time.monotonic() - t0 < 1.0


def test_bh_scheduled_from_another_thread_runs_promptly(loop):
    ran_in = []
    bh = loop.bh_new(lambda o: ran_in.append(threading.current_thread().name))

    def other():
        time.sleep(0.05)
        bh.schedule()  # no lock needed to schedule

    th = threading.Thread(target=other, name="not-io")
    th.start()
    t0 = time.monotonic()
    assert loop.run_until(lambda: ran_in, timeout_ms=10_000, deadline_s=5)
    th.join()
    assert time.monotonic() - t0 < 1.0
    assert ran_in == [threading.current_thread().name]


def test_pending_bh_makes_the_wait_not_block(loop):
    ran = []
    loop.bh_new(lambda o: ran.append(1)).schedule()
    loop.notifier.drain()  # even with the doorbell silenced ...
    t0 = time.monotonic()
    loop.main_loop_wait(10_000)
    assert ran == [1]
    assert time.monotonic() - t0 < 0.5  # ... the timeout was cut to zero


def test_socket_hangup_reported_as_readable(loop):
    a, b = socket.socketpair()
    got = []
    loop.set_fd_handler(a.fileno(), lambda o: got.append(a.recv(10)), None)
    b.close()
    loop.main_loop_wait(1000)
    assert got == [b""]
    a.close()


def test_run_and_request_exit(loop):
    def stop():
        time.sleep(0.05)
        loop.request_exit()

    th = threading.Thread(target=stop)
    th.start()
    t0 = time.monotonic()
    loop.run(timeout_ms=10_000)
    th.join()
    assert time.monotonic() - t0 < 1.0


def test_idle_loop_blocks_instead_of_spinning(loop):
    settle(loop)
    t0 = time.monotonic()
    c0 = time.process_time()
    loop.main_loop_wait(200)
    assert time.monotonic() - t0 >= 0.19
    assert time.process_time() - c0 < 0.05


def test_trace_shows_wait_dispatch_and_notifier(pipe):
    tr = Tracer(enabled=True)
    r, w = pipe
    with MainLoop(tracer=tr) as lp:
        lp.set_fd_handler(r, lambda o: os.read(r, 10), None)
        th = threading.Thread(target=lambda: lp.notify_event("hello"), name="writer")
        th.start()
        th.join()
        lp.main_loop_wait(1000)
    names = [e["name"] for e in tr.events()]
    assert "main_loop_wait" in names
    sent = [e for e in tr.events() if e["name"] == "notify sent" and e["args"]["reason"] == "hello"]
    assert sent and sent[0]["args"]["by"] == "writer" and sent[0]["thread"] == "writer"
    assert any(n.startswith("fd_read ") and "drain" in n for n in names)


def _eventfd_writes(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("eventfd-count:"))


def test_bh_scheduled_twice_rings_once_as_in_0_12(loop):
    # qemu-kvm 0.12.3 async.c: qemu_bh_schedule returns early if bh->scheduled.
    loop.notifier.drain()
    ran = []
    bh = loop.bh_new(lambda o: ran.append(1))
    for _ in range(100):
        bh.schedule()
    assert _eventfd_writes(loop.notifier.read_fd) == 1
    loop.main_loop_wait(0)
    assert ran == [1]
    bh.schedule()  # once it has run, scheduling again rings again
    assert _eventfd_writes(loop.notifier.read_fd) == 1
    loop.main_loop_wait(0)
    assert ran == [1, 1]


def test_bh_schedule_idle_then_schedule_keeps_it_idle_as_in_0_12(loop):
    loop.notifier.drain()
    bh = loop.bh_new(lambda o: None)
    bh.schedule_idle()
    bh.schedule()  # 0.12 returns early: already scheduled
    assert bh.idle and bh.scheduled
    assert _eventfd_writes(loop.notifier.read_fd) == 0


def test_fd_closed_and_reopened_under_the_same_number_is_watched(loop):
    """An fd number reused between two waits is a new open file: epoll forgot the
    old one when it was closed, so the backend must register the new one even
    though the fd lists handed to it look exactly as before."""
    got = []
    r1, w1 = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    loop.set_fd_handler(r1, lambda fd: got.append(os.read(fd, 10)), None, r1)
    loop.main_loop_wait(0)
    loop.set_fd_handler(r1, None, None)  # removed, closed, reopened, re-added: all between two waits
    os.close(r1)
    os.close(w1)
    r2, w2 = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        assert r2 == r1, "the kernel hands out the lowest free number"
        loop.set_fd_handler(r2, lambda fd: got.append(os.read(fd, 10)), None, r2)
        os.write(w2, b"new")
        deadline = time.monotonic() + 2
        while not got and time.monotonic() < deadline:
            loop.main_loop_wait(100)
        assert got == [b"new"]
    finally:
        loop.set_fd_handler(r2, None, None)
        loop.main_loop_wait(0)
        os.close(r2)
        os.close(w2)


@pytest.mark.parametrize("kind", ["devnull", "regular"])
def test_fds_epoll_cannot_watch_are_always_ready(loop, kind, tmp_path):
    """/dev/null and regular files cannot be added to an epoll set (EPERM); like
    select and poll, every backend treats them as always readable and writable."""
    if kind == "devnull":
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    else:
        (tmp_path / "f").write_bytes(b"file data")
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CLOEXEC)
    reads, writes = [], []
    try:
        loop.set_fd_handler(fd, lambda f: reads.append(os.read(f, 100)), lambda f: writes.append(f), fd)
        start = time.monotonic()
        loop.main_loop_wait(5000)
        loop.main_loop_wait(5000)
        assert time.monotonic() - start < 4, "an always-ready fd must not make the wait block"
        assert reads and writes
        assert reads[0] == (b"" if kind == "devnull" else b"file data")
    finally:
        loop.set_fd_handler(fd, None, None)
        loop.main_loop_wait(0)
        os.close(fd)


def test_a_handler_set_on_the_doorbell_fd_is_the_one_called():
    """The doorbell-only shortcut in main_loop_wait calls the notifier's drain;
    once someone sets a handler of their own on that fd, theirs is called."""
    with MainLoop(backend="select") as loop:
        seen = []
        loop.notifier.notify()
        assert loop.main_loop_wait(0) == 1           # drained by the shortcut
        assert loop.main_loop_wait(0) == 0           # nothing left to read
        fd = loop.notifier.read_fd
        loop.set_fd_handler(fd, lambda opaque: seen.append(loop.notifier.drain()), None)
        loop.notifier.notify()
        assert loop.main_loop_wait(0) == 1
        assert seen and seen[-1] >= 1
