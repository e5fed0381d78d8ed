#!/usr/bin/env python3
"""Search-quality evaluation on the Debian corpus (needs all packages loaded and embedded:
`bash scripts/demo/demo.sh --rows all`).

Query = a package's synopsis; relevant document = that package's long description (the embedded
content). Packages whose long descriptions are identical (e.g. a library and its -dev package)
cannot be told apart by content, so any of them counts as the hit. A fixed sample of queries
(md5 order of the name) is run through full text alone, vectors alone and hybrid (RRF).

--ab MODEL compares the watched model with MODEL on the same corpus: it switches the
packages' embedding to MODEL with set_model() while a reader keeps searching (switch time, search
latency and errors during the switch), evaluates, rolls back to the first model, evaluates again,
and drops MODEL's sidecar, so the demo's table ends as it started."""
import argparse
import os
import sys
import statistics
import threading
import time

import psycopg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for shared/
from shared.relevance import queries  # noqa: E402

METHODS = {
    "full text (ts_rank, OR of words)": """
        SELECT sc.name FROM {sidecar} sc, embed_sidecar.any_words_tsquery('english', %s) tq
         WHERE sc.fts @@ tq ORDER BY ts_rank(sc.fts, tq, 1) DESC, sc.name LIMIT 10""",
    "vector (HNSW, cosine)": "SELECT key->>0 FROM embed_sidecar.search('packages', %s, 10) ORDER BY distance",
    "hybrid (RRF, k=60, 100 candidates each)":
        "SELECT key->>0 FROM embed_sidecar.hybrid_search('packages', %s, 10) ORDER BY score DESC",
}


def evaluate(conn, sample, by_text, desc_of, methods, tag=""):
    for label, sql in methods.items():
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
        print(f"| {label}{tag} | {r1 / n:.3f} | {r10 / n:.3f} | {mrr / n:.3f} | {ms:.1f} |", flush=True)


def searching(dsn, queries, stop, out):
    """A reader during the switch: latency of each search, and how many failed or came back short."""
    with psycopg.connect(dsn, autocommit=True) as c:
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                n = len(c.execute("SELECT * FROM embed_sidecar.search('packages', %s, 10)", (queries[i % len(queries)],)).fetchall())
                out["ms"].append((time.perf_counter() - t0) * 1000)
                out["short"] += n < 10
            except psycopg.Error:
                out["errors"] += 1
            i += 1


def current_model(conn):
    return conn.execute("SELECT model FROM embed_sidecar.sources WHERE source = 'packages'::regclass AND role = 'current'").fetchone()[0]


def switch(conn, dsn, model, queries):
    stats = {"ms": [], "short": 0, "errors": 0}
    stop = threading.Event()
    reader = threading.Thread(target=searching, args=(dsn, queries, stop, stats))
    reader.start()
    time.sleep(2)
    idle = list(stats["ms"])
    t0 = time.time()
    rows = conn.execute("SELECT embed_sidecar.set_model('packages', %s)", (model,)).fetchone()[0]
    while conn.execute("SELECT 1 FROM embed_sidecar.sources WHERE source = 'packages'::regclass AND role = 'shadow'").fetchone():
        time.sleep(0.2)
    took = time.time() - t0
    stop.set()
    reader.join()
    during = stats["ms"][len(idle):]
    p = lambda xs, q: statistics.quantiles(xs, n=100)[q - 1] if len(xs) >= 2 else float("nan")
    print(f"switch to {model}: {rows} rows in {took:.1f} s ({rows / took:.0f} rows/s); searches meanwhile: "
          f"{len(during)}, errors {stats['errors']}, short or empty {stats['short']}, "
          f"p50 {p(during, 50):.1f} ms / p95 {p(during, 95):.1f} ms (idle p50 {p(idle, 50):.1f} / p95 {p(idle, 95):.1f})\n",
          flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dsn", default="dbname=postgres")
    ap.add_argument("--ab", metavar="MODEL", help="also evaluate MODEL, switched in and rolled back (see above)")
    args = ap.parse_args()
    conn = psycopg.connect(args.dsn, autocommit=True)
    sidecar = conn.execute("""SELECT sidecar::text FROM embed_sidecar.sources
                               WHERE source = 'packages'::regclass AND role = 'current'""").fetchone()[0]
    methods = {label: sql.replace("{sidecar}", sidecar) for label, sql in METHODS.items()}
    docs, embedded = conn.execute(f"SELECT count(*), (SELECT count(*) FROM {sidecar}) FROM packages").fetchone()
    by_text, desc_of, sample = queries(conn, sidecar, args.queries)
    print(f"# search quality — {time.strftime('%Y-%m-%d')}: {len(sample)} queries over {embedded} embedded of "
          f"{docs} Debian packages (query = synopsis, relevant = the package's long description)\n")
    first = current_model(conn)
    if args.ab:
        switch(conn, args.dsn, args.ab, [q for _, q in sample[:200]])
    print("| method | recall@1 | recall@10 | MRR@10 | ms/query |")
    print("|---|---:|---:|---:|---:|")
    full_text, *by_vector = methods.items()
    evaluate(conn, sample, by_text, desc_of, dict([full_text]))
    evaluate(conn, sample, by_text, desc_of, dict(by_vector), f" — {current_model(conn)}")
    if args.ab:
        conn.execute("SELECT embed_sidecar.rollback_model('packages')")
        evaluate(conn, sample, by_text, desc_of, dict(by_vector), f" — {first}")
        conn.execute("SELECT embed_sidecar.drop_previous('packages')")


if __name__ == "__main__":
    main()
