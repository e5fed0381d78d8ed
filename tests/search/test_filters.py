"""Filtered search, typed rows and the embedding's view (issue 20).

Ground truth is computed here, independently of the extension's search: the query vector by the
reference embedder (Python onnxruntime on the same model files), the filter by a plain SELECT,
and the ranking by numpy over the sidecar's stored vectors."""
import threading

import numpy as np
import psycopg
import pytest

from conftest import connect, connect_as, error_of, one, wait
from reference import Reference

ROWS = 1200
ADJ = ["red", "quiet", "fast", "ancient", "digital", "tiny", "giant", "frozen", "golden", "broken"]
NOUN = ["bicycle", "violin", "database", "garden", "rocket", "recipe", "castle", "printer", "river", "camera"]
VERB = ["repairs", "describes", "paints", "sells", "tests", "photographs", "moves", "cleans"]
QUERIES = ["fixing an old bike", "music instruments for sale", "how to store data safely", "space travel"]


def body(i):
    return f"A {ADJ[i % 10]} {NOUN[(i // 10) % 10]} that {VERB[(i // 100) % 8]} things, note {i}"


@pytest.fixture(scope="module")
def ref():
    return Reference()


def make_docs(db):
    """docs(id, body, tenant 0..99, section 0..6): tenant = 3 is 1% of the rows."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, tenant int, section int)")
    db.cursor().executemany("INSERT INTO docs VALUES (%s, %s, %s, %s)",
                            [(i, body(i), i % 100, i % 7) for i in range(ROWS)])
    one(db, "SELECT embed_sidecar.watch('docs', 'body')")
    wait(db, "docs")
    db.execute("ANALYZE docs")


def vectors(db, sidecar="docs_embeddings"):
    rows = db.execute(f"SELECT id, embedding::real[] FROM {sidecar}").fetchall()
    return {k: np.array(v, dtype=np.float64) for k, v in rows}


def exact_top(db, vecs, q, where, k):
    """[(key, distance)] of the k nearest rows matching `where`, by numpy."""
    keys = [r[0] for r in db.execute(f"SELECT id FROM docs WHERE {where or 'true'}").fetchall()]
    scored = sorted((1.0 - float(vecs[key] @ q) / np.linalg.norm(vecs[key]), key) for key in keys)
    return [(key, d) for d, key in scored[:k]], len(keys)


FILTERS = [None, "id % 2 = 0", "tenant < 10", "tenant = 3", "tenant = 3 AND section = 2", "tenant = -1"]


@pytest.mark.parametrize("plan", ["exact", "index"])
def test_filtered_search_returns_the_exact_filtered_top_k_at_every_selectivity(db, ref, plan):
    make_docs(db)
    vecs = vectors(db)
    # exact: every filter ranked without the index; index: the iterative index walk (and its
    # exact retry when it comes back short)
    db.execute("SET pg_embed_sidecar.exact_search_rows = %s" % (1_000_000 if plan == "exact" else 0))
    for query in QUERIES:
        q = ref.embed(query).astype(np.float64)
        for where in FILTERS:
            want, matching = exact_top(db, vecs, q, where, 10)
            got = db.execute("SELECT (key->>0)::int, distance FROM embed_sidecar.search('docs', %s, 10, filter => %s)",
                             (query, where)).fetchall()
            assert len(got) == min(10, matching), (query, where, got)
            # distances are those of the stored vectors to the reference query vector
            for key, d in got:
                assert abs(d - (1.0 - float(vecs[key] @ q) / np.linalg.norm(vecs[key]))) < 1e-4, (query, where, key)
            assert [d for _, d in got] == sorted(d for _, d in got)
            overlap = len({k for k, _ in got} & {k for k, _ in want}) / min(10, matching) if matching else 1.0
            # exact ranks exactly; the index walk is approximate only without a filter
            assert overlap == 1.0 if plan == "exact" or where else overlap >= 0.9, (query, where, got, want)
            if where:
                allowed = {r[0] for r in db.execute(f"SELECT id FROM docs WHERE {where}").fetchall()}
                assert {k for k, _ in got} <= allowed


def test_search_rows_returns_the_tables_rows_with_their_distance(db):
    make_docs(db)
    keys = db.execute("SELECT (key->>0)::int, distance FROM embed_sidecar.search('docs', 'space travel', 5, filter => 'tenant = 3')").fetchall()
    rows = db.execute("""SELECT (r.hit).id, (r.hit).body, (r.hit).tenant, r.distance, pg_typeof(r.hit)::text
                           FROM embed_sidecar.search_rows(NULL::docs, 'space travel', 5, filter => 'tenant = 3') r""").fetchall()
    assert [(r[0], r[3]) for r in rows] == keys and len(rows) == 5
    assert all(r[1] == body(r[0]) and r[2] == 3 for r in rows)
    assert rows[0][4] == "docs"
    # (r.hit).* expands to the table's columns
    cols = [d.name for d in db.execute("SELECT (r.hit).* FROM embed_sidecar.search_rows(NULL::docs, 'x', 1) r").description]
    assert cols == ["id", "body", "tenant", "section"]
    assert error_of(db, "SELECT * FROM embed_sidecar.search_rows(NULL::int, 'x')")[0] == "42804"


def test_hybrid_search_keeps_to_the_filter(db):
    make_docs(db)
    for where, k in [("tenant = 3", 10), ("tenant = 3 AND section = 2", 10), ("tenant < 10", 5)]:
        allowed = {r[0] for r in db.execute(f"SELECT id FROM docs WHERE {where}").fetchall()}
        got = [r[0] for r in db.execute("SELECT (key->>0)::int FROM embed_sidecar.hybrid_search('docs', 'golden violin', %s, filter => %s)",
                                        (k, where)).fetchall()]
        assert len(got) == min(k, len(allowed)) and set(got) <= allowed, (where, got)


def test_a_filter_must_be_one_expression(db):
    make_docs(db)
    for bad in ["true) UNION SELECT 1 --", "true), (1", "true; SELECT 1", "true) FROM docs WHERE (true",
                "true) ORDER BY (1", "true /* unclosed"]:
        err = error_of(db, "SELECT * FROM embed_sidecar.search('docs', 'x', 3, filter => %s)", (bad,))
        assert err and err[0] == "42601", (bad, err)
    # a comment inside the filter ends at our newline, nothing of the statement is lost
    same = "SELECT array_agg((key->>0)::int) FROM embed_sidecar.search('docs', 'castle', 5, filter => %s)"
    assert one(db, same, ("tenant = 3 -- only tenant 3",)) == one(db, same, ("tenant = 3",))
    # the filter names the source's columns only
    assert error_of(db, "SELECT * FROM embed_sidecar.search('docs', 'x', 3, filter => 'content_hash IS NULL')")[0] == "42703"


def test_a_filter_is_judged_with_the_callers_rights_and_search_path(db, make_role):
    make_docs(db)
    db.execute("ALTER TABLE docs ADD COLUMN secret int DEFAULT 1")
    db.execute("CREATE FUNCTION is_even(int) RETURNS boolean LANGUAGE sql IMMUTABLE RETURN $1 % 2 = 0")
    reader = make_role("pes_filter_reader")
    db.execute(f'GRANT SELECT (id, body, tenant, section) ON docs TO "{reader}"')
    db.execute("ALTER TABLE docs ENABLE ROW LEVEL SECURITY")
    db.execute(f"CREATE POLICY low ON docs FOR SELECT TO \"{reader}\" USING (tenant < 50)")
    # the caller's own functions, by its search path
    got = db.execute("SELECT (key->>0)::int FROM embed_sidecar.search('docs', 'river', 20, filter => 'is_even(id)')").fetchall()
    assert len(got) == 20 and all(k % 2 == 0 for (k,) in got)
    with connect_as(reader, db.schema) as r:
        # reading a vector needs every column of the row (sql/watch.sql, _sync_readers): this
        # reader sees none, whatever the filter; the column it may not read is refused as in a SELECT
        assert error_of(r, "SELECT * FROM embed_sidecar.search('docs', 'x', 3, filter => 'secret = 1')")[0] == "42501"
    db.execute(f'GRANT SELECT ON docs TO "{reader}"')
    with connect_as(reader, db.schema) as r:
        got = r.execute("SELECT (key->>0)::int FROM embed_sidecar.search('docs', 'river', 10, filter => 'section = 2')").fetchall()
        tenants = dict(db.execute("SELECT id, tenant FROM docs").fetchall())
        assert len(got) == 10 and all(tenants[k] < 50 for (k,) in got)
        # rows of a tenant row security hides are not there, not even when asked for by name
        assert r.execute("SELECT count(*) FROM embed_sidecar.search('docs', 'river', 10, filter => 'tenant = 60')").fetchone()[0] == 0
        assert r.execute("SELECT count(*) FROM embed_sidecar.search_rows(NULL::docs, 'river', 10, filter => 'tenant = 60')").fetchone()[0] == 0


def test_chunked_filtered_search_ranks_rows_by_their_best_passage(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, tenant int)")
    long_rows = [(i, " ".join(body(i * 7 + j) for j in range(12)), i % 10) for i in range(120)]
    db.cursor().executemany("INSERT INTO docs VALUES (%s, %s, %s)", long_rows)
    one(db, "SELECT embed_sidecar.watch('docs', 'body', chunking => true, chunk_tokens => 32, chunk_overlap => 0)")
    wait(db, "docs")
    db.execute("ANALYZE docs")
    assert one(db, "SELECT count(*) > 200 FROM docs_embeddings")  # several passages per row
    results = {}
    for plan, rows in [("exact", 1_000_000), ("index", 0)]:
        db.execute(f"SET pg_embed_sidecar.exact_search_rows = {rows}")
        got = db.execute("SELECT (key->>0)::int, distance, chunk FROM embed_sidecar.search('docs', 'golden camera', 5, filter => 'tenant = 4')").fetchall()
        assert len(got) == 5 and len({k for k, _, _ in got}) == 5
        assert all(k % 10 == 4 for k, _, _ in got)
        # each row's distance is its nearest passage's
        for key, d, chunk in got:
            best = one(db, "SELECT min(e.embedding <=> embed_text('golden camera')) FROM docs_embeddings e WHERE e.id = %s", (key,))
            assert abs(best - d) < 1e-5
        results[plan] = [k for k, _, _ in got]
    assert results["exact"] == results["index"]


def test_the_view_joins_rows_with_their_current_vectors(db):
    make_docs(db)
    cols = [d.name for d in db.execute("SELECT * FROM docs_vectors LIMIT 0").description]
    assert cols == ["id", "embedding", "model", "docs"]
    n, models, bodies_match = db.execute(
        "SELECT count(*), count(DISTINCT model), bool_and((v.docs).body = d.body) FROM docs_vectors v JOIN docs d USING (id)").fetchone()
    assert (n, models, bodies_match) == (ROWS, 1, True)
    # the plain SQL of the README: the nearest rows of one tenant, through the view
    q = "SELECT id FROM docs_vectors v WHERE (v.docs).tenant = 3 ORDER BY v.embedding <=> embed_text('space travel') LIMIT 5"
    db.execute("SET hnsw.iterative_scan = relaxed_order")
    via_view = [r[0] for r in db.execute(q).fetchall()]
    via_search = [r[0] for r in db.execute("SELECT (key->>0)::int FROM embed_sidecar.search('docs', 'space travel', 5, filter => 'tenant = 3')").fetchall()]
    assert len(via_view) == 5 and via_view == via_search
    # a column dropped from the table or added to it needs nothing done to the view
    db.execute("ALTER TABLE docs DROP COLUMN section, ADD COLUMN lang text DEFAULT 'en'")
    assert one(db, "SELECT (v.docs).lang FROM docs_vectors v LIMIT 1") == "en"
    # it belongs to the table's owner and goes with unwatch()
    assert one(db, "SELECT relowner = (SELECT relowner FROM pg_class WHERE relname = 'docs' AND relnamespace = %s::regnamespace) FROM pg_class WHERE oid = 'docs_vectors'::regclass",
               (db.schema,))
    one(db, "SELECT embed_sidecar.unwatch('docs')")
    assert one(db, "SELECT to_regclass('docs_vectors')") is None


def test_the_view_name_can_be_chosen_and_is_checked(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, title text)")
    db.execute("CREATE TABLE docs_vectors (x int)")
    err = error_of(db, "SELECT embed_sidecar.watch('docs', 'body')")
    assert err[0] == "42P07" and "view_name" in err[2]
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == 0
    one(db, "SELECT embed_sidecar.watch('docs', 'body', view_name => 'doc_search')")
    one(db, "SELECT embed_sidecar.watch('docs', 'title', embedding => 'title')")
    assert one(db, "SELECT to_regclass('doc_search') IS NOT NULL AND to_regclass('docs_title_vectors') IS NOT NULL")


def test_the_view_is_read_with_the_readers_rights(db, make_role):
    make_docs(db)
    outsider, reader = make_role("pes_view_outsider"), make_role("pes_view_reader")
    db.execute(f'GRANT SELECT ON docs TO "{reader}"')
    db.execute("ALTER TABLE docs ENABLE ROW LEVEL SECURITY")
    db.execute(f'CREATE POLICY low ON docs FOR SELECT TO "{reader}" USING (tenant < 50)')
    with connect_as(outsider, db.schema) as o:
        assert error_of(o, "SELECT count(*) FROM docs_vectors")[0] == "42501"
    with connect_as(reader, db.schema) as r:
        assert one(r, "SELECT count(*) FROM docs_vectors") == ROWS // 2
        assert one(r, "SELECT max((v.docs).tenant) FROM docs_vectors v") == 49


def test_the_view_follows_a_model_switch_under_a_reading_loop(db):
    make_docs(db)
    old = one(db, "SELECT model_id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    stop, seen, errors = threading.Event(), [], []

    def read():
        with connect() as c:
            c.execute(f'SET search_path = "{db.schema}", public')
            while not stop.is_set():
                try:
                    # one statement: all rows, one model; and a filtered nearest-rows query
                    n, models, model = c.execute("SELECT count(*), count(DISTINCT model), min(model) FROM docs_vectors").fetchone()
                    near = c.execute("""SELECT count(*) FROM (SELECT id FROM docs_vectors v WHERE (v.docs).tenant < 10
                                         ORDER BY v.embedding <=> embed_text('castle') LIMIT 10) x""").fetchone()[0]
                    seen.append((n, models, model, near))
                except psycopg.Error as e:
                    errors.append(str(e))

    t = threading.Thread(target=read)
    t.start()
    try:
        one(db, "SELECT embed_sidecar.set_model('docs', 'paraphrase-MiniLM-L3-v2')")
        new = None
        for _ in range(600):
            new = one(db, "SELECT model_id FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'")
            if new != old:
                break
            stop.wait(0.2)
        assert new != old, "the switch did not complete"
        while not any(s[2] == new for s in seen) and t.is_alive():
            stop.wait(0.05)
        # and back: rollback_model() points the view at the previous sidecar in its transaction
        one(db, "SELECT embed_sidecar.rollback_model('docs')")
        count = len(seen)
        while len(seen) < count + 3 and t.is_alive():
            stop.wait(0.05)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert seen and all(n == ROWS and models == 1 and near == 10 for n, models, _, near in seen), \
        [s for s in seen if s[0] != ROWS or s[1] != 1 or s[3] != 10][:3]
    models_in_order = [m for _, _, m, _ in seen]
    assert old in models_in_order and new in models_in_order and models_in_order[-1] == old
    # a rollback of the promoting transaction puts the view back too
    before = one(db, "SELECT pg_get_viewdef('docs_vectors')")
    db.execute("BEGIN")
    one(db, "SELECT embed_sidecar.rollback_model('docs')")
    assert one(db, "SELECT pg_get_viewdef('docs_vectors')") != before
    db.execute("ROLLBACK")
    assert one(db, "SELECT pg_get_viewdef('docs_vectors')") == before
