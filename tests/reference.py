"""An independent reference embedder: Python onnxruntime + tokenizers on the same model files,
one text at a time (no padding, so nothing depends on our batching), numpy mean pooling of token
states. For a model whose manifest reads an already-pooled output (pooling "none"), the reference
still pools the graph's token states itself, so it checks that output instead of repeating it."""
import json
import os

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

MODEL_DIR = os.environ.get(
    "EMBED_MODEL_DIR",
    f"/usr/share/postgresql/{os.environ.get('PG_MAJOR', '15')}/extension/pg_embed_sidecar/models/all-MiniLM-L6-v2")


class Reference:
    def __init__(self, model_dir: str = MODEL_DIR):
        manifest = json.load(open(os.path.join(model_dir, "embed_model.json")))
        self.tok = Tokenizer.from_file(os.path.join(model_dir, manifest["tokenizer"]))
        self.tok.no_padding()
        self.tok.enable_truncation(manifest["max_length"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(os.path.join(model_dir, manifest["onnx"]), opts,
                                         providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.sess.get_inputs()}
        if manifest.get("pooling", "mean") == "mean" and "output" in manifest:
            self.states = manifest["output"]
        else:  # the graph's token states: [batch, seq, dims] floats
            self.states = next(o.name for o in self.sess.get_outputs()
                               if len(o.shape) == 3 and o.type == "tensor(float)")

    def embed(self, text: str) -> np.ndarray:
        enc = self.tok.encode(text)
        ids = np.array([enc.ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.sess.run([self.states], feed)[0][0]  # [seq, dims]
        v = hidden.mean(axis=0)
        return v / np.linalg.norm(v)


# Texts every parity test embeds: scripts, accents, emoji, CJK, blanks, one character.
SENTENCES = [
    "A cat sits on the mat",
    "The quick brown fox jumps over the lazy dog.",
    "PostgreSQL is a powerful, open source object-relational database system.",
    "Vectors are kept in a sidecar table next to the source rows.",
    "",
    "   ",
    "a",
    "Ünïcödé àccents, naïve café, façade, Zürich",
    "Emoji: 🎉🚀🐘 are fun 😀",
    "日本語のテキストを埋め込みます。東京は日本の首都です。",
    "中文文本嵌入测试，北京是中国的首都。",
    "한국어 문장 임베딩 테스트입니다.",
    "نص عربي من اليمين إلى اليسار",
    "עברית היא שפה שנכתבת מימין לשמאל",
    "Combining marks: e\u0301 a\u0300 o\u0308 n\u0303",
    "Control chars:\t tab \x01 \x07 bell\nnew line\r\n",
    "Ελληνικά κείμενα για δοκιμή",
    "Русский текст для проверки",
    "SELECT * FROM users WHERE name = 'x'; DROP TABLE users; --",
    "Numbers 1234567890 and symbols !@#$%^&*()_+-=[]{}|;:',.<>/?",
    "Mixed: English, 日本語, العربية, emoji 🐘 and ñ",
    "The same sentence twice. The same sentence twice.",
    " ".join(f"word{i}" for i in range(600)),  # far beyond the 256-token window
    "Long prose. " + "Databases store data and answer questions about it quickly. " * 80,
]
