-- 0.2.0 -> 0.3.0: what an adversarial read of 0.2.0 found, closed (CHANGELOG). Only the objects
-- that changed, copied from sql/*.sql:
-- * who is calling: each public management and search function records its caller
--   (embed_sidecar._enter) and runs its body (embed_sidecar._do_<name>) for that role; nothing
--   inside a security-restricted operation may manage or search;
-- * the sidecar is as private as its table: SELECT for PUBLIC under row security that reads the
--   source as the querying role (existing sidecars are converted below), written only by the drain;
-- * search keys come from the sidecar's own key columns; keys a writer enqueues are checked;
-- * the drain serialises on the registry row, not an advisory lock any role could hold, and never
--   waits for a table while it holds that row (_lock_for_drain);
-- * search refuses a query whose model files changed since its vectors were made;
-- * watched tables stay out of inheritance trees and partitioned tables;
-- * fts_config is text (pg_upgrade refuses reg* columns); names that need quoting or are long in
--   bytes work; a reader's view no longer blocks the owner's drops;
-- * writes the logical replication apply worker makes (and session_replication_role = replica)
--   reach the sidecar: replica row triggers and a TRUNCATE trigger; status shows the lag;
-- * search_shards() merges the nearest rows of several embedding nodes (postgres_fdw);
-- * inference_service() shows the drain rounds a search stopped (preempted_rounds).

-- objects whose signature or kind changed
DROP FUNCTION embed_sidecar._create_embedding(regclass, text, text, smallint, text, smallint[], name, text, regconfig, boolean, int, int, text);
DROP FUNCTION embed_sidecar._create_triggers(embed_sidecar.sources);
DROP FUNCTION embed_sidecar._write(text, text, jsonb[], bytea[], real[], int, text, regconfig, jsonb[], text, jsonb[]);

-- (SQL-standard functions that take the registry's row type hold it fixed: out, then back)
DROP FUNCTION embed_sidecar._backfill_sql(embed_sidecar.sources);
DROP FUNCTION embed_sidecar._row_filter(embed_sidecar.sources, text);
ALTER TABLE embed_sidecar.sources ALTER COLUMN fts_config TYPE text USING fts_config::text,
    ADD COLUMN column_names jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN search_view regclass,
    ADD COLUMN sync boolean NOT NULL DEFAULT false;
-- search() and hybrid_search() take a filter; the target is read by _readable_source
DROP FUNCTION embed_sidecar.search(regclass, text, int, text);
DROP FUNCTION embed_sidecar.hybrid_search(regclass, text, int, int, float8, float8, int, text);
DROP FUNCTION embed_sidecar._search_target(regclass, text);
-- watch() takes view_name, sync and adopt
DROP FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text);

-- the inference service also counts the drain rounds it put aside for a search
DROP FUNCTION embed_sidecar.inference_service();
CREATE FUNCTION embed_sidecar."inference_service"() RETURNS TABLE (
    "workers" INT, "texts" bigint, "busy_seconds" double precision, "preempted_rounds" bigint)
    STRICT VOLATILE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'inference_service_wrapper';
-- who is calling (src/pg/authority.rs)
CREATE FUNCTION embed_sidecar."_enter"() RETURNS boolean
    STRICT VOLATILE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'enter_wrapper';
CREATE FUNCTION embed_sidecar."_leave"() RETURNS boolean
    STRICT VOLATILE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'leave_wrapper';
CREATE FUNCTION embed_sidecar."_session_role"() RETURNS oid
    STRICT STABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'session_role_wrapper';
-- a search's query vector, refused when the model's files changed since the vectors were made
CREATE FUNCTION embed_sidecar."_embed_query"("model" text, "model_id" text, "content" text) RETURNS real[]
    STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'embed_query_wrapper';
-- a search's filter is one expression (src/search_filter.rs)
CREATE FUNCTION embed_sidecar."_check_filter"("filter" text) RETURNS text
    STRICT IMMUTABLE PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'check_filter_wrapper';
-- a query with the session's model (embed_query(): the model's query prefix)
CREATE FUNCTION embed_sidecar."_embed_as_query"("content" text) RETURNS real[]
    STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'embed_as_query_wrapper';
-- watch(sync => true): _enqueue says whether the change may also be embedded now (_embed_now);
-- watch(adopt => column): _adopt (src/drain/sync.rs, src/adopt.rs)
DROP FUNCTION embed_sidecar._enqueue(int, text[]);
CREATE FUNCTION embed_sidecar."_enqueue"("source_id" INT, "keys" TEXT[]) RETURNS bool
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_wrapper';
CREATE FUNCTION embed_sidecar."_embed_now"("source_id" INT, "keys" TEXT[]) RETURNS bigint
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'embed_now_wrapper';
CREATE FUNCTION embed_sidecar."_written_here"("xmin" bigint) RETURNS bool
    STRICT VOLATILE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'written_here_wrapper';
CREATE FUNCTION embed_sidecar."_adopt"("source_id" INT, "column_name" TEXT) RETURNS bigint
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'adopt_wrapper';
CREATE OR REPLACE FUNCTION embed_sidecar."_calling_role"() RETURNS oid
    STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'calling_role_wrapper';
-- the replica and TRUNCATE triggers' way onto the queue (src/replica.rs)
CREATE FUNCTION embed_sidecar."_enqueue_applied"("source_id" INT, "keys" TEXT[]) RETURNS void
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_applied_wrapper';
CREATE FUNCTION embed_sidecar."_enqueue_replicated"("source_id" INT, "keys" TEXT[]) RETURNS INT
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_replicated_wrapper';
CREATE FUNCTION embed_sidecar."_enqueue_orphans"("source_id" INT) RETURNS bigint
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'enqueue_orphans_wrapper';
-- refused inside a security-restricted operation (_fan_out, sql/shards.sql)
CREATE FUNCTION embed_sidecar."_outside_restricted"() RETURNS bool
    VOLATILE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'outside_restricted_wrapper';
-- the identity of a model's current files (search_shards, sql/shards.sql)
CREATE FUNCTION embed_sidecar."_model_id"("model" TEXT) RETURNS TEXT
    STRICT STABLE PARALLEL RESTRICTED LANGUAGE c AS 'MODULE_PATHNAME', 'model_id_wrapper';

-- changed functions and views, as the install files define them
--@copy _syncs _row_filter _column_names _sidecar_keys _side_join _key_elements _key_json _schema_of _vector_schema
--@copy _check_watched _enqueue_changes _check_owner _check_may _readable_source _create_triggers _clip _sync_readers _protect_sidecar
--@copy _create_queue _drop_queues _create_queues _create_embedding _adopt_sql _create_hnsw _create_view _define_view _do_watch watch
--@copy _do_unwatch unwatch _reconcile_columns _follow_owner _lock_source _forget _do_reembed
--@copy reembed _do_set_model set_model _promote_if_ready _promote_if_free _do_rollback_model rollback_model _do_drop_previous
--@copy drop_previous _do_retry_failed retry_failed _do_discard_failed discard_failed _do_pause
--@copy pause _do_resume resume _do_process process _filter_rows _run_filtered _filtered_sidecar _nearest_sql _nearest _search search
--@copy _widen_ef_search _search_rows search_rows _hybrid_search hybrid_search _drain_sql
--@copy _row_key_sql _enqueue_applied_row _enqueue_truncated _orphans_sql _subscribed _follow_subscription
--@copy _do_on_subscription_ddl _on_subscription_ddl embed_sidecar_subscription _replication_lag _drop_trigger_if_there
--@copy _shard_keys _shard_nearest_sql _shard_text_sql _fan_out search_shards hybrid_search_shards
--@copy _lookup _write _busy_sql _lock_for_drain _build_index_if_ready _queue_backlog status verify _do_wait wait _backfill_sql _keys_check_sql
--@copy _invalid_keys _written_here_sql _on_ddl_end embed_text embed_query

CREATE EVENT TRIGGER embed_sidecar_ddl_end ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE FOREIGN TABLE', 'ALTER FOREIGN TABLE', 'CREATE TRIGGER',
                 'GRANT', 'REVOKE')
    EXECUTE FUNCTION embed_sidecar._on_ddl_end();

-- existing embeddings get the triggers the logical replication apply worker fires, and those of
-- tables a subscription copies lose their foreign key (sql/replica.sql)
SELECT embed_sidecar._create_triggers(s) FROM embed_sidecar.sources s;
SELECT embed_sidecar._follow_subscription(s) FROM embed_sidecar.sources s;
-- existing sidecars: SELECT for PUBLIC under row security instead of the table's copied grants
SELECT embed_sidecar._protect_sidecar(s) FROM embed_sidecar.sources s;
-- the names of the columns each embedding uses, for a later restore into a renumbered table
UPDATE embed_sidecar.sources s SET column_names = embed_sidecar._column_names(s);
-- each embedding gets its view, under the name watch() would give it, where that name is free
-- (else none: status shows it; unwatch() and watch() again with view_name => ... to have one)
UPDATE embed_sidecar.sources s SET search_view = embed_sidecar._define_view(s, v.name)
  FROM (SELECT x.id, CASE WHEN x.id = min(x.id) OVER (PARTITION BY x.source)
                          THEN embed_sidecar._clip(c.relname, 55) || '_vectors'
                          ELSE embed_sidecar._clip(c.relname || '_' || x.embedding, 55) || '_vectors' END AS name
          FROM embed_sidecar.sources x JOIN pg_class c ON c.oid = x.source WHERE x.role = 'current') v
 WHERE s.id = v.id AND to_regclass(format('%I.%I', embed_sidecar._schema_of(s.source), v.name)) IS NULL;
UPDATE embed_sidecar.sources s SET search_view = c.search_view
  FROM embed_sidecar.sources c WHERE c.source = s.source AND c.embedding = s.embedding AND c.role = 'current' AND s.role <> 'current';
-- made inside the update, the views became members of the extension: they are their tables', as
-- the ones watch() makes (dumped with them, not dropped with the extension)
DO $$
DECLARE
    v regclass;
BEGIN
    FOR v IN SELECT DISTINCT search_view FROM embed_sidecar.sources WHERE search_view IS NOT NULL LOOP
        EXECUTE format('ALTER EXTENSION pg_embed_sidecar DROP VIEW %s', v);
    END LOOP;
END
$$;

-- who may call what (sql/privileges.sql, less its last step)
--@privileges
