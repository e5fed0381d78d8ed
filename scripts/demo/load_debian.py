#!/usr/bin/env python3
"""Load Debian package descriptions from this machine's apt lists into a table.

packages(name text primary key, section text, synopsis text, description text): the synopsis is
the one-line short description, the description the long one (paragraphs kept, ' .' lines turned
into blank lines). Rows are chosen in a fixed pseudo-random order (md5 of the name), so any
--rows N gives the same sample every time. Re-running upserts only rows whose text differs.

Reads the package lists scripts/setup.sh copies to /opt/pg_embed_sidecar/corpus (PES_CORPUS_DIR),
out of reach of any later `apt-get update`, which on this image deletes Translation-en.
"""
import argparse
import glob
import hashlib
import os
import sys

import psycopg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from shared.debian_lists import cat, long_description, stanzas  # noqa: E402

LISTS = os.environ.get("PES_CORPUS_DIR", "/opt/pg_embed_sidecar/corpus")


def corpus():
    sections = {}
    for path in sorted(glob.glob(f"{LISTS}/*_main_binary-*_Packages*")):
        for st in stanzas(cat(path)):
            if "Package" in st:
                sections.setdefault(st["Package"], st.get("Section", ""))
    docs = {}
    paths = sorted(glob.glob(f"{LISTS}/*bookworm_main_i18n_Translation-en*"))
    if not paths:
        sys.exit(f"no Translation-en in {LISTS}: run scripts/setup.sh (it copies the apt lists there)")
    for path in paths:
        for st in stanzas(cat(path)):
            name, raw = st.get("Package"), st.get("Description-en")
            if name and raw and name not in docs:
                docs[name] = (sections.get(name, ""), raw.split("\n")[0].strip(), long_description(raw))
    return docs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="all", help="how many packages (default all)")
    ap.add_argument("--table", default="packages")
    ap.add_argument("--dsn", default="")
    args = ap.parse_args()
    docs = corpus()
    names = sorted(docs, key=lambda n: hashlib.md5(n.encode()).hexdigest())
    if args.rows != "all":
        names = names[: int(args.rows)]
    with psycopg.connect(args.dsn, autocommit=False) as conn:
        conn.execute(psycopg.sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, section text, synopsis text, description text)"
        ).format(psycopg.sql.Identifier(args.table)))
        conn.execute("CREATE TEMP TABLE incoming (name text, section text, synopsis text, description text) ON COMMIT DROP")
        with conn.cursor().copy("COPY incoming FROM STDIN") as copy:
            for n in names:
                copy.write_row((n, *docs[n]))
        cur = conn.execute(psycopg.sql.SQL(
            """INSERT INTO {t} AS p SELECT * FROM incoming
               ON CONFLICT (name) DO UPDATE SET section = EXCLUDED.section, synopsis = EXCLUDED.synopsis,
                                                description = EXCLUDED.description
               WHERE (p.section, p.synopsis, p.description) IS DISTINCT FROM
                     (EXCLUDED.section, EXCLUDED.synopsis, EXCLUDED.description)""").format(
            t=psycopg.sql.Identifier(args.table)))
        changed = cur.rowcount
        conn.commit()
    print(f"{len(names)} packages selected of {len(docs)} in the apt lists; {changed} rows inserted or changed")


if __name__ == "__main__":
    main()
