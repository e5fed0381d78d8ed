"""Review 9: attacks on the locks between the drain (its worker, its index builder) and everybody
else (sql/drain.sql, `_lock_for_drain`; src/drain/mod.rs, store.rs).

The promises attacked: an owner's DDL and management calls never fail with a deadlock because of
the drain, nor wait for it more than a few seconds; the drain is never stalled for other tables by
one table's locks; nothing is lost or dead-lettered for a lock; no worker restart; the lock
function is not callable by unprivileged roles.

To make a deadlock cycle certain rather than likely, the attacking session runs with
deadlock_timeout 50 ms (the worker's stays at 1 s): whenever the two wait for each other, the
attacker is the one that finds out and fails. No assertion is on timing: conditions are waited
for with generous timeouts."""
import contextlib
import time

import psycopg
import pytest

from conftest import (assert_in_step, connect, connect_as, error_of, one, queue_depth, wait, wait_until,
                      watch, worker_pid)

WORKER = "pg_embed_sidecar worker"
BUILDER = "pg_embed_sidecar index build"


def waits_for_lock(conn, backend_type, kind=None):
    """Whether a process of `backend_type` (this database's) waits for a heavyweight lock
    (`kind`: pg_locks.locktype, e.g. 'transactionid', 'relation')."""
    return one(conn, """SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
                         WHERE a.backend_type = %s AND a.datname = current_database()
                           AND (%s::text IS NULL OR l.locktype = %s)""", (backend_type, kind, kind)) > 0


def put_off(conn, table):
    """Whether a message of `table`'s live lane was put off because its row was busy (its read
    not counted, visible again in a moment: src/drain/store.rs, `put_off`): what the worker does
    instead of waiting for a writer's row lock."""
    queue = one(conn, "SELECT queue_name FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'current'",
                (table,))
    return one(conn, f"SELECT count(*) FROM pgmq.q_{queue} WHERE read_ct = 0 AND vt > clock_timestamp()") > 0


def source_id(conn, table, role="current"):
    return one(conn, "SELECT id FROM embed_sidecar.sources WHERE source = %s::regclass AND role = %s", (table, role))


def failures(conn, sid):
    return one(conn, "SELECT count(*) FROM embed_sidecar.failures WHERE source_id = %s", (sid,))


def attacker(schema):
    """A superuser session in the test's schema whose deadlock check runs first (50 ms)."""
    conn = connect()
    conn.execute(f'SET search_path = "{schema}", public')
    conn.execute("SET deadlock_timeout = '50ms'")
    return conn


@contextlib.contextmanager
def worker_setting(name, value):
    """A pg_embed_sidecar setting the running worker reads (ALTER SYSTEM + reload), put back after."""
    with connect() as c:
        c.execute(f"ALTER SYSTEM SET {name} = {value}")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(1.5)  # the worker reloads at its next wake-up (idle naptime 1 s)
    try:
        yield
    finally:
        with connect() as c:
            c.execute(f"ALTER SYSTEM RESET {name}")
            c.execute("SELECT pg_reload_conf()")


def docs(db, rows, name="docs"):
    db.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text)")
    db.execute(f"INSERT INTO {name} SELECT g, 'document number ' || g FROM generate_series(1, {rows}) g")


# --- 1. the worker's write waits for a writer's row lock while it holds the tables -----------------

@pytest.mark.parametrize("then", [
    "ALTER TABLE docs ADD COLUMN extra int",
    "DROP TABLE docs CASCADE",
    "SELECT embed_sidecar.unwatch('docs')",
    "SELECT embed_sidecar.process('docs')",
])
def test_owner_row_lock_then_ddl_never_deadlocks_with_the_drain_write(db, then):
    """The owner's transaction locks a row (SELECT ... FOR UPDATE: as DELETE or a key update
    would) whose change the worker is about to write, then runs DDL or a management call on the
    table. The worker's upsert (FOR KEY SHARE OF src, and the FK check) waits for that row lock
    while it holds the registry row, ROW SHARE on the table and ROW EXCLUSIVE on the sidecar:
    the owner's statement then waits for the worker, a cycle."""
    docs(db, 20)
    watch(db, "docs")
    wait(db, "docs")
    pid = worker_pid()
    db.execute("SELECT embed_sidecar.pause('docs')")
    db.execute("UPDATE docs SET body = 'the first document, changed' WHERE id = 1")
    outcome = None
    with attacker(db.schema) as owner, connect() as look:
        try:
            with owner.transaction():
                owner.execute("SELECT 1 FROM docs WHERE id = 1 FOR UPDATE")
                db.execute("SELECT embed_sidecar.resume('docs')")
                # before the fix the worker came to wait for the row lock; now it puts the row off
                came = wait_until(lambda: waits_for_lock(look, WORKER, "transactionid") or put_off(look, f'"{db.schema}".docs'),
                                  60, step=0.02)
                assert came, "the worker never came to the locked row"
                owner.execute(then)
        except psycopg.errors.DeadlockDetected as e:
            outcome = f"deadlock: {e}"
    assert outcome is None, f"{then!r} deadlocked with the drain's write: {outcome}"
    assert worker_pid() == pid
    if then.startswith(("DROP", "SELECT embed_sidecar.unwatch")):
        return
    wait(db, "docs")
    assert_in_step(db, "docs")
    assert failures(db, source_id(db, "docs")) == 0


def test_owner_many_row_locks_then_ddl_deadlocks_even_with_default_deadlock_timeout(db):
    """As above with no setting changed (deadlock_timeout 1 s on both sides): the owner holds 100
    rows FOR UPDATE whose changes the worker is writing, then alters the table. The worker's
    batch write waits for the first row (2 s), then falls back to one row at a time, waiting
    100 ms for each locked row, all the while holding the tables: when the owner's deadlock check
    runs (1 s after its ALTER started) the worker waits for the owner again, and the owner's
    ALTER TABLE is the victim."""
    docs(db, 150)
    watch(db, "docs")
    wait(db, "docs")
    pid = worker_pid()
    db.execute("SELECT embed_sidecar.pause('docs')")
    db.execute("UPDATE docs SET body = body || ' (changed)' WHERE id <= 100")
    outcome = None
    with connect() as owner, connect() as look:
        owner.execute(f'SET search_path = "{db.schema}"')
        assert one(owner, "SHOW deadlock_timeout") == "1s"
        try:
            with owner.transaction():
                owner.execute("SELECT 1 FROM docs WHERE id <= 100 FOR UPDATE")
                db.execute("SELECT embed_sidecar.resume('docs')")
                assert wait_until(lambda: waits_for_lock(look, WORKER, "transactionid") or put_off(look, f'"{db.schema}".docs'),
                                  60, step=0.02)
                # past the batch's 2 s: before the fix the worker was in its row-at-a-time fallback
                time.sleep(2.5)
                owner.execute("ALTER TABLE docs ADD COLUMN extra int")
        except psycopg.errors.DeadlockDetected as e:
            outcome = f"deadlock: {e}"
    assert outcome is None, f"the owner's ALTER TABLE deadlocked with the drain's write: {outcome}"
    assert worker_pid() == pid


# --- 2. a row locked for a while is dead-lettered ---------------------------------------------------

def test_a_row_locked_for_a_minute_is_not_dead_lettered(db):
    """A writer holds one row FOR UPDATE (a long report, a batch job) for about a minute while its
    change waits in the queue. Each pass fails that row's write (2 s, then 100 ms alone); after
    max_attempts (3) passes it is dead-lettered, and when the lock goes it has no vector."""
    docs(db, 10)
    watch(db, "docs")
    wait(db, "docs")
    sid = source_id(db, "docs")
    db.execute("SELECT embed_sidecar.pause('docs')")
    db.execute("UPDATE docs SET body = 'the first document, changed' WHERE id = 1")
    with connect() as holder:
        holder.execute(f'SET search_path = "{db.schema}"')
        with holder.transaction():
            holder.execute("SELECT 1 FROM docs WHERE id = 1 FOR UPDATE")
            db.execute("SELECT embed_sidecar.resume('docs')")
            # until it is dead-lettered, or 150 s of lock (a batch job's minute or two)
            wait_until(lambda: failures(db, sid) > 0, 150, step=1)
    # the lock is gone: the row must catch up (put off for up to a quarter of its age meanwhile)
    wait_until(lambda: queue_depth(db, "docs") == 0, 120)
    dead = db.execute("SELECT key::text, attempts, error FROM embed_sidecar.failures WHERE source_id = %s",
                      (sid,)).fetchall()
    assert dead == [], f"a row held by a lock was dead-lettered: {dead}"
    assert_in_step(db, "docs")


# --- 3. a table lock that lets the worker read but not write --------------------------------------

def test_a_long_create_index_on_the_sidecar_dead_letters_nothing(db):
    """CREATE INDEX on the sidecar (SHARE: blocks the worker's ROW EXCLUSIVE, not its ACCESS SHARE)
    in a long transaction while writers go on. The worker reads the messages each round (read_ct
    goes up), fails its write after 2 s, and the messages reappear after the visibility timeout;
    a message read more than max_attempts times is dead-lettered ('read N times without being
    settled') by the first write that succeeds: once the index is done, rows are dead-lettered
    instead of embedded. With the default visibility timeout (60 s) that takes a lock of about
    4 minutes; the test lowers it to 3 s so that it takes seconds."""
    docs(db, 10)
    side = watch(db, "docs")
    wait(db, "docs")
    sid = source_id(db, "docs")
    queue = one(db, "SELECT queue_name FROM embed_sidecar.sources WHERE id = %s", (sid,))
    pid = worker_pid()
    with worker_setting("pg_embed_sidecar.visibility_timeout", 3), attacker(db.schema) as owner:
        with owner.transaction():
            owner.execute(f"CREATE INDEX ON {side} (embedded_at)")  # holds SHARE on the sidecar until commit
            for i in range(1, 6):
                db.execute("UPDATE docs SET body = %s WHERE id = %s", (f"changed while indexing {i}", i))
            wait_until(lambda: (one(db, f"SELECT max(read_ct) FROM pgmq.q_{queue}") or 0) > 3, 180, step=1)
            max_reads = one(db, f"SELECT max(read_ct) FROM pgmq.q_{queue}")
        wait_until(lambda: queue_depth(db, "docs") == 0, 120)
    dead = db.execute("SELECT key::text, attempts, error FROM embed_sidecar.failures WHERE source_id = %s",
                      (sid,)).fetchall()
    assert worker_pid() == pid
    assert dead == [], f"after a CREATE INDEX on the sidecar (messages read up to {max_reads} times): dead letters {dead}"
    assert_in_step(db, "docs")


# --- 4. the index builder holds the registry row while it waits for the sidecar -------------------

@pytest.mark.parametrize("then", [
    "ALTER TABLE docs RENAME COLUMN body TO content",
    "SELECT embed_sidecar.pause('docs')",
    "SELECT embed_sidecar.unwatch('docs')",
])
def test_owner_lock_on_the_sidecar_then_ddl_never_deadlocks_with_the_index_builder(db, then):
    """A deferred HNSW index (bulk_index_rows) is built by the drain's index builder:
    _build_index_if_ready locks the registry row FOR UPDATE, then CREATE INDEX waits for the
    sidecar (lock_timeout 2 s) holding it: the very order _lock_for_drain was written to avoid.
    The owner holds a lock on the sidecar (ANALYZE / LOCK TABLE ... SHARE UPDATE EXCLUSIVE, which
    the drain's writes do not conflict with), then renames a column / pauses / unwatches: those
    lock the registry row, held by the builder, which waits for the owner."""
    db.execute("SET pg_embed_sidecar.bulk_index_rows = 1")
    docs(db, 60)
    side = watch(db, "docs")
    sid = source_id(db, "docs")
    assert one(db, "SELECT index_pending FROM embed_sidecar.sources WHERE id = %s", (sid,))
    pid = worker_pid()
    outcome = None
    with attacker(db.schema) as owner, connect() as look:
        try:
            with owner.transaction():
                owner.execute(f"LOCK TABLE {side} IN SHARE UPDATE EXCLUSIVE MODE")
                # the backfill goes on (the drain's writes take ROW EXCLUSIVE); when its bulk lane is
                # empty, the builder starts, takes the registry row, and waits for the sidecar
                # before the fix the builder came to wait for the sidecar; now it tries again
                # later: wait for the backfill to be done, and a while for the builder
                assert wait_until(lambda: waits_for_lock(look, BUILDER, "relation")
                                  or one(look, "SELECT queue_length FROM pgmq.metrics(%s)",
                                         (f"embed_sidecar_{sid}_bulk",)) == 0, 240, step=0.02)
                wait_until(lambda: waits_for_lock(look, BUILDER, "relation"), 5, step=0.02)
                owner.execute(then)
        except psycopg.errors.DeadlockDetected as e:
            outcome = f"deadlock: {e}"
    assert outcome is None, f"{then!r} deadlocked with the index builder: {outcome}"
    assert worker_pid() == pid
    if "unwatch" in then:
        return
    if "pause" in then:
        db.execute("SELECT embed_sidecar.resume('docs')")
    wait(db, "docs", 240)
    assert_in_step(db, "docs", content="content" if "RENAME" in then else "body")


# --- 5. the drain is not stalled for other owners' tables -----------------------------------------

@pytest.mark.parametrize("lock", [
    "LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE",
    "LOCK TABLE {t} IN EXCLUSIVE MODE",
    "LOCK TABLE {side} IN SHARE MODE",
    "LOCK TABLE {side} IN ACCESS EXCLUSIVE MODE",
    "SELECT 1 FROM {t} FOR UPDATE",
])
def test_one_owners_long_lock_does_not_stop_other_owners_tables(db, make_role, lock):
    """alice holds a lock on her table or sidecar in a long transaction (rows changed before it
    wait in her queue); meanwhile bob's table is written 5 times and must catch up each time,
    while alice's lock is still held; then alice's table catches up."""
    alice, bob = make_role("r9_alice"), make_role("r9_bob")
    s = db.schema
    db.execute(f"GRANT EXECUTE ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name) TO {alice}, {bob}")
    with connect_as(alice, s) as a, connect_as(bob, s) as b:
        docs(a, 50, "a_docs")
        docs(b, 5, "b_docs")
        a_side = watch(a, "a_docs")
        watch(b, "b_docs")
        # (waits and checks as the superuser: wait() is not granted to these roles)
        wait(db, "a_docs")
        wait(db, "b_docs")
        pid = worker_pid()
        a.execute("UPDATE a_docs SET body = body || ' (edited)'")
        with a.transaction():
            a.execute(lock.format(t="a_docs", side=a_side))
            for i in range(5):
                b.execute("UPDATE b_docs SET body = %s WHERE id = %s", (f"bob's edit {i}", i + 1))
                wait(db, "b_docs", 90)
            assert_in_step(db, "b_docs")
        wait(db, "a_docs", 120)
        assert_in_step(db, "a_docs")
        assert worker_pid() == pid
        sid = source_id(db, "a_docs")
        assert failures(db, sid) == 0


# --- 6. owner DDL during a backfill and live writes ------------------------------------------------

DDL = [
    "ALTER TABLE docs ADD COLUMN extra int",
    "ALTER TABLE docs ALTER COLUMN body SET STATISTICS 200",
    "ALTER TABLE docs RENAME COLUMN body TO content",
    "TRUNCATE docs CASCADE",
    "VACUUM FULL docs",
    "CLUSTER docs USING docs_pkey",
    "CREATE INDEX ON docs (body)",
    "CREATE INDEX ON {side} (embedded_at)",
    "LOCK TABLE docs IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3)",
    "LOCK TABLE {side} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(3)",
    "SELECT embed_sidecar.pause('docs'); SELECT embed_sidecar.resume('docs')",
    "SELECT embed_sidecar.process('docs', 50)",
    "SELECT embed_sidecar.unwatch('docs')",
    "DROP TABLE docs CASCADE",
]


@pytest.mark.parametrize("ddl", DDL)
def test_owner_ddl_during_backfill_and_live_writes(db, ddl):
    """Each statement (in one transaction, deadlock_timeout 50 ms) while the worker backfills
    3000 rows and a second session keeps updating the same table: no deadlock, the worker stays,
    and what is still watched ends in step with nothing dead-lettered."""
    docs(db, 3000)
    db.execute("CREATE TABLE other (id int PRIMARY KEY, body text)")
    watch(db, "other")
    side = watch(db, "docs")
    sid = source_id(db, "docs")
    pid = worker_pid()
    # the worker is on it: some vectors are written, the queue is not empty
    wait_until(lambda: one(db, f"SELECT count(*) FROM {side}") > 0, 120)
    writer = connect()
    writer.execute(f'SET search_path = "{db.schema}"')
    col = "content" if "RENAME" in ddl else "body"
    outcome = None
    with attacker(db.schema) as owner:
        try:
            for i in range(1, 21):
                writer.execute(f"UPDATE docs SET body = body || ' +' WHERE id = %s", (i * 7,))
            if ddl.startswith("VACUUM"):
                owner.execute(ddl)  # (not in a transaction block)
            else:
                with owner.transaction():
                    for stmt in ddl.format(side=side).split("; "):
                        owner.execute(stmt)
            for i in range(21, 41 if "DROP" not in ddl else 21):
                writer.execute(f"UPDATE docs SET {col} = {col} || ' +' WHERE id = %s", (i * 7,))
        except psycopg.errors.DeadlockDetected as e:
            outcome = f"deadlock: {e}"
        finally:
            writer.close()
    assert outcome is None, f"{ddl!r} deadlocked with the drain: {outcome}"
    assert worker_pid() == pid
    if "unwatch" in ddl or "DROP" in ddl:
        assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE id = %s", (sid,)) == 0
    else:
        wait(db, "docs", 400)
        assert_in_step(db, "docs", content=col)
        assert failures(db, sid) == 0
    db.execute("INSERT INTO other VALUES (1, 'still drained')")
    wait(db, "other")
    assert_in_step(db, "other")


# --- 7. promotion of a shadow (set_model) -------------------------------------------------------

def test_reader_of_the_view_during_promotion_neither_deadlocks_nor_leaves_the_view_stale(db, model_copy):
    """The worker promotes a complete shadow in its read phase, holding ACCESS SHARE on the table
    and the shadow sidecar, and redefines the embedding's view (ACCESS EXCLUSIVE on it), waiting.
    A reader of the view (the owner, in a transaction) then alters the table: a cycle. And when the
    view's redefinition times out, _create_view only warns: the view keeps showing the replaced
    model while the registry says the shadow is current."""
    model_copy("r9-minilm-copy")
    docs(db, 200)
    watch(db, "docs", view_name="docs_view")
    wait(db, "docs")
    pid = worker_pid()
    outcome = None
    with attacker(db.schema) as owner, connect() as look:
        try:
            with owner.transaction():
                owner.execute("SELECT count(*) FROM docs_view")
                db.execute("SELECT embed_sidecar.set_model('docs', 'r9-minilm-copy')")
                # before the fix the worker came to wait for the view; now it gives the promotion
                # up at once (20 ms) and tries again: wait for the shadow to be complete instead
                shadow_done = f"""SELECT count(*) FROM embed_sidecar.sources s,
                                         LATERAL (VALUES (s.queue_name), (s.queue_name || '_bulk')) q(name),
                                         LATERAL pgmq.metrics(q.name) m
                                   WHERE s.source = '"{db.schema}".docs'::regclass AND s.role = 'shadow'
                                  HAVING sum(m.queue_length) = 0"""
                came = wait_until(
                    lambda: one(look, """SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
                                          WHERE a.backend_type = %s AND l.relation = %s::regclass""",
                                (WORKER, f'"{db.schema}".docs_view')) > 0 or one(look, shadow_done), 240, step=0.02)
                assert came, "the shadow never came to be promoted"
                owner.execute("ALTER TABLE docs ADD COLUMN extra int")
        except psycopg.errors.DeadlockDetected as e:
            outcome = f"deadlock: {e}"
    assert outcome is None, f"ALTER TABLE by a reader of the view deadlocked with the promotion: {outcome}"
    assert worker_pid() == pid
    assert wait_until(lambda: one(db, "SELECT model FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'")
                      == "r9-minilm-copy", 240)
    current = one(db, "SELECT sidecar::text FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'")
    view_def = one(db, "SELECT pg_get_viewdef('docs_view'::regclass)")
    assert current.split(".")[-1].strip('"') in view_def, f"the view still reads the replaced sidecar: {view_def}"


# --- 8. the lock function is the extension's own ---------------------------------------------------

def test_unprivileged_roles_cannot_call_lock_for_drain(db, make_role):
    owner, mallory = make_role("r9_owner"), make_role("r9_mallory")
    db.execute(f"GRANT EXECUTE ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name) TO {owner}")
    with connect_as(owner, db.schema) as o:
        docs(o, 3)
        watch(o, "docs")
    wait(db, "docs")
    sid = source_id(db, "docs")
    for who in (mallory, owner):
        with connect_as(who, db.schema) as m:
            for writing in ("true", "false"):
                err = error_of(m, f"SELECT embed_sidecar._lock_for_drain({sid}, {writing})")
                assert err is not None and err[0] == "42501", f"{who} could call _lock_for_drain: {err}"
            err = error_of(m, f"SELECT embed_sidecar._lock_source({sid})")
            assert err is not None and err[0] == "42501", f"{who} could call _lock_source: {err}"
            # nor lock the registry rows directly
            err = error_of(m, "SELECT 1 FROM embed_sidecar.sources FOR SHARE")
            assert err is not None and err[0] == "42501"
