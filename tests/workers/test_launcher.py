"""The launcher: one per instance; CREATE EXTENSION in any database starts a drain worker
there within seconds (no configuration, no restart), DROP EXTENSION and DROP DATABASE stop it,
a worker or launcher that dies comes back without duplicates, a database can opt out, and a full
max_worker_processes is reported in the log and in status."""
import os
import re
import subprocess
import tempfile
import time

import pytest

from conftest import PG_BIN, connect, one

DB = "pes_launch"


def workers(conn, db):
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar worker' AND datname = %s", (db,))]


def eventually(check, what, timeout=30):
    """Poll until check() is truthy (a functional wait, not a timing claim)."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def admin():
    """A connection to database postgres; database pes_launch is fresh, and it and its renamed
    or copied variants are dropped afterwards."""
    conn = connect(dbname="postgres")
    conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    conn.execute(f"CREATE DATABASE {DB}")
    yield conn
    for db in (DB, f"{DB}_renamed", f"{DB}_copy"):
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    conn.close()


def create_extension(admin):
    """CREATE EXTENSION in pes_launch; returns the pid of the worker that starts for it."""
    with connect(dbname=DB) as c:
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
    pids = eventually(lambda: workers(admin, DB), "no worker after CREATE EXTENSION")
    assert len(pids) == 1
    return pids[0]


def test_create_extension_starts_a_worker_and_drop_database_stops_it(admin):
    assert workers(admin, DB) == []
    create_extension(admin)
    c = connect(dbname=DB)
    # it drains: a watched table's rows get their vectors with nobody calling process()
    c.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    c.execute("INSERT INTO docs SELECT i, 'launcher row ' || i FROM generate_series(1, 20) i")
    c.execute("SELECT embed_sidecar.watch('docs', 'body')")
    c.execute("INSERT INTO docs VALUES (21, 'a change made after watch')")
    assert one(c, "SELECT embed_sidecar.wait('docs', '60 s')")
    assert one(c, "SELECT count(*) FROM docs_embeddings") == 21
    assert one(c, "SELECT worker FROM embed_sidecar.status") == "running"
    assert one(c, "SELECT coverage FROM embed_sidecar.status") == 1

    # DROP EXTENSION: the worker leaves; CREATE EXTENSION again: a worker comes back
    c.execute("DROP EXTENSION pg_embed_sidecar CASCADE")
    eventually(lambda: workers(admin, DB) == [], "worker still running after DROP EXTENSION")
    c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
    eventually(lambda: workers(admin, DB), "no worker after CREATE EXTENSION again")
    c.close()

    # DROP DATABASE without FORCE succeeds although a worker is connected, and nothing restarts
    admin.execute(f"DROP DATABASE {DB}")
    assert one(admin, "SELECT count(*) FROM pg_database WHERE datname = %s", (DB,)) == 0
    time.sleep(6)  # longer than the launcher's restart delay
    assert workers(admin, DB) == []


def test_commands_that_need_the_database_alone_work_and_the_worker_returns(admin):
    create_extension(admin)
    # a template copy and a rename both need the database to themselves
    admin.execute(f"CREATE DATABASE {DB}_copy TEMPLATE {DB}")
    admin.execute(f"ALTER DATABASE {DB} RENAME TO {DB}_renamed")
    eventually(lambda: workers(admin, f"{DB}_renamed"), "no worker after the rename")
    # the copy has the extension too: the launcher finds it on its own (no CREATE EXTENSION ran)
    eventually(lambda: workers(admin, f"{DB}_copy"), "no worker for the copied database")
    for db in (f"{DB}_renamed", f"{DB}_copy"):
        assert len(workers(admin, db)) == 1


def test_a_worker_or_launcher_that_dies_comes_back_once(admin):
    pid = create_extension(admin)
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    [pid2] = eventually(lambda: [p for p in workers(admin, DB) if p != pid], "the worker did not come back")
    launcher = one(admin, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar launcher'")
    admin.execute("SELECT pg_terminate_backend(%s)", (launcher,))
    eventually(lambda: one(admin, """SELECT pid FROM pg_stat_activity
                                      WHERE backend_type = 'pg_embed_sidecar launcher' AND pid <> %s""", (launcher,)),
               "the launcher did not come back")
    time.sleep(2)  # the new launcher has looked at every database by now
    assert workers(admin, DB) == [pid2]  # the running worker was kept, not doubled
    assert one(admin, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_embed_sidecar launcher'") == 1


def test_a_database_can_opt_out(admin):
    admin.execute(f"ALTER DATABASE {DB} SET pg_embed_sidecar.drain_worker = off")
    with connect(dbname=DB) as c:
        c.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        c.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        c.execute("INSERT INTO docs VALUES (1, 'only process() drains here')")
        c.execute("SELECT embed_sidecar.watch('docs', 'body')")
        time.sleep(2)
        assert workers(admin, DB) == []
        assert one(c, "SELECT bulk_pending FROM embed_sidecar.status") == 1
        assert one(c, "SELECT worker FROM embed_sidecar.status").startswith("not running: pg_embed_sidecar.drain_worker is off")
        assert one(c, "SELECT embed_sidecar.process('docs')") == 1
        assert one(c, "SELECT count(*) FROM docs_embeddings") == 1


def test_idle_worker_gives_its_slot_to_a_database_that_waits():
    """A throwaway cluster with max_worker_processes = 4: the logical replication launcher, ours,
    the inference worker and one drain worker. The second database with the extension gets no
    slot at first and says how long it has waited; the first database's worker, idle, gives its slot
    up, so the second database's rows are embedded without anyone dropping anything; the first
    database then waits in its turn (with ~16 databases and 16 slots, databases created later were
    never drained)."""
    port = 5435
    data = tempfile.mkdtemp(prefix="pes_slots_", dir="/var/tmp")
    as_pg = ["sudo", "-u", "postgres"]
    subprocess.run(["chown", "postgres", data], check=True)
    subprocess.run(as_pg + [f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "-A", "trust"], check=True, capture_output=True)
    with open(os.path.join(data, "postgresql.conf"), "a") as conf:
        conf.write("listen_addresses = ''\nunix_socket_directories = '/tmp'\n"
                   "shared_preload_libraries = 'pg_embed_sidecar'\nmax_worker_processes = 4\n")
    log = os.path.join(data, "server.log")
    subprocess.run(as_pg + [f"{PG_BIN}/pg_ctl", "-D", data, "-l", log, "-o", f"-p {port}", "-w", "start"],
                   check=True, capture_output=True)
    try:
        admin = connect(port=port, dbname="postgres")
        admin.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        eventually(lambda: workers(admin, "postgres"), "no worker in the first database")
        admin.execute("CREATE DATABASE second")
        second = connect(port=port, dbname="second")
        second.execute("CREATE EXTENSION pg_embed_sidecar CASCADE")
        second.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        second.execute("SELECT embed_sidecar.watch('docs', 'body')")
        state = eventually(lambda: re.match(r"waiting (\d+) s for a background worker slot",
                                            one(second, "SELECT worker FROM embed_sidecar.status")),
                           "status does not show the missing slot")
        assert int(state.group(1)) < 30
        text = open(log).read()
        assert text.count('no background worker slot free for database "second"') == 1  # once, not every retry
        # nothing is dropped: the first database's idle worker gives its slot up
        second.execute("INSERT INTO docs VALUES (1, 'embedded once an idle worker yields its slot')")
        assert one(second, "SELECT embed_sidecar.wait('docs', '60 s')") is True
        assert one(second, "SELECT count(*) FROM docs_embeddings") == 1
        assert 'worker for database "postgres" is idle; giving its slot' in open(log).read()
        # the first database waits in its turn, and says so
        eventually(lambda: one(admin, "SELECT embed_sidecar._worker_state()").startswith("waiting"),
                   "the first database does not show that it waits", timeout=60)
        second.close()
        admin.close()
    finally:
        subprocess.run(as_pg + [f"{PG_BIN}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)
        subprocess.run(["rm", "-rf", data])
