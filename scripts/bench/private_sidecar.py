#!/usr/bin/env python3
"""What the sidecar's privacy costs a search: the same queries through search() and hybrid_search()
as the table's owner (row security does not apply to owners) and as a reader with SELECT on the
table (the sidecar's policy looks each candidate's source row up as the reader), side by side in
one run on the demo's packages table, with the ratio.

    scripts/demo/demo.sh (once), then scripts/bench/private_sidecar.py [--runs 30]

The owner here is the superuser that ran the demo, which bypasses row security like any owner."""
import argparse
import statistics
import time

import psycopg

QUERIES = ["play chess against the computer", "watch network traffic and bandwidth per process",
           "read electronic books in a terminal", "compress files quickly", "edit images from the command line"]
READER = "pes_bench_reader"


def timed(conn, sql, runs):
    times = []
    for i in range(runs):
        q = QUERIES[i % len(QUERIES)]
        t0 = time.perf_counter()
        rows = conn.execute(sql, (q,)).fetchall()
        times.append(time.perf_counter() - t0)
        assert len(rows) == 10, (sql, q, len(rows))
    return statistics.median(times) * 1000, sorted(times)[int(len(times) * 0.9)] * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--dsn", default="dbname=postgres")
    args = ap.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f"DROP ROLE IF EXISTS {READER}")
        admin.execute(f"CREATE ROLE {READER} LOGIN")
        admin.execute(f"GRANT SELECT ON packages TO {READER}")
        admin.execute(f"GRANT EXECUTE ON FUNCTION embed_sidecar.search(regclass, text, int, text) TO {READER}")
        rows = admin.execute("SELECT count(*) FROM packages_embeddings").fetchone()[0]
    try:
        print(f"packages: {rows} vectors; {args.runs} searches of k = 10 each way (median / p90 ms)")
        print(f"{'query':<16} {'owner':>16} {'reader':>16} {'reader/owner':>13}")
        for name, sql in (("search", "SELECT * FROM embed_sidecar.search('packages', %s, 10)"),
                          ("hybrid_search", "SELECT * FROM embed_sidecar.hybrid_search('packages', %s, 10)")):
            with psycopg.connect(args.dsn, autocommit=True) as owner, \
                    psycopg.connect(args.dsn, autocommit=True, user=READER) as reader:
                timed(owner, sql, 3), timed(reader, sql, 3)  # warm up: model, caches
                o = timed(owner, sql, args.runs)
                r = timed(reader, sql, args.runs)
            print(f"{name:<16} {o[0]:>7.1f} / {o[1]:>6.1f} {r[0]:>7.1f} / {r[1]:>6.1f} {r[0] / o[0]:>12.2f}x")
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {READER}")
            admin.execute(f"DROP ROLE {READER}")


if __name__ == "__main__":
    main()
