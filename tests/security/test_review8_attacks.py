"""Attacks of an eighth reviewer who did not write the code, on the mixed-load changes of issue 22:
drain rounds of the inference service stopped by searches (ONNX Runtime's terminate flag, a
watching thread per round, `Slot::put_back`), rounds cut by estimated tokens, the drains' quarter
of busy time (`Share`), bulk (backfill) windows sized by time (`pg_embed_sidecar.bulk_pass_time`),
`pg_embed_sidecar.searches_first`, and `inference_service().preempted_rounds`.

Each test is one attack; it PASSES when the promise holds and FAILS when the attack works. None
asserts on how long anything takes: they wait for conditions with generous deadlines, and the one
that measures a share compares two counts taken over the same stretch of time.

The ring's slots are read straight from shared memory (/proc/PID/mem of a server process, as root)
to check that no slot is left behind: `RingView` below; its layout is src/inference/ring.rs's."""
import os
import re
import signal
import struct
import subprocess
import threading
import time

import numpy as np
import psycopg
import pytest

from conftest import (assert_in_step, connect, connect_after_reset, connect_as, error_of, one, wait, wait_until,
                      watch)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def server_log_start():
    """Where the server log stood when this module began (its last test reads what came after).
    The settings its tests change go back to their defaults first: a run that a crash cut short
    (the SIGHUP attack before its fix) left searches_first off, and every stopped-round attack
    then waited in vain."""
    with connect() as c:
        for guc in ("searches_first", "bulk_pass_time", "bulk_batch_size"):
            c.execute(f"ALTER SYSTEM RESET pg_embed_sidecar.{guc}")
        c.execute("SELECT pg_reload_conf()")
        path = os.path.join(one(c, "SHOW data_directory"), "server.log")
    time.sleep(1)
    return path, os.path.getsize(path)


FREE, FILLING, SUBMITTED, DONE, FAILED, TAKEN, ABANDONED = 0, 1, 2, 4, 5, 16, 32
INTERACTIVE, DRAIN = 0, 1
HEADER = 192  # size_of::<Header>() rounded up to 64 (src/inference/ring.rs, `Ring::slot`)


def vec(text):
    return np.array([float(x) for x in text.strip("[]").split(",")])


def inference_pid(conn):
    return one(conn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar inference'")


def drain_pid(conn, dbname="pes_test"):
    return one(conn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' AND datname = %s",
               (dbname,))


class RingView:
    """The inference ring as the server's shared memory holds it, read through /proc/PID/mem of the
    connection's own backend (every server process maps the segment at the same address): the
    segment's address from its maps, the ring's offset and size from pg_shmem_allocations, the slot
    count from the ring's header."""

    def __init__(self, conn):
        self.pid = one(conn, "SELECT pg_backend_pid()")
        off, size = conn.execute("""SELECT off, size FROM pg_shmem_allocations
                                     WHERE name = 'pg_embed_sidecar inference ring'""").fetchone()
        with open(f"/proc/{self.pid}/maps") as f:
            segments = [line.split() for line in f if "rw-s" in line and "/dev/zero" in line]
        base = max(segments, key=lambda s: int(s[0].split("-")[1], 16) - int(s[0].split("-")[0], 16))
        self.ring = int(base[0].split("-")[0], 16) + off
        self.slots = struct.unpack("<I", self._read(160, 4))[0]
        self.stride = (size - HEADER) // self.slots
        assert self.stride * self.slots + HEADER == size and self.slots >= 8

    def _read(self, at, n):
        with open(f"/proc/{self.pid}/mem", "rb", 0) as mem:
            mem.seek(self.ring + at)
            return mem.read(n)

    def states(self):
        """(state, owner pid, priority) of every slot."""
        with open(f"/proc/{self.pid}/mem", "rb", 0) as mem:
            out = []
            for i in range(self.slots):
                mem.seek(self.ring + HEADER + i * self.stride)
                state, owner, _procno, priority = struct.unpack("<IiiI", mem.read(16))
                out.append((state, owner, priority))
            return out

    def drain_round_running(self):
        """A drain round is being embedded (slots of drain priority taken) and no search waits."""
        s = self.states()
        return (any(TAKEN <= st < ABANDONED and pr == DRAIN for st, _, pr in s)
                and not any(st == SUBMITTED and pr == INTERACTIVE for st, _, pr in s))

    def all_free(self):
        return all(st == FREE for st, _, _ in self.states())


def drain_round_running(conn):
    try:
        return RingView(conn).drain_round_running()
    except (OSError, AssertionError):
        return False


def ring_free(conn, timeout=90):
    """Every slot of the ring FREE once nothing runs (the worker frees orphans each loop)."""
    ok = wait_until(lambda: RingView(conn).all_free(), timeout, step=0.5)
    if not ok:
        left = [(i, s) for i, s in enumerate(RingView(conn).states()) if s[0] != FREE]
        raise AssertionError(f"slots left behind: {left[:10]} ({len(left)} in all)")


def long_body(i, tag="doc"):
    """About 3 kB of prose of its own: a window-long text."""
    words = ["river", "engine", "garden", "signal", "harbour", "lantern", "meadow", "circuit"]
    return " ".join(f"{words[(i + k) % 8]} {words[(i * 3 + k) % 8]} {tag} {i}-{k}." for k in range(120))


def mixed_body(i):
    """Lengths from a few tokens to over a window, so batches and rounds are cut everywhere."""
    return " ".join(f"word{i}x{k} about lanterns" for k in range(1 + (i * 37) % 220))


def preempted(conn):
    return one(conn, "SELECT preempted_rounds FROM embed_sidecar.inference_service()")


def local_vectors(conn, texts):
    """The reference: embed_texts in this session (the model loaded here, not the service)."""
    conn.execute("SET pg_embed_sidecar.inference = 'local'")
    try:
        return [vec(t) for t in one(conn, "SELECT embed_texts(%s::text[])::text[]", (texts,))]
    finally:
        conn.execute("RESET pg_embed_sidecar.inference")


def assert_vectors_exact(conn, table, side, where="true", limit=400):
    """Stored vectors equal what the model gives for the row's current text (cosine > 0.9999)."""
    rows = conn.execute(f"""SELECT s.body, e.embedding::text FROM {table} s JOIN {side} e USING (id)
                             WHERE {where} ORDER BY md5(s.id::text) LIMIT {limit}""").fetchall()
    assert rows
    ref = local_vectors(conn, [b for b, _ in rows])
    worst = min(float(vec(stored) @ r) for (_, stored), r in zip(rows, ref))
    assert worst > 0.9999, f"a stored vector differs from its text's: cosine {worst}"


class Loop:
    """Threads running `body(conn, k)` in a loop on connections of their own until stopped;
    counts calls, keeps the first unexpected error."""

    def __init__(self, n, body, connect_fn=connect, expected=()):
        self.stop, self.calls, self.errors, self.expected = threading.Event(), [0] * n, [], expected
        self.threads = [threading.Thread(target=self._run, args=(k, body, connect_fn), daemon=True) for k in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, k, body, connect_fn):
        while not self.stop.is_set():
            try:
                with connect_fn() as c:
                    while not self.stop.is_set():
                        body(c, k)
                        self.calls[k] += 1
            except psycopg.Error as e:
                if e.sqlstate not in self.expected and not isinstance(e, psycopg.OperationalError):
                    self.errors.append(e)
                    return
            except Exception as e:  # noqa: BLE001 - reported by end()
                self.errors.append(e)
                return

    def total(self):
        return sum(self.calls)

    def end(self, timeout=300):
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a session never came back from its call"
        assert not self.errors, f"unexpected errors: {self.errors[:3]}"


def source_settings(conn, **settings):
    """ALTER SYSTEM + reload; returns a function that resets them."""
    for k, v in settings.items():
        conn.execute(f"ALTER SYSTEM SET pg_embed_sidecar.{k} = {v}")
    conn.execute("SELECT pg_reload_conf()")
    time.sleep(1)

    def reset():
        for k in settings:
            conn.execute(f"ALTER SYSTEM RESET pg_embed_sidecar.{k}")
        conn.execute("SELECT pg_reload_conf()")
    return reset


# ---------------------------------------------------------------------------------------------
# 2. an unprivileged flood must leave the drains their quarter of the busy time
# ---------------------------------------------------------------------------------------------

def test_unprivileged_flood_of_long_texts_leaves_a_short_text_backfill_its_share(db, make_role):
    """Promise (brief, 2; worker.rs `Share`): while drains wait they are owed a quarter of the
    service's busy time; an unprivileged role calling embed_texts in loops must not starve them.
    Attack: four sessions of an unprivileged role each call embed_texts with 32 window-long texts
    in a loop (about 90 ms of inference a text on two cores); meanwhile a table of 2,000 short rows
    (a few tokens each, a few ms a text) is watched, so its backfill goes through the bulk lane,
    whose windows are sized by `bulk_pass_time` from what the source's recent rows took.
    Safe outcome: a quarter of the busy time holds ~10 short rows per long flood text; the test
    asks for one row per two flood texts over the same stretch (20x below the promise).
    Found: the row cost was the wall time from sending a pass to its vectors, i.e. mostly the time
    the pass queued behind the flood's rounds, so the window fell to 1 row and the backfill got one
    row per interactive round: 70 rows against 480 flood texts in 60 s (0.15 a text, ~0.3% of the
    busy time), against 576 rows for 256 flood texts with bulk_pass_time = 0."""
    flooder = make_role("rv8_flooder")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO docs VALUES (%s, %s)", [(i, f"short row {i} about gardens") for i in range(1, 2001)])

    def flood(c, k):
        c.execute("SELECT embed_texts(%s::text[])", ([long_body(100000 + k * 10000 + i, "flood") for i in range(32)],))

    loop = Loop(4, flood, connect_fn=lambda: connect_as(flooder, db.schema))
    try:
        assert wait_until(lambda: loop.total() >= 2, 300), "the flood did not start"
        side = watch(db, "docs")
        count = lambda: one(db, f"SELECT count(*) FROM {side}")
        assert wait_until(lambda: count() > 0, 300), "the backfill never started under the flood"
        rows0, calls0 = count(), loop.total()
        assert wait_until(lambda: loop.total() - calls0 >= 8 or count() == 2000, 600)
        rows1, calls1 = count(), loop.total()
    finally:
        loop.end()
    flood_texts = 32 * (calls1 - calls0)
    drained = rows1 - rows0
    assert rows1 == 2000 or drained >= flood_texts // 2, \
        f"the backfill got {drained} short rows while the flood got {flood_texts} long texts embedded"
    wait(db, "docs", seconds=600)
    assert_in_step(db, "docs")


# ---------------------------------------------------------------------------------------------
# shared scenery: a backfill of window-long rows and a session searching now and then, so that
# drain rounds run watched and searches stop them
# ---------------------------------------------------------------------------------------------

QUERIES = [f"query {i}: " + "how do I keep a lantern lit in the harbour " * (1 + i * 7) for i in range(12)]


class Searcher(Loop):
    """Sessions calling embed_text on QUERIES now and then (gaps of 0-40 ms, so drain rounds start
    between searches and the next search stops them); keeps every vector each query got."""

    def __init__(self, n=1, connect_fn=connect):
        self.got = {}
        rnd = np.random.default_rng(8)

        def body(c, k):
            q = QUERIES[int(rnd.integers(len(QUERIES)))]
            self.got.setdefault(q, []).append(vec(one(c, "SELECT embed_text(%s)::text", (q,))))
            time.sleep(float(rnd.uniform(0, 0.04)))
        super().__init__(n, body, connect_fn)

    def check(self, conn):
        """Every vector a search got is the one the model gives for its text in a session."""
        texts = list(self.got)
        assert texts, "no search came back"
        for t, ref in zip(texts, local_vectors(conn, texts)):
            worst = min(float(v @ ref) for v in self.got[t])
            assert worst > 0.9999, f"a search got a wrong vector (cosine {worst}) for {t[:40]!r}"


def backfill(conn, n, body=long_body, table="docs", **kw):
    conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, body(i)) for i in range(1, n + 1)])
    return watch(conn, table, **kw)


def preempted_at_least(conn, before, n, timeout=300):
    assert wait_until(lambda: preempted(conn) >= before + n, timeout), \
        f"the attack did not happen: {preempted(conn) - before} drain rounds stopped in {timeout} s"


# ---------------------------------------------------------------------------------------------
# 1. nothing lost, nothing wrong across stopped rounds
# ---------------------------------------------------------------------------------------------

def test_every_vector_and_every_search_is_exact_across_many_stopped_rounds(db):
    """Promise (brief, 1): every row ends with exactly the vector of its current text, and a search
    always returns the right vector, also right after a stopped run.
    Attack: a backfill of 160 rows whose lengths run from 4 tokens to over a window (rounds and
    batches cut everywhere), two sessions searching a dozen queries of 10 to 600 tokens with short
    gaps, and updates to rows already drained and rows still queued, so stopped rounds, put-back
    texts and writers' changes interleave.
    Safe outcome: at least 5 rounds stopped; every search vector and every stored vector (all 160
    compared with embed_texts under inference = 'local') has cosine > 0.9999 to the reference."""
    before = preempted(db)
    side = backfill(db, 160, mixed_body)
    s = Searcher(2)
    try:
        preempted_at_least(db, before, 3)
        db.execute("UPDATE docs SET body = body || ' amended' WHERE id % 7 = 0")
        preempted_at_least(db, before, 5)
    finally:
        s.end()
    wait(db, "docs", seconds=600)
    assert_in_step(db, "docs")
    assert_vectors_exact(db, "docs", side, limit=160)
    s.check(db)
    ring_free(db)


@pytest.fixture
def other_database():
    """A second database with the extension and a drain worker of its own."""
    name = "rv8_other"
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name}")
    conn = connect(dbname=name)
    conn.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
    yield conn
    conn.close()
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_stopped_round_that_holds_two_models_puts_both_back_and_mixes_nothing_up(db, other_database):
    """Promise (brief, 1): `serve` embeds a round one model at a time; when a search stops the
    first model's call, the second model's texts go back unembedded.
    Attack: two databases backfill at once, one with all-MiniLM-L6-v2 and one with
    paraphrase-MiniLM-L3-v2 (both 384 dimensions, so a vector of one model stored for the other
    would not be refused by the column), while searches stop their rounds.
    Safe outcome: both in step, every stored vector is its own model's (cosine > 0.9999 with
    embed_texts of that model in a session; the two models' vectors of one text differ)."""
    before = preempted(db)
    side_a = backfill(db, 120, mixed_body)
    side_b = backfill(other_database, 120, mixed_body, model="paraphrase-MiniLM-L3-v2")
    s = Searcher(1)
    try:
        preempted_at_least(db, before, 4)
    finally:
        s.end()
    wait(db, "docs", seconds=600)
    wait(other_database, "docs", seconds=600)
    assert_in_step(db, "docs")
    assert_in_step(other_database, "docs")
    assert_vectors_exact(db, "docs", side_a, limit=120)
    other_database.execute("SET pg_embed_sidecar.model = 'paraphrase-MiniLM-L3-v2'")
    assert_vectors_exact(other_database, "docs", side_b, limit=120)
    same = one(db, f"SELECT e.embedding::text FROM {side_a} e WHERE id = 5")
    other = one(other_database, f"SELECT e.embedding::text FROM {side_b} e WHERE id = 5")
    assert float(vec(same) @ vec(other)) < 0.99, "the two models gave the same vector: the check proves nothing"
    s.check(db)
    ring_free(db)


def test_texts_of_any_length_from_an_unprivileged_role_get_their_exact_vectors_during_stopped_rounds(db, make_role):
    """Promise (brief, 1, 2): texts of any length; the slot carries 64 KiB and cuts at a
    character boundary, which must give the vector of the whole text.
    Attack: an unprivileged role sends, while a backfill's rounds are being stopped, texts of
    1 B, 2 kB, 64 KiB - 1, 64 KiB, 64 KiB + 1 with a 2-byte character across the cut, 3-byte and
    4-byte characters across it, and 1 MB; alone (embed_text) and together (embed_texts).
    Safe outcome: each equals the session-local vector of the same text (cosine > 0.9999)."""
    r = make_role("rv8_lengths")
    cut = 64 * 1024
    texts = ["x", "lantern " * 256, "a" * (cut - 1), "a" * cut, "a" * (cut - 1) + "é" + "tail",
             "a" * (cut - 2) + "€" + "tail", "a" * (cut - 3) + "𝄞" + "tail", "harbour lights " * 70000]
    before = preempted(db)
    backfill(db, 200, long_body)
    s = Searcher(1)
    try:
        preempted_at_least(db, before, 1)
        with connect_as(r, db.schema) as c:
            alone = [vec(one(c, "SELECT embed_text(%s)::text", (t,))) for t in texts]
            together = [vec(v) for v in one(c, "SELECT embed_texts(%s::text[])::text[]", (texts,))]
    finally:
        s.end()
    ref = local_vectors(db, texts)
    for i, (a, b, r_) in enumerate(zip(alone, together, ref)):
        assert float(a @ r_) > 0.9999 and float(b @ r_) > 0.9999, f"text {i} ({len(texts[i])} chars) got another vector"
    wait(db, "docs", seconds=600)
    assert_in_step(db, "docs")
    ring_free(db)


# ---------------------------------------------------------------------------------------------
# 2, 3. unprivileged sessions that cancel, time out and are terminated mid-call
# ---------------------------------------------------------------------------------------------

def test_cancels_and_timeouts_of_unprivileged_sessions_during_stopped_rounds_leak_nothing(db, make_role):
    """Promise (brief, 2, 3): cancels and statement_timeouts of any role mid-call must not wedge
    the worker nor leak slots, and drains go on.
    Attack: three sessions of an unprivileged role call embed_texts (1 to 40 texts of 10 B to
    100 kB, gaps of 0-300 ms) under statement_timeouts of 1 to 300 ms, a fourth session of the
    role cancels them at random, while a backfill's drain rounds are being stopped and put back.
    Safe outcome: only query_canceled errors; afterwards every slot of the ring is FREE, the table
    is in step with exact vectors, and the service still answers right."""
    r = make_role("rv8_canceller")
    before = preempted(db)
    side = backfill(db, 200, long_body)
    rnd = np.random.default_rng(22)
    pids = {}

    def call(c, k):
        pids[k] = one(c, "SELECT pg_backend_pid()")
        c.execute(f"SET statement_timeout = {int(rnd.integers(1, 300))}")
        n = int(rnd.integers(1, 41))
        texts = [("lantern harbour " * int(rnd.integers(1, 6000)))[: int(rnd.integers(10, 100_000))] for _ in range(n)]
        try:
            c.execute("SELECT embed_texts(%s::text[])", (texts,))
        except psycopg.errors.QueryCanceled:
            pass
        # gaps, so that drain rounds start (watched) between calls and the next call stops them
        time.sleep(float(rnd.uniform(0, 0.3)))

    def cancel(c, k):
        time.sleep(float(rnd.uniform(0, 0.1)))
        if pids:
            c.execute("SELECT pg_cancel_backend(%s)", (list(pids.values())[int(rnd.integers(len(pids)))],))

    calls = Loop(3, call, lambda: connect_as(r, db.schema), expected=("57014",))
    canceller = Loop(1, cancel, lambda: connect_as(r, db.schema))
    s = Searcher(1)
    try:
        preempted_at_least(db, before, 3)
        assert wait_until(lambda: calls.total() >= 60, 300)
    finally:
        canceller.end()
        calls.end()
        s.end()
    wait(db, "docs", seconds=600)
    assert_in_step(db, "docs")
    assert_vectors_exact(db, "docs", side, limit=60)
    s.check(db)
    ring_free(db)


def test_sessions_terminated_by_their_own_role_mid_call_leak_no_slot_and_drains_go_on(db, make_role):
    """Promise (brief, 2, 3): pg_terminate_backend of itself mid-call (a role may terminate its own
    sessions) ends the session without giving its slots back (FATAL exits without unwinding); the
    worker must free them, taken, put back or answered, and neither stall nor hand a later
    session's slot to the dead one.
    Attack: three sessions of an unprivileged role send embed_texts of 32 window-long texts (gaps
    of 0-1 s, in which drain rounds start watched and the next call stops them); a fourth
    terminates one of them at a random moment, 25 times at least.
    Safe outcome: every slot FREE afterwards, the backfill in step, the service answers."""
    r = make_role("rv8_suicide")
    before = preempted(db)
    backfill(db, 200, long_body)
    rnd = np.random.default_rng(3)
    pids, kills = {}, [0]

    def call(c, k):
        pids[k] = one(c, "SELECT pg_backend_pid()")
        c.execute("SELECT embed_texts(%s::text[])", ([long_body(5000 + k * 100 + i, "dying") for i in range(32)],))
        time.sleep(float(rnd.uniform(0, 1)))  # gaps: drain rounds start watched, and are stopped

    def kill(c, k):
        time.sleep(float(rnd.uniform(0.05, 0.6)))
        if pids:
            pid = list(pids.values())[int(rnd.integers(len(pids)))]
            try:
                # (a pid of a session already gone may be another role's by now)
                kills[0] += one(c, """SELECT CASE WHEN EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s AND usename = current_user)
                                                  THEN pg_terminate_backend(%s)::int ELSE 0 END""", (pid, pid))
            except psycopg.errors.InsufficientPrivilege:
                pass

    calls = Loop(3, call, lambda: connect_as(r, db.schema))
    killer = Loop(1, kill, lambda: connect_as(r, db.schema))
    try:
        assert wait_until(lambda: (kills[0] >= 25 and preempted(db) > before) or killer.errors, 400), \
            f"{kills[0]} sessions terminated, {preempted(db) - before} rounds stopped"
    finally:
        killer.end()
        calls.end()
    wait(db, "docs", seconds=600)
    assert_in_step(db, "docs")
    ring_free(db)
    assert one(db, "SELECT vector_dims(embed_text('still answering'))") == 384


def test_drain_worker_terminated_while_its_texts_are_put_back_loses_nothing(db):
    """Promise (brief, 3): a client dying while its drain texts are put back. The drain worker
    dies by `die` (FATAL, no unwinding), its texts TAKEN, put back SUBMITTED or ABANDONED.
    Attack: while searches stop its rounds, the drain worker of pes_test is terminated 3 times,
    each time right after a round of its was stopped.
    Safe outcome: the launcher starts it again, the backfill ends in step with exact vectors,
    every slot FREE."""
    before = preempted(db)
    side = backfill(db, 150, long_body)
    s = Searcher(1)
    try:
        for n in range(1, 4):
            preempted_at_least(db, before, n)
            before = preempted(db)
            pid = wait_until(lambda: drain_pid(db), 120)
            assert pid, "no drain worker"
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        s.end()
    wait(db, "docs", seconds=600)
    assert_in_step(db, "docs")
    assert_vectors_exact(db, "docs", side, limit=60)
    ring_free(db)


# ---------------------------------------------------------------------------------------------
# 3, 4. the inference worker killed, reloaded, stopped during a watched round
# ---------------------------------------------------------------------------------------------

def watched_round_running(conn, timeout=300):
    """Wait until a drain round runs with no search waiting: a watched round (searches_first on)."""
    view = RingView(conn)
    assert wait_until(view.drain_round_running, timeout, step=0.005), "no drain round seen running"


def test_inference_worker_terminated_during_a_watched_round(db):
    """Promise (brief, 3): the inference worker terminated (superuser) while a watched round runs
    ends cleanly, is started again, and the drain catches up.
    Attack: pg_terminate_backend of the inference worker 3 times, each while a drain round it
    watches is being embedded.
    Safe outcome: a new worker each time, the backfill in step with exact vectors, every slot
    FREE, a search right after answers right."""
    side = backfill(db, 150, long_body)
    bystander = connect()
    for _ in range(3):
        watched_round_running(db)
        pid = inference_pid(db)
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert wait_until(lambda: (inference_pid(db) or pid) != pid, 120), "the inference worker did not come back"
    # it ended alone: no crash of it made the postmaster reset the instance (and end this session)
    assert one(bystander, "SELECT 1") == 1
    bystander.close()
    q = QUERIES[3]
    got = vec(one(db, "SELECT embed_text(%s)::text", (q,)))
    assert float(got @ local_vectors(db, [q])[0]) > 0.9999
    wait(db, "docs", seconds=600)
    assert_in_step(db, "docs")
    assert_vectors_exact(db, "docs", side, limit=60)
    ring_free(db)


def test_inference_worker_killed_9_during_a_watched_round_and_everything_catches_up(db):
    """Promise (brief, 3): kill -9 of the inference worker while a watched round runs: the
    postmaster resets, and afterwards the service answers and watched tables catch up.
    Attack: SIGKILL while a drain round it watches is embedded (its watching thread alive).
    Safe outcome: the server comes back, the backfill ends in step with exact vectors (the
    messages the dead drain held reappear after the visibility timeout), every slot FREE."""
    schema = db.schema
    side = backfill(db, 120, long_body)
    watched_round_running(db)
    os.kill(inference_pid(db), signal.SIGKILL)
    conn = connect_after_reset(db, timeout=300)
    conn.execute(f'SET search_path = "{schema}", public')
    assert wait_until(lambda: inference_pid(conn), 120), "no inference worker after the reset"
    q = QUERIES[5]
    assert float(vec(one(conn, "SELECT embed_text(%s)::text", (q,))) @ local_vectors(conn, [q])[0]) > 0.9999
    wait(conn, "docs", seconds=600)
    assert_in_step(conn, "docs")
    assert_vectors_exact(conn, "docs", side, limit=60)
    ring_free(conn)
    conn.close()


def test_reloads_and_sighups_during_watched_rounds_neither_crash_nor_spoil_anything(db):
    """Promise (brief, 4): SIGHUP during watched rounds behaves; the watching thread starts with
    every signal blocked, so Postgres' handlers stay on the main thread.
    Attack: for the whole backfill, searches_first is flipped with ALTER SYSTEM + pg_reload_conf
    every ~50 ms, and SIGHUP is sent straight to the inference worker every 2 ms, while searches
    stop rounds.
    Safe outcome: the same inference worker throughout (no crash, no restart), in step, exact
    vectors, exact searches, every slot FREE.
    Found: the worker aborted within seconds (in 1,000 signals; with searches_first off too, in
    ~650): SIGHUP was taken by one of ONNX Runtime's threads (started with the signals unblocked),
    pgrx's handler refused to run there ("postgres FFI may not be called from multiple threads"),
    the panic could not unwind out of a signal handler: SIGABRT, and the postmaster reset the whole
    instance, every session with it. The main thread's mask, all blocked while it starts each
    round's watching thread, made it likelier: no thread but ORT's wanted the signal then."""
    pid = inference_pid(db)
    before = preempted(db)
    side = backfill(db, 150, long_body)
    s = Searcher(1)
    flips, hups = [0], [0]

    def flip(c, k):
        c.execute(f"ALTER SYSTEM SET pg_embed_sidecar.searches_first = {'off' if flips[0] % 2 else 'on'}")
        c.execute("SELECT pg_reload_conf()")
        time.sleep(0.05)
        flips[0] += 1

    def hup(c, k):
        os.kill(pid, signal.SIGHUP)
        hups[0] += 1
        time.sleep(0.002)

    flipper, hupper = Loop(1, flip), Loop(1, hup)
    try:
        preempted_at_least(db, before, 3)
        wait(db, "docs", seconds=600)
    finally:
        db.execute("ALTER SYSTEM RESET pg_embed_sidecar.searches_first")
        db.execute("SELECT pg_reload_conf()")
        hupper.stop.set()
        flipper.end()
        s.end()
        hupper.end()
    assert flips[0] >= 20 and hups[0] >= 1000
    assert inference_pid(db) == pid, "the inference worker was restarted"
    assert_in_step(db, "docs")
    assert_vectors_exact(db, "docs", side, limit=60)
    s.check(db)
    ring_free(db)


def signal_masks(pid):
    """{thread id: blocked signals (a set of numbers)} of a process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                mask = int(next(line.split()[1] for line in f if line.startswith("SigBlk")), 16)
        except (OSError, StopIteration):
            continue
        out[int(tid)] = {n for n in range(1, 65) if mask >> (n - 1) & 1}
    return out


HANDLED = {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGTERM}


def test_no_thread_but_the_main_one_of_a_server_process_can_take_a_signal(db):
    """Promise (brief, 4): Postgres' signal handlers run on the main thread only (pgrx's abort the
    process anywhere else, see the SIGHUP attack above). A process-directed signal goes to any
    thread that does not block it, so every other thread must block every signal Postgres handles.
    Attack: look at every thread of the inference worker (after a search and a watched drain
    round, so its model, ONNX Runtime's threads and a watching thread have all been started), of
    the drain worker, and of a session that embedded with inference = 'local'.
    Safe outcome: each non-main thread blocks SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM
    and SIGTERM. Found: ONNX Runtime's two threads of the inference worker blocked none of them."""
    assert one(db, "SELECT vector_dims(embed_text('a search'))") == 384
    backfill(db, 60, long_body)
    watched_round_running(db)
    with connect() as local:
        local.execute("SET pg_embed_sidecar.inference = 'local'")
        assert one(local, "SELECT vector_dims(embed_text('embedded in this session'))") == 384
        processes = {"inference worker": inference_pid(db), "drain worker": drain_pid(db),
                     "local session": one(local, "SELECT pg_backend_pid()")}
        seen, bad = 0, []
        for what, pid in processes.items():
            for tid, blocked in signal_masks(pid).items():
                if tid != pid:
                    seen += 1
                    if not HANDLED <= blocked:
                        bad.append((what, tid, sorted(HANDLED - blocked)))
    assert seen >= 2, "no thread besides the main ones: the check proves nothing"
    assert not bad, f"threads that take Postgres' signals: {bad}"
    wait(db, "docs", seconds=600)


# ---------------------------------------------------------------------------------------------
# 5. settings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guc,value", [("bulk_pass_time", "0"), ("searches_first", "off")])
def test_only_a_superuser_changes_the_new_settings(db, make_role, guc, value):
    """Promise (brief, 5): only superusers change bulk_pass_time and searches_first (sighup:
    postgresql.conf or ALTER SYSTEM); an ordinary role's SET must fail.
    Attack, as an unprivileged role that owns a database: SET, SET LOCAL, set_config(), ALTER ROLE
    itself SET, ALTER DATABASE its own SET, ALTER SYSTEM, a function with a SET clause, and
    RESET; then check the setting the server has.
    Safe outcome: every one refused; SHOW unchanged."""
    name = f"pg_embed_sidecar.{guc}"
    r = make_role(f"rv8_gucs_{guc}", "CREATEDB")
    shown = one(db, f"SHOW {name}")
    with connect(dbname="postgres") as admin:
        admin.execute("DROP DATABASE IF EXISTS rv8_owned")
    attempts = {
        "SET": f"SET {name} = {value}",
        "SET LOCAL": f"BEGIN; SET LOCAL {name} = {value}; COMMIT",
        "set_config": f"SELECT set_config('{name}', '{value}', false)",
        "ALTER ROLE": f'ALTER ROLE "{r}" SET {name} = {value}',
        "ALTER DATABASE (its own)": f"ALTER DATABASE rv8_owned SET {name} = {value}",
        "ALTER SYSTEM": f"ALTER SYSTEM SET {name} = {value}",
        "RESET": f"RESET {name}",
    }
    succeeded = []
    try:
        with connect_as(r, db.schema) as c:
            c.execute("CREATE DATABASE rv8_owned")
            for what, sql in attempts.items():
                e = error_of(c, sql)
                if c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    c.execute("ROLLBACK")
                if e is None:
                    succeeded.append(what)
            created = error_of(c, f"""CREATE FUNCTION rv8_f() RETURNS text LANGUAGE sql SET {name} = {value}
                                       AS $$ SELECT current_setting('{name}') $$""")
            called = error_of(c, "SELECT rv8_f()") if created is None else created
    finally:
        with connect(dbname="postgres") as admin:
            admin.execute("DROP DATABASE IF EXISTS rv8_owned")
    assert not succeeded, f"an ordinary role changed {name} by {succeeded}"
    assert called is not None, f"a function's SET clause changed {name} for its call"
    assert one(db, f"SHOW {name}") == shown
    assert one(db, "SELECT count(*) FROM pg_db_role_setting WHERE array_to_string(setconfig, ',') LIKE %s",
               (f"%{guc}%",)) == 0


@pytest.mark.parametrize("pass_time,bulk_rows", [("0", "64"), ("1", "64"), ("60000", "10000"), ("250", "1")])
def test_odd_bulk_pass_times_still_drain_everything(db, pass_time, bulk_rows):
    """Promise (brief, 5): odd values must not break the drain.
    Attack: bulk_pass_time 0 (windows of bulk_batch_size), 1 ms (a window of one row), 60 s (the
    most) with bulk_batch_size 10000, and the default with bulk_batch_size 1; a backfill of short
    and window-long rows, with a writer's changes during it, and a chunked source beside it.
    Safe outcome: both sources in step; the out-of-range values -1 and 60001 refused."""
    reset = source_settings(db, bulk_pass_time=pass_time, bulk_batch_size=bulk_rows)
    try:
        for bad in ("-1", "60001", "'2 min'"):
            assert error_of(db, f"ALTER SYSTEM SET pg_embed_sidecar.bulk_pass_time = {bad}")[0] == "22023"
        backfill(db, 240, lambda i: long_body(i) if i % 5 == 0 else f"short row {i}")
        backfill(db, 12, lambda i: long_body(i) * 3, table="chunked", chunking=True)
        db.execute("UPDATE docs SET body = body || ' changed' WHERE id % 3 = 0")
        db.execute("INSERT INTO docs SELECT g, 'late row ' || g FROM generate_series(241, 260) g")
        wait(db, "docs", seconds=600)
        wait(db, "chunked", seconds=600)
    finally:
        reset()
    assert_in_step(db, "docs")
    from conftest import assert_chunks_in_step
    assert_chunks_in_step(db, "chunked")


# ---------------------------------------------------------------------------------------------
# 6. the new counter
# ---------------------------------------------------------------------------------------------

def test_the_new_counter_is_one_instance_wide_number_and_gives_no_tenant_anything(db, make_role):
    """Promise (brief, 6): unprivileged roles cannot learn other tenants' data through the new
    counters.
    Attack: an unprivileged role reads inference_service() while another tenant's backfill is
    stopped by searches, and looks for anything per database, per role or per text.
    Safe outcome: one row of four instance-wide numbers; nothing else new readable. (What the
    numbers do tell, that some drain was running when a search came, is activity, not data: see
    the report.)"""
    r = make_role("rv8_counter_reader")
    with connect_as(r, db.schema) as c:
        cur = c.execute("SELECT * FROM embed_sidecar.inference_service()")
        assert [d.name for d in cur.description] == ["workers", "texts", "busy_seconds", "preempted_rounds"]
        assert len(cur.fetchall()) == 1
        # no function of the extension readable by this role returns rows of the ring
        fns = c.execute("""SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'embed_sidecar'::regnamespace
                             AND has_function_privilege(p.oid, 'EXECUTE')
                             AND (p.proname ~ 'ring|slot|inference|preempt')""").fetchall()
        assert [f[0] for f in fns] == ["inference_service"], fns


# ---------------------------------------------------------------------------------------------
# 4. shutdown during watched rounds, and what the log says of the whole run
# ---------------------------------------------------------------------------------------------

def test_fast_shutdown_during_a_watched_round_neither_hangs_nor_loses_anything(db):
    """Promise (brief, 4): `pg_ctl stop -m fast` while a watched round runs shuts down cleanly.
    Attack: stop -m fast while a drain round of window-long texts is embedded under watch.
    Safe outcome: pg_ctl returns 0 within its own 120 s wait, the log shows no process killed by a
    signal, and after a start the backfill ends in step."""
    schema = db.schema
    data = one(db, "SHOW data_directory")
    bindir = one(db, "SELECT setting FROM pg_config WHERE name = 'BINDIR'")
    port = one(db, "SHOW port")
    log = os.path.join(data, "server.log")
    side = backfill(db, 120, long_body)
    watched_round_running(db)
    at = os.path.getsize(log)
    stop = subprocess.run(["sudo", "-u", "postgres", f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "120", "stop"],
                          capture_output=True, text=True)
    start = subprocess.run(["sudo", "-u", "postgres", f"{bindir}/pg_ctl", "-D", data, "-l", log, "-o", f"-p {port}",
                            "-w", "-t", "120", "start"], capture_output=True, text=True)
    assert start.returncode == 0, start.stderr
    assert stop.returncode == 0, f"pg_ctl stop -m fast failed or hung: {stop.stdout} {stop.stderr}"
    with open(log, errors="replace") as f:
        f.seek(at)
        tail = f.read()
    assert "database system is shut down" in tail
    bad = [l for l in tail.splitlines() if re.search(r"terminated by signal|PANIC|panicked", l)]
    assert not bad, bad[:5]
    conn = wait_until(lambda: _try_connect(), 120)
    conn.execute(f'SET search_path = "{schema}", public')
    wait(conn, "docs", seconds=600)
    assert_in_step(conn, "docs")
    assert_vectors_exact(conn, "docs", side, limit=40)
    conn.close()


def _try_connect():
    try:
        return connect()
    except psycopg.OperationalError:
        return None


def test_the_server_log_of_this_module_shows_no_crash_and_no_panic(server_log_start):
    """Promise (brief, 4): no panic crosses FFI, the worker never crashes. Everything this module
    did is in the server log: no process ended by a signal other than the SIGKILL the kill -9 test
    sent, no PANIC, no Rust panic message."""
    path, at = server_log_start
    with open(path, errors="replace") as f:
        f.seek(at)
        lines = f.read().splitlines()
    bad = [l for l in lines if re.search(r"terminated by signal (?!9:)|PANIC|panicked|was terminated by exception", l)]
    assert not bad, bad[:8]


