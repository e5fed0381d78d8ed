"""Attacks of a seventh reviewer who did not write the code, on the logical replication support
(sql/replica.sql, src/replica.rs: the ENABLE REPLICA row trigger, the ALWAYS TRUNCATE trigger, the
CREATE/ALTER SUBSCRIPTION event trigger, status.replication_lag) and sharded search
(sql/shards.sql), after review 6's fixes (tests/security/test_review6_attacks.py; none of its
attacks is repeated as is here: these are variations and new routes).

Each test is one attack; it PASSES when the promise holds and FAILS when the attack works.
Attacks marked "replica mode" run in the test cluster under `session_replication_role = replica`
as a superuser, which the README ("An embedding replica") says is captured exactly as the apply
worker's writes are. The tests that need real logical replication start a throwaway publisher
cluster (no extension) on $PES_PUBLISHER_PORT (default 5462, data in $PES_PUBLISHER_DATA,
default /var/lib/pg_wt_review7_pub) and subscribe the test database to it."""
import os
import uuid

import psycopg
import pytest

from conftest import connect_as, error_of, one, wait, wait_until, watch



def source_id(conn, table):
    return one(conn, "SELECT id FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'current'", (table,))


def queued(conn, sid):
    """Messages on a source's live queue, read straight from pgmq's table (as the superuser)."""
    return one(conn, f"SELECT count(*) FROM pgmq.q_embed_sidecar_{sid}")


def failures(conn, sid):
    return one(conn, "SELECT count(*) FROM embed_sidecar.failures WHERE source_id = %s", (sid,))


def verify(conn, table):
    return conn.execute("SELECT missing, stale, orphans FROM embed_sidecar.verify(%s::regclass)", (table,)).fetchone()


# ---------------------------------------------------------------------------------------------
# 1. the apply worker must never be stopped by our triggers: errors WHEN OTHERS does not catch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["assert", "query_canceled"])
def test_owner_key_check_that_raises_past_when_others_does_not_abort_a_replicated_insert(db, make_role, how):
    """Promise (README, An embedding replica): "A replicated row is never refused: the apply worker
    would stop on the error and retry the same change for ever"; a key refused by its key type
    when checked as the table's owner is applied without a vector, with a WARNING, and
    dead-lettered. The check runs in _invalid_keys, which turns an error into a reason with
    `EXCEPTION WHEN OTHERS` -- and PL/pgSQL's OTHERS does not catch assert_failure (P0004) nor
    query_canceled (57014).
    Attack: the subscriber-side owner's key type is a domain whose CHECK function, only when run
    inside a trigger (our key check: PostgreSQL's own domain check at apply time runs at depth 0
    and passes) and only for the value 'poison' (publisher data), raises with ASSERT, or RAISEs
    SQLSTATE 57014. A superuser in replica mode (what the apply worker is) inserts 'fine' and
    'poison'.
    Safe outcome: both INSERTs succeed (the poison row may go without a vector and be dead-lettered)."""
    o = make_role(f"rv7_{how}_owner")
    body = ("ASSERT pg_catalog.pg_trigger_depth() = 0 OR v <> 'poison', 'the owner''s assertion'"
            if how == "assert" else
            "IF pg_catalog.pg_trigger_depth() > 0 AND v = 'poison' THEN "
            "RAISE EXCEPTION 'the owner''s cancel' USING ERRCODE = 'query_canceled'; END IF")
    with connect_as(o, db.schema) as oc:
        oc.execute(f"CREATE FUNCTION okv(v text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN {body}; RETURN true; END $$")
        oc.execute(f'CREATE DOMAIN akey AS text CHECK ("{db.schema}".okv(VALUE))')
        oc.execute("CREATE TABLE adocs (id akey PRIMARY KEY, body text)")
    watch(db, "adocs")
    db.execute("SET session_replication_role = replica")
    try:
        fine = error_of(db, "INSERT INTO adocs VALUES ('fine', 'a fine replicated row')")
        poison = error_of(db, "INSERT INTO adocs VALUES ('poison', 'a replicated row the owner''s code refuses in our check')")
    finally:
        db.execute("RESET session_replication_role")
    assert fine is None, f"control: a plain replicated insert failed: {fine}"
    assert poison is None, (f"our replica trigger raised ({poison}) on a row PostgreSQL itself accepts: in the apply worker this "
                            "aborts the transaction and the subscription retries the same change for ever, every table stopped")


# ---------------------------------------------------------------------------------------------
# 2. replica mode (where only our ENABLE REPLICA trigger captures writes) is the superuser's
# ---------------------------------------------------------------------------------------------

def test_a_table_owner_cannot_enter_replica_mode_to_skip_the_statement_triggers(db, make_role):
    """Promise (DESIGN invariant 6; README Whose rights): owning a table gives no more power than
    owning it; writes under session_replication_role = replica are captured by the replica
    trigger. An owner in replica mode would bypass the statement triggers and every other
    table's ordinary triggers and foreign keys.
    Attack: a table owner tries SET, SET LOCAL, a function's SET clause, ALTER ROLE ... SET,
    and set_config() for session_replication_role.
    Safe outcome: every attempt is refused (42501) and the session stays in origin mode."""
    o = make_role("rv7_srr_owner")
    got = {}
    with connect_as(o, db.schema) as c:
        got["set"] = error_of(c, "SET session_replication_role = replica")
        got["set_config"] = error_of(c, "SELECT set_config('session_replication_role', 'replica', false)")
        got["function"] = error_of(c, "CREATE FUNCTION srr() RETURNS int LANGUAGE sql SET session_replication_role = replica "
                                      "AS 'SELECT 1'")
        got["alter_role"] = error_of(c, f'ALTER ROLE "{o}" SET session_replication_role = replica')
        c.execute("BEGIN")
        got["set_local"] = error_of(c, "SET LOCAL session_replication_role = replica")
        c.execute("ROLLBACK")
    with connect_as(o, db.schema) as c:
        mode = one(c, "SHOW session_replication_role")
    bad = {k: v for k, v in got.items() if v is None or v[0] != "42501"}
    assert not bad and mode == "origin", f"an owner reached replica mode: {bad}, mode {mode}"


# ---------------------------------------------------------------------------------------------
# 3. DDL on a watched table, then replicated rows
# ---------------------------------------------------------------------------------------------

def test_replica_insert_after_the_key_column_is_dropped_and_re_added_does_not_raise(db, make_role):
    """Promise: our replica trigger never raises inside the apply worker because of anything the
    subscriber-side owner does through our code.
    Attack: the owner drops the key column (CASCADE: the sidecar loses its foreign key) and adds a
    column of the same name as the new primary key, so PostgreSQL's apply (columns by name) still
    works, while the registry's key attnum now names a dropped column. A superuser inserts in
    replica mode.
    Safe outcome: the replica-mode INSERT succeeds (a WARNING and a dead letter are allowed)."""
    o = make_role("rv7_keydrop_owner")
    with connect_as(o, db.schema) as oc:
        oc.execute("CREATE TABLE kdocs (id int PRIMARY KEY, body text)")
    watch(db, "kdocs")
    with connect_as(o, db.schema) as oc:
        oc.execute("ALTER TABLE kdocs DROP COLUMN id CASCADE")
        oc.execute("ALTER TABLE kdocs ADD COLUMN id int PRIMARY KEY")
    db.execute("SET session_replication_role = replica")
    try:
        e = error_of(db, "INSERT INTO kdocs (id, body) VALUES (1, 'replicated after the key column moved')")
    finally:
        db.execute("RESET session_replication_role")
    assert e is None, f"the replica trigger raised after the owner's DDL: {e} (the apply worker would retry for ever)"


def test_replica_mode_changes_after_renaming_table_and_key_column_stay_in_step(db):
    """Promise (README Guarantees): writes in replica mode reach the sidecar; a renamed key column
    keeps draining. The replica trigger's arguments were fixed at watch() (key attnums).
    Attack: rename the table, its key column and its content column; then, in replica mode,
    insert, change text, change a key, delete.
    Safe outcome: verify() reports 0 missing, 0 stale, 0 orphans; no dead letters."""
    db.execute("CREATE TABLE rdocs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO rdocs VALUES (1, 'first row about rivers'), (2, 'second row about chess')")
    watch(db, "rdocs")
    wait(db, "rdocs")
    sid = source_id(db, "rdocs")
    db.execute("ALTER TABLE rdocs RENAME TO rdocs2")
    db.execute("ALTER TABLE rdocs2 RENAME COLUMN id TO ident")
    db.execute("ALTER TABLE rdocs2 RENAME COLUMN body TO txt")
    db.execute("SET session_replication_role = replica")
    try:
        db.execute("INSERT INTO rdocs2 VALUES (3, 'third row about sailing')")
        db.execute("UPDATE rdocs2 SET txt = 'second row, rewritten' WHERE ident = 2")
        db.execute("UPDATE rdocs2 SET ident = 10 WHERE ident = 1")
        db.execute("DELETE FROM rdocs2 WHERE ident = 3")
    finally:
        db.execute("RESET session_replication_role")
    wait(db, "rdocs2")
    got = verify(db, "rdocs2")
    assert got == (0, 0, 0) and failures(db, sid) == 0, f"verify (missing, stale, orphans) = {got}, dead letters {failures(db, sid)}"


@pytest.mark.parametrize("keytype,values", [
    ("float8", ["NaN", "Infinity", "-0", "1e-300"]),
    ("numeric", ["NaN", "1.000", "-1e-40", "123456789012345678901234567890.5"]),
    ("timestamp", ["infinity", "-infinity", "2026-01-01 00:00:00.000001", "epoch"]),
    ("bytea", ["\\x00", "\\xdeadbeef", "", "\\x5c22"]),
    ('"char"', ["a", "", "\"", "\\"]),
    ("text", ["a\"b", "back\\slash", "\u00e9\u6f22\U0001f600", "  padded  "]),
    ("interval", ["1 day", "-1 mon 2 days", "00:00:00.000001", "1000 years"]),
    ("money", ["$1.00", "-$0.01", "$0.00", "$92233720368547758.07"]),
], ids=["float8", "numeric", "timestamp", "bytea", "char", "text", "interval", "money"])
def test_replica_mode_odd_scalar_keys_stay_in_step(db, keytype, values):
    """Promise (README): writes in replica mode (the apply worker's) reach the sidecar; keys of any
    type work; after wait() verify() reports 0 missing, 0 stale, 0 orphans. A pg_catalog scalar
    key goes through jsonb_build_array as is (a number stays a JSON number) and is read back with
    (j->>i)::type by the drain.
    Attack: keys at the edges of their types (NaN, infinities, -0, tiny and huge numerics, empty
    bytea and "char", quotes and backslashes, astral characters, money) inserted, re-texted,
    re-keyed and deleted in replica mode.
    Safe outcome: verify() 0/0/0 and no dead letters."""
    db.execute(f"CREATE TABLE kt (id {keytype} PRIMARY KEY, body text)")
    watch(db, "kt")
    sid = source_id(db, "kt")
    v1, v2, v3, v4 = values
    k = f"%s::{keytype}"
    db.execute("SET session_replication_role = replica")
    try:
        for i, v in enumerate((v1, v2, v3)):
            db.execute(f"INSERT INTO kt VALUES ({k}, %s)", (v, f"replicated row {i} about rivers and chess"))
        db.execute(f"UPDATE kt SET body = 'rewritten by the apply worker' WHERE id = {k}", (v2,))
        db.execute(f"UPDATE kt SET id = {k} WHERE id = {k}", (v4, v3))
        db.execute(f"DELETE FROM kt WHERE id = {k}", (v1,))
    finally:
        db.execute("RESET session_replication_role")
    wait(db, "kt")
    got = verify(db, "kt")
    dead = db.execute("SELECT key, error FROM embed_sidecar.failures WHERE source_id = %s", (sid,)).fetchall()
    assert got == (0, 0, 0) and not dead, f"{keytype} keys: verify (missing, stale, orphans) = {got}, dead letters {dead}"


@pytest.mark.parametrize("generated", ["content", "key"])
def test_replica_mode_generated_columns_stay_in_step(db, generated):
    """Promise (README): replicated INSERT/UPDATE/DELETE reach the sidecar (verify 0/0/0). The
    apply worker does not send generated columns: the subscriber computes them.
    Attack: the watched content (or the primary key) is a STORED generated column; in replica
    mode rows are inserted, their base columns changed (which changes the generated text or key),
    and deleted.
    Safe outcome: verify() 0/0/0, no dead letters."""
    if generated == "content":
        db.execute("CREATE TABLE gdocs (id int PRIMARY KEY, title text, txt text, "
                   "body text GENERATED ALWAYS AS (title || ': ' || txt) STORED)")
        ins = "INSERT INTO gdocs (id, title, txt) VALUES (%s, %s, 'about rivers')"
        upd, rekey = "UPDATE gdocs SET txt = 'about chess' WHERE id = 2", "UPDATE gdocs SET id = 30 WHERE id = 3"
    else:
        e = error_of(db, "CREATE TABLE gdocs (n int, title text, body text, "
                         "id int GENERATED ALWAYS AS (n * 10) STORED PRIMARY KEY)")
        if e is not None:
            pytest.skip(f"PostgreSQL refuses a generated primary key: {e}")
        ins = "INSERT INTO gdocs (n, title, body) VALUES (%s, %s, 'about rivers')"
        upd, rekey = "UPDATE gdocs SET body = 'about chess' WHERE n = 2", "UPDATE gdocs SET n = 7 WHERE n = 3"
    watch(db, "gdocs")
    sid = source_id(db, "gdocs")
    db.execute("SET session_replication_role = replica")
    try:
        for i in (1, 2, 3, 4):
            db.execute(ins, (i, f"title {i}"))
        db.execute(upd)
        db.execute(rekey)
        db.execute("DELETE FROM gdocs WHERE id = 10 OR id = 1")
    finally:
        db.execute("RESET session_replication_role")
    wait(db, "gdocs")
    got = verify(db, "gdocs")
    assert got == (0, 0, 0) and failures(db, sid) == 0, f"verify (missing, stale, orphans) = {got}, dead letters {failures(db, sid)}"


def test_replica_mode_changes_of_a_chunked_embedding_stay_in_step(db):
    """Promise (README): a chunked embedding is in step after wait() (every passage, no orphans);
    replicated changes reach the sidecar, key changes included.
    Attack: a chunked watched table; in replica mode insert long rows, rewrite one, change a key,
    blank one, delete one.
    Safe outcome: verify() 0/0/0, no dead letters."""
    db.execute("CREATE TABLE cdocs (id int PRIMARY KEY, body text)")
    watch(db, "cdocs", chunking=True, chunk_tokens=32, chunk_overlap=4)
    sid = source_id(db, "cdocs")
    para = "Rivers freeze in winter and thaw in spring; the ice breaks with a sound like thunder. "
    db.execute("SET session_replication_role = replica")
    try:
        for i in range(1, 6):
            db.execute("INSERT INTO cdocs VALUES (%s, %s)", (i, para * (3 + i)))
        db.execute("UPDATE cdocs SET body = %s WHERE id = 2", ("Chess engines search game trees. " * 12,))
        db.execute("UPDATE cdocs SET id = 30 WHERE id = 3")
        db.execute("UPDATE cdocs SET body = '' WHERE id = 4")
        db.execute("DELETE FROM cdocs WHERE id = 5")
    finally:
        db.execute("RESET session_replication_role")
    wait(db, "cdocs")
    got = verify(db, "cdocs")
    assert got == (0, 0, 0) and failures(db, sid) == 0, f"verify (missing, stale, orphans) = {got}, dead letters {failures(db, sid)}"


def test_retry_failed_does_not_hide_a_replicated_row_that_has_no_vector(db):
    """Promise (README Guarantees): after wait(), every row with non-blank content has its vector
    "except dead-lettered rows (status.failed)"; a replicated row whose key cannot be queued is
    kept in failures (status.failed) and "retry_failed() cannot embed it (discard_failed() clears
    it)".
    Attack: a replicated (replica-mode) row with a composite key over 2,000 bytes as JSON is
    dead-lettered; the owner does what one does with dead letters: retry_failed(), then wait().
    Safe outcome: every row verify() counts missing is still a dead letter (status.failed equals
    verify's missing): the failure is not silently turned into a row without a vector while
    status says nothing failed."""
    db.execute("CREATE TABLE ck (a text, b int, body text, PRIMARY KEY (a, b))")
    watch(db, "ck")
    db.execute("SET session_replication_role = replica")
    try:
        db.execute("INSERT INTO ck VALUES (repeat('x', 3000), 1, 'a replicated row with a long key')")
        db.execute("INSERT INTO ck SELECT 'k' || i, i, 'normal replicated row ' || i FROM generate_series(1, 5) i")
    finally:
        db.execute("RESET session_replication_role")
    wait(db, "ck")
    before = (verify(db, "ck")[0], one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'ck'::regclass"))
    assert before == (1, 1), f"control: (missing, failed) = {before}"
    db.execute("SELECT embed_sidecar.retry_failed('ck')")
    wait(db, "ck")
    missing = verify(db, "ck")[0]
    failed = one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'ck'::regclass")
    assert missing == failed, (f"after retry_failed() and wait(): {missing} row(s) without a vector, status.failed = {failed}: "
                               "the row is neither embedded nor dead-lettered, and nothing says so")


# ---------------------------------------------------------------------------------------------
# 4. the PUBLIC entry points of the replica path, called directly
# ---------------------------------------------------------------------------------------------

def test_a_writer_cannot_forge_dead_letters_through_enqueue_replicated(db, make_role):
    """Promise (README): a key is kept in embed_sidecar.failures "as unqueued_key" only for a row
    written in replica mode whose key cannot be queued (status.failed counts real failures);
    _enqueue_replicated is PUBLIC because the replica trigger runs as the writer.
    Attack: a role with INSERT on another owner's table (no replica mode, no row written) calls
    _enqueue_replicated directly with 300 keys that are not the table's.
    Safe outcome: the call is refused (as _enqueue_applied refuses bad keys), or no dead letter
    appears: a writer cannot fill the owner's dead-letter table (status.failed, WARNINGs) with
    failures of rows that never existed."""
    w = make_role("rv7_forger")
    db.execute("CREATE TABLE fdocs (id int PRIMARY KEY, body text)")
    watch(db, "fdocs")
    sid = source_id(db, "fdocs")
    db.execute(f'GRANT INSERT ON fdocs TO "{w}"')
    before = failures(db, sid)
    with connect_as(w, db.schema) as c:
        e = error_of(c, "SELECT embed_sidecar._enqueue_replicated(%s, %s::text[])",
                     (sid, [f'["not a key {i}"]' for i in range(300)]))
    after = failures(db, sid)
    failed = one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'fdocs'::regclass")
    assert e is not None or after == before, (
        f"a writer outside replica mode planted {after - before} dead letters on the owner's table "
        f"(status.failed = {failed}), each claiming 'a row written in replica mode'")


def test_replica_entry_points_refuse_forged_source_ids(db, make_role):
    """Promise: one owner can never manage or break another owner's watched table; the PUBLIC
    replica entry points check the writer may write the table the source id names.
    Attack: owner A (who owns and may write her own watched table) passes tenant B's source id,
    a NULL id and an id that does not exist to _enqueue_replicated, _enqueue_applied and
    _enqueue_orphans.
    Safe outcome: B's id is refused with 42501; nothing is queued on B's queue and no dead letter
    is written for B."""
    a = make_role("rv7_tenant_a")
    b = make_role("rv7_tenant_b")
    with connect_as(a, db.schema) as c:
        c.execute("CREATE TABLE amine (id int PRIMARY KEY, body text)")
    with connect_as(b, db.schema) as c:
        c.execute("CREATE TABLE btheirs (id int PRIMARY KEY, body text)")
        c.execute("INSERT INTO btheirs VALUES (1, 'tenant b text')")
    watch(db, "amine")
    watch(db, "btheirs")
    wait(db, "btheirs")
    bid = source_id(db, "btheirs")
    db.execute("SELECT embed_sidecar.pause('btheirs')")
    qb, fb = queued(db, bid), failures(db, bid)
    errs = {}
    with connect_as(a, db.schema) as c:
        errs["replicated"] = error_of(c, "SELECT embed_sidecar._enqueue_replicated(%s, ARRAY['[1]', '[\"x\"]'])", (bid,))
        errs["applied"] = error_of(c, "SELECT embed_sidecar._enqueue_applied(%s, ARRAY['[1]'])", (bid,))
        errs["orphans"] = error_of(c, "SELECT embed_sidecar._enqueue_orphans(%s)", (bid,))
        for fn in ("_enqueue_replicated", "_enqueue_applied"):
            for forged in (None, 2147483647, -1):
                error_of(c, f"SELECT embed_sidecar.{fn}(%s, ARRAY['[1]'])", (forged,))
    after = (queued(db, bid), failures(db, bid))
    db.execute("SELECT embed_sidecar.resume('btheirs')")
    bad = {k: v for k, v in errs.items() if v is None or v[0] != "42501"}
    assert not bad, f"tenant A acted on tenant B's source: {bad}"
    assert after == (qb, fb), f"B's queue/dead letters changed: {(qb, fb)} -> {after}"


# ---------------------------------------------------------------------------------------------
# 5. search_shards / hybrid_search_shards
# ---------------------------------------------------------------------------------------------

def make_docs(db, n=6):
    """A watched table of n rows, in step; returns its sidecar and `good`, a plain table shaped as
    a node's foreign table (id, embedding, model, fts) holding the same vectors."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'rivers in winter, part ' || i FROM generate_series(1, %s) i", (n,))
    side = watch(db, "docs")
    wait(db, "docs")
    db.execute(f"CREATE TABLE good AS SELECT id, embedding, model, fts FROM {side}")
    return side


@pytest.mark.parametrize("column", ["_pes_distance", "shard"])
def test_shard_with_a_key_column_named_like_the_merge_columns_is_never_a_silent_wrong_answer(db, column):
    """Promise (README, Sharded embedding work): search_shards returns the k nearest over every
    node, or an error, or rows marked complete = false: never a silent short or wrong list.
    Every column of a shard but embedding, model and fts is its key.
    Attack: a node's foreign table whose key column is named like the columns _fan_out adds
    itself (`shard`, `_pes_distance`), next to a normal shard; partial false and true.
    Safe outcome: an error, or rows all marked complete = false, or the right answer: keys 1..6
    from the hostile shard (as from the normal one), none lost and none renamed."""
    side = make_docs(db)
    db.execute(f'CREATE TABLE hostile AS SELECT id AS "{column}", embedding, model FROM {side}')
    db.execute("ALTER TABLE good DROP COLUMN fts")
    for partial in (False, True):
        try:
            rows = db.execute("SELECT shard, key, complete FROM embed_sidecar.search_shards(ARRAY['good', 'hostile']::regclass[], "
                              "'rivers in winter', 12, partial => %s)", (partial,)).fetchall()
        except psycopg.Error:
            continue
        if any(r[2] is False for r in rows):
            continue
        hostile = sorted(r[1][0] for r in rows if r[0].endswith(".hostile"))
        assert len(rows) == 12 and hostile == [1, 2, 3, 4, 5, 6], (
            f"partial={partial}: a complete answer that is wrong: {rows}")


def test_a_shard_that_fails_midway_is_named_not_dropped(db):
    """Promise: a node that does not answer is an error, or with partial => true is left out with
    a WARNING and every row says complete = false: never a silent short list.
    Attack: a shard that errors while it is read (division by zero in a view over a sidecar, as a
    hostile or broken node's query would), with partial false and true.
    Safe outcome: partial false: an error; partial true: rows from the other shard, all marked
    complete = false."""
    side = make_docs(db)
    db.execute(f"CREATE VIEW broken AS SELECT id, embedding, model, fts FROM {side} WHERE 1 / (id - id) = 0")
    e = error_of(db, "SELECT * FROM embed_sidecar.search_shards(ARRAY['good', 'broken']::regclass[], 'rivers', 5)")
    assert e is not None, "a failing shard was silently left out"
    rows = db.execute("SELECT complete FROM embed_sidecar.search_shards(ARRAY['good', 'broken']::regclass[], 'rivers', 5, "
                      "partial => true)").fetchall()
    assert rows and all(c is False for (c,) in rows), f"partial answer not marked incomplete: {rows}"


def test_a_shard_claiming_no_model_is_refused(db):
    """Promise: a node whose rows were made by another model than the query's is an error (55000),
    never compared (a search never mixes models).
    Attack: a node returns rows whose model is NULL, or the model's name without its file hash.
    Safe outcome: 55000 for each, in search_shards and hybrid_search_shards."""
    side = make_docs(db)
    db.execute(f"CREATE TABLE nullmodel AS SELECT id, embedding, NULL::text AS model, fts FROM {side}")
    db.execute(f"CREATE TABLE namemodel AS SELECT id, embedding, split_part(model, '@', 1) || 'x' AS model, fts FROM {side}")
    for shard in ("nullmodel", "namemodel"):
        for fn in ("search_shards(ARRAY[%s, %s]::regclass[], 'rivers', 5)",
                   "hybrid_search_shards(ARRAY[%s, %s]::regclass[], 'rivers', 5, 10)"):
            e = error_of(db, f"SELECT * FROM embed_sidecar.{fn}", ("good", shard))
            assert e is not None and e[0] == "55000", f"{shard} via {fn.split('(')[0]}: {e}"


def test_shard_and_column_names_are_never_spliced(db):
    """Promise (DESIGN invariant 4): nothing the user types is spliced into SQL.
    Attack: a shard whose relation name and key column name carry SQL (quotes, a DROP TABLE);
    search_shards and hybrid_search_shards over it.
    Safe outcome: the searches answer (the hostile shard's keys come back) and the victim table
    still exists."""
    side = make_docs(db)
    db.execute("CREATE TABLE victim (x int)")
    evil = "x'); DROP TABLE victim; --"
    col = 'id"); DROP TABLE victim; --'
    db.execute(f'CREATE TABLE "{evil}" AS SELECT id AS "{col.replace(chr(34), chr(34) * 2)}", embedding, model, fts FROM {side}')
    rel = one(db, "SELECT %s::regclass::text", (f'"{evil}"',))
    n = len(db.execute("SELECT * FROM embed_sidecar.search_shards(ARRAY[%s]::regclass[], 'rivers', 3)", (rel,)).fetchall())
    m = len(db.execute("SELECT * FROM embed_sidecar.hybrid_search_shards(ARRAY[%s]::regclass[], 'rivers', 3, 10)",
                       (rel,)).fetchall())
    assert n == 3 and m == 3
    assert one(db, "SELECT to_regclass('victim') IS NOT NULL"), "a shard's name was spliced into SQL"


def test_search_helpers_are_refused_inside_a_security_restricted_operation(db):
    """Promise (README Whose rights): nothing inside a security-restricted operation may call the
    search functions (42501); review 6 made search_shards and hybrid_search_shards refuse.
    search_shards is only a wrapper: its PUBLIC helpers _embed_query and _fan_out do the search.
    Attack: a materialized view that searches the nodes by calling the helpers directly
    (_fan_out over _shard_nearest_sql, with the query embedded by _embed_query), refreshed.
    Safe outcome: the REFRESH fails with 42501."""
    side = make_docs(db)
    model = one(db, "SELECT model FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    mid = one(db, "SELECT model_id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    db.execute(f"""CREATE MATERIALIZED VIEW mv AS
                   SELECT (embed_sidecar._fan_out(ARRAY['{side}']::regclass[],
                                                  ARRAY[embed_sidecar._shard_nearest_sql('{side}'::regclass, 3)], false,
                                                  embed_sidecar._embed_query('{model}', '{mid}', 'rivers'), NULL,
                                                  '{mid}')).hits WITH NO DATA""")
    e = error_of(db, "REFRESH MATERIALIZED VIEW mv")
    got = one(db, "SELECT jsonb_array_length(hits) FROM mv") if e is None else None
    assert e is not None and e[0] == "42501" and "security-restricted" in e[1], (
        f"a search ran inside REFRESH MATERIALIZED VIEW through search_shards' PUBLIC helpers ({got} rows): {e}")


# ---------------------------------------------------------------------------------------------
# 6. real logical replication: a publisher cluster without the extension
# ---------------------------------------------------------------------------------------------

class Pub:
    """The publisher side of one test: its schema (named as the test's), publications and
    subscriptions made through it are dropped at the end."""

    def __init__(self, db, publisher):
        self.db, self.node = db, publisher
        self.conn = publisher.connect()
        self.conn.execute(f'CREATE SCHEMA "{db.schema}"')
        self.conn.execute(f'SET search_path = "{db.schema}"')
        self.name = "rv7_" + uuid.uuid4().hex[:8]
        self.pubs, self.subs, self.extra = [], [], []

    def execute(self, sql, params=None):
        return self.conn.execute(sql, params)

    def both(self, sql):
        self.conn.execute(sql)
        self.db.execute(sql)

    def publication(self, suffix, what):
        name = f"{self.name}_{suffix}"
        self.conn.execute(f"CREATE PUBLICATION {name} {what}")
        self.pubs.append(name)
        return name

    def subscribe(self, *pubs):
        """CREATE SUBSCRIPTION; returns the error (SQLSTATE, message, hint) or None."""
        e = error_of(self.db, f"CREATE SUBSCRIPTION {self.name} CONNECTION '{self.node.dsn()}' PUBLICATION {', '.join(pubs)}")
        if e is None:
            self.subs.append(self.name)
        else:
            # a refused CREATE SUBSCRIPTION may leave its slot on the publisher (README)
            self.conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                              (self.name,))
        return e

    def close(self):
        for sub in self.subs:
            try:
                self.db.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
            except psycopg.Error:
                pass
            self.db.execute(f"DROP SUBSCRIPTION IF EXISTS {sub}")
        for p in self.pubs:
            self.conn.execute(f"DROP PUBLICATION IF EXISTS {p}")
        self.conn.execute(f'DROP SCHEMA "{self.db.schema}" CASCADE')
        for s in self.extra:
            self.conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        self.conn.close()


@pytest.fixture
def pub(db, publisher):
    p = Pub(db, publisher)
    yield p
    p.close()


def synced(db, rels):
    return one(db, "SELECT count(*) = %s FROM pg_subscription_rel WHERE srrelid = ANY(%s::regclass[]) AND srsubstate = 'r'",
               (len(rels), rels))


def test_a_publication_cannot_write_the_extensions_queue(db, pub):
    """Promise (README, An embedding replica): "A subscription never writes a sidecar"; review 6
    refused subscriptions that would copy into a sidecar because "a FOR ALL TABLES publication
    matches every table by name, and a sidecar's name is predictable". The extension's own
    tables are just as predictable: pgmq.q_embed_sidecar_<id> (the live lane of a source),
    embed_sidecar.failures, embed_sidecar.sources. After wait(), the sidecar is in step; no
    message is lost (DESIGN invariants 1, 2).
    Attack: a role on the publisher that may create a schema makes pgmq.q_embed_sidecar_<id>
    there (id of the subscriber's watched docs); the administrator subscribes to a FOR ALL
    TABLES publication. Rows replicated into docs are queued on the subscriber (the source is
    paused, so they wait); then the publisher TRUNCATEs its own pgmq.q_embed_sidecar_<id>.
    Safe outcome: the subscription is refused, or it never touches the queue: after resume and
    wait(), verify() reports 0 missing, 0 stale, 0 orphans."""
    for sql in ("CREATE TABLE docs (id int PRIMARY KEY, body text)", "CREATE TABLE marker (id int PRIMARY KEY)"):
        pub.both(sql)
    watch(db, "docs")
    sid = source_id(db, "docs")
    queue = f"pgmq.q_embed_sidecar_{sid}"
    pub.execute("CREATE SCHEMA IF NOT EXISTS pgmq")
    pub.extra.append("pgmq")
    pub.execute(f"CREATE TABLE {queue} (msg_id bigint PRIMARY KEY, vt timestamptz, message jsonb)")
    name = pub.publication("all", "FOR ALL TABLES")
    db.execute("SELECT embed_sidecar.pause('docs')")
    try:
        e = pub.subscribe(name)
        if e is None:
            assert wait_until(lambda: synced(db, [f'"{db.schema}".docs', f'"{db.schema}".marker', queue]), 180), \
                "the initial copy did not finish"
            pub.execute("INSERT INTO docs SELECT i, 'replicated text about rivers ' || i FROM generate_series(1, 20) i")
            assert wait_until(lambda: queued(db, sid) >= 20, 180), "the replicated rows were never queued"
            pub.execute(f"TRUNCATE {queue}")
            pub.execute("INSERT INTO marker VALUES (1)")
            assert wait_until(lambda: one(db, "SELECT count(*) FROM marker") == 1, 180), "the marker never arrived"
        in_sub = db.execute("""SELECT srrelid::regclass::text FROM pg_subscription_rel r JOIN pg_class c ON c.oid = r.srrelid
                                WHERE c.relnamespace IN ('pgmq'::regnamespace, 'embed_sidecar'::regnamespace)""").fetchall()
    finally:
        db.execute("SELECT embed_sidecar.resume('docs')")
    wait(db, "docs")
    got = verify(db, "docs")
    assert got == (0, 0, 0), (f"the publisher emptied the subscriber's queue {queue} (subscription copies {in_sub}): "
                              f"wait() returned true and verify (missing, stale, orphans) = {got}")


@pytest.mark.parametrize("how", ["tables_in_schema", "add_publication", "set_publication"])
def test_no_form_of_publication_lets_a_subscription_write_a_sidecar(db, pub, how):
    """Promise (README): "A subscription never writes a sidecar: CREATE SUBSCRIPTION and ALTER
    SUBSCRIPTION ... REFRESH PUBLICATION are refused (55006, naming the sidecar) when a table of
    the publication has a sidecar's name". Review 6 tried FOR ALL TABLES with CREATE SUBSCRIPTION.
    Attack: the publisher publishes a table named like the sidecar (holding a planted vector for
    row 2, whose text is blank) through PostgreSQL 15's FOR TABLES IN SCHEMA, or adds it to an
    existing subscription with ALTER SUBSCRIPTION ... ADD PUBLICATION / SET PUBLICATION (which
    refresh by themselves).
    Safe outcome: the command is refused, or the sidecar never holds the planted row."""
    pub.both("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    pub.execute("INSERT INTO docs VALUES (1, 'rivers in winter'), (2, '')")
    side = watch(db, "docs").split(".")[-1].strip('"')
    model = one(db, "SELECT model_id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    planted = "[" + ",".join(["0.051"] * 384) + "]"
    pub.execute(f'CREATE TABLE "{side}" (id int PRIMARY KEY, embedding text, model text, content_hash bytea)')
    pub.execute(f'INSERT INTO "{side}" VALUES (2, %s, %s, %s)', (planted, model, b"planted"))
    if how == "tables_in_schema":
        e = pub.subscribe(pub.publication("schema", f'FOR TABLES IN SCHEMA "{db.schema}"'))
    else:
        a = pub.publication("a", "FOR TABLE docs")
        b = pub.publication("b", f'FOR TABLE "{side}"')
        assert pub.subscribe(a) is None
        assert wait_until(lambda: synced(db, [f'"{db.schema}".docs']), 180), "the initial copy did not finish"
        cmd = f"ADD PUBLICATION {b}" if how == "add_publication" else f"SET PUBLICATION {a}, {b}"
        e = error_of(db, f"ALTER SUBSCRIPTION {pub.name} {cmd}")
    if e is None:
        wait_until(lambda: synced(db, [f'"{db.schema}".docs', f'"{db.schema}"."{side}"'])
                   or one(db, f'SELECT count(*) FROM "{side}" WHERE content_hash = %s', (b"planted",)) > 0, 180)
    got = db.execute(f'SELECT id FROM "{side}" WHERE content_hash = %s', (b"planted",)).fetchall()
    assert not got, f"{how}: the publisher wrote its row into the sidecar {side}: {got}"


def test_an_owner_policy_on_the_sidecar_cannot_stop_the_apply_worker_at_truncate(db, pub, make_role):
    """Promise (README): the TRUNCATE trigger (ENABLE ALWAYS, fired by the apply worker) lists
    orphans as the table's owner; "an error there is a WARNING, not the apply worker's"; the apply
    worker must never be stalled by what a subscriber-side owner does through our code.
    _enqueue_truncated catches errors with WHEN OTHERS, which does not catch assert_failure.
    Attack: the owner of the subscribed watched table (she owns its sidecar too) forces row
    security on her sidecar with a restrictive policy whose function ASSERTs when evaluated inside
    a trigger (the orphan listing; the drain reads at trigger depth 0). The publisher TRUNCATEs
    the table, then inserts into another table of the same subscription.
    Safe outcome: the other table's row arrives (the apply worker goes on)."""
    o = make_role("rv7_trunc_owner")
    pub.both("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    pub.both("CREATE TABLE other (id int PRIMARY KEY)")
    db.execute(f'ALTER TABLE docs OWNER TO "{o}"')
    pub.execute("INSERT INTO docs SELECT i, 'replicated text ' || i FROM generate_series(1, 5) i")
    side = watch(db, "docs")
    assert pub.subscribe(pub.publication("p", "FOR TABLE docs, other")) is None
    assert wait_until(lambda: synced(db, [f'"{db.schema}".docs', f'"{db.schema}".other']), 180), "the initial copy did not finish"
    wait(db, "docs")
    assert one(db, f"SELECT count(*) FROM {side}") == 5
    with connect_as(o, db.schema) as oc:
        oc.execute("""CREATE FUNCTION pol() RETURNS boolean LANGUAGE plpgsql AS $$
                      BEGIN ASSERT pg_catalog.pg_trigger_depth() = 0, 'the owner''s policy'; RETURN true; END $$""")
        oc.execute(f'CREATE POLICY ownerpol ON {side} AS RESTRICTIVE USING ("{db.schema}".pol())')
        oc.execute(f"ALTER TABLE {side} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY")
    pub.execute("TRUNCATE docs")
    pub.execute("INSERT INTO other VALUES (1)")
    arrived = wait_until(lambda: one(db, "SELECT count(*) FROM other") == 1, 120)
    errors = one(db, """SELECT apply_error_count FROM pg_stat_subscription_stats s JOIN pg_subscription p ON p.oid = s.subid
                         WHERE p.subname = %s""", (pub.name,))
    assert arrived, (f"the subscription stopped (apply_error_count {errors}): the owner's policy raised assert_failure inside "
                     "our TRUNCATE trigger, past its WHEN OTHERS, and the apply worker retries the TRUNCATE for ever")


def test_refresh_publication_with_copy_data_into_a_watched_table_stays_in_step(db, pub):
    """Promise (README): the initial copy fires the replica trigger row by row when watch() came
    first; ALTER SUBSCRIPTION ... REFRESH PUBLICATION drops the sidecar's foreign key; after
    wait(), verify() reports 0 missing, 0 stale, 0 orphans, including after TRUNCATE, key changes.
    Attack: a subscription already runs (another table); the watched docs, with rows and vectors
    of its own on the subscriber, is added to the publication later and picked up with REFRESH
    PUBLICATION (copy_data); then the publisher changes a key, blanks a text, TRUNCATEs and
    inserts again.
    Safe outcome: every step in step (verify 0/0/0) and the sidecar lost its foreign key."""
    pub.both("CREATE TABLE first (id int PRIMARY KEY)")
    pub.both("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs VALUES (1000, 'a local row the publisher does not have')")
    pub.execute("INSERT INTO docs SELECT i, 'publisher text about rivers ' || i FROM generate_series(1, 30) i")
    side = watch(db, "docs")
    wait(db, "docs")
    p = pub.publication("p", "FOR TABLE first")
    assert pub.subscribe(p) is None
    assert wait_until(lambda: synced(db, [f'"{db.schema}".first']), 180), "the initial copy did not finish"
    pub.execute(f"ALTER PUBLICATION {p} ADD TABLE docs")
    db.execute(f"ALTER SUBSCRIPTION {pub.name} REFRESH PUBLICATION WITH (copy_data = true)")
    assert wait_until(lambda: synced(db, [f'"{db.schema}".docs']), 180), "the table copy did not finish"
    fk = one(db, "SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'f'", (side,))
    wait(db, "docs")
    got = [("copy", verify(db, "docs"))]
    pub.execute("UPDATE docs SET id = 100 WHERE id = 1")
    pub.execute("UPDATE docs SET body = '' WHERE id = 2")
    pub.execute("INSERT INTO first VALUES (1)")
    assert wait_until(lambda: one(db, "SELECT count(*) FROM first") == 1, 120)
    wait(db, "docs")
    got.append(("key change, blank", verify(db, "docs")))
    pub.execute("TRUNCATE docs")
    pub.execute("INSERT INTO docs VALUES (7, 'after the truncate')")
    assert wait_until(lambda: one(db, "SELECT count(*) FROM docs WHERE id = 7") == 1, 120)
    wait(db, "docs")
    got.append(("truncate", verify(db, "docs")))
    assert fk == 0, "the sidecar kept its foreign key after REFRESH PUBLICATION"
    assert all(v == (0, 0, 0) for _, v in got), f"verify (missing, stale, orphans) after each step: {got}"


def test_a_publication_cannot_plant_dead_letters_in_the_extensions_failures_table(db, pub, make_role):
    """Promise (DESIGN invariant 9: no other tenant's registry row changed; README: only
    replicated rows whose key cannot be queued are dead-lettered, retry_failed() replays dead
    letters as the owner asks). embed_sidecar.failures is, like the sidecar, a table with a
    predictable name that a FOR ALL TABLES publication matches by name.
    Attack: a role on the publisher that may create a schema makes embed_sidecar.failures there
    (source_id, key, error, attempts) and inserts a dead letter for tenant B's source id; the
    administrator subscribes to a FOR ALL TABLES publication.
    Safe outcome: the subscription is refused, or B's dead letters stay as they were."""
    b = make_role("rv7_failures_victim")
    pub.both("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("CREATE TABLE btheirs (id int PRIMARY KEY, body text)")
    db.execute(f'ALTER TABLE btheirs OWNER TO "{b}"')
    watch(db, "docs")
    watch(db, "btheirs")
    bid = source_id(db, "btheirs")
    pub.execute("CREATE SCHEMA IF NOT EXISTS embed_sidecar")
    pub.extra.append("embed_sidecar")
    pub.execute("CREATE TABLE embed_sidecar.failures (source_id int, key jsonb, error text, attempts int)")
    name = pub.publication("all", "FOR ALL TABLES")
    e = pub.subscribe(name)
    if e is None:
        assert wait_until(lambda: synced(db, [f'"{db.schema}".docs', "embed_sidecar.failures"]), 180), \
            "the initial copy did not finish"
        pub.execute("INSERT INTO embed_sidecar.failures VALUES (%s, '[4242]', 'planted by the publisher', 1)", (bid,))
        pub.execute("INSERT INTO docs VALUES (1, 'a marker row')")
        assert wait_until(lambda: one(db, "SELECT count(*) FROM docs") == 1, 180), "the marker never arrived"
    got = db.execute("SELECT key, error FROM embed_sidecar.failures WHERE source_id = %s", (bid,)).fetchall()
    failed = one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'btheirs'::regclass")
    assert not got, (f"the publisher planted dead letters on another owner's table btheirs: {got} "
                     f"(status.failed {failed}; retry_failed() would queue them)")


def test_an_owner_key_domain_cannot_stop_the_apply_worker(db, pub, make_role):
    """Promise (README, An embedding replica): "A replicated row is never refused"; our replica
    trigger never raises inside the apply worker for what a subscriber-side owner's code or the
    publisher's data do. (The same attack as the first test of this file, with a real apply
    worker: PostgreSQL's own domain check at apply runs at trigger depth 0 and passes.)
    Attack: the subscriber-side owner's key domain asserts, inside a trigger only, that the key is
    not 'poison'; the publisher inserts 'poison' into the watched table, then a row into another
    table of the same subscription.
    Safe outcome: the other table's row arrives."""
    o = make_role("rv7_apply_dom_owner")
    with connect_as(o, db.schema) as oc:
        oc.execute("""CREATE FUNCTION okv(v text) RETURNS boolean LANGUAGE plpgsql AS $$
                      BEGIN ASSERT pg_catalog.pg_trigger_depth() = 0 OR v <> 'poison', 'the owner''s assertion'; RETURN true; END $$""")
        oc.execute(f'CREATE DOMAIN akey AS text CHECK ("{db.schema}".okv(VALUE))')
        oc.execute("CREATE TABLE docs (id akey PRIMARY KEY, body text)")
    pub.execute("CREATE TABLE docs (id text PRIMARY KEY, body text)")
    pub.both("CREATE TABLE other (id int PRIMARY KEY)")
    watch(db, "docs")
    assert pub.subscribe(pub.publication("p", "FOR TABLE docs, other")) is None
    assert wait_until(lambda: synced(db, [f'"{db.schema}".docs', f'"{db.schema}".other']), 180), "the initial copy did not finish"
    pub.execute("INSERT INTO docs VALUES ('fine', 'a fine row')")
    assert wait_until(lambda: one(db, "SELECT count(*) FROM docs") == 1, 120), "control row never arrived"
    pub.execute("INSERT INTO docs VALUES ('poison', 'a row the owner''s code refuses inside our trigger')")
    pub.execute("INSERT INTO other VALUES (1)")
    arrived = wait_until(lambda: one(db, "SELECT count(*) FROM other") == 1, 120)
    errors = one(db, """SELECT apply_error_count FROM pg_stat_subscription_stats s JOIN pg_subscription p ON p.oid = s.subid
                         WHERE p.subname = %s""", (pub.name,))
    assert arrived, (f"the subscription stopped (apply_error_count {errors}): the owner's key domain raised assert_failure "
                     "inside our replica trigger's key check, past _invalid_keys' WHEN OTHERS")


def test_a_watched_table_dropped_and_re_created_while_subscribed_stays_in_step(db, pub):
    """Promise (README): `watch()` on a table a subscription copies leaves the foreign key out,
    and CREATE/ALTER SUBSCRIPTION drops it; the initial copy fires the replica trigger; after
    wait(), verify() reports 0/0/0 after replicated changes and TRUNCATE.
    Attack: while subscribed and in step, the subscriber's docs is dropped (its sidecar and
    queue go) and made again, watched again before the subscription knows it (so its new sidecar
    gets a foreign key), and the publisher keeps writing; then ALTER SUBSCRIPTION ... REFRESH
    PUBLICATION copies it again, and the publisher updates, TRUNCATEs and inserts.
    Safe outcome: the new sidecar loses its foreign key at the REFRESH, and every step is in step
    (the TRUNCATE is applied: the marker row that follows it arrives)."""
    pub.both("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    pub.both("CREATE TABLE marker (id int PRIMARY KEY)")
    pub.execute("INSERT INTO docs SELECT i, 'first life of row ' || i FROM generate_series(1, 10) i")
    watch(db, "docs")
    assert pub.subscribe(pub.publication("p", "FOR TABLE docs, marker")) is None
    assert wait_until(lambda: synced(db, [f'"{db.schema}".docs', f'"{db.schema}".marker']), 180), "the initial copy did not finish"
    wait(db, "docs")
    db.execute("DROP TABLE docs CASCADE")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    side = watch(db, "docs")
    fk_before = one(db, "SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'f'", (side,))
    pub.execute("INSERT INTO docs SELECT i, 'written while the subscriber had no table ' || i FROM generate_series(11, 20) i")
    db.execute(f"ALTER SUBSCRIPTION {pub.name} REFRESH PUBLICATION")
    assert wait_until(lambda: synced(db, [f'"{db.schema}".docs']), 180), "the new table's copy did not finish"
    assert wait_until(lambda: one(db, "SELECT count(*) FROM docs") == 20, 120), "the copy missed rows"
    fk_after = one(db, "SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'f'", (side,))
    wait(db, "docs")
    got = [("copy", verify(db, "docs"))]
    pub.execute("UPDATE docs SET body = body || ' (edited)' WHERE id % 3 = 0")
    pub.execute("UPDATE docs SET id = id + 100 WHERE id % 5 = 0")
    pub.execute("TRUNCATE docs")
    pub.execute("INSERT INTO docs VALUES (1, 'after the truncate')")
    pub.execute("INSERT INTO marker VALUES (1)")
    applied = wait_until(lambda: one(db, "SELECT count(*) FROM marker") == 1, 120)
    wait(db, "docs")
    got.append(("update, key change, truncate", verify(db, "docs")))
    assert applied, "the subscription stopped after the table was re-created"
    assert fk_before == 1 and fk_after == 0, f"foreign key before/after REFRESH: {fk_before}/{fk_after}"
    assert all(v == (0, 0, 0) for _, v in got), f"verify (missing, stale, orphans) after each step: {got}"


def test_a_publication_cannot_truncate_the_registry(db, pub, make_role):
    """Promise (DESIGN invariant 9: no other tenant's registry row changed; invariant 1: after
    wait() every row has its vector; README: a subscription never writes the extension's data).
    embed_sidecar.sources is referenced only by embed_sidecar.failures, and the apply worker
    replays a publisher's `TRUNCATE a, b` as one TRUNCATE of both tables (no foreign key stops
    it then).
    Attack: a role on the publisher that may create a schema makes embed_sidecar.sources and
    embed_sidecar.failures there (one column each); the administrator subscribes to a FOR ALL
    TABLES publication; the publisher runs TRUNCATE embed_sidecar.failures, embed_sidecar.sources.
    Safe outcome: the subscription is refused, or tenant B's watched table (not published at
    all) is still registered and a row B inserts afterwards is embedded.
    (When the attack works it empties the registry of the whole test database: keep this test
    last in the file.)"""
    b = make_role("rv7_registry_victim")
    pub.both("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    with connect_as(b, db.schema) as c:
        c.execute("CREATE TABLE btheirs (id int PRIMARY KEY, body text)")
        c.execute("INSERT INTO btheirs VALUES (1, 'tenant b text about rivers')")
    watch(db, "btheirs")
    wait(db, "btheirs")
    pub.execute("CREATE SCHEMA IF NOT EXISTS embed_sidecar")
    pub.extra.append("embed_sidecar")
    pub.execute("CREATE TABLE embed_sidecar.sources (id int)")
    pub.execute("CREATE TABLE embed_sidecar.failures (source_id int)")
    name = pub.publication("all", "FOR ALL TABLES")
    e = pub.subscribe(name)
    if e is None:
        assert wait_until(lambda: synced(db, [f'"{db.schema}".docs', "embed_sidecar.sources", "embed_sidecar.failures"]), 180), \
            "the initial copy did not finish"
        pub.execute("TRUNCATE embed_sidecar.failures, embed_sidecar.sources")
        pub.execute("INSERT INTO docs VALUES (1, 'a marker row')")
        assert wait_until(lambda: one(db, "SELECT count(*) FROM docs") == 1, 180), "the marker never arrived"
    registered = one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'btheirs'::regclass")
    with connect_as(b, db.schema) as c:
        write = error_of(c, "INSERT INTO btheirs VALUES (2, 'tenant b writes after the truncate')")
    waited = one(db, "SELECT embed_sidecar.wait('btheirs'::regclass, '60 s')") if registered else None
    assert registered == 1 and write is None and waited, (
        f"the publisher's TRUNCATE reached the subscriber's registry: tenant B's table registered {registered} time(s); "
        f"B's next INSERT: {write}; wait(): {waited}")
