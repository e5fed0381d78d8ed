-- Search across embedding nodes (README, "Beyond one machine": sharded embedding work). Each node
-- embeds a share of a table's rows (a subscription to a publication whose row filter picks the
-- share); a query node reaches each node's sidecar through a postgres_fdw foreign table and merges
-- the nodes' nearest rows here. The query node needs the extension only to embed the query.
--
-- A shard is a foreign table (or any relation) with the sidecar's key columns, `embedding` and
-- `model`: every column other than those two is the key, in column order. Its server should have
-- `extensions 'vector'` (so the distance and its ORDER BY ... LIMIT run on the node, with its
-- HNSW index) and `async_capable 'true'` (so the nodes are asked at the same time). Rows are read
-- with the user mapping's role, and the node's own grants and row security apply to that role.

-- One shard's nearest rows: its label, the key as a JSON array, the distance. $1 the query
-- vector (real[]), $2 the model's identity (a node's rows of another model are never compared with it).
CREATE FUNCTION embed_sidecar._shard_nearest_sql(shard regclass, k int) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_nums smallint[] := ARRAY(SELECT a.attnum FROM pg_attribute a
                                  WHERE a.attrelid = shard AND a.attnum > 0 AND NOT a.attisdropped
                                    AND a.attname NOT IN ('embedding', 'model') ORDER BY a.attnum);
    vec text := format('%I.vector', embed_sidecar._vector_schema());
BEGIN
    IF cardinality(key_nums) = 0
       OR (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = shard AND a.attname IN ('embedding', 'model')
                                                 AND NOT a.attisdropped) <> 2 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is not a shard: it needs key columns, embedding and model', shard
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'CREATE FOREIGN TABLE over a node''s sidecar with its key columns, embedding and model (README, "Beyond one machine").';
    END IF;
    -- The inner query is what the node runs (key columns, distance, ORDER BY ... LIMIT: all of it
    -- shippable, so postgres_fdw sends the LIMIT too); the key's JSON is made here. $1 arrives as
    -- real[]; its cast to vector is folded into a constant before the query is sent, so the node
    -- sees a vector literal and can use its index.
    RETURN format('(SELECT %L::text AS shard, %s::jsonb AS key, n._pes_distance AS distance
                      FROM (SELECT %s, t.embedding OPERATOR(%I.<=>) $1::%s AS _pes_distance
                              FROM %s t WHERE t.model = $2 ORDER BY _pes_distance LIMIT %s) n)',
                  shard, embed_sidecar._row_key_sql(shard, key_nums, 'n'), embed_sidecar._columns(shard, key_nums, 't'),
                  embed_sidecar._vector_schema(), vec, shard, k);
END
$$;

-- The k nearest rows over every shard, merged: equal to the k nearest of one node holding all
-- the rows (each shard returns its own k nearest, and the k nearest overall are among them).
-- Without partial, the shards are asked in one statement (concurrently, where their servers are
-- async_capable) and a shard that does not answer is an error naming it; with partial, each is
-- asked on its own, one that does not answer is left out with a WARNING, and every row says
-- complete = false. Ties in distance go by key, as on one node with the same vectors.
CREATE FUNCTION embed_sidecar.search_shards(shards regclass[], query text, k int DEFAULT 10, partial boolean DEFAULT false,
                                            model text DEFAULT NULL)
    RETURNS TABLE (shard text, key jsonb, distance float8, complete boolean)
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    model_name text := coalesce(search_shards.model, current_setting('pg_embed_sidecar.model'));
    model_id text := embed_sidecar._model_id(model_name);
    q real[];
    one_shard regclass;
    hits jsonb := '[]';
    part jsonb;
    missing text[] := '{}';
BEGIN
    IF k IS NULL OR k < 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: k must not be negative, not %', coalesce(k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'k is how many rows the search returns.';
    END IF;
    IF coalesce(cardinality(shards), 0) = 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: search_shards() needs at least one shard'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass the foreign tables over the nodes'' sidecars.';
    END IF;
    q := embed_sidecar._embed_query(model_name, model_id, query);
    IF NOT partial THEN
        BEGIN
            RETURN QUERY EXECUTE format('SELECT u.shard, u.key, u.distance, true FROM (%s) u ORDER BY u.distance, u.key LIMIT %s',
                                        (SELECT string_agg(embed_sidecar._shard_nearest_sql(x, k), ' UNION ALL ')
                                           FROM unnest(shards) x), k)
                USING q, model_id;
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE IN ('42809', '22023', '42501') THEN
                RAISE;
            END IF;
            RAISE EXCEPTION 'pg_embed_sidecar: a shard did not answer: %', SQLERRM
                USING ERRCODE = SQLSTATE,
                      HINT = 'search_shards(..., partial => true) answers from the shards that do, and marks the answer incomplete.';
        END;
        RETURN;
    END IF;
    FOREACH one_shard IN ARRAY shards LOOP
        BEGIN
            EXECUTE format('SELECT coalesce(jsonb_agg(jsonb_build_array(b.shard, b.key, b.distance)), ''[]'') FROM %s b',
                           embed_sidecar._shard_nearest_sql(one_shard, k))
               INTO part USING q, model_id;
            hits := hits || part;
        EXCEPTION WHEN OTHERS THEN
            IF SQLSTATE IN ('42809', '42501') THEN
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
    RETURN QUERY SELECT h ->> 0, h -> 1, (h ->> 2)::float8, cardinality(missing) = 0
                   FROM jsonb_array_elements(hits) h ORDER BY (h ->> 2)::float8, h -> 1 LIMIT k;
END
$$;
COMMENT ON FUNCTION embed_sidecar.search_shards(regclass[], text, int, boolean, text) IS
    'The k nearest rows over several embedding nodes'' sidecars (postgres_fdw foreign tables), merged; a node that does not answer is an error, or with partial => true is left out and every row says complete = false';
