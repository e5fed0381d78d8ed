"""Crashes, concurrent writers, hostile input, privileges, resource bounds, upgrades.

Short variants run by default; PES_LONG=1 runs the long ones (60 s of writers, 20k rows,
100k embed_text calls)."""
import os
import shutil
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import PG_BIN, PG_SHAREDIR, watch, error_of, DSN, assert_in_step, connect, one, queue_depth, wait, worker_pid, quiet_database

LONG = os.environ.get("PES_LONG") == "1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))






def writer(schema, stop, seed, errors):
    """Mixed INSERT / content UPDATE / other-column UPDATE / DELETE until stop is set."""
    try:
        with connect() as c:
            c.execute(f'SET search_path = "{schema}", public')
            i = 0
            while not stop.is_set():
                k = seed * 1_000_000 + i
                op = i % 4
                if op == 0:
                    c.execute("INSERT INTO docs VALUES (%s, %s, 0) ON CONFLICT DO NOTHING", (k, f"writer {seed} row {i}"))
                elif op == 1:
                    c.execute("UPDATE docs SET body = body || '+' WHERE id = (SELECT id FROM docs ORDER BY random() LIMIT 1)")
                elif op == 2:
                    c.execute("UPDATE docs SET n = n + 1 WHERE id = (SELECT id FROM docs ORDER BY random() LIMIT 1)")
                else:
                    c.execute("DELETE FROM docs WHERE id = (SELECT id FROM docs ORDER BY random() LIMIT 1)")
                i += 1
    except psycopg.OperationalError:
        pass  # the server went away under a crash test: expected
    except Exception as e:
        errors.append(e)


def start_writers(schema, n=4):
    stop, errors = threading.Event(), []
    threads = [threading.Thread(target=writer, args=(schema, stop, s + 1, errors)) for s in range(n)]
    for t in threads:
        t.start()
    return stop, threads, errors


def test_concurrent_writers_keep_the_invariant(db):
    db.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text, n int)")
    db.execute("INSERT INTO docs SELECT i, 'seed row ' || i, 0 FROM generate_series(1, 2000) i")
    watch(db, "docs")
    stop, threads, errors = start_writers(db.schema)
    # two process() callers next to the worker: no deadlock, no double work visible
    def drain():
        try:
            with connect() as c:
                c.execute(f'SET search_path = "{db.schema}", public')
                while not stop.is_set():
                    c.execute("SELECT embed_sidecar.process('docs', 100)")
        except Exception as e:
            errors.append(e)
    drainers = [threading.Thread(target=drain) for _ in range(2)]
    for t in drainers:
        t.start()
    time.sleep(60 if LONG else 10)
    stop.set()
    for t in threads + drainers:
        t.join()
    assert errors == []
    wait(db, "docs", 300)
    assert_in_step(db, "docs")
    st = db.execute("SELECT failed, pending FROM embed_sidecar.status WHERE source = 'docs'::regclass").fetchone()
    assert st == (0, 0)
    assert db.execute("SELECT missing, stale, orphans FROM embed_sidecar.verify('docs')").fetchone() == (0, 0, 0)


def test_immediate_shutdown_mid_drain_loses_nothing(db):
    rows = 20_000 if LONG else 3_000
    db.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text, n int)")
    db.execute(f"INSERT INTO docs SELECT i, 'crash test ' || i, 0 FROM generate_series(1, {rows}) i")
    watch(db, "docs")
    schema = db.schema
    stop, threads, errors = start_writers(schema, 2)
    time.sleep(3)
    env = dict(os.environ, STOP_MODE="immediate")
    subprocess.run(["bash", os.path.join(REPO, "scripts/cluster.sh"), "stop"], check=True, env=env, capture_output=True)
    stop.set()
    for t in threads:
        t.join()
    subprocess.run(["bash", os.path.join(REPO, "scripts/cluster.sh"), "start"], check=True, capture_output=True)
    conn = connect()
    conn.execute(f'SET search_path = "{schema}", public')
    assert errors == []
    # messages in flight when the server died reappear after the visibility timeout
    wait(conn, "docs", 300)
    assert_in_step(conn, "docs")
    conn.close()


def test_hostile_identifiers_are_never_spliced(db):
    table, column = 'a"; DROP TABLE x;--', 'Body Text "quoted"'
    db.execute("CREATE TABLE x (id int)")  # the table the injection would drop
    db.execute(psycopg.sql.SQL("CREATE TABLE {} ({} int PRIMARY KEY, {} text)").format(
        psycopg.sql.Identifier(table), psycopg.sql.Identifier("Key Col"), psycopg.sql.Identifier(column)))
    qualified = psycopg.sql.Identifier(db.schema, table).as_string(db)
    db.execute(psycopg.sql.SQL("INSERT INTO {} VALUES (1, 'one'), (2, 'two')").format(psycopg.sql.Identifier(table)))
    side = one(db, "SELECT embed_sidecar.watch(%s::regclass, %s)::text", (qualified, column))
    assert 'DROP TABLE x;--_embeddings' in side
    db.execute(psycopg.sql.SQL("UPDATE {} SET {} = 'uno' WHERE {} = 1").format(
        psycopg.sql.Identifier(table), psycopg.sql.Identifier(column), psycopg.sql.Identifier("Key Col")))
    wait(db, qualified)
    assert one(db, "SELECT to_regclass('x') IS NOT NULL")
    assert one(db, f"SELECT count(*) FROM {side}") == 2
    assert one(db, "SELECT count(*) FROM embed_sidecar.search(%s::regclass, 'one', 5)", (qualified,)) == 2


def test_bad_calls_are_clean_errors(db):
    db.execute("CREATE TABLE nopk (body text)")
    assert error_of(db, "SELECT embed_sidecar.watch('nopk', 'body')")[0] == "42P16"
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    assert error_of(db, "SELECT embed_sidecar.watch('docs', 'nope')")[0] == "42703"
    assert error_of(db, "SELECT embed_sidecar.watch('docs', 'n')")[0] == "42804"
    assert error_of(db, "SELECT embed_sidecar.watch('missing_table', 'body')")[0] == "42P01"
    watch(db, "docs")
    state, msg, hint = error_of(db, "SELECT embed_sidecar.watch('docs', 'body')")
    assert state == "42710" and "already has an embedding" in msg and "unwatch" in hint
    assert error_of(db, "SELECT embed_sidecar.watch('docs_embeddings', 'model')")[0] == "42809"
    assert error_of(db, "SELECT embed_sidecar.process('nopk')")[0] == "42704"
    assert error_of(db, "SELECT embed_sidecar.process('docs', 0)")[0] == "22023"
    # unwatch, then watch again: a clean new start
    one(db, "SELECT embed_sidecar.unwatch('docs', drop_sidecar => true)")
    db.execute("INSERT INTO docs VALUES (1, 'back again', 0)")
    watch(db, "docs")
    wait(db, "docs")
    assert_in_step(db, "docs")
    assert error_of(db, "SELECT embed_sidecar.set_model('docs', 'no-such-model')")[0] == "58P01"
    assert error_of(db, "SELECT embed_sidecar.watch('docs', template => '{body}')")[0] == "22004"  # unnamed template
    assert error_of(db, "SELECT embed_sidecar.watch('docs', template => 'no columns', embedding => 'x')")[0] == "22023"
    assert error_of(db, "SELECT embed_sidecar.watch('docs', template => '{nope}', embedding => 'x')")[0] == "42703"
    assert error_of(db, "SELECT * FROM embed_sidecar.search('docs', 'q', embedding => 'nope')")[0] == "42704"
    state, _, hint = error_of(db, "SELECT embed_sidecar.rollback_model('docs')")
    assert state == "42704" and "set_model()" in hint


def test_huge_and_odd_texts(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs")
    one_mb = "lorem ipsum dolor " * 60_000
    fifty_mb = "x" * 50 * 2**20
    db.execute("INSERT INTO docs VALUES (1, %s), (2, %s), (3, %s), (4, %s)",
               (one_mb, fifty_mb, "控制\x01字符 🎉 עברית e\u0301", "\u200b\u200b"))
    wait(db, "docs", 180)
    assert_in_step(db, "docs")
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 4
    # the 50 MB text is cut to the window before tokenising: embedding it is as fast as a short one
    t0 = time.time()
    assert one(db, "SELECT vector_dims(embed_text(repeat('y', 50 * 1024 * 1024)))") == 384
    assert time.time() - t0 < 30


def test_drops_and_renames_while_watched(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs VALUES (1, 'one'), (2, 'two')")
    watch(db, "docs")
    wait(db, "docs")
    # renames keep working: the registry holds OIDs and attribute numbers
    db.execute("ALTER TABLE docs RENAME TO documents")
    db.execute("ALTER TABLE documents RENAME COLUMN body TO content")
    db.execute("INSERT INTO documents VALUES (3, 'three')")
    wait(db, "documents")
    assert_in_step(db, "documents", content="content")
    # dropping the content column stops watching, keeps the vectors
    db.execute("ALTER TABLE documents DROP COLUMN content")
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'documents'::regclass") == 0
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 3
    db.execute("INSERT INTO documents VALUES (4)")  # triggers are gone: plain inserts work
    # dropping a watched source drops its sidecar and queue with it
    db.execute("CREATE TABLE other (id int PRIMARY KEY, body text)")
    watch(db, "other")
    q = one(db, "SELECT queue_name FROM embed_sidecar.sources WHERE source = 'other'::regclass")
    db.execute("DROP TABLE other CASCADE")
    assert one(db, "SELECT to_regclass('other_embeddings')") is None
    assert one(db, "SELECT count(*) FROM pgmq.list_queues() WHERE queue_name = %s", (q,)) == 0


def test_queue_dropped_by_hand_does_not_stop_the_worker(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs")
    q = one(db, "SELECT queue_name FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    pid = worker_pid()
    one(db, "SELECT pgmq.drop_queue(%s)", (q,))
    # writes to the source now fail loudly (no silent loss) ...
    assert error_of(db, "INSERT INTO docs VALUES (1, 'x')") is not None
    time.sleep(2)
    assert worker_pid() == pid  # ... and the worker did not crash
    # unwatch + watch repairs it
    one(db, "SELECT embed_sidecar.unwatch('docs', true)")
    db.execute("INSERT INTO docs VALUES (1, 'x')")
    watch(db, "docs")
    wait(db, "docs")
    assert_in_step(db, "docs")


def test_missing_model_keeps_jobs_waiting_then_recovers(db, model_copy):
    alt = model_copy("outage-test")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs", model="outage-test")
    pid = worker_pid()
    os.rename(alt, alt + ".away")
    try:
        db.execute("INSERT INTO docs SELECT i, 'during the outage ' || i FROM generate_series(1, 50) i")
        time.sleep(8)  # the worker meets the missing model at least once
        assert queue_depth(db, "docs") == 50
        st = db.execute("SELECT failed, last_error FROM embed_sidecar.status WHERE source = 'docs'::regclass").fetchone()
        assert st[0] == 0  # no attempts burnt, nothing dead-lettered
        assert worker_pid() == pid  # no crash loop
    finally:
        os.rename(alt + ".away", alt)
    wait(db, "docs", 60)
    assert_in_step(db, "docs")


def test_search_path_hijack_has_no_effect(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs VALUES (1, 'alpha'), (2, 'beta')")
    with db.transaction():  # paused before the worker can see the backfill
        watch(db, "docs")
        one(db, "SELECT embed_sidecar.pause('docs')")
    # a schema ahead of everything, shadowing what the drain and status use
    db.execute(f'CREATE FUNCTION "{db.schema}".sha256(bytea) RETURNS bytea LANGUAGE sql AS $$ SELECT \'\\x00\'::bytea $$')
    db.execute(f'CREATE FUNCTION "{db.schema}".count(anyelement) RETURNS bigint LANGUAGE sql AS $$ SELECT 42::bigint $$')
    db.execute(f'CREATE FUNCTION "{db.schema}".to_tsvector(regconfig, text) RETURNS tsvector LANGUAGE sql AS $$ SELECT NULL::tsvector $$')
    db.execute(f'SET search_path = "{db.schema}", pg_catalog, public')
    assert one(db, "SELECT embed_sidecar.process('docs')") == 2
    assert one(db, "SELECT count(*) FROM embed_sidecar.status WHERE source = 'docs'::regclass AND pending = 0") == 1
    assert one(db, "SELECT missing FROM embed_sidecar.verify('docs')") == 0
    db.execute(f'SET search_path = "{db.schema}", public')  # check with the real functions
    assert_in_step(db, "docs")
    assert one(db, "SELECT count(*) FROM docs_embeddings WHERE fts IS NOT NULL AND content_hash <> '\\x00'") == 2


def test_privileges(db):
    db.execute("DROP ROLE IF EXISTS pes_owner; DROP ROLE IF EXISTS pes_other; DROP ROLE IF EXISTS pes_reader")
    db.execute("CREATE ROLE pes_owner LOGIN; CREATE ROLE pes_other LOGIN; CREATE ROLE pes_reader LOGIN")
    try:
        db.execute(f'GRANT USAGE, CREATE ON SCHEMA "{db.schema}" TO pes_owner, pes_other, pes_reader')
        db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        db.execute("ALTER TABLE docs OWNER TO pes_owner")
        db.execute("GRANT SELECT ON docs TO pes_reader")
        # management functions are not PUBLIC
        for f in ("watch(regclass,name,name,text,boolean,regconfig,text,text,boolean,int,int,text,name,boolean,name)", "unwatch(regclass,boolean,text)",
                  "process(regclass,integer)", "reembed(regclass,text)", "retry_failed(regclass,text)",
                  "set_model(regclass,text,text)", "rollback_model(regclass,text)", "drop_previous(regclass,text)"):
            assert not one(db, f"SELECT has_function_privilege('pes_other', 'embed_sidecar.{f}', 'EXECUTE')"), f
        # embed_text is, until revoked
        assert one(db, "SELECT has_function_privilege('pes_other', 'embed_text(text)', 'EXECUTE')")
        db.execute("GRANT EXECUTE ON FUNCTION embed_sidecar.watch(regclass,name,name,text,boolean,regconfig,text,text,boolean,int,int,text,name,boolean,name) TO pes_other, pes_owner")
        other = psycopg.connect(**{**DSN, "user": "pes_other"}, autocommit=True)
        other.execute(f'SET search_path = "{db.schema}", public')
        state, msg, _ = error_of(other, "SELECT embed_sidecar.watch('docs', 'body')")
        assert state == "42501" and "must be owner" in msg
        owner = psycopg.connect(**{**DSN, "user": "pes_owner"}, autocommit=True)
        owner.execute(f'SET search_path = "{db.schema}", public')
        owner.execute("INSERT INTO docs VALUES (1, 'owned text')")
        assert one(owner, "SELECT embed_sidecar.watch('docs', 'body')::text") == "docs_embeddings"
        # the sidecar has the source's owner and grants
        assert one(db, "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'docs_embeddings'::regclass") == "pes_owner"
        wait(db, "docs")
        reader = psycopg.connect(**{**DSN, "user": "pes_reader"}, autocommit=True)
        reader.execute(f'SET search_path = "{db.schema}", public')
        assert one(reader, "SELECT count(*) FROM docs_embeddings") == 1
        assert one(reader, "SELECT count(*) FROM embed_sidecar.search('docs', 'text', 3)") == 1
        assert error_of(other, "SELECT count(*) FROM docs_embeddings")[0] == "42501"
        assert error_of(other, "SELECT * FROM embed_sidecar.search('docs', 'text', 3)")[0] == "42501"
        assert one(other, "SELECT count(*) FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 0
        assert error_of(other, "SELECT * FROM embed_sidecar.sources")[0] == "42501"
        # embed_text is revocable
        db.execute("REVOKE EXECUTE ON FUNCTION embed_text(text), embed_sidecar._embed(text) FROM PUBLIC")
        try:
            assert error_of(other, "SELECT embed_text('x')")[0] == "42501"
        finally:
            db.execute("GRANT EXECUTE ON FUNCTION embed_text(text), embed_sidecar._embed(text) TO PUBLIC")
        for c in (other, owner, reader):
            c.close()
        one(db, "SELECT embed_sidecar.unwatch('docs', true)")
    finally:
        db.execute(f'DROP TABLE IF EXISTS "{db.schema}".docs CASCADE')
        db.execute("REVOKE ALL ON FUNCTION embed_sidecar.watch(regclass,name,name,text,boolean,regconfig,text,text,boolean,int,int,text,name,boolean,name) FROM pes_other, pes_owner")
        db.execute(f'REVOKE ALL ON SCHEMA "{db.schema}" FROM pes_owner, pes_other, pes_reader')
        db.execute("DROP ROLE pes_owner; DROP ROLE pes_other; DROP ROLE pes_reader")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def test_backend_memory_stays_flat():
    calls = 100_000 if LONG else 5_000
    with connect() as c:
        pid = one(c, "SELECT pg_backend_pid()")
        c.execute("SELECT embed_text('warm up')")
        curve = []
        step = calls // 10
        for i in range(10):
            c.execute(f"SELECT count(embed_text('memory probe ' || g)) FROM generate_series({i * step}, {(i + 1) * step - 1}) g")
            curve.append(rss_kb(pid))
    print("RSS (KiB) after each tenth of", calls, "calls:", curve)
    # after the first tenth (allocator warm-up) the curve must be flat: < 8 MiB drift
    assert max(curve[1:]) - curve[1] < 8 * 1024, curve


def test_cancel_and_statement_timeout_interrupt_promptly():
    with connect() as c:
        texts = [f"long running cancel test {i} " * 20 for i in range(3000)]
        c.execute("SET statement_timeout = '1s'")
        t0 = time.time()
        with pytest.raises(psycopg.errors.QueryCanceled):
            c.execute("SELECT embed_texts(%s::text[])", (texts,))
        assert time.time() - t0 < 5
        c.execute("RESET statement_timeout")
        assert one(c, "SELECT vector_dims(embed_text('still usable'))") == 384
        pid = one(c, "SELECT pg_backend_pid()")
        with connect() as killer:
            timer = threading.Timer(1.0, lambda: killer.execute("SELECT pg_cancel_backend(%s)", (pid,)))
            timer.start()
            t0 = time.time()
            with pytest.raises(psycopg.errors.QueryCanceled):
                c.execute("SELECT embed_texts(%s::text[])", (texts,))
            timer.join()
        assert time.time() - t0 < 5
        assert one(c, "SELECT vector_dims(embed_text('still usable'))") == 384


def hwm_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))


def peak_after(threads, batch_tokens, texts):
    """Threads and peak RSS of a fresh backend after one embed_texts call."""
    with connect() as c:
        c.execute("SET pg_embed_sidecar.inference = 'local'")  # these settings shape a session's own model
        c.execute(f"SET pg_embed_sidecar.intra_threads = {threads}")
        c.execute(f"SET pg_embed_sidecar.max_batch_tokens = {batch_tokens}")
        c.execute("SET pg_embed_sidecar.max_batch = 4096")
        pid = one(c, "SELECT pg_backend_pid()")
        c.execute("SELECT cardinality(embed_texts(%s::text[]))", (texts,))
        return len(os.listdir(f"/proc/{pid}/task")), hwm_kb(pid)


def test_threads_and_batch_memory_are_bounded_by_settings():
    texts = [f"token budget {i} " * 100 for i in range(64)]  # 64 texts at the 256-token window
    t1, small = peak_after(1, 256, texts)
    t2, _ = peak_after(2, 256, texts)
    t4, big = peak_after(4, 64 * 256, texts)
    print(f"threads: {t1} {t2} {t4}; peak RSS KiB with 256 vs 16384 tokens per batch: {small} vs {big}")
    # ONNX Runtime adds intra_threads - 1 pool threads to the backend's own
    assert t2 == t1 + 1 and t4 == t1 + 3, (t1, t2, t4)
    # 64 x 256 tokens in one call needs far more activation memory than one text at a time
    assert big - small > 50 * 1024, (small, big)


EXTENSION_OBJECTS = """
    SELECT p.oid::regprocedure::text, pg_get_function_result(p.oid), p.prosecdef, p.provolatile,
           coalesce(p.proconfig::text, ''), md5(p.prosrc), coalesce(p.proacl::text, '')
      FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass
      JOIN pg_extension e ON e.oid = d.refobjid WHERE e.extname = 'pg_embed_sidecar'
    UNION ALL
    SELECT c.oid::regclass::text, c.relkind::text, false, '', coalesce(c.reloptions::text, ''),
           coalesce(md5(pg_get_viewdef(c.oid)), ''), coalesce(c.relacl::text, '')
      FROM pg_class c JOIN pg_depend d ON d.objid = c.oid AND d.classid = 'pg_class'::regclass
      JOIN pg_extension e ON e.oid = d.refobjid WHERE e.extname = 'pg_embed_sidecar'
    UNION ALL
    SELECT t.oid::regtype::text, 'type', false, '', '', '', ''
      FROM pg_type t JOIN pg_depend d ON d.objid = t.oid AND d.classid = 'pg_type'::regclass
      JOIN pg_extension e ON e.oid = d.refobjid WHERE e.extname = 'pg_embed_sidecar'
    ORDER BY 1"""


def test_upgrade_from_0_1_0_through_0_2_0():
    """ALTER EXTENSION UPDATE from the released 0.1.0, through 0.2.0, gives exactly the objects of a
    fresh install (definitions, security, settings, grants), and watched tables keep draining:
    their vectors, pending messages and triggers carry over. A sidecar made before 0.3.0, which
    copied its table's grants (a writer could write it), is as private as its table after the
    update: SELECT only, under row security. Every upgrade script starts with the guard line. (A
    library newer than the SQL refuses management until the update: the test watches in 0.1.0.)"""
    for f in sorted(os.listdir(os.path.join(REPO, "sql"))):
        if f.startswith("pg_embed_sidecar--"):
            first = open(os.path.join(REPO, "sql", f)).readline()
            assert first.startswith('\\echo Use "ALTER EXTENSION pg_embed_sidecar UPDATE'), f
    released = os.path.join(PG_SHAREDIR, "extension", "pg_embed_sidecar--0.1.0.sql")
    if not os.path.exists(released):  # the released install script, kept in sql/released/
        shutil.copy(os.path.join(REPO, "sql/released/pg_embed_sidecar--0.1.0.sql"), released)
    for d in ("pes_upgrade", "pes_fresh"):
        quiet_database(d)  # the counts below are exact only if no worker drains
    try:
        with connect(dbname="pes_upgrade") as u:
            u.execute("CREATE EXTENSION pg_embed_sidecar VERSION '0.1.0' CASCADE")
            u.execute("DROP ROLE IF EXISTS pes_upgrade_writer")
            u.execute("CREATE ROLE pes_upgrade_writer")
            u.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
            u.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON docs TO pes_upgrade_writer")
            u.execute("INSERT INTO docs SELECT i, 'before the upgrade ' || i FROM generate_series(1, 30) i")
            watch(u, "docs")  # 0.1.0's backfill: 30 messages (the library drains only after the update)
            assert one(u, "SELECT has_table_privilege('pes_upgrade_writer', 'docs_embeddings', 'UPDATE')") is True
            u.execute("ALTER EXTENSION pg_embed_sidecar UPDATE TO '0.2.0'")
            u.execute("ALTER EXTENSION pg_embed_sidecar UPDATE")
            assert one(u, "SELECT extversion FROM pg_extension WHERE extname = 'pg_embed_sidecar'") == "0.3.0"
            assert queue_depth(u, "docs") == 30
            u.execute("INSERT INTO docs VALUES (31, 'after the upgrade')")  # the recreated triggers
            assert queue_depth(u, "docs") == 31
            assert one(u, "SELECT embed_sidecar.process('docs')") == 31
            assert_in_step(u, "docs")
            assert one(u, """SELECT array_agg(DISTINCT privilege_type)::text FROM pg_class c, aclexplode(c.relacl) a
                              WHERE c.oid = 'docs_embeddings'::regclass AND a.grantee <> c.relowner""") == "{SELECT}"
            assert one(u, "SELECT relrowsecurity FROM pg_class WHERE oid = 'docs_embeddings'::regclass") is True
            u.execute("CREATE TABLE more (id int PRIMARY KEY, body text)")
            assert watch(u, "more") == "more_embeddings"  # the new id sequence continues
            assert one(u, "SELECT array_agg(id ORDER BY id)::text FROM embed_sidecar.sources") == "{1,2}"
            upgraded = u.execute(EXTENSION_OBJECTS).fetchall()
        with connect(dbname="pes_fresh") as f:
            f.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
            fresh = f.execute(EXTENSION_OBJECTS).fetchall()
        assert [r for r in upgraded if r not in fresh] == [] and [r for r in fresh if r not in upgraded] == []
    finally:
        with connect(dbname="postgres") as c:
            for d in ("pes_upgrade", "pes_fresh"):
                c.execute(f"DROP DATABASE IF EXISTS {d} WITH (FORCE)")
            c.execute("DROP ROLE IF EXISTS pes_upgrade_writer")


def test_failing_source_is_isolated_and_its_error_shown(db, model_copy):
    """A source whose model is missing does not hold up the others, and its error is in
    status.last_error (the worker napped 5 s and the error never reached status)."""
    alt = model_copy("isolation-test")
    db.execute("CREATE TABLE broken (id int PRIMARY KEY, body text)")
    db.execute("CREATE TABLE healthy (id int PRIMARY KEY, body text)")
    watch(db, "broken", model="isolation-test")
    watch(db, "healthy")
    shutil.rmtree(alt)
    db.execute("INSERT INTO broken SELECT i, 'stuck ' || i FROM generate_series(1, 10) i")
    for i in range(5):
        db.execute("INSERT INTO healthy VALUES (%s, %s)", (i, f"flows {i}"))
        wait(db, "healthy", 30)
    assert_in_step(db, "healthy")
    err = one(db, "SELECT last_error FROM embed_sidecar.status WHERE source = 'broken'::regclass")
    assert err and "isolation-test" in err, err
    assert queue_depth(db, "broken") == 10  # nothing lost, nothing dead-lettered
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'broken'::regclass") == 0
    one(db, "SELECT embed_sidecar.unwatch('broken')")


def test_dump_and_restore_keep_watching(db):
    """pg_dump -Fc / pg_restore into a new database: registry, its sequence, dead letters, queues
    with pending messages and triggers all come along (the next watch() failed), also
    when the restored table numbers its columns anew (a column dropped before the content) and its
    content column was renamed after watch(): it is followed by name, never the next one."""
    src_db, dst_db = "pes_dump_src", "pes_dump_dst"
    pg_bin = PG_BIN
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {dst_db} WITH (FORCE)")
    quiet_database(src_db)  # only this test's process() calls drain here, so the counts are exact
    try:
        with connect(dbname=src_db) as s:
            s.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
            # a dropped column before the content and a renamed key: the restored table numbers
            # its columns anew (audit M6: the next column, "secret", was embedded instead of body)
            s.execute("CREATE TABLE docs (id int PRIMARY KEY, junk text, text_body text, secret text DEFAULT 'SECRET-TOKEN-123')")
            s.execute("ALTER TABLE docs DROP COLUMN junk")
            s.execute("INSERT INTO docs (id, text_body) SELECT i, 'restored row ' || i FROM generate_series(1, 30) i")
            watch(s, "docs", "text_body")
            s.execute("ALTER TABLE docs RENAME COLUMN text_body TO body")
            assert one(s, "SELECT embed_sidecar.process('docs', 10)") == 10  # 10 embedded, 20 pending
            s.execute("SET pg_embed_sidecar.test_fail_marker = 'POISON'")
            s.execute("SET pg_embed_sidecar.max_attempts = 1")
            s.execute("INSERT INTO docs VALUES (99, 'POISON row')")
            one(s, "SELECT embed_sidecar.process('docs', 5)")  # the poison row first (live lane), then backfill
            s.execute("UPDATE docs SET body = body WHERE id = 99")  # (an UPDATE to the same text enqueues nothing)
            while one(s, "SELECT count(*) FROM embed_sidecar.failures") == 0:
                one(s, "SELECT embed_sidecar.process('docs', 100)")
            pending = queue_depth(s, "docs")
        dump = "/tmp/pes_dump.custom"
        subprocess.run([f"{pg_bin}/pg_dump", "-Fc", "-h", DSN["host"], "-p", str(DSN["port"]), "-U", "postgres",
                        "-d", src_db, "-f", dump], check=True)
        quiet_database(dst_db)
        r = subprocess.run([f"{pg_bin}/pg_restore", "-h", DSN["host"], "-p", str(DSN["port"]), "-U", "postgres",
                            "-d", dst_db, dump], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with connect(dbname=dst_db) as d:
            assert one(d, "SELECT count(*) FROM docs_embeddings") >= 10
            assert one(d, "SELECT count(*) FROM embed_sidecar.failures") == 1
            assert queue_depth(d, "docs") == pending
            d.execute("INSERT INTO docs VALUES (100, 'written after the restore')")  # triggers came along
            assert queue_depth(d, "docs") == pending + 1
            while one(d, "SELECT embed_sidecar.process('docs', 100)") > 0:
                pass
            assert_in_step_except(d, "docs", missing_ok={99})
            assert one(d, "SELECT count(*) FROM docs_embeddings WHERE fts @@ 'secret'::tsquery") == 0
            assert one(d, "SELECT (embed_sidecar.verify('docs')).stale") == 0
            assert one(d, "SELECT embed_sidecar.reembed('docs')") == 1  # only the dead-lettered row
            # the view came along, the registry names it, and reembed() just redefined it
            assert one(d, "SELECT search_view::text FROM embed_sidecar.sources") == "docs_vectors"
            assert one(d, "SELECT count(*) FROM docs_vectors v WHERE (v.docs).body IS NOT NULL") == \
                one(d, "SELECT count(*) FROM docs_embeddings")
            # the registry's sequence came along: a new table can be watched
            d.execute("CREATE TABLE more (id int PRIMARY KEY, body text)")
            d.execute("INSERT INTO more VALUES (1, 'new after restore')")
            assert watch(d, "more") == "more_embeddings"
            one(d, "SELECT embed_sidecar.process('more')")
            assert_in_step(d, "more")
    finally:
        with connect(dbname="postgres") as c:
            for dbname in (src_db, dst_db):
                c.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def assert_in_step_except(conn, table, missing_ok):
    """assert_in_step, allowing the dead-lettered keys to lack a vector."""
    missing = {r[0] for r in conn.execute(
        f"SELECT s.id FROM {table} s LEFT JOIN {table}_embeddings e USING (id) WHERE e.id IS NULL").fetchall()}
    assert missing == missing_ok, missing
    stale = one(conn, f"""SELECT count(*) FROM {table} s JOIN {table}_embeddings e USING (id)
                          WHERE e.content_hash <> sha256(convert_to(s.body, 'UTF8'))""")
    assert stale == 0


def test_reinstalled_extension_starts_with_empty_queues():
    """DROP EXTENSION leaves pgmq's queue tables behind; a later watch() that gets the same
    registry id must not inherit their messages."""
    quiet_database("pes_reinstall")  # a worker would drain the queue this test counts
    try:
        with connect(dbname="pes_reinstall") as d:
            d.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
            d.execute("CREATE TABLE old (id int PRIMARY KEY, body text)")
            d.execute("INSERT INTO old SELECT i, 'left behind ' || i FROM generate_series(1, 10) i")
            watch(d, "old")
            d.execute("DROP EXTENSION pg_embed_sidecar CASCADE")
            assert one(d, "SELECT count(*) FROM pgmq.list_queues()") == 2  # pgmq keeps both lanes
            d.execute("CREATE EXTENSION pg_embed_sidecar")
            d.execute("CREATE TABLE new (id int PRIMARY KEY, body text)")
            d.execute("INSERT INTO new VALUES (1, 'fresh')")
            watch(d, "new")
            assert queue_depth(d, "new") == 1
    finally:
        with connect(dbname="postgres") as c:
            c.execute("DROP DATABASE IF EXISTS pes_reinstall WITH (FORCE)")
