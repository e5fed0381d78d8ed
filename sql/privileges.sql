-- Runs last (finalize): who may call what.

-- Management is for table owners the administrator trusts: nothing here is PUBLIC.
REVOKE ALL ON ALL TABLES IN SCHEMA embed_sidecar FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA embed_sidecar FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA embed_sidecar FROM PUBLIC;
GRANT SELECT ON embed_sidecar.status, embed_sidecar.models TO PUBLIC;
GRANT EXECUTE ON FUNCTION embed_sidecar._readable_source(regclass, text),
    embed_sidecar._widen_ef_search(int), embed_sidecar._candidates(boolean, int), embed_sidecar.any_words_tsquery(regconfig, text),
    embed_sidecar._check_filter(text), embed_sidecar._filter_rows(regclass, text, text),
    embed_sidecar._run_filtered(text, text),
    embed_sidecar._search_rows(anyelement, text, int, text, text, text),
    embed_sidecar._filtered_sidecar(embed_sidecar.sources, text), embed_sidecar._nearest_sql(embed_sidecar.sources, text, boolean, real[], int, int),
    embed_sidecar._nearest(embed_sidecar.sources, real[], int, text, text),
    embed_sidecar._search(regclass, text, int, text, text, text), embed_sidecar.search(regclass, text, int, text, text),
    embed_sidecar.search_rows(anyelement, text, int, text, text),
    embed_sidecar._hybrid_search(regclass, text, int, int, float8, float8, int, text, text, text),
    embed_sidecar.hybrid_search(regclass, text, int, int, float8, float8, int, text, text),
    embed_sidecar._columns(regclass, smallint[], text), embed_sidecar._key_from_json(regclass, smallint[], text, text),
    embed_sidecar.verify(regclass, text), embed_sidecar._calling_role(), embed_sidecar._queue_backlog(int),
    embed_sidecar._worker_state(), embed_sidecar._installed_models(), embed_sidecar._key_json(embed_sidecar.sources, text),
    embed_sidecar._side_join(embed_sidecar.sources, text, text), embed_sidecar._sidecar_keys(embed_sidecar.sources),
    embed_sidecar._vector_schema(), embed_sidecar._enter(), embed_sidecar._leave(), embed_sidecar._session_role(),
    embed_sidecar._key_elements(regclass, smallint[], text) TO PUBLIC;
-- The bodies of the management functions: each checks that its caller may execute the public one
-- (embed_sidecar._check_may), so the administrator grants those, as before.
GRANT EXECUTE ON FUNCTION
    embed_sidecar._do_watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name),
    embed_sidecar._do_unwatch(regclass, boolean, text), embed_sidecar._do_reembed(regclass, text),
    embed_sidecar._do_set_model(regclass, text, text), embed_sidecar._do_rollback_model(regclass, text),
    embed_sidecar._do_drop_previous(regclass, text), embed_sidecar._do_retry_failed(regclass, text),
    embed_sidecar._do_pause(regclass, boolean, text), embed_sidecar._do_resume(regclass, text),
    embed_sidecar._do_process(regclass, int), embed_sidecar._do_wait(regclass, interval),
    embed_sidecar._do_discard_failed(regclass, text) TO PUBLIC;
-- What the statement triggers run with the writer's rights (sql/triggers.sql); _enqueue and
-- _embed_now check that the writer may write the table.
GRANT EXECUTE ON FUNCTION embed_sidecar._columns(regclass, smallint[], text), embed_sidecar._key_join(regclass, smallint[], text, text),
    embed_sidecar._content_expr(regclass, smallint, text), embed_sidecar._content_sql(regclass, smallint, text, text),
    embed_sidecar._template_attnums(text), embed_sidecar._is_blank(text),
    embed_sidecar._enqueue(int, text[]), embed_sidecar._embed_now(int, text[]), embed_sidecar._invalid_keys(text, text[]) TO PUBLIC;
-- What the replica and TRUNCATE triggers run with the writer's rights (sql/replica.sql);
-- _enqueue_applied, _enqueue_replicated and _enqueue_orphans check that the writer may write the
-- table. status reads the replication lag as its querier. The subscription event trigger's body
-- acts only for the role that ran the command (_calling_role), so whoever may run CREATE
-- SUBSCRIPTION (PostgreSQL 16+: members of pg_create_subscription) may run it.
GRANT EXECUTE ON FUNCTION embed_sidecar._row_key_sql(regclass, smallint[], text), embed_sidecar._enqueue_applied(int, text[]),
    embed_sidecar._enqueue_replicated(int, text[]), embed_sidecar._enqueue_orphans(int),
    embed_sidecar._replication_lag(regclass), embed_sidecar._do_on_subscription_ddl() TO PUBLIC;
-- search across embedding nodes (sql/shards.sql): runs as its caller, as search does
GRANT EXECUTE ON FUNCTION embed_sidecar._shard_keys(regclass), embed_sidecar._shard_nearest_sql(regclass, int), embed_sidecar._model_id(text),
    embed_sidecar.search_shards(regclass[], text, int, boolean, text), embed_sidecar._shard_text_sql(regclass, int),
    embed_sidecar._fan_out(regclass[], text[], boolean, real[], tsquery, text), embed_sidecar._outside_restricted(),
    embed_sidecar.hybrid_search_shards(regclass[], text, int, int, float8, float8, int, boolean, text, regconfig) TO PUBLIC;
-- What the drain runs as the table's owner (sql/drain.sql): SECURITY INVOKER helpers that only
-- execute the statements they are handed, with the rights of whoever calls them.
GRANT EXECUTE ON FUNCTION embed_sidecar._content_hash(text), embed_sidecar._key_from_json(regclass, smallint[], text, text),
    embed_sidecar._lookup(text, jsonb[], text), embed_sidecar._written_here(bigint),
    embed_sidecar._write(text, text, jsonb[], bytea[], real[], int, text, text, jsonb[], text, jsonb[], text) TO PUBLIC;
-- embedding is for everyone by default; revoke both to restrict it:
--   REVOKE EXECUTE ON FUNCTION embed_text(text), embed_sidecar._embed(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_sidecar._embed(text), embed_sidecar._embed_many(text[]), embed_sidecar._embed_with(text, text),
    embed_sidecar._embed_query(text, text, text), embed_sidecar._embed_as_query(text),
    embed_sidecar.model_info(), embed_sidecar.texts_embedded(), embed_sidecar.chunk_text(text, text, int, int),
    embed_sidecar.inference_service() TO PUBLIC;

-- The install script's last step: once it commits, the launcher starts this database's drain
-- worker (when the library is preloaded; src/bgw/launcher.rs).
SELECT embed_sidecar._announce_extension();
