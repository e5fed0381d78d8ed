#!/usr/bin/env python3
"""An embedding replica on this machine: a publisher without the extension (a primary that must
not spend CPU on inference, or a managed one where no extension can be installed) and a
subscriber with pg_embed_sidecar that watches its copy of the table.

    replica.py up        build and start both, load --rows rows on the publisher, wait until the
                         subscriber embedded them all (prints the throughput of the initial copy)
    replica.py measure   how long a row inserted on the publisher takes to be searchable on the
                         subscriber (--samples inserts), and status.behind meanwhile
    replica.py down      stop both and remove their data

Ports: publisher --port, subscriber --port+1 (default 5452, 5453). Data under --data (default
/var/tmp/pes_replica). Binaries: $PG_CONFIG's (scripts/env.sh). The SQL is README's ("Beyond one
machine")."""
import argparse
import statistics
import time

from nodes import Node, eventually

PUBLISHER_SQL = ["CREATE TABLE docs (id int PRIMARY KEY, body text)",
                 "CREATE PUBLICATION docs_pub FOR TABLE docs"]


def subscriber_sql(publisher_dsn):
    return ["CREATE EXTENSION IF NOT EXISTS pg_embed_sidecar CASCADE",
            "CREATE TABLE docs (id int PRIMARY KEY, body text)",
            "SELECT embed_sidecar.watch('docs', 'body')",
            f"CREATE SUBSCRIPTION docs_sub CONNECTION '{publisher_dsn}' PUBLICATION docs_pub"]


def nodes(args):
    return Node(args.port, f"{args.data}/publisher", "publisher"), Node(args.port + 1, f"{args.data}/subscriber", "subscriber")


def in_step(sub, rows):
    got, vectors, pending = sub.execute("""SELECT (SELECT count(*) FROM docs), (SELECT count(*) FROM docs_embeddings),
                                                  (SELECT pending + bulk_pending FROM embed_sidecar.status)""").fetchone()
    return got == rows and vectors == rows and pending == 0


def up(args):
    publisher, subscriber = nodes(args)
    publisher.create(preload=False).start()
    subscriber.create(preload=True).start()
    with publisher.connect() as c:
        for sql in PUBLISHER_SQL:
            c.execute(sql)
        c.execute(f"""INSERT INTO docs SELECT i, 'document ' || i || ' about ' || (ARRAY['rivers', 'mountains', 'cooking',
                        'numbers', 'boats', 'winter'])[i % 6 + 1] || ', with some words to make it a sentence of ordinary length'
                        FROM generate_series(1, {args.rows}) i""")
    started = time.time()
    with subscriber.connect() as c:
        for sql in subscriber_sql(publisher.dsn()):
            c.execute(sql)
        eventually(lambda: in_step(c, args.rows), "the subscriber did not embed the copy", timeout=3600, every=0.2)
    seconds = time.time() - started
    print(f"initial copy of {args.rows} rows copied and embedded on the subscriber in {seconds:.1f} s: {args.rows / seconds:.0f} rows/s")


def measure(args):
    publisher, subscriber = nodes(args)
    latencies = []
    with publisher.connect() as p, subscriber.connect() as s:
        base = p.execute("SELECT coalesce(max(id), 0) FROM docs").fetchone()[0]
        for n in range(args.samples):
            key = base + 1 + n
            text = f"sample {n}: an otter named {key} juggling pebbles beside a waterfall"
            t = time.perf_counter()
            p.execute("INSERT INTO docs VALUES (%s, %s)", (key, text))
            eventually(lambda: s.execute("SELECT key FROM embed_sidecar.search('docs', %s, 1)", (text,)).fetchone() == ([key],),
                       f"row {key} not searchable", timeout=120, every=0.01)
            latencies.append((time.perf_counter() - t) * 1000)
        behind = s.execute("SELECT replication_lag, behind FROM embed_sidecar.status").fetchone()
    print(f"insert on the publisher -> first hit of search() on the subscriber, {args.samples} samples: "
          f"median {statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms")
    print(f"status afterwards: replication_lag {behind[0]}, behind {behind[1]}")


def down(args):
    for node in nodes(args):
        node.destroy()
    print("nodes stopped and removed")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "measure", "down"])
    p.add_argument("--port", type=int, default=5452)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--data", default="/var/tmp/pes_replica")
    args = p.parse_args()
    {"up": up, "measure": measure, "down": down}[args.action](args)


if __name__ == "__main__":
    main()
