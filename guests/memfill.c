/* Fills MIB mebibytes of heap with pseudo-random bytes (as incompressible as real data
 * gets), then reads the clock and prints a checksum: the snapshot benchmark's guest.
 * Usage: memfill [MIB] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? (size_t)atoi(argv[1]) : 64;
    size_t words = mib << 17; /* 8-byte words */
    uint64_t *p = malloc(words * sizeof *p);
    if (!p) {
        fprintf(stderr, "memfill: cannot allocate %zu MiB\n", mib);
        return 1;
    }
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = x;
    }
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    uint64_t sum = 0;
    for (size_t i = 0; i < words; i += 4096) sum += p[i];
    printf("memfill: %zu MiB, sum %016llx\n", mib, (unsigned long long)sum);
    return 0;
}
