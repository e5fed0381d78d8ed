-- watch() builds the sidecar, triggers and queue; the triggers enqueue only real changes; process()
-- drains in the session; unwatch() takes it all down again.
CREATE TABLE docs (id int PRIMARY KEY, lang text, body text);
INSERT INTO docs VALUES (1, 'en', 'the cat sat on the mat'), (2, 'en', ''), (3, 'en', NULL),
                        (4, 'en', 'stock markets fell sharply today'), (5, NULL, 'no language given');
SELECT embed_sidecar.watch('docs', 'body');

-- the sidecar: the key, the vector, its model and content hash, a tsvector; HNSW and GIN indexes
SELECT attname, format_type(atttypid, atttypmod) AS type
  FROM pg_attribute WHERE attrelid = 'docs_embeddings'::regclass AND attnum > 0 ORDER BY attnum;
SELECT am.amname, pg_get_indexdef(i.indexrelid) ~ 'vector_cosine_ops' AS cosine
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
 WHERE i.indrelid = 'docs_embeddings'::regclass ORDER BY 1;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'docs'::regclass AND NOT tgisinternal ORDER BY 1;
SELECT confrelid::regclass, confdeltype FROM pg_constraint WHERE conrelid = 'docs_embeddings'::regclass AND contype = 'f';

-- backfill (the bulk lane): three rows have content (a NULL in another column changes nothing)
SELECT source, sidecar, model LIKE 'all-MiniLM-L6-v2@%' AS default_model, state, pending, bulk_pending, failed
  FROM embed_sidecar.status;
SELECT embed_sidecar.process('docs');
SELECT * FROM embed_sidecar.verify('docs');
SELECT id, vector_dims(embedding) AS dims, round(vector_norm(embedding)::numeric, 4) AS norm,
       content_hash = sha256(convert_to(d.body, 'UTF8')) AS hash_ok
  FROM docs_embeddings JOIN docs d USING (id) ORDER BY id;

-- an update that leaves the content alone enqueues nothing; one that changes it does
UPDATE docs SET lang = 'de';
SELECT pending FROM embed_sidecar.status;
UPDATE docs SET body = 'a dog chased a ball' WHERE id = 2;
UPDATE docs SET body = NULL WHERE id = 1;
SELECT pending FROM embed_sidecar.status;
SELECT embed_sidecar.process('docs');
SELECT id FROM docs_embeddings ORDER BY id;
SELECT * FROM embed_sidecar.verify('docs');

-- deletes cascade, no queue traffic
DELETE FROM docs WHERE id = 4;
SELECT id FROM docs_embeddings ORDER BY id;
SELECT pending, bulk_pending, bulk_progress, acked, vectors_written, dead_lettered FROM embed_sidecar.status;
SELECT key FROM embed_sidecar.search('docs', 'a puppy playing', 1);
SELECT embed_sidecar.wait('docs', '1 s');

-- unwatch keeps the sidecar unless asked, drops triggers and queue
SELECT embed_sidecar.unwatch('docs');
SELECT count(*) AS watched FROM embed_sidecar.sources;
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'docs'::regclass AND NOT tgisinternal;
SELECT count(*) AS queues FROM pgmq.list_queues();
SELECT to_regclass('docs_embeddings') IS NOT NULL AS sidecar_kept;
DROP TABLE docs CASCADE;
DROP TABLE docs_embeddings;
