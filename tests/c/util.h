/* Shared helpers of the file-layer test programs (tests/posix.rs, tests/conformance.rs).
 * Every program prints what it sees -- return values and errno NAMES, never numbers that
 * differ between Linux and WASI, never inode numbers or times -- so that two runs (Linux
 * and Tandem, or wasmtime and Tandem) can be compared line by line. */
#ifndef TANDEM_TEST_UTIL_H
#define TANDEM_TEST_UTIL_H

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* The name of an errno value. On wasm32-wasi the E* constants are the WASI errno codes, so
 * this also names the result of a raw __wasi_* call. An if-chain, not a switch: some names
 * share a value on one platform and not on the other. */
static inline const char *ename(int e) {
#define N(x) if (e == x) return #x;
    if (e == 0) return "OK";
    N(EPERM) N(ENOENT) N(EIO) N(EBADF) N(EAGAIN) N(ENOMEM) N(EACCES) N(EFAULT) N(EBUSY)
    N(EEXIST) N(EXDEV) N(ENODEV) N(ENOTDIR) N(EISDIR) N(EINVAL) N(ENFILE) N(EMFILE)
    N(ENOTTY) N(EFBIG) N(ENOSPC) N(ESPIPE) N(EROFS) N(EMLINK) N(EPIPE) N(ERANGE)
    N(ENAMETOOLONG) N(ENOSYS) N(ENOTEMPTY) N(ELOOP) N(EOVERFLOW) N(ENOTSUP) N(ENOTSOCK)
    N(ENOTCONN) N(ETXTBSY) N(EILSEQ) N(E2BIG) N(ENXIO) N(ESRCH) N(EINTR)
#ifdef EOPNOTSUPP
    N(EOPNOTSUPP)
#endif
#ifdef ENOTCAPABLE
    N(ENOTCAPABLE)
#endif
#undef N
    static char other[32];
    snprintf(other, sizeof other, "E#%d", e);
    return other;
}

/* "what = value" for a call that succeeded, "what = -1 ENAME" for one that failed. */
static inline long rc(const char *what, long r) {
    if (r < 0)
        printf("%s = -1 %s\n", what, ename(errno));
    else
        printf("%s = %ld\n", what, r);
    fflush(stdout);
    return r;
}

/* Bytes as text, with anything unprintable escaped, so a file's content can be printed. */
static inline void show(const char *what, const char *buf, long n) {
    printf("%s: %ld bytes \"", what, n);
    for (long i = 0; i < n; i++) {
        unsigned char c = (unsigned char)buf[i];
        if (c == '\n') printf("\\n");
        else if (c >= 32 && c < 127 && c != '"' && c != '\\') putchar(c);
        else printf("\\x%02x", c);
    }
    printf("\"\n");
    fflush(stdout);
}

#endif
