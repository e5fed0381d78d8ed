"""Tokenising long texts for their first window: the cut before tokenising (0.3) against the cut of
0.2 (64 bytes a token), in one run, on Debian's own descriptions in several languages joined into
texts of ~48 KB (the size that starved the inference worker in issue 22). Prints a markdown table.

  cargo build --release -p embed_core --bin tokenize_window
  $VENV/bin/python scripts/bench/tokenize_window.py [--bytes 49152] [--texts 64]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from shared import translations  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MODELS = os.environ.get("PES_MODEL_ROOT",
                        "/usr/share/postgresql/15/extension/pg_embed_sidecar/models")


def long_texts(lang, size, count):
    bodies = [body for _, _, body in translations.descriptions(lang).values()]
    texts, i = [], 0
    while len(texts) < count and bodies:
        parts, n = [], 0
        while n < size:
            parts.append(bodies[i % len(bodies)])
            n += len(parts[-1].encode()) + 2
            i += 1
        texts.append("\n\n".join(parts))
    return texts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", type=int, default=48 * 1024)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--models", default="all-MiniLM-L6-v2,multilingual-e5-small")
    ap.add_argument("--langs", default="en,de,ru,ja")
    args = ap.parse_args()
    binary = os.path.join(ROOT, "target", "release", "tokenize_window")
    print(f"{args.texts} texts of ~{args.bytes // 1024} KB (Debian's descriptions joined), "
          "first window tokenised, 3 interleaved rounds\n")
    print("| model | language | 0.2 cut (64 B/token), texts/s | 0.3 cut, texts/s | ratio | same ids |")
    print("|---|---|---:|---:|---:|---|")
    for model in args.models.split(","):
        for lang in args.langs.split(","):
            with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
                for t in long_texts(lang, args.bytes, args.texts):
                    f.write(json.dumps(t) + "\n")
                f.flush()
                out = json.loads(subprocess.run([binary, os.path.join(MODELS, model), f.name],
                                                check=True, capture_output=True, text=True).stdout)
            print(f"| {model} | {lang} | {out['before_per_s']:.0f} | {out['cut_per_s']:.0f} | "
                  f"{out['ratio']:.1f}× | {'yes' if out['ids_equal'] else 'NO'} |")


if __name__ == "__main__":
    main()
