#!/usr/bin/env python3
"""The main demo: real Debian package descriptions → watched table → background worker embeds them
inside PostgreSQL → semantic and hybrid search. Safe to re-run."""
import argparse
import os
import subprocess
import sys
import time

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
QUERIES = [
    "resize and convert images from the command line",
    "play chess against the computer",
    "encrypted incremental backups to a remote server",
    "watch network traffic and bandwidth per process",
    "read electronic books in a terminal",
]


def bar(done, total, rate, eta, width=32):
    filled = int(width * done / total) if total else width
    return (f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} embedded"
            f"  {rate:6.1f} rows/s  ETA {eta:5.0f}s ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2000", help="packages to load (default 2000; 'all' for ~64k)")
    ap.add_argument("--dsn", default="dbname=postgres")
    args = ap.parse_args()

    print(f"== loading {args.rows} Debian package descriptions")
    subprocess.run([sys.executable, os.path.join(HERE, "load_debian.py"), "--rows", args.rows, "--dsn", args.dsn], check=True)
    conn = psycopg.connect(args.dsn, autocommit=True)
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_embed_sidecar CASCADE")
    watched = conn.execute("SELECT 1 FROM embed_sidecar.sources WHERE source = 'packages'::regclass").fetchone()
    if watched:
        print("== packages already watched: the worker picks up whatever changed")
    else:
        print("== watch: sidecar table, triggers, queue, backfill")
        side = conn.execute("SELECT embed_sidecar.watch('packages', 'description')::text").fetchone()[0]
        print(f"  created {side}; the background worker drains the queue")

    total = conn.execute("SELECT count(*) FROM packages WHERE NOT embed_sidecar._is_blank(description)").fetchone()[0]
    start = time.time()
    last_line = 0.0
    first = conn.execute("SELECT count(*) FROM packages_embeddings").fetchone()[0]
    while True:
        done = conn.execute("SELECT count(*) FROM packages_embeddings").fetchone()[0]
        pending = conn.execute("SELECT pending FROM embed_sidecar.status WHERE source = 'packages'::regclass").fetchone()[0]
        elapsed = time.time() - start
        rate = (done - first) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        if sys.stdout.isatty():
            sys.stdout.write(bar(done, total, rate, eta))
            sys.stdout.flush()
        elif time.time() - last_line >= 5:  # a log, not a terminal: one line every 5 s
            print(bar(done, total, rate, eta).strip())
            last_line = time.time()
        if pending == 0 and conn.execute("SELECT embed_sidecar.wait('packages', '0 s')").fetchone()[0]:
            break
        time.sleep(0.5)
    print(f"\n  in step: {done} vectors for {total} rows in {time.time() - start:.1f}s")

    for q in QUERIES:
        print(f"\n== {q!r}")
        sem = conn.execute("""SELECT p.name, p.synopsis, r.distance FROM embed_sidecar.search('packages', %s, 5) r
                               JOIN packages p ON p.name = r.key->>0 ORDER BY r.distance""", (q,)).fetchall()
        hyb = conn.execute("""SELECT p.name, p.synopsis, r.score FROM embed_sidecar.hybrid_search('packages', %s, 5) r
                               JOIN packages p ON p.name = r.key->>0 ORDER BY r.score DESC""", (q,)).fetchall()
        print("  semantic (cosine distance)")
        for name, synopsis, d in sem:
            print(f"    {d:.3f}  {name}: {synopsis}"[:110])
        print("  hybrid (reciprocal rank fusion of vector and full-text ranks)")
        for name, synopsis, score in hyb:
            print(f"    {score:.4f} {name}: {synopsis}"[:110])
    conn.close()


if __name__ == "__main__":
    main()
