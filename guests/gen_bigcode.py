#!/usr/bin/env python3
"""Generate `bigcode`: a large but ordinary C program (a big guest for start-up figures).

    gen_bigcode.py OUTDIR [FUNCTIONS] [PARTS]

writes OUTDIR/bigcode_N.c (PARTS translation units holding FUNCTIONS distinct functions,
each a few dozen steps of 32-bit integer work: multiply-adds, shifts, rotations, table
lookups, branches, short loops and a switch), OUTDIR/bigcode_main.c (a table of pointers
to every function, so none is inlined or dropped, and a main that threads one value
through all of them, twice), and OUTDIR/bigcode.expected: the line the program prints,
computed here by evaluating the same steps, so a run's output can be checked exactly.

The generator is deterministic (a fixed seed): the same arguments give the same files.
"""

import os
import random
import sys

M = 0xFFFFFFFF
TABLES = 8


def rotl(x, r):
    return ((x << r) | (x >> (32 - r))) & M


def gen_function(rng):
    """One function: a list of steps, as (C text, Python evaluator) pairs."""
    steps = []
    for _ in range(rng.randint(28, 40)):
        # Weighted towards the steps clang compiles quickest per byte (generation < 1 min).
        kind = rng.choice((0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 6, 6, 6))
        k = rng.getrandbits(32) | 1
        c = rng.getrandbits(32)
        if kind == 0:
            steps.append((f"x = x * {k}u + {c}u;", lambda x, y, t, k=k, c=c: ((x * k + c) & M, y)))
        elif kind == 1:
            s = rng.randint(5, 19)
            steps.append((f"x ^= x >> {s};", lambda x, y, t, s=s: (x ^ (x >> s), y)))
        elif kind == 2:
            r = rng.randint(1, 31)
            steps.append(
                (f"x = (x << {r}) | (x >> {32 - r}); y += x ^ {c}u;",
                 lambda x, y, t, r=r, c=c: (rotl(x, r), (y + (rotl(x, r) ^ c)) & M)))
        elif kind == 3:
            ti = rng.randrange(TABLES)
            steps.append(
                (f"x ^= T{ti}[(x ^ y) & 255]; y = y * 5u + 1u;",
                 lambda x, y, t, ti=ti: (x ^ t[ti][(x ^ y) & 255], (y * 5 + 1) & M)))
        elif kind == 4:
            m = rng.getrandbits(32)
            steps.append(
                (f"if ((x & {m}u) > (y & {m}u)) x += y ^ {c}u; else y ^= x + {k}u;",
                 lambda x, y, t, m=m, c=c, k=k:
                 ((x + (y ^ c)) & M, y) if (x & m) > (y & m) else (x, y ^ ((x + k) & M))))
        elif kind == 5:
            def loop(x, y, t, k=k):
                for i in range((y & 3) + 1):
                    x = (x * 3 + y + i) & M
                    y = (y ^ (x >> 7)) * k & M
                return x, y
            # A loop run 1 to 4 times as the data says: a real loop, not unrolled away.
            steps.append(
                (f"for (uint32_t i = 0, n = (y & 3u) + 1u; i < n; i++) {{ x = x * 3u + y + i; y = (y ^ (x >> 7)) * {k}u; }}",
                 loop))
        else:
            cs = [rng.getrandbits(32) for _ in range(4)]

            def sw(x, y, t, cs=cs):
                v = (x >> 3) & 3
                if v == 0:
                    return (x + cs[0]) & M, y
                if v == 1:
                    return x ^ cs[1], (y + x) & M
                if v == 2:
                    return (x * cs[2]) & M, y
                return x, (y - cs[3]) & M
            steps.append(
                (f"switch ((x >> 3) & 3u) {{ case 0: x += {cs[0]}u; break; "
                 f"case 1: y += x; x ^= {cs[1]}u; break; case 2: x *= {cs[2]}u; break; "
                 f"default: y -= {cs[3]}u; }}",
                 sw))
    return steps


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 24000
    parts = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    rng = random.Random(0x7A4D3E)
    tables = [[rng.getrandbits(32) for _ in range(256)] for _ in range(TABLES)]
    os.makedirs(out, exist_ok=True)
    # The tables are defined once (part 0) and declared in every part.
    decls = "#include <stdint.h>\n" + "".join(f"extern const uint32_t T{i}[256];\n" for i in range(TABLES))
    defs = "".join(
        f"const uint32_t T{i}[256] = {{" + ",".join(f"{v}u" for v in tab) + "};\n"
        for i, tab in enumerate(tables))
    funcs = [gen_function(rng) for _ in range(n)]
    per = (n + parts - 1) // parts
    for p in range(parts):
        lines = [decls]
        if p == 0:
            lines.append(defs)
        for i in range(p * per, min(n, (p + 1) * per)):
            lines.append(f"uint32_t f{i}(uint32_t x, uint32_t y) {{")
            lines.extend("    " + s for s, _ in funcs[i])
            lines.append("    return x ^ (y * 2654435761u);\n}")
        with open(os.path.join(out, f"bigcode_{p}.c"), "w") as f:
            f.write("\n".join(lines) + "\n")
    mainc = ["#include <stdint.h>", "#include <stdio.h>",
             "typedef uint32_t (*step_fn)(uint32_t, uint32_t);"]
    mainc.extend(f"uint32_t f{i}(uint32_t, uint32_t);" for i in range(n))
    mainc.append("static step_fn const FNS[] = {")
    mainc.extend(f"    f{i}," for i in range(n))
    mainc.append("};")
    mainc.append(f"""
int main(void) {{
    uint32_t acc = 2166136261u;
    for (uint32_t round = 0; round < 2u; round++)
        for (uint32_t i = 0; i < {n}u; i++)
            acc = FNS[i](acc ^ i, i * 40503u + round);
    printf("bigcode: functions={n} checksum=%08x\\n", (unsigned)acc);
    return 0;
}}""")
    with open(os.path.join(out, "bigcode_main.c"), "w") as f:
        f.write("\n".join(mainc) + "\n")
    acc = 2166136261
    for rnd in range(2):
        for i in range(n):
            x, y = acc ^ i, (i * 40503 + rnd) & M
            for _, ev in funcs[i]:
                x, y = ev(x, y, tables)
            acc = x ^ ((y * 2654435761) & M)
    with open(os.path.join(out, "bigcode.expected"), "w") as f:
        f.write(f"bigcode: functions={n} checksum={acc:08x}\n")


if __name__ == "__main__":
    main()
