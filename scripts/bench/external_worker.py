#!/usr/bin/env python3
"""Baseline for the benchmark: the architecture of external vectorizer workers. A separate Python
process reads the same pgmq queue over a socket (psycopg), fetches the texts, embeds them with
onnxruntime + tokenizers (same model files, same threads, same batching rules as the extension:
sorted by length, at most 64 texts / 2048 padded tokens per run) and writes the sidecar.

external_worker.py --table T --threads N [--window 256] : drains until the queue is empty.
"""
import argparse
import hashlib
import json
import os
import time

import numpy as np
import onnxruntime as ort
import psycopg
from tokenizers import Tokenizer

MODEL_DIR = f"/usr/share/postgresql/{os.environ.get('PG_MAJOR', '15')}/extension/pg_embed_sidecar/models/all-MiniLM-L6-v2"


class Embedder:
    def __init__(self, threads, max_batch=64, max_tokens=2048):
        m = json.load(open(os.path.join(MODEL_DIR, "embed_model.json")))
        self.tok = Tokenizer.from_file(os.path.join(MODEL_DIR, m["tokenizer"]))
        self.tok.no_padding()
        self.tok.enable_truncation(m["max_length"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(os.path.join(MODEL_DIR, m["onnx"]), opts, providers=["CPUExecutionProvider"])
        self.names = {i.name for i in self.sess.get_inputs()}
        self.max_batch, self.max_tokens = max_batch, max_tokens

    def embed(self, texts):
        ids = [e.ids for e in self.tok.encode_batch(texts)]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [None] * len(ids)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < self.max_batch and (end - start + 1) * len(ids[order[end]]) <= self.max_tokens:
                end += 1
            batch = order[start:end]
            seq = max(1, max(len(ids[i]) for i in batch))
            input_ids = np.zeros((len(batch), seq), dtype=np.int64)
            mask = np.zeros_like(input_ids)
            for r, i in enumerate(batch):
                input_ids[r, :len(ids[i])] = ids[i]
                mask[r, :len(ids[i])] = 1
            feed = {"input_ids": input_ids, "attention_mask": mask}
            if "token_type_ids" in self.names:
                feed["token_type_ids"] = np.zeros_like(input_ids)
            hidden = self.sess.run(None, feed)[0]
            pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
            for r, i in enumerate(batch):
                out[i] = pooled[r]
            start = end
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", required=True)
    ap.add_argument("--key", default="name")
    ap.add_argument("--content", default="body")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--dsn", default="dbname=postgres")
    args = ap.parse_args()
    emb = Embedder(args.threads)
    conn = psycopg.connect(args.dsn)
    queue, sidecar, model = conn.execute(
        "SELECT queue_name, sidecar::text, model_id FROM embed_sidecar.sources WHERE source = %s::regclass",
        (args.table,)).fetchone()
    conn.commit()
    done = 0
    t0 = time.time()
    while True:
        # both lanes: writers' changes first, then the backfill (reembed() fills the bulk lane)
        for lane in (queue, queue + "_bulk"):
            msgs = conn.execute("SELECT msg_id, message->>0 FROM pgmq.read(%s, 60, %s)", (lane, args.window)).fetchall()
            if msgs:
                break
        conn.commit()
        if not msgs:
            break
        keys = sorted({k for _, k in msgs})
        rows = conn.execute(f"SELECT {args.key}, {args.content} FROM {args.table} WHERE {args.key} = ANY(%s)", (keys,)).fetchall()
        rows = [(k, t) for k, t in rows if t and t.strip()]
        vectors = emb.embed([t for _, t in rows])
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS incoming (k text, v text, h bytea) ON COMMIT DELETE ROWS")
            with cur.copy("COPY incoming FROM STDIN") as cp:
                for (k, t), v in zip(rows, vectors):
                    cp.write_row((k, "[" + ",".join(f"{x:.7g}" for x in v) + "]", hashlib.sha256(t.encode()).digest()))
            cur.execute(f"""INSERT INTO {sidecar} ({args.key}, embedding, model, content_hash, embedded_at)
                            SELECT k, v::vector, %s, h, now() FROM incoming
                            ON CONFLICT ({args.key}) DO UPDATE SET embedding = EXCLUDED.embedding, model = EXCLUDED.model,
                               content_hash = EXCLUDED.content_hash, embedded_at = EXCLUDED.embedded_at""", (model,))
            cur.execute("SELECT pgmq.delete(%s, %s::bigint[])", (lane, [m for m, _ in msgs]))
        conn.commit()
        done += len(msgs)
    print(json.dumps({"rows": done, "seconds": round(time.time() - t0, 3)}))


if __name__ == "__main__":
    main()
