#!/usr/bin/env python3
"""Search-quality evaluation on the Debian corpus (needs all packages loaded and embedded:
`bash scripts/demo.sh --rows all`).

Query = a package's synopsis; relevant document = that package's long description (the embedded
content). Packages whose long descriptions are identical (e.g. a library and its -dev package)
cannot be told apart by content, so any of them counts as the hit. A fixed sample of queries
(md5 order of the name) is run through full text alone, vectors alone and hybrid (RRF)."""
import argparse
import hashlib
import time
from collections import defaultdict

import psycopg

METHODS = {
    "full text (ts_rank, OR of words)": """
        SELECT sc.name FROM packages_embeddings sc, embed_sidecar.any_words_tsquery('english', %s) tq
         WHERE sc.fts @@ tq ORDER BY ts_rank(sc.fts, tq, 1) DESC, sc.name LIMIT 10""",
    "vector (HNSW, cosine)": "SELECT key->>0 FROM embed_sidecar.search('packages', %s, 10) ORDER BY distance",
    "hybrid (RRF, k=60, 100 candidates each)":
        "SELECT key->>0 FROM embed_sidecar.hybrid_search('packages', %s, 10) ORDER BY score DESC",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dsn", default="dbname=postgres")
    args = ap.parse_args()
    conn = psycopg.connect(args.dsn, autocommit=True)
    docs, embedded = conn.execute("SELECT count(*), (SELECT count(*) FROM packages_embeddings) FROM packages").fetchone()
    by_text = defaultdict(set)
    desc_of = {}
    for name, desc in conn.execute("SELECT name, description FROM packages"):
        h = hashlib.sha256((desc or "").encode()).hexdigest()
        by_text[h].add(name)
        desc_of[name] = h
    sample = conn.execute("""SELECT p.name, p.synopsis FROM packages p JOIN packages_embeddings e USING (name)
                              WHERE p.synopsis <> '' ORDER BY md5(p.name) LIMIT %s""", (args.queries,)).fetchall()
    print(f"# search quality — {time.strftime('%Y-%m-%d')}: {len(sample)} queries over {embedded} embedded of "
          f"{docs} Debian packages (query = synopsis, relevant = the package's long description)\n")
    print("| method | recall@1 | recall@10 | MRR@10 | ms/query |")
    print("|---|---:|---:|---:|---:|")
    for label, sql in METHODS.items():
        r1 = r10 = mrr = 0.0
        t0 = time.time()
        for name, synopsis in sample:
            relevant = by_text[desc_of[name]]
            got = [r[0] for r in conn.execute(sql, (synopsis,))]
            rank = next((i + 1 for i, n in enumerate(got) if n in relevant), None)
            if rank:
                r1 += rank == 1
                r10 += 1
                mrr += 1 / rank
        n = len(sample)
        ms = (time.time() - t0) / n * 1000
        print(f"| {label} | {r1 / n:.3f} | {r10 / n:.3f} | {mrr / n:.3f} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
