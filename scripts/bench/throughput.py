#!/usr/bin/env python3
"""Benchmarks, side by side in one run, printed as markdown tables (pasted into README).

Same model, same threads, same texts, same batching for every contender:
  ceiling    raw ONNX Runtime through embed_core (tokenise, batch, pool), no PostgreSQL
  SQL        embed_texts() over a socket, one call per window of texts
  worker     watch() → wait(): triggers, queue, background worker, sidecar writes, end to end
  external   a Python worker (psycopg + onnxruntime + tokenizers) draining the same pgmq queue
Plus: idle latency insert → embedded, backend/worker RSS, and sidecar vs inline vector column.
Needs the demo's `packages` table in database postgres (scripts/demo/demo.sh loads it)."""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for shared/
from shared.ceiling import ceiling  # noqa: E402
from shared.db import connect, rss_kb  # noqa: E402

SUPABASE_DOCS_PER_MIN = 87  # published rate of the pg_cron → Edge Function → gte-small pipeline


def texts_for(conn, column, n):
    return [r[0] for r in conn.execute(
        f"SELECT {column} FROM packages WHERE NOT embed_sidecar._is_blank({column}) ORDER BY md5(name) LIMIT %s", (n,))]


def texts_for_sweep(dsn, n):
    """n short, distinct texts: synopses, numbered when the corpus has fewer."""
    with connect(dsn) as c:
        base = [r[0] for r in c.execute("SELECT synopsis FROM packages ORDER BY md5(name) LIMIT %s", (n,))]
    return [f"{t} ({i})" for i, t in enumerate((base * (n // max(1, len(base)) + 1))[:n])]


def sql_batched(dsn, texts, threads, window):
    with connect(dsn) as c:
        c.execute(f"SET pg_embed_sidecar.intra_threads = {threads}")
        c.execute("SELECT embed_text('warm up')")
        t0 = time.time()
        for i in range(0, len(texts), window):
            c.execute("SELECT cardinality(embed_texts(%s::text[]))", (texts[i:i + window],))
        return len(texts) / (time.time() - t0)


def sql_one_by_one(dsn, texts, threads):
    with connect(dsn) as c:
        c.execute(f"SET pg_embed_sidecar.intra_threads = {threads}")
        c.execute("SELECT embed_text('warm up')")
        t0 = time.time()
        c.execute("SELECT count(embed_text(t)) FROM unnest(%s::text[]) t", (texts,))
        return len(texts) / (time.time() - t0)


def make_table(c, name, texts):
    c.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
    c.execute(f"CREATE TABLE {name} (name text PRIMARY KEY, body text)")
    c.execute(f"INSERT INTO {name} SELECT 'k' || i, t FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, i)", (texts,))


def worker(dsn, texts):
    with connect(dsn) as c:
        make_table(c, "bench_worker", texts)
        t0 = time.time()
        c.execute("SELECT embed_sidecar.watch('bench_worker', 'body')")
        assert c.execute("SELECT embed_sidecar.wait('bench_worker', '30 min')").fetchone()[0]
        rate = len(texts) / (time.time() - t0)
        c.execute("SELECT embed_sidecar.unwatch('bench_worker', true)")
        c.execute("DROP TABLE bench_worker")
        return rate


def external(dsn, texts, threads, window):
    with connect(dsn) as c:
        make_table(c, "bench_external", texts)
        c.execute("SELECT embed_sidecar.watch('bench_external', 'body', backfill => false)")
        c.execute("SELECT embed_sidecar.pause('bench_external')")  # our worker stays out of it
        c.execute("SELECT embed_sidecar.reembed('bench_external')")
        out = subprocess.run([sys.executable, os.path.join(HERE, "external_worker.py"), "--table", "bench_external",
                              "--threads", str(threads), "--window", str(window), "--dsn", dsn],
                             check=True, capture_output=True, text=True)
        res = json.loads(out.stdout)
        embedded = c.execute("SELECT count(*) FROM bench_external_embeddings").fetchone()[0]
        assert embedded == len(texts), (embedded, len(texts))
        c.execute("SELECT embed_sidecar.unwatch('bench_external', true)")
        c.execute("DROP TABLE bench_external")
        return len(texts) / res["seconds"]


def latency(dsn, n):
    with connect(dsn) as c:
        c.execute("DROP TABLE IF EXISTS bench_latency CASCADE")
        c.execute("CREATE TABLE bench_latency (id int PRIMARY KEY, body text)")
        c.execute("SELECT embed_sidecar.watch('bench_latency', 'body')")
        time.sleep(1.0)
        samples = []
        for i in range(n):
            time.sleep(0.25)  # idle between inserts: the worker is napping
            t0 = time.time()
            c.execute("INSERT INTO bench_latency VALUES (%s, %s)", (i, f"latency probe number {i}: a short sentence"))
            while not c.execute("SELECT 1 FROM bench_latency_embeddings WHERE id = %s", (i,)).fetchone():
                time.sleep(0.002)
            samples.append(time.time() - t0)
        c.execute("SELECT embed_sidecar.unwatch('bench_latency', true)")
        c.execute("DROP TABLE bench_latency")
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def memory(dsn):
    with connect(dsn) as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        idle = rss_kb(pid)
        c.execute("SELECT embed_text('load the model')")
        loaded = rss_kb(pid)
        wpid = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' "
                         "AND datname = current_database()").fetchone()[0]
        return idle, loaded, rss_kb(wpid)


def sidecar_vs_inline(dsn):
    with connect(dsn) as c:
        c.execute("DROP TABLE IF EXISTS bench_inline")
        c.execute("""CREATE TABLE bench_inline AS SELECT p.*, e.embedding FROM packages p
                     JOIN packages_embeddings e USING (name)""")
        c.execute("ALTER TABLE bench_inline ADD PRIMARY KEY (name)")
        c.execute("DROP TABLE IF EXISTS bench_lean")
        c.execute("CREATE TABLE bench_lean AS SELECT * FROM packages WHERE name IN (SELECT name FROM bench_inline)")
        c.execute("ALTER TABLE bench_lean ADD PRIMARY KEY (name)")
        c.execute("VACUUM ANALYZE bench_inline")
        c.execute("VACUUM ANALYZE bench_lean")
        names = [r[0] for r in c.execute("SELECT name FROM bench_lean ORDER BY md5(name) LIMIT 2000")]
        rows = c.execute("SELECT count(*) FROM bench_lean").fetchone()[0]
        out = {}
        for t in ("bench_lean", "bench_inline"):
            size = c.execute(f"SELECT pg_table_size('{t}')").fetchone()[0]
            c.execute(f"SELECT count(*) FROM {t} WHERE section = 'games'")  # warm the cache
            t0 = time.time()
            for n in names:
                c.execute(f"SELECT section, synopsis FROM {t} WHERE name = %s", (n,)).fetchone()
            point_ms = (time.time() - t0) / len(names) * 1000
            runs = []
            for _ in range(5):
                t0 = time.time()
                c.execute(f"SELECT count(*) FROM {t} WHERE section = 'games' AND synopsis ILIKE '%%puzzle%%'").fetchone()
                runs.append((time.time() - t0) * 1000)
            out[t] = (size, point_ms, statistics.median(runs))
        c.execute("DROP TABLE bench_inline")
        c.execute("DROP TABLE bench_lean")
        return rows, out


def backfill_table(c, name, rows):
    c.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
    c.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text)")
    c.execute(f"INSERT INTO {name} SELECT i, 'backfill row ' || i || ' about ' || md5(i::text) "
              f"FROM generate_series(1, {rows}) i")


def lanes(dsn, rows, samples=20):
    """Latency of single-row inserts while a backfill of `rows` rows drains, and the backfill's rate."""
    with connect(dsn) as c:
        backfill_table(c, "bench_lanes", rows)
        t0 = time.time()
        c.execute("SELECT embed_sidecar.watch('bench_lanes', 'body')")
        latencies, i = [], 0
        while c.execute("SELECT bulk_pending FROM embed_sidecar.status WHERE source = 'bench_lanes'::regclass").fetchone()[0] > 0:
            time.sleep(1.0 if len(latencies) < samples else 0.5)
            if len(latencies) < samples:
                i += 1
                t1 = time.time()
                c.execute("INSERT INTO bench_lanes VALUES (%s, 'a writer''s row during the backfill')", (10_000_000 + i,))
                while not c.execute("SELECT 1 FROM bench_lanes_embeddings WHERE id = %s", (10_000_000 + i,)).fetchone():
                    time.sleep(0.002)
                latencies.append(time.time() - t1)
        assert c.execute("SELECT embed_sidecar.wait('bench_lanes', '10 min')").fetchone()[0]
        rate = rows / (time.time() - t0)
        c.execute("SELECT embed_sidecar.unwatch('bench_lanes', true)")
        c.execute("DROP TABLE bench_lanes")
    latencies.sort()
    return latencies, rate


def print_lanes(args):
    with connect(args.dsn) as c:
        window = c.execute("SELECT setting FROM pg_settings WHERE name = 'pg_embed_sidecar.bulk_batch_size'").fetchone()[0]
    lat, rate = lanes(args.dsn, args.lanes_rows)
    n = len(lat)
    print(f"| writer's INSERT → vector visible during a {args.lanes_rows}-row backfill | samples | p50 | p99 | max | backfill rows/s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| bulk lane in windows of {window} | {n} | {lat[n // 2] * 1000:.0f} ms | "
          f"{lat[min(n - 1, int(n * 0.99))] * 1000:.0f} ms | {lat[-1] * 1000:.0f} ms | {rate:.1f} |\n")


def print_latency(args):
    with connect(args.dsn) as c:
        beat = c.execute("SELECT setting FROM pg_settings WHERE name = 'pg_embed_sidecar.idle_naptime'").fetchone()[0]
    p50, p99 = latency(args.dsn, args.latency_samples)
    print(f"| idle latency, INSERT → vector visible ({args.latency_samples} single-row inserts) | p50 | p99 |")
    print("|---|---:|---:|")
    print(f"| worker woken by the commit (heartbeat {beat} ms) | {p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms |\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", type=int, default=2000, help="synopsis texts (short workload)")
    ap.add_argument("--long", type=int, default=600, help="description texts (long workload)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=256, help="texts per embed_texts call / drain pass")
    ap.add_argument("--latency-samples", type=int, default=100)
    ap.add_argument("--sweep-rows", type=int, default=10000, help="short rows for the batch_size sweep")
    ap.add_argument("--dsn", default="dbname=postgres")
    ap.add_argument("--only", choices=["ceiling", "latency", "lanes"], help="run one table only")
    ap.add_argument("--lanes-rows", type=int, default=60000, help="backfill size for the lanes table")
    args = ap.parse_args()
    if args.only == "latency":
        return print_latency(args)
    if args.only == "lanes":
        return print_lanes(args)
    with connect(args.dsn) as c:
        worker_threads = c.execute("SELECT setting FROM pg_settings WHERE name = 'pg_embed_sidecar.intra_threads'").fetchone()
        short = texts_for(c, "synopsis", args.short)
        long_ = texts_for(c, "description", args.long)
    print(f"# pg_embed_sidecar benchmark — {time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{os.cpu_count()} cores, {args.threads} ONNX Runtime threads, window {args.window}, "
          f"batches ≤64 texts / ≤2048 tokens, model all-MiniLM-L6-v2 int8\n")
    if worker_threads and int(worker_threads[0]) != args.threads:
        print(f"(warning: the worker's pg_embed_sidecar.intra_threads is {worker_threads[0]}, not {args.threads})\n")

    print("| path | short (synopsis) rows/s | × ceiling | long (description) rows/s | × ceiling |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for label, fn in [
        ("ceiling: embed_core, no PostgreSQL", lambda t: ceiling(t, args.threads, args.window)),
        ("embed_texts() through SQL", lambda t: sql_batched(args.dsn, t, args.threads, args.window)),
        ("worker: watch → in step, end to end", lambda t: worker(args.dsn, t)),
        ("external Python worker on the same queue", lambda t: external(args.dsn, t, args.threads, args.window)),
    ]:
        results[label] = (fn(short), fn(long_))
        base = results["ceiling: embed_core, no PostgreSQL"]
        s, l = results[label]
        print(f"| {label} | {s:.1f} | {s / base[0]:.2f} | {l:.1f} | {l / base[1]:.2f} |", flush=True)
    if args.only == "ceiling":
        return
    sup = SUPABASE_DOCS_PER_MIN / 60
    w = results["worker: watch → in step, end to end"]
    print(f"| Supabase pipeline (published: {SUPABASE_DOCS_PER_MIN} docs/min) | {sup:.2f} | — | {sup:.2f} | — |")
    ext = results["external Python worker on the same queue"]
    print(f"\nworker vs external worker: {w[0] / ext[0]:.2f}× (short), {w[1] / ext[1]:.2f}× (long); "
          f"vs Supabase's published rate: {w[0] / sup:.0f}× (short), {w[1] / sup:.0f}× (long)\n")

    print("| embed_text / embed_texts in SQL, short texts | 1 thread | 2 threads |")
    print("|---|---:|---:|")
    one = [sql_one_by_one(args.dsn, short[:500], t) for t in (1, 2)]
    many = [sql_batched(args.dsn, short, t, args.window) for t in (1, 2)]
    print(f"| embed_text(), one row at a time (rows/s) | {one[0]:.1f} | {one[1]:.1f} |")
    print(f"| embed_texts(), {args.window} per call (rows/s) | {many[0]:.1f} | {many[1]:.1f} |\n")

    sweep_texts = texts_for_sweep(args.dsn, args.sweep_rows)
    print(f"| worker drain, {len(sweep_texts)} short rows, by pg_embed_sidecar.batch_size | rows/s |")
    print("|---|---:|")
    for size in (16, 32, 64, 256):
        with connect(args.dsn) as c:
            c.execute(f"ALTER SYSTEM SET pg_embed_sidecar.batch_size = {size}")
            c.execute("SELECT pg_reload_conf()")
        time.sleep(1.0)  # the worker reloads on SIGHUP between rounds
        print(f"| batch_size {size} | {worker(args.dsn, sweep_texts):.1f} |", flush=True)
    with connect(args.dsn) as c:
        c.execute("ALTER SYSTEM RESET pg_embed_sidecar.batch_size")
        c.execute("SELECT pg_reload_conf()")
    print()

    print_latency(args)

    idle, loaded, wrss = memory(args.dsn)
    print("| memory | VmRSS MiB | own (RssAnon) MiB |")
    print("|---|---:|---:|")
    print(f"| idle backend | {idle[0] / 1024:.0f} | {idle[1] / 1024:.0f} |")
    print(f"| backend after model load | {loaded[0] / 1024:.0f} | {loaded[1] / 1024:.0f} |")
    print(f"| background worker, after all the runs above | {wrss[0] / 1024:.0f} | {wrss[1] / 1024:.0f} |\n")

    rows, out = sidecar_vs_inline(args.dsn)
    lean, inline = out["bench_lean"], out["bench_inline"]
    print(f"| source table, {rows} rows | table size | point lookup by key | filtered scan (section, ILIKE) |")
    print("|---|---:|---:|---:|")
    print(f"| lean source, vectors in the sidecar | {lean[0] / 2**20:.1f} MiB | {lean[1]:.3f} ms | {lean[2]:.1f} ms |")
    print(f"| inline vector(384) column | {inline[0] / 2**20:.1f} MiB | {inline[1]:.3f} ms | {inline[2]:.1f} ms |")
    print(f"| ratio inline / sidecar | {inline[0] / lean[0]:.2f}× | {inline[1] / lean[1]:.2f}× | {inline[2] / lean[2]:.2f}× |")


if __name__ == "__main__":
    main()
