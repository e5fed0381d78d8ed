-- A watched table fed by logical replication (README, "Beyond one machine"). The apply worker,
-- its initial table copy included, and any session with session_replication_role = replica fire
-- only row triggers set ENABLE REPLICA or ALWAYS, and no foreign key action (RI triggers are
-- ordinary ones): so each watched table also has
--   embed_sidecar_<id>_replica   AFTER INSERT OR UPDATE OR DELETE, FOR EACH ROW, ENABLE REPLICA:
--                                the row's key (the old one too when a key changed) goes on the
--                                live lane (_enqueue_applied, src/replica.rs); the drain embeds
--                                it, or removes its vector when the row is gone or blank
--   embed_sidecar_<id>_truncate  AFTER TRUNCATE, ENABLE ALWAYS: the sidecar's rows without a
--                                source row go on the live lane (_enqueue_orphans)
-- The apply worker replays TRUNCATE without CASCADE, and PostgreSQL refuses to truncate a table a
-- foreign key references: so a sidecar whose table a subscription copies has no foreign key
-- (_follow_subscription, at watch() and after CREATE/ALTER SUBSCRIPTION), and a statement trigger
--   embed_sidecar_<id>_delete    AFTER DELETE, FOR EACH STATEMENT (origin): deleted keys, queued
-- stands in for ON DELETE CASCADE for local deletes there.

-- The key of a row as a JSON array's text, an expression over alias, made only of output
-- functions (_key_elements): never a cast the type's owner may have created (the apply worker
-- that fires the replica trigger is usually a superuser).
CREATE FUNCTION embed_sidecar._row_key_sql(rel regclass, attnums smallint[], alias text) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT format('pg_catalog.jsonb_build_array(%s)::text', embed_sidecar._key_elements(rel, attnums, alias));
END;

-- The row trigger the apply worker fires (see the top of this file). Arguments as the statement
-- triggers': source id, content attnum, key attnums, template. It runs with the apply worker's
-- rights and reads the row only through _row_key_sql's expressions; whether the text changed is
-- left to the drain (an unchanged hash is acked without inference), so no operator of a column's
-- type runs here. The settings fix how keys print, as in the drain (_invalid_keys, _lookup).
-- It never raises because of a row's data: the apply worker would abort its transaction and
-- retry the same change for ever, and every table of the subscription would stop. A key that
-- cannot be queued (longer than 2,000 bytes as JSON, refused by its type as the table's owner
-- checks it) is a WARNING and a dead letter (_enqueue_replicated, src/replica.rs).
CREATE FUNCTION embed_sidecar._enqueue_applied_row() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET extra_float_digits = 1
    SET IntervalStyle = 'postgres' SET DateStyle = 'ISO, MDY'
AS $$
DECLARE
    key_sql text := embed_sidecar._row_key_sql(TG_RELID, TG_ARGV[2]::smallint[], 'r');
    new_key text;
    old_key text;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        EXECUTE format('SELECT %s FROM (SELECT ($1).*) r', key_sql) INTO new_key USING NEW;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        EXECUTE format('SELECT %s FROM (SELECT ($1).*) r', key_sql) INTO old_key USING OLD;
    END IF;
    PERFORM embed_sidecar._enqueue_replicated(TG_ARGV[0]::int,
                                              ARRAY(SELECT DISTINCT k FROM unnest(ARRAY[new_key, old_key]) k WHERE k IS NOT NULL));
    RETURN NULL;
END
$$;

-- The TRUNCATE trigger (see the top of this file): the sidecar's orphans, queued. Listing them
-- runs the owner's policies on the sidecar and the table; an error there is a WARNING, not the
-- apply worker's (the orphans stay, and verify() counts them), for the reason the row trigger
-- never raises. One subtransaction per TRUNCATE.
CREATE FUNCTION embed_sidecar._enqueue_truncated() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM embed_sidecar._enqueue_orphans(TG_ARGV[0]::int);
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pg_embed_sidecar: the vectors of %''s truncated rows were not queued for removal: %', TG_RELID::regclass, SQLERRM
        USING HINT = 'embed_sidecar.verify() counts them as orphans; reembed() or unwatch() and watch() again removes them.';
    RETURN NULL;
END
$$;

-- The SELECT that lists the keys of a sidecar's rows whose source row is gone (run by
-- _enqueue_orphans as the table's owner), in the drain's key form.
CREATE FUNCTION embed_sidecar._orphans_sql(s embed_sidecar.sources) RETURNS text
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT format('SELECT DISTINCT %s::text FROM %s sc WHERE NOT EXISTS (SELECT FROM %s src WHERE %s)',
                  embed_sidecar._key_json(s, 'sc'), s.sidecar, s.source, embed_sidecar._side_join(s, 'sc', 'src'));
END;

-- Whether a subscription of this database copies the table.
CREATE FUNCTION embed_sidecar._subscribed(rel regclass) RETURNS boolean
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT EXISTS (SELECT FROM pg_catalog.pg_subscription_rel r WHERE r.srrelid = rel);
END;

-- A sidecar whose table a subscription copies: its foreign key goes (the apply worker's TRUNCATE
-- would fail on it, and its cascade does not run under the apply worker anyway), and the delete
-- trigger stands in for it (local deletes; replicated ones fire the replica trigger). Run as the
-- extension's owner by watch() and after CREATE/ALTER SUBSCRIPTION; the ALTER TABLE runs no code
-- of the table's owner. A key changed by a local UPDATE on such a table leaves the old key's
-- vector behind (verify() counts it as an orphan; README).
CREATE FUNCTION embed_sidecar._follow_subscription(s embed_sidecar.sources) RETURNS boolean
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fk name;
BEGIN
    IF NOT embed_sidecar._subscribed(s.source) THEN
        RETURN false;
    END IF;
    FOR fk IN SELECT c.conname FROM pg_constraint c
               WHERE c.conrelid = s.sidecar AND c.confrelid = s.source AND c.contype = 'f' LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', s.sidecar, fk);
        RAISE NOTICE 'pg_embed_sidecar: % is copied by a subscription: its sidecar % no longer has a foreign key', s.source, s.sidecar
            USING HINT = 'Replicated deletes and TRUNCATE reach the sidecar through the replica triggers.';
    END LOOP;
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = s.source AND tgname = 'embed_sidecar_' || s.id || '_delete') THEN
        EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows
                        FOR EACH STATEMENT EXECUTE FUNCTION embed_sidecar._enqueue_changes(%L, %L, %L, %L)',
                       'embed_sidecar_' || s.id || '_delete', s.source, s.id, coalesce(s.content_attnum::text, ''),
                       s.key_attnums::text, coalesce(s.template, ''));
    END IF;
    RETURN true;
END
$$;

-- After CREATE SUBSCRIPTION and ALTER SUBSCRIPTION (which add tables to pg_subscription_rel in the
-- same transaction), the body of the event trigger, run as the extension's owner for the role
-- that ran the command (_on_subscription_ddl records it):
-- * a subscription may not copy into a sidecar, nor into a table of the schemas embed_sidecar
--   (the registry, the dead letters) and pgmq (the queues): a publisher table named like one of
--   them (a FOR ALL TABLES publication matches every table by name, and all these names are
--   predictable) would have the apply worker, a superuser, write vectors the drain never made,
--   plant or replay dead letters, or TRUNCATE the registry or a queue. The command is refused. (Refused here, at the command, and not by a trigger on the
--   sidecar: an error in the apply worker stops the whole subscription; a table PostgreSQL does
--   not list in pg_subscription_rel gets no changes applied, so it is enough to refuse the
--   commands that list tables: CREATE SUBSCRIPTION and ALTER SUBSCRIPTION ... REFRESH / SET / ADD
--   PUBLICATION.)
-- * every watched table now copied follows its subscription (_follow_subscription), among the
--   tables whose owner's rights that role has: from PostgreSQL 16 a member of
--   pg_create_subscription may subscribe to a publication naming any table, and must not make
--   another owner's sidecar lose its foreign key.
CREATE FUNCTION embed_sidecar._do_on_subscription_ddl() RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    caller oid := embed_sidecar._calling_role();
    hit record;
BEGIN
    SELECT p.subname, p.subslotname, r.srrelid::regclass AS rel,
           CASE WHEN EXISTS (SELECT FROM embed_sidecar.sources s WHERE s.sidecar = r.srrelid) THEN 'a sidecar'
                ELSE 'a table of pg_embed_sidecar or pgmq' END AS what
      INTO hit
      FROM pg_subscription_rel r
      JOIN pg_subscription p ON p.oid = r.srsubid
      JOIN pg_class c ON c.oid = r.srrelid
     WHERE EXISTS (SELECT FROM embed_sidecar.sources s WHERE s.sidecar = r.srrelid)
        OR c.relnamespace IN (SELECT n.oid FROM pg_namespace n WHERE n.nspname IN ('embed_sidecar', 'pgmq'))
     ORDER BY p.subname, r.srrelid LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pg_embed_sidecar: subscription % would copy into %, %', hit.subname, hit.rel, hit.what
            USING ERRCODE = 'object_in_use',
                  DETAIL = 'A table of its publication has that table''s name; only pg_embed_sidecar writes it.',
                  HINT = format('Publish the tables by name (CREATE PUBLICATION ... FOR TABLE), or leave that table out of the publication. '
                                'If CREATE SUBSCRIPTION made the replication slot %s on the publisher, drop it there: '
                                'SELECT pg_drop_replication_slot(%L).', coalesce(hit.subslotname::text, '(none)'),
                                coalesce(hit.subslotname::text, ''));
    END IF;
    PERFORM embed_sidecar._follow_subscription(s)
       FROM embed_sidecar.sources s JOIN pg_class c ON c.oid = s.source
      WHERE EXISTS (SELECT FROM pg_class x WHERE x.oid = s.sidecar)
        AND pg_has_role(caller, c.relowner, 'USAGE');
END
$$;

-- The event trigger: records the role that ran the command (src/pg/authority.rs, "who is
-- calling"), then the body.
CREATE FUNCTION embed_sidecar._on_subscription_ddl() RETURNS event_trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET pg_embed_sidecar.caller = ''
AS $$
BEGIN
    PERFORM embed_sidecar._enter();
    PERFORM embed_sidecar._do_on_subscription_ddl();
END
$$;
CREATE EVENT TRIGGER embed_sidecar_subscription ON ddl_command_end
    WHEN TAG IN ('CREATE SUBSCRIPTION', 'ALTER SUBSCRIPTION')
    EXECUTE FUNCTION embed_sidecar._on_subscription_ddl();

-- How far the apply worker is behind the publisher, for a table a subscription copies (NULL for
-- any other table, and while it cannot be told: the table's initial copy is still running, or
-- the subscription's apply worker is not running — status.behind is then NULL too, which is what
-- to alert on). While the worker has received changes past the publisher's last reported end of
-- WAL it is catching up, and the lag is the age of the newest message it received; otherwise 0.
CREATE FUNCTION embed_sidecar._replication_lag(rel regclass, OUT subscribed boolean, OUT lag interval)
    LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT count(r.*) > 0,
           max(CASE WHEN r.srsubstate <> 'r' OR w.pid IS NULL THEN NULL
                    WHEN w.received_lsn > w.latest_end_lsn THEN greatest(pg_catalog.now() - w.last_msg_send_time, interval '0')
                    ELSE interval '0' END)
           -- (max ignores NULLs: one unknown subscription makes the whole answer unknown)
           + CASE WHEN bool_or(r.srsubstate <> 'r' OR w.pid IS NULL) THEN NULL ELSE interval '0' END
      FROM pg_catalog.pg_subscription_rel r
      LEFT JOIN pg_catalog.pg_stat_subscription w ON w.subid = r.srsubid AND w.relid IS NULL
     WHERE r.srrelid = rel;
END;
