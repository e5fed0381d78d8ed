"""Connections and process memory, for benchmarks and evaluations."""
import psycopg


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def rss_kb(pid):
    """(VmRSS, RssAnon) in KiB. VmRSS also counts the shared buffers a process has touched;
    RssAnon is the process's own memory (model, session, heap)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])
