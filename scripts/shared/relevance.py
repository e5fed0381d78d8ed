"""The demo corpus's search relevance: query = a package's synopsis, relevant = every package
with that package's long description (the text that was embedded). Used by scripts/eval."""
import hashlib
from collections import defaultdict


def queries(conn, sidecar, n):
    """The query sample (name, synopsis) and the relevance sets: packages grouped by identical long
    description (`by_text`, keyed by its hash, and `desc_of` each package's hash)."""
    by_text = defaultdict(set)
    desc_of = {}
    for name, desc in conn.execute("SELECT name, description FROM packages"):
        h = hashlib.sha256((desc or "").encode()).hexdigest()
        by_text[h].add(name)
        desc_of[name] = h
    sample = conn.execute(f"""SELECT p.name, p.synopsis FROM packages p JOIN {sidecar} e USING (name)
                              WHERE p.synopsis <> '' ORDER BY md5(p.name) LIMIT %s""", (n,)).fetchall()
    return by_text, desc_of, sample
