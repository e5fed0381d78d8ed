-- Search over a watched table's sidecar: semantic (HNSW, cosine) and hybrid (HNSW + full text,
-- fused by reciprocal rank fusion). Both run with the caller's privileges on the sidecar, embed
-- the query once, with the source's model, and return the source key as a JSON array
-- (join back with e.g. `ON p.name = r.key->>0`).

-- What a search needs to know about one embedding of a source, read from one registry row: the
-- sidecar and the model that made its vectors always come as a pair, so a model switch committing
-- meanwhile leaves this search on the old pair (kept until drop_previous()). The searches also keep
-- to vectors whose model id is the pair's, so a query never meets vectors of another model.
CREATE FUNCTION embed_sidecar._search_target(source regclass, embedding text,
    OUT sidecar regclass, OUT model text, OUT model_id text, OUT key_json text, OUT vec_type text, OUT dist_op text,
    OUT fts_config regconfig)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._readable_source(source, embedding);
BEGIN
    sidecar := s.sidecar;
    model := s.model;
    model_id := s.model_id;
    key_json := format('jsonb_build_array(%s)', embed_sidecar._columns(s.sidecar, s.key_attnums, 'sc'));
    SELECT format('%I.vector', n), format('OPERATOR(%I.<=>)', n) INTO vec_type, dist_op
      FROM (SELECT extnamespace::regnamespace::name AS n FROM pg_extension WHERE extname = 'vector') x;
    fts_config := s.fts_config;
END
$$;

-- HNSW returns at most hnsw.ef_search rows: raise it for this query when more are asked for.
CREATE FUNCTION embed_sidecar._widen_ef_search(wanted int) RETURNS text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    old text := coalesce(current_setting('hnsw.ef_search', true), '40');
BEGIN
    IF wanted > old::int THEN
        PERFORM set_config('hnsw.ef_search', least(wanted, 1000)::text, true);
    END IF;
    RETURN old;
END
$$;

CREATE FUNCTION embed_sidecar.search(source regclass, query text, k int DEFAULT 10, embedding text DEFAULT NULL)
    RETURNS TABLE (key jsonb, distance float8)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record := embed_sidecar._search_target(source, embedding);
    q real[] := embed_sidecar._embed_with(t.model, query);
    old text := embed_sidecar._widen_ef_search(k);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT %1$s, (sc.embedding %4$s $1::%2$s)::float8
           FROM %3$s sc WHERE sc.model = $3 ORDER BY sc.embedding %4$s $1::%2$s LIMIT $2',
        t.key_json, t.vec_type, t.sidecar, t.dist_op) USING q, k, t.model_id;
    PERFORM set_config('hnsw.ef_search', old, true);
END
$$;
COMMENT ON FUNCTION embed_sidecar.search(regclass, text, int, text) IS
    'k nearest rows of a watched table by cosine distance to the query''s embedding (HNSW index)';

-- Full-text query with OR semantics: a long natural-language query should rank documents that
-- share many of its words, not only those that contain all of them.
CREATE FUNCTION embed_sidecar.any_words_tsquery(config regconfig, query text) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN nullif(replace(plainto_tsquery(config, query)::text, ' & ', ' | '), '')::tsquery;

CREATE FUNCTION embed_sidecar.hybrid_search(
    source regclass, query text, k int DEFAULT 10,
    candidates int DEFAULT 100, vector_weight float8 DEFAULT 1.0, text_weight float8 DEFAULT 1.0,
    rrf_k int DEFAULT 60, embedding text DEFAULT NULL)
    RETURNS TABLE (key jsonb, score float8, vector_rank int, text_rank int)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record := embed_sidecar._search_target(source, embedding);
    q real[] := embed_sidecar._embed_with(t.model, query);
    old text := embed_sidecar._widen_ef_search(candidates);
BEGIN
    RETURN QUERY EXECUTE format(
        -- ranks come from an explicit ORDER BY: row_number() OVER () would only follow the
        -- subquery's order by accident of the plan
        'WITH v AS (SELECT %1$s AS key, row_number() OVER (ORDER BY sc.d, %1$s)::int AS r
                      FROM (SELECT sc.*, sc.embedding %4$s $1::%2$s AS d
                              FROM %3$s sc WHERE sc.model = $9 ORDER BY sc.embedding %4$s $1::%2$s LIMIT $3) sc),
              f AS (SELECT %1$s AS key, row_number() OVER (ORDER BY ts_rank(sc.fts, tq, 1) DESC)::int AS r
                      FROM %3$s sc, embed_sidecar.any_words_tsquery($4, $5) tq
                     WHERE sc.fts @@ tq AND sc.model = $9 ORDER BY ts_rank(sc.fts, tq, 1) DESC LIMIT $3)
         SELECT coalesce(v.key, f.key),
                coalesce($6 / ($8 + v.r), 0) + coalesce($7 / ($8 + f.r), 0),
                v.r, f.r
           FROM v FULL JOIN f ON v.key = f.key
          ORDER BY 2 DESC, 1 LIMIT $2',
        t.key_json, t.vec_type, t.sidecar, t.dist_op)
    USING q, k, candidates, t.fts_config, query, vector_weight, text_weight, rrf_k::float8, t.model_id;
    PERFORM set_config('hnsw.ef_search', old, true);
END
$$;
COMMENT ON FUNCTION embed_sidecar.hybrid_search(regclass, text, int, int, float8, float8, int, text) IS
    'Vector and full-text candidates fused by reciprocal rank fusion: score = vector_weight/(rrf_k + vector_rank) + text_weight/(rrf_k + text_rank)';
