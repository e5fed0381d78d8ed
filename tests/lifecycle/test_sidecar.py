"""The sidecar engine end to end, with the background worker really running."""
import json
import os
import signal
import time

import numpy as np
import pytest

from conftest import watch, assert_in_step, connect, connect_after_reset, one, queue_depth, wait, worker_pid


def vec(text):
    return np.array([float(x) for x in text.strip("[]").split(",")])




def test_backfill_of_existing_rows_matches_embed_text(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, note text)")
    db.execute("INSERT INTO docs SELECT i, 'existing document ' || i || ' about topic ' || (i % 17), 'x' "
               "FROM generate_series(1, 2000) i")
    assert watch(db, "docs") == "docs_embeddings"
    wait(db, "docs")
    assert_in_step(db, "docs")
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 2000
    # each stored vector equals embed_text(content) computed now, in this session
    worst = one(db, "SELECT min(1 - (e.embedding <=> embed_text(d.body))) FROM docs d JOIN docs_embeddings e USING (id)")
    assert worst >= 0.9999, worst
    dims, model = db.execute("SELECT vector_dims(embedding), model FROM docs_embeddings LIMIT 1").fetchone()
    assert dims == 384 and model.startswith("all-MiniLM-L6-v2@")


def test_insert_update_delete_truncate(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, note text)")
    watch(db, "docs")
    one(db, "SELECT embed_sidecar.pause('docs')")  # hold the queue still while we count messages
    db.execute("SET track_functions = 'all'")
    with db.transaction():
        db.execute("INSERT INTO docs SELECT i, 'doc ' || i, 'n' FROM generate_series(1, 1000) i")
        calls = one(db, "SELECT calls FROM pg_stat_xact_user_functions WHERE schemaname = 'pgmq' AND funcname = 'send_batch'")
    assert calls == 1, "a 1000-row INSERT must cost one batched enqueue"
    assert queue_depth(db, "docs") == 1000
    one(db, "SELECT embed_sidecar.resume('docs')")
    wait(db, "docs")
    assert_in_step(db, "docs")
    assert queue_depth(db, "docs") == 0

    # content update of 100 rows: re-embedded with the new hash
    old = dict(db.execute("SELECT id, content_hash FROM docs_embeddings WHERE id <= 100").fetchall())
    one(db, "SELECT embed_sidecar.pause('docs')")
    db.execute("UPDATE docs SET body = body || ' (revised)' WHERE id <= 100")
    assert queue_depth(db, "docs") == 100
    # non-content update of 100 other rows: nothing enqueued
    db.execute("UPDATE docs SET note = 'changed' WHERE id BETWEEN 101 AND 200")
    # an update that writes the same content: nothing enqueued either
    db.execute("UPDATE docs SET body = body WHERE id BETWEEN 201 AND 300")
    assert queue_depth(db, "docs") == 100
    one(db, "SELECT embed_sidecar.resume('docs')")
    wait(db, "docs")
    assert_in_step(db, "docs")
    new = dict(db.execute("SELECT id, content_hash FROM docs_embeddings WHERE id <= 100").fetchall())
    assert all(new[i] != old[i] for i in old)
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 1000

    # delete: sidecar rows go with them (FK cascade, no queue traffic)
    db.execute("DELETE FROM docs WHERE id > 900")
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 900
    assert queue_depth(db, "docs") == 0

    # key change: the vector moves with the row (ON UPDATE CASCADE)
    db.execute("UPDATE docs SET id = id + 10000 WHERE id = 1")
    assert one(db, "SELECT count(*) FROM docs_embeddings WHERE id = 10001") == 1
    wait(db, "docs")
    assert_in_step(db, "docs")

    # truncate: a plain TRUNCATE is refused by the FK; CASCADE empties the sidecar with it
    with pytest.raises(Exception, match="referenced in a foreign key"):
        db.execute("TRUNCATE docs")
    db.execute("TRUNCATE docs CASCADE")
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 0
    wait(db, "docs")


def test_composite_and_text_keys(db):
    db.execute("CREATE TABLE pages (site text, path text, lang char(2), body text, PRIMARY KEY (site, path, lang))")
    db.execute("INSERT INTO pages SELECT 's' || (i % 3), '/p/' || i, 'en', 'page ' || i FROM generate_series(1, 300) i")
    watch(db, "pages")
    db.execute("INSERT INTO pages VALUES ('é site', 'a \"quoted\" path', 'fr', 'bonjour le monde')")
    wait(db, "pages")
    assert_in_step(db, "pages", keys="site, path, lang")
    assert one(db, "SELECT count(*) FROM pages_embeddings") == 301
    db.execute("UPDATE pages SET body = 'changed' WHERE site = 's1'")
    wait(db, "pages")
    assert_in_step(db, "pages", keys="site, path, lang")

    db.execute("CREATE TABLE notes (slug text PRIMARY KEY, body varchar(200))")
    db.execute("INSERT INTO notes VALUES ('a', 'alpha'), ('b', 'beta'), ('c', 'gamma')")
    watch(db, "notes")
    wait(db, "notes")
    assert_in_step(db, "notes", keys="slug")


def test_null_empty_and_blank_content_get_no_vector(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs VALUES (1, NULL), (2, ''), (3, '   '), (4, E'\\t\\n'), (5, 'real text')")
    watch(db, "docs")
    wait(db, "docs")
    assert db.execute("SELECT id FROM docs_embeddings ORDER BY id").fetchall() == [(5,)]
    # text → blank removes the vector; blank → text adds one
    db.execute("UPDATE docs SET body = NULL WHERE id = 5")
    db.execute("UPDATE docs SET body = 'now it has text' WHERE id = 1")
    wait(db, "docs")
    assert db.execute("SELECT id FROM docs_embeddings ORDER BY id").fetchall() == [(1,)]
    assert_in_step(db, "docs")
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 0


def test_process_without_worker_gives_the_same_state(db):
    db.execute("CREATE TABLE a (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO a SELECT i, 'process me ' || i FROM generate_series(1, 300) i")
    watch(db, "a", backfill=False)
    one(db, "SELECT embed_sidecar.pause('a')")  # the worker skips paused sources
    one(db, "SELECT embed_sidecar.reembed('a')")
    assert queue_depth(db, "a") == 300
    assert one(db, "SELECT embed_sidecar.process('a', 100)") == 100
    assert one(db, "SELECT count(*) FROM a_embeddings") == 100
    assert one(db, "SELECT embed_sidecar.process('a')") == 200
    assert queue_depth(db, "a") == 0
    assert_in_step(db, "a")
    got = dict(db.execute("SELECT id, embedding::text FROM a_embeddings").fetchall())
    # same vectors as the worker path would write: compare with a worker-drained twin table
    db.execute("CREATE TABLE b (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO b SELECT id, body FROM a")
    watch(db, "b")
    wait(db, "b")
    for i, e in db.execute("SELECT id, embedding::text FROM b_embeddings").fetchall():
        assert float(vec(e) @ vec(got[i])) > 0.9999


def test_poison_row_is_isolated_dead_lettered_and_replayable(db):
    db.execute("SET pg_embed_sidecar.test_fail_marker = 'POISON'")
    db.execute("SET pg_embed_sidecar.max_attempts = 2")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs")
    one(db, "SELECT embed_sidecar.pause('docs')")
    db.execute("INSERT INTO docs SELECT i, CASE WHEN i = 7 THEN 'bad POISON row' ELSE 'good row ' || i END "
               "FROM generate_series(1, 40) i")
    one(db, "SELECT embed_sidecar.process('docs')")
    # every good row of the same batch went through
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 39
    assert queue_depth(db, "docs") == 1
    deadline = time.time() + 30
    while time.time() < deadline and one(db, "SELECT count(*) FROM embed_sidecar.failures") == 0:
        time.sleep(0.5)  # retried after a 2 s back-off, then dead-lettered at attempt 2
        one(db, "SELECT embed_sidecar.process('docs')")
    key, error, attempts = db.execute("SELECT key::text, error, attempts FROM embed_sidecar.failures").fetchone()
    assert key == "[7]" and "injected failure" in error and attempts == 2
    st = db.execute("SELECT failed, pending, dead_lettered FROM embed_sidecar.status WHERE source = 'docs'::regclass").fetchone()
    assert st == (1, 0, 1)
    assert one(db, "SELECT missing FROM embed_sidecar.verify('docs')") == 1
    # a dead letter settles the row: wait() does not hang on it
    assert one(db, "SELECT embed_sidecar.wait('docs', '5 s')") is True
    # the cause goes away; the dead letter is replayed
    db.execute("RESET pg_embed_sidecar.test_fail_marker")
    assert one(db, "SELECT embed_sidecar.retry_failed('docs')") == 1
    one(db, "SELECT embed_sidecar.process('docs')")
    assert one(db, "SELECT count(*) FROM embed_sidecar.failures") == 0
    assert_in_step(db, "docs")


def test_model_change_builds_a_shadow_while_the_old_vectors_serve(db, model_copy):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'model test ' || i FROM generate_series(1, 50) i")
    watch(db, "docs")
    wait(db, "docs")
    # a second model directory with the same files under another name is another model
    model_copy("minilm-switch")
    one(db, "SELECT embed_sidecar.pause('docs')")
    assert one(db, "SELECT embed_sidecar.set_model('docs', 'minilm-switch')") == 50
    # until the shadow is complete, search reads the old sidecar, which is untouched
    assert one(db, "SELECT sidecar::text FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'") \
        == "docs_embeddings"
    assert one(db, "SELECT stale + missing FROM embed_sidecar.verify('docs')") == 0
    assert len(db.execute("SELECT * FROM embed_sidecar.search('docs', 'model test 7', 5)").fetchall()) == 5
    assert one(db, "SELECT bulk_pending FROM embed_sidecar.status WHERE source = 'docs'::regclass AND role = 'shadow'") == 50
    one(db, "SELECT embed_sidecar.resume('docs')")
    wait(db, "docs")
    one(db, "SELECT embed_sidecar.process('docs')")  # the pass that finds the shadow's lanes empty swaps it in
    roles = dict(db.execute("SELECT role, model FROM embed_sidecar.sources WHERE source = 'docs'::regclass").fetchall())
    assert roles == {"current": "minilm-switch", "previous": "all-MiniLM-L6-v2"}
    assert_in_step(db, "docs")
    assert_in_step(db, "docs", role="previous")
    one(db, "SELECT embed_sidecar.drop_previous('docs')")
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == 1
    assert one(db, "SELECT to_regclass('docs_embeddings')") is None


def test_worker_restart_mid_drain_loses_nothing(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'restart test row ' || i || repeat(' filler', i % 40) FROM generate_series(1, 3000) i")
    watch(db, "docs")
    schema = db.schema
    time.sleep(1.0)
    os.kill(worker_pid(), signal.SIGTERM)  # clean stop between batches; restarted after 5 s
    time.sleep(1.0)
    os.kill(worker_pid(), signal.SIGKILL)  # crash: the postmaster resets every backend
    conn = connect_after_reset(db)
    conn.execute(f'SET search_path = "{schema}", public')
    worker_pid()  # it came back
    # messages the killed worker had read reappear after the visibility timeout (60 s default)
    wait(conn, "docs", seconds=180)
    assert_in_step(conn, "docs")
    assert one(conn, "SELECT count(*) FROM docs_embeddings") == 3000
    assert one(conn, "SELECT failed FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 0
    conn.close()


def test_consistency_after_concurrent_process_and_worker(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'concurrent ' || i FROM generate_series(1, 1500) i")
    watch(db, "docs")
    others = [connect() for _ in range(2)]
    for o in others:
        o.execute(f'SET search_path = "{db.schema}", public')
    import threading
    errors = []

    def drain(c):
        try:
            while one(c, "SELECT embed_sidecar.process('docs', 200)") > 0:
                pass
        except Exception as e:  # a deadlock or any error fails the test
            errors.append(e)

    threads = [threading.Thread(target=drain, args=(o,)) for o in others]
    for t in threads:
        t.start()
    db.execute("UPDATE docs SET body = body || ' v2' WHERE id % 3 = 0")
    for t in threads:
        t.join()
    assert errors == []
    wait(db, "docs")
    assert_in_step(db, "docs")
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 1500


@pytest.mark.parametrize("changed", ["model.onnx", "tokenizer.json"])
def test_model_file_replaced_in_place_is_noticed(db, changed, model_copy):
    """A changed file under the same model name is a new model: vectors are re-embedded. The
    identity covers the tokenizer too (replacing it used to re-embed nothing)."""
    alt = model_copy("swap-test")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'swap ' || i FROM generate_series(1, 30) i")
    watch(db, "docs", model="swap-test")
    wait(db, "docs")
    before = one(db, "SELECT min(model) FROM docs_embeddings")
    if changed == "model.onnx":
        # append an unknown protobuf field (tag 1000, varint 0): same graph, different sha256
        with open(f"{alt}/model.onnx", "ab") as f:
            f.write(b"\xc0\x3e\x00")
    else:
        # the same vocabulary written out differently: other bytes, same tokens
        with open(f"{alt}/tokenizer.json") as f:
            tok = json.load(f)
        with open(f"{alt}/tokenizer.json", "w") as f:
            json.dump(tok, f, indent=1)
    db.execute("INSERT INTO docs VALUES (31, 'a new row makes the worker look at the model')")
    wait(db, "docs")
    assert_in_step(db, "docs")
    after = one(db, "SELECT min(model) FROM docs_embeddings")
    # the name part comes from the copied manifest; the hash part is the files'
    assert before.split("@")[0] == after.split("@")[0] and before.split("@")[1] != after.split("@")[1]
    assert one(db, "SELECT count(DISTINCT model) FROM docs_embeddings") == 1


def test_commit_wakes_the_worker(db):
    """With a 60 s heartbeat the worker still embeds committed rows at once: a commit that
    enqueued sets the worker's latch (the wake on commit)."""
    with connect(dbname="postgres") as c:
        c.execute("ALTER SYSTEM SET pg_embed_sidecar.idle_naptime = '60s'")
        c.execute("SELECT pg_reload_conf()")
    try:
        db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        watch(db, "docs")
        time.sleep(1.5)  # the worker has read the new heartbeat and is napping
        for i in range(5):
            db.execute("INSERT INTO docs VALUES (%s, %s)", (i, f"wake up {i}"))
            assert one(db, "SELECT embed_sidecar.wait('docs', '10 s')"), f"row {i} waited for the heartbeat"
            time.sleep(0.3)
        assert_in_step(db, "docs")
    finally:
        with connect(dbname="postgres") as c:
            c.execute("ALTER SYSTEM RESET pg_embed_sidecar.idle_naptime")
            c.execute("SELECT pg_reload_conf()")


def test_writers_changes_go_before_the_backfill(db):
    """Two lanes: a row a writer inserts while a backfill runs is embedded before the backfill
    is through, and status shows the backfill's progress."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'backfill row ' || i || ' about ' || md5(i::text) FROM generate_series(1, 3000) i")
    watch(db, "docs")
    overtaken = []
    for i in range(5):
        db.execute("INSERT INTO docs VALUES (%s, %s)", (10_000 + i, f"a writer's row {i}"))
        while not one(db, "SELECT count(*) FROM docs_embeddings WHERE id = %s", (10_000 + i,)):
            time.sleep(0.01)
        bulk_pending, progress = db.execute(
            "SELECT bulk_pending, bulk_progress FROM embed_sidecar.status WHERE source = 'docs'::regclass").fetchone()
        overtaken.append((bulk_pending, progress))
    assert all(pending > 0 and 0 <= progress < 1 for pending, progress in overtaken), overtaken
    assert overtaken[0][1] <= overtaken[-1][1]  # progress only grows
    wait(db, "docs", 300)
    assert_in_step(db, "docs")
    assert db.execute("SELECT bulk_pending, bulk_progress FROM embed_sidecar.status WHERE source = 'docs'::regclass").fetchone() \
        == (0, 1)


def test_large_backfill_builds_its_index_once_at_the_end(db, model_copy):
    """The bulk path: a backfill of at least bulk_index_rows rows writes without the HNSW
    index, which the pass that finds the bulk lane empty builds in one statement; searches before
    that scan exactly. A small backfill gets the index up front; a model switch's shadow gets its
    index before it takes over."""
    db.execute("SET pg_embed_sidecar.bulk_index_rows = 30")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'bulk index row ' || i FROM generate_series(1, 40) i")
    with db.transaction():  # paused before the worker can see the backfill
        watch(db, "docs")
        one(db, "SELECT embed_sidecar.pause('docs')")
    hnsw = "SELECT count(*) FROM pg_indexes WHERE tablename = %s AND schemaname = current_schema() AND indexdef LIKE '%%USING hnsw%%'"
    pending = "SELECT index_pending FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'"
    assert one(db, hnsw, ("docs_embeddings",)) == 0 and one(db, pending) is True
    assert one(db, "SELECT embed_sidecar.process('docs', 20)") == 20
    assert one(db, hnsw, ("docs_embeddings",)) == 0  # the bulk lane is not empty yet
    assert [r[0] for r in db.execute("SELECT key FROM embed_sidecar.search('docs', 'bulk index row 7', 3)")][0] == [7]
    assert one(db, "SELECT embed_sidecar.process('docs')") == 20  # the rest; then the index
    assert one(db, hnsw, ("docs_embeddings",)) == 1 and one(db, pending) is False
    assert_in_step(db, "docs")
    # a backfill below the threshold: the index comes with the sidecar
    db.execute("CREATE TABLE small (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO small SELECT i, 'small row ' || i FROM generate_series(1, 5) i")
    watch(db, "small")
    assert one(db, hnsw, ("small_embeddings",)) == 1
    # a switch: the shadow's index exists before it is current
    model_copy("minilm-bulk-index")
    one(db, "SELECT embed_sidecar.resume('docs')")
    assert one(db, "SELECT embed_sidecar.set_model('docs', 'minilm-bulk-index')") == 40
    deadline = time.time() + 60
    while time.time() < deadline and one(db, "SELECT model FROM embed_sidecar.sources "
                                              "WHERE source = 'docs'::regclass AND role = 'current'") != "minilm-bulk-index":
        time.sleep(0.2)
    side = one(db, "SELECT sidecar::text FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'")
    assert side != "docs_embeddings" and one(db, hnsw, (side,)) == 1 and one(db, pending) is False
    assert_in_step(db, "docs")


def test_deferred_index_is_built_beside_the_drain(db):
    """A deferred HNSW index is built by a process of its own (src/bgw/index_builder.rs), so the
    database's drain worker goes on with its other tables meanwhile: the test hook
    test_index_build_delay_ms holds the builder 30 s before it builds, and a row written to another
    table in that time is embedded while the build is still pending (when the drain worker built
    the index itself, every other table waited for the build). A builder that is terminated is
    started again, and the index comes."""
    builders = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar index build' AND datname = current_database()"
    pending = "SELECT index_pending FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'"
    hnsw = "SELECT count(*) FROM pg_indexes WHERE tablename = 'docs_embeddings' AND schemaname = current_schema() AND indexdef LIKE '%%USING hnsw%%'"
    db.execute("CREATE TABLE others (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO others VALUES (1, 'another table of the same database')")
    watch(db, "others")
    wait(db, "others")
    dbname = one(db, "SELECT current_database()")
    db.execute(f'ALTER DATABASE "{dbname}" SET pg_embed_sidecar.test_index_build_delay_ms = 30000')
    try:
        db.execute("SET pg_embed_sidecar.bulk_index_rows = 30")
        db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        db.execute("INSERT INTO docs SELECT i, 'deferred index row ' || i FROM generate_series(1, 40) i")
        watch(db, "docs")
        assert one(db, pending) is True
        deadline = time.time() + 90
        while time.time() < deadline and not one(db, builders):
            time.sleep(0.1)
        builder = one(db, builders)
        assert builder, "no index builder started once the backfill was drained"
        assert one(db, "SELECT count(*) FROM docs_embeddings") == 40
        # the build waits 30 s; the drain meanwhile serves the other table
        db.execute("INSERT INTO others VALUES (2, 'written while the index of docs is being built')")
        wait(db, "others", 20)
        assert one(db, "SELECT count(*) FROM others_embeddings") == 2
        assert one(db, builders) == builder and one(db, pending) is True and one(db, hnsw) == 0
    finally:
        db.execute(f'ALTER DATABASE "{dbname}" RESET pg_embed_sidecar.test_index_build_delay_ms')
    # a builder that dies is replaced (without the delay now) and the index comes
    one(db, "SELECT pg_terminate_backend(%s)", (builder,))
    deadline = time.time() + 60
    while time.time() < deadline and one(db, pending):
        time.sleep(0.2)
    assert one(db, pending) is False and one(db, hnsw) == 1
    assert_in_step(db, "docs")
    assert_in_step(db, "others")
