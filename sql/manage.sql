-- Managing watched tables: watch/unwatch, re-embedding, model changes, dead-letter replay,
-- pause/resume and process(). These are SECURITY DEFINER (they write the registry and pgmq's
-- schema) and check first that the calling role may act as the table's owner
-- (embed_sidecar._check_owner). They never read or write the source or sidecar rows themselves:
-- that is the drain's and the backfill's job, done as the table's owner (src/authority.rs).

-- The statement triggers of a watched table (see triggers.sql).
CREATE FUNCTION embed_sidecar._create_triggers(s embed_sidecar.sources) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('CREATE TRIGGER embed_sidecar_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes(%s, %s, %L)',
                   s.source, s.id, s.content_attnum, s.key_attnums);
    EXECUTE format('CREATE TRIGGER embed_sidecar_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes(%s, %s, %L)',
                   s.source, s.id, s.content_attnum, s.key_attnums);
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
    -- (regrole's output is already a quoted identifier: %s, never %I or quote_ident on it)
    EXECUTE format('ALTER TABLE %s OWNER TO %s', side, rel.relowner::regrole);
    FOR g IN SELECT a.privilege_type, a.grantee FROM aclexplode(rel.relacl) a WHERE a.grantee <> rel.relowner LOOP
        EXECUTE format('GRANT %s ON %s TO %s', g.privilege_type, side,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
    END LOOP;

    -- the queue is named by the registry id: short (pgmq limits names) and free of user text.
    -- Taking the id first means the row goes in whole, so concurrent watch() calls never collide.
    s.id := nextval('embed_sidecar.sources_id_seq');
    INSERT INTO embed_sidecar.sources (id, source, content_attnum, key_attnums, sidecar, queue_name, model, model_id, dims, fts_config)
    VALUES (s.id, source, content_at.attnum, key_nums, side, 'embed_sidecar_' || s.id, model, ident.model_id, ident.dims, fts_config)
    RETURNING * INTO s;
    -- A queue of these names can only be left over from an earlier installation of the extension
    -- (DROP EXTENSION does not drop pgmq's tables): its messages are not ours to replay.
    PERFORM pgmq.drop_queue(q.queue_name) FROM pgmq.list_queues() q
      WHERE q.queue_name IN (s.queue_name, embed_sidecar._bulk_queue(s.queue_name));
    PERFORM pgmq.create(s.queue_name);
    PERFORM pgmq.create(embed_sidecar._bulk_queue(s.queue_name));

    PERFORM embed_sidecar._create_triggers(s);
    IF backfill THEN
        PERFORM embed_sidecar._backfill(s.id, false);
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
    -- First wait for a drain writing this source, and keep the next one out: its write holds the
    -- source's advisory lock (src/drain.rs, 0x656d6273 = "embs") and then the sidecar and source,
    -- and ends by updating the registry row deleted here; in the other order the two deadlock.
    PERFORM pg_advisory_xact_lock(1701667443, s.id);
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
    PERFORM pgmq.drop_queue(q.queue_name) FROM pgmq.list_queues() q
      WHERE q.queue_name IN (s.queue_name, embed_sidecar._bulk_queue(s.queue_name));
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
    RETURN embed_sidecar._backfill(s.id, true);
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
    RETURN embed_sidecar._backfill(s.id, true);
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

-- Paused sources keep enqueueing; only draining stops. bulk_only pauses just the bulk lane
-- (backfill, reembed, set_model): writers' changes keep being embedded, the backfill resumes where
-- it stopped.
CREATE FUNCTION embed_sidecar.pause(source regclass, bulk_only boolean DEFAULT false) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE embed_sidecar.sources SET state = CASE WHEN bulk_only THEN 'bulk_paused' ELSE 'paused' END
     WHERE id = (embed_sidecar._owned_source(source)).id;
END;

CREATE FUNCTION embed_sidecar.resume(source regclass) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    UPDATE embed_sidecar.sources SET state = 'active' WHERE id = (embed_sidecar._owned_source(source)).id;
END;

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
        CONTINUE WHEN process.source IS NULL
                  AND NOT pg_has_role(embed_sidecar._calling_role(), (SELECT relowner FROM pg_class WHERE oid = s.source), 'USAGE');
        PERFORM embed_sidecar._check_owner(s.source);
        done := done + embed_sidecar._process(s.id, max_rows - done::int);
        EXIT WHEN done >= max_rows;
    END LOOP;
    RETURN done;
END
$$;
