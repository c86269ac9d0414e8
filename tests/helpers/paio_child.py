"""A process for posix-aio-compat tests: blocks the VMM's signals first, then runs one scenario.

The pool's workers report with ``kill(getpid(), SIGUSR2)``, a process-directed
signal, so it must run where every thread blocks SIGUSR2 -- never inside
pytest.  Usage: ``paio_child.py SCENARIO FILE [--method M]``; prints one JSON
object on stdout.
"""

import argparse
import errno
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from qkio import signals as sigmod  # noqa: E402


def census():
    names = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("file")
    ap.add_argument("--method", default="signalfd")
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()

    if args.scenario == "unblocked-thread":
        # A thread started before SIGUSR2 is blocked keeps it open.
        stop = threading.Event()
        t = threading.Thread(target=stop.wait, daemon=True)
        t.start()
        from qkio.main_loop import MainLoop
        from qkio.posix_aio_compat import QEMU_AIO_READ, paio_init
        with MainLoop() as loop:
            pool = paio_init(loop, method=args.method)
            fd = os.open(args.file, os.O_RDONLY)
            try:
                pool.paio_submit(fd, 0, [bytearray(10)], QEMU_AIO_READ)
            except RuntimeError as e:
                print(json.dumps({"refused": str(e), "workers": pool.threads_started}))
                return
            finally:
                os.close(fd)
                pool.close()
        print(json.dumps({"refused": None}))
        return

    # qkio run's order: block first, while this is the only thread.
    sigmod.block_vmm_signals(sigmod.VMM_SIGNALS + (signal.SIGBUS,))
    from qkio.main_loop import MainLoop
    from qkio.posix_aio_compat import QEMU_AIO_FLUSH, QEMU_AIO_READ, QEMU_AIO_WRITE, paio_init
    out = {}
    loop = MainLoop()
    # kvm_main_loop's own signal fd (SIGIO, SIGALRM, SIGBUS), so that compat
    # mode shows its two signal threads.
    main_src = sigmod.SignalSource(args.method, (signal.SIGIO, signal.SIGALRM, signal.SIGBUS))
    main_src.attach(loop)
    idle = 0.3 if args.scenario == "idle-exit" else 10.0
    pool = paio_init(loop, method=args.method, idle_timeout=idle)
    out["path"] = pool.path
    fd = os.open(args.file, os.O_RDWR)
    results = []
    where = []

    def cb(opaque, ret):
        results.append((opaque, ret))
        where.append((threading.current_thread().name, loop.lock.held_by_me()))

    if args.scenario == "roundtrip":
        n = args.requests
        chunks = [[bytes([i % 251]) * 1000, b"x" * 24, bytes([(i + 7) % 251]) * 3072]
                  for i in range(n)]
        for i, bufs in enumerate(chunks):
            pool.paio_submit(fd, i * 4096, bufs, QEMU_AIO_WRITE, cb, ("w", i))
        pool.qemu_aio_flush()
        pool.paio_submit(fd, 0, [], QEMU_AIO_FLUSH, cb, ("f", 0))
        pool.qemu_aio_flush()
        reads = [[bytearray(100), bytearray(3996)] for _ in range(n)]
        for i, bufs in enumerate(reads):
            pool.paio_submit(fd, i * 4096, bufs, QEMU_AIO_READ, cb, ("r", i))
        # While requests are in flight: the threads of this process.
        out["census"] = census()
        pool.qemu_aio_flush()
        out["read_ok"] = all(b"".join(bytes(b) for b in reads[i]) == b"".join(chunks[i])
                             for i in range(n))
        out["rets"] = sorted({r for _, r in results})
        out["callbacks"] = len(results)
        out["where"] = sorted(set(map(tuple, where)))
        out["completed"] = pool.completed
        out["signals_sent"] = pool.signals_sent
        out["signals_taken"] = pool.signals_taken
        out["threads_started"] = pool.threads_started
        masks = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
            except FileNotFoundError:
                continue
            if name.startswith("qkio-aio") and name != "qkio-aio-sigwt":
                masks[name] = sorted(sigmod.blocked_signals(tid))
        out["worker_masks"] = masks
    elif args.scenario == "errors":
        size = os.fstat(fd).st_size
        pool.paio_submit(fd, size - 10, [bytearray(100)], QEMU_AIO_READ, cb, "short")
        wfd = os.open(args.file, os.O_WRONLY)
        pool.paio_submit(wfd, 0, [bytearray(10)], QEMU_AIO_READ, cb, "badf")
        pool.qemu_aio_flush()
        os.close(wfd)
        out["rets"] = dict(results)
        out["EINVAL"], out["EBADF"] = errno.EINVAL, errno.EBADF
    elif args.scenario == "idle-exit":
        pool.paio_submit(fd, 0, [bytearray(10)], QEMU_AIO_READ, cb, "r")
        pool.qemu_aio_flush()
        out["workers_after_flush"] = pool.cur_threads
        end = time.monotonic() + 10
        while pool.cur_threads and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.1)
        out["workers_after_idle"] = pool.cur_threads
        out["census_after_idle"] = census()
    elif args.scenario == "cancel":
        # One worker, busy with a big write; the second request waits in the
        # queue and is cancelled there.
        pool.max_threads = 1
        big = bytes(32 << 20)
        pool.paio_submit(fd, 0, [big], QEMU_AIO_WRITE, cb, "big")
        queued = pool.paio_submit(fd, 0, [bytearray(10)], QEMU_AIO_READ, cb, "queued")
        pool.paio_cancel(queued)
        pool.qemu_aio_flush()
        out["callbacks"] = [o for o, _ in results]
        out["cancelled_ret"] = queued.ret
        out["ECANCELED"] = errno.ECANCELED
    os.close(fd)
    pool.close()
    main_src.close()
    loop.close()
    # A joined Python thread may still be leaving the kernel for a moment.
    end = time.monotonic() + 5
    while len(census()) > 1 and time.monotonic() < end:
        time.sleep(0.01)
    out["census_at_end"] = census()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
