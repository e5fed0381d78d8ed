-- Search over a watched table's sidecar: semantic (HNSW, cosine) and hybrid (HNSW + full text,
-- fused by reciprocal rank fusion). Both run with the caller's privileges on the sidecar, embed
-- the query once, with the source's model, and return the source key as a JSON array
-- (join back with e.g. `ON p.name = r.key->>0`). Over a chunked sidecar they rank rows by their
-- best passage and say which passage that was (chunk number and character offsets into the
-- content, for a snippet: substr(content, char_start + 1, char_end - char_start)); over an
-- unchunked one those columns are NULL.

-- What a search needs to know about one embedding of a source, read from one registry row: the
-- sidecar and the model that made its vectors always come as a pair, so a model switch committing
-- meanwhile leaves this search on the old pair (kept until drop_previous()). The searches also keep
-- to vectors whose model id is the pair's, so a query never meets vectors of another model.
CREATE FUNCTION embed_sidecar._search_target(source regclass, embedding text,
    OUT sidecar regclass, OUT model text, OUT model_id text, OUT key_json text, OUT vec_type text, OUT dist_op text,
    OUT fts_config regconfig, OUT passage_cols text, OUT chunked boolean)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._readable_source(source, embedding);
BEGIN
    sidecar := s.sidecar;
    model := s.model;
    model_id := s.model_id;
    key_json := embed_sidecar._key_json(s, 'sc');
    SELECT format('%I.%I', n, s.vector_type), format('OPERATOR(%I.<=>)', n) INTO vec_type, dist_op
      FROM embed_sidecar._vector_schema() n;
    fts_config := s.fts_config::regconfig;
    chunked := s.chunk_tokens IS NOT NULL;
    passage_cols := CASE WHEN chunked THEN 'sc.chunk, sc.char_start, sc.char_end'
                         ELSE 'NULL::int AS chunk, NULL::int AS char_start, NULL::int AS char_end' END;
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

-- Passages fetched per row asked for, when a chunked row may fill several of the nearest places.
CREATE FUNCTION embed_sidecar._candidates(chunked boolean, k int) RETURNS int
    LANGUAGE sql IMMUTABLE
    RETURN CASE WHEN chunked THEN greatest(k * 5, 50) ELSE k END;

CREATE FUNCTION embed_sidecar.search(source regclass, query text, k int DEFAULT 10, embedding text DEFAULT NULL)
    RETURNS TABLE (key jsonb, distance float8, chunk int, char_start int, char_end int)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    entered boolean := embed_sidecar._enter();  -- who searches (src/pg/authority.rs)
    t record := embed_sidecar._search_target(source, embedding);
    q real[] := embed_sidecar._embed_query(t.model, t.model_id, query);
    n int := embed_sidecar._candidates(t.chunked, k);
    old text := embed_sidecar._widen_ef_search(n);
BEGIN
    -- the caller was needed to find the target; code of others (policies, operators) runs next
    PERFORM embed_sidecar._leave();
    -- the nearest n vectors (HNSW), each row's nearest of them, the k nearest rows
    RETURN QUERY EXECUTE format(
        'SELECT b.key, b.d, b.chunk, b.char_start, b.char_end
           FROM (SELECT DISTINCT ON (c.key) c.*
                   FROM (SELECT %1$s AS key, (sc.embedding %4$s $1::%2$s)::float8 AS d, %5$s
                           FROM %3$s sc WHERE sc.model = $3 ORDER BY sc.embedding %4$s $1::%2$s LIMIT $4) c
                  ORDER BY c.key, c.d) b
          ORDER BY b.d, b.key LIMIT $2',
        t.key_json, t.vec_type, t.sidecar, t.dist_op, t.passage_cols) USING q, k, t.model_id, n;
    PERFORM set_config('hnsw.ef_search', old, true);
END
$$;
COMMENT ON FUNCTION embed_sidecar.search(regclass, text, int, text) IS
    'k nearest rows of a watched table by cosine distance to the query''s embedding (HNSW index); chunked: by each row''s nearest passage among the nearest max(5k, 50), with its offsets';

-- Full-text query with OR semantics: a long natural-language query should rank documents that
-- share many of its words, not only those that contain all of them.
CREATE FUNCTION embed_sidecar.any_words_tsquery(config regconfig, query text) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN nullif(replace(plainto_tsquery(config, query)::text, ' & ', ' | '), '')::tsquery;

CREATE FUNCTION embed_sidecar.hybrid_search(
    source regclass, query text, k int DEFAULT 10,
    candidates int DEFAULT 100, vector_weight float8 DEFAULT 1.0, text_weight float8 DEFAULT 1.0,
    rrf_k int DEFAULT 60, embedding text DEFAULT NULL)
    RETURNS TABLE (key jsonb, score float8, vector_rank int, text_rank int, chunk int, char_start int, char_end int)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    entered boolean := embed_sidecar._enter();  -- who searches (src/pg/authority.rs)
    t record := embed_sidecar._search_target(source, embedding);
    q real[];
    old text;
BEGIN
    -- the caller was needed to find the target; code of others (policies, operators) runs next
    PERFORM embed_sidecar._leave();
    IF t.fts_config IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: the sidecar of % keeps no full text for hybrid_search', source
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'It was watched with fts_config => NULL: use search(), or unwatch() and watch() it again with a text search configuration.';
    END IF;
    q := embed_sidecar._embed_query(t.model, t.model_id, query);
    old := embed_sidecar._widen_ef_search(candidates);
    -- candidates are vectors (passages, when chunked) from each side; a row ranks by its best one
    -- on each side, and shows the passage of its vector side (else of its text side)
    RETURN QUERY EXECUTE format(
        -- ranks come from an explicit ORDER BY: row_number() OVER () would only follow the
        -- subquery's order by accident of the plan
        'WITH vc AS (SELECT %1$s AS key, sc.embedding %4$s $1::%2$s AS d, %5$s
                       FROM %3$s sc WHERE sc.model = $9 ORDER BY sc.embedding %4$s $1::%2$s LIMIT $3),
              v AS (SELECT b.*, row_number() OVER (ORDER BY b.d, b.key)::int AS r
                      FROM (SELECT DISTINCT ON (vc.key) vc.* FROM vc ORDER BY vc.key, vc.d) b),
              fc AS (SELECT %1$s AS key, ts_rank(sc.fts, tq, 1) AS rank, %5$s
                       FROM %3$s sc, embed_sidecar.any_words_tsquery($4, $5) tq
                      WHERE sc.fts @@ tq AND sc.model = $9 ORDER BY ts_rank(sc.fts, tq, 1) DESC LIMIT $3),
              f AS (SELECT b.*, row_number() OVER (ORDER BY b.rank DESC, b.key)::int AS r
                      FROM (SELECT DISTINCT ON (fc.key) fc.* FROM fc ORDER BY fc.key, fc.rank DESC) b)
         SELECT coalesce(v.key, f.key),
                coalesce($6 / ($8 + v.r), 0) + coalesce($7 / ($8 + f.r), 0),
                v.r, f.r,
                CASE WHEN v.key IS NOT NULL THEN v.chunk ELSE f.chunk END,
                CASE WHEN v.key IS NOT NULL THEN v.char_start ELSE f.char_start END,
                CASE WHEN v.key IS NOT NULL THEN v.char_end ELSE f.char_end END
           FROM v FULL JOIN f ON v.key = f.key
          ORDER BY 2 DESC, 1 LIMIT $2',
        t.key_json, t.vec_type, t.sidecar, t.dist_op, t.passage_cols)
    USING q, k, candidates, t.fts_config, query, vector_weight, text_weight, rrf_k::float8, t.model_id;
    PERFORM set_config('hnsw.ef_search', old, true);
END
$$;
COMMENT ON FUNCTION embed_sidecar.hybrid_search(regclass, text, int, int, float8, float8, int, text) IS
    'Vector and full-text candidates fused by reciprocal rank fusion: score = vector_weight/(rrf_k + vector_rank) + text_weight/(rrf_k + text_rank)';
