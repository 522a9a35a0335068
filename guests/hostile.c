/* A guest that asks the host for too much at once, as a hostile or careless program may:
 * usage: hostile random|gather [MIB]|poll|bigread. Each mode prints what it got; the host must
 * answer without allocating without bound and with a log that replays. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <wasi/api.h>

static uint64_t sum(const unsigned char *p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) s = s * 31 + p[i];
    return s;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "random")) {
        /* One 80 MiB random_get: served in bounded parts, replayable. */
        size_t n = 80u << 20;
        unsigned char *buf = malloc(n);
        if (!buf) return 2;
        __wasi_errno_t e = __wasi_random_get(buf, n);
        size_t zero = 0;
        for (size_t i = 0; i < n; i++) zero += buf[i] == 0;
        printf("random: errno %d, %zu bytes, zeros below 1%%: %d\n", e, n, zero < n / 100);
        return 0;
    }
    if (!strcmp(mode, "gather")) {
        /* 256 iovecs all pointing at one buffer (256 MiB: 64 GiB asked, which the host
         * bounds as Linux bounds one write, 0x7ffff000 bytes), gathered and written in
         * bounded parts. */
        size_t n = (size_t)(argc > 2 ? atoi(argv[2]) : 256) << 20;
        unsigned char *buf = calloc(1, n);
        if (!buf) return 2;
        __wasi_ciovec_t iov[256];
        for (int i = 0; i < 256; i++) iov[i] = (__wasi_ciovec_t){buf, n};
        int fd = open("big.out", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        __wasi_size_t wrote = 0;
        __wasi_errno_t e = __wasi_fd_write(fd, iov, 256, &wrote);
        printf("gather: errno %d, wrote %u\n", e, (unsigned)wrote);
        return 0;
    }
    if (!strcmp(mode, "poll")) {
        /* Five million subscriptions: refused, not served into a giant event. */
        size_t n = 5000000;
        __wasi_subscription_t *subs = calloc(n, sizeof *subs);
        __wasi_event_t *evs = calloc(n, sizeof *evs);
        if (!subs || !evs) return 2;
        for (size_t i = 0; i < n; i++) {
            subs[i].userdata = i;
            subs[i].u.tag = __WASI_EVENTTYPE_FD_WRITE;
            subs[i].u.u.fd_write.file_descriptor = 1;
        }
        __wasi_size_t got = 0;
        __wasi_errno_t e = __wasi_poll_oneoff(subs, evs, n, &got);
        printf("poll: errno %d, events %u\n", e, (unsigned)got);
        /* An unknown clock with a timeout is refused at once, not waited on for ever. */
        __wasi_subscription_t c = {0};
        c.u.tag = __WASI_EVENTTYPE_CLOCK;
        c.u.u.clock.id = 99;
        c.u.u.clock.timeout = 1000000;
        e = __wasi_poll_oneoff(&c, evs, 1, &got);
        printf("poll unknown clock: errno %d\n", e);
        return 0;
    }
    if (!strcmp(mode, "bigread")) {
        /* One 64 MiB read of a 64 MiB file gets all of it, as natively. */
        size_t n = 64u << 20;
        unsigned char *buf = malloc(n);
        if (!buf) return 2;
        for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(i * 7 + i / 4096);
        int fd = open("big.in", O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (write(fd, buf, n) != (ssize_t)n) return 3;
        uint64_t want = sum(buf, n);
        memset(buf, 0, n);
        ssize_t got = pread(fd, buf, n, 0);
        printf("bigread: got %zd of %zu, same: %d\n", got, n, sum(buf, n) == want);
        return 0;
    }
    fprintf(stderr, "usage: hostile random|gather [MIB]|poll|bigread\n");
    return 2;
}
