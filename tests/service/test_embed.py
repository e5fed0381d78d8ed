"""In-process embed_text/embed_texts against an independent reference, and error paths
that need a fresh backend (ONNX Runtime is loaded once per process)."""
import numpy as np
import pytest

from conftest import PG_PKGLIBDIR, connect, error_of, one
from reference import SENTENCES, Reference


@pytest.fixture(scope="module")
def reference():
    return Reference()


@pytest.mark.parametrize("inference", ["shared", "local"])
def test_parity_with_independent_reference(reference, inference):
    with connect() as c:
        c.execute("SELECT set_config('pg_embed_sidecar.inference', %s, false)", (inference,))
        rows = c.execute("SELECT t, embed_text(t)::text FROM unnest(%s::text[]) AS t", (SENTENCES,)).fetchall()
        batched = one(c, "SELECT embed_texts(%s::text[])::text[]", (SENTENCES,))
    assert len(rows) == len(SENTENCES) >= 20
    worst = 1.0
    for (text, single), batch in zip(rows, batched):
        ours = np.array([float(x) for x in single.strip("[]").split(",")])
        ours_b = np.array([float(x) for x in batch.strip("[]").split(",")])
        ref = reference.embed(text)
        assert ours.shape == (384,)
        for v in (ours, ours_b):
            cos = float(v @ ref / np.linalg.norm(v))
            worst = min(worst, cos)
            assert cos >= 0.9999, f"cosine {cos} for {text[:40]!r}"
    print(f"worst cosine vs reference: {worst:.6f}")




def test_missing_onnxruntime_library_is_a_clean_error():
    with connect() as c:  # a fresh backend: the runtime is not loaded yet
        c.execute("SET pg_embed_sidecar.onnxruntime_library = '/nonexistent/libonnxruntime.so'")
        state, msg, hint = error_of(c, "SELECT embed_text('x')")
        assert state == "F0000"
        assert "could not load the ONNX Runtime library" in msg and "file not found" in msg
        assert "pg_embed_sidecar.onnxruntime_library" in hint
        # the session stays usable, and recovers when the setting is fixed
        c.execute("RESET pg_embed_sidecar.onnxruntime_library")
        assert one(c, "SELECT vector_dims(embed_text('x'))") == 384


def test_wrong_library_is_a_clean_error(tmp_path):
    bogus = f"{PG_PKGLIBDIR}/pgoutput.so"  # a real shared library, but not ONNX Runtime
    with connect() as c:
        c.execute(f"SET pg_embed_sidecar.onnxruntime_library = '{bogus}'")
        state, msg, hint = error_of(c, "SELECT embed_text('x')")
        assert state == "F0000" and "could not load the ONNX Runtime library" in msg, msg


def test_backend_stays_alive_after_errors():
    with connect() as c:
        pid = one(c, "SELECT pg_backend_pid()")
        c.execute("SET pg_embed_sidecar.model = 'nope'")
        assert error_of(c, "SELECT embed_text('x')")[0] == "58P01"
        c.execute("RESET pg_embed_sidecar.model")
        assert one(c, "SELECT pg_backend_pid()") == pid
        assert one(c, "SELECT vector_dims(embed_text('x'))") == 384
