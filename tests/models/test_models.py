"""A second model from the registries (paraphrase-MiniLM-L3-v2, the graph's own pooled
output), the manifest's choice of output and pooling, and embed_sidecar.models."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import MODELS, connect, error_of, one
from reference import SENTENCES, Reference

L3 = "paraphrase-MiniLM-L3-v2"


def vec(text):
    return np.array([float(x) for x in text.strip("[]{}").split(",")])


@pytest.mark.parametrize("inference", ["shared", "local"])
def test_second_model_parity_with_independent_reference(inference):
    """Our vectors read the graph's pooled output ("461"); the reference pools the token states
    itself, so this checks tokenizer, window (128), that output and normalisation."""
    ref = Reference(f"{MODELS}/{L3}")
    with connect() as c:
        c.execute("SELECT set_config('pg_embed_sidecar.inference', %s, false)", (inference,))
        single = [r[0] for r in c.execute("SELECT embed_sidecar._embed_with(%s, t)::text FROM unnest(%s::text[]) t",
                                          (L3, SENTENCES)).fetchall()]
        c.execute("SELECT set_config('pg_embed_sidecar.model', %s, false)", (L3,))
        batched = one(c, "SELECT embed_texts(%s::text[])::text[]", (SENTENCES,))
    worst = 1.0
    for text, a, b in zip(SENTENCES, single, batched):
        r = ref.embed(text)
        for v in (vec(a), vec(b)):
            assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-5
            worst = min(worst, float(v @ r))
    assert worst >= 0.9999, worst
    # and it is another model: the same text lands elsewhere than with the default model
    with connect() as c:
        a, b = (vec(one(c, "SELECT embed_sidecar._embed_with(%s, 'a cat sits on the mat')::text", (m,)))
                for m in ("all-MiniLM-L6-v2", L3))
    assert float(a @ b) < 0.9


def test_models_view_lists_what_is_installed(model_copy):
    broken = model_copy("broken-model")
    os.remove(f"{broken}/model.onnx")
    with connect() as c:
        rows = {r[0]: r[1:] for r in c.execute(
            "SELECT name, model_id, dims, token_window, size_bytes, error FROM embed_sidecar.models").fetchall()}
    assert rows["all-MiniLM-L6-v2"][1:3] == (384, 256) and rows["all-MiniLM-L6-v2"][0].startswith("all-MiniLM-L6-v2@")
    assert rows[L3][1:3] == (384, 128) and rows[L3][3] > 69_000_000 and rows[L3][4] is None
    assert rows["broken-model"][:4] == (None, None, None, None) and "no ONNX model file" in rows["broken-model"][4]


def test_manifest_chooses_output_and_pooling(tmp_path):
    """The same graph read two ways: its pooled output ("none") or its token states mean-pooled by
    us ("mean") give the same vectors but are two model ids (pooling is part of the identity); a
    pooling that does not fit the output's rank is a clear error."""
    made = []
    try:
        for name, manifest in (("l3-states", {"output": "onnx::Shape_422", "pooling": "mean"}),
                               ("l3-wrong", {"output": "461", "pooling": "mean"})):
            path = f"{MODELS}/{name}"
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(f"{MODELS}/{L3}", path)
            made.append(path)
            m = json.load(open(f"{path}/embed_model.json"))
            m.update(manifest, name=name)
            json.dump(m, open(f"{path}/embed_model.json", "w"))
        with connect() as c:
            text = "Vectors are kept in a sidecar table next to the source rows."
            pooled, states = (vec(one(c, "SELECT embed_sidecar._embed_with(%s, %s)::text", (m, text))) for m in (L3, "l3-states"))
            assert float(pooled @ states) > 0.9999
            ids = dict(c.execute("SELECT name, model_id FROM embed_sidecar.models WHERE name IN (%s, 'l3-states')", (L3,)).fetchall())
            assert ids[L3].split("@")[1] != ids["l3-states"].split("@")[1]
            state, msg, _ = error_of(c, "SELECT embed_sidecar._embed_with('l3-wrong', 'x')")
            assert "has rank 2" in msg and "pooling \"mean\"" in msg, (state, msg)
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def test_a_model_name_longer_than_the_service_carries_is_refused(db, model_copy):
    """The inference service's ring carries 64 bytes of a model's name: two directories sharing
    their first 64 bytes would be mixed up there, so a longer name is refused everywhere (review 4)."""
    long_name = "m" * 64 + "-second"
    model_copy(long_name)
    err = error_of(db, "SELECT embed_sidecar._embed_with(%s, 'a text')", (long_name,))
    assert err[0] == "22023" and "invalid model name" in err[1] and "64 bytes" in err[2]
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    assert error_of(db, "SELECT embed_sidecar.watch('docs', 'body', model => %s)", (long_name,))[0] == "22023"
    # 64 bytes is still a name
    model_copy("n" * 64)
    assert len(one(db, "SELECT embed_sidecar._embed_with(%s, 'a text')::text", ("n" * 64,)).split(",")) == 384
