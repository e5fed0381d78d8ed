-- Monitoring: the status view (counters and queue metrics only: no scan of the source, so it costs
-- the same on a million rows as on ten), verify() (the full check, hashing every row, on demand)
-- and wait().

-- A watched table's backlog in both lanes, for callers who may read the table. SECURITY DEFINER
-- with a pinned search_path: readers may not read pgmq's tables, and pgmq.metrics() resolves names
-- through whatever search_path it is called with.
CREATE FUNCTION embed_sidecar._queue_backlog(source_id int,
    OUT pending bigint, OUT oldest_pending_age interval, OUT bulk_pending bigint)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT l.queue_length, make_interval(secs => coalesce(l.oldest_msg_age_sec, 0)), b.queue_length
      FROM embed_sidecar.sources s, pgmq.metrics(s.queue_name) l, pgmq.metrics(embed_sidecar._bulk_queue(s.queue_name)) b
     WHERE s.id = _queue_backlog.source_id
       AND has_table_privilege(embed_sidecar._session_role(), s.source, 'SELECT');
END;

-- pending / oldest_pending_age: the live lane (changes made by writers). bulk_*: the bulk lane
-- (backfills), with progress since it was last empty and an ETA from the rate so far.
-- coverage: the share of rows whose vector is current, estimated as what is neither queued nor
-- dead-lettered, against the statistics' row count (live tuples, the planner's estimate or the
-- backfill's size, whichever is largest); verify() counts exactly.
-- worker: whether this database's drain worker runs, and if not, why.
-- chunks: passages in a chunked sidecar (from the statistics, like coverage; verify() counts).
-- replication_lag: for a table a subscription copies, how far its apply worker is behind the
-- publisher (_replication_lag, replica.sql); behind: that plus oldest_pending_age, the one figure
-- to alert on (NULL while a subscribed table's initial copy runs or its apply worker is down).
-- security_barrier: the view's own filter (tables the querying role may read) runs before any
-- condition the querier adds, so a cheap function in a WHERE clause never sees other rows.
CREATE VIEW embed_sidecar.status WITH (security_barrier) AS
SELECT s.source, s.embedding, s.role, s.sidecar, s.model_id AS model, s.state, q.pending, f.failed,
       coalesce(round(1 - (q.pending + q.bulk_pending + f.failed)::numeric
                          / nullif(greatest(c.reltuples::numeric, pg_stat_get_live_tuples(s.source), s.bulk_total,
                                           q.pending + q.bulk_pending + f.failed), 0), 3),
                1.0) AS coverage,
       q.oldest_pending_age, q.bulk_pending,
       CASE WHEN s.bulk_total > 0 THEN round(greatest(s.bulk_total - q.bulk_pending, 0)::numeric / s.bulk_total, 3) END
           AS bulk_progress,
       CASE WHEN q.bulk_pending > 0 AND s.bulk_total > q.bulk_pending
            THEN (now() - s.bulk_started_at) * q.bulk_pending / (s.bulk_total - q.bulk_pending) END AS bulk_eta,
       s.last_embedded_at, s.acked, s.embedded AS vectors_written, s.dead_lettered,
       -- errors may quote a row's key or text (or what a writer put on the queue): owners only
       CASE WHEN pg_has_role(c.relowner, 'USAGE') THEN s.last_error END AS last_error, s.last_error_at,
       embed_sidecar._worker_state() AS worker,
       CASE WHEN s.chunk_tokens IS NOT NULL
            THEN greatest(pg_stat_get_live_tuples(s.sidecar), (SELECT reltuples::bigint FROM pg_class WHERE oid = s.sidecar), 0) END
           AS chunks,
       r.lag AS replication_lag,
       CASE WHEN r.subscribed THEN r.lag + q.oldest_pending_age ELSE q.oldest_pending_age END AS behind
  FROM embed_sidecar.sources s
       JOIN pg_catalog.pg_class c ON c.oid = s.source,
       LATERAL embed_sidecar._queue_backlog(s.id) q,
       LATERAL embed_sidecar._replication_lag(s.source) r,
       LATERAL (SELECT count(*) AS failed FROM embed_sidecar.failures x WHERE x.source_id = s.id) f
 WHERE has_table_privilege(s.source, 'SELECT');
COMMENT ON VIEW embed_sidecar.status IS 'One row per embedding of a watched table (and per version while a model switch runs): backlog in both lanes, coverage, bulk progress, failures, counters, last error, worker, replication lag';

-- The consistency invariant for one source, computed from the rows themselves: how many rows have
-- content, how many vectors exist, how many are missing, stale (content or model changed) or
-- orphaned. For a chunked source a row is stale unless its passages are exactly what chunking its
-- current text gives (same hashes, in order, numbered from 0, all with the current model): this
-- re-tokenises every row. chunks: rows of the sidecar (passages, for a chunked source). Runs with
-- the caller's rights (it reads both tables).
CREATE FUNCTION embed_sidecar.verify(source regclass, embedding text DEFAULT NULL,
    OUT source_rows bigint, OUT embedded_rows bigint, OUT missing bigint, OUT stale bigint, OUT orphans bigint,
    OUT chunks bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    entered boolean := embed_sidecar._enter();  -- who verifies (src/pg/authority.rs)
    s embed_sidecar.sources := embed_sidecar._readable_source(source, embedding);
    content text := embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src');
    key_join text := embed_sidecar._side_join(s, 'sc', 'src');
BEGIN
    -- the caller was needed to find the source; code of others (policies, operators) runs next
    PERFORM embed_sidecar._leave();
    IF s.chunk_tokens IS NULL THEN
        EXECUTE format(
            'SELECT count(*), count(sc.content_hash),
                    count(*) FILTER (WHERE sc.content_hash IS NULL AND NOT embed_sidecar._is_blank(%1$s)),
                    count(*) FILTER (WHERE sc.content_hash IS NOT NULL AND (embed_sidecar._is_blank(%1$s)
                                       OR sc.content_hash <> embed_sidecar._content_hash(%1$s) OR sc.model <> $1))
               FROM %2$s src LEFT JOIN %3$s sc ON %4$s',
            content, s.source, s.sidecar, key_join)
        INTO source_rows, embedded_rows, missing, stale USING s.model_id;
        chunks := embedded_rows;
    ELSE
        EXECUTE format(
            'SELECT count(*), count(*) FILTER (WHERE st.n > 0),
                    count(*) FILTER (WHERE st.n = 0 AND NOT embed_sidecar._is_blank(x.content)),
                    count(*) FILTER (WHERE st.n > 0 AND (embed_sidecar._is_blank(x.content) OR NOT st.ok OR st.last <> st.n - 1
                                       OR st.h IS DISTINCT FROM ARRAY(
                                            SELECT embed_sidecar._content_hash(p.passage)
                                              FROM embed_sidecar.chunk_text(x.content, $2, $3, $4) p ORDER BY p.chunk))),
                    coalesce(sum(st.n), 0)
               FROM %2$s src
                    CROSS JOIN LATERAL (SELECT %1$s AS content) x
                    CROSS JOIN LATERAL (
                        SELECT count(*) AS n, max(sc.chunk) AS last, array_agg(sc.chunk_hash ORDER BY sc.chunk) AS h,
                               bool_and(sc.model = $1 AND sc.content_hash = embed_sidecar._content_hash(x.content)) AS ok
                          FROM %3$s sc WHERE %4$s) st',
            content, s.source, s.sidecar, key_join)
        INTO source_rows, embedded_rows, missing, stale, chunks USING s.model_id, s.model, s.chunk_tokens, s.chunk_overlap;
    END IF;
    EXECUTE format('SELECT count(*) FROM %s sc WHERE NOT EXISTS (SELECT 1 FROM %s src WHERE %s)', s.sidecar, s.source, key_join)
    INTO orphans;
    embedded_rows := embedded_rows + orphans;
    chunks := chunks + orphans;
END
$$;
COMMENT ON FUNCTION embed_sidecar.verify(regclass, text) IS
    'Full consistency check of one watched table (hashes every row; re-chunks a chunked one): missing, stale and orphaned vectors';

-- Block until the source (or every source, if NULL) has empty queues: every change made so far
-- has been embedded, cleared or dead-lettered (see status.failed). Returns false if the timeout
-- passes first. Costs one count per queue per poll, never a scan of the source.
-- Whether both queues of a source are empty, for wait(): the first message by msg_id (an index
-- probe), not pgmq.metrics' count, which wait() polled every 20 ms and which, on a 64k-row backfill,
-- cost the waiting session 0.8 ms of CPU per row drained (bench_scale.py), taken from the drain.
CREATE FUNCTION embed_sidecar._queues_empty(source_id int) RETURNS boolean
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
    busy boolean;
BEGIN
    SELECT * INTO s FROM embed_sidecar.sources x
     WHERE x.id = source_id AND has_table_privilege(embed_sidecar._calling_role(), x.source, 'SELECT');
    IF NOT FOUND THEN
        RETURN true;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I ORDER BY msg_id LIMIT 1)
                        OR EXISTS (SELECT 1 FROM pgmq.%I ORDER BY msg_id LIMIT 1)',
                   pgmq.format_table_name(s.queue_name, 'q'),
                   pgmq.format_table_name(embed_sidecar._bulk_queue(s.queue_name), 'q'))
      INTO busy;
    RETURN NOT busy;
END
$$;

CREATE FUNCTION embed_sidecar._do_wait(source regclass, timeout interval) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.wait() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.wait(regclass, interval)');
    deadline timestamptz := clock_timestamp() + timeout;
    ids int[];
    -- polls every 20 ms at first (a test's few rows), backing off to 250 ms (a long backfill)
    nap float8 := 0.02;
BEGIN
    IF source IS NOT NULL THEN
        PERFORM embed_sidecar._check_watched(source);
    END IF;
    SELECT array_agg(x.id) INTO ids FROM embed_sidecar.sources x WHERE _do_wait.source IS NULL OR x.source = _do_wait.source;
    LOOP
        IF NOT EXISTS (SELECT 1 FROM unnest(ids) r WHERE NOT embed_sidecar._queues_empty(r)) THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(least(nap, greatest(0, extract(epoch FROM deadline - clock_timestamp()))));
        nap := least(nap * 1.25, 0.25);
    END LOOP;
END
$$;

-- The public wait(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.wait(source regclass DEFAULT NULL, timeout interval DEFAULT '60 seconds') RETURNS boolean
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_wait(source, timeout);
END
$$;
