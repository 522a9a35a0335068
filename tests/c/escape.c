/* Tries to reach outside its datastore, through what tests/posix.rs placed in it:
 *   out_dir -> /ABS/outside (absolute, a folder)   abs_file -> /ABS/outside/secret.txt
 *   dangling -> /ABS/outside/created (absent)      rel_up -> ../outside
 *   sub/deep_up -> ../../outside                   rel_dangling -> ../outside/created2
 * and through "..". Every line "escape: ..." is an attempt that must be refused; lines
 * "inside: ..." are operations on the datastore's own entries, which may succeed.
 * The test compares this output with wasmtime's, and checks the outside folder unchanged. */
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wasi/api.h>

#include "util.h"

static char label[256];

static void attempt(const char *what, const char *path, long r) {
    snprintf(label, sizeof label, "escape: %s %s", what, path);
    if (r >= 0) {
        printf("%s = ok\n", label);
        fflush(stdout);
    } else {
        rc(label, r);
    }
}

static void inside(const char *what, const char *path, long r) {
    snprintf(label, sizeof label, "inside: %s %s", what, path);
    if (r >= 0) {
        printf("%s = ok\n", label);
        fflush(stdout);
    } else {
        rc(label, r);
    }
}

static char path[256];

static const char *j(const char *a, const char *b) {
    snprintf(path, sizeof path, "%s/%s", a, b);
    return path;
}

static long opendir_(const char *p) {
    DIR *d = opendir(p);
    if (!d) return -1;
    int n = 0;
    while (readdir(d)) n++;
    closedir(d);
    return n > 0 ? 0 : 0;
}

static long stat_(const char *p, int follow) {
    struct stat s;
    return follow ? stat(p, &s) : lstat(p, &s);
}

static const struct timespec T[2] = {{1000000000, 0}, {1000000000, 0}};

static void through_folder(const char *d) {
    char b[128];
    attempt("open O_RDONLY", j(d, "secret.txt"), open(j(d, "secret.txt"), O_RDONLY));
    attempt("open O_RDWR", j(d, "secret.txt"), open(j(d, "secret.txt"), O_RDWR));
    attempt("open O_TRUNC", j(d, "secret.txt"), open(j(d, "secret.txt"), O_WRONLY | O_TRUNC));
    attempt("opendir", d, opendir_(d));
    attempt("opendir", j(d, "sub"), opendir_(j(d, "sub")));
    attempt("open O_RDONLY", j(d, "sub/inner.txt"), open(j(d, "sub/inner.txt"), O_RDONLY));
    attempt("stat", d, stat_(d, 1));
    attempt("stat", j(d, "secret.txt"), stat_(j(d, "secret.txt"), 1));
    attempt("lstat", j(d, "secret.txt"), stat_(j(d, "secret.txt"), 0));
    attempt("open O_CREAT", j(d, "new.txt"), open(j(d, "new.txt"), O_WRONLY | O_CREAT, 0644));
    attempt("open O_RDONLY|O_CREAT", j(d, "new2.txt"), open(j(d, "new2.txt"), O_RDONLY | O_CREAT, 0644));
    attempt("mkdir", j(d, "newdir"), mkdir(j(d, "newdir"), 0755));
    attempt("unlink", j(d, "secret.txt"), unlink(j(d, "secret.txt")));
    attempt("rmdir", j(d, "keep"), rmdir(j(d, "keep")));
    snprintf(b, sizeof b, "%s", j(d, "secret.txt"));
    attempt("rename from", b, rename(b, "stolen"));
    attempt("rename to", j(d, "planted"), rename("inside.txt", j(d, "planted")));
    attempt("link from", b, link(b, "hl"));
    attempt("link to", j(d, "hl"), link("inside.txt", j(d, "hl")));
    attempt("symlink at", j(d, "sl"), symlink("x", j(d, "sl")));
    attempt("utimensat", b, utimensat(AT_FDCWD, b, T, 0));
    attempt("truncate", b, truncate(b, 0));
    char buf[64];
    attempt("readlink", j(d, "secret.txt"), readlink(j(d, "secret.txt"), buf, sizeof buf));
}

static void through_file_link(const char *l) {
    attempt("open O_RDONLY", l, open(l, O_RDONLY));
    attempt("open O_WRONLY|O_APPEND", l, open(l, O_WRONLY | O_APPEND));
    attempt("open O_TRUNC", l, open(l, O_WRONLY | O_TRUNC));
    attempt("stat", l, stat_(l, 1));
    attempt("truncate", l, truncate(l, 0));
    attempt("utimensat", l, utimensat(AT_FDCWD, l, T, 0));
    attempt("linkat FOLLOW", l, linkat(AT_FDCWD, l, AT_FDCWD, "hl_follow", AT_SYMLINK_FOLLOW));
    inside("lstat", l, stat_(l, 0));
    char buf[512];
    inside("readlink", l, readlink(l, buf, sizeof buf));
}

static void through_dangling(const char *l) {
    attempt("open O_CREAT", l, open(l, O_WRONLY | O_CREAT, 0644));
    attempt("open O_RDONLY|O_CREAT", l, open(l, O_RDONLY | O_CREAT, 0644));
    attempt("open O_CREAT|O_TRUNC", l, open(l, O_RDWR | O_CREAT | O_TRUNC, 0644));
    attempt("open O_CREAT|O_EXCL", l, open(l, O_WRONLY | O_CREAT | O_EXCL, 0644));
    attempt("mkdir", l, mkdir(l, 0755));
    attempt("stat", l, stat_(l, 1));
    attempt("utimensat", l, utimensat(AT_FDCWD, l, T, 0));
    attempt("linkat FOLLOW", l, linkat(AT_FDCWD, l, AT_FDCWD, "hl_dangling", AT_SYMLINK_FOLLOW));
    inside("lstat", l, stat_(l, 0));
}

int main(void) {
    const char *folders[] = {"out_dir", "rel_up", "sub/deep_up"};
    for (int i = 0; i < 3; i++) through_folder(folders[i]);
    through_file_link("abs_file");
    through_dangling("dangling");
    through_dangling("rel_dangling");

    /* "..": out of the datastore by name. */
    attempt("open O_RDONLY", "../outside/secret.txt", open("../outside/secret.txt", O_RDONLY));
    attempt("open O_RDONLY", "sub/../../outside/secret.txt", open("sub/../../outside/secret.txt", O_RDONLY));
    attempt("open O_RDONLY", "/../outside/secret.txt", open("/../outside/secret.txt", O_RDONLY));
    attempt("stat", "..", stat_("..", 1));
    attempt("stat", "sub/../..", stat_("sub/../..", 1));
    attempt("opendir", "..", opendir_(".."));
    attempt("opendir", "sub/../..", opendir_("sub/../.."));
    attempt("mkdir", "../x", mkdir("../x", 0755));
    attempt("open O_CREAT", "../x.txt", open("../x.txt", O_WRONLY | O_CREAT, 0644));
    attempt("rename to", "../planted", rename("inside.txt", "../planted"));
    attempt("unlink", "../outside/secret.txt", unlink("../outside/secret.txt"));
    attempt("rmdir", "../outside/keep", rmdir("../outside/keep"));
    attempt("symlink at", "../sl", symlink("x", "../sl"));
    attempt("link to", "../hl", link("inside.txt", "../hl"));
    attempt("utimensat", "..", utimensat(AT_FDCWD, "..", T, 0));

    /* A link the guest makes itself that points out is not followed either. */
    inside("symlink ../outside", "mylink", symlink("../outside", "mylink"));
    attempt("open O_RDONLY", "mylink/secret.txt", open("mylink/secret.txt", O_RDONLY));
    attempt("open O_CREAT", "mylink/mine.txt", open("mylink/mine.txt", O_WRONLY | O_CREAT, 0644));
    inside("symlink /etc/passwd", "mypasswd", symlink("/etc/passwd", "mypasswd"));
    attempt("open O_RDONLY", "mypasswd", open("mypasswd", O_RDONLY));

    /* The datastore root itself is not removed or moved. */
    attempt("rmdir", ".", rmdir("."));
    attempt("rmdir", "/", rmdir("/"));
    attempt("rmdir", "sub/..", rmdir("sub/.."));
    attempt("rename from", ".", rename(".", "moved"));
    attempt("rename from", "sub/..", rename("sub/..", "moved"));
    attempt("rename to", ".", rename("sub", "."));
    attempt("unlink", ".", unlink("."));
    long e = __wasi_path_remove_directory(3, ".");
    printf("escape: __wasi_path_remove_directory(3, \".\") = %s\n", ename((int)e));
    e = __wasi_path_remove_directory(3, "");
    printf("escape: __wasi_path_remove_directory(3, \"\") = %s\n", ename((int)e));
    e = __wasi_path_unlink_file(3, "");
    printf("escape: __wasi_path_unlink_file(3, \"\") = %s\n", ename((int)e));

    inside("stat", ".", stat_(".", 1));
    inside("open O_RDONLY", "inside.txt", open("inside.txt", O_RDONLY));
    printf("done\n");
    return 0;
}
