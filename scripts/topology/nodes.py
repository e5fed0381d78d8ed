"""Extra PostgreSQL clusters on this machine, for the "Beyond one machine" topologies
(scripts/topology/replica.py, scripts/topology/shards.py) and their tests (tests/replication).

Each node is a cluster of its own (data directory, port, socket in /tmp), run as the `postgres` OS
user with the binaries of $PG_CONFIG (scripts/env.sh), so it is the same server build as the
cluster the tests use. A node is either bare (a publisher: no extension, nothing preloaded,
wal_level = logical) or an embedding node (pg_embed_sidecar preloaded, as scripts/cluster.sh
makes the main cluster)."""
import os
import subprocess
import time

import psycopg

PG_MAJOR = os.environ.get("PG_MAJOR", "15")


def bindir():
    config = os.environ.get("PG_CONFIG", f"/usr/lib/postgresql/{PG_MAJOR}/bin/pg_config")
    out = subprocess.run([config, "--bindir"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else os.path.dirname(config)


def as_postgres(*args, check=True):
    return subprocess.run(["sudo", "-u", "postgres", "nice", "-n", "19", *args], check=check, capture_output=True, text=True)


class Node:
    """One cluster: `Node(port, data).create(preload=...)`, `.start()`, `.connect()`, `.stop()`."""

    def __init__(self, port, data, name=None):
        self.port, self.data, self.name = port, data, name or f"node{port}"

    def create(self, preload, conf=""):
        """initdb (a data directory left from an earlier run is removed first) and settings."""
        self.stop()
        subprocess.run(["sudo", "rm", "-rf", self.data], check=True)
        subprocess.run(["sudo", "install", "-d", "-o", "postgres", "-m", "700", self.data], check=True)
        as_postgres(f"{bindir()}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8")
        settings = ("listen_addresses = ''\nunix_socket_directories = '/tmp'\nwal_level = logical\n"
                    "max_wal_senders = 20\nmax_replication_slots = 20\nmax_worker_processes = 16\n"
                    "max_logical_replication_workers = 8\nshared_buffers = 128MB\n")
        if preload:
            settings += "shared_preload_libraries = 'pg_embed_sidecar'\npg_embed_sidecar.intra_threads = 1\n"
        subprocess.run(["sudo", "-u", "postgres", "tee", "-a", f"{self.data}/postgresql.conf"],
                       input=settings + conf, text=True, check=True, capture_output=True)
        return self

    def start(self):
        as_postgres(f"{bindir()}/pg_ctl", "-D", self.data, "-l", f"{self.data}/server.log", "-o", f"-p {self.port}", "-w", "start")
        return self

    def stop(self, mode="fast"):
        if os.path.exists(self.data) or subprocess.run(["sudo", "test", "-d", self.data]).returncode == 0:
            as_postgres(f"{bindir()}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def destroy(self):
        self.stop("immediate")
        subprocess.run(["sudo", "rm", "-rf", self.data], check=True)

    def connect(self, dbname="postgres"):
        return psycopg.connect(host="/tmp", port=self.port, user="postgres", dbname=dbname, autocommit=True)

    def dsn(self, dbname="postgres"):
        return f"host=/tmp port={self.port} user=postgres dbname={dbname}"


def eventually(check, what, timeout=120, every=0.2):
    """The value of check() once it is truthy; fails with `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"{what} (after {timeout} s)")
        time.sleep(every)


def table_digest(conn, table, key="id", content="body"):
    """(rows, md5 over every key and text): equal on two nodes when they hold the same rows."""
    return conn.execute(f"""SELECT count(*), md5(coalesce(string_agg({key}::text || ':' || coalesce({content}, '<null>'), ','
                                                                     ORDER BY {key}), ''))
                              FROM {table}""").fetchone()
