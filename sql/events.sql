-- Keep the registry honest when a source, its content column or its sidecar is dropped.
CREATE FUNCTION embed_sidecar._on_sql_drop() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d record;
    s embed_sidecar.sources;
BEGIN
    FOR d IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type IN ('table', 'table column') LOOP
        FOR s IN SELECT * FROM embed_sidecar.sources x
                  WHERE (d.object_type = 'table' AND d.objid IN (x.source, x.sidecar))
                     OR (d.object_type = 'table column' AND d.objid = x.source
                         AND (d.objsubid = x.content_attnum OR d.objsubid = ANY (embed_sidecar._template_attnums(x.template)))) LOOP
            IF d.objid = s.source AND d.object_type = 'table' THEN
                -- derived data of a table that no longer exists
                PERFORM embed_sidecar._forget(s, true);
                RAISE NOTICE 'pg_embed_sidecar: % dropped; its sidecar and queue were dropped too', d.object_identity;
            ELSE
                PERFORM embed_sidecar._forget(s, false);
                RAISE WARNING 'pg_embed_sidecar: % dropped; stopped watching %', d.object_identity, s.source;
            END IF;
        END LOOP;
    END LOOP;
END
$$;
CREATE EVENT TRIGGER embed_sidecar_sql_drop ON sql_drop EXECUTE FUNCTION embed_sidecar._on_sql_drop();

-- After DDL on a watched table: its columns' names and numbers are reconciled (a rename, or a
-- dump restored after a DROP COLUMN: _reconcile_columns); its sidecar passes to its new owner
-- (ALTER TABLE ... OWNER TO: the former owner keeps no hold on it); and it may not join an inheritance tree
-- or a partitioned table (CREATE TABLE ... INHERITS / PARTITION OF, ALTER TABLE ... INHERIT /
-- ATTACH PARTITION): statement triggers on one table of a hierarchy miss the writes made through
-- another, so its sidecar would silently fall behind. watch() refuses such tables for the same
-- reason.
CREATE FUNCTION embed_sidecar._on_ddl_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass;
    id int;
BEGIN
    FOR id IN SELECT x.id FROM embed_sidecar.sources x
               WHERE x.source IN (SELECT c.objid FROM pg_event_trigger_ddl_commands() c WHERE c.classid = 'pg_class'::regclass
                                  UNION ALL
                                  SELECT t.tgrelid FROM pg_event_trigger_ddl_commands() c JOIN pg_trigger t ON t.oid = c.objid
                                   WHERE c.classid = 'pg_trigger'::regclass) LOOP
        PERFORM embed_sidecar._reconcile_columns(id);
        PERFORM embed_sidecar._follow_owner(id);
    END LOOP;
    SELECT x.source INTO rel FROM embed_sidecar.sources x
     WHERE EXISTS (SELECT 1 FROM pg_inherits i WHERE x.source IN (i.inhparent, i.inhrelid))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pg_embed_sidecar: watched table % cannot be part of an inheritance tree or a partitioned table', rel
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Statement triggers on one table of a hierarchy miss the writes made through another. Unwatch it first, or watch a plain table.';
    END IF;
END
$$;
CREATE EVENT TRIGGER embed_sidecar_ddl_end ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TRIGGER')
    EXECUTE FUNCTION embed_sidecar._on_ddl_end();
