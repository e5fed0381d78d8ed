#!/usr/bin/env python3
"""The bulk path: a backfill with the HNSW index maintained row by row against one that
builds it once at the end (pg_embed_sidecar.bulk_index_rows), side by side in one run, on the same
synthetic short rows ('backfill row N about <md5>', ~35 tokens) drained by the worker. Time runs
from watch() until every row has its vector and the index exists. Also: embed_texts() on the same
texts, the inference ceiling through SQL.

Usage: scripts/bench/bulk_index.py [--rows N] (in a database pes_bench_bulk, created afresh)"""
import argparse
import time

import psycopg


def run(c, rows, threshold):
    c.execute("DROP TABLE IF EXISTS bench_bulk CASCADE")
    c.execute("CREATE TABLE bench_bulk (id int PRIMARY KEY, body text)")
    c.execute("INSERT INTO bench_bulk SELECT i, 'backfill row ' || i || ' about ' || md5(i::text) FROM generate_series(1, %s) i",
              (rows,))
    c.execute("SET pg_embed_sidecar.bulk_index_rows = %s" % int(threshold))
    t0 = time.time()
    c.execute("SELECT embed_sidecar.watch('bench_bulk', 'body')")
    assert c.execute("SELECT embed_sidecar.wait('bench_bulk', '60 min')").fetchone()[0]
    drained = time.time() - t0
    while c.execute("SELECT index_pending FROM embed_sidecar.sources WHERE source = 'bench_bulk'::regclass").fetchone()[0]:
        time.sleep(0.05)
    took = time.time() - t0
    index = c.execute("SELECT pg_relation_size(format('%I.%I', schemaname, indexname)::regclass) FROM pg_indexes "
                      "WHERE tablename = 'bench_bulk_embeddings' AND indexdef LIKE '%USING hnsw%'").fetchone()[0]
    bad = c.execute("SELECT missing + stale + orphans FROM embed_sidecar.verify('bench_bulk')").fetchone()[0]
    c.execute("SELECT embed_sidecar.unwatch('bench_bulk', true)")
    return drained, took, index, bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64000)
    args = ap.parse_args()
    with psycopg.connect(dbname="postgres", autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS pes_bench_bulk WITH (FORCE)")
        c.execute("CREATE DATABASE pes_bench_bulk")
    with psycopg.connect(dbname="pes_bench_bulk", autocommit=True) as c:
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        texts = [r[0] for r in c.execute("SELECT 'backfill row ' || i || ' about ' || md5(i::text) FROM generate_series(1, 4096) i")]
        t0 = time.time()
        for i in range(0, len(texts), 256):
            c.execute("SELECT count(*) FROM embed_sidecar._embed_many(%s)", (texts[i:i + 256],))
        ceiling = len(texts) / (time.time() - t0)
        print(f"# bulk path — {time.strftime('%Y-%m-%d')}: {args.rows} short rows backfilled by the worker\n")
        print("| HNSW index | rows embedded after | index ready after | rows/s | / ceiling | index size | verify |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, threshold in [("maintained row by row", 0), ("built once at the end", 1)]:
            drained, took, index, bad = run(c, args.rows, threshold)
            print(f"| {label} | {drained:.1f} s | {took:.1f} s | {args.rows / took:.1f} | {args.rows / took / ceiling:.2f}× | "
                  f"{index / 2**20:.1f} MiB | {bad} wrong |", flush=True)
        print(f"\nceiling: embed_texts() over 4,096 of the same texts, 256 per call: {ceiling:.1f} rows/s")
    with psycopg.connect(dbname="postgres", autocommit=True) as c:
        c.execute("DROP DATABASE pes_bench_bulk WITH (FORCE)")


if __name__ == "__main__":
    main()
