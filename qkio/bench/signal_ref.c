/* signal_ref.c: the floor for `qkio bench signal` -- the VMM side in C.
 *
 *   signal_ref --method signalfd|thread|async --count N --warmup W
 *
 * A drop-in for `python -m qkio.bench.signal_child`: the same arguments, the
 * same protocol on stdout, so qkio.bench.signal_latency sends it signals with
 * the very same sender loop and the two can be compared path by path:
 *
 *   "R"                  once, just before the io thread first waits;
 *   8 bytes per SIGUSR2  CLOCK_MONOTONIC (ns) read first thing in the handler;
 *   one JSON line        after W + N of them: {"cpu_ns", "user_s", "system_s",
 *                        "seen", "path", "threads"} (CPU from the end of the
 *                        warm-up to the last handler, all threads).
 *
 * As in `qkio run` (and qemu-kvm 0.12), the VMM's signals are blocked first,
 * while the process has one thread; the io thread holds a mutex except while
 * it waits in select(), and runs the handler after select() returns:
 *
 *   signalfd  select() on a signalfd; read() dequeues 128-byte
 *             signalfd_siginfo records (qemu_signalfd under CONFIG_SIGNALFD);
 *   thread    a second thread loops in sigwaitinfo() and writes a 128-byte
 *             record per signal into a pipe the io thread select()s on
 *             (compatfd.c's sigwait_compat; here the record is zeroed and
 *             carries the signal number, since only ssi_signo is read);
 *   async     no fd: SIGUSR2 has a handler that only sets a flag, and the io
 *             thread waits in pselect() with SIGUSR2 unblocked for the
 *             duration of the wait only (so no signal can slip in between
 *             checking the flag and sleeping); pselect() fails with EINTR
 *             and the io thread runs the handler.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

/* The signals a qkio VMM takes synchronously (qkio.signals.VMM_SIGNALS). */
static const int vmm_signals[] = { SIGTERM, SIGINT, SIGHUP, SIGUSR2, SIGALRM, SIGIO };

static long total, warmup, seen;
static uint64_t cpu0_ns;
static struct rusage ru0;
static pthread_mutex_t global_lock = PTHREAD_MUTEX_INITIALIZER;
static int pipe_w;
static sigset_t mask;
static volatile sig_atomic_t tripped;

static void die(const char *what)
{
    fprintf(stderr, "signal_ref: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void put(const void *buf, size_t n)
{
    if (write(1, buf, n) != (ssize_t)n)
        die("write stdout");
}

/* The VMM's handler: runs in the io thread with the lock held. */
static void on_signal(int signo)
{
    if (signo != SIGUSR2)
        return;
    uint64_t t = now_ns(CLOCK_MONOTONIC);
    put(&t, 8);
    if (++seen == warmup) {
        cpu0_ns = now_ns(CLOCK_PROCESS_CPUTIME_ID);
        getrusage(RUSAGE_SELF, &ru0);
    }
}

static void read_records(int fd)
{
    struct signalfd_siginfo si[16];
    ssize_t n = read(fd, si, sizeof si);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return;
        die("read records");
    }
    for (ssize_t i = 0; i < n / (ssize_t)sizeof si[0]; i++)
        on_signal((int)si[i].ssi_signo);
}

static void *sigwait_thread(void *arg)
{
    (void)arg;
    for (;;) {
        siginfo_t info;
        int signo = sigwaitinfo(&mask, &info);
        if (signo < 0) {
            if (errno == EINTR)
                continue;
            die("sigwaitinfo");
        }
        struct signalfd_siginfo rec;
        memset(&rec, 0, sizeof rec);
        rec.ssi_signo = signo;
        /* Blocking write, as in qemu: a full pipe holds the signals in the kernel. */
        if (write(pipe_w, &rec, sizeof rec) != sizeof rec)
            die("write record");
    }
    return NULL;
}

static void trip(int signo)
{
    (void)signo;
    tripped = 1;
}

static int thread_count(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int n = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "Threads: %d", &n) == 1)
            break;
    if (f)
        fclose(f);
    return n;
}

int main(int argc, char **argv)
{
    const char *method = NULL;
    long count = -1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--method"))
            method = argv[i + 1];
        else if (!strcmp(argv[i], "--count"))
            count = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup"))
            warmup = atol(argv[i + 1]);
    }
    if (!method || count < 0 || warmup < 0
        || (strcmp(method, "signalfd") && strcmp(method, "thread") && strcmp(method, "async"))) {
        fprintf(stderr, "usage: signal_ref --method signalfd|thread|async --count N --warmup W\n");
        return 2;
    }
    total = warmup + count;

    /* 1. Block the VMM's signals while this is the only thread. */
    sigemptyset(&mask);
    for (size_t i = 0; i < sizeof vmm_signals / sizeof vmm_signals[0]; i++)
        sigaddset(&mask, vmm_signals[i]);
    if (pthread_sigmask(SIG_BLOCK, &mask, NULL))
        die("pthread_sigmask");

    int fd = -1;
    sigset_t wait_mask;  /* async: the mask during pselect() */
    pthread_sigmask(SIG_BLOCK, NULL, &wait_mask);
    if (!strcmp(method, "signalfd")) {
        fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
        if (fd < 0)
            die("signalfd");
    } else if (!strcmp(method, "thread")) {
        int p[2];
        if (pipe2(p, O_CLOEXEC) < 0)
            die("pipe2");
        fd = p[0];
        pipe_w = p[1];
        fcntl(fd, F_SETFL, O_NONBLOCK);
        pthread_t t;
        if (pthread_create(&t, NULL, sigwait_thread, NULL))
            die("pthread_create");
        pthread_detach(t);
    } else {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = trip;  /* no SA_RESTART: the wait must return */
        if (sigaction(SIGUSR2, &sa, NULL) < 0)
            die("sigaction");
        sigdelset(&wait_mask, SIGUSR2);
    }

    cpu0_ns = now_ns(CLOCK_PROCESS_CPUTIME_ID);
    getrusage(RUSAGE_SELF, &ru0);
    put("R", 1);
    pthread_mutex_lock(&global_lock);
    while (seen < total) {
        fd_set rfds;
        FD_ZERO(&rfds);
        if (fd >= 0)
            FD_SET(fd, &rfds);
        struct timespec timeout = { .tv_sec = 1 };
        pthread_mutex_unlock(&global_lock);
        int r = pselect(fd + 1, &rfds, NULL, NULL, &timeout, &wait_mask);
        pthread_mutex_lock(&global_lock);
        if (r < 0 && errno != EINTR)
            die("pselect");
        if (tripped) {
            tripped = 0;
            on_signal(SIGUSR2);
        }
        if (r > 0 && FD_ISSET(fd, &rfds))
            read_records(fd);
    }
    pthread_mutex_unlock(&global_lock);

    uint64_t cpu_ns = now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0_ns;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double user = (ru.ru_utime.tv_sec - ru0.ru_utime.tv_sec)
                  + (ru.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double sys = (ru.ru_stime.tv_sec - ru0.ru_stime.tv_sec)
                 + (ru.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    char line[256];
    int n = snprintf(line, sizeof line,
                     "{\"cpu_ns\": %llu, \"user_s\": %.6f, \"system_s\": %.6f, \"seen\": %ld, "
                     "\"path\": \"%s\", \"threads\": %d}\n",
                     (unsigned long long)cpu_ns, user, sys, seen, method, thread_count());
    put(line, n);
    return 0;
}
