\echo Use "ALTER EXTENSION pg_embed_sidecar UPDATE TO '0.3.0'" to load this file. \quit
-- 0.2.0 -> 0.3.0: what an adversarial read of 0.2.0 found, closed (CHANGELOG). Only the objects
-- that changed, copied from sql/*.sql:
-- * who is calling: each public management and search function records its caller
--   (embed_sidecar._enter) and runs its body (embed_sidecar._do_<name>) for that role; nothing
--   inside a security-restricted operation may manage or search;
-- * the sidecar is as private as its table: SELECT for PUBLIC under row security that reads the
--   source as the querying role (existing sidecars are converted below), written only by the drain;
-- * search keys come from the sidecar's own key columns; keys a writer enqueues are checked;
-- * the drain serialises on the registry row, not an advisory lock any role could hold;
-- * search refuses a query whose model files changed since its vectors were made;
-- * watched tables stay out of inheritance trees and partitioned tables;
-- * fts_config is text (pg_upgrade refuses reg* columns); names that need quoting or are long in
--   bytes work; a reader's view no longer blocks the owner's drops.

-- objects whose signature or kind changed
DROP FUNCTION embed_sidecar._create_embedding(regclass, text, text, smallint, text, smallint[], name, text, regconfig, boolean, int, int, text);
DROP FUNCTION embed_sidecar._create_triggers(embed_sidecar.sources);
DROP FUNCTION embed_sidecar._write(text, text, jsonb[], bytea[], real[], int, text, regconfig, jsonb[], text, jsonb[]);

-- (SQL-standard functions that take the registry's row type hold it fixed: out, then back)
DROP FUNCTION embed_sidecar._backfill_sql(embed_sidecar.sources);
DROP FUNCTION embed_sidecar._row_filter(embed_sidecar.sources, text);
ALTER TABLE embed_sidecar.sources ALTER COLUMN fts_config TYPE text USING fts_config::text,
    ADD COLUMN column_names jsonb NOT NULL DEFAULT '{}';

-- who is calling (src/authority.rs)
CREATE FUNCTION embed_sidecar."_enter"() RETURNS boolean
    STRICT VOLATILE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'enter_wrapper';
CREATE FUNCTION embed_sidecar."_leave"() RETURNS boolean
    STRICT VOLATILE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'leave_wrapper';
CREATE FUNCTION embed_sidecar."_session_role"() RETURNS oid
    STRICT STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'session_role_wrapper';
-- a search's query vector, refused when the model's files changed since the vectors were made
CREATE FUNCTION embed_sidecar."_embed_query"("model" text, "model_id" text, "content" text) RETURNS real[]
    STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'embed_query_wrapper';
CREATE OR REPLACE FUNCTION embed_sidecar."_calling_role"() RETURNS oid
    STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'calling_role_wrapper';

-- ' AND sc.chunk = 0' for a chunked sidecar, so a join by key meets one row per source row: every
-- passage of a row carries the row's content_hash and model (all are written by one statement),
-- so the first stands for the row.
CREATE OR REPLACE FUNCTION embed_sidecar._row_filter(s embed_sidecar.sources, alias text) RETURNS text
    LANGUAGE sql IMMUTABLE
    RETURN CASE WHEN s.chunk_tokens IS NULL THEN '' ELSE format(' AND %I.chunk = 0', alias) END;

-- {attnum: name} of the columns an embedding uses: its content (column or template's) and key.
CREATE OR REPLACE FUNCTION embed_sidecar._column_names(s embed_sidecar.sources) RETURNS jsonb
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT coalesce(jsonb_object_agg(a.attnum::text, a.attname), '{}')
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = s.source AND NOT a.attisdropped
       AND a.attnum = ANY (s.key_attnums || coalesce(embed_sidecar._template_attnums(s.template), '{}') || s.content_attnum);
END;

-- The sidecar's key columns are its first ones, in key order (_create_embedding makes them so):
-- found by position, never by the source's attribute numbers or current names, which a sidecar
-- does not share (a key column renamed in the source keeps its old name in the sidecar).
CREATE OR REPLACE FUNCTION embed_sidecar._sidecar_keys(s embed_sidecar.sources) RETURNS smallint[]
    LANGUAGE sql IMMUTABLE
    RETURN ARRAY(SELECT pg_catalog.generate_series(1, pg_catalog.cardinality(s.key_attnums))::smallint);

-- 'sc."id" = src."id" AND ...': a sidecar's key columns (alias sc) against its source's (alias src).
CREATE OR REPLACE FUNCTION embed_sidecar._side_join(s embed_sidecar.sources, sc text, src text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT string_agg(format('%I.%I = %I.%I', sc, a.attname, src, b.attname), ' AND ' ORDER BY k.ord)
      FROM unnest(s.key_attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = s.sidecar AND a.attnum = k.ord
      JOIN pg_catalog.pg_attribute b ON b.attrelid = s.source AND b.attnum = k.attnum;
END;

-- The key of a sidecar row as a JSON array, an expression over alias: what search returns. A
-- column of a type defined outside pg_catalog goes through its text form: jsonb_build_array would
-- otherwise call a cast to json that the type's owner may have created, as whoever searches.
CREATE OR REPLACE FUNCTION embed_sidecar._key_json(s embed_sidecar.sources, alias text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT format('pg_catalog.jsonb_build_array(%s)',
                  string_agg(format(CASE WHEN b.typnamespace = 'pg_catalog'::regnamespace THEN '%I.%I' ELSE '%I.%I::text' END,
                                    alias, a.attname), ', ' ORDER BY a.attnum))
      FROM pg_catalog.pg_attribute a
      JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
      JOIN pg_catalog.pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
     WHERE a.attrelid = s.sidecar AND a.attnum = ANY (embed_sidecar._sidecar_keys(s));
END;

-- A schema's name, for %I (regnamespace's output is already quoted: '%I' of it quotes twice).
CREATE OR REPLACE FUNCTION embed_sidecar._schema_of(rel regclass) RETURNS name
    LANGUAGE sql STABLE
    RETURN (SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);

-- pgvector's schema, for %I.
CREATE OR REPLACE FUNCTION embed_sidecar._vector_schema() RETURNS name
    LANGUAGE sql STABLE
    RETURN (SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
             WHERE e.extname = 'vector');

-- Whether the calling role (who called the public function, as PostgreSQL judges it: after SET
-- ROLE, and inside a SECURITY DEFINER function its owner; src/authority.rs) may act as the table's
-- owner. A table that no longer exists has no owner to act as.
CREATE OR REPLACE FUNCTION embed_sidecar._check_owner(rel regclass) RETURNS void
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
-- src/authority.rs), so each first checks that the calling role may execute the public function it
-- stands for: granting EXECUTE on embed_sidecar.watch() is what lets a role watch its tables.
CREATE OR REPLACE FUNCTION embed_sidecar._check_may(fn regprocedure) RETURNS boolean
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

-- The registry row of a watched table's embedding, for a caller who may read the table (search,
-- verify).
CREATE OR REPLACE FUNCTION embed_sidecar._readable_source(rel regclass, embedding text DEFAULT NULL) RETURNS embed_sidecar.sources
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

-- The statement triggers of one embedding (see triggers.sql), named by its registry id. With
-- only_stale, only those that exist with other arguments are made again (after a restore into a
-- renumbered table, _reconcile_columns: pg_restore makes them with the dumped numbers).
CREATE OR REPLACE FUNCTION embed_sidecar._create_triggers(s embed_sidecar.sources, only_stale boolean DEFAULT false) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    args text[] := ARRAY[s.id::text, coalesce(s.content_attnum::text, ''), s.key_attnums::text, coalesce(s.template, '')];
    t record;
    old_args text[];
BEGIN
    FOR t IN VALUES ('insert', 'INSERT', 'NEW TABLE AS new_rows'),
                    ('update', 'UPDATE', 'OLD TABLE AS old_rows NEW TABLE AS new_rows') LOOP
        IF only_stale THEN
            SELECT (regexp_split_to_array(encode(g.tgargs, 'escape'), '\\000'))[1:g.tgnargs] INTO old_args
              FROM pg_trigger g WHERE g.tgrelid = s.source AND g.tgname = 'embed_sidecar_' || s.id || '_' || t.column1;
            CONTINUE WHEN old_args IS NULL OR old_args = args;
            EXECUTE format('DROP TRIGGER %I ON %s', 'embed_sidecar_' || s.id || '_' || t.column1, s.source);
        END IF;
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s
                        FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes(%L, %L, %L, %L)',
                       'embed_sidecar_' || s.id || '_' || t.column1, t.column2, s.source, t.column3,
                       args[1], args[2], args[3], args[4]);
    END LOOP;
END
$$;

-- A name cut to at most `bytes` bytes at a character boundary (left() counts characters, and a
-- name longer than 63 bytes would be clipped by the type, maybe into another table's name).
CREATE OR REPLACE FUNCTION embed_sidecar._clip(value text, bytes int) RETURNS text
    LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WHILE octet_length(value) > bytes LOOP
        value := left(value, -1);
    END LOOP;
    RETURN value;
END
$$;

-- Who may read a sidecar: exactly who may read its source's rows. SELECT is granted to PUBLIC and
-- row security keeps each sidecar row to the roles that can see the source row of the same key:
-- the policy reads the source as the querying role, so the source's grants, its REVOKEs and its
-- own row security all apply, now and after any later change. The whole source row is named in
-- the policy, so reading a vector needs the right to read every column (the text included) but
-- no column of the source depends on the policy (its content column can still be retyped or
-- dropped). Only the owner (the drain, which runs as the owner) writes the sidecar.
CREATE OR REPLACE FUNCTION embed_sidecar._protect_sidecar(s embed_sidecar.sources) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    side_name name := (SELECT relname FROM pg_class WHERE oid = s.sidecar);
    g record;
BEGIN
    FOR g IN SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
              WHERE c.oid = s.sidecar AND a.grantee <> c.relowner LOOP
        EXECUTE format('REVOKE ALL ON %s FROM %s', s.sidecar, CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
    END LOOP;
    EXECUTE format('GRANT SELECT ON %s TO PUBLIC', s.sidecar);
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', s.sidecar);
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = s.sidecar AND polname = 'embed_sidecar_readable') THEN
        -- the sidecar's columns go by its name, the source's by that name plus a suffix: an alias
        -- equal to the sidecar's name would make the condition compare the source with itself
        EXECUTE format('CREATE POLICY embed_sidecar_readable ON %s FOR SELECT USING (EXISTS (SELECT %I FROM %s %I WHERE %s))',
                       s.sidecar, side_name || '_source', s.source, side_name || '_source',
                       embed_sidecar._side_join(s, side_name, side_name || '_source'));
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION embed_sidecar._create_queue(queue_name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text := 'q_' || queue_name;
    a text := 'a_' || queue_name;
BEGIN
    -- our names are 'embed_sidecar_<id>[_bulk]': lower case, short, nothing to quote
    IF queue_name !~ '^embed_sidecar_[0-9]+(_bulk)?$' THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is not a queue name of ours', queue_name;
    END IF;
    EXECUTE format('CREATE TABLE pgmq.%I (
                        msg_id bigint PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
                        read_ct int DEFAULT 0 NOT NULL,
                        enqueued_at timestamptz DEFAULT now() NOT NULL,
                        last_read_at timestamptz,
                        vt timestamptz NOT NULL,
                        message jsonb,
                        headers jsonb)', q);
    EXECUTE format('CREATE TABLE pgmq.%I (
                        msg_id bigint PRIMARY KEY,
                        read_ct int DEFAULT 0 NOT NULL,
                        enqueued_at timestamptz DEFAULT now() NOT NULL,
                        last_read_at timestamptz,
                        archived_at timestamptz DEFAULT now() NOT NULL,
                        vt timestamptz NOT NULL,
                        message jsonb,
                        headers jsonb)', a);
    EXECUTE format('CREATE INDEX %I ON pgmq.%I (vt ASC)', q || '_vt_idx', q);
    EXECUTE format('CREATE INDEX %I ON pgmq.%I (archived_at)', 'archived_at_idx_' || queue_name, a);
    INSERT INTO pgmq.meta (queue_name, is_partitioned, is_unlogged) VALUES (queue_name, false, false);
END
$$;

-- Both lanes of a queue name; tolerates lanes that are already gone.
CREATE OR REPLACE FUNCTION embed_sidecar._drop_queues(queue_name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lane text;
BEGIN
    FOREACH lane IN ARRAY ARRAY[queue_name, embed_sidecar._bulk_queue(queue_name)] LOOP
        EXECUTE format('DROP TABLE IF EXISTS pgmq.%I, pgmq.%I', 'q_' || lane, 'a_' || lane);
        DELETE FROM pgmq.meta m WHERE m.queue_name = lane;
    END LOOP;
END
$$;

-- A fresh pair of lanes for an embedding. A queue of these names can only be left over from an
-- earlier installation of the extension (DROP EXTENSION does not drop pgmq's tables): its
-- messages are not ours to replay.
CREATE OR REPLACE FUNCTION embed_sidecar._create_queues(queue_name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM embed_sidecar._drop_queues(queue_name);
    PERFORM embed_sidecar._create_queue(queue_name);
    PERFORM embed_sidecar._create_queue(embed_sidecar._bulk_queue(queue_name));
END
$$;

-- One embedding of a table: its sidecar (keyed like the table, same owner, as readable as the
-- table: _protect_sidecar), registry row, two queues and triggers; then the existing rows go on
-- the bulk lane. Shared by watch() and
-- set_model() (a shadow). Without sidecar_name the sidecar is called <table>_embeddings_<id>.
CREATE OR REPLACE FUNCTION embed_sidecar._create_embedding(source regclass, embedding text, role text, content_attnum smallint,
    template text, key_nums smallint[], sidecar_name name, model text, fts_config text, backfill boolean,
    chunk_tokens int, chunk_overlap int, vector_type text)
    RETURNS embed_sidecar.sources
    -- the caller's default_tablespace is not ours to use: the database's default
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET default_tablespace = ''
AS $$
DECLARE
    rel        pg_class := (SELECT c FROM pg_class c WHERE c.oid = source);
    vec_schema name := embed_sidecar._vector_schema();
    schema     name := embed_sidecar._schema_of(source);
    ident      record;
    queued     bigint := 0;
    s          embed_sidecar.sources;
    side       regclass;
    key_defs   text;
    key_cols   text;
BEGIN
    SELECT m.model_id, m.dims INTO ident FROM embed_sidecar._model_identity(model) m;
    -- the queue is named by the registry id: short (pgmq limits names) and free of user text.
    -- Taking the id first means the row goes in whole, so concurrent watch() calls never collide.
    s.id := nextval('embed_sidecar.sources_id_seq');
    sidecar_name := coalesce(sidecar_name, embed_sidecar._clip(rel.relname, 40) || '_embeddings_' || s.id);
    -- the sidecar is made as the extension's owner but belongs to the table's owner: only where
    -- that owner could have made a table
    IF NOT has_schema_privilege(rel.relowner, rel.relnamespace, 'CREATE') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: the owner of % may not create tables in schema %', source, quote_ident(schema)
            USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT CREATE ON SCHEMA to the table''s owner, or watch a table in a schema it may create in.';
    END IF;
    IF to_regclass(format('%I.%I', schema, sidecar_name)) IS NOT NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: relation "%" already exists in schema %', sidecar_name, quote_ident(schema)
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
        schema, sidecar_name, key_defs,
        CASE WHEN chunk_tokens IS NOT NULL THEN 'chunk int NOT NULL, char_start int NOT NULL, char_end int NOT NULL,' ELSE '' END,
        vec_schema, vector_type, ident.dims,
        CASE WHEN chunk_tokens IS NOT NULL THEN 'chunk_hash bytea NOT NULL,' ELSE '' END,
        key_cols, CASE WHEN chunk_tokens IS NOT NULL THEN ', chunk' ELSE '' END, key_cols, source, key_cols);
    side := format('%I.%I', schema, sidecar_name)::regclass;
    IF fts_config IS NOT NULL THEN
        EXECUTE format('CREATE INDEX ON %s USING gin (fts)', side);
    END IF;
    -- same owner as the source
    -- (regrole's output is already a quoted identifier: %s, never %I or quote_ident on it)
    EXECUTE format('ALTER TABLE %s OWNER TO %s', side, rel.relowner::regrole);

    INSERT INTO embed_sidecar.sources (id, source, embedding, role, content_attnum, template, key_attnums, sidecar,
                                       queue_name, model, model_id, dims, fts_config, chunk_tokens, chunk_overlap,
                                       vector_type)
    VALUES (s.id, source, embedding, role, content_attnum, template, key_nums, side,
            'embed_sidecar_' || s.id, model, ident.model_id, ident.dims, fts_config, chunk_tokens, chunk_overlap,
            vector_type)
    RETURNING * INTO s;
    UPDATE embed_sidecar.sources SET column_names = embed_sidecar._column_names(s) WHERE id = s.id RETURNING * INTO s;
    PERFORM embed_sidecar._protect_sidecar(s);
    PERFORM embed_sidecar._create_queues(s.queue_name);

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
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET default_tablespace = ''
AS $$
BEGIN
    EXECUTE format('CREATE INDEX ON %s USING hnsw (embedding %I.%I)', s.sidecar, embed_sidecar._vector_schema(),
                   s.vector_type || '_cosine_ops');
END
$$;

CREATE OR REPLACE FUNCTION embed_sidecar._do_watch(source regclass, content_column name, sidecar_name name, model text, backfill boolean, fts_config regconfig, embedding text, template text, chunking boolean, chunk_tokens int, chunk_overlap int, vector_type text) RETURNS regclass
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.watch() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text)');
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
    IF rel.relkind = 'p' OR rel.relispartition
       OR EXISTS (SELECT 1 FROM pg_inherits i WHERE source IN (i.inhparent, i.inhrelid)) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is partitioned, a partition, or part of an inheritance tree', source
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Statement triggers on one table of a hierarchy miss the writes made through another, so such tables are not watched. Watch a plain table.';
    END IF;
    IF rel.relkind <> 'r' THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is not a table', source USING ERRCODE = 'wrong_object_type';
    END IF;
    IF rel.relpersistence = 't' THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is a temporary table', source
            USING ERRCODE = 'feature_not_supported', HINT = 'A temporary table goes with its session, without the DROP that would clean up after it: watch a permanent table.';
    END IF;
    IF EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.sidecar = _do_watch.source) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: table % is a sidecar table', source USING ERRCODE = 'wrong_object_type';
    END IF;
    IF template IS NOT NULL AND embedding IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: an embedding made from a template needs a name'
            USING ERRCODE = 'null_value_not_allowed', HINT = 'Pass embedding => ''...''.';
    END IF;
    embedding := coalesce(embedding, content_column);
    -- serialise watch() calls on one table, so two cannot both take the same embedding name: the
    -- lock CREATE TRIGGER takes anyway, taken first (an advisory lock is one any role could hold)
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', source);
    IF EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.source = _do_watch.source AND x.embedding = _do_watch.embedding) THEN
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
    is_first := NOT EXISTS (SELECT 1 FROM embed_sidecar.sources x WHERE x.source = _do_watch.source);
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
        coalesce(sidecar_name, CASE WHEN is_first THEN embed_sidecar._clip(rel.relname, 52) || '_embeddings' END),
        model, fts_config::text, backfill, chunk[1], chunk[2], vector_type)).sidecar;
END
$$;

-- The public watch(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.watch(source regclass, content_column name DEFAULT NULL, sidecar_name name DEFAULT NULL, model text DEFAULT NULL, backfill boolean DEFAULT true, fts_config regconfig DEFAULT 'english', embedding text DEFAULT NULL, template text DEFAULT NULL, chunking boolean DEFAULT false, chunk_tokens int DEFAULT NULL, chunk_overlap int DEFAULT NULL, vector_type text DEFAULT 'vector') RETURNS regclass
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_watch(source, content_column, sidecar_name, model, backfill, fts_config, embedding, template, chunking, chunk_tokens, chunk_overlap, vector_type);
END
$$;
COMMENT ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text) IS
    'Create a sidecar table, queues and triggers for one embedding of a table (a column or a template; chunked into passages or one vector per row; vector or halfvec), and enqueue its existing rows';

CREATE OR REPLACE FUNCTION embed_sidecar._do_unwatch(source regclass, drop_sidecar boolean, embedding text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.unwatch() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.unwatch(regclass, boolean, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    s embed_sidecar.sources;
BEGIN
    FOR s IN SELECT * FROM embed_sidecar.sources x WHERE x.source = cur.source AND x.embedding = cur.embedding ORDER BY x.id LOOP
        -- First wait for a drain writing this source, and keep the next one out: its write locks
        -- the registry row first (src/drain.rs), then the sidecar and source; in the other order
        -- the two deadlock.
        PERFORM embed_sidecar._lock_source(s.id);
        -- a shadow or previous sidecar is the extension's own working copy: it goes
        PERFORM embed_sidecar._forget(s, drop_sidecar OR s.role <> 'current');
    END LOOP;
END
$$;

-- The public unwatch(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.unwatch(source regclass, drop_sidecar boolean DEFAULT false, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    PERFORM embed_sidecar._do_unwatch(source, drop_sidecar, embedding);
END
$$;

-- Keep an embedding's attribute numbers and recorded column names in agreement after DDL. For
-- each recorded (number, name) whose column no longer has that name: if the name is now another
-- column's, the table was renumbered under it — a dump restored after a DROP COLUMN — and the
-- numbers follow the names (and the triggers, whose arguments carry numbers);
-- otherwise the column was renamed, and the name follows the number. Run after every CREATE
-- TABLE, ALTER TABLE and CREATE TRIGGER on a watched table (events.sql: pg_restore makes the
-- triggers after loading the registry) and by reembed().
CREATE OR REPLACE FUNCTION embed_sidecar._reconcile_columns(source_id int) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := (SELECT x FROM embed_sidecar.sources x WHERE x.id = source_id);
    moved jsonb := '{}';  -- old number -> new number, for columns renumbered under their name
    e record;
    now_at smallint;
    literals text[];
    nums smallint[];
BEGIN
    FOR e IN SELECT c.key::smallint AS num, c.value AS name FROM jsonb_each_text(s.column_names) c LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = s.source AND a.attnum = e.num
                                                          AND a.attname = e.name AND NOT a.attisdropped);
        now_at := (SELECT a.attnum FROM pg_attribute a WHERE a.attrelid = s.source AND a.attname = e.name
                                                       AND a.attnum > 0 AND NOT a.attisdropped);
        IF now_at IS NOT NULL THEN
            moved := moved || jsonb_build_object(e.num::text, now_at);
        END IF;
    END LOOP;
    IF moved <> '{}' THEN
        literals := regexp_split_to_array(s.template, '\{[0-9]+\}');
        nums := embed_sidecar._template_attnums(s.template);
        UPDATE embed_sidecar.sources x
           SET content_attnum = coalesce((moved ->> x.content_attnum::text)::smallint, x.content_attnum),
               key_attnums = ARRAY(SELECT coalesce((moved ->> k::text)::smallint, k)
                                     FROM unnest(x.key_attnums) WITH ORDINALITY AS u(k, o) ORDER BY o),
               template = CASE WHEN x.template IS NOT NULL THEN
                              literals[1] || (SELECT string_agg('{' || coalesce((moved ->> n::text)::smallint, n) || '}' || literals[o + 1], '' ORDER BY o)
                                                FROM unnest(nums) WITH ORDINALITY AS t(n, o)) END
         WHERE x.id = s.id RETURNING * INTO s;
        RAISE LOG 'pg_embed_sidecar: columns of % renumbered (a restored dump?): embedding % follows them by name', s.source, quote_literal(s.embedding);
    END IF;
    UPDATE embed_sidecar.sources SET column_names = embed_sidecar._column_names(s)
     WHERE id = s.id AND column_names IS DISTINCT FROM embed_sidecar._column_names(s);
    -- triggers that exist with other numbers (made by pg_restore from the dump) are made again;
    -- names and numbers agree by now, so the CREATE TRIGGER this runs finds nothing more to do
    PERFORM embed_sidecar._create_triggers(s, only_stale => true);
END
$$;

-- The sidecar belongs to its table's owner, also after ALTER TABLE ... OWNER TO (events.sql).
CREATE OR REPLACE FUNCTION embed_sidecar._follow_owner(source_id int) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := (SELECT x FROM embed_sidecar.sources x WHERE x.id = source_id);
    owner oid := (SELECT relowner FROM pg_class WHERE oid = s.source);
BEGIN
    IF owner IS DISTINCT FROM (SELECT relowner FROM pg_class WHERE oid = s.sidecar) THEN
        EXECUTE format('ALTER TABLE %s OWNER TO %s', s.sidecar, owner::regrole);
    END IF;
END
$$;

-- The lock that serialises writers of one embedding (the drain's write, unwatch, set_model,
-- drop_previous, process): its registry row. A row lock, not an advisory lock: any role can take
-- advisory locks, but only roles that may update the registry can lock its rows.
CREATE OR REPLACE FUNCTION embed_sidecar._lock_source(source_id int) RETURNS boolean
    LANGUAGE sql SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT true FROM embed_sidecar.sources WHERE id = source_id FOR NO KEY UPDATE;
END;

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
    PERFORM embed_sidecar._drop_queues(s.queue_name);
    IF drop_sidecar AND EXISTS (SELECT 1 FROM pg_class WHERE oid = s.sidecar) THEN
        -- CASCADE: a view a reader made over the sidecar must not keep its owner from dropping it
        EXECUTE format('DROP TABLE %s CASCADE', s.sidecar);
    END IF;
END
$$;

-- Re-embed rows whose stored model or content hash is not current. Reloads the model identity
-- first, so a replaced model file (new hash) is noticed. Returns the number of keys enqueued.
CREATE OR REPLACE FUNCTION embed_sidecar._do_reembed(source regclass, embedding text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.reembed() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.reembed(regclass, text)');
    s embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
BEGIN
    PERFORM embed_sidecar._reconcile_columns(s.id);
    UPDATE embed_sidecar.sources SET model_id = (SELECT m.model_id FROM embed_sidecar._model_identity(s.model) m)
     WHERE id = s.id RETURNING * INTO s;
    RETURN embed_sidecar._backfill(s.id, true);
END
$$;

-- The public reembed(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.reembed(source regclass, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_reembed(source, embedding);
END
$$;

-- Switch an embedding to another model, of any dimension, with no gap: a shadow sidecar is built
-- in the bulk lane (live edits reach it through its own triggers) while searches keep using the
-- current one with its own model; when the shadow's queues are empty it takes over in one
-- transaction (_promote_if_ready, run by the drain) and the replaced one is kept, in step, for
-- rollback_model() until drop_previous(). A switch in progress, and the previous one, make way for
-- this one. Returns the number of rows the shadow has to embed.
CREATE OR REPLACE FUNCTION embed_sidecar._do_set_model(source regclass, model text, embedding text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.set_model() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.set_model(regclass, text, text)');
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
        PERFORM embed_sidecar._lock_source(old.id);  -- as in unwatch()
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

-- The public set_model(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.set_model(source regclass, model text, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_set_model(source, model, embedding);
END
$$;

-- Undo the last switch: the previous embedding becomes current again and the current one previous
-- (both were kept in step, so either way round is complete). Returns the sidecar now in use.
CREATE OR REPLACE FUNCTION embed_sidecar._do_rollback_model(source regclass, embedding text) RETURNS regclass
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.rollback_model() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.rollback_model(regclass, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    prev embed_sidecar.sources := embed_sidecar._source(source, cur.embedding, 'previous');
BEGIN
    UPDATE embed_sidecar.sources SET role = CASE role WHEN 'previous' THEN 'current' ELSE 'previous' END
     WHERE id IN (cur.id, prev.id);
    RETURN prev.sidecar;
END
$$;

-- The public rollback_model(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.rollback_model(source regclass, embedding text DEFAULT NULL) RETURNS regclass
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_rollback_model(source, embedding);
END
$$;

-- Drop what the last switch replaced (its sidecar, queues and triggers): no more rollback.
CREATE OR REPLACE FUNCTION embed_sidecar._do_drop_previous(source regclass, embedding text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.drop_previous() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.drop_previous(regclass, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    prev embed_sidecar.sources := embed_sidecar._source(source, cur.embedding, 'previous');
BEGIN
    PERFORM embed_sidecar._lock_source(prev.id);  -- as in unwatch()
    PERFORM embed_sidecar._forget(prev, true);
END
$$;

-- The public drop_previous(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.drop_previous(source regclass, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    PERFORM embed_sidecar._do_drop_previous(source, embedding);
END
$$;

-- Put dead-lettered rows of an embedding (all its versions) back on their queues. Returns how many.
CREATE OR REPLACE FUNCTION embed_sidecar._do_retry_failed(source regclass, embedding text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.retry_failed() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.retry_failed(regclass, text)');
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

-- The public retry_failed(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.retry_failed(source regclass, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_retry_failed(source, embedding);
END
$$;

-- Delete the dead letters of an embedding (all its versions) without replaying them: rows known
-- to be bad, left without a vector, which then no longer hold up a model switch. Returns how many.
CREATE OR REPLACE FUNCTION embed_sidecar._do_discard_failed(source regclass, embedding text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.discard_failed() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.discard_failed(regclass, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
    n bigint;
BEGIN
    DELETE FROM embed_sidecar.failures f USING embed_sidecar.sources x
     WHERE f.source_id = x.id AND x.source = cur.source AND x.embedding = cur.embedding;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- The public discard_failed(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.discard_failed(source regclass, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_discard_failed(source, embedding);
END
$$;

-- Paused sources keep enqueueing; only draining stops. bulk_only pauses just the bulk lane
-- (backfill, reembed, set_model): writers' changes keep being embedded, the backfill resumes where
-- it stopped. Applies to every version of the embedding (current, shadow, previous).
CREATE OR REPLACE FUNCTION embed_sidecar._do_pause(source regclass, bulk_only boolean, embedding text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.pause() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.pause(regclass, boolean, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
BEGIN
    UPDATE embed_sidecar.sources SET state = CASE WHEN bulk_only THEN 'bulk_paused' ELSE 'paused' END
     WHERE sources.source = cur.source AND sources.embedding = cur.embedding;
END
$$;

-- The public pause(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.pause(source regclass, bulk_only boolean DEFAULT false, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    PERFORM embed_sidecar._do_pause(source, bulk_only, embedding);
END
$$;

CREATE OR REPLACE FUNCTION embed_sidecar._do_resume(source regclass, embedding text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.resume() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.resume(regclass, text)');
    cur embed_sidecar.sources := embed_sidecar._owned_source(source, embedding);
BEGIN
    UPDATE embed_sidecar.sources SET state = 'active' WHERE sources.source = cur.source AND sources.embedding = cur.embedding;
END
$$;

-- The public resume(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.resume(source regclass, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    PERFORM embed_sidecar._do_resume(source, embedding);
END
$$;

-- Drain queued changes in this session (no worker needed): the same code path the worker runs.
-- Returns the number of queue messages handled.
CREATE OR REPLACE FUNCTION embed_sidecar._do_process(source regclass, max_rows int) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.process() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.process(regclass, int)');
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
              WHERE (_do_process.source IS NULL OR x.source = _do_process.source) ORDER BY x.id LOOP
        CONTINUE WHEN _do_process.source IS NULL
                  AND NOT pg_has_role(embed_sidecar._calling_role(), (SELECT relowner FROM pg_class WHERE oid = s.source), 'USAGE');
        PERFORM embed_sidecar._check_owner(s.source);
        done := done + embed_sidecar._process(s.id, max_rows - done::int);
        EXIT WHEN done >= max_rows;
    END LOOP;
    RETURN done;
END
$$;

-- The public process(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.process(source regclass DEFAULT NULL, max_rows int DEFAULT 1000) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_process(source, max_rows);
END
$$;

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
    key_json := embed_sidecar._key_json(s, 'sc');
    SELECT format('%I.%I', n, s.vector_type), format('OPERATOR(%I.<=>)', n) INTO vec_type, dist_op
      FROM embed_sidecar._vector_schema() n;
    fts_config := s.fts_config::regconfig;
    chunked := s.chunk_tokens IS NOT NULL;
    passage_cols := CASE WHEN chunked THEN 'sc.chunk, sc.char_start, sc.char_end'
                         ELSE 'NULL::int AS chunk, NULL::int AS char_start, NULL::int AS char_end' END;
END
$$;

CREATE OR REPLACE FUNCTION embed_sidecar.search(source regclass, query text, k int DEFAULT 10, embedding text DEFAULT NULL)
    RETURNS TABLE (key jsonb, distance float8, chunk int, char_start int, char_end int)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    entered boolean := embed_sidecar._enter();  -- who searches (src/authority.rs)
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

CREATE OR REPLACE FUNCTION embed_sidecar.hybrid_search(
    source regclass, query text, k int DEFAULT 10,
    candidates int DEFAULT 100, vector_weight float8 DEFAULT 1.0, text_weight float8 DEFAULT 1.0,
    rrf_k int DEFAULT 60, embedding text DEFAULT NULL)
    RETURNS TABLE (key jsonb, score float8, vector_rank int, text_rank int, chunk int, char_start int, char_end int)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    entered boolean := embed_sidecar._enter();  -- who searches (src/authority.rs)
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
    clear_sql := format(
        'DELETE FROM %1$s sc USING unnest($1::jsonb[]) AS v(_pes_key), %2$s src
          WHERE %3$s AND %4$s AND embed_sidecar._is_blank(%5$s)',
        s.sidecar, s.source, key_src, embed_sidecar._side_join(s, 'sc', 'src'), content);
END
$$;

-- Run the lookup for all keys at once; if that fails (a policy or domain check that raises for
-- some row), once per key, so a bad row is reported on its own and the rows around it proceed.
-- (keys are cast from their JSON text with fixed date and interval styles, as _invalid_keys checked them)
CREATE OR REPLACE FUNCTION embed_sidecar._lookup(lookup_sql text, keys jsonb[], model_id text) RETURNS SETOF embed_sidecar._looked_up
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
CREATE OR REPLACE FUNCTION embed_sidecar._write(upsert_sql text, clear_sql text, keys jsonb[], hashes bytea[], vectors real[],
                                     dims int, model_id text, fts text, clear_keys jsonb[],
                                     trim_sql text, chunks jsonb[],
                                     OUT written bigint, OUT failed_keys jsonb[], OUT failed_errors text[])
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres'
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
        EXCEPTION WHEN OTHERS THEN
            failed_keys := failed_keys || keys[i];
            failed_errors := failed_errors || SQLERRM;
        END;
    END LOOP;
END
$$;

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
       AND has_table_privilege(embed_sidecar._session_role(), s.source, 'SELECT');
END;

-- pending / oldest_pending_age: the live lane (changes made by writers). bulk_*: the bulk lane
-- (backfills), with progress since it was last empty and an ETA from the rate so far.
-- coverage: the share of rows whose vector is current, estimated as what is neither queued nor
-- dead-lettered, against the statistics' row count (live tuples, the planner's estimate or the
-- backfill's size, whichever is largest); verify() counts exactly.
-- worker: whether this database's drain worker runs, and if not, why.
-- chunks: passages in a chunked sidecar (from the statistics, like coverage; verify() counts).
CREATE OR REPLACE VIEW embed_sidecar.status AS
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
       s.last_embedded_at, s.acked, s.embedded AS vectors_written, s.dead_lettered,
       -- errors may quote a row's key or text (or what a writer put on the queue): owners only
       CASE WHEN pg_has_role(c.relowner, 'USAGE') THEN s.last_error END AS last_error, s.last_error_at,
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
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
DECLARE
    entered boolean := embed_sidecar._enter();  -- who verifies (src/authority.rs)
    s embed_sidecar.sources := embed_sidecar._readable_source(source, embedding);
    content text := embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src');
    key_join text := embed_sidecar._side_join(s, 'sc', 'src');
BEGIN
    -- the caller was needed to find the source; code of others (policies, operators) runs next
    PERFORM embed_sidecar._leave();
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

CREATE OR REPLACE FUNCTION embed_sidecar._do_wait(source regclass, timeout interval) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.wait() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.wait(regclass, interval)');
    deadline timestamptz := clock_timestamp() + timeout;
    ids int[];
    -- polls every 20 ms at first (a test's few rows), backing off to 250 ms (a long backfill)
    nap float8 := 0.02;
BEGIN
    IF source IS NOT NULL THEN
        PERFORM embed_sidecar._check_watched(source);
    END IF;
    SELECT array_agg(x.id) INTO ids FROM embed_sidecar.sources x WHERE _do_wait.source IS NULL OR x.source = _do_wait.source;
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

-- The public wait(): records who calls (src/authority.rs, "who is calling"), then the body.
CREATE OR REPLACE FUNCTION embed_sidecar.wait(source regclass DEFAULT NULL, timeout interval DEFAULT '60 seconds') RETURNS boolean
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_wait(source, timeout);
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
        embed_sidecar._side_join(s, 'sc', 'src'), embed_sidecar._row_filter(s, 'sc'),
        embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src'),
        embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src'));
END;

-- The check _enqueue runs on a writer's keys (src/enqueue.rs): $1 keys text[] → how many are not
-- the JSON array of one key of the table, of at most max_bytes. Each element is cast to its
-- column's type, so a key the drain could not look up never reaches the queue.
CREATE OR REPLACE FUNCTION embed_sidecar._keys_check_sql(s embed_sidecar.sources, max_bytes int) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT format(
        'SELECT count(*) FROM unnest($1::text[]) AS u(t) CROSS JOIN LATERAL (SELECT u.t::jsonb AS j) v
          WHERE CASE WHEN u.t IS NULL OR octet_length(u.t) > %s THEN true
                     WHEN jsonb_typeof(v.j) <> ''array'' THEN true
                     WHEN jsonb_array_length(v.j) <> %s THEN true
                     ELSE num_nulls(%s) > 0 END',
        max_bytes, cardinality(s.key_attnums),
        string_agg(format('(v.j->>%s)::%s', k.ord - 1, pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord))
      FROM unnest(s.key_attnums) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = s.source AND a.attnum = k.attnum;
END;

-- Run a _keys_check_sql statement as the caller: NULL when every key is valid, else why not.
-- DateStyle and IntervalStyle are the drain's (_lookup, _write): a key valid here is read the same
-- way there, whatever the writer's session set.
CREATE OR REPLACE FUNCTION embed_sidecar._invalid_keys(check_sql text, keys text[]) RETURNS text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET DateStyle = 'ISO, MDY' SET IntervalStyle = 'postgres'
AS $$
DECLARE
    bad bigint;
BEGIN
    EXECUTE check_sql INTO bad USING keys;
    RETURN CASE WHEN bad > 0 THEN format('%s of %s keys are not the JSON array of a key of the table', bad, cardinality(keys)) END;
EXCEPTION WHEN OTHERS THEN
    RETURN SQLERRM;
END
$$;

-- After DDL on a watched table: its columns' names and numbers are reconciled (a rename, or a
-- dump restored after a DROP COLUMN: _reconcile_columns); its sidecar passes to its new owner
-- (ALTER TABLE ... OWNER TO: the former owner keeps no hold on it); and it may not join an inheritance tree
-- or a partitioned table (CREATE TABLE ... INHERITS / PARTITION OF, ALTER TABLE ... INHERIT /
-- ATTACH PARTITION): statement triggers on one table of a hierarchy miss the writes made through
-- another, so its sidecar would silently fall behind. watch() refuses such tables for the same
-- reason.
CREATE OR REPLACE FUNCTION embed_sidecar._on_ddl_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass;
    id int;
BEGIN
    FOR id IN SELECT x.id FROM embed_sidecar.sources x
               WHERE x.source IN (SELECT c.objid FROM pg_event_trigger_ddl_commands() c WHERE c.classid = 'pg_class'::regclass
                                  UNION ALL
                                  SELECT t.tgrelid FROM pg_event_trigger_ddl_commands() c JOIN pg_trigger t ON t.oid = c.objid
                                   WHERE c.classid = 'pg_trigger'::regclass) LOOP
        PERFORM embed_sidecar._reconcile_columns(id);
        PERFORM embed_sidecar._follow_owner(id);
    END LOOP;
    SELECT x.source INTO rel FROM embed_sidecar.sources x
     WHERE EXISTS (SELECT 1 FROM pg_inherits i WHERE x.source IN (i.inhparent, i.inhrelid))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pg_embed_sidecar: watched table % cannot be part of an inheritance tree or a partitioned table', rel
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Statement triggers on one table of a hierarchy miss the writes made through another. Unwatch it first, or watch a plain table.';
    END IF;
END
$$;

CREATE EVENT TRIGGER embed_sidecar_ddl_end ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TRIGGER')
    EXECUTE FUNCTION embed_sidecar._on_ddl_end();

-- existing sidecars: SELECT for PUBLIC under row security instead of the table's copied grants
SELECT embed_sidecar._protect_sidecar(s) FROM embed_sidecar.sources s;
-- the names of the columns each embedding uses, for a later restore into a renumbered table
UPDATE embed_sidecar.sources s SET column_names = embed_sidecar._column_names(s);

-- who may call what (sql/privileges.sql, less its last step)

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
    embed_sidecar._worker_state(), embed_sidecar._installed_models(), embed_sidecar._key_json(embed_sidecar.sources, text),
    embed_sidecar._side_join(embed_sidecar.sources, text, text), embed_sidecar._sidecar_keys(embed_sidecar.sources),
    embed_sidecar._vector_schema(), embed_sidecar._enter(), embed_sidecar._leave(), embed_sidecar._session_role() TO PUBLIC;
-- The bodies of the management functions: each checks that its caller may execute the public one
-- (embed_sidecar._check_may), so the administrator grants those, as before.
GRANT EXECUTE ON FUNCTION
    embed_sidecar._do_watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text),
    embed_sidecar._do_unwatch(regclass, boolean, text), embed_sidecar._do_reembed(regclass, text),
    embed_sidecar._do_set_model(regclass, text, text), embed_sidecar._do_rollback_model(regclass, text),
    embed_sidecar._do_drop_previous(regclass, text), embed_sidecar._do_retry_failed(regclass, text),
    embed_sidecar._do_pause(regclass, boolean, text), embed_sidecar._do_resume(regclass, text),
    embed_sidecar._do_process(regclass, int), embed_sidecar._do_wait(regclass, interval),
    embed_sidecar._do_discard_failed(regclass, text) TO PUBLIC;
-- What the statement triggers run with the writer's rights (sql/triggers.sql); _enqueue checks
-- that the writer may write the table.
GRANT EXECUTE ON FUNCTION embed_sidecar._columns(regclass, smallint[], text), embed_sidecar._key_join(regclass, smallint[], text, text),
    embed_sidecar._content_expr(regclass, smallint, text), embed_sidecar._content_sql(regclass, smallint, text, text),
    embed_sidecar._template_attnums(text), embed_sidecar._is_blank(text),
    embed_sidecar._enqueue(int, text[]), embed_sidecar._invalid_keys(text, text[]) TO PUBLIC;
-- What the drain runs as the table's owner (sql/drain.sql): SECURITY INVOKER helpers that only
-- execute the statements they are handed, with the rights of whoever calls them.
GRANT EXECUTE ON FUNCTION embed_sidecar._content_hash(text), embed_sidecar._key_from_json(regclass, smallint[], text, text),
    embed_sidecar._lookup(text, jsonb[], text),
    embed_sidecar._write(text, text, jsonb[], bytea[], real[], int, text, text, jsonb[], text, jsonb[]) TO PUBLIC;
-- embedding is for everyone by default; revoke both to restrict it:
--   REVOKE EXECUTE ON FUNCTION embed_text(text), embed_sidecar._embed(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_sidecar._embed(text), embed_sidecar._embed_many(text[]), embed_sidecar._embed_with(text, text),
    embed_sidecar._embed_query(text, text, text),
    embed_sidecar.model_info(), embed_sidecar.texts_embedded(), embed_sidecar.chunk_text(text, text, int, int),
    embed_sidecar.inference_service() TO PUBLIC;

