"""Query and passage prefixes from the model manifest (e5-style models want "query: " before a
search query and "passage: " before each document). The model is the default one copied with a
manifest that sets both prefixes; every expected vector comes from the independent reference
embedder (tests/reference.py) run on the prefixed text, so these tests say which text the model
saw, not merely that something changed."""
import json
import os
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import assert_chunks_in_step, assert_in_step, connect, one, wait, watch
from reference import Reference

PLAIN = "all-MiniLM-L6-v2"
NAME = "pes-prefixed-minilm"
QUERY, PASSAGE = "query: ", "passage: "
TEXTS = {1: "The lighthouse keeper feeds three orange cats every morning at dawn.",
         2: "A volcanic eruption covered the vineyard in grey ash last spring.",
         3: "The submarine crew celebrated the captain's birthday with chocolate cake.",
         4: "Our chess club lost the regional final on a dramatic knight sacrifice."}
FILLER = ["The committee reviewed the quarterly budget and approved the travel policy.",
          "Weather in the northern region stayed mild for most of the month.",
          "Volunteers repainted the community hall and repaired the old benches.",
          "The library extended its opening hours during the examination period.",
          "Shipping delays affected several suppliers of office furniture."]


def vec(text):
    return np.array([float(x) for x in text.strip("[]{}").split(",")])


class Model:
    def __init__(self, path):
        self.path = path
        self.ref = Reference(path)
        self.embed = self.ref.embed
        # the reference truncates to the window; counting what a passage would need takes none
        self.counter = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.counter.no_truncation()
        self.counter.no_padding()


@pytest.fixture(scope="module")
def prefixed():
    """The default model's files under another directory, its manifest (same name, so only the
    prefixes tell the two apart) setting both prefixes."""
    with connect() as c:
        name, plain_dir = c.execute("SELECT model, model_dir FROM embed_sidecar.model_info()").fetchone()
    assert name == PLAIN, "the session's default model is the plain one"
    path = os.path.join(os.path.dirname(plain_dir), NAME)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(plain_dir, path)
    manifest = json.load(open(os.path.join(path, "embed_model.json")))
    manifest.update(query_prefix=QUERY, passage_prefix=PASSAGE)
    with open(os.path.join(path, "embed_model.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    for entry in os.listdir(path):
        os.chmod(os.path.join(path, entry), 0o644)
    os.chmod(path, 0o755)
    try:
        yield Model(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_prefixes_are_part_of_the_model_id(prefixed):
    with connect() as c:
        ids = dict(c.execute("SELECT name, model_id FROM embed_sidecar.models WHERE name IN (%s, %s)",
                             (PLAIN, NAME)).fetchall())
    # the same name and files: only the prefixes differ, and they make it another model
    assert ids[NAME].split("@")[0] == ids[PLAIN].split("@")[0] == PLAIN
    assert ids[NAME] != ids[PLAIN], ids


@pytest.mark.parametrize("inference", ["shared", "local"])
def test_embed_query_and_embed_text_take_their_prefixes(prefixed, inference):
    ref = prefixed.embed
    with connect() as c:
        c.execute("SELECT set_config('pg_embed_sidecar.inference', %s, false)", (inference,))
        c.execute("SELECT set_config('pg_embed_sidecar.model', %s, false)", (NAME,))
        q, t = (vec(one(c, f"SELECT {f}(%s)::text", (s,))) for f, s in (("embed_query", "q"), ("embed_text", "t")))
        # one text as both sides in one statement, back to back: the one-entry memo keeps them apart
        both = c.execute("SELECT embed_query('same words')::text, embed_text('same words')::text, "
                         "embed_query('same words')::text FROM generate_series(1, 2)").fetchall()
        many = [vec(v) for v in one(c, "SELECT embed_texts(ARRAY['t', 'u'])::text[]")]
        named = vec(one(c, "SELECT embed_sidecar._embed_with(%s, 't')::text", (NAME,)))
        # the plain model has no prefixes: a query and a passage are the same vector
        c.execute("SELECT set_config('pg_embed_sidecar.model', %s, false)", (PLAIN,))
        plain_q, plain_t = (vec(one(c, f"SELECT {f}('q')::text")) for f in ("embed_query", "embed_text"))
    assert float(q @ ref(QUERY + "q")) > 0.9999
    assert float(t @ ref(PASSAGE + "t")) > 0.9999
    assert float(q @ ref("q")) < 0.999 and float(t @ ref("t")) < 0.999
    for eq, et, eq2 in both:
        assert float(vec(eq) @ ref(QUERY + "same words")) > 0.9999
        assert float(vec(et) @ ref(PASSAGE + "same words")) > 0.9999
        assert eq2 == eq
    assert float(many[0] @ ref(PASSAGE + "t")) > 0.9999 and float(many[1] @ ref(PASSAGE + "u")) > 0.9999
    assert float(named @ ref(PASSAGE + "t")) > 0.9999
    assert float(plain_q @ plain_t) > 0.99999 and float(plain_q @ ref("q")) > 0.9999


def test_sidecar_holds_passages_and_search_ranks_with_the_query_prefix(db, prefixed):
    ref = prefixed.embed
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    for i, text in TEXTS.items():
        db.execute("INSERT INTO docs VALUES (%s, %s)", (i, text))
    side = watch(db, "docs", model=NAME)
    wait(db, "docs")
    assert_in_step(db, "docs")
    with connect() as c:
        expected_id = one(c, "SELECT model_id FROM embed_sidecar.models WHERE name = %s", (NAME,))
    assert one(db, "SELECT model_id FROM embed_sidecar.sources WHERE source = 'docs'::regclass") == expected_id
    stored = {k: vec(v) for k, v in db.execute(f"SELECT id, embedding::text FROM {side}").fetchall()}
    assert set(stored) == set(TEXTS)
    for i, text in TEXTS.items():
        with_prefix, bare = float(stored[i] @ ref(PASSAGE + text)), float(stored[i] @ ref(text))
        assert with_prefix > 0.999, (i, with_prefix)
        assert bare < 0.999, (i, bare)

    query = "who feeds the orange cats at the lighthouse"
    q, bare_q = ref(QUERY + query), ref(query)
    rows = db.execute("SELECT key, distance FROM embed_sidecar.search('docs', %s, 4)", (query,)).fetchall()
    assert [r[0] for r in rows][0] == [1] and len(rows) == 4
    for key, distance in rows:
        passage = ref(PASSAGE + TEXTS[key[0]])
        assert abs(distance - (1 - float(q @ passage))) < 1e-4, (key, distance, 1 - float(q @ passage))
    # the unprefixed query would have given another distance: the check above tells them apart
    assert abs(rows[0][1] - (1 - float(bare_q @ ref(PASSAGE + TEXTS[1])))) > 1e-3
    # hybrid_search embeds its query the same way: its vector ranks follow the reference distances
    by_ref = sorted(TEXTS, key=lambda i: 1 - float(q @ ref(PASSAGE + TEXTS[i])))
    ranks = dict((k[0], r) for k, r in db.execute(
        "SELECT key, vector_rank FROM embed_sidecar.hybrid_search('docs', %s, 4)", (query,)).fetchall() if r)
    assert sorted(ranks, key=ranks.get) == by_ref[:len(ranks)] and ranks


def test_chunked_passages_carry_the_prefix_and_fit_the_window(db, prefixed):
    """The prefix's tokens come off the passage budget, so a prefixed passage is never truncated:
    each stored vector is the reference of "passage: " + its substring, whole."""
    ref = prefixed.embed
    body = lambda seed: "\n\n".join(
        " ".join(f"{FILLER[(seed + i + j) % len(FILLER)]} Item {seed}.{i}.{j} is noted." for j in range(4))
        for i in range(12))
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    # one row of short words and no punctuation: its passages end at a space, so they take the
    # whole budget (without the prefix's tokens taken off, prefix + passage would overflow)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away"]
    rows = {1: body(1), 2: body(7), 3: " ".join(words[i % len(words)] for i in range(900))}
    for i, text in rows.items():
        db.execute("INSERT INTO docs VALUES (%s, %s)", (i, text))
    side = watch(db, "docs", model=NAME, chunking=True)
    wait(db, "docs")
    prefix_tokens = len(prefixed.counter.encode(PASSAGE, add_special_tokens=False).ids)
    tokens, overlap = db.execute(
        "SELECT chunk_tokens, chunk_overlap FROM embed_sidecar.sources WHERE source = 'docs'::regclass").fetchone()
    # MiniLM-L6's window (256) less [CLS]/[SEP], less the prefix and one token kept in reserve
    assert (prefix_tokens, tokens) == (2, 256 - 2 - prefix_tokens - 1), (prefix_tokens, tokens)
    passages = db.execute(f"SELECT id, chunk, char_start, char_end, embedding::text FROM {side} ORDER BY 1, 2").fetchall()
    assert len(passages) >= 3 * 3, len(passages)
    longest = 0
    for key, chunk, start, end, v in passages:
        passage = rows[key][start:end]
        # offsets are into the raw content, which holds no prefix
        assert not passage.startswith(PASSAGE) and passage.strip() == passage
        need = len(prefixed.counter.encode(PASSAGE + passage).ids)  # with [CLS]/[SEP], untruncated
        assert need <= 256, (key, chunk, need)
        longest = max(longest, need)
        cos = float(vec(v) @ ref(PASSAGE + passage))
        assert cos > 0.999, (key, chunk, cos)
    # a passage filled the budget: prefix + passage + [CLS]/[SEP] is the window less the reserve
    assert longest == 256 - 1, longest
    assert_chunks_in_step(db, "docs")
