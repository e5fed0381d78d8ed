"""An embedding replica: a table on a publisher that has no pg_embed_sidecar (nothing preloaded,
wal_level = logical) is copied by a subscription into the test cluster, which watches its copy.
The initial copy and every INSERT, UPDATE, DELETE and TRUNCATE replication applies reach the
sidecar as local writes do (sql/replica.sql, src/replica.rs); status shows the lag.

The publisher is a throwaway cluster on $PES_PUBLISHER_PORT (5452) in $PES_PUBLISHER_DATA, made
from the binaries of $PG_CONFIG (scripts/topology/nodes.py)."""
import os
import uuid

import pytest

from conftest import assert_in_step, connect_as, error_of, one, wait, watch

from nodes import eventually, table_digest  # noqa: E402


@pytest.fixture
def replicated(db, publisher):
    """replicated(ddl) makes table docs (ddl: its columns) in this test's schema on the publisher
    and here, publishes it, and returns (publisher connection, subscribe()); subscribe() creates
    the subscription. Subscriptions and publications are dropped after the test."""
    pub = publisher.connect()
    pub.execute(f'CREATE SCHEMA "{db.schema}"')
    pub.execute(f'SET search_path = "{db.schema}"')
    name = "pes_" + uuid.uuid4().hex[:8]
    made = []

    def make(ddl, prelude=None):
        for conn in (pub, db) if prelude else ():
            conn.execute(prelude)
        pub.execute(f"CREATE TABLE docs ({ddl})")
        db.execute(f"CREATE TABLE docs ({ddl})")
        pub.execute(f'CREATE PUBLICATION {name} FOR TABLE "{db.schema}".docs')

        def subscribe():
            db.execute(f"CREATE SUBSCRIPTION {name} CONNECTION '{publisher.dsn()}' PUBLICATION {name}")
            made.append(name)
        return pub, subscribe

    yield make
    for sub in made:
        db.execute(f"DROP SUBSCRIPTION IF EXISTS {sub}")
    pub.execute(f"DROP PUBLICATION IF EXISTS {name}")
    pub.execute(f'DROP SCHEMA "{db.schema}" CASCADE')
    pub.close()


def caught_up(pub, db):
    """Wait until the subscriber holds exactly the publisher's rows, then until its queues drain."""
    eventually(lambda: table_digest(pub, "docs") == table_digest(db, "docs"), "the subscriber did not catch up", timeout=300)
    wait(db, "docs", 300)


def in_step(db):
    """verify()'s missing, stale and orphans, and the independent check of conftest."""
    assert db.execute("SELECT missing, stale, orphans FROM embed_sidecar.verify('docs')").fetchone() == (0, 0, 0)
    assert_in_step(db, "docs")


def test_initial_copy_and_every_replicated_change_reach_the_sidecar(db, replicated):
    pub, subscribe = replicated("id int PRIMARY KEY, body text, tag text")
    pub.execute("INSERT INTO docs SELECT i, 'replicated document ' || i || ' about topic ' || i % 7, 't' FROM generate_series(1, 500) i")
    watch(db, "docs")  # before the subscription: the copy itself fires the replica trigger
    subscribe()
    # while the copy and the drain run
    pub.execute("INSERT INTO docs SELECT i, 'a later document ' || i, 't' FROM generate_series(501, 600) i")
    pub.execute("UPDATE docs SET body = body || ' (edited)' WHERE id <= 50")
    pub.execute("UPDATE docs SET tag = 'other column' WHERE id BETWEEN 51 AND 80")
    pub.execute("DELETE FROM docs WHERE id BETWEEN 81 AND 110")
    pub.execute("UPDATE docs SET body = '   ' WHERE id = 111")
    pub.execute("UPDATE docs SET body = NULL WHERE id = 112")
    pub.execute("UPDATE docs SET id = id + 1000 WHERE id IN (113, 114)")  # a key that changes
    caught_up(pub, db)
    in_step(db)
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 600 - 30 - 2

    # TRUNCATE, then new rows and more changes
    pub.execute("TRUNCATE docs")
    pub.execute("INSERT INTO docs SELECT i, 'after the truncate, document ' || i, 't' FROM generate_series(1, 200) i")
    pub.execute("UPDATE docs SET body = 'rewritten ' || id WHERE id % 10 = 0")
    pub.execute("DELETE FROM docs WHERE id % 10 = 1")
    pub.execute("UPDATE docs SET body = '' WHERE id = 2")
    caught_up(pub, db)
    in_step(db)
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 200 - 20 - 1

    # a live insert on the publisher becomes searchable here (scripts/topology/replica.py times it)
    pub.execute("INSERT INTO docs VALUES (9999, 'zebras crossing a frozen arctic river at dawn', 't')")
    eventually(lambda: one(db, "SELECT key FROM embed_sidecar.search('docs', 'zebras crossing a frozen river', 1)") == [9999],
               "the live insert is not searchable on the subscriber")


def test_watch_after_the_subscription_copied_the_table(db, replicated):
    """watch() of a table already copied: its backfill covers the copy, and its sidecar has no
    foreign key (the apply worker's TRUNCATE would fail on one), so TRUNCATE replicates."""
    pub, subscribe = replicated("id int PRIMARY KEY, body text")
    pub.execute("INSERT INTO docs SELECT i, 'copied before the watch ' || i FROM generate_series(1, 50) i")
    subscribe()
    eventually(lambda: table_digest(pub, "docs") == table_digest(db, "docs"), "the copy did not finish")
    watch(db, "docs")
    assert one(db, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'docs_embeddings'::regclass AND contype = 'f'") == 0
    caught_up(pub, db)
    in_step(db)
    pub.execute("TRUNCATE docs")
    pub.execute("INSERT INTO docs VALUES (1, 'the only row left')")
    caught_up(pub, db)
    in_step(db)
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 1
    # local deletes on the copy still remove vectors (the delete trigger stands in for the cascade)
    db.execute("DELETE FROM docs")
    wait(db, "docs")
    in_step(db)


def test_a_subscription_made_after_the_watch_drops_the_foreign_key(db, replicated):
    pub, subscribe = replicated("id int PRIMARY KEY, body text")
    watch(db, "docs")
    fk = "SELECT count(*) FROM pg_constraint WHERE conrelid = 'docs_embeddings'::regclass AND contype = 'f'"
    assert one(db, fk) == 1
    subscribe()
    assert one(db, fk) == 0


def test_status_shows_how_far_behind_the_publisher_it_is(db, replicated):
    pub, subscribe = replicated("id int PRIMARY KEY, body text")
    pub.execute("INSERT INTO docs SELECT i, 'lag ' || i FROM generate_series(1, 20) i")
    watch(db, "docs")
    assert db.execute("SELECT replication_lag, behind IS NOT NULL FROM embed_sidecar.status WHERE source = 'docs'::regclass"
                      ).fetchone() == (None, True)  # not subscribed: behind is the queue's lag alone
    subscribe()
    caught_up(pub, db)
    eventually(lambda: one(db, "SELECT behind IS NOT NULL AND replication_lag IS NOT NULL FROM embed_sidecar.status "
                               "WHERE source = 'docs'::regclass"), "no lag figure once caught up")
    sub = one(db, "SELECT subname FROM pg_subscription WHERE subname LIKE 'pes_%' ORDER BY oid DESC LIMIT 1")
    db.execute(f"ALTER SUBSCRIPTION {sub} DISABLE")
    # with the apply worker stopped the lag cannot be told: NULL, which is what to alert on
    eventually(lambda: one(db, "SELECT behind IS NULL FROM embed_sidecar.status WHERE source = 'docs'::regclass"),
               "behind stays known with the apply worker stopped")


def test_replicated_keys_never_run_the_owners_cast_as_the_apply_worker(db, replicated, make_role):
    """The apply worker runs as the subscription's owner (a superuser): the replica trigger builds
    keys with output functions only, and checks them as the table's owner, so a cast to json that
    the owner of a key's type planted never runs as the superuser."""
    owner = make_role("rep_owner")
    pub, subscribe = replicated("id colour PRIMARY KEY, body text", prelude="CREATE TYPE colour AS ENUM ('red', 'green', 'blue')")
    db.execute(f'ALTER TYPE colour OWNER TO "{owner}"')
    db.execute(f'ALTER TABLE docs OWNER TO "{owner}"')
    db.execute(f'SET ROLE "{owner}"')
    db.execute("""CREATE FUNCTION planted_json(x colour) RETURNS json LANGUAGE plpgsql AS $$ BEGIN
                    BEGIN EXECUTE 'ALTER ROLE rep_owner SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
                    RETURN to_json(x::text); END $$""")
    db.execute("CREATE CAST (colour AS json) WITH FUNCTION planted_json(colour)")
    db.execute("RESET ROLE")
    watch(db, "docs")
    pub.execute("INSERT INTO docs VALUES ('red', 'a red one'), ('green', 'a green one')")
    subscribe()
    caught_up(pub, db)
    # (counted here, not with verify(): that runs as its caller, this superuser)
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 2
    pub.execute("DELETE FROM docs WHERE id = 'red'")
    caught_up(pub, db)
    assert one(db, "SELECT count(*) FROM docs_embeddings") == 1
    assert one(db, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (owner,)) is False


def test_enqueue_applied_refuses_roles_that_may_not_write(db, make_role):
    reader = make_role("rep_reader")
    db.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    watch(db, "docs")
    db.execute(f'GRANT SELECT ON docs TO "{reader}"')
    sid = one(db, "SELECT id FROM embed_sidecar.sources WHERE source = 'docs'::regclass")
    db.execute(f'SET ROLE "{reader}"')
    try:
        assert error_of(db, "SELECT embed_sidecar._enqueue_applied(%s, ARRAY['[1]'])", (sid,))[0] == "42501"
        assert error_of(db, "SELECT embed_sidecar._enqueue_replicated(%s, ARRAY['[1]'])", (sid,))[0] == "42501"
        assert error_of(db, "SELECT embed_sidecar._enqueue_orphans(%s)", (sid,))[0] == "42501"
    finally:
        db.execute("RESET ROLE")


def test_composite_and_text_keys_replicate(db, replicated):
    """Keys of several columns and types (text, timestamptz, numeric) go through the replica
    trigger in the form the drain reads back, whatever the session's DateStyle."""
    pub, subscribe = replicated("site text, at timestamptz, n numeric, body text, PRIMARY KEY (site, at, n)")
    db.execute("ALTER DATABASE pes_test SET DateStyle = 'SQL, DMY'")
    try:
        watch(db, "docs")
        pub.execute("""INSERT INTO docs SELECT 'site ' || i % 3, timestamptz '2026-01-01 00:00+00' + i * interval '1 hour', i / 7.0,
                              'page ' || i || ' of a site' FROM generate_series(1, 40) i""")
        subscribe()
        pub.execute("UPDATE docs SET body = body || ' (edited)' WHERE n < 2")
        pub.execute("DELETE FROM docs WHERE site = 'site 1'")
        pub.execute("UPDATE docs SET at = at + interval '1 day' WHERE site = 'site 2'")  # keys that change
        eventually(lambda: table_digest(pub, "docs", key="(site, at, n)") == table_digest(db, "docs", key="(site, at, n)"),
                   "the subscriber did not catch up")
        wait(db, "docs", 300)
        assert db.execute("SELECT missing, stale, orphans FROM embed_sidecar.verify('docs')").fetchone() == (0, 0, 0)
    finally:
        db.execute("ALTER DATABASE pes_test RESET DateStyle")


def test_a_row_whose_key_cannot_be_queued_is_applied_and_dead_lettered(db, make_role):
    """The replica trigger never raises because of a row's data (the apply worker would retry the
    same change for ever): a key over 2,000 bytes, or one the key type refuses when checked as the
    table's owner, is a WARNING and a dead letter naming it; the rows around it are embedded;
    retry_failed() of such a dead letter is acked, never stuck on the queue."""
    owner = make_role("rep_dl_owner")
    db.execute("CREATE DOMAIN dlkey AS text CHECK (VALUE NOT LIKE 'owner-refuses%' OR current_user <> 'rep_dl_owner')")
    db.execute("CREATE TABLE docs (id dlkey PRIMARY KEY, body text)")
    db.execute(f'ALTER TABLE docs OWNER TO "{owner}"')
    watch(db, "docs")
    long_key = "k" * 2100
    notices = []
    db.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary, d.message_hint)))
    db.execute("SET session_replication_role = replica")
    try:
        db.execute("INSERT INTO docs VALUES ('a', 'a row about rivers'), (%s, 'a row with a long key'), "
                   "('owner-refuses-this', 'a key the owner''s domain refuses'), ('b', 'a row about chess')", (long_key,))
    finally:
        db.execute("RESET session_replication_role")
    warned = [n for n in notices if n[0] == "WARNING" and "cannot be queued" in n[1]]
    assert len(warned) == 2, notices
    assert "embed_sidecar.failures" in warned[0][2]
    assert one(db, "SELECT count(*) FROM docs") == 4
    wait(db, "docs")
    assert sorted(k for (k,) in db.execute("SELECT id FROM docs_embeddings").fetchall()) == ["a", "b"]
    dead = db.execute("""SELECT f.key ->> 'unqueued_key', f.key ->> 'sha256', f.error FROM embed_sidecar.failures f
                           JOIN embed_sidecar.sources s ON s.id = f.source_id WHERE s.source = 'docs'::regclass
                          ORDER BY 1""").fetchall()
    assert [(d[0][:20], len(d[1])) for d in dead] == [('["kkkkkkkkkkkkkkkkkk', 64), ('["owner-refuses-this', 64)], dead
    assert "2104 bytes as JSON" in dead[0][2] and "dlkey" in dead[1][2], dead  # (the domain's own error)
    assert one(db, "SELECT failed FROM embed_sidecar.status WHERE source = 'docs'::regclass") == 2
    # no retry can embed them: retry_failed() leaves them, discard_failed() clears them
    assert one(db, "SELECT embed_sidecar.retry_failed('docs')") == 0
    wait(db, "docs")
    assert db.execute("SELECT pending, failed FROM embed_sidecar.status WHERE source = 'docs'::regclass").fetchone() == (0, 2)
    assert one(db, "SELECT embed_sidecar.discard_failed('docs')") == 2
    assert db.execute("SELECT pending, failed FROM embed_sidecar.status WHERE source = 'docs'::regclass").fetchone() == (0, 0)


def test_a_subscription_that_would_copy_into_a_sidecar_is_refused(db, publisher):
    """A publisher table named like a sidecar (a FOR ALL TABLES publication matches by name) would
    have the apply worker write vectors the drain never made: CREATE SUBSCRIPTION is refused
    (55006, naming the sidecar and the slot to drop), and so is ALTER SUBSCRIPTION ... REFRESH
    PUBLICATION once such a table joins a publication; the subscription goes on for the rest."""
    pub = publisher.connect()
    pub.execute(f'CREATE SCHEMA "{db.schema}"')
    pub.execute(f'SET search_path = "{db.schema}"')
    name = "pes_" + uuid.uuid4().hex[:8]
    made = False
    try:
        for c in (pub, db):
            c.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        side = watch(db, "docs").split(".")[-1].strip('"')
        pub.execute(f'CREATE TABLE "{side}" (id int PRIMARY KEY, embedding text, model text)')
        pub.execute(f'CREATE PUBLICATION {name}_all FOR TABLE docs, "{side}"')
        e = error_of(db, f"CREATE SUBSCRIPTION {name}_all CONNECTION '{publisher.dsn()}' PUBLICATION {name}_all")
        assert e is not None and e[0] == "55006" and side in e[1], e
        # the slot CREATE SUBSCRIPTION made on the publisher before the refusal, to drop there
        assert one(pub, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (f"{name}_all",)) == 1
        pub.execute("SELECT pg_drop_replication_slot(%s)", (f"{name}_all",))
        # a subscription without it, then the table joins the publication
        pub.execute(f"CREATE PUBLICATION {name} FOR TABLE docs")
        db.execute(f"CREATE SUBSCRIPTION {name} CONNECTION '{publisher.dsn()}' PUBLICATION {name}")
        made = True
        pub.execute(f'ALTER PUBLICATION {name} ADD TABLE "{side}"')
        e = error_of(db, f"ALTER SUBSCRIPTION {name} REFRESH PUBLICATION")
        assert e is not None and e[0] == "55006" and side in e[1], e
        assert one(db, "SELECT count(*) FROM pg_subscription_rel WHERE srrelid = %s::regclass", (side,)) == 0
        pub.execute("INSERT INTO docs VALUES (1, 'still replicated')")
        eventually(lambda: one(db, "SELECT count(*) FROM docs") == 1, "the subscription stopped")
    finally:
        if made:
            db.execute(f"DROP SUBSCRIPTION {name}")
        pub.execute(f"DROP PUBLICATION IF EXISTS {name}")
        pub.execute(f"DROP PUBLICATION IF EXISTS {name}_all")
        pub.execute(f'DROP SCHEMA "{db.schema}" CASCADE')
        pub.close()


def test_subscription_ddl_drops_foreign_keys_only_for_roles_that_may_act_for_the_owner(db, make_role, replicated):
    """The subscription event trigger's body drops the sidecar foreign key only of tables whose
    owner's rights the role running the command has (PostgreSQL 16+ lets members of
    pg_create_subscription subscribe). Shown on any version by running the body as that role:
    the subscription is made with the event trigger disabled, so the table is listed in
    pg_subscription_rel and its sidecar still has its foreign key."""
    # (make_role first: its teardown drops the roles' tables, after the subscription is gone)
    victim = make_role("rep_fk_victim")
    other = make_role("rep_fk_other")
    pub, subscribe = replicated("id int PRIMARY KEY, body text")
    db.execute(f'ALTER TABLE docs OWNER TO "{victim}"')
    watch(db, "docs")
    fk = "SELECT count(*) FROM pg_constraint WHERE conrelid = 'docs_embeddings'::regclass AND contype = 'f'"
    db.execute("ALTER EVENT TRIGGER embed_sidecar_subscription DISABLE")
    try:
        subscribe()
    finally:
        db.execute("ALTER EVENT TRIGGER embed_sidecar_subscription ENABLE")
    assert one(db, fk) == 1
    for role, left in ((other, 1), (victim, 0)):
        with connect_as(role, db.schema) as c:
            with c.transaction():
                c.execute("SELECT embed_sidecar._enter()")
                c.execute("SELECT embed_sidecar._do_on_subscription_ddl()")
        assert one(db, fk) == left, role
