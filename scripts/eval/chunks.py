#!/usr/bin/env python3
"""Long documents: truncation against chunking, on real manuals.

Corpus: the GNU info manuals of Debian packages (coreutils, grep, sed, wget, gettext, gnupg, ...),
taken from the .deb files themselves (apt-get download, kept under CORPUS_DIR/info) so nothing
depends on what the machine has installed. Every node of every manual is a document; the ones
longer than 400 tokens of the model are kept, so that part of each lies past the first window.

Queries: per document, one sentence of 8-30 words lying wholly past the first 300 tokens, where a
vector of the truncated text cannot have seen it. Relevant: every document containing it. The same
table gets two embeddings with the same model: `whole` (one vector per row, truncated to the
window) and `passages` (chunked); each is searched with vectors alone and hybrid.

Also measured: drain throughput of both (rows/s, passages/s, through the worker), passages per row,
and what a one-paragraph edit costs (passages re-embedded / passages of the edited rows).

Usage: scripts/eval/chunks.py [--queries N] (a database pes_eval_chunks is created afresh)."""
import argparse
import glob
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time

import psycopg
from tokenizers import Tokenizer

CORPUS = os.path.join(os.environ.get("CORPUS_DIR", "/opt/pg_embed_sidecar/corpus"), "info")
MODELS = f"/usr/share/postgresql/{os.environ.get('PG_MAJOR', '15')}/extension/pg_embed_sidecar/models"
# Debian packages that ship GNU info manuals in their main package
PACKAGES = ["coreutils", "diffutils", "findutils", "grep", "sed", "gzip", "wget", "gettext", "gnupg", "nettle-dev",
            "bc", "ed", "time", "bzip2-doc", "readline-common", "libtasn1-doc", "libffi-dev", "libgpg-error-dev"]
DB = "pes_eval_chunks"


def fetch_corpus():
    """The .info files of PACKAGES, extracted from their .deb files once."""
    if glob.glob(f"{CORPUS}/*.info*"):
        return
    os.makedirs(CORPUS, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o777)  # apt-get download fetches as user _apt
        subprocess.run(["apt-get", "download", "-q", *PACKAGES], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        for deb in glob.glob(f"{tmp}/*.deb"):
            subprocess.run(["dpkg-deb", "-x", deb, f"{tmp}/x"], check=True)
        for f in glob.glob(f"{tmp}/x/usr/share/info/*.info*"):
            shutil.copy(f, CORPUS)
    print(f"corpus: {len(glob.glob(f'{CORPUS}/*.info*'))} info files from {len(PACKAGES)} Debian packages -> {CORPUS}")


def nodes():
    """(manual, node, text) of every node; index, tag-table and menu-only nodes are skipped."""
    for path in sorted(glob.glob(f"{CORPUS}/*.info*")):
        raw = gzip.open(path, "rt", errors="replace").read() if path.endswith(".gz") else open(path, errors="replace").read()
        for part in raw.split("\x1f"):
            part = part.lstrip("\n")
            m = re.match(r"File: ([^,]+),\s+Node: ([^,\n]+)[^\n]*\n", part)
            if not m or "Index" in m.group(2):
                continue
            body = part[m.end():]
            body = body.split("\n* Menu:")[0].strip()  # the menu lists other nodes
            yield m.group(1).replace(".info", ""), m.group(2).strip(), body


def query_sentence(text, tok, skip_tokens=300):
    """A sentence of 8-30 words, mostly letters, wholly past the first `skip_tokens` tokens."""
    enc = tok.encode(text, add_special_tokens=False)
    if len(enc.ids) <= skip_tokens:
        return None
    after = enc.offsets[skip_tokens][0]
    candidates = []
    for m in re.finditer(r"[A-Z][^.!?]*[.!?](?=\s)", text[after:]):
        s = " ".join(m.group(0).split())
        words = s.split()
        letters = sum(c.isalpha() or c == " " for c in s) / len(s)
        if 8 <= len(words) <= 30 and letters > 0.85:
            candidates.append(s)
    # a fixed choice per document (the text's own hash), so reruns ask the same questions
    return min(candidates, key=lambda s: hashlib.md5(s.encode()).hexdigest()) if candidates else None


def evaluate(conn, label, sql, queries, relevant):
    r1 = r10 = mrr = 0.0
    t0 = time.time()
    for q, rel in zip(queries, relevant):
        got = [r[0] for r in conn.execute(sql, (q,))]
        rank = next((i + 1 for i, k in enumerate(got) if k in rel), None)
        if rank:
            r1 += rank == 1
            r10 += 1
            mrr += 1 / rank
    n = len(queries)
    print(f"| {label} | {r1 / n:.3f} | {r10 / n:.3f} | {mrr / n:.3f} | {(time.time() - t0) / n * 1000:.1f} |", flush=True)


def drain_timed(conn, sql, args=()):
    t0 = time.time()
    conn.execute(sql, args)
    assert conn.execute("SELECT embed_sidecar.wait('manual_nodes', '60 min')").fetchone()[0]
    return time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--edits", type=int, default=40)
    ap.add_argument("--keep", action="store_true", help="keep database pes_eval_chunks afterwards")
    args = ap.parse_args()
    fetch_corpus()
    tok = Tokenizer.from_file(f"{MODELS}/{args.model}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    docs = []
    for manual, node, body in nodes():
        n = len(tok.encode(body, add_special_tokens=False).ids)
        if n >= 400:
            docs.append((len(docs) + 1, manual, node, body, n))
    tokens = sorted(d[4] for d in docs)

    with psycopg.connect(dbname="postgres", autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    conn = psycopg.connect(dbname=DB, autocommit=True)
    conn.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
    conn.execute("CREATE TABLE manual_nodes (id int PRIMARY KEY, manual text, node text, body text)")
    with conn.cursor().copy("COPY manual_nodes FROM STDIN") as cp:
        for i, manual, node, body, _ in docs:
            cp.write_row((i, manual, node, body))
    print(f"# long documents — {time.strftime('%Y-%m-%d')}, model {args.model}\n")
    print(f"{len(docs)} nodes of {len({d[1] for d in docs})} GNU info manuals with ≥ 400 tokens: median "
          f"{tokens[len(tokens) // 2]} tokens, 90th percentile {tokens[len(tokens) * 9 // 10]}, max {tokens[-1]}\n")

    whole_s = drain_timed(conn, "SELECT embed_sidecar.watch('manual_nodes', 'body', embedding => 'whole', model => %s)",
                          (args.model,))
    chunk_s = drain_timed(conn, "SELECT embed_sidecar.watch('manual_nodes', 'body', embedding => 'passages', model => %s, "
                                "chunking => true)", (args.model,))
    pid, sidecar, tk, ov = conn.execute("SELECT id, sidecar::text, chunk_tokens, chunk_overlap FROM embed_sidecar.sources "
                                        "WHERE embedding = 'passages'").fetchone()
    passages = conn.execute(f"SELECT count(*) FROM {sidecar}").fetchone()[0]
    # the inference ceiling for the same texts, in the same run: one embed_texts() call over 512
    # of the passages and 512 of the truncated rows (no queue, no lookup, no write)
    ceiling = {}
    for name, sql in [("passages", f"""SELECT substr(n.body, p.char_start + 1, p.char_end - p.char_start)
                                       FROM {sidecar} p JOIN manual_nodes n USING (id) ORDER BY md5(p.chunk_hash::text) LIMIT 512"""),
                      ("whole", "SELECT body FROM manual_nodes ORDER BY md5(body) LIMIT 512")]:
        texts = [r[0] for r in conn.execute(sql)]
        t0 = time.time()
        conn.execute("SELECT count(*) FROM embed_sidecar._embed_many(%s)", (texts,))
        ceiling[name] = len(texts) / (time.time() - t0)
    print("| embedding | vectors | per row | drain time | rows/s | vectors/s | embed_texts ceiling | drain / ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| whole (truncated to the window) | {len(docs)} | 1 | {whole_s:.1f} s | {len(docs) / whole_s:.1f} | "
          f"{len(docs) / whole_s:.1f} | {ceiling['whole']:.1f} | {len(docs) / whole_s / ceiling['whole']:.2f}× |")
    print(f"| passages ({tk} tokens, overlap {ov}) | {passages} | {passages / len(docs):.1f} | {chunk_s:.1f} s | "
          f"{len(docs) / chunk_s:.1f} | {passages / chunk_s:.1f} | {ceiling['passages']:.1f} | "
          f"{passages / chunk_s / ceiling['passages']:.2f}× |\n")
    bad = conn.execute("SELECT missing + stale + orphans FROM embed_sidecar.verify('manual_nodes', 'passages')").fetchone()[0]
    print(f"verify(passages): {bad} missing/stale/orphaned\n")

    queries, relevant = [], []
    by_sentence = {}
    for i, manual, node, body, _ in sorted(docs, key=lambda d: hashlib.md5(d[3].encode()).hexdigest()):
        q = query_sentence(body, tok)
        if q and q not in by_sentence:
            by_sentence[q] = i
            queries.append(q)
        if len(queries) >= args.queries:
            break
    flat = {i: " ".join(body.split()) for i, _, _, body, _ in docs}
    for q in queries:
        relevant.append({i for i, t in flat.items() if q in t})
    print(f"{len(queries)} queries (a sentence from past the first 300 tokens; relevant: every node containing it)\n")
    print("| method | recall@1 | recall@10 | MRR@10 | ms/query |")
    print("|---|---:|---:|---:|---:|")
    for label, emb in [("vector, whole row (truncated)", "whole"), ("vector, passages (chunked)", "passages")]:
        evaluate(conn, label, f"SELECT (key->>0)::int FROM embed_sidecar.search('manual_nodes', %s, 10, embedding => '{emb}')",
                 queries, relevant)
    for label, emb in [("hybrid, whole row (truncated)", "whole"), ("hybrid, passages (chunked)", "passages")]:
        evaluate(conn, label, f"SELECT (key->>0)::int FROM embed_sidecar.hybrid_search('manual_nodes', %s, 10, "
                              f"embedding => '{emb}')", queries, relevant)
    print()

    # one-paragraph edits: the middle paragraph of long rows rewritten, drained in this session
    edited = conn.execute(f"""SELECT id, body FROM manual_nodes WHERE id IN (
                                SELECT id FROM {sidecar} GROUP BY id HAVING count(*) >= 4)
                              ORDER BY md5(body) LIMIT %s""", (args.edits,)).fetchall()
    conn.execute("SELECT embed_sidecar.pause('manual_nodes', embedding => 'passages')")
    for i, body in edited:
        paras = body.split("\n\n")
        paras[len(paras) // 2] = f"This paragraph was rewritten for the edit test of node {i}; its old text is gone."
        conn.execute("UPDATE manual_nodes SET body = %s WHERE id = %s", ("\n\n".join(paras), i))
    before = conn.execute("SELECT embed_sidecar.texts_embedded()").fetchone()[0]
    t0 = time.time()
    # this embedding only (process() would drain 'whole' too, and count its texts)
    while conn.execute("SELECT embed_sidecar._process(%s, 10000)", (pid,)).fetchone()[0] and time.time() - t0 < 600:
        pass
    took = time.time() - t0
    reembedded = conn.execute("SELECT embed_sidecar.texts_embedded()").fetchone()[0] - before
    total = conn.execute(f"SELECT count(*) FROM {sidecar} WHERE id = ANY(%s)", ([i for i, _ in edited],)).fetchone()[0]
    conn.execute("SELECT embed_sidecar.resume('manual_nodes', embedding => 'passages')")
    bad = conn.execute("SELECT missing + stale + orphans FROM embed_sidecar.verify('manual_nodes', 'passages')").fetchone()[0]
    print(f"one-paragraph edit of {len(edited)} rows: {reembedded} of their {total} passages re-embedded "
          f"({reembedded / total:.1%}; {reembedded / len(edited):.2f} per row; re-embedding whole rows would be "
          f"{total / len(edited):.1f} per row) in {took:.1f} s; verify after: {bad} wrong")
    conn.close()
    if not args.keep:
        with psycopg.connect(dbname="postgres", autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


if __name__ == "__main__":
    main()
