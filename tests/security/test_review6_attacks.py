"""Attacks of a sixth reviewer who did not write the code, aimed at branch `replica`: logical
replication support (sql/replica.sql, src/replica.rs: the ENABLE REPLICA row trigger, the ALWAYS
TRUNCATE trigger, the event trigger on CREATE/ALTER SUBSCRIPTION that drops a sidecar's foreign
key, status.replication_lag) and sharded search (sql/shards.sql: search_shards,
hybrid_search_shards, and their PUBLIC helpers).

Each test is one attack; it PASSES when the promise holds and FAILS when the attack works.
Most attacks run in the test cluster under `session_replication_role = replica` as a superuser,
which the README ("An embedding replica") promises is handled exactly as the apply worker is
(the apply worker is a superuser session in replica mode). The tests marked `replication` start a
throwaway publisher cluster on $PES_PUBLISHER_PORT (default 5452, data in $PES_PUBLISHER_DATA,
default /var/lib/pg_wt_replica_pub6) and subscribe the test database to it."""
import os
import re
import time
import uuid

import psycopg
import pytest

from conftest import connect, connect_as, error_of, one, wait, watch, wait_until

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")


def source_id(conn, table):
    return one(conn, "SELECT id FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'current'", (table,))


def sidecar(conn, table):
    return one(conn, "SELECT sidecar::text FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'current'",
               (table,))


def queued(conn, sid):
    """Messages on a source's live queue, read straight from pgmq's table (as the superuser)."""
    return one(conn, f"SELECT count(*) FROM pgmq.q_embed_sidecar_{sid}")


def fk_count(conn, side, table):
    return one(conn, """SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass AND confrelid = %s::regclass
                          AND contype = 'f'""", (side, table))


def plant_spy(oc, schema):
    """As the owner: a log table anybody may append to and spy(), which notes who runs it, whether
    that role is a superuser, and the trigger depth."""
    s = f'"{schema}"'
    oc.execute("CREATE TABLE spylog (who text, sup boolean, depth int, at text)")
    oc.execute("GRANT INSERT ON spylog TO PUBLIC")
    oc.execute(f"""CREATE FUNCTION spy(at text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
                   BEGIN
                     INSERT INTO {s}.spylog
                     SELECT current_user, r.rolsuper, pg_catalog.pg_trigger_depth(), at
                       FROM pg_catalog.pg_roles r WHERE r.rolname = current_user;
                     RETURN true;
                   END $$""")
    oc.execute("GRANT EXECUTE ON FUNCTION spy(text) TO PUBLIC")


# ---------------------------------------------------------------------------------------------
# 1. the owner's code that the replica / TRUNCATE path runs: as the owner, never as the superuser
# ---------------------------------------------------------------------------------------------

def test_key_domain_check_in_replica_mode_runs_as_the_owner_not_the_apply_worker(db, make_role):
    """Promise (README, Whose rights / An embedding replica): the replica trigger checks keys
    against the key columns' types as the table's owner in a security-restricted operation, never
    as the apply worker (a superuser).
    Attack: the owner's key type is a domain whose CHECK calls the owner's spy(); a superuser
    session in replica mode (what the apply worker is) inserts and updates rows.
    Safe outcome: spy() inside the trigger (trigger depth >= 1) runs only as the owner.
    (The superuser's own INSERT checks the domain at depth 0: PostgreSQL's, not the extension's.)"""
    o = make_role("rv6_dom_owner")
    oc = connect_as(o, db.schema)
    try:
        plant_spy(oc, db.schema)
        oc.execute(f"""CREATE DOMAIN dkey AS text CHECK ("{db.schema}".spy('domain'))""")
        oc.execute("CREATE TABLE ddocs (id dkey PRIMARY KEY, body text)")
    finally:
        oc.close()
    watch(db, "ddocs")
    db.execute("DELETE FROM spylog")
    db.execute("SET session_replication_role = replica")
    try:
        db.execute("INSERT INTO ddocs VALUES ('a', 'replicated text a'), ('b', 'replicated text b')")
        db.execute("UPDATE ddocs SET id = 'c' WHERE id = 'b'")
    finally:
        db.execute("RESET session_replication_role")
    wait(db, "ddocs")
    log = db.execute("SELECT who, sup, depth FROM spylog WHERE depth >= 1").fetchall()
    assert log, "the domain check never ran inside the replica trigger: the attack was not exercised"
    bad = [r for r in log if r[1] or r[0] != o]
    assert not bad, f"the owner's domain check ran inside the replica trigger as {bad}"


def test_orphan_listing_for_truncate_runs_owner_policies_as_the_owner(db, make_role):
    """Promise: the TRUNCATE trigger (ENABLE ALWAYS, so it runs in the apply worker) lists the
    sidecar's orphans as the table's owner in a security-restricted operation.
    Attack: the owner forces row security on the source with a policy calling spy(); a superuser
    runs what the TRUNCATE trigger runs (_enqueue_orphans), in replica mode.
    Safe outcome: every spy() call is the owner's, never a superuser's."""
    o = make_role("rv6_pol_owner")
    oc = connect_as(o, db.schema)
    try:
        plant_spy(oc, db.schema)
        oc.execute("CREATE TABLE pdocs (id int PRIMARY KEY, body text)")
        oc.execute("INSERT INTO pdocs SELECT i, 'policy text ' || i FROM generate_series(1, 5) i")
    finally:
        oc.close()
    watch(db, "pdocs")
    wait(db, "pdocs")
    sid = source_id(db, "pdocs")
    oc = connect_as(o, db.schema)
    try:
        oc.execute(f"""CREATE POLICY spyp ON pdocs USING ("{db.schema}".spy('policy'))""")
        oc.execute("ALTER TABLE pdocs ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY")
    finally:
        oc.close()
    db.execute("DELETE FROM spylog")
    db.execute("SET session_replication_role = replica")
    try:
        n = one(db, "SELECT embed_sidecar._enqueue_orphans(%s)", (sid,))
    finally:
        db.execute("RESET session_replication_role")
    log = db.execute("SELECT who, sup FROM spylog").fetchall()
    assert log, "the orphan listing never read the source under the owner's policy"
    assert n == 0, f"{n} orphans reported for a table whose rows all exist"
    bad = [r for r in log if r[1] or r[0] != o]
    assert not bad, f"the owner's policy ran in the orphan listing as {bad}"


def test_owner_trigger_set_enable_always_runs_as_the_apply_worker_and_readme_warns(db, make_role):
    """Promise (README, "Whose rights": a table owner's code never runs with a superuser's rights;
    "Owning a watched table gives no more power than owning a table"). On PostgreSQL 15 the apply
    worker runs every ENABLE ALWAYS / ENABLE REPLICA trigger of the subscribed table as the
    subscription's owner (a superuser; run_as_owner only exists from 16). The branch tells
    administrators to subscribe tables owned by ordinary roles and only explains why the
    extension's own replica triggers are safe.
    Attack: the owner of a watched table adds her own trigger, ENABLE ALWAYS, that (1) notes who
    runs it and (2) calls embed_sidecar._enqueue_applied() with ANOTHER owner's source id; a
    superuser writes in replica mode (the apply worker).
    Safe outcome: either the owner's code never runs as a superuser, or the README's replica section
    warns that owners of subscribed tables gain the subscription owner's rights (it is then the
    administrator's informed choice). Evidence is printed either way."""
    o = make_role("rv6_always_owner")
    v = make_role("rv6_always_victim")
    db.execute("CREATE TABLE victim (id int PRIMARY KEY, body text)")
    db.execute(f'ALTER TABLE victim OWNER TO "{v}"')
    watch(db, "victim")
    vid = source_id(db, "victim")
    db.execute("SELECT embed_sidecar.pause('victim')")
    oc = connect_as(o, db.schema)
    try:
        plant_spy(oc, db.schema)
        oc.execute("CREATE TABLE mine (id int PRIMARY KEY, body text)")
        oc.execute(f"""CREATE FUNCTION evil() RETURNS trigger LANGUAGE plpgsql AS $$
                       BEGIN
                         PERFORM "{db.schema}".spy('always');
                         PERFORM embed_sidecar._enqueue_applied({vid}, ARRAY['[424242]']);
                         RETURN NULL;
                       EXCEPTION WHEN insufficient_privilege THEN RETURN NULL;
                       END $$""")
        oc.execute("CREATE TRIGGER evil AFTER INSERT ON mine FOR EACH ROW EXECUTE FUNCTION evil()")
        oc.execute("ALTER TABLE mine ENABLE ALWAYS TRIGGER evil")
    finally:
        oc.close()
    watch(db, "mine")
    before = queued(db, vid)
    db.execute("SET session_replication_role = replica")
    try:
        db.execute("INSERT INTO mine VALUES (1, 'a replicated row')")
    finally:
        db.execute("RESET session_replication_role")
    log = db.execute("SELECT who, sup FROM spylog WHERE at = 'always'").fetchall()
    enq = queued(db, vid) - before
    db.execute("SELECT embed_sidecar.resume('victim')")
    ran_as_super = any(r[1] for r in log)
    if not ran_as_super and enq == 0:
        return
    section = open(README).read().split("### An embedding replica", 1)[1].split("### Sharded", 1)[0]
    warned = re.search(r"(owner'?s?'? own|owners of)[^.]{0,200}(trigger|code)[^.]{0,300}(superuser|subscription's owner)",
                       section, re.S | re.I) or "run_as_owner" in section or "trusted" in section.lower()
    assert warned, (f"the owner's ENABLE ALWAYS trigger ran as {log} in the apply worker's mode and put {enq} key(s) on "
                    f"another owner's queue (embed_sidecar_{vid}); the README's replica section promises safety for the "
                    "extension's triggers but never warns that owners of subscribed tables run code as the subscription's "
                    "owner (superuser on PostgreSQL 15)")


# ---------------------------------------------------------------------------------------------
# 2. the PUBLIC entry points of the replica path
# ---------------------------------------------------------------------------------------------

def test_enqueue_applied_and_orphans_refuse_roles_without_write_rights(db, make_role):
    """Promise: _enqueue_applied / _enqueue_orphans are PUBLIC but refuse callers who may not
    write (resp. truncate or delete from) the table: no role manages another's queue.
    Attack: a role with SELECT only, and a role with nothing, call both on the owner's source.
    Safe outcome: 42501 for each, and nothing queued."""
    r = make_role("rv6_reader")
    n = make_role("rv6_nobody")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO t VALUES (1, 'one')")
    watch(db, "t")
    wait(db, "t")
    sid = source_id(db, "t")
    db.execute(f'GRANT SELECT ON t TO "{r}"')
    db.execute("SELECT embed_sidecar.pause('t')")
    before = queued(db, sid)
    got = {}
    for role in (r, n):
        with connect_as(role, db.schema) as c:
            got[(role, "applied")] = error_of(c, "SELECT embed_sidecar._enqueue_applied(%s, ARRAY['[1]', '[2]'])", (sid,))
            got[(role, "orphans")] = error_of(c, "SELECT embed_sidecar._enqueue_orphans(%s)", (sid,))
    after = queued(db, sid)
    db.execute("SELECT embed_sidecar.resume('t')")
    for k, e in got.items():
        assert e is not None and e[0] == "42501", f"{k}: {e}"
    assert after == before, f"{after - before} message(s) queued by roles without write rights"


def test_delete_only_writer_cannot_enqueue_keys_that_are_not_the_tables(db, make_role):
    """Promise: a writer's keys are checked (arity, types, size) before they are queued; the new
    DELETE-only path (_enqueue accepts DELETE now, _enqueue_applied too) is no exception.
    Attack: a role with DELETE only queues malformed and oversized keys.
    Safe outcome: each is refused (22023), nothing queued."""
    w = make_role("rv6_deleter")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    watch(db, "t")
    sid = source_id(db, "t")
    db.execute(f'GRANT DELETE ON t TO "{w}"')
    db.execute("SELECT embed_sidecar.pause('t')")
    before = queued(db, sid)
    bad = ['["x"]', '[1, 2]', '[null]', '{"a":1}', '[' + '1' * 3000 + ']']
    errs = []
    with connect_as(w, db.schema) as c:
        for fn in ("_enqueue", "_enqueue_applied"):
            for k in bad:
                errs.append((fn, k[:20], error_of(c, f"SELECT embed_sidecar.{fn}(%s, ARRAY[%s])", (sid, k))))
    after = queued(db, sid)
    db.execute("SELECT embed_sidecar.resume('t')")
    accepted = [e for e in errs if e[2] is None]
    assert not accepted, f"keys that are not the table's were queued: {accepted}"
    assert after == before


def test_replication_lag_tells_an_unprivileged_role_nothing_the_catalogs_do_not(db, make_role):
    """Promise: status lists only tables the querier may read; _replication_lag is PUBLIC.
    Attack: a role with no rights on a table calls _replication_lag on it directly.
    Safe outcome: whatever it answers, the same role can read it from PostgreSQL's own views
    (pg_subscription_rel, pg_stat_subscription), i.e. no new leak; and status hides the table."""
    n = make_role("rv6_lag_nobody")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    watch(db, "t")
    with connect_as(n, db.schema) as c:
        e = error_of(c, "SELECT * FROM embed_sidecar._replication_lag(%s::regclass)", (f'"{db.schema}".t',))
        if e is None:
            for view in ("pg_catalog.pg_subscription_rel", "pg_catalog.pg_stat_subscription"):
                ve = error_of(c, f"SELECT count(*) FROM {view}")
                assert ve is None, f"_replication_lag reads {view}, which the role itself may not: {ve}"
        rows = one(c, "SELECT count(*) FROM embed_sidecar.status WHERE source::text LIKE '%%.t' OR source::text = 't'")
        assert rows == 0, "status shows a table the role may not read"


# ---------------------------------------------------------------------------------------------
# 3. search_shards / hybrid_search_shards
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["search", "search_shards", "hybrid_search_shards"])
def test_shard_search_is_refused_inside_a_security_restricted_operation(db, fn):
    """Promise (README, Whose rights): "Nothing inside a security-restricted operation — code the
    drain runs for a table's owner, a VACUUM, a REFRESH MATERIALIZED VIEW — may call the
    management or search functions (42501), so planted code cannot speak for the worker or for
    whoever started the operation"; "a materialized view ... cannot call search()".
    Attack: a materialized view whose query calls the new search_shards / hybrid_search_shards
    (plain search() is the control), refreshed.
    Safe outcome: the REFRESH fails with 42501."""
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO t VALUES (1, 'rivers in winter'), (2, 'a chess engine')")
    side = watch(db, "t")
    wait(db, "t")
    call = {"search": "embed_sidecar.search('t', 'rivers', 2)",
            "search_shards": f"embed_sidecar.search_shards(ARRAY['{side}']::regclass[], 'rivers', 2)",
            "hybrid_search_shards": f"embed_sidecar.hybrid_search_shards(ARRAY['{side}']::regclass[], 'rivers', 2, 10)"}[fn]
    db.execute(f"CREATE MATERIALIZED VIEW mv AS SELECT * FROM {call} WITH NO DATA")
    e = error_of(db, "REFRESH MATERIALIZED VIEW mv")
    rows = one(db, "SELECT count(*) FROM mv") if e is None else None
    assert e is not None and e[0] == "42501", (
        f"{fn}() ran inside a security-restricted operation (REFRESH MATERIALIZED VIEW), "
        f"{rows} rows: {e}")


def test_search_shards_over_a_sidecar_keeps_row_security(db, make_role):
    """Promise: a reader sees through the sidecar exactly the rows the source shows it (row
    security), whatever function reads it; search_shards runs as its caller.
    Attack: a reader who may see only row 1 passes the owner's sidecar itself as a 'shard' (it has
    key columns, embedding and model), with partial => true too.
    Safe outcome: only key [1] comes back. (Every sidecar column but embedding, model and fts counts
    as a key column of a shard, so the 'key' also carries content_hash and embedded_at: only its
    first element, id, is compared.)"""
    r = make_role("rv6_shard_reader")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text, vis boolean)")
    db.execute("INSERT INTO t SELECT i, 'rivers in winter ' || i, i = 1 FROM generate_series(1, 6) i")
    side = watch(db, "t")
    wait(db, "t")
    db.execute(f'GRANT SELECT ON t TO "{r}"')
    db.execute("CREATE POLICY vis ON t USING (vis)")
    db.execute("ALTER TABLE t ENABLE ROW LEVEL SECURITY")
    with connect_as(r, db.schema) as c:
        for partial in (False, True):
            keys = [k[:1] for (k,) in c.execute(
                "SELECT key FROM embed_sidecar.search_shards(%s::regclass[], 'rivers', 10, partial => %s)",
                ([side], partial)).fetchall()]
            assert keys == [[1]], f"search_shards(partial => {partial}) over the sidecar gave the reader {keys}"


def test_search_shards_does_not_skip_an_unreadable_shard_silently(db, make_role):
    """Promise: with partial => true a shard left out is named, never a silent short list; a shard
    the caller may not read is an error (42501), not 'did not answer'.
    Attack: a role without rights on a sidecar passes it with partial => true.
    Safe outcome: 42501."""
    n = make_role("rv6_shard_nobody")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO t VALUES (1, 'rivers in winter')")
    side = watch(db, "t")
    wait(db, "t")
    with connect_as(n, db.schema) as c:
        e = error_of(c, "SELECT * FROM embed_sidecar.search_shards(%s::regclass[], 'rivers', 5, partial => true)", ([side],))
    assert e is not None and e[0] == "42501", f"an unreadable shard gave {e}"


def test_fan_out_is_no_more_than_the_callers_own_sql(db, make_role):
    """Promise: search_shards runs as its caller. _fan_out is PUBLIC and EXECUTEs the branches it is
    handed (text): it must grant nothing the caller lacks.
    Attack: a role without rights hands _fan_out a branch reading the owner's table.
    Safe outcome: 42501."""
    n = make_role("rv6_fan_nobody")
    db.execute("CREATE TABLE secret (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO secret VALUES (1, 'the secret')")
    side = watch(db, "secret")
    wait(db, "secret")
    side = f'"{db.schema}".{side.split(".")[-1]}'
    branch = f"(SELECT 'x'::text AS shard, t.id, t.content_hash, t.embedded_at, t.model, 0::float8 AS _pes_distance FROM {side} t)"
    with connect_as(n, db.schema) as c:
        e = error_of(c, "SELECT * FROM embed_sidecar._fan_out(%s::regclass[], ARRAY[%s], false, NULL, NULL, 'm')",
                     ([side], branch))
    assert e is not None and e[0] == "42501", f"_fan_out read the owner's sidecar for a role without rights: {e}"


# ---------------------------------------------------------------------------------------------
# 4. real logical replication: a publisher cluster without the extension
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def subscription(db, publisher):
    """subscription(tables_ddl: {name: columns}) makes the tables on both sides in this test's
    schema, publishes them and returns (publisher connection, subscribe())."""
    pub = publisher.connect()
    pub.execute(f'CREATE SCHEMA "{db.schema}"')
    pub.execute(f'SET search_path = "{db.schema}"')
    name = "rv6_" + uuid.uuid4().hex[:8]
    made = []

    def make(tables):
        for t, ddl in tables.items():
            pub.execute(f"CREATE TABLE {t} ({ddl})")
            db.execute(f"CREATE TABLE {t} ({ddl})")
        pub.execute(f"CREATE PUBLICATION {name} FOR TABLE " + ", ".join(f'"{db.schema}".{t}' for t in tables))

        def subscribe():
            db.execute(f"CREATE SUBSCRIPTION {name} CONNECTION '{publisher.dsn()}' PUBLICATION {name}")
            made.append(name)
        return pub, subscribe

    yield make
    for sub in made:
        try:
            db.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
        except psycopg.Error:
            pass
        db.execute(f"DROP SUBSCRIPTION IF EXISTS {sub}")
    pub.execute(f"DROP PUBLICATION IF EXISTS {name}")
    pub.execute(f'DROP SCHEMA "{db.schema}" CASCADE')
    pub.close()


def synced(db, tables):
    return one(db, """SELECT count(*) = %s FROM pg_subscription_rel WHERE srrelid = ANY(%s::regclass[]) AND srsubstate = 'r'""",
               (len(tables), [f'"{db.schema}".{t}' for t in tables]))


def test_a_publisher_row_with_a_long_key_does_not_stall_the_subscription(db, subscription):
    """Promise (README, An embedding replica / Guarantees): every replicated INSERT reaches the
    replica and its sidecar; the extension's triggers never make the apply worker fail. On the
    publisher (no extension) nothing limits a key's length but the btree (about 2.7 kB); the
    extension's key check refuses keys whose JSON exceeds 2,000 bytes, and in the apply worker
    that refusal is an ERROR that aborts the apply.
    Attack: a writer on the publisher inserts a row with a 2,112-byte text key into the watched
    table, then a row into ANOTHER (unwatched) table of the same publication.
    Safe outcome: both rows arrive on the subscriber within 90 s."""
    pub, subscribe = subscription({"docs": "id text PRIMARY KEY, body text", "other": "id int PRIMARY KEY, note text"})
    pub.execute("INSERT INTO docs VALUES ('short', 'a replicated document')")
    watch(db, "docs")
    subscribe()
    assert wait_until(lambda: synced(db, ["docs", "other"]), 120), "the initial copy did not finish"
    # control: the apply worker applies changes to both tables
    pub.execute("INSERT INTO other VALUES (0, 'control row')")
    pub.execute("INSERT INTO docs VALUES ('control', 'a control document')")
    assert wait_until(lambda: one(db, "SELECT count(*) FROM other") == 1
                      and one(db, "SELECT count(*) FROM docs WHERE id = 'control'") == 1, 120), "control rows never arrived"
    long_key = one(pub, "SELECT string_agg(md5(i::text), '') FROM generate_series(1, 66) i")
    pub.execute("INSERT INTO docs VALUES (%s, 'a document with a long key')", (long_key,))
    pub.execute("INSERT INTO other VALUES (1, 'another table of the same subscription')")
    arrived = wait_until(lambda: one(db, "SELECT count(*) FROM other") == 2, 120)
    errors = one(db, """SELECT apply_error_count FROM pg_stat_subscription_stats s JOIN pg_subscription p ON p.oid = s.subid
                         WHERE p.subname LIKE 'rv6_%%' ORDER BY 1 DESC LIMIT 1""")
    assert arrived, (f"the subscription stalled: a publisher row whose key is {len(long_key)} bytes makes the replica trigger "
                     f"raise in the apply worker (apply_error_count {errors}); no later change of ANY table of the "
                     "subscription is applied")
    assert one(db, "SELECT count(*) FROM docs WHERE id = %s", (long_key,)) == 1


def test_create_subscription_drops_only_the_subscribed_tables_foreign_key(db, subscription, make_role):
    """Promise: the event trigger (SECURITY DEFINER) drops the foreign key of a sidecar whose table
    a subscription copies; one tenant cannot make another's sidecar lose its foreign key.
    Attack: tenant B's watched table sits beside the subscribed one (same schema, not published)
    while the administrator creates the subscription (the event trigger walks every source).
    Safe outcome: the subscribed table's sidecar has no FK, B's keeps its FK."""
    b = make_role("rv6_fk_tenant")
    pub, subscribe = subscription({"docs": "id int PRIMARY KEY, body text"})
    pub.execute("INSERT INTO docs VALUES (1, 'replicated')")
    db.execute("CREATE TABLE theirs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO theirs VALUES (1, 'tenant b text')")
    db.execute(f'ALTER TABLE theirs OWNER TO "{b}"')
    side_docs = watch(db, "docs")
    side_theirs = watch(db, "theirs")
    wait(db, "theirs")
    subscribe()
    assert wait_until(lambda: synced(db, ["docs"]), 120), "the initial copy did not finish"
    assert fk_count(db, side_docs, "docs") == 0, "the subscribed table's sidecar kept its foreign key"
    assert fk_count(db, side_theirs, "theirs") == 1, "another owner's sidecar lost its foreign key"


# ---------------------------------------------------------------------------------------------
# 5. key types the replica trigger prints with format('%s') instead of jsonb_build_array
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keytype,values", [
    ("pair", ["(1,a)", "(2,\"b c\")", "(3,d)"]),
    ("mood", ["happy", "sad", "ok"]),
    ("int4range", ["[1,3)", "[5,9)", "empty"]),
    ("dpair", ["(1,a)", "(2,\"b c\")", "(3,d)"]),
    ("int4[]", ["{1,2}", "{3}", "{}"]),
], ids=["composite", "enum", "range", "domain_over_composite", "array"])
def test_replica_mode_writes_with_non_catalog_key_types_stay_in_step(db, keytype, values):
    """Promise (README, Guarantees): writes under session_replication_role = replica (as the apply
    worker's) reach the sidecar: inserts embedded, key changes move the vector, deletes remove it
    (verify: 0 missing, 0 stale, 0 orphans). The replica trigger prints keys of types outside
    pg_catalog with format('%s') (a JSON string), the statement triggers with jsonb_build_array
    (for a composite: a JSON object), and "the drain dedupes the two".
    Attack: tables keyed by a composite, an enum, a range, a domain over a composite, an array;
    local writes first, then replica-mode inserts, updates (text and key), deletes.
    Safe outcome: verify() reports 0 missing, 0 stale, 0 orphans; no dead letters."""
    db.execute("CREATE TYPE pair AS (a int, b text)")
    db.execute("CREATE TYPE mood AS ENUM ('happy', 'sad', 'ok', 'meh')")
    db.execute("CREATE DOMAIN dpair AS pair CHECK ((VALUE).a > 0)")
    db.execute(f"CREATE TABLE kt (id {keytype} PRIMARY KEY, body text)")
    v1, v2, v3 = values
    k = f"%s::text::{keytype}"
    db.execute(f"INSERT INTO kt VALUES ({k}, 'first row about rivers'), ({k}, 'second row about chess')", (v1, v2))
    watch(db, "kt")
    wait(db, "kt")
    local = error_of(db, f"UPDATE kt SET body = body || ' (local edit)' WHERE id = {k}", (v1,))
    wait(db, "kt")
    db.execute("SET session_replication_role = replica")
    try:
        db.execute(f"INSERT INTO kt VALUES ({k}, 'third row about sailing')", (v3,))
        db.execute(f"UPDATE kt SET body = 'second row, rewritten by the apply worker' WHERE id = {k}", (v2,))
        db.execute(f"DELETE FROM kt WHERE id = {k}", (v1,))
    finally:
        db.execute("RESET session_replication_role")
    wait(db, "kt")
    got = db.execute("SELECT missing, stale, orphans FROM embed_sidecar.verify('kt')").fetchone()
    dead = one(db, "SELECT count(*) FROM embed_sidecar.failures f JOIN embed_sidecar.sources s ON s.id = f.source_id "
                   "WHERE s.source = 'kt'::regclass")
    assert got == (0, 0, 0) and dead == 0, f"{keytype} key: verify (missing, stale, orphans) = {got}, dead letters {dead}"
    # (not the replica path, and on main too: the statement trigger's key of a composite or array
    # column is a JSON object / nested array that its own key check cannot read back)
    assert local is None, f"{keytype} key: a plain local UPDATE of the watched table is refused: {local}"


# ---------------------------------------------------------------------------------------------
# 6. PostgreSQL 16+: a non-superuser may own a subscription (pg_create_subscription)
# ---------------------------------------------------------------------------------------------

def test_subscription_of_a_non_superuser_cannot_drop_another_owners_foreign_key(db, make_role, request):
    """Promise: one tenant cannot make another's sidecar lose its foreign key. The event trigger
    embed_sidecar_subscription runs _on_subscription_ddl SECURITY DEFINER (the extension's owner)
    after every CREATE/ALTER SUBSCRIPTION and drops the foreign key of EVERY watched table that
    pg_subscription_rel lists; PostgreSQL adds a local table there by name, without checking that
    the subscription's owner may write it. On PostgreSQL 15 only superusers own subscriptions; the
    extension also builds for 17 and 18, where pg_create_subscription lets an ordinary role
    subscribe to a publication (on a server it controls) that names another owner's table.
    Attack (16+ only): a role with pg_create_subscription subscribes to a publication of a table
    named like the victim's watched table.
    Safe outcome: the victim's sidecar keeps its foreign key."""
    if int(one(db, "SHOW server_version_num")) < 160000:
        pytest.skip("PostgreSQL 15: only superusers own subscriptions (the attack is on paper here; see the docstring)")
    subscription = request.getfixturevalue("subscription")
    publisher = request.getfixturevalue("publisher")
    m = make_role("rv6_subscriber")
    v = make_role("rv6_fk_victim")
    db.execute(f'GRANT pg_create_subscription TO "{m}"')
    db.execute(f'GRANT CREATE ON DATABASE pes_test TO "{m}"')
    pub, _ = subscription({"docs": "id int PRIMARY KEY, body text"})
    db.execute(f'ALTER TABLE docs OWNER TO "{v}"')
    side = watch(db, "docs")
    assert fk_count(db, side, "docs") == 1
    name = "rv6_m_" + uuid.uuid4().hex[:6]
    # 16+ lets a non-superuser subscribe only over a connection that asks for a password: the
    # attacker's server (here the publisher) has a role that logs in with one
    pub.execute("DROP ROLE IF EXISTS rv6_pw")
    pub.execute("CREATE ROLE rv6_pw LOGIN REPLICATION PASSWORD 'rv6'")
    hba = os.path.join(publisher.data, "pg_hba.conf")
    with open(hba) as f:
        rules = f.read()
    with open(hba, "w") as f:
        f.write("local all rv6_pw scram-sha-256\n" + rules)
    pub.execute("SELECT pg_reload_conf()")
    with connect_as(m, db.schema) as c:
        pubname = one(pub, "SELECT pubname FROM pg_publication LIMIT 1")
        c.execute(f"CREATE SUBSCRIPTION {name} CONNECTION 'host=/tmp port={publisher.port} "
                  f"user=rv6_pw dbname=postgres password=rv6' PUBLICATION {pubname} WITH (enabled = false)")
    try:
        # the attack got as far as it can: the subscription lists the victim's table
        assert one(db, "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid "
                       "WHERE s.subname = %s AND r.srrelid = 'docs'::regclass", (name,)) == 1
        assert fk_count(db, side, "docs") == 1, "a non-superuser's subscription made the victim's sidecar lose its foreign key"
    finally:
        db.execute(f"ALTER SUBSCRIPTION {name} SET (slot_name = NONE)")
        db.execute(f"DROP SUBSCRIPTION {name}")


# ---------------------------------------------------------------------------------------------
# 7. a sidecar is a table like any other to a subscription
# ---------------------------------------------------------------------------------------------

def test_a_for_all_tables_publication_cannot_write_the_sidecar(db, publisher):
    """Promise (README, Whose rights): "Nobody but the owner — that is, the drain — writes" the
    sidecar; search never mixes models. An embedding replica subscribes to a publisher that has
    no extension (a managed primary); `FOR ALL TABLES` is the usual publication there, and the
    subscriber matches published tables by name.
    Attack: a role on the publisher that may create a table in the schema creates one named
    like the subscriber's sidecar (its name is predictable: <table>_embeddings_<id>) with the key,
    an `embedding` as text, a `model` and a `content_hash`, holding a vector for row 2 (whose text
    is blank on the subscriber, so the drain made none); the administrator subscribes FOR ALL
    TABLES.
    Safe outcome: the sidecar never holds the publisher's planted vector (the subscription is
    refused, or the sidecar is left out, or the drain removes it)."""
    pub = publisher.connect()
    pub.execute(f'CREATE SCHEMA "{db.schema}"')
    pub.execute(f'SET search_path = "{db.schema}"')
    name = "rv6a_" + uuid.uuid4().hex[:8]
    subscribed = False
    try:
        for c in (pub, db):
            c.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        pub.execute("INSERT INTO docs VALUES (1, 'rivers in winter'), (2, '')")
        side = watch(db, "docs").split(".")[-1].strip('"')
        model = one(db, "SELECT model_id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
        planted = "[" + ",".join(["0.051"] * 384) + "]"
        pub.execute(f'CREATE TABLE "{side}" (id int PRIMARY KEY, embedding text, model text, content_hash bytea)')
        pub.execute(f'INSERT INTO "{side}" VALUES (2, %s, %s, %s)', (planted, model, b"planted"))
        pub.execute(f"CREATE PUBLICATION {name} FOR ALL TABLES")
        e = error_of(db, f"CREATE SUBSCRIPTION {name} CONNECTION '{publisher.dsn()}' PUBLICATION {name}")
        subscribed = e is None
        if subscribed:
            # until both tables' initial copy is done (or the planted row is there)
            wait_until(lambda: synced(db, ["docs", f'"{side}"'])
                       or one(db, f'SELECT count(*) FROM "{side}" WHERE id = 2') > 0, 240)
            wait(db, "docs")
            time.sleep(3)
        got = db.execute(f'SELECT id, content_hash FROM "{side}" WHERE content_hash = %s', (b"planted",)).fetchall()
        found = [k for (k,) in db.execute("SELECT key FROM embed_sidecar.search('docs', 'rivers in winter', 5)").fetchall()] \
            if got else []
        assert not got, (f"the publisher wrote a vector into the subscriber's sidecar {side} (rows {got}, model {model}; "
                         f"search('docs') now returns {found}, row 2's text being blank): "
                         "the apply worker (a superuser) bypasses 'only the drain writes the sidecar'")
    finally:
        if subscribed:
            db.execute(f"ALTER SUBSCRIPTION {name} DISABLE")
            db.execute(f"DROP SUBSCRIPTION {name}")
        pub.execute(f"DROP PUBLICATION IF EXISTS {name}")
        pub.execute(f'DROP SCHEMA "{db.schema}" CASCADE')
        pub.close()


def test_owner_code_in_the_replica_trigger_leaves_no_session_advisory_lock(db, make_role):
    """Promise (README, Whose rights): a session-level advisory lock that the owner's code takes is
    released afterwards (the worker, process()); the owner's code never leaves state in the
    session that ran it. The replica trigger runs the owner's key check in the apply worker's
    (a superuser's) session.
    Attack: the owner's key domain check takes a session advisory lock when it runs inside a
    trigger; a superuser inserts in replica mode.
    Safe outcome: the superuser's session holds no advisory lock afterwards."""
    o = make_role("rv6_lock_owner")
    oc = connect_as(o, db.schema)
    try:
        oc.execute("""CREATE FUNCTION grab(v text) RETURNS boolean LANGUAGE plpgsql AS $$
                      BEGIN
                        IF pg_catalog.pg_trigger_depth() >= 1 THEN PERFORM pg_catalog.pg_advisory_lock(6, 6); END IF;
                        RETURN true;
                      END $$""")
        oc.execute(f"""CREATE DOMAIN lkey AS text CHECK ("{db.schema}".grab(VALUE))""")
        oc.execute("CREATE TABLE ldocs (id lkey PRIMARY KEY, body text)")
    finally:
        oc.close()
    watch(db, "ldocs")
    db.execute("SET session_replication_role = replica")
    try:
        db.execute("INSERT INTO ldocs VALUES ('a', 'replicated text a')")
    finally:
        db.execute("RESET session_replication_role")
    held = one(db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
    db.execute("SELECT pg_advisory_unlock_all()")
    assert held == 0, ("the owner's key check left a session advisory lock in the apply worker's session "
                       "(held until that superuser session ends)")
