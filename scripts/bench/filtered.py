#!/usr/bin/env python3
"""Filtered vector search: rows returned, overlap with the exact filtered top-k, and latency, at
selectivities from 100% to 0.01%, printed as markdown tables.

Data: the demo's Debian packages (scripts/demo/load_debian.py) in a database pes_bench_filtered,
created afresh (kept afterwards: --reuse runs again on it without re-embedding, --drop drops it),
plus `tenant int` = a hash of the name mod 1000 (md5, so the same rows at every run), indexed,
as is section. Watched as the demo watches it (watch('packages', 'description')), with --model.

Filters: none (100%), tenant < 100 (10%), tenant < 10 (1%), tenant = 7 (0.1%), tenant = 7 AND
section = <tenant 7's most common section> (~0.01%), and section = 'python' (--section), each with
its actual number of matching rows (and of those with a vector: a blank description has none).

Queries: a fixed list of 50 realistic search phrases (QUERIES below, written for this benchmark,
none copied from a package); --queries above 50 tops them up with synopses of packages of tenants
>= 100 (outside every tenant filter).

Exact filtered top-k: every (name, vector) of the sidecar (its current model's) and each filter's
matching names, fetched once; cosine distances brute-forced in numpy. A returned row whose exact
distance ties the k-th exact one counts as a hit (identical descriptions, e.g. a library and its
-dev package, have identical vectors, and either is a correct k-th row).

Methods, each per query: overlap@k = |returned ∩ exact| / min(k, matching rows with a vector)
(1 when that is 0 and nothing came back), rows returned, latency (client-side, execute + fetch):
  search()          embed_sidecar.search('packages', q, k, filter => f). Its time would include
                    embedding q: the backend's one-entry memo of the last text embedded is warmed
                    with embed_query(q) (untimed) right before each call, so the time is the
                    search's alone; texts_embedded() proves the memo was hit (printed). The
                    embedding's own cost, embed_query(q) uncached, is printed separately.
  view              SELECT v.name FROM packages_vectors v WHERE <f over (v.packages).col>
                    ORDER BY v.embedding <=> $1::vector LIMIT k; default settings
  view relaxed      the same after SET hnsw.iterative_scan = relaxed_order
  view strict       the same after SET hnsw.iterative_scan = strict_order
Every statement is planned with its parameter's value (no prepared statements); 2 untimed calls
warm each (filter, method) first. The plan column names the indexes the view query's plan uses.

Targets of the issue, for search() (printed as PASS/FAIL, never asserted; the view methods beside
it for comparison): every call returns min(k, matching) rows; mean overlap >= 0.95 at every
selectivity; p95 latency at 1% <= 2x the unfiltered p95.

search() ranks a filter's rows exactly when the planner expects at most
pg_embed_sidecar.exact_search_rows (10,000) of them, else walks the HNSW index iteratively (and
ranks exactly when that comes back short); its plan column says which. Below ~100k rows every
filter but none is ranked exactly: --set pg_embed_sidecar.exact_search_rows=0 measures the index
path at any size.

Usage: scripts/bench/filtered.py [--rows all] [--queries 50] [--k 10] [--model NAME] [--dsn DSN] [--section python]
                                 [--explain [FILE]] [--reuse] [--drop] [--set NAME=VALUE ...]
--explain writes EXPLAIN (ANALYZE, COSTS OFF) of one view query per method at 1% to FILE
(default: next to stdout's file when stdout is one, <it without extension>.explain.txt, else
./filtered.explain.txt). Needs the extension installed and the cluster running (scripts/cluster.sh).
"""
import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # scripts/, for shared/
from shared.db import connect  # noqa: E402

DB = "pes_bench_filtered"
TIE = 1e-5  # exact distances within this of the k-th exact one are ties

QUERIES = [
    "resize and convert images from the command line",
    "play chess against the computer",
    "encrypted incremental backups to a remote server",
    "watch network traffic and bandwidth per process",
    "read electronic books in a terminal",
    "parse JSON in Python",
    "HTTP client library with connection pooling",
    "spell checker dictionary for German",
    "monitor disk health with SMART",
    "PDF viewer with annotations",
    "synchronize files between two computers",
    "unit testing framework for C++",
    "manage virtual machines from the command line",
    "convert audio files to MP3",
    "font for programming with ligatures",
    "read and write Excel spreadsheets",
    "terminal multiplexer with split panes",
    "regular expression library compatible with Perl",
    "DNS server for a small network",
    "edit subtitles of a video",
    "compress files with high ratio",
    "Git graphical user interface",
    "scientific plotting library",
    "OCR text recognition from scanned images",
    "mail server with spam filtering",
    "secure shell client and server",
    "translate documentation into other languages",
    "Bluetooth audio headset support",
    "astronomy planetarium software",
    "LDAP directory access library",
    "benchmark CPU and memory performance",
    "fuzzy file finder for the shell",
    "YAML configuration file parser",
    "print server and printer drivers",
    "static site generator for blogs",
    "music notation and score editor",
    "password manager with encryption",
    "fast key-value database",
    "XML schema validation",
    "machine learning with neural networks",
    "remote desktop viewer",
    "firewall configuration tool",
    "geographic maps and GIS data",
    "bioinformatics sequence alignment",
    "game emulator for old consoles",
    "lint Python source code for style errors",
    "collect system metrics and draw graphs",
    "calendar and contacts synchronisation",
    "screen recording to a video file",
    "interactive debugger for compiled programs",
]

METHODS = [("search()", None), ("view", None), ("view relaxed", "relaxed_order"), ("view strict", "strict_order")]


def database_exists(dsn):
    with connect(dsn) as c:
        return c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)).fetchone() is not None


def load(dsn, db_dsn, rows, model):
    """Fresh database, the packages, tenant, indexes, watch(), until the drain and the HNSW index are done."""
    with connect(dsn) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    subprocess.run([sys.executable, os.path.join(HERE, "..", "demo", "load_debian.py"), "--rows", rows, "--dsn", db_dsn],
                   check=True)
    with connect(db_dsn) as c:
        c.execute("ALTER TABLE packages ADD COLUMN tenant int")
        # 28 bits of an md5 of the name: non-negative, the same every run, and not the md5(name)
        # load_debian.py samples --rows by (its N smallest), so a sample's tenants stay uniform
        c.execute("UPDATE packages SET tenant = ('x' || left(md5('tenant ' || name), 7))::bit(28)::int % 1000")
        c.execute("ALTER TABLE packages ALTER COLUMN tenant SET NOT NULL")
        c.execute("CREATE INDEX ON packages (tenant)")
        c.execute("CREATE INDEX ON packages (section)")
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        time.sleep(1.0)  # the launcher starts this database's worker
        t0 = time.time()
        # as scripts/demo/demo.py, with the model asked for (the search's plan does not depend on it)
        c.execute("SELECT embed_sidecar.watch('packages', 'description', model => %s)", (model,))
        total = c.execute("SELECT count(*) FROM packages WHERE NOT embed_sidecar._is_blank(description)").fetchone()[0]
        while not c.execute("SELECT embed_sidecar.wait('packages', '10 s')").fetchone()[0]:
            done, left = c.execute("""SELECT vectors_written, pending + bulk_pending FROM embed_sidecar.status
                                       WHERE source = 'packages'::regclass""").fetchone()
            print(f"  drain: {done}/{total} vectors written, {left} queued, {time.time() - t0:.0f} s", flush=True)
        while c.execute("SELECT bool_or(index_pending) FROM embed_sidecar.sources WHERE source = 'packages'::regclass").fetchone()[0]:
            time.sleep(0.2)
        print(f"  {total} rows embedded and indexed in {time.time() - t0:.1f} s")
        c.execute("ANALYZE")


def target(c):
    """The current embedding's sidecar, model id, and the view over it."""
    sidecar, model_id = c.execute("""SELECT sidecar::text, model_id FROM embed_sidecar.sources
                                      WHERE source = 'packages'::regclass AND role = 'current'""").fetchone()
    has_col = c.execute("""SELECT 1 FROM pg_attribute WHERE attrelid = 'embed_sidecar.sources'::regclass
                            AND attname = 'search_view' AND NOT attisdropped""").fetchone()
    view = None
    if has_col:
        view = c.execute("""SELECT search_view::text FROM embed_sidecar.sources
                             WHERE source = 'packages'::regclass AND role = 'current'""").fetchone()[0]
    if view is None and c.execute("SELECT to_regclass('packages_vectors')").fetchone()[0]:
        view = "packages_vectors"
    stand_in = view is None
    if stand_in:
        # this build makes no view: one with the same columns, for developing the benchmark
        c.execute(f"""CREATE VIEW packages_vectors AS SELECT sc.name, sc.embedding, p AS packages
                        FROM {sidecar} sc JOIN packages p USING (name) WHERE sc.model = {sql.quote(model_id)}""")
        view = "packages_vectors"
    return sidecar, model_id, view, stand_in


def filters(c, section):
    """(label, expression with {p} before each column) per selectivity."""
    common = c.execute("""SELECT section FROM packages WHERE tenant = 7 GROUP BY section
                           ORDER BY count(*) DESC, section LIMIT 1""").fetchone()
    out = [("100% (no filter)", None), ("10%: tenant < 100", "{p}tenant < 100"), ("1%: tenant < 10", "{p}tenant < 10"),
           ("0.1%: tenant = 7", "{p}tenant = 7")]
    if common:
        lit = sql.quote(common[0])
        out.append((f"~0.01%: tenant = 7 AND section = {lit}", f"{{p}}tenant = 7 AND {{p}}section = {lit}"))
    lit = sql.quote(section)
    out.append((f"section = {lit}", f"{{p}}section = {lit}"))
    return out


def expr(f, prefix):
    return f.replace("{p}", prefix) if f else None


def query_texts(c, n):
    texts = QUERIES[:n]
    if n > len(texts):
        texts += [r[0] for r in c.execute("""SELECT synopsis FROM packages WHERE tenant >= 100 AND synopsis <> ''
                                              ORDER BY md5(name) LIMIT %s""", (n - len(texts),))]
    return texts


def parse_vectors(texts):
    """'[x,y,...]' texts → a float32 matrix (one C parse of them all)."""
    flat = np.array(",".join(t[1:-1] for t in texts).split(","), dtype=np.float32)
    return flat.reshape(len(texts), -1)


def unit(m):
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def pct(values, p):
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def plan_summary(c, view, f, qvec, k, indexes):
    lines = [r[0] for r in c.execute("EXPLAIN (COSTS OFF) " + view_sql(view, f, k), (qvec,))]
    used = []
    for line in lines:
        for marker in ("Index Scan using ", "Index Only Scan using ", "Bitmap Index Scan on "):
            if marker in line:
                name = line.split(marker, 1)[1].split()[0]
                label = indexes.get(name, name)
                if label not in used:
                    used.append(label)
        if "Seq Scan on " in line:
            label = "seq " + line.split("Seq Scan on ", 1)[1].split()[0]
            if label not in used:
                used.append(label)
    return " + ".join(used)


def view_sql(view, f, k):
    where = f"WHERE {expr(f, '(v.packages).')} " if f else ""
    return f"SELECT v.name FROM {view} v {where}ORDER BY v.embedding <=> %s::vector LIMIT {int(k)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="all", help="packages to load (default all, ~64k)")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--model", default=None,
                    help="model to watch with (default: pg_embed_sidecar.model); the README's run uses "
                         "paraphrase-MiniLM-L3-v2, 4x faster to embed 64k rows on 2 cores")
    ap.add_argument("--dsn", default="", help="a database of the cluster to create pes_bench_filtered from (default: libpq's)")
    ap.add_argument("--section", default="python", help="the realistic section filter")
    ap.add_argument("--explain", nargs="?", const="", default=None, metavar="FILE",
                    help="write the plans of the view queries at 1%% (default file: next to stdout's)")
    ap.add_argument("--reuse", action="store_true", help=f"use {DB} as an earlier run left it (no load, no embedding)")
    ap.add_argument("--drop", action="store_true", help=f"drop {DB} at the end")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a setting for the benchmark's session, e.g. pg_embed_sidecar.exact_search_rows=0 (repeatable)")
    args = ap.parse_args()
    k = args.k
    db_dsn = make_conninfo(args.dsn, dbname=DB)

    if args.reuse and database_exists(args.dsn):
        print(f"== reusing {DB}")
    else:
        print(f"== loading {args.rows} packages into {DB}, watching, waiting for the drain")
        load(args.dsn, db_dsn, args.rows, args.model)

    c = connect(db_dsn)
    c.prepare_threshold = None  # every statement planned with its parameters' values
    for setting in args.set:
        name, _, value = setting.partition("=")
        c.execute("SELECT set_config(%s, %s, false)", (name.strip(), value.strip()))
    sidecar, model_id, view, stand_in = target(c)
    # queries are embedded (by embed_query, search's own query side) with the source's model
    c.execute("""SELECT set_config('pg_embed_sidecar.model', model, false) FROM embed_sidecar.sources
                  WHERE source = 'packages'::regclass AND role = 'current'""")
    rows_total = c.execute("SELECT count(*) FROM packages").fetchone()[0]
    has_filter = c.execute("""SELECT 1 FROM pg_proc WHERE oid = 'embed_sidecar.search'::regproc
                               AND 'filter' = ANY(proargnames)""").fetchone() is not None

    # exact top-k: all vectors, once
    names, texts = [], []
    for name, vec in c.execute(f"SELECT name, embedding::text FROM {sidecar} WHERE model = %s", (model_id,)):
        names.append(name)
        texts.append(vec)
    matrix = unit(parse_vectors(texts))
    del texts
    row_of = {n: i for i, n in enumerate(names)}

    queries = query_texts(c, args.queries)
    qtexts, embed_ms = [], []
    for q in queries:
        c.execute("SELECT embed_query('a text no query is')")  # the memo holds another text
        t0 = time.perf_counter()
        v = c.execute("SELECT embed_query(%s)::text", (q,)).fetchone()[0]
        embed_ms.append((time.perf_counter() - t0) * 1000)
        qtexts.append(v)
    qmat = unit(parse_vectors(qtexts))
    dists = 1.0 - qmat @ matrix.T  # queries × rows

    indexes = {}
    for name, idx in c.execute("""SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
                                  WHERE indrelid IN ('packages'::regclass, %s::regclass)""", (sidecar,)):
        if " hnsw " in idx.lower() or "using hnsw" in idx.lower():
            indexes[name] = "hnsw"
        elif "(tenant)" in idx:
            indexes[name] = "tenant btree"
        elif "(section)" in idx:
            indexes[name] = "section btree"
        elif name.endswith("_pkey"):
            indexes[name] = name

    shown = ["hnsw.ef_search", "hnsw.max_scan_tuples", "hnsw.iterative_scan"]
    if has_filter:
        shown.append("pg_embed_sidecar.exact_search_rows")
    settings = {s: c.execute(f"SHOW {s}").fetchone()[0] for s in shown}
    base_iter = settings["hnsw.iterative_scan"]
    print(f"\n# filtered search — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {rows_total:,} rows "
          f"({len(names):,} with a vector), k = {k}, {len(queries)} queries "
          f"({'fixed phrases' if len(queries) <= len(QUERIES) else f'{len(QUERIES)} fixed phrases + synopses of tenants >= 100'})")
    pgvector = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
    print(f"pgvector {pgvector}, "
          + ", ".join(f"{s} = {v}" for s, v in settings.items()) + f"; view {view}"
          + (" (a STAND-IN made by this script: the extension made none)" if stand_in else ""))
    if not has_filter:
        print("NOTE: embed_sidecar.search() has no filter parameter in this build: search() runs unfiltered only")
    print(f"query embedding, embed_query() uncached: p50 {statistics.median(embed_ms):.1f} ms, "
          f"p95 {pct(embed_ms, 95):.1f} ms (not in the search() times below; add it for a cold search's total)\n")

    flist = filters(c, args.section)
    results = {}  # (filter label, method) → stats
    print("| filter | matching rows (with a vector) | method | plan | mean rows | min rows | calls with min(k, matching) | "
          "rows outside the filter | mean overlap@k | p50 ms | p95 ms |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    memo_misses = searches = 0
    explain_out = []
    for label, f in flist:
        src_expr = expr(f, "")
        matching = set(r[0] for r in c.execute(f"SELECT name FROM packages {'WHERE ' + src_expr if f else ''}"))
        cols = np.array(sorted(row_of[n] for n in matching if n in row_of), dtype=np.int64)
        want = min(k, len(cols))
        exact = []  # per query: (set of exact top-k names, k-th exact distance)
        for qi in range(len(queries)):
            d = dists[qi, cols]
            if len(cols) == 0:
                exact.append((set(), 0.0, {}))
                continue
            top = np.argpartition(d, want - 1)[:want] if want < len(cols) else np.arange(len(cols))
            kth = float(d[top].max())
            exact.append(({names[cols[j]] for j in top}, kth, None))
        for method, iterative in METHODS:
            if method == "search()" and f and not has_filter:
                print(f"| {label} | {len(matching):,} ({len(cols):,}) | {method} | | n/a: no filter parameter | | | | | | |")
                continue
            c.execute(f"SET hnsw.iterative_scan = {iterative or base_iter}")
            if method == "search()":
                stmt = ("SELECT key->>0 FROM embed_sidecar.search('packages', %s, %s, filter => %s)" if has_filter else
                        "SELECT key->>0 FROM embed_sidecar.search('packages', %s, %s)")
                plan = ""
                if f and has_filter:
                    # search()'s own choice: exact when the planner expects few rows (sql/search.sql, _nearest)
                    est = c.execute("SELECT embed_sidecar._filter_rows('packages', %s)", (src_expr,)).fetchone()[0]
                    plan = (f"exact (planner expects {est:,.0f} rows)"
                            if est <= float(settings["pg_embed_sidecar.exact_search_rows"])
                            else f"hnsw iterative, exact if short (expects {est:,.0f})")
                elif not f:
                    plan = "hnsw"
            else:
                stmt = view_sql(view, f, k)
                plan = plan_summary(c, view, f, qtexts[0], k, indexes)
            got_rows, overlaps, ms, outside, errors = [], [], [], 0, []

            def run(qi):
                """(names returned, ms, query embeddings the timed call made)"""
                before = None
                if method == "search()":
                    c.execute("SELECT embed_query(%s) IS NULL", (queries[qi],))  # warm the one-entry memo
                    before = c.execute("SELECT embed_sidecar.texts_embedded()").fetchone()[0]
                    params = (queries[qi], k, src_expr) if has_filter else (queries[qi], k)
                else:
                    params = (qtexts[qi],)
                t0 = time.perf_counter()
                got = [r[0] for r in c.execute(stmt, params)]
                t = (time.perf_counter() - t0) * 1000
                embedded = 0 if before is None else c.execute("SELECT embed_sidecar.texts_embedded()").fetchone()[0] - before
                return got, t, embedded

            for qi in range(min(2, len(queries))):  # warm-up, untimed
                try:
                    run(qi)
                except psycopg.Error:
                    pass
            for qi in range(len(queries)):
                try:
                    got, t, embedded = run(qi)
                    if method == "search()":
                        searches += 1
                        memo_misses += embedded > 0
                except psycopg.Error as e:
                    errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
                    got, t = None, None
                if got is None:
                    continue
                ms.append(t)
                got_rows.append(len(got))
                outside += sum(1 for n in got if n not in matching)
                top, kth, _ = exact[qi]
                if want == 0:
                    overlaps.append(1.0 if not got else 0.0)
                else:
                    hits = sum(1 for n in set(got) if n in matching and n in row_of and
                               (n in top or float(dists[qi, row_of[n]]) <= kth + TIE))
                    overlaps.append(min(1.0, hits / want))
            r = {"matching": len(cols), "want": want, "rows": got_rows, "overlap": overlaps, "ms": ms,
                 "outside": outside, "errors": errors, "calls": len(queries)}
            results[(label, method)] = r
            if ms:
                full = sum(1 for n in got_rows if n == want)
                print(f"| {label} | {len(matching):,} ({len(cols):,}) | {method} | {plan} | {statistics.mean(got_rows):.2f} | "
                      f"{min(got_rows)} | {full}/{len(queries)} | {outside} | {statistics.mean(overlaps):.3f} | "
                      f"{statistics.median(ms):.2f} | {pct(ms, 95):.2f} |", flush=True)
            else:
                print(f"| {label} | {len(matching):,} ({len(cols):,}) | {method} | {plan} | errors only | | | | | | |", flush=True)
            for e in sorted(set(errors)):
                print(f"|  | | ↳ {errors.count(e)} calls failed: {e} | | | | | | | | |")
            if args.explain is not None and label.startswith("1%") and method != "search()":
                q = view_sql(view, f, k)
                plan_text = "\n".join(row[0] for row in c.execute("EXPLAIN (ANALYZE, COSTS OFF) " + q, (qtexts[0],)))
                plan_text = re.sub(r"'\[[^\]]{100,}\]'", "'[...]'", plan_text)  # the query vector, inlined by the planner
                explain_out.append(f"-- {method} (hnsw.iterative_scan = {iterative or base_iter}), filter {label}, "
                                   f"$1 = embed_query({queries[0]!r})\n{q.replace('%s', '$1')}\n{plan_text}\n")
    c.execute(f"SET hnsw.iterative_scan = {base_iter}")
    print(f"\nsearch(): {searches} timed calls, {memo_misses} of them embedded their query (0: the memo was hit every time)")

    # the targets, for search(); the view methods for comparison
    print("\n| target | " + " | ".join(m for m, _ in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))

    def verdict(ok, detail):
        return f"{'PASS' if ok else 'FAIL'} ({detail})"

    def per_method(check):
        cells = []
        for m, _ in METHODS:
            rs = [(label, results.get((label, m))) for label, _ in flist]
            if any(r is None or not r["ms"] for _, r in rs):
                cells.append("n/a (not measured at every filter)")
            else:
                cells.append(check(rs))
        return cells

    def full_rows(rs):
        short = sum(sum(1 for n in r["rows"] if n != r["want"]) + len(r["errors"]) for _, r in rs)
        calls = sum(r["calls"] for _, r in rs)
        return verdict(short == 0, f"{short} of {calls} calls short or failed")

    def overlap(rs):
        worst_label, worst = min(((label, statistics.mean(r["overlap"])) for label, r in rs), key=lambda x: x[1])
        return verdict(worst >= 0.95, f"lowest {worst:.3f} at {worst_label.split(':')[0]}")

    def latency(rs):
        base = next(r for label, r in rs if label.startswith("100%"))
        one = next(r for label, r in rs if label.startswith("1%"))
        ratio = pct(one["ms"], 95) / pct(base["ms"], 95)
        return verdict(ratio <= 2.0, f"p95 1% / unfiltered = {ratio:.2f}")

    print("| every call returns min(k, matching) rows | " + " | ".join(per_method(full_rows)) + " |")
    print("| mean overlap@k >= 0.95 at every selectivity | " + " | ".join(per_method(overlap)) + " |")
    print("| p95 at 1% <= 2x unfiltered p95 | " + " | ".join(per_method(latency)) + " |")
    s_base, s_one = results.get((flist[0][0], "search()")), results.get((flist[2][0], "search()"))
    if s_base and s_one and s_base["ms"] and s_one["ms"]:
        print(f"\nsearch(): p95 at 1% {pct(s_one['ms'], 95):.2f} ms / unfiltered p95 {pct(s_base['ms'], 95):.2f} ms = "
              f"{pct(s_one['ms'], 95) / pct(s_base['ms'], 95):.2f}")

    if args.explain is not None:
        path = args.explain
        if not path:
            out = os.path.realpath("/proc/self/fd/1")
            path = (os.path.splitext(out)[0] + ".explain.txt") if os.path.isfile(out) else "filtered.explain.txt"
        with open(path, "w") as fh:
            fh.write("\n".join(explain_out))
        print(f"\nplans at 1% written to {path}")
    c.close()
    if args.drop:
        with connect(args.dsn) as c:
            c.execute(f"DROP DATABASE {DB} WITH (FORCE)")
    else:
        print(f"\n({DB} kept: --reuse runs again on it, --drop drops it)")


if __name__ == "__main__":
    main()
