-- The life of an embedding: watch() makes it (sidecar, registry row, queues, triggers, backfill),
-- DDL on its table keeps it in step (_reconcile_columns, _follow_owner, called by events.sql), and
-- unwatch() or DROP TABLE removes it (_forget). Model changes are in switch.sql, day-to-day
-- operations in operations.sql.
-- Each public function is a SECURITY INVOKER wrapper that records its caller
-- (embed_sidecar._enter, src/pg/authority.rs) and calls its body, embed_sidecar._do_<name>, which
-- is SECURITY DEFINER (it writes the registry and pgmq's schema) and checks first that the caller
-- may execute the public function and act as the table's owner (_check_may, _check_owner). They
-- never read or write the source or sidecar rows themselves: that is the drain's and the
-- backfill's job, done as the table's owner (src/pg/authority.rs).

-- The triggers of one embedding, named by its registry id: the statement triggers (see
-- triggers.sql) and those the logical replication apply worker fires (see replica.sql). With
-- only_stale, only those that exist with other arguments are made again (after a restore into a
-- renumbered table, _reconcile_columns: pg_restore makes them with the dumped numbers); without,
-- the missing ones are made too (watch(), and the upgrade to 0.3.0 for the replica triggers). The
-- delete trigger exists only beside a sidecar without a foreign key (_follow_subscription makes
-- it), so it is only ever made again.
CREATE FUNCTION embed_sidecar._create_triggers(s embed_sidecar.sources, only_stale boolean DEFAULT false) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    args text[] := ARRAY[s.id::text, coalesce(s.content_attnum::text, ''), s.key_attnums::text, coalesce(s.template, '')];
    t record;
    old_args text[];
    trigger_name text;
BEGIN
    -- name, event, level, function, when it fires: O as a local write (origin), R under the apply
    -- worker and session_replication_role = replica, A always
    FOR t IN VALUES ('insert', 'AFTER INSERT', 'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT', '_enqueue_changes', 'O'),
                    ('update', 'AFTER UPDATE', 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT', '_enqueue_changes', 'O'),
                    ('delete', 'AFTER DELETE', 'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT', '_enqueue_changes', 'O'),
                    ('replica', 'AFTER INSERT OR UPDATE OR DELETE', 'FOR EACH ROW', '_enqueue_applied_row', 'R'),
                    ('truncate', 'AFTER TRUNCATE', 'FOR EACH STATEMENT', '_enqueue_truncated', 'A') LOOP
        trigger_name := 'embed_sidecar_' || s.id || '_' || t.column1;
        old_args := NULL;
        SELECT (regexp_split_to_array(encode(g.tgargs, 'escape'), '\\000'))[1:g.tgnargs] INTO old_args
          FROM pg_trigger g WHERE g.tgrelid = s.source AND g.tgname = trigger_name;
        CONTINUE WHEN old_args = args OR (old_args IS NULL AND (only_stale OR t.column1 = 'delete'));
        IF old_args IS NOT NULL THEN
            EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, s.source);
        END IF;
        EXECUTE format('CREATE TRIGGER %I %s ON %s %s EXECUTE FUNCTION embed_sidecar.%I(%L, %L, %L, %L)',
                       trigger_name, t.column2, s.source, t.column3, t.column4, args[1], args[2], args[3], args[4]);
        IF t.column5 = 'R' THEN
            EXECUTE format('ALTER TABLE %s ENABLE REPLICA TRIGGER %I', s.source, trigger_name);
        ELSIF t.column5 = 'A' THEN
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', s.source, trigger_name);
        END IF;
    END LOOP;
END
$$;

-- A name cut to at most `bytes` bytes at a character boundary (left() counts characters, and a
-- name longer than 63 bytes would be clipped by the type, maybe into another table's name).
CREATE FUNCTION embed_sidecar._clip(value text, bytes int) RETURNS text
    LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WHILE octet_length(value) > bytes LOOP
        value := left(value, -1);
    END LOOP;
    RETURN value;
END
$$;

-- Who may read a sidecar: exactly who may read its source's rows. The sidecar's SELECT grantees
-- are the source's (table-level SELECT, PUBLIC included), set again after every GRANT, REVOKE and
-- change of owner (_sync_readers, called by events.sql), so a role that may not read the table
-- cannot read, or lock, its sidecar, BYPASSRLS or not. Row security then keeps each sidecar row to the roles that can see
-- the source row of the same key: the policy reads the source as the querying role, so the
-- source's own row security applies too. The whole source row is named in the policy, so reading
-- a vector needs the right to read every column (the text included) but no column of the source
-- depends on the policy (its content column can still be retyped or dropped). Only the owner
-- (the drain, which runs as the owner) writes the sidecar; a grant made on the sidecar itself is
-- undone at the next sync.
CREATE FUNCTION embed_sidecar._sync_readers(s embed_sidecar.sources) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    owner oid := (SELECT relowner FROM pg_class WHERE oid = s.sidecar);
    readers oid[] := ARRAY(SELECT a.grantee FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                            WHERE c.oid = s.source AND a.privilege_type = 'SELECT' AND a.grantee <> c.relowner);
    marked text := current_setting('embed_sidecar.syncing_readers', true);
    g oid;
BEGIN
    -- our own GRANTs and REVOKEs below fire the GRANT/REVOKE event trigger: it need not sync again
    PERFORM set_config('embed_sidecar.syncing_readers', 'on', true);
    -- What may stay: SELECT granted by the owner, without grant option, to a reader. Anything
    -- else granted by the owner goes, with CASCADE: every grant made by some other role descends
    -- from a grant option the owner gave, so this removes those too (a superuser's REVOKE acts as
    -- the owner, and could not remove another grantor's grant directly).
    FOR g IN SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
              WHERE c.oid = s.sidecar AND a.grantor = owner AND a.grantee <> owner
                AND (a.privilege_type <> 'SELECT' OR a.is_grantable OR NOT a.grantee = ANY (readers)) LOOP
        EXECUTE format('REVOKE ALL ON %s FROM %s CASCADE', s.sidecar, CASE WHEN g = 0 THEN 'PUBLIC' ELSE g::regrole::text END);
    END LOOP;
    FOR g IN SELECT r FROM unnest(readers) r
              WHERE NOT EXISTS (SELECT 1 FROM pg_class c, aclexplode(c.relacl) a
                                 WHERE c.oid = s.sidecar AND a.grantor = owner AND a.grantee = r
                                   AND a.privilege_type = 'SELECT') LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s', s.sidecar, CASE WHEN g = 0 THEN 'PUBLIC' ELSE g::regrole::text END);
    END LOOP;
    PERFORM set_config('embed_sidecar.syncing_readers', coalesce(marked, ''), true);
END
$$;

CREATE FUNCTION embed_sidecar._protect_sidecar(s embed_sidecar.sources) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    side_name name := (SELECT relname FROM pg_class WHERE oid = s.sidecar);
BEGIN
    PERFORM embed_sidecar._sync_readers(s);
    -- (only when needed: ALTER TABLE takes the sidecar's strongest lock)
    IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = s.sidecar) THEN
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', s.sidecar);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = s.sidecar AND polname = 'embed_sidecar_readable') THEN
        -- the sidecar's columns go by its name, the source's by that name plus a suffix: an alias
        -- equal to the sidecar's name would make the condition compare the source with itself
        EXECUTE format('CREATE POLICY embed_sidecar_readable ON %s FOR SELECT USING (EXISTS (SELECT %I FROM %s %I WHERE %s))',
                       s.sidecar, side_name || '_source', s.source, side_name || '_source',
                       embed_sidecar._side_join(s, side_name, side_name || '_source'));
    END IF;
END
$$;

-- One embedding of a table: its sidecar (keyed like the table, same owner, as readable as the
-- table: _protect_sidecar), registry row, two queues and triggers; then the existing rows go on
-- the bulk lane. Shared by watch() and
-- set_model() (a shadow). Without sidecar_name the sidecar is called <table>_embeddings_<id>.
-- With adopt (watch(..., adopt => column)) the vectors that column holds are checked against the
-- model and copied in (embed_sidecar._adopt, src/adopt.rs), and only the rows left without one go
-- on the bulk lane.
CREATE FUNCTION embed_sidecar._create_embedding(source regclass, embedding text, role text, content_attnum smallint,
    template text, key_nums smallint[], sidecar_name name, model text, fts_config text, backfill boolean,
    chunk_tokens int, chunk_overlap int, vector_type text, adopt name DEFAULT NULL)
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
    adopted    bigint := 0;
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
    -- a table a subscription copies: no foreign key (replica.sql)
    PERFORM embed_sidecar._follow_subscription(s);
    IF adopt IS NOT NULL THEN
        -- (the table is locked against writers by watch(): the copy and the backfill see one state)
        adopted := embed_sidecar._adopt(s.id, adopt);
        IF backfill THEN
            queued := embed_sidecar._backfill(s.id, true);
        END IF;
    ELSIF backfill THEN
        queued := embed_sidecar._backfill(s.id, false);
    END IF;
    -- a large backfill goes faster without per-row index maintenance: the drain builds the index
    -- once the bulk lane is empty (_build_index_if_ready). An adoption copies its rows before the
    -- index exists; a large one leaves the build to the drain too, so watch() returns quickly.
    IF current_setting('pg_embed_sidecar.bulk_index_rows')::int BETWEEN 1 AND queued + adopted THEN
        UPDATE embed_sidecar.sources SET index_pending = true WHERE id = s.id RETURNING * INTO s;
    ELSE
        PERFORM embed_sidecar._create_hnsw(s);
    END IF;
    RETURN s;
END
$$;

-- The statements that adopt the vectors a column of the source already holds (watch(..., adopt =>
-- column); src/adopt.rs runs them as the table's owner). The column must be a pgvector vector or
-- halfvec of the embedding's dimensions (declared without dimensions: rows whose vectors have
-- others are not adopted, and the backfill after the copy enqueues them).
--   sample: $1 rows → content, vector as real[] of up to $1 random rows with content and a vector
--   copy:   $1 model_id, $2 text search config → rows copied into the sidecar (rows with blank
--           content or no vector are not)
CREATE FUNCTION embed_sidecar._adopt_sql(s embed_sidecar.sources, column_name name, OUT sample_sql text, OUT copy_sql text)
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    att pg_attribute := (SELECT a FROM pg_attribute a
                          WHERE a.attrelid = s.source AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped);
    vec_schema name := embed_sidecar._vector_schema();
    content text := embed_sidecar._content_sql(s.source, s.content_attnum, s.template, 'src');
    col text := format('src.%I', column_name);
    has_vector text;
    key_cols text;
BEGIN
    IF att IS NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: column "%" of table % does not exist', column_name, s.source
            USING ERRCODE = 'undefined_column', HINT = 'adopt => names the column of the table that holds its vectors.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                    WHERE t.oid = att.atttypid AND n.nspname = vec_schema AND t.typname IN ('vector', 'halfvec')) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: column "%" of table % is of type %, not vector or halfvec', column_name, s.source,
                        format_type(att.atttypid, att.atttypmod)
            USING ERRCODE = 'datatype_mismatch', HINT = 'adopt => takes a pgvector vector or halfvec column.';
    END IF;
    IF att.atttypmod NOT IN (-1, s.dims) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: column "%" of table % has % dimensions, model % makes %', column_name, s.source,
                        att.atttypmod, quote_literal(s.model), s.dims
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'Adopt only vectors made by the model the embedding uses; name it with model => ''...''.';
    END IF;
    has_vector := format('%s IS NOT NULL AND %I.vector_dims(%s) = %s', col, vec_schema, col, s.dims);
    sample_sql := format('SELECT %s, %s::real[] FROM %s src WHERE NOT embed_sidecar._is_blank(%s) AND %s ORDER BY random() LIMIT $1',
                         content, col, s.source, content, has_vector);
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum) INTO key_cols
      FROM pg_attribute a WHERE a.attrelid = s.sidecar AND a.attnum = ANY (embed_sidecar._sidecar_keys(s));
    copy_sql := format(
        'WITH w AS (
           INSERT INTO %1$s (%2$s, embedding, model, content_hash, fts, embedded_at)
           SELECT %3$s, %4$s::%5$I.%6$I, $1, embed_sidecar._content_hash(%7$s), to_tsvector($2::regconfig, left(%7$s, 100000)),
                  pg_catalog.now()
             FROM %8$s src WHERE NOT embed_sidecar._is_blank(%7$s) AND %9$s
           RETURNING 1)
         SELECT count(*) FROM w',
        s.sidecar, key_cols, embed_sidecar._columns(s.source, s.key_attnums, 'src'), col, vec_schema, s.vector_type,
        content, s.source, has_vector);
END
$$;

-- The sidecar's HNSW index (cosine, on its vector type).
CREATE FUNCTION embed_sidecar._create_hnsw(s embed_sidecar.sources) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET default_tablespace = ''
AS $$
BEGIN
    EXECUTE format('CREATE INDEX ON %s USING hnsw (embedding %I.%I)', s.sidecar, embed_sidecar._vector_schema(),
                   s.vector_type || '_cosine_ops');
END
$$;

-- Build a deferred HNSW index once the bulk lane is empty (called by the drain; a shadow is
-- promoted only after). One CREATE INDEX in the drain's transaction: searches see no index, then
-- the whole one. maintenance_work_mem is raised for the build, so the graph fits in memory (64k
-- vectors of 384 dimensions: ~120 MB), and put back after.
CREATE FUNCTION embed_sidecar._build_index_if_ready(source_id int) RETURNS boolean
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
    -- The sidecar without waiting, as the drain takes its tables (sql/drain.sql, _lock_for_drain,
    -- says why): an owner holding it and then renaming a column would wait for this registry row
    -- while the build waited for the owner. A busy sidecar is tried again later (the drain worker
    -- doubles the wait between tries).
    BEGIN
        EXECUTE format('LOCK TABLE %s IN SHARE MODE NOWAIT', s.sidecar);
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
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
CREATE FUNCTION embed_sidecar._text_column(source regclass, column_name name) RETURNS smallint
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
CREATE FUNCTION embed_sidecar._compile_template(source regclass, template text) RETURNS text
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

-- CREATE VIEW, or (replace) CREATE OR REPLACE VIEW, always security_invoker. A redefinition runs
-- inside a promotion, a rollback_model() or the drain: should the owner have changed the view so
-- that ours no longer replaces it (other columns), the switch goes on without it, with a warning.
-- A lock it could not get is an error: the switch waits for the view, never goes on without it.
CREATE FUNCTION embed_sidecar._create_view(target text, replace boolean, query text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT replace THEN
        EXECUTE format('CREATE VIEW %s WITH (security_invoker = true) AS %s', target, query);
        RETURN;
    END IF;
    EXECUTE format('CREATE OR REPLACE VIEW %s WITH (security_invoker = true) AS %s', target, query);
EXCEPTION WHEN lock_not_available THEN
    -- a reader holds the view: not a definition that no longer fits, and the switch must not go
    -- on with the view showing the old sidecar (the drain tries the promotion again later)
    RAISE;
WHEN OTHERS THEN
    IF NOT replace THEN
        RAISE;
    END IF;
    RAISE WARNING 'pg_embed_sidecar: view % not redefined: %', target, SQLERRM
        USING HINT = 'It keeps showing what it showed; unwatch() and watch(view_name => ...) make a new one.';
END
$$;

-- The view an application reads an embedding through, under a name that stays: one row per vector
-- (per passage when chunked) made by the embedding's current model, with the sidecar's key
-- columns, the vector and its model id, the passage's place, and the source row itself as one column named after
-- the table (a whole-row reference: a column the table gains shows up in it, and dropping one
-- does not have to drop the view first). SECURITY INVOKER: whoever reads it reads the source and
-- the sidecar with their own rights, row security included, so it can be PUBLIC. watch() makes it
-- (view_name given); the transaction that promotes a shadow, rolls a switch back or re-embeds
-- after a model's files changed redefines it over the sidecar and model now current (no
-- view_name: CREATE OR REPLACE under its current name, same columns, so what depends on it
-- stays; nothing if it was dropped).
CREATE FUNCTION embed_sidecar._define_view(s embed_sidecar.sources, view_name name DEFAULT NULL) RETURNS regclass
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    target text;
    row_col name;
    keys text;
    v regclass;
BEGIN
    IF view_name IS NULL AND s.role <> 'current' THEN
        RETURN NULL;  -- a shadow's or a previous version's vectors are not what it shows
    ELSIF view_name IS NULL THEN
        SELECT format('%I.%I', n.nspname, c.relname), a.attname INTO target, row_col
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.atttypid = (SELECT reltype FROM pg_class WHERE oid = s.source)
         WHERE c.oid = s.search_view AND c.relkind = 'v';
        IF target IS NULL OR row_col IS NULL THEN
            RETURN NULL;
        END IF;
    ELSE
        target := format('%I.%I', embed_sidecar._schema_of(s.source), view_name);
        row_col := (SELECT relname FROM pg_class WHERE oid = s.source);
        IF row_col IN ('embedding', 'model', 'chunk', 'char_start', 'char_end')
           OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = s.sidecar AND a.attname = row_col
                                                     AND a.attnum = ANY (embed_sidecar._sidecar_keys(s))) THEN
            row_col := 'source_row';
        END IF;
    END IF;
    SELECT string_agg(format('sc.%I', a.attname), ', ' ORDER BY a.attnum) INTO keys
      FROM pg_attribute a WHERE a.attrelid = s.sidecar AND a.attnum = ANY (embed_sidecar._sidecar_keys(s));
    -- the vector's type without dimensions: the next model's may have others
    PERFORM embed_sidecar._create_view(target, view_name IS NULL, format(
        'SELECT %s, sc.embedding::%I.%I AS embedding, sc.model%s, src AS %I FROM %s src JOIN %s sc ON %s WHERE sc.model = %L',
        keys, embed_sidecar._vector_schema(), s.vector_type,
        CASE WHEN s.chunk_tokens IS NOT NULL THEN ', sc.chunk, sc.char_start, sc.char_end' ELSE '' END,
        row_col, s.source, s.sidecar, embed_sidecar._side_join(s, 'sc', 'src'), s.model_id));
    v := target::regclass;
    IF view_name IS NOT NULL THEN
        EXECUTE format('ALTER VIEW %s OWNER TO %s', v, (SELECT relowner FROM pg_class WHERE oid = s.source)::regrole);
        EXECUTE format('GRANT SELECT ON %s TO PUBLIC', v);
        EXECUTE format('COMMENT ON VIEW %s IS %L', v,
                       format('Rows of %s with their vectors of embedding %s (pg_embed_sidecar): follows model switches',
                              s.source, quote_literal(s.embedding)));
    END IF;
    RETURN v;
END
$$;

CREATE FUNCTION embed_sidecar._do_watch(source regclass, content_column name, sidecar_name name, model text, backfill boolean, fts_config regconfig, embedding text, template text, chunking boolean, chunk_tokens int, chunk_overlap int, vector_type text, view_name name, sync boolean, adopt name) RETURNS regclass
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- called by embed_sidecar.watch() (see embed_sidecar._check_may)
    may boolean := embed_sidecar._check_may('embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name)');
    rel        pg_class;
    key_nums   smallint[];
    is_first   boolean;
    chunk      int[];
    s          embed_sidecar.sources;
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
    IF adopt IS NOT NULL AND coalesce(chunking, false) THEN
        RAISE EXCEPTION 'pg_embed_sidecar: a chunked embedding cannot adopt the vectors of column "%"', adopt
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'A column holds one vector per row, a chunked embedding one per passage: watch without adopt, or without chunking.';
    END IF;
    IF vector_type IS NULL OR vector_type NOT IN ('vector', 'halfvec') THEN
        RAISE EXCEPTION 'pg_embed_sidecar: vector_type must be ''vector'' or ''halfvec'', not %', coalesce(quote_literal(vector_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'halfvec stores each dimension in 2 bytes instead of 4 (README: "Performance" measures what it costs in recall).';
    END IF;
    -- the view's name is checked before anything is made (the first embedding of a table gets
    -- the plain name)
    view_name := coalesce(_do_watch.view_name,
                          CASE WHEN is_first THEN embed_sidecar._clip(rel.relname, 55) || '_vectors'
                               ELSE embed_sidecar._clip(rel.relname || '_' || embedding, 55) || '_vectors' END);
    IF to_regclass(format('%I.%I', embed_sidecar._schema_of(source), view_name)) IS NOT NULL THEN
        RAISE EXCEPTION 'pg_embed_sidecar: relation "%" already exists in the schema of %', view_name, source
            USING ERRCODE = 'duplicate_table',
                  HINT = 'Name the view this embedding is read through with view_name => ''...''.';
    END IF;
    s := embed_sidecar._create_embedding(
        source, embedding, 'current',
        CASE WHEN template IS NULL THEN embed_sidecar._text_column(source, content_column) END,
        CASE WHEN template IS NOT NULL THEN embed_sidecar._compile_template(source, template) END,
        key_nums,
        -- the first embedding of a table gets the plain name
        coalesce(sidecar_name, CASE WHEN is_first THEN embed_sidecar._clip(rel.relname, 52) || '_embeddings' END),
        model, fts_config::text, backfill, chunk[1], chunk[2], vector_type, adopt);
    UPDATE embed_sidecar.sources x SET sync = coalesce(_do_watch.sync, false),
                                       search_view = embed_sidecar._define_view(s, view_name)
     WHERE x.id = s.id;
    RETURN s.sidecar;
END
$$;

-- The public watch(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.watch(source regclass, content_column name DEFAULT NULL, sidecar_name name DEFAULT NULL, model text DEFAULT NULL, backfill boolean DEFAULT true, fts_config regconfig DEFAULT 'english', embedding text DEFAULT NULL, template text DEFAULT NULL, chunking boolean DEFAULT false, chunk_tokens int DEFAULT NULL, chunk_overlap int DEFAULT NULL, vector_type text DEFAULT 'vector', view_name name DEFAULT NULL, sync boolean DEFAULT false, adopt name DEFAULT NULL) RETURNS regclass
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_watch(source, content_column, sidecar_name, model, backfill, fts_config, embedding, template, chunking, chunk_tokens, chunk_overlap, vector_type, view_name, sync, adopt);
END
$$;
COMMENT ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name) IS
    'Create a sidecar table, queues, triggers and a view for one embedding of a table (a column or a template; chunked into passages or one vector per row; vector or halfvec), and enqueue its existing rows (or adopt the vectors a column holds)';

CREATE FUNCTION embed_sidecar._do_unwatch(source regclass, drop_sidecar boolean, embedding text) RETURNS void
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
        -- the registry row first (src/drain/mod.rs), then the sidecar and source; in the other order
        -- the two deadlock.
        PERFORM embed_sidecar._lock_source(s.id);
        -- a shadow or previous sidecar is the extension's own working copy: it goes
        PERFORM embed_sidecar._forget(s, drop_sidecar OR s.role <> 'current');
    END LOOP;
END
$$;

-- The public unwatch(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.unwatch(source regclass, drop_sidecar boolean DEFAULT false, embedding text DEFAULT NULL) RETURNS void
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
CREATE FUNCTION embed_sidecar._reconcile_columns(source_id int) RETURNS void
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
CREATE FUNCTION embed_sidecar._follow_owner(source_id int) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s embed_sidecar.sources := (SELECT x FROM embed_sidecar.sources x WHERE x.id = source_id);
    owner oid := (SELECT relowner FROM pg_class WHERE oid = s.source);
BEGIN
    IF owner IS DISTINCT FROM (SELECT relowner FROM pg_class WHERE oid = s.sidecar) THEN
        EXECUTE format('ALTER TABLE %s OWNER TO %s', s.sidecar, owner::regrole);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class WHERE oid = s.search_view AND relkind = 'v' AND relowner <> owner) THEN
        EXECUTE format('ALTER VIEW %s OWNER TO %s', s.search_view, owner::regrole);
    END IF;
END
$$;

-- The lock that serialises writers of one embedding (the drain's write, unwatch, set_model,
-- drop_previous, process): its registry row. A row lock, not an advisory lock: any role can take
-- advisory locks, but only roles that may update the registry can lock its rows.
CREATE FUNCTION embed_sidecar._lock_source(source_id int) RETURNS boolean
    LANGUAGE sql SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT true FROM embed_sidecar.sources WHERE id = source_id FOR NO KEY UPDATE;
END;

-- DROP TRIGGER IF EXISTS, without its NOTICE when there is none.
CREATE FUNCTION embed_sidecar._drop_trigger_if_there(source regclass, trigger_name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_trigger WHERE tgrelid = source AND tgname = trigger_name) THEN
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, source);
    END IF;
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
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'embed_sidecar_' || s.id || '_insert', s.source);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'embed_sidecar_' || s.id || '_update', s.source);
        -- (replica.sql; the delete trigger only beside a sidecar without a foreign key)
        PERFORM embed_sidecar._drop_trigger_if_there(s.source, 'embed_sidecar_' || s.id || '_' || t)
           FROM unnest(ARRAY['delete', 'replica', 'truncate']) t;
    END IF;
    PERFORM embed_sidecar._drop_queues(s.queue_name);
    -- the view is the embedding's, not a version's: it goes with the current one
    IF s.role = 'current' AND EXISTS (SELECT 1 FROM pg_class WHERE oid = s.search_view AND relkind = 'v') THEN
        EXECUTE format('DROP VIEW %s CASCADE', s.search_view);
    END IF;
    IF drop_sidecar AND EXISTS (SELECT 1 FROM pg_class WHERE oid = s.sidecar) THEN
        -- CASCADE: a view a reader made over the sidecar must not keep its owner from dropping it
        EXECUTE format('DROP TABLE %s CASCADE', s.sidecar);
    END IF;
END
$$;
