"""Second security review of pg_embed_sidecar: every attack tried, written as a check of the
promised behaviour. A test FAILS when its attack works.

Runs in its own database (pes_rv2_db) with its own roles (pes_rv2_*), never in pes_test: the
module-level `extension` fixture below replaces conftest's session fixture.

Roles:
  pes_rv2_owner   owns the watched tables (may execute the public management functions)
  pes_rv2_owner2  another table owner (same grants), owns tables of its own
  pes_rv2_reader  may read some tables (granted per test)
  pes_rv2_writer  may write some tables (granted per test)
  pes_rv2_nobody  no privileges at all on anybody's tables
"""
import re
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest

from conftest import connect, error_of, one

DB = "pes_rv2_db"
OWNER, OWNER2, READER, WRITER, NOBODY = ("pes_rv2_owner", "pes_rv2_owner2", "pes_rv2_reader",
                                         "pes_rv2_writer", "pes_rv2_nobody")
BYPASS = "pes_rv2_bypass"  # BYPASSRLS (an ETL or audit role), no privilege on anybody's tables
ROLES = [OWNER, OWNER2, READER, WRITER, NOBODY, BYPASS]
MANAGE = ("embed_sidecar.watch, embed_sidecar.unwatch, embed_sidecar.process, embed_sidecar.reembed, "
          "embed_sidecar.set_model, embed_sidecar.rollback_model, embed_sidecar.drop_previous, "
          "embed_sidecar.retry_failed, embed_sidecar.discard_failed, embed_sidecar.pause, "
          "embed_sidecar.resume, embed_sidecar.wait")


def conn(role=None, **kw):
    return connect(dbname=DB, user=role or "postgres", **kw)


def until(fn, timeout=60, step=0.1, what="condition"):
    """Poll fn() until it returns something truthy, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Overrides conftest's session fixture: a database and roles of our own, never pes_test."""
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        for r in ROLES:
            c.execute(f"DROP ROLE IF EXISTS {r}")
            c.execute(f"CREATE ROLE {r} LOGIN")
        c.execute(f"ALTER ROLE {BYPASS} BYPASSRLS")
        c.execute(f"CREATE DATABASE {DB}")
    with conn() as c:
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        c.execute(f"GRANT EXECUTE ON FUNCTION {MANAGE} TO {OWNER}, {OWNER2}")
    yield
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        for r in ROLES:
            c.execute(f"DROP ROLE IF EXISTS {r}")


class Env:
    pass


@pytest.fixture
def env():
    """A schema owned by OWNER (USAGE for everyone, as an application schema usually is) with a
    watched table t(id int primary key, body text) of 5 rows, drained; and a schema of OWNER2
    with its own watched table t2."""
    e = Env()
    e.schema = "s_" + uuid.uuid4().hex[:8]
    e.schema2 = e.schema + "_2"
    with conn() as c:
        c.execute(f"CREATE SCHEMA {e.schema} AUTHORIZATION {OWNER}")
        c.execute(f"CREATE SCHEMA {e.schema2} AUTHORIZATION {OWNER2}")
        c.execute(f"GRANT USAGE ON SCHEMA {e.schema}, {e.schema2} TO PUBLIC")
    e.t = f"{e.schema}.t"
    e.t2 = f"{e.schema2}.t2"
    with conn(OWNER) as o:
        o.execute(f"CREATE TABLE {e.t} (id int PRIMARY KEY, body text)")
        o.execute(f"INSERT INTO {e.t} SELECT g, 'row number ' || g || ' about sailing boats' FROM generate_series(1, 5) g")
        e.sidecar = one(o, "SELECT embed_sidecar.watch(%s::regclass, 'body')::text", (e.t,))
        assert one(o, "SELECT embed_sidecar.wait(%s::regclass, '90 s')", (e.t,))
    with conn(OWNER2) as o2:
        o2.execute(f"CREATE TABLE {e.t2} (id int PRIMARY KEY, body text)")
        o2.execute(f"INSERT INTO {e.t2} VALUES (1, 'the other owner''s private text')")
        e.sidecar2 = one(o2, "SELECT embed_sidecar.watch(%s::regclass, 'body')::text", (e.t2,))
        assert one(o2, "SELECT embed_sidecar.wait(%s::regclass, '90 s')", (e.t2,))
    e.id = one(conn(), "SELECT id FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'current'", (e.t,))
    e.id2 = one(conn(), "SELECT id FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'current'", (e.t2,))
    yield e
    with conn() as c:
        c.execute("SET lock_timeout = '10s'")
        for s in (e.schema, e.schema2):
            c.execute("""SELECT embed_sidecar.unwatch(source, embedding => embedding) FROM embed_sidecar.sources s
                          JOIN pg_class r ON r.oid = s.source WHERE r.relnamespace = %s::regnamespace AND s.role = 'current'""",
                      (s,))
            c.execute(f"DROP SCHEMA {s} CASCADE")


def role_attrs(c):
    return c.execute("SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication FROM pg_roles "
                     "WHERE rolname LIKE 'pes_rv2_%' ORDER BY 1").fetchall(), \
        c.execute("SELECT roleid::regrole::text, member::regrole::text FROM pg_auth_members ORDER BY 1, 2").fetchall()


def verify(c, table):
    return c.execute("SELECT source_rows, embedded_rows, missing, stale, orphans FROM embed_sidecar.verify(%s::regclass)",
                     (table,)).fetchone()


# --------------------------------------------------------------------------------------------
# Promise 3: status leaks
# --------------------------------------------------------------------------------------------

def test_status_view_leaks_nothing_to_a_cheap_leaky_qual(env):
    """Promise 3 (status; 'roles without rights learn no embedding names').
    Attack: embed_sidecar.status is a plain view (not security_barrier) whose only privacy filter
    is `WHERE has_table_privilege(s.source, 'SELECT')`. A role with no rights defines a plpgsql
    function with COST 0.0000001 that RAISEs NOTICE of its arguments and filters the view on it:
    the planner evaluates the cheap function before has_table_privilege, on every registry row.
    Promised: a role that may not read a table learns nothing of its embeddings."""
    with conn() as c:
        c.execute(f"CREATE SCHEMA IF NOT EXISTS nb AUTHORIZATION {NOBODY}")
    with conn(NOBODY) as x:
        x.execute("""CREATE OR REPLACE FUNCTION nb.peek(text, text, regclass, bigint) RETURNS boolean
                     LANGUAGE plpgsql COST 0.0000001 AS $$
                     BEGIN RAISE NOTICE 'peek|%|%|%|%', $1, $2, $3, $4; RETURN false; END $$""")
        seen = []
        x.add_notice_handler(lambda d: seen.append(d.message_primary))
        x.execute("SELECT * FROM embed_sidecar.status WHERE nb.peek(embedding, model, sidecar, acked)").fetchall()
        assert one(x, "SELECT count(*) FROM embed_sidecar.status") == 0
    leaked = [m for m in seen if "embeddings" in m]
    assert leaked == [], f"status leaked other owners' embeddings to a role without rights: {leaked}"


def test_status_and_verify_refuse_roles_without_rights(env):
    """Promise 3 (status, verify). Attack: a role with no privilege on the table reads the status
    view, calls verify(), search(), hybrid_search(), and the PUBLIC internal _readable_source()
    after recording itself with _enter(). Promised: no row, no count, no embedding name."""
    with conn(NOBODY) as x:
        assert x.execute("SELECT * FROM embed_sidecar.status").fetchall() == []
        for sql in (f"SELECT * FROM embed_sidecar.verify('{env.t}')",
                    f"SELECT * FROM embed_sidecar.search('{env.t}', 'boats')",
                    f"SELECT * FROM embed_sidecar.hybrid_search('{env.t}', 'boats')"):
            err = error_of(x, sql)
            assert err and err[0] == "42501", (sql, err)
        x.execute("BEGIN")
        x.execute("SELECT embed_sidecar._enter()")
        err = error_of(x, f"SELECT (embed_sidecar._readable_source('{env.t}')).embedding")
        x.execute("ROLLBACK")
        assert err and err[0] == "42501", err


# --------------------------------------------------------------------------------------------
# Promise 5: locks another role can take
# --------------------------------------------------------------------------------------------

def _hold_sidecar_lock(table):
    """A role with no privilege on the source tries to take ACCESS SHARE on its sidecar and keep it
    in an open transaction (in 0.3.0 before the second review, SELECT on every sidecar was granted
    to PUBLIC, so it could). Now the sidecar's readers are the source's: the LOCK itself is refused
    (42501) and nothing is held; the connection is returned either way, for the caller to close."""
    x = conn(NOBODY)
    x.execute("BEGIN")
    err = error_of(x, f"LOCK TABLE {table} IN ACCESS SHARE MODE")
    assert err is None or err[0] == "42501", err
    return x


def test_public_lock_on_sidecar_does_not_stall_unwatch(env):
    """Promise 5 ('no lock another role can take stalls ... management functions').
    Attack: pes_rv2_nobody (no privilege on the source table at all) runs
    `BEGIN; LOCK TABLE <sidecar> IN ACCESS SHARE MODE;` and keeps the transaction open; the
    sidecar's PUBLIC SELECT grant makes that legal. The owner then calls
    unwatch(t, drop_sidecar => true), whose DROP TABLE needs ACCESS EXCLUSIVE.
    Promised: the owner's management call is not stalled by another role's lock (here: it must
    finish within 5 s)."""
    x = _hold_sidecar_lock(env.sidecar)
    try:
        with conn(OWNER) as o:
            o.execute("SET lock_timeout = '5s'")
            err = error_of(o, "SELECT embed_sidecar.unwatch(%s::regclass, drop_sidecar => true)", (env.t,))
    finally:
        x.close()
    assert err is None, f"unwatch stalled behind a lock of a role without rights: {err}"


def test_public_lock_on_previous_sidecar_does_not_stall_drop_previous(env):
    """Promise 5. Attack: after a completed set_model() switch, pes_rv2_nobody holds ACCESS
    SHARE on the previous sidecar (PUBLIC may SELECT it); the owner calls drop_previous().
    Promised: not stalled by another role's lock (must finish within 5 s)."""
    with conn(OWNER) as o:
        o.execute("SELECT embed_sidecar.set_model(%s::regclass, 'all-MiniLM-L6-v2')", (env.t,))
        prev = until(lambda: one(o, "SELECT sidecar::text FROM embed_sidecar.status WHERE source = %s::regclass "
                                    "AND role = 'previous'", (env.t,)), 90, 0.2, "the switch to complete")
    x = _hold_sidecar_lock(prev)
    try:
        with conn(OWNER) as o:
            o.execute("SET lock_timeout = '5s'")
            err = error_of(o, "SELECT embed_sidecar.drop_previous(%s::regclass)", (env.t,))
    finally:
        x.close()
    assert err is None, f"drop_previous stalled behind a lock of a role without rights: {err}"


def test_public_lock_on_sidecar_does_not_stall_drop_table(env):
    """Promise 5 (and 1: the owner's own DROP TABLE). Attack: as above, pes_rv2_nobody (no
    privilege on the source) holds ACCESS SHARE on the sidecar; the owner drops its table
    (DROP TABLE ... CASCADE, whose sql_drop event trigger drops the sidecar).
    Promised: a role without any right on the table cannot hold up its owner (5 s)."""
    x = _hold_sidecar_lock(env.sidecar)
    try:
        with conn(OWNER) as o:
            o.execute("SET lock_timeout = '5s'")
            err = error_of(o, f"DROP TABLE {env.t} CASCADE")
    finally:
        x.close()
    assert err is None, f"DROP TABLE stalled behind a lock of a role without rights: {err}"


def test_advisory_locks_on_queue_names_do_not_stall_watch_or_unwatch(env):
    """Promise 5. Attack: a role without privileges holds pgmq's advisory lock
    pg_advisory_xact_lock(hashtext('pgmq.queue_' || name)) for the queue names the next watch()
    will use (ids 1..300, both lanes) and for the existing queue, then the owner watches a new
    table and unwatches the existing one. Promised: neither waits (5 s lock_timeout)."""
    x = conn(NOBODY)
    x.execute("BEGIN")
    x.execute("""SELECT pg_advisory_xact_lock(hashtext('pgmq.queue_embed_sidecar_' || g || l))
                   FROM generate_series(1, 300) g, unnest(ARRAY['', '_bulk']) l""")
    try:
        with conn(OWNER) as o:
            o.execute("SET lock_timeout = '5s'")
            o.execute(f"CREATE TABLE {env.schema}.adv (id int PRIMARY KEY, body text)")
            assert error_of(o, f"SELECT embed_sidecar.watch('{env.schema}.adv', 'body')") is None
            assert error_of(o, f"SELECT embed_sidecar.unwatch('{env.schema}.adv')") is None
    finally:
        x.close()


def test_status_view_row_locks_are_refused(env):
    """Promise 5 (the drain's own lock is its registry row). Attack: a role with only SELECT on the
    status view tries to row-lock the registry through it (SELECT ... FOR KEY SHARE / FOR UPDATE)
    and to lock it in a stronger mode (LOCK TABLE embed_sidecar.status IN ROW EXCLUSIVE MODE).
    Promised: refused (only the extension's functions lock registry rows)."""
    with conn(NOBODY) as x:
        for sql in ("SELECT * FROM embed_sidecar.status FOR KEY SHARE",
                    "SELECT * FROM embed_sidecar.status FOR UPDATE",
                    "BEGIN; LOCK TABLE embed_sidecar.status IN ROW EXCLUSIVE MODE"):
            err = error_of(x, sql)
            x.execute("ROLLBACK")
            assert err is not None, f"{sql} succeeded"


def test_unprivileged_drop_database_leaves_drain_running(env):
    """Promise 5. Attack: a role that does not own the database runs DROP DATABASE on it (it fails
    with 42501). Promised: the database's drain worker keeps draining (a new row is embedded)."""
    with connect(dbname="postgres", user=NOBODY) as x:
        err = error_of(x, f"DROP DATABASE {DB}")
        assert err and err[0] == "42501"
    with conn(OWNER) as o:
        o.execute(f"INSERT INTO {env.t} VALUES (900, 'after the failed drop database')")
        until(lambda: one(o, f"SELECT count(*) FROM {env.sidecar} WHERE id = 900"), 60, 0.2, "the drain")


# --------------------------------------------------------------------------------------------
# Promise 2: who is calling
# --------------------------------------------------------------------------------------------

def test_internal_do_functions_refuse_direct_calls(env):
    """Promise 2. Attack: pes_rv2_nobody calls the PUBLIC-executable bodies
    embed_sidecar._do_pause/_do_unwatch/_do_discard_failed directly on another owner's table,
    without a wrapper, and also after recording itself with _enter(). Promised: refused (no
    caller recorded, or judged as pes_rv2_nobody who may not manage the table)."""
    with conn(NOBODY) as x:
        for sql in (f"SELECT embed_sidecar._do_pause('{env.t}', false, NULL)",
                    f"SELECT embed_sidecar._do_unwatch('{env.t}', true, NULL)",
                    f"SELECT embed_sidecar._do_discard_failed('{env.t}', NULL)"):
            err = error_of(x, sql)
            assert err and err[0] == "42501", (sql, err)
            x.execute("BEGIN")
            x.execute("SELECT embed_sidecar._enter()")
            err = error_of(x, sql)
            x.execute("ROLLBACK")
            assert err and err[0] == "42501", (sql, err)
    assert one(conn(), "SELECT state FROM embed_sidecar.sources WHERE id = %s", (env.id,)) == "active"


def test_forged_caller_mark_is_refused(env):
    """Promise 2. Attack: the caller mark is a GUC anyone may set: pes_rv2_owner2 (who may
    execute pause()) sets pg_embed_sidecar.caller to '<oid of pes_rv2_owner>:<guessed mac>'
    (and to the bare oid) and calls _do_pause on pes_rv2_owner's table. Promised: refused."""
    owner_oid = one(conn(), f"SELECT oid FROM pg_roles WHERE rolname = '{OWNER}'")
    with conn(OWNER2) as x:
        for mark in (f"{owner_oid}", f"{owner_oid}:0000000000000000", f"{owner_oid}:ffffffffffffffff"):
            x.execute("BEGIN")
            x.execute(f"SET LOCAL pg_embed_sidecar.caller = '{mark}'")
            err = error_of(x, f"SELECT embed_sidecar._do_pause('{env.t}', false, NULL)")
            x.execute("ROLLBACK")
            assert err and err[0] == "42501", (mark, err)
    assert one(conn(), "SELECT state FROM embed_sidecar.sources WHERE id = %s", (env.id,)) == "active"


def test_definer_function_of_another_role_is_judged_by_its_owner(env):
    """Promise 2. Attack: pes_rv2_owner2 writes a SECURITY DEFINER function that calls
    embed_sidecar.pause() and unwatch() on pes_rv2_owner's table and gets pes_rv2_owner (and a
    superuser) to call it. Promised: judged as pes_rv2_owner2, who does not own the table:
    refused, the table stays watched and active."""
    with conn(OWNER2) as b:
        b.execute(f"""CREATE FUNCTION {env.schema2}.helpful() RETURNS void LANGUAGE sql SECURITY DEFINER
                      AS $$ SELECT embed_sidecar.pause('{env.t}'); SELECT embed_sidecar.unwatch('{env.t}', true) $$""")
        b.execute(f"GRANT EXECUTE ON FUNCTION {env.schema2}.helpful() TO PUBLIC")
    for who in (OWNER, None):
        with conn(who) as c:
            err = error_of(c, f"SELECT {env.schema2}.helpful()")
            assert err and err[0] == "42501", (who, err)
    assert one(conn(), "SELECT state FROM embed_sidecar.sources WHERE id = %s", (env.id,)) == "active"


def test_set_role_counts_as_the_caller(env):
    """Promise 2. Attack: a superuser session does SET ROLE pes_rv2_owner2 and calls pause() and
    set_model() on pes_rv2_owner's table. Promised: judged as pes_rv2_owner2: refused."""
    with conn() as c:
        c.execute(f"SET ROLE {OWNER2}")
        for sql in (f"SELECT embed_sidecar.pause('{env.t}')", f"SELECT embed_sidecar.set_model('{env.t}', 'all-MiniLM-L6-v2')"):
            err = error_of(c, sql)
            assert err and err[0] == "42501", (sql, err)


def test_other_owner_cannot_manage_or_process_my_table(env):
    """Promise 1 (no path to another owner's tables/sidecars/registry rows). Attack: pes_rv2_owner2
    (EXECUTE on every management function) calls each of them on pes_rv2_owner's table, and
    process(NULL) while pes_rv2_owner's queue holds messages. Promised: all refused; process(NULL)
    handles none of the other owner's messages."""
    with conn(OWNER) as o:
        o.execute("SELECT embed_sidecar.pause(%s::regclass)", (env.t,))
        o.execute(f"INSERT INTO {env.t} VALUES (50, 'queued while paused')")
    with conn(OWNER2) as b:
        for sql in (f"SELECT embed_sidecar.resume('{env.t}')", f"SELECT embed_sidecar.unwatch('{env.t}')",
                    f"SELECT embed_sidecar.reembed('{env.t}')", f"SELECT embed_sidecar.set_model('{env.t}', 'x')",
                    f"SELECT embed_sidecar.rollback_model('{env.t}')", f"SELECT embed_sidecar.drop_previous('{env.t}')",
                    f"SELECT embed_sidecar.retry_failed('{env.t}')", f"SELECT embed_sidecar.discard_failed('{env.t}')",
                    f"SELECT embed_sidecar.process('{env.t}')"):
            err = error_of(b, sql)
            assert err and err[0] == "42501", (sql, err)
        b.execute("SELECT embed_sidecar.process(NULL)")
    with conn(OWNER) as o:
        assert one(o, f"SELECT count(*) FROM {env.sidecar} WHERE id = 50") == 0
        assert one(o, "SELECT pending FROM embed_sidecar.status WHERE source = %s::regclass", (env.t,)) == 1
        o.execute("SELECT embed_sidecar.resume(%s::regclass)", (env.t,))


# --------------------------------------------------------------------------------------------
# Promise 1: code the owner plants
# --------------------------------------------------------------------------------------------

PLANT = """
CREATE TABLE {s}.log (who text, sess text, sup boolean, tried text);
CREATE FUNCTION {s}.plant() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r text := '';
BEGIN
    BEGIN EXECUTE 'ALTER ROLE {owner} SUPERUSER'; r := r || 'alter-ok;'; EXCEPTION WHEN OTHERS THEN r := r || SQLERRM || ';'; END;
    BEGIN EXECUTE 'GRANT pg_read_server_files TO {owner}'; r := r || 'grant-ok;'; EXCEPTION WHEN OTHERS THEN r := r || SQLERRM || ';'; END;
    BEGIN PERFORM embed_sidecar.pause('{other}'); r := r || 'pause-ok;'; EXCEPTION WHEN OTHERS THEN r := r || SQLERRM || ';'; END;
    BEGIN EXECUTE 'SET pg_embed_sidecar.caller = ''10:0''';
          PERFORM embed_sidecar._do_unwatch('{other}', true, NULL); r := r || 'unwatch-ok;';
    EXCEPTION WHEN OTHERS THEN r := r || SQLERRM || ';'; END;
    BEGIN PERFORM set_config('search_path', '{s}, pg_catalog', false); EXCEPTION WHEN OTHERS THEN NULL; END;
    INSERT INTO {s}.log VALUES (current_user, session_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), r);
    RETURN NULL;
END $$;
"""


def _check_planted(env, o):
    rows = until(lambda: o.execute(f"SELECT who, sup, tried FROM {env.schema}.log").fetchall(), 60, 0.2, "the planted code to run")
    with conn() as c:
        attrs = role_attrs(c)
        assert (OWNER, False) in [(r[0], r[1]) for r in attrs[0]], attrs
        assert not any(m == OWNER for _, m in attrs[1]), f"{OWNER} got a membership: {attrs[1]}"
        assert one(c, "SELECT count(*) FROM embed_sidecar.sources WHERE id = %s AND state = 'active'", (env.id2,)) == 1
    for who, sup, tried in rows:
        assert who == OWNER and not sup, rows
        assert "ok;" not in tried, rows


def test_trigger_planted_on_the_sidecar_runs_as_owner_only(env, ):
    """Promise 1. Attack: the sidecar belongs to the table's owner, so the owner can attach a
    row trigger to the *sidecar*, which the drain worker (a superuser) writes. The trigger tries
    ALTER ROLE ... SUPERUSER, GRANT pg_read_server_files, pause() of another owner's table,
    _do_unwatch() with a forged caller mark, and a session-level search_path change.
    Promised: it runs as the owner, every attempt fails, nothing changes, rows still embedded."""
    with conn(OWNER) as o:
        o.execute(PLANT.format(s=env.schema, owner=OWNER, other=env.t2))
        o.execute(f"CREATE TRIGGER plant AFTER INSERT OR UPDATE ON {env.sidecar} FOR EACH ROW EXECUTE FUNCTION {env.schema}.plant()")
        o.execute(f"INSERT INTO {env.t} VALUES (77, 'planted on the sidecar')")
        _check_planted(env, o)
        until(lambda: one(o, f"SELECT count(*) FROM {env.sidecar} WHERE id = 77"), 60, 0.2, "row 77 embedded")


def test_trigger_planted_on_the_source_runs_as_owner_in_process(env):
    """Promise 1 and 2. Attack: the owner pauses its table, plants the same trigger on its sidecar
    and gets a *superuser* to call process() on the table (the drain then runs in the
    superuser's own session). Promised: the planted code runs as the owner, not as the
    superuser who called process(); it can neither escalate nor manage another owner's table."""
    with conn(OWNER) as o:
        o.execute(PLANT.format(s=env.schema, owner=OWNER, other=env.t2))
        o.execute("SELECT embed_sidecar.pause(%s::regclass)", (env.t,))
        o.execute(f"CREATE TRIGGER plant AFTER INSERT ON {env.sidecar} FOR EACH ROW EXECUTE FUNCTION {env.schema}.plant()")
        o.execute(f"INSERT INTO {env.t} VALUES (78, 'planted, drained by a superuser')")
    with conn() as su:
        su.execute(f"SET ROLE NONE")
        n = one(su, "SELECT embed_sidecar.process(%s::regclass)", (env.t,))
        assert n >= 1
        assert one(su, "SELECT current_user") == "postgres"
    with conn(OWNER) as o:
        _check_planted(env, o)
        o.execute("SELECT embed_sidecar.resume(%s::regclass)", (env.t,))


# --------------------------------------------------------------------------------------------
# DDL on watched tables
# --------------------------------------------------------------------------------------------

def test_owner_cannot_block_other_roles_ddl_through_a_foreign_child(env):
    """Promise 1 (owning a table gives no more power than owning a table). Attack: an owner who
    may use a foreign server (granted by the admin for its own work) makes its watched table a
    parent with CREATE FOREIGN TABLE ... INHERITS (t) SERVER ...: the tag 'CREATE FOREIGN TABLE'
    is not one embed_sidecar_ddl_end fires on, so it is not refused. From then on the event
    trigger's database-wide inheritance check raises on every CREATE TABLE / ALTER TABLE /
    CREATE TRIGGER of every role in the database. Promised: another role's own DDL on its own
    objects is not affected by what the owner did to its table."""
    with conn() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
        c.execute("CREATE SERVER IF NOT EXISTS rv2_srv FOREIGN DATA WRAPPER postgres_fdw OPTIONS (dbname 'nowhere')")
        c.execute(f"GRANT USAGE ON FOREIGN SERVER rv2_srv TO {OWNER}")
    try:
        with conn(OWNER) as o:
            err = error_of(o, f"CREATE FOREIGN TABLE {env.schema}.child () INHERITS ({env.t}) SERVER rv2_srv")
        with conn(OWNER2) as b:
            victim = error_of(b, f"CREATE TABLE {env.schema2}.innocent (i int)")
        assert victim is None, f"another role's CREATE TABLE failed after the owner's foreign child ({err}): {victim}"
    finally:
        with conn() as c:
            c.execute(f"DROP FOREIGN TABLE IF EXISTS {env.schema}.child")


def test_inheritance_child_of_watched_table_is_refused(env):
    """DDL on watched tables. Attack: the owner makes a child table of its watched table
    (CREATE TABLE ... INHERITS) and attaches the watched table to a parent (ALTER TABLE ...
    INHERIT); writes through the parent would miss the statement triggers.
    Promised: refused (feature_not_supported)."""
    with conn(OWNER) as o:
        err = error_of(o, f"CREATE TABLE {env.schema}.kid () INHERITS ({env.t})")
        assert err and err[0] == "0A000", err
        o.execute(f"CREATE TABLE {env.schema}.par (id int, body text)")
        err = error_of(o, f"ALTER TABLE {env.t} INHERIT {env.schema}.par")
        assert err and err[0] == "0A000", err


def test_alter_owner_moves_the_sidecar_and_old_owner_loses_it(env):
    """Promise 1 / 3. Attack: after a superuser gives the watched table to pes_rv2_owner2, the
    former owner tries to keep a hold: write the sidecar, manage the table, change its policy.
    Promised: the sidecar follows the new owner; the former owner can do none of that."""
    with conn() as c:
        c.execute(f"ALTER TABLE {env.t} OWNER TO {OWNER2}")
        assert one(c, f"SELECT relowner::regrole::text FROM pg_class WHERE oid = '{env.sidecar}'::regclass") == OWNER2
    with conn(OWNER) as o:
        for sql in (f"DELETE FROM {env.sidecar}", f"ALTER TABLE {env.sidecar} DISABLE ROW LEVEL SECURITY",
                    f"SELECT embed_sidecar.pause('{env.t}')"):
            err = error_of(o, sql)
            assert err and err[0] == "42501", (sql, err)
    with conn() as c:
        c.execute(f"ALTER TABLE {env.t} OWNER TO {OWNER}")


# --------------------------------------------------------------------------------------------
# Promise 3: row security of the sidecar and search
# --------------------------------------------------------------------------------------------

def test_sidecar_and_search_follow_source_rls_and_revoke(env):
    """Promise 3. Attack: a reader with SELECT on the source, whose RLS policy shows it only even
    ids, reads the sidecar directly, search()es, hybrid_search()es, verify()s; then the owner
    REVOKEs SELECT and the reader tries again. Promised: only even ids at first; nothing after
    the REVOKE."""
    with conn(OWNER) as o:
        o.execute(f"ALTER TABLE {env.t} ENABLE ROW LEVEL SECURITY")
        o.execute(f"CREATE POLICY evens ON {env.t} FOR SELECT TO {READER} USING (id % 2 = 0)")
        o.execute(f"GRANT SELECT ON {env.t} TO {READER}")
    with conn(READER) as r:
        assert sorted(x[0] for x in r.execute(f"SELECT id FROM {env.sidecar}")) == [2, 4]
        keys = {x[0][0] for x in r.execute("SELECT key FROM embed_sidecar.search(%s::regclass, 'sailing boats', 10)", (env.t,))}
        assert keys <= {2, 4}, keys
        keys = {x[0][0] for x in r.execute("SELECT key FROM embed_sidecar.hybrid_search(%s::regclass, 'sailing boats', 10)", (env.t,))}
        assert keys <= {2, 4}, keys
        src, emb, missing, stale, orphans = verify(r, env.t)
        assert (src, emb, orphans) == (2, 2, 0)
    with conn(OWNER) as o:
        o.execute(f"REVOKE SELECT ON {env.t} FROM {READER}")
    with conn(READER) as r:
        err = error_of(r, f"SELECT count(*) FROM {env.sidecar}")
        assert err is not None or one(r, f"SELECT count(*) FROM {env.sidecar}") == 0
        err = error_of(r, "SELECT * FROM embed_sidecar.search(%s::regclass, 'boats')", (env.t,))
        assert err and err[0] == "42501", err


def test_leaky_function_on_the_sidecar_sees_only_visible_rows(env):
    """Promise 3. Attack: a reader whose source policy shows it only id 1 queries the sidecar
    with a cheap, non-leakproof function in WHERE and in ORDER BY that RAISEs NOTICE of the id
    and fts of each row it sees. Promised: it sees id 1 only (the sidecar's policy is applied
    first)."""
    with conn() as c:
        c.execute(f"CREATE SCHEMA IF NOT EXISTS rd AUTHORIZATION {READER}")
    with conn(OWNER) as o:
        o.execute(f"ALTER TABLE {env.t} ENABLE ROW LEVEL SECURITY")
        o.execute(f"CREATE POLICY one_row ON {env.t} FOR SELECT TO {READER} USING (id = 1)")
        o.execute(f"GRANT SELECT ON {env.t} TO {READER}")
    with conn(READER) as r:
        r.execute("""CREATE OR REPLACE FUNCTION rd.peek(int, tsvector) RETURNS boolean LANGUAGE plpgsql COST 0.0000001
                     AS $$ BEGIN RAISE NOTICE 'peek|%', $1; RETURN true; END $$""")
        seen = []
        r.add_notice_handler(lambda d: seen.append(d.message_primary))
        r.execute(f"SELECT id FROM {env.sidecar} sc WHERE rd.peek(sc.id, sc.fts)").fetchall()
        r.execute(f"SELECT id FROM {env.sidecar} sc ORDER BY rd.peek(sc.id, sc.fts)").fetchall()
        r.execute(f"SELECT id FROM {env.sidecar} sc WHERE sc.fts @@ to_tsquery('boat') AND rd.peek(sc.id, sc.fts)").fetchall()
    ids = {int(m.split("|")[1]) for m in seen if m.startswith("peek|")}
    assert ids <= {1}, f"a leaky function saw hidden sidecar rows: {sorted(ids)}"


def test_column_privilege_reader_gets_no_vectors(env):
    """Promise 3 (column privileges). Attack: a reader granted SELECT (id) only on the source —
    not the text — reads the sidecar's vectors and fts lexemes and searches. Promised: no vector,
    no lexeme (reading a vector needs the right to read every column)."""
    with conn(OWNER) as o:
        o.execute(f"GRANT SELECT (id) ON {env.t} TO {READER}")
    with conn(READER) as r:
        err = error_of(r, f"SELECT count(*) FROM {env.sidecar}")
        if err is None:
            assert one(r, f"SELECT count(*) FROM {env.sidecar}") == 0
        err = error_of(r, f"SELECT * FROM embed_sidecar.search('{env.t}', 'boats')")
        assert err is not None or r.execute(f"SELECT * FROM embed_sidecar.search('{env.t}', 'boats')").fetchall() == []
        got = r.execute("SELECT attname FROM pg_stats WHERE schemaname = %s AND tablename = 't_embeddings'", (env.schema,)).fetchall()
        assert got == [], f"pg_stats shows sidecar statistics: {got}"


def test_only_the_drain_writes_the_sidecar(env):
    """Promise 3 ('only the drain writes the sidecar'). Attack: a writer with every privilege on
    the source (INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER) tries to insert, update,
    delete or truncate sidecar rows directly, or to plant a trigger on it. Promised: refused."""
    with conn(OWNER) as o:
        o.execute(f"GRANT ALL ON {env.t} TO {WRITER}")
    with conn(WRITER) as w:
        for sql in (f"UPDATE {env.sidecar} SET model = 'forged'", f"DELETE FROM {env.sidecar}",
                    f"TRUNCATE {env.sidecar}",
                    f"INSERT INTO {env.sidecar} (id, embedding, model, content_hash) SELECT 1, embedding, model, content_hash FROM {env.sidecar} LIMIT 1",
                    f"CREATE TRIGGER t AFTER INSERT ON {env.sidecar} FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()"):
            err = error_of(w, sql)
            assert err and err[0] == "42501", (sql, err)


# --------------------------------------------------------------------------------------------
# Promise 5: the queues and the keys writers enqueue
# --------------------------------------------------------------------------------------------

def test_pgmq_queues_refuse_roles_without_rights(env):
    """Promise 4/5 (queues). Attack: a role without privileges reads, forges, purges, deletes or
    drops an embedding's pgmq queue through pgmq's own functions and tables.
    Promised: all refused; the queue stays."""
    q = f"embed_sidecar_{env.id}"
    with conn(NOBODY) as x:
        for sql in (f"SELECT * FROM pgmq.q_{q}", f"SELECT pgmq.send('{q}', '[1]')", f"SELECT pgmq.purge_queue('{q}')",
                    f"SELECT pgmq.delete('{q}', 1::bigint)", f"SELECT pgmq.drop_queue('{q}')",
                    f"SELECT * FROM pgmq.metrics('{q}')", f"SELECT * FROM pgmq.read('{q}', 30, 10)",
                    f"CREATE FUNCTION pgmq.format_table_name(text, text) RETURNS text LANGUAGE sql AS 'SELECT $1'"):
            err = error_of(x, sql)
            assert err is not None and err[0] in ("42501", "42P01"), (sql, err)
    assert one(conn(), f"SELECT to_regclass('pgmq.q_{q}') IS NOT NULL")


def test_enqueue_refuses_writers_without_rights_and_bad_keys(env):
    """Promise 5 (keys writers enqueue are validated). Attack: (a) a role without write rights
    calls the PUBLIC embed_sidecar._enqueue(id, keys) for another owner's table; (b) a writer of
    the table sends keys that are not JSON, of the wrong arity, of the wrong type, NULL, or
    over 2,000 bytes. Promised: all refused; nothing reaches the queue."""
    with conn(NOBODY) as x:
        err = error_of(x, "SELECT embed_sidecar._enqueue(%s, ARRAY['[1]'])", (env.id,))
        assert err and err[0] == "42501", err
    with conn(OWNER) as o:
        o.execute(f"GRANT INSERT ON {env.t} TO {WRITER}")
        o.execute("SELECT embed_sidecar.pause(%s::regclass)", (env.t,))
    with conn(WRITER) as w:
        for keys in (["not json"], ["[1, 2]"], ['["abc"]'], ["[null]"], ["{}"], [None], ["[" + "1" * 3000 + "]"],
                     ['"1"'], ["[1e400]"]):
            err = error_of(w, "SELECT embed_sidecar._enqueue(%s, %s::text[])", (env.id, keys))
            assert err is not None, f"key {keys[0]!r:.40} was accepted"
        err = error_of(w, "SELECT embed_sidecar._enqueue(%s, ARRAY['[1]'])", (env.id2,))
        assert err and err[0] == "42501", err
    with conn(OWNER) as o:
        assert one(o, "SELECT pending FROM embed_sidecar.status WHERE source = %s::regclass", (env.t,)) == 0
        o.execute("SELECT embed_sidecar.resume(%s::regclass)", (env.t,))


def test_writer_session_settings_cannot_make_keys_miss_their_rows(env):
    """Promise 5 (keys validated) and the in-step guarantee. Attack: a writer of a table keyed by
    float8 sets extra_float_digits = -15 in its own session and inserts rows: the statement
    trigger builds each key with jsonb_build_array(), whose float text follows the writer's
    extra_float_digits, so the key is rounded; _invalid_keys accepts it (it is a valid float),
    the drain finds no row with that key and drops the message. Promised: after wait() every
    row with content has its vector (verify: missing = 0)."""
    with conn(OWNER) as o:
        o.execute(f"CREATE TABLE {env.schema}.f (id float8 PRIMARY KEY, body text)")
        o.execute(f"SELECT embed_sidecar.watch('{env.schema}.f', 'body')")
        o.execute(f"GRANT INSERT ON {env.schema}.f TO {WRITER}")
    with conn(WRITER) as w:
        w.execute("SET extra_float_digits = -15")
        w.execute(f"INSERT INTO {env.schema}.f VALUES (0.123456789012345, 'a float keyed row'), (2.718281828459045, 'another')")
    with conn(OWNER) as o:
        assert one(o, f"SELECT embed_sidecar.wait('{env.schema}.f', '60 s')")
        src, emb, missing, stale, orphans = verify(o, f"{env.schema}.f")
        assert missing == 0, f"{missing} of {src} rows never got a vector (and wait() said all done)"


# --------------------------------------------------------------------------------------------
# Promise 4: the ring and resource bounds
# --------------------------------------------------------------------------------------------

def _vec(text):
    return np.array([float(v) for v in text.strip("[]").split(",")], dtype=np.float64)


def test_ring_hands_each_caller_its_own_vectors_under_cancels_and_kills(env):
    """Promise 4 (a caller gets only its own vectors). Attack: four sessions call embed_text() on
    different texts in a loop, each with a random tiny statement_timeout so that many calls are
    cancelled mid-flight (slots taken back, abandoned while a worker holds them, reused); a fifth
    session runs a large embed_texts() and is pg_terminate_backend()ed mid-call, repeatedly.
    Promised: every result a session gets is the vector of its own text; afterwards the service
    still serves sessions and the drain."""
    texts = ["quantum chromodynamics of heavy quarks", "grandmother's apple pie recipe with cinnamon",
             "the offside rule in association football", "kernel scheduling of real-time threads in linux"]
    with conn() as c:
        ref = [_vec(one(c, "SELECT embed_text(%s)::text", (t,))) for t in texts]
    sims = np.array([[a @ b for b in ref] for a in ref])
    assert (sims - np.eye(4) < 0.9).all(), "reference texts too similar to tell apart"
    wrong, done, errors, cancelled = [], [0], [], [0]
    stop = time.monotonic() + 12

    def caller(k):
        rng = np.random.default_rng(k)
        try:
            with conn(NOBODY) as c:
                while time.monotonic() < stop:
                    try:
                        c.execute("SET statement_timeout = %s" % int(rng.choice([0, 1, 2, 5, 10, 30])))
                        v = _vec(one(c, "SELECT embed_text(%s)::text", (texts[k],)))
                    except psycopg.errors.QueryCanceled:
                        cancelled[0] += 1
                        continue
                    done[0] += 1
                    if v @ ref[k] < 0.999:
                        wrong.append((k, int(np.argmax([v @ r for r in ref]))))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def victim_and_killer():
        try:
            while time.monotonic() < stop:
                v = conn(NOBODY)
                pid = one(v, "SELECT pg_backend_pid()")
                th = threading.Thread(target=lambda: error_of(v, "SELECT embed_texts(array_fill('filler text of a victim'::text, ARRAY[400]))"))
                th.start()
                time.sleep(0.3)
                with conn() as su:
                    su.execute("SELECT pg_terminate_backend(%s)", (pid,))
                th.join()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)] + [threading.Thread(target=victim_and_killer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert done[0] > 0 and cancelled[0] > 0, (done, cancelled)
    assert wrong == [], f"sessions got vectors of other sessions' texts: {wrong[:10]}"
    with conn() as c:
        c.execute("SET statement_timeout = '20s'")
        assert _vec(one(c, "SELECT embed_text(%s)::text", (texts[0],))) @ ref[0] > 0.999
    with conn(OWNER) as o:
        o.execute(f"INSERT INTO {env.t} VALUES (901, 'after the storm of cancels')")
        until(lambda: one(o, f"SELECT count(*) FROM {env.sidecar} WHERE id = 901"), 60, 0.2, "the drain after the cancels")


def test_huge_inputs_are_bounded(env):
    """Promise 4 (sizes bounded). Attack: a PUBLIC caller sends a 60 MB text to embed_text(),
    chunk_text() and hybrid_search()'s query, and chunk_text() with the smallest passages and
    the largest overlap on a text just under chunk_text_max. Promised: each is refused or done
    within seconds (bounded), the session stays usable."""
    with conn(OWNER) as o:
        o.execute(f"GRANT SELECT ON {env.t} TO {READER}")
    with conn(READER) as r:
        r.execute("SET statement_timeout = '30s'")
        t0 = time.monotonic()
        assert one(r, "SELECT vector_dims(embed_text(repeat('sail ', 12000000)))") == 384
        err = error_of(r, "SELECT count(*) FROM embed_sidecar.chunk_text(repeat('sail ', 12000000))")
        assert err and err[0] == "54000", err
        err = error_of(r, "SELECT count(*) FROM embed_sidecar.chunk_text(repeat('sail ', 200000), NULL, 16, 7)")
        assert err is None or err[0] == "54000", err
        assert time.monotonic() - t0 < 30
        assert one(r, "SELECT 1") == 1


def test_embed_texts_array_size_is_bounded(env):
    """Promise 4 (no PUBLIC caller OOMs the instance; sizes bounded). Attack: a PUBLIC caller
    passes embed_texts() an array of 3,000,000 one-character strings (~24 MB of input). Each
    becomes a 384-float vector held in backend memory until the call ends (~4.6 GB as Rust
    vectors, again as real[] rows, again in array_agg), with no cap on the array's length.
    Promised: refused up front (a bound on the array), not left to run until memory runs out.
    Checked by: the call must fail within 15 s with an error other than a statement timeout."""
    with conn(NOBODY) as x:
        x.execute("SET statement_timeout = '15s'")
        t0 = time.monotonic()
        err = error_of(x, "SELECT cardinality(embed_texts(array_fill('x'::text, ARRAY[3000000])))")
        took = time.monotonic() - t0
    assert err is not None and err[0] != "57014", \
        f"embed_texts of 3M texts was not refused: ran {took:.0f} s until the statement timeout ({err})"


def test_bypassrls_role_without_select_reads_no_vectors(env):
    """Promise 3 ('rows that ... missing SELECT privilege hide from a role are hidden from it in the
    sidecar'). Attack: the sidecar is readable by PUBLIC and kept private only by row security.
    A role with the BYPASSRLS attribute (given for some other table's sake: ETL, audit, backup)
    but with no privilege at all on the source table reads the sidecar directly: row security
    does not apply to it, so nothing hides the rows. The fts column holds the text's lexemes.
    Promised: a role that may not SELECT the source sees no vector and no lexeme of it."""
    with conn(BYPASS) as x:
        assert error_of(x, f"SELECT * FROM {env.t}")[0] == "42501"
        err = error_of(x, f"SELECT id, fts::text FROM {env.sidecar2}")
        rows = [] if err else x.execute(f"SELECT id, fts::text FROM {env.sidecar2}").fetchall()
    assert rows == [], f"a BYPASSRLS role without SELECT on {env.t2} read its sidecar: {rows[:3]}"


def test_wait_and_process_reveal_nothing_of_tables_the_caller_cannot_read(env):
    """Promise 3 (registry rows; 'roles without rights learn no embedding names'). Attack:
    pes_rv2_owner2 (may execute wait() and process(), as any owner) calls them on
    pes_rv2_owner's table, which it may not read, and on an unwatched table of pes_rv2_owner:
    wait() and process() check whether the table is watched (_check_watched) before any privilege,
    so the answers differ. Promised: the same answer either way (no watch status leaks)."""
    with conn(OWNER) as o:
        o.execute(f"CREATE TABLE {env.schema}.unwatched (id int PRIMARY KEY, body text)")
    answers = {}
    with conn(OWNER2) as b:
        for name in (env.t, f"{env.schema}.unwatched"):
            answers[name] = (error_of(b, f"SELECT embed_sidecar.wait('{name}', '1 s')"),
                             (error_of(b, f"SELECT embed_sidecar.process('{name}')") or (None,))[0])
    a, u = answers[env.t], answers[f"{env.schema}.unwatched"]
    assert (a[0] and a[0][0], a[1]) == (u[0] and u[0][0], u[1]), \
        f"watched vs unwatched answers differ for a role without rights: {a} vs {u}"


def test_slow_owner_code_does_not_delay_other_owners_drains(env):
    """Promise 1 / 4 (one owner gains no power over another's tables). Attack: pes_rv2_owner
    plants a statement trigger on its sidecar that sleeps 3 s (under the worker's 10 s limit for
    owner code, so it never fails) and keeps inserting rows; pes_rv2_owner2 inserts rows into its
    own table. Found by the second review: the other owner's row waited 8.1 s behind an 8 s
    trigger, pass after pass. One worker serves every table of a database, so one slow pass can
    hold the others (the 10 s limit bounds it), but not pass after pass: a source whose own code
    took 1 s or more in a pass waits ten times as long (at most 60 s) before its next one, with why
    in status.last_error. Promised: once the slow source rests, the other owner's rows are embedded
    while the slow source's rows still wait."""
    with conn(OWNER) as o:
        o.execute(f"""CREATE FUNCTION {env.schema}.slow() RETURNS trigger LANGUAGE plpgsql AS
                      $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$""")
        o.execute(f"CREATE TRIGGER slow AFTER INSERT OR UPDATE ON {env.sidecar} FOR EACH STATEMENT EXECUTE FUNCTION {env.schema}.slow()")
    stop = threading.Event()

    def writer():
        with conn(OWNER) as o:
            i = 1000
            while not stop.is_set():
                o.execute(f"INSERT INTO {env.t} VALUES ({i}, 'slow row {i}')")
                i += 1
                stop.wait(0.5)
    th = threading.Thread(target=writer)
    th.start()
    try:
        with conn(OWNER) as o:
            note = until(lambda: one(o, "SELECT last_error FROM embed_sidecar.status WHERE source = %s::regclass "
                                        "AND last_error LIKE '%%took%%so that other tables go first'", (env.t,)),
                         90, 0.2, "the slow source to be sent to rest")
        assert "own code" in note, note
        with conn(OWNER2) as b:
            b.execute(f"INSERT INTO {env.t2} VALUES (2, 'a prompt row of the other owner')")
            assert one(b, "SELECT embed_sidecar.wait(%s::regclass, '30 s')", (env.t2,)) is True
            assert one(b, f"SELECT count(*) FROM {env.sidecar2} WHERE id = 2") == 1
        with conn(OWNER) as o:
            assert one(o, "SELECT pending FROM embed_sidecar.status WHERE source = %s::regclass", (env.t,)) > 0
    finally:
        stop.set()
        th.join()
        with conn(OWNER) as o:
            o.execute(f"DROP TRIGGER slow ON {env.sidecar}")


def test_public_flood_of_long_texts_does_not_starve_the_drain(env):
    """Promise 4 (no PUBLIC caller starves the drains). Attack: six PUBLIC sessions call
    embed_texts() in a loop with 48 long texts each (every text fills the model window, so an
    interactive round is as expensive as it can be; interactive rounds take every waiting
    interactive slot; before the fix drains got one round in four of at most 4 texts while
    searches arrived, and the 20 rows took 31-49 s). Meanwhile the owner inserts 20 rows.
    Promised: the drain is not starved: drains waiting are owed a quarter of the inference
    service's busy time (src/inference/worker.rs, `Share`), so the 20 rows are embedded well within
    30 s (6.0 s measured here; unloaded, well under a second). The bound is against starvation,
    five times what was measured, not a performance claim."""
    long = " ".join(f"word{i} sailing navigation harbour" for i in range(200))
    stop = [False]
    errors = []

    def flood(k):
        try:
            with conn(NOBODY) as c:
                while not stop[0]:
                    c.execute("SELECT cardinality(embed_texts(array_fill(%s::text, ARRAY[48])))", (long + str(k),))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=flood, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        with conn(OWNER) as o:
            o.execute(f"INSERT INTO {env.t} SELECT g, 'flooded row ' || g FROM generate_series(2000, 2019) g")
            t0 = time.monotonic()
            until(lambda: one(o, f"SELECT count(*) FROM {env.sidecar} WHERE id >= 2000") == 20, 90, 0.2,
                  "20 rows embedded while PUBLIC sessions flood the inference service")
            took = time.monotonic() - t0
    finally:
        stop[0] = True
        for t in threads:
            t.join()
    assert not errors, errors
    print(f"flood: 20 rows embedded in {took:.1f} s")
    assert took < 30, f"20 rows took {took:.0f} s to embed while 6 PUBLIC sessions flooded the service"


def test_default_check_and_index_expression_planted_on_the_sidecar_run_as_owner(env):
    """Promise 1. Attack: instead of a trigger, the owner plants on its sidecar a column DEFAULT,
    a CHECK constraint and an expression index, each calling a function that tries ALTER ROLE
    ... SUPERUSER, GRANT pg_read_server_files and pause() of another owner's table; the drain
    worker (a superuser) writes the sidecar. Promised: all run as the owner and fail; nothing
    changes; rows are still embedded (or dead-lettered)."""
    s = env.schema
    with conn(OWNER) as o:
        o.execute(f"CREATE TABLE {s}.log (who text, sup boolean, tried text)")
        o.execute(f"""CREATE FUNCTION {s}.plant_v(int) RETURNS int LANGUAGE plpgsql AS $$
            DECLARE r text := '';
            BEGIN
              BEGIN EXECUTE 'ALTER ROLE {OWNER} SUPERUSER'; r := r || 'alter-ok;'; EXCEPTION WHEN OTHERS THEN r := r || 'x;'; END;
              BEGIN EXECUTE 'GRANT pg_read_server_files TO {OWNER}'; r := r || 'grant-ok;'; EXCEPTION WHEN OTHERS THEN r := r || 'x;'; END;
              BEGIN PERFORM embed_sidecar.pause('{env.t2}'); r := r || 'pause-ok;'; EXCEPTION WHEN OTHERS THEN r := r || 'x;'; END;
              INSERT INTO {s}.log VALUES (current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), r);
              RETURN $1;
            END $$""")
        # an index expression needs an IMMUTABLE function: a wrapper that calls the volatile one
        o.execute(f"CREATE FUNCTION {s}.plant_fn(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN RETURN {s}.plant_v($1); END $$")
        o.execute(f"ALTER TABLE {env.sidecar} ADD COLUMN planted int DEFAULT {s}.plant_fn(1)")
        o.execute(f"ALTER TABLE {env.sidecar} ADD CONSTRAINT planted_check CHECK ({s}.plant_fn(id) IS NOT NULL)")
        o.execute(f"CREATE INDEX planted_idx ON {env.sidecar} (({s}.plant_fn(id)))")
        o.execute(f"TRUNCATE {s}.log")
        o.execute(f"INSERT INTO {env.t} VALUES (79, 'planted default, check and index')")
        rows = until(lambda: o.execute(f"SELECT who, sup, tried FROM {s}.log").fetchall(), 60, 0.2, "the planted code")
        until(lambda: one(o, f"SELECT count(*) FROM {env.sidecar} WHERE id = 79"), 60, 0.2, "row 79 embedded")
    with conn() as c:
        assert not one(c, f"SELECT rolsuper FROM pg_roles WHERE rolname = '{OWNER}'")
        assert not one(c, f"SELECT pg_has_role('{OWNER}', 'pg_read_server_files', 'MEMBER')")
        assert one(c, "SELECT state FROM embed_sidecar.sources WHERE id = %s", (env.id2,)) == "active"
    for who, sup, tried in rows:
        assert who == OWNER and not sup and "ok;" not in tried, rows
