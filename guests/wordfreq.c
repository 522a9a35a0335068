/* Word frequencies of a text file: reads the file named by argv[1], writes every word
 * with its count to argv[2] (default freq.txt), most frequent first, and prints the top
 * five. An ordinary program: stdio, malloc, qsort. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct word { char *w; long n; };
static struct word *table;
static size_t cap = 1024, used;

static unsigned long hash(const char *s) {
    unsigned long h = 5381;
    while (*s) h = h * 33 + (unsigned char)*s++;
    return h;
}

static void grow(void);

static void add(const char *w) {
    if (used * 2 >= cap) grow();
    size_t i = hash(w) & (cap - 1);
    while (table[i].w) {
        if (strcmp(table[i].w, w) == 0) { table[i].n++; return; }
        i = (i + 1) & (cap - 1);
    }
    table[i].w = strdup(w);
    table[i].n = 1;
    used++;
}

static void grow(void) {
    struct word *old = table;
    size_t oldcap = cap;
    cap *= 2;
    table = calloc(cap, sizeof *table);
    used = 0;
    for (size_t i = 0; i < oldcap; i++)
        if (old[i].w) {
            size_t j = hash(old[i].w) & (cap - 1);
            while (table[j].w) j = (j + 1) & (cap - 1);
            table[j] = old[i];
            used++;
        }
    free(old);
}

static int by_count(const void *a, const void *b) {
    const struct word *x = a, *y = b;
    if (x->n != y->n) return y->n > x->n ? 1 : -1;
    return strcmp(x->w, y->w);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: wordfreq INPUT [OUTPUT]\n"); return 2; }
    FILE *in = fopen(argv[1], "r");
    if (!in) { perror(argv[1]); return 1; }
    table = calloc(cap, sizeof *table);
    char w[128];
    size_t len = 0;
    long words = 0;
    int c;
    while ((c = fgetc(in)) != EOF) {
        if (isalnum(c) && len + 1 < sizeof w) {
            w[len++] = (char)tolower(c);
        } else if (len) {
            w[len] = 0; add(w); len = 0; words++;
        }
    }
    if (len) { w[len] = 0; add(w); words++; }
    fclose(in);
    struct word *list = malloc(used * sizeof *list);
    size_t k = 0;
    for (size_t i = 0; i < cap; i++) if (table[i].w) list[k++] = table[i];
    qsort(list, k, sizeof *list, by_count);
    FILE *out = fopen(argc > 2 ? argv[2] : "freq.txt", "w");
    if (!out) { perror("output"); return 1; }
    for (size_t i = 0; i < k; i++) fprintf(out, "%ld %s\n", list[i].n, list[i].w);
    fclose(out);
    printf("%ld words, %zu distinct\n", words, k);
    for (size_t i = 0; i < k && i < 5; i++) printf("%6ld %s\n", list[i].n, list[i].w);
    return 0;
}
