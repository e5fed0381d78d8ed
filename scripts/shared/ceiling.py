"""The ceiling every benchmark compares with: raw ONNX Runtime through embed_core (tokenise,
batch, pool), no PostgreSQL — the `embed_ceiling` binary of crates/embed_core, on the same model
files and library the server loads."""
import json
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ORT_LIB = f"/usr/lib/postgresql/{os.environ.get('PG_MAJOR', '15')}/lib/pg_embed_sidecar/libonnxruntime.so"
MODEL_DIR = f"/usr/share/postgresql/{os.environ.get('PG_MAJOR', '15')}/extension/pg_embed_sidecar/models/all-MiniLM-L6-v2"


def ceiling(texts, threads, window):
    """Texts per second of embed_core on `texts` (needs `cargo build --release -p embed_core
    --bin embed_ceiling`, which scripts/bench/all.sh runs)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
    out = subprocess.run([os.path.join(ROOT, "target/release/embed_ceiling"), ORT_LIB, MODEL_DIR, f.name,
                          "--threads", str(threads), "--window", str(window)], check=True, capture_output=True, text=True)
    os.unlink(f.name)
    return len(texts) / json.loads(out.stdout)["seconds"]
