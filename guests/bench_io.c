/* File- and clock-heavy load for `tandem bench vm`: argv[1] rounds, each reading the
 * clock, writing a 4 KiB record at a rotating offset, reading one back and, every 256
 * rounds, syncing the file and listing its size. Prints a checksum of what it read. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long rounds = argc > 1 ? atol(argv[1]) : 20000;
    int fd = open("bench_io.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror("open"); return 1; }
    char rec[4096], back[4096];
    unsigned long sum = 0;
    for (long i = 0; i < rounds; i++) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        memset(rec, (int)(i & 0xff), sizeof rec);
        memcpy(rec, &ts, sizeof ts);
        off_t at = (off_t)(i % 64) * (off_t)sizeof rec;
        if (pwrite(fd, rec, sizeof rec, at) != (ssize_t)sizeof rec) { perror("pwrite"); return 1; }
        off_t from = (off_t)((i * 7) % 64) * (off_t)sizeof back;
        ssize_t n = pread(fd, back, sizeof back, from);
        for (ssize_t k = 16; k < n; k += 512) sum += (unsigned char)back[k];
        if (i % 256 == 255) {
            struct stat st;
            fsync(fd);
            fstat(fd, &st);
            sum += (unsigned long)st.st_size;
        }
    }
    close(fd);
    unlink("bench_io.dat");
    printf("bench_io: %ld rounds, checksum %lu\n", rounds, sum);
    return 0;
}
