"""The inference service: with the library preloaded, sessions and drains embed through
the instance's inference worker (one model copy, cross-session batches) instead of loading the
model themselves. Results equal the local path's; a session's memory barely grows; many sessions
at once, a cancel while waiting and an inference worker dying while sessions wait all end well."""
import threading
import time

import numpy as np

from conftest import connect, error_of, one

TEXTS = [f"distinct short text number {i} about {w}" for i, w in
         enumerate(["databases", "cats", "rivers", "music", "trains", "tea", "rain", "clocks"] * 8)]


def vectors(conn, texts, inference):
    conn.execute("SELECT set_config('pg_embed_sidecar.inference', %s, false)", (inference,))
    rows = one(conn, "SELECT embed_texts(%s::text[])::text[]", (texts,))
    return np.array([[float(x) for x in r.strip("[]").split(",")] for r in rows])


def own_memory_kib(pid):
    """Private (unshared) memory of a process, as the kernel counts it."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


def inference_workers(conn):
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar inference'")]


def test_shared_equals_local_and_loads_no_model_in_the_session():
    with connect() as shared, connect() as local:
        assert len(inference_workers(shared)) == 1
        before = own_memory_kib(one(shared, "SELECT pg_backend_pid()"))
        a = vectors(shared, TEXTS, "shared")
        single = one(shared, "SELECT embed_text(%s)::text", (TEXTS[3],))
        grown = own_memory_kib(one(shared, "SELECT pg_backend_pid()")) - before
        b = vectors(local, TEXTS, "local")
        local_grown = own_memory_kib(one(local, "SELECT pg_backend_pid()")) - before
    assert a.shape == b.shape == (len(TEXTS), 384)
    assert np.abs(a - b).max() <= 1e-6
    assert np.abs(np.array([float(x) for x in single.strip("[]").split(",")]) - b[3]).max() <= 1e-6
    # the shared session holds no model: a few MiB at most; the local one holds a whole model
    assert grown < 8 * 1024, f"shared session grew by {grown} KiB"
    assert local_grown > 50 * 1024, f"local session grew by only {local_grown} KiB"


def test_inference_service_counts_what_it_embeds_and_how_long_it_was_busy():
    texts = [f"counted text {i} {time.time()}" for i in range(40)]
    with connect() as c:
        workers, texts0, busy0 = c.execute("SELECT workers, texts, busy_seconds FROM embed_sidecar.inference_service()").fetchone()
        t0 = time.time()
        assert len(vectors(c, texts, "shared")) == 40
        wall = time.time() - t0
        _, texts1, busy1 = c.execute("SELECT workers, texts, busy_seconds FROM embed_sidecar.inference_service()").fetchone()
        c.execute("SET pg_embed_sidecar.inference = 'local'")
    assert workers == 1
    # a drain elsewhere may add its own texts meanwhile, never fewer than ours
    assert texts1 - texts0 >= 40
    assert 0 < busy1 - busy0 <= wall + 0.05


def test_many_sessions_at_once_get_their_own_vectors():
    with connect() as c:
        expected = vectors(c, TEXTS, "local")
    results, errors = {}, []

    def session(k):
        try:
            with connect() as s:
                for i in range(k, len(TEXTS), 16):
                    results[i] = np.array([float(x) for x in one(s, "SELECT embed_text(%s)::text", (TEXTS[i],)).strip("[]").split(",")])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == len(TEXTS)
    for i, v in results.items():
        assert np.abs(v - expected[i]).max() <= 1e-6, f"session got another text's vector for {i}"


def long_texts(n):
    return [f"text {i}: " + "a long paragraph about databases and embeddings " * 20 for i in range(n)]


def test_cancel_while_waiting_frees_the_request():
    with connect() as c:
        c.execute("SET statement_timeout = '300ms'")
        err = error_of(c, "SELECT embed_texts(%s::text[])", (long_texts(3000),))
        assert err[0] == "57014"  # query_canceled (statement timeout)
        c.execute("RESET statement_timeout")
        # the session and the ring are fine afterwards: a full ring's worth still goes through
        assert one(c, "SELECT cardinality(embed_texts(%s::text[]))", (TEXTS,)) == len(TEXTS)
        assert one(c, "SELECT vector_dims(embed_text('after the cancel'))") == 384


def test_inference_worker_dying_mid_request_is_retried():
    with connect() as c:
        expected = vectors(c, long_texts(400)[-3:], "local")
    out, errors = {}, []

    def big_request():
        try:
            with connect() as s:
                out["v"] = vectors(s, long_texts(400), "shared")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with connect() as admin:
        [pid] = inference_workers(admin)
        t = threading.Thread(target=big_request)
        t.start()
        time.sleep(1.0)  # the request is being served
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        t.join(120)
        assert not t.is_alive()
        assert not errors, errors
        assert out["v"].shape == (400, 384)
        assert np.abs(out["v"][-3:] - expected).max() <= 1e-6
        new = inference_workers(admin)
        assert len(new) == 1 and new[0] != pid  # restarted by the postmaster


def test_errors_come_back_with_their_sqlstate_and_hint():
    with connect() as c:
        c.execute("SET pg_embed_sidecar.model = 'no-such-model'")
        shared = error_of(c, "SELECT embed_texts(ARRAY['x'])")  # raised by the inference worker
        c.execute("SET pg_embed_sidecar.inference = 'local'")
        local = error_of(c, "SELECT embed_texts(ARRAY['x'])")
    assert shared[0] == local[0] == "58P01"
    assert "no-such-model" in shared[1]
    assert shared[2] == local[2] and shared[2]
