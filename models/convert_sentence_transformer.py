#!/usr/bin/env python3
"""Convert a sentence-transformers folder, zipped (model.safetensors, config.json,
tokenizer.json), into the files the extension reads: model.onnx (fp32, the same weights) and its
tokenizer.json, unchanged. Two architectures, by config.json's model_type:

- "bert" (all-MiniLM-L6-v2): positions from 0, token type 0 added;
- "mpnet" (all-mpnet-base-v2): positions from padding_idx + 1 = 2 (the table's first two rows
  are never read), no token types, and a relative-position bias (32 buckets, T5's bidirectional
  bucketing, max distance 128) shared by every layer's attention scores.

Deterministic: the same zip gives byte-identical files, so models/install.py pins their sha256.
Usage: convert_sentence_transformer.py ZIP OUTDIR
"""
import io
import json
import math
import os
import struct
import sys
import zipfile
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnx  # noqa: E402

import encoder_onnx  # noqa: E402

DTYPES = {"F32": np.float32, "I64": np.int64}


def read_safetensors(data: bytes) -> dict:
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(data, DTYPES[t["dtype"]], offset=8 + n + start,
                                  count=(end - start) // np.dtype(DTYPES[t["dtype"]]).itemsize).reshape(t["shape"])
    return out


def relative_buckets(size, num_buckets=32, max_distance=128) -> np.ndarray:
    """MPNet's bucket of every (query i, key j) pair, from j - i, in float32 as its code computes."""
    rel = np.arange(size)[None, :] - np.arange(size)[:, None]
    n = -rel
    half = num_buckets // 2
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    # n < max_exact takes n itself below; max(n, 1) keeps log(0) out
    scaled = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (scaled * np.float32(half - max_exact)).astype(np.int64, copy=False)
    large = np.minimum(np.where(n < max_exact, 0, large), half - 1)
    return ret + np.where(n < max_exact, n, large)


def weights_of(t: dict, cfg: dict, mpnet: bool) -> dict:
    H = cfg["hidden_size"]
    e = "embeddings."
    w = {"emb.word": t[e + "word_embeddings.weight"],
         # our graph numbers positions from 0; MPNet's first token is position padding_idx + 1
         "emb.pos": t[e + "position_embeddings.weight"][cfg["pad_token_id"] + 1:] if mpnet
         else t[e + "position_embeddings.weight"],
         "emb.type": t[e + "token_type_embeddings.weight"] if not mpnet else np.zeros((1, H), np.float32),
         "emb.ln.w": t[e + "LayerNorm.weight"], "emb.ln.b": t[e + "LayerNorm.bias"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        att = p + ("attention.attn." if mpnet else "attention.self.")
        names = {"q": att + ("q" if mpnet else "query"), "k": att + ("k" if mpnet else "key"),
                 "v": att + ("v" if mpnet else "value"),
                 "ao": p + ("attention.attn.o" if mpnet else "attention.output.dense"),
                 "aln": p + ("attention.LayerNorm" if mpnet else "attention.output.LayerNorm"),
                 "fi": p + "intermediate.dense", "fo": p + "output.dense", "oln": p + "output.LayerNorm"}
        for ours, theirs in names.items():
            w[f"l{i}.{ours}.w"] = t[theirs + ".weight"]
            w[f"l{i}.{ours}.b"] = t[theirs + ".bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


def model_of(files: dict) -> onnx.ModelProto:
    cfg = json.loads(files["config.json"])
    mpnet = cfg["model_type"] == "mpnet"
    if cfg["model_type"] not in ("mpnet", "bert"):
        raise ValueError(f"model_type {cfg['model_type']!r}: only bert and mpnet are converted")
    tensors = read_safetensors(files["model.safetensors"])
    shape = SimpleNamespace(hidden=cfg["hidden_size"], heads=cfg["num_attention_heads"],
                            layers=cfg["num_hidden_layers"], eps=cfg["layer_norm_eps"])
    relative = None
    if mpnet:
        table = np.ascontiguousarray(tensors["encoder.relative_attention_bias.weight"], dtype=np.float32)
        size = cfg["max_position_embeddings"] - cfg["pad_token_id"] - 1
        relative = (table, relative_buckets(size, num_buckets=cfg.get("relative_attention_num_buckets", 32)))
    return encoder_onnx.build(shape, weights_of(tensors, cfg, mpnet), relative_bias=relative, name=cfg["model_type"])


def unzip(data: bytes) -> dict:
    """The folder's files by base name (the zip holds one folder)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {os.path.basename(n): z.read(n) for n in z.namelist()
                if os.path.basename(n) in ("config.json", "model.safetensors", "tokenizer.json")}


def convert(data: bytes, outdir: str) -> None:
    files = unzip(data)
    os.makedirs(outdir, exist_ok=True)
    onnx.save_model(model_of(files), os.path.join(outdir, "model.onnx"))
    with open(os.path.join(outdir, "tokenizer.json"), "wb") as f:
        f.write(files["tokenizer.json"])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    convert(open(sys.argv[1], "rb").read(), sys.argv[2])
