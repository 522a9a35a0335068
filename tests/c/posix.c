/* Ordinary POSIX file patterns, one scenario per run (argv[1]), in the current folder.
 * Built twice: natively (run with its cwd in a fresh folder: the Linux reference) and for
 * wasm32-wasi (run under `tandem vm run` with a fresh datastore as "/", whose cwd is "/").
 * tests/posix.rs compares stdout, exit code and the resulting file tree. */
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

#ifdef __wasi__
#include <wasi/api.h>
#endif

static void put(int fd, const char *s) {
    char what[64];
    snprintf(what, sizeof what, "write(%.40s)", s);
    /* Strip the newline from the label so lines stay one per call. */
    char *nl = strchr(what, '\n');
    if (nl) memmove(nl, nl + 1, strlen(nl));
    rc(what, write(fd, s, strlen(s)));
}

/* Like rc() for a call that returns a descriptor: descriptor numbers differ between Linux
 * and WASI (where the datastore is fd 3), so only success is printed. */
static int fdrc(const char *what, int fd) {
    if (fd < 0)
        printf("%s = -1 %s\n", what, ename(errno));
    else
        printf("%s = ok\n", what);
    fflush(stdout);
    return fd;
}

static void cat(const char *path) {
    char buf[4096];
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        printf("cat %s: %s\n", path, ename(errno));
        return;
    }
    long n = read(fd, buf, sizeof buf);
    close(fd);
    char what[300];
    snprintf(what, sizeof what, "cat %s", path);
    if (n < 0) printf("%s: %s\n", what, ename(errno));
    else show(what, buf, n);
}

static void mkfile(const char *path, const char *content) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, content, strlen(content)) != (long)strlen(content)) {
        printf("mkfile %s failed: %s\n", path, ename(errno));
        exit(1);
    }
    close(fd);
}

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* A folder's entries, sorted (the order readdir returns is the file system's). */
static void list(const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        printf("list %s: %s\n", path, ename(errno));
        return;
    }
    char *names[256];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 256) {
        char line[300];
        const char *t = e->d_type == DT_DIR ? "dir" : e->d_type == DT_REG ? "file"
                      : e->d_type == DT_LNK ? "symlink" : "other";
        snprintf(line, sizeof line, "%s(%s)", e->d_name, t);
        names[n++] = strdup(line);
    }
    closedir(d);
    qsort(names, n, sizeof names[0], cmp);
    printf("list %s:", path);
    for (int i = 0; i < n; i++) {
        printf(" %s", names[i]);
        free(names[i]);
    }
    printf("\n");
    fflush(stdout);
}

static const char *kind(mode_t m) {
    return S_ISDIR(m) ? "dir" : S_ISREG(m) ? "file" : S_ISLNK(m) ? "symlink" : "other";
}

static void st(const char *what, int follow, const char *path) {
    struct stat s;
    int r = follow ? stat(path, &s) : lstat(path, &s);
    if (r < 0)
        printf("%s %s = -1 %s\n", what, path, ename(errno));
    else
        printf("%s %s = %s size=%lld nlink=%lld\n", what, path, kind(s.st_mode),
               (long long)(S_ISDIR(s.st_mode) ? 0 : s.st_size), (long long)s.st_nlink);
    fflush(stdout);
}

/* fd_renumber: on Linux, dup2 then close; renumbering a descriptor onto itself is a no-op. */
static int renumber(int from, int to) {
#ifdef __wasi__
    int e = __wasi_fd_renumber(from, to);
    if (e) {
        errno = e;
        return -1;
    }
    return 0;
#else
    if (from == to) return fcntl(from, F_GETFD) < 0 ? -1 : 0;
    if (dup2(from, to) < 0) return -1;
    return close(from);
#endif
}

static void append(void) {
    /* Two append descriptors on one file: every write lands at the end. */
    int a = fdrc("open a", open("log", O_WRONLY | O_CREAT | O_APPEND, 0644));
    int b = fdrc("open b", open("log", O_WRONLY | O_CREAT | O_APPEND, 0644));
    put(a, "A1\n");
    put(b, "B1\n");
    put(a, "A2\n");
    put(b, "B2\n");
    close(a);
    close(b);
    cat("log");

    /* O_APPEND turned on later with fcntl. */
    mkfile("f2", "hello world\n");
    int f = fdrc("open f2", open("f2", O_WRONLY));
    rc("fcntl(F_SETFL, O_APPEND)", fcntl(f, F_SETFL, O_APPEND));
    printf("F_GETFL has O_APPEND: %d\n", (fcntl(f, F_GETFL) & O_APPEND) != 0);
    put(f, "tail\n");
    put(f, "more\n");
    rc("fcntl(F_SETFL, 0)", fcntl(f, F_SETFL, 0));
    printf("F_GETFL has O_APPEND: %d\n", (fcntl(f, F_GETFL) & O_APPEND) != 0);
    close(f);
    cat("f2");

    /* A plain write, then a write through an append descriptor opened earlier. */
    int ap = fdrc("open ap", open("f3", O_WRONLY | O_CREAT | O_APPEND, 0644));
    int pl = fdrc("open pl", open("f3", O_WRONLY));
    put(pl, "plain\n");
    put(ap, "append\n");
    put(pl, "PL");
    put(ap, "tail\n");
    close(ap);
    close(pl);
    cat("f3");

    /* Read and append through one O_RDWR|O_APPEND descriptor. */
    mkfile("f4", "0123\n");
    int rw = fdrc("open rw", open("f4", O_RDWR | O_APPEND));
    char buf[16];
    rc("read 3", read(rw, buf, 3));
    put(rw, "xy\n");
    rc("lseek(0, SEEK_SET)", lseek(rw, 0, SEEK_SET));
    long n = rc("read", read(rw, buf, sizeof buf));
    show("f4 via rw", buf, n);
    close(rw);
}

static void rename_(void) {
    /* Write through a descriptor after rename(tmp, data). */
    int fd = fdrc("open tmp.dat", open("tmp.dat", O_WRONLY | O_CREAT | O_TRUNC, 0644));
    put(fd, "part1\n");
    rc("rename tmp.dat data.dat", rename("tmp.dat", "data.dat"));
    put(fd, "part2\n");
    rc("fsync", fsync(fd));
    close(fd);
    cat("data.dat");
    cat("tmp.dat");

    /* Atomic replace: a reader opened before keeps the old content. */
    mkfile("cfg", "old\n");
    int old = fdrc("open cfg", open("cfg", O_RDONLY));
    int nw = fdrc("open cfg.tmp", open("cfg.tmp", O_WRONLY | O_CREAT | O_EXCL, 0644));
    put(nw, "new\n");
    rc("fsync", fsync(nw));
    close(nw);
    rc("rename cfg.tmp cfg", rename("cfg.tmp", "cfg"));
    char buf[64];
    long n = rc("read old fd", read(old, buf, sizeof buf));
    show("old fd", buf, n);
    close(old);
    cat("cfg");

    /* A folder descriptor kept across a rename of its folder. */
    rc("mkdir d1", mkdir("d1", 0755));
    int dfd = fdrc("open d1", open("d1", O_RDONLY | O_DIRECTORY));
    rc("rename d1 d2", rename("d1", "d2"));
    rc("mkdir d1 again", mkdir("d1", 0755));
    int in = fdrc("openat(d1fd, inside)", openat(dfd, "inside", O_WRONLY | O_CREAT, 0644));
    put(in, "in the renamed folder\n");
    close(in);
    rc("mkdirat(d1fd, sub)", mkdirat(dfd, "sub", 0755));
    close(dfd);
    list("d1");
    list("d2");

    /* Rename a folder holding an open file, then write to it. */
    rc("mkdir e1", mkdir("e1", 0755));
    int ef = fdrc("open e1/f", open("e1/f", O_WRONLY | O_CREAT, 0644));
    put(ef, "one\n");
    rc("rename e1 e2", rename("e1", "e2"));
    put(ef, "two\n");
    close(ef);
    cat("e2/f");

    /* Rename errors. */
    rc("rename missing x", rename("missing", "x"));
    mkfile("plain", "p");
    rc("rename plain d2", rename("plain", "d2"));
    rc("rename d2 plain", rename("d2", "plain"));
    rc("rename d1 d2 (not empty)", rename("d1", "d2"));
    rc("rename e2 e2/sub", rename("e2", "e2/sub"));
}

static void rotate(void) {
    int log = fdrc("open app.log", open("app.log", O_WRONLY | O_CREAT | O_APPEND, 0644));
    put(log, "line1\n");
    rc("rename app.log app.log.1", rename("app.log", "app.log.1"));
    int log2 = fdrc("open new app.log", open("app.log", O_WRONLY | O_CREAT | O_APPEND, 0644));
    put(log2, "new1\n");
    put(log, "old2\n");
    put(log2, "new2\n");
    put(log, "old3\n");
    rc("rename app.log.1 app.log.2", rename("app.log.1", "app.log.2"));
    put(log, "old4\n");
    close(log);
    close(log2);
    cat("app.log");
    cat("app.log.1");
    cat("app.log.2");
}

static void unlink_open(void) {
    int fd = fdrc("open gone", open("gone", O_RDWR | O_CREAT, 0644));
    put(fd, "abc");
    rc("unlink gone", unlink("gone"));
    put(fd, "def");
    rc("lseek 0", lseek(fd, 0, SEEK_SET));
    char buf[64];
    long n = rc("read", read(fd, buf, sizeof buf));
    show("unlinked file", buf, n);
    struct stat s;
    rc("fstat", fstat(fd, &s));
    printf("fstat: %s size=%lld nlink=%lld\n", kind(s.st_mode), (long long)s.st_size,
           (long long)s.st_nlink);
    rc("ftruncate 2", ftruncate(fd, 2));
    rc("pread", pread(fd, buf, sizeof buf, 0));
    show("after truncate", buf, 2);
    st("stat", 1, "gone");
    /* A new file of the same name is another file. */
    mkfile("gone", "fresh\n");
    put(fd, "ghi");
    close(fd);
    cat("gone");

    /* Replaced while open (rename over it), then unlinked while two descriptors hold it. */
    mkfile("keep", "v1\n");
    int k = fdrc("open keep", open("keep", O_RDWR));
    mkfile("keep.new", "v2\n");
    rc("rename keep.new keep", rename("keep.new", "keep"));
    rc("lseek end", lseek(k, 0, SEEK_END));
    put(k, "v1b\n");
    rc("lseek 0", lseek(k, 0, SEEK_SET));
    n = rc("read", read(k, buf, sizeof buf));
    show("replaced file", buf, n);
    int k2 = fdrc("open keep again", open("keep", O_RDONLY));
    rc("unlink keep", unlink("keep"));
    n = rc("read k2", read(k2, buf, sizeof buf));
    show("keep via k2", buf, n);
    close(k);
    close(k2);
    list(".");
}

static void readdir_unlink(void) {
    rc("mkdir many", mkdir("many", 0755));
    char path[64];
    for (int i = 0; i < 1000; i++) {
        snprintf(path, sizeof path, "many/f%04d", i);
        int fd = open(path, O_WRONLY | O_CREAT, 0644);
        if (fd < 0) {
            printf("create %s: %s\n", path, ename(errno));
            exit(1);
        }
        close(fd);
    }
    int passes = 0, removed = 0, first = -1;
    for (; passes < 20; passes++) {
        DIR *d = opendir("many");
        if (!d) {
            printf("opendir: %s\n", ename(errno));
            exit(1);
        }
        int this_pass = 0;
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(path, sizeof path, "many/%s", e->d_name);
            if (unlink(path) == 0) this_pass++;
            else printf("unlink %s: %s\n", path, ename(errno));
        }
        closedir(d);
        if (first < 0) first = this_pass;
        removed += this_pass;
        if (this_pass == 0) break;
    }
    printf("first pass removed %d\n", first);
    printf("removed %d in all\n", removed);
    list("many");
    rc("rmdir many", rmdir("many"));
}

static void readdir_dots(void) {
    rc("mkdir d", mkdir("d", 0755));
    mkfile("d/a", "a");
    mkfile("d/b", "b");
    rc("mkdir d/sub", mkdir("d/sub", 0755));
    rc("symlink a d/ln", symlink("a", "d/ln"));
    list("d");
    list("d/sub");
    list("d/sub/..");

    /* telldir/seekdir: going back to a cookie lists the same entries again. */
    for (int i = 0; i < 20; i++) {
        char p[32];
        snprintf(p, sizeof p, "d/sub/n%02d", i);
        mkfile(p, "");
    }
    DIR *dir = opendir("d/sub");
    struct dirent *e;
    for (int i = 0; i < 5; i++) e = readdir(dir);
    long pos = telldir(dir);
    char seen[64][32];
    int n = 0;
    while ((e = readdir(dir)) && n < 64) snprintf(seen[n++], 32, "%s", e->d_name);
    seekdir(dir, pos);
    int same = 1, m = 0;
    while ((e = readdir(dir))) {
        if (m >= n || strcmp(seen[m], e->d_name)) same = 0;
        m++;
    }
    printf("after seekdir: %d entries again (of %d), same=%d\n", m, n, same);
    rewinddir(dir);
    int all = 0;
    while (readdir(dir)) all++;
    printf("after rewinddir: %d entries\n", all);
    closedir(dir);

    rc("rmdir d (not empty)", rmdir("d"));
}

static void renumber_(void) {
    int a = fdrc("open a", open("a", O_WRONLY | O_CREAT | O_TRUNC, 0644));
    int b = fdrc("open b", open("b", O_WRONLY | O_CREAT | O_TRUNC, 0644));
    put(a, "a1\n");
    put(b, "b1\n");
    rc("renumber(a, b)", renumber(a, b));
    put(b, "to-a\n");
    rc("write a after renumber", write(a, "x", 1));
    rc("renumber(b, b)", renumber(b, b));
    put(b, "still-a\n");
    rc("renumber(a, b) with a closed", renumber(a, b));
    put(b, "after-bad-renumber\n");
    mkfile("c", "");
    int c = fdrc("open c", open("c", O_RDONLY));
    rc("renumber(c, b)", renumber(c, b));
    rc("write b (now read-only c)", write(b, "x", 1));
    close(b);
    cat("a");
    cat("b");
}

static void symlinks(void) {
    mkfile("target", "T\n");
    rc("symlink target link", symlink("target", "link"));
    char buf[256];
    long n = rc("readlink link", readlink("link", buf, sizeof buf));
    if (n >= 0) show("link ->", buf, n);
    n = rc("readlink link (3-byte buffer)", readlink("link", buf, 3));
    if (n >= 0) show("link -> (short)", buf, n);
    rc("readlink target (not a link)", readlink("target", buf, sizeof buf));
    cat("link");
    st("lstat", 0, "link");
    st("stat", 1, "link");
    fdrc("open link O_NOFOLLOW", open("link", O_RDONLY | O_NOFOLLOW));
    rc("symlink again (exists)", symlink("target", "link"));

    rc("mkdir dir", mkdir("dir", 0755));
    rc("symlink ../target dir/up", symlink("../target", "dir/up"));
    cat("dir/up");
    rc("symlink dir dlink", symlink("dir", "dlink"));
    int fd = fdrc("open dlink/x O_CREAT", open("dlink/x", O_WRONLY | O_CREAT, 0644));
    put(fd, "through a folder link\n");
    close(fd);
    list("dlink");
    st("lstat", 0, "dlink");
    st("stat", 1, "dlink/");
    rc("symlink ./dir/../dir/x chain", symlink("./dir/../dir/x", "chain"));
    rc("symlink chain chain2", symlink("chain", "chain2"));
    cat("chain2");

    rc("symlink nowhere dangling", symlink("nowhere", "dangling"));
    st("stat", 1, "dangling");
    st("lstat", 0, "dangling");
    fdrc("open dangling O_CREAT|O_EXCL", open("dangling", O_WRONLY | O_CREAT | O_EXCL, 0644));
    rc("mkdir dangling", mkdir("dangling", 0755));

    rc("symlink loop1 loop2", symlink("loop1", "loop2"));
    rc("symlink loop2 loop1", symlink("loop2", "loop1"));
    fdrc("open loop1", open("loop1", O_RDONLY));
    st("stat", 1, "loop1");

    rc("unlink link", unlink("link"));
    st("lstat", 0, "target");
    rc("rename dlink dlink2", rename("dlink", "dlink2"));
    cat("dlink2/x");
    rc("rmdir dlink2 (a link)", rmdir("dlink2"));
    rc("unlink dir/up", unlink("dir/up"));
    list(".");
}

static void hardlinks(void) {
    mkfile("h", "first\n");
    rc("link h h2", link("h", "h2"));
    st("stat", 1, "h");
    int fd = fdrc("open h2 append", open("h2", O_WRONLY | O_APPEND));
    put(fd, "via h2\n");
    close(fd);
    cat("h");
    rc("unlink h", unlink("h"));
    st("stat", 1, "h2");
    rc("link h2 h2 (exists)", link("h2", "h2"));
    rc("link missing x", link("missing", "x"));
    rc("mkdir dir", mkdir("dir", 0755));
    rc("link dir dir2", link("dir", "dir2"));
    rc("link h2 dir/h3", link("h2", "dir/h3"));
    rc("symlink h2 sl", symlink("h2", "sl"));
    rc("link sl sl2 (the link itself)", link("sl", "sl2"));
    st("lstat", 0, "sl2");
    st("stat", 1, "h2");
}

static void trailing_slash(void) {
    mkfile("f", "file\n");
    rc("mkdir d", mkdir("d", 0755));
    fdrc("open f/", open("f/", O_RDONLY));
    fdrc("open f/.", open("f/.", O_RDONLY));
    fdrc("open f/..", open("f/..", O_RDONLY));
    fdrc("open f/ O_CREAT", open("f/", O_WRONLY | O_CREAT, 0644));
    fdrc("open new/ O_CREAT", open("new/", O_WRONLY | O_CREAT, 0644));
    st("stat", 1, "f/");
    st("lstat", 0, "f/");
    rc("unlink f/", unlink("f/"));
    rc("rename f/ g", rename("f/", "g"));
    rc("rename f g/", rename("f", "g/"));
    rc("mkdir f/x", mkdir("f/x", 0755));
    rc("rmdir f/", rmdir("f/"));
    int fd = fdrc("open d/", open("d/", O_RDONLY | O_DIRECTORY));
    if (fd >= 0) close(fd);
    st("stat", 1, "d/");
    st("stat", 1, "d/.");
    rc("mkdir e/", mkdir("e/", 0755));
    rc("rename e/ e2/", rename("e/", "e2/"));
    rc("symlink f fl", symlink("f", "fl"));
    fdrc("open fl/", open("fl/", O_RDONLY));
    rc("unlink fl/", unlink("fl/"));
    rc("symlink d dl", symlink("d", "dl"));
    st("lstat", 0, "dl/");
    rc("unlink dl", unlink("dl"));
    list(".");
}

static long mtime_of(const char *path) {
    struct stat s;
    if (stat(path, &s) < 0) return -1;
    return (long)s.st_mtim.tv_sec;
}

static void times(void) {
    mkfile("a", "one\n");
    int fd = fdrc("open a", open("a", O_RDWR));
    rc("rename a b", rename("a", "b"));
    mkfile("a", "two\n");
    struct timespec t[2] = {{1000000000, 0}, {1000000000, 0}};
    rc("futimens(fd)", futimens(fd, t));
    printf("a has the set mtime: %d\n", mtime_of("a") == 1000000000);
    printf("b has the set mtime: %d\n", mtime_of("b") == 1000000000);
    struct stat s;
    rc("fstat", fstat(fd, &s));
    printf("fd has the set mtime: %d\n", s.st_mtim.tv_sec == 1000000000);
    close(fd);

    struct timespec omit[2] = {{0, UTIME_OMIT}, {1200000000, 0}};
    rc("utimensat(a, omit atime)", utimensat(AT_FDCWD, "a", omit, 0));
    printf("a mtime: %ld\n", mtime_of("a"));
    rc("symlink a la", symlink("a", "la"));
    struct timespec old[2] = {{1300000000, 0}, {1300000000, 0}};
    rc("utimensat(la, NOFOLLOW)", utimensat(AT_FDCWD, "la", old, AT_SYMLINK_NOFOLLOW));
    printf("a mtime after link's own times: %ld\n", mtime_of("a"));
    rc("utimensat(la, follow)", utimensat(AT_FDCWD, "la", old, 0));
    printf("a mtime after following: %ld\n", mtime_of("a"));
    struct timespec bad[2] = {{0, 1000000000}, {0, 0}};
    rc("utimensat(bad nsec)", utimensat(AT_FDCWD, "a", bad, 0));
    rc("utimensat(missing)", utimensat(AT_FDCWD, "missing", old, 0));
}

static void truncseek(void) {
    int fd = fdrc("open t", open("t", O_RDWR | O_CREAT | O_TRUNC, 0644));
    put(fd, "0123456789");
    rc("ftruncate 4", ftruncate(fd, 4));
    rc("lseek cur", lseek(fd, 0, SEEK_CUR));
    put(fd, "X");
    struct stat s;
    fstat(fd, &s);
    printf("size %lld\n", (long long)s.st_size);
    char buf[64];
    long n = rc("pread 3 at 1", pread(fd, buf, 3, 1));
    show("pread", buf, n);
    rc("pwrite ab at 0", pwrite(fd, "ab", 2, 0));
    rc("lseek cur after pwrite", lseek(fd, 0, SEEK_CUR));
    rc("pwrite at 20", pwrite(fd, "Z", 1, 20));
    rc("lseek end -1", lseek(fd, -1, SEEK_END));
    n = rc("read", read(fd, buf, sizeof buf));
    show("read at end-1", buf, n);
    rc("read at eof", read(fd, buf, sizeof buf));
    rc("lseek set -1", lseek(fd, -1, SEEK_SET));
    rc("lseek cur -100", lseek(fd, -100, SEEK_CUR));
    rc("lseek set 30", lseek(fd, 30, SEEK_SET));
    put(fd, "!");
    rc("ftruncate 40", ftruncate(fd, 40));
    rc("ftruncate -1", ftruncate(fd, -1));
    rc("pread at -1", pread(fd, buf, 1, -1));
    rc("pread at 1000", pread(fd, buf, 10, 1000));
    rc("lseek 0", lseek(fd, 0, SEEK_SET));
    n = rc("read all", read(fd, buf, sizeof buf));
    show("t", buf, n);
    close(fd);
    int ro = fdrc("open t O_RDONLY", open("t", O_RDONLY));
    rc("write to read-only fd", write(ro, "x", 1));
    rc("ftruncate read-only fd", ftruncate(ro, 0));
    close(ro);
    int wo = fdrc("open t O_WRONLY|O_TRUNC", open("t", O_WRONLY | O_TRUNC));
    rc("read from write-only fd", read(wo, buf, 1));
    fstat(wo, &s);
    printf("size after O_TRUNC %lld\n", (long long)s.st_size);
    close(wo);
    rc("truncate by path", truncate("t", 3));
    cat("t");
    rc("mkdir d", mkdir("d", 0755));
    int d = fdrc("open d", open("d", O_RDONLY | O_DIRECTORY));
    rc("write a folder", write(d, "x", 1));
    close(d);
    fdrc("open d O_WRONLY", open("d", O_WRONLY));
    rc("close twice (bad fd)", close(d));
}

int main(int argc, char **argv) {
    static const struct {
        const char *name;
        void (*run)(void);
    } all[] = {
        {"append", append}, {"rename", rename_}, {"rotate", rotate},
        {"unlink_open", unlink_open}, {"readdir_unlink", readdir_unlink},
        {"readdir_dots", readdir_dots}, {"renumber", renumber_}, {"symlinks", symlinks},
        {"hardlinks", hardlinks}, {"trailing_slash", trailing_slash}, {"times", times},
        {"truncseek", truncseek},
    };
    if (argc != 2) {
        fprintf(stderr, "usage: posix SCENARIO\n");
        return 2;
    }
    for (unsigned i = 0; i < sizeof all / sizeof all[0]; i++)
        if (!strcmp(all[i].name, argv[1])) {
            all[i].run();
            printf("done\n");
            return 0;
        }
    fprintf(stderr, "no scenario %s\n", argv[1]);
    return 2;
}
