-- The statement-level triggers on a watched table. They run with the writer's own rights (not
-- SECURITY DEFINER): whatever the table's owner planted in a key's type (a cast to json, say)
-- runs as the writer, exactly as the owner's own triggers would. The one privileged step,
-- putting keys on the queue, is embed_sidecar._enqueue (src/enqueue.rs), which checks that the
-- writer may write the table. With watch(..., sync => true) a small change is then also embedded
-- inside the writer's transaction when the inference service has room (_enqueue says when), by
-- embed_sidecar._embed_now (src/drain/sync.rs), in a subtransaction: any error there rolls back
-- only that step, and the queued keys get the rows embedded later.
--
-- Arguments, fixed by watch(): source id, content attnum ('' with a template), key attnums
-- ('{1,2}'), template ('' without).
-- One embed_sidecar._enqueue call per statement, carrying keys only. An UPDATE enqueues only rows
-- whose content is distinct from before (a row whose key changed has no OLD partner and counts
-- as changed); a DELETE, all of its rows.
-- The keys' text form must not depend on the writer's session: floats are printed exactly
-- (extra_float_digits >= 1) and intervals in the form interval_in reads back without doubt.
CREATE FUNCTION embed_sidecar._enqueue_changes() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET extra_float_digits = 1 SET IntervalStyle = 'postgres'
AS $$
DECLARE
    key_nums smallint[] := TG_ARGV[2]::smallint[];
    keys text := embed_sidecar._key_elements(TG_RELID, key_nums, 'n');
    attnum smallint := nullif(TG_ARGV[1], '')::smallint;
    template text := nullif(TG_ARGV[3], '');
    content_new text := embed_sidecar._content_sql(TG_RELID, attnum, template, 'n');
    batch text[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE format('SELECT array_agg(jsonb_build_array(%s)::text) FROM new_rows n WHERE NOT embed_sidecar._is_blank(%s)',
                       keys, content_new)
           INTO batch;
    ELSIF TG_OP = 'DELETE' THEN
        -- (only beside a sidecar without a foreign key, replica.sql: the drain removes the vectors)
        EXECUTE format('SELECT array_agg(jsonb_build_array(%s)::text) FROM old_rows n', keys) INTO batch;
    ELSE
        EXECUTE format('SELECT array_agg(jsonb_build_array(%s)::text) FROM new_rows n LEFT JOIN old_rows o ON %s
                         WHERE %s IS DISTINCT FROM %s',
                       keys, embed_sidecar._key_join(TG_RELID, key_nums, 'o', 'n'),
                       embed_sidecar._content_sql(TG_RELID, attnum, template, 'o'), content_new)
           INTO batch;
    END IF;
    IF batch IS NOT NULL AND embed_sidecar._enqueue(TG_ARGV[0]::int, batch) THEN
        BEGIN
            PERFORM embed_sidecar._embed_now(TG_ARGV[0]::int, batch);
        EXCEPTION WHEN OTHERS THEN
            -- never a failed write because of inference: the keys are queued already. OTHERS does
            -- not include query_canceled: a cancel or statement_timeout while the step waits for
            -- the service still cancels the writer's statement, as it would any other wait.
            RAISE DEBUG 'pg_embed_sidecar: % left to the queue: % (%)', TG_RELID::regclass, SQLERRM, SQLSTATE;
        END;
    END IF;
    RETURN NULL;
END
$$;

-- The SELECT that lists a source's keys for a backfill (run by embed_sidecar._backfill as the
-- table's owner): $1 only rows whose stored hash or model is not current, $2 current model_id.
CREATE FUNCTION embed_sidecar._backfill_sql(s embed_sidecar.sources) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT format(
        'SELECT jsonb_build_array(%s)::text
           FROM %s src LEFT JOIN %s sc ON %s%s
          WHERE NOT embed_sidecar._is_blank(%s)
            AND (NOT $1 OR sc.content_hash IS DISTINCT FROM embed_sidecar._content_hash(%s)
                        OR sc.model IS DISTINCT FROM $2)',
        embed_sidecar._key_elements(s.source, s.key_attnums, 'src'), s.source, s.sidecar,
        embed_sidecar._side_join(s, 'sc', 'src'), embed_sidecar._row_filter(s, 'sc'),
        embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src'),
        embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src'));
END;

-- The check _enqueue runs on a writer's keys (src/enqueue.rs): $1 keys text[] → how many are not
-- the JSON array of one key of the table, of at most max_bytes. Each element is cast to its
-- column's type, so a key the drain could not look up never reaches the queue.
CREATE FUNCTION embed_sidecar._keys_check_sql(s embed_sidecar.sources, max_bytes int) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT format(
        'SELECT count(*) FROM unnest($1::text[]) AS u(t) CROSS JOIN LATERAL (SELECT u.t::jsonb AS j) v
          WHERE CASE WHEN u.t IS NULL OR octet_length(u.t) > %s THEN true
                     WHEN jsonb_typeof(v.j) <> ''array'' THEN true
                     WHEN jsonb_array_length(v.j) <> %s THEN true
                     ELSE num_nulls(%s) > 0 END',
        max_bytes, cardinality(s.key_attnums),
        string_agg(format('(v.j->>%s)::%s', k.ord - 1, pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord))
      FROM unnest(s.key_attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = s.source AND a.attnum = k.attnum;
END;

-- Run a _keys_check_sql statement as the caller: NULL when every key is valid, else why not.
-- DateStyle and IntervalStyle are the drain's (_lookup, _write): a key valid here is read the same
-- way there, whatever the writer's session set.
CREATE FUNCTION embed_sidecar._invalid_keys(check_sql text, keys text[]) RETURNS text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres'
AS $$
DECLARE
    bad bigint;
BEGIN
    EXECUTE check_sql INTO bad USING keys;
    RETURN CASE WHEN bad > 0 THEN format('%s of %s keys are not the JSON array of a key of the table', bad, cardinality(keys)) END;
EXCEPTION WHEN OTHERS THEN
    RETURN SQLERRM;
END
$$;
