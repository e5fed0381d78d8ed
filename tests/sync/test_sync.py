"""watch(..., sync => true): a writer's small change is embedded inside the writer's transaction
when the inference service has room (src/drain/sync.rs), so the writer reads its own vector before
commit; anything else (a long text, a large statement, any error) waits for the drain, and the
write never fails because of inference. The keys are queued either way: the drain then only acks."""
import os

import numpy as np
import pytest

from conftest import assert_in_step, connect_as, error_of, one, queue_depth, wait, watch


def vec(text):
    return np.array([float(x) for x in text.strip("[]").split(",")])


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def stored(conn, side, key):
    """(vector, embedded_at) of a sidecar row, or None."""
    row = conn.execute(f"SELECT embedding::text, embedded_at FROM {side} WHERE id = %s", (key,)).fetchone()
    return (vec(row[0]), row[1]) if row else None


def vectors_written(conn, table):
    return one(conn, "SELECT vectors_written FROM embed_sidecar.status WHERE source = %s::regclass", (table,))


@pytest.fixture
def notes(db):
    """A sync-watched table (empty, in step), with the inference service running."""
    assert one(db, "SELECT workers FROM embed_sidecar.inference_service()") >= 1, "the inference service is not running"
    db.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    side = watch(db, "notes", sync=True)
    assert one(db, "SELECT sync FROM embed_sidecar.sources WHERE source = 'notes'::regclass")
    return side


def test_insert_is_embedded_inside_the_writers_transaction(db, notes):
    text = "the kettle boils at dawn"
    expected = vec(one(db, "SELECT embed_text(%s)::text", (text,)))
    with db.transaction():
        db.execute("INSERT INTO notes VALUES (1, %s)", (text,))
        inside = stored(db, notes, 1)
        assert inside is not None, "no vector inside the writer's transaction"
        assert cos(inside[0], expected) > 0.9999
    wait(db, "notes")
    assert queue_depth(db, "notes") == 0
    after = stored(db, notes, 1)
    # the drain found it unchanged: acked, not embedded again
    assert np.array_equal(after[0], inside[0]) and after[1] == inside[1]
    assert vectors_written(db, "notes") == 0
    assert_in_step(db, "notes")


def test_update_moves_the_vector_before_commit(db, notes):
    db.execute("INSERT INTO notes VALUES (1, 'a timetable of northern trains')")
    wait(db, "notes")
    new = "a cat asleep on a warm windowsill"
    expected = vec(one(db, "SELECT embed_text(%s)::text", (new,)))
    with db.transaction():
        db.execute("UPDATE notes SET body = %s WHERE id = 1", (new,))
        inside = stored(db, notes, 1)
        assert cos(inside[0], expected) > 0.9999
        assert one(db, f"SELECT content_hash = sha256(convert_to(%s, 'UTF8')) FROM {notes} WHERE id = 1", (new,))
    wait(db, "notes")
    assert_in_step(db, "notes")


def test_long_texts_and_large_statements_wait_for_the_drain(db, notes):
    long = "a paragraph of a long document about rivers and their deltas. " * 40  # > 2,000 bytes
    assert len(long.encode()) > 2000
    with db.transaction():
        db.execute("INSERT INTO notes VALUES (1, %s)", (long,))
        assert stored(db, notes, 1) is None
    with db.transaction():
        db.execute("INSERT INTO notes SELECT i, 'short row ' || i FROM generate_series(10, 29) i")  # 20 rows > 16
        assert one(db, f"SELECT count(*) FROM {notes}") == 0
    wait(db, "notes")
    assert one(db, f"SELECT count(*) FROM {notes}") == 21
    assert_in_step(db, "notes")


def test_a_plain_watch_is_not_embedded_inside_the_transaction(db):
    db.execute("CREATE TABLE plain (id int PRIMARY KEY, body text)")
    side = watch(db, "plain")
    with db.transaction():
        db.execute("INSERT INTO plain VALUES (1, 'nothing special')")
        assert stored(db, side, 1) is None
    wait(db, "plain")
    assert_in_step(db, "plain", content="body")


def test_a_failing_inference_never_fails_the_write(db, notes):
    db.execute("SET pg_embed_sidecar.test_fail_marker = 'POISON'")
    with db.transaction():
        db.execute("INSERT INTO notes VALUES (1, 'a POISON pill in the text')")
        assert stored(db, notes, 1) is None
        db.execute("INSERT INTO notes VALUES (2, 'a healthy text')")
        assert stored(db, notes, 2) is not None  # the failed step rolled back alone
    db.execute("RESET pg_embed_sidecar.test_fail_marker")
    wait(db, "notes")  # the drain (without the marker) embeds it
    assert_in_step(db, "notes")


def test_a_missing_model_never_fails_the_write(db, model_copy):
    alt = model_copy("sync-outage")
    db.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    side = watch(db, "notes", model="sync-outage", sync=True)
    os.rename(alt, alt + ".away")
    try:
        with db.transaction():
            db.execute("INSERT INTO notes VALUES (1, 'written during the outage')")
            assert stored(db, side, 1) is None
        assert queue_depth(db, "notes") == 1
    finally:
        os.rename(alt + ".away", alt)
    wait(db, "notes", 60)
    assert_in_step(db, "notes")


def test_a_rollback_leaves_no_vector(db, notes):
    db.execute("BEGIN")
    db.execute("INSERT INTO notes VALUES (1, 'soon undone')")
    assert stored(db, notes, 1) is not None
    db.execute("ROLLBACK")
    assert stored(db, notes, 1) is None
    wait(db, "notes")
    assert one(db, f"SELECT count(*) FROM {notes}") == 0
    assert queue_depth(db, "notes") == 0


def test_an_ordinary_writer_gets_sync_but_cannot_embed_tables_it_may_not_write(db, notes, make_role):
    writer = make_role("sync_writer")
    db.execute("GRANT INSERT, SELECT ON notes TO sync_writer")
    db.execute("CREATE TABLE secret (id int PRIMARY KEY, body text)")
    watch(db, "secret", sync=True)
    secret_id = one(db, "SELECT id FROM embed_sidecar.sources WHERE source = 'secret'::regclass")
    secret_side = one(db, "SELECT sidecar::text FROM embed_sidecar.sources WHERE source = 'secret'::regclass")
    one(db, "SELECT embed_sidecar.pause('secret')")
    db.execute("INSERT INTO secret VALUES (1, 'classified')")  # paused: not embedded, not drained
    assert not one(db, "SELECT has_table_privilege('sync_writer', %s, 'INSERT, UPDATE')", (notes,))
    with connect_as(writer, db.schema) as w:
        with w.transaction():
            w.execute("INSERT INTO notes VALUES (1, 'written by an ordinary role')")
            assert one(w, f"SELECT count(*) FROM {notes} WHERE id = 1") == 1
        err = error_of(w, "SELECT embed_sidecar._embed_now(%s, ARRAY['[1]'])", (secret_id,))
        assert err and err[0] == "42501" and "may not embed changes of table" in err[1], err
        # nor on its own table by hand, as someone else: the check is the writer's INSERT/UPDATE right
        assert one(w, "SELECT embed_sidecar._embed_now(%s, ARRAY['[1]'])",
                   (one(db, "SELECT id FROM embed_sidecar.sources WHERE source = 'notes'::regclass"),)) == 0  # unchanged
    assert one(db, f"SELECT count(*) FROM {secret_side}") == 0
    wait(db, "notes")
    assert_in_step(db, "notes")
