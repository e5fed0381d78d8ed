"""Attacks of a third reviewer who did not write the code.

Each test checks one promise of README "Whose rights" / "Guarantees": it PASSES when the attack
is refused and FAILS when the attack works. Everything happens in database pes_rv3_main with roles
pes_rv3_*; the module's own `extension` fixture replaces conftest's (pes_test is never touched).
"""
import random
import threading
import time

import numpy as np
import psycopg
import pytest

from tests.conftest import connect, error_of, one, wait_until

DB = "pes_rv3_main"
OWNER_A, OWNER_B, READER, NOBODY = "pes_rv3_a", "pes_rv3_b", "pes_rv3_r", "pes_rv3_x"
ROLES = [OWNER_A, OWNER_B, READER, NOBODY]
MANAGEMENT = [
    "embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name)",
    "embed_sidecar.unwatch(regclass, boolean, text)",
    "embed_sidecar.pause(regclass, boolean, text)",
    "embed_sidecar.resume(regclass, text)",
    "embed_sidecar.wait(regclass, interval)",
    "embed_sidecar.process(regclass, int)",
]


def _drop_everything():
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        for r in ROLES:
            if one(c, "SELECT 1 FROM pg_roles WHERE rolname = %s", (r,)):
                c.execute(f"DROP ROLE {r}")


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Overrides conftest's session fixture: our own database and roles, never pes_test."""
    _drop_everything()
    with connect(dbname="postgres") as c:
        for r in ROLES:
            c.execute(f"CREATE ROLE {r} LOGIN")
        c.execute(f"CREATE DATABASE {DB}")
    with connect(dbname=DB) as c:
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        for r in (OWNER_A, OWNER_B):
            c.execute(f"CREATE SCHEMA {r} AUTHORIZATION {r}")
            c.execute(f"GRANT USAGE ON SCHEMA {r} TO PUBLIC")
            for f in MANAGEMENT:
                c.execute(f"GRANT EXECUTE ON FUNCTION {f} TO {r}")
        c.execute(f"GRANT EXECUTE ON FUNCTION embed_sidecar.wait(regclass, interval) TO {READER}, {NOBODY}")
        # an administrator who lets everyone call process() on their own tables
        c.execute(f"GRANT EXECUTE ON FUNCTION embed_sidecar.process(regclass, int) TO {NOBODY}")
    yield
    _drop_everything()


def as_role(role, **kw):
    return connect(dbname=DB, user=role, **kw)


def su():
    return connect(dbname=DB)


def sidecar_of(table, embedding=None):
    with su() as c:
        return one(c, """SELECT sidecar::text FROM embed_sidecar.sources
                          WHERE source = %s::regclass AND role = 'current'
                            AND (%s::text IS NULL OR embedding = %s)""", (table, embedding, embedding))


def make_watched(role, table, rows=3, **watch_kw):
    """A table of `role` with `rows` rows, watched and drained."""
    with as_role(role) as c:
        c.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, body text)")
        c.execute(f"INSERT INTO {table} (body) SELECT 'row ' || g || ' about cats' FROM generate_series(1, %s) g",
                  (rows,))
        args = ", ".join(f"{k} => %s" for k in watch_kw)
        c.execute(f"SELECT embed_sidecar.watch(%s, 'body'{', ' + args if args else ''})",
                  (table, *watch_kw.values()))
        assert one(c, "SELECT embed_sidecar.wait(%s, '60 s')", (table,))
    return sidecar_of(table)


def can_select(role, rel):
    with as_role(role) as c:
        err = error_of(c, f"SELECT count(*) FROM {rel}")
    return err is None


# ---------------------------------------------------------------------------------------------
# 1. Sidecar readers kept in step (sql/watch.sql _sync_readers, sql/events.sql _on_ddl_end)
# ---------------------------------------------------------------------------------------------

def test_grant_option_on_sidecar_cannot_launder_readers():
    """Promise 3: a sidecar is readable by exactly the roles that have SELECT on its source; a grant
    made on the sidecar is undone at the next sync.
    Attack: the owner grants SELECT on the sidecar WITH GRANT OPTION to a legitimate reader R
    (R already reads the source, so _sync_readers keeps R's entry, grant option and all); R then
    grants SELECT on the sidecar to X, who may not read the source. The sync's REVOKE runs as the
    sidecar's owner, and an owner's REVOKE cannot take back what R granted, so X keeps it.
    Promised: X cannot read the sidecar."""
    side = make_watched(OWNER_A, "pes_rv3_a.go1")
    with as_role(OWNER_A) as a:
        a.execute(f"GRANT SELECT ON pes_rv3_a.go1 TO {READER}")
        a.execute(f"GRANT SELECT ON {side} TO {READER} WITH GRANT OPTION")
    with as_role(READER) as r:
        error_of(r, f"GRANT SELECT ON {side} TO {NOBODY}")  # refused or undone: either keeps the promise
    assert not can_select(NOBODY, "pes_rv3_a.go1")
    assert not can_select(NOBODY, side), "a role that may not read the source reads its sidecar"


def test_owner_can_always_revoke_a_reader_whose_sidecar_grant_came_from_another_grantor():
    """Promise 3: SELECT on the sidecar is kept in step after every REVOKE (the table owner can
    always take a reader's access away, and the sidecar follows).
    Attack: reader R holds SELECT on the sidecar WITH GRANT OPTION (from the owner, as in the test
    above) and grants it to X while X may still read the source; then the owner revokes X's SELECT
    on the source. _sync_readers issues REVOKE ALL ON sidecar FROM X as the owner, which cannot
    take back R's grant; its own REVOKE fires the ddl_command_end trigger again, which tries again,
    and so on.
    Promised: the owner's REVOKE succeeds and X can read neither table."""
    side = make_watched(OWNER_A, "pes_rv3_a.go2")
    with as_role(OWNER_A) as a:
        a.execute(f"GRANT SELECT ON pes_rv3_a.go2 TO {READER}, {NOBODY}")
        a.execute(f"GRANT SELECT ON {side} TO {READER} WITH GRANT OPTION")
    with as_role(READER) as r:
        r.execute(f"GRANT SELECT ON {side} TO {NOBODY}")
    with as_role(OWNER_A) as a:
        err = error_of(a, f"REVOKE SELECT ON pes_rv3_a.go2 FROM {NOBODY}")
    try:
        assert err is None, f"the owner's REVOKE failed: {err}"
        assert not can_select(NOBODY, side), "X still reads the sidecar"
    finally:
        with su() as c:
            c.execute(f"REVOKE SELECT ON {side} FROM {READER} CASCADE")


def test_sidecar_grants_other_than_select_are_undone():
    """Promise 3: only the drain writes the sidecar; a grant made on the sidecar is undone.
    Attack: the owner runs GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA (which names the
    sidecar among others) to a role X, and TRUNCATE to a reader.
    Promised: neither can write the sidecar afterwards."""
    side = make_watched(OWNER_A, "pes_rv3_a.gw1")
    with as_role(OWNER_A) as a:
        a.execute(f"GRANT SELECT ON pes_rv3_a.gw1 TO {READER}")
        a.execute(f"GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pes_rv3_a TO {NOBODY}")
        a.execute(f"GRANT TRUNCATE ON {side} TO {READER}")
    with su() as c:
        privs = c.execute(
            f"""SELECT r, p FROM unnest(ARRAY['{NOBODY}', '{READER}']) r,
                                 unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p
                 WHERE has_table_privilege(r, %s::regclass, p)""", (side,)).fetchall()
    assert privs == [], f"sidecar writable by others: {privs}"


def test_sidecar_follows_new_owner_and_old_owner_loses_it():
    """Promise 1/3: the sidecar belongs to its table's owner, also after ALTER TABLE ... OWNER TO;
    the former owner keeps no hold on it; readers stay readers.
    Attack: the superuser gives A's watched table to B; A tries to read and write the sidecar.
    Promised: B owns the sidecar, A can neither read nor write it, the reader R still reads."""
    side = make_watched(OWNER_A, "pes_rv3_a.ow1")
    with as_role(OWNER_A) as a:
        a.execute(f"GRANT SELECT ON pes_rv3_a.ow1 TO {READER}")
    with su() as c:
        c.execute(f"ALTER TABLE pes_rv3_a.ow1 OWNER TO {OWNER_B}")
        owner = one(c, "SELECT relowner::regrole::text FROM pg_class WHERE oid = %s::regclass", (side,))
        a_privs = one(c, f"""SELECT array_agg(p) FROM unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE']) p
                               WHERE has_table_privilege('{OWNER_A}', %s::regclass, p)""", (side,))
    readable = can_select(READER, side)
    with su() as c:
        c.execute("DROP TABLE pes_rv3_a.ow1 CASCADE")  # B's table in A's schema would trouble later tests
    assert owner == OWNER_B
    assert a_privs is None, f"former owner keeps {a_privs} on the sidecar"
    assert readable


def test_revoke_from_public_reaches_the_sidecar():
    """Promise 3: SELECT on the sidecar follows the source after every GRANT and REVOKE, PUBLIC
    included.
    Attack: the owner grants SELECT on the source to PUBLIC, then revokes it in the same
    transaction as a GRANT on an unrelated table of another owner (several ACL changes in one
    transaction, the last event being someone else's GRANT).
    Promised: after commit, a role without rights cannot read the sidecar."""
    side = make_watched(OWNER_A, "pes_rv3_a.pub1")
    with as_role(OWNER_B) as b:
        b.execute("CREATE TABLE pes_rv3_b.unrelated (id int)")
    with as_role(OWNER_A) as a:
        a.execute("GRANT SELECT ON pes_rv3_a.pub1 TO PUBLIC")
    assert can_select(NOBODY, side)
    with su() as c:
        with c.transaction():
            c.execute("REVOKE SELECT ON pes_rv3_a.pub1 FROM PUBLIC")
            c.execute(f"GRANT SELECT ON pes_rv3_b.unrelated TO {READER}")
    assert not can_select(NOBODY, side)


def test_row_security_of_the_source_hides_sidecar_rows_from_a_reader():
    """Promise 3: under row security, a reader sees no sidecar row (nor search hit, nor verify
    count) whose source row its policy hides.
    Attack: reader R may SELECT the source but a policy shows it only even ids; R reads the sidecar
    directly, calls search() and verify().
    Promised: only even keys, counts of visible rows only."""
    side = make_watched(OWNER_A, "pes_rv3_a.rls1", rows=6)
    with as_role(OWNER_A) as a:
        a.execute("ALTER TABLE pes_rv3_a.rls1 ENABLE ROW LEVEL SECURITY")
        a.execute(f"CREATE POLICY evens ON pes_rv3_a.rls1 FOR SELECT TO {READER} USING (id % 2 = 0)")
        a.execute(f"GRANT SELECT ON pes_rv3_a.rls1 TO {READER}")
    with as_role(READER) as r:
        ids = [x[0] for x in r.execute(f"SELECT id FROM {side}").fetchall()]
        hits = [x[0][0] for x in r.execute(
            "SELECT key FROM embed_sidecar.search('pes_rv3_a.rls1', 'cats', 10)").fetchall()]
        v = r.execute("SELECT source_rows, embedded_rows, orphans FROM embed_sidecar.verify('pes_rv3_a.rls1')").fetchone()
    assert all(i % 2 == 0 for i in ids) and len(ids) == 3, ids
    assert all(int(h) % 2 == 0 for h in hits), hits
    assert v == (3, 3, 0), v


def test_unreadable_tables_answer_42501_everywhere():
    """Promise 3: status lists only readable tables; wait(), verify(), search() answer 42501 for a
    table the caller may not read; internal backlog helpers tell nothing.
    Attack: role X probes A's watched table through every door, including the PUBLIC internal
    functions _queue_backlog(id), _readable_source and _search (the 0.3.0 _search_target's successor).
    Promised: 42501 or nothing at all."""
    make_watched(OWNER_A, "pes_rv3_a.hid1")
    with su() as c:
        sid = one(c, "SELECT id FROM embed_sidecar.sources WHERE source = 'pes_rv3_a.hid1'::regclass")
    with as_role(NOBODY) as x:
        assert one(x, "SELECT count(*) FROM embed_sidecar.status WHERE source::text LIKE '%%hid1%%'") == 0
        assert x.execute("SELECT * FROM embed_sidecar._queue_backlog(%s)", (sid,)).fetchall() in ([], [(None, None, None)])
        for sql in ("SELECT embed_sidecar.wait('pes_rv3_a.hid1', '1 s')",
                    "SELECT * FROM embed_sidecar.verify('pes_rv3_a.hid1')",
                    "SELECT * FROM embed_sidecar.search('pes_rv3_a.hid1', 'cats')",
                    "SELECT * FROM embed_sidecar.hybrid_search('pes_rv3_a.hid1', 'cats')",
                    "SELECT * FROM embed_sidecar._search('pes_rv3_a.hid1', 'cats', 3, NULL, NULL, 'public')",
                    "SELECT * FROM embed_sidecar.search_rows(NULL::pes_rv3_a.hid1, 'cats')"):
            err = error_of(x, sql)
            assert err is not None and err[0] == "42501", (sql, err)


# ---------------------------------------------------------------------------------------------
# 2. Queues made without pgmq.create (sql/queues.sql)
# ---------------------------------------------------------------------------------------------

def test_a_role_without_rights_cannot_plant_the_next_queue():
    """Promise 1/5: the extension makes its queues itself; nothing another role can do stalls or
    subverts watch().
    Attack: role X tries to pre-create the tables of the next registry id's queue in schema pgmq
    (directly, and through PUBLIC pgmq.create()), so that watch() drops a table carrying X's
    dependent view (DROP fails, watch() is stalled) or reuses X's table with X's trigger.
    Promised: X cannot create anything there; a later watch() works."""
    with su() as c:
        nxt = one(c, "SELECT last_value + 1 FROM embed_sidecar.sources_id_seq")
    with as_role(NOBODY) as x:
        e1 = error_of(x, f"CREATE TABLE pgmq.q_embed_sidecar_{nxt} (msg_id bigint)")
        e2 = error_of(x, f"SELECT pgmq.create('embed_sidecar_{nxt}')")
        e3 = error_of(x, f"SELECT pgmq.create('embed_sidecar_{nxt + 1}')")
    assert e1 is not None and e2 is not None and e3 is not None, (e1, e2, e3)
    make_watched(OWNER_A, "pes_rv3_a.q1")


def test_writer_cannot_put_foreign_keys_or_huge_keys_on_the_queue():
    """Promise 5: writers' keys are validated (one key of the table, of bounded size).
    Attack: a role with only INSERT on A's table calls the PUBLIC embed_sidecar._enqueue directly
    with keys that are not the table's: wrong arity, a text where an int is, a 1 MB key, NULL.
    Promised: every call is refused and nothing reaches the queue."""
    make_watched(OWNER_A, "pes_rv3_a.k1")
    with as_role(OWNER_A) as a:
        a.execute(f"GRANT INSERT ON pes_rv3_a.k1 TO {NOBODY}")
        a.execute("SELECT embed_sidecar.pause('pes_rv3_a.k1')")
    with su() as c:
        sid = one(c, "SELECT id FROM embed_sidecar.sources WHERE source = 'pes_rv3_a.k1'::regclass")
        q = one(c, "SELECT queue_name FROM embed_sidecar.sources WHERE id = %s", (sid,))
        before = one(c, f"SELECT count(*) FROM pgmq.q_{q}")
    bad = [['[1, 2]'], ['["x"]'], ['[' + '9' * 1_000_000 + ']'], [None], ['{"a": 1}']]
    with as_role(NOBODY) as x:
        for keys in bad:
            assert error_of(x, "SELECT embed_sidecar._enqueue(%s, %s::text[])", (sid, keys)) is not None, keys[0][:20] if keys[0] else keys
    with su() as c:
        assert one(c, f"SELECT count(*) FROM pgmq.q_{q}") == before
    with as_role(OWNER_A) as a:
        a.execute("SELECT embed_sidecar.resume('pes_rv3_a.k1')")


# ---------------------------------------------------------------------------------------------
# 3. The slow-source rest (src/bgw/drain_worker.rs charge)
# ---------------------------------------------------------------------------------------------

def _slow_sidecar(table, seconds, counter):
    """Add a statement trigger on `table`'s sidecar that counts its calls in a sequence (which a
    rollback does not undo) and sleeps."""
    side = sidecar_of(table)
    with as_role(OWNER_A) as a:
        a.execute(f"CREATE SEQUENCE {counter}")
        a.execute(f"""CREATE FUNCTION {counter}_fn() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN PERFORM nextval('{counter}'); PERFORM pg_sleep({seconds}); RETURN NULL; END $$""")
        a.execute(f"CREATE TRIGGER slow AFTER INSERT ON {side} FOR EACH STATEMENT EXECUTE FUNCTION {counter}_fn()")
    return side


def _calls(counter):
    with su() as c:
        return one(c, f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {counter}")


def _feed_until(table, cond, timeout):
    """Insert one row a second into `table` (so every pass has fresh messages) until cond()."""
    deadline = time.monotonic() + timeout
    with as_role(OWNER_A) as a:
        while time.monotonic() < deadline:
            a.execute(f"INSERT INTO {table} (body) VALUES ('more about dogs ' || clock_timestamp())")
            v = cond()
            if v:
                return v
            time.sleep(1)
    return cond()


def test_trigger_that_outlasts_the_step_limit_still_rests_its_source():
    """Promise 5: a source whose own code takes >= 1 s in a pass rests 10x as long (max 60 s), so
    an owner holds the others for at most one slow pass at a time.
    Attack: A's sidecar gets a trigger that sleeps 30 s; the drain's 10 s step limit cancels it,
    the pass fails, and rest_after_error() replaces the 60 s rest that charge() just set with the
    5 s error nap; A keeps writing, so every ~15 s the worker spends another 10 s on A.
    Promised: after the first slow pass (10 s of A's code), no second one within the next 35 s."""
    make_watched(OWNER_A, "pes_rv3_a.slow1")
    _slow_sidecar("pes_rv3_a.slow1", 30, "pes_rv3_a.slow1_calls")
    assert _feed_until("pes_rv3_a.slow1", lambda: _calls("pes_rv3_a.slow1_calls") >= 1, 20)
    first = time.monotonic()
    second = _feed_until("pes_rv3_a.slow1", lambda: _calls("pes_rv3_a.slow1_calls") >= 2, 35)
    took = time.monotonic() - first
    with as_role(OWNER_A) as a:
        a.execute("SELECT embed_sidecar.unwatch('pes_rv3_a.slow1')")
    assert not second, f"a second 10 s slow pass began {took:.0f} s after the first (promised rest: 60 s)"


def test_slow_trigger_rests_its_source_with_why_in_status():
    """Promise 5: a source whose own code takes >= 1 s in a pass rests 10x as long, with why in
    status.last_error.
    Attack: A's sidecar trigger sleeps 1.5 s (under the step limit, no error); A keeps writing.
    Promised: no second slow pass within 12 s of the first, and last_error says why it waits."""
    make_watched(OWNER_A, "pes_rv3_a.slow2")
    with as_role(OWNER_A) as a:
        a.execute(f"GRANT SELECT ON pes_rv3_a.slow2 TO {READER}")
    _slow_sidecar("pes_rv3_a.slow2", 1.5, "pes_rv3_a.slow2_calls")
    assert _feed_until("pes_rv3_a.slow2", lambda: _calls("pes_rv3_a.slow2_calls") >= 1, 20)
    first = time.monotonic()
    second = _feed_until("pes_rv3_a.slow2", lambda: _calls("pes_rv3_a.slow2_calls") >= 2, 12)
    took = time.monotonic() - first
    with as_role(OWNER_A) as a:
        why = one(a, "SELECT last_error FROM embed_sidecar.status WHERE source = 'pes_rv3_a.slow2'::regclass")
        a.execute("SELECT embed_sidecar.unwatch('pes_rv3_a.slow2')")
    with as_role(READER) as r:
        seen = r.execute("SELECT last_error FROM embed_sidecar.status WHERE source = 'pes_rv3_a.slow2'::regclass").fetchall()
    assert not second, f"second slow pass after {took:.1f} s"
    assert why and "wait" in why and "other tables go first" in why, why
    assert seen in ([], [(None,)]), f"a reader sees the owner's last_error: {seen}"


def test_one_owner_with_many_slow_sources_holds_others_for_one_slow_pass():
    """Promise 5: a table owner's slow code (a trigger on its sidecar) holds other owners' drains
    for at most one slow pass.
    Attack: owner A watches five tables, each with a sidecar trigger sleeping 2.5 s (under the
    1 s/10 s thresholds' error path: no error, just slow); then A writes to all five while B
    writes one row. Each source rests only after its own slow pass, so the worker runs all five
    slow passes back to back (12.5 s) before B's row.
    Promised: B's row is embedded within one slow pass (2.5 s) plus ordinary slack (6 s)."""
    tables = [f"pes_rv3_a.many{i}" for i in range(5)]
    for t in tables:
        make_watched(OWNER_A, t, rows=1)
        _slow_sidecar(t, 2.5, t + "_calls")
    make_watched(OWNER_B, "pes_rv3_b.victim", rows=1)
    bside = sidecar_of("pes_rv3_b.victim")
    with as_role(OWNER_A) as a:
        with a.transaction():
            for t in tables:
                a.execute(f"INSERT INTO {t} (body) VALUES ('slow owner row')")
    with as_role(OWNER_B) as b:
        b.execute("INSERT INTO pes_rv3_b.victim (body) VALUES ('victim row')")
        start = time.monotonic()
        done = wait_until(lambda: one(b, f"SELECT count(*) FROM {bside}") == 2, 40, step=0.1)
        took = time.monotonic() - start
    with as_role(OWNER_A) as a:
        for t in tables:
            a.execute("SELECT embed_sidecar.unwatch(%s)", (t,))
    assert done
    assert took < 8.5, f"B's row waited {took:.1f} s behind A's slow sources (one slow pass is 2.5 s)"


# ---------------------------------------------------------------------------------------------
# 4. The index builder (src/bgw/index_builder.rs)
# ---------------------------------------------------------------------------------------------

def _has_hnsw(side):
    with su() as c:
        return one(c, """SELECT count(*) FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
                           JOIN pg_am m ON m.oid = x.relam WHERE i.indrelid = %s::regclass AND m.amname = 'hnsw'""",
                   (side,)) > 0


def test_another_owners_lock_does_not_starve_my_deferred_index():
    """Promise 5: no lock another role can take stalls the drain worker; a large backfill's HNSW
    index is built by the index builder so other tables keep going.
    Attack: owner A (watched first: lower registry id) defers its index (bulk_index_rows = 1) and
    holds ROW EXCLUSIVE on its own sidecar in an open transaction: the drain's writes pass, but the
    builder's CREATE INDEX times out after 2 s, and the worker, allowing one builder per database
    and visiting sources by id, starts the next builder for A again every time.
    Promised: B's deferred index is built (within 40 s) while A holds its lock."""
    with as_role(OWNER_A) as a:
        a.execute("CREATE TABLE pes_rv3_a.ib1 (id serial PRIMARY KEY, body text)")
        a.execute("INSERT INTO pes_rv3_a.ib1 (body) SELECT 'a ' || g FROM generate_series(1, 5) g")
        a.execute("SET pg_embed_sidecar.bulk_index_rows = 1")
        with a.transaction():
            a.execute("SELECT embed_sidecar.watch('pes_rv3_a.ib1', 'body')")
            a.execute("SELECT embed_sidecar.pause('pes_rv3_a.ib1')")
    aside = sidecar_of("pes_rv3_a.ib1")
    holder = as_role(OWNER_A)
    holder.execute("BEGIN")
    holder.execute(f"LOCK TABLE {aside} IN ROW EXCLUSIVE MODE")
    try:
        with as_role(OWNER_A) as a:
            a.execute("SELECT embed_sidecar.resume('pes_rv3_a.ib1')")
            assert one(a, "SELECT embed_sidecar.wait('pes_rv3_a.ib1', '60 s')")
        with as_role(OWNER_B) as b:
            b.execute("CREATE TABLE pes_rv3_b.ib2 (id serial PRIMARY KEY, body text)")
            b.execute("INSERT INTO pes_rv3_b.ib2 (body) SELECT 'b ' || g FROM generate_series(1, 5) g")
            b.execute("SET pg_embed_sidecar.bulk_index_rows = 1")
            b.execute("SELECT embed_sidecar.watch('pes_rv3_b.ib2', 'body')")
            assert one(b, "SELECT embed_sidecar.wait('pes_rv3_b.ib2', '60 s')")
        bside = sidecar_of("pes_rv3_b.ib2")
        built = wait_until(lambda: _has_hnsw(bside), 40, step=0.5)
        a_built = _has_hnsw(aside)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not a_built
    assert built, "B's deferred HNSW index was never built while A held a lock on its own sidecar"


def test_reader_cannot_stall_the_index_builder():
    """Promise 5: no lock another role can take stalls the drain or the index build.
    Attack: reader R (SELECT on the source, so on the sidecar) opens a transaction, reads the
    sidecar and holds its ACCESS SHARE lock, and also tries LOCK TABLE ... IN SHARE/EXCLUSIVE
    mode on the sidecar and SELECT ... FOR UPDATE.
    Promised: the stronger locks are refused, and the deferred index is built meanwhile."""
    with as_role(OWNER_A) as a:
        a.execute("CREATE TABLE pes_rv3_a.ib3 (id serial PRIMARY KEY, body text)")
        a.execute("INSERT INTO pes_rv3_a.ib3 (body) SELECT 'c ' || g FROM generate_series(1, 5) g")
        a.execute(f"GRANT SELECT ON pes_rv3_a.ib3 TO {READER}")
        a.execute("SET pg_embed_sidecar.bulk_index_rows = 1")
        with a.transaction():
            a.execute("SELECT embed_sidecar.watch('pes_rv3_a.ib3', 'body')")
            a.execute("SELECT embed_sidecar.pause('pes_rv3_a.ib3')")
    side = sidecar_of("pes_rv3_a.ib3")
    r = as_role(READER)
    try:
        for mode in ("SHARE", "ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"):
            r.execute("BEGIN")
            err = error_of(r, f"LOCK TABLE {side} IN {mode} MODE")
            r.execute("ROLLBACK")
            assert err is not None and err[0] == "42501", (mode, err)
        r.execute("BEGIN")
        assert error_of(r, f"SELECT * FROM {side} FOR UPDATE") is not None
        r.execute("ROLLBACK")
        r.execute("BEGIN")
        r.execute(f"SELECT count(*) FROM {side}")
        with as_role(OWNER_A) as a:
            a.execute("SELECT embed_sidecar.resume('pes_rv3_a.ib3')")
            assert one(a, "SELECT embed_sidecar.wait('pes_rv3_a.ib3', '60 s')")
        assert wait_until(lambda: _has_hnsw(side), 40, step=0.5)
    finally:
        r.close()


# ---------------------------------------------------------------------------------------------
# 5. The ring (src/inference/ring.rs, client.rs, worker.rs)
# ---------------------------------------------------------------------------------------------

TEXTS = [f"text number {i}: " + " ".join(random.Random(i).choice(["cat", "dog", "sun", "rain", "tree", "car", "sea"])
                                          for _ in range(5 + i % 40)) for i in range(48)]


def _vec(s):
    return np.array([float(v) for v in s.strip("[]").split(",")], dtype=np.float64)


@pytest.fixture(scope="module")
def reference():
    with as_role(NOBODY) as x:
        return {t: _vec(one(x, "SELECT embed_text(%s)::text", (t,))) for t in TEXTS}


def _verifier(ref, stop, bad, counts):
    """Ask for vectors (one and many at a time) and compare each with its text's reference."""
    rnd = random.Random(threading.get_ident())
    while not stop.is_set():
        try:
            with as_role(NOBODY) as c:
                while not stop.is_set():
                    batch = rnd.sample(TEXTS, rnd.choice([1, 3, 17]))
                    rows = c.execute("SELECT v::text FROM unnest(embed_texts(%s)) WITH ORDINALITY u(v, o) ORDER BY o",
                                     (batch,)).fetchall()
                    for t, (v,) in zip(batch, rows):
                        got = _vec(v)
                        cos = float(got @ ref[t] / (np.linalg.norm(got) * np.linalg.norm(ref[t])))
                        counts[0] += 1
                        if cos < 0.9999:
                            bad.append((t, cos))
        except psycopg.OperationalError:
            continue  # terminated by an attack that kills sessions: reconnect
        except psycopg.Error as e:
            if e.sqlstate not in ("57014", "08006", "57P01"):
                bad.append(("error", str(e)))


def _run_storm(ref, attacker, seconds=12, verifiers=2):
    stop, bad, counts = threading.Event(), [], [0]
    threads = [threading.Thread(target=_verifier, args=(ref, stop, bad, counts)) for _ in range(verifiers)]
    threads.append(threading.Thread(target=attacker, args=(stop,)))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return bad, counts[0]


def test_cancelled_callers_never_hand_their_vectors_to_others(reference):
    """Promise 4: a caller gets only its own vectors, also when others cancel (statement_timeout).
    Attack: three sessions call embed_texts with statement_timeouts of 1-40 ms in a loop, so they
    give back slots in every state (submitted, taken, done), while two sessions check every vector
    they get against the vector of its own text.
    Promised: no vector of another text, no error but cancels."""
    def canceller(stop):
        rnd = random.Random(7)
        with as_role(NOBODY) as c:
            while not stop.is_set():
                c.execute(f"SET statement_timeout = {rnd.randint(1, 40)}")
                try:
                    c.execute("SELECT embed_texts(%s)", (rnd.sample(TEXTS, 24),))
                except psycopg.errors.QueryCanceled:
                    pass

    def three(stop):
        ts = [threading.Thread(target=canceller, args=(stop,)) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    bad, n = _run_storm(reference, three)
    assert n > 20, f"only {n} vectors checked"
    assert bad == [], bad[:5]


def test_terminated_callers_never_hand_their_vectors_to_others(reference):
    """Promise 4: a caller gets only its own vectors, also under pg_terminate_backend of callers.
    Attack: sessions call embed_texts in a loop while the superuser terminates them at random
    moments (their slots are left SUBMITTED/TAKEN/DONE with a dead owner, freed by the worker's
    tidy), while two sessions check every vector they get.
    Promised: no vector of another text."""
    def victims_and_killer(stop):
        pids = []

        def victim():
            while not stop.is_set():
                try:
                    with as_role(NOBODY) as c:
                        pids.append(one(c, "SELECT pg_backend_pid()"))
                        while not stop.is_set():
                            c.execute("SELECT embed_texts(%s)", (TEXTS[:32],))
                except psycopg.Error:
                    continue
        ts = [threading.Thread(target=victim) for _ in range(2)]
        for t in ts:
            t.start()
        rnd = random.Random(3)
        with su() as k:
            while not stop.is_set():
                time.sleep(rnd.uniform(0.05, 0.4))
                if pids:
                    k.execute("SELECT pg_terminate_backend(%s)", (pids.pop(),))
        for t in ts:
            t.join()

    bad, n = _run_storm(reference, victims_and_killer)
    assert n > 20, f"only {n} vectors checked"
    assert bad == [], bad[:5]


def test_killing_the_inference_worker_hands_no_vector_to_the_wrong_caller(reference):
    """Promise 4: a caller gets only its own vectors, also under pg_terminate_backend of the
    inference worker (taken slots are requeued by clients and by the successor).
    Attack: the superuser terminates the inference worker three times while two sessions ask for
    vectors and check each.
    Promised: every vector is its text's; the service comes back."""
    def killer(stop):
        with su() as k:
            for _ in range(3):
                if stop.wait(2.5):
                    return
                k.execute("""SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                              WHERE backend_type = 'pg_embed_sidecar inference'""")

    bad, n = _run_storm(reference, killer, seconds=14)
    assert n > 20, f"only {n} vectors checked"
    assert bad == [], bad[:5]
    with as_role(NOBODY) as x:
        x.execute("SET statement_timeout = '30s'")
        assert _vec(one(x, "SELECT embed_text(%s)::text", (TEXTS[5],))) @ reference[TEXTS[5]] > 0.999


def test_ring_still_serves_everyone_after_the_storms(reference):
    """Promise 4: no PUBLIC caller starves the drains or leaks the ring (slots given back on every
    way out).
    Attack: after the cancel/terminate storms above, ask for a batch that needs most of the
    interactive part of the ring and make the drain embed new rows.
    Promised: both finish promptly and correctly."""
    with as_role(NOBODY) as x:
        x.execute("SET statement_timeout = '60s'")
        texts = [TEXTS[i % len(TEXTS)] for i in range(200)]
        rows = x.execute("SELECT v::text FROM unnest(embed_texts(%s)) WITH ORDINALITY u(v, o) ORDER BY o",
                         (texts,)).fetchall()
        assert len(rows) == 200
        for t, (v,) in zip(texts, rows):
            g = _vec(v)
            assert g @ reference[t] / (np.linalg.norm(g) * np.linalg.norm(reference[t])) > 0.9999
    side = make_watched(OWNER_B, "pes_rv3_b.after_storm", rows=20)
    with su() as c:
        assert one(c, f"SELECT count(*) FROM {side}") == 20


def test_flooding_sessions_do_not_starve_the_drain():
    """Promise 4: drains waiting are owed a quarter of the inference worker's busy time; no PUBLIC
    caller starves them.
    Attack: three PUBLIC sessions call embed_texts with 96 window-long texts in a loop (each round
    of the worker then takes every waiting interactive slot), and the share account resets
    whenever no drain text waits, i.e. between two passes of the drain.
    Promised: 40 rows written by an owner are embedded within 40 s (without the flood: ~1 s)."""
    long_text = " ".join(["sunshine", "rainfall", "mountain", "library", "keyboard"] * 120)
    stop = threading.Event()

    def flood():
        with as_role(NOBODY) as c:
            c.execute("SET statement_timeout = '20s'")
            while not stop.is_set():
                try:
                    c.execute("SELECT embed_texts(%s)", ([long_text + str(i) for i in range(96)],))
                except psycopg.Error:
                    pass
    make_watched(OWNER_B, "pes_rv3_b.flood", rows=1)
    side = sidecar_of("pes_rv3_b.flood")
    ts = [threading.Thread(target=flood) for _ in range(3)]
    for t in ts:
        t.start()
    try:
        time.sleep(2)
        with as_role(OWNER_B) as b:
            for i in range(40):
                b.execute("INSERT INTO pes_rv3_b.flood (body) VALUES (%s)", (f"drain row {i}",))
            start = time.monotonic()
            done = wait_until(lambda: one(b, f"SELECT count(*) FROM {side}") == 41, 40, step=0.2)
            took = time.monotonic() - start
    finally:
        stop.set()
        for t in ts:
            t.join(30)
    with su() as c:
        got = one(c, f"SELECT count(*) FROM {side}") - 1
    assert done, f"drain starved: {got} of 40 rows embedded in {took:.0f} s"


# ---------------------------------------------------------------------------------------------
# 6. Limits and settings a PUBLIC caller might try
# ---------------------------------------------------------------------------------------------

def test_public_caller_cannot_lift_the_limits():
    """Promise 4: embed_texts takes at most embed_texts_max texts; chunk_text at most 1 MB; the
    settings that bound CPU and memory are not a PUBLIC caller's.
    Attack: role X sets the limits itself (SET, set_config, ALTER ROLE ... SET on itself), then
    sends 10,001 texts and a 2 MB text to chunk.
    Promised: every attempt refused."""
    with as_role(NOBODY) as x:
        for name in ("embed_texts_max", "chunk_text_max", "max_batch", "max_batch_tokens", "intra_threads",
                     "visibility_timeout", "max_attempts", "inference"):
            assert error_of(x, f"SET pg_embed_sidecar.{name} = '100000'") is not None, name
            assert error_of(x, f"ALTER ROLE {NOBODY} SET pg_embed_sidecar.{name} = '100000'") is not None, name
        err = error_of(x, "SELECT cardinality(embed_texts(array_fill('x'::text, ARRAY[10001])))")
        assert err is not None, "10,001 texts accepted"
        err = error_of(x, "SELECT count(*) FROM embed_sidecar.chunk_text(repeat('word ', 400000), NULL, 128, 16)")
        assert err is not None, "2 MB text chunked"


def test_caller_mark_does_not_outlive_a_definer_function():
    """Promise 2: who is calling is answered as PostgreSQL answers it; a SECURITY DEFINER
    function of another role is judged by its owner only while it runs.
    Attack: owner A offers a SECURITY DEFINER function that calls search() on its own table (a
    legitimate use); role X calls it, then, in the same transaction, calls the PUBLIC internal
    _do_unwatch on A's table, hoping A's caller mark is still set.
    Promised: 42501, and A's table stays watched."""
    make_watched(OWNER_A, "pes_rv3_a.mark1")
    with as_role(OWNER_A) as a:
        a.execute("""CREATE FUNCTION pes_rv3_a.find(q text) RETURNS SETOF jsonb LANGUAGE sql SECURITY DEFINER
                     SET search_path = pg_catalog AS $$ SELECT key FROM embed_sidecar.search('pes_rv3_a.mark1', q, 3) $$""")
        a.execute(f"GRANT EXECUTE ON FUNCTION pes_rv3_a.find(text) TO {NOBODY}")
    with as_role(NOBODY) as x:
        with x.transaction():
            x.execute("SELECT count(*) FROM pes_rv3_a.find('cats')")
            err = error_of(x, "SELECT embed_sidecar._do_unwatch('pes_rv3_a.mark1', true, NULL)")
            assert err is not None and err[0] == "42501", err
            raise psycopg.Rollback()
    with su() as c:
        assert one(c, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'pes_rv3_a.mark1'::regclass") == 1


def test_queue_messages_and_archive_are_private():
    """Promise 3: a reader sees no row the table hides; the queues (which carry the changed rows'
    keys, maybe e-mail addresses) are made by the extension itself (sql/queues.sql), not by
    pgmq.create().
    Attack: role X reads the queue and archive tables directly, through PUBLIC pgmq functions
    (read, pop, metrics, metrics_all, list_queues), and through pgmq.meta.
    Promised: no key of A's table reaches X."""
    with as_role(OWNER_A) as a:
        a.execute("CREATE TABLE pes_rv3_a.qp1 (email text PRIMARY KEY, body text)")
        a.execute("SELECT embed_sidecar.watch('pes_rv3_a.qp1', 'body')")
        a.execute("SELECT embed_sidecar.pause('pes_rv3_a.qp1')")
        a.execute("INSERT INTO pes_rv3_a.qp1 VALUES ('secret.person@example.com', 'hello')")
    with su() as c:
        q = one(c, "SELECT queue_name FROM embed_sidecar.sources WHERE source = 'pes_rv3_a.qp1'::regclass")
    leaks = []
    with as_role(NOBODY) as x:
        for sql in (f"SELECT message::text FROM pgmq.q_{q}", f"SELECT message::text FROM pgmq.a_{q}",
                    f"SELECT message::text FROM pgmq.read('{q}', 0, 10)",
                    f"SELECT message::text FROM pgmq.pop('{q}')",
                    f"SELECT msg_id::text FROM pgmq.read('{q}_bulk', 0, 10)"):
            try:
                rows = x.execute(sql).fetchall()
                if any("secret" in (r[0] or "") for r in rows) or (rows and "msg_id" in sql):
                    leaks.append(sql)
            except psycopg.Error:
                pass
    with su() as c:
        left = one(c, f"SELECT count(*) FROM pgmq.q_{q}")
    with as_role(OWNER_A) as a:
        a.execute("SELECT embed_sidecar.unwatch('pes_rv3_a.qp1', true)")
    assert leaks == [], leaks
    assert left == 1, "X consumed A's queue"


def test_process_by_a_role_that_may_execute_it_touches_only_its_own_tables():
    """Promise 1/3: process() runs as PostgreSQL judges the caller; 42501 for a table the caller
    may not read; a caller with EXECUTE on process() but no table cannot drain (or learn about)
    another owner's table.
    Attack: role X, granted EXECUTE on process() by the administrator, calls process(A's table),
    process(NULL) and the PUBLIC body _do_process directly.
    Promised: 42501 for the named table, 0 for NULL, A's paused backlog untouched."""
    with as_role(OWNER_A) as a:
        a.execute("CREATE TABLE pes_rv3_a.pr1 (id serial PRIMARY KEY, body text)")
        a.execute("SELECT embed_sidecar.watch('pes_rv3_a.pr1', 'body')")
        a.execute("SELECT embed_sidecar.pause('pes_rv3_a.pr1')")
        a.execute("INSERT INTO pes_rv3_a.pr1 (body) VALUES ('queued while paused')")
    side = sidecar_of("pes_rv3_a.pr1")
    with as_role(NOBODY) as x:
        err = error_of(x, "SELECT embed_sidecar.process('pes_rv3_a.pr1')")
        assert err is not None and err[0] == "42501", err
        assert one(x, "SELECT embed_sidecar.process(NULL)") == 0
        err = error_of(x, "SELECT embed_sidecar._do_process(NULL, 1000)")
        assert err is not None and err[0] == "42501", err
    with su() as c:
        assert one(c, f"SELECT count(*) FROM {side}") == 0
    with as_role(OWNER_A) as a:
        a.execute("SELECT embed_sidecar.unwatch('pes_rv3_a.pr1', true)")


def test_a_writer_with_delete_rights_does_not_starve_other_owners_indexes():
    """Promise 5: no lock another role can take stalls the drain worker; other owners' deferred
    HNSW indexes are built by the index builder.
    Attack: X, who may only DELETE rows of A's table (watched first, index deferred), deletes one
    (blank, so never queued) row and leaves its transaction open: the sidecar's ON DELETE CASCADE holds ROW EXCLUSIVE on
    A's sidecar, so every builder for A times out on its lock after 2 s; the worker starts a
    builder for A again every 5 s (lowest id first, one builder per database), never for B.
    Promised: B's deferred index is built within 40 s."""
    with as_role(OWNER_A) as a:
        a.execute("CREATE TABLE pes_rv3_a.ibw (id serial PRIMARY KEY, body text)")
        a.execute("INSERT INTO pes_rv3_a.ibw (body) SELECT 'w ' || g FROM generate_series(1, 5) g")
        a.execute("INSERT INTO pes_rv3_a.ibw (id, body) VALUES (100, '')")  # blank: never queued
        a.execute(f"GRANT SELECT, DELETE ON pes_rv3_a.ibw TO {NOBODY}")
        a.execute("SET pg_embed_sidecar.bulk_index_rows = 1")
        with a.transaction():
            a.execute("SELECT embed_sidecar.watch('pes_rv3_a.ibw', 'body')")
            a.execute("SELECT embed_sidecar.pause('pes_rv3_a.ibw')")
    aside = sidecar_of("pes_rv3_a.ibw")
    holder = as_role(NOBODY)
    holder.execute("BEGIN")
    holder.execute("DELETE FROM pes_rv3_a.ibw WHERE id = 100")
    try:
        with as_role(OWNER_A) as a:
            a.execute("SELECT embed_sidecar.resume('pes_rv3_a.ibw')")
            assert one(a, "SELECT embed_sidecar.wait('pes_rv3_a.ibw', '60 s')")
        with as_role(OWNER_B) as b:
            b.execute("CREATE TABLE pes_rv3_b.ibw2 (id serial PRIMARY KEY, body text)")
            b.execute("INSERT INTO pes_rv3_b.ibw2 (body) SELECT 'b ' || g FROM generate_series(1, 5) g")
            b.execute("SET pg_embed_sidecar.bulk_index_rows = 1")
            b.execute("SELECT embed_sidecar.watch('pes_rv3_b.ibw2', 'body')")
            assert one(b, "SELECT embed_sidecar.wait('pes_rv3_b.ibw2', '60 s')")
        bside = sidecar_of("pes_rv3_b.ibw2")
        built = wait_until(lambda: _has_hnsw(bside), 40, step=0.5)
        a_built = _has_hnsw(aside)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not a_built
    assert built, "B's deferred HNSW index was never built while a writer of A's table kept a transaction open"


def test_reader_with_a_quoted_name_follows_grant_and_revoke():
    """Promise 3: sidecar readers are the source's readers after every GRANT/REVOKE; role names
    that need quotes work.
    Attack: the owner grants SELECT on ALL TABLES IN SCHEMA (source and sidecar both named) to a
    role whose name needs quoting, then revokes SELECT on the source only.
    Promised: the role reads the sidecar while it may read the source, and not after."""
    quoted = '"pes_rv3_Q q"'
    with su() as c:
        c.execute(f"DROP ROLE IF EXISTS {quoted}")
        c.execute(f"CREATE ROLE {quoted} LOGIN")
    try:
        side = make_watched(OWNER_A, "pes_rv3_a.qr1")
        with as_role(OWNER_A) as a:
            a.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA pes_rv3_a TO {quoted}")
        with su() as c:
            assert one(c, "SELECT has_table_privilege('pes_rv3_Q q', %s::regclass, 'SELECT')", (side,))
        with as_role(OWNER_A) as a:
            a.execute(f"REVOKE SELECT ON pes_rv3_a.qr1 FROM {quoted}")
        with su() as c:
            still = one(c, "SELECT has_table_privilege('pes_rv3_Q q', %s::regclass, 'SELECT')", (side,))
        assert not still, "the sidecar stays readable after the source's REVOKE"
    finally:
        with su() as c:
            c.execute(f"DROP OWNED BY {quoted}")
            c.execute(f"DROP ROLE {quoted}")
