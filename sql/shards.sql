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

-- The key columns of a shard: every column but embedding and model, in column order (a relation
-- without those two, or without other columns, is refused).
CREATE FUNCTION embed_sidecar._shard_keys(shard regclass) RETURNS smallint[]
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_nums smallint[] := ARRAY(SELECT a.attnum FROM pg_attribute a
                                  WHERE a.attrelid = shard AND a.attnum > 0 AND NOT a.attisdropped
                                    AND a.attname NOT IN ('embedding', 'model') ORDER BY a.attnum);
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
    -- (distances travel through jsonb: every digit of each float)
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET extra_float_digits = 3
AS $$
DECLARE
    model_name text := coalesce(search_shards.model, current_setting('pg_embed_sidecar.model'));
    model_id text := embed_sidecar._model_id(model_name);
    key_sql text;
    q real[];
    one_shard regclass;
    hits jsonb := '[]';
    part jsonb;
    missing text[] := '{}';
    other record;
BEGIN
    IF k IS NULL OR k < 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: k must not be negative, not %', coalesce(k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'k is how many rows the search returns.';
    END IF;
    IF coalesce(cardinality(shards), 0) = 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: search_shards() needs at least one shard'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the foreign tables over the nodes'' sidecars.';
    END IF;
    -- the key's JSON, made here from the columns the nodes return (named as in the first shard)
    key_sql := embed_sidecar._row_key_sql(shards[1], embed_sidecar._shard_keys(shards[1]), 'f');
    q := embed_sidecar._embed_query(model_name, model_id, query);
    IF NOT partial THEN
        BEGIN
            EXECUTE format('WITH fan AS MATERIALIZED (%s)
                            SELECT coalesce(jsonb_agg(jsonb_build_array(f.shard, (%s)::jsonb, f._pes_distance, f.model)), ''[]'')
                              FROM fan f',
                           (SELECT string_agg(embed_sidecar._shard_nearest_sql(x, k), ' UNION ALL ') FROM unnest(shards) x), key_sql)
               INTO hits USING q;
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE IN ('42809', '42501', '42804') THEN
                RAISE;
            END IF;
            RAISE EXCEPTION 'pg_embed_sidecar: a shard did not answer: %', SQLERRM
                USING ERRCODE = SQLSTATE,
                      HINT = 'search_shards(..., partial => true) answers from the shards that do, and marks the answer incomplete.';
        END;
    ELSE
        FOREACH one_shard IN ARRAY shards LOOP
            BEGIN
                EXECUTE format('SELECT coalesce(jsonb_agg(jsonb_build_array(f.shard, (%s)::jsonb, f._pes_distance, f.model)), ''[]'')
                                  FROM %s f', key_sql, embed_sidecar._shard_nearest_sql(one_shard, k))
                   INTO part USING q;
                hits := hits || part;
            EXCEPTION WHEN OTHERS THEN
                IF SQLSTATE IN ('42809', '42501', '42804') THEN
                    RAISE;
                END IF;
                missing := missing || one_shard::text;
                RAISE WARNING 'pg_embed_sidecar: shard % did not answer, left out: %', one_shard, SQLERRM;
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
    RETURN QUERY SELECT h ->> 0, h -> 1, (h ->> 2)::float8, cardinality(missing) = 0
                   FROM jsonb_array_elements(hits) h ORDER BY (h ->> 2)::float8, h -> 1 LIMIT k;
END
$$;
COMMENT ON FUNCTION embed_sidecar.search_shards(regclass[], text, int, boolean, text) IS
    'The k nearest rows over several embedding nodes'' sidecars (postgres_fdw foreign tables), merged; a node that does not answer is an error, or with partial => true is left out and every row says complete = false';
