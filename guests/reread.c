/* An ordinary program that reads a whole file TIMES times, each time with one read() per
 * BUF bytes, and prints a checksum. Nothing in it knows about Tandem: it is how a program that
 * scans a data file again and again (a report, an index rebuild) reads.
 *
 * usage: reread FILE TIMES BUF_BYTES */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: reread FILE TIMES BUF_BYTES\n");
        return 2;
    }
    long times = strtol(argv[2], NULL, 10);
    size_t size = strtoul(argv[3], NULL, 10);
    char *buf = malloc(size);
    if (!buf || size == 0 || times <= 0) {
        fprintf(stderr, "reread: bad arguments\n");
        return 2;
    }
    uint64_t sum = 1469598103934665603ull, total = 0;
    for (long t = 0; t < times; t++) {
        int fd = open(argv[1], O_RDONLY);
        if (fd < 0) {
            perror("reread: open");
            return 1;
        }
        for (;;) {
            ssize_t n = read(fd, buf, size);
            if (n < 0) {
                perror("reread: read");
                return 1;
            }
            if (n == 0) break;
            total += (uint64_t)n;
            for (ssize_t i = 0; i < n; i += 4096) sum = (sum ^ (unsigned char)buf[i]) * 1099511628211ull;
        }
        close(fd);
    }
    printf("reread: %llu bytes, checksum %016llx\n", (unsigned long long)total, (unsigned long long)sum);
    return 0;
}
