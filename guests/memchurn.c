/* Writes its memory all the time, for snapshots whose memory is copied while the guest
 * runs: a heap buffer of MIB mebibytes, filled, then at every step the clock and the
 * entropy source read (two events: snapshot points) and the buffer written at places the
 * entropy chooses (a word in each of PAGES pages, and one page whole), until SECONDS of
 * its clock have passed. It prints the steps taken and a hash of the whole buffer: a
 * snapshot that missed one write restores to another hash.
 * Usage: memchurn [MIB] [SECONDS] [PAGES] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t next(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atoi(argv[1]) : 64;
    int seconds = argc > 2 ? atoi(argv[2]) : 3;
    int per_step = argc > 3 ? atoi(argv[3]) : 64;
    if (mib < 1 || mib > 1024 || seconds < 0 || per_step < 0 || per_step > 100000) {
        fprintf(stderr, "memchurn: bad arguments\n");
        return 2;
    }
    size_t len = mib << 20, pages = len / PAGE;
    unsigned char *p = malloc(len);
    if (!p) {
        fprintf(stderr, "memchurn: cannot allocate %zu MiB\n", mib);
        return 1;
    }
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = next(&x);
        memcpy(p + i, &v, 8);
    }
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    unsigned long steps = 0;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec >= seconds) break;
        uint64_t seed;
        if (getentropy(&seed, sizeof seed) != 0) {
            perror("memchurn: getentropy");
            return 1;
        }
        x ^= seed | 1;
        for (int k = 0; k < per_step; k++) {
            uint64_t r = next(&x);
            size_t at = (size_t)(r % pages) * PAGE + (size_t)((r >> 32) % (PAGE / 8)) * 8;
            uint64_t v = r ^ steps;
            memcpy(p + at, &v, 8);
        }
        memset(p + (size_t)(next(&x) % pages) * PAGE, (int)steps, PAGE);
        steps++;
    }
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        h = (h ^ v) * 1099511628211ull;
    }
    printf("memchurn: %lu steps, hash %016llx\n", steps, (unsigned long long)h);
    return 0;
}
