/*
 * which-thread: who takes a process-directed signal?
 *
 * Chapter 6 of the qkio book runs this program.  It starts three threads
 * beside the main thread, each one busy in its own way, and none of them
 * blocking SIGUSR2 or SIGRTMIN+2:
 *
 *   main     read(0): waits for the notebook to close its stdin
 *   poller   poll() on a pipe nobody writes, like an io thread in select()
 *   spinner  a loop that makes no system call, like a vCPU in guest mode
 *   sleeper  nanosleep() for an hour
 *
 * With --main-blocks, the main thread blocks both signals with sigprocmask()
 * *after* starting the others.  In a threaded program on Linux that changes
 * the calling thread's mask only (it is the same rt_sigprocmask system call
 * that pthread_sigmask makes), so the other three keep theirs.
 *
 * The handler is a plain C signal handler, installed without SA_RESTART.  It
 * runs in whichever thread the kernel chose, on that thread's stack, and
 * reports the thread's id with write(2), which is async-signal-safe (printf
 * is not).  After the handler returns, the interrupted thread reports what
 * the signal did to it: a blocking call that came back with EINTR, or a spin
 * loop that noticed it had been interrupted.
 *
 * Every report is one JSON line written with a single write(2) to a pipe, so
 * lines from different threads never interleave.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Set by the handler in the thread it interrupts: thread-local on purpose. */
static __thread volatile sig_atomic_t taken;

/* Every thread has named itself before main says "ready". */
static pthread_barrier_t named;

static void say(const char *line)
{
    ssize_t unused = write(1, line, strlen(line));
    (void)unused;
}

/* The handler: only async-signal-safe calls (gettid, write), no stdio. */
static void handler(int signo)
{
    int saved = errno;
    char line[64] = "{\"event\": \"handler\", \"signo\": ", digits[24];
    char *end = line + strlen(line);
    long values[2] = { signo, syscall(SYS_gettid) };
    for (int v = 0; v < 2; v++) {
        int n = 0;
        long x = values[v];
        do digits[n++] = '0' + x % 10; while (x /= 10);
        while (n) *end++ = digits[--n];
        if (v == 0) { memcpy(end, ", \"tid\": ", 9); end += 9; }
    }
    memcpy(end, "}\n", 3);
    say(line);
    taken++;
    errno = saved;
}

static void report(const char *name, const char *what)
{
    char line[160];
    snprintf(line, sizeof line, "{\"event\": \"interrupted\", \"thread\": \"%s\", "
             "\"tid\": %ld, \"what\": \"%s\"}\n", name, syscall(SYS_gettid), what);
    say(line);
}

static void *poller(void *arg)
{
    int fds[2];
    (void)arg;
    prctl(PR_SET_NAME, "poller");
    pthread_barrier_wait(&named);
    if (pipe(fds) != 0)
        return NULL;
    for (;;) {
        struct pollfd p = { .fd = fds[0], .events = POLLIN };
        if (poll(&p, 1, -1) < 0 && errno == EINTR)
            report("poller", "poll() returned EINTR");
    }
}

static void *spinner(void *arg)
{
    sig_atomic_t seen = 0;
    (void)arg;
    prctl(PR_SET_NAME, "spinner");
    pthread_barrier_wait(&named);
    for (;;) {
        if (taken != seen) {
            seen = taken;
            report("spinner", "spin loop interrupted (no system call to fail)");
        }
    }
    return NULL;
}

static void *sleeper(void *arg)
{
    (void)arg;
    prctl(PR_SET_NAME, "sleeper");
    pthread_barrier_wait(&named);
    for (;;) {
        struct timespec hour = { .tv_sec = 3600 };
        if (nanosleep(&hour, NULL) < 0 && errno == EINTR)
            report("sleeper", "nanosleep() returned EINTR");
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int main_blocks = argc > 1 && strcmp(argv[1], "--main-blocks") == 0;
    void *(*bodies[3])(void *) = { poller, spinner, sleeper };
    struct sigaction sa;
    sigset_t both;
    char line[256], buf[64];
    pthread_t t[3];

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;       /* sa_flags = 0: no SA_RESTART */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR2, &sa, NULL);
    sigaction(SIGRTMIN + 2, &sa, NULL);

    prctl(PR_SET_NAME, "main");
    pthread_barrier_init(&named, NULL, 4);
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, bodies[i], NULL);
    pthread_barrier_wait(&named);

    sigemptyset(&both);
    sigaddset(&both, SIGUSR2);
    sigaddset(&both, SIGRTMIN + 2);
    if (main_blocks)
        sigprocmask(SIG_BLOCK, &both, NULL);   /* this thread only: see above */

    snprintf(line, sizeof line, "{\"event\": \"ready\", \"pid\": %d, \"main_blocks\": %s, "
             "\"rt_signo\": %d}\n", getpid(), main_blocks ? "true" : "false", SIGRTMIN + 2);
    say(line);
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n == 0)
            return 0;              /* the notebook closed our stdin: done */
        if (n < 0 && errno == EINTR)
            report("main", "read() returned EINTR");
    }
}
