//! The drain: one pass over one source's queue. Both callers run exactly this code — the
//! background worker (read and write in two short transactions, inference in between, no snapshot
//! held while the model runs) and `embed_sidecar.process()` (everything in the caller's
//! transaction).
//!
//! Pass: read a window of messages → dedupe keys, classify against the current source row and
//! stored hash/model → embed what changed (a failing batch is bisected so good rows proceed) →
//! write vectors, clear blanks, ack, dead-letter or back off failures.

use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use sha2::{Digest, Sha256};

use crate::error::SidecarError;
use crate::gucs;
use crate::model;

/// Namespace of our advisory locks (ASCII "embs"); the second key is the source id.
const LOCK_CLASS: i32 = 0x656d_6273;

/// How a pass maps onto transactions.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inside the caller's transaction (`process()`).
    Caller,
    /// Background worker: each phase in its own transaction.
    Worker,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PassStats {
    pub messages: usize,
    pub embedded: usize,
}

struct Message {
    id: i64,
    read_ct: i32,
    key: String,
    blank: bool,
    unchanged: bool,
    content: Option<String>,
}

struct DrainSql {
    read: String,
    upsert: String,
    clear: String,
}

struct SourceRow {
    queue: String,
    model: String,
    model_id: String,
    dims: i32,
    fts_config: String,
}

fn in_tx<R>(mode: Mode, f: impl FnOnce() -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    match mode {
        Mode::Caller => f(),
        Mode::Worker => crate::worker::run_in_transaction(f),
    }
}

fn load_source(client: &mut SpiClient<'_>, id: i32) -> Result<Option<(SourceRow, DrainSql)>, SidecarError> {
    let rows = client.update(
        "SELECT s.queue_name, s.model, s.model_id, s.dims, s.fts_config::text, d.read_sql, d.upsert_sql, d.clear_sql
           FROM embed_sidecar.sources s, LATERAL embed_sidecar._drain_sql(s) d WHERE s.id = $1",
        None,
        &[id.into()],
    )?;
    let Some(row) = rows.into_iter().next() else { return Ok(None) };
    let text = |i: usize| -> Result<String, SidecarError> { Ok(row.get::<String>(i)?.unwrap_or_default()) };
    Ok(Some((
        SourceRow {
            queue: text(1)?,
            model: text(2)?,
            model_id: text(3)?,
            dims: row.get::<i32>(4)?.unwrap_or(0),
            fts_config: text(5)?,
        },
        DrainSql { read: text(6)?, upsert: text(7)?, clear: text(8)? },
    )))
}

/// One pass over source `id`, handling at most `limit` messages.
pub fn drain_pass(id: i32, limit: i32, mode: Mode) -> Result<PassStats, SidecarError> {
    // Phase 1 (short transaction): make sure the model loads before touching the queue, so an
    // outage (missing file) costs no attempts; notice a replaced model file; read messages.
    let (src, messages) = in_tx(mode, || {
        Spi::connect_mut(|client| {
            if mode == Mode::Caller {
                // The caller's transaction keeps every lock until it ends, so it must take the
                // source lock before it holds any row lock (the messages it reads): otherwise it
                // could hold messages while waiting for the lock held by a writer that waits for
                // those messages. Lock first, and two process() calls simply take turns.
                lock_source(client, id)?;
            }
            let Some((src, sql)) = load_source(client, id)? else { return Ok(None) };
            let current = model::model_id_of(&src.model)?;
            if current != src.model_id {
                // the file changed under the same name: every vector is stale now
                client.update(
                    "UPDATE embed_sidecar.sources SET model_id = $2 WHERE id = $1",
                    None,
                    &[id.into(), current.clone().into()],
                )?;
                client.update(
                    "SELECT embed_sidecar._enqueue_all(s, true) FROM embed_sidecar.sources s WHERE s.id = $1",
                    None,
                    &[id.into()],
                )?;
                log!("pg_embed_sidecar: model {} changed to {current}; re-embedding", src.model_id);
            }
            let rows = client.update(
                sql.read.as_str(),
                None,
                &[src.queue.clone().into(), gucs::visibility_timeout_s().into(), limit.into(), current.clone().into()],
            )?;
            let mut messages = Vec::new();
            for row in rows {
                messages.push(Message {
                    id: row.get::<i64>(1)?.unwrap_or_default(),
                    read_ct: row.get::<i32>(2)?.unwrap_or_default(),
                    key: row.get::<String>(3)?.unwrap_or_default(),
                    blank: row.get::<bool>(4)?.unwrap_or(true),
                    unchanged: row.get::<bool>(5)?.unwrap_or(false),
                    content: row.get::<String>(6)?,
                });
            }
            Ok(Some((SourceRow { model_id: current, ..src }, (sql, messages))))
        })
    })?
    .ok_or_else(|| SidecarError::Sql(format!("source {id} is no longer watched")))?;
    let (sql, messages) = messages;
    if messages.is_empty() {
        return Ok(PassStats::default());
    }

    // Phase 2 (no transaction in the worker): classify and embed.
    let mut by_key: HashMap<&str, &Message> = HashMap::new();
    for m in &messages {
        by_key.insert(&m.key, m); // duplicates of a key carry the same current state
    }
    let mut to_embed: Vec<(&str, &str)> = Vec::new();
    let mut to_clear: Vec<String> = Vec::new();
    for (key, m) in &by_key {
        match (&m.content, m.blank, m.unchanged) {
            (_, true, _) => to_clear.push(key.to_string()),
            (_, _, true) => {}
            (Some(text), false, false) => to_embed.push((key, text)),
            (None, false, false) => {}
        }
    }
    to_embed.sort_unstable(); // deterministic batches
    let texts: Vec<&str> = to_embed.iter().map(|(_, t)| *t).collect();
    let results = embed_isolating(&src.model, &texts);

    let mut keys = Vec::new();
    let mut hashes: Vec<Vec<u8>> = Vec::new();
    let mut flat: Vec<f32> = Vec::with_capacity(texts.len() * src.dims as usize);
    let mut failed: HashMap<&str, String> = HashMap::new();
    for ((key, text), result) in to_embed.iter().zip(results) {
        match result {
            Ok(v) => {
                keys.push(key.to_string());
                hashes.push(Sha256::digest(text.as_bytes()).to_vec());
                flat.extend(v);
            }
            Err(e) => {
                failed.insert(key, e);
            }
        }
    }

    // Phase 3 (short transaction): write under the source's advisory lock. Each statement takes
    // a fresh snapshot after the lock, and the upsert re-checks the content hash, so a vector is
    // only written for content that is still current: a stale vector never overwrites a newer one.
    let max_attempts = gucs::max_attempts();
    let mut ack: Vec<i64> = Vec::new();
    let (mut dead_ids, mut dead_keys, mut dead_errors, mut dead_attempts) = (vec![], vec![], vec![], vec![]);
    let (mut retry_ids, mut retry_attempts): (Vec<i64>, Vec<i32>) = (Vec::new(), Vec::new());
    for m in &messages {
        match failed.get(m.key.as_str()) {
            None => ack.push(m.id),
            Some(err) if m.read_ct >= max_attempts => {
                dead_ids.push(m.id);
                if !dead_keys.contains(&m.key) {
                    dead_keys.push(m.key.clone());
                    dead_errors.push(err.clone());
                    dead_attempts.push(m.read_ct);
                }
            }
            Some(_) => {
                retry_ids.push(m.id);
                retry_attempts.push(m.read_ct);
            }
        }
    }
    let last_error = failed.values().next().cloned();
    let batch_len = messages.len();
    let embedded = in_tx(mode, move || {
        Spi::connect_mut(|client| {
            lock_source(client, id)?;
            let mut written = 0i64;
            if !keys.is_empty() {
                written = client
                    .update(
                        sql.upsert.as_str(),
                        None,
                        &[
                            keys.into(),
                            hashes.into(),
                            flat.into(),
                            src.dims.into(),
                            src.model_id.into(),
                            src.fts_config.into(),
                        ],
                    )?
                    .first()
                    .get_one::<i64>()?
                    .unwrap_or(0);
            }
            if !to_clear.is_empty() {
                client.update(sql.clear.as_str(), None, &[to_clear.into()])?;
            }
            if !dead_keys.is_empty() {
                client.update(
                    "INSERT INTO embed_sidecar.failures AS f (source_id, key, error, attempts)
                     SELECT $1, k::jsonb, e, a FROM unnest($2::text[], $3::text[], $4::int[]) AS u(k, e, a)
                     ON CONFLICT (source_id, key) DO UPDATE
                        SET error = EXCLUDED.error, attempts = f.attempts + EXCLUDED.attempts, last_failed = now()",
                    None,
                    &[id.into(), dead_keys.into(), dead_errors.into(), dead_attempts.into()],
                )?;
            }
            let acked = ack.len() as i64;
            let mut delete = ack;
            delete.extend(&dead_ids);
            client.update("SELECT pgmq.delete($1, $2::bigint[])", None, &[src.queue.clone().into(), delete.into()])?;
            if !retry_ids.is_empty() {
                // back off 2^attempts seconds (at most a minute) instead of the visibility timeout
                client.update(
                    "SELECT pgmq.set_vt($1, u.id, least(60, power(2, u.attempts))::int)
                       FROM unnest($2::bigint[], $3::int[]) AS u(id, attempts)",
                    None,
                    &[src.queue.clone().into(), retry_ids.into(), retry_attempts.into()],
                )?;
            }
            client.update(
                "UPDATE embed_sidecar.sources
                    SET acked = acked + $2, embedded = embedded + $3, dead_lettered = dead_lettered + $4,
                        last_embedded_at = CASE WHEN $3 > 0 THEN now() ELSE last_embedded_at END,
                        last_error = coalesce($5, last_error),
                        last_error_at = CASE WHEN $5 IS NULL THEN last_error_at ELSE now() END
                  WHERE id = $1",
                None,
                &[id.into(), acked.into(), written.into(), (dead_ids.len() as i64).into(), last_error.into()],
            )?;
            Ok(written)
        })
    })?;
    Ok(PassStats { messages: batch_len, embedded: embedded as usize })
}

/// Serialise writers of one source until the end of the transaction.
fn lock_source(client: &mut SpiClient<'_>, id: i32) -> Result<(), SidecarError> {
    client.update("SELECT pg_advisory_xact_lock($1, $2)", None, &[LOCK_CLASS.into(), id.into()])?;
    Ok(())
}

/// Embed texts; when a batch fails, split it in halves until the failing texts are alone, so one
/// bad row never blocks the rows around it.
fn embed_isolating(model_name: &str, texts: &[&str]) -> Vec<Result<Vec<f32>, String>> {
    if texts.is_empty() {
        return Vec::new();
    }
    match try_embed(model_name, texts) {
        Ok(vectors) => vectors.into_iter().map(Ok).collect(),
        Err(e) if texts.len() == 1 => vec![Err(e.to_string())],
        Err(_) => {
            let (a, b) = texts.split_at(texts.len() / 2);
            let mut out = embed_isolating(model_name, a);
            out.extend(embed_isolating(model_name, b));
            out
        }
    }
}

fn try_embed(model_name: &str, texts: &[&str]) -> Result<Vec<Vec<f32>>, SidecarError> {
    if let Some(marker) = gucs::fail_marker() {
        if texts.iter().any(|t| t.contains(&marker)) {
            return Err(SidecarError::Injected);
        }
    }
    model::embed_many_with(model_name, texts)
}

/// Registry ids of the sources a drain should visit, oldest first.
pub fn active_sources(client: &SpiClient<'_>) -> Result<Vec<i32>, SidecarError> {
    let rows = client.select("SELECT id FROM embed_sidecar.sources WHERE state = 'active' ORDER BY id", None, &[])?;
    let mut ids = Vec::new();
    for row in rows {
        if let Some(id) = row.get::<i32>(1)? {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use super::{drain_pass, Mode};
    use crate::error::OrReport;

    /// `process()`'s Rust half: drain one source in the calling transaction.
    #[pg_extern(volatile, parallel_unsafe, name = "_process")]
    fn process_source(source_id: i32, max_rows: i32) -> i64 {
        let mut done = 0i64;
        while done < max_rows as i64 {
            let limit = (max_rows as i64 - done).min(crate::gucs::batch_size() as i64) as i32;
            let stats = drain_pass(source_id, limit, Mode::Caller).or_report();
            if stats.messages == 0 {
                break;
            }
            done += stats.messages as i64;
            pg_sys::check_for_interrupts!();
        }
        done
    }

    /// Identity and dimension of a model, loading it if needed (watch() sizes the sidecar with it).
    #[pg_extern(volatile, parallel_restricted, name = "_model_identity")]
    fn model_identity(model: &str) -> TableIterator<'static, (name!(model_id, String), name!(dims, i32))> {
        let row = crate::model::identity_of(model).or_report();
        TableIterator::once(row)
    }

    extension_sql_file!("../sql/sidecar.sql", name = "sidecar", requires = [process_source, model_identity]);
}
