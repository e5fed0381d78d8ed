#!/usr/bin/env python3
"""Multilingual search quality and speed of every installed model, on text none of us wrote:
Debian's translated package descriptions (scripts/shared/translations.py).

Quality, per language L (a fixed sample of packages whose L description translates the current
English one): the corpus is their long descriptions in L; queries are the first --queries of them,
  cross-lingual: the English synopsis -> that package's description in L
  same-language: the synopsis in L      -> that package's description in L
and, as a baseline, English synopsis -> English description over the same packages. Packages with
identical descriptions count as one hit. Vectors come from the extension (embed_texts for
passages, embed_query for queries, so each model's prefixes apply); ranking is exact (numpy).
Reported: recall@10 and MRR@10.

Speed (--speed): embed_texts texts/s of each model on the same texts, short (synopses) and long
(descriptions), in one backend after a warm-up call; and the drain: rows/s for a watched table of
--drain-rows German descriptions, from watch() to in step, per model.
Usage: multilingual.py [--dsn ...] [--docs 500] [--queries 100] [--languages de,fr,...] [--speed]
"""
import argparse
import hashlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for shared/
from shared import translations  # noqa: E402
from shared.db import connect  # noqa: E402

DEFAULT_LANGUAGES = "de,fr,es,it,pt,pl,cs,ru,uk,ja,ko,zh_CN"


def vectors(text_array):
    return np.array([[float(x) for x in v.strip("[]").split(",")] for v in text_array], dtype=np.float32)


def embed(conn, model, texts, query):
    conn.execute("SELECT set_config('pg_embed_sidecar.model', %s, false)", (model,))
    if query:
        rows = conn.execute("SELECT embed_query(q)::text FROM unnest(%s::text[]) WITH ORDINALITY u(q, n) ORDER BY n",
                            (texts,)).fetchall()
        return vectors([r[0] for r in rows])
    out = []
    for i in range(0, len(texts), 64):
        out += conn.execute("SELECT embed_texts(%s::text[])::text[]", (texts[i:i + 64],)).fetchone()[0]
    return vectors(out)


def scores(doc_vecs, query_vecs, relevant):
    """recall@10 and MRR@10; relevant[i] = the doc indexes that answer query i."""
    sims = query_vecs @ doc_vecs.T
    recall = mrr = 0.0
    for i, row in enumerate(sims):
        top = np.argsort(-row, kind="stable")[:10]
        ranks = [r for r, d in enumerate(top) if d in relevant[i]]
        recall += bool(ranks)
        mrr += 1 / (ranks[0] + 1) if ranks else 0
    return recall / len(sims), mrr / len(sims)


def relevance(bodies, n):
    groups = {}
    for d, body in enumerate(bodies):
        groups.setdefault(hashlib.sha256(body.encode()).hexdigest(), set()).add(d)
    return [groups[hashlib.sha256(bodies[i].encode()).hexdigest()] for i in range(n)]


def quality(conn, models, languages, n_docs, n_queries):
    english = translations.descriptions("en")
    rows = []
    for lang in languages:
        pairs = list(translations.aligned(lang, english).values())[:n_docs]
        if len(pairs) < n_queries:
            print(f"  {lang}: only {len(pairs)} aligned descriptions, skipped", flush=True)
            continue
        en_syn = [en[0] for en, _ in pairs[:n_queries]]
        l_syn = [tr[0] for _, tr in pairs[:n_queries]]
        bodies = [tr[1] for _, tr in pairs]
        en_bodies = [en[1] for en, _ in pairs]
        rel, en_rel = relevance(bodies, n_queries), relevance(en_bodies, n_queries)
        for model in models:
            started = time.time()
            docs = embed(conn, model, bodies, query=False)
            result = {"lang": lang, "model": model, "docs": len(bodies),
                      "en->L": scores(docs, embed(conn, model, en_syn, True), rel),
                      "L->L": scores(docs, embed(conn, model, l_syn, True), rel)}
            if lang == languages[0]:  # the English baseline, once, over the first language's packages
                result["en->en"] = scores(embed(conn, model, en_bodies, False), embed(conn, model, en_syn, True), en_rel)
            rows.append(result)
            print(f"  {lang:6} {model:24} " + "  ".join(f"{k} R@10 {v[0]:.3f} MRR {v[1]:.3f}"
                                                    for k, v in result.items() if isinstance(v, tuple))
                  + f"  ({time.time() - started:.0f}s)", flush=True)
    return rows


def print_quality(rows, models, n_queries):
    print(f"\n### recall@10 / MRR@10 ({n_queries} queries per row)\n")
    print("| language | queries → descriptions | docs | " + " | ".join(models) + " |")
    print("|---|---|---:|" + "---:|" * len(models))
    by = {(r["lang"], r["model"]): r for r in rows}
    for lang in dict.fromkeys(r["lang"] for r in rows):
        for key, label in (("en->en", "English → English"), ("en->L", f"English → {lang}"), ("L->L", f"{lang} → {lang}")):
            cells = [by[(lang, m)].get(key) for m in models]
            if all(c is None for c in cells):
                continue
            print(f"| {lang} | {label} | {by[(lang, models[0])]['docs']} | "
                  + " | ".join(f"{c[0]:.2f} / {c[1]:.2f}" if c else "" for c in cells) + " |")
    for key, label in (("en->L", "English → other language"), ("L->L", "same language")):
        means = [np.mean([r[key][1] for r in rows if r["model"] == m]) for m in models]
        recalls = [np.mean([r[key][0] for r in rows if r["model"] == m]) for m in models]
        print(f"| **mean** | {label} | | " + " | ".join(f"**{a:.2f} / {b:.2f}**" for a, b in zip(recalls, means)) + " |")


def speed(conn, models, dsn, drain_rows):
    english = translations.descriptions("en")
    pairs = list(translations.aligned("de", english).values())
    short = [tr[0] for _, tr in pairs[:512]]
    long = [tr[1] for _, tr in pairs if len(tr[1]) > 600][:128]
    print(f"\n### embed_texts, texts/s (one backend, {len(short)} short texts of "
          f"{np.mean([len(t) for t in short]):.0f} chars, {len(long)} long of {np.mean([len(t) for t in long]):.0f})\n")
    print("| model | short | long | drain rows/s |")
    print("|---|---:|---:|---:|")
    for model in models:
        embed(conn, model, short[:8], False)  # load and warm the model
        rates = []
        for texts in (short, long):
            started = time.time()
            embed(conn, model, texts, False)
            rates.append(len(texts) / (time.time() - started))
        print(f"| {model} | {rates[0]:.0f} | {rates[1]:.1f} | {drain_rate(dsn, model, [tr[1] for _, tr in pairs[:drain_rows]]):.1f} |",
              flush=True)


def drain_rate(dsn, model, bodies):
    with connect(dsn) as c:
        c.execute("DROP TABLE IF EXISTS eval_drain_embeddings, eval_drain CASCADE")
        c.execute("CREATE TABLE eval_drain (id int PRIMARY KEY, body text)")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO eval_drain VALUES (%s, %s)", list(enumerate(bodies, 1)))
        started = time.time()
        c.execute("SELECT embed_sidecar.watch('eval_drain', 'body', model => %s)", (model,))
        ok = c.execute("SELECT embed_sidecar.wait('eval_drain'::regclass, interval '30 minutes')").fetchone()[0]
        took = time.time() - started
        c.execute("SELECT embed_sidecar.unwatch('eval_drain', drop_sidecar => true)")
        c.execute("DROP TABLE eval_drain CASCADE")
    assert ok, "the drain did not finish"
    return len(bodies) / took


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default="")
    ap.add_argument("--models", default=None, help="comma-separated (default: every installed model)")
    ap.add_argument("--languages", default=DEFAULT_LANGUAGES)
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--speed", action="store_true", help="also measure embed_texts and the drain")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--drain-rows", type=int, default=300)
    args = ap.parse_args()
    with connect(args.dsn) as conn:
        models = args.models.split(",") if args.models else [
            r[0] for r in conn.execute("SELECT name FROM embed_sidecar.models WHERE error IS NULL ORDER BY name")]
        if not args.no_quality:
            langs = [l for l in args.languages.split(",") if l in translations.available()]
            print(f"quality: {len(langs)} languages, {args.docs} descriptions each, models {', '.join(models)}", flush=True)
            print_quality(quality(conn, models, langs, args.docs, args.queries), models, args.queries)
        if args.speed:
            speed(conn, models, args.dsn, args.drain_rows)


if __name__ == "__main__":
    main()
