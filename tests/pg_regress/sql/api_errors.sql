-- Bad calls are clean errors: SQLSTATE, message and hint, never an internal error.
-- (Paths show the PostgreSQL major as N: the same expected output for every major.)
\set SHOW_CONTEXT never
CREATE FUNCTION pg_temp.err(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text;
    msg text;
    hint text;
BEGIN
    EXECUTE stmt;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    RETURN regexp_replace(st || ': ' || msg || coalesce(E'\nhint: ' || nullif(hint, ''), ''),
                          '/postgresql/[0-9]+/', '/postgresql/N/', 'g');
END $$;

CREATE TABLE nopk (body text);
CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
SELECT pg_temp.err($$SELECT embed_sidecar.watch('nopk', 'body')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs', 'nope')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs', 'n')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.watch(NULL, 'body')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs', 'body', model => 'no-such-model')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs', 'body', model => '../etc')$$);
-- chunking settings out of range for the model
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs', 'body', chunking => true, chunk_tokens => 8)$$);
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs', 'body', chunking => true, chunk_overlap => 200)$$);
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs', 'body', chunk_overlap => 4)$$);
SELECT chunk, char_start, char_end, tokens, passage
  FROM embed_sidecar.chunk_text(E'The first paragraph holds about ten tokens here.\n\nThe second one is longer: it goes on past the budget of sixteen tokens, so it is cut.',
                                chunk_tokens => 16);
SELECT embed_sidecar.watch('docs', 'body');
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs', 'body')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.watch('docs_embeddings', 'model')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.process('nopk')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.process('docs', 0)$$);
SELECT pg_temp.err($$SELECT embed_sidecar.verify('nopk')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.set_model('docs', 'no-such-model')$$);
SELECT pg_temp.err($$SELECT * FROM embed_sidecar.search('nopk', 'query')$$);

-- settings that decide CPU, memory and which files the server opens are not for ordinary roles
CREATE ROLE regress_mallory;
GRANT EXECUTE ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name),
                          embed_sidecar.process(regclass, int) TO regress_mallory;
SELECT id AS docs_id FROM embed_sidecar.sources WHERE source = 'docs'::regclass \gset
SET ROLE regress_mallory;
SELECT pg_temp.err($$SET pg_embed_sidecar.intra_threads = 64$$);
SELECT pg_temp.err($$SET pg_embed_sidecar.max_batch_tokens = 1048576$$);
SELECT pg_temp.err($$SET pg_embed_sidecar.model_path = '/tmp'$$);
-- a role that does not own the table cannot watch or drain it
SELECT pg_temp.err($$SELECT embed_sidecar.watch('nopk', 'body')$$);
SELECT pg_temp.err($$SELECT embed_sidecar.process('docs')$$);
SELECT embed_sidecar.process();  -- every source it may manage: none
-- nor put keys on its queue
SELECT pg_temp.err(format('SELECT embed_sidecar._enqueue(%s, ARRAY[''[1]''])', :docs_id));
RESET ROLE;

-- a content column retyped after watch() is refused, never cast with a function its owner wrote
ALTER TABLE docs ALTER COLUMN body TYPE int USING length(body);
SELECT pg_temp.err($$INSERT INTO docs VALUES (1, 5, 0)$$);

SELECT embed_sidecar.unwatch('docs', drop_sidecar => true);
DROP TABLE docs, nopk;
REVOKE ALL ON FUNCTION embed_sidecar.watch(regclass, name, name, text, boolean, regconfig, text, text, boolean, int, int, text, name, boolean, name),
                       embed_sidecar.process(regclass, int) FROM regress_mallory;
DROP ROLE regress_mallory;
