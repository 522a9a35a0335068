/* A program whose whole state is worth snapshotting: at every step it reads both clocks
 * and the entropy source, keeps a running hash of everything it saw in memory that grows
 * as it goes (heap blocks allocated step by step), writes a journal it rotates by renaming
 * while the old descriptor still writes, keeps a scratch file unlinked while open, and
 * does its I/O from deep in a recursion, so that a snapshot taken at any call holds many
 * frames. It prints a line every 16 steps and its hash at the end.
 * Usage: snapmix [STEPS] */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "snapmix: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t hash = 1469598103934665603ull;

static void mix(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) hash = (hash ^ b[i]) * 1099511628211ull;
}

static int journal = -1;
static int scratch = -1;
static unsigned char *blocks[4096];

/* One step's I/O, `depth` frames down: locals on every frame are part of the result. */
static uint64_t step(int k, int depth) {
    uint64_t local = (uint64_t)k * 2654435761u + (uint64_t)depth;
    if (depth > 0) return local ^ step(k, depth - 1);
    struct timespec mono, wall;
    clock_gettime(CLOCK_MONOTONIC, &mono);
    clock_gettime(CLOCK_REALTIME, &wall);
    unsigned char r[16];
    if (getentropy(r, sizeof r) != 0) die("getentropy");
    mix(r, sizeof r);
    mix(&mono, sizeof mono);
    char line[96];
    int n = snprintf(line, sizeof line, "step %d hash %016llx\n", k,
                     (unsigned long long)hash);
    if (write(journal, line, (size_t)n) != n) die("write journal");
    if (pwrite(scratch, r, sizeof r, (off_t)(k % 64) * 16) != (ssize_t)sizeof r)
        die("pwrite scratch");
    unsigned char back[16];
    if (pread(scratch, back, sizeof back, (off_t)((k * 7) % 64) * 16) < 0) die("pread");
    mix(back, sizeof back);
    /* The heap grows: a block per step, filled from what was seen. */
    size_t size = 4096 + (size_t)(r[0] % 16) * 1024;
    unsigned char *blk = malloc(size);
    if (!blk) die("malloc");
    for (size_t i = 0; i < size; i++) blk[i] = (unsigned char)(hash >> (i % 8 * 8));
    blocks[k % 4096] = blk;
    return local;
}

static void rotate(int k) {
    char to[32];
    snprintf(to, sizeof to, "mix.log.%d", k / 32);
    if (rename("mix.log", to) != 0) die("rename");
    /* The old descriptor writes its last line after the rename. */
    if (write(journal, "rotated\n", 8) != 8) die("write rotated");
    close(journal);
    journal = open("mix.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (journal < 0) die("open journal");
    DIR *d = opendir(".");
    if (!d) die("opendir");
    int files = 0;
    while (readdir(d)) files++;
    closedir(d);
    mix(&files, sizeof files);
}

int main(int argc, char **argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 200;
    journal = open("mix.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (journal < 0) die("open journal");
    scratch = open("scratch", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (scratch < 0) die("open scratch");
    if (unlink("scratch") != 0) die("unlink scratch");
    uint64_t acc = 0;
    for (int k = 0; k < steps; k++) {
        acc ^= step(k, 8 + k % 24);
        if (k % 32 == 31) rotate(k);
        if (k % 16 == 15) printf("snapmix: %d steps, hash %016llx\n", k + 1,
                                 (unsigned long long)hash);
    }
    uint64_t sum = 0;
    for (int k = 0; k < steps && k < 4096; k++) sum += blocks[k][k % 4096];
    printf("snapmix: done, hash %016llx acc %016llx sum %llu\n", (unsigned long long)hash,
           (unsigned long long)acc, (unsigned long long)sum);
    return 0;
}
