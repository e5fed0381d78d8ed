-- Runs last (finalize): who may call what.

-- Management is for table owners the administrator trusts: nothing here is PUBLIC.
REVOKE ALL ON ALL TABLES IN SCHEMA embed_sidecar FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA embed_sidecar FROM PUBLIC;
GRANT SELECT ON embed_sidecar.status TO PUBLIC;
GRANT EXECUTE ON FUNCTION embed_sidecar._status(embed_sidecar.sources), embed_sidecar._search_target(regclass),
    embed_sidecar._widen_ef_search(int), embed_sidecar.any_words_tsquery(regconfig, text),
    embed_sidecar.search(regclass, text, int),
    embed_sidecar.hybrid_search(regclass, text, int, int, float8, float8, int) TO PUBLIC;
-- embedding is for everyone by default; revoke both to restrict it:
--   REVOKE EXECUTE ON FUNCTION embed_text(text), embed_sidecar._embed(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION embed_sidecar._embed(text), embed_sidecar._embed_many(text[]), embed_sidecar._embed_with(text, text),
    embed_sidecar.model_info(), embed_sidecar.texts_embedded() TO PUBLIC;
