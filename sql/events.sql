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
-- (ALTER TABLE ... OWNER TO: the former owner keeps no hold on it); and it may not join an
-- inheritance tree or a partitioned table (CREATE [FOREIGN] TABLE ... INHERITS / PARTITION OF,
-- ALTER TABLE ... INHERIT / ATTACH PARTITION): statement triggers on one table of a hierarchy
-- miss the writes made through another, so its sidecar would silently fall behind. watch()
-- refuses such tables for the same reason. Only the tables this command touched are judged, so a
-- hierarchy made some other way never blocks other roles' DDL. After GRANT and REVOKE (which name
-- no object here) every sidecar's readers are set to its source's again (_sync_readers).
CREATE FUNCTION embed_sidecar._on_ddl_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    touched oid[];
    rel regclass;
    s embed_sidecar.sources;
BEGIN
    IF tg_tag IN ('GRANT', 'REVOKE') THEN
        -- The GRANTs and REVOKEs _sync_readers makes need no sync of their own (it marks them):
        -- re-entering once per statement would nest as deep as there are statements. The mark
        -- is a plain setting anyone can set, which only skips this sync for that session's own
        -- GRANT and REVOKE: a sidecar's grants then lag its table's, and a role whose SELECT on
        -- the table was revoked still cannot read it (the policy reads the table as that role).
        IF current_setting('embed_sidecar.syncing_readers', true) = 'on' THEN
            RETURN;
        END IF;
        FOR s IN SELECT * FROM embed_sidecar.sources x
                  WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = x.source)
                    AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = x.sidecar) LOOP
            PERFORM embed_sidecar._sync_readers(s);
        END LOOP;
        RETURN;
    END IF;
    SELECT array_agg(o) INTO touched
      FROM (SELECT c.objid AS o FROM pg_event_trigger_ddl_commands() c WHERE c.classid = 'pg_class'::regclass
            UNION ALL
            SELECT t.tgrelid FROM pg_event_trigger_ddl_commands() c JOIN pg_trigger t ON t.oid = c.objid
             WHERE c.classid = 'pg_trigger'::regclass) t;
    FOR s IN SELECT * FROM embed_sidecar.sources x WHERE x.source = ANY (touched) LOOP
        PERFORM embed_sidecar._reconcile_columns(s.id);
        PERFORM embed_sidecar._follow_owner(s.id);
        -- (read again: the two above may have changed the row and the sidecar's owner)
        PERFORM embed_sidecar._sync_readers(x) FROM embed_sidecar.sources x WHERE x.id = s.id;
    END LOOP;
    SELECT x.source INTO rel FROM embed_sidecar.sources x
      JOIN pg_inherits i ON x.source IN (i.inhparent, i.inhrelid)
     WHERE i.inhparent = ANY (touched) OR i.inhrelid = ANY (touched)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pg_embed_sidecar: watched table % cannot be part of an inheritance tree or a partitioned table', rel
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Statement triggers on one table of a hierarchy miss the writes made through another. Unwatch it first, or watch a plain table.';
    END IF;
END
$$;
CREATE EVENT TRIGGER embed_sidecar_ddl_end ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE FOREIGN TABLE', 'ALTER FOREIGN TABLE', 'CREATE TRIGGER',
                 'GRANT', 'REVOKE')
    EXECUTE FUNCTION embed_sidecar._on_ddl_end();
