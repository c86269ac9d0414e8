/* wake_ref.c: the floor for `qkio bench wakeup` -- the same wake-up, in C.
 *
 *   wake_ref eventfd|pipe COUNT WARMUP GAP_US [SENDER_CPU IO_CPU]
 *
 * With the two CPU numbers, each thread keeps to its CPU (as the Python
 * benchmark pins its threads: see qkio/bench/affinity.py for why).
 *
 * Two threads, as in the Python benchmark (qkio.bench.wakeup):
 *
 *   io thread  holds a mutex except while it waits (qemu-kvm 0.12's
 *              main_loop_wait: unlock qemu_mutex, select(), lock again),
 *              select()s on the notifier's read end; when select() returns
 *              it takes the mutex, drains the notifier as qkio's
 *              EventNotifier.drain does (io_thread_wakeup, less the read
 *              that could only fail: one read for an eventfd, reads until a
 *              short one for a pipe), reads CLOCK_MONOTONIC and writes the
 *              time on an acknowledgement pipe.  The clock is read after
 *              the drain because that is where the Python io thread reads
 *              it: when main_loop_wait returns, its handler having run;
 *   sender     reads CLOCK_MONOTONIC, rings the notifier (an 8-byte 1 to the
 *              eventfd, or 1 byte to the pipe: qemu_kvm_notify_work), blocks
 *              reading the acknowledgement, then sleeps GAP_US so that the io
 *              thread is back asleep in select() before the next ring.
 *
 * One sample = acknowledged time - time before the ring.  The first WARMUP
 * are dropped.  Prints one JSON line:
 *   {"kind": K, "samples_ns": [...], "io_cpu_ns": C, "wakeups": W}
 * io_cpu_ns is the io thread's own CPU time (CLOCK_THREAD_CPUTIME_ID) over
 * the whole run, W the wake-ups it acknowledged.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

static int eventfd_kind;
static int notify_r, notify_w, ack_r, ack_w;
static pthread_mutex_t global_lock = PTHREAD_MUTEX_INITIALIZER;
static volatile int stop;
static long wakeups;
static uint64_t io_cpu_ns;
static int io_cpu = -1;

static void die(const char *what)
{
    fprintf(stderr, "wake_ref: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set))  /* 0: the calling thread */
        die("sched_setaffinity");
}

static uint64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void notify(void)
{
    /* EAGAIN means the fd is readable already: nothing to add (see notify.py). */
    if (eventfd_kind) {
        uint64_t one = 1;
        if (write(notify_w, &one, 8) < 0 && errno != EAGAIN)
            die("write eventfd");
    } else if (write(notify_w, "", 1) < 0 && errno != EAGAIN) {
        die("write pipe");
    }
}

static void drain(void)
{
    char buf[4096];
    for (;;) {
        /* An eventfd's one read returns and zeroes its whole counter; a
         * pipe read that returns less than asked for emptied the pipe. */
        ssize_t want = eventfd_kind ? 8 : (ssize_t)sizeof buf;
        ssize_t n = read(notify_r, buf, want);
        if (n < 0 && errno != EAGAIN)
            die("drain");
        if (n < 0 || eventfd_kind || n < want)
            return;
    }
}

static void *io_thread(void *arg)
{
    (void)arg;
    pin(io_cpu);
    uint64_t cpu0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
    pthread_mutex_lock(&global_lock);
    while (!stop) {
        fd_set rfds;
        FD_ZERO(&rfds);
        FD_SET(notify_r, &rfds);
        struct timeval tv = { .tv_sec = 1 };
        pthread_mutex_unlock(&global_lock);
        int r = select(notify_r + 1, &rfds, NULL, NULL, &tv);
        pthread_mutex_lock(&global_lock);
        if (r < 0 && errno != EINTR)
            die("select");
        if (r <= 0)
            continue;
        drain();
        uint64_t t = now_ns(CLOCK_MONOTONIC);
        if (stop)
            break;
        wakeups++;
        if (write(ack_w, &t, 8) != 8)
            die("write ack");
    }
    pthread_mutex_unlock(&global_lock);
    io_cpu_ns = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    return NULL;
}

int main(int argc, char **argv)
{
    if ((argc != 5 && argc != 7) || (strcmp(argv[1], "eventfd") && strcmp(argv[1], "pipe"))) {
        fprintf(stderr, "usage: wake_ref eventfd|pipe COUNT WARMUP GAP_US [SENDER_CPU IO_CPU]\n");
        return 2;
    }
    eventfd_kind = !strcmp(argv[1], "eventfd");
    if (argc == 7) {
        pin(atoi(argv[5]));
        io_cpu = atoi(argv[6]);
    }
    long count = atol(argv[2]), warmup = atol(argv[3]), gap_us = atol(argv[4]);
    if (count < 0 || warmup < 0 || gap_us < 0) {
        fprintf(stderr, "wake_ref: COUNT, WARMUP and GAP_US must not be negative\n");
        return 2;
    }
    if (eventfd_kind) {
        /* qemu_eventfd: one eventfd, its "write end" a dup of it. */
        notify_r = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (notify_r < 0)
            die("eventfd");
        notify_w = dup(notify_r);
    } else {
        int p[2];
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
            die("pipe2");
        notify_r = p[0];
        notify_w = p[1];
    }
    int ack[2];
    if (pipe2(ack, O_CLOEXEC) < 0)
        die("pipe2 ack");
    ack_r = ack[0];
    ack_w = ack[1];

    uint64_t *samples = malloc((count ? count : 1) * sizeof *samples);
    if (!samples)
        die("malloc");
    pthread_t io;
    if (pthread_create(&io, NULL, io_thread, NULL))
        die("pthread_create");
    struct timespec settle = { .tv_nsec = 10000000 };
    struct timespec gap = { .tv_sec = gap_us / 1000000, .tv_nsec = gap_us % 1000000 * 1000 };
    nanosleep(&settle, NULL);  /* let the io thread reach select() */
    for (long i = 0; i < warmup + count; i++) {
        uint64_t t0 = now_ns(CLOCK_MONOTONIC), t1;
        notify();
        if (read(ack_r, &t1, 8) != 8)
            die("read ack");
        if (i >= warmup)
            samples[i - warmup] = t1 - t0;
        if (gap_us)
            nanosleep(&gap, NULL);
    }
    stop = 1;
    notify();
    pthread_join(io, NULL);

    printf("{\"kind\": \"%s\", \"io_cpu_ns\": %llu, \"wakeups\": %ld, \"samples_ns\": [",
           argv[1], (unsigned long long)io_cpu_ns, wakeups);
    for (long i = 0; i < count; i++)
        printf(i ? ", %llu" : "%llu", (unsigned long long)samples[i]);
    printf("]}\n");
    return 0;
}
