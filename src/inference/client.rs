//! The client side of the inference service: a session or a drain puts its texts into slots of
//! the ring (src/inference/ring.rs), sets the inference workers' latches (src/inference/worker.rs)
//! and waits on its own latch for the vectors. One copy of each model per instance, one thread
//! pool, and texts from many sessions embedded in one batched call.
//!
//! A client that gives up (cancel, timeout) gives its slots back on the way out (`Held`). A worker
//! that dies leaves taken slots behind: their clients see its pid gone and resubmit them, and its
//! successor resubmits them when it starts.

use std::time::{Duration, Instant};

use pgrx::PgSqlErrorCode;

use super::ring::{Priority, Ring, MODEL_MAX};
use crate::error::SidecarError;

/// How long a request may wait with no inference worker running before it fails.
const NO_WORKER_GRACE: Duration = Duration::from_secs(15);
/// How long a drain waits for one slots' worth of its texts before it gives the pass up. A session
/// has its statement_timeout; the drain worker has none, and an inference worker that is alive but
/// stuck would otherwise hold every drain of the instance. A drain's slots take seconds at most,
/// even behind sessions (they get one round in four).
const DRAIN_WAIT_LIMIT: Duration = Duration::from_secs(300);

/// The slots this call holds, given back on every way out (a cancel unwinds through here).
struct Held {
    ring: Ring,
    slots: Vec<usize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        for &i in &self.slots {
            self.ring.slot(i).give_back();
        }
    }
}

/// Texts handed to the service whose vectors are not collected yet: the caller does other work
/// (a drain writes its previous pass) while a worker embeds them.
pub struct Pending {
    ring: Ring,
    model: String,
    priority: Priority,
    /// Shortest first (see `submit`); `order[i]` is the input position of `texts[i]`.
    texts: Vec<String>,
    order: Vec<usize>,
    /// The first slots' worth, submitted by `submit`; the rest go as slots come back.
    first: Option<Held>,
    /// Longest wait for one slots' worth of answers, and the SQLSTATE of giving up then.
    limit: Option<(Duration, PgSqlErrorCode)>,
}

/// A request not yet submitted: texts in the order they go (see `submit`).
fn prepare(ring: Ring, model: &str, texts: &[&str], priority: Priority) -> Result<Pending, SidecarError> {
    if model.len() > MODEL_MAX {
        return Err(SidecarError::BadModelName(model.to_string()));
    }
    // Submitted shortest first: a worker's round takes consecutive requests and pads each batch to
    // its longest text, so neighbours of similar length waste the least compute (byte length
    // stands in for token count, which only the worker can know). Results go back to input order.
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let texts = order.iter().map(|&i| texts[i].to_string()).collect();
    let limit = (priority == Priority::Drain).then_some((DRAIN_WAIT_LIMIT, PgSqlErrorCode::ERRCODE_QUERY_CANCELED));
    Ok(Pending { ring, model: model.to_string(), priority, texts, order, first: None, limit })
}

/// Submit the first slots' worth of `texts` (at most half the ring) and return without waiting.
pub fn submit(ring: Ring, model: &str, texts: &[&str], priority: Priority) -> Result<Pending, SidecarError> {
    let mut pending = prepare(ring, model, texts, priority)?;
    if !pending.texts.is_empty() {
        pending.first = Some(pending.send(0)?);
    }
    Ok(pending)
}

/// Whether `n` texts of `priority` would find a free slot each right now, with a worker alive.
pub fn room(ring: Ring, n: usize, priority: Priority) -> bool {
    n <= ring.len() / 2
        && ring.workers_alive() > 0
        && region(ring, priority).filter(|&i| ring.slot(i).is_free()).nth(n.max(1) - 1).is_some()
}

/// Submit every one of `texts` now, or nothing: `None` when the ring has not a free slot for each
/// of them at this moment or no worker is alive (nothing waits, nothing is left claimed). The
/// answers are waited for at most `limit`, then given up with `ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE`
/// (never `query_canceled`, which is a user's cancel).
pub fn submit_now(
    ring: Ring,
    model: &str,
    texts: &[&str],
    priority: Priority,
    limit: Duration,
) -> Result<Option<Pending>, SidecarError> {
    let mut pending = prepare(ring, model, texts, priority)?;
    pending.limit = Some((limit, PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE));
    if pending.texts.is_empty() || pending.texts.len() > ring.len() / 2 || ring.workers_alive() == 0 {
        return Ok(None);
    }
    let held = Held { ring, slots: claim(ring, pending.texts.len(), priority) };
    if held.slots.len() < pending.texts.len() {
        return Ok(None); // `held` gives back what it got
    }
    for (&i, text) in held.slots.iter().zip(&pending.texts) {
        ring.slot(i).submit(&pending.model, text, priority, ring.next_seq());
    }
    ring.wake_workers();
    pending.first = Some(held);
    Ok(Some(pending))
}

impl Pending {
    /// Claim as many slots as are free (at least one) for the texts from `next` on, fill them and
    /// wake the workers.
    fn send(&self, next: usize) -> Result<Held, SidecarError> {
        let ring = self.ring;
        let mut held = Held { ring, slots: Vec::new() };
        let started = Instant::now();
        while held.slots.is_empty() {
            held.slots = claim(ring, (self.texts.len() - next).min(ring.len() / 2).max(1), self.priority);
            if held.slots.is_empty() {
                // the ring is full: back-pressure, not unbounded memory
                wait_latch(Duration::from_millis(10));
                pgrx::check_for_interrupts!();
                if ring.workers_alive() == 0 && started.elapsed() > NO_WORKER_GRACE {
                    return Err(no_worker());
                }
            }
        }
        for (&i, text) in held.slots.iter().zip(&self.texts[next..]) {
            ring.slot(i).submit(&self.model, text, self.priority, ring.next_seq());
        }
        ring.wake_workers();
        Ok(held)
    }

    /// Wait for every vector, submitting the rest of the texts as slots come back.
    pub fn collect(self) -> Result<Vec<Vec<f32>>, SidecarError> {
        self.collect_timed().map(|(vectors, _)| vectors)
    }

    /// Like `collect`, with the inference time the workers spent on these texts (each text's
    /// share of the call that embedded it), not counting the time they waited for a worker.
    pub fn collect_timed(mut self) -> Result<(Vec<Vec<f32>>, Duration), SidecarError> {
        let mut out = Vec::with_capacity(self.texts.len());
        let mut spent = Duration::ZERO;
        let mut held = self.first.take();
        while let Some(h) = held {
            out.extend(answers(self.ring, &h.slots, self.limit, &mut spent)?);
            // the slots go back before the next ones are claimed
            drop(h);
            held = if out.len() < self.texts.len() { Some(self.send(out.len())?) } else { None };
        }
        let mut in_order = vec![Vec::new(); out.len()];
        for (&i, v) in self.order.iter().zip(out) {
            in_order[i] = v;
        }
        Ok((in_order, spent))
    }
}

fn no_worker() -> SidecarError {
    SidecarError::Remote {
        code: PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE as i32,
        message: "no inference worker is running".into(),
        hint: Some(
            "Look for pg_embed_sidecar lines in the server log, or set pg_embed_sidecar.inference = 'local' to embed in this session."
                .into(),
        ),
    }
}

/// Claim up to `n` FREE slots. The last quarter of the ring is the drains': an interactive caller
/// (any role, `embed_texts` in a loop) never takes it, so drains can always submit; drains look
/// there first.
fn claim(ring: Ring, n: usize, priority: Priority) -> Vec<usize> {
    region(ring, priority).filter(|&i| ring.slot(i).try_claim()).take(n).collect()
}

/// The slots a caller of `priority` may claim, in the order it looks at them (see `claim`).
fn region(ring: Ring, priority: Priority) -> Box<dyn Iterator<Item = usize>> {
    let reserved = ring.len() - ring.len() / 4;
    match priority {
        Priority::Interactive => Box::new(0..reserved),
        Priority::Drain => Box::new((reserved..ring.len()).chain(0..reserved)),
    }
}

/// Wait on this process's latch (set by a worker that finished one of our slots).
fn wait_latch(timeout: Duration) {
    // SAFETY: the standard latch wait of a backend; interrupts are handled by the caller
    unsafe {
        pgrx::pg_sys::WaitLatch(
            pgrx::pg_sys::MyLatch,
            (pgrx::pg_sys::WL_LATCH_SET | pgrx::pg_sys::WL_TIMEOUT | pgrx::pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis() as std::ffi::c_long,
            pgrx::pg_sys::PG_WAIT_EXTENSION,
        );
        pgrx::pg_sys::ResetLatch(pgrx::pg_sys::MyLatch);
    }
}

/// Wait until every slot is answered (or `limit` has passed); resubmit what a dead worker held.
/// The inference time of the answers is added to `spent`.
fn answers(
    ring: Ring,
    slots: &[usize],
    limit: Option<(Duration, PgSqlErrorCode)>,
    spent: &mut Duration,
) -> Result<Vec<Vec<f32>>, SidecarError> {
    let mut lonely_since: Option<Instant> = None;
    let started = Instant::now();
    let mut out: Vec<Option<Vec<f32>>> = vec![None; slots.len()];
    loop {
        for (k, &i) in slots.iter().enumerate() {
            if out[k].is_some() {
                continue;
            }
            let s = ring.slot(i);
            match s.outcome() {
                Some(Ok((v, cost))) => {
                    out[k] = Some(v);
                    *spent += cost;
                }
                Some(Err(f)) => return Err(SidecarError::Remote { code: f.code, message: f.message, hint: f.hint }),
                // its worker died mid-batch: hand it to the next one (transparent retry)
                None if s.requeue_if_worker_gone(&ring) => ring.wake_workers(),
                None => {}
            }
        }
        if out.iter().all(Option::is_some) {
            return Ok(out.into_iter().flatten().collect());
        }
        if ring.workers_alive() > 0 {
            lonely_since = None;
        } else if lonely_since.get_or_insert_with(Instant::now).elapsed() > NO_WORKER_GRACE {
            return Err(no_worker());
        }
        if let Some((_, code)) = limit.filter(|&(l, _)| started.elapsed() > l) {
            return Err(SidecarError::Refused {
                code,
                message: format!("the inference service did not answer within {} s", started.elapsed().as_secs()),
                hint: "Look for pg_embed_sidecar inference lines in the server log; the pass is tried again later.",
            });
        }
        wait_latch(Duration::from_millis(100));
        // cancel / statement_timeout: raises here; `Held` gives the slots back on the way out
        pgrx::check_for_interrupts!();
    }
}

#[pgrx::pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use super::Ring;

    /// The instance's inference service: workers running, texts embedded and seconds spent
    /// embedding since the server started, and drain rounds put aside for a search. Busy seconds
    /// that grow as fast as the clock mean the service is the bottleneck; NULLs when the library
    /// is not preloaded.
    #[pg_extern(volatile, parallel_safe)]
    // (the column names live in the signature, where pgrx reads them: no type alias)
    #[allow(clippy::type_complexity)]
    fn inference_service() -> TableIterator<
        'static,
        (
            name!(workers, Option<i32>),
            name!(texts, Option<i64>),
            name!(busy_seconds, Option<f64>),
            name!(preempted_rounds, Option<i64>),
        ),
    > {
        let row = match Ring::attached() {
            Some(ring) => {
                let (texts, busy_us, preempted) = ring.served();
                (
                    Some(ring.workers_alive() as i32),
                    Some(texts as i64),
                    Some(busy_us as f64 / 1e6),
                    Some(preempted as i64),
                )
            }
            None => (None, None, None, None),
        };
        TableIterator::once(row)
    }
}
