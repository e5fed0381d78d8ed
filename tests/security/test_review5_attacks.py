"""Attacks of a fifth reviewer who did not write the code: watch(..., sync => true) (src/drain/sync.rs,
embed_sidecar._embed_now, EXECUTE-able by PUBLIC) and watch(..., adopt => column) (src/adopt.rs).

Each test is one attack; it PASSES when the promise holds and FAILS when the attack works.
Runs in pes_test with conftest's fixtures (own schema per test, roles from make_role)."""
import hashlib
import threading
import time

import numpy as np
import psycopg
import pytest

from conftest import assert_in_step, connect, connect_as, error_of, one, wait, watch, wait_until

EXECUTE_WATCH = ("embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, "
                 "text, name, boolean, name)")


def vec(text):
    return np.array([float(x) for x in text.strip("[]").split(",")])


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def source_id(conn, table):
    return one(conn, "SELECT id FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'current'", (table,))


def sidecar(conn, table):
    return one(conn, "SELECT sidecar::text FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'current'",
               (table,))


def sha(text):
    return hashlib.sha256(text.encode()).digest()


def vectors_match_content(conn, table, side, model="all-MiniLM-L6-v2"):
    """Keys of sidecar rows whose vector is not the model's vector of the row's current body."""
    rows = conn.execute(f"""SELECT s.id, 1 - (e.embedding <=> embed_sidecar._embed_with(%s, s.body)::vector)
                              FROM {table} s JOIN {side} e USING (id)""", (model,)).fetchall()
    return [k for k, c in rows if c < 0.999]


def assert_not_superuser(conn, role):
    assert not one(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,))


# ---------------------------------------------------------------------------------------------
# 1. sync: _embed_now from a table owner's code inside the drain's restricted operation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call_embed_now", [False, True], ids=["control", "via_embed_now"])
def test_owner_code_calling_embed_now_cannot_escape_the_drains_step_limit(db, make_role, call_embed_now):
    """Promise (older, README "Whose rights"): a table owner's code run by the drain worker is cut
    at the 10 s step limit (OWNER_CODE_LIMIT_MS, a statement timeout armed around each restricted
    operation), so one owner's slow code cannot hold the drains of every other table.
    Attack: _embed_now is EXECUTE-able by PUBLIC and does not refuse inside a security-restricted
    operation; its lookup runs `as_table_owner` *nested* inside the drain's one, and the inner
    `Armed` disarms the statement timeout when it drops (disable_timeout), leaving the rest of the
    outer operation without a limit. Owner A's trigger on her sidecar calls _embed_now (on another
    sync table of hers), then sleeps 13 s.
    Safe outcome: the sleep is cut at the step limit (the 'after' sequence is never advanced).
    (The control, without the _embed_now call, shows the limit cutting the same sleep.)"""
    a = make_role("rv5_owner_a")
    db.execute("CREATE TABLE slow (id int PRIMARY KEY, body text)")
    db.execute("CREATE TABLE fast (id int PRIMARY KEY, body text)")
    db.execute(f'ALTER TABLE slow OWNER TO "{a}"')
    db.execute(f'ALTER TABLE fast OWNER TO "{a}"')
    side = watch(db, "slow")
    watch(db, "fast", sync=True)
    fast_id = source_id(db, "fast")
    with connect_as(a, db.schema) as c:
        c.execute("CREATE SEQUENCE before_sleep")
        c.execute("CREATE SEQUENCE after_sleep")
        c.execute(f"""CREATE FUNCTION sleepy() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN
                        PERFORM nextval('{db.schema}.before_sleep');
                        {f"PERFORM embed_sidecar._embed_now({fast_id}, ARRAY['[1]']);" if call_embed_now else ""}
                        PERFORM pg_catalog.pg_sleep(13);
                        PERFORM nextval('{db.schema}.after_sleep');
                        RETURN NULL;
                      END $$""")
        c.execute(f"CREATE TRIGGER sleepy AFTER INSERT ON {side} FOR EACH STATEMENT EXECUTE FUNCTION sleepy()")
    db.execute("INSERT INTO slow VALUES (1, 'a row the drain embeds, firing the trigger')")
    calls = lambda seq: one(db, f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {seq}")
    assert wait_until(lambda: calls("before_sleep") >= 1, 60), "the drain never ran the owner's trigger"
    finished = wait_until(lambda: calls("after_sleep") >= 1, 20)
    assert not finished, ("owner code ran 13 s in the drain worker past the 10 s step limit: "
                          "_embed_now's nested restricted operation disarmed the statement timeout")


# ---------------------------------------------------------------------------------------------
# 2. sync: what a writer learns through _embed_now about rows it may not read
# ---------------------------------------------------------------------------------------------

def test_insert_only_writer_learns_nothing_about_unreadable_rows_through_embed_now(db, make_role):
    """Promise: the writer cannot use _embed_now directly to learn about rows it may not read.
    Attack: a role with INSERT only (no SELECT) on a sync table whose existing rows have no vector
    yet (watch(backfill => false)) calls _embed_now on keys of rows it cannot read, and watches its
    return value and the DEBUG1 messages (client_min_messages is the writer's to set).
    Safe outcome: a key of a short row, a key of a long row and a key of no row answer alike."""
    w = make_role("rv5_insert_only")
    db.execute("CREATE TABLE secret (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO secret VALUES (1, 'a short private note'), (2, repeat('a long private letter. ', 200))")
    watch(db, "secret", sync=True, backfill=False)
    sid = source_id(db, "secret")
    db.execute(f'GRANT INSERT ON secret TO "{w}"')
    answers = {}
    with connect_as(w, db.schema) as c:
        assert error_of(c, "SELECT count(*) FROM secret")[0] == "42501"
        notes = []
        c.add_notice_handler(lambda d: notes.append(d.message_primary))
        c.execute("SET client_min_messages = debug1")
        for key in ("[99]", "[2]", "[1]"):
            notes.clear()
            try:
                got = one(c, "SELECT embed_sidecar._embed_now(%s, ARRAY[%s])", (sid, key))
            except psycopg.Error as e:
                got = e.sqlstate
            answers[key] = (got, [n for n in notes if "pg_embed_sidecar" in (n or "")])
    assert answers["[1]"] == answers["[99]"] == answers["[2]"], \
        f"_embed_now tells an INSERT-only writer about rows it cannot read: {answers}"


# ---------------------------------------------------------------------------------------------
# 3. sync: a writer holding its transaction after a sync write, against the drain
# ---------------------------------------------------------------------------------------------

def test_open_sync_transaction_cannot_dead_letter_another_writers_committed_change(db, make_role):
    """Promise: a writer can never make the drain's work fail or hang beyond a bounded wait.
    Attack: the victim commits a change the sync step leaves to the queue (a long text). Before
    the drain gets to it, the attacker (UPDATE rights) updates the same row in an open
    transaction: its sync step writes the sidecar row and holds that row's lock. Without sync the
    drain would write the victim's vector anyway (FOR KEY SHARE does not conflict with the
    attacker's FOR NO KEY UPDATE); now its upsert waits for the attacker's row lock, times out,
    and the message is retried until max_attempts (3) and dead-lettered. The attacker then rolls
    back: the victim's committed text is never embedded.
    (The harness keeps the worker off the source with a lock on its registry row until the
    attacker's lock is in place; the worker skips locked registry rows.)
    Safe outcome: the victim's committed text gets its vector, nothing is dead-lettered."""
    w = make_role("rv5_sync_holder")
    db.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    side = watch(db, "notes", sync=True)
    db.execute("INSERT INTO notes VALUES (1, 'the original text')")
    wait(db, "notes")
    db.execute(f'GRANT SELECT, UPDATE ON notes TO "{w}"')
    sid = source_id(db, "notes")
    victim_text = "the victim's committed paragraph about tides and harbours. " * 40  # > 2,000 bytes: queued
    harness = connect()
    attacker = connect_as(w, db.schema)
    try:
        harness.execute("BEGIN")
        harness.execute("SELECT 1 FROM embed_sidecar.sources WHERE id = %s FOR UPDATE", (sid,))
        db.execute("UPDATE notes SET body = %s WHERE id = 1", (victim_text,))
        attacker.execute("BEGIN")
        attacker.execute("UPDATE notes SET body = 'the attacker''s short text' WHERE id = 1")
        synced = one(attacker, f"SELECT content_hash = sha256(convert_to('the attacker''s short text', 'UTF8')) FROM {side} WHERE id = 1")
        harness.execute("COMMIT")
        # hold long enough for 3 attempts: 2 s lock wait + back-off 2 s, 4 s ...
        time.sleep(20)
        attacker.execute("ROLLBACK")
    finally:
        harness.close()
        attacker.close()
    assert synced, "precondition: the attacker's sync step wrote the sidecar row"
    ok = wait_until(lambda: one(db, f"SELECT content_hash FROM {side} WHERE id = 1") == sha(victim_text), 30)
    dead = db.execute("SELECT key::text, error FROM embed_sidecar.failures WHERE source_id = %s", (sid,)).fetchall()
    assert ok and not dead, f"the victim's committed change was never embedded; dead letters: {dead}"


@pytest.mark.parametrize("sync", [False, True], ids=["control_plain_watch", "sync"])
def test_open_sync_transaction_does_not_keep_the_deferred_index_from_being_built(db, make_role, sync):
    """Promise: a writer cannot make the drain's work fail beyond a bounded wait.
    Attack: a sync writer (INSERT only) leaves a transaction open after one sync INSERT: it holds
    ROW EXCLUSIVE on the sidecar (without sync a plain INSERT locks only the source). The
    deferred HNSW index of that sidecar (a backfill past bulk_index_rows) needs SHARE on it; the
    builder times out on every try while the writer waits.
    Safe outcome: the index is built within 60 s while the writer holds its transaction.
    (The control, a plain watch, shows the same writer's open INSERT does not hold the build.)"""
    w = make_role("rv5_index_staller")
    db.execute("CREATE TABLE big (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO big SELECT i, 'row ' || i || ' about lighthouses' FROM generate_series(1, 40) i")
    db.execute(f'GRANT INSERT ON big TO "{w}"')
    db.execute("SET pg_embed_sidecar.bulk_index_rows = 1")
    side = watch(db, "big", sync=sync)
    db.execute("RESET pg_embed_sidecar.bulk_index_rows")
    assert one(db, "SELECT index_pending FROM embed_sidecar.sources WHERE source = 'big'::regclass")
    attacker = connect_as(w, db.schema)
    try:
        attacker.execute("BEGIN")
        attacker.execute("INSERT INTO big VALUES (1000, 'a row written and held')")
        held = one(db, """SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND mode = 'RowExclusiveLock'
                           AND pid <> pg_backend_pid()""", (side,))
        built = wait_until(lambda: not one(db, "SELECT index_pending FROM embed_sidecar.sources WHERE source = 'big'::regclass"), 60, 1)
        attacker.execute("ROLLBACK")
    finally:
        attacker.close()
    assert built, f"the deferred index waited 60 s for a writer's open transaction (it holds {held} lock(s) on the sidecar)"


# ---------------------------------------------------------------------------------------------
# 4. sync: _embed_now called by hand with keys of the writer's choosing
# ---------------------------------------------------------------------------------------------

def test_forged_keys_to_embed_now_write_only_true_vectors_of_real_rows(db, make_role):
    """Promise: a vector written always matches the row's current content and current model,
    never a vector of other text or another key; _enqueue validates keys, _embed_now does not.
    Attack: a writer (INSERT, UPDATE; no SELECT) calls _embed_now on keys of the wrong arity, the
    wrong JSON type, duplicates, a string for an int, a float, NULL, not an array, a huge key,
    and more than 16 keys.
    Safe outcome: each call either errors or writes; afterwards every sidecar row holds the
    model's vector of its own row's current text, and nothing exists for keys without a row."""
    w = make_role("rv5_key_forger")
    db.execute("CREATE TABLE kt (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO kt SELECT i, 'row ' || i || ' about ' || (ARRAY['owls', 'ferns', 'canals'])[1 + i % 3] "
               "FROM generate_series(1, 30) i")
    watch(db, "kt", sync=True, backfill=False)
    side = sidecar(db, "kt")
    sid = source_id(db, "kt")
    db.execute(f'GRANT INSERT, UPDATE ON kt TO "{w}"')
    forged = [["[1, 2]"], ['["2"]'], ["[3]", "[3]"], ["[4.0]"], ["[null]"], ["null"], ['{"id": 5}'], ["[6"],
              ["[" + "7" * 3000 + "]"], [None, "[8]"], ["[9]", "[1]"], [f"[{i}]" for i in range(10, 27)],
              ["[100]"], ["[-1]"], ['[1, "x"]']]
    outcomes = []
    with connect_as(w, db.schema) as c:
        for keys in forged:
            try:
                outcomes.append((keys[:2], one(c, "SELECT embed_sidecar._embed_now(%s, %s::text[])", (sid, keys))))
            except psycopg.Error as e:
                outcomes.append((keys[:2], e.sqlstate))
    bad = vectors_match_content(db, "kt", side)
    model_id = one(db, "SELECT model_id FROM embed_sidecar.sources WHERE id = %s", (sid,))
    stale = one(db, f"""SELECT count(*) FROM kt s JOIN {side} e USING (id)
                         WHERE e.content_hash <> sha256(convert_to(s.body, 'UTF8')) OR e.model <> %s""", (model_id,))
    orphans = one(db, f"SELECT count(*) FROM {side} e WHERE NOT EXISTS (SELECT 1 FROM kt s WHERE s.id = e.id)")
    assert (bad, stale, orphans) == ([], 0, 0), f"forged keys wrote wrong rows: {bad} {stale} {orphans}; {outcomes}"


def test_embed_now_writes_nothing_for_paused_chunked_or_shadow_embeddings(db, make_role):
    """Promise: not for chunked embeddings, shadows or paused embeddings.
    Attack: a writer with INSERT calls _embed_now by hand on the registry ids of a paused
    source, a chunked one (watched with sync => true) and a set_model() shadow.
    Safe outcome: 0 rows written, the sidecars untouched by the call."""
    w = make_role("rv5_shadow_poker")
    db.execute("CREATE TABLE p (id int PRIMARY KEY, body text)")
    db.execute("CREATE TABLE ch (id int PRIMARY KEY, body text)")
    db.execute("CREATE TABLE sh (id int PRIMARY KEY, body text)")
    for t in ("p", "ch", "sh"):
        db.execute(f"INSERT INTO {t} VALUES (1, 'a row about chestnut trees and autumn')")
        db.execute(f'GRANT INSERT ON {t} TO "{w}"')
    watch(db, "p", sync=True, backfill=False)
    one(db, "SELECT embed_sidecar.pause('p')")
    watch(db, "ch", sync=True, backfill=False, chunking=True)
    watch(db, "sh", sync=True)
    wait(db, "sh")
    one(db, "SELECT embed_sidecar.pause('sh')")
    one(db, "SELECT embed_sidecar.set_model('sh', 'paraphrase-MiniLM-L3-v2')")
    shadow = db.execute("SELECT id, sidecar::text FROM embed_sidecar.sources WHERE source = 'sh'::regclass AND role = 'shadow'").fetchone()
    ids = {"paused": source_id(db, "p"), "chunked": source_id(db, "ch")}
    if shadow:
        ids["shadow"] = shadow[0]
        before_shadow = one(db, f"SELECT count(*) FROM {shadow[1]}")
    got = {}
    with connect_as(w, db.schema) as c:
        for what, i in ids.items():
            try:
                got[what] = one(c, "SELECT embed_sidecar._embed_now(%s, ARRAY['[1]'])", (i,))
            except psycopg.Error as e:
                got[what] = e.sqlstate
    assert got.get("paused") in (0, "42501") and got.get("chunked") in (0, "42501"), got
    assert one(db, f"SELECT count(*) FROM {sidecar(db, 'p')}") == 0
    assert one(db, f"SELECT count(*) FROM {sidecar(db, 'ch')}") == 0
    shadow_rows = one(db, f"SELECT count(*) FROM {shadow[1]}") if shadow else None
    for t in ("p", "ch", "sh"):
        one(db, "SELECT embed_sidecar.unwatch(%s)", (t,))
    if shadow:
        assert got.get("shadow") in (0, "42501"), got
        assert shadow_rows == before_shadow


def test_embed_now_refuses_writers_of_nothing_and_readers(db, make_role):
    """Promise: the writer must be allowed to INSERT/UPDATE the table; _embed_now cannot write,
    overwrite or learn about rows of tables it may not write.
    Attack: a role with SELECT only (a reader) and a role with DELETE only call _embed_now on the
    table's rows, and on a registry id that does not exist.
    Safe outcome: 42501 for both on the real id, nothing written; the unknown id tells nothing
    beyond what a missing table would."""
    r = make_role("rv5_reader_only")
    d = make_role("rv5_delete_only")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO t VALUES (1, 'a row about velvet curtains')")
    watch(db, "t", sync=True, backfill=False)
    db.execute(f'GRANT SELECT ON t TO "{r}"')
    db.execute(f'GRANT DELETE ON t TO "{d}"')
    sid = source_id(db, "t")
    for role in (r, d):
        with connect_as(role, db.schema) as c:
            err = error_of(c, "SELECT embed_sidecar._embed_now(%s, ARRAY['[1]'])", (sid,))
            assert err and err[0] == "42501", (role, err)
            assert one(c, "SELECT embed_sidecar._embed_now(%s, ARRAY['[1]'])", (987654,)) == 0
    assert one(db, f"SELECT count(*) FROM {sidecar(db, 't')}") == 0


# ---------------------------------------------------------------------------------------------
# 5. sync: a writer's session against the sync step
# ---------------------------------------------------------------------------------------------

def test_writer_session_settings_never_fail_the_write_nor_bend_the_vector(db, make_role):
    """Promise: a writer can never make the sync step fail the write (except its own cancel or
    statement_timeout), and a vector written matches the row's current content and model.
    Attack: the writer's session sets what it may: lock_timeout 1 ms, REPEATABLE READ, a
    text-search default, search_path with a schema of its own holding look-alike functions and
    operators (sha256, concat, =, to_tsvector), pg_embed_sidecar.caller, client_min_messages;
    then INSERTs, UPDATEs (also several rows, a key change) in one transaction and reads back.
    Safe outcome: every statement succeeds; after commit every vector is the model's vector of
    its row's text, in step."""
    w = make_role("rv5_session_bender")
    db.execute("CREATE TABLE n (id int PRIMARY KEY, body text)")
    side = watch(db, "n", sync=True)
    db.execute(f'GRANT SELECT, INSERT, UPDATE ON n TO "{w}"')
    db.execute(f'CREATE SCHEMA "{db.schema}_evil" AUTHORIZATION "{w}"')
    with connect_as(w, db.schema) as c:
        evil = f'"{db.schema}_evil"'
        c.execute(f"CREATE FUNCTION {evil}.sha256(bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT '\\x00'::bytea $$")
        c.execute(f"CREATE FUNCTION {evil}.concat(VARIADIC text[]) RETURNS text LANGUAGE sql AS $$ SELECT 'evil' $$")
        c.execute(f"CREATE FUNCTION {evil}.to_tsvector(regconfig, text) RETURNS tsvector LANGUAGE sql AS $$ SELECT ''::tsvector $$")
        c.execute(f"SET search_path = {evil}, \"{db.schema}\", public")
        c.execute("SET lock_timeout = '1ms'")
        c.execute("SET default_text_search_config = 'simple'")
        c.execute("SET pg_embed_sidecar.caller = '10:0000000000000000'")
        c.execute("SET client_min_messages = debug1")
        c.execute("SET default_transaction_isolation = 'repeatable read'")
        with c.transaction():
            c.execute("INSERT INTO n VALUES (1, 'a violin in the attic'), (2, 'snow on a tin roof')")
            c.execute("UPDATE n SET body = body || ' at night' WHERE id = 1")
            c.execute("UPDATE n SET id = 3 WHERE id = 2")
            c.execute("INSERT INTO n VALUES (4, 'a lantern by the river')")
        c.execute("SET default_transaction_isolation = 'read committed'")
        with c.transaction():
            c.execute("UPDATE n SET body = 'a lantern by the sea' WHERE id = 4")
    wait(db, "n")
    assert_in_step(db, "n")
    assert vectors_match_content(db, "n", side) == []


def test_writer_cannot_run_its_code_as_the_owner_through_the_sync_step(db, make_role):
    """Promise: the content is read and the sidecar written as the table's owner in a
    security-restricted operation, never as the writer or a superuser; the writer cannot use the
    sync step to run code as the owner.
    Attack: the owner has a (carelessly written) trigger on her sidecar that calls an unqualified
    function; the writer plants same-named functions in a schema of its own and in pg_temp, and
    puts that schema first in search_path before a sync INSERT. The trigger records who ran it.
    Safe outcome: the owner's trigger runs as the owner, inside a restricted operation; none of
    the writer's planted functions ever runs (as anybody)."""
    o = make_role("rv5_careless_owner")
    w = make_role("rv5_planter")
    db.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    db.execute(f'ALTER TABLE t OWNER TO "{o}"')
    side = watch(db, "t", sync=True)
    db.execute("CREATE TABLE log (who text, superuser boolean, note text)")
    db.execute("GRANT INSERT ON log TO PUBLIC")
    db.execute(f'CREATE SCHEMA "{db.schema}_w" AUTHORIZATION "{w}"')
    with connect_as(o, db.schema) as c:
        c.execute(f"""CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN
                        INSERT INTO "{db.schema}".log VALUES (current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), 'trigger');
                        BEGIN
                          PERFORM helper();
                        EXCEPTION WHEN undefined_function THEN NULL;
                        END;
                        RETURN NULL;
                      END $$""")
        c.execute(f"CREATE TRIGGER audit AFTER INSERT OR UPDATE ON {side} FOR EACH STATEMENT EXECUTE FUNCTION audit()")
    db.execute(f'GRANT INSERT, UPDATE, SELECT ON t TO "{w}"')
    with connect_as(w, db.schema) as c:
        c.execute(f"""CREATE FUNCTION "{db.schema}_w".helper() RETURNS void LANGUAGE sql AS $$
                      INSERT INTO "{db.schema}".log VALUES (current_user, NULL, 'planted helper') $$""")
        c.execute(f'GRANT EXECUTE ON FUNCTION "{db.schema}_w".helper() TO PUBLIC')
        c.execute(f'GRANT USAGE ON SCHEMA "{db.schema}_w" TO PUBLIC')
        c.execute(f'SET search_path = "{db.schema}_w", "{db.schema}", public')
        c.execute("INSERT INTO t VALUES (1, 'a quiet harbour at noon')")
        c.execute("UPDATE t SET body = 'a busy harbour at noon' WHERE id = 1")
    wait(db, "t")
    log = db.execute("SELECT who, superuser, note FROM log").fetchall()
    assert log, "the owner's trigger never ran"
    assert all(n == "trigger" for _, _, n in log), f"the writer's planted function ran: {log}"
    assert all(who == o and su is False for who, su, _ in log), f"sidecar code ran as someone else: {log}"
    assert_in_step(db, "t")


# ---------------------------------------------------------------------------------------------
# 6. sync: capacity
# ---------------------------------------------------------------------------------------------

def test_flooding_sync_writers_do_not_starve_searches_or_the_drain(db):
    """Promise: the service's capacity cannot be exhausted by sync writers so that drains or
    searches starve (submit_now only takes free interactive slots, all or nothing).
    Attack: four sessions insert 16-row statements of ~1,800-byte texts into a sync table as fast
    as they can for ~20 s; meanwhile another table's 30 queued rows must drain and searches run.
    Safe outcome: while the flood goes on, the other table gets in step and searches keep
    returning. A liveness check, not a latency one (latency under load is the benchmarks' job:
    a 15 s bound here failed on a busy CI machine): the flood runs until the table is in step,
    for at most 120 s, and at least three searches must have returned by then."""
    db.execute("CREATE TABLE flood (id bigserial PRIMARY KEY, body text)")
    db.execute("CREATE TABLE other (id int PRIMARY KEY, body text)")
    watch(db, "flood", sync=True)
    watch(db, "other")
    stop = threading.Event()
    errors = []

    def writer(n):
        try:
            with connect() as c:
                c.execute(f'SET search_path = "{db.schema}"')
                i = 0
                while not stop.is_set():
                    i += 1
                    c.execute("INSERT INTO flood (body) SELECT repeat('w%s r%s g' || g || ' lorem ipsum dolor. ', 55) "
                              "FROM generate_series(1, 16) g", (n, i))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        db.execute("INSERT INTO other SELECT i, 'queued row ' || i || ' about marble' FROM generate_series(1, 30) i")
        start = time.monotonic()
        searches = 0
        drained = None
        while time.monotonic() - start < 120:
            db.execute("SELECT * FROM embed_sidecar.search('other', 'marble', 3)").fetchall()
            searches += 1
            if one(db, f"SELECT count(*) FROM {sidecar(db, 'other')}") == 30 and searches >= 3:
                drained = time.monotonic() - start
                break
            time.sleep(0.5)
        flooding = not stop.is_set() and all(t.is_alive() for t in threads)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert drained is not None, f"the other table did not get in step under the sync flood ({searches} searches)"
    assert flooding, "the writers stopped before the other table was in step: nothing was shown"


# ---------------------------------------------------------------------------------------------
# 7. adopt
# ---------------------------------------------------------------------------------------------

def _fill(db, table="docs", rows=60):
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text, vec vector(384))")
    db.execute(f"INSERT INTO {table} SELECT i, 'document ' || i || ' about ' || "
               f"(ARRAY['rivers', 'cats', 'green tea', 'night trains', 'old clocks'])[1 + i %% 5] FROM generate_series(1, %s) i",
               (rows,))
    db.execute(f"UPDATE {table} SET vec = embed_text(body)")


def test_adopt_internals_refuse_everyone_but_the_definer(db, make_role):
    """Promise: only the table's owner (who may watch it) can adopt.
    Attack: a writer with UPDATE, and the owner herself, call the internal embed_sidecar._adopt
    directly (re-adopting an already watched table's column into its sidecar, past watch()'s
    checks), and read _adopt_sql.
    Safe outcome: permission denied for both; the sidecar unchanged."""
    o = make_role("rv5_adopt_owner")
    w = make_role("rv5_adopt_writer")
    _fill(db)
    db.execute(f'ALTER TABLE docs OWNER TO "{o}"')
    side = watch(db, "docs")
    wait(db, "docs")
    db.execute(f'GRANT SELECT, UPDATE ON docs TO "{w}"')
    sid = source_id(db, "docs")
    for role in (w, o):
        with connect_as(role, db.schema) as c:
            err = error_of(c, "SELECT embed_sidecar._adopt(%s, 'vec')", (sid,))
            assert err and err[0] == "42501", (role, err)
    assert one(db, f"SELECT count(*) FROM {side}") == 60


def test_adopt_runs_the_owners_code_only_as_the_owner(db, make_role):
    """Promise: nothing runs as a superuser on the owner's data or code during adopt.
    Attack: the owner (not a superuser; the administrator granted her watch()) forces row-level
    security on her table with a policy calling her function, which records current_user and
    whether it is a superuser; she also adds a column default and a CHECK with her function, and
    an index expression on the source, then watch(adopt => 'vec').
    Safe outcome: every recorded call is the owner, none a superuser; the adoption succeeds."""
    o = make_role("rv5_rls_owner")
    db.execute(f"GRANT EXECUTE ON FUNCTION {EXECUTE_WATCH} TO \"{o}\"")
    db.execute("CREATE TABLE calls (who text, su boolean, via text)")
    db.execute("GRANT INSERT ON calls TO PUBLIC")
    with connect_as(o, db.schema) as c:
        c.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, vec vector(384))")
        c.execute(f"""CREATE FUNCTION rec(via text) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
                      BEGIN
                        INSERT INTO "{db.schema}".calls VALUES (current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), via);
                        RETURN true;
                      END $$""")
        c.execute("INSERT INTO docs SELECT i, 'note ' || i || ' on ' || (ARRAY['larks', 'tides', 'ink'])[1 + i % 3] "
                  "FROM generate_series(1, 40) i")
        c.execute("UPDATE docs SET vec = embed_text(body)")
        c.execute("ALTER TABLE docs ENABLE ROW LEVEL SECURITY")
        c.execute("ALTER TABLE docs FORCE ROW LEVEL SECURITY")
        c.execute("CREATE POLICY p ON docs USING (rec('policy'))")
        c.execute(f"""CREATE FUNCTION imm(t text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
                      BEGIN PERFORM "{db.schema}".rec('index'); RETURN t; END $$""")
        c.execute("CREATE INDEX ON docs (imm(body))")
        db.execute("DELETE FROM calls")
        side = one(c, "SELECT embed_sidecar.watch('docs', 'body', adopt => 'vec')::text")
        assert one(c, f"SELECT count(*) FROM {side}") == 40
    calls = db.execute("SELECT who, su, via, count(*) FROM calls GROUP BY 1, 2, 3").fetchall()
    assert calls, "the owner's policy never ran (FORCE RLS)"
    assert all(who == o and su is False for who, su, _, _ in calls), f"owner's code ran as someone else: {calls}"


def test_writer_racing_an_adoption_gets_no_wrong_vector_adopted(db, make_role):
    """Promise: the adopted vectors are the column's for rows whose content hash is the row's
    current content; a sample that agrees cannot be used by someone who is not the owner to get
    wrong vectors adopted for the other rows.
    Attack: a writer with UPDATE on the text (not the vector column) starts changing rows' text
    the moment watch(adopt) holds its table lock, racing the sample and the copy: a change landing
    between the two would be copied with the new text's hash and the old text's vector, which the
    drain then takes for current. (Changes made before watch() starts are the column's own
    staleness: the "sample agreed" risk the owner is told about, not this attack.)
    Safe outcome: after the writer stops and the drain is done, every sidecar vector is the
    model's vector of its row's current text."""
    o = make_role("rv5_adopter")
    w = make_role("rv5_racer")
    _fill(db, rows=200)
    db.execute(f'ALTER TABLE docs OWNER TO "{o}"')
    db.execute(f"GRANT EXECUTE ON FUNCTION {EXECUTE_WATCH} TO \"{o}\"")
    db.execute(f'GRANT SELECT, UPDATE (body) ON docs TO "{w}"')
    result = {}

    def watcher():
        with connect_as(o, db.schema) as c:
            result["side"] = one(c, "SELECT embed_sidecar.watch('docs', 'body', adopt => 'vec')::text")

    t = threading.Thread(target=watcher)
    t.start()
    locked = wait_until(lambda: one(db, """SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                                            WHERE l.relation = 'docs'::regclass AND l.granted
                                              AND l.mode = 'ShareRowExclusiveLock' AND a.usename = %s""", (o,)), 30, 0.01)
    changed = 0
    with connect_as(w, db.schema) as c:
        for k in range(1, 201, 3):
            c.execute("UPDATE docs SET body = 'rewritten: a poem about anchors, number ' || id WHERE id = %s", (k,))
            changed += 1
    t.join(120)
    assert locked and changed and result.get("side"), (locked, changed, result)
    wait(db, "docs", 120)
    assert_in_step(db, "docs", content="body")
    bad = vectors_match_content(db, "docs", result["side"])
    assert bad == [], f"rows adopted with another text's vector: {bad}"
