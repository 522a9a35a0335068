/* An ordinary program that keeps a journal in its working folder: it reads the clock and
 * the entropy source, creates, appends, reads, renames, lists, stats, seeks and deletes
 * files and directories, and prints what it did. Nothing in it knows about Tandem. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void die(const char *what) {
    fprintf(stderr, "fsdemo: %s: %s\n", what, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "guest";
    struct timespec t0, t1, wall;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    clock_gettime(CLOCK_REALTIME, &wall);
    unsigned char token[8];
    if (getentropy(token, sizeof token) != 0) die("getentropy");
    char tok[17];
    for (int i = 0; i < 8; i++) sprintf(tok + 2 * i, "%02x", token[i]);
    printf("fsdemo %s: wall clock %lld.%09ld, token %s\n", name, (long long)wall.tv_sec,
           wall.tv_nsec, tok);

    if (mkdir("notes", 0755) != 0 && errno != EEXIST) die("mkdir notes");

    /* Append a line to the journal; count the runs so far by reading it back. */
    FILE *j = fopen("journal.log", "a");
    if (!j) die("open journal");
    fprintf(j, "run %s at %lld token %s\n", name, (long long)wall.tv_sec, tok);
    fclose(j);
    j = fopen("journal.log", "r");
    if (!j) die("reopen journal");
    char line[256];
    int runs = 0;
    while (fgets(line, sizeof line, j)) runs++;
    fclose(j);
    printf("journal holds %d runs\n", runs);

    /* Write a note under a temporary name, then rename it into place. */
    char tmp[64], final[64];
    snprintf(tmp, sizeof tmp, "notes/.%s.tmp", tok);
    snprintf(final, sizeof final, "notes/%s.txt", tok);
    FILE *n = fopen(tmp, "w");
    if (!n) die("create note");
    for (int i = 0; i < 100; i++) fprintf(n, "line %d of note %s\n", i, tok);
    fflush(n);
    fsync(fileno(n));
    fclose(n);
    if (rename(tmp, final) != 0) die("rename note");

    /* Positional I/O: patch the note in the middle, read the patch back. */
    int fd = open(final, O_RDWR);
    if (fd < 0) die("open note");
    if (pwrite(fd, "PATCHED", 7, 100) != 7) die("pwrite");
    char back[8] = {0};
    if (pread(fd, back, 7, 100) != 7) die("pread");
    off_t end = lseek(fd, 0, SEEK_END);
    close(fd);
    printf("patched note %s (%lld bytes): %s\n", final, (long long)end, back);

    /* List the notes in name order with their sizes; keep the newest five. */
    DIR *d = opendir("notes");
    if (!d) die("opendir");
    char *names[512];
    int count = 0;
    struct dirent *e;
    while ((e = readdir(d)) && count < 512) {
        if (e->d_name[0] == '.') continue;
        names[count++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, count, sizeof *names, cmp);
    long total = 0;
    for (int i = 0; i < count; i++) {
        char p[300];
        struct stat st;
        snprintf(p, sizeof p, "notes/%s", names[i]);
        if (stat(p, &st) != 0) die("stat");
        total += st.st_size;
    }
    printf("%d notes, %ld bytes\n", count, total);
    for (int i = 0; i + 5 < count; i++) {
        char p[300];
        snprintf(p, sizeof p, "notes/%s", names[i]);
        if (unlink(p) != 0) die("unlink");
    }
    for (int i = 0; i < count; i++) free(names[i]);

    /* Make and remove a scratch directory; sleep a little and time it. */
    if (mkdir("scratch", 0700) != 0) die("mkdir scratch");
    if (rmdir("scratch") != 0) die("rmdir scratch");
    struct timespec nap = {0, 5 * 1000 * 1000};
    nanosleep(&nap, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    printf("done in %ld ms, random number %d\n", ms, (int)(token[0] % 100));
    return 0;
}
