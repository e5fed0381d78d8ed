-- Changing what an embedding's vectors are made with: reembed() (same model, stale rows),
-- set_model() (a shadow sidecar filled in the background, promoted in one transaction once
-- complete: _promote_if_ready), rollback_model() and drop_previous().
-- Each public function is a SECURITY INVOKER wrapper that records its caller
-- (embed_sidecar._enter, src/pg/authority.rs) and calls its body, embed_sidecar._do_<name>, which
-- is SECURITY DEFINER (it writes the registry and pgmq's schema) and checks first that the caller
-- may execute the public function and act as the table's owner (_check_may, _check_owner). They
-- never read or write the source or sidecar rows themselves: that is the drain's and the
-- backfill's job, done as the table's owner (src/pg/authority.rs).

-- Re-embed rows whose stored model or content hash is not current. Reloads the model identity
-- first, so a replaced model file (new hash) is noticed. Returns the number of keys enqueued.
CREATE FUNCTION embed_sidecar._do_reembed(source regclass, embedding text) RETURNS bigint
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
    PERFORM embed_sidecar._define_view(s);
    RETURN embed_sidecar._backfill(s.id, true);
END
$$;

-- The public reembed(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.reembed(source regclass, embedding text DEFAULT NULL) RETURNS bigint
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
CREATE FUNCTION embed_sidecar._do_set_model(source regclass, model text, embedding text) RETURNS bigint
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
    UPDATE embed_sidecar.sources SET state = cur.state, search_view = cur.search_view, sync = cur.sync WHERE id = shadow.id;
    -- nothing to embed (an empty table): it takes over now
    PERFORM embed_sidecar._promote_if_ready(shadow.id);
    RETURN (SELECT x.bulk_total FROM embed_sidecar.sources x WHERE x.id = shadow.id);
END
$$;

-- The public set_model(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.set_model(source regclass, model text, embedding text DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_set_model(source, model, embedding);
END
$$;

-- Swap a complete shadow in (called by the drain when a pass finds its lanes empty, and by
-- set_model): in one statement the current embedding becomes 'previous' and the shadow 'current'.
-- Not while rows are dead-lettered: those would have no vector (status shows them; retry_failed()).
CREATE FUNCTION embed_sidecar._promote_if_ready(source_id int) RETURNS boolean
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
    -- in the same transaction, the embedding's view shows the new sidecar and model
    PERFORM embed_sidecar._define_view(x) FROM embed_sidecar.sources x WHERE x.id = s.id;
    RAISE LOG 'pg_embed_sidecar: % of % now uses model %', quote_literal(s.embedding), s.source, s.model_id;
    RETURN true;
END
$$;

-- The drain's promotion: _promote_if_ready, giving up at once on a lock another session holds (a
-- reader's open view, the table for dropping a previous embedding's triggers) instead of waiting
-- for it while the pass holds the registry row and its share of the tables (sql/drain.sql,
-- _lock_for_drain, says why: an owner who read the view and then altered the table would deadlock
-- with it). Tried again by the next pass that finds the lanes empty.
CREATE FUNCTION embed_sidecar._promote_if_free(source_id int) RETURNS boolean
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    patience text := current_setting('lock_timeout');
    promoted boolean;
BEGIN
    PERFORM set_config('lock_timeout', '20ms', true);
    promoted := embed_sidecar._promote_if_ready(source_id);
    PERFORM set_config('lock_timeout', patience, true);
    RETURN promoted;
EXCEPTION WHEN lock_not_available THEN
    -- (the block's subtransaction is rolled back: the promotion, its row locks, the setting)
    RETURN false;
END
$$;

-- Undo the last switch: the previous embedding becomes current again and the current one previous
-- (both were kept in step, so either way round is complete). Returns the sidecar now in use.
CREATE FUNCTION embed_sidecar._do_rollback_model(source regclass, embedding text) RETURNS regclass
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
    PERFORM embed_sidecar._define_view(x) FROM embed_sidecar.sources x WHERE x.id = prev.id;
    RETURN prev.sidecar;
END
$$;

-- The public rollback_model(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.rollback_model(source regclass, embedding text DEFAULT NULL) RETURNS regclass
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    RETURN embed_sidecar._do_rollback_model(source, embedding);
END
$$;

-- Drop what the last switch replaced (its sidecar, queues and triggers): no more rollback.
CREATE FUNCTION embed_sidecar._do_drop_previous(source regclass, embedding text) RETURNS void
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

-- The public drop_previous(): records who calls (src/pg/authority.rs, "who is calling"), then the body.
CREATE FUNCTION embed_sidecar.drop_previous(source regclass, embedding text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    PERFORM embed_sidecar._do_drop_previous(source, embedding);
END
$$;
