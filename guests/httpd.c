/* httpd: an HTTP/1.1 static file server over its working folder, with keep-alive and
 * pipelining. GET and HEAD; 400 for malformed requests, 404 for missing files, 405 for
 * other methods; paths with ".." are refused. Listens on the first preopened listener
 * (fd 4). */
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "server.h"

static const char *content_type(const char *path) {
    const char *dot = strrchr(path, '.');
    if (!dot) return "application/octet-stream";
    if (!strcmp(dot, ".html") || !strcmp(dot, ".htm")) return "text/html; charset=utf-8";
    if (!strcmp(dot, ".txt")) return "text/plain; charset=utf-8";
    if (!strcmp(dot, ".css")) return "text/css";
    if (!strcmp(dot, ".js")) return "text/javascript";
    if (!strcmp(dot, ".json")) return "application/json";
    if (!strcmp(dot, ".png")) return "image/png";
    return "application/octet-stream";
}

static void respond(struct conn *c, int code, const char *reason, const char *type, const char *body,
                    size_t len, int head, int keep) {
    char h[512];
    snprintf(h, sizeof h,
             "HTTP/1.1 %d %s\r\nServer: tandem-httpd\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
             "Connection: %s\r\n\r\n",
             code, reason, type, len, keep ? "keep-alive" : "close");
    buf_str(&c->out, h);
    if (!head && len) buf_add(&c->out, body, len);
}

static void error(struct conn *c, int code, const char *reason, int keep) {
    char body[128];
    int n = snprintf(body, sizeof body, "%d %s\n", code, reason);
    respond(c, code, reason, "text/plain; charset=utf-8", body, (size_t)n, 0, keep);
}

/* Serve one request from the start of `req` (headers only: no request bodies). */
static int serve_request(struct conn *c, char *req) {
    char method[16], target[1024], version[16];
    if (sscanf(req, "%15s %1023s %15s", method, target, version) != 3 || strncmp(version, "HTTP/1.", 7)) {
        error(c, 400, "Bad Request", 0);
        return -1;
    }
    int keep = strcmp(version, "HTTP/1.0") != 0;
    for (char *h = strstr(req, "\r\n"); h && h[2] != '\r'; h = strstr(h + 2, "\r\n")) {
        if (!strncasecmp(h + 2, "Connection:", 11)) {
            const char *v = h + 13;
            while (*v == ' ') v++;
            if (!strncasecmp(v, "close", 5)) keep = 0;
            if (!strncasecmp(v, "keep-alive", 10)) keep = 1;
        }
    }
    int head = !strcmp(method, "HEAD");
    if (!head && strcmp(method, "GET")) { error(c, 405, "Method Not Allowed", keep); return keep ? 0 : -1; }
    char *q = strchr(target, '?');
    if (q) *q = 0;
    if (target[0] != '/' || strstr(target, "..")) { error(c, 400, "Bad Request", keep); return keep ? 0 : -1; }
    char path[1100];
    snprintf(path, sizeof path, "%s%s", target + 1, target[strlen(target) - 1] == '/' ? "index.html" : "");
    if (!path[0]) snprintf(path, sizeof path, "index.html");
    struct stat st;
    FILE *f = stat(path, &st) == 0 && S_ISREG(st.st_mode) ? fopen(path, "rb") : NULL;
    if (!f) { error(c, 404, "Not Found", keep); return keep ? 0 : -1; }
    size_t len = (size_t)st.st_size;
    char *body = malloc(len ? len : 1);
    size_t got = fread(body, 1, len, f);
    fclose(f);
    respond(c, 200, "OK", content_type(path), body, got, head, keep);
    free(body);
    return keep ? 0 : -1;
}

static int handle(struct conn *c) {
    for (;;) {
        buf_add(&c->in, "", 1); /* terminate for the string functions, then drop it */
        c->in.len--;
        char *end = strstr(c->in.p, "\r\n\r\n");
        if (!end) {
            if (c->in.len > 16384) { error(c, 400, "Bad Request", 0); return -1; }
            return 0;
        }
        size_t used = (size_t)(end + 4 - c->in.p);
        end[2] = 0;
        int rc = serve_request(c, c->in.p);
        buf_consume(&c->in, used);
        if (rc < 0) return -1;
        if (!c->in.len) return 0;
    }
}

int main(void) {
    printf("httpd: serving the datastore on fd 4\n");
    fflush(stdout);
    serve(4, handle, NULL);
}
