#!/usr/bin/env python3
"""Sharded embedding work on this machine: a publisher without the extension, K embedding nodes
each subscribing to a share of the rows (publication row filters on a hash of the key), and a
query node that merges the nodes' nearest rows (embed_sidecar.search_shards over postgres_fdw).

    shards.py up        build and start the nodes, load --rows rows, wait until every node embedded
                        its share (prints the embedding throughput)
    shards.py measure   fan-out latency of search_shards (async and one node after the other),
                        against search() on one node holding every row
    shards.py down      stop the nodes and remove their data

Ports: publisher --port, nodes --port+1 .. --port+K, query node --port+K+1 (defaults 5452 and
K = 3). Data under --data (default /var/tmp/pes_topology). Binaries: $PG_CONFIG's (scripts/env.sh).
The SQL below is what README ("Beyond one machine") gives a user to paste; the tests
(tests/replication/test_shards.py) run the same functions."""
import argparse
import statistics
import time

from nodes import Node, eventually


def share_filter(i, k):
    """Row filter of share i of k: a hash of the key, spread over 0..k-1 (hashint4 is signed, so it
    is moved into 0..2^32-1 first). For a text key use hashtext(key), for a composite key combine
    the columns' hashes (hashint4(a) # hashtext(b))."""
    return f"(hashint4(id)::int8 + 2147483648) % {k} = {i}"


def publisher_sql(k):
    """On the publisher (no extension needed; wal_level = logical): the table and one publication
    per share."""
    return ["CREATE TABLE docs (id int PRIMARY KEY, body text)"] + [
        f"CREATE PUBLICATION docs_share_{i} FOR TABLE docs WHERE ({share_filter(i, k)})" for i in range(k)]


def node_sql(i, publisher_dsn):
    """On embedding node i: the same table, watched, subscribed to its share."""
    return ["CREATE EXTENSION IF NOT EXISTS pg_embed_sidecar CASCADE",
            "CREATE TABLE docs (id int PRIMARY KEY, body text)",
            "SELECT embed_sidecar.watch('docs', 'body')",
            f"CREATE SUBSCRIPTION docs_share_{i} CONNECTION '{publisher_dsn}' PUBLICATION docs_share_{i}"]


def query_node_sql(i, port, server=None, table=None, host="/tmp", dbname="postgres"):
    """On the query node (the extension embeds the query; postgres_fdw reaches the nodes): a
    server per node, whose distance and ORDER BY ... LIMIT run on the node (extensions 'vector')
    and which is asked concurrently with the others (async_capable), and a foreign table over the
    node's sidecar: its key columns, embedding and model."""
    server = server or f"embedding_node_{i}"
    table = table or f"docs_vectors_{i}"
    return ["CREATE EXTENSION IF NOT EXISTS pg_embed_sidecar CASCADE",
            "CREATE EXTENSION IF NOT EXISTS postgres_fdw",
            f"""CREATE SERVER "{server}" FOREIGN DATA WRAPPER postgres_fdw
                  OPTIONS (host '{host}', port '{port}', dbname '{dbname}', extensions 'vector', async_capable 'true')""",
            f"""CREATE USER MAPPING FOR CURRENT_USER SERVER "{server}" OPTIONS (user 'postgres')""",
            f"""CREATE FOREIGN TABLE {table} (id int, embedding vector(384), model text)
                  SERVER "{server}" OPTIONS (schema_name 'public', table_name 'docs_embeddings')"""]


def topology(args):
    publisher = Node(args.port, f"{args.data}/publisher", "publisher")
    shards = [Node(args.port + 1 + i, f"{args.data}/shard{i}", f"shard{i}") for i in range(args.k)]
    query = Node(args.port + args.k + 1, f"{args.data}/query", "query")
    return publisher, shards, query


def up(args):
    publisher, shards, query = topology(args)
    publisher.create(preload=False).start()
    for node in shards + [query]:
        node.create(preload=True).start()
    with publisher.connect() as c:
        for sql in publisher_sql(args.k):
            c.execute(sql)
    for i, node in enumerate(shards):
        with node.connect() as c:
            for sql in node_sql(i, publisher.dsn()):
                c.execute(sql)
            eventually(lambda: c.execute("SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel").fetchone()[0],
                       f"node {i}'s subscription did not start")
    with query.connect() as c:
        for i, node in enumerate(shards):
            for sql in query_node_sql(i, node.port):
                c.execute(sql)
    # the load: one INSERT on the publisher, embedded by the K nodes at once
    started = time.time()
    with publisher.connect() as c:
        c.execute(f"""INSERT INTO docs SELECT i, 'document ' || i || ' about ' || (ARRAY['rivers', 'mountains', 'cooking',
                        'numbers', 'boats', 'winter'])[i % 6 + 1] || ', with some words to make it a sentence of ordinary length'
                        FROM generate_series(1, {args.rows}) i""")
    done = {}
    while len(done) < len(shards):
        for i, node in enumerate(shards):
            if i in done:
                continue
            with node.connect() as c:
                rows, vectors = c.execute("SELECT (SELECT count(*) FROM docs), (SELECT count(*) FROM docs_embeddings)").fetchone()
                pending = c.execute("SELECT coalesce(sum(pending + bulk_pending), 0) FROM embed_sidecar.status").fetchone()[0]
            if rows > 0 and rows == vectors and pending == 0:
                done[i] = (rows, time.time() - started)
        time.sleep(0.2)
    total = time.time() - started
    print(f"{args.rows} rows over {args.k} nodes embedded in {total:.1f} s: {args.rows / total:.0f} rows/s in all")
    for i, (rows, seconds) in sorted(done.items()):
        print(f"  node {i}: {rows} rows in {seconds:.1f} s, {rows / seconds:.0f} rows/s")


def measure(args):
    publisher, shards, query = topology(args)
    tables = [f"docs_vectors_{i}" for i in range(args.k)]
    queries = [f"a document about {w} number {n}" for n in range(args.queries // 6 + 1)
               for w in ("rivers", "mountains", "cooking", "numbers", "boats", "winter")][:args.queries]
    with query.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS docs (id int PRIMARY KEY, body text)")

        def timed(sql, params):
            times = []
            for q in queries:
                t = time.perf_counter()
                c.execute(sql, (*params, q)).fetchall()
                times.append((time.perf_counter() - t) * 1000)
            return statistics.median(times), max(times)

        c.execute("SELECT * FROM embed_sidecar.search_shards(%s::regclass[], 'warm up', 10)", (tables,)).fetchall()
        results = {"search_shards, async_capable on": timed("SELECT * FROM embed_sidecar.search_shards(%s::regclass[], %s, 10)", (tables,)),
                   "search_shards, partial => true (one node after the other)":
                       timed("SELECT * FROM embed_sidecar.search_shards(%s::regclass[], %s, 10, partial => true)", (tables,))}
        for i in range(args.k):
            c.execute(f"ALTER SERVER embedding_node_{i} OPTIONS (SET async_capable 'false')")
        results["search_shards, async_capable off"] = timed("SELECT * FROM embed_sidecar.search_shards(%s::regclass[], %s, 10)", (tables,))
        for i in range(args.k):
            c.execute(f"ALTER SERVER embedding_node_{i} OPTIONS (SET async_capable 'true')")
        # the plan of search_shards' statement, for this query vector
        sql = c.execute("""SELECT format('WITH fan AS MATERIALIZED (%%s) SELECT * FROM fan',
                                          string_agg(embed_sidecar._shard_nearest_sql(x, 10), ' UNION ALL '))
                             FROM unnest(%s::regclass[]) x""", (tables,)).fetchone()[0]
        c.execute(f"PREPARE fan_out(real[]) AS {sql}")
        c.execute("SET plan_cache_mode = force_custom_plan")
        plan = [r[0] for r in c.execute("""EXPLAIN (COSTS OFF) EXECUTE fan_out(embed_sidecar._embed_query(current_setting('pg_embed_sidecar.model'),
                                             embed_sidecar._model_id(current_setting('pg_embed_sidecar.model')), 'rivers'))""")]
    # one node holding every row: node 0's copy of all rows, searched with search()
    with shards[0].connect() as c:
        single = []
        for q in queries:
            t = time.perf_counter()
            c.execute("SELECT * FROM embed_sidecar.search('docs', %s, 10)", (q,)).fetchall()
            single.append((time.perf_counter() - t) * 1000)
    print(f"{len(queries)} queries, k = 10, {args.k} nodes; median / max ms:")
    for name, (median, worst) in results.items():
        print(f"  {name}: {median:.1f} / {worst:.1f}")
    print(f"  search() on one node (its own share only): {statistics.median(single):.1f} / {max(single):.1f}")
    print("plan of the fan-out (an Append of Async Foreign Scans: the nodes are asked at once):")
    print("\n".join("  " + line for line in plan))


def down(args):
    publisher, shards, query = topology(args)
    for node in [query] + shards + [publisher]:
        node.destroy()
    print("nodes stopped and removed")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "measure", "down"])
    p.add_argument("--port", type=int, default=5452)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--data", default="/var/tmp/pes_topology")
    args = p.parse_args()
    {"up": up, "measure": measure, "down": down}[args.action](args)


if __name__ == "__main__":
    main()
