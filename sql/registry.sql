-- The registry: which tables are watched and how, the dead letters, and the small helpers that
-- turn registry rows into quoted SQL fragments. Everything that acts on these lives in
-- triggers.sql (enqueue), watch.sql, switch.sql and operations.sql (watch & co.), drain.sql (the drain's statements) and
-- status.sql (monitoring).
--
-- Dynamic SQL is built only with format('%I' / %L) or regclass/format_type output: nothing a
-- user types is spliced into SQL.

-- A plain sequence rather than an identity column: pg_dump only carries a sequence's position
-- for extension members marked with pg_extension_config_dump (a restored registry
-- otherwise hands out ids that already exist).
CREATE SEQUENCE embed_sidecar.sources_id_seq AS int;

CREATE TABLE embed_sidecar.sources (
    id               int PRIMARY KEY DEFAULT nextval('embed_sidecar.sources_id_seq'),
    source           regclass NOT NULL,
    -- A table can be watched several times (another column, a template, another model): each
    -- watch is an embedding with a name, its own sidecar, queues and triggers; search names the
    -- one it uses. role: 'current' is what search reads; 'shadow' is being built by set_model()
    -- and takes over when complete; 'previous' is what the last switch replaced, kept in step
    -- until drop_previous() so that rollback_model() can swap it back.
    embedding        text NOT NULL,
    role             text NOT NULL DEFAULT 'current' CHECK (role IN ('current', 'shadow', 'previous')),
    -- the content: one column, or a template over several ('{3}: {4}', columns by attribute
    -- number). Attribute numbers, not names: a renamed column keeps working.
    content_attnum   smallint,
    template         text,
    key_attnums      smallint[] NOT NULL,
    sidecar          regclass NOT NULL UNIQUE,
    -- two lanes: queue_name takes the changes the triggers enqueue, queue_name || '_bulk' the
    -- backfills (watch, reembed, set_model, a changed model); the drain serves the first first
    queue_name       text NOT NULL UNIQUE,
    model            text NOT NULL,             -- model directory name
    model_id         text NOT NULL,             -- name@sha256-prefix of the model's files
    dims             int NOT NULL,
    -- the text search configuration by name (NULL: no full text, no tsvector, no GIN index); text,
    -- not regconfig, because pg_upgrade refuses clusters with reg* columns other than
    -- regclass/regtype/regrole in any table
    fts_config       text DEFAULT 'english',
    -- bulk_paused: the live lane drains, the bulk lane waits (pause(source, bulk_only => true))
    state            text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'paused', 'bulk_paused')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- written by drainers only (never by the triggers, so writers never contend on this row)
    acked            bigint NOT NULL DEFAULT 0,
    dead_lettered    bigint NOT NULL DEFAULT 0,
    embedded         bigint NOT NULL DEFAULT 0,
    last_embedded_at timestamptz,
    last_error       text,
    last_error_at    timestamptz,
    -- the current bulk run, for progress and ETA: keys enqueued since the bulk lane was last empty
    bulk_total       bigint NOT NULL DEFAULT 0,
    bulk_started_at  timestamptz,
    -- chunked (watch(..., chunking => true)): the sidecar holds one vector per passage of at most
    -- chunk_tokens of the model's tokens, consecutive passages sharing up to chunk_overlap tokens
    -- (src/drain/chunking.rs); NULL: one vector per row
    chunk_tokens     int CHECK (chunk_tokens > 0),
    chunk_overlap    int CHECK (chunk_overlap >= 0),
    -- pgvector type of the sidecar's vectors: halfvec stores 2 bytes per dimension instead of 4
    vector_type      text NOT NULL DEFAULT 'vector' CHECK (vector_type IN ('vector', 'halfvec')),
    -- a large backfill writes without the HNSW index, built once when the bulk lane is empty
    -- (pg_embed_sidecar.bulk_index_rows; _build_index_if_ready); searches meanwhile scan exactly
    index_pending    boolean NOT NULL DEFAULT false,
    -- the names of the columns it uses (content or template, and key), by attribute number, kept
    -- current across renames (events.sql): a dump restored after a DROP COLUMN renumbers the
    -- table's columns, and these names map the numbers back (_reconcile_columns)
    column_names     jsonb NOT NULL DEFAULT '{}',
    -- the view that joins each source row with this embedding's vectors, under a name that stays
    -- (watch(view_name => ...)): every role of an embedding carries it, and the transaction that
    -- promotes a shadow, or rolls a switch back, points it at the sidecar now current
    -- (_define_view). NULL: none (it was dropped).
    search_view      regclass,
    -- watch(sync => true): a writer's change is also embedded inside the writer's transaction
    -- when the inference service has room for it (src/drain/sync.rs); the queue has it anyway
    sync             boolean NOT NULL DEFAULT false,
    -- deferrable: checked at the end of a statement, so one UPDATE can swap two roles
    UNIQUE (source, embedding, role) DEFERRABLE,
    CHECK ((content_attnum IS NULL) <> (template IS NULL)),
    CHECK ((chunk_tokens IS NULL) = (chunk_overlap IS NULL))
);
ALTER SEQUENCE embed_sidecar.sources_id_seq OWNED BY embed_sidecar.sources.id;
COMMENT ON TABLE embed_sidecar.sources IS 'Embeddings kept by pg_embed_sidecar (one row per watched table, embedding and role)';

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
SELECT pg_catalog.pg_extension_config_dump('embed_sidecar.sources_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('embed_sidecar.failures', '');

-- Whether a writer's change to this embedding may be embedded inside the writer's transaction
-- (watch(..., sync => true); src/drain/sync.rs says why not the others): current, not paused,
-- one vector per row, its index built.
CREATE FUNCTION embed_sidecar._syncs(s embed_sidecar.sources) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    RETURN s.sync AND s.role = 'current' AND s.state <> 'paused' AND s.chunk_tokens IS NULL AND NOT s.index_pending;

-- The bulk lane's queue of a source.
CREATE FUNCTION embed_sidecar._bulk_queue(queue_name text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN queue_name || '_bulk';

-- NULL, empty and whitespace-only texts get no vector.
CREATE FUNCTION embed_sidecar._is_blank(content text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN content IS NULL OR content ~ '^[[:space:]]*$';

-- ' AND sc.chunk = 0' for a chunked sidecar, so a join by key meets one row per source row: every
-- passage of a row carries the row's content_hash and model (all are written by one statement),
-- so the first stands for the row.
CREATE FUNCTION embed_sidecar._row_filter(s embed_sidecar.sources, alias text) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN CASE WHEN s.chunk_tokens IS NULL THEN '' ELSE format(' AND %I.chunk = 0', alias) END;

-- The content hash stored next to each vector. The only place it is defined: the drain reads it
-- with the text, hands it back with the vector, and the write re-checks it against the row.
CREATE FUNCTION embed_sidecar._content_hash(content text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN pg_catalog.sha256(pg_catalog.convert_to(content, 'UTF8'));

-- Quoted column names of a table, in key order, each prefixed by alias: 'n."id", n."lang"'.
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

-- The sidecar's key columns are its first ones, in key order (_create_embedding makes them so):
-- found by position, never by the source's attribute numbers or current names, which a sidecar
-- does not share (a key column renamed in the source keeps its old name in the sidecar).
CREATE FUNCTION embed_sidecar._sidecar_keys(s embed_sidecar.sources) RETURNS smallint[]
    LANGUAGE sql IMMUTABLE
    RETURN ARRAY(SELECT pg_catalog.generate_series(1, pg_catalog.cardinality(s.key_attnums))::smallint);

-- 'sc."id" = src."id" AND ...': a sidecar's key columns (alias sc) against its source's (alias src).
CREATE FUNCTION embed_sidecar._side_join(s embed_sidecar.sources, sc text, src text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format('%I.%I = %I.%I', sc, a.attname, src, b.attname), ' AND ' ORDER BY k.ord)
      FROM unnest(s.key_attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = s.sidecar AND a.attnum = k.ord
      JOIN pg_catalog.pg_attribute b ON b.attrelid = s.source AND b.attnum = k.attnum;
END;

-- The elements of a key's JSON array, expressions over alias in key order: the one form of a key
-- everywhere (the statement and replica triggers, the backfill, the sidecar's keys that search
-- returns and the orphans listing), so the drain dedupes keys and looks each up with
-- (j->>i)::type (_key_from_json) whoever made it. A column of a scalar type of pg_catalog is given
-- to jsonb_build_array as it is (a number stays a number); any other through format('%s'), its
-- type's output function: an array or a composite would otherwise become a JSON array or object
-- that no input function reads back, and jsonb_build_array would call a cast to json that the
-- owner of a type defined outside pg_catalog may have created (as whoever writes or searches,
-- or as the apply worker that fires the replica trigger, usually a superuser).
CREATE FUNCTION embed_sidecar._key_elements(rel regclass, attnums smallint[], alias text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format(CASE WHEN b.typnamespace = 'pg_catalog'::regnamespace AND b.typtype = 'b' AND b.typcategory <> 'A'
                                  THEN '%I.%I' ELSE 'pg_catalog.format(''%%s'', %I.%I)' END,
                             alias, a.attname), ', ' ORDER BY k.ord)
      FROM unnest(attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = rel AND a.attnum = k.attnum
      JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
      JOIN pg_catalog.pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END;
END;

-- The key of a sidecar row as a JSON array, an expression over alias: what search returns, in
-- the form the triggers queue (_key_elements).
CREATE FUNCTION embed_sidecar._key_json(s embed_sidecar.sources, alias text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT format('pg_catalog.jsonb_build_array(%s)', embed_sidecar._key_elements(s.sidecar, embed_sidecar._sidecar_keys(s), alias));
END;

-- A schema's name, for %I (regnamespace's output is already quoted: '%I' of it quotes twice).
CREATE FUNCTION embed_sidecar._schema_of(rel regclass) RETURNS name
    LANGUAGE sql STABLE
    RETURN (SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);

-- pgvector's schema, for %I.
CREATE FUNCTION embed_sidecar._vector_schema() RETURNS name
    LANGUAGE sql STABLE
    RETURN (SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
             WHERE e.extname = 'vector');

-- 'r."id" = (j->>0)::integer AND r."lang" = (j->>1)::text': match a key sent as a JSON array.
CREATE FUNCTION embed_sidecar._key_from_json(rel regclass, attnums smallint[], r text, j text) RETURNS text
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
CREATE FUNCTION embed_sidecar._content_expr(rel regclass, attnum smallint, alias text) RETURNS text
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
CREATE FUNCTION embed_sidecar._template_attnums(template text) RETURNS smallint[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ARRAY(SELECT m[1]::smallint FROM regexp_matches(template, '\{([0-9]+)\}', 'g') AS m);

-- {attnum: name} of the columns an embedding uses: its content (column or template's) and key.
CREATE FUNCTION embed_sidecar._column_names(s embed_sidecar.sources) RETURNS jsonb
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(jsonb_object_agg(a.attnum::text, a.attname), '{}')
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = s.source AND NOT a.attisdropped
       AND a.attnum = ANY (s.key_attnums || coalesce(embed_sidecar._template_attnums(s.template), '{}') || s.content_attnum);
END;

-- The content of a source as a text expression prefixed by alias: its column (attnum), or its
-- template with each {attnum} replaced by that column (NULL as empty) and the rest kept literally.
CREATE FUNCTION embed_sidecar._content_sql(rel regclass, attnum smallint, template text, alias text) RETURNS text
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

-- Whether the calling role (who called the public function, as PostgreSQL judges it: after SET
-- ROLE, and inside a SECURITY DEFINER function its owner; src/pg/authority.rs) may act as the table's
-- owner. A table that no longer exists has no owner to act as.
CREATE FUNCTION embed_sidecar._check_owner(rel regclass) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT coalesce(pg_has_role(embed_sidecar._calling_role(), (SELECT relowner FROM pg_class WHERE oid = rel), 'USAGE'), false) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: must be owner of table %', rel
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only the owner of a table (or a member of its owner role) can watch or manage it.';
    END IF;
END
$$;

-- Internal management functions are callable by anyone (their public wrapper runs as the caller,
-- src/pg/authority.rs), so each first checks that the calling role may execute the public function it
-- stands for: granting EXECUTE on embed_sidecar.watch() is what lets a role watch its tables.
CREATE FUNCTION embed_sidecar._check_may(fn regprocedure) RETURNS boolean
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT has_function_privilege(embed_sidecar._calling_role(), fn, 'EXECUTE') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: permission denied for function %', fn
            USING ERRCODE = 'insufficient_privilege', HINT = 'Call the public function; its EXECUTE privilege is what grants this.';
    END IF;
    RETURN true;
END
$$;

-- The registry row of one embedding of a watched table: the one named (role 'current' unless
-- asked otherwise), or, when none is named, the table's only one.
CREATE FUNCTION embed_sidecar._source(rel regclass, embedding text DEFAULT NULL, role text DEFAULT 'current')
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
CREATE FUNCTION embed_sidecar._owned_source(rel regclass, embedding text DEFAULT NULL) RETURNS embed_sidecar.sources
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM embed_sidecar._check_owner(rel);
    RETURN embed_sidecar._source(rel, embedding);
END
$$;

-- The registry row of a watched table's embedding, for a caller who may read the table (search,
-- verify).
CREATE FUNCTION embed_sidecar._readable_source(rel regclass, embedding text DEFAULT NULL) RETURNS embed_sidecar.sources
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources;
BEGIN
    -- privileges first: a caller who may not read the table learns nothing of its embeddings
    IF rel IS NOT NULL AND NOT has_table_privilege(embed_sidecar._calling_role(), rel, 'SELECT') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: permission denied for table %', rel USING ERRCODE = 'insufficient_privilege';
    END IF;
    s := embed_sidecar._source(rel, embedding);
    -- the last error may quote a row (status shows it to the owner only)
    s.last_error := NULL;
    s.last_error_at := NULL;
    RETURN s;
END
$$;
