-- What the monitoring surface looks like: the status view's columns and verify()'s.
SELECT column_name, data_type FROM information_schema.columns
 WHERE table_schema = 'embed_sidecar' AND table_name = 'status' ORDER BY ordinal_position;
SELECT p.parameter_name, p.data_type, p.parameter_mode FROM information_schema.parameters p
  JOIN information_schema.routines r USING (specific_schema, specific_name)
 WHERE r.routine_schema = 'embed_sidecar' AND r.routine_name = 'verify' ORDER BY p.ordinal_position;
-- a composite key, as status and verify report it
CREATE TABLE notes (lang text, slug text, body text, PRIMARY KEY (lang, slug));
INSERT INTO notes VALUES ('en', 'a', 'alpha'), ('en', 'b', 'beta'), ('de', 'a', 'eins');
SELECT embed_sidecar.watch('notes', 'body');
-- the backfill is in the bulk lane; the live lane is empty; nothing is covered yet; this database
-- has no worker (scripts/regress.sh turns it off), and status says so
SELECT pending, bulk_pending, bulk_progress, bulk_eta IS NULL AS no_eta_yet, failed, coverage, worker FROM embed_sidecar.status;
-- pausing the bulk lane: a writer's change is drained, the backfill waits
SELECT embed_sidecar.pause('notes', bulk_only => true);
INSERT INTO notes VALUES ('fr', 'a', 'un');
SELECT state, pending, bulk_pending FROM embed_sidecar.status;
SELECT embed_sidecar.process('notes');
SELECT lang, slug FROM notes_embeddings ORDER BY 1, 2;
SELECT state, pending, bulk_pending FROM embed_sidecar.status;
SELECT embed_sidecar.resume('notes');
SELECT embed_sidecar.process('notes');
SELECT lang, slug FROM notes_embeddings ORDER BY 1, 2;
SELECT * FROM embed_sidecar.verify('notes');
SELECT pending, bulk_pending, bulk_progress, failed, acked, vectors_written, coverage FROM embed_sidecar.status;
SELECT embed_sidecar.unwatch('notes', drop_sidecar => true);
DROP TABLE notes;
