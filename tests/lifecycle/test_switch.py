"""Several embeddings per table and the zero-gap model switch.

A reader runs search() in a loop while set_model() switches the embedding to another model of the
same dimension and to one of another dimension (a genuine 128-d model built with the onnx package:
tests/models/make_projected.py), with writers active. Every result list must come whole from one
model: its distances are checked against distances computed here from each model's own vectors."""
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import MODELS, assert_in_step, connect, one, wait, watch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L6, L3, P128 = "all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "proj128-test"
QUERY = "a database that keeps vectors next to the rows"
TOPICS = ["databases and indexes", "cooking pasta at home", "mountain hiking trails", "vector search engines",
          "football results", "gardening in spring", "tax returns", "jazz records", "train timetables", "coffee roasting"]


@pytest.fixture(scope="module")
def proj128():
    path = f"{MODELS}/{P128}"
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, f"{REPO_ROOT}/tests/models/make_projected.py", f"{MODELS}/{L6}", path], check=True)
    yield P128
    shutil.rmtree(path, ignore_errors=True)


def vectors(conn, model, texts):
    rows = conn.execute("SELECT embed_sidecar._embed_with(%s, t)::text FROM unnest(%s::text[]) t", (model, texts)).fetchall()
    return np.array([[float(x) for x in r[0].strip("[]{}").split(",")] for r in rows])


def reference_distances(conn, model, rows):
    """Cosine distance of the query to each stable row, from this model's own vectors."""
    q = vectors(conn, model, [QUERY])[0]
    m = vectors(conn, model, [body for _, body in rows])
    return {key: 1.0 - float(v @ q) for (key, _), v in zip(rows, m)}


def which_model(result, refs):
    """The models whose reference distances match every known row of one result list."""
    known = [(key, d) for key, d in result if key in next(iter(refs.values()))]
    assert len(known) >= 5, result
    return {name for name, ref in refs.items() if all(abs(ref[key] - d) < 2e-3 for key, d in known)}


class Reader(threading.Thread):
    def __init__(self, schema, table):
        super().__init__(daemon=True)
        self.schema, self.table, self.results, self.errors = schema, table, [], []
        self.stop = threading.Event()

    def run(self):
        with connect() as c:
            c.execute(f'SET search_path = "{self.schema}", public')
            while not self.stop.is_set():
                try:
                    rows = c.execute("SELECT key->>0, distance FROM embed_sidecar.search(%s, %s, 10)",
                                     (self.table, QUERY)).fetchall()
                    self.results.append([(int(k), d) for k, d in rows])
                except Exception as e:  # recorded, and the test fails on it
                    self.errors.append(repr(e))
                time.sleep(0.005)


def switch_under_load(db, target, writes=60):
    """set_model(target) with a reader and a writer running; returns the reader's models in order."""
    stable = db.execute("SELECT id, body FROM docs WHERE id <= 1000 ORDER BY id").fetchall()
    old = one(db, "SELECT model FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'")
    refs = {old: reference_distances(db, old, stable), target: reference_distances(db, target, stable)}
    reader = Reader(db.schema, "docs")
    reader.start()
    time.sleep(0.3)
    started = time.time()
    assert one(db, "SELECT embed_sidecar.set_model('docs', %s)", (target,)) == len(stable) + one(
        db, "SELECT count(*) FROM docs WHERE id > 1000")
    rnd = random.Random(11)
    for i in range(writes):  # live edits during the build, on rows outside the reference set
        db.execute("INSERT INTO docs VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                   (1001 + rnd.randrange(40), f"edited during the switch {i} {rnd.choice(TOPICS)}"))
        if i % 10 == 9:
            db.execute("DELETE FROM docs WHERE id = %s", (1001 + rnd.randrange(40),))
    deadline = time.time() + 120
    while one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'shadow'"):
        assert time.time() < deadline, "the shadow never took over"
        time.sleep(0.05)
    switch_s = time.time() - started
    time.sleep(0.3)
    reader.stop.set()
    reader.join()
    assert reader.errors == []
    assert all(len(r) == 10 for r in reader.results), "a search came back short or empty"
    seen = [which_model(r, refs) for r in reader.results]
    assert all(len(s) == 1 for s in seen), "a result list matches no model, or both"
    order = [s.pop() for s in seen]
    flips = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert order[0] == old and order[-1] == target and flips == 1, f"{order.count(old)} old, {order.count(target)} new, {flips} flips"
    print(f"switch {old} -> {target}: {len(stable) + 40} rows in {switch_s:.1f}s, {len(order)} searches, one flip")
    return refs


def make_docs(db, n=400):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    rnd = random.Random(5)
    db.execute("INSERT INTO docs SELECT i, 'note ' || i || ' about ' || t FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, i)",
               ([f"{rnd.choice(TOPICS)} and {rnd.choice(TOPICS)}" for _ in range(n)],))
    db.execute("INSERT INTO docs SELECT 1000 + i, 'writable row ' || i FROM generate_series(1, 40) i")
    watch(db, "docs")
    wait(db, "docs")


@pytest.mark.parametrize("target", [L3, "proj128"])
def test_search_never_mixes_models_during_a_switch(db, proj128, target):
    target = proj128 if target == "proj128" else target
    make_docs(db)
    refs = switch_under_load(db, target)
    wait(db, "docs")
    assert_in_step(db, "docs")  # the new current one
    assert_in_step(db, "docs", role="previous")  # and the replaced one, kept in step for rollback
    dims = one(db, "SELECT dims FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'")
    assert dims == (128 if target == P128 else 384)
    # rollback: one statement, and searches are the old model's again
    one(db, "SELECT embed_sidecar.rollback_model('docs')")
    result = [(int(k), d) for k, d in db.execute("SELECT key->>0, distance FROM embed_sidecar.search('docs', %s, 10)",
                                                  (QUERY,)).fetchall()]
    assert which_model(result, refs) == {L6}
    db.execute("UPDATE docs SET body = body || ' (after rollback)' WHERE id = 1001")
    wait(db, "docs")
    assert_in_step(db, "docs")
    assert_in_step(db, "docs", role="previous")
    # forward again, then drop what was replaced
    one(db, "SELECT embed_sidecar.rollback_model('docs')")
    one(db, "SELECT embed_sidecar.drop_previous('docs')")
    assert one(db, "SELECT array_agg(role) FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == ["current"]
    assert one(db, "SELECT to_regclass('docs_embeddings')") is None


def test_two_embeddings_of_one_table_stay_in_step_under_writers(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)")
    db.execute("INSERT INTO docs SELECT i, 'title ' || i, 'body of row ' || i FROM generate_series(1, 200) i")
    assert watch(db, "docs") == "docs_embeddings"
    side = one(db, "SELECT embed_sidecar.watch('docs', template => '{title}: {body}', embedding => 'title_body', model => %s)::text",
               (L3,))
    assert side.startswith("docs_embeddings_")
    schema, stop, errors = db.schema, threading.Event(), []

    def writer(seed):
        rnd = random.Random(seed)
        with connect() as c:
            c.execute(f'SET search_path = "{schema}", public')
            while not stop.is_set():
                i = rnd.randrange(1, 260)
                try:
                    op = rnd.random()
                    if op < 0.4:
                        c.execute("UPDATE docs SET title = %s WHERE id = %s", (f"retitled {rnd.random()}", i))
                    elif op < 0.7:
                        c.execute("UPDATE docs SET body = %s WHERE id = %s", (f"rewritten {rnd.random()}", i))
                    elif op < 0.9:
                        c.execute("INSERT INTO docs VALUES (%s, 'new', 'inserted') ON CONFLICT DO NOTHING", (i,))
                    else:
                        c.execute("DELETE FROM docs WHERE id = %s", (i,))
                except Exception as e:
                    if "deadlock" not in str(e):
                        errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    wait(db, "docs")
    assert_in_step(db, "docs", embedding="body")
    assert_in_step(db, "docs", embedding="title_body", content="concat(s.title, ': ', s.body)")
    # a title-only change re-embeds only the template's embedding
    before = dict(db.execute("SELECT embedding, embedded FROM embed_sidecar.sources WHERE source = 'docs'::regclass").fetchall())
    db.execute("UPDATE docs SET title = 'only the title' WHERE id = (SELECT min(id) FROM docs)")
    wait(db, "docs")
    after = dict(db.execute("SELECT embedding, embedded FROM embed_sidecar.sources WHERE source = 'docs'::regclass").fetchall())
    assert (after["body"] - before["body"], after["title_body"] - before["title_body"]) == (0, 1)
    # searches name their embedding; without a name the choice is an error, not a guess
    assert len(db.execute("SELECT * FROM embed_sidecar.search('docs', 'retitled', 5, embedding => 'title_body')").fetchall()) == 5
    assert len(db.execute("SELECT * FROM embed_sidecar.hybrid_search('docs', 'rewritten', 5, embedding => 'body')").fetchall()) == 5
    # a renamed template column keeps working (columns are kept by number)
    db.execute("ALTER TABLE docs RENAME COLUMN title TO heading")
    db.execute("UPDATE docs SET heading = 'renamed column' WHERE id = (SELECT min(id) FROM docs)")
    wait(db, "docs")
    assert_in_step(db, "docs", embedding="title_body", content="concat(s.heading, ': ', s.body)")
    # unwatching one embedding leaves the other
    one(db, "SELECT embed_sidecar.unwatch('docs', drop_sidecar => true, embedding => 'title_body')")
    assert one(db, "SELECT array_agg(embedding) FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == ["body"]
    assert len(db.execute("SELECT * FROM embed_sidecar.search('docs', 'retitled', 5)").fetchall()) == 5
