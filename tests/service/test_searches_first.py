"""Searches first (issue 22): a search that arrives while the inference service runs a drain
round stops that round (ONNX Runtime's terminate flag), is served, and the drain texts go back to
the ring to be embedded again. Nothing here depends on timing: the tests wait for the counter of
stopped rounds, then check what a stopped round must not spoil — the search's vector, and every
vector of the drain."""
import numpy as np

from conftest import assert_in_step, connect, one, wait, wait_until, watch


def vec(text):
    return np.array([float(x) for x in text.strip("[]").split(",")])


def long_body(i):
    """About 2 kB of prose, each row its own: a window-long text, so a drain round is one long run."""
    words = ["river", "engine", "garden", "signal", "harbour", "lantern", "meadow", "circuit"]
    return " ".join(f"{words[(i + k) % 8]} {words[(i * 3 + k) % 8]} number {i}-{k}." for k in range(120))


def preempted(conn):
    return one(conn, "SELECT preempted_rounds FROM embed_sidecar.inference_service()")


def test_a_search_stops_a_drain_round_and_neither_its_vector_nor_the_drain_suffers(db):
    query = "how do I keep a lantern lit in the harbour"
    with connect() as idle:
        expected = vec(one(idle, "SELECT embed_text(%s)::text", (query,)))
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO docs VALUES (%s, %s)", [(i, long_body(i)) for i in range(1, 601)])
    before = preempted(db)
    side = watch(db, "docs")
    got = []

    def search_until_a_round_stops():
        # a search every few milliseconds while the backfill drains: each one that arrives during
        # a drain round stops it
        with connect() as s:
            got.append(vec(one(s, "SELECT embed_text(%s)::text", (query,))))
        return preempted(db) > before

    assert wait_until(search_until_a_round_stops, timeout=300, step=0.01), \
        f"no drain round was stopped in {len(got)} searches during the backfill"
    # the searches' vectors are the idle one: a stopped run leaves the embedder as it was
    for v in got:
        assert v.shape == (384,)
        assert float(v @ expected) > 0.99999
    # the drain lost nothing: every row in step, and the vectors are what the model gives
    wait(db, "docs", seconds=600)
    assert_in_step(db, "docs")
    assert one(db, f"SELECT count(*) FROM {side}") == 600
    sample = db.execute(f"""SELECT s.body, e.embedding::text FROM docs s JOIN {side} e USING (id)
                            ORDER BY id LIMIT 40""").fetchall()
    db.execute("SET pg_embed_sidecar.inference = 'local'")
    fresh = one(db, "SELECT embed_texts(%s::text[])::text[]", ([b for b, _ in sample],))
    for (_, stored), ref in zip(sample, fresh):
        assert float(vec(stored) @ vec(ref)) > 0.9999
