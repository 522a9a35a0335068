/* An ordinary program whose files change under it the way real programs' files do: a
 * journal rotated by renaming (app.log -> app.log.K, then a new app.log) while the old
 * descriptor writes its last line, a data file written through a descriptor kept across
 * rename(tmp, data), and a scratch file unlinked while open and still used. Every byte it
 * writes is a function of the step number, so the files after a run are the same however
 * many hosts the run took. After WAIT_MS it takes its steps, and says on stderr how long
 * they took. Usage: filechurn [STEPS [MS_PER_STEP [WAIT_MS]]] */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "filechurn: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void put(int fd, const char *text) {
    size_t n = strlen(text);
    if (write(fd, text, n) != (ssize_t)n) die("write");
}

int main(int argc, char **argv) {
    int steps = argc > 1 ? atoi(argv[1]) : 300;
    int ms = argc > 2 ? atoi(argv[2]) : 10;
    int wait_ms = argc > 3 ? atoi(argv[3]) : 0;
    char line[128];

    int log = open("app.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log < 0) die("open app.log");
    int data = open("data.tmp", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (data < 0) die("open data.tmp");
    put(data, "header\n");
    if (rename("data.tmp", "data.dat") != 0) die("rename data.tmp");
    int scratch = open("scratch", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (scratch < 0) die("open scratch");
    if (unlink("scratch") != 0) die("unlink scratch");
    int bad = 0;
    struct timespec w = {wait_ms / 1000, (long)(wait_ms % 1000) * 1000000L};
    if (wait_ms > 0) nanosleep(&w, NULL);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < steps; i++) {
        snprintf(line, sizeof line, "line %d\n", i);
        put(log, line);
        snprintf(line, sizeof line, "record %d\n", i);
        put(data, line);
        /* The unlinked scratch file still holds what was written to it. */
        snprintf(line, sizeof line, "%08d", i);
        if (pwrite(scratch, line, 8, (off_t)(i % 64) * 8) != 8) die("pwrite scratch");
        char back[9] = {0};
        if (pread(scratch, back, 8, (off_t)(i % 64) * 8) != 8 || memcmp(back, line, 8) != 0) bad++;
        if (i % 50 == 49) {
            char old[32];
            snprintf(old, sizeof old, "app.log.%d", i / 50);
            if (rename("app.log", old) != 0) die("rotate");
            int fresh = open("app.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (fresh < 0) die("open new app.log");
            snprintf(line, sizeof line, "rotated after line %d\n", i);
            put(log, line);
            close(log);
            log = fresh;
        }
        struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
        nanosleep(&t, NULL);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    fprintf(stderr, "filechurn: steps took %lld us\n",
            (long long)(t1.tv_sec - t0.tv_sec) * 1000000LL + (t1.tv_nsec - t0.tv_nsec) / 1000);
    close(log);
    close(data);
    close(scratch);
    printf("filechurn: %d steps, %d bad reads\n", steps, bad);
    return bad != 0;
}
