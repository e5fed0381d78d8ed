#!/usr/bin/env python3
"""Single-row INSERT latency into a watched table, plain (the change waits for the drain) against
watch(..., sync => true) (the change is embedded inside the writer's transaction when the
inference service has room), side by side in one run, plus the ratio. Autocommit: each INSERT is
its own transaction, so the sync figure includes the embedding and the sidecar write. Also the
share of sync inserts that were embedded in the transaction (the rest fell back to the queue),
and a second sync row for texts near the byte bound (src/drain/sync.rs, SYNC_MAX_BYTES).

    scripts/bench/sync_insert.py [--dsn dbname=postgres] [--rows 200]

Needs the cluster of scripts/cluster.sh (library preloaded: the inference service runs). Prints
markdown."""
import argparse
import statistics
import time

import psycopg

WORDS = ("the night train to the coast was late again, and the tea in the dining car had gone cold; "
         "a cat slept on the warm windowsill while the old clock in the hall struck noon; "
         "rivers carry silt to their deltas, where the water slows and the land grows").split()


def text(i, words):
    """A realistic short text: a sentence or two of ordinary words, different each time."""
    return f"note {i}: " + " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))


def run(dsn, sync, rows, words):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS bench_sync_insert CASCADE")
        c.execute("CREATE TABLE bench_sync_insert (id int PRIMARY KEY, body text)")
        side = c.execute("SELECT embed_sidecar.watch('bench_sync_insert', 'body', sync => %s)::text", (sync,)).fetchone()[0]
        c.execute("SELECT embed_text('warm-up')")
        for i in range(5):  # warm the trigger's plans and the service
            c.execute("INSERT INTO bench_sync_insert VALUES (%s, %s)", (-1 - i, text(i, words)))
        latencies, inside = [], 0
        for i in range(rows):
            body = text(i, words)
            t0 = time.perf_counter()
            c.execute("INSERT INTO bench_sync_insert VALUES (%s, %s)", (i, body))
            latencies.append((time.perf_counter() - t0) * 1000)
            # embedded in the writer's transaction: the vector is there the moment INSERT returns
            # (the drain, woken by the commit, takes longer than this SELECT)
            inside += c.execute(f"SELECT count(*) FROM {side} WHERE id = %s", (i,)).fetchone()[0]
        c.execute("SELECT embed_sidecar.wait('bench_sync_insert', '2 min')")
        c.execute("SELECT embed_sidecar.unwatch('bench_sync_insert', true)")
        c.execute("DROP TABLE bench_sync_insert")
    latencies.sort()
    return (statistics.median(latencies), latencies[int(len(latencies) * 0.95) - 1], inside / rows,
            len(text(0, words).encode()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default="dbname=postgres")
    ap.add_argument("--rows", type=int, default=200)
    args = ap.parse_args()
    plain = run(args.dsn, False, args.rows, 20)
    sync = run(args.dsn, True, args.rows, 20)
    near = run(args.dsn, True, args.rows // 2, 380)
    print(f"Single-row INSERT, autocommit, {args.rows} rows\n")
    print("| watch | text bytes | p50 ms | p95 ms | embedded in the transaction |")
    print("|---|---:|---:|---:|---:|")
    for name, (p50, p95, share, size) in (("plain", plain), ("sync => true", sync), ("sync => true, long text", near)):
        print(f"| {name} | {size} | {p50:.2f} | {p95:.2f} | {share:.0%} |")
    print(f"\nsync / plain: p50 {sync[0] / plain[0]:.1f}x, p95 {sync[1] / plain[1]:.1f}x")


if __name__ == "__main__":
    main()
