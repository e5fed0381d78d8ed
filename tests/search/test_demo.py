"""The main job's load path on a small sample: the Debian corpus that scripts/setup.sh installs,
loaded by scripts/demo/load_debian.py, watched, embedded and searched. A missing install step (the
corpus deleted by a later apt-get update) fails here, not first in front of a user."""
import os
import subprocess
import sys

from conftest import DSN, assert_in_step, one, wait, watch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(schema, rows):
    dsn = f"host={DSN['host']} port={DSN['port']} user=postgres dbname={DSN['dbname']} options=-csearch_path={schema}"
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts/demo/load_debian.py"), "--rows", str(rows), "--dsn", dsn],
                         check=True, capture_output=True, text=True).stdout
    return out.strip()


def test_demo_corpus_loads_embeds_and_searches(db):
    out = load(db.schema, 200)
    assert out.startswith("200 packages selected of ") and out.endswith("200 rows inserted or changed"), out
    total = int(out.split(" of ")[1].split()[0])
    assert total > 50_000  # the whole of bookworm main is there, not a stub
    assert one(db, "SELECT count(*) FROM packages WHERE length(description) > 20 AND synopsis <> ''") >= 190
    watch(db, "packages", "description")
    wait(db, "packages", 120)
    assert_in_step(db, "packages", keys="name", content="description")
    assert one(db, "SELECT count(*) FROM packages_embeddings") == one(
        db, "SELECT count(*) FROM packages WHERE NOT embed_sidecar._is_blank(description)")
    # loading again changes nothing (the sample is deterministic)
    assert load(db.schema, 200).endswith(" 0 rows inserted or changed")
    hits = db.execute("SELECT key->>0 FROM embed_sidecar.hybrid_search('packages', 'library', 5)").fetchall()
    assert len(hits) == 5
