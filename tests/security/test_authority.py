"""Owning a watched table gives no more power than owning a table.

Each attack plants code on a watched table owned by an ordinary role (pes_alice), then lets the
drain run — through the background worker and through process() — and checks that the code ran
as pes_alice (never as the worker's superuser), that no role attribute, membership or ACL changed,
and that the rows were still embedded cleanly."""
import pytest

from conftest import (assert_in_step, connect_as, error_of, one, queue_depth, role_snapshot, wait,
                      watch)

# The payload every attack runs: note who runs it, then try to escalate. The attempts swallow
# their errors so the drain itself succeeds; test_raising_attack_is_dead_lettered covers the rest.
PAYLOAD = """
CREATE TABLE {s}.seen (who text, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION {s}.payload() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.seen (who) VALUES (current_user);
    BEGIN ALTER ROLE pes_alice SUPERUSER; EXCEPTION WHEN OTHERS THEN NULL; END;
    BEGIN ALTER ROLE pes_alice CREATEROLE BYPASSRLS; EXCEPTION WHEN OTHERS THEN NULL; END;
    BEGIN GRANT pg_execute_server_program, pg_read_server_files TO pes_alice; EXCEPTION WHEN OTHERS THEN NULL; END;
    BEGIN GRANT ALL ON SCHEMA public TO pes_alice; EXCEPTION WHEN OTHERS THEN NULL; END;
    RETURN true;
END $$;
-- the same, wrapped to fit each place code can hide in
CREATE FUNCTION {s}.payload_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM {s}.payload(); RETURN NEW; END $$;
CREATE FUNCTION {s}.payload_immutable(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN PERFORM {s}.payload(); RETURN $1; END $$;
CREATE FUNCTION {s}.payload_int(int) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN RETURN {s}.payload(); END $$;
CREATE FUNCTION {s}.payload_text() RETURNS text LANGUAGE plpgsql AS $$ BEGIN PERFORM {s}.payload(); RETURN 'x'; END $$;
"""

# attack name -> (key type of the source, SQL pes_alice runs after watch())
ATTACKS = {
    "sidecar_trigger": ("int", """CREATE TRIGGER t BEFORE INSERT OR UPDATE ON docs_embeddings
                                  FOR EACH ROW EXECUTE FUNCTION {s}.payload_trigger()"""),
    "sidecar_expression_index": ("int", "CREATE INDEX ON docs_embeddings ({s}.payload_immutable(model))"),
    "sidecar_check": ("int", "ALTER TABLE docs_embeddings ADD CONSTRAINT c CHECK ({s}.payload())"),
    "key_domain_check": ("{s}.guarded_key", None),
    "sidecar_column_default": ("int", "ALTER TABLE docs_embeddings ADD COLUMN extra text DEFAULT {s}.payload_text()"),
    "source_rls_policy": ("int", """ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
                                    ALTER TABLE docs FORCE ROW LEVEL SECURITY;
                                    CREATE POLICY p ON docs USING ({s}.payload())"""),
}


@pytest.fixture
def alice(db, make_role):
    """pes_alice owns a table docs (filled with 20 rows) that the superuser watches."""
    make_role("pes_alice")
    conn = connect_as("pes_alice", db.schema)
    yield conn
    conn.close()


def plant(db, alice, attack):
    key_type, sql = ATTACKS[attack]
    s = f'"{db.schema}"'
    alice.execute(PAYLOAD.format(s=s))
    if attack == "key_domain_check":
        alice.execute(f"CREATE DOMAIN {s}.guarded_key AS int CHECK ({s}.payload_int(VALUE))")
    alice.execute(f"CREATE TABLE docs (id {key_type.format(s=s)} PRIMARY KEY, body text)")
    watch(db, "docs")  # the administrator watches alice's table
    one(db, "SELECT embed_sidecar.pause('docs')")
    if sql:
        alice.execute(sql.format(s=s))
    alice.execute("INSERT INTO docs SELECT i, 'attack row ' || i FROM generate_series(1, 20) i")
    alice.execute("TRUNCATE seen")  # from here on, only the drain runs the payload


def check_outcome(db, before):
    assert role_snapshot(db) == before, "a role attribute, membership or ACL changed"
    who = db.execute("SELECT DISTINCT who FROM seen").fetchall()
    assert who == [("pes_alice",)], f"the planted code ran as {who}"
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 0
    assert_in_step(db, "docs")
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 20


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_via_worker(db, alice, attack):
    before = role_snapshot(db)
    plant(db, alice, attack)
    one(db, "SELECT embed_sidecar.resume('docs')")
    wait(db, "docs", 60)
    check_outcome(db, before)


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_via_process(db, alice, attack):
    before = role_snapshot(db)
    plant(db, alice, attack)
    db.execute("GRANT EXECUTE ON FUNCTION embed_sidecar.process(regclass, int) TO pes_alice")
    # process() is SECURITY DEFINER: the owner calling it must not borrow the definer's rights
    assert one(alice, "SELECT embed_sidecar.process('docs')") == 20
    check_outcome(db, before)


def test_raising_attack_is_dead_lettered(db, alice):
    """Planted code that raises for one row: that row is dead-lettered, the others embedded."""
    before = role_snapshot(db)
    alice.execute(PAYLOAD.format(s=f'"{db.schema}"'))
    alice.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs")
    one(db, "SELECT embed_sidecar.pause('docs')")
    alice.execute("""CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN IF NEW.id = 13 THEN RAISE EXCEPTION 'row 13 refused by its owner'; END IF; RETURN NEW; END $$""")
    alice.execute("CREATE TRIGGER r BEFORE INSERT ON docs_embeddings FOR EACH ROW EXECUTE FUNCTION refuse()")
    alice.execute("INSERT INTO docs SELECT i, 'row ' || i FROM generate_series(1, 20) i")
    db.execute("SET pg_embed_sidecar.max_attempts = 1")
    assert one(db, "SELECT embed_sidecar.process('docs')") == 20
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 19
    key, error = db.execute("SELECT key::text, error FROM embed_sidecar.failures f JOIN embed_sidecar.sources s "
                            "ON s.id = f.source_id WHERE s.source = 'docs'::regclass").fetchone()
    assert key == "[13]" and "row 13 refused by its owner" in error
    assert queue_depth(db, "docs") == 0
    assert "row 13 refused" in one(db, "SELECT last_error FROM embed_sidecar.status WHERE source = 'docs'::regclass")
    assert role_snapshot(db) == before


def test_writer_without_rights_cannot_enqueue(db, make_role):
    """The triggers' enqueue step is callable by anyone, but only for tables the caller may write."""
    make_role("pes_mallory")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs")
    mallory = connect_as("pes_mallory", db.schema)
    sid = one(db, "SELECT id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    state, msg, hint = error_of(mallory, "SELECT embed_sidecar._enqueue(%s, ARRAY['[1]'])", (sid,))
    assert state == "42501" and "may not enqueue" in msg and hint
    assert queue_depth(db, "docs") == 0
    # a role granted UPDATE on one column is a writer: its statements are enqueued
    db.execute("GRANT SELECT, UPDATE (body) ON docs TO pes_mallory")
    db.execute("INSERT INTO docs VALUES (1, 'first')")
    wait(db, "docs")
    mallory.execute("UPDATE docs SET body = 'second' WHERE id = 1")
    wait(db, "docs")
    assert_in_step(db, "docs")
    mallory.close()


def test_owner_checks_follow_set_role(db, make_role):
    """Management functions check the role the session acts as (SET ROLE), not the login role."""
    make_role("pes_alice")
    db.execute("CREATE TABLE admin_docs (id int PRIMARY KEY, body text)")  # owned by the superuser
    db.execute("GRANT EXECUTE ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name) TO pes_alice")
    db.execute("SET ROLE pes_alice")
    try:
        state, msg, _ = error_of(db, "SELECT embed_sidecar.watch('admin_docs', 'body')")
    finally:
        db.execute("RESET ROLE")
    assert state == "42501" and "must be owner" in msg
    # a pooler's login (NOINHERIT, as PostgREST's authenticator) that switches to the owner role
    make_role("pes_web")
    make_role("pes_authenticator", "NOINHERIT")
    db.execute("GRANT pes_web TO pes_authenticator")
    db.execute("GRANT EXECUTE ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name) TO pes_web")
    web = connect_as("pes_web", db.schema)
    web.execute("CREATE TABLE web_docs (id int PRIMARY KEY, body text)")
    web.close()
    pooled = connect_as("pes_authenticator", db.schema)
    pooled.execute("SET ROLE pes_web")
    assert one(pooled, "SELECT embed_sidecar.watch('web_docs', 'body')::text") == "web_docs_embeddings"
    pooled.close()


def test_quoted_role_names(db, make_role):
    """Owners and grantees whose names need quotes (they were quoted twice)."""
    make_role("Alice")
    make_role("app-user")
    alice = connect_as("Alice", db.schema)
    alice.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    alice.execute('GRANT SELECT ON docs TO "app-user"')
    alice.execute("INSERT INTO docs VALUES (1, 'quoted owner')")
    alice.close()
    assert watch(db, "docs") == "docs_embeddings"
    assert one(db, "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'docs_embeddings'::regclass") == '"Alice"'
    assert one(db, """SELECT has_table_privilege('app-user', 'docs_embeddings', 'SELECT')""")
    wait(db, "docs")
    assert_in_step(db, "docs")
