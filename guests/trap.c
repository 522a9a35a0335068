/* trap: a guest that fails, for VM monitoring.
 *
 *   trap MS         says "up", ticks (sleeps 10 ms at a time) for MS milliseconds, then
 *                   traps (__builtin_trap: the wasm `unreachable` instruction);
 *   trap MS exit N  the same, but exits with code N instead of trapping. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long ms = argc > 1 ? atol(argv[1]) : 1000;
    if (ms < 0 || ms > 3600L * 1000)
        ms = 1000;
    (void)!write(1, "up\n", 3);
    for (long t = 0; t < ms; t += 10)
        usleep(10 * 1000);
    if (argc > 3 && strcmp(argv[2], "exit") == 0) {
        printf("exiting with %d\n", atoi(argv[3]));
        return atoi(argv[3]);
    }
    (void)!write(1, "trapping\n", 9);
    __builtin_trap();
}
