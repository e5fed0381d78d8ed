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
