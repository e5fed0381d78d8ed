"""Integration tier: a real cluster (scripts/cluster.sh start) with the worker preloaded.

Each test gets its own schema in database pes_test, dropped afterwards. The worker serves
pes_test, so watched tables are drained in the background unless a test pauses its source."""
import os
import re
import shutil
import sys
import time
import uuid

import psycopg
import pytest

# scripts/topology/nodes.py: the throwaway clusters of the replication tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "topology"))

# the PostgreSQL major under test (scripts/env.sh exports it): paths in Debian's layout for it
PG_MAJOR = os.environ.get("PG_MAJOR", "15")
PG_BIN = f"/usr/lib/postgresql/{PG_MAJOR}/bin"
PG_PKGLIBDIR = f"/usr/lib/postgresql/{PG_MAJOR}/lib"
PG_SHAREDIR = f"/usr/share/postgresql/{PG_MAJOR}"
MODELS = os.environ.get("PES_MODEL_ROOT", f"/usr/share/postgresql/{PG_MAJOR}/extension/pg_embed_sidecar/models")
DEFAULT_PORT = 5433 if PG_MAJOR == "15" else 5400 + int(PG_MAJOR)
# scripts/standby.sh's default port for this major
STANDBY_PORT = 5434 if PG_MAJOR == "15" else 6400 + int(PG_MAJOR)
DSN = dict(host=os.environ.get("PGHOST", "/tmp"), port=int(os.environ.get("PGPORT", str(DEFAULT_PORT))),
           user="postgres", dbname=os.environ.get("PES_TEST_DB", "pes_test"))


def connect(**kw):
    return psycopg.connect(**{**DSN, **kw}, autocommit=True)


def connect_after_reset(old, timeout=120, **kw):
    """A connection once the server is back from a crash: first the postmaster's reset ends the
    existing connection `old`, then crash recovery syncs the data directory and replays WAL (from
    a second to many on a busy machine)."""
    deadline = time.time() + timeout
    while True:
        try:
            old.execute("SELECT 1")
        except psycopg.Error:
            break
        assert time.time() < deadline, "the server was not reset"
        time.sleep(0.1)
    while True:
        try:
            return connect(**kw)
        except psycopg.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session", autouse=True)
def extension():
    # created afresh, so the SQL objects always match the library just installed
    with connect() as c:
        c.execute("DROP EXTENSION IF EXISTS pg_embed_sidecar CASCADE")
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
    yield


@pytest.fixture
def db(request):
    """A connection whose search_path is a fresh schema of this test's own."""
    schema = "t_" + re.sub(r"\W", "_", request.node.name)[:40].lower() + "_" + uuid.uuid4().hex[:6]
    conn = connect()
    conn.execute(f'CREATE SCHEMA "{schema}"')
    conn.execute(f'SET search_path = "{schema}", public')
    conn.schema = schema
    yield conn
    try:
        conn.close()
    except Exception:
        pass
    with connect() as c:
        # unwatch first so the worker stops touching the tables, then drop everything
        c.execute("""SELECT embed_sidecar.unwatch(source, embedding => embedding) FROM embed_sidecar.sources s
                      JOIN pg_class r ON r.oid = s.source WHERE r.relnamespace = %s::regnamespace AND s.role = 'current'""",
                  (schema,))
        c.execute(f'DROP SCHEMA "{schema}" CASCADE')


def quiet_database(name):
    """(Re)create database `name` with pg_embed_sidecar.drain_worker off: since the launcher
    starts a drain worker in every database with the extension, a test that counts queued
    messages or drains by hand needs its database kept out of it."""
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name}")
        c.execute(f"ALTER DATABASE {name} SET pg_embed_sidecar.drain_worker = off")


def one(conn, sql, params=None):
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def assert_in_step(conn, table, keys="id", content="body", embedding=None, role="current"):
    """The consistency invariant, computed independently of the extension's status view.
    `content` is a column of the table, or an SQL expression over its alias s (a template)."""
    model, side = conn.execute(
        """SELECT model_id, sidecar::text FROM embed_sidecar.sources
            WHERE source = %s::regclass AND role = %s AND (%s::text IS NULL OR embedding = %s)""",
        (table, role, embedding, embedding)).fetchone()
    content = content if "(" in content else f"s.{content}"
    bad = one(conn, f"""
        SELECT count(*) FROM {table} s LEFT JOIN {side} e USING ({keys})
         WHERE NOT embed_sidecar._is_blank({content})
           AND (e.embedding IS NULL OR e.content_hash <> sha256(convert_to({content}, 'UTF8')) OR e.model <> %s)""",
              (model,))
    blank_with_vector = one(conn, f"""
        SELECT count(*) FROM {table} s JOIN {side} e USING ({keys}) WHERE embed_sidecar._is_blank({content})""")
    cols = [k.strip() for k in keys.split(",")]
    match = "(" + ", ".join("s." + k for k in cols) + ") = (" + ", ".join("e." + k for k in cols) + ")"
    orphans = one(conn, f"SELECT count(*) FROM {side} e WHERE NOT EXISTS (SELECT 1 FROM {table} s WHERE {match})")
    assert (bad, blank_with_vector, orphans) == (0, 0, 0), f"missing/stale={bad} blank_with_vector={blank_with_vector} orphans={orphans}"


def assert_chunks_in_step(conn, table, keys="id", content="body", embedding=None, role="current", sample=8):
    """The invariant of a chunked sidecar, checked here from the rows: every row with content has
    passages numbered 0..n-1 whose offsets, applied to the row's current text in Python, give
    texts with the stored hashes; each passage carries the row's hash and the current model; the
    passages cover every non-space character; blank rows have none; no orphans. A sample of
    vectors is compared with embed_text() of the passage text. Returns the number of passages."""
    import hashlib
    model, side, model_name = conn.execute(
        """SELECT model_id, sidecar::text, model FROM embed_sidecar.sources
            WHERE source = %s::regclass AND role = %s AND (%s::text IS NULL OR embedding = %s)""",
        (table, role, embedding, embedding)).fetchone()
    content = content if "(" in content else f"s.{content}"
    rows = {r[0]: r[1] for r in conn.execute(f"SELECT ({keys})::text, {content} FROM {table} s")}
    chunks = {}
    for key, n, start, end, chunk_hash, row_hash, m in conn.execute(
            f"SELECT ({keys})::text, chunk, char_start, char_end, chunk_hash, content_hash, model FROM {side} ORDER BY 1, 2"):
        chunks.setdefault(key, []).append((n, start, end, bytes(chunk_hash), bytes(row_hash), m))
    assert not set(chunks) - set(rows), f"orphans: {sorted(set(chunks) - set(rows))[:5]}"
    sha = lambda t: hashlib.sha256(t.encode()).digest()
    total = 0
    for key, text in rows.items():
        got = chunks.get(key, [])
        if text is None or not text.strip():
            assert got == [], f"blank row {key} has passages"
            continue
        assert got, f"row {key} has no passages"
        assert [c[0] for c in got] == list(range(len(got))), f"row {key}: chunk numbers {[c[0] for c in got]}"
        covered = [False] * len(text)
        for n, start, end, chunk_hash, row_hash, m in got:
            assert sha(text[start:end]) == chunk_hash, f"row {key} chunk {n}: hash of text[{start}:{end}] differs"
            assert (row_hash, m) == (sha(text), model), f"row {key} chunk {n}: stale row hash or model"
            covered[start:end] = [True] * (end - start)
        gaps = [i for i, c in enumerate(covered) if not c and not text[i].isspace()]
        assert len(gaps) == 0 or all(ord(text[i]) < 32 for i in gaps), f"row {key}: uncovered characters at {gaps[:5]}"
        total += len(got)
    cos = conn.execute(
        f"""SELECT min(1 - (e.embedding <=> embed_sidecar._embed_with(%s, substr({content}, e.char_start + 1, e.char_end - e.char_start))::vector))
              FROM (SELECT * FROM {side} ORDER BY md5(chunk_hash::text) LIMIT %s) e JOIN {table} s USING ({keys})""",
        (model_name, sample)).fetchone()[0]
    assert cos is None or cos > 0.9999, f"a stored passage vector differs from embedding its text: cosine {cos}"
    return total


@pytest.fixture(scope="module")
def publisher():
    """A cluster without the extension, for a module's replication tests: $PES_PUBLISHER_PORT
    (5452), data in $PES_PUBLISHER_DATA (scripts/topology/nodes.py makes it)."""
    from nodes import Node
    node = Node(int(os.environ.get("PES_PUBLISHER_PORT", "5452")),
                os.environ.get("PES_PUBLISHER_DATA", "/var/tmp/pes_publisher"), "publisher")
    node.create(preload=False).start()
    yield node
    node.destroy()


def wait_until(cond, timeout, step=0.2):
    """cond() until truthy or the deadline; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def wait(conn, table, seconds=120):
    assert one(conn, "SELECT embed_sidecar.wait(%s::regclass, make_interval(secs => %s))", (table, seconds)), \
        f"{table} not in step after {seconds}s: " + str(conn.execute(
            "SELECT * FROM embed_sidecar.status WHERE source = %s::regclass", (table,)).fetchone())


def worker_pid(dbname="pes_test", timeout=30):
    deadline = time.time() + timeout
    with connect() as c:
        while time.time() < deadline:
            pid = one(c, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' AND datname = %s",
                      (dbname,))
            if pid:
                return pid
            time.sleep(0.2)
    raise AssertionError("worker not running")


def queue_depth(conn, table):
    """Messages waiting for a table, both lanes (writers' changes and backfills)."""
    return one(conn, """SELECT sum(m.queue_length)::int FROM embed_sidecar.sources s,
                               LATERAL (VALUES (s.queue_name), (s.queue_name || '_bulk')) q(name),
                               LATERAL pgmq.metrics(q.name) m
                         WHERE s.source = %s::regclass""", (table,))


def watch(conn, table, content="body", **kw):
    """embed_sidecar.watch() with keyword arguments; returns the sidecar's name."""
    args = ", ".join(["%s::regclass", "%s"] + [f"{k} => %s" for k in kw])
    return one(conn, f"SELECT embed_sidecar.watch({args})::text", (table, content, *kw.values()))


def error_of(conn, sql, params=None):
    """(SQLSTATE, message, hint) of the error a statement raises, or None if it succeeds."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate, e.diag.message_primary, e.diag.message_hint
    return None


def role_snapshot(conn):
    """Everything a privilege escalation would change: role attributes, memberships, this
    database's owner and ACL, schemas' owners and ACLs."""
    return (
        conn.execute("""SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,
                               rolreplication, rolbypassrls FROM pg_roles ORDER BY rolname""").fetchall(),
        conn.execute("SELECT roleid::regrole::text, member::regrole::text FROM pg_auth_members ORDER BY 1, 2").fetchall(),
        conn.execute("SELECT datdba::regrole::text, datacl::text FROM pg_database WHERE datname = current_database()").fetchall(),
        conn.execute("SELECT nspname, nspowner::regrole::text, nspacl::text FROM pg_namespace ORDER BY 1").fetchall(),
    )


@pytest.fixture
def make_role(db):
    """make_role(name, *options) creates a login role dropped (with what it owns) after the test."""
    made = []

    def make(name, *options):
        db.execute(f'DROP ROLE IF EXISTS "{name}"')
        db.execute(f'CREATE ROLE "{name}" LOGIN {" ".join(options)}')
        db.execute(f'GRANT USAGE, CREATE ON SCHEMA "{db.schema}" TO "{name}"')
        made.append(name)
        return name

    yield make
    with connect() as c:
        c.execute("""SELECT embed_sidecar.unwatch(source) FROM embed_sidecar.sources s
                      JOIN pg_class r ON r.oid = s.source WHERE r.relnamespace = %s::regnamespace""", (db.schema,))
        for name in reversed(made):
            c.execute(f'DROP OWNED BY "{name}" CASCADE')
            c.execute(f'DROP ROLE "{name}"')


def connect_as(role, schema):
    conn = connect(user=role)
    conn.execute(f'SET search_path = "{schema}", public')
    return conn


@pytest.fixture
def model_copy():
    """model_copy(name) copies the default model's directory under another model name and
    returns its path; removed (with a '.away' twin) after the test."""
    made = []

    def make(name):
        path = f"{MODELS}/{name}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(f"{MODELS}/all-MiniLM-L6-v2", path)
        made.append(path)
        return path

    yield make
    for path in made:
        for p in (path, path + ".away"):
            shutil.rmtree(p, ignore_errors=True)
