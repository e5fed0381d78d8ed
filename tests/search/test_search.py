"""Semantic and hybrid search on a small fixture."""

from conftest import error_of, one, wait

DOCS = [
    (1, "Chess engine", "A strong chess engine that calculates moves and plays chess against you."),
    (2, "Image tool", "Resize, rotate and convert photographs and images between formats."),
    (3, "Backup", "Encrypted incremental backups of your files to a remote server over SSH."),
    (4, "Mail", "An email client for the terminal with threading and PGP support."),
    (5, "Spreadsheet", "Edit spreadsheets, compute formulas and draw charts."),
    (6, "Audio", "Record, edit and mix audio tracks; apply effects to sound files."),
    (7, "Compiler", "A C compiler with optimisation passes and debugging information."),
    (8, "Weather", "Show the weather forecast for your city in the terminal."),
]


def fixture(db, rows=DOCS, composite=False):
    if composite:
        db.execute("CREATE TABLE docs (shelf text, id int, title text, body text, PRIMARY KEY (shelf, id))")
        db.cursor().executemany("INSERT INTO docs VALUES ('s' || (%s %% 2), %s, %s, %s)", [(i, i, t, b) for i, t, b in rows])
    else:
        db.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)")
        db.cursor().executemany("INSERT INTO docs VALUES (%s, %s, %s)", rows)
    one(db, "SELECT embed_sidecar.watch('docs', 'body')")
    wait(db, "docs")


def test_semantic_search_finds_the_expected_row_first(db):
    fixture(db)
    cases = {"play a game of chess with the computer": 1, "shrink my photos": 2,
             "keep my data safe off-site": 3, "what will the temperature be tomorrow": 8}
    for query, expected in cases.items():
        rows = db.execute("SELECT (key->>0)::int, distance FROM embed_sidecar.search('docs', %s, 3)", (query,)).fetchall()
        assert rows[0][0] == expected, (query, rows)
        assert len(rows) == 3 and rows[0][1] <= rows[1][1] <= rows[2][1]
        # and the key joins back to the source
        title = one(db, "SELECT d.title FROM embed_sidecar.search('docs', %s, 1) r JOIN docs d ON d.id = (r.key->>0)::int", (query,))
        assert title == dict((i, t) for i, t, _ in DOCS)[expected]


def test_hybrid_search_fuses_both_rankings(db):
    fixture(db)
    rows = db.execute("SELECT (key->>0)::int, score, vector_rank, text_rank FROM embed_sidecar.hybrid_search('docs', 'chess engine', 5)").fetchall()
    assert rows[0][0] == 1 and rows[0][2] == 1 and rows[0][3] == 1
    # score is exactly the documented RRF formula
    assert abs(rows[0][1] - (1 / 61 + 1 / 61)) < 1e-12
    assert all(a[1] >= b[1] for a, b in zip(rows, rows[1:]))
    # a row that only the vector side finds still gets its vector share
    only_vec = [r for r in rows if r[3] is None]
    assert only_vec and all(abs(r[1] - 1 / (60 + r[2])) < 1e-12 for r in only_vec)
    # weights are honoured: text only
    top = db.execute("SELECT (key->>0)::int, score FROM embed_sidecar.hybrid_search('docs', 'terminal', 2, vector_weight => 0)").fetchall()
    assert {k for k, _ in top} == {4, 8}


def test_composite_keys_come_back_as_arrays(db):
    fixture(db, composite=True)
    key = one(db, "SELECT key::text FROM embed_sidecar.search('docs', 'chess', 1)")
    assert key == '["s1", 1]'
    key = one(db, "SELECT key::text FROM embed_sidecar.hybrid_search('docs', 'chess', 1)")
    assert key == '["s1", 1]'


def test_empty_results(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    one(db, "SELECT embed_sidecar.watch('docs', 'body')")
    assert one(db, "SELECT count(*) FROM embed_sidecar.search('docs', 'anything', 10)") == 0
    assert one(db, "SELECT count(*) FROM embed_sidecar.hybrid_search('docs', 'anything', 10)") == 0
    fixture_rows = [(1, "a", "only words about gardening and plants")]
    db.cursor().executemany("INSERT INTO docs VALUES (%s, %s)", [(i, b) for i, _, b in fixture_rows])
    wait(db, "docs")
    # no full-text match: the text side is empty, the vector side still answers
    rows = db.execute("SELECT text_rank FROM embed_sidecar.hybrid_search('docs', 'zzzz qqqq', 5)").fetchall()
    assert rows == [(None,)]
    assert one(db, "SELECT count(*) FROM embed_sidecar.search('docs', 'x', 0)") == 0


def test_search_uses_the_indexes_and_embeds_once(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO docs SELECT i, 'document ' || i || ' about topic ' || (i % 50) FROM generate_series(1, 1500) i")
    one(db, "SELECT embed_sidecar.watch('docs', 'body')")
    wait(db, "docs")
    db.execute("ANALYZE docs_embeddings")
    # at 1,500 rows a sequential scan is cheaper, so the planner is told to prefer indexes: what
    # is checked is that the queries search() and hybrid_search() run can use them
    db.execute("SET enable_seqscan = off")
    plans = []
    db.add_notice_handler(lambda d: plans.append(d.message_primary))
    db.execute("LOAD 'auto_explain'")
    db.execute("SET auto_explain.log_min_duration = 0")
    db.execute("SET auto_explain.log_nested_statements = on")
    db.execute("SET auto_explain.log_level = notice")
    before = one(db, "SELECT embed_sidecar.texts_embedded()")
    db.execute("SELECT * FROM embed_sidecar.search('docs', 'topic 7', 10)").fetchall()
    db.execute("SELECT * FROM embed_sidecar.hybrid_search('docs', 'topic 7', 10)").fetchall()
    db.execute("SET auto_explain.log_min_duration = -1")
    after = one(db, "SELECT embed_sidecar.texts_embedded()")
    text = "\n".join(p for p in plans if p)
    assert "docs_embeddings_embedding_idx" in text, text  # HNSW
    assert "docs_embeddings_fts_idx" in text, text        # GIN
    assert after - before == 1  # same query text twice: embedded once (the second call hits the memo)


def test_hybrid_vector_ranks_follow_distance(db):
    """vector_rank is the rank by distance, exactly as search() orders the rows (it came
    from row_number() OVER () and only followed the subquery's order by accident of the plan)."""
    fixture(db)
    for query in ("chess engine", "terminal programs", "sound"):
        by_distance = [r[0] for r in db.execute(
            "SELECT (key->>0)::int FROM embed_sidecar.search('docs', %s, 8)", (query,)).fetchall()]
        ranks = dict(db.execute(
            "SELECT (key->>0)::int, vector_rank FROM embed_sidecar.hybrid_search('docs', %s, 8, candidates => 8)",
            (query,)).fetchall())
        assert [ranks[k] for k in by_distance] == list(range(1, 9)), (query, by_distance, ranks)


def test_halfvec_storage_halves_the_vectors_and_finds_the_same_rows(db):
    """watch(..., vector_type => 'halfvec'): the same vectors to half precision in half
    the bytes, a halfvec HNSW index, the same search results; chunked sidecars take it too."""
    from conftest import assert_chunks_in_step, assert_in_step, error_of, watch
    fixture(db)
    watch(db, "docs", embedding="half", vector_type="halfvec")
    watch(db, "docs", embedding="half_passages", vector_type="halfvec", chunking=True, chunk_tokens=16)
    wait(db, "docs")
    assert_in_step(db, "docs", embedding="half")
    assert assert_chunks_in_step(db, "docs", embedding="half_passages") > len(DOCS)
    half = one(db, "SELECT sidecar::text FROM embed_sidecar.sources WHERE embedding = 'half'")
    assert one(db, f"SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '{half}'::regclass "
                   "AND attname = 'embedding'") == "halfvec(384)"
    assert one(db, f"SELECT count(*) FROM pg_indexes WHERE tablename = '{half}' AND indexdef LIKE '%hnsw%halfvec_cosine_ops%'") == 1
    # each stored vector is the float32 one rounded to half precision
    worst, full_bytes, half_bytes = db.execute(
        f"""SELECT max(h.embedding::vector <=> f.embedding), avg(pg_column_size(f.embedding)), avg(pg_column_size(h.embedding))
              FROM docs_embeddings f JOIN {half} h USING (id)""").fetchone()
    assert worst < 1e-5
    assert half_bytes < 0.51 * float(full_bytes)
    for query in ("play a game of chess with the computer", "shrink my photos", "what will the temperature be tomorrow"):
        ranked = {e: [r[0] for r in db.execute("SELECT (key->>0)::int FROM embed_sidecar.search('docs', %s, 3, embedding => %s)",
                                              (query, e))] for e in ("body", "half")}
        assert ranked["half"] == ranked["body"], query
        assert one(db, "SELECT (key->>0)::int FROM embed_sidecar.hybrid_search('docs', %s, 1, embedding => 'half')",
                   (query,)) == ranked["body"][0]
    code, _, hint = error_of(db, "SELECT embed_sidecar.watch('docs', 'title', vector_type => 'float8')")
    assert code == "22023" and "halfvec" in hint


def test_without_full_text_no_tsvector_no_gin_and_hybrid_search_says_why(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)")
    db.cursor().executemany("INSERT INTO docs VALUES (%s, %s, %s)", DOCS)
    one(db, "SELECT embed_sidecar.watch('docs', 'body', fts_config => NULL)")
    wait(db, "docs")
    assert one(db, "SELECT count(*) FROM docs_embeddings") == len(DOCS)
    assert one(db, "SELECT count(fts) FROM docs_embeddings") == 0
    assert one(db, "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'docs_embeddings' AND indexdef LIKE '%USING gin%'") == 0
    assert one(db, "SELECT (key->>0)::int FROM embed_sidecar.search('docs', 'play a game of chess with the computer', 1)") == 1
    code, message, hint = error_of(db, "SELECT * FROM embed_sidecar.hybrid_search('docs', 'chess')")
    assert code == "55000" and "keeps no full text" in message and "fts_config => NULL" in hint
    # the registry keeps the choice (set_model() copies it to the shadow)
    assert one(db, "SELECT fts_config IS NULL FROM embed_sidecar.sources WHERE source = 'docs'::regclass") is True
