"""watch(..., adopt => column): a table that already holds its vectors (made by the same model
from the same text) has them copied into the sidecar, checked on a sample first, and only the
rows without one are embedded. Another model's vectors, or vectors of other dimensions, are
refused with a clear error; a chunked embedding cannot adopt."""
from conftest import assert_in_step, connect_as, error_of, one, wait, watch

TOPICS = "ARRAY['rivers and deltas', 'cats and their naps', 'green tea', 'night trains', 'old clocks']"


def fill(db, column_type="vector(384)", made_by="embed_text(body)"):
    db.execute(f"CREATE TABLE docs (id int PRIMARY KEY, body text, vec {column_type})")
    db.execute(f"INSERT INTO docs SELECT i, 'document ' || i || ' about ' || ({TOPICS})[1 + i % 5] FROM generate_series(1, 305) i")
    db.execute(f"UPDATE docs SET vec = {made_by} WHERE id <= 300")


def test_adopt_copies_the_columns_vectors_and_embeds_only_the_rest(db):
    fill(db)
    side = watch(db, "docs", adopt="vec")
    # right after watch() returns: the 300 vectors, exactly as the column holds them
    equal = one(db, f"SELECT count(*) FROM docs d JOIN {side} s USING (id) WHERE s.embedding = d.vec")
    assert equal == 300
    assert one(db, f"SELECT count(*) FROM {side} WHERE id > 300") <= 5
    wait(db, "docs")
    assert one(db, f"SELECT count(*) FROM {side}") == 305
    assert_in_step(db, "docs")
    # the drain embedded the 5 rows without a vector, and nothing else
    assert one(db, "SELECT vectors_written FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 5
    assert one(db, f"SELECT count(*) FROM docs d JOIN {side} s USING (id) WHERE s.embedding = d.vec") == 300


def test_another_models_vectors_are_refused(db):
    fill(db, made_by="embed_sidecar._embed_with('paraphrase-MiniLM-L3-v2', body)::vector")
    err = error_of(db, "SELECT embed_sidecar.watch('docs', 'body', adopt => 'vec')")
    assert err and err[0] == "22000", err
    assert "lowest cosine" in err[1] and "vec" in err[1], err
    assert "another model" in err[2], err
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == 0


def test_wrong_dimensions_and_types_are_refused(db):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, small vector(3), label text)")
    err = error_of(db, "SELECT embed_sidecar.watch('docs', 'body', adopt => 'small')")
    assert err and err[0] == "42804" and "has 3 dimensions" in err[1] and "makes 384" in err[1], err
    err = error_of(db, "SELECT embed_sidecar.watch('docs', 'body', adopt => 'label')")
    assert err and err[0] == "42804" and "not vector or halfvec" in err[1], err
    err = error_of(db, "SELECT embed_sidecar.watch('docs', 'body', adopt => 'nope')")
    assert err and err[0] == "42703", err
    err = error_of(db, "SELECT embed_sidecar.watch('docs', 'body', adopt => 'small', chunking => true)")
    assert err and err[0] == "0A000", err
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == 0


def test_a_non_owner_cannot_adopt(db, make_role):
    fill(db)
    role = make_role("not_the_owner")
    db.execute("GRANT SELECT, INSERT, UPDATE ON docs TO not_the_owner")
    db.execute("GRANT EXECUTE ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name) TO not_the_owner")
    with connect_as(role, db.schema) as c:
        err = error_of(c, "SELECT embed_sidecar.watch('docs', 'body', adopt => 'vec')")
    assert err and err[0] == "42501", err
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == 0
