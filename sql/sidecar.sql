-- The sidecar engine's SQL half: registry, dead-letter table, watch/unwatch, the triggers that
-- enqueue changed keys into pgmq, status and wait. The drain itself is Rust (src/drain.rs).
--
-- Every function here pins search_path and builds dynamic SQL only with format('%I' / %L) or
-- regclass/format_type output: nothing a user types is spliced into SQL.

CREATE TABLE embed_sidecar.sources (
    id               int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source           regclass NOT NULL UNIQUE,
    -- attribute numbers, not names: a renamed column keeps working
    content_attnum   smallint NOT NULL,
    key_attnums      smallint[] NOT NULL,
    sidecar          regclass NOT NULL UNIQUE,
    queue_name       text NOT NULL UNIQUE,
    model            text NOT NULL,             -- model directory name
    model_id         text NOT NULL,             -- name@sha256-prefix of the model file
    dims             int NOT NULL,
    fts_config       regconfig NOT NULL DEFAULT 'english',
    state            text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'paused')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- written by drainers only (never by the triggers, so writers never contend on this row)
    acked            bigint NOT NULL DEFAULT 0,
    dead_lettered    bigint NOT NULL DEFAULT 0,
    embedded         bigint NOT NULL DEFAULT 0,
    last_embedded_at timestamptz,
    last_error       text,
    last_error_at    timestamptz
);
COMMENT ON TABLE embed_sidecar.sources IS 'Tables watched by pg_embed_sidecar (one row per source)';

CREATE TABLE embed_sidecar.failures (
    source_id     int NOT NULL REFERENCES embed_sidecar.sources (id) ON DELETE CASCADE,
    key           jsonb NOT NULL,
    error         text NOT NULL,
    attempts      int NOT NULL,
    first_failed  timestamptz NOT NULL DEFAULT now(),
    last_failed   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_id, key)
);
COMMENT ON TABLE embed_sidecar.failures IS 'Dead letters: rows whose embedding failed max_attempts times';

SELECT pg_catalog.pg_extension_config_dump('embed_sidecar.sources', '');
SELECT pg_catalog.pg_extension_config_dump('embed_sidecar.failures', '');

-- NULL, empty and whitespace-only texts get no vector.
CREATE FUNCTION embed_sidecar._is_blank(content text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN content IS NULL OR content ~ '^[[:space:]]*$';

-- Quoted column names of a source, in key order, each prefixed by alias: 'n."id", n."lang"'.
CREATE FUNCTION embed_sidecar._columns(rel regclass, attnums smallint[], alias text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format('%I.%I', alias, a.attname), ', ' ORDER BY k.ord)
      FROM unnest(attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum;
END;

-- 'l."id" = r."id" AND l."lang" = r."lang"'
CREATE FUNCTION embed_sidecar._key_join(rel regclass, attnums smallint[], l text, r text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format('%I.%I = %I.%I', l, a.attname, r, a.attname), ' AND ' ORDER BY k.ord)
      FROM unnest(attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum;
END;

-- 'r."id" = (j->>0)::integer AND r."lang" = (j->>1)::text': match a key sent as a JSON array.
CREATE FUNCTION embed_sidecar._key_from_json(rel regclass, attnums smallint[], r text, j text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format('%I.%I = (%I->>%s)::%s', r, a.attname, j, k.ord - 1,
                             pg_catalog.format_type(a.atttypid, a.atttypmod)), ' AND ' ORDER BY k.ord)
      FROM unnest(attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum;
END;

CREATE FUNCTION embed_sidecar._content_column(s embed_sidecar.sources) RETURNS name
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT attname FROM pg_catalog.pg_attribute WHERE attrelid = s.source AND attnum = s.content_attnum;
END;

-- Statement-level trigger on INSERT and UPDATE: one pgmq.send_batch per statement, carrying keys
-- only. An UPDATE enqueues only rows whose content is distinct from before (a row whose key
-- changed has no OLD partner and counts as changed).
CREATE FUNCTION embed_sidecar._enqueue_changes() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
    sql text;
BEGIN
    SELECT * INTO s FROM embed_sidecar.sources WHERE id = TG_ARGV[0]::int;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        sql := format('SELECT pgmq.send_batch($1, array_agg(jsonb_build_array(%s)))
                         FROM new_rows n WHERE NOT embed_sidecar._is_blank(n.%I::text) HAVING count(*) > 0',
                      embed_sidecar._columns(s.source, s.key_attnums, 'n'), embed_sidecar._content_column(s));
    ELSE
        sql := format('SELECT pgmq.send_batch($1, array_agg(jsonb_build_array(%s)))
                         FROM new_rows n LEFT JOIN old_rows o ON %s
                        WHERE o.%I::text IS DISTINCT FROM n.%I::text HAVING count(*) > 0',
                      embed_sidecar._columns(s.source, s.key_attnums, 'n'),
                      embed_sidecar._key_join(s.source, s.key_attnums, 'o', 'n'),
                      embed_sidecar._content_column(s), embed_sidecar._content_column(s));
    END IF;
    EXECUTE sql USING s.queue_name;
    RETURN NULL;
END
$$;

-- Put every key of the source with non-blank content on the queue, in chunks of 10,000 keys per
-- message batch. Returns how many keys were enqueued.
CREATE FUNCTION embed_sidecar._enqueue_all(s embed_sidecar.sources, only_stale boolean) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE format(
        'WITH k AS (
             SELECT jsonb_build_array(%s) AS key, row_number() OVER () AS rn
               FROM %s src LEFT JOIN %s sc ON %s
              WHERE NOT embed_sidecar._is_blank(src.%I::text)
                AND (NOT $2 OR sc.content_hash IS DISTINCT FROM sha256(convert_to(src.%I::text, ''UTF8''))
                            OR sc.model IS DISTINCT FROM $3)),
              b AS (SELECT pgmq.send_batch($1, array_agg(key)) AS msg_id  -- one row per message sent
                      FROM k GROUP BY (rn - 1) / 10000)
         SELECT count(*) FROM b',
        embed_sidecar._columns(s.source, s.key_attnums, 'src'), s.source, s.sidecar,
        embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src'),
        embed_sidecar._content_column(s), embed_sidecar._content_column(s))
    INTO n USING s.queue_name, only_stale, s.model_id;
    RETURN n;
END
$$;

-- Management functions are SECURITY DEFINER (they write the registry and the pgmq schema), so they
-- check here that the logged-in user could act as the table's owner anyway.
CREATE FUNCTION embed_sidecar._check_owner(rel regclass) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = rel), 'USAGE') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: must be owner of table %', rel
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only the owner of a table (or a member of its owner role) can watch or manage it.';
    END IF;
END
$$;

CREATE FUNCTION embed_sidecar._source(rel regclass) RETURNS embed_sidecar.sources
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
BEGIN
    SELECT * INTO s FROM embed_sidecar.sources WHERE source = rel;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pg_embed_sidecar: table % is not watched', rel
            USING ERRCODE = 'undefined_object', HINT = 'Watch it first with embed_sidecar.watch().';
    END IF;
    RETURN s;
END
$$;

-- The registry row of a watched table the logged-in user may manage.
CREATE FUNCTION embed_sidecar._owned_source(rel regclass) RETURNS embed_sidecar.sources
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM embed_sidecar._check_owner(rel);
    RETURN embed_sidecar._source(rel);
END
$$;

CREATE FUNCTION embed_sidecar.watch(
    source regclass,
    content_column name,
    sidecar_name name DEFAULT NULL,
    model text DEFAULT NULL,
    backfill boolean DEFAULT true,
    fts_config regconfig DEFAULT 'english'
) RETURNS regclass
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel        pg_class;
    content_at pg_attribute;
    key_nums   smallint[];
    vec_schema name := (SELECT extnamespace::regnamespace::name FROM pg_extension WHERE extname = 'vector');
    ident      record;
    s          embed_sidecar.sources;
    side       regclass;
    key_defs   text;
    key_cols   text;
    g          record;
BEGIN
    IF source IS NULL OR content_column IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: source and content_column must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM embed_sidecar._check_owner(source);
    SELECT * INTO rel FROM pg_class WHERE oid = source;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is not a table', source USING ERRCODE = 'wrong_object_type';
    END IF;
    IF EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.source = watch.source) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: table % is already watched', source
            USING ERRCODE = 'duplicate_object', HINT = 'Use embed_sidecar.unwatch() first to change how it is watched.';
    END IF;
    IF EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.sidecar = watch.source) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: table % is a sidecar table', source USING ERRCODE = 'wrong_object_type';
    END IF;
    SELECT * INTO content_at FROM pg_attribute
     WHERE attrelid = source AND attname = content_column AND attnum > 0 AND NOT attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pg_embed_sidecar: column "%" of table % does not exist', content_column, source
            USING ERRCODE = 'undefined_column';
    END IF;
    IF content_at.atttypid NOT IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: column "%" is of type %, not text', content_column, content_at.atttypid::regtype
            USING ERRCODE = 'datatype_mismatch', HINT = 'Watch a text or varchar column (a generated column can combine others).';
    END IF;
    SELECT i.indkey::smallint[] INTO key_nums FROM pg_index i WHERE i.indrelid = source AND i.indisprimary;
    IF key_nums IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: table % has no primary key', source
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'The sidecar is keyed by the source''s primary key: add one (e.g. ALTER TABLE ... ADD PRIMARY KEY).';
    END IF;
    model := coalesce(model, current_setting('pg_embed_sidecar.model'));
    SELECT m.model_id, m.dims INTO ident FROM embed_sidecar._model_identity(model) m;

    sidecar_name := coalesce(sidecar_name, left(rel.relname, 52) || '_embeddings');
    IF to_regclass(format('%I.%I', rel.relnamespace::regnamespace, sidecar_name)) IS NOT NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: relation "%" already exists in schema %', sidecar_name, rel.relnamespace::regnamespace
            USING ERRCODE = 'duplicate_table', HINT = 'Pass another name as sidecar_name.';
    END IF;
    SELECT string_agg(format('%I %s NOT NULL', a.attname, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
           string_agg(format('%I', a.attname), ', ' ORDER BY k.ord)
      INTO key_defs, key_cols
      FROM unnest(key_nums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = source AND a.attnum = k.attnum;

    EXECUTE format(
        'CREATE TABLE %I.%I (%s, embedding %I.vector(%s) NOT NULL, model text NOT NULL, content_hash bytea NOT NULL,
                             fts tsvector, embedded_at timestamptz NOT NULL DEFAULT now(),
                             PRIMARY KEY (%s),
                             FOREIGN KEY (%s) REFERENCES %s (%s) ON DELETE CASCADE ON UPDATE CASCADE)',
        rel.relnamespace::regnamespace, sidecar_name, key_defs, vec_schema, ident.dims,
        key_cols, key_cols, source, key_cols);
    side := format('%I.%I', rel.relnamespace::regnamespace, sidecar_name)::regclass;
    EXECUTE format('CREATE INDEX ON %s USING hnsw (embedding %I.vector_cosine_ops)', side, vec_schema);
    EXECUTE format('CREATE INDEX ON %s USING gin (fts)', side);
    -- same owner and grants as the source
    EXECUTE format('ALTER TABLE %s OWNER TO %I', side, rel.relowner::regrole);
    FOR g IN SELECT a.privilege_type, a.grantee FROM aclexplode(rel.relacl) a WHERE a.grantee <> rel.relowner LOOP
        EXECUTE format('GRANT %s ON %s TO %s', g.privilege_type, side,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.grantee::regrole::text) END);
    END LOOP;

    INSERT INTO embed_sidecar.sources (source, content_attnum, key_attnums, sidecar, queue_name, model, model_id, dims, fts_config)
    VALUES (source, content_at.attnum, key_nums, side, 'pending', model, ident.model_id, ident.dims, fts_config)
    RETURNING * INTO s;
    -- the queue is named by the registry id: short (pgmq limits names) and free of user text
    UPDATE embed_sidecar.sources SET queue_name = 'embed_sidecar_' || s.id WHERE id = s.id RETURNING * INTO s;
    PERFORM pgmq.create(s.queue_name);

    EXECUTE format('CREATE TRIGGER embed_sidecar_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes(%s)', source, s.id);
    EXECUTE format('CREATE TRIGGER embed_sidecar_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes(%s)', source, s.id);
    IF backfill THEN
        PERFORM embed_sidecar._enqueue_all(s, false);
    END IF;
    RETURN side;
END
$$;
COMMENT ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig) IS
    'Create the sidecar table, queue and triggers for a source table, and enqueue its existing rows';

CREATE FUNCTION embed_sidecar.unwatch(source regclass, drop_sidecar boolean DEFAULT false) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._owned_source(source);
BEGIN
    PERFORM embed_sidecar._forget(s, drop_sidecar);
END
$$;

-- Remove everything watch() made except, unless asked, the sidecar table. Tolerates pieces that
-- are already gone (used by the sql_drop event trigger too).
CREATE FUNCTION embed_sidecar._forget(s embed_sidecar.sources, drop_sidecar boolean) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM embed_sidecar.sources WHERE id = s.id;
    IF EXISTS (SELECT 1 FROM pg_class WHERE oid = s.source) THEN
        EXECUTE format('DROP TRIGGER IF EXISTS embed_sidecar_insert ON %s', s.source);
        EXECUTE format('DROP TRIGGER IF EXISTS embed_sidecar_update ON %s', s.source);
    END IF;
    IF EXISTS (SELECT 1 FROM pgmq.list_queues() q WHERE q.queue_name = s.queue_name) THEN
        PERFORM pgmq.drop_queue(s.queue_name);
    END IF;
    IF drop_sidecar AND EXISTS (SELECT 1 FROM pg_class WHERE oid = s.sidecar) THEN
        EXECUTE format('DROP TABLE %s', s.sidecar);
    END IF;
END
$$;

-- Re-embed rows whose stored model or content hash is not current. Reloads the model identity
-- first, so a replaced model file (new hash) is noticed. Returns the number of keys enqueued.
CREATE FUNCTION embed_sidecar.reembed(source regclass) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._owned_source(source);
BEGIN
    UPDATE embed_sidecar.sources SET model_id = (SELECT m.model_id FROM embed_sidecar._model_identity(s.model) m)
     WHERE id = s.id RETURNING * INTO s;
    RETURN embed_sidecar._enqueue_all(s, true);
END
$$;

-- Switch a source to another model of the same dimension. Old vectors stay readable (and are
-- found by search) until each is replaced.
CREATE FUNCTION embed_sidecar.set_model(source regclass, model text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._owned_source(source);
    ident record;
BEGIN
    SELECT m.model_id, m.dims INTO ident FROM embed_sidecar._model_identity(model) m;
    IF ident.dims <> s.dims THEN
        RAISE EXCEPTION 'pg_embed_sidecar: model "%" has % dimensions, the sidecar of % has %', model, ident.dims, source, s.dims
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'A new dimension needs a new sidecar: embed_sidecar.unwatch(source, drop_sidecar => true), then watch() with the new model.';
    END IF;
    UPDATE embed_sidecar.sources SET model = set_model.model, model_id = ident.model_id WHERE id = s.id RETURNING * INTO s;
    RETURN embed_sidecar._enqueue_all(s, true);
END
$$;

-- Put dead-lettered rows back on the queue. Returns how many.
CREATE FUNCTION embed_sidecar.retry_failed(source regclass) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := embed_sidecar._owned_source(source);
    keys jsonb[];
BEGIN
    WITH d AS (DELETE FROM embed_sidecar.failures f WHERE f.source_id = s.id RETURNING f.key)
    SELECT array_agg(key) INTO keys FROM d;
    IF keys IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM pgmq.send_batch(s.queue_name, keys);
    RETURN cardinality(keys);
END
$$;

-- Paused sources keep enqueueing; only draining stops.
CREATE FUNCTION embed_sidecar.pause(source regclass) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE embed_sidecar.sources SET state = 'paused' WHERE id = (embed_sidecar._owned_source(source)).id;
END;

CREATE FUNCTION embed_sidecar.resume(source regclass) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE embed_sidecar.sources SET state = 'active' WHERE id = (embed_sidecar._owned_source(source)).id;
END;

-- The drain's three statements for one source, built once per pass (see src/drain.rs).
--   read:   $1 queue, $2 visibility timeout s, $3 how many, $4 current model_id
--   upsert: $1 keys jsonb[], $2 content hashes bytea[], $3 vectors real[] (flattened), $4 dims,
--           $5 model_id, $6 text search config
--   clear:  $1 keys jsonb[] whose content turned blank
CREATE FUNCTION embed_sidecar._drain_sql(s embed_sidecar.sources, OUT read_sql text, OUT upsert_sql text, OUT clear_sql text)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    content text := format('src.%I::text', embed_sidecar._content_column(s));
    vec_schema name := (SELECT extnamespace::regnamespace::name FROM pg_extension WHERE extname = 'vector');
    sc_cols text := embed_sidecar._columns(s.sidecar, s.key_attnums, 'x');
    key_cols text;
BEGIN
    IF content IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: content column of % is gone', s.source USING ERRCODE = 'undefined_column';
    END IF;
    -- sidecar key columns are named like the source's; strip the alias for the INSERT column list
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY k.ord) INTO key_cols
      FROM unnest(s.key_attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = s.source AND a.attnum = k.attnum;
    read_sql := format(
        'WITH m AS (SELECT msg_id, read_ct, message FROM pgmq.read($1, $2, $3))
         SELECT m.msg_id, m.read_ct, m.message::text,
                embed_sidecar._is_blank(%1$s) AS blank,
                coalesce(sc.content_hash = sha256(convert_to(%1$s, ''UTF8'')) AND sc.model = $4, false) AS unchanged,
                %1$s AS content
           FROM m LEFT JOIN %2$s src ON %3$s
                  LEFT JOIN %4$s sc ON %5$s
          ORDER BY m.msg_id',
        content, s.source, embed_sidecar._key_from_json(s.source, s.key_attnums, 'src', 'message'),
        s.sidecar, embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src'));
    upsert_sql := format(
        'WITH w AS (
           INSERT INTO %1$s AS sc (%2$s, embedding, model, content_hash, fts, embedded_at)
           SELECT %3$s, ($3[((v.ord - 1) * $4 + 1):(v.ord * $4)])::%4$I.vector, $5, v.hash,
                  to_tsvector($6::regconfig, left(%5$s, 100000)), now()
             FROM unnest($1::jsonb[], $2::bytea[]) WITH ORDINALITY AS v(key, hash, ord)
             JOIN %6$s src ON %7$s
            WHERE sha256(convert_to(%5$s, ''UTF8'')) = v.hash
              -- a row deleted (or re-written) by a concurrent transaction is skipped, not an
              -- FK error: the lock waits for it, then re-checks the row and the hash
              FOR KEY SHARE OF src
           ON CONFLICT (%2$s) DO UPDATE
              SET embedding = EXCLUDED.embedding, model = EXCLUDED.model, content_hash = EXCLUDED.content_hash,
                  fts = EXCLUDED.fts, embedded_at = EXCLUDED.embedded_at
           RETURNING 1)
         SELECT count(*) FROM w',
        s.sidecar, key_cols, embed_sidecar._columns(s.source, s.key_attnums, 'src'), vec_schema, content,
        s.source, embed_sidecar._key_from_json(s.source, s.key_attnums, 'src', 'key'));
    clear_sql := format(
        'DELETE FROM %1$s sc USING unnest($1::jsonb[]) AS v(key), %2$s src
          WHERE %3$s AND %4$s AND embed_sidecar._is_blank(%5$s)',
        s.sidecar, s.source, embed_sidecar._key_from_json(s.source, s.key_attnums, 'src', 'key'),
        embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src'), content);
END
$$;

-- Per-source health, computed live. `stale` counts vectors whose content or model changed.
CREATE FUNCTION embed_sidecar._status(s embed_sidecar.sources,
    OUT source_rows bigint, OUT embedded_rows bigint, OUT missing bigint, OUT stale bigint,
    OUT pending bigint, OUT oldest_pending_age interval, OUT recent_rows_per_second numeric)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    content text := format('src.%I::text', embed_sidecar._content_column(s));
    m record;
BEGIN
    -- callable through the status view by anyone: only for tables the logged-in user may read
    IF NOT has_table_privilege(session_user, s.source, 'SELECT') THEN
        RETURN;
    END IF;
    EXECUTE format(
        'SELECT count(*), count(sc.content_hash),
                count(*) FILTER (WHERE sc.content_hash IS NULL AND NOT embed_sidecar._is_blank(%1$s)),
                count(*) FILTER (WHERE sc.content_hash IS NOT NULL AND (embed_sidecar._is_blank(%1$s)
                                  OR sc.content_hash <> sha256(convert_to(%1$s, ''UTF8'')) OR sc.model <> $1)),
                round(count(*) FILTER (WHERE sc.embedded_at > now() - interval ''1 minute'') / 60.0, 1)
           FROM %2$s src LEFT JOIN %3$s sc ON %4$s',
        content, s.source, s.sidecar, embed_sidecar._key_join(s.source, s.key_attnums, 'sc', 'src'))
    INTO source_rows, embedded_rows, missing, stale, recent_rows_per_second USING s.model_id;
    SELECT * INTO m FROM pgmq.metrics(s.queue_name);
    pending := m.queue_length;
    oldest_pending_age := make_interval(secs => coalesce(m.oldest_msg_age_sec, 0));
END
$$;

CREATE VIEW embed_sidecar.status AS
SELECT s.source, s.sidecar, s.model_id AS model, s.state,
       st.source_rows, st.embedded_rows, st.missing, st.stale, st.pending,
       (SELECT count(*) FROM embed_sidecar.failures f WHERE f.source_id = s.id) AS failed,
       st.oldest_pending_age, s.last_embedded_at, st.recent_rows_per_second,
       s.acked, s.embedded AS vectors_written, s.dead_lettered, s.last_error, s.last_error_at
  FROM embed_sidecar.sources s, LATERAL embed_sidecar._status(s) st
 WHERE has_table_privilege(s.source, 'SELECT');
COMMENT ON VIEW embed_sidecar.status IS 'One row per watched table: rows, vectors, backlog, failures';

-- Block until the source (or every source, if NULL) is fully in step: queue empty, no missing and
-- no stale vectors. Returns false if the timeout passes first.
CREATE FUNCTION embed_sidecar.wait(source regclass DEFAULT NULL, timeout interval DEFAULT '60 seconds') RETURNS boolean
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + timeout;
    s embed_sidecar.sources;
    busy boolean;
BEGIN
    IF source IS NOT NULL THEN
        PERFORM embed_sidecar._source(source);
    END IF;
    LOOP
        busy := false;
        FOR s IN SELECT * FROM embed_sidecar.sources x WHERE wait.source IS NULL OR x.source = wait.source LOOP
            IF (SELECT queue_length FROM pgmq.metrics(s.queue_name)) > 0 THEN
                busy := true;
            ELSE
                busy := busy OR EXISTS (SELECT 1 FROM embed_sidecar._status(s) st WHERE st.missing > 0 OR st.stale > 0);
            END IF;
            EXIT WHEN busy;
        END LOOP;
        IF NOT busy THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.02);
    END LOOP;
END
$$;

-- Drain queued changes in this session (no worker needed): the same code path the worker runs.
-- Returns the number of queue messages handled.
CREATE FUNCTION embed_sidecar.process(source regclass DEFAULT NULL, max_rows int DEFAULT 1000) RETURNS bigint
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
        PERFORM embed_sidecar._source(source);
    END IF;
    FOR s IN SELECT * FROM embed_sidecar.sources x
              WHERE (process.source IS NULL OR x.source = process.source) ORDER BY x.id LOOP
        CONTINUE WHEN process.source IS NULL AND NOT pg_has_role(session_user, (SELECT relowner FROM pg_class WHERE oid = s.source), 'USAGE');
        PERFORM embed_sidecar._check_owner(s.source);
        done := done + embed_sidecar._process(s.id, max_rows - done::int);
        EXIT WHEN done >= max_rows;
    END LOOP;
    RETURN done;
END
$$;

-- Keep the registry honest when a source, its content column or its sidecar is dropped.
CREATE FUNCTION embed_sidecar._on_sql_drop() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d record;
    s embed_sidecar.sources;
BEGIN
    FOR d IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type IN ('table', 'table column') LOOP
        FOR s IN SELECT * FROM embed_sidecar.sources x
                  WHERE (d.object_type = 'table' AND d.objid IN (x.source, x.sidecar))
                     OR (d.object_type = 'table column' AND d.objid = x.source AND d.objsubid = x.content_attnum) LOOP
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
CREATE EVENT TRIGGER embed_sidecar_sql_drop ON sql_drop EXECUTE FUNCTION embed_sidecar._on_sql_drop();
