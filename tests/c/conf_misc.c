/* WASI preview 1 conformance, everything but files: arguments, environment, clocks,
 * random_get, poll_oneoff, sched_yield, sock_shutdown and proc_exit, called raw
 * (<wasi/api.h>). Prints errno names and the values that must agree with wasmtime, never
 * times or random bytes themselves. Ends with proc_exit(7). */
#include <stdlib.h>
#include <wasi/api.h>

#include "util.h"

#define R(call) e(#call, call)

static __wasi_errno_t e(const char *what, __wasi_errno_t r) {
    printf("%s = %s\n", what, ename(r));
    fflush(stdout);
    return r;
}

static void poll_(const char *what, __wasi_subscription_t *subs, int n) {
    __wasi_event_t ev[8];
    memset(ev, 0xee, sizeof ev);
    __wasi_size_t got = 99;
    __wasi_errno_t r = __wasi_poll_oneoff(subs, ev, n, &got);
    printf("poll_oneoff %s = %s", what, ename(r));
    if (!r) {
        printf(" events=%u:", (unsigned)got);
        for (unsigned i = 0; i < got && i < 8; i++)
            printf(" [userdata=%llu type=%u error=%s]", (unsigned long long)ev[i].userdata,
                   ev[i].type, ename(ev[i].error));
    }
    printf("\n");
    fflush(stdout);
}

static __wasi_subscription_t clock_sub(__wasi_userdata_t ud, __wasi_clockid_t id,
                                       __wasi_timestamp_t t, __wasi_subclockflags_t fl) {
    __wasi_subscription_t s;
    memset(&s, 0, sizeof s);
    s.userdata = ud;
    s.u.tag = __WASI_EVENTTYPE_CLOCK;
    s.u.u.clock.id = id;
    s.u.u.clock.timeout = t;
    s.u.u.clock.precision = 0;
    s.u.u.clock.flags = fl;
    return s;
}

static __wasi_subscription_t fd_sub(__wasi_userdata_t ud, __wasi_eventtype_t type, __wasi_fd_t fd) {
    __wasi_subscription_t s;
    memset(&s, 0, sizeof s);
    s.userdata = ud;
    s.u.tag = type;
    if (type == __WASI_EVENTTYPE_FD_READ) s.u.u.fd_read.file_descriptor = fd;
    else s.u.u.fd_write.file_descriptor = fd;
    return s;
}

int main(void) {
    /* Arguments and environment. */
    __wasi_size_t argc = 0, argsz = 0;
    R(__wasi_args_sizes_get(&argc, &argsz));
    printf("  argc=%u size=%u\n", (unsigned)argc, (unsigned)argsz);
    uint8_t *argv[16], buf[1024];
    if (argc <= 16 && argsz <= sizeof buf && !R(__wasi_args_get(argv, buf)))
        for (unsigned i = 0; i < argc; i++) printf("  argv[%u]=\"%s\"\n", i, (char *)argv[i]);
    __wasi_size_t envc = 0, envsz = 0;
    R(__wasi_environ_sizes_get(&envc, &envsz));
    printf("  envc=%u size=%u\n", (unsigned)envc, (unsigned)envsz);
    uint8_t *envp[16];
    if (envc <= 16 && envsz <= sizeof buf && !R(__wasi_environ_get(envp, buf)))
        for (unsigned i = 0; i < envc; i++) printf("  env[%u]=\"%s\"\n", i, (char *)envp[i]);

    /* Clocks. */
    for (__wasi_clockid_t id = 0; id <= 3; id++) {
        __wasi_timestamp_t res = 0, t1 = 0, t2 = 0;
        __wasi_errno_t r = __wasi_clock_res_get(id, &res);
        printf("clock_res_get(%u) = %s", id, ename(r));
        if (!r) printf(" res>0: %d res<=1s: %d", res > 0, res <= 1000000000ull);
        r = __wasi_clock_time_get(id, 1, &t1);
        printf("; clock_time_get = %s", ename(r));
        if (!r) {
            (void)__wasi_clock_time_get(id, 1, &t2);
            printf(" nondecreasing: %d", t2 >= t1);
            if (id == __WASI_CLOCKID_REALTIME) printf(" after 2020: %d", t1 > 1577836800000000000ull);
        }
        printf("\n");
    }

    /* random_get. */
    uint8_t r1[64], r2[64], zero[64] = {0};
    memset(r1, 0, sizeof r1);
    memset(r2, 0, sizeof r2);
    R(__wasi_random_get(r1, 0));
    R(__wasi_random_get(r1, sizeof r1));
    R(__wasi_random_get(r2, sizeof r2));
    printf("  random: not all zero: %d, two draws differ: %d\n", memcmp(r1, zero, 64) != 0,
           memcmp(r1, r2, 64) != 0);

    /* poll_oneoff. */
    __wasi_timestamp_t now = 0;
    (void)__wasi_clock_time_get(__WASI_CLOCKID_REALTIME, 1, &now);
    __wasi_subscription_t s[4];
    __wasi_event_t ev[1];
    __wasi_size_t got = 0;
    printf("poll_oneoff with no subscriptions = %s\n", ename(__wasi_poll_oneoff(s, ev, 0, &got)));
    s[0] = clock_sub(11, __WASI_CLOCKID_MONOTONIC, 1000000, 0);
    poll_("monotonic, relative 1 ms", s, 1);
    s[0] = clock_sub(12, __WASI_CLOCKID_REALTIME, now + 1000000, __WASI_SUBCLOCKFLAGS_SUBSCRIPTION_CLOCK_ABSTIME);
    poll_("realtime, absolute now+1 ms", s, 1);
    s[0] = clock_sub(13, __WASI_CLOCKID_REALTIME, 0, __WASI_SUBCLOCKFLAGS_SUBSCRIPTION_CLOCK_ABSTIME);
    poll_("realtime, absolute in the past", s, 1);
    s[0] = clock_sub(14, __WASI_CLOCKID_MONOTONIC, 0, 0);
    poll_("monotonic, relative 0", s, 1);
    s[0] = clock_sub(16, __WASI_CLOCKID_MONOTONIC, 1000000000ull * 3600, 0);
    s[1] = clock_sub(17, __WASI_CLOCKID_MONOTONIC, 2000000, 0);
    poll_("1 h and 2 ms: the 2 ms fires", s, 2);

    __wasi_fd_t f = (__wasi_fd_t)-1;
    R(__wasi_path_open(3, 0, "pollme", __WASI_OFLAGS_CREAT | __WASI_OFLAGS_TRUNC,
                       __WASI_RIGHTS_FD_READ | __WASI_RIGHTS_FD_WRITE | __WASI_RIGHTS_POLL_FD_READWRITE |
                           __WASI_RIGHTS_FD_SEEK,
                       0, 0, &f));
    __wasi_ciovec_t iov = {(const uint8_t *)"0123456789", 10};
    __wasi_size_t n = 0;
    R(__wasi_fd_write(f, &iov, 1, &n));
    s[0] = fd_sub(21, __WASI_EVENTTYPE_FD_READ, f);
    poll_("fd_read on a file", s, 1);
    s[0] = fd_sub(22, __WASI_EVENTTYPE_FD_WRITE, f);
    poll_("fd_write on a file", s, 1);
    s[0] = fd_sub(23, __WASI_EVENTTYPE_FD_READ, 99);
    poll_("fd_read on fd 99", s, 1);
    s[0] = fd_sub(24, __WASI_EVENTTYPE_FD_WRITE, 1);
    s[1] = clock_sub(25, __WASI_CLOCKID_MONOTONIC, 1000000000ull * 3600, 0);
    poll_("fd_write on stdout and a 1 h clock", s, 2);

    /* sched_yield, sock_shutdown. */
    R(__wasi_sched_yield());
    R(__wasi_sock_shutdown(99, __WASI_SDFLAGS_RD));
    R(__wasi_sock_shutdown(f, __WASI_SDFLAGS_WR));
    R(__wasi_fd_close(f));

    /* Last, as a VM that never answers it must not hide the checks above. */
    s[0] = clock_sub(15, 99, 1000000, 0);
    poll_("unknown clock 99, relative 1 ms", s, 1);

    printf("exiting with 7\n");
    fflush(stdout);
    __wasi_proc_exit(7);
}
