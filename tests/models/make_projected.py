#!/usr/bin/env python3
"""Build a genuine 128-dimension test model: the default model's graph with a fixed random
projection (384 -> 128, seed 128) applied to its token states. Mean pooling commutes with a linear
map, so the pooled vectors are the default model's pooled vectors projected: a real model of
another dimension, for testing a model switch that changes the sidecar's vector type.
Usage: make_projected.py SOURCE_MODEL_DIR TARGET_DIR"""
import json
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

DIMS = 128


def build(source: str, target: str) -> None:
    manifest = json.load(open(os.path.join(source, "embed_model.json")))
    model = onnx.load(os.path.join(source, manifest["onnx"]))
    graph = model.graph
    states = next(o for o in graph.output if o.name == "last_hidden_state")
    width = states.type.tensor_type.shape.dim[-1].dim_value or 384
    projection = (np.random.default_rng(DIMS).standard_normal((width, DIMS)) / np.sqrt(DIMS)).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(projection, "pes_projection"))
    graph.node.append(helper.make_node("MatMul", ["last_hidden_state", "pes_projection"], ["projected"]))
    graph.output.append(helper.make_tensor_value_info("projected", onnx.TensorProto.FLOAT, ["batch", "sequence", DIMS]))
    os.makedirs(target, exist_ok=True)
    onnx.save(model, os.path.join(target, "model.onnx"))
    shutil.copy(os.path.join(source, manifest["tokenizer"]), os.path.join(target, "tokenizer.json"))
    with open(os.path.join(target, "embed_model.json"), "w") as f:
        json.dump({"name": os.path.basename(target.rstrip("/")), "onnx": "model.onnx", "tokenizer": "tokenizer.json",
                   "max_length": manifest["max_length"], "output": "projected", "pooling": "mean"}, f, indent=2)
    for name in os.listdir(target):
        os.chmod(os.path.join(target, name), 0o644)
    os.chmod(target, 0o755)


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2])
