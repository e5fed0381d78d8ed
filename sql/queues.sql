-- An embedding's two pgmq queues (the live lane and the bulk lane), made and removed by us.
--
-- Why not pgmq.create()/pgmq.drop_queue(): both first take pg_advisory_xact_lock(hashtext(
-- 'pgmq.queue_' || name)), and pg_advisory_lock is executable by every role, so a role without
-- any privilege could hold that lock and make watch(), unwatch(), set_model() and DROP TABLE of a
-- watched table wait for it for as long as it likes. The lock guards against two sessions making
-- the same queue at once; ours are named after the registry id and made or dropped only under
-- that registry row's lock (or by the transaction that inserts the row), so it guards nothing
-- here. What follows makes the tables exactly as pgmq 1.11's create_non_partitioned() lays them
-- out (columns, defaults, index names, its pgmq.meta row), so every other pgmq function treats
-- them as its own; tests/security/test_review_attacks.py compares them with a queue pgmq.create() makes,
-- so a pgmq whose layout differs fails the test suite, not a user's watch().

CREATE FUNCTION embed_sidecar._create_queue(queue_name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text := 'q_' || queue_name;
    a text := 'a_' || queue_name;
BEGIN
    -- our names are 'embed_sidecar_<id>[_bulk]': lower case, short, nothing to quote
    IF queue_name !~ '^embed_sidecar_[0-9]+(_bulk)?$' THEN
        RAISE EXCEPTION 'pg_embed_sidecar: % is not a queue name of ours', queue_name;
    END IF;
    EXECUTE format('CREATE TABLE pgmq.%I (
                        msg_id bigint PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
                        read_ct int DEFAULT 0 NOT NULL,
                        enqueued_at timestamptz DEFAULT now() NOT NULL,
                        last_read_at timestamptz,
                        vt timestamptz NOT NULL,
                        message jsonb,
                        headers jsonb)', q);
    EXECUTE format('CREATE TABLE pgmq.%I (
                        msg_id bigint PRIMARY KEY,
                        read_ct int DEFAULT 0 NOT NULL,
                        enqueued_at timestamptz DEFAULT now() NOT NULL,
                        last_read_at timestamptz,
                        archived_at timestamptz DEFAULT now() NOT NULL,
                        vt timestamptz NOT NULL,
                        message jsonb,
                        headers jsonb)', a);
    EXECUTE format('CREATE INDEX %I ON pgmq.%I (vt ASC)', q || '_vt_idx', q);
    EXECUTE format('CREATE INDEX %I ON pgmq.%I (archived_at)', 'archived_at_idx_' || queue_name, a);
    INSERT INTO pgmq.meta (queue_name, is_partitioned, is_unlogged) VALUES (queue_name, false, false);
END
$$;

-- Both lanes of a queue name; tolerates lanes that are already gone (without IF EXISTS, whose
-- notices a caller of watch() would see for every new embedding).
CREATE FUNCTION embed_sidecar._drop_queues(queue_name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lane text;
    t text;
BEGIN
    FOREACH lane IN ARRAY ARRAY[queue_name, embed_sidecar._bulk_queue(queue_name)] LOOP
        FOREACH t IN ARRAY ARRAY['q_' || lane, 'a_' || lane] LOOP
            IF to_regclass(format('pgmq.%I', t)) IS NOT NULL THEN
                EXECUTE format('DROP TABLE pgmq.%I', t);
            END IF;
        END LOOP;
        DELETE FROM pgmq.meta m WHERE m.queue_name = lane;
    END LOOP;
END
$$;

-- A fresh pair of lanes for an embedding. A queue of these names can only be left over from an
-- earlier installation of the extension (DROP EXTENSION does not drop pgmq's tables): its
-- messages are not ours to replay.
CREATE FUNCTION embed_sidecar._create_queues(queue_name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM embed_sidecar._drop_queues(queue_name);
    PERFORM embed_sidecar._create_queue(queue_name);
    PERFORM embed_sidecar._create_queue(embed_sidecar._bulk_queue(queue_name));
END
$$;
