"""Chunked sidecars. A long row is cut into passages by the model's tokenizer, each with
its own vector, offsets and hash; an edit re-embeds only passages whose text changed; search ranks
rows by their best passage and says which one. The invariant is checked from the rows themselves
(conftest.assert_chunks_in_step), not from the extension's own verify()."""
import random
import threading
import time

from conftest import assert_chunks_in_step, connect, error_of, one, wait, watch

L3 = "paraphrase-MiniLM-L3-v2"
FILLER = ["The committee reviewed the quarterly budget and approved the travel policy.",
          "Weather in the northern region stayed mild for most of the month.",
          "Volunteers repainted the community hall and repaired the old benches.",
          "The library extended its opening hours during the examination period.",
          "Shipping delays affected several suppliers of office furniture."]


def paragraph(i, sentences=4):
    return " ".join(f"{FILLER[(i + j) % len(FILLER)]} Item {i}.{j} is noted." for j in range(sentences))


def document(n_paragraphs, seed):
    return "\n\n".join(paragraph(seed * 100 + i) for i in range(n_paragraphs))


def texts_embedded(db):
    return one(db, "SELECT embed_sidecar.texts_embedded()")


def test_search_finds_what_lies_past_the_window_and_says_where(db):
    """Each document hides one distinctive fact after ~1,500 tokens of filler. Truncated to the
    window, no vector sees it; chunked, the passage holding it ranks its row first, and the
    offsets returned point at that passage. Hybrid search works on passages too."""
    facts = {1: "The lighthouse keeper feeds three orange cats every morning at dawn.",
             2: "A volcanic eruption covered the vineyard in grey ash last spring.",
             3: "The submarine crew celebrated the captain's birthday with chocolate cake.",
             4: "Our chess club lost the regional final on a dramatic knight sacrifice."}
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    for i, fact in facts.items():
        db.execute("INSERT INTO docs VALUES (%s, %s)", (i, document(18, i) + "\n\n" + fact + "\n\n" + document(3, i + 50)))
    assert watch(db, "docs", embedding="whole") == "docs_embeddings"
    watch(db, "docs", embedding="passages", chunking=True)
    wait(db, "docs")
    n = assert_chunks_in_step(db, "docs", embedding="passages")
    assert n >= 4 * 6, n  # ~1,500 tokens each, passages of at most 254
    st = db.execute("SELECT chunk_tokens, chunk_overlap FROM embed_sidecar.sources WHERE embedding = 'passages'").fetchone()
    assert st == (254, 31)  # MiniLM-L6's window (256) less [CLS]/[SEP]; an eighth of that
    assert one(db, "SELECT chunks FROM embed_sidecar.verify('docs', 'passages')") == n
    assert one(db, "SELECT stale + missing + orphans FROM embed_sidecar.verify('docs', 'passages')") == 0
    for i, query in [(1, "who feeds the orange cats at the lighthouse"), (3, "birthday cake on the submarine"),
                     (4, "chess club knight sacrifice in the final")]:
        key, _, chunk, start, end = db.execute(
            "SELECT * FROM embed_sidecar.search('docs', %s, 3, embedding => 'passages')", (query,)).fetchone()
        assert key == [i]
        passage = one(db, "SELECT substr(body, %s + 1, %s - %s) FROM docs WHERE id = %s", (start, end, start, i))
        assert facts[i] in passage
        assert chunk > 0
        h = db.execute("SELECT key, vector_rank, text_rank, char_start, char_end FROM embed_sidecar.hybrid_search("
                       "'docs', %s, 3, embedding => 'passages')", (query,)).fetchone()
        assert h[0] == [i] and h[1] == 1 and h[3] is not None
    # an unchunked embedding answers with NULL passage columns
    assert db.execute("SELECT chunk, char_start, char_end FROM embed_sidecar.search('docs', 'cats', 1, embedding => 'whole')"
                      ).fetchone() == (None, None, None)


def test_one_paragraph_edit_reembeds_only_the_passages_around_it(db):
    """Drained in this session (process()), so texts_embedded() counts exactly what this session
    ran through the model."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    # paused before any row is enqueued, so the worker never holds one of these messages
    watch(db, "docs", chunking=True, chunk_tokens=128)
    one(db, "SELECT embed_sidecar.pause('docs')")
    paragraphs = [paragraph(i) for i in range(40)]
    db.execute("INSERT INTO docs VALUES (1, %s), (2, %s)", ("\n\n".join(paragraphs), document(5, 7)))
    one(db, "SELECT embed_sidecar.process('docs')")
    total = assert_chunks_in_step(db, "docs")
    per_row = dict(db.execute("SELECT id, count(*) FROM docs_embeddings GROUP BY id").fetchall())
    assert per_row[1] >= 20, per_row
    before = dict(db.execute("SELECT chunk_hash, embedded_at FROM docs_embeddings WHERE id = 1").fetchall())

    edited = paragraphs[:]
    edited[20] = "This paragraph was rewritten: the ferry to the island now leaves at seven."
    db.execute("UPDATE docs SET body = %s WHERE id = 1", ("\n\n".join(edited),))
    n0 = texts_embedded(db)
    one(db, "SELECT embed_sidecar.process('docs')")
    reembedded = texts_embedded(db) - n0
    after = db.execute("SELECT chunk_hash, embedded_at FROM docs_embeddings WHERE id = 1").fetchall()
    kept = sum(1 for h, at in after if before.get(h) == at)
    assert 1 <= reembedded <= 3, f"{reembedded} of {len(after)} passages re-embedded"
    assert kept == len(after) - reembedded  # the others kept their vectors (and when they were made)
    assert_chunks_in_step(db, "docs")
    # an update that does not change the text embeds nothing
    db.execute("UPDATE docs SET body = body WHERE id = 1")
    n0 = texts_embedded(db)
    one(db, "SELECT embed_sidecar.process('docs')")
    assert texts_embedded(db) == n0

    # shrinking drops the passages past the new end in the same transaction
    db.execute("UPDATE docs SET body = %s WHERE id = 1", ("\n\n".join(edited[:6]),))
    one(db, "SELECT embed_sidecar.process('docs')")
    assert one(db, "SELECT count(*) FROM docs_embeddings WHERE id = 1") < per_row[1] // 3
    assert_chunks_in_step(db, "docs")
    # blank: every passage goes; deleted: likewise (foreign key)
    db.execute("UPDATE docs SET body = '   ' WHERE id = 1")
    db.execute("DELETE FROM docs WHERE id = 2")
    one(db, "SELECT embed_sidecar.process('docs')")
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 0
    assert_chunks_in_step(db, "docs")
    assert total > 0


def test_chunk_boundaries_in_unicode_text_without_whitespace_and_one_huge_paragraph(db):
    rows = {
        1: "日本語の文章には単語の間に空白がありません。" * 80,                       # CJK, no spaces at all
        2: "-".join(f"segment{i}" for i in range(700)),                              # no whitespace, punctuation only
        3: " ".join(f"word{i} Caf\u00e9 na\u0308ive \U0001F389 \u05e9\u05dc\u05d5\u05dd" for i in range(400)),  # one paragraph
        4: "Short row.",
        5: "\u0007\u0007",                                                            # nothing the tokenizer keeps
        6: ("Ünïcödé paragraph number one. " * 30) + "\n\n" + ("Второй абзац на русском языке. " * 30),
    }
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    for k, v in rows.items():
        db.execute("INSERT INTO docs VALUES (%s, %s)", (k, v))
    watch(db, "docs", chunking=True, chunk_tokens=64, chunk_overlap=8)
    wait(db, "docs")
    assert_chunks_in_step(db, "docs", sample=20)
    per_row = dict(db.execute("SELECT id, count(*) FROM docs_embeddings GROUP BY id").fetchall())
    assert per_row[4] == 1 and per_row[5] == 1 and per_row[1] > 10 and per_row[2] > 10 and per_row[3] > 20
    # every passage within the budget, and the same passages chunk_text() gives
    for k, v in rows.items():
        got = db.execute("SELECT char_start, char_end FROM docs_embeddings WHERE id = %s ORDER BY chunk", (k,)).fetchall()
        ref = db.execute("SELECT char_start, char_end, tokens FROM embed_sidecar.chunk_text(%s, chunk_tokens => 64, chunk_overlap => 8)",
                         (v,)).fetchall()
        assert got == [(s, e) for s, e, _ in ref]
        assert all(t <= 64 for _, _, t in ref)
    # the second paragraph of row 6 starts a passage of its own
    second = rows[6].index("Второй")
    assert second in [s for (s,) in db.execute("SELECT char_start FROM docs_embeddings WHERE id = 6")]


def test_model_switch_of_a_chunked_embedding(db):
    """set_model() keeps the embedding chunked, cut for the new model's smaller window (128 tokens),
    and promotes it only when every passage exists."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, %s || ' Row ' || i || '.' FROM generate_series(1, 12) i", (document(10, 3),))
    watch(db, "docs", chunking=True)
    wait(db, "docs")
    old = assert_chunks_in_step(db, "docs")
    assert one(db, "SELECT embed_sidecar.set_model('docs', %s)", (L3,)) == 12
    wait(db, "docs")
    for _ in range(100):
        if one(db, "SELECT model FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'") == L3:
            break
        time.sleep(0.1)
    cur = db.execute("SELECT model, chunk_tokens, chunk_overlap FROM embed_sidecar.sources WHERE role = 'current' "
                     "AND source = 'docs'::regclass").fetchone()
    assert cur == (L3, 126, 31)
    new = assert_chunks_in_step(db, "docs")
    assert new > old  # smaller passages, more of them
    key, _, chunk, start, end = db.execute("SELECT * FROM embed_sidecar.search('docs', 'the library opening hours', 1)").fetchone()
    assert chunk is not None and end > start
    # the replaced embedding is kept in step for rollback
    db.execute("UPDATE docs SET body = body || ' Appended sentence about ferries.' WHERE id = 1")
    wait(db, "docs")
    assert_chunks_in_step(db, "docs", role="previous")
    assert_chunks_in_step(db, "docs")


def test_chunked_invariant_holds_under_concurrent_writers(db):
    """Writers insert, edit one paragraph of, shrink, blank and delete long rows from four
    connections while the worker drains; afterwards every passage is exactly right."""
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, %s || ' Row ' || i FROM generate_series(1, 30) i", (document(8, 1),))
    watch(db, "docs", chunking=True, chunk_tokens=96)
    schema = db.schema
    stop = time.time() + 12
    errors = []

    def writer(seed):
        rnd = random.Random(seed)
        try:
            with connect() as c:
                c.execute(f'SET search_path = "{schema}"')
                while time.time() < stop:
                    k = rnd.randint(1, 40)
                    op = rnd.random()
                    if op < 0.5:
                        paras = [paragraph(seed * 1000 + i) for i in range(rnd.randint(2, 12))]
                        paras[rnd.randrange(len(paras))] = f"Edited by {seed} at {time.time():.3f}."
                        c.execute("INSERT INTO docs VALUES (%s, %s) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                                  (k, "\n\n".join(paras)))
                    elif op < 0.7:
                        c.execute("UPDATE docs SET body = left(body, length(body) / 2) WHERE id = %s", (k,))
                    elif op < 0.8:
                        c.execute("UPDATE docs SET body = '' WHERE id = %s", (k,))
                    else:
                        c.execute("DELETE FROM docs WHERE id = %s", (k,))
                    time.sleep(0.02)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    wait(db, "docs", 180)
    assert one(db, "SELECT count(*) FROM embed_sidecar.failures") == 0
    assert assert_chunks_in_step(db, "docs", sample=12) > 0
    assert one(db, "SELECT stale + missing + orphans FROM embed_sidecar.verify('docs')") == 0


def test_chunking_settings_are_checked(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    code, msg, hint = error_of(db, "SELECT embed_sidecar.watch('docs', 'body', chunking => true, chunk_tokens => 1000)")
    assert code == "22023" and "chunk_tokens 1000 is outside 16..254" in msg and "chunk_text" in hint
    code, msg, _ = error_of(db, "SELECT embed_sidecar.watch('docs', 'body', chunking => true, chunk_tokens => 64, chunk_overlap => 32)")
    assert code == "22023" and "less than half" in msg
    code, _, hint = error_of(db, "SELECT embed_sidecar.watch('docs', 'body', chunk_tokens => 64)")
    assert code == "22023" and "chunking => true" in hint
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == 0
