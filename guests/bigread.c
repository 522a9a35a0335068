/* An ordinary program that reads a large file in chunks of a given size (until end of file,
 * as any program does: a read may return fewer bytes than asked), waits a while, prints a
 * checksum of what it read and exits with a given code. Nothing in it knows about Tandem.
 *
 * usage: bigread FILE CHUNK_BYTES SLEEP_MS EXIT_CODE */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: bigread FILE CHUNK_BYTES SLEEP_MS EXIT_CODE\n");
        return 2;
    }
    size_t chunk = strtoul(argv[2], NULL, 10);
    long sleep_ms = strtol(argv[3], NULL, 10);
    int code = atoi(argv[4]);
    printf("bigread: start\n");
    fflush(stdout);
    char *buf = malloc(chunk);
    if (!buf || chunk == 0) {
        fprintf(stderr, "bigread: cannot allocate %zu bytes\n", chunk);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        fprintf(stderr, "bigread: open %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    uint64_t total = 0, reads = 0, sum = 14695981039346656037ull; /* FNV-1a */
    for (;;) {
        ssize_t n = read(fd, buf, chunk);
        if (n < 0) {
            fprintf(stderr, "bigread: read: %s\n", strerror(errno));
            return 2;
        }
        if (n == 0) break;
        reads++;
        total += (uint64_t)n;
        for (ssize_t i = 0; i < n; i++) sum = (sum ^ (unsigned char)buf[i]) * 1099511628211ull;
    }
    close(fd);
    struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    printf("bigread: read %llu bytes in %llu reads, fnv %016llx\n", (unsigned long long)total,
           (unsigned long long)reads, (unsigned long long)sum);
    printf("bigread: done\n");
    return code;
}
