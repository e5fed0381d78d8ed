\echo Use "ALTER EXTENSION pg_embed_sidecar UPDATE TO '0.2.0'" to load this file. \quit
-- 0.1.0 -> 0.2.0 (issue 8): source and sidecar rows are read and written as the table's owner in a
-- security-restricted operation; statement triggers run with the writer's rights and enqueue
-- through embed_sidecar._enqueue; owner checks use the calling role; the registry's id sequence is
-- dumped; status no longer hashes every row (verify() does, on demand); wait() settles on empty
-- queues. Issue 11: a table can have several embeddings (a column or a template, each with its
-- own sidecar, queues and triggers), set_model() switches through a shadow sidecar. Issue 12: chunked
-- embeddings, one vector per passage (watch(..., chunking => true)). Watched tables
-- keep their sidecars, vectors, queues and pending messages; each becomes one embedding named after
-- its content column.

-- objects whose shape changed, or that are gone
DROP VIEW embed_sidecar.status;
DROP FUNCTION embed_sidecar._status(embed_sidecar.sources);
DROP FUNCTION embed_sidecar._enqueue_all(embed_sidecar.sources, boolean);
DROP FUNCTION embed_sidecar._drain_sql(embed_sidecar.sources);
DROP FUNCTION embed_sidecar._content_column(embed_sidecar.sources);
DROP FUNCTION embed_sidecar.pause(regclass);
-- (resume's SQL body depends on _owned_source(regclass): it goes first)
DROP FUNCTION embed_sidecar.resume(regclass), embed_sidecar._owned_source(regclass), embed_sidecar._source(regclass),
    embed_sidecar.watch(regclass, name, name, text, boolean, regconfig), embed_sidecar.unwatch(regclass, boolean),
    embed_sidecar.reembed(regclass), embed_sidecar.set_model(regclass, text), embed_sidecar.retry_failed(regclass),
    embed_sidecar._search_target(regclass), embed_sidecar.search(regclass, text, int),
    embed_sidecar.hybrid_search(regclass, text, int, int, float8, float8, int);

-- the registry's ids: an identity column's sequence is not carried by pg_dump for an extension's
-- table, a plain sequence marked with pg_extension_config_dump is
ALTER TABLE embed_sidecar.sources ALTER COLUMN id DROP IDENTITY;
CREATE SEQUENCE embed_sidecar.sources_id_seq AS int OWNED BY embed_sidecar.sources.id;
SELECT pg_catalog.setval('embed_sidecar.sources_id_seq', coalesce((SELECT max(id) FROM embed_sidecar.sources), 0) + 1, false);
ALTER TABLE embed_sidecar.sources ALTER COLUMN id SET DEFAULT nextval('embed_sidecar.sources_id_seq');
SELECT pg_catalog.pg_extension_config_dump('embed_sidecar.sources_id_seq', '');

-- the bulk lane's progress, and its own pause
ALTER TABLE embed_sidecar.sources ADD COLUMN bulk_total bigint NOT NULL DEFAULT 0, ADD COLUMN bulk_started_at timestamptz;
ALTER TABLE embed_sidecar.sources DROP CONSTRAINT sources_state_check,
    ADD CONSTRAINT sources_state_check CHECK (state IN ('active', 'paused', 'bulk_paused'));

-- several embeddings per table (issue 11): the existing one of each table is named after its column
ALTER TABLE embed_sidecar.sources DROP CONSTRAINT sources_source_key,
    ADD COLUMN embedding text, ADD COLUMN template text,
    ADD COLUMN role text NOT NULL DEFAULT 'current' CHECK (role IN ('current', 'shadow', 'previous')),
    ALTER COLUMN content_attnum DROP NOT NULL;
UPDATE embed_sidecar.sources s SET embedding = a.attname
  FROM pg_catalog.pg_attribute a WHERE a.attrelid = s.source AND a.attnum = s.content_attnum;
ALTER TABLE embed_sidecar.sources ALTER COLUMN embedding SET NOT NULL,
    ADD CONSTRAINT sources_source_embedding_role_key UNIQUE (source, embedding, role) DEFERRABLE,
    ADD CONSTRAINT sources_check CHECK ((content_attnum IS NULL) <> (template IS NULL));
COMMENT ON TABLE embed_sidecar.sources IS 'Embeddings kept by pg_embed_sidecar (one row per watched table, embedding and role)';

-- chunked embeddings (issue 12): passages of at most chunk_tokens model tokens, overlapping by chunk_overlap
ALTER TABLE embed_sidecar.sources ADD COLUMN chunk_tokens int CHECK (chunk_tokens > 0),
    ADD COLUMN chunk_overlap int CHECK (chunk_overlap >= 0),
    ADD CONSTRAINT sources_check1 CHECK ((chunk_tokens IS NULL) = (chunk_overlap IS NULL));
-- halfvec storage (issue 13)
ALTER TABLE embed_sidecar.sources
    ADD COLUMN vector_type text NOT NULL DEFAULT 'vector' CHECK (vector_type IN ('vector', 'halfvec')),
    ADD COLUMN index_pending boolean NOT NULL DEFAULT false;
-- an embedding without full text (issue 13: watch(..., fts_config => NULL))
ALTER TABLE embed_sidecar.sources ALTER COLUMN fts_config DROP NOT NULL;

-- new Rust functions
CREATE FUNCTION embed_sidecar."inference_service"() RETURNS TABLE (
	"workers" INT,  /* Option < i32 > */
	"texts" bigint,  /* Option < i64 > */
	"busy_seconds" double precision  /* Option < f64 > */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'inference_service_wrapper';
CREATE FUNCTION embed_sidecar."chunk_text"(
	"content" TEXT, /* Option < & str > */
	"model" TEXT DEFAULT NULL, /* Option < & str > */
	"chunk_tokens" INT DEFAULT NULL, /* Option < i32 > */
	"chunk_overlap" INT DEFAULT NULL /* Option < i32 > */
) RETURNS TABLE (
	"chunk" INT,  /* i32 */
	"char_start" INT,  /* i32 */
	"char_end" INT,  /* i32 */
	"tokens" INT,  /* i32 */
	"passage" TEXT  /* String */
)
STABLE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'chunk_text_wrapper';
CREATE FUNCTION embed_sidecar."_chunking"(
	"model" TEXT, /* & str */
	"chunk_tokens" INT, /* Option < i32 > */
	"chunk_overlap" INT, /* Option < i32 > */
	"fit" bool /* bool */
) RETURNS INT[] /* Vec < i32 > */
STABLE PARALLEL RESTRICTED 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'chunking_wrapper';
CREATE FUNCTION embed_sidecar."_installed_models"() RETURNS TABLE (
	"name" TEXT,  /* String */
	"model_id" TEXT,  /* Option < String > */
	"dims" INT,  /* Option < i32 > */
	"max_length" INT,  /* Option < i32 > */
	"size_bytes" bigint,  /* Option < i64 > */
	"error" TEXT  /* Option < String > */
)
STRICT VOLATILE PARALLEL RESTRICTED 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'installed_models_wrapper';
CREATE FUNCTION embed_sidecar."_calling_role"() RETURNS oid /* pg_sys :: Oid */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'calling_role_wrapper';

CREATE FUNCTION embed_sidecar."_enqueue"(
	"source_id" INT, /* i32 */
	"keys" TEXT[] /* Vec < Option < String > > */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'enqueue_wrapper';

CREATE FUNCTION embed_sidecar."_backfill"(
	"source_id" INT, /* i32 */
	"only_stale" bool /* bool */
) RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'backfill_wrapper';

CREATE FUNCTION embed_sidecar."_worker_state"() RETURNS TEXT /* & '_ str */
STRICT STABLE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_state_wrapper';

CREATE FUNCTION embed_sidecar."_announce_extension"() RETURNS void
STRICT VOLATILE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'announce_extension_wrapper';

-- ---- from sql/registry.sql ----
-- The bulk lane's queue of a source.
CREATE OR REPLACE FUNCTION embed_sidecar._bulk_queue(queue_name text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN queue_name || '_bulk';

-- NULL, empty and whitespace-only texts get no vector.
CREATE OR REPLACE FUNCTION embed_sidecar._is_blank(content text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN content IS NULL OR content ~ '^[[:space:]]*$';

-- ' AND sc.chunk = 0' for a chunked sidecar, so a join by key meets one row per source row: every
-- passage of a row carries the row's content_hash and model (all are written by one statement),
-- so the first stands for the row.
CREATE OR REPLACE FUNCTION embed_sidecar._row_filter(s embed_sidecar.sources, alias text) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN CASE WHEN s.chunk_tokens IS NULL THEN '' ELSE format(' AND %I.chunk = 0', alias) END;

-- The content hash stored next to each vector. The only place it is defined: the drain reads it
-- with the text, hands it back with the vector, and the write re-checks it against the row.
CREATE OR REPLACE FUNCTION embed_sidecar._content_hash(content text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN pg_catalog.sha256(pg_catalog.convert_to(content, 'UTF8'));

-- Quoted column names of a table, in key order, each prefixed by alias: 'n."id", n."lang"'.
CREATE OR REPLACE FUNCTION embed_sidecar._columns(rel regclass, attnums smallint[], alias text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format('%I.%I', alias, a.attname), ', ' ORDER BY k.ord)
      FROM unnest(attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum;
END;

-- 'l."id" = r."id" AND l."lang" = r."lang"'
CREATE OR REPLACE FUNCTION embed_sidecar._key_join(rel regclass, attnums smallint[], l text, r text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format('%I.%I = %I.%I', l, a.attname, r, a.attname), ' AND ' ORDER BY k.ord)
      FROM unnest(attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum;
END;

-- 'r."id" = (j->>0)::integer AND r."lang" = (j->>1)::text': match a key sent as a JSON array.
CREATE OR REPLACE FUNCTION embed_sidecar._key_from_json(rel regclass, attnums smallint[], r text, j text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format('%I.%I = (%I->>%s)::%s', r, a.attname, j, k.ord - 1,
                             pg_catalog.format_type(a.atttypid, a.atttypmod)), ' AND ' ORDER BY k.ord)
      FROM unnest(attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum;
END;

-- The content column as text, quoted and prefixed by alias. Refuses a column whose type is no
-- longer a text type (ALTER COLUMN ... TYPE after watch()): casting any other type to text could
-- call a cast function its owner wrote.
CREATE OR REPLACE FUNCTION embed_sidecar._content_expr(rel regclass, attnum smallint, alias text) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a pg_attribute;
BEGIN
    SELECT * INTO a FROM pg_attribute WHERE attrelid = rel AND pg_attribute.attnum = _content_expr.attnum AND NOT attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pg_embed_sidecar: content column of % is gone', rel USING ERRCODE = 'undefined_column';
    END IF;
    IF a.atttypid NOT IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: column "%" of % is of type %, not text', a.attname, rel, a.atttypid::regtype
            USING ERRCODE = 'datatype_mismatch', HINT = 'Watch a text or varchar column (a generated column can combine others).';
    END IF;
    RETURN format('%I.%I::text', alias, a.attname);
END
$$;

-- The columns of a compiled template ('{3}: {4}' -> {3,4}).
CREATE OR REPLACE FUNCTION embed_sidecar._template_attnums(template text) RETURNS smallint[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ARRAY(SELECT m[1]::smallint FROM regexp_matches(template, '\{([0-9]+)\}', 'g') AS m);

-- The content of a source as a text expression prefixed by alias: its column (attnum), or its
-- template with each {attnum} replaced by that column (NULL as empty) and the rest kept literally.
CREATE OR REPLACE FUNCTION embed_sidecar._content_sql(rel regclass, attnum smallint, template text, alias text) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    literals text[];
    nums smallint[];
    expr text;
BEGIN
    IF template IS NULL THEN
        RETURN embed_sidecar._content_expr(rel, attnum, alias);
    END IF;
    literals := regexp_split_to_array(template, '\{[0-9]+\}');
    nums := embed_sidecar._template_attnums(template);
    expr := format('concat(%L', literals[1]);
    FOR i IN 1 .. coalesce(cardinality(nums), 0) LOOP
        expr := expr || format(', %s, %L', embed_sidecar._content_expr(rel, nums[i], alias), literals[i + 1]);
    END LOOP;
    RETURN expr || ')';
END
$$;

-- Whether the calling role (after SET ROLE, before any SECURITY DEFINER function) may act as the
-- table's owner. Management functions are SECURITY DEFINER (they write the registry and the pgmq
-- schema), so they ask embed_sidecar._calling_role() instead of current_user or session_user.
CREATE OR REPLACE FUNCTION embed_sidecar._check_owner(rel regclass) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT pg_has_role(embed_sidecar._calling_role(), (SELECT relowner FROM pg_class WHERE oid = rel), 'USAGE') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: must be owner of table %', rel
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only the owner of a table (or a member of its owner role) can watch or manage it.';
    END IF;
END
$$;

-- The registry row of one embedding of a watched table: the one named (role 'current' unless
-- asked otherwise), or, when none is named, the table's only one.
CREATE OR REPLACE FUNCTION embed_sidecar._source(rel regclass, embedding text DEFAULT NULL, role text DEFAULT 'current')
    RETURNS embed_sidecar.sources
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
    n int;
    names text;
BEGIN
    IF embedding IS NULL THEN
        SELECT count(*), string_agg(format('%L', x.embedding), ', ' ORDER BY x.embedding) INTO n, names
          FROM embed_sidecar.sources x WHERE x.source = rel AND x.role = 'current';
        IF n > 1 THEN
            RAISE EXCEPTION 'pg_embed_sidecar: table % has several embeddings: %', rel, names
                USING ERRCODE = 'ambiguous_parameter', HINT = 'Name one with embedding => ''...''.';
        END IF;
        SELECT x.embedding INTO embedding FROM embed_sidecar.sources x WHERE x.source = rel AND x.role = 'current';
    END IF;
    SELECT * INTO s FROM embed_sidecar.sources x
     WHERE x.source = rel AND x.embedding = _source.embedding AND x.role = _source.role;
    IF NOT FOUND THEN
        IF NOT EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.source = rel) THEN
            RAISE EXCEPTION 'pg_embed_sidecar: table % is not watched', rel
                USING ERRCODE = 'undefined_object', HINT = 'Watch it first with embed_sidecar.watch().';
        ELSIF role = 'current' THEN
            RAISE EXCEPTION 'pg_embed_sidecar: table % has no embedding %', rel, coalesce(quote_literal(embedding), 'NULL')
                USING ERRCODE = 'undefined_object', HINT = 'See embed_sidecar.status for its embeddings.';
        ELSE
            RAISE EXCEPTION 'pg_embed_sidecar: embedding % of table % has no % version', quote_literal(embedding), rel, role
                USING ERRCODE = 'undefined_object',
                      HINT = CASE role WHEN 'previous' THEN 'There is one only after set_model() has completed a switch, until drop_previous().'
                                       ELSE 'set_model() starts one.' END;
        END IF;
    END IF;
    RETURN s;
END
$$;

-- The registry row of a watched table's embedding the calling role may manage.
CREATE OR REPLACE FUNCTION embed_sidecar._owned_source(rel regclass, embedding text DEFAULT NULL) RETURNS embed_sidecar.sources
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM embed_sidecar._check_owner(rel);
    RETURN embed_sidecar._source(rel, embedding);
END
$$;

-- The registry row of a watched table's embedding, for a caller who may read the table (search,
-- verify).
CREATE OR REPLACE FUNCTION embed_sidecar._readable_source(rel regclass, embedding text DEFAULT NULL) RETURNS embed_sidecar.sources
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._source(rel, embedding);
BEGIN
    IF NOT has_table_privilege(embed_sidecar._calling_role(), s.sidecar, 'SELECT') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: permission denied for table %', s.sidecar USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN s;
END
$$;

-- ---- from sql/triggers.sql ----
-- The statement-level triggers on a watched table. They run with the writer's own rights (not
-- SECURITY DEFINER): whatever the table's owner planted in a key's type (a cast to json, say)
-- runs as the writer, exactly as the owner's own triggers would. The one privileged step,
-- putting keys on the queue, is embed_sidecar._enqueue (src/enqueue.rs), which checks that the
-- writer may write the table.
--
-- Arguments, fixed by watch(): source id, content attnum ('' with a template), key attnums
-- ('{1,2}'), template ('' without).
-- One embed_sidecar._enqueue call per statement, carrying keys only. An UPDATE enqueues only rows
-- whose content is distinct from before (a row whose key changed has no OLD partner and counts
-- as changed).
CREATE OR REPLACE FUNCTION embed_sidecar._enqueue_changes() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_nums smallint[] := TG_ARGV[2]::smallint[];
    keys text := embed_sidecar._columns(TG_RELID, key_nums, 'n');
    attnum smallint := nullif(TG_ARGV[1], '')::smallint;
    template text := nullif(TG_ARGV[3], '');
    content_new text := embed_sidecar._content_sql(TG_RELID, attnum, template, 'n');
    batch text[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE format('SELECT array_agg(jsonb_build_array(%s)::text) FROM new_rows n WHERE NOT embed_sidecar._is_blank(%s)',
                       keys, content_new)
           INTO batch;
    ELSE
        EXECUTE format('SELECT array_agg(jsonb_build_array(%s)::text) FROM new_rows n LEFT JOIN old_rows o ON %s
                         WHERE %s IS DISTINCT FROM %s',
                       keys, embed_sidecar._key_join(TG_RELID, key_nums, 'o', 'n'),
                       embed_sidecar._content_sql(TG_RELID, attnum, template, 'o'), content_new)
           INTO batch;
    END IF;
    IF batch IS NOT NULL THEN
        PERFORM embed_sidecar._enqueue(TG_ARGV[0]::int, batch);
    END IF;
    RETURN NULL;
END
$$;

-- The SELECT that lists a source's keys for a backfill (run by embed_sidecar._backfill as the
-- table's owner): $1 only rows whose stored hash or model is not current, $2 current model_id.
CREATE OR REPLACE FUNCTION embed_sidecar._backfill_sql(s embed_sidecar.sources) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT format(
        'SELECT jsonb_build_array(%s)::text
           FROM %s src LEFT JOIN %s sc ON %s%s
          WHERE NOT embed_sidecar._is_blank(%s)
            AND (NOT $1 OR sc.content_hash IS DISTINCT FROM embed_sidecar._content_hash(%s)
                        OR sc.model IS DISTINCT FROM $2)',
        embed_sidecar._columns(s.source, s.key_attnums, 'src'), s.source, s.sidecar,
        embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src'), embed_sidecar._row_filter(s, 'sc'),
        embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src'),
        embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src'));
END;

-- ---- from sql/drain.sql ----
-- The drain's SQL half (the pass itself is src/drain.rs). Queue and registry statements run as
-- the worker (or process()'s definer); the statements below touch the source and sidecar rows and
-- run as the source table's owner inside a security-restricted operation (src/authority.rs), so
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
--   clear:  $1 keys jsonb[] whose content turned blank
CREATE OR REPLACE FUNCTION embed_sidecar._drain_sql(s embed_sidecar.sources,
    OUT lookup_sql text, OUT upsert_sql text, OUT clear_sql text, OUT trim_sql text)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    content text := embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src');
    -- the sidecar's vector type, schema-qualified: vectors arrive as real[] and are cast to it
    vec_type text := format('%I.%I', (SELECT extnamespace::regnamespace::name FROM pg_extension WHERE extname = 'vector'),
                            s.vector_type);
    key_src text := embed_sidecar._key_from_json(s.source, s.key_attnums, 'src', '_pes_key');
    src_cols text := embed_sidecar._columns(s.source, s.key_attnums, 'src');
    key_cols text;
BEGIN
    -- sidecar key columns are named like the source's; strip the alias for the INSERT column list
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY k.ord) INTO key_cols
      FROM unnest(s.key_attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = s.source AND a.attnum = k.attnum;
    lookup_sql := format(
        'SELECT v._pes_key::text, embed_sidecar._is_blank(%1$s) AS blank,
                coalesce(sc.content_hash = embed_sidecar._content_hash(%1$s) AND sc.model = $2, false) AS unchanged,
                %1$s AS content, embed_sidecar._content_hash(%1$s) AS hash, %6$s AS known
           FROM unnest($1::jsonb[]) AS v(_pes_key)
                LEFT JOIN %2$s src ON %3$s
                LEFT JOIN %4$s sc ON %5$s%7$s',
        content, s.source, key_src, s.sidecar, embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src'),
        CASE WHEN s.chunk_tokens IS NULL THEN 'NULL::text[]'
             ELSE format('ARRAY(SELECT encode(k.chunk_hash, ''hex'') FROM %s k WHERE %s AND k.model = $2)',
                         s.sidecar, embed_sidecar._key_join(s.source, s.key_attnums, 'k', 'src')) END,
        embed_sidecar._row_filter(s, 'sc'));
    -- Locks are taken in the key's own order (not the JSON text's, where [10] sorts before [9]),
    -- the order in which a multi-row DELETE or UPDATE by key locks the same rows.
    IF s.chunk_tokens IS NULL THEN
        upsert_sql := format(
            'WITH w AS (
               INSERT INTO %1$s AS sc (%2$s, embedding, model, content_hash, fts, embedded_at)
               SELECT %3$s, ($3[((v.ord - 1) * $4 + 1):(v.ord * $4)])::%4$s, $5, v.hash,
                      to_tsvector($6::regconfig, left(%5$s, 100000)), now()
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
                      $5, v.hash, to_tsvector($6::regconfig, c.txt), coalesce(o.embedded_at, now())
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
            embed_sidecar._key_join(s.source, s.key_attnums, 'o', 'src'));
        trim_sql := format(
            'DELETE FROM %1$s sc USING unnest($1::jsonb[], $2::bytea[], $7::jsonb[]) AS v(_pes_key, hash, chunks), %2$s src
              WHERE %3$s AND %4$s AND sc.chunk >= jsonb_array_length(v.chunks)
                AND embed_sidecar._content_hash(%5$s) = v.hash',
            s.sidecar, s.source, key_src, embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src'), content);
    END IF;
    clear_sql := format(
        'DELETE FROM %1$s sc USING unnest($1::jsonb[]) AS v(_pes_key), %2$s src
          WHERE %3$s AND %4$s AND embed_sidecar._is_blank(%5$s)',
        s.sidecar, s.source, key_src, embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src'), content);
END
$$;

CREATE TYPE embed_sidecar._looked_up AS (key text, blank boolean, unchanged boolean, content text, hash bytea, known text[], error text);

-- Run the lookup for all keys at once; if that fails (a policy or domain check that raises for
-- some row), once per key, so a bad row is reported on its own and the rows around it proceed.
CREATE OR REPLACE FUNCTION embed_sidecar._lookup(lookup_sql text, keys jsonb[], model_id text) RETURNS SETOF embed_sidecar._looked_up
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
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
CREATE OR REPLACE FUNCTION embed_sidecar._write(upsert_sql text, clear_sql text, keys jsonb[], hashes bytea[], vectors real[],
                                     dims int, model_id text, fts regconfig, clear_keys jsonb[],
                                     trim_sql text, chunks jsonb[],
                                     OUT written bigint, OUT failed_keys jsonb[], OUT failed_errors text[])
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int := coalesce(cardinality(keys), 0);
    w bigint;
BEGIN
    written := 0;
    failed_keys := '{}';
    failed_errors := '{}';
    IF coalesce(cardinality(clear_keys), 0) > 0 THEN
        BEGIN
            EXECUTE clear_sql USING clear_keys;
        EXCEPTION WHEN OTHERS THEN
            failed_keys := clear_keys;
            failed_errors := array_fill(SQLERRM, ARRAY[cardinality(clear_keys)]);
        END;
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
    FOR i IN 1 .. n LOOP
        BEGIN
            EXECUTE upsert_sql INTO w
              USING keys[i:i], hashes[i:i], CASE WHEN chunks IS NULL THEN vectors[(i - 1) * dims + 1 : i * dims] ELSE vectors END,
                    dims, model_id, fts, chunks[i:i];
            IF trim_sql IS NOT NULL THEN
                EXECUTE trim_sql USING keys[i:i], hashes[i:i], vectors, dims, model_id, fts, chunks[i:i];
            END IF;
            written := written + w;
        EXCEPTION WHEN OTHERS THEN
            failed_keys := failed_keys || keys[i];
            failed_errors := failed_errors || SQLERRM;
        END;
    END LOOP;
END
$$;

-- ---- from sql/manage.sql ----
-- Managing watched tables: watch/unwatch, re-embedding, model changes, dead-letter replay,
-- pause/resume and process(). These are SECURITY DEFINER (they write the registry and pgmq's
-- schema) and check first that the calling role may act as the table's owner
-- (embed_sidecar._check_owner). They never read or write the source or sidecar rows themselves:
-- that is the drain's and the backfill's job, done as the table's owner (src/authority.rs).

-- The statement triggers of one embedding (see triggers.sql), named by its registry id.
CREATE OR REPLACE FUNCTION embed_sidecar._create_triggers(s embed_sidecar.sources) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    args text := format('%s, %L, %L, %L', s.id, coalesce(s.content_attnum::text, ''), s.key_attnums, coalesce(s.template, ''));
BEGIN
    EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes(%s)',
                   'embed_sidecar_' || s.id || '_insert', s.source, args);
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes(%s)',
                   'embed_sidecar_' || s.id || '_update', s.source, args);
END
$$;

-- One embedding of a table: its sidecar (keyed like the table, same owner and grants), registry
-- row, two queues and triggers; then the existing rows go on the bulk lane. Shared by watch() and
-- set_model() (a shadow). Without sidecar_name the sidecar is called <table>_embeddings_<id>.
CREATE OR REPLACE FUNCTION embed_sidecar._create_embedding(source regclass, embedding text, role text, content_attnum smallint,
    template text, key_nums smallint[], sidecar_name name, model text, fts_config regconfig, backfill boolean,
    chunk_tokens int, chunk_overlap int, vector_type text)
    RETURNS embed_sidecar.sources
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel        pg_class := (SELECT c FROM pg_class c WHERE c.oid = source);
    vec_schema name := (SELECT extnamespace::regnamespace::name FROM pg_extension WHERE extname = 'vector');
    ident      record;
    queued     bigint := 0;
    s          embed_sidecar.sources;
    side       regclass;
    key_defs   text;
    key_cols   text;
    g          record;
BEGIN
    SELECT m.model_id, m.dims INTO ident FROM embed_sidecar._model_identity(model) m;
    -- the queue is named by the registry id: short (pgmq limits names) and free of user text.
    -- Taking the id first means the row goes in whole, so concurrent watch() calls never collide.
    s.id := nextval('embed_sidecar.sources_id_seq');
    sidecar_name := coalesce(sidecar_name, left(rel.relname, 40) || '_embeddings_' || s.id);
    IF to_regclass(format('%I.%I', rel.relnamespace::regnamespace, sidecar_name)) IS NOT NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: relation "%" already exists in schema %', sidecar_name, rel.relnamespace::regnamespace
            USING ERRCODE = 'duplicate_table', HINT = 'Pass another name as sidecar_name.';
    END IF;
    SELECT string_agg(format('%I %s NOT NULL', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
           string_agg(format('%I', a.attname), ', ' ORDER BY k.ord)
      INTO key_defs, key_cols
      FROM unnest(key_nums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = source AND a.attnum = k.attnum;

    -- chunked: one row per passage, keyed (source key, chunk number), with the passage's
    -- character offsets in the content and its own hash; content_hash stays the whole row's
    EXECUTE format(
        'CREATE TABLE %I.%I (%s, %s embedding %I.%I(%s) NOT NULL, model text NOT NULL, content_hash bytea NOT NULL,
                             %s fts tsvector, embedded_at timestamptz NOT NULL DEFAULT now(),
                             PRIMARY KEY (%s%s),
                             FOREIGN KEY (%s) REFERENCES %s (%s) ON DELETE CASCADE ON UPDATE CASCADE)',
        rel.relnamespace::regnamespace, sidecar_name, key_defs,
        CASE WHEN chunk_tokens IS NOT NULL THEN 'chunk int NOT NULL, char_start int NOT NULL, char_end int NOT NULL,' ELSE '' END,
        vec_schema, vector_type, ident.dims,
        CASE WHEN chunk_tokens IS NOT NULL THEN 'chunk_hash bytea NOT NULL,' ELSE '' END,
        key_cols, CASE WHEN chunk_tokens IS NOT NULL THEN ', chunk' ELSE '' END, key_cols, source, key_cols);
    side := format('%I.%I', rel.relnamespace::regnamespace, sidecar_name)::regclass;
    IF fts_config IS NOT NULL THEN
        EXECUTE format('CREATE INDEX ON %s USING gin (fts)', side);
    END IF;
    -- same owner and grants as the source
    -- (regrole's output is already a quoted identifier: %s, never %I or quote_ident on it)
    EXECUTE format('ALTER TABLE %s OWNER TO %s', side, rel.relowner::regrole);
    FOR g IN SELECT a.privilege_type, a.grantee FROM aclexplode(rel.relacl) a WHERE a.grantee <> rel.relowner LOOP
        EXECUTE format('GRANT %s ON %s TO %s', g.privilege_type, side,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
    END LOOP;

    INSERT INTO embed_sidecar.sources (id, source, embedding, role, content_attnum, template, key_attnums, sidecar,
                                       queue_name, model, model_id, dims, fts_config, chunk_tokens, chunk_overlap,
                                       vector_type)
    VALUES (s.id, source, embedding, role, content_attnum, template, key_nums, side,
            'embed_sidecar_' || s.id, model, ident.model_id, ident.dims, fts_config, chunk_tokens, chunk_overlap,
            vector_type)
    RETURNING * INTO s;
    -- A queue of these names can only be left over from an earlier installation of the extension
    -- (DROP EXTENSION does not drop pgmq's tables): its messages are not ours to replay.
    PERFORM pgmq.drop_queue(q.queue_name) FROM pgmq.list_queues() q
      WHERE q.queue_name IN (s.queue_name, embed_sidecar._bulk_queue(s.queue_name));
    PERFORM pgmq.create(s.queue_name);
    PERFORM pgmq.create(embed_sidecar._bulk_queue(s.queue_name));

    PERFORM embed_sidecar._create_triggers(s);
    IF backfill THEN
        queued := embed_sidecar._backfill(s.id, false);
    END IF;
    -- a large backfill goes faster without per-row index maintenance: the drain builds the index
    -- once the bulk lane is empty (_build_index_if_ready)
    IF current_setting('pg_embed_sidecar.bulk_index_rows')::int BETWEEN 1 AND queued THEN
        UPDATE embed_sidecar.sources SET index_pending = true WHERE id = s.id RETURNING * INTO s;
    ELSE
        PERFORM embed_sidecar._create_hnsw(s);
    END IF;
    RETURN s;
END
$$;

-- The sidecar's HNSW index (cosine, on its vector type).
CREATE OR REPLACE FUNCTION embed_sidecar._create_hnsw(s embed_sidecar.sources) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('CREATE INDEX ON %s USING hnsw (embedding %I.%I)', s.sidecar,
                   (SELECT extnamespace::regnamespace::name FROM pg_extension WHERE extname = 'vector'),
                   s.vector_type || '_cosine_ops');
END
$$;

-- Build a deferred HNSW index once the bulk lane is empty (called by the drain; a shadow is
-- promoted only after). One CREATE INDEX in the drain's transaction: searches see no index, then
-- the whole one. maintenance_work_mem is raised for the build, so the graph fits in memory (64k
-- vectors of 384 dimensions: ~120 MB), and put back after.
CREATE OR REPLACE FUNCTION embed_sidecar._build_index_if_ready(source_id int) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
    mem text := current_setting('maintenance_work_mem');
BEGIN
    SELECT * INTO s FROM embed_sidecar.sources WHERE id = source_id AND index_pending FOR UPDATE;
    IF NOT FOUND OR (SELECT queue_length FROM pgmq.metrics(embed_sidecar._bulk_queue(s.queue_name))) > 0 THEN
        RETURN false;
    END IF;
    IF pg_size_bytes(mem) < pg_size_bytes('512MB') THEN
        PERFORM set_config('maintenance_work_mem', '512MB', true);
    END IF;
    PERFORM embed_sidecar._create_hnsw(s);
    PERFORM set_config('maintenance_work_mem', mem, true);
    UPDATE embed_sidecar.sources SET index_pending = false WHERE id = s.id;
    RETURN true;
END
$$;

-- A text column of a table by name (_content_expr checks the type).
CREATE OR REPLACE FUNCTION embed_sidecar._text_column(source regclass, column_name name) RETURNS smallint
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    num smallint := (SELECT attnum FROM pg_attribute
                      WHERE attrelid = source AND attname = column_name AND attnum > 0 AND NOT attisdropped);
BEGIN
    IF num IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: column "%" of table % does not exist', column_name, source
            USING ERRCODE = 'undefined_column';
    END IF;
    PERFORM embed_sidecar._content_expr(source, num, 'x');
    RETURN num;
END
$$;

-- '{title}: {body}' -> '{2}: {3}': a template's columns by attribute number, so renames keep working.
CREATE OR REPLACE FUNCTION embed_sidecar._compile_template(source regclass, template text) RETURNS text
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parts text[] := regexp_split_to_array(template, '\{[^{}]*\}');
    names text[] := ARRAY(SELECT m[1] FROM regexp_matches(template, '\{([^{}]*)\}', 'g') AS m);
    compiled text := parts[1];
BEGIN
    IF cardinality(names) = 0 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: template % names no column', quote_literal(template)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Name columns in braces, e.g. ''{title}: {body}''.';
    END IF;
    FOR i IN 1 .. cardinality(names) LOOP
        compiled := compiled || '{' || embed_sidecar._text_column(source, names[i]) || '}' || parts[i + 1];
    END LOOP;
    RETURN compiled;
END
$$;

CREATE OR REPLACE FUNCTION embed_sidecar.watch(
    source regclass,
    content_column name DEFAULT NULL,
    sidecar_name name DEFAULT NULL,
    model text DEFAULT NULL,
    backfill boolean DEFAULT true,
    fts_config regconfig DEFAULT 'english',
    embedding text DEFAULT NULL,
    template text DEFAULT NULL,
    chunking boolean DEFAULT false,
    chunk_tokens int DEFAULT NULL,
    chunk_overlap int DEFAULT NULL,
    vector_type text DEFAULT 'vector'
) RETURNS regclass
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel        pg_class;
    key_nums   smallint[];
    is_first   boolean;
    chunk      int[];
BEGIN
    IF source IS NULL OR (content_column IS NULL) = (template IS NULL) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: watch() needs a source and either content_column or template'
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'e.g. watch(''docs'', ''body'') or watch(''docs'', template => ''{title}: {body}'', embedding => ''title_body'').';
    END IF;
    PERFORM embed_sidecar._check_owner(source);
    SELECT * INTO rel FROM pg_class WHERE oid = source;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is not a table', source USING ERRCODE = 'wrong_object_type';
    END IF;
    IF EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.sidecar = watch.source) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: table % is a sidecar table', source USING ERRCODE = 'wrong_object_type';
    END IF;
    IF template IS NOT NULL AND embedding IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: an embedding made from a template needs a name'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass embedding => ''...''.';
    END IF;
    embedding := coalesce(embedding, content_column);
    -- serialise watch() calls on one table, so two cannot both take the same embedding name
    -- (one bigint key: a lock space apart from the (class, source id) locks of the drain)
    PERFORM pg_advisory_xact_lock((1701667443::bigint << 32) | source::oid::bigint);
    IF EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.source = watch.source AND x.embedding = watch.embedding) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: table % already has an embedding %', source, quote_literal(embedding)
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Name another one (embedding => ''...''), change its model with set_model(), or unwatch() it first.';
    END IF;
    SELECT i.indkey::smallint[] INTO key_nums FROM pg_index i WHERE i.indrelid = source AND i.indisprimary;
    IF key_nums IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: table % has no primary key', source
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'The sidecar is keyed by the source''s primary key: add one (e.g. ALTER TABLE ... ADD PRIMARY KEY).';
    END IF;
    is_first := NOT EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.source = watch.source);
    model := coalesce(model, current_setting('pg_embed_sidecar.model'));
    IF coalesce(chunking, false) THEN
        chunk := embed_sidecar._chunking(model, chunk_tokens, chunk_overlap, false);
    ELSIF chunk_tokens IS NOT NULL OR chunk_overlap IS NOT NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: chunk_tokens and chunk_overlap apply to chunked embeddings only'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Add chunking => true.';
    END IF;
    IF vector_type IS NULL OR vector_type NOT IN ('vector', 'halfvec') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: vector_type must be ''vector'' or ''halfvec'', not %', coalesce(quote_literal(vector_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'halfvec stores each dimension in 2 bytes instead of 4 (README: "Performance" measures what it costs in recall).';
    END IF;
    RETURN (embed_sidecar._create_embedding(
        source, embedding, 'current',
        CASE WHEN template IS NULL THEN embed_sidecar._text_column(source, content_column) END,
        CASE WHEN template IS NOT NULL THEN embed_sidecar._compile_template(source, template) END,
        key_nums,
        -- the first embedding of a table gets the plain name
        coalesce(sidecar_name, CASE WHEN is_first THEN left(rel.relname, 52) || '_embeddings' END),
        model, fts_config, backfill, chunk[1], chunk[2], vector_type)).sidecar;
END
$$;
COMMENT ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text) IS
    'Create a sidecar table, queues and triggers for one embedding of a table (a column or a template; chunked into passages or one vector per row; vector or halfvec), and enqueue its existing rows';

CREATE OR REPLACE FUNCTION embed_sidecar.unwatch(source regclass, drop_sidecar boolean DEFAULT false, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    s embed_sidecar.sources;
BEGIN
    FOR s IN SELECT * FROM embed_sidecar.sources x WHERE x.source = cur.source AND x.embedding = cur.embedding ORDER BY x.id LOOP
        -- First wait for a drain writing this source, and keep the next one out: its write holds
        -- the source's advisory lock (src/drain.rs, 0x656d6273 = "embs") and then the sidecar and
        -- source, and ends by updating the registry row deleted here; in the other order the two
        -- deadlock.
        PERFORM pg_advisory_xact_lock(1701667443, s.id);
        -- a shadow or previous sidecar is the extension's own working copy: it goes
        PERFORM embed_sidecar._forget(s, drop_sidecar OR s.role <> 'current');
    END LOOP;
END
$$;

-- Remove everything watch() made except, unless asked, the sidecar table. Tolerates pieces that
-- are already gone (used by the sql_drop event trigger too).
CREATE OR REPLACE FUNCTION embed_sidecar._forget(s embed_sidecar.sources, drop_sidecar boolean) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM embed_sidecar.sources WHERE id = s.id;
    IF EXISTS (SELECT 1 FROM pg_class WHERE oid = s.source) THEN
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'embed_sidecar_' || s.id || '_insert', s.source);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'embed_sidecar_' || s.id || '_update', s.source);
    END IF;
    PERFORM pgmq.drop_queue(q.queue_name) FROM pgmq.list_queues() q
      WHERE q.queue_name IN (s.queue_name, embed_sidecar._bulk_queue(s.queue_name));
    IF drop_sidecar AND EXISTS (SELECT 1 FROM pg_class WHERE oid = s.sidecar) THEN
        EXECUTE format('DROP TABLE %s', s.sidecar);
    END IF;
END
$$;

-- Re-embed rows whose stored model or content hash is not current. Reloads the model identity
-- first, so a replaced model file (new hash) is noticed. Returns the number of keys enqueued.
CREATE OR REPLACE FUNCTION embed_sidecar.reembed(source regclass, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
BEGIN
    UPDATE embed_sidecar.sources SET model_id = (SELECT m.model_id FROM embed_sidecar._model_identity(s.model) m)
     WHERE id = s.id RETURNING * INTO s;
    RETURN embed_sidecar._backfill(s.id, true);
END
$$;

-- Switch an embedding to another model, of any dimension, with no gap: a shadow sidecar is built
-- in the bulk lane (live edits reach it through its own triggers) while searches keep using the
-- current one with its own model; when the shadow's queues are empty it takes over in one
-- transaction (_promote_if_ready, run by the drain) and the replaced one is kept, in step, for
-- rollback_model() until drop_previous(). A switch in progress, and the previous one, make way for
-- this one. Returns the number of rows the shadow has to embed.
CREATE OR REPLACE FUNCTION embed_sidecar.set_model(source regclass, model text, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    old embed_sidecar.sources;
    shadow embed_sidecar.sources;
    chunk int[];
BEGIN
    IF model IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: model must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    FOR old IN SELECT * FROM embed_sidecar.sources x
                WHERE x.source = cur.source AND x.embedding = cur.embedding AND x.role <> 'current' LOOP
        PERFORM pg_advisory_xact_lock(1701667443, old.id);  -- as in unwatch()
        PERFORM embed_sidecar._forget(old, true);
    END LOOP;
    -- a chunked embedding stays chunked, its passages cut to the new model's window if smaller
    chunk := CASE WHEN cur.chunk_tokens IS NOT NULL
                  THEN embed_sidecar._chunking(model, cur.chunk_tokens, cur.chunk_overlap, true) END;
    shadow := embed_sidecar._create_embedding(cur.source, cur.embedding, 'shadow', cur.content_attnum, cur.template,
                                              cur.key_attnums, NULL, model, cur.fts_config, true, chunk[1], chunk[2],
                                              cur.vector_type);
    UPDATE embed_sidecar.sources SET state = cur.state WHERE id = shadow.id;
    -- nothing to embed (an empty table): it takes over now
    PERFORM embed_sidecar._promote_if_ready(shadow.id);
    RETURN (SELECT x.bulk_total FROM embed_sidecar.sources x WHERE x.id = shadow.id);
END
$$;

-- Swap a complete shadow in (called by the drain when a pass finds its lanes empty, and by
-- set_model): in one statement the current embedding becomes 'previous' and the shadow 'current'.
-- Not while rows are dead-lettered: those would have no vector (status shows them; retry_failed()).
CREATE OR REPLACE FUNCTION embed_sidecar._promote_if_ready(source_id int) RETURNS boolean
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
    p embed_sidecar.sources;
BEGIN
    SELECT * INTO s FROM embed_sidecar.sources WHERE id = source_id AND role = 'shadow' FOR UPDATE;
    IF NOT FOUND OR s.index_pending
       OR EXISTS (SELECT 1 FROM embed_sidecar.failures f WHERE f.source_id = s.id)
       OR (SELECT queue_length FROM pgmq.metrics(s.queue_name)) > 0
       OR (SELECT queue_length FROM pgmq.metrics(embed_sidecar._bulk_queue(s.queue_name))) > 0 THEN
        RETURN false;
    END IF;
    -- a rollback during the build left a previous one: the new switch replaces it
    FOR p IN SELECT * FROM embed_sidecar.sources x WHERE x.source = s.source AND x.embedding = s.embedding AND x.role = 'previous' LOOP
        PERFORM embed_sidecar._forget(p, true);
    END LOOP;
    UPDATE embed_sidecar.sources SET role = CASE role WHEN 'shadow' THEN 'current' ELSE 'previous' END
     WHERE source = s.source AND embedding = s.embedding AND role IN ('shadow', 'current');
    RAISE LOG 'pg_embed_sidecar: % of % now uses model %', quote_literal(s.embedding), s.source, s.model_id;
    RETURN true;
END
$$;

-- Undo the last switch: the previous embedding becomes current again and the current one previous
-- (both were kept in step, so either way round is complete). Returns the sidecar now in use.
CREATE OR REPLACE FUNCTION embed_sidecar.rollback_model(source regclass, embedding text DEFAULT NULL) RETURNS regclass
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    prev embed_sidecar.sources := embed_sidecar._source(source, cur.embedding, 'previous');
BEGIN
    UPDATE embed_sidecar.sources SET role = CASE role WHEN 'previous' THEN 'current' ELSE 'previous' END
     WHERE id IN (cur.id, prev.id);
    RETURN prev.sidecar;
END
$$;

-- Drop what the last switch replaced (its sidecar, queues and triggers): no more rollback.
CREATE OR REPLACE FUNCTION embed_sidecar.drop_previous(source regclass, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    prev embed_sidecar.sources := embed_sidecar._source(source, cur.embedding, 'previous');
BEGIN
    PERFORM pg_advisory_xact_lock(1701667443, prev.id);  -- as in unwatch()
    PERFORM embed_sidecar._forget(prev, true);
END
$$;

-- Put dead-lettered rows of an embedding (all its versions) back on their queues. Returns how many.
CREATE OR REPLACE FUNCTION embed_sidecar.retry_failed(source regclass, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    s embed_sidecar.sources;
    keys jsonb[];
    total bigint := 0;
BEGIN
    FOR s IN SELECT * FROM embed_sidecar.sources x WHERE x.source = cur.source AND x.embedding = cur.embedding LOOP
        WITH d AS (DELETE FROM embed_sidecar.failures f WHERE f.source_id = s.id RETURNING f.key)
        SELECT array_agg(key) INTO keys FROM d;
        IF keys IS NOT NULL THEN
            PERFORM pgmq.send_batch(s.queue_name, keys);
            total := total + cardinality(keys);
        END IF;
    END LOOP;
    RETURN total;
END
$$;

-- Paused sources keep enqueueing; only draining stops. bulk_only pauses just the bulk lane
-- (backfill, reembed, set_model): writers' changes keep being embedded, the backfill resumes where
-- it stopped. Applies to every version of the embedding (current, shadow, previous).
CREATE OR REPLACE FUNCTION embed_sidecar.pause(source regclass, bulk_only boolean DEFAULT false, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
BEGIN
    UPDATE embed_sidecar.sources SET state = CASE WHEN bulk_only THEN 'bulk_paused' ELSE 'paused' END
     WHERE sources.source = cur.source AND sources.embedding = cur.embedding;
END
$$;

CREATE OR REPLACE FUNCTION embed_sidecar.resume(source regclass, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
BEGIN
    UPDATE embed_sidecar.sources SET state = 'active' WHERE sources.source = cur.source AND sources.embedding = cur.embedding;
END
$$;

-- Raise 'not watched' unless the table has an embedding (for functions that act on all of them).
CREATE OR REPLACE FUNCTION embed_sidecar._check_watched(rel regclass) RETURNS void
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.source = rel) THEN
        PERFORM embed_sidecar._source(rel);
    END IF;
END
$$;

-- Drain queued changes in this session (no worker needed): the same code path the worker runs.
-- Returns the number of queue messages handled.
CREATE OR REPLACE FUNCTION embed_sidecar.process(source regclass DEFAULT NULL, max_rows int DEFAULT 1000) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
    done bigint := 0;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'pg_embed_sidecar: max_rows must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF source IS NOT NULL THEN
        PERFORM embed_sidecar._check_watched(source);
    END IF;
    FOR s IN SELECT * FROM embed_sidecar.sources x
              WHERE (process.source IS NULL OR x.source = process.source) ORDER BY x.id LOOP
        CONTINUE WHEN process.source IS NULL
                  AND NOT pg_has_role(embed_sidecar._calling_role(), (SELECT relowner FROM pg_class WHERE oid = s.source), 'USAGE');
        PERFORM embed_sidecar._check_owner(s.source);
        done := done + embed_sidecar._process(s.id, max_rows - done::int);
        EXIT WHEN done >= max_rows;
    END LOOP;
    RETURN done;
END
$$;

-- ---- from sql/status.sql ----
-- Monitoring: the status view (counters and queue metrics only: no scan of the source, so it costs
-- the same on a million rows as on ten), verify() (the full check, hashing every row, on demand)
-- and wait().

-- A watched table's backlog in both lanes, for callers who may read the table. SECURITY DEFINER
-- with a pinned search_path: readers may not read pgmq's tables, and pgmq.metrics() resolves names
-- through whatever search_path it is called with.
CREATE OR REPLACE FUNCTION embed_sidecar._queue_backlog(source_id int,
    OUT pending bigint, OUT oldest_pending_age interval, OUT bulk_pending bigint)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT l.queue_length, make_interval(secs => coalesce(l.oldest_msg_age_sec, 0)), b.queue_length
      FROM embed_sidecar.sources s, pgmq.metrics(s.queue_name) l, pgmq.metrics(embed_sidecar._bulk_queue(s.queue_name)) b
     WHERE s.id = _queue_backlog.source_id
       AND has_table_privilege(embed_sidecar._calling_role(), s.source, 'SELECT');
END;

-- pending / oldest_pending_age: the live lane (changes made by writers). bulk_*: the bulk lane
-- (backfills), with progress since it was last empty and an ETA from the rate so far.
-- coverage: the share of rows whose vector is current, estimated as what is neither queued nor
-- dead-lettered, against the statistics' row count (live tuples, the planner's estimate or the
-- backfill's size, whichever is largest); verify() counts exactly.
-- worker: whether this database's drain worker runs, and if not, why.
-- chunks: passages in a chunked sidecar (from the statistics, like coverage; verify() counts).
CREATE VIEW embed_sidecar.status AS
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
       s.last_embedded_at, s.acked, s.embedded AS vectors_written, s.dead_lettered, s.last_error, s.last_error_at,
       embed_sidecar._worker_state() AS worker,
       CASE WHEN s.chunk_tokens IS NOT NULL
            THEN greatest(pg_stat_get_live_tuples(s.sidecar), (SELECT reltuples::bigint FROM pg_class WHERE oid = s.sidecar), 0) END
           AS chunks
  FROM embed_sidecar.sources s
       JOIN pg_catalog.pg_class c ON c.oid = s.source,
       LATERAL embed_sidecar._queue_backlog(s.id) q,
       LATERAL (SELECT count(*) AS failed FROM embed_sidecar.failures x WHERE x.source_id = s.id) f
 WHERE has_table_privilege(s.source, 'SELECT');
COMMENT ON VIEW embed_sidecar.status IS 'One row per embedding of a watched table (and per version while a model switch runs): backlog in both lanes, coverage, bulk progress, failures, counters, last error, worker';

-- The consistency invariant for one source, computed from the rows themselves: how many rows have
-- content, how many vectors exist, how many are missing, stale (content or model changed) or
-- orphaned. For a chunked source a row is stale unless its passages are exactly what chunking its
-- current text gives (same hashes, in order, numbered from 0, all with the current model): this
-- re-tokenises every row. chunks: rows of the sidecar (passages, for a chunked source). Runs with
-- the caller's rights (it reads both tables).
CREATE OR REPLACE FUNCTION embed_sidecar.verify(source regclass, embedding text DEFAULT NULL,
    OUT source_rows bigint, OUT embedded_rows bigint, OUT missing bigint, OUT stale bigint, OUT orphans bigint,
    OUT chunks bigint)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._readable_source(source, embedding);
    content text := embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src');
    key_join text := embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src');
BEGIN
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
CREATE OR REPLACE FUNCTION embed_sidecar._queues_empty(source_id int) RETURNS boolean
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

CREATE OR REPLACE FUNCTION embed_sidecar.wait(source regclass DEFAULT NULL, timeout interval DEFAULT '60 seconds') RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + timeout;
    ids int[];
    -- polls every 20 ms at first (a test's few rows), backing off to 250 ms (a long backfill)
    nap float8 := 0.02;
BEGIN
    IF source IS NOT NULL THEN
        PERFORM embed_sidecar._check_watched(source);
    END IF;
    SELECT array_agg(x.id) INTO ids FROM embed_sidecar.sources x WHERE wait.source IS NULL OR x.source = wait.source;
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

-- ---- from sql/search.sql ----
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
CREATE OR REPLACE FUNCTION embed_sidecar._search_target(source regclass, embedding text,
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
    key_json := format('jsonb_build_array(%s)', embed_sidecar._columns(s.sidecar, s.key_attnums, 'sc'));
    SELECT format('%I.%I', n, s.vector_type), format('OPERATOR(%I.<=>)', n) INTO vec_type, dist_op
      FROM (SELECT extnamespace::regnamespace::name AS n FROM pg_extension WHERE extname = 'vector') x;
    fts_config := s.fts_config;
    chunked := s.chunk_tokens IS NOT NULL;
    passage_cols := CASE WHEN chunked THEN 'sc.chunk, sc.char_start, sc.char_end'
                         ELSE 'NULL::int AS chunk, NULL::int AS char_start, NULL::int AS char_end' END;
END
$$;

-- HNSW returns at most hnsw.ef_search rows: raise it for this query when more are asked for.
CREATE OR REPLACE FUNCTION embed_sidecar._widen_ef_search(wanted int) RETURNS text
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
CREATE OR REPLACE FUNCTION embed_sidecar._candidates(chunked boolean, k int) RETURNS int
    LANGUAGE sql IMMUTABLE
    RETURN CASE WHEN chunked THEN greatest(k * 5, 50) ELSE k END;

CREATE OR REPLACE FUNCTION embed_sidecar.search(source regclass, query text, k int DEFAULT 10, embedding text DEFAULT NULL)
    RETURNS TABLE (key jsonb, distance float8, chunk int, char_start int, char_end int)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record := embed_sidecar._search_target(source, embedding);
    q real[] := embed_sidecar._embed_with(t.model, query);
    n int := embed_sidecar._candidates(t.chunked, k);
    old text := embed_sidecar._widen_ef_search(n);
BEGIN
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
CREATE OR REPLACE FUNCTION embed_sidecar.any_words_tsquery(config regconfig, query text) RETURNS tsquery
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN nullif(replace(plainto_tsquery(config, query)::text, ' & ', ' | '), '')::tsquery;

CREATE OR REPLACE FUNCTION embed_sidecar.hybrid_search(
    source regclass, query text, k int DEFAULT 10,
    candidates int DEFAULT 100, vector_weight float8 DEFAULT 1.0, text_weight float8 DEFAULT 1.0,
    rrf_k int DEFAULT 60, embedding text DEFAULT NULL)
    RETURNS TABLE (key jsonb, score float8, vector_rank int, text_rank int, chunk int, char_start int, char_end int)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record := embed_sidecar._search_target(source, embedding);
    q real[];
    old text;
BEGIN
    IF t.fts_config IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: the sidecar of % keeps no full text for hybrid_search', source
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'It was watched with fts_config => NULL: use search(), or unwatch() and watch() it again with a text search configuration.';
    END IF;
    q := embed_sidecar._embed_with(t.model, query);
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

-- ---- from sql/events.sql ----
CREATE OR REPLACE FUNCTION embed_sidecar._on_sql_drop() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d record;
    s embed_sidecar.sources;
BEGIN
    FOR d IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type IN ('table', 'table column') LOOP
        FOR s IN SELECT * FROM embed_sidecar.sources x
                  WHERE (d.object_type = 'table' AND d.objid IN (x.source, x.sidecar))
                     OR (d.object_type = 'table column' AND d.objid = x.source
                         AND (d.objsubid = x.content_attnum OR d.objsubid = ANY (embed_sidecar._template_attnums(x.template)))) LOOP
            IF d.objid = s.source AND d.object_type = 'table' THEN
                -- derived data of a table that no longer exists
                PERFORM embed_sidecar._forget(s, true);
                RAISE NOTICE 'pg_embed_sidecar: % dropped; its sidecar and queue were dropped too', d.object_identity;
            ELSE
                PERFORM embed_sidecar._forget(s, false);
                RAISE WARNING 'pg_embed_sidecar: % dropped; stopped watching %', d.object_identity, s.source;
            END IF;
        END LOOP;
    END LOOP;
END
$$;
-- ---- from sql/api.sql ----
-- What watch(model => ...) and set_model() can use: every directory under
-- pg_embed_sidecar.model_path (models/install.sh puts the registry-verified ones there).
CREATE VIEW embed_sidecar.models AS
SELECT name, model_id, dims, max_length AS token_window, size_bytes, error FROM embed_sidecar._installed_models();
COMMENT ON VIEW embed_sidecar.models IS 'Installed models: name, identity, dimensions, token window, size on disk (or why unusable)';

-- ---- every watched table: its bulk lane, and its statement triggers with 0.2.0's names and arguments ----
DO $$
DECLARE
    s embed_sidecar.sources;
BEGIN
    FOR s IN SELECT * FROM embed_sidecar.sources LOOP
        -- a queue is pgmq's data, not part of this extension: what an extension script creates
        -- becomes a member (dropped with it, left out of pg_dump), so detach it again
        PERFORM pgmq.create(embed_sidecar._bulk_queue(s.queue_name));
        EXECUTE format('ALTER EXTENSION pg_embed_sidecar DROP TABLE pgmq.%I', 'q_' || embed_sidecar._bulk_queue(s.queue_name));
        EXECUTE format('ALTER EXTENSION pg_embed_sidecar DROP TABLE pgmq.%I', 'a_' || embed_sidecar._bulk_queue(s.queue_name));
        EXECUTE format('ALTER EXTENSION pg_embed_sidecar DROP SEQUENCE pgmq.%I', 'q_' || embed_sidecar._bulk_queue(s.queue_name) || '_msg_id_seq');
        EXECUTE format('DROP TRIGGER IF EXISTS embed_sidecar_insert ON %s', s.source);
        EXECUTE format('DROP TRIGGER IF EXISTS embed_sidecar_update ON %s', s.source);
        PERFORM embed_sidecar._create_triggers(s);
    END LOOP;
END
$$;

-- ---- from sql/privileges.sql ----
-- Runs last (finalize): who may call what.

-- Management is for table owners the administrator trusts: nothing here is PUBLIC.
REVOKE ALL ON ALL TABLES IN SCHEMA embed_sidecar FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA embed_sidecar FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA embed_sidecar FROM PUBLIC;
GRANT SELECT ON embed_sidecar.status, embed_sidecar.models TO PUBLIC;
GRANT EXECUTE ON FUNCTION embed_sidecar._search_target(regclass, text), embed_sidecar._readable_source(regclass, text),
    embed_sidecar._widen_ef_search(int), embed_sidecar._candidates(boolean, int), embed_sidecar.any_words_tsquery(regconfig, text),
    embed_sidecar.search(regclass, text, int, text),
    embed_sidecar.hybrid_search(regclass, text, int, int, float8, float8, int, text),
    embed_sidecar.verify(regclass, text), embed_sidecar._calling_role(), embed_sidecar._queue_backlog(int),
    embed_sidecar._worker_state(), embed_sidecar._installed_models() TO PUBLIC;
-- What the statement triggers run with the writer's rights (sql/triggers.sql); _enqueue checks
-- that the writer may write the table.
GRANT EXECUTE ON FUNCTION embed_sidecar._columns(regclass, smallint[], text), embed_sidecar._key_join(regclass, smallint[], text, text),
    embed_sidecar._content_expr(regclass, smallint, text), embed_sidecar._content_sql(regclass, smallint, text, text),
    embed_sidecar._template_attnums(text), embed_sidecar._is_blank(text),
    embed_sidecar._enqueue(int, text[]) TO PUBLIC;
-- What the drain runs as the table's owner (sql/drain.sql): SECURITY INVOKER helpers that only
-- execute the statements they are handed, with the rights of whoever calls them.
GRANT EXECUTE ON FUNCTION embed_sidecar._content_hash(text), embed_sidecar._key_from_json(regclass, smallint[], text, text),
    embed_sidecar._lookup(text, jsonb[], text),
    embed_sidecar._write(text, text, jsonb[], bytea[], real[], int, text, regconfig, jsonb[], text, jsonb[]) TO PUBLIC;
-- embedding is for everyone by default; revoke both to restrict it:
--   REVOKE EXECUTE ON FUNCTION embed_text(text), embed_sidecar._embed(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_sidecar._embed(text), embed_sidecar._embed_many(text[]), embed_sidecar._embed_with(text, text),
    embed_sidecar.model_info(), embed_sidecar.texts_embedded(), embed_sidecar.chunk_text(text, text, int, int),
    embed_sidecar.inference_service() TO PUBLIC;

-- The install script's last step: once it commits, the launcher starts this database's drain
-- worker (when the library is preloaded; src/launcher.rs).
SELECT embed_sidecar._announce_extension();
