"""Replicas and failover: with a streaming-replication standby (scripts/standby.sh),
embed_text, search and hybrid_search work there read-only, no worker runs there, and after the
primary goes away and the standby is promoted, its worker drains what was pending."""
import os
import subprocess
import time

from conftest import STANDBY_PORT, assert_in_step, connect, one, wait, watch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def script(name, *args):
    subprocess.run(["bash", os.path.join(REPO, "scripts", name), *args], check=True, capture_output=True)


def on_standby(schema):
    conn = connect(port=STANDBY_PORT)
    conn.execute(f'SET search_path = "{schema}", public')
    return conn


def workers(conn):
    return one(conn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker'")


def test_standby_serves_search_and_promotion_drains_the_backlog(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'replicated row number ' || i FROM generate_series(1, 20) i")
    watch(db, "docs")
    wait(db, "docs")
    one(db, "SELECT embed_sidecar.pause('docs')")
    db.execute("INSERT INTO docs SELECT i, 'pending at failover ' || i FROM generate_series(21, 30) i")
    lsn = one(db, "SELECT pg_current_wal_lsn()::text")
    script("standby.sh", "destroy")
    script("standby.sh", "start")
    try:
        s = on_standby(db.schema)
        deadline = time.time() + 60
        while not one(s, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)):
            assert time.time() < deadline, "standby did not catch up"
            time.sleep(0.1)
        assert one(s, "SELECT pg_is_in_recovery()")
        assert one(s, "SELECT vector_dims(embed_text('a read-only embedding'))") == 384
        assert len(s.execute("SELECT * FROM embed_sidecar.search('docs', 'replicated row', 5)").fetchall()) == 5
        assert len(s.execute("SELECT * FROM embed_sidecar.hybrid_search('docs', 'replicated row', 5)").fetchall()) == 5
        assert one(s, "SELECT pending FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 10
        assert workers(s) == 0  # nothing drains on a standby
        s.close()

        # failover: the primary goes away, the standby is promoted and its worker starts
        script("cluster.sh", "stop")
        script("standby.sh", "promote")
        p = on_standby(db.schema)
        assert not one(p, "SELECT pg_is_in_recovery()")
        one(p, "SELECT embed_sidecar.resume('docs')")
        wait(p, "docs", 120)
        assert_in_step(p, "docs")
        assert one(p, "SELECT count(*) FROM docs_embeddings") == 30
        assert workers(p) >= 1
        p.close()
    finally:
        script("standby.sh", "destroy")
        script("cluster.sh", "start")
