"""The security and reliability read of 0.2.0 (shared/audit-0.2.md): each finding's reproduction,
turned into a check of the behaviour the fix promises. The docstring of each test names the
finding (C1, H1, ... L6) and the promise.

Roles made here are called pes_atk_<what>_<random> and dropped afterwards; databases are dropped
WITH (FORCE). Several attacks, left unfixed, damage the database's drain worker (C1 leaves GUCs
behind in it, H3 keeps it busy for minutes): those tests restart the worker when they fail, so
that the suites after them find a clean one."""
import contextlib
import json
import os
import shutil
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest

from conftest import (DSN, MODELS, assert_in_step, connect, connect_as, error_of, one, queue_depth, wait,
                      watch, worker_pid)

L3 = "paraphrase-MiniLM-L3-v2"
DRAIN_LOCK = 1701667443  # "embs": the class of the drain's per-source advisory locks


def uid():
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def plain_role(what):
    """A login role with no privileges at all (not even on the test's schema); dropped afterwards."""
    name = f"pes_atk_{what}_{uid()}"
    with connect() as c:
        c.execute(f'CREATE ROLE "{name}" LOGIN')
    try:
        yield name
    finally:
        with connect() as c:
            c.execute(f'DROP OWNED BY "{name}" CASCADE')
            c.execute(f'DROP ROLE "{name}"')


def drain_workers(dbname=None):
    with connect() as c:
        return [r[0] for r in c.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' AND datname = %s",
            (dbname or DSN["dbname"],))]


def restart_worker(dbname=None):
    """Terminate the database's drain worker and wait for the launcher's new one: used when an
    attack that poisons the worker's session succeeded, so that later tests do not inherit it."""
    dbname = dbname or DSN["dbname"]
    try:
        old = worker_pid(dbname, timeout=5)
    except AssertionError:
        return
    with connect() as c:
        c.execute("SELECT pg_terminate_backend(%s)", (old,))
    deadline = time.time() + 30
    while time.time() < deadline and [p for p in drain_workers(dbname) if p != old] == []:
        time.sleep(0.2)


def drop_schema(schema):
    """Unwatch every embedding of the tables in `schema` (their sidecars with them) and drop it."""
    with connect() as c:
        c.execute("""SELECT embed_sidecar.unwatch(source, true, embedding) FROM embed_sidecar.sources s
                      JOIN pg_class r ON r.oid = s.source WHERE r.relnamespace = %s::regnamespace AND s.role = 'current'""",
                  (f'"{schema}"',))
        c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def keys_of(conn, sql, params=None):
    return [r[0] for r in conn.execute(sql, params).fetchall()]


def vec(text):
    return np.array([float(x) for x in text.strip("[]").split(",")])


# ---------------------------------------------------------------------------------------------
# C1: GUCs set by planted code inside the restricted operation
# ---------------------------------------------------------------------------------------------

def plant_guc_leak(db, make_role):
    """Alice owns schema <hs> with table docs (watched by the administrator, paused, 10 rows
    queued), a function <hs>.now() that notes who runs it and tries to make her superuser, and a
    trigger on her sidecar that sets search_path, statement_timeout and default_transaction_read_only
    with set_config(..., false)."""
    tag = uid()
    alice = make_role(f"pes_atk_c1_{tag}")
    hs = f"pes_atk_c1s_{tag}"
    db.execute(f'CREATE SCHEMA "{hs}" AUTHORIZATION "{alice}"')
    a = connect(user=alice)
    a.execute(f'SET search_path = "{hs}"')
    a.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    a.execute("CREATE TABLE seen (who name, at timestamptz DEFAULT clock_timestamp())")
    a.execute(f"""CREATE FUNCTION "{hs}".now() RETURNS timestamptz LANGUAGE plpgsql AS $$
                  BEGIN
                      INSERT INTO "{hs}".seen (who) VALUES (current_user);
                      BEGIN EXECUTE 'ALTER ROLE "{alice}" SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
                      RETURN pg_catalog.statement_timestamp();
                  END $$""")
    table = f'"{hs}".docs'
    watch(db, table)
    one(db, "SELECT embed_sidecar.pause(%s::regclass)", (table,))
    a.execute(f"""CREATE FUNCTION "{hs}".plant() RETURNS trigger LANGUAGE plpgsql AS $$
                  BEGIN
                      PERFORM pg_catalog.set_config('search_path', '"{hs}", pg_catalog', false);
                      PERFORM pg_catalog.set_config('statement_timeout', '1', false);
                      PERFORM pg_catalog.set_config('default_transaction_read_only', 'on', false);
                      RETURN NEW;
                  END $$""")
    a.execute(f'CREATE TRIGGER plant BEFORE INSERT OR UPDATE ON "{hs}".docs_embeddings '
              f'FOR EACH ROW EXECUTE FUNCTION "{hs}".plant()')
    a.execute("INSERT INTO docs SELECT i, 'planted row ' || i FROM generate_series(1, 10) i")
    a.close()
    return alice, hs, table


def assert_no_escalation(db, alice, hs):
    assert one(db, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (alice,)) is False, \
        f"{alice} became superuser"
    supers = db.execute(f"""SELECT DISTINCT s.who::text FROM "{hs}".seen s JOIN pg_roles r ON r.rolname = s.who
                             WHERE r.rolsuper""").fetchall()
    assert supers == [], f"the owner's now() ran as superuser {supers}"


def test_planted_guc_changes_do_not_outlive_the_worker_drain(db, make_role):
    """C1: GUCs the table owner's trigger sets during the worker's drain (search_path pointing at
    her now(), statement_timeout, default_transaction_read_only) are rolled back: her now() never
    runs as a superuser, she does not become one, and the next table still drains."""
    alice, hs, table = plant_guc_leak(db, make_role)
    db.execute("CREATE TABLE other (id int PRIMARY KEY, body text)")
    watch(db, "other")
    try:
        one(db, "SELECT embed_sidecar.resume(%s::regclass)", (table,))
        wait(db, table, 60)
        assert one(db, f'SELECT count(*) FROM "{hs}".docs_embeddings') == 10
        db.execute("INSERT INTO other SELECT i, 'drained after the planted code ' || i FROM generate_series(1, 5) i")
        wait(db, "other", 30)
        assert one(db, "SELECT count(*) FROM other_embeddings") == 5
        assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'other'::regclass") == 0
        assert_in_step(db, "other")
        assert_no_escalation(db, alice, hs)
    except BaseException:
        restart_worker()  # the worker's session may carry her settings: later tests get a clean one
        raise
    finally:
        db.execute(f'ALTER ROLE "{alice}" NOSUPERUSER')
        drop_schema(hs)


def test_planted_guc_changes_do_not_outlive_process(db, make_role):
    """C1: the same planted code drained by process() in a superuser's session leaves that
    session's search_path, statement_timeout and default_transaction_read_only as they were, and
    the owner's now() never runs as a superuser."""
    alice, hs, table = plant_guc_leak(db, make_role)
    session = connect()
    try:
        session.execute(f'SET search_path = "{db.schema}", public')
        settings = ("SELECT current_setting('search_path'), current_setting('statement_timeout'), "
                    "current_setting('default_transaction_read_only')")
        before = session.execute(settings).fetchone()
        assert one(session, "SELECT embed_sidecar.process(%s::regclass)", (table,)) == 10
        try:
            after = session.execute(settings).fetchone()
        except psycopg.Error as e:
            after = ("error", e.sqlstate, e.diag.message_primary)
        assert after == before, f"the session's settings changed: {before} -> {after}"
        assert one(db, f'SELECT count(*) FROM "{hs}".docs_embeddings') == 10
        assert_no_escalation(db, alice, hs)
    finally:
        session.close()
        db.execute(f'ALTER ROLE "{alice}" NOSUPERUSER')
        drop_schema(hs)


# ---------------------------------------------------------------------------------------------
# H1: owner checks inside restricted operations and SECURITY DEFINER functions
# ---------------------------------------------------------------------------------------------

def victim_table(db, make_role, tag):
    """Role B owns b_docs (one row), watched and in step; returns B's name and its model."""
    b = make_role(f"pes_atk_h1b_{tag}")
    bc = connect_as(b, db.schema)
    bc.execute("CREATE TABLE b_docs (id int PRIMARY KEY, body text)")
    bc.execute("INSERT INTO b_docs VALUES (1, 'victim row')")
    bc.close()
    watch(db, "b_docs")
    wait(db, "b_docs")
    return b, one(db, "SELECT model FROM embed_sidecar.sources WHERE source = 'b_docs'::regclass")


def assert_victim_intact(db, model):
    rows = db.execute("SELECT role, state, model FROM embed_sidecar.sources WHERE source = 'b_docs'::regclass").fetchall()
    assert rows == [("current", "active", model)], f"b_docs's registry rows changed: {rows}"
    assert one(db, "SELECT to_regclass('b_docs_embeddings')::text") == "b_docs_embeddings", "b_docs's sidecar is gone"
    assert one(db, "SELECT count(*) FROM b_docs_embeddings") == 1


def other_model(db, model):
    return one(db, "SELECT name FROM embed_sidecar.models WHERE error IS NULL AND name <> %s ORDER BY name = %s DESC LIMIT 1",
               (model, L3)) or model


def test_planted_code_cannot_manage_other_owners_tables(db, make_role):
    """H1: a trigger owner A plants on her sidecar calls unwatch(B's table, true), pause(B's table),
    set_model(B's table) and pause(her own table): inside the restricted operation every call
    raises insufficient_privilege (42501), whether the worker or a superuser's process() drains,
    and B's table stays watched, active and with its sidecar."""
    tag = uid()
    b, model = victim_table(db, make_role, tag)
    a = make_role(f"pes_atk_h1a_{tag}")
    s = f'"{db.schema}"'
    for f in ("unwatch(regclass, boolean, text)", "pause(regclass, boolean, text)", "set_model(regclass, text, text)"):
        db.execute(f'GRANT EXECUTE ON FUNCTION embed_sidecar.{f} TO "{a}"')  # "manage your own tables"
    ac = connect_as(a, db.schema)
    try:
        ac.execute("CREATE TABLE a_docs (id int PRIMARY KEY, body text)")
        ac.execute("CREATE TABLE calls (fn text, state text, msg text)")
        watch(db, "a_docs")
        one(db, "SELECT embed_sidecar.pause('a_docs')")
        attempts = {"unwatch": f"embed_sidecar.unwatch('{s}.b_docs'::regclass, true)",
                    "pause": f"embed_sidecar.pause('{s}.b_docs'::regclass)",
                    "set_model": f"embed_sidecar.set_model('{s}.b_docs'::regclass, '{other_model(db, model)}')",
                    "pause_own": f"embed_sidecar.pause('{s}.a_docs'::regclass)"}
        body = "\n".join(f"""BEGIN PERFORM {call}; INSERT INTO {s}.calls VALUES ('{fn}', 'ok', NULL);
                             EXCEPTION WHEN OTHERS THEN INSERT INTO {s}.calls VALUES ('{fn}', SQLSTATE, SQLERRM); END;"""
                         for fn, call in attempts.items())
        ac.execute(f"CREATE FUNCTION meddle() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} RETURN NEW; END $$")
        ac.execute("CREATE TRIGGER meddle BEFORE INSERT OR UPDATE ON a_docs_embeddings FOR EACH ROW EXECUTE FUNCTION meddle()")
        ac.execute("INSERT INTO a_docs VALUES (1, 'wake the drain')")
        expected = {(fn, "42501") for fn in attempts}

        # drained by the worker
        one(db, "SELECT embed_sidecar.resume('a_docs')")
        wait(db, "a_docs", 60)
        calls = db.execute("SELECT fn, state, msg FROM calls").fetchall()
        assert_victim_intact(db, model)
        assert {(fn, st) for fn, st, _ in calls} == expected, calls
        assert one(db, "SELECT state FROM embed_sidecar.sources WHERE source = 'a_docs'::regclass") == "active"

        # drained by process() in a superuser's session
        one(db, "SELECT embed_sidecar.pause('a_docs')")
        db.execute("DELETE FROM calls")
        ac.execute("INSERT INTO a_docs VALUES (2, 'wake it again')")
        assert one(db, "SELECT embed_sidecar.process('a_docs')") == 1
        calls = db.execute("SELECT fn, state, msg FROM calls").fetchall()
        assert_victim_intact(db, model)
        assert {(fn, st) for fn, st, _ in calls} == expected, calls
        assert one(db, "SELECT count(*) FROM a_docs_embeddings") == 2
    finally:
        ac.close()


def test_definer_function_is_judged_by_its_owner(db, make_role):
    """H1: a SECURITY DEFINER function owned by ordinary role A that unwatches B's table fails with
    42501 when a superuser calls it: the definer A is judged, not the superuser who called it."""
    tag = uid()
    b, model = victim_table(db, make_role, tag)
    a = make_role(f"pes_atk_h1a_{tag}")
    db.execute(f'GRANT EXECUTE ON FUNCTION embed_sidecar.unwatch(regclass, boolean, text) TO "{a}"')
    ac = connect_as(a, db.schema)
    try:
        # control: called directly, A may not
        state, msg, _ = error_of(ac, "SELECT embed_sidecar.unwatch('b_docs', true)")
        assert state == "42501", (state, msg)
        ac.execute(f"""CREATE FUNCTION zap() RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
                       AS $$ BEGIN PERFORM embed_sidecar.unwatch('"{db.schema}".b_docs'::regclass, true); END $$""")
    finally:
        ac.close()
    err = error_of(db, f'SELECT "{db.schema}".zap()')
    assert err is not None and err[0] == "42501", f"the superuser's call of A's definer function: {err}"
    assert_victim_intact(db, model)


# ---------------------------------------------------------------------------------------------
# H2: row-level security and grants on the sidecar
# ---------------------------------------------------------------------------------------------

SECRET = "Confidential: Initech acquisition closes Friday at 180 million"


def test_sidecar_follows_row_level_security_and_source_grants(db, make_role):
    """H2: over a table with RLS (tenant = current_user), tenant T2 sees only its own rows in the
    sidecar (no other tenant's keys or fts lexemes) and search/hybrid_search never return T1's
    keys; a writer of the source (INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER) gets 42501 writing the
    sidecar; after REVOKE SELECT on the source, T2 gets 42501 reading the sidecar and searching."""
    tag = uid()
    o, t1, t2, w = (make_role(f"pes_atk_h2{r}_{tag}") for r in ("o", "t1", "t2", "w"))
    oc = connect_as(o, db.schema)
    t2c = wc = None
    try:
        oc.execute("CREATE TABLE tdocs (id int PRIMARY KEY, tenant name NOT NULL DEFAULT current_user, body text)")
        oc.execute("ALTER TABLE tdocs ENABLE ROW LEVEL SECURITY")
        oc.execute("CREATE POLICY own ON tdocs USING (tenant = current_user)")
        oc.execute(f'GRANT SELECT ON tdocs TO "{t1}", "{t2}"')
        oc.execute(f'GRANT INSERT, UPDATE, DELETE, TRUNCATE, TRIGGER ON tdocs TO "{w}"')
        db.cursor().executemany("INSERT INTO tdocs VALUES (%s, %s, %s)", [
            (1, t1, SECRET), (3, t1, "Initech board minutes: merger vote scheduled"),
            (2, t2, "grocery list: apples, bread and milk"), (4, t2, "growing tomatoes in the garden")])
        watch(db, "tdocs")
        wait(db, "tdocs")
        assert one(db, "SELECT count(*) FROM tdocs_embeddings") == 4
        mine = {2, 4}

        t2c = connect_as(t2, db.schema)
        assert one(t2c, "SELECT count(*) FROM tdocs") == 2  # RLS on the source
        assert one(t2c, "SELECT count(*) FROM tdocs_embeddings") == 2
        assert set(keys_of(t2c, "SELECT id FROM tdocs_embeddings")) <= mine
        lexemes = one(t2c, "SELECT coalesce(string_agg(fts::text, ' '), '') FROM tdocs_embeddings")
        assert "initech" not in lexemes and "acquisit" not in lexemes, lexemes
        for sql in ("SELECT key FROM embed_sidecar.search('tdocs', %s, 10)",
                    "SELECT key FROM embed_sidecar.hybrid_search('tdocs', %s, 10)"):
            for query in (SECRET, "company merger", "garden"):
                got = {k[0] for k in keys_of(t2c, sql, (query,))}
                assert got <= mine, f"{sql} as T2 for {query!r} returned {got}"

        wc = connect_as(w, db.schema)
        for sql in ("INSERT INTO tdocs_embeddings (id) VALUES (99)", "UPDATE tdocs_embeddings SET model = 'poisoned'",
                    "DELETE FROM tdocs_embeddings", "TRUNCATE tdocs_embeddings"):
            err = error_of(wc, sql)
            assert err is not None and err[0] == "42501", f"writer: {sql}: {err}"
        wc.execute("CREATE FUNCTION w_noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$")
        err = error_of(wc, "CREATE TRIGGER w BEFORE INSERT ON tdocs_embeddings FOR EACH ROW EXECUTE FUNCTION w_noop()")
        assert err is not None and err[0] == "42501", f"writer's trigger on the sidecar: {err}"

        oc.execute(f'REVOKE SELECT ON tdocs FROM "{t2}"')
        err = error_of(t2c, "SELECT count(*) FROM tdocs_embeddings")
        assert err is not None and err[0] == "42501", f"after REVOKE, reading the sidecar: {err}"
        err = error_of(t2c, "SELECT * FROM embed_sidecar.search('tdocs', 'garden', 5)")
        assert err is not None and err[0] == "42501", f"after REVOKE, search: {err}"
    finally:
        for c in (oc, t2c, wc):
            if c is not None:
                c.close()


# ---------------------------------------------------------------------------------------------
# H4: keys when the primary key is not the leading column(s)
# ---------------------------------------------------------------------------------------------

def test_search_keys_when_the_primary_key_is_not_leading(db):
    """H4: with the PK after other columns (title, body, id) or declared in another order than the
    columns (PRIMARY KEY (b, a)), search and hybrid_search return one row per source row, keyed by
    the PK's values in declaration order, and rank the chess rows first."""
    db.execute("CREATE TABLE pk (title text, body text, id int PRIMARY KEY)")
    db.execute("INSERT INTO pk VALUES ('a', 'chess engine for computers', 1), ('b', 'cooking pasta at home', 2), "
               "('c', 'chess openings book', 3)")
    db.execute("CREATE TABLE ck (title text, body text, a int, b text, PRIMARY KEY (b, a))")
    db.execute("INSERT INTO ck VALUES ('a', 'chess engine for computers', 1, 'x'), ('b', 'cooking pasta at home', 2, 'y'), "
               "('c', 'chess openings book', 3, 'z')")
    watch(db, "pk")
    watch(db, "ck")
    wait(db, "pk")
    wait(db, "ck")
    for table, chess, other in (("pk", [[1], [3]], [2]), ("ck", [["x", 1], ["z", 3]], ["y", 2])):
        for fn in ("search", "hybrid_search"):
            keys = keys_of(db, f"SELECT key FROM embed_sidecar.{fn}(%s::regclass, 'chess', 3)", (table,))
            assert len(keys) == 3, (table, fn, keys)
            assert sorted(keys[:2], key=json.dumps) == sorted(chess, key=json.dumps) and keys[2] == other, (table, fn, keys)


# ---------------------------------------------------------------------------------------------
# H3: unbounded tokenization
# ---------------------------------------------------------------------------------------------

def vm_hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_chunk_text_refuses_oversized_text_fast_with_bounded_memory():
    """H3: chunk_text() of a 60 MB text, called by a role with no privileges, fails at once with
    program_limit_exceeded (54000) and the backend's peak memory stays under 1 GB."""
    with plain_role("h3") as nobody:
        with connect(user=nobody) as c:
            pid = one(c, "SELECT pg_backend_pid()")
            t0 = time.time()
            err = error_of(c, "SELECT count(*) FROM embed_sidecar.chunk_text(repeat('ab ', 20000000))")
            elapsed = time.time() - t0
            peak = vm_hwm_kb(pid)
    assert err is not None and err[0] == "54000", err
    assert elapsed < 10, f"took {elapsed:.1f} s to refuse"
    assert peak < 1024 * 1024, f"backend peaked at {peak} kB"


def test_oversized_row_of_a_chunked_table_is_dead_lettered(db):
    """H3: a 60 MB row in a chunked table is dead-lettered while its neighbours are embedded, and
    the drain worker survives it (same pid)."""
    pid = worker_pid(DSN["dbname"])
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs", chunking=True)
    try:
        db.execute("INSERT INTO docs SELECT i, 'a normal row about topic ' || i FROM generate_series(1, 5) i")
        db.execute("INSERT INTO docs VALUES (99, repeat('ab ', 20000000))")
        wait(db, "docs", 90)
        assert one(db, "SELECT count(DISTINCT id) FROM docs_embeddings WHERE id <> 99") == 5
        assert one(db, "SELECT count(*) FROM docs_embeddings WHERE id = 99") == 0
        dead = keys_of(db, """SELECT f.key FROM embed_sidecar.failures f JOIN embed_sidecar.sources s ON s.id = f.source_id
                               WHERE s.source = 'docs'::regclass""")
        assert dead == [[99]], dead
        assert worker_pid(DSN["dbname"]) == pid, "the drain worker restarted"
    except BaseException:
        # left unfixed, the worker chews on the row for minutes: stop it before the next tests
        restart_worker()
        with connect() as c:
            c.execute("SET lock_timeout = '20s'")
            error_of(c, f"""SELECT embed_sidecar.unwatch('"{db.schema}".docs'::regclass, true)""")
        raise


# ---------------------------------------------------------------------------------------------
# M1: locks anyone can take
# ---------------------------------------------------------------------------------------------

def test_advisory_locks_held_by_anyone_do_not_stall_the_drain(db):
    """M1: a role with no privileges holding pg_advisory_lock(1701667443, g) for every source id
    does not stop the drain: a new row is embedded within 30 s."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs")
    sid = one(db, "SELECT id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    top = max(1000, one(db, "SELECT max(id) FROM embed_sidecar.sources") + 50)
    with plain_role("m1") as mallory:
        m = connect(user=mallory)
        try:
            mpid = one(m, "SELECT pg_backend_pid()")
            assert one(m, "SELECT count(*) FROM (SELECT pg_advisory_lock(%s, g) FROM generate_series(1, %s) g) x",
                       (DRAIN_LOCK, top)) == top
            assert one(db, """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s AND granted
                                AND classid = %s AND objid = %s""", (mpid, DRAIN_LOCK, sid)) == 1
            db.execute("INSERT INTO docs VALUES (1, 'held up')")
            wait(db, "docs", 30)
            assert one(db, "SELECT count(*) FROM docs_embeddings") == 1
        finally:
            m.close()


def test_a_writers_row_lock_does_not_stall_other_tables(db, make_role):
    """M1: a writer holding SELECT ... FOR UPDATE on a queued row of table A (an open transaction,
    after a committed update of that row's body) does not stop table B's new rows from draining;
    A catches up once the lock goes."""
    w = make_role(f"pes_atk_m1w_{uid()}")
    db.execute("CREATE TABLE a (id int PRIMARY KEY, body text)")
    db.execute("CREATE TABLE b (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO a VALUES (1, 'first text')")
    watch(db, "a")
    watch(db, "b")
    wait(db, "a")
    db.execute(f'GRANT SELECT, UPDATE ON a TO "{w}"')
    one(db, "SELECT embed_sidecar.pause('a')")  # so that the worker meets the row only once it is locked
    writer = connect_as(w, db.schema)
    try:
        writer.execute("UPDATE a SET body = 'changed, then locked' WHERE id = 1")
        writer.execute("BEGIN")
        writer.execute("SELECT * FROM a WHERE id = 1 FOR UPDATE").fetchall()
        one(db, "SELECT embed_sidecar.resume('a')")
        # give the worker the chance to reach a's locked row first (bounded; it may never block)
        deadline = time.time() + 3
        while time.time() < deadline and not one(
                db, """SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker'
                         AND datname = current_database() AND wait_event_type = 'Lock'"""):
            time.sleep(0.1)
        db.execute("INSERT INTO b VALUES (1, 'must not wait for a')")
        wait(db, "b", 30)
        assert one(db, "SELECT count(*) FROM b_embeddings") == 1
        writer.execute("ROLLBACK")
        wait(db, "a", 60)
        assert_in_step(db, "a")
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# M2: DROP DATABASE by anyone
# ---------------------------------------------------------------------------------------------

def test_unprivileged_drop_database_leaves_the_worker_running():
    """M2: a role with no privileges failing DROP DATABASE (42501) leaves that database's drain
    worker running: the same pid throughout the next 3 s."""
    victim = f"pes_atk_victim_{uid()}"
    with connect(dbname="postgres") as admin:
        admin.execute(f"CREATE DATABASE {victim}")
    try:
        with connect(dbname=victim) as v:
            v.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        pid = worker_pid(victim)
        with plain_role("m2") as mallory:
            with connect(user=mallory, dbname="postgres") as m:
                err = error_of(m, f"DROP DATABASE {victim}")
            assert err is not None and err[0] == "42501", err
            for _ in range(6):
                assert drain_workers(victim) == [pid], "the victim's worker was killed"
                time.sleep(0.5)
            assert drain_workers(victim) == [pid]
    finally:
        with connect(dbname="postgres") as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {victim} WITH (FORCE)")


# ---------------------------------------------------------------------------------------------
# M3: writer-chosen keys
# ---------------------------------------------------------------------------------------------

def test_enqueue_rejects_keys_that_do_not_fit_the_table(db, make_role):
    """M3: a writer (UPDATE (body) only) calling _enqueue directly with a key that is a 32 KB
    string, of the wrong type, of the wrong arity, or not an array gets invalid_parameter_value
    (22023), and nothing is enqueued."""
    w = make_role(f"pes_atk_m3_{uid()}")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'row ' || i FROM generate_series(1, 5) i")
    watch(db, "docs")
    wait(db, "docs")
    one(db, "SELECT embed_sidecar.pause('docs')")  # nothing drains: the queue shows what was sent
    db.execute(f'GRANT UPDATE (body) ON docs TO "{w}"')
    sid = one(db, "SELECT id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    before = queue_depth(db, "docs")
    writer = connect_as(w, db.schema)
    try:
        for name, key in (("32 KB string", json.dumps(["k" * 32768])), ("wrong type", '["junk"]'),
                          ("wrong arity", "[1, 2]"), ("not an array", '{"a": 1}')):
            err = error_of(writer, "SELECT embed_sidecar._enqueue(%s, ARRAY[%s::text])", (sid, key))
            assert err is not None and err[0] == "22023", f"{name}: {err}"
            assert queue_depth(db, "docs") == before, f"{name}: enqueued"
    finally:
        writer.close()


def test_owner_discards_dead_letters(db, make_role):
    """M3: dead letters held up set_model() for good (a shadow is promoted only without its own)
    and only retry_failed() could touch them, which fails them again. The owner can now discard
    them: discard_failed() deletes them and returns how many, the row is left without a vector
    (verify counts it missing); a role that does not own the table gets 42501."""
    other = make_role(f"pes_atk_m3d_{uid()}")
    db.execute(f'GRANT EXECUTE ON FUNCTION embed_sidecar.discard_failed(regclass, text) TO "{other}"')
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs VALUES (1, 'fine'), (2, 'POISON row')")
    db.execute(f'GRANT SELECT ON docs TO "{other}"')
    with db.transaction():  # paused before the worker can see the backfill
        watch(db, "docs")
        one(db, "SELECT embed_sidecar.pause('docs')")
    db.execute("SET pg_embed_sidecar.test_fail_marker = 'POISON'")
    db.execute("SET pg_embed_sidecar.max_attempts = 1")
    one(db, "SELECT embed_sidecar.process('docs')")
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 1
    stranger = connect_as(other, db.schema)
    try:
        err = error_of(stranger, "SELECT embed_sidecar.discard_failed('docs')")
        assert err is not None and err[0] == "42501", err
    finally:
        stranger.close()
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 1
    assert one(db, "SELECT embed_sidecar.discard_failed('docs')") == 1
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 0
    assert one(db, "SELECT (embed_sidecar.verify('docs')).missing") == 1


# ---------------------------------------------------------------------------------------------
# M4: model files replaced in place
# ---------------------------------------------------------------------------------------------

def test_search_refuses_when_the_model_files_changed_under_it(db, model_copy):
    """M4: when the files of a paused source's model are replaced in place by another model, search
    and hybrid_search raise object_not_in_prerequisite_state (55000) with a hint naming reembed,
    instead of ranking the old vectors against a query embedded by the new files."""
    usable = one(db, "SELECT count(*) FROM embed_sidecar.models WHERE name = %s AND error IS NULL", (L3,))
    if not usable:
        pytest.skip(f"{L3} is not installed")
    path = model_copy("pes-atk-swap")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("""INSERT INTO docs SELECT i, (ARRAY['chess opening theory', 'pasta recipe', 'sailing knots', 'tax return'])[1 + i % 4]
                  || ' ' || i FROM generate_series(1, 40) i""")
    watch(db, "docs", model="pes-atk-swap")
    wait(db, "docs")
    one(db, "SELECT embed_sidecar.pause('docs')")
    assert one(db, "SELECT count(*) FROM embed_sidecar.search('docs', 'pasta recipe', 5)") == 5  # control
    shutil.rmtree(path)
    shutil.copytree(f"{MODELS}/{L3}", path)
    for sql in ("SELECT * FROM embed_sidecar.search('docs', 'chess', 5)",
                "SELECT * FROM embed_sidecar.hybrid_search('docs', 'chess', 5)"):
        err = error_of(db, sql)
        assert err is not None and err[0] == "55000", f"{sql}: {err}"
        assert err[2] and "reembed" in err[2], f"{sql}: hint {err[2]!r}"


def test_corrupt_model_file_burns_no_attempts_through_the_service(db, model_copy):
    """M4: a model file replaced in place by garbage, with the inference service: the drain checks
    that the new files load before it reads any message, so no change is dead-lettered (0.2.0
    only hashed the files, and every change failed in the service and was dead-lettered); the
    error is in status.last_error, and once the file is good again the rows are embedded."""
    path = model_copy("pes-atk-corrupt")
    db.execute("CREATE TABLE cm (id int PRIMARY KEY, body text)")
    watch(db, "cm", model="pes-atk-corrupt")
    onnx = f"{path}/model.onnx" if os.path.exists(f"{path}/model.onnx") else f"{path}/onnx/model.onnx"
    good = open(onnx, "rb").read()
    with open(onnx, "wb") as f:
        f.write(os.urandom(1_000_000))
    db.execute("INSERT INTO cm SELECT i, 'row ' || i FROM generate_series(1, 20) i")
    deadline = time.time() + 60
    while not one(db, "SELECT last_error FROM embed_sidecar.status WHERE source = 'cm'::regclass"):
        assert time.time() < deadline, "the broken model's error never reached status"
        time.sleep(0.5)
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'cm'::regclass") == 0
    assert one(db, "SELECT count(*) FROM cm_embeddings") == 0
    with open(onnx, "wb") as f:
        f.write(good)
    wait(db, "cm")
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'cm'::regclass") == 0
    assert_in_step(db, "cm")


# ---------------------------------------------------------------------------------------------
# M5: changes that bypass the statement triggers
# ---------------------------------------------------------------------------------------------

def test_partitions_and_inheritance_are_refused(db):
    """M5: watch() of a partitioned table or of a table with inheritance children raises
    feature_not_supported (0A000) with a hint; once a table is watched, CREATE TABLE ... INHERITS
    it and ALTER TABLE ... INHERIT it raise 0A000 too."""
    db.execute("CREATE TABLE parts (id int, region text, body text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)")
    db.execute("CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu')")
    db.execute("CREATE TABLE par (id int PRIMARY KEY, body text)")
    db.execute("CREATE TABLE kid () INHERITS (par)")
    for table in ("parts", "par"):
        state, msg, hint = error_of(db, "SELECT embed_sidecar.watch(%s::regclass, 'body')", (table,)) or (None, None, None)
        assert state == "0A000" and hint, (table, state, msg, hint)
        assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = %s::regclass", (table,)) == 0
    db.execute("CREATE TABLE w (id int PRIMARY KEY, body text)")
    watch(db, "w")
    err = error_of(db, "CREATE TABLE child () INHERITS (w)")
    assert err is not None and err[0] == "0A000", err
    assert one(db, "SELECT to_regclass('child')") is None
    db.execute("CREATE TABLE other (id int NOT NULL, body text)")
    err = error_of(db, "ALTER TABLE other INHERIT w")
    assert err is not None and err[0] == "0A000", err
    assert one(db, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'w'::regclass") == 0


def test_replica_mode_writes_reach_the_sidecar(db):
    """M5: writes under session_replication_role = replica skip the statement triggers and the
    foreign key's cascade; the replica row trigger (sql/replica.sql) queues their keys, so the
    insert is embedded, the update re-embedded and the delete's vector removed (it was left as
    an orphan before)."""
    db.execute("CREATE TABLE rep (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO rep VALUES (1, 'one'), (2, 'two')")
    watch(db, "rep")
    wait(db, "rep")
    db.execute("SET session_replication_role = replica")
    try:
        db.execute("DELETE FROM rep WHERE id = 2")
        db.execute("INSERT INTO rep VALUES (3, 'three')")
        db.execute("UPDATE rep SET body = 'one, changed' WHERE id = 1")
    finally:
        db.execute("RESET session_replication_role")
    wait(db, "rep")
    assert db.execute("SELECT missing, stale, orphans FROM embed_sidecar.verify('rep')").fetchone() == (0, 0, 0)
    assert_in_step(db, "rep")


# ---------------------------------------------------------------------------------------------
# M6: a renamed key column
# ---------------------------------------------------------------------------------------------

def test_renamed_key_column_keeps_draining(db):
    """M6: after ALTER TABLE ... RENAME COLUMN id TO doc_id, later inserts and updates are embedded
    (verify: missing 0, stale 0; no dead letters) and search still returns keys."""
    db.execute("CREATE TABLE ren (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO ren VALUES (1, 'one')")
    watch(db, "ren")
    wait(db, "ren")
    db.execute("ALTER TABLE ren RENAME COLUMN id TO doc_id")
    db.execute("INSERT INTO ren VALUES (2, 'two')")
    db.execute("UPDATE ren SET body = 'ONE, rewritten' WHERE doc_id = 1")
    wait(db, "ren", 60)
    st = db.execute("SELECT failed, last_error FROM embed_sidecar.status WHERE source = 'ren'::regclass").fetchone()
    assert st[0] == 0, st
    assert db.execute("SELECT source_rows, missing, stale, orphans FROM embed_sidecar.verify('ren')").fetchone() == (2, 0, 0, 0)
    assert sorted(keys_of(db, "SELECT key FROM embed_sidecar.search('ren', 'two', 5)")) == [[1], [2]]


# ---------------------------------------------------------------------------------------------
# M7, M8: the inference ring
# ---------------------------------------------------------------------------------------------

def test_short_lived_sessions_never_get_each_others_vectors():
    """M7: six clients opening a new connection for every embed_texts() call of 16 texts of their
    own, for ~10 s: every vector in a call is distinct, and a sample equals (cosine > 0.9999) what
    embed_text() gives for the same text in a reference session afterwards."""
    run = uid()
    stop = time.time() + 10
    calls, errors = [], []
    topics = ["rivers", "violins", "glaciers", "compilers", "bakeries", "comets", "tides", "orchards"]

    def client(n):
        i = 0
        try:
            while time.time() < stop:
                texts = [f"ring probe {run} client {n} call {i} text {j} about {topics[(n + i + j) % len(topics)]}"
                         for j in range(16)]
                with connect(options="-c statement_timeout=60s") as c:
                    calls.append((texts, one(c, "SELECT embed_texts(%s::text[])::text[]", (texts,))))
                i += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert errors == [], errors[:3]
    assert len(calls) >= 12, f"only {len(calls)} calls completed"
    for texts, vecs in calls:
        assert len(vecs) == 16 and len(set(vecs)) == 16, f"a call got repeated vectors: {texts[0]}"
    rng = np.random.default_rng(7)
    sample = [(t, v) for texts, vecs in calls for t, v in zip(texts, vecs)]
    sample = [sample[i] for i in rng.choice(len(sample), size=min(160, len(sample)), replace=False)]
    with connect() as ref:
        ref.execute("SET pg_embed_sidecar.inference = 'local'")
        expected = dict(ref.execute("SELECT t, embed_text(t)::text FROM unnest(%s::text[]) t",
                                    ([t for t, _ in sample],)).fetchall())
    worst = min(float(vec(v) @ vec(expected[t])) for t, v in sample)
    assert worst > 0.9999, f"a session got a vector that is not its text's: cosine {worst}"


# one call of the most texts a call may take (embed_texts_max) keeps a session on the ring for
# about half a minute here (on 0.2.0, two of them kept every drain waiting until both ended:
# interactive requests always went first)
FLOOD = ("SELECT count(*) FROM unnest(embed_texts(ARRAY(SELECT 'flood ' || i || ' ' || md5(random()::text) "
         "FROM generate_series(1, 10000) i)))")


def test_drain_is_served_while_two_sessions_flood_embed_texts(db):
    """M8: while two sessions run embed_texts() over 10,000 texts each (the most a call may take;
    about half a minute per call here), a row inserted into a watched table is still embedded
    within 30 s: drains waiting are owed a quarter of the service's busy time and have a quarter
    of the ring of their own."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs")
    stop, pids, errors = threading.Event(), [], []

    def flood():
        try:
            with connect() as c:
                pids.append(one(c, "SELECT pg_backend_pid()"))
                while not stop.is_set():
                    try:
                        c.execute(FLOOD).fetchall()
                    except psycopg.errors.QueryCanceled:
                        pass
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=flood) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 20
        while time.time() < deadline and not (len(pids) == 2 and one(
                db, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'active' AND query LIKE '%%flood%%'",
                (pids,)) == 2):
            time.sleep(0.1)
        assert len(pids) == 2, "the flooding sessions did not start"
        db.execute("INSERT INTO docs VALUES (1, 'behind the flood')")
        wait(db, "docs", 30)
        assert one(db, "SELECT count(*) FROM docs_embeddings") == 1
    finally:
        stop.set()
        deadline = time.time() + 60
        while any(t.is_alive() for t in threads) and time.time() < deadline:
            if pids:
                db.execute("SELECT pg_cancel_backend(p) FROM unnest(%s::int[]) p", (pids,))
            for t in threads:
                t.join(0.5)
    assert errors == [], errors


# ---------------------------------------------------------------------------------------------
# M9: reg* columns
# ---------------------------------------------------------------------------------------------

def test_extension_tables_have_no_reg_columns_pg_upgrade_refuses():
    """M9: no column of the extension's own tables has a reg* type other than regclass, regtype or
    regrole (pg_upgrade refuses the others), nor an array or domain of one."""
    with connect() as c:
        bad = c.execute("""
            SELECT cl.relname, a.attname, format_type(a.atttypid, a.atttypmod)
              FROM pg_attribute a JOIN pg_class cl ON cl.oid = a.attrelid
              JOIN pg_type t ON t.oid = a.atttypid
             WHERE cl.relnamespace = 'embed_sidecar'::regnamespace AND cl.relkind IN ('r', 'm', 'p')
               AND a.attnum > 0 AND NOT a.attisdropped
               AND CASE WHEN t.typcategory = 'A' THEN t.typelem WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
                   IN ('regproc'::regtype, 'regprocedure'::regtype, 'regoper'::regtype, 'regoperator'::regtype,
                       'regconfig'::regtype, 'regdictionary'::regtype, 'regnamespace'::regtype, 'regcollation'::regtype)""").fetchall()
    assert bad == [], bad


# ---------------------------------------------------------------------------------------------
# Low
# ---------------------------------------------------------------------------------------------

def test_watch_in_a_schema_that_needs_quoting(db):
    """L1: watch('"Sales_…".d', 'body') works in a schema whose name needs quotes; the sidecar lands
    in that schema and the rows are embedded."""
    schema = f"Sales_{uid()}"
    db.execute(f'CREATE SCHEMA "{schema}"')
    try:
        db.execute(f'CREATE TABLE "{schema}".d (id int PRIMARY KEY, body text)')
        db.execute(f"""INSERT INTO "{schema}".d VALUES (1, 'quarterly sales'), (2, 'regional targets')""")
        table = f'"{schema}".d'
        watch(db, table)
        assert one(db, "SELECT n.nspname::text FROM embed_sidecar.sources s JOIN pg_class c ON c.oid = s.sidecar "
                       "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE s.source = %s::regclass", (table,)) == schema
        wait(db, table)
        assert one(db, f'SELECT count(*) FROM "{schema}".d_embeddings') == 2
    finally:
        drop_schema(schema)


def test_readers_view_does_not_block_dropping_the_source(db, make_role):
    """L3: a view a reader made over the sidecar does not stop the owner's DROP TABLE source
    CASCADE: it succeeds and the registry row goes."""
    reader = make_role(f"pes_atk_l3_{uid()}")
    db.execute("CREATE TABLE vw (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO vw VALUES (1, 'viewed')")
    watch(db, "vw")
    wait(db, "vw")
    db.execute(f'GRANT SELECT ON vw TO "{reader}"')
    rc = connect_as(reader, db.schema)
    try:
        rc.execute("CREATE VIEW peek AS SELECT id FROM vw_embeddings")
    finally:
        rc.close()
    oid = one(db, "SELECT 'vw'::regclass::oid")
    err = error_of(db, "DROP TABLE vw CASCADE")
    assert err is None, f"DROP TABLE vw CASCADE: {err}"
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source::oid = %s", (oid,)) == 0


def test_no_leaks_to_roles_without_rights(db):
    """L4: a role with no privileges searching a table with two embeddings gets 42501 and no
    embedding's name; a reader (SELECT only) sees status.last_error as NULL."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, notes text)")
    db.execute("INSERT INTO docs VALUES (1, 'public text', 'salary review notes')")
    names = ("emb_public_text", "salary_review_2026")
    watch(db, "docs", content="body", embedding=names[0])
    watch(db, "docs", content="notes", embedding=names[1])
    for e in names:
        one(db, "SELECT embed_sidecar.pause('docs', embedding => %s)", (e,))
    db.execute("UPDATE embed_sidecar.sources SET last_error = 'injected: the CEO earns 9 million', last_error_at = now() "
               "WHERE source = 'docs'::regclass")
    oid = one(db, "SELECT 'docs'::regclass::oid")
    with plain_role("l4n") as nobody, plain_role("l4r") as reader:
        with connect(user=nobody) as n:
            try:
                n.execute("SELECT * FROM embed_sidecar.search(%s::oid::regclass, 'x')", (oid,)).fetchall()
                state, said = None, ""
            except psycopg.Error as e:
                state = e.sqlstate
                said = " ".join(filter(None, (e.diag.message_primary, e.diag.message_detail, e.diag.message_hint)))
        assert state == "42501", (state, said)
        assert not any(name in said for name in names), said
        db.execute(f'GRANT SELECT ON docs TO "{reader}"')
        with connect(user=reader) as r:
            rows = r.execute("SELECT embedding, last_error FROM embed_sidecar.status WHERE source::oid = %s", (oid,)).fetchall()
        assert sorted(rows) == [(names[0], None), (names[1], None)], rows
        db.execute(f'REVOKE SELECT ON docs FROM "{reader}"')
    # the owner still sees it
    assert one(db, "SELECT count(last_error) FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 2


def test_search_does_not_run_the_owners_cast_on_keys(db, make_role):
    """L5: with an enum key whose owner declared a cast to json (a function that notes who runs
    it), a superuser's search() and hybrid_search() never run that function, and keys come back as
    JSON arrays of the labels' text."""
    o = make_role(f"pes_atk_l5_{uid()}")
    s = f'"{db.schema}"'
    oc = connect_as(o, db.schema)
    try:
        oc.execute("CREATE TYPE k AS ENUM ('alpha', 'beta', 'gamma')")
        oc.execute("CREATE TABLE cast_log (who name)")
        oc.execute("GRANT INSERT ON cast_log TO PUBLIC")
        oc.execute(f"""CREATE FUNCTION k_json({s}.k) RETURNS json LANGUAGE plpgsql AS $$
                       BEGIN INSERT INTO {s}.cast_log VALUES (current_user); RETURN pg_catalog.to_json($1::text); END $$""")
        oc.execute(f"CREATE CAST ({s}.k AS json) WITH FUNCTION {s}.k_json({s}.k)")
        oc.execute("CREATE TABLE kdocs (id k PRIMARY KEY, body text)")
        oc.execute("INSERT INTO kdocs VALUES ('alpha', 'chess engine'), ('beta', 'pasta recipe'), ('gamma', 'sailing knots')")
    finally:
        oc.close()
    watch(db, "kdocs")
    wait(db, "kdocs")
    db.execute("DELETE FROM cast_log")  # from here on only the searches could run it
    got = {}
    for fn in ("search", "hybrid_search"):
        try:
            got[fn] = sorted(keys_of(db, f"SELECT key FROM embed_sidecar.{fn}('kdocs', 'chess', 3)"))
        except psycopg.Error as e:
            got[fn] = (e.sqlstate, e.diag.message_primary)
    log = db.execute("SELECT who::text FROM cast_log").fetchall()
    assert log == [], f"the owner's cast ran as {log}"
    for fn, keys in got.items():
        assert keys == [["alpha"], ["beta"], ["gamma"]], (fn, keys)


def test_watch_a_table_whose_name_is_63_bytes_of_multibyte_characters(db):
    """L6: a table named with 21 three-byte characters (63 bytes) can be watched; its sidecar gets
    a valid name of its own, and the rows are embedded."""
    name = "文" * 21
    table = f'"{name}"'
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
    db.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    watch(db, table)
    side, src = db.execute("SELECT sidecar::oid, source::oid FROM embed_sidecar.sources WHERE source = %s::regclass",
                           (table,)).fetchone()
    relname, nbytes = db.execute("SELECT relname::text, octet_length(relname::text) FROM pg_class WHERE oid = %s",
                                 (side,)).fetchone()
    assert side != src and relname != name and nbytes <= 63, (relname, nbytes)
    wait(db, table)
    assert one(db, f'SELECT count(*) FROM "{relname}"') == 3


def test_inference_counter_is_updated_before_embed_text_returns():
    """Counter ordering: once SELECT embed_text(...) has returned, inference_service().texts
    already counts it (20 times in a row, no waiting)."""
    with connect() as c:
        c.execute("SET pg_embed_sidecar.inference = 'shared'")
        for i in range(20):
            before = one(c, "SELECT texts FROM embed_sidecar.inference_service()")
            one(c, "SELECT embed_text(%s)::text", (f"counter probe {i} {uid()}",))
            after = one(c, "SELECT texts FROM embed_sidecar.inference_service()")
            assert after > before, f"repetition {i}: texts {before} -> {after}"
