"""Sharded embedding work: three embedding nodes each subscribe to a share of a publisher's table
(publication row filters on a hash of the key) and embed it; the test cluster is the query node,
which reaches the nodes' sidecars through postgres_fdw and merges their nearest rows with
embed_sidecar.search_shards() (sql/shards.sql). The merged top k must equal the top k of one
table holding every node's vectors; a node that is down is an error, or an answer marked partial.

Nodes: a bare publisher on $PES_PUBLISHER_PORT (5452) and three embedding nodes on
$PES_SHARD_PORTS ("5453,5454,5455"), data under $PES_TOPOLOGY_DATA (/var/tmp/pes_topology),
made from the binaries of $PG_CONFIG (scripts/topology/nodes.py). The same SQL, for a user to
paste, is in README ("Beyond one machine") and scripts/topology/shards.py."""
import os
import sys

import psycopg
import pytest

from conftest import one

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "topology"))
from nodes import Node, eventually  # noqa: E402
from shards import (node_sql, publisher_sql, query_node_sql, share_filter)  # noqa: E402

K = 3
ROWS = 600
DATA = os.environ.get("PES_TOPOLOGY_DATA", "/var/tmp/pes_topology")
QUERIES = ["a document about rivers and boats", "mountains in winter", "cooking with garlic", "number 42"]


@pytest.fixture(scope="module")
def nodes():
    publisher = Node(int(os.environ.get("PES_PUBLISHER_PORT", "5452")), f"{DATA}/publisher", "publisher")
    ports = [int(p) for p in os.environ.get("PES_SHARD_PORTS", "5453,5454,5455").split(",")][:K]
    shards = [Node(p, f"{DATA}/shard{i}", f"shard{i}") for i, p in enumerate(ports)]
    try:
        publisher.create(preload=False).start()
        for s in shards:
            # the nodes' HNSW searches look at every row of these small tables, so the merged answer
            # can be compared exactly with one table's
            s.create(preload=True, conf="hnsw.ef_search = 1000\n").start()
        with publisher.connect() as c:
            for sql in publisher_sql(K):
                c.execute(sql)
            c.execute(f"INSERT INTO docs SELECT i, 'document ' || i || ' about ' || (ARRAY['rivers', 'mountains', 'cooking', 'numbers', "
                      f"'boats', 'winter'])[i % 6 + 1] FROM generate_series(1, {ROWS}) i")
        for i, s in enumerate(shards):
            with s.connect() as c:
                for sql in node_sql(i, publisher.dsn()):
                    c.execute(sql)
        yield publisher, shards
    finally:
        for s in shards:
            s.destroy()
        publisher.destroy()


def share_in_step(node, publisher, i):
    """The node holds exactly its share of the publisher's rows, each embedded."""
    with publisher.connect() as p, node.connect() as c:
        want = p.execute(f"SELECT count(*) FROM docs WHERE {share_filter(i, K)}").fetchone()[0]
        got = c.execute("SELECT count(*) FROM docs").fetchone()[0]
        return got == want and c.execute("SELECT embed_sidecar.wait('docs', '1 s')").fetchone()[0] \
            and c.execute("SELECT count(*) FROM docs_embeddings").fetchone()[0] == want


@pytest.fixture
def query_node(db, nodes):
    publisher, shards = nodes
    for i, s in enumerate(shards):
        eventually(lambda: share_in_step(s, publisher, i), f"node {i} did not embed its share", timeout=600, every=1)
    db.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
    servers = [f"{db.schema}_shard{i}" for i in range(K)]
    for i, s in enumerate(shards):
        for sql in query_node_sql(i, s.port, server=servers[i], table=f"docs_vectors_{i}"):
            db.execute(sql)
    yield db, publisher, shards
    for server in servers:
        db.execute(f'DROP SERVER IF EXISTS "{server}" CASCADE')


def merged(db, query, k=10, partial=False, shards=range(K)):
    tables = [f"docs_vectors_{i}" for i in shards]
    return db.execute("SELECT shard, key, distance, complete FROM embed_sidecar.search_shards(%s::regclass[], %s, %s, partial => %s)",
                      (tables, query, k, partial)).fetchall()


def reference(db, query, k=10, shards=range(K)):
    """The k nearest of one table holding the vectors of the given nodes, exactly (no index)."""
    union = " UNION ALL ".join(f"SELECT id, embedding, model FROM docs_vectors_{i}" for i in shards)
    db.execute(f"CREATE TEMP TABLE one_node AS {union}")
    try:
        return db.execute("""SELECT jsonb_build_array(id), (embedding <=> embed_sidecar._embed_query(m.name, m.model_id, %s)::vector)::float8 AS d
                               FROM one_node, embed_sidecar.models m WHERE m.name = current_setting('pg_embed_sidecar.model')
                              ORDER BY d, 1 LIMIT %s""", (query, k)).fetchall()
    finally:
        db.execute("DROP TABLE one_node")


def test_each_node_embeds_its_share_and_the_shares_partition_the_table(query_node):
    db, publisher, shards = query_node
    counts = [one(db, f"SELECT count(*) FROM docs_vectors_{i}") for i in range(K)]
    assert sum(counts) == ROWS and all(c > 0 for c in counts)
    keys = db.execute(" UNION ALL ".join(f"SELECT id FROM docs_vectors_{i}" for i in range(K))).fetchall()
    assert len(set(keys)) == ROWS  # no row on two nodes


def test_merged_top_k_equals_one_node_holding_every_row(query_node):
    db, publisher, shards = query_node
    for query in QUERIES:
        got = merged(db, query)
        want = reference(db, query)
        assert [r[1] for r in got] == [r[0] for r in want], query
        assert all(abs(a[2] - b[1]) < 1e-6 for a, b in zip(got, want))
        assert all(r[3] for r in got)  # complete
        assert len(got) == 10


def one_node_with_the_same_vectors(db, publisher):
    """Table docs_all here: every row of the publisher, watched with the nodes' vectors adopted
    (watch(adopt => ...)), so search() and hybrid_search() on it are one node holding every row
    with the same vectors; its HNSW search looks at every row (ef_search), so it is exact."""
    with publisher.connect() as p:
        rows = p.execute("SELECT id, body FROM docs").fetchall()
    db.execute("CREATE TABLE docs_all (id int PRIMARY KEY, body text, vec vector(384))")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO docs_all (id, body) VALUES (%s, %s)", rows)
    union = " UNION ALL ".join(f"SELECT id, embedding FROM docs_vectors_{i}" for i in range(K))
    db.execute(f"UPDATE docs_all a SET vec = v.embedding FROM ({union}) v WHERE v.id = a.id")
    db.execute("SELECT embed_sidecar.watch('docs_all', 'body', adopt => 'vec')")
    assert one(db, "SELECT embed_sidecar.wait('docs_all', '120 s')")
    db.execute("SET hnsw.ef_search = 1000")


def test_merged_search_and_hybrid_search_equal_search_on_one_node(query_node):
    db, publisher, shards = query_node
    db.execute(f"ALTER FOREIGN TABLE docs_vectors_0 ADD COLUMN fts tsvector")
    for i in range(1, K):
        db.execute(f"ALTER FOREIGN TABLE docs_vectors_{i} ADD COLUMN fts tsvector")
    one_node_with_the_same_vectors(db, publisher)
    tables = [f"docs_vectors_{i}" for i in range(K)]
    for query in QUERIES:
        got = db.execute("SELECT key, distance FROM embed_sidecar.search_shards(%s::regclass[], %s, 10)", (tables, query)).fetchall()
        want = db.execute("SELECT key, distance FROM embed_sidecar.search('docs_all', %s, 10)", (query,)).fetchall()
        assert [r[0] for r in got] == [r[0] for r in want], query
        # (candidates above the row count: which of many rows with equal ts_rank one node keeps at
        # its LIMIT is its plan's choice, on one node as on several; above it, every side is ranked
        # whole, ties by key, and the fusion must agree exactly)
        got = db.execute("SELECT key, vector_rank, text_rank FROM embed_sidecar.hybrid_search_shards(%s::regclass[], %s, 10, 1000)",
                         (tables, query)).fetchall()
        want = db.execute("SELECT key, vector_rank, text_rank FROM embed_sidecar.hybrid_search('docs_all', %s, 10, 1000)",
                          (query,)).fetchall()
        assert got == want, query


def test_replicated_changes_reach_the_right_node(query_node):
    db, publisher, shards = query_node
    with publisher.connect() as p:
        p.execute("INSERT INTO docs VALUES (100001, 'a lighthouse keeper feeding seagulls in a storm')")
        p.execute("DELETE FROM docs WHERE id = 1")
    eventually(lambda: merged(db, "lighthouse keeper and seagulls", 1)[0][1] == [100001], "the new row is not found")
    eventually(lambda: not any(r[1] == [1] for r in merged(db, "document 1 about mountains", 50)), "the deleted row is still found")


def test_a_node_down_is_an_error_or_an_explicitly_partial_answer(query_node):
    db, publisher, shards = query_node
    shards[1].stop()
    try:
        with pytest.raises(psycopg.Error) as e:
            merged(db, QUERIES[0])
        assert e.value.sqlstate.startswith("08")
        assert "a shard did not answer" in e.value.diag.message_primary
        assert "partial => true" in e.value.diag.message_hint
        warnings = []
        db.add_notice_handler(lambda n: warnings.append(n.message_primary))
        got = merged(db, QUERIES[0], partial=True)
        assert got and all(r[3] is False for r in got)  # every row says the answer is incomplete
        assert any("did not answer" in w and "docs_vectors_1" in w for w in warnings)
        # what the nodes that answered hold, merged exactly
        up = [0, 2]
        assert [r[1] for r in got] == [r[0] for r in reference(db, QUERIES[0], shards=up)]
    finally:
        shards[1].start()
    assert all(r[3] for r in merged(db, QUERIES[0]))


def test_a_shard_of_another_model_is_refused_not_mixed(db):
    """A node whose vectors were made by another model (other files) is an error, never compared
    with the query's vector (a search never mixes models). Any relation with the key columns,
    embedding and model is a shard, so a local table stands in for a node here."""
    db.execute("CREATE TABLE other_node (id int, embedding vector(384), model text)")
    db.execute("INSERT INTO other_node SELECT 1, embed_text('x'), 'all-MiniLM-L6-v2@000000000000'")
    with pytest.raises(psycopg.Error) as e:
        db.execute("SELECT * FROM embed_sidecar.search_shards(ARRAY['other_node']::regclass[], 'x', 5)")
    assert e.value.sqlstate == "55000" and "holds vectors of model" in e.value.diag.message_primary
    db.execute("CREATE TABLE not_a_shard (id int, body text)")
    with pytest.raises(psycopg.Error) as e:
        db.execute("SELECT * FROM embed_sidecar.search_shards(ARRAY['not_a_shard']::regclass[], 'x', 5)")
    assert e.value.sqlstate == "42809"
