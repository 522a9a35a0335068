/* CPU-bound kernels for `tandem bench vm`, built both to wasm and natively: integer
 * hashing, a sort, a sieve, and a small floating-point matrix product. argv[1] scales the
 * work; the printed checksum must be the same for both builds. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t xs = 2463534242u;
static uint32_t rnd(void) { xs ^= xs << 13; xs ^= xs >> 17; xs ^= xs << 5; return xs; }

static uint64_t fnv(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ull; }
    return h;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int scale = argc > 1 ? atoi(argv[1]) : 10;
    uint64_t check = 0;
    enum { N = 1 << 18, M = 96 };
    uint32_t *v = malloc(N * sizeof *v);
    uint8_t *sieve = malloc(4 << 20);
    double *a = malloc(M * M * sizeof *a), *b = malloc(M * M * sizeof *b), *c = malloc(M * M * sizeof *c);
    for (int round = 0; round < scale; round++) {
        for (int i = 0; i < N; i++) v[i] = rnd();
        check ^= fnv((const uint8_t *)v, N * sizeof *v);
        qsort(v, N, sizeof *v, cmp_u32);
        check += v[N / 2];
        memset(sieve, 1, 4 << 20);
        long primes = 0;
        for (long i = 2; i < (4 << 20); i++)
            if (sieve[i]) { primes++; for (long j = i * i; j < (4 << 20); j += i) sieve[j] = 0; }
        check += (uint64_t)primes;
        for (int i = 0; i < M * M; i++) { a[i] = (rnd() % 1000) / 100.0; b[i] = (rnd() % 1000) / 100.0; }
        for (int i = 0; i < M; i++)
            for (int j = 0; j < M; j++) {
                double s = 0;
                for (int k = 0; k < M; k++) s += a[i * M + k] * b[k * M + j];
                c[i * M + j] = s;
            }
        check += (uint64_t)(c[M * M / 2] * 1000);
    }
    printf("bench_cpu: scale %d, checksum %llu\n", scale, (unsigned long long)check);
    return 0;
}
