/* A small single-threaded TCP server loop for the example guests: it accepts on a
 * preopened listener, reads what arrives, hands each connection's input to a handler that
 * appends replies, and writes them back. Plain POSIX (poll, accept, recv, send): nothing
 * in it knows about Tandem. */
#ifndef SERVER_H
#define SERVER_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

struct buf {
    char *p;
    size_t len, cap;
};

static void buf_add(struct buf *b, const void *d, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, d, n);
    b->len += n;
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_consume(struct buf *b, size_t n) {
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

struct conn {
    int fd;
    int closing; /* close once the output is written */
    struct buf in, out;
};

/* Consume what the handler can of c->in, appending replies to c->out. Return -1 to close
 * the connection after its replies are sent. */
typedef int (*handler_fn)(struct conn *c);

#define MAX_CONNS 1024

static void set_nonblocking(int fd) {
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void conn_free(struct conn *c) {
    close(c->fd);
    free(c->in.p);
    free(c->out.p);
    free(c);
}

/* Serve for ever. `before_send`, if given, runs after every batch of input was handled
 * and before any reply of that batch is sent (kvd makes its writes durable there). */
static void serve(int listener, handler_fn handle, void (*before_send)(void)) {
    static struct conn *conns[MAX_CONNS];
    static struct pollfd pfds[MAX_CONNS + 1];
    int n = 0;
    set_nonblocking(listener);
    static char chunk[65536]; /* wasm32 stacks are small: keep big buffers off them */
    for (;;) {
        pfds[0].fd = listener;
        pfds[0].events = n < MAX_CONNS ? POLLIN : 0;
        pfds[0].revents = 0;
        for (int i = 0; i < n; i++) {
            pfds[i + 1].fd = conns[i]->fd;
            pfds[i + 1].events = POLLIN | (conns[i]->out.len ? POLLOUT : 0);
            pfds[i + 1].revents = 0;
        }
        if (poll(pfds, (nfds_t)n + 1, -1) < 0) {
            if (errno == EINTR) continue;
            perror("poll");
            exit(1);
        }
        int polled = n;
        for (int i = 0; i < polled; i++) {
            struct conn *c = conns[i];
            if (!pfds[i + 1].revents || c->closing) continue;
            for (;;) {
                ssize_t r = recv(c->fd, chunk, sizeof chunk, 0);
                if (r > 0) {
                    buf_add(&c->in, chunk, (size_t)r);
                    if (c->in.len > (1 << 20)) break;
                    continue;
                }
                if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) c->closing = 1;
                break;
            }
            if (c->in.len && handle(c) < 0) c->closing = 1;
        }
        if (pfds[0].revents) {
            while (n < MAX_CONNS) {
                int fd = accept(listener, NULL, NULL);
                if (fd < 0) break;
                set_nonblocking(fd);
                struct conn *c = calloc(1, sizeof *c);
                if (!c) { close(fd); break; }
                c->fd = fd;
                conns[n++] = c;
            }
        }
        if (before_send) before_send();
        for (int i = 0; i < n; i++) {
            struct conn *c = conns[i];
            while (c->out.len) {
                ssize_t w = send(c->fd, c->out.p, c->out.len, 0);
                if (w > 0) { buf_consume(&c->out, (size_t)w); continue; }
                if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { c->out.len = 0; c->closing = 1; }
                break;
            }
        }
        for (int i = 0; i < n;) {
            if (conns[i]->closing && conns[i]->out.len == 0) {
                conn_free(conns[i]);
                conns[i] = conns[--n];
            } else {
                i++;
            }
        }
    }
}

#endif
