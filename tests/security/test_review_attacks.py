"""An outside review of pg_embed_sidecar 0.3.0: attacks on its five promises, each written as a check
of the promised behaviour, so a test FAILS when its attack works.

  1. Owning a table gives no more power than owning a table.
  2. Who is calling is answered as PostgreSQL's own commands answer it.
  3. A reader sees no row the table hides.
  4. A caller gets only its own vectors; no PUBLIC caller starves the drains or crashes the instance.
  5. Writers' keys are validated; no lock another role can take stalls the drain worker; a failing
     DROP DATABASE by an unprivileged role does not stop that database's drain.

Everything here happens in databases called pes_rev_<tag>... (created and dropped WITH (FORCE) by
the tests) and roles called pes_rev_<what>_<tag>_<n> (dropped at the end). Nothing touches pes_test:
conftest's session fixture `extension` (which re-creates the extension in pes_test) is overridden
below by a no-op. Run with:

    /opt/pg_embed_sidecar/venv/bin/python -m pytest tests/security/test_review_attacks.py -p no:cacheprovider -q
"""
import itertools
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest

from conftest import connect, error_of, one

TAG = uuid.uuid4().hex[:6]
L6 = "all-MiniLM-L6-v2"
L3 = "paraphrase-MiniLM-L3-v2"
WATCH_SIG = "embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name)"
UNWATCH_SIG = "embed_sidecar.unwatch(regclass, boolean, text)"
PROCESS_SIG = "embed_sidecar.process(regclass, int)"


@pytest.fixture(scope="session", autouse=True)
def extension():
    """Overrides conftest's fixture of the same name: this file never touches pes_test."""
    yield


# ---------------------------------------------------------------------------------------------
# databases and roles of this file
# ---------------------------------------------------------------------------------------------

_roles = []
_dbs = []
# numbers the roles and databases of this run (TAG tells runs apart): 4 random hex digits a name
# collided once in a CI run, among the dozens of "alice"s this file makes
_serial = itertools.count(1)


def role(what, *options):
    """A new login role pes_rev_<what>_<tag>_<n>, dropped at the end of the module."""
    name = f"pes_rev_{what}_{TAG}_{next(_serial)}"
    with connect(dbname="postgres") as c:
        c.execute(f'CREATE ROLE "{name}" LOGIN {" ".join(options)}')
    _roles.append(name)
    return name


def wait_worker(dbname, timeout=40):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with connect(dbname="postgres") as c:
            pid = one(c, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' AND datname = %s",
                      (dbname,))
        if pid:
            return pid
        time.sleep(0.3)
    return None


def make_db(suffix, owner=None):
    name = f"pes_rev_{TAG}_{suffix}"
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name}" + (f' OWNER "{owner}"' if owner else ""))
    _dbs.append(name)
    with connect(dbname=name) as c:
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
    assert wait_worker(name), f"no drain worker started for {name}"
    return name


def drop_db(name):
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    if name in _dbs:
        _dbs.remove(name)


@pytest.fixture(scope="module", autouse=True)
def cleanup():
    yield
    for name in list(_dbs):
        try:
            drop_db(name)
        except psycopg.Error:
            pass
    with connect(dbname="postgres") as c:
        for name in reversed(_roles):
            try:
                c.execute(f'DROP ROLE IF EXISTS "{name}"')
            except psycopg.Error:
                pass


@pytest.fixture(scope="module")
def shared():
    """One database for the attacks that leave nothing running behind them."""
    return make_db("shared")


@pytest.fixture
def fresh():
    """A database of the test's own, for attacks that stall or poison its drain worker."""
    made = []

    def mk(suffix="x"):
        name = make_db(f"{suffix}_{next(_serial)}")
        made.append(name)
        return name

    yield mk
    for name in made:
        drop_db(name)


def db(dbname, user=None, **kw):
    return connect(dbname=dbname, **({"user": user} if user else {}), **kw)


def uid():
    return uuid.uuid4().hex[:6]


def schema_for(admin, *roles_with_create):
    """A schema of the test's own in the connected database (owner: postgres), USAGE for PUBLIC."""
    s = f"t_{uid()}"
    admin.execute(f'CREATE SCHEMA "{s}"')
    admin.execute(f'GRANT USAGE ON SCHEMA "{s}" TO PUBLIC')
    for r in roles_with_create:
        admin.execute(f'GRANT CREATE ON SCHEMA "{s}" TO "{r}"')
    return s


def waited(conn, table, seconds):
    return one(conn, "SELECT embed_sidecar.wait(%s::regclass, make_interval(secs => %s))", (table, seconds))


def owner_table(dbname, owner, table, rows=0):
    """`owner` creates `table` (id int PRIMARY KEY, body text) with `rows` rows."""
    with db(dbname, owner) as c:
        c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
        if rows:
            c.execute(f"INSERT INTO {table} SELECT i, 'row ' || i || ' of {table}' FROM generate_series(1, {rows}) i")


def worker_waits_on_lock(dbname):
    with connect(dbname="postgres") as c:
        return one(c, """SELECT wait_event_type || ':' || wait_event FROM pg_stat_activity
                          WHERE backend_type = 'pg_embed_sidecar worker' AND datname = %s AND wait_event_type = 'Lock'""",
                   (dbname,))


# ---------------------------------------------------------------------------------------------
# Promise 5: locks another role can take
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("locker", ["owner", "writer_with_update", "role_without_privileges_via_create_rule"])
def test_table_lock_on_one_source_does_not_stall_the_drain_of_the_others(fresh, locker):
    """Promise 5 (no lock another role can take stalls the drain worker). Attack: after a change to
    watched table a is queued, a lock on a is held in an open transaction: by a's owner (LOCK TABLE
    ... IN ACCESS EXCLUSIVE MODE), by a writer holding only UPDATE on it (the same LOCK TABLE), or by
    a role with no privilege at all on a: CREATE RULE ... ON INSERT TO a DO ALSO SELECT * FROM m
    takes ACCESS EXCLUSIVE on a before PostgreSQL checks ownership, then waits, holding it, for the
    lock the same role holds on its own table m. The worker's pass for a reads it (the lookup,
    src/drain/mod.rs Pass::begin -> lookup) with no lock_timeout (WORKER_LOCK_TIMEOUT is only set for
    the write), so it waits for the lock and no other table of the database is drained. Promised:
    another table's new row is still embedded within 20 s."""
    d = fresh("tlock")
    alice, eve, mallory = role("alice"), role("eve"), role("mallory")
    with db(d) as admin:
        s = schema_for(admin, alice, mallory)
        owner_table(d, alice, f"{s}.a")
        admin.execute(f"CREATE TABLE {s}.b (id int PRIMARY KEY, body text)")
        admin.execute(f'GRANT SELECT, UPDATE ON {s}.a TO "{eve}"')
        one(admin, f"SELECT embed_sidecar.watch('{s}.a', 'body')")
        one(admin, f"SELECT embed_sidecar.watch('{s}.b', 'body')")
        one(admin, f"SELECT embed_sidecar.pause('{s}.a')")
        with db(d, alice) as a:
            a.execute(f"INSERT INTO {s}.a VALUES (1, 'queued before the lock')")
        holders, threads = [], []
        try:
            if locker == "role_without_privileges_via_create_rule":
                m1 = db(d, mallory)
                holders.append(m1)
                m1.execute(f"CREATE TABLE {s}.m (x int)")
                assert not one(m1, f"SELECT has_any_column_privilege('{s}.a', 'SELECT, INSERT, UPDATE, REFERENCES')")
                m1.execute("BEGIN")
                m1.execute(f"LOCK TABLE {s}.m IN ACCESS EXCLUSIVE MODE")
                m2 = db(d, mallory)
                holders.append(m2)
                t = threading.Thread(target=error_of, args=(m2, f"CREATE RULE r AS ON INSERT TO {s}.a DO ALSO SELECT * FROM {s}.m"))
                t.start()
                threads.append(t)
                deadline = time.time() + 5
                while time.time() < deadline and not one(
                        admin, f"""SELECT count(*) FROM pg_locks WHERE relation = '{s}.a'::regclass AND granted
                                    AND mode = 'AccessExclusiveLock'"""):
                    time.sleep(0.1)
            else:
                h = db(d, alice if locker == "owner" else eve)
                holders.append(h)
                h.execute("BEGIN")
                h.execute(f"LOCK TABLE {s}.a IN ACCESS EXCLUSIVE MODE")
            one(admin, f"SELECT embed_sidecar.resume('{s}.a')")
            deadline = time.time() + 5
            while time.time() < deadline and not worker_waits_on_lock(d):
                time.sleep(0.1)
            admin.execute(f"INSERT INTO {s}.b VALUES (1, 'must not wait for a')")
            ok = waited(admin, f"{s}.b", 20)
            stuck = worker_waits_on_lock(d)
            assert ok, f"the other table was not drained in 20 s while a lock on {s}.a was held (worker waits on {stuck})"
        finally:
            for h in holders:
                h.close()
            for t in threads:
                t.join(10)


def test_row_locks_on_many_queued_rows_do_not_stall_the_drain_of_the_others(fresh):
    """Promise 5. Attack (M1 revisited with more rows): a writer with UPDATE on table a changes its
    30 rows (30 keys queued), then holds SELECT ... FOR UPDATE on all of them in an open transaction.
    The worker's write waits lock_timeout (2 s) for the batch, then again 2 s for each row
    (sql/drain.sql _write's row-by-row retry), ~62 s in which no other table is drained; more rows
    make it longer (batch_size 256: ~8.5 minutes a pass). Promised: table b's new row is embedded
    within 20 s."""
    d = fresh("rlock")
    eve = role("eve")
    with db(d) as admin:
        s = schema_for(admin)
        admin.execute(f"CREATE TABLE {s}.a (id int PRIMARY KEY, body text)")
        admin.execute(f"CREATE TABLE {s}.b (id int PRIMARY KEY, body text)")
        admin.execute(f"INSERT INTO {s}.a SELECT i, 'row ' || i FROM generate_series(1, 30) i")
        one(admin, f"SELECT embed_sidecar.watch('{s}.a', 'body')")
        one(admin, f"SELECT embed_sidecar.watch('{s}.b', 'body')")
        assert waited(admin, f"{s}.a", 60)
        admin.execute(f'GRANT SELECT, UPDATE ON {s}.a TO "{eve}"')
        one(admin, f"SELECT embed_sidecar.pause('{s}.a')")
        writer = db(d, eve)
        try:
            writer.execute(f"UPDATE {s}.a SET body = body || ' (changed)'")
            writer.execute("BEGIN")
            writer.execute(f"SELECT * FROM {s}.a FOR UPDATE").fetchall()
            one(admin, f"SELECT embed_sidecar.resume('{s}.a')")
            deadline = time.time() + 5
            while time.time() < deadline and not worker_waits_on_lock(d):
                time.sleep(0.1)
            admin.execute(f"INSERT INTO {s}.b VALUES (1, 'must not wait for a')")
            assert waited(admin, f"{s}.b", 20), \
                f"table b was not drained in 20 s while a writer held row locks on a (worker waits on {worker_waits_on_lock(d)})"
        finally:
            writer.close()


def test_planted_slow_code_of_one_owner_does_not_stall_the_drain_of_the_others(fresh):
    """Promise 1 (owning a table gives no more power than owning a table) / availability. Attack:
    the owner of a watched table plants a trigger on her sidecar that sleeps 40 s (any long
    computation will do). The single drain worker of the database runs it with no statement
    timeout, so while it runs no other owner's table is drained. Promised: another owner's new row is
    embedded within 20 s."""
    d = fresh("slow")
    alice = role("alice")
    with db(d) as admin:
        s = schema_for(admin, alice)
        owner_table(d, alice, f"{s}.a")
        admin.execute(f"CREATE TABLE {s}.b (id int PRIMARY KEY, body text)")
        one(admin, f"SELECT embed_sidecar.watch('{s}.a', 'body')")
        one(admin, f"SELECT embed_sidecar.watch('{s}.b', 'body')")
        with db(d, alice) as a:
            a.execute(f"""CREATE FUNCTION {s}.slow() RETURNS trigger LANGUAGE plpgsql AS $$
                          BEGIN PERFORM pg_catalog.pg_sleep(40); RETURN NEW; END $$""")
            a.execute(f"CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON {s}.a_embeddings FOR EACH ROW EXECUTE FUNCTION {s}.slow()")
            a.execute(f"INSERT INTO {s}.a VALUES (1, 'takes the worker for 40 s')")
        time.sleep(2)
        admin.execute(f"INSERT INTO {s}.b VALUES (1, 'must not wait for a')")
        assert waited(admin, f"{s}.b", 20), "another owner's row waited behind the planted sleep"


def test_a_writers_korean_row_in_a_chunked_table_does_not_kill_the_drain_worker(fresh):
    """Promises 4 and 5 (a caller's text cannot take the service down; nothing a writer does stops
    the drain). Attack: a role with INSERT on a chunked table inserts an ordinary Korean text longer
    than one passage. The tokenizer splits each Hangul syllable into jamo tokens that share one
    offset range, and the chunker's boundary() (crates/embed_core/src/chunker.rs) slices
    text[offsets[i-1].1..offsets[i].0] with begin > end: a Rust panic. chunk_text() and verify()
    turn it into an ERROR, but the drain calls chunking::split outside any transaction or catch
    (src/drain/mod.rs Pass::begin), so the panic ends the database's drain worker (exit code 1); the
    message comes back after the visibility timeout and kills it again, until read 4 times; every
    such row does the same. Promised: the worker survives (same pid) and another table still drains."""
    d = fresh("hangul")
    eve = role("eve")
    with db(d) as admin:
        s = schema_for(admin)
        admin.execute(f"CREATE TABLE {s}.docs (id int PRIMARY KEY, body text)")
        admin.execute(f"CREATE TABLE {s}.other (id int PRIMARY KEY, body text)")
        admin.execute(f'GRANT SELECT, INSERT ON {s}.docs TO "{eve}"')
        one(admin, f"SELECT embed_sidecar.watch('{s}.docs', 'body', chunking => true)")
        one(admin, f"SELECT embed_sidecar.watch('{s}.other', 'body')")
        # control: the chunker itself refuses such a text for anyone (here a clean ERROR)
        err = error_of(admin, "SELECT count(*) FROM embed_sidecar.chunk_text(repeat('한국어 문서입니다. ', 60))")
        pid = wait_worker(d)
        with db(d, eve) as e:
            e.execute(f"INSERT INTO {s}.docs VALUES (1, repeat('한국어 문서입니다. ', 60))")
        deadline = time.time() + 12
        pids = set()
        while time.time() < deadline:
            pids.add(one(admin, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' "
                                "AND datname = current_database()"))
            time.sleep(0.3)
        admin.execute(f"INSERT INTO {s}.other VALUES (1, 'after the Korean row')")
        drained = waited(admin, f"{s}.other", 20)
    assert pids == {pid}, f"the drain worker died on a writer's Korean row (pids seen {pids}; chunk_text said {err})"
    assert drained


def test_pgmq_queue_lock_held_by_a_role_without_privileges_does_not_stall_management(shared):
    """Promise 5 in spirit (the code says: 'a row lock, not an advisory lock: any role can take
    advisory locks'). Attack: a role with no privileges at all holds
    pg_advisory_lock(hashtext('pgmq.queue_embed_sidecar_<id>')), the lock pgmq.create() and
    pgmq.drop_queue() take, for a watched table's registry id and for the next ids (ids are
    sequential, so every id can be held). Then the owner's unwatch(), watch() of the next table and
    DROP TABLE of a watched table (through the sql_drop trigger) would wait for it. Promised: each
    completes, with a 10 s lock_timeout as the bound (sql/queues.sql makes the queues without that
    lock)."""
    bob, mallory = role("bob"), role("mallory")
    with db(shared) as admin:
        s = schema_for(admin, bob)
        admin.execute(f'GRANT EXECUTE ON FUNCTION {UNWATCH_SIG}, {WATCH_SIG} TO "{bob}"')
    for t in ("docs", "next", "dropped"):
        owner_table(shared, bob, f"{s}.{t}", rows=1)
    with db(shared) as admin:
        one(admin, f"SELECT embed_sidecar.watch('{s}.docs', 'body')")
        one(admin, f"SELECT embed_sidecar.watch('{s}.dropped', 'body')")
        sid = one(admin, f"SELECT id FROM embed_sidecar.sources WHERE source = '{s}.docs'::regclass")
        top = one(admin, "SELECT last_value FROM embed_sidecar.sources_id_seq")
    m = db(shared, mallory)
    try:
        for i in [sid, *range(top, top + 4)]:
            for lane in ("", "_bulk"):
                one(m, "SELECT pg_advisory_lock(hashtext('pgmq.queue_embed_sidecar_' || %s || %s))", (i, lane))
        with db(shared, bob, options="-c lock_timeout=10s") as b:
            err = error_of(b, f"SELECT embed_sidecar.unwatch('{s}.docs')")
            assert err is None, f"bob's unwatch() waited for a lock held by a role without privileges: {err}"
            err = error_of(b, f"SELECT embed_sidecar.watch('{s}.next', 'body')")
            assert err is None, f"bob's watch() waited for a lock held by a role without privileges: {err}"
            err = error_of(b, f"DROP TABLE {s}.dropped CASCADE")
            assert err is None, f"bob's DROP TABLE waited for a lock held by a role without privileges: {err}"
    finally:
        m.close()
    with db(shared) as admin:
        nid = one(admin, f"SELECT id FROM embed_sidecar.sources WHERE source = '{s}.next'::regclass")
        queues = {r[0] for r in admin.execute("SELECT queue_name FROM pgmq.meta").fetchall()}
        assert f"embed_sidecar_{nid}" in queues and f"embed_sidecar_{nid}_bulk" in queues
        assert f"embed_sidecar_{sid}" not in queues and f"embed_sidecar_{sid}_bulk" not in queues
        # the new table's backfill went through its queues to its sidecar
        assert one(admin, f"SELECT embed_sidecar.wait('{s}.next', '60 s')") is True
        side = one(admin, "SELECT sidecar::text FROM embed_sidecar.sources WHERE id = %s", (nid,))
        assert one(admin, f"SELECT count(*) FROM {side}") == 1


def test_queues_we_make_are_laid_out_as_pgmq_makes_them(shared):
    """sql/queues.sql makes pgmq's tables itself (to avoid pgmq's advisory lock). A queue made by
    pgmq.create() and one made by watch() must not differ in anything pgmq reads: columns, types,
    defaults, NOT NULL, identity, indexes (names with the queue name replaced), the meta row; and
    pgmq's own send/read/delete/archive/metrics/drop_queue work on ours."""
    with db(shared) as admin:
        s = schema_for(admin)
        admin.execute(f"CREATE TABLE {s}.docs (id int PRIMARY KEY, body text)")
        one(admin, f"SELECT embed_sidecar.watch('{s}.docs', 'body', backfill => false)")
        ours = "embed_sidecar_" + str(one(admin, f"SELECT id FROM embed_sidecar.sources WHERE source = '{s}.docs'::regclass"))
        theirs = f"layout_{TAG}"
        admin.execute("SELECT pgmq.create(%s)", (theirs,))
        try:
            def shape(queue):
                cols = admin.execute(
                    """SELECT c.relname ~ '^a_', a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                              a.attidentity, pg_get_expr(d.adbin, d.adrelid)
                         FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
                         LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
                        WHERE c.relnamespace = 'pgmq'::regnamespace AND c.relname IN ('q_' || %s, 'a_' || %s)
                        ORDER BY 1, a.attnum""", (queue, queue)).fetchall()
                idx = admin.execute(
                    """SELECT replace(pg_get_indexdef(i.indexrelid), %s, 'Q')
                         FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
                        WHERE c.relnamespace = 'pgmq'::regnamespace AND c.relname IN ('q_' || %s, 'a_' || %s)
                        ORDER BY 1""", (queue, queue, queue)).fetchall()
                meta = admin.execute("SELECT is_partitioned, is_unlogged FROM pgmq.meta WHERE queue_name = %s",
                                     (queue,)).fetchall()
                return cols, idx, meta
            mine, pgmqs = shape(ours), shape(theirs)
            assert len(mine[0]) == 15 and len(mine[1]) == 4 and mine[2] == [(False, False)], mine
            assert mine == pgmqs
            # pgmq's functions on our queue
            msg = one(admin, "SELECT pgmq.send(%s, '{\"k\": 1}')", (ours,))
            assert one(admin, "SELECT queue_length FROM pgmq.metrics(%s)", (ours,)) == 1
            got = admin.execute("SELECT msg_id, message FROM pgmq.read(%s, 30, 5)", (ours,)).fetchall()
            assert got == [(msg, {"k": 1})]
            assert one(admin, "SELECT pgmq.archive(%s, %s::bigint)", (ours, msg)) is True
            assert one(admin, "SELECT count(*) FROM pgmq.a_" + ours) == 1
            assert one(admin, "SELECT pgmq.drop_queue(%s)", (ours + "_bulk",)) is True
            assert one(admin, "SELECT count(*) FROM pgmq.meta WHERE queue_name = %s", (ours + "_bulk",)) == 0
        finally:
            admin.execute("SELECT pgmq.drop_queue(%s)", (theirs,))


def test_owner_cannot_point_her_table_at_another_sources_queue(shared):
    """Promise 5 / promise 1, held: alice cannot attach the extension's trigger function to her own
    table with another owner's source id (EXECUTE on _enqueue_changes is revoked: 42501), and her
    direct _enqueue() to that id is refused (42501): she cannot make bob's drain work for her."""
    alice, bob = role("alice"), role("bob")
    with db(shared) as admin:
        s = schema_for(admin, alice, bob)
    owner_table(shared, bob, f"{s}.b", rows=1)
    owner_table(shared, alice, f"{s}.a", rows=1)
    with db(shared) as admin:
        one(admin, f"SELECT embed_sidecar.watch('{s}.b', 'body')")
        bid = one(admin, f"SELECT id FROM embed_sidecar.sources WHERE source = '{s}.b'::regclass")
    with db(shared, alice) as a:
        err = error_of(a, f"""CREATE TRIGGER hijack AFTER INSERT ON {s}.a REFERENCING NEW TABLE AS new_rows
                              FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes('{bid}', '2', '{{1}}', '')""")
        assert err is not None and err[0] == "42501", err
        err = error_of(a, "SELECT embed_sidecar._enqueue(%s, ARRAY['[1]'])", (bid,))
        assert err is not None and err[0] == "42501", err


def test_enqueue_validates_keys_as_the_drain_will_read_them(shared):
    """Promise 5 (keys a writer puts on the queue are validated). Attack: the table is keyed by a
    date; writer eve (INSERT only) sets DateStyle = 'ISO, DMY' and calls embed_sidecar._enqueue()
    with the key ["31/12/2020"]. The check (_invalid_keys, run in her session) casts it with her
    DateStyle and accepts it; the drain casts it with its own (ISO, MDY) and fails, three times,
    then dead-letters it. A writer can so fill the dead-letter table and, aimed at a shadow's queue,
    keep set_model() from ever promoting (_promote_if_ready waits while rows are dead-lettered).
    Promised: 22023 at _enqueue, nothing queued, no dead letter."""
    eve = role("eve")
    with db(shared) as admin:
        s = schema_for(admin)
        admin.execute(f"CREATE TABLE {s}.days (day date PRIMARY KEY, body text)")
        admin.execute(f"INSERT INTO {s}.days VALUES ('2020-12-31', 'last day of 2020')")
        admin.execute(f'GRANT SELECT, INSERT ON {s}.days TO "{eve}"')
        one(admin, f"SELECT embed_sidecar.watch('{s}.days', 'body')")
        assert waited(admin, f"{s}.days", 30)
        sid = one(admin, f"SELECT id FROM embed_sidecar.sources WHERE source = '{s}.days'::regclass")
    with db(shared, eve) as e:
        e.execute("SET DateStyle = 'ISO, DMY'")
        err = error_of(e, "SELECT embed_sidecar._enqueue(%s, ARRAY['[\"31/12/2020\"]'])", (sid,))
    with db(shared) as admin:
        if err is None:
            waited(admin, f"{s}.days", 30)
        dead = admin.execute("SELECT key::text, error FROM embed_sidecar.failures WHERE source_id = %s", (sid,)).fetchall()
    assert err is not None and err[0] == "22023" and dead == [], f"accepted (enqueue said {err}); dead letters: {dead}"


# ---------------------------------------------------------------------------------------------
# Promise 5: DROP DATABASE guard
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["CREATE DATABASE {db}_copy TEMPLATE {db}", "ALTER DATABASE {db} RENAME TO {db}_moved"])
def test_failing_database_command_without_createdb_leaves_the_drain_running(command):
    """Promise 5 (a failing DROP DATABASE-like command by a role that may not run it does not stop
    the drain). Attack: the owner of a database, without CREATEDB, runs CREATE DATABASE ... TEMPLATE
    it, or ALTER DATABASE ... RENAME: both always fail (42501, CREATEDB is required), but the guard
    (src/roster/db_guard.rs) only asks 'superuser or owner', so it SIGTERMs the drain worker first; a loop
    of such commands keeps the drain down. Promised: the same worker pid throughout."""
    bob = role("dbowner")
    name = make_db(f"guard_{uid()[:4]}", owner=bob)
    try:
        pid = wait_worker(name)
        with connect(dbname="postgres", user=bob) as b:
            err = error_of(b, command.format(db=name))
        assert err is not None and err[0] == "42501", err
        for _ in range(6):
            time.sleep(0.5)
            with connect(dbname="postgres") as c:
                now = one(c, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' AND datname = %s",
                          (name,))
            assert now == pid, f"the drain worker of {name} was stopped by a command that could not succeed ({pid} -> {now})"
    finally:
        drop_db(name)


def test_unprivileged_drop_database_in_a_pipeline_leaves_the_drain_running(shared):
    """Promise 5, held: a role with no privileges sending DROP DATABASE inside an extended-protocol
    pipeline (where IsTransactionBlock() is false) still gets 42501 and the worker stays."""
    mallory = role("mallory")
    pid = wait_worker(shared)
    with connect(dbname="postgres", user=mallory) as m:
        errors = []
        try:
            with m.pipeline():
                m.execute("SELECT 1")
                m.execute(f"DROP DATABASE {shared}")
        except psycopg.Error as e:
            errors.append(e.sqlstate)
    assert errors and errors[0] in ("42501", "25001"), errors
    time.sleep(2)
    assert wait_worker(shared) == pid


# ---------------------------------------------------------------------------------------------
# Promise 1: planted code and what it leaves behind
# ---------------------------------------------------------------------------------------------

def plant_advisory_lock(dbname, alice, key):
    """Alice's table (watched by the administrator, paused) with a trigger on its sidecar that takes
    a session-level advisory lock; one row queued."""
    with db(dbname) as admin:
        s = schema_for(admin, alice)
    owner_table(dbname, alice, f"{s}.docs")
    with db(dbname) as admin:
        one(admin, f"SELECT embed_sidecar.watch('{s}.docs', 'body')")
        one(admin, f"SELECT embed_sidecar.pause('{s}.docs')")
    with db(dbname, alice) as a:
        a.execute(f"""CREATE FUNCTION {s}.grab() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN PERFORM pg_catalog.pg_advisory_lock({key}); RETURN NEW; END $$""")
        a.execute(f"CREATE TRIGGER grab BEFORE INSERT OR UPDATE ON {s}.docs_embeddings FOR EACH ROW EXECUTE FUNCTION {s}.grab()")
        a.execute(f"INSERT INTO {s}.docs VALUES (1, 'a row whose write takes a lock')")
    return s


def test_planted_session_advisory_lock_is_not_left_in_the_worker(fresh):
    """Promise 1 (nothing her planted code does may be left behind in the worker). Attack: a trigger
    the owner puts on her sidecar calls pg_advisory_lock() (session level, allowed inside a
    security-restricted operation, and not undone by the GUC rollback of src/pg/authority.rs run_as).
    The drain worker keeps holding it after the pass, for as long as it lives: whatever else waits
    for that key (another role's application mutex, pgmq's queue lock of another table) waits for
    the worker. Promised: after the drain, the worker holds no advisory lock."""
    d = fresh("adv")
    alice = role("alice")
    key = 777000 + int(uid()[:3], 16)
    s = plant_advisory_lock(d, alice, key)
    with db(d) as admin:
        one(admin, f"SELECT embed_sidecar.resume('{s}.docs')")
        assert waited(admin, f"{s}.docs", 30)
        assert one(admin, f"SELECT count(*) FROM {s}.docs_embeddings") == 1
        held = admin.execute("""SELECT l.objid FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                                 WHERE a.backend_type = 'pg_embed_sidecar worker' AND a.datname = current_database()
                                   AND l.locktype = 'advisory'""").fetchall()
    assert held == [], f"the drain worker still holds the owner's advisory lock(s) {held}"


def test_planted_session_advisory_lock_is_not_left_in_a_process_callers_session(shared):
    """Promise 1 (nothing planted may be left behind in another role's session). Attack: as above,
    drained by process() in a superuser's session: the superuser's session holds the owner's
    advisory lock afterwards."""
    alice = role("alice")
    key = 778000 + int(uid()[:3], 16)
    s = plant_advisory_lock(shared, alice, key)
    with db(shared) as su:
        assert one(su, f"SELECT embed_sidecar.process('{s}.docs')") == 1
        held = su.execute("SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()").fetchall()
    assert held == [], f"the superuser's session holds the owner's advisory lock(s) {held} after process()"


def test_planted_guc_via_key_domain_check_does_not_outlive_process(shared):
    """Promise 1, held: a domain CHECK on the key type (run by the drain's lookup as the owner) that
    sets search_path and statement_timeout with set_config(..., false) leaves a superuser's
    process() session unchanged."""
    alice = role("alice")
    with db(shared) as admin:
        s = schema_for(admin, alice)
    with db(shared, alice) as a:
        a.execute(f"""CREATE FUNCTION {s}.plant(int) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
                      BEGIN PERFORM pg_catalog.set_config('search_path', '{s}, pg_catalog', false);
                            PERFORM pg_catalog.set_config('statement_timeout', '1', false); RETURN true; END $$""")
        a.execute(f"CREATE DOMAIN {s}.k AS int CHECK ({s}.plant(VALUE))")
        a.execute(f"CREATE TABLE {s}.docs (id {s}.k PRIMARY KEY, body text)")
    with db(shared) as su:
        one(su, f"SELECT embed_sidecar.watch('{s}.docs', 'body')")
        one(su, f"SELECT embed_sidecar.pause('{s}.docs')")
        with db(shared, alice) as a:
            a.execute(f"INSERT INTO {s}.docs SELECT i, 'row ' || i FROM generate_series(1, 5) i")
        before = su.execute("SELECT current_setting('search_path'), current_setting('statement_timeout')").fetchone()
        assert one(su, f"SELECT embed_sidecar.process('{s}.docs')") >= 5
        after = su.execute("SELECT current_setting('search_path'), current_setting('statement_timeout')").fetchone()
    assert after == before


# ---------------------------------------------------------------------------------------------
# Promise 1: rights a table owner gains through watch()
# ---------------------------------------------------------------------------------------------

def test_watch_does_not_create_tables_where_the_owner_may_not(shared):
    """Promise 1 (no right she did not have). Attack: alice owns a table in a schema where she has
    USAGE but no CREATE (CREATE TABLE and CREATE INDEX there fail with 42501). watch(...,
    sidecar_name => 'users') runs CREATE TABLE as the extension's owner (SECURITY DEFINER
    _create_embedding) and hands her the new table: she can then unwatch it, drop its foreign key
    and row security, add columns, grant it, i.e. she now creates tables of any name in that schema.
    PostgreSQL's own CREATE INDEX checks CREATE on the schema even for the table's owner. Promised:
    watch() refuses (42501) and no relation 'users' appears."""
    alice = role("alice")
    with db(shared) as admin:
        s = f"nocreate_{uid()}"
        admin.execute(f"CREATE SCHEMA {s}")
        admin.execute(f'GRANT USAGE ON SCHEMA {s} TO "{alice}"')
        admin.execute(f"CREATE TABLE {s}.t (id int PRIMARY KEY, body text)")
        admin.execute(f'ALTER TABLE {s}.t OWNER TO "{alice}"')
        admin.execute(f'GRANT EXECUTE ON FUNCTION {WATCH_SIG}, {UNWATCH_SIG} TO "{alice}"')
    with db(shared, alice) as a:
        control = error_of(a, f"CREATE TABLE {s}.direct (x int)")
        assert control is not None and control[0] == "42501", control
        err = error_of(a, f"SELECT embed_sidecar.watch('{s}.t', 'body', sidecar_name => 'users')")
        made = one(a, f"SELECT relowner::regrole::text FROM pg_class WHERE oid = to_regclass('{s}.users')")
        if made:
            # show what the new table is good for
            a.execute(f"SELECT embed_sidecar.unwatch('{s}.t')")
            a.execute(f"ALTER TABLE {s}.users DROP CONSTRAINT users_id_fkey, DISABLE ROW LEVEL SECURITY, ADD COLUMN password text")
    assert made is None and err is not None and err[0] == "42501", \
        f"watch() made {s}.users owned by {made} in a schema where its owner may not create (watch said {err})"


def test_former_owner_has_no_hold_on_the_sidecar_after_the_table_changes_hands(shared):
    """Promises 1 and 3 (no right she did not have; only the drain writes the sidecar). Attack:
    alice's watched table is given to bob (ALTER TABLE ... OWNER TO; PostgreSQL moves a table's
    indexes and owned sequences with it). The sidecar stays alice's: she keeps full control of the
    vectors of bob's table (bypasses its row security, inserts fake vectors and lexemes for bob's
    keys that search() then ranks, learns which keys bob's table holds from the foreign key check).
    (The README documents that the drain then fails; it does not say the former owner keeps the
    sidecar.) Promised: alice can no longer write the sidecar of bob's table."""
    alice, bob = role("alice"), role("bob")
    with db(shared) as admin:
        s = schema_for(admin, alice, bob)
    owner_table(shared, alice, f"{s}.docs", rows=1)
    with db(shared) as admin:
        one(admin, f"SELECT embed_sidecar.watch('{s}.docs', 'body')")
        assert waited(admin, f"{s}.docs", 30)
        admin.execute(f'ALTER TABLE {s}.docs OWNER TO "{bob}"')
    with db(shared, bob) as b:
        b.execute(f"INSERT INTO {s}.docs VALUES (2, 'bob''s own row, written after the hand-over')")
    with db(shared, alice) as a:
        forged = error_of(a, f"""INSERT INTO {s}.docs_embeddings (id, embedding, model, content_hash)
                                 SELECT 2, embedding, model, content_hash FROM {s}.docs_embeddings WHERE id = 1
                                 ON CONFLICT (id) DO NOTHING""")
    with db(shared) as admin:
        side_owner = one(admin, f"SELECT relowner::regrole::text FROM pg_class WHERE oid = '{s}.docs_embeddings'::regclass")
    assert forged is not None and forged[0] == "42501", \
        f"the former owner wrote the sidecar of bob's table (sidecar owner: {side_owner})"


def test_watch_does_not_place_the_sidecar_in_a_tablespace_the_owner_may_not_use(shared):
    """Promise 1 (no right she did not have). Attack: alice, with no CREATE on tablespace ts (her own
    CREATE TABLE ... TABLESPACE ts fails with 42501), sets default_tablespace = ts in her session and
    calls watch(): the sidecar and its indexes are created by the SECURITY DEFINER body, as the
    extension's owner, with her session's default_tablespace, so they land in ts, owned by her.
    Promised: the sidecar is not in ts (watch refuses, or ignores her setting)."""
    alice = role("alice")
    ts = f"pes_rev_ts_{TAG}"
    with db(shared) as admin:
        s = schema_for(admin, alice)
        admin.execute("SET allow_in_place_tablespaces = on")
        admin.execute(f"CREATE TABLESPACE {ts} LOCATION ''")
        admin.execute(f'GRANT EXECUTE ON FUNCTION {WATCH_SIG} TO "{alice}"')
    try:
        owner_table(shared, alice, f"{s}.docs", rows=1)
        with db(shared, alice) as a:
            control = error_of(a, f"CREATE TABLE {s}.direct (x int) TABLESPACE {ts}")
            assert control is not None and control[0] == "42501", control
            a.execute(f"SET default_tablespace = '{ts}'")
            err = error_of(a, f"SELECT embed_sidecar.watch('{s}.docs', 'body')")
            placed = a.execute(f"""SELECT c.relname::text FROM pg_class c JOIN pg_tablespace t ON t.oid = c.reltablespace
                                    WHERE c.relnamespace = '{s}'::regnamespace AND t.spcname = '{ts}' ORDER BY 1""").fetchall()
        assert placed == [], f"watch() put {placed} in tablespace {ts}, where their owner may not create (watch said {err})"
    finally:
        with db(shared) as admin:
            admin.execute(f"""SELECT embed_sidecar.unwatch(source, true, embedding) FROM embed_sidecar.sources
                               WHERE source = to_regclass('{s}.docs') AND role = 'current'""")
            admin.execute(f"DROP SCHEMA {s} CASCADE")
            admin.execute(f"DROP TABLESPACE IF EXISTS {ts}")


# ---------------------------------------------------------------------------------------------
# Promise 2: who is calling
# ---------------------------------------------------------------------------------------------

def test_definer_function_planted_in_a_policy_is_judged_by_its_owner_during_a_readers_search(shared):
    """Promise 2 (a SECURITY DEFINER function owned by B is judged as B). Attack: carol may unwatch
    (EXECUTE) and owns watched table c; alice may not. Alice's table has a row-security policy that
    calls alice's SECURITY DEFINER function, which calls embed_sidecar._do_unwatch(c) (PUBLIC)
    directly. When carol searches alice's table, search()'s wrapper records carol as the caller
    (_enter) and the mark is still there when alice's definer function runs: _calling_role() says
    carol while current_user is alice, and carol's table is unwatched. Promised: the call is judged
    as alice (42501) and c stays watched."""
    alice, carol = role("alice"), role("carol")
    with db(shared) as admin:
        s = schema_for(admin, alice, carol)
        admin.execute(f'GRANT EXECUTE ON FUNCTION {UNWATCH_SIG} TO "{carol}"')
        admin.execute(f'REVOKE EXECUTE ON FUNCTION {UNWATCH_SIG} FROM "{alice}"')
    owner_table(shared, carol, f"{s}.c", rows=1)
    owner_table(shared, alice, f"{s}.a", rows=1)
    with db(shared, alice) as a:
        a.execute(f"CREATE TABLE {s}.log (who text, what text)")
        a.execute(f"GRANT INSERT ON {s}.log TO PUBLIC")
        a.execute(f"""CREATE FUNCTION {s}.zap() RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
                      BEGIN
                        BEGIN
                          PERFORM embed_sidecar._do_unwatch('{s}.c'::regclass, false, NULL);
                          INSERT INTO {s}.log VALUES (current_user, 'unwatched');
                        EXCEPTION WHEN OTHERS THEN INSERT INTO {s}.log VALUES (current_user, SQLSTATE);
                        END;
                        RETURN true;
                      END $$""")
        a.execute(f"ALTER TABLE {s}.a ENABLE ROW LEVEL SECURITY")
        a.execute(f"CREATE POLICY p ON {s}.a USING ({s}.zap())")
        a.execute(f'GRANT SELECT ON {s}.a TO "{carol}"')
        # control: alice herself may not
        assert error_of(a, f"SELECT embed_sidecar._do_unwatch('{s}.c'::regclass, false, NULL)")[0] == "42501"
    with db(shared) as admin:
        one(admin, f"SELECT embed_sidecar.watch('{s}.c', 'body')")
        one(admin, f"SELECT embed_sidecar.watch('{s}.a', 'body')")
        assert waited(admin, f"{s}.a", 30)
        admin.execute(f"DELETE FROM {s}.log")
    with db(shared, carol) as c:
        c.execute(f"SELECT * FROM embed_sidecar.search('{s}.a', 'row', 3)").fetchall()
    with db(shared) as admin:
        log = admin.execute(f"SELECT who, what FROM {s}.log").fetchall()
        still = one(admin, f"SELECT count(*) FROM embed_sidecar.sources WHERE source = '{s}.c'::regclass")
    assert still == 1 and all(w == "42501" for _, w in log), f"alice's definer function acted as carol: {log}"


def test_forged_caller_mark_is_refused(shared):
    """Promise 2, held: a role that sets pg_embed_sidecar.caller by hand (to the bootstrap
    superuser's oid with a guessed MAC) and calls an internal management function gets 42501, and
    cannot read the mark _enter() leaves in its own session."""
    bob, mallory = role("bob"), role("mallory")
    with db(shared) as admin:
        s = schema_for(admin, bob)
    owner_table(shared, bob, f"{s}.docs")
    with db(shared) as admin:
        one(admin, f"SELECT embed_sidecar.watch('{s}.docs', 'body')")
    with db(shared, mallory) as m:
        for mark in ("10:0000000000000000", "10", "10:", "10:ffffffffffffffff"):
            m.execute(f"SET pg_embed_sidecar.caller = '{mark}'")
            err = error_of(m, f"SELECT embed_sidecar._do_unwatch('{s}.docs'::regclass, true, NULL)")
            assert err is not None and err[0] == "42501", (mark, err)
        m.execute("BEGIN")
        one(m, "SELECT embed_sidecar._enter()")
        err = error_of(m, "SELECT current_setting('pg_embed_sidecar.caller')")
        m.execute("ROLLBACK")
        assert err is not None, "a role without privileges can read its caller mark"
    with db(shared) as admin:
        assert one(admin, f"SELECT count(*) FROM embed_sidecar.sources WHERE source = '{s}.docs'::regclass") == 1


# ---------------------------------------------------------------------------------------------
# Promise 3: readers
# ---------------------------------------------------------------------------------------------

def rls_table(dbname, owner, s, tenants, sidecar_name=None):
    """A table of `owner` with row security (tenant = current_user), one row per tenant, SELECT for
    all tenants, watched by the administrator."""
    with db(dbname, owner) as o:
        o.execute(f"CREATE TABLE {s}.docs (id int PRIMARY KEY, tenant name NOT NULL, body text)")
        o.execute(f"ALTER TABLE {s}.docs ENABLE ROW LEVEL SECURITY")
        o.execute(f"CREATE POLICY own ON {s}.docs USING (tenant = current_user)")
        for i, t in enumerate(tenants, 1):
            o.execute(f'GRANT SELECT ON {s}.docs TO "{t}"')
        o.execute(f"INSERT INTO {s}.docs VALUES (1, %s, 'grocery list: apples and bread'), "
                  f"(2, %s, 'Confidential: Initech merger closes Friday')", tuple(tenants[:2]))
    with db(dbname) as admin:
        if sidecar_name:
            side = one(admin, f"SELECT embed_sidecar.watch('{s}.docs', 'body', sidecar_name => %s)::text", (sidecar_name,))
        else:
            side = one(admin, f"SELECT embed_sidecar.watch('{s}.docs', 'body')::text")
        assert waited(admin, f"{s}.docs", 30)
    return side


@pytest.mark.parametrize("sidecar_name", ["src", "sc", None])
def test_sidecar_policy_holds_whatever_the_sidecar_is_called(shared, sidecar_name):
    """Promise 3 (a reader sees no row the table hides). Attack: the sidecar is given the name
    'src' (watch(..., sidecar_name => 'src')). _protect_sidecar (sql/watch.sql) writes its policy
    as EXISTS (SELECT src FROM <source> src WHERE <sidecar name>.id = src.id): with the sidecar called
    src, the inner alias captures the outer reference, the condition becomes src.id = src.id, and a
    reader who can see any one row of the source sees every vector and lexeme of the sidecar, and
    search() returns hidden keys. Promised: tenant eve sees only her row [1], in the sidecar and in
    search()/hybrid_search()."""
    owner, eve, bob = role("owner"), role("eve"), role("bob")
    with db(shared) as admin:
        s = schema_for(admin, owner)
    side = rls_table(shared, owner, s, [eve, bob], sidecar_name)
    with db(shared, eve) as e:
        assert one(e, f"SELECT count(*) FROM {s}.docs") == 1
        rows = [r[0] for r in e.execute(f"SELECT id FROM {side}").fetchall()]
        lexemes = one(e, f"SELECT coalesce(string_agg(fts::text, ' '), '') FROM {side}")
        found = {k[0] for (k,) in e.execute(f"SELECT key FROM embed_sidecar.search('{s}.docs', 'merger', 5)").fetchall()}
        hfound = {k[0] for (k,) in e.execute(f"SELECT key FROM embed_sidecar.hybrid_search('{s}.docs', 'merger', 5)").fetchall()}
    assert rows == [1] and "merger" not in lexemes, f"sidecar {side}: eve reads rows {rows}, lexemes {lexemes!r}"
    assert found <= {1} and hfound <= {1}, f"search returned hidden keys to eve: {found} {hfound}"


def test_reader_cannot_read_last_error_through_readable_source(shared):
    """Promise 3 / the status view's rule ('errors may quote a row's key or text: owners only').
    Attack: tenant eve (SELECT on the table, row security hides bob's row) calls the PUBLIC
    embed_sidecar._enter() and then the PUBLIC SECURITY DEFINER embed_sidecar._readable_source(),
    which returns the whole registry row, last_error included, where the status view shows her
    NULL. The error here quotes bob's hidden text (the owner's check on the sidecar refuses it).
    Promised: eve cannot obtain last_error."""
    owner, eve, bob = role("owner"), role("eve"), role("bob")
    with db(shared) as admin:
        s = schema_for(admin, owner)
    with db(shared, owner) as o:
        o.execute(f"""CREATE FUNCTION {s}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN
                        IF NEW.id = 2 THEN
                          RAISE EXCEPTION 'refusing to index %', (SELECT body FROM {s}.docs WHERE id = NEW.id);
                        END IF;
                        RETURN NEW;
                      END $$""")
    side = rls_table(shared, owner, s, [eve, bob])
    with db(shared, owner) as o:
        o.execute(f"CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {side} FOR EACH ROW EXECUTE FUNCTION {s}.refuse()")
        o.execute(f"UPDATE {s}.docs SET body = body || ' (v2)'")
    with db(shared) as admin:
        waited(admin, f"{s}.docs", 30)
        deadline = time.time() + 20
        while time.time() < deadline and not one(
                admin, f"SELECT last_error FROM embed_sidecar.status WHERE source = '{s}.docs'::regclass"):
            time.sleep(0.5)
        assert "Initech" in (one(admin, f"SELECT last_error FROM embed_sidecar.status WHERE source = '{s}.docs'::regclass") or "")
    with db(shared, eve) as e:
        assert one(e, f"SELECT last_error FROM embed_sidecar.status WHERE source = '{s}.docs'::regclass") is None
        e.execute("BEGIN")
        try:
            one(e, "SELECT embed_sidecar._enter()")
            leaked = one(e, f"SELECT (embed_sidecar._readable_source('{s}.docs'::regclass)).last_error")
        except psycopg.Error:
            leaked = None
        e.execute("ROLLBACK")
    assert leaked is None, f"eve read the owner-only last_error: {leaked!r}"


def test_status_and_verify_show_a_restricted_reader_only_her_rows(shared):
    """Promise 3, held: with row security, tenant eve's verify() counts only her row (source_rows 1,
    embedded 1, orphans 0) and a reader without SELECT gets 42501 from verify()."""
    owner, eve, bob, nobody = role("owner"), role("eve"), role("bob"), role("nobody")
    with db(shared) as admin:
        s = schema_for(admin, owner)
    rls_table(shared, owner, s, [eve, bob])
    with db(shared, eve) as e:
        got = e.execute(f"SELECT source_rows, embedded_rows, missing, stale, orphans FROM embed_sidecar.verify('{s}.docs')").fetchone()
    assert got == (1, 1, 0, 0, 0), got
    with db(shared, nobody) as n:
        err = error_of(n, f"SELECT * FROM embed_sidecar.verify('{s}.docs')")
    assert err is not None and err[0] == "42501", err


# ---------------------------------------------------------------------------------------------
# Registry honesty and inheritance
# ---------------------------------------------------------------------------------------------

def test_a_watched_temporary_table_leaves_no_registry_row_behind(shared):
    """The registry stays honest when a source goes (sql/events.sql). Attack: a role allowed to
    watch its tables watches a TEMPORARY table; when its session ends PostgreSQL drops the table
    without firing sql_drop, so the registry row, its two pgmq queues and their messages stay
    forever (the drain looks the row up on every round; nobody but a superuser can remove it, with
    unwatch() of a bare oid). Promised: no registry row outlives its source (or watch() refuses
    temporary tables)."""
    alice = role("alice")
    with db(shared) as admin:
        admin.execute(f'GRANT EXECUTE ON FUNCTION {WATCH_SIG} TO "{alice}"')
    with db(shared, alice) as a:
        a.execute("CREATE TEMP TABLE scratch (id int PRIMARY KEY, body text)")
        a.execute("INSERT INTO scratch VALUES (1, 'temporary')")
        oid = one(a, "SELECT 'scratch'::regclass::oid")
        refused = error_of(a, "SELECT embed_sidecar.watch('scratch', 'body')")
    with db(shared) as admin:
        deadline = time.time() + 15  # the session's exit drops its temporary tables
        while time.time() < deadline and one(admin, "SELECT count(*) FROM pg_class WHERE oid = %s", (oid,)):
            time.sleep(0.2)
        assert one(admin, "SELECT count(*) FROM pg_class WHERE oid = %s", (oid,)) == 0
        left = one(admin, "SELECT count(*) FROM embed_sidecar.sources WHERE source::oid = %s", (oid,))
        if left:
            # clean up what the attack left (a superuser can)
            admin.execute("SELECT embed_sidecar.unwatch(%s::oid::regclass, true)", (oid,))
    assert left == 0, f"{left} registry row(s) of a dropped temporary table remain (watch said {refused})"


def test_watch_racing_alter_table_inherit_is_refused(shared):
    """Promise 5 / M5, held: while alice's ALTER TABLE c INHERIT p is uncommitted, watch(c) waits
    (LOCK TABLE) and, once it commits, fails (the sidecar's ALTER TABLE fires the ddl_command_end
    check); no watched table ends up in a hierarchy, and other roles' DDL keeps working."""
    alice = role("alice")
    with db(shared) as admin:
        s = schema_for(admin, alice)
        admin.execute(f'GRANT EXECUTE ON FUNCTION {WATCH_SIG} TO "{alice}"')
    with db(shared, alice) as a:
        a.execute(f"CREATE TABLE {s}.p (id int PRIMARY KEY, body text)")
        a.execute(f"CREATE TABLE {s}.c (id int PRIMARY KEY, body text)")
    holder = db(shared, alice)
    holder.execute("BEGIN")
    holder.execute(f"ALTER TABLE {s}.c INHERIT {s}.p")
    result = {}

    def watcher():
        with db(shared, alice) as w:
            result["err"] = error_of(w, f"SELECT embed_sidecar.watch('{s}.c', 'body')")

    t = threading.Thread(target=watcher)
    t.start()
    time.sleep(1.5)
    holder.execute("COMMIT")
    holder.close()
    t.join(30)
    with db(shared) as admin:
        watched_in_tree = one(admin, """SELECT count(*) FROM embed_sidecar.sources x
                                         WHERE EXISTS (SELECT 1 FROM pg_inherits i WHERE x.source IN (i.inhparent, i.inhrelid))""")
        ddl = error_of(admin, f"CREATE TABLE {s}.unrelated (x int)")
    assert watched_in_tree == 0 and ddl is None, (result, watched_in_tree, ddl)


# ---------------------------------------------------------------------------------------------
# Promise 4: the inference ring
# ---------------------------------------------------------------------------------------------

def vec(text):
    return np.array([float(x) for x in text.strip("[]{}").split(",")])


def test_sessions_with_different_models_in_one_round_get_their_own_vectors(shared):
    """Promise 4, held: four sessions at once, two embedding with one model and two with another
    (the service batches them by model in one round), each 12 rounds of 8 texts; every vector equals
    (cosine > 0.9999) what a local embedder gives for that text and model."""
    with db(shared) as c:
        if not one(c, "SELECT count(*) FROM embed_sidecar.models WHERE name = %s AND error IS NULL", (L3,)):
            pytest.skip(f"{L3} is not installed")
    run, results, errors = uid(), [], []

    def client(n, model):
        try:
            with db(shared, options="-c statement_timeout=60s") as c:
                for i in range(12):
                    texts = [f"{run} client {n} round {i} text {j} about {['tides', 'violins', 'comets'][j % 3]}" for j in range(8)]
                    got = c.execute("SELECT t, embed_sidecar._embed_with(%s, t)::text FROM unnest(%s::text[]) t",
                                    (model, texts)).fetchall()
                    results.extend((model, t, v) for t, v in got)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n, (L6, L3)[n % 2])) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [], errors[:2]
    with db(shared) as ref:
        ref.execute("SET pg_embed_sidecar.inference = 'local'")
        worst = 1.0
        for model in (L6, L3):
            mine = [(t, v) for m, t, v in results if m == model]
            expected = dict(ref.execute("SELECT t, embed_sidecar._embed_with(%s, t)::text FROM unnest(%s::text[]) t",
                                        (model, [t for t, _ in mine])).fetchall())
            worst = min([worst] + [float(vec(v) @ vec(expected[t])) for t, v in mine])
    assert len(results) == 4 * 12 * 8
    assert worst > 0.9999, f"a session got a vector that is not its text's: cosine {worst}"


def test_cancelled_calls_never_hand_their_vectors_to_the_next_call(shared):
    """Promise 4, held: three sessions cancel their own embed_texts() calls with a statement_timeout
    of 5-60 ms over and over (slots abandoned while a worker holds them), each followed at once by a
    normal call on the same connection: every normal call's vectors are its own texts'."""
    run, checks, errors = uid(), [], []
    stop = time.time() + 12

    def client(n):
        try:
            with db(shared) as c:
                i = 0
                while time.time() < stop:
                    c.execute(f"SET statement_timeout = '{5 + (i * 7) % 55}ms'")
                    try:
                        c.execute("SELECT embed_texts(ARRAY(SELECT 'cancel ' || %s || ' ' || g FROM generate_series(1, 40) g))",
                                  (f"{run}-{n}-{i}",)).fetchall()
                    except psycopg.errors.QueryCanceled:
                        pass
                    c.execute("SET statement_timeout = '60s'")
                    texts = [f"{run} check {n} {i} {j} {['glaciers', 'bakeries', 'orchards', 'compilers'][j % 4]}" for j in range(4)]
                    checks.append((texts, one(c, "SELECT embed_texts(%s::text[])::text[]", (texts,))))
                    i += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == [], errors[:2]
    assert len(checks) >= 6
    with db(shared) as ref:
        ref.execute("SET pg_embed_sidecar.inference = 'local'")
        flat = [(t, v) for texts, vs in checks for t, v in zip(texts, vs)]
        expected = dict(ref.execute("SELECT t, embed_text(t)::text FROM unnest(%s::text[]) t", ([t for t, _ in flat],)).fetchall())
    worst = min(float(vec(v) @ vec(expected[t])) for t, v in flat)
    assert worst > 0.9999, f"a call got a vector that is not its text's after cancellations: cosine {worst}"


def test_public_caller_cannot_exceed_the_size_bounds(shared):
    """Promise 4, held: a role with no privileges gets 54000 from chunk_text() of 2 MB (limit 1 MB)
    and a clean error (22023, or 58P01 for a name that is no directory) for a path-like or over-long
    model name; embed_text() of a 4 MB text returns a
    vector (the text is cut before tokenising) promptly."""
    nobody = role("nobody")
    with db(shared, nobody, options="-c statement_timeout=60s") as n:
        err = error_of(n, "SELECT count(*) FROM embed_sidecar.chunk_text(repeat('ab ', 700000))")
        assert err is not None and err[0] == "54000", err
        for model in ("../all-MiniLM-L6-v2", "..", "x" * 80):
            err = error_of(n, "SELECT embed_sidecar._embed_with(%s, 'hello')", (model,))
            assert err is not None and err[0] in ("22023", "58P01"), (model, err)
        t0 = time.time()
        dims = one(n, "SELECT vector_dims(embed_text(repeat('lorem ipsum dolor ', 230000)))")
        assert dims == 384 and time.time() - t0 < 20
