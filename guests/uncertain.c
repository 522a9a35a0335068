/* Disk operations that must not be done twice (create, remove, rename, link), each
 * result appended to `results`: under FT a primary that dies right after performing one
 * must leave its secondary answering the guest exactly as the primary would have.
 * Usage: uncertain [MS_TO_WAIT_FIRST] */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

static int results;

static void note(const char *what, int r) {
    char line[128];
    int n = snprintf(line, sizeof line, "%s = %d %s\n", what, r < 0 ? -1 : r >= 0 ? 0 : r,
                     r < 0 ? strerror(errno) : "ok");
    if (write(results, line, (size_t)n) != n) _exit(3);
}

int main(int argc, char **argv) {
    /* Give a secondary time to attach first (milliseconds). */
    int wait_ms = argc > 1 ? atoi(argv[1]) : 0;
    struct timespec t = {wait_ms / 1000, (long)(wait_ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
    results = open("results", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (results < 0) return 2;
    note("mkdir d", mkdir("d", 0755));
    int dir = open("d", O_RDONLY | O_DIRECTORY);
    int lock = open("lock", O_WRONLY | O_CREAT | O_EXCL, 0644);
    note("open lock O_EXCL", lock);
    if (lock >= 0 && write(lock, "owner\n", 6) != 6) return 3;
    int tmp = open("tmp", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (tmp < 0 || write(tmp, "data v1\n", 8) != 8) return 3;
    note("rename tmp data", rename("tmp", "data"));
    note("write through tmp after the rename", write(tmp, "more\n", 5) == 5 ? 0 : -1);
    note("link data hard", link("data", "hard"));
    note("symlink data sl", symlink("data", "sl"));
    note("unlink hard", unlink("hard"));
    int held = open("data", O_RDONLY);
    note("rename lock data (data held open)", rename("lock", "data"));
    char back[16] = {0};
    note("read the replaced data", (int)pread(held, back, sizeof back - 1, 0));
    note(back[0] ? "it still says data v1" : "it is empty", 0);
    note("rename d d2 (d held open)", rename("d", "d2"));
    int inside = openat(dir, "inside", O_WRONLY | O_CREAT, 0644);
    note("create through the held d", inside);
    note("write it", inside >= 0 && write(inside, "in\n", 3) == 3 ? 0 : -1);
    close(inside);
    note("unlink d2/inside", unlink("d2/inside"));
    note("rmdir d2", rmdir("d2"));
    close(dir);
    close(held);
    close(tmp);
    close(lock);
    printf("uncertain: done\n");
    return 0;
}
