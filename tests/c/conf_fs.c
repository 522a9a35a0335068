/* WASI preview 1 conformance, files: every fd_* and path_* call that wasi-libc or Rust std
 * programs make, called raw (<wasi/api.h>) on the datastore preopened at fd 3. Prints the
 * errno name of every call and the values that must agree with the reference (wasmtime):
 * rights, flags, types, sizes, link counts, contents, readdir names and cookies' behaviour
 * -- never inode numbers or times. tests/conformance.rs compares it with wasmtime's run. */
#include <stdlib.h>
#include <wasi/api.h>

#include "util.h"

#define R(call) e(#call, call)

static __wasi_errno_t e(const char *what, __wasi_errno_t r) {
    printf("%s = %s\n", what, ename(r));
    fflush(stdout);
    return r;
}

/* Every right preview 1 defines (bits 0 to 29): what Rust std asks for. */
static const __wasi_rights_t ALL = ((__wasi_rights_t)1 << 30) - 1;
static const __wasi_rights_t RO = __WASI_RIGHTS_FD_READ | __WASI_RIGHTS_FD_SEEK |
                                  __WASI_RIGHTS_FD_TELL | __WASI_RIGHTS_FD_FILESTAT_GET;

/* The rights the preopen grants, asked for by directory opens (as wasi-libc does). */
static __wasi_rights_t DIRB, DIRI;

static __wasi_fd_t open_(const char *what, __wasi_fd_t dir, __wasi_lookupflags_t lf,
                         const char *path, __wasi_oflags_t of, __wasi_rights_t base,
                         __wasi_rights_t inh, __wasi_fdflags_t ff) {
    __wasi_fd_t fd = (__wasi_fd_t)-1;
    __wasi_errno_t r = __wasi_path_open(dir, lf, path, of, base, inh, ff, &fd);
    printf("path_open %s = %s\n", what, ename(r));
    fflush(stdout);
    return r ? (__wasi_fd_t)-1 : fd;
}

static void fdstat(const char *what, __wasi_fd_t fd) {
    __wasi_fdstat_t s;
    __wasi_errno_t r = __wasi_fd_fdstat_get(fd, &s);
    if (r)
        printf("fdstat %s = %s\n", what, ename(r));
    else
        printf("fdstat %s: type=%u flags=0x%x base=0x%llx inheriting=0x%llx\n", what,
               s.fs_filetype, s.fs_flags, (unsigned long long)s.fs_rights_base,
               (unsigned long long)s.fs_rights_inheriting);
    fflush(stdout);
}

static void filestat(const char *what, __wasi_errno_t r, const __wasi_filestat_t *s) {
    if (r)
        printf("filestat %s = %s\n", what, ename(r));
    else
        printf("filestat %s: type=%u nlink=%llu size=%llu\n", what, s->filetype,
               (unsigned long long)s->nlink,
               (unsigned long long)(s->filetype == __WASI_FILETYPE_DIRECTORY ? 0 : s->size));
    fflush(stdout);
}

static void fstat_(const char *what, __wasi_fd_t fd) {
    __wasi_filestat_t s;
    filestat(what, __wasi_fd_filestat_get(fd, &s), &s);
}

static void pstat(const char *what, __wasi_lookupflags_t lf, const char *path) {
    __wasi_filestat_t s;
    filestat(what, __wasi_path_filestat_get(3, lf, path, &s), &s);
}

static __wasi_timestamp_t mtime(const char *path) {
    __wasi_filestat_t s;
    if (__wasi_path_filestat_get(3, 0, path, &s)) return 0;
    return s.mtim;
}

static __wasi_timestamp_t atime(const char *path) {
    __wasi_filestat_t s;
    if (__wasi_path_filestat_get(3, 0, path, &s)) return 0;
    return s.atim;
}

static size_t wr(__wasi_fd_t fd, const char *s) {
    __wasi_ciovec_t iov = {(const uint8_t *)s, strlen(s)};
    __wasi_size_t n = 0;
    __wasi_errno_t r = __wasi_fd_write(fd, &iov, 1, &n);
    printf("fd_write \"%s\" = %s n=%u\n", s, ename(r), (unsigned)n);
    fflush(stdout);
    return n;
}

static void content(const char *path) {
    __wasi_fd_t fd = open_(path, 3, 0, path, 0, RO, 0, 0);
    if (fd == (__wasi_fd_t)-1) return;
    char buf[512];
    __wasi_iovec_t iov = {(uint8_t *)buf, sizeof buf};
    __wasi_size_t n = 0;
    e("  fd_read", __wasi_fd_read(fd, &iov, 1, &n));
    show(path, buf, n);
    (void)__wasi_fd_close(fd);
}

/* The entries of a directory read with one large buffer: name, type, and the cookie to
 * continue after each. */
struct ent {
    char name[64];
    unsigned type;
    __wasi_dircookie_t next;
};

static int readdir_all(__wasi_fd_t fd, __wasi_dircookie_t from, struct ent *out, int max,
                       size_t bufsize) {
    static uint8_t buf[65536];
    int n = 0;
    __wasi_dircookie_t cookie = from;
    for (;;) {
        __wasi_size_t used = 0;
        __wasi_errno_t r = __wasi_fd_readdir(fd, buf, bufsize, cookie, &used);
        if (r) {
            printf("fd_readdir = %s\n", ename(r));
            return n;
        }
        size_t off = 0;
        int progressed = 0;
        while (off + sizeof(__wasi_dirent_t) <= used) {
            __wasi_dirent_t d;
            memcpy(&d, buf + off, sizeof d);
            if (off + sizeof d + d.d_namlen > used) break; /* truncated: reread from cookie */
            if (n < max) {
                size_t l = d.d_namlen < 63 ? d.d_namlen : 63;
                memcpy(out[n].name, buf + off + sizeof d, l);
                out[n].name[l] = 0;
                out[n].type = d.d_type;
                out[n].next = d.d_next;
                n++;
            }
            cookie = d.d_next;
            progressed = 1;
            off += sizeof d + d.d_namlen;
        }
        if (used < bufsize) return n; /* the end of the directory */
        if (!progressed) {
            printf("fd_readdir: a %zu-byte buffer holds no entry\n", bufsize);
            return n;
        }
    }
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const struct ent *)a)->name, ((const struct ent *)b)->name);
}

static void readdir_checks(void) {
    R(__wasi_path_create_directory(3, "rd"));
    const char *names[] = {"rd/a", "rd/bb", "rd/ccc", "rd/a-rather-long-file-name-0123456789"};
    for (int i = 0; i < 4; i++) {
        __wasi_fd_t f = open_(names[i], 3, 0, names[i], __WASI_OFLAGS_CREAT, ALL, ALL, 0);
        (void)__wasi_fd_close(f);
    }
    R(__wasi_path_create_directory(3, "rd/sub"));
    R(__wasi_path_symlink("a", 3, "rd/ln"));
    __wasi_fd_t d = open_("rd O_DIRECTORY", 3, 0, "rd", __WASI_OFLAGS_DIRECTORY, DIRB, DIRI, 0);
    fdstat("rd", d);
    static struct ent big[64], again[64], small[64];
    int n = readdir_all(d, __WASI_DIRCOOKIE_START, big, 64, 65536);
    static struct ent sorted[64];
    memcpy(sorted, big, sizeof big);
    qsort(sorted, n, sizeof sorted[0], by_name);
    printf("fd_readdir: %d entries:", n);
    for (int i = 0; i < n; i++) printf(" %s(%u)", sorted[i].name, sorted[i].type);
    printf("\n");
    /* Each entry's cookie continues the listing right after it. */
    int ok = 1;
    for (int i = 0; i < n; i++) {
        int m = readdir_all(d, big[i].next, again, 64, 65536);
        if (m != n - i - 1) ok = 0;
        for (int k = 0; k < m && ok; k++)
            if (strcmp(again[k].name, big[i + 1 + k].name)) ok = 0;
    }
    printf("fd_readdir: every cookie continues after its entry: %d\n", ok);
    /* Small buffers: the same entries, a partial entry reread from its cookie. */
    int m = readdir_all(d, __WASI_DIRCOOKIE_START, small, 64, 80);
    int same = m == n;
    for (int k = 0; k < m && same; k++)
        if (strcmp(small[k].name, big[k].name)) same = 0;
    printf("fd_readdir with an 80-byte buffer: same entries: %d\n", same);
    __wasi_size_t used = 99;
    uint8_t b[8];
    e("fd_readdir into a 0-byte buffer", __wasi_fd_readdir(d, b, 0, 0, &used));
    printf("  used=%u\n", (unsigned)used);
    e("fd_readdir past the end", __wasi_fd_readdir(d, b, 8, big[n - 1].next, &used));
    printf("  used=%u\n", (unsigned)used);
    /* Unlinking entries already listed does not hide the others. Listing order is the
     * implementation's, so the entries unlinked are the first two regular files listed,
     * made again afterwards so that the tree left behind does not depend on the order. */
    int upto = 0, gone = 0;
    char made[2][80];
    for (int i = 0; i < n && gone < 2; i++) {
        upto = i;
        if (big[i].type != __WASI_FILETYPE_REGULAR_FILE) continue;
        snprintf(made[gone], sizeof made[gone], "rd/%s", big[i].name);
        if (__wasi_path_unlink_file(3, made[gone]) == 0) gone++;
    }
    m = readdir_all(d, big[upto].next, again, 64, 65536);
    same = gone == 2 && m == n - upto - 1;
    for (int k = 0; k < m && same; k++)
        if (strcmp(again[k].name, big[upto + 1 + k].name)) same = 0;
    printf("fd_readdir after unlinking listed entries: the rest unchanged: %d\n", same);
    for (int i = 0; i < gone; i++) {
        __wasi_fd_t f = open_(made[i], 3, 0, made[i], __WASI_OFLAGS_CREAT, ALL, ALL, 0);
        (void)__wasi_fd_close(f);
    }
    __wasi_fd_t f = open_("rd/a (a file)", 3, 0, "rd/bb", 0, ALL, ALL, 0);
    e("fd_readdir on a file", __wasi_fd_readdir(f, b, 8, 0, &used));
    (void)__wasi_fd_close(f);
    (void)__wasi_fd_close(d);
}

int main(void) {
    /* Preopens. */
    __wasi_prestat_t ps;
    if (!R(__wasi_fd_prestat_get(3, &ps)))
        printf("  tag=%u name_len=%u\n", ps.tag, (unsigned)ps.u.dir.pr_name_len);
    char name[16] = {0};
    if (!R(__wasi_fd_prestat_dir_name(3, (uint8_t *)name, sizeof name)))
        printf("  name=\"%s\"\n", name);
    R(__wasi_fd_prestat_get(4, &ps));
    R(__wasi_fd_prestat_get(1, &ps));
    R(__wasi_fd_prestat_dir_name(4, (uint8_t *)name, sizeof name));
    fdstat("3 (the datastore)", 3);
    __wasi_fdstat_t pre;
    (void)__wasi_fd_fdstat_get(3, &pre);
    DIRB = pre.fs_rights_base;
    DIRI = pre.fs_rights_inheriting;
    fstat_("3", 3);
    fdstat("99 (not open)", 99);

    /* path_open: ".", O_DIRECTORY, O_CREAT, O_EXCL, O_TRUNC, rights. */
    __wasi_fd_t dot = open_(". O_DIRECTORY full rights", 3, 0, ".", __WASI_OFLAGS_DIRECTORY, ALL, ALL, 0);
    fdstat(".", dot);
    (void)__wasi_fd_close(dot);
    dot = open_(". O_DIRECTORY, the preopen's rights", 3, 0, ".", __WASI_OFLAGS_DIRECTORY, DIRB, DIRI, 0);
    fdstat(". (the preopen's rights)", dot);
    (void)__wasi_fd_close(dot);
    dot = open_(". no flags, read rights", 3, 0, ".", 0, RO, 0, 0);
    fdstat(". (read rights)", dot);
    (void)__wasi_fd_close(dot);
    __wasi_fd_t f = open_("f O_CREAT full rights", 3, 0, "f", __WASI_OFLAGS_CREAT, ALL, ALL, 0);
    fdstat("f", f);
    wr(f, "hello ");
    /* A gather write may be short (wasmtime writes the first buffer only): write the rest
     * as a program must, and print only that it all arrived. */
    __wasi_ciovec_t two[2] = {{(const uint8_t *)"wor", 3}, {(const uint8_t *)"ld\n", 3}};
    __wasi_size_t n = 0;
    R(__wasi_fd_write(f, two, 2, &n));
    if (n < 6) {
        __wasi_ciovec_t rest = {(const uint8_t *)"world\n" + n, 6 - n};
        __wasi_size_t m = 0;
        (void)__wasi_fd_write(f, &rest, 1, &m);
        n += m;
    }
    printf("  gather write complete: %d\n", n == 6);
    open_("f O_CREAT|O_EXCL (exists)", 3, 0, "f", __WASI_OFLAGS_CREAT | __WASI_OFLAGS_EXCL, ALL, ALL, 0);
    open_("f O_DIRECTORY (a file)", 3, 0, "f", __WASI_OFLAGS_DIRECTORY, ALL, ALL, 0);
    open_("missing (no O_CREAT)", 3, 0, "missing", 0, ALL, ALL, 0);
    open_("missing/x", 3, 0, "missing/x", __WASI_OFLAGS_CREAT, ALL, ALL, 0);
    open_("/abs (absolute)", 3, 0, "/abs", __WASI_OFLAGS_CREAT, ALL, ALL, 0);
    open_("\"\" (empty)", 3, 0, "", 0, ALL, ALL, 0);
    open_("f/ (trailing slash)", 3, 0, "f/", 0, ALL, ALL, 0);
    open_("f on fd 99", 99, 0, "f", 0, ALL, ALL, 0);
    open_("x on a file fd", f, 0, "x", __WASI_OFLAGS_CREAT, ALL, ALL, 0);
    __wasi_fd_t ro = open_("f read rights", 3, 0, "f", 0, RO, 0, 0);
    fdstat("f (read rights)", ro);
    __wasi_ciovec_t one = {(const uint8_t *)"x", 1};
    e("fd_write on read rights", __wasi_fd_write(ro, &one, 1, &n));
    __wasi_fd_t wo = open_("f write rights", 3, 0, "f", 0, __WASI_RIGHTS_FD_WRITE, 0, 0);
    fdstat("f (write rights)", wo);
    uint8_t rb[64];
    __wasi_iovec_t riov = {rb, sizeof rb};
    e("fd_read on write rights", __wasi_fd_read(wo, &riov, 1, &n));
    (void)__wasi_fd_close(wo);
    __wasi_fd_t sy = open_("s O_CREAT SYNC|DSYNC", 3, 0, "s", __WASI_OFLAGS_CREAT, ALL, ALL,
                           __WASI_FDFLAGS_SYNC | __WASI_FDFLAGS_DSYNC);
    fdstat("s (SYNC|DSYNC)", sy);
    (void)__wasi_fd_close(sy);
    __wasi_fd_t ap = open_("a O_CREAT APPEND", 3, 0, "a", __WASI_OFLAGS_CREAT, ALL, ALL, __WASI_FDFLAGS_APPEND);
    fdstat("a (APPEND)", ap);
    wr(ap, "1");
    __wasi_filesize_t pos = 0;
    R(__wasi_fd_seek(ap, 0, __WASI_WHENCE_SET, &pos));
    wr(ap, "2");
    (void)__wasi_fd_close(ap);
    content("a");

    /* fd_fdstat_set_flags and fd_fdstat_set_rights. */
    R(__wasi_fd_fdstat_set_flags(f, __WASI_FDFLAGS_APPEND));
    fdstat("f after set_flags(APPEND)", f);
    R(__wasi_fd_seek(f, 0, __WASI_WHENCE_SET, &pos));
    wr(f, "appended\n");
    R(__wasi_fd_fdstat_set_flags(f, 0));
    fdstat("f after set_flags(0)", f);
    R(__wasi_fd_fdstat_set_flags(f, __WASI_FDFLAGS_NONBLOCK));
    fdstat("f after set_flags(NONBLOCK)", f);
    R(__wasi_fd_fdstat_set_flags(f, 0));
    R(__wasi_fd_fdstat_set_flags(99, 0));
    __wasi_fd_t g = open_("g O_CREAT", 3, 0, "g", __WASI_OFLAGS_CREAT, ALL, ALL, 0);
    R(__wasi_fd_fdstat_set_rights(g, RO, 0));
    fdstat("g after dropping rights", g);
    e("fd_write after dropping FD_WRITE", __wasi_fd_write(g, &one, 1, &n));
    R(__wasi_fd_fdstat_set_rights(g, ALL, ALL));
    fdstat("g after asking rights back", g);
    R(__wasi_fd_fdstat_set_rights(g, 0, 0));
    fdstat("g after dropping all", g);
    e("fd_read without rights", __wasi_fd_read(g, &riov, 1, &n));
    e("fd_seek without rights", __wasi_fd_seek(g, 0, __WASI_WHENCE_CUR, &pos));
    (void)__wasi_fd_close(g);

    /* Seek, tell, read, pread, pwrite. */
    R(__wasi_fd_seek(f, 0, __WASI_WHENCE_END, &pos));
    printf("  end=%llu\n", (unsigned long long)pos);
    R(__wasi_fd_seek(f, -3, __WASI_WHENCE_CUR, &pos));
    printf("  pos=%llu\n", (unsigned long long)pos);
    R(__wasi_fd_tell(f, &pos));
    printf("  tell=%llu\n", (unsigned long long)pos);
    R(__wasi_fd_seek(f, -100, __WASI_WHENCE_CUR, &pos));
    R(__wasi_fd_seek(f, 0, __WASI_WHENCE_SET, &pos));
    uint8_t r1[4], r2[64];
    __wasi_iovec_t riov2[2] = {{r1, 4}, {r2, sizeof r2}};
    /* Scatter reads may be short too: read until the end, then compare. */
    char all[128];
    size_t got = 0;
    for (;;) {
        __wasi_errno_t r = __wasi_fd_read(f, riov2, 2, &n);
        if (r || n == 0) {
            printf("  scatter read ends with %s\n", ename(r));
            break;
        }
        size_t k = n < 4 ? n : 4;
        memcpy(all + got, r1, k);
        if (n > 4) memcpy(all + got + 4, r2, n - 4);
        got += n;
    }
    show("  scatter read", all, got);
    __wasi_iovec_t piov = {r2, 5};
    R(__wasi_fd_pread(f, &piov, 1, 6, &n));
    show("  pread 5 at 6", (char *)r2, n);
    R(__wasi_fd_pread(f, &piov, 1, 1000, &n));
    printf("  pread past the end n=%u\n", (unsigned)n);
    __wasi_ciovec_t pw = {(const uint8_t *)"HE", 2};
    R(__wasi_fd_pwrite(f, &pw, 1, 0, &n));
    R(__wasi_fd_tell(f, &pos));
    printf("  tell after pwrite=%llu\n", (unsigned long long)pos);
    R(__wasi_fd_pwrite(f, &pw, 1, 40, &n));
    fstat_("f after pwrite at 40", f);
    R(__wasi_fd_read(3, riov2, 2, &n));
    R(__wasi_fd_write(3, &one, 1, &n));
    R(__wasi_fd_seek(3, 0, __WASI_WHENCE_CUR, &pos));
    R(__wasi_fd_tell(3, &pos));
    R(__wasi_fd_pread(3, riov2, 2, 0, &n));

    /* Size, allocate, advise, sync. */
    R(__wasi_fd_filestat_set_size(f, 5));
    fstat_("f after set_size(5)", f);
    R(__wasi_fd_filestat_set_size(f, 100));
    fstat_("f after set_size(100)", f);
    R(__wasi_fd_filestat_set_size(f, 12));
    R(__wasi_fd_filestat_set_size(3, 0));
    R(__wasi_fd_allocate(f, 0, 10));
    R(__wasi_fd_allocate(f, 1000, 10));
    fstat_("f after allocate", f);
    /* Back to its size before, whatever allocate did, so that what follows is the same. */
    (void)__wasi_fd_filestat_set_size(f, 12);
    for (int a = 0; a <= 5; a++) {
        char w[48];
        snprintf(w, sizeof w, "fd_advise(f, 0, 10, %d)", a);
        e(w, __wasi_fd_advise(f, 0, 10, a));
    }
    R(__wasi_fd_advise(3, 0, 10, 0));
    R(__wasi_fd_sync(f));
    R(__wasi_fd_datasync(f));
    R(__wasi_fd_sync(3));
    R(__wasi_fd_datasync(3));
    R(__wasi_fd_sync(99));

    /* Times: explicit, NOW, and contradictory flags. */
    R(__wasi_fd_filestat_set_times(f, 1000000000000000000ull, 1100000000000000000ull,
                                   __WASI_FSTFLAGS_ATIM | __WASI_FSTFLAGS_MTIM));
    printf("  atim set: %d, mtim set: %d\n", atime("f") == 1000000000000000000ull,
           mtime("f") == 1100000000000000000ull);
    R(__wasi_fd_filestat_set_times(f, 0, 0, __WASI_FSTFLAGS_MTIM_NOW));
    printf("  mtim now: %d, atim kept: %d\n", mtime("f") > 1600000000000000000ull,
           atime("f") == 1000000000000000000ull);
    R(__wasi_fd_filestat_set_times(f, 0, 0, __WASI_FSTFLAGS_ATIM_NOW | __WASI_FSTFLAGS_MTIM_NOW));
    R(__wasi_fd_filestat_set_times(f, 5, 0, __WASI_FSTFLAGS_ATIM | __WASI_FSTFLAGS_ATIM_NOW));
    R(__wasi_fd_filestat_set_times(f, 0, 5, __WASI_FSTFLAGS_MTIM | __WASI_FSTFLAGS_MTIM_NOW));
    R(__wasi_fd_filestat_set_times(f, 0, 0, 0));
    R(__wasi_fd_filestat_set_times(99, 0, 0, 0));
    R(__wasi_path_filestat_set_times(3, 0, "f", 1200000000000000000ull, 1300000000000000000ull,
                                     __WASI_FSTFLAGS_ATIM | __WASI_FSTFLAGS_MTIM));
    printf("  path set: %d\n", mtime("f") == 1300000000000000000ull);
    R(__wasi_path_filestat_set_times(3, 0, "f", 5, 0, __WASI_FSTFLAGS_ATIM | __WASI_FSTFLAGS_ATIM_NOW));
    R(__wasi_path_filestat_set_times(3, 0, "f", 0, 5, __WASI_FSTFLAGS_MTIM | __WASI_FSTFLAGS_MTIM_NOW));
    R(__wasi_path_filestat_set_times(3, 0, "f", 0, 0, __WASI_FSTFLAGS_MTIM_NOW));
    R(__wasi_path_filestat_set_times(3, 0, "missing", 0, 0, __WASI_FSTFLAGS_MTIM_NOW));
    R(__wasi_path_filestat_set_times(3, 0, "f/", 0, 0, __WASI_FSTFLAGS_MTIM_NOW));
    fstat_("f", f);

    /* Directories, unlink, rename. */
    R(__wasi_path_create_directory(3, "d"));
    R(__wasi_path_create_directory(3, "d"));
    R(__wasi_path_create_directory(3, "d/e"));
    R(__wasi_path_create_directory(3, "nope/e"));
    R(__wasi_path_create_directory(3, "f/e"));
    __wasi_fd_t df = open_("d/file O_CREAT", 3, 0, "d/file", __WASI_OFLAGS_CREAT | __WASI_OFLAGS_TRUNC, ALL, ALL, 0);
    wr(df, "in d\n");
    (void)__wasi_fd_close(df);
    pstat("d", 0, "d");
    pstat("d/file", 0, "d/file");
    pstat("missing", 0, "missing");
    pstat("d/file/", 0, "d/file/");
    R(__wasi_path_remove_directory(3, "d"));
    R(__wasi_path_remove_directory(3, "d/file"));
    R(__wasi_path_remove_directory(3, "missing"));
    R(__wasi_path_unlink_file(3, "d"));
    R(__wasi_path_unlink_file(3, "d/e"));
    R(__wasi_path_unlink_file(3, "d/file/"));
    R(__wasi_path_unlink_file(3, "missing"));
    R(__wasi_path_rename(3, "d/file", 3, "d/e"));
    R(__wasi_path_rename(3, "d/e", 3, "d/file"));
    R(__wasi_path_rename(3, "d", 3, "d/e/inside"));
    R(__wasi_path_rename(3, "missing", 3, "x"));
    R(__wasi_path_rename(3, "d/file", 3, "moved"));
    R(__wasi_path_rename(3, "moved", 3, "a"));
    content("a");
    R(__wasi_path_rename(3, "d", 3, "d2"));
    R(__wasi_path_create_directory(3, "full"));
    __wasi_fd_t x = open_("full/x", 3, 0, "full/x", __WASI_OFLAGS_CREAT, ALL, ALL, 0);
    (void)__wasi_fd_close(x);
    R(__wasi_path_rename(3, "d2", 3, "full"));
    R(__wasi_path_remove_directory(3, "full"));
    __wasi_fd_t dd = open_("d2 O_DIRECTORY", 3, 0, "d2", __WASI_OFLAGS_DIRECTORY, DIRB, DIRI, 0);
    __wasi_fd_t in = open_("d2fd: inner O_CREAT|O_EXCL", dd, 0, "inner", __WASI_OFLAGS_CREAT | __WASI_OFLAGS_EXCL, ALL, ALL, 0);
    (void)__wasi_fd_close(in);
    R(__wasi_path_rename(dd, "inner", 3, "outer"));
    R(__wasi_path_create_directory(dd, "made"));
    R(__wasi_path_remove_directory(dd, "made"));
    R(__wasi_path_remove_directory(dd, "."));
    pstat("d2fd: ..", 0, "d2/..");
    (void)__wasi_fd_close(dd);

    /* Symlinks and hard links. */
    R(__wasi_path_symlink("outer", 3, "sl"));
    R(__wasi_path_symlink("outer", 3, "sl"));
    R(__wasi_path_symlink("d2/e", 3, "dsl"));
    R(__wasi_path_symlink("nowhere", 3, "dangling"));
    pstat("sl (nofollow)", 0, "sl");
    pstat("sl (follow)", __WASI_LOOKUPFLAGS_SYMLINK_FOLLOW, "sl");
    pstat("dangling (follow)", __WASI_LOOKUPFLAGS_SYMLINK_FOLLOW, "dangling");
    pstat("dsl/ (nofollow)", 0, "dsl/");
    char lb[64];
    __wasi_size_t used = 0;
    if (!R(__wasi_path_readlink(3, "sl", (uint8_t *)lb, sizeof lb, &used))) show("  sl", lb, used);
    if (!R(__wasi_path_readlink(3, "sl", (uint8_t *)lb, 5, &used))) show("  sl (exact 5)", lb, used);
    if (!R(__wasi_path_readlink(3, "sl", (uint8_t *)lb, 3, &used))) show("  sl (3-byte buffer)", lb, used);
    R(__wasi_path_readlink(3, "outer", (uint8_t *)lb, sizeof lb, &used));
    R(__wasi_path_readlink(3, "missing", (uint8_t *)lb, sizeof lb, &used));
    open_("sl nofollow", 3, 0, "sl", 0, RO, 0, 0);
    __wasi_fd_t sf = open_("sl follow", 3, __WASI_LOOKUPFLAGS_SYMLINK_FOLLOW, "sl", 0, RO, 0, 0);
    fstat_("through sl", sf);
    (void)__wasi_fd_close(sf);
    R(__wasi_path_filestat_set_times(3, 0, "sl", 0, 1400000000000000000ull, __WASI_FSTFLAGS_MTIM));
    R(__wasi_path_link(3, 0, "outer", 3, "hard"));
    R(__wasi_path_link(3, 0, "outer", 3, "hard"));
    R(__wasi_path_link(3, 0, "d2", 3, "dirhard"));
    R(__wasi_path_link(3, 0, "missing", 3, "x"));
    R(__wasi_path_link(3, __WASI_LOOKUPFLAGS_SYMLINK_FOLLOW, "sl", 3, "hard2"));
    R(__wasi_path_link(3, 0, "sl", 3, "sl-hard"));
    pstat("outer", 0, "outer");
    pstat("sl-hard", 0, "sl-hard");
    R(__wasi_path_unlink_file(3, "sl"));
    R(__wasi_path_unlink_file(3, "dsl/"));
    R(__wasi_path_unlink_file(3, "dsl"));
    R(__wasi_path_remove_directory(3, "dangling"));
    R(__wasi_path_unlink_file(3, "dangling"));

    /* Renumber and close. */
    __wasi_fd_t p = open_("p", 3, 0, "p", __WASI_OFLAGS_CREAT, ALL, ALL, 0);
    __wasi_fd_t q = open_("q", 3, 0, "q", __WASI_OFLAGS_CREAT, ALL, ALL, 0);
    R(__wasi_fd_renumber(p, q));
    fdstat("p after renumber", p);
    wr(q, "into p\n");
    R(__wasi_fd_renumber(q, q));
    wr(q, "still p\n");
    R(__wasi_fd_renumber(p, q));
    R(__wasi_fd_renumber(q, 99));
    R(__wasi_fd_renumber(99, q));
    content("p");
    content("q");
    R(__wasi_fd_close(q));
    R(__wasi_fd_close(q));

    readdir_checks();
    R(__wasi_fd_close(f));
    printf("done\n");
    return 0;
}
