//! The inference workers (`pg_embed_sidecar.inference_workers`, default 1): background workers
//! connected to no database, each holding one embedder per model in use (src/inference/local.rs)
//! and serving the ring (src/inference/ring.rs). Each round takes what is waiting, interactive
//! requests first (up to 64) and otherwise a few drain texts (16, or 4 while searches keep
//! arriving), so a search waits behind at most one small drain batch; while drains wait they are
//! owed a quarter of the busy time, and get rounds of their own until they have had it (`Share`).
//! The embedder sorts by length and cuts by the token budget. Restarted by the postmaster after
//! 1 s if it dies; clients resubmit what it held.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgrx::bgworkers::*;
use pgrx::prelude::*;

use super::local;
use super::ring::{Failure, Priority, Ring, WORKERS_MAX};
use crate::error::SidecarError;
use crate::gucs;

/// Most drain texts in one round: a search that arrives meanwhile waits for at most this many.
/// Larger rounds embed no faster (`embed_ceiling --window`) and keep searches waiting longer
/// (README, "One model per instance").
const DRAIN_ROUND: usize = 16;
/// While searches keep arriving (one served within `SEARCHES_RECENT`), rounds shrink to this, so a
/// search waits for a quarter of the drain work, at some cost to the drain (README).
const DRAIN_ROUND_BUSY: usize = 4;
const SEARCHES_RECENT: Duration = Duration::from_secs(1);
/// While drains wait, they are owed this share of the busy time (1 in `DRAIN_SHARE_OF`): sessions
/// calling `embed_texts` in a loop (any role may) must not starve every database's drain.
const DRAIN_SHARE_OF: u32 = 4;
/// Most interactive texts in one round, so a round (and a drain that waits for its end) lasts
/// about one inference call, however many sessions have texts waiting.
const INTERACTIVE_ROUND: usize = 64;

/// Busy time of each kind of round since drains last had nothing waiting. Time, not rounds: a
/// round of a hundred window-long interactive texts takes seconds, a drain round of short texts
/// milliseconds, so a share counted in rounds left the drains a sliver when callers sent long texts.
#[derive(Default)]
struct Share {
    interactive: Duration,
    drain: Duration,
}

impl Share {
    /// Whether the next round serves drains first (they have had less than their share).
    fn drains_owed(&self) -> bool {
        self.drain * (DRAIN_SHARE_OF - 1) < self.interactive
    }

    /// Count a round; `drains_waiting` whether any drain text was waiting when it was taken.
    fn record(&mut self, drains_waiting: bool, interactive_round: bool, took: Duration) {
        if !drains_waiting {
            *self = Share::default();
        } else if interactive_round {
            self.interactive += took;
        } else {
            self.drain += took;
        }
    }
}

pub fn register() {
    // SAFETY: reading a flag the postmaster sets while loading shared_preload_libraries
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    for i in 0..gucs::inference_workers() {
        BackgroundWorkerBuilder::new(&format!("pg_embed_sidecar inference {i}"))
            .set_type("pg_embed_sidecar inference")
            .set_library("pg_embed_sidecar")
            .set_function("pg_embed_sidecar_inference_main")
            .set_argument(Some(pg_sys::Datum::from(i)))
            // connected to no database (like the launcher): listed in pg_stat_activity
            .enable_spi_access()
            // a hot standby serves embed_text and search too
            .set_start_time(BgWorkerStartTime::ConsistentState)
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_embed_sidecar_inference_main(arg: pg_sys::Datum) {
    let me = arg.value().min(WORKERS_MAX - 1);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    let Some(ring) = Ring::attached() else { return };
    for i in 0..ring.len() {
        ring.slot(i).reclaim_from_predecessor(me);
    }
    ring.register_worker(me);
    log!("pg_embed_sidecar: inference worker {me} started ({} threads)", gucs::inference_threads());
    let mut nap = Duration::ZERO;
    let mut last_search: Option<Instant> = None;
    let mut share = Share::default();
    while BackgroundWorker::wait_latch(Some(nap)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to reload postgresql.conf
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        tidy(ring);
        let searching = last_search.is_some_and(|t| t.elapsed() < SEARCHES_RECENT);
        let drain_first = share.drains_owed();
        // a round drains owe is a full one; otherwise small while searches keep arriving
        let drain_round = if searching && !drain_first { DRAIN_ROUND_BUSY } else { DRAIN_ROUND };
        let round = take(ring, me, drain_round, drain_first);
        if round.interactive {
            last_search = Some(Instant::now());
        }
        nap = if round.slots.is_empty() { Duration::from_secs(1) } else { Duration::ZERO };
        let started = Instant::now();
        serve(ring, me, &round.slots);
        // a drain that came during the round is owed its share of it too
        let drains_waiting = round.drains_waiting || drains_waiting(ring);
        share.record(drains_waiting, round.interactive, started.elapsed());
    }
    ring.retire_worker(me);
    // exit code 1: the postmaster starts it again after its restart time (0 would retire it)
    // SAFETY: ends this process through Postgres' normal exit path
    unsafe { pg_sys::proc_exit(1) };
}

/// Free what nobody waits for any more (src/inference/ring.rs, `free_if_orphaned`).
fn tidy(ring: Ring) {
    for i in 0..ring.len() {
        ring.slot(i).free_if_orphaned(&ring);
    }
}

/// Whether any drain text waits for a worker.
fn drains_waiting(ring: Ring) -> bool {
    (0..ring.len()).any(|i| ring.slot(i).waiting().is_some_and(|(priority, _)| priority == Priority::Drain as u32))
}

/// The slots of one round, what they are, and whether drain texts were waiting.
struct Round {
    slots: Vec<usize>,
    interactive: bool,
    drains_waiting: bool,
}

/// Take this round's slots: the oldest interactive requests waiting (at most
/// `INTERACTIVE_ROUND`), or else the oldest `drain_round` drain requests; with `drain_first`,
/// drain requests first when any wait.
fn take(ring: Ring, me: usize, drain_round: usize, drain_first: bool) -> Round {
    let mut waiting: Vec<(u32, u64, usize)> =
        (0..ring.len()).filter_map(|i| ring.slot(i).waiting().map(|(priority, seq)| (priority, seq, i))).collect();
    waiting.sort_unstable();
    let mut interactive = waiting.iter().take_while(|w| w.0 == Priority::Interactive as u32).count();
    let drains_waiting = interactive < waiting.len();
    if drain_first && drains_waiting {
        waiting.drain(..interactive);
        interactive = 0;
    }
    let limit = if interactive > 0 { interactive.min(INTERACTIVE_ROUND) } else { drain_round };
    let slots = waiting.into_iter().take(limit).map(|w| w.2).filter(|&i| ring.slot(i).take(me)).collect();
    Round { slots, interactive: interactive > 0, drains_waiting }
}

/// Embed the taken slots, one call per model, in this process (src/inference/local.rs); count
/// them; then hand each result back. The counters come first: a client that has its vector must
/// find it counted.
fn serve(ring: Ring, me: usize, taken: &[usize]) {
    if taken.is_empty() {
        return;
    }
    let busy = Instant::now();
    let mut by_model: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for &i in taken {
        if let Some((model, text)) = ring.slot(i).request(me) {
            by_model.entry(model).or_default().push((i, text));
        }
    }
    let threads = Some(gucs::inference_threads());
    let mut results: Vec<(usize, Result<Vec<f32>, SidecarError>)> = Vec::with_capacity(taken.len());
    for (model, requests) in by_model {
        let texts: Vec<&str> = requests.iter().map(|(_, t)| t.as_str()).collect();
        // (clients put the prefix on before submitting: the texts are embedded as they are)
        match local::embed(Some(&model), None, &texts, threads) {
            Ok(vectors) => results.extend(requests.iter().map(|r| r.0).zip(vectors.into_iter().map(Ok))),
            // one text may be the cause: each alone, so the others still get their vector
            Err(_) if requests.len() > 1 => {
                for (i, text) in &requests {
                    let one =
                        local::embed(Some(&model), None, &[text], threads).map(|mut v| v.pop().unwrap_or_default());
                    results.push((*i, one));
                }
            }
            Err(e) => results.push((requests[0].0, Err(e))),
        }
    }
    ring.count_round(taken.len(), busy.elapsed().as_micros() as u64);
    for (i, result) in results {
        let result = result.as_deref().map_err(|e| Failure {
            code: e.sqlstate() as i32,
            message: e.to_string(),
            hint: e.hint().map(str::to_string),
        });
        ring.slot(i).answer(me, result);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Share;

    #[test]
    fn drains_get_a_quarter_of_the_busy_time_while_they_wait() {
        let mut share = Share::default();
        assert!(!share.drains_owed());
        // long interactive rounds while drains wait: owed once interactive time passes 3× theirs
        share.record(true, true, Duration::from_secs(2));
        assert!(share.drains_owed());
        share.record(true, false, Duration::from_millis(500));
        assert!(share.drains_owed(), "0.5 s of 2.5 s is less than a quarter");
        share.record(true, false, Duration::from_millis(200));
        assert!(!share.drains_owed(), "0.7 s of 2.7 s is more than a quarter");
        share.record(true, true, Duration::from_millis(200));
        assert!(share.drains_owed());
        // nothing of the drains waiting: the account starts again
        share.record(false, true, Duration::from_secs(5));
        assert!(!share.drains_owed());
        // drains alone never owe anything to themselves
        share.record(true, false, Duration::from_secs(1));
        assert!(!share.drains_owed());
    }
}
