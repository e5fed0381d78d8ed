#!/usr/bin/env python3
"""Many sessions calling embed_text, local inference (a model per session) against the
instance's inference service (one model, cross-session batches), side by side in one run, plus
`embed_texts` batched as the ceiling and embed_text latency during a backfill. Prints markdown.

    scripts/bench/service.py [--seconds 20] [--sessions 1,4,16,64] [--backfill-rows 20000]

Needs the cluster of scripts/cluster.sh (library preloaded). Memory: the private (unshared)
memory of every backend and inference worker at the end of each run, from /proc/PID/smaps_rollup."""
import argparse
import threading
import time

import psycopg


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def private_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))
    except (FileNotFoundError, KeyError):
        return 0


def sessions_run(dsn, mode, n, seconds):
    """n sessions, each calling embed_text on its own distinct texts for `seconds`."""
    conns = [connect(dsn) for _ in range(n)]
    for k, c in enumerate(conns):
        c.execute("SELECT set_config('pg_embed_sidecar.inference', %s, false)", (mode,))
        c.execute("SELECT embed_text(%s)", (f"warm-up {k}",))  # a local session loads its model here
    latencies = [[] for _ in range(n)]
    start = time.time() + 0.5
    stop = start + seconds

    def run(k):
        c, i = conns[k], 0
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < stop:
            i += 1
            t0 = time.perf_counter()
            c.execute("SELECT embed_text(%s)", (f"session {k} asks about topic {i} of {mode}",))
            latencies[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with connect(dsn) as admin:
        pids = [c.info.backend_pid for c in conns] + [r[0] for r in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar inference'")]
    memory = sum(private_kib(p) for p in pids) / 1024
    for c in conns:
        c.close()
    lat = sorted(x for per in latencies for x in per)
    return len(lat) / seconds, lat[len(lat) // 2], lat[int(len(lat) * 0.95)], memory


def ceiling(dsn, seconds):
    with connect(dsn) as c:
        c.execute("SET pg_embed_sidecar.inference = 'shared'")
        texts = [f"batched text number {i}" for i in range(256)]
        c.execute("SELECT embed_texts(%s::text[])", (texts,))
        done, t0 = 0, time.time()
        while time.time() - t0 < seconds:
            c.execute("SELECT embed_texts(%s::text[])", ([f"{t} {done}" for t in texts],))
            done += len(texts)
        return done / (time.time() - t0)


def latency_during_backfill(dsn, mode, rows, samples=60):
    """embed_text latency (p50, p95) at idle, then while the worker drains a `rows`-row backfill."""
    with connect(dsn) as c, connect(dsn) as q:
        q.execute("SELECT set_config('pg_embed_sidecar.inference', %s, false)", (mode,))
        q.execute("SELECT embed_text('warm-up')")

        def sample(n):
            out = []
            for i in range(n):
                t0 = time.perf_counter()
                q.execute("SELECT embed_text(%s)", (f"a search query {mode} {i} {time.time()}",))
                out.append(time.perf_counter() - t0)
                time.sleep(0.05)
            out.sort()
            return out[len(out) // 2], out[int(len(out) * 0.95)]

        idle = sample(samples)
        c.execute("DROP TABLE IF EXISTS bench_service_backfill_embeddings, bench_service_backfill CASCADE")
        c.execute("CREATE TABLE bench_service_backfill (id int PRIMARY KEY, body text)")
        c.execute(f"INSERT INTO bench_service_backfill SELECT i, 'backfill row ' || i || ' about ' || md5(i::text) "
                  f"FROM generate_series(1, {rows}) i")
        c.execute("SELECT embed_sidecar.watch('bench_service_backfill', 'body')")
        time.sleep(1)
        busy = sample(samples)
        still = c.execute("SELECT bulk_pending FROM embed_sidecar.status "
                          "WHERE source = 'bench_service_backfill'::regclass").fetchone()[0]
        c.execute("SELECT embed_sidecar.unwatch('bench_service_backfill', true)")
        c.execute("DROP TABLE bench_service_backfill")
        return idle, busy, still


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default="dbname=postgres")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--sessions", default="1,4,16,64")
    ap.add_argument("--backfill-rows", type=int, default=20000)
    ap.add_argument("--only", choices=["sessions", "latency"], help="run one table only")
    args = ap.parse_args()
    with connect(args.dsn) as c:
        setting = dict(c.execute("SELECT name, setting FROM pg_settings WHERE name LIKE 'pg_embed_sidecar.%'").fetchall())
    print(f"# inference service — {time.strftime('%Y-%m-%d')}, intra_threads (local) "
          f"{setting.get('pg_embed_sidecar.intra_threads')}, inference_threads (shared) "
          f"{setting.get('pg_embed_sidecar.inference_threads')} (0 = one per CPU), {args.seconds:.0f} s per run\n")
    if args.only != "latency":
        print_sessions(args)
    if args.only != "sessions":
        print_latency(args)


def print_sessions(args):
    ceil = ceiling(args.dsn, args.seconds)
    print("| sessions | inference | calls/s | p50 | p95 | private memory, backends + inference worker |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in [int(x) for x in args.sessions.split(",")]:
        for mode in ("local", "shared"):
            rate, p50, p95, mem = sessions_run(args.dsn, mode, n, args.seconds)
            print(f"| {n} | {mode} | {rate:.0f} | {p50 * 1000:.1f} ms | {p95 * 1000:.1f} ms | {mem:,.0f} MiB |", flush=True)
    print(f"| – | `embed_texts`, 256 per call (ceiling) | {ceil:.0f} | – | – | – |\n")


def print_latency(args):
    print(f"| embed_text latency | idle p50 | idle p95 | during a {args.backfill_rows}-row backfill p50 | p95 | p95 ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("local", "shared"):
        (i50, i95), (b50, b95), still = latency_during_backfill(args.dsn, mode, args.backfill_rows)
        note = "" if still else " (backfill ended early)"
        print(f"| {mode}{note} | {i50 * 1000:.1f} ms | {i95 * 1000:.1f} ms | {b50 * 1000:.1f} ms | "
              f"{b95 * 1000:.1f} ms | {b95 / i95:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
