/* sink: accepts connections one at a time on the first preopened listener (fd 4), reads
 * and discards everything until the peer shuts down its side, then answers with the byte
 * count and closes. The bulk-transfer half of `tandem bench vm`. */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    static char buf[256 * 1024];
    for (;;) {
        int c = accept(4, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        unsigned long long total = 0;
        ssize_t n;
        while ((n = recv(c, buf, sizeof buf, 0)) > 0) total += (unsigned long long)n;
        char reply[64];
        int len = snprintf(reply, sizeof reply, "%llu\n", total);
        send(c, reply, (size_t)len, 0);
        close(c);
    }
}
