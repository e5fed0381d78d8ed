"""Attacks of a fourth reviewer who did not write the code: search filters, search_rows(), the
per-embedding view (<table>_vectors) and its redefinition by the drain worker and the management
functions, embed_query().

Each test checks one promise: it PASSES when the attack is refused (or harmless) and FAILS when the
attack works. Everything happens in database pes_rv4_main with roles pes_rv4_*; the module's own
`extension` fixture replaces conftest's (pes_test is never touched).
"""
import time

import psycopg
import pytest

from tests.conftest import MODELS, connect, error_of, one, role_snapshot, wait_until

DB = "pes_rv4_main"
OWNER_A, OWNER_B, READER, NOBODY, MALLORY = "pes_rv4_a", "pes_rv4_b", "pes_rv4_r", "pes_rv4_x", "pes_rv4_m"
ROLES = [OWNER_A, OWNER_B, READER, NOBODY, MALLORY]
OTHER_MODEL = "paraphrase-MiniLM-L3-v2"
MANAGEMENT = [
    "embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name)",
    "embed_sidecar.unwatch(regclass, boolean, text)",
    "embed_sidecar.wait(regclass, interval)",
    "embed_sidecar.reembed(regclass, text)",
    "embed_sidecar.set_model(regclass, text, text)",
    "embed_sidecar.rollback_model(regclass, text)",
    "embed_sidecar.drop_previous(regclass, text)",
]


def _drop_everything():
    with connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        for r in ROLES:
            if one(c, "SELECT 1 FROM pg_roles WHERE rolname = %s", (r,)):
                c.execute(f"DROP ROLE {r}")


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Overrides conftest's session fixture: our own database and roles, never pes_test."""
    _drop_everything()
    with connect(dbname="postgres") as c:
        for r in ROLES:
            c.execute(f"CREATE ROLE {r} LOGIN")
        c.execute(f"CREATE DATABASE {DB}")
    with connect(dbname=DB) as c:
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        for r in (OWNER_A, OWNER_B, MALLORY):
            c.execute(f"CREATE SCHEMA {r} AUTHORIZATION {r}")
            c.execute(f"GRANT USAGE ON SCHEMA {r} TO PUBLIC")
        for r in (OWNER_A, OWNER_B):
            for f in MANAGEMENT:
                c.execute(f"GRANT EXECUTE ON FUNCTION {f} TO {r}")
        # a schema both owners may create in (an application's shared schema)
        c.execute("CREATE SCHEMA pes_rv4_shared")
        c.execute(f"GRANT USAGE ON SCHEMA pes_rv4_shared TO PUBLIC")
        c.execute(f"GRANT CREATE ON SCHEMA pes_rv4_shared TO {OWNER_A}, {OWNER_B}")
    yield
    _drop_everything()


def as_role(role, **kw):
    return connect(dbname=DB, user=role, **kw)


def su():
    return connect(dbname=DB)


def tenant_table(table, rows=12):
    """A table of OWNER_A with two tenants; READER may SELECT it and sees tenant 1 only (row
    security); tenant 2's rows hold a secret. Watched and drained."""
    with as_role(OWNER_A) as a:
        a.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tenant int NOT NULL, body text, secret text)")
        a.execute(f"""INSERT INTO {table}
                      SELECT g, 1 + g %% 2, CASE WHEN g %% 2 = 0 THEN 'a note about cats number ' ELSE 'secret plans about dogs ' END || g,
                             CASE WHEN g %% 2 = 1 THEN 'swordfish' || g END
                        FROM generate_series(1, %s) g""", (rows,))
        a.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        a.execute(f"CREATE POLICY only_tenant_1 ON {table} FOR SELECT TO {READER} USING (tenant = 1)")
        a.execute(f"GRANT SELECT ON {table} TO {READER}")
        a.execute(f"SELECT embed_sidecar.watch(%s, 'body')", (table,))
        assert one(a, "SELECT embed_sidecar.wait(%s, '90 s')", (table,))
    with su() as c:
        visible = {r[0] for r in c.execute(f"SELECT id FROM {table} WHERE tenant = 1")}
    return visible


def search_keys(conn, table, filter=None, k=50, kind="search"):
    if kind == "search":
        rows = conn.execute("SELECT (key->>0)::int FROM embed_sidecar.search(%s, 'cats and dogs', %s, filter => %s)",
                            (table, k, filter)).fetchall()
    elif kind == "hybrid":
        rows = conn.execute("""SELECT (key->>0)::int FROM embed_sidecar.hybrid_search(%s, 'cats dogs secret plans note',
                                      %s, candidates => %s, filter => %s)""", (table, k, max(k, 100), filter)).fetchall()
    else:
        rows = conn.execute(f"SELECT (hit).id FROM embed_sidecar.search_rows(NULL::{table}, 'cats and dogs', %s, filter => %s)",
                            (k, filter)).fetchall()
    return {r[0] for r in rows}


@pytest.fixture(scope="module")
def tenants():
    return "pes_rv4_a.tenants", tenant_table("pes_rv4_a.tenants")


# ---------------------------------------------------------------------------------------------
# 1. Search filters (sql/search.sql, src/search_filter.rs)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    "true) UNION SELECT NULL, 0 --",
    "true)) f ON true CROSS JOIN (SELECT 1",
    "true) AS x, (1",
    "true /*",
    "true; SELECT 1",
    "true) ORDER BY (1",
    "true)) f ON true) b ORDER BY 1 LIMIT 1) r --",
    "true\n) x, (SELECT 1",
    "sc.embedding IS NOT NULL",           # the sidecar's alias is not the filter's to name
    "f.id IS NOT NULL",                   # nor the filter's own sub-select alias
    "$1 IS NOT NULL",                     # nor the statement's parameters (query vector, k, model)
    "",
])
def test_filter_cannot_change_the_statement_it_is_placed_in(tenants, bad):
    """Promise 1: the filter is one expression; text that closes our parenthesis, comments out
    our tail, adds targets/clauses, names our aliases or parameters, is refused, by each of the
    three searches, with nothing returned."""
    table, _ = tenants
    with as_role(READER) as r:
        for kind in ("search", "hybrid", "rows"):
            try:
                got = search_keys(r, table, bad, kind=kind)
            except psycopg.Error:
                continue
            pytest.fail(f"{kind}: filter {bad!r} accepted, returned {got}")


def test_filter_with_parentheses_in_strings_and_comments_is_still_one_expression(tenants):
    """Promise 1: parentheses inside string literals, quoted identifiers and -- comments neither
    break nor widen the filter; the result stays within the reader's rows."""
    table, visible = tenants
    with as_role(READER) as r:
        for f in ["body <> ')) OR true --'", "tenant = 2 -- ) OR (true\n OR tenant = 1", "\"tenant\" IN (1, 2)",
                  "(tenant = 1) OR (true)"]:
            for kind in ("search", "hybrid", "rows"):
                got = search_keys(r, table, f, kind=kind)
                assert got <= visible, (kind, f, got - visible)


@pytest.mark.parametrize("exact_rows", ["0", "1000000000"])
def test_filter_error_oracle_sees_no_hidden_rows(tenants, exact_rows):
    """Promise 1: row security applies to the filter as in the reader's own SELECT: an expression
    that raises on a hidden row (tenant 2, or its secret) never raises, on the index path
    (exact_search_rows = 0) and the exact one, for search, hybrid_search and search_rows."""
    table, visible = tenants
    with as_role(READER) as r:
        r.execute("SET pg_embed_sidecar.exact_search_rows = " + exact_rows)
        for f in ["1 / (CASE WHEN tenant = 2 THEN 0 ELSE 1 END) = 1",
                  "1 / (CASE WHEN secret LIKE 'swordfish%' THEN 0 ELSE 1 END) = 1",
                  "tenants.tenant / (tenants.tenant - 2) <> 99"]:
            for kind in ("search", "hybrid", "rows"):
                got = search_keys(r, table, f, kind=kind)
                assert got <= visible, (kind, f, got - visible)
        # and the hidden rows are never returned, whatever the filter says
        for kind in ("search", "hybrid", "rows"):
            assert search_keys(r, table, "tenant = 2", kind=kind) == set(), kind
            assert search_keys(r, table, None, kind=kind) <= visible, kind


def test_filter_cannot_read_what_the_reader_cannot(tenants):
    """Promise 1: the filter runs with the caller's rights: a sub-select of a table the reader may
    not read is 42501; a role without SELECT on the source gets 42501 from every search."""
    table, _ = tenants
    with as_role(OWNER_B) as b:
        b.execute("CREATE TABLE IF NOT EXISTS pes_rv4_b.private_t (x int)")
    for kind in ("search", "hybrid", "rows"):
        with as_role(READER) as r:
            try:
                search_keys(r, table, "EXISTS (SELECT 1 FROM pes_rv4_b.private_t)", kind=kind)
            except psycopg.Error as e:
                assert e.sqlstate == "42501", (kind, e.sqlstate, str(e))
            else:
                pytest.fail(f"{kind}: filter read a table the reader may not read")
    with as_role(NOBODY) as x:
        for kind in ("search", "hybrid", "rows"):
            try:
                search_keys(x, table, "true", kind=kind)
            except psycopg.Error as e:
                assert e.sqlstate == "42501", (kind, e.sqlstate, str(e))
            else:
                pytest.fail(f"{kind}: a role without SELECT searched the table")


def test_filter_sees_no_caller_mark(tenants):
    """Promise 1 (a search never runs anything with rights other than the caller's): code in the
    filter (as the owner's policies) runs after the caller is forgotten: _calling_role() there
    answers 'no caller recorded' (42501)."""
    table, _ = tenants
    with as_role(READER) as r:
        for kind in ("search", "hybrid", "rows"):
            try:
                search_keys(r, table, "embed_sidecar._calling_role() IS NOT NULL", kind=kind)
            except psycopg.Error as e:
                assert e.sqlstate == "42501", (kind, e.sqlstate, str(e))
            else:
                pytest.fail(f"{kind}: the filter saw a recorded caller")


def test_searches_leave_the_callers_settings_as_they_were(tenants):
    """Promise 1: search_path, hnsw.ef_search and hnsw.iterative_scan are as before after each
    search (k above ef_search, the index path, a filter that sets the search path), inside a
    transaction and after it."""
    table, _ = tenants
    with as_role(READER) as r:
        r.execute(f"SET search_path = {OWNER_A}, public")
        r.execute("SET hnsw.ef_search = 17")
        r.execute("SET hnsw.iterative_scan = strict_order")
        r.execute("SET pg_embed_sidecar.exact_search_rows = 0")
        before = r.execute("SELECT current_setting('search_path'), current_setting('hnsw.ef_search'), "
                           "current_setting('hnsw.iterative_scan')").fetchone()
        for kind in ("search", "hybrid", "rows"):
            with r.transaction():
                search_keys(r, table, "tenant = 1", k=300, kind=kind)
                inside = r.execute("SELECT current_setting('search_path'), current_setting('hnsw.ef_search'), "
                                   "current_setting('hnsw.iterative_scan')").fetchone()
                assert inside == before, (kind, inside, before)
            search_keys(r, table, None, k=300, kind=kind)
            after = r.execute("SELECT current_setting('search_path'), current_setting('hnsw.ef_search'), "
                              "current_setting('hnsw.iterative_scan')").fetchone()
            assert after == before, (kind, after, before)


def _plant(mallory_sql):
    with as_role(MALLORY) as m:
        m.execute("CREATE TABLE IF NOT EXISTS pes_rv4_m.ran (who text, what text)")
        m.execute("GRANT INSERT ON pes_rv4_m.ran TO PUBLIC")
        m.execute(mallory_sql)


def _ran(what):
    with su() as c:
        return c.execute("SELECT who FROM pes_rv4_m.ran WHERE what = %s", (what,)).fetchall()


@pytest.mark.parametrize("kind", ["search", "hybrid", "rows"])
def test_searchs_own_statement_does_not_resolve_names_in_the_callers_search_path(tenants, kind):
    """sql/search.sql: "the filter is evaluated with [the caller's search_path], everything else
    with ours". Attack: MALLORY owns a schema the reader has on its search path (after pg_catalog)
    and plants exact-type overloads of what the extension's own statements call unqualified:
    aggregate jsonb_agg(jsonb) (search's result), operator + (float8, int) (hybrid's RRF score),
    operator = (oid, regtype) (search_rows' row type lookup). The reader's filter names none of
    them; a plain SELECT with the same filter runs none of them. Promised: the search runs none of
    them either (they would run MALLORY's code as the reader)."""
    table, _ = tenants
    _plant("""
        CREATE OR REPLACE FUNCTION pes_rv4_m.agg_step(s jsonb, v jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO pes_rv4_m.ran VALUES (current_user, 'jsonb_agg'); RETURN coalesce(s, '[]'::jsonb) || jsonb_build_array(v); END $$;
        DROP AGGREGATE IF EXISTS pes_rv4_m.jsonb_agg(jsonb);
        CREATE AGGREGATE pes_rv4_m.jsonb_agg(jsonb) (sfunc = pes_rv4_m.agg_step, stype = jsonb);
        CREATE OR REPLACE FUNCTION pes_rv4_m.plus(a float8, b int) RETURNS float8 LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO pes_rv4_m.ran VALUES (current_user, 'plus'); RETURN a + b::float8; END $$;
        DROP OPERATOR IF EXISTS pes_rv4_m.+ (float8, int);
        CREATE OPERATOR pes_rv4_m.+ (leftarg = float8, rightarg = int, function = pes_rv4_m.plus);
        CREATE OR REPLACE FUNCTION pes_rv4_m.eq(a oid, b regtype) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO pes_rv4_m.ran VALUES (current_user, 'eq'); RETURN a = b::oid; END $$;
        DROP OPERATOR IF EXISTS pes_rv4_m.= (oid, regtype);
        CREATE OPERATOR pes_rv4_m.= (leftarg = oid, rightarg = regtype, function = pes_rv4_m.eq);
    """)
    with su() as c:
        c.execute("TRUNCATE pes_rv4_m.ran")
    with as_role(READER) as r:
        r.execute("SET search_path = public, pes_rv4_m")
        # the reader's own SELECT with this filter runs nothing of MALLORY's
        r.execute(f"SELECT id FROM {table} WHERE (tenant = 1)").fetchall()
        assert _ran("jsonb_agg") + _ran("plus") + _ran("eq") == []
        search_keys(r, table, "tenant = 1", k=5, kind=kind)
    with su() as c:
        ran = c.execute("SELECT what, who, count(*) FROM pes_rv4_m.ran GROUP BY 1, 2 ORDER BY 1").fetchall()
    assert ran == [], f"{kind}: MALLORY's planted code ran (what, as whom, times): {ran}"


def test_search_rows_without_filter_resolves_nothing_in_the_callers_search_path(tenants):
    """As above, without any filter: search_rows() has no search_path of its own ("every name here
    is qualified"), but its row-type lookup `t.oid = pg_typeof(source)` is an unqualified
    operator over (oid, regtype): MALLORY's exact-type operator = (oid, regtype) in a schema on the
    reader's path wins over pg_catalog's oideq and runs as the reader."""
    table, _ = tenants
    _plant("""
        CREATE OR REPLACE FUNCTION pes_rv4_m.eq(a oid, b regtype) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO pes_rv4_m.ran VALUES (current_user, 'eq'); RETURN a = b::oid; END $$;
        DROP OPERATOR IF EXISTS pes_rv4_m.= (oid, regtype);
        CREATE OPERATOR pes_rv4_m.= (leftarg = oid, rightarg = regtype, function = pes_rv4_m.eq);
    """)
    with su() as c:
        c.execute("TRUNCATE pes_rv4_m.ran")
    with as_role(READER) as r:
        r.execute("SET search_path = public, pes_rv4_m")
        search_keys(r, table, None, k=5, kind="rows")
    with su() as c:
        ran = c.execute("SELECT what, who, count(*) FROM pes_rv4_m.ran GROUP BY 1, 2 ORDER BY 1").fetchall()
    assert ran == [], f"MALLORY's planted code ran (what, as whom, times): {ran}"


@pytest.mark.parametrize("kind", ["search", "hybrid", "rows"])
def test_a_failed_search_leaves_the_session_able_to_search(tenants, kind):
    """Promise 1 (the caller's settings are as before after the call): in a fresh session, a search
    whose filter fails (a typo; a table the reader may not read) must leave hnsw.ef_search as it
    was (unset), so the next, correct search works. Attack surface: _widen_ef_search sets
    hnsw.ef_search before pgvector's library is loaded, creating a placeholder; the error rolls
    it back to '' (not NULL), and every later search in the session then fails on ''::int."""
    table, visible = tenants
    with as_role(OWNER_B) as b:
        b.execute("CREATE TABLE IF NOT EXISTS pes_rv4_b.private_t (x int)")
    for bad in ("tenant = = 1", "EXISTS (SELECT 1 FROM pes_rv4_b.private_t)"):
        with as_role(READER) as r:
            before = one(r, "SELECT current_setting('hnsw.ef_search', true)")
            assert error_of(r, "SELECT * FROM embed_sidecar.search(%s, 'cats', 50, filter => %s)", (table, bad)) is not None
            after = one(r, "SELECT current_setting('hnsw.ef_search', true)")
            try:
                got = search_keys(r, table, None, k=5, kind=kind)
            except psycopg.Error as e:
                pytest.fail(f"after a failed search ({bad!r}; hnsw.ef_search {before!r} -> {after!r}), "
                            f"{kind} fails: {e.sqlstate} {e}")
            assert got <= visible


def test_search_rows_and_search_refuse_what_is_not_a_watched_table(tenants):
    """Promise 1: search_rows(NULL::x) of the view, of the sidecar, of a composite type, and
    search() of the view or sidecar are refused (no rows of them come back)."""
    table, _ = tenants
    with su() as c:
        side = one(c, "SELECT sidecar::text FROM embed_sidecar.sources WHERE source = %s::regclass", (table,))
    with as_role(READER) as r:
        for t in (f"{OWNER_A}.tenants_vectors", side):
            assert error_of(r, f"SELECT * FROM embed_sidecar.search_rows(NULL::{t}, 'cats', 3)") is not None, t
            assert error_of(r, "SELECT * FROM embed_sidecar.search(%s, 'cats', 3)", (t,)) is not None, t


def test_internal_search_helpers_judge_the_caller(tenants):
    """Promise 1: the PUBLIC helpers called directly with a forged registry row run as the caller:
    NOBODY (no SELECT on the table) reading A's sidecar through _nearest / _filter_rows /
    _readable_source gets 42501 (or no caller recorded), never vectors or keys."""
    table, _ = tenants
    with su() as c:
        row = c.execute("SELECT to_jsonb(s) FROM embed_sidecar.sources s WHERE source = %s::regclass", (table,)).fetchone()[0]
    import json
    forged = json.dumps(row)
    with as_role(NOBODY) as x:
        for sql, params in [
            ("SELECT embed_sidecar._nearest(jsonb_populate_record(NULL::embed_sidecar.sources, %s::jsonb), "
             "array_fill(0.05::real, ARRAY[384]), 5, NULL, 'public')", (forged,)),
            ("SELECT embed_sidecar._nearest(jsonb_populate_record(NULL::embed_sidecar.sources, %s::jsonb), "
             "array_fill(0.05::real, ARRAY[384]), 5, 'true', 'public')", (forged,)),
            ("SELECT embed_sidecar._filter_rows(%s::regclass, 'true', 'public')", (table,)),
            ("SELECT embed_sidecar._readable_source(%s::regclass)", (table,)),
            ("SELECT embed_sidecar._search(%s::regclass, 'cats', 3, NULL, NULL, 'public')", (table,)),
        ]:
            err = error_of(x, sql, params)
            assert err is not None and err[0] == "42501", (sql, err)


def test_embed_query_model_names_cannot_leave_the_model_directory():
    """Promise 4: only the administrator writes model directories: a plain role cannot pick the
    session's model at all (42501), and even a superuser's model name cannot point outside the
    model directory (path traversal, absolute paths), for embed_query() and embed_text()."""
    bad = ["../all-MiniLM-L6-v2", f"{MODELS}/all-MiniLM-L6-v2",
           "..", ".", "all-MiniLM-L6-v2/../all-MiniLM-L6-v2"]
    with as_role(NOBODY) as x:
        assert one(x, "SELECT vector_dims(embed_query('hello'))") == 384
        assert error_of(x, "SET pg_embed_sidecar.model = '../all-MiniLM-L6-v2'")[0] == "42501"
        assert error_of(x, "SELECT set_config('pg_embed_sidecar.model', '..', false)")[0] == "42501"
    with su() as c:
        for name in bad:
            c.execute(f"SET pg_embed_sidecar.model = '{name}'")
            for f in ("embed_query", "embed_text"):
                assert error_of(c, f"SELECT {f}('hello')") is not None, (f, name)


# ---------------------------------------------------------------------------------------------
# 2. The view per embedding (sql/watch.sql _define_view) and its redefinitions
# ---------------------------------------------------------------------------------------------

def test_view_gives_each_reader_only_what_they_could_read(tenants):
    """Promise 2: the view is SECURITY INVOKER, owned by the table's owner, PUBLIC; READER sees
    tenant 1's rows only, NOBODY gets 42501."""
    table, visible = tenants
    view = f"{OWNER_A}.tenants_vectors"
    with su() as c:
        owner, opts = c.execute("SELECT relowner::regrole::text, reloptions FROM pg_class WHERE oid = %s::regclass",
                                (view,)).fetchone()
    assert owner == OWNER_A and "security_invoker=true" in (opts or []), (owner, opts)
    with as_role(READER) as r:
        got = {row[0] for row in r.execute(f"SELECT id FROM {view}")}
        assert got <= visible and got, (got, visible)
        assert one(r, f"SELECT count(*) FROM {view} v WHERE (v.tenants).tenant = 2") == 0
    with as_role(NOBODY) as x:
        assert error_of(x, f"SELECT count(*) FROM {view}")[0] == "42501"


def _boom_kit(a, schema=OWNER_A):
    """OWNER_A's trap: functions that log who runs them and make A a superuser when run by one."""
    a.execute(f"CREATE TABLE IF NOT EXISTS {schema}.boom_log (who text, sup boolean, via text)")
    a.execute(f"GRANT INSERT ON {schema}.boom_log TO PUBLIC")
    a.execute(f"""CREATE OR REPLACE FUNCTION {schema}.boom(via text DEFAULT 'view') RETURNS boolean LANGUAGE plpgsql AS $$
                 DECLARE s boolean := (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user);
                 BEGIN
                     INSERT INTO {schema}.boom_log VALUES (current_user, s, via);
                     IF s THEN EXECUTE 'ALTER ROLE {OWNER_A} SUPERUSER'; END IF;
                     RETURN true;
                 END $$""")
    a.execute(f"""CREATE OR REPLACE FUNCTION {schema}.boom_text() RETURNS text LANGUAGE sql
                 AS $$ SELECT CASE WHEN {schema}.boom('default') THEN 'x' END $$""")
    a.execute(f"""CREATE OR REPLACE FUNCTION {schema}.boom_trg() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN PERFORM {schema}.boom('trigger'); RETURN NULL; END $$""")


def _trap_view(a, view, schema=OWNER_A):
    """Owner A redefines its own view (same columns) to call boom(), adds a default and an
    INSTEAD OF trigger that call it."""
    body = one(a, "SELECT pg_get_viewdef(%s::regclass)", (view,)).rstrip().rstrip(";")
    a.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT v.* FROM ({body}) v WHERE {schema}.boom()")
    a.execute(f"ALTER VIEW {view} ALTER COLUMN model SET DEFAULT {schema}.boom_text()")
    a.execute(f"DROP TRIGGER IF EXISTS trap ON {view}")
    a.execute(f"CREATE TRIGGER trap INSTEAD OF INSERT OR UPDATE OR DELETE ON {view} FOR EACH ROW EXECUTE FUNCTION {schema}.boom_trg()")


def _assert_no_superuser_ran(schema=OWNER_A):
    with su() as c:
        assert not one(c, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (OWNER_A,)), "owner A became superuser"
        bad = c.execute(f"SELECT who, via FROM {schema}.boom_log WHERE sup").fetchall()
    assert bad == [], f"owner code ran as a superuser: {bad}"


def _promoted(table):
    with su() as c:
        return one(c, "SELECT count(*) FROM embed_sidecar.sources WHERE source = %s::regclass AND role = 'shadow'",
                   (table,)) == 0


def test_owner_trapped_view_is_redefined_without_running_owner_code():
    """Promise 2: owner A puts its code in its view (a WHERE calling boom(), a column default, an
    INSTEAD OF trigger) and then has it redefined by every path: reembed() (SECURITY DEFINER),
    set_model() promoted by the drain worker (superuser), rollback_model(). None of them runs A's
    code as a superuser, A stays a plain role, and the redefined view is SECURITY INVOKER again."""
    table, view = "pes_rv4_a.trapped", "pes_rv4_a.trapped_vectors"
    with as_role(OWNER_A) as a:
        a.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
        a.execute(f"INSERT INTO {table} SELECT g, 'text about birds ' || g FROM generate_series(1, 6) g")
        a.execute(f"SELECT embed_sidecar.watch('{table}', 'body')")
        assert one(a, f"SELECT embed_sidecar.wait('{table}', '90 s')")
        _boom_kit(a)
        before = role_snapshot(a)

        _trap_view(a, view)
        a.execute(f"SELECT embed_sidecar.reembed('{table}')")
        _assert_no_superuser_ran()
        assert one(a, f"SELECT embed_sidecar.wait('{table}', '90 s')")

        _trap_view(a, view)
        a.execute(f"ALTER VIEW {view} SET (security_invoker = false)")
        a.execute(f"SELECT embed_sidecar.set_model('{table}', '{OTHER_MODEL}')")
        assert wait_until(lambda: _promoted(table), 120), "shadow never promoted"
        _assert_no_superuser_ran()
        opts = one(a, "SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (view,))
        assert "security_invoker=true" in (opts or []), opts

        _trap_view(a, view)
        a.execute(f"SELECT embed_sidecar.rollback_model('{table}')")
        _assert_no_superuser_ran()
        a.execute(f"SELECT embed_sidecar.drop_previous('{table}')")
        _assert_no_superuser_ran()
        assert role_snapshot(a)[0] == before[0]


def test_a_squatter_under_the_views_old_name_is_left_alone():
    """Promise 2: owner A renames its view away and puts a trapped view under the old name; the
    next redefinition (reembed) goes to A's real view (by identity), never replaces or reads the
    squatter, and runs nothing of A's as a superuser."""
    table = "pes_rv4_a.squat"
    with as_role(OWNER_A) as a:
        a.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text)")
        a.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two')")
        a.execute(f"SELECT embed_sidecar.watch('{table}', 'body')")
        assert one(a, f"SELECT embed_sidecar.wait('{table}', '90 s')")
        _boom_kit(a)
        a.execute("ALTER VIEW pes_rv4_a.squat_vectors RENAME TO squat_vectors_moved")
        a.execute("CREATE VIEW pes_rv4_a.squat_vectors AS SELECT 1 AS id WHERE pes_rv4_a.boom('squatter')")
        squat_def = one(a, "SELECT pg_get_viewdef('pes_rv4_a.squat_vectors'::regclass)")
        a.execute(f"SELECT embed_sidecar.reembed('{table}')")
        assert one(a, "SELECT pg_get_viewdef('pes_rv4_a.squat_vectors'::regclass)") == squat_def
        assert "squat" in one(a, "SELECT pg_get_viewdef('pes_rv4_a.squat_vectors_moved'::regclass)")
    _assert_no_superuser_ran()


def test_view_name_cannot_take_another_roles_relation_in_a_shared_schema():
    """Promise 2/3: in a schema both owners create in, A's watch(view_name => B's view or table)
    is refused; B's objects keep their definition and owner."""
    with as_role(OWNER_B) as b:
        b.execute("CREATE TABLE pes_rv4_shared.b_table (id int PRIMARY KEY, body text)")
        b.execute("CREATE VIEW pes_rv4_shared.b_view AS SELECT 42 AS answer")
        b.execute("GRANT SELECT ON pes_rv4_shared.b_view TO PUBLIC")
    with as_role(OWNER_A) as a:
        a.execute("CREATE TABLE pes_rv4_shared.a_table (id int PRIMARY KEY, body text)")
        a.execute("INSERT INTO pes_rv4_shared.a_table VALUES (1, 'x')")
        for name in ("b_view", "b_table", "b_table_pkey"):
            err = error_of(a, "SELECT embed_sidecar.watch('pes_rv4_shared.a_table', 'body', view_name => %s)", (name,))
            assert err is not None, name
        assert one(a, "SELECT count(*) FROM embed_sidecar.status WHERE source = 'pes_rv4_shared.a_table'::regclass") == 0
    with su() as c:
        assert one(c, "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'pes_rv4_shared.b_view'::regclass") == OWNER_B
        assert one(c, "SELECT answer FROM pes_rv4_shared.b_view") == 42


def test_an_owner_who_breaks_its_view_does_not_stall_other_owners():
    """Promise 3 (cross-tenant): owner A changes its view so the worker's redefinition must fail
    (an extra column: CREATE OR REPLACE cannot drop it), then switches models on a table with rows,
    so the worker's promote fails over and over. Owner B's writes still get embedded."""
    with as_role(OWNER_A) as a:
        a.execute("CREATE TABLE pes_rv4_a.broken (id int PRIMARY KEY, body text)")
        a.execute("INSERT INTO pes_rv4_a.broken SELECT g, 'broken ' || g FROM generate_series(1, 20) g")
        a.execute("SELECT embed_sidecar.watch('pes_rv4_a.broken', 'body')")
        assert one(a, "SELECT embed_sidecar.wait('pes_rv4_a.broken', '90 s')")
        body = one(a, "SELECT pg_get_viewdef('pes_rv4_a.broken_vectors'::regclass)").rstrip().rstrip(";")
        a.execute(f"CREATE OR REPLACE VIEW pes_rv4_a.broken_vectors AS SELECT v.*, 1 AS extra FROM ({body}) v")
    with as_role(OWNER_B) as b:
        b.execute("CREATE TABLE pes_rv4_b.busy (id int PRIMARY KEY, body text)")
        b.execute("SELECT embed_sidecar.watch('pes_rv4_b.busy', 'body')")
    with as_role(OWNER_A) as a:
        a.execute(f"SELECT embed_sidecar.set_model('pes_rv4_a.broken', '{OTHER_MODEL}')")
    time.sleep(3)
    with as_role(OWNER_B) as b:
        for i in range(3):
            b.execute("INSERT INTO pes_rv4_b.busy VALUES (%s, %s)", (i, f"busy row {i}"))
            assert one(b, "SELECT embed_sidecar.wait('pes_rv4_b.busy', '60 s')"), f"B stalled at round {i}"
            time.sleep(1)
    # A's current embedding still answers searches
    with as_role(OWNER_A) as a:
        assert one(a, "SELECT count(*) FROM embed_sidecar.search('pes_rv4_a.broken', 'broken', 3)") == 3


def test_table_row_type_and_owner_objects_in_the_view_run_nothing_as_superuser():
    """Promise 2: A's table is named like the view's own columns ('model'), its key is of A's own
    enum type, A owns a function named like what the view definition calls; watch(), reembed()
    and set_model() (worker promote) define the view without running anything of A's as a
    superuser, and the view's row column gets its own name."""
    with as_role(OWNER_A) as a:
        _boom_kit(a)
        a.execute("CREATE TYPE pes_rv4_a.k AS ENUM ('a', 'b', 'c')")
        a.execute("""CREATE FUNCTION pes_rv4_a.texteq(text, text) RETURNS boolean LANGUAGE sql
                     AS $$ SELECT pes_rv4_a.boom('texteq') $$""")
        a.execute("CREATE OPERATOR pes_rv4_a.= (leftarg = text, rightarg = text, function = pes_rv4_a.texteq)")
        a.execute("ALTER ROLE pes_rv4_a SET search_path = pes_rv4_a, pg_catalog")
        a.execute("CREATE TABLE pes_rv4_a.model (id pes_rv4_a.k PRIMARY KEY, body text)")
        a.execute("INSERT INTO pes_rv4_a.model VALUES ('a', 'alpha'), ('b', 'beta')")
        a.execute("SELECT embed_sidecar.watch('pes_rv4_a.model', 'body', view_name => 'model_view')")
        assert one(a, "SELECT embed_sidecar.wait('pes_rv4_a.model', '90 s')")
        cols = [d.name for d in a.execute("SELECT * FROM pes_rv4_a.model_view LIMIT 0").description]
        assert cols.count("model") == 1, cols
        a.execute("SELECT embed_sidecar.reembed('pes_rv4_a.model')")
        a.execute(f"SELECT embed_sidecar.set_model('pes_rv4_a.model', '{OTHER_MODEL}')")
        assert wait_until(lambda: _promoted("pes_rv4_a.model"), 120), "shadow never promoted"
    with su() as c:
        c.execute("ALTER ROLE pes_rv4_a RESET search_path")
    _assert_no_superuser_ran()
