-- Search over a watched table's sidecar: semantic (HNSW, cosine) and hybrid (HNSW + full text,
-- fused by reciprocal rank fusion), optionally among the rows a filter lets through (a boolean
-- expression over the table's columns, judged like the caller's own SELECT). They run with the
-- caller's privileges, embed the query once, with the source's model, and return the source key
-- as a JSON array (search_rows() returns the rows themselves). Over a chunked sidecar they rank
-- rows by their best passage and say which passage that was (chunk number and character offsets
-- into the content, for a snippet: substr(content, char_start + 1, char_end - char_start)); over
-- an unchunked one those columns are NULL. The searches keep to vectors whose model id is the
-- embedding's, so a query never meets vectors of another model; a model switch committing
-- meanwhile leaves a search on the pair (sidecar, model) it read.
--
-- The public functions are SQL wrappers that hand the caller's search_path on: the filter is
-- evaluated with it, everything else with ours.

-- HNSW returns at most hnsw.ef_search rows: raise it for this query when more are asked for.
CREATE FUNCTION embed_sidecar._widen_ef_search(wanted int) RETURNS text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- ('' when a failed statement left the placeholder pgvector had not yet claimed)
    old text := coalesce(nullif(current_setting('hnsw.ef_search', true), ''), '40');
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

-- How many rows a search's filter lets through, as the planner expects (VOLATILE: EXPLAIN is a
-- utility statement, which read-only functions may not run). Planning only: nothing is read.
CREATE FUNCTION embed_sidecar._filter_rows(source regclass, filter text, callers_path text) RETURNS float8
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    statement text := format(E'EXPLAIN (FORMAT JSON) SELECT 1 FROM %s WHERE (%s\n)', source, filter);
    plan json;
BEGIN
    plan := embed_sidecar._run_filtered(statement, callers_path)::json;
    RETURN (plan -> 0 -> 'Plan' ->> 'Plan Rows')::float8;
END
$$;

-- Run one statement that holds a caller's filter, with the caller's search_path (the filter's
-- names resolve as in the caller's own SELECT; NULL: ours), and hand its one value back as text.
-- Every other name in such a statement is schema-qualified (OPERATOR(pg_catalog.=) and all), so
-- nothing a schema on the caller's path holds can stand in for ours, and its values are literals:
-- it has no parameters a filter could name ($1).
CREATE FUNCTION embed_sidecar._run_filtered(statement text, callers_path text)
    RETURNS text
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result text;
BEGIN
    IF callers_path IS NOT NULL THEN
        PERFORM pg_catalog.set_config('search_path', callers_path, true);
    END IF;
    EXECUTE statement INTO result;
    RETURN result;  -- (the function's SET puts our search_path back)
END
$$;

-- The sidecar (alias sc) of a search, joined with the source's rows the filter lets through (the
-- filter being a sub-select of the source, it names the source's columns and nothing else; the
-- source keeps its own name there, so docs.tenant works as well as tenant).
CREATE FUNCTION embed_sidecar._filtered_sidecar(s embed_sidecar.sources, filter text) RETURNS text
    LANGUAGE sql STABLE
    RETURN CASE WHEN filter IS NULL THEN format('%s sc', s.sidecar)
                ELSE format(E'%s sc JOIN (SELECT %s FROM %s WHERE (%s\n)) f ON %s',
                            s.sidecar,
                            embed_sidecar._columns(s.source, s.key_attnums,
                                                   (SELECT c.relname FROM pg_catalog.pg_class c WHERE c.oid = s.source)),
                            s.source, filter, embed_sidecar._side_join(s, 'sc', 'f')) END;

-- The statement of one search over one embedding: the k rows nearest to the query vector q made by
-- the embedding's model, among those the filter lets through (_filtered_sidecar: judged with the
-- caller's rights and row security, as is the sidecar), each row with its nearest passage when
-- chunked; its result is one jsonb array of [key, distance, chunk, char_start, char_end], nearest
-- first.
--   exact:  every vector of the matching rows is compared (OFFSET 0 keeps the index out);
--   else:   the HNSW index is walked for the n nearest vectors, iteratively (the caller sets
--           hnsw.iterative_scan) until n of them pass the filter or max_scan_tuples are seen.
CREATE FUNCTION embed_sidecar._nearest_sql(s embed_sidecar.sources, filter text, exact boolean, q real[], k int, n int)
    RETURNS text
    -- (the query vector goes in as text: every digit of each float)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET extra_float_digits = 3
AS $$
DECLARE
    vec text := format('%I.%I', embed_sidecar._vector_schema(), s.vector_type);
    dist text := format('sc.embedding OPERATOR(%I.<=>) %L::pg_catalog.float4[]::%s', embed_sidecar._vector_schema(), q, vec);
    chunked boolean := s.chunk_tokens IS NOT NULL;
    keys_sc text;
    keys_c text;
    candidates text;
BEGIN
    SELECT string_agg(format('sc.%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('c.%I', a.attname), ', ' ORDER BY a.attnum) INTO keys_sc, keys_c
      FROM pg_attribute a WHERE a.attrelid = s.sidecar AND a.attnum = ANY (embed_sidecar._sidecar_keys(s));
    candidates := format('SELECT %s, (%s)::float8 AS d, %s FROM %s WHERE sc.model OPERATOR(pg_catalog.=) %L',
                         keys_sc, dist,
                         CASE WHEN chunked THEN 'sc.chunk, sc.char_start, sc.char_end'
                              ELSE 'NULL::int AS chunk, NULL::int AS char_start, NULL::int AS char_end' END,
                         embed_sidecar._filtered_sidecar(s, filter), s.model_id);
    candidates := CASE WHEN exact THEN candidates || ' OFFSET 0'
                       ELSE format('%s ORDER BY %s LIMIT %s', candidates, dist, n) END;
    -- a row's nearest passage stands for it
    IF chunked THEN
        candidates := format('SELECT DISTINCT ON (%s) c.* FROM (%s) c ORDER BY %s, c.d', keys_c, candidates, keys_c);
    END IF;
    RETURN format('SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(r.key, r.d, r.chunk, r.char_start, r.char_end)
                                             ORDER BY r.d, r.key), ''[]'')::text
                     FROM (SELECT %s AS key, b.d, b.chunk, b.char_start, b.char_end
                             FROM (%s) b ORDER BY b.d, 1 LIMIT %s) r',
                  embed_sidecar._key_json(s, 'b'), candidates, k);
END
$$;

-- The nearest rows of a search, as _nearest_sql's jsonb array. A filter expected to let few rows
-- through (pg_embed_sidecar.exact_search_rows) has them ranked exactly: walking the index for
-- them would visit many vectors that fail it. Otherwise the index is walked iteratively, and
-- should that still bring fewer than k rows (the filter let fewer through than the planner
-- thought, or its rows are far from the query: hnsw.max_scan_tuples were seen first) the
-- search is done again exactly, so it always returns min(k, rows matching). The filter runs
-- with the caller's search path (callers_path), as in the caller's own SELECT.
CREATE FUNCTION embed_sidecar._nearest(s embed_sidecar.sources, q real[], k int, filter text, callers_path text)
    RETURNS jsonb
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int := embed_sidecar._candidates(s.chunk_tokens IS NOT NULL, k);
    -- the index walk's breadth, at least 100 (400 with a filter): measured on 64k packages
    -- (scripts/bench/filtered.py, README "Filtered search"), pgvector's default 40 found 0.970
    -- of the exact top 10 unfiltered and 0.930 at 10% selectivity; 100 finds 0.986 unfiltered,
    -- 400 finds 0.984 at 10% (and 0.950 within one Debian section, whose rows are alike) for
    -- about the time 200 takes (0.968)
    old_ef text := embed_sidecar._widen_ef_search(greatest(n, CASE WHEN filter IS NULL THEN 100 ELSE 400 END));
    old_iter text := coalesce(nullif(current_setting('hnsw.iterative_scan', true), ''), 'off');
    exact boolean := false;
    hits jsonb;
BEGIN
    IF filter IS NULL THEN
        callers_path := NULL;  -- nothing of the caller's in the statement
    ELSE
        filter := embed_sidecar._check_filter(filter);
        exact := embed_sidecar._filter_rows(s.source, filter, callers_path)
                 <= current_setting('pg_embed_sidecar.exact_search_rows')::float8;
    END IF;
    IF NOT exact THEN
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
        hits := embed_sidecar._run_filtered(embed_sidecar._nearest_sql(s, filter, false, q, k, n), callers_path);
        IF jsonb_array_length(hits) < k AND s.chunk_tokens IS NOT NULL THEN
            -- a few long rows held most of the nearest passages: more passages before all of them
            hits := embed_sidecar._run_filtered(embed_sidecar._nearest_sql(s, filter, false, q, k, n * 8), callers_path);
        END IF;
        PERFORM set_config('hnsw.iterative_scan', old_iter, true);
    END IF;
    IF exact OR jsonb_array_length(hits) < k THEN
        hits := embed_sidecar._run_filtered(embed_sidecar._nearest_sql(s, filter, true, q, k, n), callers_path);
    END IF;
    PERFORM set_config('hnsw.ef_search', old_ef, true);
    RETURN hits;
END
$$;

-- What search() and search_rows() share: who searches, which embedding, the query's vector,
-- then the nearest rows (the caller is forgotten before code of others, policies and operators,
-- runs in the search's statements).
CREATE FUNCTION embed_sidecar._search(source regclass, query text, k int, embedding text, filter text, callers_path text,
    OUT s embed_sidecar.sources, OUT hits jsonb)
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    entered boolean := embed_sidecar._enter();  -- who searches (src/pg/authority.rs)
    q real[];
BEGIN
    s := embed_sidecar._readable_source(source, embedding);
    IF k IS NULL OR k < 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: k must not be negative, not %', coalesce(k::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'k is how many rows the search returns.';
    END IF;
    q := embed_sidecar._embed_query(s.model, s.model_id, query);
    PERFORM embed_sidecar._leave();
    hits := CASE WHEN k = 0 THEN '[]' ELSE embed_sidecar._nearest(s, q, k, filter, callers_path) END;
END
$$;

CREATE FUNCTION embed_sidecar.search(source regclass, query text, k int DEFAULT 10, embedding text DEFAULT NULL,
                                     filter text DEFAULT NULL)
    RETURNS TABLE (key jsonb, distance float8, chunk int, char_start int, char_end int)
    LANGUAGE sql VOLATILE
BEGIN ATOMIC
    SELECT h.value -> 0, (h.value ->> 1)::float8, (h.value ->> 2)::int, (h.value ->> 3)::int, (h.value ->> 4)::int
      FROM embed_sidecar._search(source, query, k, embedding, filter, pg_catalog.current_setting('search_path')) r,
           pg_catalog.jsonb_array_elements(r.hits) WITH ORDINALITY AS h(value, ord)
     ORDER BY h.ord;
END;
COMMENT ON FUNCTION embed_sidecar.search(regclass, text, int, text, text) IS
    'k nearest rows of a watched table by cosine distance to the query''s embedding, among those the filter (a boolean expression over the table''s columns) lets through; chunked: by each row''s nearest passage, with its offsets';

-- search() returning the source's rows themselves: search_rows(NULL::docs, 'query', 10, filter => ...)
-- gives (hit docs, distance, ...), read as (r.hit).title or (r.hit).*. Read with the caller's
-- rights (row security of the table applies, as in a plain SELECT).
CREATE FUNCTION embed_sidecar._search_rows(source anyelement, query text, k int, embedding text, filter text,
                                           callers_path text)
    RETURNS TABLE (hit anyelement, distance float8, chunk int, char_start int, char_end int)
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass := (SELECT t.typrelid FROM pg_type t WHERE t.oid = pg_typeof(source) AND t.typrelid <> 0);
    res record;
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: search_rows() takes a table''s row type, not %', pg_typeof(source)
            USING ERRCODE = 'datatype_mismatch', HINT = 'Pass NULL cast to the table''s type: search_rows(NULL::docs, ''query'').';
    END IF;
    res := embed_sidecar._search(rel, query, k, embedding, filter, callers_path);
    RETURN QUERY EXECUTE format(
        'SELECT src, (h.value ->> 1)::float8, (h.value ->> 2)::int, (h.value ->> 3)::int, (h.value ->> 4)::int
           FROM jsonb_array_elements($1) WITH ORDINALITY AS h(value, ord)
                CROSS JOIN LATERAL (SELECT h.value -> 0 AS _pes_key) k
                JOIN %s src ON %s
          ORDER BY h.ord',
        rel, embed_sidecar._key_from_json(rel, (res.s).key_attnums, 'src', '_pes_key')) USING res.hits;
END
$$;

-- (a SQL function with a body in a string: a polymorphic one cannot have a standard body; every
-- name in it is qualified)
CREATE FUNCTION embed_sidecar.search_rows(source anyelement, query text, k int DEFAULT 10, embedding text DEFAULT NULL,
                                          filter text DEFAULT NULL)
    RETURNS TABLE (hit anyelement, distance float8, chunk int, char_start int, char_end int)
    LANGUAGE sql VOLATILE
AS $$
    SELECT * FROM embed_sidecar._search_rows(source, query, k, embedding, filter, pg_catalog.current_setting('search_path'))
$$;
COMMENT ON FUNCTION embed_sidecar.search_rows(anyelement, text, int, text, text) IS
    'search() returning the rows of the table whose row type the first argument has (NULL::docs), with their distance';

-- Full-text query with OR semantics: a long natural-language query should rank documents that
-- share many of its words, not only those that contain all of them.
CREATE FUNCTION embed_sidecar.any_words_tsquery(config regconfig, query text) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN nullif(replace(plainto_tsquery(config, query)::text, ' & ', ' | '), '')::tsquery;

CREATE FUNCTION embed_sidecar._hybrid_search(
    source regclass, query text, k int, candidates int, vector_weight float8, text_weight float8, rrf_k int,
    embedding text, filter text, callers_path text)
    RETURNS TABLE (key jsonb, score float8, vector_rank int, text_rank int, chunk int, char_start int, char_end int)
    LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    entered boolean := embed_sidecar._enter();  -- who searches (src/pg/authority.rs)
    s embed_sidecar.sources := embed_sidecar._readable_source(source, embedding);
    q real[];
    v jsonb;
    t jsonb;
BEGIN
    IF s.fts_config IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: the sidecar of % keeps no full text for hybrid_search', source
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'It was watched with fts_config => NULL: use search(), or unwatch() and watch() it again with a text search configuration.';
    END IF;
    IF k IS NULL OR k < 0 OR candidates IS NULL OR candidates < k THEN
        RAISE EXCEPTION 'pg_embed_sidecar: hybrid_search() needs 0 <= k <= candidates (k %, candidates %)',
                        coalesce(k::text, 'NULL'), coalesce(candidates::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'candidates is how many rows each side ranks before they are fused.';
    END IF;
    q := embed_sidecar._embed_query(s.model, s.model_id, query);
    -- the caller was needed to find the target; code of others (policies, operators) runs next
    PERFORM embed_sidecar._leave();
    -- the vector side: the nearest rows, as search() finds them (filtered, at any selectivity)
    v := embed_sidecar._nearest(s, q, candidates, filter, callers_path);
    -- the text side: the best-ranked passages among the rows the filter lets through, as
    -- [key, rank, chunk, char_start, char_end] (with the caller's search_path, like the filter)
    t := embed_sidecar._run_filtered(format(
        'SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(c.key, c.rank, c.chunk, c.char_start, c.char_end)
                                              ORDER BY c.rank DESC, c.key), ''[]'')::text
           FROM (SELECT %s AS key, pg_catalog.ts_rank(sc.fts, tq, 1) AS rank, %s
                   FROM %s, embed_sidecar.any_words_tsquery(%s::pg_catalog.oid::pg_catalog.regconfig, %L) tq
                  WHERE sc.fts OPERATOR(pg_catalog.@@) tq AND sc.model OPERATOR(pg_catalog.=) %L
                  ORDER BY 2 DESC LIMIT %s) c',
        embed_sidecar._key_json(s, 'sc'),
        CASE WHEN s.chunk_tokens IS NOT NULL THEN 'sc.chunk, sc.char_start, sc.char_end'
             ELSE 'NULL::int AS chunk, NULL::int AS char_start, NULL::int AS char_end' END,
        embed_sidecar._filtered_sidecar(s, filter), s.fts_config::regconfig::oid, query, s.model_id, candidates),
        CASE WHEN filter IS NOT NULL THEN callers_path END);
    -- fused; a row ranks by its best passage on each side, and shows the passage of its vector
    -- side (else of its text side)
    RETURN QUERY
        WITH vs AS (SELECT h.value -> 0 AS key, h.ord::int AS r, (h.value ->> 2)::int AS chunk,
                           (h.value ->> 3)::int AS char_start, (h.value ->> 4)::int AS char_end
                      FROM jsonb_array_elements(v) WITH ORDINALITY AS h(value, ord)),
             fc AS (SELECT h.value -> 0 AS key, (h.value ->> 1)::float8 AS rank, (h.value ->> 2)::int AS chunk,
                           (h.value ->> 3)::int AS char_start, (h.value ->> 4)::int AS char_end
                      FROM jsonb_array_elements(t) AS h(value)),
             -- ranks come from an explicit ORDER BY: row_number() OVER () would only follow the
             -- subquery's order by accident of the plan
             fs AS (SELECT b.*, row_number() OVER (ORDER BY b.rank DESC, b.key)::int AS r
                      FROM (SELECT DISTINCT ON (fc.key) fc.* FROM fc ORDER BY fc.key, fc.rank DESC) b)
        SELECT coalesce(vs.key, fs.key),
               coalesce(vector_weight / (rrf_k + vs.r), 0) + coalesce(text_weight / (rrf_k + fs.r), 0),
               vs.r, fs.r,
               CASE WHEN vs.key IS NOT NULL THEN vs.chunk ELSE fs.chunk END,
               CASE WHEN vs.key IS NOT NULL THEN vs.char_start ELSE fs.char_start END,
               CASE WHEN vs.key IS NOT NULL THEN vs.char_end ELSE fs.char_end END
          FROM vs FULL JOIN fs ON vs.key = fs.key
         ORDER BY 2 DESC, 1 LIMIT k;
END
$$;

CREATE FUNCTION embed_sidecar.hybrid_search(
    source regclass, query text, k int DEFAULT 10,
    candidates int DEFAULT 100, vector_weight float8 DEFAULT 1.0, text_weight float8 DEFAULT 1.0,
    rrf_k int DEFAULT 60, embedding text DEFAULT NULL, filter text DEFAULT NULL)
    RETURNS TABLE (key jsonb, score float8, vector_rank int, text_rank int, chunk int, char_start int, char_end int)
    LANGUAGE sql VOLATILE
BEGIN ATOMIC
    SELECT * FROM embed_sidecar._hybrid_search(source, query, k, candidates, vector_weight, text_weight, rrf_k,
                                               embedding, filter, pg_catalog.current_setting('search_path'));
END;
COMMENT ON FUNCTION embed_sidecar.hybrid_search(regclass, text, int, int, float8, float8, int, text, text) IS
    'Vector and full-text candidates (among the rows the filter lets through) fused by reciprocal rank fusion: score = vector_weight/(rrf_k + vector_rank) + text_weight/(rrf_k + text_rank)';
