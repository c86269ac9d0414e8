/* host_loop.c: the count-loop guest's loop, run on the host instead.
 *
 *   host_loop COUNT
 *
 * Runs COUNT iterations of the same two instructions the guest runs
 * (`dec %ecx; jnz`), written in inline assembly so that the compiler can
 * neither remove nor reshape the loop, and prints one JSON line,
 * {"seconds": S}, S being CLOCK_MONOTONIC around the loop.  Set beside the
 * guest's rate, it says how much slower this host's KVM runs the same
 * instructions than the host's own CPU does.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: host_loop COUNT\n");
        return 2;
    }
    unsigned int count = (unsigned int)strtoul(argv[1], NULL, 0);
    double t0 = now();
    if (count) {
        __asm__ volatile(
            ".p2align 4\n"
            "1: dec %%ecx\n"
            "   jnz 1b\n"
            : "+c"(count) : : "cc");
    }
    double t1 = now();
    printf("{\"seconds\": %.9f}\n", t1 - t0);
    return 0;
}
