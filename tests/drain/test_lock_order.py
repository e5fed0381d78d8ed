"""The drain and an owner's DDL on a watched table never deadlock.

DDL locks the table first and the registry row after (the event triggers of sql/events.sql);
unwatch() locks the row first and the tables after. A drain that waited for the table while it held
the registry row deadlocked with the first kind: CI once saw an owner's DROP TABLE ... CASCADE fail
with 40P01, the deadlock detector having picked it. The drain now takes the tables without waiting
while it holds the row (sql/drain.sql, `_lock_for_drain`).

To make the old cycle certain rather than likely, the DDL's session runs with deadlock_timeout
50 ms (the worker's stays at 1 s): whenever the two wait for each other, the DDL is the one that
finds out and fails."""
import psycopg
import pytest

from conftest import assert_in_step, connect, one, wait, wait_until, watch, worker_pid

ROWS = 3000


def worker_waits_on(conn, table):
    """Whether the drain worker waits for a lock on `table`."""
    return one(conn, """SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                         WHERE a.backend_type = 'pg_embed_sidecar worker' AND NOT l.granted
                           AND l.relation = %s::regclass""", (table,)) > 0


@pytest.mark.parametrize("ddl", ["DROP TABLE {t} CASCADE", "ALTER TABLE {t} RENAME COLUMN body TO content"])
def test_ddl_on_a_table_the_drain_is_working_on_never_deadlocks(db, ddl):
    s = db.schema
    table = f'"{s}".docs'
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("CREATE TABLE other (id int PRIMARY KEY, body text)")
    db.execute(f"INSERT INTO docs SELECT g, 'document number ' || g FROM generate_series(1, {ROWS}) g")
    watch(db, "other")
    pid = worker_pid()
    # a backfill long enough that the worker is still on it when the lock is taken
    watch(db, "docs")
    sid = one(db, "SELECT id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    with connect() as owner:
        owner.execute("SET deadlock_timeout = '50ms'")
        try:
            with owner.transaction():
                owner.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                with connect() as look:
                    # before the fix the worker came to wait here holding the registry row; now it
                    # skips the table while it is locked (either way within a few passes)
                    wait_until(lambda: worker_waits_on(look, table), 5)
                owner.execute(ddl.format(t=table))
        except psycopg.errors.DeadlockDetected as e:
            pytest.fail(f"the owner's DDL deadlocked with the drain: {e}")
    assert worker_pid() == pid, "the drain worker restarted"
    if ddl.startswith("DROP"):
        assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE id = %s", (sid,)) == 0
        assert one(db, "SELECT count(*) FROM pgmq.meta WHERE queue_name LIKE %s", (f"embed_sidecar_{sid}%",)) == 0
    else:
        # the renamed table drains to the end, every vector its row's
        wait(db, "docs", 300)
        assert_in_step(db, "docs", content="content")
    # the worker goes on with the other table
    db.execute("INSERT INTO other VALUES (1, 'still drained')")
    wait(db, "other")
    assert_in_step(db, "other")
