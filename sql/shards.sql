-- Search across embedding nodes (README, "Beyond one machine": sharded embedding work). Each node
-- embeds a share of a table's rows (a subscription to a publication whose row filter picks the
-- share); a query node reaches each node's sidecar through a postgres_fdw foreign table and merges
-- the nodes' nearest rows here. The query node needs the extension only to embed the query.
--
-- A shard is a foreign table (or any relation) with the sidecar's key columns, `embedding` and
-- `model`: every column other than those two is the key, in column order. Its server should have
-- `extensions 'vector'` (so the ORDER BY ... LIMIT runs on the node, with its HNSW index) and
-- `async_capable 'true'` (so the nodes are asked at the same time). Rows are read
-- with the user mapping's role, and the node's own grants and row security apply to that role.

-- The key columns of a shard: every column but embedding, model and fts, in column order (a
-- relation without embedding and model, or without other columns, is refused).
CREATE FUNCTION embed_sidecar._shard_keys(shard regclass) RETURNS smallint[]
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_nums smallint[] := ARRAY(SELECT a.attnum FROM pg_attribute a
                                  WHERE a.attrelid = shard AND a.attnum > 0 AND NOT a.attisdropped
                                    AND a.attname NOT IN ('embedding', 'model', 'fts') ORDER BY a.attnum);
BEGIN
    IF cardinality(key_nums) = 0
       OR (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = shard AND a.attname IN ('embedding', 'model')
                                                 AND NOT a.attisdropped) <> 2 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is not a shard: it needs key columns, embedding and model', shard
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'CREATE FOREIGN TABLE over a node''s sidecar with its key columns, embedding and model (README, "Beyond one machine").';
    END IF;
    RETURN key_nums;
END
$$;

-- One shard's k nearest rows: its label, its key columns, model, distance. $1 the query vector
-- (real[]: its cast to vector is folded into a constant before the query is sent, so the node
-- sees a vector literal and can use its index). Everything but the label is the node's work, so
-- postgres_fdw sends the ORDER BY and the LIMIT; no filter on the model (with one the planner
-- sorts here instead): the rows' model is checked after (search_shards).
CREATE FUNCTION embed_sidecar._shard_nearest_sql(shard regclass, k int) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN format('(SELECT %L::text AS shard, %s, t.model, t.embedding OPERATOR(%I.<=>) $1::%I.vector AS _pes_distance
                      FROM %s t ORDER BY _pes_distance LIMIT %s)',
                  shard, embed_sidecar._columns(shard, embed_sidecar._shard_keys(shard), 't'),
                  embed_sidecar._vector_schema(), embed_sidecar._vector_schema(), shard, k);
END
$$;

-- One shard's best-ranked rows for full text (hybrid_search_shards): label, key columns, model,
-- ts_rank as the node computes it (from the row's own lexemes only, so ranks from different nodes
-- compare). $2 the tsquery, made on the query node and sent as a constant.
CREATE FUNCTION embed_sidecar._shard_text_sql(shard regclass, candidates int) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = shard AND a.attname = 'fts' AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: shard % has no fts column for hybrid_search_shards', shard
            USING ERRCODE = 'wrong_object_type', HINT = 'Add the sidecar''s fts column (tsvector) to the foreign table.';
    END IF;
    RETURN format('(SELECT %L::text AS shard, %s, t.model, pg_catalog.ts_rank(t.fts, $2, 1)::float8 AS _pes_distance
                      FROM %s t WHERE t.fts OPERATOR(pg_catalog.@@) $2 ORDER BY _pes_distance DESC, %s LIMIT %s)',
                  shard, embed_sidecar._columns(shard, embed_sidecar._shard_keys(shard), 't'), shard,
                  embed_sidecar._columns(shard, embed_sidecar._shard_keys(shard), 't'), candidates);
END
$$;

-- Ask every shard one query (branches[i] for shards[i], made by _shard_nearest_sql or
-- _shard_text_sql; $1 the query vector, $2 the tsquery) and return every row they gave, as
-- [shard, key, value, model]. Without partial, in one statement: an Append of their scans that
-- PostgreSQL runs concurrently where the servers are async_capable (the union is a materialized
-- CTE: an ORDER BY over the union itself would make the planner merge ordered scans one node
-- after the other), and a shard that does not answer is an error naming it. With partial, each
-- on its own; one that does not answer is left out (WARNING) and named in missing. A shard whose
-- rows were made by another model than model_id is an error (a search never mixes models).
CREATE FUNCTION embed_sidecar._fan_out(shards regclass[], branches text[], partial boolean, q real[], tq tsquery,
                                       model_id text, OUT hits jsonb, OUT missing text[])
    -- (values travel through jsonb: every digit of each float)
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET extra_float_digits = 3
AS $$
DECLARE
    -- PUBLIC, as search_shards calls it as its caller: refused where search_shards is
    outside boolean := embed_sidecar._outside_restricted();
    -- the key's JSON, made here from the columns the nodes return (named as in the first shard)
    key_sql text := embed_sidecar._row_key_sql(shards[1], embed_sidecar._shard_keys(shards[1]), 'f');
    part jsonb;
    other record;
BEGIN
    hits := '[]';
    missing := '{}';
    IF NOT partial THEN
        BEGIN
            EXECUTE format('WITH fan AS MATERIALIZED (%s)
                            SELECT coalesce(jsonb_agg(jsonb_build_array(f.shard, (%s)::jsonb, f._pes_distance, f.model)), ''[]'')
                              FROM fan f', array_to_string(branches, ' UNION ALL '), key_sql)
               INTO hits USING q, tq;
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE IN ('42809', '42501', '42804') THEN
                RAISE;
            END IF;
            RAISE EXCEPTION 'pg_embed_sidecar: a shard did not answer: %', SQLERRM
                USING ERRCODE = SQLSTATE,
                      HINT = 'Pass partial => true to answer from the shards that do, with the answer marked incomplete.';
        END;
    ELSE
        FOR i IN 1 .. cardinality(shards) LOOP
            BEGIN
                EXECUTE format('SELECT coalesce(jsonb_agg(jsonb_build_array(f.shard, (%s)::jsonb, f._pes_distance, f.model)), ''[]'')
                                  FROM %s f', key_sql, branches[i])
                   INTO part USING q, tq;
                hits := hits || part;
            EXCEPTION WHEN OTHERS THEN
                IF SQLSTATE IN ('42809', '42501', '42804') THEN
                    RAISE;
                END IF;
                missing := missing || shards[i]::text;
                RAISE WARNING 'pg_embed_sidecar: shard % did not answer, left out: %', shards[i], SQLERRM;
            END;
        END LOOP;
        IF cardinality(missing) = cardinality(shards) THEN
            RAISE EXCEPTION 'pg_embed_sidecar: no shard answered (%)', array_to_string(missing, ', ')
                USING ERRCODE = 'connection_failure', HINT = 'See the WARNINGs above for each shard''s error.';
        END IF;
    END IF;
    SELECT h ->> 0 AS shard, h ->> 3 AS model INTO other FROM jsonb_array_elements(hits) h
     WHERE h ->> 3 IS DISTINCT FROM model_id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pg_embed_sidecar: shard % holds vectors of model %, not of the query''s %', other.shard,
                        coalesce(quote_literal(other.model), 'NULL'), quote_literal(model_id)
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Every node must embed with the query node''s model (same files): pass model => ..., or reembed() there.';
    END IF;
END
$$;

-- The k nearest rows over every shard, merged: equal to the k nearest of one node holding all
-- the rows (each shard returns its own k nearest, and the k nearest overall are among them).
-- Without partial, the shards are asked in one statement, an Append of their scans that
-- PostgreSQL runs concurrently where the servers are async_capable (the union is a materialized
-- CTE, and the merge sorts its result: an ORDER BY over the union itself would make the planner
-- merge ordered scans one node after the other), and a shard that does not answer is an error
-- naming it; with partial, each is asked on its own, one that does not answer is left out with a
-- WARNING, and every row says complete = false. A shard whose rows were made by another model
-- than the query's is an error (a search never mixes models). Ties in distance go by key.
CREATE FUNCTION embed_sidecar.search_shards(shards regclass[], query text, k int DEFAULT 10, partial boolean DEFAULT false,
                                            model text DEFAULT NULL)
    RETURNS TABLE (shard text, key jsonb, distance float8, complete boolean)
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    -- who searches (src/pg/authority.rs): refused inside a security-restricted operation, as
    -- search() is; forgotten (_leave) before the nodes' rows are read
    entered boolean := embed_sidecar._enter();
    model_name text := coalesce(search_shards.model, current_setting('pg_embed_sidecar.model'));
    model_id text := embed_sidecar._model_id(model_name);
    got record;
BEGIN
    IF k IS NULL OR k < 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: k must not be negative, not %', coalesce(k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'k is how many rows the search returns.';
    END IF;
    IF coalesce(cardinality(shards), 0) = 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: search_shards() needs at least one shard'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the foreign tables over the nodes'' sidecars.';
    END IF;
    PERFORM embed_sidecar._leave();
    got := embed_sidecar._fan_out(shards, ARRAY(SELECT embed_sidecar._shard_nearest_sql(x, k) FROM unnest(shards) x),
                                  partial, embed_sidecar._embed_query(model_name, model_id, query), NULL, model_id);
    RETURN QUERY SELECT h ->> 0, h -> 1, (h ->> 2)::float8, cardinality(got.missing) = 0
                   FROM jsonb_array_elements(got.hits) h ORDER BY (h ->> 2)::float8, h -> 1 LIMIT k;
END
$$;
COMMENT ON FUNCTION embed_sidecar.search_shards(regclass[], text, int, boolean, text) IS
    'The k nearest rows over several embedding nodes'' sidecars (postgres_fdw foreign tables), merged; a node that does not answer is an error, or with partial => true is left out and every row says complete = false';

-- hybrid_search over shards: each node gives its `candidates` nearest rows and its `candidates`
-- best-ranked rows for full text; merged, each side keeps the `candidates` best over all nodes and
-- ranks them as one node holding every row would (ts_rank reads a row's own lexemes only, so ranks
-- from different nodes compare), then the two ranks are fused as hybrid_search() fuses them
-- (reciprocal rank fusion). Partial and errors as search_shards. One vector per row (a chunked
-- sidecar's passages are not grouped by row here).
CREATE FUNCTION embed_sidecar.hybrid_search_shards(shards regclass[], query text, k int DEFAULT 10, candidates int DEFAULT 100,
    vector_weight float8 DEFAULT 1.0, text_weight float8 DEFAULT 1.0, rrf_k int DEFAULT 60, partial boolean DEFAULT false,
    model text DEFAULT NULL, fts_config regconfig DEFAULT 'english')
    RETURNS TABLE (shard text, key jsonb, score float8, vector_rank int, text_rank int, complete boolean)
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    -- who searches (src/pg/authority.rs): refused inside a security-restricted operation, as
    -- search() is; forgotten (_leave) before the nodes' rows are read
    entered boolean := embed_sidecar._enter();
    model_name text := coalesce(hybrid_search_shards.model, current_setting('pg_embed_sidecar.model'));
    model_id text := embed_sidecar._model_id(model_name);
    v record;
    t record;
BEGIN
    IF k IS NULL OR k < 0 OR candidates IS NULL OR candidates < k THEN
        RAISE EXCEPTION 'pg_embed_sidecar: hybrid_search_shards() needs 0 <= k <= candidates (k %, candidates %)',
                        coalesce(k::text, 'NULL'), coalesce(candidates::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'candidates is how many rows each side ranks before they are fused.';
    END IF;
    IF coalesce(cardinality(shards), 0) = 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: hybrid_search_shards() needs at least one shard'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the foreign tables over the nodes'' sidecars.';
    END IF;
    PERFORM embed_sidecar._leave();
    v := embed_sidecar._fan_out(shards, ARRAY(SELECT embed_sidecar._shard_nearest_sql(x, candidates) FROM unnest(shards) x),
                                partial, embed_sidecar._embed_query(model_name, model_id, query), NULL, model_id);
    t := embed_sidecar._fan_out(shards, ARRAY(SELECT embed_sidecar._shard_text_sql(x, candidates) FROM unnest(shards) x),
                                partial, NULL, embed_sidecar.any_words_tsquery(fts_config, query), model_id);
    RETURN QUERY
        WITH vs AS (SELECT h ->> 0 AS shard, h -> 1 AS key,
                           row_number() OVER (ORDER BY (h ->> 2)::float8, h -> 1)::int AS r
                      FROM jsonb_array_elements(v.hits) h ORDER BY (h ->> 2)::float8, h -> 1 LIMIT candidates),
             fs AS (SELECT h ->> 0 AS shard, h -> 1 AS key,
                           row_number() OVER (ORDER BY (h ->> 2)::float8 DESC, h -> 1)::int AS r
                      FROM jsonb_array_elements(t.hits) h ORDER BY (h ->> 2)::float8 DESC, h -> 1 LIMIT candidates)
        SELECT coalesce(vs.shard, fs.shard), coalesce(vs.key, fs.key),
               coalesce(vector_weight / (rrf_k + vs.r), 0) + coalesce(text_weight / (rrf_k + fs.r), 0),
               vs.r, fs.r, cardinality(v.missing) + cardinality(t.missing) = 0
          FROM vs FULL JOIN fs ON vs.key = fs.key
         ORDER BY 3 DESC, 2 LIMIT k;
END
$$;
COMMENT ON FUNCTION embed_sidecar.hybrid_search_shards(regclass[], text, int, int, float8, float8, int, boolean, text, regconfig) IS
    'hybrid_search over several embedding nodes'' sidecars (postgres_fdw foreign tables with fts): each side merged over the nodes, then fused by reciprocal rank; errors and partial answers as search_shards';
