//! The inference workers (`pg_embed_sidecar.inference_workers`, default 1): background workers
//! connected to no database, each holding one embedder per model in use (src/inference/local.rs)
//! and serving the ring (src/inference/ring.rs). Each round takes what is waiting, interactive
//! requests first, and is cut by an estimate of its tokens, not by a count of texts: a round of
//! window-long texts lasts as long as one inference batch, and a round of short texts holds
//! many. A drain round runs under a watch: a search that arrives meanwhile stops it within one
//! graph node (ONNX Runtime's terminate flag), is served, and the drain texts go back to the ring
//! to be embedded again (`watched`); drain rounds shrink while searches keep meeting them, to fit
//! between searches (`DrainRounds`). While drains wait they are owed a quarter of the busy time,
//! and get rounds of their own, which no search stops, until they have had it (`Share`). The
//! embedder sorts each round by length and cuts its batches by exact token counts. Restarted by
//! the postmaster after 1 s if it dies; clients resubmit what it held.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use embed_core::{EmbedError, Interrupt};
use pgrx::bgworkers::*;
use pgrx::prelude::*;

use super::ring::{Failure, Ring, Waiting, WORKERS_MAX};
use super::{local, with_signals_blocked};
use crate::error::SidecarError;
use crate::gucs;

/// Rounds are sized before anyone tokenises: by bytes, at about 4 bytes a token (English prose;
/// other scripts take more tokens a byte, which only makes their rounds smaller than planned) and
/// at most a window a text. The embedder's batches are cut by exact counts.
const BYTES_PER_TOKEN: u32 = 4;
const WINDOW_TOKENS: u32 = 512;
/// Estimated tokens of drain texts in one round, at most: one inference batch (the embedder's
/// `max_batch_tokens`); larger rounds embed no faster (`embed_ceiling --window`). While searches
/// keep arriving, rounds shrink (`DrainRounds`).
const DRAIN_ROUND_TOKENS: u32 = 2048;
/// While drains wait, they are owed this share of the busy time (1 in `DRAIN_SHARE_OF`): sessions
/// calling `embed_texts` in a loop (any role may) must not starve every database's drain.
const DRAIN_SHARE_OF: u32 = 4;
/// The share is kept over about this much busy time: a burst of sessions that ended must not owe
/// the drains rounds (which no search stops) for long after, and a flood that goes on is held to
/// its three quarters in every such stretch.
const SHARE_HORIZON: Duration = Duration::from_secs(2);
/// Interactive texts in one round, at most: by estimated tokens (four inference batches) and by
/// count, so a round (and a drain that waits for its end) lasts a few inference calls however
/// many sessions have texts waiting, while many sessions' short texts go in one sorted batch.
const INTERACTIVE_ROUND_TOKENS: u32 = 4 * DRAIN_ROUND_TOKENS;
const INTERACTIVE_ROUND: usize = 64;
/// How often the watch of a drain round looks for a search: it costs a search at most this much
/// on top of one graph node.
const WATCH_EVERY: Duration = Duration::from_micros(500);

fn estimated_tokens(text_len: u32) -> u32 {
    (text_len / BYTES_PER_TOKEN + 2).min(WINDOW_TOKENS)
}

/// The size of drain rounds, fitted to the gaps between searches: halved after a round that a
/// search stopped (or, unwatched, that a search waited for), grown by an eighth of the most after
/// one no search met. A stopped round is embedded again, so rounds that fit between searches
/// waste nothing (hence the slow growth); and a round drains are owed, which no search stops, is
/// then short too.
struct DrainRounds {
    tokens: u32,
}

impl DrainRounds {
    fn new() -> Self {
        DrainRounds { tokens: DRAIN_ROUND_TOKENS }
    }

    fn record(&mut self, met_a_search: bool) {
        self.tokens = if met_a_search {
            // (a round takes one text, however long, even below this)
            (self.tokens / 2).max(1)
        } else {
            (self.tokens + DRAIN_ROUND_TOKENS / 8).min(DRAIN_ROUND_TOKENS)
        };
    }
}

/// Busy time of each kind of round since drains last had nothing waiting, the past weighing less
/// and less (`SHARE_HORIZON`). Time, not rounds: a round of a hundred window-long interactive texts
/// takes seconds, a drain round of short texts milliseconds, so a share counted in rounds left the
/// drains a sliver when callers sent long texts.
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
        while self.interactive + self.drain > SHARE_HORIZON {
            self.interactive /= 2;
            self.drain /= 2;
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
        ring.slot(i).put_back(me);
    }
    ring.register_worker(me);
    log!("pg_embed_sidecar: inference worker {me} started ({} threads)", gucs::inference_threads());
    // without ONNX Runtime (a wrong library path) drain rounds simply run unwatched; every
    // request then fails with the loader's error, which says what to fix
    // (loading ONNX Runtime starts a thread of its own: see `with_signals_blocked`)
    let interrupt = with_signals_blocked(|| Interrupt::new(&gucs::embed_settings(None).library).ok());
    let mut nap = Duration::ZERO;
    let mut drain_rounds = DrainRounds::new();
    let mut share = Share::default();
    while BackgroundWorker::wait_latch(Some(nap)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to reload postgresql.conf
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        tidy(ring);
        let drain_first = share.drains_owed();
        let round = take(ring, me, drain_rounds.tokens, drain_first);
        nap = if round.slots.is_empty() { Duration::from_secs(1) } else { Duration::ZERO };
        let started = Instant::now();
        // a round drains are owed is theirs whatever arrives; any other drain round is watched
        let watch = interrupt.as_ref().filter(|_| !round.interactive && !drain_first && gucs::searches_first());
        let put_aside = serve(ring, me, &round.slots, watch);
        if !round.interactive && !round.slots.is_empty() {
            drain_rounds.record(put_aside || ring.interactive_waiting());
        }
        // a drain that came during the round is owed its share of it too; a round put aside is
        // the searches' time (drains got nothing from it), so drains soon get one that is theirs
        let drains_waiting = round.drains_waiting || drains_waiting(ring);
        share.record(drains_waiting, round.interactive || put_aside, started.elapsed());
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
    (0..ring.len()).any(|i| ring.slot(i).waiting().is_some_and(|w| !w.interactive()))
}

/// The slots of one round, what they are, and whether drain texts were waiting.
struct Round {
    slots: Vec<usize>,
    interactive: bool,
    drains_waiting: bool,
}

/// Take this round's slots: the oldest interactive requests waiting (up to
/// `INTERACTIVE_ROUND_TOKENS` estimated tokens and `INTERACTIVE_ROUND` texts), or else the
/// oldest drain requests up to `drain_tokens`; with `drain_first`, drain requests first when any
/// wait. A round has at least one text, however long.
fn take(ring: Ring, me: usize, drain_tokens: u32, drain_first: bool) -> Round {
    let mut waiting: Vec<(Waiting, usize)> =
        (0..ring.len()).filter_map(|i| ring.slot(i).waiting().map(|w| (w, i))).collect();
    waiting.sort_unstable();
    let mut interactive = waiting.iter().take_while(|w| w.0.interactive()).count();
    let drains_waiting = interactive < waiting.len();
    if drain_first && drains_waiting {
        waiting.drain(..interactive);
        interactive = 0;
    }
    let (candidates, budget) = if interactive > 0 {
        (&waiting[..interactive.min(INTERACTIVE_ROUND)], INTERACTIVE_ROUND_TOKENS)
    } else {
        (&waiting[..], drain_tokens)
    };
    let mut slots = Vec::new();
    let mut tokens = 0;
    for &(w, i) in candidates {
        let cost = estimated_tokens(w.text_len);
        if !slots.is_empty() && tokens + cost > budget {
            break;
        }
        if ring.slot(i).take(me) {
            tokens += cost;
            slots.push(i);
        }
    }
    Round { slots, interactive: interactive > 0, drains_waiting }
}

/// Embed the taken slots, one call per model, in this process (src/inference/local.rs); count
/// them; then hand each result back. The counters come first: a client that has its vector must
/// find it counted. With `watch`, a search that arrives meanwhile stops the call: the texts not
/// yet embedded go back to the ring, and this says so (`true`).
fn serve(ring: Ring, me: usize, taken: &[usize], watch: Option<&Interrupt>) -> bool {
    if taken.is_empty() {
        return false;
    }
    let busy = Instant::now();
    let mut by_model: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for &i in taken {
        if let Some((model, text)) = ring.slot(i).request(me) {
            by_model.entry(model).or_default().push((i, text));
        }
    }
    let threads = Some(gucs::inference_threads());
    // each result with its text's share of the time of the call that embedded it: what a drain
    // sizes its bulk windows by (the time it waited behind other rounds is not its cost)
    let mut results: Vec<(usize, Result<Vec<f32>, SidecarError>, Duration)> = Vec::with_capacity(taken.len());
    let mut put_aside: Vec<usize> = Vec::new();
    for (model, requests) in by_model {
        if !put_aside.is_empty() {
            put_aside.extend(requests.iter().map(|r| r.0));
            continue;
        }
        let texts: Vec<&str> = requests.iter().map(|(_, t)| t.as_str()).collect();
        let call = Instant::now();
        // (clients put the prefix on before submitting: the texts are embedded as they are)
        let embedded = match watch {
            Some(interrupt) => {
                watched(ring, interrupt, || local::embed_interruptible(&model, &texts, threads, interrupt))
            }
            None => local::embed(Some(&model), None, &texts, threads),
        };
        let each = call.elapsed() / texts.len().max(1) as u32;
        match embedded {
            Ok(vectors) => results.extend(requests.iter().map(|r| r.0).zip(vectors).map(|(i, v)| (i, Ok(v), each))),
            Err(SidecarError::Embed(EmbedError::Interrupted)) => put_aside.extend(requests.iter().map(|r| r.0)),
            // one text may be the cause: each alone, so the others still get their vector
            Err(_) if requests.len() > 1 => {
                for (i, text) in &requests {
                    let alone = Instant::now();
                    let one =
                        local::embed(Some(&model), None, &[text], threads).map(|mut v| v.pop().unwrap_or_default());
                    results.push((*i, one, alone.elapsed()));
                }
            }
            Err(e) => results.push((requests[0].0, Err(e), each)),
        }
    }
    if !put_aside.is_empty() {
        for &i in &put_aside {
            ring.slot(i).put_back(me);
        }
        ring.count_preempted();
    }
    ring.count_round(results.len(), busy.elapsed().as_micros() as u64);
    for (i, result, cost) in results {
        let result = result.as_deref().map_err(|e| Failure {
            code: e.sqlstate() as i32,
            message: e.to_string(),
            hint: e.hint().map(str::to_string),
        });
        ring.slot(i).answer(me, result, cost);
    }
    !put_aside.is_empty()
}

/// Run `embed` while a thread of its own watches the ring and raises `interrupt` as soon as an
/// interactive request waits. The thread only reads the ring's atomics and sets ONNX Runtime's
/// flag: it calls nothing of Postgres. It starts with every signal blocked, so Postgres' signal
/// handlers keep running on the main thread, whose flags and latch they serve. Without a thread
/// (none could be started) the call runs unwatched.
fn watched<R>(ring: Ring, interrupt: &Interrupt, embed: impl FnOnce() -> R) -> R {
    interrupt.reset();
    let done = AtomicBool::new(false);
    /// Ends the watch however `embed` ends: an ERROR raised inside it (cancel, shutdown) unwinds
    /// through `scope`, which first waits for the watching thread.
    struct Ends<'a>(&'a AtomicBool);
    impl Drop for Ends<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    std::thread::scope(|scope| {
        let _ends = Ends(&done);
        let watch = || {
            while !done.load(Ordering::Acquire) {
                if ring.interactive_waiting() {
                    interrupt.raise();
                    return;
                }
                std::thread::sleep(WATCH_EVERY);
            }
        };
        let _ = with_signals_blocked(|| std::thread::Builder::new().name("watch".into()).spawn_scoped(scope, watch));
        embed()
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{DrainRounds, Share, DRAIN_ROUND_TOKENS};

    #[test]
    fn drain_rounds_halve_when_a_search_meets_them_and_grow_back_when_none_does() {
        let mut rounds = DrainRounds::new();
        assert_eq!(rounds.tokens, DRAIN_ROUND_TOKENS);
        rounds.record(true);
        rounds.record(true);
        assert_eq!(rounds.tokens, DRAIN_ROUND_TOKENS / 4);
        for _ in 0..20 {
            rounds.record(true);
        }
        assert!(rounds.tokens >= 1, "never nothing");
        for _ in 0..8 {
            rounds.record(false);
        }
        assert_eq!(rounds.tokens, DRAIN_ROUND_TOKENS, "eight quiet rounds back to the most");
        rounds.record(false);
        assert_eq!(rounds.tokens, DRAIN_ROUND_TOKENS);
    }

    #[test]
    fn drains_get_a_quarter_of_the_busy_time_while_they_wait() {
        let mut share = Share::default();
        assert!(!share.drains_owed());
        // long interactive rounds while drains wait: owed once interactive time passes 3× theirs
        // (all within the horizon)
        share.record(true, true, Duration::from_millis(200));
        assert!(share.drains_owed());
        share.record(true, false, Duration::from_millis(50));
        assert!(share.drains_owed(), "50 ms of 250 is less than a quarter");
        share.record(true, false, Duration::from_millis(20));
        assert!(!share.drains_owed(), "70 ms of 270 is more than a quarter");
        share.record(true, true, Duration::from_millis(20));
        assert!(share.drains_owed(), "70 ms of 290 is less again");
        // nothing of the drains waiting: the account starts again
        share.record(false, true, Duration::from_secs(5));
        assert!(!share.drains_owed());
        // drains alone never owe anything to themselves
        share.record(true, false, Duration::from_secs(1));
        assert!(!share.drains_owed());
        // a long burst of sessions owes the drains only the horizon's worth
        let mut share = Share::default();
        share.record(true, true, Duration::from_secs(600));
        assert!(share.interactive + share.drain <= super::SHARE_HORIZON);
        assert!(share.drains_owed());
        share.record(true, false, Duration::from_secs(1));
        assert!(!share.drains_owed(), "1 s of drain work pays off a burst of any length");
    }
}
