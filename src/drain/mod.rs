//! The drain: one pass over one source's queue. Both callers run exactly this code — the
//! background worker (read and write in two short transactions, inference in between, no snapshot
//! held while the model runs) and `embed_sidecar.process()` (everything in the caller's
//! transaction).
//!
//! Pass: read a window of messages (as the worker): the live lane first, then a window of the bulk
//! lane (as many rows as `bulk_pass_time` of inference holds, at most `bulk_batch_size`), so a
//! backfill never delays a writer's change by more than one short pass → look the distinct keys
//! up (as the table's owner) → decide (`settle::plan`) → embed what changed, a failing batch bisected so good rows
//! proceed → write vectors and clear blanks (as the table's owner; a failing write is retried row
//! by row) → settle every message (`settle::settle`) and apply that to the queue, the dead-letter
//! table and the registry's counters (as the worker). The worker reads and looks up its next pass
//! while the inference service embeds one, and writes that one while the service embeds the next,
//! so its SQL runs while the service embeds (`Pass` → `Sent` → `Ready`, src/bgw/drain_worker.rs).

pub mod chunking;
pub mod settle;
mod store;
pub mod sync;

pub use store::{active_sources, record_error, record_note};
use store::{
    apply, build_index, load_source, lock_pass, lookup, put_off, read_messages, write, Embedded, Lock, Source,
};

use std::collections::HashMap;
use std::time::Duration;

use pgrx::prelude::*;

use crate::enqueue::backfill;
use crate::error::SidecarError;
use crate::gucs;
use crate::inference::{self, InFlight};
use crate::pg::xact::run_in_transaction;
use settle::Message;

/// How long the worker waits for a lock (a table lock, the registry row a `process()` caller
/// holds, a source row a writer holds `FOR UPDATE`) before giving the pass up: a lock any session
/// can take must not stall the worker, and with it every other source of the database.
const WORKER_LOCK_TIMEOUT: &str = "2s";

/// Most rows one pass takes from a chunked source's lanes: a long row is dozens of passages, and
/// a pass should end well within the visibility timeout (60 s), also on a small machine (README,
/// "Long documents", has the passages per second).
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

/// One pass over source `id`, handling at most `limit` messages, start to end.
pub fn drain_pass(id: i32, limit: i32, mode: Mode) -> Result<PassStats, SidecarError> {
    match Pass::begin(id, limit, gucs::bulk_batch_size(), mode)?.pass {
        Some(pass) => pass.send().wait().write(mode),
        None => Ok(PassStats::default()),
    }
}

/// Build source `id`'s deferred index, if its backfill is done, in a worker transaction of its own
/// (the index builder's; the drain worker's own when no builder could be started). Whether it did.
pub fn build_index_now(id: i32) -> Result<bool, SidecarError> {
    in_tx(Mode::Worker, || Spi::connect_mut(|client| build_index(client, id)))
}

/// What `Pass::begin` found: a pass to carry on with, if there were messages, and (worker mode)
/// whether the source's deferred HNSW index is due, its backfill being done (None: the source was
/// not looked at this time — paused, or its registry row locked by someone else).
pub struct Begun {
    pub pass: Option<Pass>,
    pub index_due: Option<bool>,
}

/// A pass whose messages are read and whose changed rows are decided, ready to go to the model
/// (`send`).
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

/// What a pass sends to the model (the texts are kept to isolate a failing one).
enum Work {
    /// One text per changed row: (key, text, content hash).
    Rows(Vec<(String, String, Vec<u8>)>),
    /// A chunked source: the passages of each changed row that have no vector yet.
    Passages(chunking::Split),
}

impl Work {
    fn texts(&self) -> Vec<&str> {
        match self {
            Work::Rows(rows) => rows.iter().map(|(_, text, _)| text.as_str()).collect(),
            Work::Passages(split) => split.texts.iter().map(String::as_str).collect(),
        }
    }

    /// Rows with something to embed.
    fn rows(&self) -> usize {
        match self {
            Work::Rows(rows) => rows.len(),
            Work::Passages(split) => split.rows.len(),
        }
    }
}

/// A pass whose texts are on their way through the model. Through the inference service they are
/// embedded by another process, so the worker writes its previous pass and reads its next one
/// meanwhile (src/bgw/drain_worker.rs): SQL and inference overlap.
pub struct Sent {
    pass: Pass,
    started: InFlight,
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
    /// Inference time per row sent; `None` when no row went to the model (or none came back).
    row_cost: Option<Duration>,
}

impl Pass {
    /// Phase 1 (short transaction): make sure the model loads before touching the queue, so an
    /// outage (missing file) costs no attempts; notice a replaced model; read messages; look up;
    /// decide (`settle::plan`). `None`: nothing to do.
    /// At most `limit` messages, of which at most `bulk_window` from the bulk lane.
    pub fn begin(id: i32, limit: i32, bulk_window: i32, mode: Mode) -> Result<Begun, SidecarError> {
        let mut index_due = None;
        let Some((src, live, bulk, looked, known, more, overdue)) = in_tx(mode, || {
            Spi::connect_mut(|client| {
                // The caller's transaction keeps every lock until it ends, so it must take the
                // writer's lock before it holds any row lock (the messages it reads): otherwise it
                // could hold messages while waiting for the lock held by a writer that waits for
                // those messages. Lock first, and two process() calls simply take turns. The
                // worker's first transaction only shares the source.
                let lock = if mode == Mode::Caller { Lock::Write } else { Lock::Read };
                if !lock_pass(client, id, mode, lock)? {
                    return Ok(None);
                }
                let mut src = load_source(client, id)?;
                if mode == Mode::Worker && src.paused {
                    return Ok(None);
                }
                index_due = Some(false);
                let current = inference::model_id_of(&src.model)?;
                inference::ensure_loadable(&src.model, &current)?;
                if current != src.model_id {
                    // the model's files changed under the same name: every vector is stale now
                    client.update(
                        "UPDATE embed_sidecar.sources SET model_id = $2 WHERE id = $1",
                        None,
                        &[id.into(), current.as_str().into()],
                    )?;
                    // the embedding's view shows the new model's vectors only (sql/watch.sql)
                    client.update(
                        "SELECT embed_sidecar._define_view(s) FROM embed_sidecar.sources s WHERE s.id = $1",
                        None,
                        &[id.into()],
                    )?;
                    backfill(client, id, true)?;
                    log!("pg_embed_sidecar: model {} changed to {current}; re-embedding", src.model_id);
                    src.model_id = current;
                }
                // the live lane first; the bulk lane only fills what room is left, in small windows
                let (limit, bulk_window) = match src.chunking {
                    None => (limit, bulk_window),
                    Some(_) => (limit.min(CHUNKED_ROWS_PER_PASS), bulk_window.min(CHUNKED_ROWS_PER_PASS)),
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
                    // the backfill is done: its index, built once (sql/watch.sql). The worker has it
                    // built by a process of its own (src/bgw/index_builder.rs) and goes on with the
                    // other sources meanwhile; process() builds it in the caller's transaction.
                    match mode {
                        Mode::Worker => index_due = Some(true),
                        Mode::Caller => {
                            build_index(client, id)?;
                        }
                    }
                }
                if src.shadow && live.is_empty() && bulk.is_empty() {
                    // a complete shadow sidecar takes over (sql/switch.sql, set_model)
                    client.update("SELECT embed_sidecar._promote_if_free($1)", None, &[id.into()])?;
                }
                Ok(Some((src, live, bulk, looked, known, more, overdue)))
            })
        })?
        else {
            return Ok(Begun { pass: None, index_due });
        };
        if live.is_empty() && bulk.is_empty() {
            return Ok(Begun { pass: None, index_due });
        }
        // decide (no transaction in the worker)
        let plan = settle::plan(looked);
        let mut failed = plan.failed;
        failed.extend(overdue);
        let work = match src.chunking {
            None => Work::Rows(plan.embed),
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
                Work::Passages(split)
            }
        };
        Ok(Begun { pass: Some(Pass { id, src, live, bulk, more, clear: plan.clear, failed, work }), index_due })
    }

    /// A lane filled its window: more is probably waiting.
    pub fn more(&self) -> bool {
        self.more
    }

    /// Hand the changed texts to the model (the inference service starts on them at once).
    pub fn send(self) -> Sent {
        let started = start_embed(&self.src.model, &self.work.texts());
        Sent { pass: self, started }
    }
}

impl Sent {
    pub fn source_id(&self) -> i32 {
        self.pass.id
    }

    /// A chunked source's next pass must not be read before this one is written: what it looks up
    /// (the passages each row has vectors for) would miss this pass's.
    pub fn chunked(&self) -> bool {
        self.pass.src.chunking.is_some()
    }

    /// Phase 2: wait for the vectors; a failing batch is bisected so the good rows proceed.
    pub fn wait(self) -> Ready {
        let Sent { pass, started } = self;
        let texts: Vec<&str> = pass.work.texts();
        // What the rows cost is the inference time spent on their texts, not the time from
        // sending to vectors: through the service that is mostly the wait behind other rounds (an
        // interactive flood, other databases' drains), and windows sized by it fell to one row a
        // pass, one pass a round of the flood (tests/security/test_review8_attacks.py).
        let mut spent = Duration::ZERO;
        let results = isolate(&pass.src.model, &texts, started, &mut spent);
        let rows = pass.work.rows();
        let row_cost = (rows > 0 && !spent.is_zero()).then(|| spent / rows as u32);
        let Pass { id, src, live, bulk, clear, mut failed, work, .. } = pass;
        let embedded = match work {
            Work::Rows(rows) => assemble_rows(src.dims, rows, results, &mut failed),
            Work::Passages(split) => assemble_passages(split.rows, results, &mut failed),
        };
        Ready { id, src, live, bulk, clear, failed, embedded, row_cost }
    }
}

impl Ready {
    /// Phase 3 (short transaction): write under the source's lock, then settle every
    /// message. Each statement takes a fresh snapshot after the lock, and the upsert re-checks the
    /// content hash, so a vector is only written for content that is still current: a stale
    /// vector never overwrites a newer one.
    pub fn write(self, mode: Mode) -> Result<PassStats, SidecarError> {
        let Ready { id, src, live, bulk, clear, mut failed, embedded, .. } = self;
        let messages = live.len() + bulk.len();
        // (kept for when the pass cannot get its locks: see below)
        let lanes_ids = [
            (src.queue.clone(), live.iter().map(|m| m.id).collect::<Vec<_>>()),
            (src.bulk_queue.clone(), bulk.iter().map(|m| m.id).collect()),
        ];
        let written = in_tx(mode, move || {
            Spi::connect_mut(|client| {
                lock_pass(client, id, mode, Lock::Write)?;
                let written = write(client, &src, embedded, clear, mode == Mode::Caller)?;
                failed.extend(written.failed);
                let busy = written.busy.into_iter().collect();
                let max_attempts = gucs::max_attempts();
                let lanes = [
                    (src.queue.as_str(), settle::settle(&live, &failed, &busy, max_attempts)),
                    (src.bulk_queue.as_str(), settle::settle(&bulk, &failed, &busy, max_attempts)),
                ];
                apply(client, id, lanes, written.rows)?;
                Ok(written.rows)
            })
        });
        match written {
            Ok(rows) => Ok(PassStats { messages, embedded: rows as usize }),
            // Someone held the source or its sidecar past lock_timeout (a long CREATE INDEX, a
            // migration): the messages come back soon and this read does not count, or a lock
            // held for minutes would dead-letter rows that did nothing wrong.
            Err(e @ SidecarError::Caught { code: PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, .. }) => {
                in_tx(mode, || {
                    Spi::connect_mut(|client| lanes_ids.iter().try_for_each(|(queue, ids)| put_off(client, queue, ids)))
                })?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    pub fn source_id(&self) -> i32 {
        self.id
    }

    /// Inference time per row sent (`None`: no row went to the model, or none came back).
    pub fn row_cost(&self) -> Option<Duration> {
        self.row_cost
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

/// The results of `started` (the whole of `texts`); when the batch failed, split it in halves
/// until the failing texts are alone, so one bad row never blocks the rows around it. The
/// inference time of what came back is added to `spent`.
fn isolate(model_name: &str, texts: &[&str], started: InFlight, spent: &mut Duration) -> Vec<Result<Vec<f32>, String>> {
    match started.wait_timed() {
        Ok((vectors, took)) => {
            *spent += took;
            vectors.into_iter().map(Ok).collect()
        }
        Err(e) if texts.len() <= 1 => texts.iter().map(|_| Err(e.to_string())).collect(),
        Err(_) => {
            let (a, b) = texts.split_at(texts.len() / 2);
            let mut out = isolate(model_name, a, start_embed(model_name, a), spent);
            out.extend(isolate(model_name, b, start_embed(model_name, b), spent));
            out
        }
    }
}

fn start_embed(model_name: &str, texts: &[&str]) -> InFlight {
    if texts.is_empty() {
        return InFlight::Done(Ok(Vec::new()), Duration::ZERO);
    }
    // a cancel or SIGTERM is honoured before each inference call, not only between passes
    pg_sys::check_for_interrupts!();
    #[cfg(feature = "fault_injection")]
    if let Some(marker) = gucs::fail_marker() {
        if texts.iter().any(|t| t.contains(&marker)) {
            return InFlight::Done(Err(SidecarError::Injected), Duration::ZERO);
        }
    }
    inference::start_for_drain(model_name, texts)
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use super::{drain_pass, Mode};
    use crate::error::OrReport;

    /// `process()`'s Rust half: drain one source in the calling transaction. The table owner's
    /// code runs in this session, as VACUUM's would: a session-level advisory lock it takes is
    /// released after (`OwnerLocks`).
    #[pg_extern(volatile, parallel_unsafe, name = "_process")]
    fn process_source(source_id: i32, max_rows: i32) -> i64 {
        let _release = Spi::connect(crate::pg::authority::OwnerLocks::release_after).or_report();
        drain_for_caller(source_id, max_rows)
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
