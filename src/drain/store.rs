//! The Rust half of sql/drain.sql: every statement a pass runs against the registry, the queues,
//! the dead-letter table, the source (lookups, as its owner) and the sidecar (writes, as its
//! owner). The pass itself (src/drain/mod.rs) decides; this file only reads and writes.

use std::collections::{BTreeMap, HashMap, HashSet};

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::settle::{Looked, Message, Settlement};
use super::Mode;
use crate::error::SidecarError;
use crate::gucs;
use crate::pg::authority::as_table_owner;
use crate::pg::row::required;

/// A registry row with what a pass needs, and the statements built for it (sql/drain.sql).
pub(super) struct Source {
    pub(super) queue: String,
    pub(super) bulk_queue: String,
    pub(super) model: String,
    pub(super) model_id: String,
    pub(super) dims: i32,
    /// NULL (`watch(..., fts_config => NULL)`): no full text, `fts` stays NULL at no cost.
    pub(super) fts_config: Option<String>,
    pub(super) owner: pg_sys::Oid,
    pub(super) lookup_sql: String,
    pub(super) upsert_sql: String,
    pub(super) clear_sql: String,
    /// Finds, without waiting, the rows of a write that other sessions hold locked (the worker's
    /// writes leave them out: sql/drain.sql, `_write`).
    pub(super) busy_sql: String,
    /// Chunked sources: drops a row's passages past its new last one (sql/drain.sql).
    pub(super) trim_sql: Option<String>,
    /// Chunked sources: (tokens per passage, overlap).
    pub(super) chunking: Option<(usize, usize)>,
    /// `pause(source, bulk_only => true)`: the live lane drains, the bulk lane waits.
    pub(super) bulk_paused: bool,
    /// Being built by `set_model()`: takes over when a pass finds both lanes empty.
    pub(super) shadow: bool,
    /// `pause(source)`: the worker leaves both lanes alone; `process()` still drains them.
    pub(super) paused: bool,
    /// A large backfill runs without the HNSW index; it is built once the bulk lane is empty.
    pub(super) index_pending: bool,
}

/// The source's registry row and what a pass needs of it, read without a lock: the pass takes its
/// locks first (`lock_pass`).
pub(super) fn load_source(client: &mut SpiClient<'_>, id: i32) -> Result<Source, SidecarError> {
    let rows = client.select(
        "SELECT s.queue_name, s.model, s.model_id, s.dims, s.fts_config::text, c.relowner,
                d.lookup_sql, d.upsert_sql, d.clear_sql, embed_sidecar._bulk_queue(s.queue_name),
                s.state = 'bulk_paused', s.role = 'shadow', s.state = 'paused', d.trim_sql,
                s.chunk_tokens, s.chunk_overlap, s.index_pending, embed_sidecar._busy_sql(s)
           FROM embed_sidecar.sources s JOIN pg_catalog.pg_class c ON c.oid = s.source,
                LATERAL embed_sidecar._drain_sql(s) d
          WHERE s.id = $1",
        None,
        &[id.into()],
    )?;
    let Some(row) = rows.into_iter().next() else {
        return Err(SidecarError::Unwatched(id));
    };
    let column = |name: &str| format!("column {name} of source {id}");
    let text = |i: usize, name: &str| required::<String>(&row, i, &column(name));
    Ok(Source {
        queue: text(1, "queue_name")?,
        model: text(2, "model")?,
        model_id: text(3, "model_id")?,
        dims: required(&row, 4, &column("dims"))?,
        fts_config: row.get::<String>(5)?,
        owner: required(&row, 6, &column("owner"))?,
        lookup_sql: text(7, "lookup_sql")?,
        upsert_sql: text(8, "upsert_sql")?,
        clear_sql: text(9, "clear_sql")?,
        bulk_queue: text(10, "bulk queue")?,
        bulk_paused: required(&row, 11, &column("state"))?,
        shadow: required(&row, 12, &column("role"))?,
        paused: required(&row, 13, &column("state"))?,
        trim_sql: row.get::<String>(14)?,
        chunking: match (row.get::<i32>(15)?, row.get::<i32>(16)?) {
            (Some(t), Some(o)) => Some((t as usize, o as usize)),
            _ => None,
        },
        index_pending: required(&row, 17, &column("index_pending"))?,
        busy_sql: text(18, "busy_sql")?,
    })
}

pub(super) fn read_messages(client: &mut SpiClient<'_>, queue: &str, limit: i32) -> Result<Vec<Message>, SidecarError> {
    let rows = client.update(
        "SELECT msg_id, read_ct, message::text FROM pgmq.read($1, $2, $3) ORDER BY msg_id",
        None,
        &[queue.into(), gucs::visibility_timeout_s().into(), limit.into()],
    )?;
    let mut messages = Vec::new();
    for row in rows {
        let what = format!("a message of queue {queue}");
        messages.push(Message {
            id: required(&row, 1, &what)?,
            read_ct: required(&row, 2, &what)?,
            key: required(&row, 3, &what)?,
        });
    }
    Ok(messages)
}

/// Hashes (hex) of the passages each key of a chunked source has vectors for (with the current model).
pub(super) type Known = HashMap<String, HashSet<String>>;

/// Current text, hash and state of each key, read as the table's owner; for a chunked source
/// also the passages it has vectors for.
pub(super) fn lookup(
    client: &mut SpiClient<'_>,
    src: &Source,
    keys: Vec<String>,
) -> Result<(Vec<Looked>, Known), SidecarError> {
    as_table_owner(src.owner, || {
        let rows = client.update(
            "SELECT key, blank, unchanged, content, hash, error, known FROM embed_sidecar._lookup($1, $2::text[]::jsonb[], $3)",
            None,
            &[src.lookup_sql.as_str().into(), keys.into(), src.model_id.as_str().into()],
        )?;
        let mut looked = Vec::new();
        let mut known = Known::new();
        for row in rows {
            if let Some(hashes) = row.get::<Vec<String>>(7)? {
                known.insert(required(&row, 1, "a looked-up key")?, hashes.into_iter().collect());
            }
            looked.push(Looked {
                key: required(&row, 1, "a looked-up key")?,
                blank: row.get::<bool>(2)?.unwrap_or(true),
                unchanged: row.get::<bool>(3)?.unwrap_or(false),
                content: row.get::<String>(4)?,
                hash: row.get::<Vec<u8>>(5)?,
                error: row.get::<String>(6)?,
            });
        }
        Ok((looked, known))
    })
}

/// Vectors of one pass, ready to write.
#[derive(Default)]
pub(super) struct Embedded {
    pub(super) keys: Vec<String>,
    pub(super) hashes: Vec<Vec<u8>>,
    pub(super) flat: Vec<f32>,
    /// Chunked sources: per key, its passages as JSON `[[char_start, char_end, vector], ...]`,
    /// `vector` a 1-based index into `flat`, or 0 to keep the row's vector of the same passage.
    pub(super) layouts: Vec<String>,
}

/// What a write did: rows written, the keys whose write failed (with the error), and the keys
/// whose rows other sessions held locked (tried again later, no attempt counted).
#[derive(Default)]
pub(super) struct Written {
    pub(super) rows: i64,
    pub(super) failed: Vec<(String, String)>,
    pub(super) busy: Vec<String>,
}

/// Write vectors and clear blanks as the table's owner. `wait_for_rows`: wait for rows other
/// sessions hold locked, as any statement of the caller's transaction would (`process()`, sync);
/// otherwise (the worker) they are left out at once and come back as busy.
pub(super) fn write(
    client: &mut SpiClient<'_>,
    src: &Source,
    embedded: Embedded,
    clear: Vec<String>,
    wait_for_rows: bool,
) -> Result<Written, SidecarError> {
    if embedded.keys.is_empty() && clear.is_empty() {
        return Ok(Written::default());
    }
    let busy_sql = (!wait_for_rows).then_some(src.busy_sql.as_str());
    as_table_owner(src.owner, || {
        let row = client
            .update(
                "SELECT written, failed_keys::text[], failed_errors, busy_keys::text[]
                   FROM embed_sidecar._write($1, $2, $3::text[]::jsonb[], $4, $5, $6, $7, $8, $9::text[]::jsonb[],
                                             $10, $11::text[]::jsonb[], $12)",
                None,
                &[
                    src.upsert_sql.as_str().into(),
                    src.clear_sql.as_str().into(),
                    embedded.keys.into(),
                    embedded.hashes.into(),
                    embedded.flat.into(),
                    src.dims.into(),
                    src.model_id.as_str().into(),
                    src.fts_config.as_deref().into(),
                    clear.into(),
                    src.trim_sql.as_deref().into(),
                    src.chunking.map(|_| embedded.layouts).into(),
                    busy_sql.into(),
                ],
            )?
            .first();
        let keys = row.get::<Vec<String>>(2)?.unwrap_or_default();
        let errors = row.get::<Vec<String>>(3)?.unwrap_or_default();
        Ok(Written {
            rows: row.get::<i64>(1)?.unwrap_or(0),
            failed: keys.into_iter().zip(errors).collect(),
            busy: row.get::<Vec<String>>(4)?.unwrap_or_default(),
        })
    })
}

/// Apply the settlements of both lanes as the worker: queues, dead letters, counters.
pub(super) fn apply(
    client: &mut SpiClient<'_>,
    id: i32,
    lanes: [(&str, Settlement); 2],
    written: i64,
) -> Result<(), SidecarError> {
    // a key can be dead in both lanes at once: one dead letter, the larger attempt count
    let mut dead_letters: BTreeMap<String, (String, i32)> = BTreeMap::new();
    let (mut acked, mut dead, mut last_error) = (0i64, 0i64, None);
    for (queue, s) in lanes {
        for (key, error, attempts) in s.dead_letters {
            let entry = dead_letters.entry(key).or_insert((error, attempts));
            entry.1 = entry.1.max(attempts);
        }
        acked += s.ack.len() as i64;
        dead += s.dead_ids.len() as i64;
        last_error = last_error.or(s.last_error);
        settle_queue(client, queue, s.ack, s.dead_ids, s.retry)?;
        put_off(client, queue, &s.busy)?;
    }
    if !dead_letters.is_empty() {
        let (keys, rest): (Vec<String>, Vec<(String, i32)>) = dead_letters.into_iter().unzip();
        let (errors, attempts): (Vec<String>, Vec<i32>) = rest.into_iter().unzip();
        client.update(
            "INSERT INTO embed_sidecar.failures AS f (source_id, key, error, attempts)
             SELECT $1, k::jsonb, e, a FROM unnest($2::text[], $3::text[], $4::int[]) AS u(k, e, a)
             ON CONFLICT (source_id, key) DO UPDATE
                SET error = EXCLUDED.error, attempts = f.attempts + EXCLUDED.attempts, last_failed = pg_catalog.now()",
            None,
            &[id.into(), keys.into(), errors.into(), attempts.into()],
        )?;
    }
    client.update(
        "UPDATE embed_sidecar.sources
            SET acked = acked + $2, embedded = embedded + $3, dead_lettered = dead_lettered + $4,
                last_embedded_at = CASE WHEN $3 > 0 THEN pg_catalog.now() ELSE last_embedded_at END,
                last_error = coalesce($5, last_error),
                last_error_at = CASE WHEN $5 IS NULL THEN last_error_at ELSE pg_catalog.now() END
          WHERE id = $1",
        None,
        &[id.into(), acked.into(), written.into(), dead.into(), last_error.into()],
    )?;
    Ok(())
}

/// Messages whose pass could not write them because other sessions held their rows or tables:
/// visible again after a quarter of the time they have waited since they were queued (2 s to a
/// minute: a lock held for long is not tried, and the row embedded again, every 2 s), and this
/// read not counted (pgmq counts reads, and the drain counts attempts by them: `settle::overdue`).
/// The queue is one of ours (sql/queues.sql).
pub(super) fn put_off(client: &mut SpiClient<'_>, queue: &str, ids: &[i64]) -> Result<(), SidecarError> {
    if ids.is_empty() {
        return Ok(());
    }
    let table = pgrx::spi::quote_identifier(format!("q_{queue}"));
    client.update(
        &format!(
            "UPDATE pgmq.{table}
                SET read_ct = greatest(read_ct - 1, 0),
                    vt = pg_catalog.clock_timestamp()
                         + least(greatest((pg_catalog.clock_timestamp() - enqueued_at) / 4, interval '2 s'), interval '1 min')
              WHERE msg_id = ANY ($1)"
        ),
        None,
        &[ids.to_vec().into()],
    )?;
    Ok(())
}

/// Delete acked and dead messages from one queue; push retried ones back by their back-off.
pub(super) fn settle_queue(
    client: &mut SpiClient<'_>,
    queue: &str,
    ack: Vec<i64>,
    dead: Vec<i64>,
    retry: Vec<(i64, i32)>,
) -> Result<(), SidecarError> {
    let mut delete = ack;
    delete.extend(dead);
    if !delete.is_empty() {
        client.update("SELECT pgmq.delete($1, $2::bigint[])", None, &[queue.into(), delete.into()])?;
    }
    if !retry.is_empty() {
        let (ids, delays): (Vec<i64>, Vec<i32>) = retry.into_iter().unzip();
        client.update(
            "SELECT pgmq.set_vt($1, u.id, u.delay) FROM unnest($2::bigint[], $3::int[]) AS u(id, delay)",
            None,
            &[queue.into(), ids.into(), delays.into()],
        )?;
    }
    Ok(())
}

/// Record an error that ended a pass early (model missing, source broken) where `status` shows it.
pub fn record_error(id: i32, error: &SidecarError) -> Result<(), SidecarError> {
    record_note(id, &error.to_string())
}

/// Record why a source is held back (an error, a slow pass) where `status.last_error` shows it to
/// the table's owner.
pub fn record_note(id: i32, note: &str) -> Result<(), SidecarError> {
    Spi::connect_mut(|client| {
        client.update(
            "UPDATE embed_sidecar.sources SET last_error = $2, last_error_at = pg_catalog.now() WHERE id = $1",
            None,
            &[id.into(), note.into()],
        )?;
        Ok(())
    })
}

/// What a pass locks before it touches a source (`lock_pass`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Lock {
    /// The worker shares the registry row until the pass' first transaction ends (a `pause()`
    /// waits for it, and a source whose row someone else holds is skipped) and reads the tables.
    Read,
    /// Serialise the writers of one source until the end of the transaction: the registry row
    /// (only the extension's own functions can lock it) and the tables, for writing.
    Write,
}

/// Take a pass' locks on source `id`; `false`: the worker's reader skips the source this round.
///
/// The worker never waits for a table while it holds the registry row (sql/drain.sql,
/// `_lock_for_drain`, says why): one worker serves every table of the database, and a deadlock
/// with an owner's DDL could pick the owner's statement as its victim. A `process()` caller's
/// transaction waits for each lock as any statement of it would, the writer's locks first
/// (`_lock_source`): a deadlock its own transaction is part of is found and reported by Postgres,
/// where a retry loop would hide it.
pub(super) fn lock_pass(client: &mut SpiClient<'_>, id: i32, mode: Mode, lock: Lock) -> Result<bool, SidecarError> {
    let locked = match mode {
        Mode::Caller => client.update("SELECT embed_sidecar._lock_source($1)", None, &[id.into()])?,
        Mode::Worker => client.update(
            "SELECT embed_sidecar._lock_for_drain($1, $2)",
            None,
            &[id.into(), (lock == Lock::Write).into()],
        )?,
    }
    .first()
    .get_one::<bool>()?;
    match locked {
        Some(true) => Ok(true),
        // (only the worker's reader skips; `_lock_source` says NULL when the row is gone)
        None if mode == Mode::Worker && lock == Lock::Read => Ok(false),
        _ => Err(SidecarError::Unwatched(id)),
    }
}

/// Registry ids of the sources a drain should visit, oldest first.
/// With each, its table's owner.
pub fn active_sources(client: &SpiClient<'_>) -> Result<Vec<(i32, pg_sys::Oid)>, SidecarError> {
    let rows = client.select(
        "SELECT s.id, c.relowner FROM embed_sidecar.sources s JOIN pg_catalog.pg_class c ON c.oid = s.source
          WHERE s.state <> 'paused' ORDER BY s.id",
        None,
        &[],
    )?;
    let mut sources = Vec::new();
    for row in rows {
        sources.push((required(&row, 1, "a source id")?, required(&row, 2, "a source's owner")?));
    }
    Ok(sources)
}

/// Build a source's deferred HNSW index if its backfill is done (sql/watch.sql); whether it did.
pub(super) fn build_index(client: &mut SpiClient<'_>, id: i32) -> Result<bool, SidecarError> {
    let built = client
        .update("SELECT embed_sidecar._build_index_if_ready($1)", None, &[id.into()])?
        .first()
        .get_one::<bool>()?;
    Ok(built.unwrap_or(false))
}
