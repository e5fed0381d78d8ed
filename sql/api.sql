-- Public SQL API. Created in the extension's schema (public by default) so that `embed_text`
-- works unqualified; everything else lives in schema embed_sidecar.
-- SQL-standard bodies (RETURN / BEGIN ATOMIC) are parsed now, while CREATE EXTENSION's
-- search_path holds pgvector's schema, so `vector` stays bound whatever the caller's search_path.

CREATE FUNCTION embed_text(content text) RETURNS vector
    LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    RETURN embed_sidecar._embed(content)::vector;
COMMENT ON FUNCTION embed_text(text) IS
    'Embedding of one text (a document: the model''s passage prefix, if any) with the session''s model (pg_embed_sidecar.model); NULL in, NULL out';

CREATE FUNCTION embed_query(content text) RETURNS vector
    LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
    RETURN embed_sidecar._embed_as_query(content)::vector;
COMMENT ON FUNCTION embed_query(text) IS
    'Embedding of one search query with the session''s model (its query prefix, where the model has one; embed_text takes the passage prefix); NULL in, NULL out';

CREATE FUNCTION embed_texts(contents text[]) RETURNS vector[]
    LANGUAGE sql STABLE STRICT PARALLEL RESTRICTED
BEGIN ATOMIC
    SELECT coalesce(array_agg(e.embedding::vector ORDER BY e.ord), '{}')
      FROM embed_sidecar._embed_many(contents) AS e;
END;
COMMENT ON FUNCTION embed_texts(text[]) IS
    'Embeddings of many texts in one batched inference, in input order; NULL elements give NULL';

-- What watch(model => ...) and set_model() can use: every directory under
-- pg_embed_sidecar.model_path (models/install.sh puts the registry-verified ones there).
CREATE VIEW embed_sidecar.models AS
SELECT name, model_id, dims, max_length AS token_window, size_bytes, error FROM embed_sidecar._installed_models();
COMMENT ON VIEW embed_sidecar.models IS 'Installed models: name, identity, dimensions, token window, size on disk (or why unusable)';

GRANT USAGE ON SCHEMA embed_sidecar TO PUBLIC;
