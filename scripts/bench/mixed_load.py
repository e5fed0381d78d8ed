#!/usr/bin/env python3
"""Mixed load, on real text lengths (the demo's synopses and long descriptions), every contender
in the same run; prints markdown (README, "Mixed load").

1. Sessions: N sessions each calling embed_text on its own synopses for S seconds, beside
   `embed_texts` of the same synopses 256 per call (same service, same threads): the ratio is what
   cross-session rounds reach of one sorted batch.
2. During a backfill of long descriptions, phases alternating between the drain as 0.2.0 ran it
   (bulk windows of 64 rows, drain rounds that searches wait for: `bulk_pass_time = 0`,
   `searches_first = off`) and as it runs now (the defaults), each phase with
   - a session calling embed_text every 50 ms (p50 / p95, against idle before the backfill),
   - then live inserts one after another, INSERT → vector visible (p50 / p95 / p99; polled every
     20 ms),
   - then N sessions calling embed_text (calls/s, p95) and the backfill's rows/s meanwhile.

    scripts/bench/mixed_load.py [--dsn dbname=postgres] [--seconds 20] [--sessions 16,64]
                                [--backfill-rows 20000] [--inserts 25] [--searches 150]

Needs the cluster of scripts/cluster.sh (library preloaded) and the demo's `packages` table.
Changes two settings with ALTER SYSTEM during the run and resets them at the end."""
import argparse
import os
import statistics
import threading
import time

import psycopg

BATCH = 256


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def inference_worker_pid(dsn):
    with connect(dsn) as c:
        return c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar inference'").fetchone()[0]


def synopses(dsn, n):
    with connect(dsn) as c:
        return [r[0] for r in c.execute(
            "SELECT synopsis FROM packages WHERE NOT embed_sidecar._is_blank(synopsis) ORDER BY md5(name) LIMIT %s",
            (n,))]


def sessions_run(dsn, texts, n, seconds):
    """n sessions, each calling embed_text on texts of its own (every session a different slice,
    numbered so no two calls send the same text) for `seconds`: (calls/s, p50, p95, CPU
    milliseconds per call of the inference worker, of the sessions' backends, of this client)."""
    conns = [connect(dsn) for _ in range(n)]
    for c in conns:
        c.execute("SELECT embed_text('warm-up')")
    worker = inference_worker_pid(dsn)
    backends = [c.info.backend_pid for c in conns]
    cpu0 = (cpu_seconds(worker), sum(cpu_seconds(p) for p in backends), sum(os.times()[:2]))
    latencies = [[] for _ in range(n)]
    start = time.time() + 0.5
    stop = start + seconds

    def run(k):
        c, i = conns[k], 0
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < stop:
            text = f"{texts[(k * 7919 + i) % len(texts)]} ({k}.{i})"
            i += 1
            t0 = time.perf_counter()
            c.execute("SELECT embed_text(%s)", (text,))
            latencies[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1 = (cpu_seconds(worker), sum(cpu_seconds(p) for p in backends), sum(os.times()[:2]))
    for c in conns:
        c.close()
    lat = [x for per in latencies for x in per]
    per_call = tuple((b - a) * 1000 / max(1, len(lat)) for a, b in zip(cpu0, cpu1))
    return (len(lat) / seconds, pct(lat, 0.5), pct(lat, 0.95)) + per_call


def batched_run(dsn, texts, seconds):
    """embed_texts of the same texts, BATCH per call: (texts/s, CPU milliseconds per text of the
    inference worker)."""
    worker = inference_worker_pid(dsn)
    with connect(dsn) as c:
        c.execute("SELECT embed_texts(%s::text[])", (texts[:BATCH],))
        cpu0 = cpu_seconds(worker)
        done, i, t0 = 0, 0, time.time()
        while time.time() - t0 < seconds:
            batch = [f"{texts[(i + j) % len(texts)]} (b.{i + j})" for j in range(BATCH)]
            i += BATCH
            c.execute("SELECT embed_texts(%s::text[])", (batch,))
            done += BATCH
        return done / (time.time() - t0), (cpu_seconds(worker) - cpu0) * 1000 / done


def set_drain(dsn, old):
    with connect(dsn) as c:
        if old:
            c.execute("ALTER SYSTEM SET pg_embed_sidecar.bulk_pass_time = 0")
            c.execute("ALTER SYSTEM SET pg_embed_sidecar.searches_first = off")
        else:
            c.execute("ALTER SYSTEM RESET pg_embed_sidecar.bulk_pass_time")
            c.execute("ALTER SYSTEM RESET pg_embed_sidecar.searches_first")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(1.5)  # the workers read the file at their next loop


def embedded_rows(c, side):
    return c.execute(f"SELECT count(*) FROM {side}").fetchone()[0]


def search_sampler(dsn, n):
    """A session calling embed_text n times, 50 ms apart: latencies."""
    out = []
    with connect(dsn) as q:
        q.execute("SELECT embed_text('warm-up')")
        for i in range(n):
            t0 = time.perf_counter()
            q.execute("SELECT embed_text(%s)", (f"how do I compress backups {i} {time.time()}",))
            out.append(time.perf_counter() - t0)
            time.sleep(0.05)
    return out


def live_inserts(c, side, first_id, n, body):
    """n single-row inserts, each waited for until its vector is in the sidecar: latencies. The
    first three are not counted: they may wait for a pass read under the previous settings."""
    out = []
    for k in range(-3, n):
        key = first_id + 3 + k
        t0 = time.perf_counter()
        c.execute("INSERT INTO bench_mixed VALUES (%s, %s)", (key, f"{body} (live edit {key})"))
        while not c.execute(f"SELECT EXISTS (SELECT 1 FROM {side} WHERE id = %s)", (key,)).fetchone()[0]:
            time.sleep(0.02)
        if k >= 0:
            out.append(time.perf_counter() - t0)
        time.sleep(0.1)
    return out


def phase(dsn, c, side, old, first_id, args, texts, body):
    set_drain(dsn, old)
    searches = search_sampler(dsn, args.searches)
    live = live_inserts(c, side, first_id, args.inserts, body)
    n = args.busy_sessions
    before, t0 = embedded_rows(c, side), time.time()
    rate, _, p95, *_ = sessions_run(dsn, texts, n, args.seconds)
    rows_per_s = (embedded_rows(c, side) - before) / (time.time() - t0)
    pending = c.execute("SELECT bulk_pending FROM embed_sidecar.status "
                        "WHERE source = 'bench_mixed'::regclass").fetchone()[0]
    return live, searches, (n, rate, p95, rows_per_s), pending


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", default="dbname=postgres")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--sessions", default="16,64")
    ap.add_argument("--backfill-rows", type=int, default=20000)
    ap.add_argument("--inserts", type=int, default=25, help="live inserts per phase")
    ap.add_argument("--searches", type=int, default=150, help="embed_text calls per phase")
    ap.add_argument("--busy-sessions", type=int, default=16, help="sessions calling embed_text during the backfill")
    ap.add_argument("--only", choices=["sessions", "backfill"])
    args = ap.parse_args()
    texts = synopses(args.dsn, 5000)
    with connect(args.dsn) as c:
        setting = dict(c.execute("SELECT name, setting FROM pg_settings WHERE name LIKE 'pg_embed_sidecar.%'").fetchall())
        tokens = c.execute("SELECT avg(n), max(n) FROM (SELECT array_length(regexp_split_to_array(t, '\\s+'), 1) n "
                           "FROM unnest(%s::text[]) t) s", (texts,)).fetchone()
    print(f"# mixed load — {time.strftime('%Y-%m-%d %H:%M')}, inference_threads "
          f"{setting.get('pg_embed_sidecar.inference_threads')} (0 = one per CPU), {args.seconds:.0f} s per run; "
          f"{len(texts)} synopses, {tokens[0]:.1f} words on average, at most {tokens[1]}\n")
    if args.only != "backfill":
        print("| sessions calling embed_text | calls/s | p50 | p95 | `embed_texts`, 256 per call | ratio "
              "| CPU ms per text: inference worker, sessions | backends | client | inference worker, `embed_texts` |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in [int(x) for x in args.sessions.split(",")]:
            rate, p50, p95, w, b, cl = sessions_run(args.dsn, texts, n, args.seconds)
            ceil, w_ceil = batched_run(args.dsn, texts, args.seconds)
            print(f"| {n} | {rate:.1f} | {p50 * 1000:.1f} ms | {p95 * 1000:.1f} ms | {ceil:.1f}/s | {rate / ceil:.2f} "
                  f"| {w:.2f} | {b:.2f} | {cl:.2f} | {w_ceil:.2f} |", flush=True)
        print()
    if args.only != "sessions":
        backfill(args, texts)


def backfill(args, texts):
    with connect(args.dsn) as c:
        idle = search_sampler(args.dsn, args.searches)
        c.execute("DROP TABLE IF EXISTS bench_mixed CASCADE")
        c.execute("CREATE TABLE bench_mixed (id int PRIMARY KEY, body text)")
        # long descriptions (over 600 bytes: a few hundred tokens each), cycled and numbered so
        # that each row is its own text
        c.execute("""WITH d AS (SELECT array_agg(description ORDER BY md5(name)) a FROM packages
                               WHERE length(description) > 600)
                     INSERT INTO bench_mixed
                     SELECT g, a[1 + g %% array_length(a, 1)] || ' (' || g || ')' FROM d, generate_series(1, %s) g""",
                  (args.backfill_rows,))
        body, length = c.execute("SELECT body, avg(length(body)) OVER () FROM bench_mixed LIMIT 1").fetchone()
        side = c.execute("SELECT embed_sidecar.watch('bench_mixed', 'body')::text").fetchone()[0]
        time.sleep(3)
        # per drain: live latencies, search latencies, (sessions, calls/s, p95, rows/s) per phase
        results = {old: ([], [], [], None) for old in (True, False)}
        first_id = 10_000_000
        try:
            for old in (True, False, True, False):
                live, searches, rates, pending = phase(args.dsn, c, side, old, first_id, args, texts, body)
                first_id += args.inserts + 3
                results[old][0].extend(live)
                results[old][1].extend(searches)
                results[old][2].append(rates)
                results[old] = results[old][:3] + (pending,)
        finally:
            set_drain(args.dsn, False)
        print(f"During a {args.backfill_rows}-row backfill of long descriptions ({length:.0f} bytes on average), "
              f"two phases each, alternating; idle embed_text p50 {pct(idle, 0.5) * 1000:.1f} ms, "
              f"p95 {pct(idle, 0.95) * 1000:.1f} ms ({len(idle)} calls)\n")
        print("| drain | live INSERT → vector p50 | p95 | p99 | embed_text p50 | p95 | p95 / idle p95 "
              "| sessions: calls/s | p95 | backfill rows/s meanwhile | bulk rows still pending |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for old in (True, False):
            live, searches, rates, pending = results[old]
            rate = statistics.mean(r[1] for r in rates)
            p95 = max(r[2] for r in rates)
            rows = statistics.mean(r[3] for r in rates)
            name = "as 0.2.0 (64-row bulk windows, searches wait)" if old else "now (bulk_pass_time, searches first)"
            print(f"| {name} | {pct(live, 0.5) * 1000:.0f} ms | {pct(live, 0.95) * 1000:.0f} ms | "
                  f"{pct(live, 0.99) * 1000:.0f} ms | {pct(searches, 0.5) * 1000:.1f} ms | "
                  f"{pct(searches, 0.95) * 1000:.1f} ms | {pct(searches, 0.95) / pct(idle, 0.95):.2f}× | "
                  f"{rates[0][0]}: {rate:.1f} | {p95 * 1000:.0f} ms | {rows:.1f} | {pending} |", flush=True)
        print(f"\n({len(results[False][0])} live inserts and {len(results[False][1])} embed_text calls per drain)")
        c.execute("SELECT embed_sidecar.unwatch('bench_mixed', true)")
        c.execute("DROP TABLE bench_mixed")


if __name__ == "__main__":
    main()
