"""The event notifier (qemu-kvm's io_thread_fd), both kinds, real fds."""

import fcntl
import os
import select
import threading
import time

import pytest

from qkio.notify import EventNotifier
from qkio.trace import Tracer


@pytest.fixture(params=["eventfd", "pipe"])
def notifier(request):
    with EventNotifier(request.param) as n:
        yield n


def readable(fd, timeout=0.0):
    return bool(select.select([fd], [], [], timeout)[0])


def test_unknown_kind_refused():
    with pytest.raises(ValueError):
        EventNotifier("socket")


def test_eventfd_is_one_object_twice():
    with EventNotifier("eventfd") as n:
        assert n.read_fd != n.write_fd
        # A dup shares the open file description: same inode, same flags.
        assert os.fstat(n.read_fd).st_ino == os.fstat(n.write_fd).st_ino
        assert os.readlink(f"/proc/self/fd/{n.read_fd}") == "anon_inode:[eventfd]"


def test_pipe_kind_is_a_pipe():
    with EventNotifier("pipe") as n:
        assert os.readlink(f"/proc/self/fd/{n.read_fd}").startswith("pipe:")


def test_both_ends_non_blocking(notifier):
    for fd in (notifier.read_fd, notifier.write_fd):
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def test_notify_makes_readable_and_drain_empties(notifier):
    assert not readable(notifier.read_fd)
    assert notifier.drain() == 0
    for _ in range(3):
        notifier.notify()
    assert readable(notifier.read_fd)
    assert notifier.drain() == 3  # three doorbells, one wake-up
    assert not readable(notifier.read_fd)


def test_notify_from_another_thread_wakes_select(notifier):
    def later():
        time.sleep(0.1)
        notifier.notify()

    t = threading.Thread(target=later)
    t.start()
    t0 = time.monotonic()
    assert readable(notifier.read_fd, timeout=10)
    assert time.monotonic() - t0 < 1.0
    t.join()


def test_full_pipe_notify_does_not_block_or_fail():
    with EventNotifier("pipe") as n:
        size = fcntl.fcntl(n.write_fd, 1032)  # F_GETPIPE_SZ
        for _ in range(size + 10):  # the last writes hit EAGAIN, silently
            n.notify()
        assert n.drain() == size


def test_notify_records_the_writer_thread():
    tr = Tracer(enabled=True)
    with EventNotifier("eventfd", tracer=tr) as n:
        t = threading.Thread(target=n.notify, args=("bh",), name="CPU 0/KVM")
        t.start()
        t.join()
        n.drain()
    sent = [e for e in tr.events() if e["name"] == "notify sent"]
    assert sent[0]["args"]["by"] == "CPU 0/KVM"
    assert sent[0]["args"]["reason"] == "bh"
    assert [e["name"] for e in tr.events()] == ["notify sent", "notify drained"]
