/* kvd: a key-value server speaking the Redis protocol (RESP), for unmodified redis-cli and
 * redis-benchmark. Commands: PING ECHO SET GET DEL EXISTS INCR INCRBY DECR DECRBY DBSIZE
 * FLUSHALL FLUSHDB SELECT CONFIG TIME QUIT (and inline commands). Pipelining and many clients.
 * Every write is appended to an append-only file (argv[1], default kvd.aof) before it is
 * acknowledged, and the file is replayed at start, so data survives a restart.
 * Listens on the first preopened listener (fd 4). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server.h"

/* ---- the table: open hashing with binary-safe keys and values ---- */
struct entry {
    char *key, *val;
    size_t klen, vlen;
    struct entry *next;
};
static struct entry **table;
static size_t nbuckets = 1024, nkeys;

static uint64_t hash(const char *k, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)k[i]; h *= 1099511628211ull; }
    return h;
}

static struct entry **slot(const char *k, size_t n) {
    struct entry **e = &table[hash(k, n) & (nbuckets - 1)];
    while (*e && !((*e)->klen == n && memcmp((*e)->key, k, n) == 0)) e = &(*e)->next;
    return e;
}

static void grow(void) {
    size_t old = nbuckets;
    struct entry **t = table;
    nbuckets *= 2;
    table = calloc(nbuckets, sizeof *table);
    for (size_t i = 0; i < old; i++)
        for (struct entry *e = t[i], *nx; e; e = nx) {
            nx = e->next;
            struct entry **s = &table[hash(e->key, e->klen) & (nbuckets - 1)];
            e->next = *s;
            *s = e;
        }
    free(t);
}

static char *copy_bytes(const char *p, size_t n) {
    char *d = malloc(n + 1);
    memcpy(d, p, n);
    d[n] = 0;
    return d;
}

static void set(const char *k, size_t kn, const char *v, size_t vn) {
    struct entry **s = slot(k, kn);
    if (*s) {
        free((*s)->val);
        (*s)->val = copy_bytes(v, vn);
        (*s)->vlen = vn;
        return;
    }
    struct entry *e = calloc(1, sizeof *e);
    e->key = copy_bytes(k, kn);
    e->klen = kn;
    e->val = copy_bytes(v, vn);
    e->vlen = vn;
    *s = e;
    if (++nkeys > nbuckets) grow();
}

static int del(const char *k, size_t kn) {
    struct entry **s = slot(k, kn);
    if (!*s) return 0;
    struct entry *e = *s;
    *s = e->next;
    free(e->key);
    free(e->val);
    free(e);
    nkeys--;
    return 1;
}

static void flushall(void) {
    for (size_t i = 0; i < nbuckets; i++)
        while (table[i]) del(table[i]->key, table[i]->klen);
}

/* ---- the append-only file ---- */
static FILE *aof;
static struct buf pending; /* writes of this batch, made durable before replies go out */

static void aof_append(int argc, char **argv, size_t *lens) {
    char head[32];
    snprintf(head, sizeof head, "*%d\r\n", argc);
    buf_str(&pending, head);
    for (int i = 0; i < argc; i++) {
        snprintf(head, sizeof head, "$%zu\r\n", lens[i]);
        buf_str(&pending, head);
        buf_add(&pending, argv[i], lens[i]);
        buf_str(&pending, "\r\n");
    }
}

static void aof_flush(void) {
    if (!pending.len) return;
    if (fwrite(pending.p, 1, pending.len, aof) != pending.len || fflush(aof) != 0) {
        perror("kvd: writing the append-only file");
        exit(1);
    }
    pending.len = 0;
}

/* ---- RESP ---- */
static void reply_int(struct buf *o, long long v) {
    char s[32];
    snprintf(s, sizeof s, ":%lld\r\n", v);
    buf_str(o, s);
}

static void reply_bulk(struct buf *o, const char *p, size_t n) {
    char s[32];
    snprintf(s, sizeof s, "$%zu\r\n", n);
    buf_str(o, s);
    buf_add(o, p, n);
    buf_str(o, "\r\n");
}

static int eq(const char *a, const char *b) {
    for (; *a && *b; a++, b++)
        if ((*a | 32) != (*b | 32)) return 0;
    return *a == *b;
}

static int parse_ll(const char *p, size_t n, long long *out) {
    if (n == 0 || n > 20) return 0;
    char tmp[24];
    memcpy(tmp, p, n);
    tmp[n] = 0;
    char *end;
    errno = 0;
    *out = strtoll(tmp, &end, 10);
    return errno == 0 && *end == 0;
}

/* Execute one command; `replay` is set while loading the append-only file. */
static int execute(struct buf *o, int argc, char **argv, size_t *lens, int replay) {
    const char *cmd = argv[0];
    if (eq(cmd, "PING")) {
        if (argc > 1) reply_bulk(o, argv[1], lens[1]); else buf_str(o, "+PONG\r\n");
    } else if (eq(cmd, "ECHO") && argc == 2) {
        reply_bulk(o, argv[1], lens[1]);
    } else if (eq(cmd, "SET") && argc >= 3) {
        set(argv[1], lens[1], argv[2], lens[2]);
        if (!replay) aof_append(3, argv, lens);
        buf_str(o, "+OK\r\n");
    } else if (eq(cmd, "GET") && argc == 2) {
        struct entry *e = *slot(argv[1], lens[1]);
        if (e) reply_bulk(o, e->val, e->vlen); else buf_str(o, "$-1\r\n");
    } else if (eq(cmd, "DEL") && argc >= 2) {
        long long n = 0;
        for (int i = 1; i < argc; i++) n += del(argv[i], lens[i]);
        if (!replay && n) aof_append(argc, argv, lens);
        reply_int(o, n);
    } else if (eq(cmd, "EXISTS") && argc >= 2) {
        long long n = 0;
        for (int i = 1; i < argc; i++) n += *slot(argv[i], lens[i]) != NULL;
        reply_int(o, n);
    } else if ((eq(cmd, "INCR") || eq(cmd, "DECR")) && argc == 2) {
        char *args[3] = {"INCRBY", argv[1], eq(cmd, "INCR") ? "1" : "-1"};
        size_t l[3] = {6, lens[1], strlen(args[2])};
        return execute(o, 3, args, l, replay);
    } else if ((eq(cmd, "INCRBY") || eq(cmd, "DECRBY")) && argc == 3) {
        long long by, cur = 0;
        if (!parse_ll(argv[2], lens[2], &by)) { buf_str(o, "-ERR value is not an integer or out of range\r\n"); return 0; }
        if (eq(cmd, "DECRBY")) by = -by;
        struct entry *e = *slot(argv[1], lens[1]);
        if (e && !parse_ll(e->val, e->vlen, &cur)) { buf_str(o, "-ERR value is not an integer or out of range\r\n"); return 0; }
        cur += by;
        char v[32];
        int vn = snprintf(v, sizeof v, "%lld", cur);
        set(argv[1], lens[1], v, (size_t)vn);
        if (!replay) {
            char *args[3] = {"SET", argv[1], v};
            size_t l[3] = {3, lens[1], (size_t)vn};
            aof_append(3, args, l);
        }
        reply_int(o, cur);
    } else if (eq(cmd, "DBSIZE")) {
        reply_int(o, (long long)nkeys);
    } else if (eq(cmd, "FLUSHALL") || eq(cmd, "FLUSHDB")) {
        flushall();
        if (!replay) aof_append(1, argv, lens);
        buf_str(o, "+OK\r\n");
    } else if (eq(cmd, "SELECT")) {
        buf_str(o, argc == 2 && lens[1] == 1 && argv[1][0] == '0' ? "+OK\r\n" : "-ERR DB index is out of range\r\n");
    } else if (eq(cmd, "CONFIG") && argc == 3 && eq(argv[1], "GET")) {
        /* What clients such as redis-benchmark ask: persistence is the append-only file. */
        if (eq(argv[2], "save")) buf_str(o, "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");
        else if (eq(argv[2], "appendonly")) buf_str(o, "*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n");
        else buf_str(o, "*0\r\n");
    } else if (eq(cmd, "TIME") && argc == 1) {
        /* As Redis answers: the wall clock's seconds and microseconds, two bulk strings. */
        struct timespec ts;
        if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
            buf_str(o, "-ERR the clock cannot be read\r\n");
            return 0;
        }
        char sec[32], usec[16];
        int sn = snprintf(sec, sizeof sec, "%lld", (long long)ts.tv_sec);
        int un = snprintf(usec, sizeof usec, "%ld", (long)(ts.tv_nsec / 1000));
        buf_str(o, "*2\r\n");
        reply_bulk(o, sec, (size_t)sn);
        reply_bulk(o, usec, (size_t)un);
    } else if (eq(cmd, "TIME")) {
        buf_str(o, "-ERR wrong number of arguments for 'time' command\r\n");
    } else if (eq(cmd, "QUIT")) {
        buf_str(o, "+OK\r\n");
        return -1;
    } else {
        char e[160];
        snprintf(e, sizeof e, "-ERR unknown command '%.64s' or wrong number of arguments\r\n", cmd);
        buf_str(o, e);
    }
    return 0;
}

/* Parse one command from p[0..n): 0 if incomplete, -1 on a protocol error, else the bytes
 * it took. Arguments point into p (NUL-terminated copies would cost a copy per argument;
 * the table copies what it keeps). */
#define MAX_ARGS 1024
static char *argv_[MAX_ARGS];
static size_t lens_[MAX_ARGS];
static int argc_;

static long parse(char *p, size_t n) {
    char *end = p + n, *q = p;
    if (n == 0) return 0;
    if (*q != '*') { /* inline command: words up to CRLF */
        char *nl = memchr(q, '\n', n);
        if (!nl) return n > 65536 ? -1 : 0;
        argc_ = 0;
        char *w = q;
        while (w < nl && argc_ < MAX_ARGS) {
            while (w < nl && (*w == ' ' || *w == '\r')) w++;
            char *s = w;
            while (w < nl && *w != ' ' && *w != '\r') w++;
            if (w > s) { argv_[argc_] = s; lens_[argc_++] = (size_t)(w - s); }
        }
        for (int i = 0; i < argc_; i++) argv_[i][lens_[i]] = 0;
        return nl + 1 - p;
    }
    char *nl = memchr(q, '\n', n);
    if (!nl) return 0;
    long count = strtol(q + 1, NULL, 10);
    if (count < 1 || count > MAX_ARGS) return -1;
    q = nl + 1;
    for (long i = 0; i < count; i++) {
        if (q >= end) return 0;
        if (*q != '$') return -1;
        nl = memchr(q, '\n', (size_t)(end - q));
        if (!nl) return 0;
        long len = strtol(q + 1, NULL, 10);
        if (len < 0 || len > (512 << 20)) return -1;
        q = nl + 1;
        if (end - q < len + 2) return 0;
        argv_[i] = q;
        lens_[i] = (size_t)len;
        q += len + 2;
    }
    argc_ = (int)count;
    /* Terminate in place: each argument is followed by its CRLF. */
    for (int i = 0; i < argc_; i++) argv_[i][lens_[i]] = 0;
    return q - p;
}

static int handle(struct conn *c) {
    size_t used = 0;
    int rc = 0;
    while (used < c->in.len) {
        long took = parse(c->in.p + used, c->in.len - used);
        if (took == 0) break;
        if (took < 0) { buf_str(&c->out, "-ERR Protocol error\r\n"); rc = -1; break; }
        used += (size_t)took;
        if (argc_ && execute(&c->out, argc_, argv_, lens_, 0) < 0) { rc = -1; break; }
    }
    buf_consume(&c->in, used);
    return rc;
}

static void load(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return;
    struct buf b = {0};
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) buf_add(&b, chunk, n);
    fclose(f);
    struct buf sink = {0};
    size_t used = 0, cmds = 0;
    while (used < b.len) {
        long took = parse(b.p + used, b.len - used);
        if (took <= 0) break; /* a torn last record from a crash: ignore it */
        used += (size_t)took;
        execute(&sink, argc_, argv_, lens_, 1);
        sink.len = 0;
        cmds++;
    }
    printf("kvd: loaded %zu writes from %s, %zu keys\n", cmds, path, nkeys);
    free(b.p);
    free(sink.p);
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "kvd.aof";
    table = calloc(nbuckets, sizeof *table);
    load(path);
    aof = fopen(path, "a");
    if (!aof) { perror("kvd: opening the append-only file"); return 1; }
    printf("kvd: serving on fd 4\n");
    fflush(stdout);
    serve(4, handle, aof_flush);
}
