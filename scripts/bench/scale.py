#!/usr/bin/env python3
"""Throughput of the drain, printed as markdown tables:

  scale curve  backfills of 1k, 10k and 64k rows of the demo's package texts, short (synopsis)
               and long (description), each from an empty sidecar: rows/s from watch() until every
               row has its vector and the HNSW index exists, against two ceilings on the same texts
               measured in the same run — embed_core with no PostgreSQL (scripts/bench/all.sh's
               ceiling) and embed_texts() through the inference service — plus how busy the
               service was, what it embedded per busy second, the memory of both workers, and
               the CPU each kind of server process spent per row; the largest size of each
               workload again with wider bulk windows (--wide)
  full text    10k short rows with and without the tsvector column (watch(..., fts_config => NULL))
  grown index  10k more short rows written by a client into the 64k-row sidecar, whose HNSW index
               is then maintained row by row
  steady load  short rows inserted at fixed rates (shares of the embed_texts ceiling) for a minute
               each: whether the queue's backlog grows

Needs the demo's `packages` table in database postgres (scripts/demo/demo.sh); works in a database
pes_bench_scale, created afresh and dropped after; `cargo build --release -p embed_core --bin embed_ceiling`
first (scripts/bench/all.sh does).
Usage: scripts/bench/scale.py [--short 1000,10000,64000] [--long 1000,10000] [--wide 256] [--fts-rows 10000] [--grown 10000]
                              [--steady-share 0.5,0.65,0.8] [--steady-seconds 60]"""
import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for shared/
from shared.ceiling import ceiling  # noqa: E402
from shared.db import connect, rss_kb  # noqa: E402

DB = "pes_bench_scale"


def texts(column, n):
    with connect("dbname=postgres") as c:
        return [r[0] for r in c.execute(
            f"SELECT {column} FROM packages WHERE NOT embed_sidecar._is_blank({column}) ORDER BY md5(name) LIMIT %s", (n,))]


def service(c):
    return c.execute("SELECT texts, busy_seconds FROM embed_sidecar.inference_service()").fetchone()


def sql_ceiling(c, sample):
    c.execute("SELECT embed_text('warm up')")
    t0 = time.time()
    for i in range(0, len(sample), 256):
        c.execute("SELECT count(*) FROM embed_sidecar._embed_many(%s)", (sample[i:i + 256],))
    return len(sample) / (time.time() - t0)


def worker_pids(c):
    drain = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' "
                      "AND datname = current_database()").fetchone()[0]
    inference = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar inference'").fetchone()[0]
    return drain, inference


def cpu_by_process(c):
    """CPU seconds used so far by the server's processes, by kind: each live child of the
    postmaster by its title, and the children that have exited (autovacuum workers, mostly), which
    the kernel adds to the postmaster's children's time."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(os.path.join(c.execute("SHOW data_directory").fetchone()[0], "postmaster.pid")) as f:
        postmaster = int(f.readline())
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                title = f.read().replace("\0", " ").strip()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            kind = kind_of(title)
            out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        elif int(pid) == postmaster:
            out[EXITED] = (int(fields[13]) + int(fields[14])) / tick
    return out


EXITED = "exited processes (autovacuum and index build workers, closed sessions)"
KINDS = ["inference service", "drain worker", "autovacuum", "checkpointer, WAL and background writers", EXITED,
         "other backends (the benchmark's session, ...)"]


def cpu_delta(before, after):
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in KINDS}


def kind_of(title):
    for key, kind in [("pg_embed_sidecar inference", "inference service"), ("pg_embed_sidecar worker", "drain worker"),
                      ("autovacuum", "autovacuum"), ("checkpointer", "checkpointer, WAL and background writers"),
                      ("walwriter", "checkpointer, WAL and background writers"),
                      ("background writer", "checkpointer, WAL and background writers")]:
        if key in title:
            return kind
    return "other backends (the benchmark's session, ...)"


def make_table(c, name, rows):
    c.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
    c.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text)")
    with c.cursor().copy(f"COPY {name} (id, body) FROM STDIN") as copy:
        for i, t in enumerate(rows):
            copy.write_row((i, t))


def until_in_step(c, name):
    assert c.execute("SELECT embed_sidecar.wait(%s, '90 min')", (name,)).fetchone()[0]
    while c.execute("SELECT index_pending FROM embed_sidecar.sources WHERE source = %s::regclass", (name,)).fetchone()[0]:
        time.sleep(0.05)


def backfill(c, name, rows, fts=True):
    """watch() a table of `rows` and wait until it is in step with its index; the measurements."""
    make_table(c, name, rows)
    cpu0, s0, t0 = cpu_by_process(c), service(c), time.time()
    c.execute("SELECT embed_sidecar.watch(%s, 'body', fts_config => CASE WHEN %s THEN 'english'::regconfig END)", (name, fts))
    until_in_step(c, name)
    took = time.time() - t0
    s1, cpu = service(c), cpu_delta(cpu0, cpu_by_process(c))
    bad = c.execute("SELECT missing + stale + orphans FROM embed_sidecar.verify(%s)", (name,)).fetchone()[0]
    assert bad == 0, f"{name}: verify found {bad} wrong"
    drain, inference = worker_pids(c)
    return {"rate": len(rows) / took, "busy": (s1[1] - s0[1]) / took, "per_busy_s": (s1[0] - s0[0]) / max(1e-9, s1[1] - s0[1]),
            "drain_rss": rss_kb(drain), "inference_rss": rss_kb(inference), "cpu": cpu, "seconds": took}


def set_bulk_window(c, window):
    """Bulk lane window of the worker (it reloads on SIGHUP between rounds); None: the default."""
    c.execute(f"ALTER SYSTEM SET pg_embed_sidecar.bulk_batch_size = {int(window)}" if window else
              "ALTER SYSTEM RESET pg_embed_sidecar.bulk_batch_size")
    c.execute("SELECT pg_reload_conf()")
    time.sleep(1.0)


def scale_curve(c, workloads, wide):
    print("| workload | rows | rows/s | × embed_core ceiling | × embed_texts ceiling | service busy | "
          "service texts per busy s | drain worker RSS (own) | inference worker RSS (own) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ceilings, breakdown = {}, []
    for label, column, sizes in workloads:
        if not sizes:
            continue
        rows = texts(column, max(sizes))
        sample = rows[:4096 if column == "synopsis" else 1024]
        raw, through_sql = ceiling(sample, os.cpu_count(), 256), sql_ceiling(c, sample)
        ceilings[label] = (raw, through_sql)
        runs = [(n, None) for n in sizes] + [(n, w) for n in sizes[-1:] for w in wide]
        for n, window in runs:
            part = rows[:n]
            name = f"bench_{label}"
            if window:
                set_bulk_window(c, window)
            m = backfill(c, name, part)
            if window:
                set_bulk_window(c, None)
            if label != "short" or (n, window) != runs[-1]:
                # the last short run's sidecar stays for grown_index()
                c.execute("SELECT embed_sidecar.unwatch(%s, true)", (name,))
            print(f"| {label}{f', bulk_batch_size {window}' if window else ''} | {len(part):,} | {m['rate']:.1f} | {m['rate'] / raw:.2f} | {m['rate'] / through_sql:.2f} | "
                  f"{m['busy']:.2f} | {m['per_busy_s']:.1f} | {m['drain_rss'][0] / 1024:.0f} ({m['drain_rss'][1] / 1024:.0f}) MiB | "
                  f"{m['inference_rss'][0] / 1024:.0f} ({m['inference_rss'][1] / 1024:.0f}) MiB |", flush=True)
            breakdown.append((f"{label}{f' (bulk_batch_size {window})' if window else ''}", len(part), m))
    print("\n| CPU ms per row, by process | " + " | ".join(KINDS) + " | total | cores busy |")
    print("|---|" + "---:|" * (len(KINDS) + 2))
    for label, n, m in breakdown:
        total = sum(m["cpu"].values())
        print(f"| {label}, {n:,} rows | " + " | ".join(f"{m['cpu'][k] * 1000 / n:.2f}" for k in KINDS) +
              f" | {total * 1000 / n:.2f} | {total / m['seconds']:.2f} |")
    print()
    for label, (raw, through_sql) in ceilings.items():
        print(f"ceilings, {label}: embed_core {raw:.1f} rows/s, embed_texts() {through_sql:.1f} rows/s "
              f"({through_sql / raw:.2f}× of embed_core)")
    print()
    return ceilings


def without_full_text(c, n):
    """n short rows backfilled with and without the full-text column, side by side."""
    rows = texts("synopsis", n)
    print("| short rows, full text | rows | rows/s | drain worker CPU ms per row | all CPU ms per row | sidecar with indexes |")
    print("|---|---:|---:|---:|---:|---:|")
    for fts in (True, False):
        m = backfill(c, "bench_fts", rows, fts)
        size = c.execute("SELECT pg_total_relation_size('bench_fts_embeddings')").fetchone()[0]
        c.execute("SELECT embed_sidecar.unwatch('bench_fts', true)")
        print(f"| {'fts_config english' if fts else 'fts_config => NULL'} | {n:,} | {m['rate']:.1f} | "
              f"{m['cpu']['drain worker'] * 1000 / n:.2f} | {sum(m['cpu'].values()) * 1000 / n:.2f} | {size / 2**20:.1f} MiB |",
              flush=True)
    print()


def grown_index(c, n):
    """n short rows more into the 64k-row sidecar left by the scale curve (its index maintained)."""
    existing = c.execute("SELECT count(*) FROM bench_short_embeddings").fetchone()[0]
    base = c.execute("SELECT max(id) FROM bench_short").fetchone()[0] + 1
    rows = [f"{t} (revised)" for t in texts("synopsis", n)]
    s0, t0 = service(c), time.time()
    for i in range(0, n, 500):
        c.execute("INSERT INTO bench_short (id, body) SELECT %s + i - 1, t FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, i)",
                  (base + i, rows[i:i + 500]))
    until_in_step(c, "bench_short")
    took = time.time() - t0
    s1 = service(c)
    c.execute("SELECT embed_sidecar.unwatch('bench_short', true)")
    print(f"| {n:,} short rows inserted into a sidecar of {existing:,} rows with its HNSW index | {n / took:.1f} rows/s | "
          f"service busy {(s1[1] - s0[1]) / took:.2f} | {(s1[0] - s0[0]) / max(1e-9, s1[1] - s0[1]):.1f} texts per busy s |\n")


def steady(c, rate, seconds):
    """Insert `rate` rows/s for `seconds`; sample the live queue's depth once a second."""
    c.execute("DROP TABLE IF EXISTS bench_steady CASCADE")
    c.execute("CREATE TABLE bench_steady (id int PRIMARY KEY, body text)")
    c.execute("SELECT embed_sidecar.watch('bench_steady', 'body')")
    queue = c.execute("SELECT queue_name FROM embed_sidecar.sources WHERE source = 'bench_steady'::regclass").fetchone()[0]
    pool = texts("synopsis", int(rate * seconds) + 1)
    depths, done = [], threading.Event()

    def sample():
        with connect(f"dbname={DB}") as s:
            while not done.is_set():
                depths.append(s.execute("SELECT queue_length FROM pgmq.metrics(%s)", (queue,)).fetchone()[0])
                time.sleep(1.0)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0, sent, tick = time.time(), 0, 0.1
    while time.time() - t0 < seconds:
        due = int((time.time() - t0 + tick) * rate)
        if due > sent:
            c.execute("INSERT INTO bench_steady SELECT %s + i - 1, t FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, i)",
                      (sent, [f"{t} ({sent + k})" for k, t in enumerate(pool[sent:due])]))
            sent = due
        time.sleep(max(0.0, t0 + (sent / rate) - time.time()))
    t_end = time.time()
    during = list(depths)  # samples taken while rows arrived
    until_in_step(c, "bench_steady")
    after = time.time() - t_end
    done.set()
    sampler.join()
    c.execute("SELECT embed_sidecar.unwatch('bench_steady', true)")
    half = during[len(during) // 2:]
    return sent / (t_end - t0), max(during), sum(half) / max(1, len(half)), during[-1], after


def main():
    ap = argparse.ArgumentParser()
    sizes = lambda s: [int(x) for x in s.split(",") if x]
    ap.add_argument("--short", type=sizes, default=[1000, 10000, 64000])
    ap.add_argument("--long", type=sizes, default=[1000, 10000])
    ap.add_argument("--wide", type=sizes, default=[256], help="the largest size of each workload again with these bulk windows")
    ap.add_argument("--fts-rows", type=int, default=10000, help="short rows backfilled with and without full text (0: skip)")
    ap.add_argument("--grown", type=int, default=10000, help="rows added to the 64k-row sidecar (0: skip)")
    ap.add_argument("--steady-share", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.5, 0.65, 0.8],
                    help="steady loads, as shares of the embed_texts ceiling")
    ap.add_argument("--steady-seconds", type=int, default=60)
    args = ap.parse_args()
    with connect("dbname=postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    with connect(f"dbname={DB}") as c:
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        time.sleep(1.0)  # the launcher starts this database's worker
        print(f"# drain throughput — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, backfills by the worker "
              f"(bulk lane windows of {c.execute('SHOW pg_embed_sidecar.bulk_batch_size').fetchone()[0]}, "
              f"HNSW built once at or above {c.execute('SHOW pg_embed_sidecar.bulk_index_rows').fetchone()[0]} rows)\n")
        ceilings = scale_curve(c, [("short", "synopsis", args.short), ("long", "description", args.long)], args.wide)
        if args.fts_rows:
            without_full_text(c, args.fts_rows)
        if args.grown and args.short and max(args.short) >= 10000:
            grown_index(c, args.grown)
        if args.steady_share:
            through_sql = ceilings.get("short", (0, sql_ceiling(c, texts("synopsis", 4096))))[1]
            print("| steady load, short rows | arrival rows/s | × embed_texts ceiling | backlog max | backlog mean, 2nd half | "
                  "backlog at end | in step after the last insert |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for share in args.steady_share:
                got, peak, mean_late, last, after = steady(c, share * through_sql, args.steady_seconds)
                print(f"| {args.steady_seconds} s | {got:.1f} | {got / through_sql:.2f} | {peak} | {mean_late:.0f} | {last} | "
                      f"{after:.2f} s |", flush=True)
    with connect("dbname=postgres") as c:
        c.execute(f"DROP DATABASE {DB} WITH (FORCE)")


if __name__ == "__main__":
    main()
