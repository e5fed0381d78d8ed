-- The drain's SQL half (the pass itself is src/drain/mod.rs). Queue and registry statements run as
-- the worker (or process()'s definer); the statements below touch the source and sidecar rows and
-- run as the source table's owner inside a security-restricted operation (src/pg/authority.rs), so
-- whatever that owner attached to either table (triggers, index expressions, CHECKs, domain
-- checks, defaults, policies) runs with the owner's rights and nobody else's.

-- The statements for one source, built once per pass. The unnested key is called _pes_key
-- because _key_from_json refers to it unqualified and a source may well have a column "key".
--   lookup: $1 keys jsonb[], $2 current model_id → key, blank, unchanged, content, hash, known
--           (chunked: hashes, in hex, of the passages the row has vectors for with that model)
--   upsert: $1 keys jsonb[], $2 content hashes bytea[], $3 vectors real[] (flattened), $4 dims,
--           $5 model_id, $6 text search config, $7 (chunked) passages per key as jsonb
--           [[char_start, char_end, vector], ...], vector a 1-based index into $3 or 0 for "keep
--           the row's vector of the same passage" → rows written
--   trim:   (chunked) same parameters: a row's passages past its new last one go
--   clear:  $1 keys jsonb[] whose content turned blank, or whose row is gone
CREATE FUNCTION embed_sidecar._drain_sql(s embed_sidecar.sources,
    OUT lookup_sql text, OUT upsert_sql text, OUT clear_sql text, OUT trim_sql text)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    content text := embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src');
    -- the sidecar's vector type, schema-qualified: vectors arrive as real[] and are cast to it
    vec_type text := format('%I.%I', embed_sidecar._vector_schema(), s.vector_type);
    key_src text := embed_sidecar._key_from_json(s.source, s.key_attnums, 'src', '_pes_key');
    src_cols text := embed_sidecar._columns(s.source, s.key_attnums, 'src');
    key_cols text;
BEGIN
    -- the sidecar's own key column names (the source's may have been renamed since), for the
    -- INSERT column list and ON CONFLICT
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO key_cols
      FROM pg_attribute a WHERE a.attrelid = s.sidecar AND a.attnum = ANY (embed_sidecar._sidecar_keys(s));
    lookup_sql := format(
        'SELECT v._pes_key::text, embed_sidecar._is_blank(%1$s) AS blank,
                coalesce(sc.content_hash = embed_sidecar._content_hash(%1$s) AND sc.model = $2, false) AS unchanged,
                %1$s AS content, embed_sidecar._content_hash(%1$s) AS hash, %6$s AS known
           FROM unnest($1::jsonb[]) AS v(_pes_key)
                LEFT JOIN %2$s src ON %3$s
                LEFT JOIN %4$s sc ON %5$s%7$s',
        content, s.source, key_src, s.sidecar, embed_sidecar._side_join(s, 'sc', 'src'),
        CASE WHEN s.chunk_tokens IS NULL THEN 'NULL::text[]'
             ELSE format('ARRAY(SELECT encode(k.chunk_hash, ''hex'') FROM %s k WHERE %s AND k.model = $2)',
                         s.sidecar, embed_sidecar._side_join(s, 'k', 'src')) END,
        embed_sidecar._row_filter(s, 'sc'));
    -- Locks are taken in the key's own order (not the JSON text's, where [10] sorts before [9]),
    -- the order in which a multi-row DELETE or UPDATE by key locks the same rows.
    IF s.chunk_tokens IS NULL THEN
        upsert_sql := format(
            'WITH w AS (
               INSERT INTO %1$s AS sc (%2$s, embedding, model, content_hash, fts, embedded_at)
               SELECT %3$s, ($3[((v.ord - 1) * $4 + 1):(v.ord * $4)])::%4$s, $5, v.hash,
                      to_tsvector($6::regconfig, left(%5$s, 100000)), pg_catalog.now()
                 FROM unnest($1::jsonb[], $2::bytea[]) WITH ORDINALITY AS v(_pes_key, hash, ord)
                 JOIN %6$s src ON %7$s
                WHERE embed_sidecar._content_hash(%5$s) = v.hash
                ORDER BY %3$s
                  -- a row deleted (or re-written) by a concurrent transaction is skipped, not an
                  -- FK error: the lock waits for it, then re-checks the row and the hash
                  FOR KEY SHARE OF src
               ON CONFLICT (%2$s) DO UPDATE
                  SET embedding = EXCLUDED.embedding, model = EXCLUDED.model, content_hash = EXCLUDED.content_hash,
                      fts = EXCLUDED.fts, embedded_at = EXCLUDED.embedded_at
               RETURNING 1)
             SELECT count(*) FROM w',
            s.sidecar, key_cols, src_cols, vec_type, content, s.source, key_src);
    ELSE
        -- A passage the row already has a vector for (same text, same model) keeps that vector and
        -- the time it was made, whatever its position now. If it is gone meanwhile (another drain
        -- rewrote the row) the vector is NULL, the NOT NULL constraint fails the row, and it is
        -- retried: never a passage without its vector.
        upsert_sql := format(
            'WITH w AS (
               INSERT INTO %1$s AS sc (%2$s, chunk, char_start, char_end, chunk_hash, embedding, model, content_hash,
                                       fts, embedded_at)
               SELECT %3$s, c.n - 1, c.s, c.e, embed_sidecar._content_hash(c.txt),
                      CASE WHEN c.vi > 0 THEN ($3[((c.vi - 1) * $4 + 1):(c.vi * $4)])::%4$s ELSE o.embedding END,
                      $5, v.hash, to_tsvector($6::regconfig, c.txt), coalesce(o.embedded_at, pg_catalog.now())
                 FROM unnest($1::jsonb[], $2::bytea[], $7::jsonb[]) AS v(_pes_key, hash, chunks)
                 JOIN %6$s src ON %7$s
                 CROSS JOIN LATERAL (
                      SELECT (x->>0)::int AS s, (x->>1)::int AS e, (x->>2)::int AS vi, j.n,
                             substr(%5$s, (x->>0)::int + 1, (x->>1)::int - (x->>0)::int) AS txt
                        FROM jsonb_array_elements(v.chunks) WITH ORDINALITY AS j(x, n)) c
                 LEFT JOIN LATERAL (
                      SELECT o.embedding, o.embedded_at FROM %1$s o
                       WHERE c.vi = 0 AND %8$s AND o.model = $5 AND o.chunk_hash = embed_sidecar._content_hash(c.txt)
                       LIMIT 1) o ON true
                WHERE embed_sidecar._content_hash(%5$s) = v.hash
                ORDER BY %3$s, c.n
                  FOR KEY SHARE OF src
               ON CONFLICT (%2$s, chunk) DO UPDATE
                  SET char_start = EXCLUDED.char_start, char_end = EXCLUDED.char_end, chunk_hash = EXCLUDED.chunk_hash,
                      embedding = EXCLUDED.embedding, model = EXCLUDED.model, content_hash = EXCLUDED.content_hash,
                      fts = EXCLUDED.fts, embedded_at = EXCLUDED.embedded_at
               RETURNING 1)
             SELECT count(*) FROM w',
            s.sidecar, key_cols, src_cols, vec_type, content, s.source, key_src,
            embed_sidecar._side_join(s, 'o', 'src'));
        trim_sql := format(
            'DELETE FROM %1$s sc USING unnest($1::jsonb[], $2::bytea[], $7::jsonb[]) AS v(_pes_key, hash, chunks), %2$s src
              WHERE %3$s AND %4$s AND sc.chunk >= jsonb_array_length(v.chunks)
                AND embed_sidecar._content_hash(%5$s) = v.hash',
            s.sidecar, s.source, key_src, embed_sidecar._side_join(s, 'sc', 'src'), content);
    END IF;
    -- a row that is gone loses its vector here too: the foreign key's cascade does that for local
    -- deletes, but not for a sidecar without one, nor under session_replication_role = replica
    -- (sql/replica.sql)
    clear_sql := format(
        'DELETE FROM %1$s sc USING unnest($1::jsonb[]) AS v(_pes_key)
          WHERE %3$s AND NOT EXISTS (SELECT FROM %2$s src WHERE %4$s AND NOT embed_sidecar._is_blank(%5$s))',
        s.sidecar, s.source, embed_sidecar._key_from_json(s.sidecar, embed_sidecar._sidecar_keys(s), 'sc', '_pes_key'),
        embed_sidecar._side_join(s, 'sc', 'src'), content);
END
$$;

CREATE TYPE embed_sidecar._looked_up AS (key text, blank boolean, unchanged boolean, content text, hash bytea, known text[], error text);

-- Run the lookup for all keys at once; if that fails (a policy or domain check that raises for
-- some row), once per key, so a bad row is reported on its own and the rows around it proceed.
-- (keys are cast from their JSON text with fixed date and interval styles, as _invalid_keys checked them)
CREATE FUNCTION embed_sidecar._lookup(lookup_sql text, keys jsonb[], model_id text) RETURNS SETOF embed_sidecar._looked_up
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres'
AS $$
DECLARE
    wrapped text := format('SELECT array_agg(ROW(l.*, NULL)::embed_sidecar._looked_up) FROM (%s) l', lookup_sql);
    found embed_sidecar._looked_up[];
    i int;
BEGIN
    BEGIN
        EXECUTE wrapped INTO found USING keys, model_id;
        RETURN QUERY SELECT * FROM unnest(found);
        RETURN;
    EXCEPTION WHEN OTHERS THEN
        NULL;  -- fall through to one key at a time
    END;
    FOR i IN 1 .. cardinality(keys) LOOP
        BEGIN
            EXECUTE wrapped INTO found USING keys[i:i], model_id;
            RETURN QUERY SELECT * FROM unnest(found);
        EXCEPTION WHEN OTHERS THEN
            RETURN QUERY SELECT keys[i]::text, false, false, NULL::text, NULL::bytea, NULL::text[], SQLERRM;
        END;
    END LOOP;
END
$$;

-- Write vectors and clear blanks; a batch that fails is retried one row at a time, each in its own
-- subtransaction, so only the failing rows are reported (failed_keys/failed_errors). A chunked
-- source (chunks not NULL) also drops each written row's passages past its new last one; its
-- passages index into the whole vectors array, so a retried row gets all of it.
-- A row another session holds locked is not the row's fault: it goes to busy_keys, to be tried
-- again without counting an attempt (src/drain/settle.rs). With busy_sql (the worker: _busy_sql)
-- such rows are found without waiting and left out, so the worker never waits for a writer's row
-- while it holds the source's registry row and tables (an owner who locked rows and then altered
-- the table would deadlock with it); without (process(), in its caller's transaction) the write
-- waits for them as any statement would, and a row that still times out alone is busy.
CREATE FUNCTION embed_sidecar._write(upsert_sql text, clear_sql text, keys jsonb[], hashes bytea[], vectors real[],
                                     dims int, model_id text, fts text, clear_keys jsonb[],
                                     trim_sql text, chunks jsonb[], busy_sql text,
                                     OUT written bigint, OUT failed_keys jsonb[], OUT failed_errors text[],
                                     OUT busy_keys jsonb[])
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres'
AS $$
DECLARE
    n int := coalesce(cardinality(keys), 0);
    w bigint;
    rest_keys jsonb[] := '{}';
    rest_hashes bytea[] := '{}';
    rest_vectors real[] := '{}';
    rest_chunks jsonb[] := '{}';
BEGIN
    written := 0;
    failed_keys := '{}';
    failed_errors := '{}';
    busy_keys := '{}';
    IF coalesce(cardinality(clear_keys), 0) > 0 THEN
        BEGIN
            EXECUTE clear_sql USING clear_keys;
        EXCEPTION WHEN OTHERS THEN
            failed_keys := clear_keys;
            failed_errors := array_fill(SQLERRM, ARRAY[cardinality(clear_keys)]);
        END;
    END IF;
    IF n > 0 AND busy_sql IS NOT NULL THEN
        -- locks the other rows FOR KEY SHARE (the upsert's own lock, taken first here)
        EXECUTE busy_sql INTO busy_keys USING keys;
        IF cardinality(busy_keys) > 0 THEN
            FOR i IN 1 .. n LOOP
                CONTINUE WHEN keys[i] = ANY (busy_keys);
                rest_keys := rest_keys || keys[i];
                rest_hashes := rest_hashes || hashes[i];
                IF chunks IS NULL THEN
                    rest_vectors := rest_vectors || vectors[(i - 1) * dims + 1 : i * dims];
                ELSE
                    rest_chunks := rest_chunks || chunks[i];
                END IF;
            END LOOP;
            keys := rest_keys;
            hashes := rest_hashes;
            IF chunks IS NULL THEN
                vectors := rest_vectors;
            ELSE
                chunks := rest_chunks;
            END IF;
            n := cardinality(keys);
        END IF;
    END IF;
    IF n = 0 THEN
        RETURN;
    END IF;
    BEGIN
        EXECUTE upsert_sql INTO written USING keys, hashes, vectors, dims, model_id, fts, chunks;
        IF trim_sql IS NOT NULL THEN
            EXECUTE trim_sql USING keys, hashes, vectors, dims, model_id, fts, chunks;
        END IF;
        RETURN;
    EXCEPTION WHEN OTHERS THEN
        written := 0;
    END;
    -- one row at a time, a row another session holds locked fails quickly and is retried later:
    -- rows locked by a writer must not make the pass (and every other source) wait seconds each
    -- (the drain runs this inside a restricted operation, which puts the setting back after)
    PERFORM set_config('lock_timeout', '100ms', true);
    FOR i IN 1 .. n LOOP
        BEGIN
            EXECUTE upsert_sql INTO w
              USING keys[i:i], hashes[i:i], CASE WHEN chunks IS NULL THEN vectors[(i - 1) * dims + 1 : i * dims] ELSE vectors END,
                    dims, model_id, fts, chunks[i:i];
            IF trim_sql IS NOT NULL THEN
                EXECUTE trim_sql USING keys[i:i], hashes[i:i], vectors, dims, model_id, fts, chunks[i:i];
            END IF;
            written := written + w;
        EXCEPTION WHEN lock_not_available THEN
            busy_keys := busy_keys || keys[i];
        WHEN OTHERS THEN
            failed_keys := failed_keys || keys[i];
            failed_errors := failed_errors || SQLERRM;
        END;
    END LOOP;
END
$$;

-- The statement that finds, without waiting, which keys among $1 have a row another session holds
-- locked (FOR UPDATE, a DELETE or a key update under way), and locks the others FOR KEY SHARE, in
-- the key's own order (as the upsert would): _write leaves the busy ones out.
CREATE FUNCTION embed_sidecar._busy_sql(s embed_sidecar.sources) RETURNS text
    LANGUAGE sql STABLE
    RETURN format('WITH locked AS MATERIALIZED (
                     SELECT v._pes_key FROM unnest($1::jsonb[]) AS v(_pes_key) JOIN %1$s src ON %2$s
                      ORDER BY %3$s FOR KEY SHARE OF src SKIP LOCKED)
                   SELECT coalesce(array_agg(v._pes_key), ''{}'') FROM unnest($1::jsonb[]) AS v(_pes_key)
                     JOIN %1$s src ON %2$s
                    WHERE v._pes_key NOT IN (SELECT l._pes_key FROM locked l)',
                  s.source, embed_sidecar._key_from_json(s.source, s.key_attnums, 'src', '_pes_key'),
                  embed_sidecar._columns(s.source, s.key_attnums, 'src'));

-- The drain worker's locks on one source before it reads (writing = false) or writes it: the registry row,
-- then the source table and the sidecar. Why not simply in that order, waiting for each: DDL on
-- those tables (DROP TABLE, ALTER TABLE) locks the table first and the registry row after (its event
-- triggers, sql/events.sql), while unwatch() and set_model() lock the row first and the tables after
-- (_lock_source). A drain that waited for a table while holding the row would deadlock with the
-- first kind, and the deadlock detector may well pick the owner's DROP TABLE as its victim. So the
-- tables are taken without waiting; when one is held by someone else, the row is let go too (its
-- subtransaction rolled back) and both are tried again a moment later, until lock_timeout has
-- passed: the worker only ever waits holding nothing of this source. A reader skips the source this
-- round instead of waiting, as it does for a row locked by someone else (a pause() under way).
-- (process() runs in its caller's transaction and waits for its locks as any statement would:
-- src/drain/store.rs, lock_pass.)
-- true: locked; NULL: skipped (reading only); false: the source is no longer watched.
CREATE FUNCTION embed_sidecar._lock_for_drain(source_id int, writing boolean) RETURNS boolean
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
    -- (NULL when lock_timeout is 0: wait as long as it takes, as any lock would)
    deadline timestamptz := clock_timestamp() + nullif(current_setting('lock_timeout'), '0')::interval;
BEGIN
    LOOP
        BEGIN
            IF writing THEN
                SELECT * INTO s FROM embed_sidecar.sources WHERE id = source_id FOR NO KEY UPDATE;
            ELSE
                SELECT * INTO s FROM embed_sidecar.sources WHERE id = source_id FOR SHARE SKIP LOCKED;
            END IF;
            IF NOT FOUND THEN
                RETURN CASE WHEN EXISTS (SELECT FROM embed_sidecar.sources WHERE id = source_id) THEN NULL ELSE false END;
            END IF;
            IF writing THEN
                EXECUTE format('LOCK TABLE %s IN ROW SHARE MODE NOWAIT', s.source);
                EXECUTE format('LOCK TABLE %s IN ROW EXCLUSIVE MODE NOWAIT', s.sidecar);
            ELSE
                EXECUTE format('LOCK TABLE %s, %s IN ACCESS SHARE MODE NOWAIT', s.source, s.sidecar);
            END IF;
            RETURN true;
        EXCEPTION WHEN lock_not_available THEN
            IF NOT writing THEN
                RETURN NULL;
            ELSIF clock_timestamp() >= deadline THEN
                RAISE lock_not_available USING
                    MESSAGE = format('pg_embed_sidecar: could not lock source %s and its sidecar within lock_timeout', source_id),
                    HINT = 'Another session holds a lock on the table or its sidecar; the pass is tried again later.';
            END IF;
        END;
        PERFORM pg_sleep(0.02);
    END LOOP;
END
$$;

-- The keys among $1 whose rows the current transaction wrote (run as the table's owner): a sync
-- step embeds only those (src/drain/sync.rs).
CREATE FUNCTION embed_sidecar._written_here_sql(s embed_sidecar.sources) RETURNS text
    LANGUAGE sql STABLE
    RETURN format('SELECT v._pes_key::text FROM unnest($1::text[]::jsonb[]) AS v(_pes_key) JOIN %s src ON %s
                    WHERE embed_sidecar._written_here(src.xmin::text::bigint)',
                  s.source, embed_sidecar._key_from_json(s.source, s.key_attnums, 'src', '_pes_key'));
