/* Reads both clocks many times, sleeping now and then, and checks that neither ever goes
 * backwards. Prints only its verdict, so that its output does not depend on the values it
 * read: a replay whose logged clock readings were made to go backwards must still print
 * the same verdict, because the VM's clock never goes backwards. Exit 1 if one did. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long ns(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2000;
    long long last_real = 0, last_mono = 0;
    for (int i = 0; i < n; i++) {
        long long r = ns(CLOCK_REALTIME), m = ns(CLOCK_MONOTONIC);
        if (r < last_real || m < last_mono) {
            printf("clockcheck: clock went backwards at reading %d\n", i);
            return 1;
        }
        last_real = r;
        last_mono = m;
        if (i % 500 == 499) {
            struct timespec nap = {0, 1000000};
            nanosleep(&nap, NULL);
        }
    }
    printf("clockcheck: %d readings, never backwards\n", n);
    return 0;
}
