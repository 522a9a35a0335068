/* CPU-bound kernels for `tandem bench vm`, built both to wasm and natively. The hot loops
 * call no library code, so both builds run the same program and the ratio measures the
 * code generator and runtime, not two different libcs. Fixed-width types keep wasm32
 * (32-bit long) and x86_64 computing the same values: the printed checksum must match.
 * argv[1] scales the work. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint32_t xs = 2463534242u;
static uint32_t rnd(void) { xs ^= xs << 13; xs ^= xs >> 17; xs ^= xs << 5; return xs; }

static uint64_t fnv(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ull; }
    return h;
}

/* Quicksort with median-of-three and insertion sort for short runs. */
static void sort_u32(uint32_t *v, int64_t lo, int64_t hi) {
    while (hi - lo > 16) {
        int64_t mid = lo + (hi - lo) / 2;
        uint32_t a = v[lo], b = v[mid], c = v[hi];
        uint32_t pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot) i++;
            while (v[j] > pivot) j--;
            if (i <= j) { uint32_t t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
        }
        if (j - lo < hi - i) { sort_u32(v, lo, j); lo = i; } else { sort_u32(v, i, hi); hi = j; }
    }
    for (int64_t i = lo + 1; i <= hi; i++) {
        uint32_t x = v[i];
        int64_t j = i - 1;
        while (j >= lo && v[j] > x) { v[j + 1] = v[j]; j--; }
        v[j + 1] = x;
    }
}

static int64_t sieve(uint8_t *s, int64_t n) {
    for (int64_t i = 0; i < n; i++) s[i] = 1;
    int64_t primes = 0;
    for (int64_t i = 2; i < n; i++)
        if (s[i]) { primes++; for (int64_t j = i * i; j < n; j += i) s[j] = 0; }
    return primes;
}

static double matmul(const double *a, const double *b, double *c, int m) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < m; j++) {
            double s = 0;
            for (int k = 0; k < m; k++) s += a[i * m + k] * b[k * m + j];
            c[i * m + j] = s;
        }
    return c[m * m / 2];
}

int main(int argc, char **argv) {
    int scale = argc > 1 ? atoi(argv[1]) : 10;
    enum { N = 1 << 18, M = 160, S = 4 << 20 };
    uint32_t *v = malloc(N * sizeof *v);
    uint8_t *s = malloc(S);
    double *a = malloc(M * M * sizeof *a), *b = malloc(M * M * sizeof *b), *c = malloc(M * M * sizeof *c);
    if (!v || !s || !a || !b || !c) { fprintf(stderr, "bench_cpu: out of memory\n"); return 1; }
    uint64_t check = 0;
    for (int round = 0; round < scale; round++) {
        for (int i = 0; i < N; i++) v[i] = rnd();
        check ^= fnv((const uint8_t *)v, N * sizeof *v);
        sort_u32(v, 0, N - 1);
        check += v[N / 2];
        check += (uint64_t)sieve(s, S);
        for (int i = 0; i < M * M; i++) { a[i] = (rnd() % 1000) / 100.0; b[i] = (rnd() % 1000) / 100.0; }
        check += (uint64_t)(matmul(a, b, c, M) * 1000);
    }
    printf("bench_cpu: scale %d, checksum %llu\n", scale, (unsigned long long)check);
    return 0;
}
