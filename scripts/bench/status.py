#!/usr/bin/env python3
"""What monitoring costs on a big source: the status view and wait() of 0.2 against 0.1's status
computation (every source row hashed and joined to its sidecar row), side by side on one table.

    scripts/bench/status.py [--rows 1000000]

Builds bench_status.docs with N rows and an in-step sidecar written directly (constant vectors, no
HNSW index: the cost measured here is the scan and the hash, not the index), then times each
query several times and prints the median and the ratio."""
import argparse
import statistics
import time

import psycopg

# 0.1.0's embed_sidecar._status body for this table (sql/sidecar.sql at 0.1.0): the per-call cost
# the status view and every 20 ms poll of wait() paid.
OLD_STATUS = """
SELECT count(*), count(sc.content_hash),
       count(*) FILTER (WHERE sc.content_hash IS NULL AND NOT embed_sidecar._is_blank(src.body::text)),
       count(*) FILTER (WHERE sc.content_hash IS NOT NULL AND (embed_sidecar._is_blank(src.body::text)
                         OR sc.content_hash <> sha256(convert_to(src.body::text, 'UTF8')) OR sc.model <> %s)),
       round(count(*) FILTER (WHERE sc.embedded_at > now() - interval '1 minute') / 60.0, 1)
  FROM bench_status.docs src LEFT JOIN bench_status.docs_embeddings sc ON sc.id = src.id"""


def timed(conn, sql, params=None, runs=5):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        conn.execute(sql, params).fetchall()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dsn", default="dbname=postgres")
    args = ap.parse_args()
    conn = psycopg.connect(args.dsn, autocommit=True)
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_embed_sidecar CASCADE")
    have = conn.execute("SELECT reltuples FROM embed_sidecar.sources s JOIN pg_class c ON c.oid = s.source "
                        "WHERE s.source = to_regclass('bench_status.docs')").fetchone()
    if not have or have[0] != args.rows:  # built once, reused by later runs
        print(f"building bench_status.docs with {args.rows} rows and its sidecar ...", flush=True)
        conn.execute("DROP SCHEMA IF EXISTS bench_status CASCADE")
        conn.execute("CREATE SCHEMA bench_status")
        conn.execute("CREATE TABLE bench_status.docs (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO bench_status.docs SELECT i, 'status benchmark row ' || i || ' with a few more words' "
                     "FROM generate_series(1, %s) i", (args.rows,))
        conn.execute("SELECT embed_sidecar.watch('bench_status.docs', 'body', backfill => false)")
        for idx in conn.execute("SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = "
                                "'bench_status.docs_embeddings'::regclass AND NOT indisprimary").fetchall():
            conn.execute(f"DROP INDEX {idx[0]}")
        conn.execute("""INSERT INTO bench_status.docs_embeddings (id, embedding, model, content_hash)
                        SELECT d.id, array_fill(0.05::real, ARRAY[384])::vector, s.model_id,
                               sha256(convert_to(d.body, 'UTF8'))
                          FROM bench_status.docs d, embed_sidecar.sources s
                         WHERE s.source = 'bench_status.docs'::regclass""")
        conn.execute("VACUUM ANALYZE bench_status.docs, bench_status.docs_embeddings")
    model_id = conn.execute("SELECT model_id FROM embed_sidecar.sources WHERE source = 'bench_status.docs'::regclass").fetchone()[0]
    old = timed(conn, OLD_STATUS, (model_id,), runs=3)
    status = timed(conn, "SELECT * FROM embed_sidecar.status WHERE source = 'bench_status.docs'::regclass")
    wait = timed(conn, "SELECT embed_sidecar.wait('bench_status.docs', '0 s')")
    verify = timed(conn, "SELECT * FROM embed_sidecar.verify('bench_status.docs')", runs=3)
    print(f"rows: {args.rows}")
    print(f"{'query':<34}{'median ms':>12}{'vs 0.1 status':>16}")
    for name, t in [("0.1 status (hash every row)", old), ("status view", status), ("wait() one poll", wait),
                    ("verify() (full check, on demand)", verify)]:
        print(f"{name:<34}{t * 1000:>12.2f}{old / t:>15.2f}x")


if __name__ == "__main__":
    main()
