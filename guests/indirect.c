/* Event imports reached both ways: in rounds, a phase of clock readings made through a
 * function pointer (an indirect call, which Asyncify leaves uninstrumented: no snapshot
 * point), then a phase made by direct calls (each one a snapshot point). The readings are
 * taken `depth` frames down a real recursion (a volatile local on every frame, used after
 * the call, keeps the compiler from turning it into a loop); every reading goes into a
 * hash, printed at the end.
 * Usage: indirect [ROUNDS] [PER_PHASE] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t hash = 1469598103934665603ull;

/* Reads the clock `n` times, `depth` frames down. Never address-taken: only ever called
 * directly. */
__attribute__((noinline)) static uint64_t readings(int n, int depth) {
    volatile uint64_t local = (uint64_t)n * 2654435761u + (uint64_t)depth;
    if (depth > 0) {
        uint64_t below = readings(n, depth - 1);
        return below ^ local;
    }
    for (int i = 0; i < n; i++) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        hash = (hash ^ (uint64_t)t.tv_nsec) * 1099511628211ull;
    }
    return local ^ hash;
}

/* The same, entered through a function pointer. */
__attribute__((noinline)) static uint64_t pointed_to(int n, int depth) {
    return readings(n, depth) + 1;
}

/* volatile: the compiler cannot turn the call through it into a direct one. */
static uint64_t (*volatile through_pointer)(int, int) = pointed_to;

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
