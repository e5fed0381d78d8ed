#!/usr/bin/env python3
"""halfvec against vector storage, on the demo's embedded Debian packages (needs
`bash scripts/demo/demo.sh --rows all`). The same vectors are stored both ways, in two scratch copies
of the sidecar built side by side: build time and size of each HNSW index, size of the vectors,
and search quality with the same query vectors (query = a package's synopsis, relevant = every
package with that long description, as scripts/eval/quality.py), plus how many of the 10 results agree."""
import argparse
import time

import psycopg

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for shared/
from shared.relevance import queries  # noqa: E402  (the same queries and relevance as quality.py)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dsn", default="dbname=postgres")
    args = ap.parse_args()
    conn = psycopg.connect(args.dsn, autocommit=True)
    sidecar, model = conn.execute("""SELECT sidecar::text, model FROM embed_sidecar.sources
                                      WHERE source = 'packages'::regclass AND role = 'current'""").fetchone()
    dims = conn.execute(f"SELECT vector_dims(embedding) FROM {sidecar} LIMIT 1").fetchone()[0]
    conn.execute("SET maintenance_work_mem = '1GB'")
    stats = {}
    for kind in ("vector", "halfvec"):
        conn.execute(f"DROP TABLE IF EXISTS eval_{kind}")
        conn.execute(f"CREATE TABLE eval_{kind} AS SELECT name, embedding::{kind}({dims}) AS embedding FROM {sidecar}")
        t0 = time.time()
        conn.execute(f"CREATE INDEX eval_{kind}_hnsw ON eval_{kind} USING hnsw (embedding {kind}_cosine_ops)")
        build = time.time() - t0
        rows, data = conn.execute(f"SELECT count(*), sum(pg_column_size(embedding)) FROM eval_{kind}").fetchone()
        stats[kind] = (rows, build, data, conn.execute(f"SELECT pg_relation_size('eval_{kind}_hnsw')").fetchone()[0])

    by_text, desc_of, sample = queries(conn, sidecar, args.queries)
    score = {k: [0.0, 0.0, 0.0] for k in stats}
    agree = 0
    for name, synopsis in sample:
        q = conn.execute("SELECT embed_sidecar._embed_with(%s, %s)", (model, synopsis)).fetchone()[0]
        got = {}
        for kind in stats:
            got[kind] = [r[0] for r in conn.execute(
                f"SELECT name FROM eval_{kind} ORDER BY embedding <=> %s::{kind} LIMIT 10", (q,))]
            rank = next((i + 1 for i, n in enumerate(got[kind]) if n in by_text[desc_of[name]]), None)
            if rank:
                score[kind][0] += rank == 1
                score[kind][1] += 1
                score[kind][2] += 1 / rank
        agree += len(set(got["vector"]) & set(got["halfvec"]))
    n = len(sample)
    print(f"# halfvec vs vector — {time.strftime('%Y-%m-%d')}: {stats['vector'][0]} vectors of {dims} dimensions "
          f"({model}), {n} queries, HNSW m=16 ef_construction=64, ef_search 40\n")
    print("| storage | HNSW build | index size | vector data | recall@1 | recall@10 | MRR@10 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, (rows, build, data, index) in stats.items():
        r1, r10, mrr = (x / n for x in score[kind])
        print(f"| {kind} | {build:.1f} s | {index / 2**20:.1f} MiB | {data / 2**20:.1f} MiB | {r1:.3f} | {r10:.3f} | {mrr:.3f} |")
    print(f"\nresults in common between the two top-10 lists: {agree / n / 10:.1%}")
    for kind in stats:
        conn.execute(f"DROP TABLE eval_{kind}")


if __name__ == "__main__":
    main()
