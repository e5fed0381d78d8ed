//! The drain: one pass over one source's queue. Both callers run exactly this code — the
//! background worker (read and write in two short transactions, inference in between, no snapshot
//! held while the model runs) and `embed_sidecar.process()` (everything in the caller's
//! transaction).
//!
//! Pass: read a window of messages (as the worker): the live lane first, then at most
//! `bulk_batch_size` from the bulk lane, so a backfill never delays a writer's change by more than
//! one small pass → look the distinct keys up (as the table's
//! owner) → decide (`settle::plan`) → embed what changed, a failing batch bisected so good rows
//! proceed → write vectors and clear blanks (as the table's owner; a failing write is retried row
//! by row) → settle every message (`settle::settle`) and apply that to the queue, the dead-letter
//! table and the registry's counters (as the worker). The worker begins its next pass (read, look
//! up, hand the texts to the inference service) before it writes the previous one, so its SQL runs
//! while the service embeds (`Pass` → `Ready`, src/bgw/drain_worker.rs).

pub mod chunking;
pub mod settle;

use std::collections::{BTreeMap, HashMap, HashSet};

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::enqueue::backfill;
use crate::error::SidecarError;
use crate::gucs;
use crate::inference::{self, InFlight};
use crate::pg::authority::as_table_owner;
use crate::pg::row::required;
use crate::pg::xact::run_in_transaction;
use settle::{Looked, Message, Settlement};

/// How long the worker waits for a lock (a table lock, the registry row a `process()` caller
/// holds, a source row a writer holds `FOR UPDATE`) before giving the pass up: a lock any session
/// can take must not stall the worker, and with it every other source of the database.
const WORKER_LOCK_TIMEOUT: &str = "2s";

/// Most rows one pass takes from a chunked source's lanes: a long row is dozens of passages, and
/// a pass should end well within the visibility timeout (60 s). Measured on two cores: ~23 full
/// passages/s; 8 GNU info nodes, 55 passages at most each, take under 20 s.
const CHUNKED_ROWS_PER_PASS: i32 = 8;

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

/// A registry row with what a pass needs, and the statements built for it (sql/drain.sql).
struct Source {
    queue: String,
    bulk_queue: String,
    model: String,
    model_id: String,
    dims: i32,
    /// NULL (`watch(..., fts_config => NULL)`): no full text, `fts` stays NULL at no cost.
    fts_config: Option<String>,
    owner: pg_sys::Oid,
    lookup_sql: String,
    upsert_sql: String,
    clear_sql: String,
    /// Chunked sources: drops a row's passages past its new last one (sql/drain.sql).
    trim_sql: Option<String>,
    /// Chunked sources: (tokens per passage, overlap).
    chunking: Option<(usize, usize)>,
    /// `pause(source, bulk_only => true)`: the live lane drains, the bulk lane waits.
    bulk_paused: bool,
    /// Being built by `set_model()`: takes over when a pass finds both lanes empty.
    shadow: bool,
    /// `pause(source)`: the worker leaves both lanes alone; `process()` still drains them.
    paused: bool,
    /// A large backfill runs without the HNSW index; it is built once the bulk lane is empty.
    index_pending: bool,
}

/// A phase of a pass: in the caller's transaction, or (the worker) in its own, which waits at most
/// `WORKER_LOCK_TIMEOUT` for any lock — a table lock, a row lock, the registry row — so that no
/// session can hold the worker, and every other source with it. Session-level advisory locks the
/// owner's code took are released after it: nothing it does may stay in the worker.
fn in_tx<R>(mode: Mode, f: impl FnOnce() -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    match mode {
        Mode::Caller => f(),
        Mode::Worker => {
            let result = run_in_transaction(|| {
                Spi::run_with_args(
                    "SELECT pg_catalog.set_config('lock_timeout', $1, true)",
                    &[WORKER_LOCK_TIMEOUT.into()],
                )?;
                f()
            });
            // SAFETY: releases this process's session-level advisory locks; the worker takes none
            // of its own, so any there were taken by code it ran for a table's owner
            unsafe { pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID) };
            result
        }
    }
}

/// The worker share-locks the row until the pass' first transaction ends: a `pause()` either
/// waits for that transaction (whose reads then saw none of the rows written after the pause) or
/// commits first and is seen here. Without the lock a worker that listed the source just before a
/// pause could still take the messages of rows inserted just after it. A row locked by someone
/// else (a `pause()` under way, a `process()` caller's open transaction) is skipped for this round
/// (`None`) rather than waited for: the worker serves every source in turn.
fn load_source(client: &mut SpiClient<'_>, id: i32, mode: Mode) -> Result<Option<Source>, SidecarError> {
    let lock = if mode == Mode::Worker { "FOR SHARE OF s SKIP LOCKED" } else { "" };
    let rows = client.update(
        &format!(
            "SELECT s.queue_name, s.model, s.model_id, s.dims, s.fts_config::text, c.relowner,
                d.lookup_sql, d.upsert_sql, d.clear_sql, embed_sidecar._bulk_queue(s.queue_name),
                s.state = 'bulk_paused', s.role = 'shadow', s.state = 'paused', d.trim_sql,
                s.chunk_tokens, s.chunk_overlap, s.index_pending
           FROM embed_sidecar.sources s JOIN pg_catalog.pg_class c ON c.oid = s.source,
                LATERAL embed_sidecar._drain_sql(s) d
          WHERE s.id = $1 {lock}"
        ),
        None,
        &[id.into()],
    )?;
    let Some(row) = rows.into_iter().next() else {
        // still there: locked by someone else, skipped this round
        let exists =
            !client.select("SELECT 1 FROM embed_sidecar.sources WHERE id = $1", None, &[id.into()])?.is_empty();
        return if exists { Ok(None) } else { Err(SidecarError::Unwatched(id)) };
    };
    let column = |name: &str| format!("column {name} of source {id}");
    let text = |i: usize, name: &str| required::<String>(&row, i, &column(name));
    Ok(Some(Source {
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
    }))
}

fn read_messages(client: &mut SpiClient<'_>, queue: &str, limit: i32) -> Result<Vec<Message>, SidecarError> {
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
type Known = HashMap<String, HashSet<String>>;

/// Current text, hash and state of each key, read as the table's owner; for a chunked source
/// also the passages it has vectors for.
fn lookup(client: &mut SpiClient<'_>, src: &Source, keys: Vec<String>) -> Result<(Vec<Looked>, Known), SidecarError> {
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
struct Embedded {
    keys: Vec<String>,
    hashes: Vec<Vec<u8>>,
    flat: Vec<f32>,
    /// Chunked sources: per key, its passages as JSON `[[char_start, char_end, vector], ...]`,
    /// `vector` a 1-based index into `flat`, or 0 to keep the row's vector of the same passage.
    layouts: Vec<String>,
}

/// Write vectors and clear blanks as the table's owner. Returns rows written and the keys whose
/// write failed, with the error.
fn write(
    client: &mut SpiClient<'_>,
    src: &Source,
    embedded: Embedded,
    clear: Vec<String>,
) -> Result<(i64, Vec<(String, String)>), SidecarError> {
    if embedded.keys.is_empty() && clear.is_empty() {
        return Ok((0, Vec::new()));
    }
    as_table_owner(src.owner, || {
        let row = client
            .update(
                "SELECT written, failed_keys::text[], failed_errors
                   FROM embed_sidecar._write($1, $2, $3::text[]::jsonb[], $4, $5, $6, $7, $8, $9::text[]::jsonb[],
                                             $10, $11::text[]::jsonb[])",
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
                ],
            )?
            .first();
        let written = row.get::<i64>(1)?.unwrap_or(0);
        let keys = row.get::<Vec<String>>(2)?.unwrap_or_default();
        let errors = row.get::<Vec<String>>(3)?.unwrap_or_default();
        Ok((written, keys.into_iter().zip(errors).collect()))
    })
}

/// Apply the settlements of both lanes as the worker: queues, dead letters, counters.
fn apply(
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

/// Delete acked and dead messages from one queue; push retried ones back by their back-off.
fn settle_queue(
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
    Spi::connect_mut(|client| {
        client.update(
            "UPDATE embed_sidecar.sources SET last_error = $2, last_error_at = pg_catalog.now() WHERE id = $1",
            None,
            &[id.into(), error.to_string().into()],
        )?;
        Ok(())
    })
}

/// One pass over source `id`, handling at most `limit` messages, start to end.
pub fn drain_pass(id: i32, limit: i32, mode: Mode) -> Result<PassStats, SidecarError> {
    match Pass::begin(id, limit, mode)? {
        Some(pass) => pass.wait().write(mode),
        None => Ok(PassStats::default()),
    }
}

/// A pass whose messages are read and whose changed rows are on their way through the model.
/// Through the inference service they are embedded by another process, so the worker can write
/// its previous pass meanwhile (src/bgw/drain_worker.rs): SQL and inference overlap.
pub struct Pass {
    id: i32,
    src: Source,
    live: Vec<Message>,
    bulk: Vec<Message>,
    more: bool,
    /// Keys whose content turned blank.
    clear: Vec<String>,
    /// Keys that failed so far, with the error.
    failed: HashMap<String, String>,
    work: Work,
}

/// What a pass sent to the model, and the texts (kept to isolate a failing one).
enum Work {
    /// One text per changed row: (key, text, content hash).
    Rows(Vec<(String, String, Vec<u8>)>, InFlight),
    /// A chunked source: the passages of each changed row that have no vector yet.
    Passages(chunking::Split, InFlight),
}

/// A pass whose vectors are back, ready to write.
pub struct Ready {
    id: i32,
    src: Source,
    live: Vec<Message>,
    bulk: Vec<Message>,
    clear: Vec<String>,
    failed: HashMap<String, String>,
    embedded: Embedded,
}

impl Pass {
    /// Phase 1 (short transaction): make sure the model loads before touching the queue, so an
    /// outage (missing file) costs no attempts; notice a replaced model; read messages; look up;
    /// decide (`settle::plan`); then hand the changed texts to the model. `None`: nothing to do.
    pub fn begin(id: i32, limit: i32, mode: Mode) -> Result<Option<Pass>, SidecarError> {
        let Some((src, live, bulk, looked, known, more, overdue)) = in_tx(mode, || {
            Spi::connect_mut(|client| {
                if mode == Mode::Caller {
                    // The caller's transaction keeps every lock until it ends, so it must take the
                    // source lock before it holds any row lock (the messages it reads): otherwise it
                    // could hold messages while waiting for the lock held by a writer that waits for
                    // those messages. Lock first, and two process() calls simply take turns.
                    lock_source(client, id)?;
                }
                let Some(mut src) = load_source(client, id, mode)? else {
                    return Ok(None);
                };
                if mode == Mode::Worker && src.paused {
                    return Ok(None);
                }
                let current = inference::model_id_of(&src.model)?;
                inference::ensure_loadable(&src.model, &current)?;
                if current != src.model_id {
                    // the model's files changed under the same name: every vector is stale now
                    client.update(
                        "UPDATE embed_sidecar.sources SET model_id = $2 WHERE id = $1",
                        None,
                        &[id.into(), current.as_str().into()],
                    )?;
                    backfill(client, id, true)?;
                    log!("pg_embed_sidecar: model {} changed to {current}; re-embedding", src.model_id);
                    src.model_id = current;
                }
                // the live lane first; the bulk lane only fills what room is left, in small windows
                let (limit, bulk_window) = match src.chunking {
                    None => (limit, gucs::bulk_batch_size()),
                    Some(_) => (limit.min(CHUNKED_ROWS_PER_PASS), gucs::bulk_batch_size().min(CHUNKED_ROWS_PER_PASS)),
                };
                let live = read_messages(client, &src.queue, limit)?;
                let bulk_room = if src.bulk_paused { 0 } else { (limit - live.len() as i32).min(bulk_window) };
                let bulk = if bulk_room > 0 { read_messages(client, &src.bulk_queue, bulk_room)? } else { Vec::new() };
                let more = live.len() >= limit as usize || bulk.len() >= bulk_window as usize;
                let mut overdue = settle::overdue(&live, gucs::max_attempts());
                overdue.extend(settle::overdue(&bulk, gucs::max_attempts()));
                let mut keys: Vec<String> =
                    live.iter().chain(&bulk).map(|m| m.key.clone()).filter(|k| !overdue.contains_key(k)).collect();
                keys.sort_unstable();
                keys.dedup();
                let (looked, known) = if keys.is_empty() { Default::default() } else { lookup(client, &src, keys)? };
                // (a pass read but not yet written keeps its messages in the queue, invisible: both
                // checks below count them, so neither runs ahead of a pass still in flight)
                if src.index_pending && bulk.is_empty() {
                    // the backfill is done: its index, built once (sql/watch.sql)
                    client.update("SELECT embed_sidecar._build_index_if_ready($1)", None, &[id.into()])?;
                }
                if src.shadow && live.is_empty() && bulk.is_empty() {
                    // a complete shadow sidecar takes over (sql/switch.sql, set_model)
                    client.update("SELECT embed_sidecar._promote_if_ready($1)", None, &[id.into()])?;
                }
                Ok(Some((src, live, bulk, looked, known, more, overdue)))
            })
        })?
        else {
            return Ok(None);
        };
        if live.is_empty() && bulk.is_empty() {
            return Ok(None);
        }
        // decide, then start embedding (no transaction in the worker)
        let plan = settle::plan(looked);
        let mut failed = plan.failed;
        failed.extend(overdue);
        let work = match src.chunking {
            None => {
                let texts: Vec<&str> = plan.embed.iter().map(|(_, text, _)| text.as_str()).collect();
                let started = start_embed(&src.model, &texts);
                Work::Rows(plan.embed, started)
            }
            Some(budget) => {
                // the tokenizer is other people's code run on writers' text: a panic there fails
                // these rows, never the worker
                let keys: Vec<String> = plan.embed.iter().map(|(k, _, _)| k.clone()).collect();
                let split = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    chunking::split(&src.model, budget, plan.embed, &known)
                }))
                .unwrap_or_else(|_| chunking::Split {
                    failed: keys.into_iter().map(|k| (k, "the tokenizer failed on this text".to_string())).collect(),
                    ..Default::default()
                });
                failed.extend(split.failed.iter().cloned());
                let texts: Vec<&str> = split.texts.iter().map(String::as_str).collect();
                let started = start_embed(&src.model, &texts);
                Work::Passages(split, started)
            }
        };
        Ok(Some(Pass { id, src, live, bulk, more, clear: plan.clear, failed, work }))
    }

    /// A lane filled its window: more is probably waiting.
    pub fn more(&self) -> bool {
        self.more
    }

    /// Phase 2: wait for the vectors; a failing batch is bisected so the good rows proceed.
    pub fn wait(self) -> Ready {
        let Pass { id, src, live, bulk, clear, mut failed, work, .. } = self;
        let embedded = match work {
            Work::Rows(rows, started) => {
                let texts: Vec<&str> = rows.iter().map(|(_, text, _)| text.as_str()).collect();
                let results = isolate(&src.model, &texts, started);
                assemble_rows(src.dims, rows, results, &mut failed)
            }
            Work::Passages(split, started) => {
                let texts: Vec<&str> = split.texts.iter().map(String::as_str).collect();
                let results = isolate(&src.model, &texts, started);
                assemble_passages(split.rows, results, &mut failed)
            }
        };
        Ready { id, src, live, bulk, clear, failed, embedded }
    }
}

impl Ready {
    /// Phase 3 (short transaction): write under the source's lock, then settle every
    /// message. Each statement takes a fresh snapshot after the lock, and the upsert re-checks the
    /// content hash, so a vector is only written for content that is still current: a stale
    /// vector never overwrites a newer one.
    pub fn write(self, mode: Mode) -> Result<PassStats, SidecarError> {
        let Ready { id, src, live, bulk, clear, mut failed, embedded } = self;
        let messages = live.len() + bulk.len();
        let written = in_tx(mode, move || {
            Spi::connect_mut(|client| {
                lock_source(client, id)?;
                let (written, write_failures) = write(client, &src, embedded, clear)?;
                failed.extend(write_failures);
                let max_attempts = gucs::max_attempts();
                let lanes = [
                    (src.queue.as_str(), settle::settle(&live, &failed, max_attempts)),
                    (src.bulk_queue.as_str(), settle::settle(&bulk, &failed, max_attempts)),
                ];
                apply(client, id, lanes, written)?;
                Ok(written)
            })
        })?;
        Ok(PassStats { messages, embedded: written as usize })
    }

    pub fn source_id(&self) -> i32 {
        self.id
    }

    /// A chunked source's next pass must not be read before this one is written: what it looks up
    /// (the passages each row has vectors for) would miss this pass's.
    pub fn chunked(&self) -> bool {
        self.src.chunking.is_some()
    }
}

/// One vector per changed row (`failed` gets the rows whose inference failed).
fn assemble_rows(
    dims: i32,
    rows: Vec<(String, String, Vec<u8>)>,
    results: Vec<Result<Vec<f32>, String>>,
    failed: &mut HashMap<String, String>,
) -> Embedded {
    let mut out = Embedded { flat: Vec::with_capacity(rows.len() * dims as usize), ..Default::default() };
    for ((key, _, hash), result) in rows.into_iter().zip(results) {
        match result {
            Ok(v) => {
                out.keys.push(key);
                out.hashes.push(hash);
                out.flat.extend(v);
            }
            Err(e) => {
                failed.insert(key, e);
            }
        }
    }
    out
}

/// A chunked source: each changed row with its passages, new vectors from `results` (one per text
/// of the split), known ones kept. A row is written whole or not at all: one failed passage fails
/// the row.
fn assemble_passages(
    rows: Vec<chunking::RowChunks>,
    results: Vec<Result<Vec<f32>, String>>,
    failed: &mut HashMap<String, String>,
) -> Embedded {
    let mut out = Embedded::default();
    // position (1-based) in `flat` of each embedded text, once it is used by a row
    let mut index: HashMap<usize, usize> = HashMap::new();
    for row in rows {
        if let Some(e) = row.slots.iter().flatten().find_map(|&t| results[t].as_ref().err()) {
            failed.insert(row.key, e.clone());
            continue;
        }
        let mut layout = Vec::with_capacity(row.spans.len());
        for (&(start, end), slot) in row.spans.iter().zip(&row.slots) {
            let vector = match slot {
                None => 0,
                Some(t) => match index.get(t) {
                    Some(&i) => i,
                    None => {
                        // every slot of this row succeeded (checked above): one vector per entry
                        if let Ok(v) = &results[*t] {
                            out.flat.extend_from_slice(v);
                        }
                        index.insert(*t, index.len() + 1);
                        index.len()
                    }
                },
            };
            layout.push(format!("[{start},{end},{vector}]"));
        }
        out.keys.push(row.key);
        out.hashes.push(row.hash);
        out.layouts.push(format!("[{}]", layout.join(",")));
    }
    out
}

/// Serialise writers of one source until the end of the transaction: its registry row's lock
/// (sql/watch.sql, `_lock_source`), which only the extension's own functions can take.
fn lock_source(client: &mut SpiClient<'_>, id: i32) -> Result<(), SidecarError> {
    let locked =
        client.update("SELECT embed_sidecar._lock_source($1)", None, &[id.into()])?.first().get_one::<bool>()?;
    match locked {
        Some(true) => Ok(()),
        _ => Err(SidecarError::Unwatched(id)),
    }
}

/// The results of `started` (the whole of `texts`); when the batch failed, split it in halves
/// until the failing texts are alone, so one bad row never blocks the rows around it.
fn isolate(model_name: &str, texts: &[&str], started: InFlight) -> Vec<Result<Vec<f32>, String>> {
    match started.wait() {
        Ok(vectors) => vectors.into_iter().map(Ok).collect(),
        Err(e) if texts.len() <= 1 => texts.iter().map(|_| Err(e.to_string())).collect(),
        Err(_) => {
            let (a, b) = texts.split_at(texts.len() / 2);
            let mut out = isolate(model_name, a, start_embed(model_name, a));
            out.extend(isolate(model_name, b, start_embed(model_name, b)));
            out
        }
    }
}

fn start_embed(model_name: &str, texts: &[&str]) -> InFlight {
    if texts.is_empty() {
        return InFlight::Done(Ok(Vec::new()));
    }
    // a cancel or SIGTERM is honoured before each inference call, not only between passes
    pg_sys::check_for_interrupts!();
    #[cfg(feature = "fault_injection")]
    if let Some(marker) = gucs::fail_marker() {
        if texts.iter().any(|t| t.contains(&marker)) {
            return InFlight::Done(Err(SidecarError::Injected));
        }
    }
    inference::start_for_drain(model_name, texts)
}

/// Registry ids of the sources a drain should visit, oldest first.
pub fn active_sources(client: &SpiClient<'_>) -> Result<Vec<i32>, SidecarError> {
    let rows = client.select("SELECT id FROM embed_sidecar.sources WHERE state <> 'paused' ORDER BY id", None, &[])?;
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

    /// `process()`'s Rust half: drain one source in the calling transaction. The table owner's
    /// code runs in this session, as VACUUM's would: a session-level advisory lock it takes is
    /// released after, when the session held no advisory lock before (one it held cannot be told
    /// apart from one the owner's code took, so then they stay).
    #[pg_extern(volatile, parallel_unsafe, name = "_process")]
    fn process_source(source_id: i32, max_rows: i32) -> i64 {
        let held_before = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'advisory')",
        )
        .map_err(crate::error::SidecarError::from)
        .or_report()
        .unwrap_or(true);
        let done = drain_for_caller(source_id, max_rows);
        if !held_before {
            // SAFETY: releases this session's session-level advisory locks, none of them its own
            unsafe { pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID) };
        }
        done
    }

    fn drain_for_caller(source_id: i32, max_rows: i32) -> i64 {
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
        let row = crate::inference::identity_of(model).or_report();
        TableIterator::once(row)
    }
}
