/* compat_sigwait.c: the record qemu-kvm 0.12.3's signal thread put in the
 * signal pipe, made for real.
 *
 *   compat_sigwait compat|signalfd COUNT
 *
 * Blocks every signal in the main thread before anything else (so that every
 * thread it starts inherits the mask), prints "ready <pid>" and then collects
 * COUNT SIGUSR2s sent to the process, printing each 128-byte record it read
 * as one line of hex:
 *
 *   compat    the way compatfd.c's sigwait_compat (qemu-kvm-0.12.3, L26-68)
 *             did it: a thread blocks everything, waits in sigwaitinfo(),
 *             copies the signal number into the first four bytes of a
 *             128-byte buffer on its stack that nothing else initialises,
 *             and writes all 128 bytes into a pipe; the main thread reads
 *             the pipe.  The other 124 bytes are whatever the stack held.
 *   signalfd  the main thread reads the same signal from a signalfd: the
 *             kernel's own 128-byte signalfd_siginfo.
 *
 * The point is the compat record's 124 bytes, which qemu-kvm's readers
 * (sigfd_handler, sigbus_handler) took for ssi_code, ssi_pid, ssi_addr...
 * Written for qkio's book; it copies the behaviour, not the code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#define RECORD 128

static sigset_t wanted;
static int pipe_w;

static void die(const char *what)
{
    fprintf(stderr, "compat_sigwait: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* The compat thread.  The buffer is deliberately left uninitialised, as in
 * 0.12.3; tell the compiler that this is the experiment, not a mistake. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
static void *sigwait_compat(void *unused)
{
    sigset_t all;
    (void)unused;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        siginfo_t info;
        int signo = sigwaitinfo(&wanted, &info);
        if (signo < 0) {
            if (errno == EINTR)
                continue;
            die("sigwaitinfo");
        }
        char buffer[RECORD];
        memcpy(buffer, &signo, sizeof(signo));
        size_t done = 0;
        while (done < sizeof(buffer)) {
            ssize_t n = write(pipe_w, buffer + done, sizeof(buffer) - done);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                die("write");
            done += (size_t)n;
        }
    }
    return NULL;
}
#pragma GCC diagnostic pop

static void read_full(int fd, unsigned char *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = read(fd, buf + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("read");
        done += (size_t)n;
    }
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "compat") && strcmp(argv[1], "signalfd"))) {
        fprintf(stderr, "usage: compat_sigwait compat|signalfd COUNT\n");
        return 2;
    }
    int count = atoi(argv[2]);
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);   /* before any thread exists */
    sigemptyset(&wanted);
    sigaddset(&wanted, SIGUSR2);

    int fd;
    if (!strcmp(argv[1], "compat")) {
        int fds[2];
        pthread_t thread;
        if (pipe(fds))
            die("pipe");
        pipe_w = fds[1];
        if (pthread_create(&thread, NULL, sigwait_compat, NULL))
            die("pthread_create");
        pthread_detach(thread);
        fd = fds[0];
    } else {
        fd = signalfd(-1, &wanted, 0);
        if (fd < 0)
            die("signalfd");
    }
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    for (int i = 0; i < count; i++) {
        unsigned char record[RECORD];
        read_full(fd, record, sizeof(record));
        for (size_t j = 0; j < sizeof(record); j++)
            printf("%02x", record[j]);
        printf("\n");
        fflush(stdout);
    }
    return 0;
}
