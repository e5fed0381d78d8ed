-- Operating an embedding: dead letters (retry_failed, discard_failed), pause/resume, and
-- process(), which drains in the caller's session.
-- Each public function is a SECURITY INVOKER wrapper that records its caller
-- (embed_sidecar._enter, src/pg/authority.rs) and calls its body, embed_sidecar._do_<name>, which
-- is SECURITY DEFINER (it writes the registry and pgmq's schema) and checks first that the caller
-- may execute the public function and act as the table's owner (_check_may, _check_owner). They
-- never read or write the source or sidecar rows themselves: that is the drain's and the
-- backfill's job, done as the table's owner (src/pg/authority.rs).

-- Put dead-lettered rows of an embedding (all its versions) back on their queues. Returns how many.
-- Keys the replica trigger could not queue ({"unqueued_key": ...}, src/replica.rs) stay: no retry
-- can embed them, and dropping them would leave a row without a vector that nothing reports.
CREATE FUNCTION embed_sidecar._do_retry_failed(source regclass, embedding text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.retry_failed() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.retry_failed(regclass, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    s embed_sidecar.sources;
    keys jsonb[];
    total bigint := 0;
BEGIN
    FOR s IN SELECT * FROM embed_sidecar.sources x WHERE x.source = cur.source AND x.embedding = cur.embedding LOOP
        WITH d AS (DELETE FROM embed_sidecar.failures f
                    WHERE f.source_id = s.id
                      AND NOT (pg_catalog.jsonb_typeof(f.key) = 'object' AND f.key ? 'unqueued_key')
                    RETURNING f.key)
        SELECT array_agg(key) INTO keys FROM d;
        IF keys IS NOT NULL THEN
            PERFORM pgmq.send_batch(s.queue_name, keys);
            total := total + cardinality(keys);
        END IF;
    END LOOP;
    RETURN total;
END
$$;

-- The public retry_failed(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.retry_failed(source regclass, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_retry_failed(source, embedding);
END
$$;

-- Delete the dead letters of an embedding (all its versions) without replaying them: rows known
-- to be bad, left without a vector, which then no longer hold up a model switch. Returns how many.
CREATE FUNCTION embed_sidecar._do_discard_failed(source regclass, embedding text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.discard_failed() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.discard_failed(regclass, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    n bigint;
BEGIN
    DELETE FROM embed_sidecar.failures f USING embed_sidecar.sources x
     WHERE f.source_id = x.id AND x.source = cur.source AND x.embedding = cur.embedding;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- The public discard_failed(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.discard_failed(source regclass, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_discard_failed(source, embedding);
END
$$;

-- Paused sources keep enqueueing; only draining stops. bulk_only pauses just the bulk lane
-- (backfill, reembed, set_model): writers' changes keep being embedded, the backfill resumes where
-- it stopped. Applies to every version of the embedding (current, shadow, previous).
CREATE FUNCTION embed_sidecar._do_pause(source regclass, bulk_only boolean, embedding text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.pause() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.pause(regclass, boolean, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
BEGIN
    UPDATE embed_sidecar.sources SET state = CASE WHEN bulk_only THEN 'bulk_paused' ELSE 'paused' END
     WHERE sources.source = cur.source AND sources.embedding = cur.embedding;
END
$$;

-- The public pause(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.pause(source regclass, bulk_only boolean DEFAULT false, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    PERFORM embed_sidecar._do_pause(source, bulk_only, embedding);
END
$$;

CREATE FUNCTION embed_sidecar._do_resume(source regclass, embedding text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.resume() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.resume(regclass, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
BEGIN
    UPDATE embed_sidecar.sources SET state = 'active' WHERE sources.source = cur.source AND sources.embedding = cur.embedding;
END
$$;

-- The public resume(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.resume(source regclass, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    PERFORM embed_sidecar._do_resume(source, embedding);
END
$$;

-- Raise 'not watched' unless the table has an embedding (for functions that act on all of them).
CREATE FUNCTION embed_sidecar._check_watched(rel regclass) RETURNS void
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- whether a table is watched is no business of a role that may not read it
    IF NOT has_table_privilege(embed_sidecar._calling_role(), rel, 'SELECT')
       AND NOT pg_has_role(embed_sidecar._calling_role(), (SELECT relowner FROM pg_class WHERE oid = rel), 'USAGE') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: permission denied for table %', rel
            USING ERRCODE = 'insufficient_privilege', HINT = 'wait() and process() need SELECT on the table.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.source = rel) THEN
        PERFORM embed_sidecar._source(rel);
    END IF;
END
$$;

-- Drain queued changes in this session (no worker needed): the same code path the worker runs.
-- Returns the number of queue messages handled.
CREATE FUNCTION embed_sidecar._do_process(source regclass, max_rows int) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.process() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.process(regclass, int)');
    s embed_sidecar.sources;
    done bigint := 0;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: max_rows must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF source IS NOT NULL THEN
        -- the owner check first: whether a table is watched is no business of other roles
        PERFORM embed_sidecar._check_owner(source);
        PERFORM embed_sidecar._check_watched(source);
    END IF;
    FOR s IN SELECT * FROM embed_sidecar.sources x
              WHERE (_do_process.source IS NULL OR x.source = _do_process.source) ORDER BY x.id LOOP
        CONTINUE WHEN _do_process.source IS NULL
                  AND NOT pg_has_role(embed_sidecar._calling_role(), (SELECT relowner FROM pg_class WHERE oid = s.source), 'USAGE');
        PERFORM embed_sidecar._check_owner(s.source);
        done := done + embed_sidecar._process(s.id, max_rows - done::int);
        EXIT WHEN done >= max_rows;
    END LOOP;
    RETURN done;
END
$$;

-- The public process(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.process(source regclass DEFAULT NULL, max_rows int DEFAULT 1000) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_process(source, max_rows);
END
$$;
