/* spin: a guest that stops only when its host stops it.
 *
 *   spin        says "spinning", reads the clock once, then computes forever without a
 *               single WASI call (only epoch interruption can stop it);
 *   spin tick   sleeps 1 ms at a time forever (one event each), saying "ticks N" every
 *               100 sleeps: a steady trickle of events for cut-recording tests. */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void say(const char *s) {
    /* write(2), not stdio: the line must leave at once, the guest never exits. */
    (void)!write(1, s, strlen(s));
}

int main(int argc, char **argv) {
    struct timespec t;
    if (argc > 1 && strcmp(argv[1], "tick") == 0) {
        char line[64];
        for (unsigned long n = 1;; n++) {
            usleep(1000);
            if (n % 100 == 0) {
                snprintf(line, sizeof line, "ticks %lu\n", n);
                say(line);
            }
        }
    }
    say("spinning\n");
    clock_gettime(CLOCK_MONOTONIC, &t);
    volatile unsigned long x = (unsigned long)t.tv_nsec;
    for (;;)
        x = x * 6364136223846793005UL + 1442695040888963407UL;
}
