/* Event imports reached both ways: in rounds, a phase of clock readings made through a
 * function pointer (an indirect call, which Asyncify leaves uninstrumented: no snapshot
 * point), then a phase made by direct calls (each one a snapshot point). Every reading
 * goes into a hash kept on the stack of the phase's frames and in memory; the hash is
 * printed at the end.
 * Usage: indirect [ROUNDS] [PER_PHASE] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t hash = 1469598103934665603ull;

/* Reads the clock `n` times, `depth` frames down; its locals are part of the result. */
static uint64_t readings(int n, int depth) {
    uint64_t local = (uint64_t)n * 2654435761u + (uint64_t)depth;
    if (depth > 0) return local ^ readings(n, depth - 1);
    for (int i = 0; i < n; i++) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        hash = (hash ^ (uint64_t)t.tv_nsec) * 1099511628211ull;
        local += hash;
    }
    return local;
}

/* volatile: the compiler cannot turn the call through it into a direct one. */
static uint64_t (*volatile through_pointer)(int, int) = readings;

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 10;
    int per_phase = argc > 2 ? atoi(argv[2]) : 100;
    uint64_t acc = 0;
    for (int r = 0; r < rounds; r++) {
        acc ^= through_pointer(per_phase, 3);
        acc ^= readings(per_phase, 3);
    }
    printf("indirect: %d rounds, hash %016llx acc %016llx\n", rounds,
           (unsigned long long)hash, (unsigned long long)acc);
    return 0;
}
