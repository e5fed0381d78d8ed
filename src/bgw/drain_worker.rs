//! A drain worker: one per database that has the extension, started by the launcher
//! (src/bgw/launcher.rs) as a dynamic background worker. It drains every active source in turn,
//! back-to-back while there is work, on its latch (set when a commit enqueues, src/roster/wake.rs) or a
//! slow heartbeat when idle. It exits when its database no longer has the extension.

use std::collections::HashMap;
use std::ffi::CString;
use std::time::{Duration, Instant};

use pgrx::bgworkers::*;
use pgrx::prelude::*;

use super::index_builder;
use crate::drain::{active_sources, build_index_now, record_error, record_note, Mode, Pass, Ready, Sent};
use crate::error::SidecarError;
use crate::gucs;
use crate::pg;
use crate::pg::compat;
use crate::pg::xact::run_in_transaction;
use crate::roster;

/// How long a source whose pass failed (model missing, SQL error) is left alone: long enough not
/// to spin, short enough that work resumes soon after the cause is fixed. A failed round (the
/// registry itself unreadable) naps as long.
const ERROR_NAP: Duration = Duration::from_secs(5);
/// A worker that found nothing to do for this long gives its slot up while another database waits
/// for one (max_worker_processes reached): the launcher starts it again when a slot is free.
const YIELD_AFTER_IDLE: Duration = Duration::from_secs(10);
/// Longest a table owner's code (triggers, checks, policies on the source or sidecar) may run in
/// one step of a pass; then the pass fails and is retried later, and the other sources go on.
/// Lookups and writes of a full pass take well under a second.
const OWNER_CODE_LIMIT_MS: i32 = 10_000;
/// A source whose table's own code (triggers, checks, policies on the source or sidecar) took this
/// long in one pass waits `SLOW_PASS_PENALTY` times as long (at most `SLOW_PASS_REST_MAX`) before
/// its next pass, so the other sources go first: one worker serves them all, and an owner may not
/// make the others wait pass after pass. Our own statements on a table take milliseconds.
const SLOW_OWNER_CODE: Duration = Duration::from_secs(1);
const SLOW_PASS_PENALTY: u32 = 10;
const SLOW_PASS_REST_MAX: Duration = Duration::from_secs(60);
/// Longest wait between two index builds of one source whose build keeps failing.
const INDEX_RETRY_MAX: Duration = Duration::from_secs(300);
/// Bulk rows in a source's first pass, before its rows' cost is known: a window-long document
/// takes ~50 ms on one core, so 64 of them would hold a writer's change for seconds.
const FIRST_BULK_WINDOW: i32 = 8;

/// Main function of a drain worker; the argument is its database's oid, `bgw_extra` the role's oid
/// (empty: the bootstrap superuser).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_embed_sidecar_worker_main(arg: pg_sys::Datum) {
    let db = pg_sys::Oid::from(arg.value() as u32);
    let role = BackgroundWorker::get_extra().parse::<u32>().ok().map(pg_sys::Oid::from);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SIGTERM (shutdown, DROP DATABASE, pg_terminate_backend) ends the worker at its next interrupt
    // check, even in the middle of a pass: the messages it held reappear after the visibility
    // timeout, so nothing is lost, and DROP DATABASE need not wait for a whole batch.
    // `die`: Postgres' own SIGTERM handler for processes connected to a database
    compat::set_signal_handler(libc::SIGTERM, Some(super::die));
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), role);
    if !gucs::drain_worker() {
        // ALTER DATABASE ... SET pg_embed_sidecar.drain_worker = off: treated like a database
        // without the extension (looked at again on CREATE EXTENSION or after a long while)
        roster::mark_absent(roster::get(db.to_u32()).requested);
    }
    // otherwise leave if another worker serves this database, or a DROP DATABASE is under way
    if !gucs::drain_worker() || !roster::claim_worker() {
        // SAFETY: plain exit; the launcher is notified
        unsafe { pg_sys::proc_exit(0) };
    }
    // SAFETY: registers a callback that runs on every exit path, FATAL included
    unsafe { pg_sys::before_shmem_exit(Some(release), pg_sys::Datum::from(0usize)) };
    // Nothing a user creates in a writable schema may shadow what the drain calls.
    // The drain's commits need not wait for their WAL flush: a pass's write and its queue deletes
    // commit together, so a crash that loses the last few commits (at most wal_writer_delay times
    // three) only puts their messages back in the queue, to be embedded again; nothing is lost and
    // the sidecar never disagrees with the queue. Waiting for the flush cost two fsyncs a pass.
    let name = run_in_transaction(|| {
        Spi::run("SET search_path TO pg_catalog, pg_temp")?;
        Spi::run("SET synchronous_commit TO off")?;
        Ok(Spi::get_one::<String>("SELECT current_database()::text")?.unwrap_or_default())
    })
    .unwrap_or_else(|e| {
        warning!("pg_embed_sidecar: {e}");
        String::new()
    });
    log!("pg_embed_sidecar: worker started for database \"{name}\"");
    crate::pg::authority::limit_owner_code(OWNER_CODE_LIMIT_MS);

    let mut nap = Duration::ZERO;
    let mut drainer = Drainer::default();
    let mut idle_since = Instant::now();
    while BackgroundWorker::wait_latch(Some(nap)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to reload postgresql.conf
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // read before looking, so a CREATE EXTENSION committed meanwhile is not taken for absent
        let requested = roster::get(db.to_u32()).requested;
        let result = drainer.round();
        if !matches!(result, Ok(Some(Round { full: true, .. }))) {
            // no round follows at once: what was sent is waited for and written before any nap
            drainer.settle();
        }
        if !matches!(result, Ok(Some(Round { worked: false, .. }))) {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= YIELD_AFTER_IDLE && roster::others_waiting(db.to_u32()) {
            log!("pg_embed_sidecar: worker for database \"{name}\" is idle; giving its slot to a database that waits for one");
            break;
        }
        nap = match result {
            Ok(None) => {
                roster::mark_absent(requested);
                log!("pg_embed_sidecar: extension not installed in database \"{name}\"; worker exiting");
                break;
            }
            Ok(Some(Round { full: true, .. })) => Duration::ZERO,
            Ok(Some(_)) => Duration::from_millis(gucs::idle_naptime_ms()),
            Err(e) => {
                warning!("pg_embed_sidecar: {e}");
                ERROR_NAP
            }
        };
        report_activity("idle");
    }
    // SAFETY: ends this process through Postgres' normal exit path
    unsafe { pg_sys::proc_exit(0) };
}

/// # Safety
/// Called by PostgreSQL on process exit (registered with `before_shmem_exit`).
#[pg_guard]
unsafe extern "C-unwind" fn release(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    roster::release_worker();
}

/// What a round over the sources did.
struct Round {
    /// A source filled a whole batch: the next round starts at once.
    full: bool,
    /// Some pass found messages.
    worked: bool,
}

/// What a drain worker carries from one round to the next.
#[derive(Default)]
struct Drainer {
    /// Sources whose last pass failed or whose owner's code was slow, left alone until the
    /// instant given.
    resting: HashMap<i32, Instant>,
    /// The owner of each active source, as of this round.
    owners: HashMap<i32, pg_sys::Oid>,
    /// Owners one of whose tables' code was slow, until that table's rest ends: a second slow
    /// table of theirs in that time sends all of their tables to rest.
    slow_owners: HashMap<pg_sys::Oid, Instant>,
    /// The last pass sent, its vectors on their way.
    in_flight: Option<Sent>,
    /// A pass whose vectors are back, not written yet (only between `finish` and `flush`).
    carried: Option<Ready>,
    /// The index builder this worker started last (src/bgw/index_builder.rs).
    builder: Option<DynamicBackgroundWorker>,
    /// Sources whose index a builder was started for and is still due: when the next may be
    /// started for each, and the wait after that one (doubling), so a build that keeps failing (a
    /// lock on its sidecar) never keeps another source's index from being built.
    index_tries: HashMap<i32, (Instant, Duration)>,
    /// Per source, the inference time a row took in its recent passes (each pass
    /// weighs half): sizes its bulk windows (`bulk_window`).
    row_cost: HashMap<i32, Duration>,
}

impl Drainer {
    /// One round over all active sources. `None` when the extension is absent.
    ///
    /// Passes are pipelined: the next pass is read and looked up while the service embeds the one
    /// in flight; once that one's vectors are back the next is sent at once and the finished one
    /// written while the service embeds again. So the worker's SQL, reads and writes alike, runs
    /// while the service embeds, and the service waits for SQL only between rounds: small passes
    /// (`bulk_pass_time`) cost no throughput. Without the service the model runs in this process
    /// and nothing would overlap: each pass is written before the next is read.
    ///
    /// A source whose pass fails (model missing, table broken, queue dropped) is logged, its error
    /// is stored in `status.last_error`, and it is skipped for `ERROR_NAP`; the other sources go on
    /// at their own pace.
    fn round(&mut self) -> Result<Option<Round>, SidecarError> {
        let sources = run_in_transaction(|| {
            Spi::connect(|client| {
                // to_regclass cannot raise, so a missing extension is not an error in the log
                let present = client
                    .select("SELECT to_regclass('embed_sidecar.sources') IS NOT NULL", None, &[])?
                    .first()
                    .get_one::<bool>()?
                    .unwrap_or(false);
                if present {
                    Ok(Some(active_sources(client)?))
                } else {
                    Ok(None)
                }
            })
        })?;
        let Some(sources) = sources else {
            return Ok(None);
        };
        let batch = gucs::batch_size();
        let overlap = crate::inference::overlaps();
        let mut full = false;
        let mut worked = false;
        let now = Instant::now();
        self.resting.retain(|_, until| *until > now);
        self.slow_owners.retain(|_, until| *until > now);
        self.owners = sources.iter().copied().collect();
        for (id, _) in sources {
            // a pending SIGTERM ends the worker here, between sources
            pg_sys::check_for_interrupts!();
            if self.resting.contains_key(&id) {
                continue;
            }
            if !overlap || self.in_flight.as_ref().is_some_and(|p| p.source_id() == id && p.chunked()) {
                self.settle();
            }
            report_activity(&format!("pg_embed_sidecar: draining source {id}"));
            let before = pg::authority::owner_code_time();
            let begun = Pass::begin(id, batch, self.bulk_window(id), Mode::Worker);
            let spent = pg::authority::owner_code_time().saturating_sub(before);
            match begun {
                Ok(begun) => {
                    self.charge(id, spent);
                    match begun.index_due {
                        Some(true) => self.build_index(id),
                        // built (or never deferred): its tries are over
                        Some(false) => _ = self.index_tries.remove(&id),
                        None => {}
                    }
                    if let Some(pass) = begun.pass {
                        full |= pass.more();
                        worked = true;
                        self.finish();
                        self.in_flight = Some(pass.send());
                        self.flush();
                    }
                }
                Err(e) => {
                    self.rest_after_error(id, e);
                    self.charge(id, spent);
                }
            }
        }
        Ok(Some(Round { full, worked }))
    }

    /// Bulk rows for source `id`'s next pass (`bulk_window`).
    fn bulk_window(&self, id: i32) -> i32 {
        bulk_window(self.row_cost.get(&id).copied(), gucs::bulk_pass_time(), gucs::bulk_batch_size())
    }

    /// Wait for the pass in flight, if any; its vectors become the carried pass, and what its
    /// rows took sizes its source's next bulk windows.
    fn finish(&mut self) {
        let Some(sent) = self.in_flight.take() else { return };
        self.flush();
        let id = sent.source_id();
        let ready = sent.wait();
        if let Some(cost) = ready.row_cost() {
            let recent = self.row_cost.get(&id).map_or(cost, |&was| (was + cost) / 2);
            self.row_cost.insert(id, recent);
        }
        self.carried = Some(ready);
    }

    /// Wait for and write everything sent.
    fn settle(&mut self) {
        self.finish();
        self.flush();
    }

    /// Write the carried pass, if any.
    fn flush(&mut self) {
        let Some(ready) = self.carried.take() else { return };
        let id = ready.source_id();
        let before = pg::authority::owner_code_time();
        let written = ready.write(Mode::Worker);
        let spent = pg::authority::owner_code_time().saturating_sub(before);
        match written {
            Ok(stats) => {
                debug1!(
                    "pg_embed_sidecar: source {id}: {} messages, {} vectors written",
                    stats.messages,
                    stats.embedded
                )
            }
            Err(e) => self.rest_after_error(id, e),
        }
        self.charge(id, spent);
    }

    /// Source `id`'s backfill is done: have its index built by a builder of its own, unless one
    /// runs for this database (another due source waits for the next round) or this source's last
    /// try is too recent. When no builder can be started the index is built here, holding the
    /// other sources meanwhile.
    fn build_index(&mut self, id: i32) {
        let running = self
            .builder
            .as_ref()
            .is_some_and(|b| matches!(b.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)));
        let now = Instant::now();
        let too_soon = self.index_tries.get(&id).is_some_and(|&(next, _)| now < next);
        if running || too_soon || roster::builder_running(roster::current_db()) {
            return;
        }
        let wait = self.index_tries.get(&id).map_or(ERROR_NAP, |&(_, wait)| (wait * 2).min(INDEX_RETRY_MAX));
        self.index_tries.insert(id, (now + wait, wait));
        self.builder = index_builder::start(id);
        if self.builder.is_none() {
            report_activity(&format!("pg_embed_sidecar: building the index of source {id}"));
            if let Err(e) = build_index_now(id) {
                self.rest_after_error(id, e);
            }
        }
    }

    /// Charge source `id` with the time its table's own code took in one step (`spent`). A slow
    /// step (see `SLOW_OWNER_CODE`) sends the source to rest; a second slow table of the same owner
    /// while the first rests sends all of that owner's tables to rest (an owner with many slow
    /// tables must not hold the others once per table). Only the source itself at first: its
    /// slowness may be a writer's doing (row locks it waits for), not its owner's. Why goes to
    /// `status.last_error`.
    fn charge(&mut self, id: i32, spent: Duration) {
        if spent < SLOW_OWNER_CODE {
            return;
        }
        let rest = (spent * SLOW_PASS_PENALTY).min(SLOW_PASS_REST_MAX);
        let now = Instant::now();
        let until = now + rest;
        let owner = self.owners.get(&id).copied();
        let again = owner.and_then(|o| self.slow_owners.get(&o)).is_some_and(|&u| u > now);
        let resting: Vec<i32> = if again {
            self.owners.iter().filter(|(_, &o)| Some(o) == owner).map(|(&s, _)| s).chain([id]).collect()
        } else {
            vec![id]
        };
        for s in resting {
            self.resting.entry(s).and_modify(|u| *u = (*u).max(until)).or_insert(until);
        }
        if let Some(o) = owner {
            self.slow_owners.entry(o).and_modify(|u| *u = (*u).max(until)).or_insert(until);
        }
        let who = if again { "every table of its owner waits" } else { "it waits" };
        let why = format!(
            "the table's own code (triggers, checks, policies) took {:.1} s in one pass; {who} {} s so that other tables go first",
            spent.as_secs_f64(),
            rest.as_secs()
        );
        log!("pg_embed_sidecar: source {id}: {why}");
        if let Err(e) = run_in_transaction(|| record_note(id, &why)) {
            warning!("pg_embed_sidecar: source {id}: could not record why it waits: {e}");
        }
    }

    /// Log a source's failed pass, show it in `status.last_error`, and leave the source alone a
    /// while.
    fn rest_after_error(&mut self, id: i32, e: SidecarError) {
        warning!("pg_embed_sidecar: source {id}: {e}");
        // (a longer rest for slow owner code, set by `charge`, stands)
        let until = Instant::now() + ERROR_NAP;
        self.resting.entry(id).and_modify(|u| *u = (*u).max(until)).or_insert(until);
        if let Err(e2) = run_in_transaction(|| record_error(id, &e)) {
            warning!("pg_embed_sidecar: source {id}: could not record the error: {e2}");
        }
    }
}

/// Bulk rows of a source's next pass: as many as `budget` holds at what its recent rows took
/// (`cost`), between 1 and `most`; `FIRST_BULK_WINDOW` before its cost is known; `most` with no
/// budget. Sized by time, not rows: 64 short synopses take 0.1 s, 64 long descriptions 2 s, and a
/// writer's change waits for a pass.
fn bulk_window(cost: Option<Duration>, budget: Duration, most: i32) -> i32 {
    if budget.is_zero() {
        return most;
    }
    match cost {
        Some(cost) if !cost.is_zero() => ((budget.as_secs_f64() / cost.as_secs_f64()) as i32).clamp(1, most),
        _ => FIRST_BULK_WINDOW.min(most),
    }
}

fn report_activity(what: &str) {
    if let Ok(text) = CString::new(what) {
        // SAFETY: plain call into the statistics collector with a NUL-terminated string
        unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, text.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{bulk_window, FIRST_BULK_WINDOW};

    #[test]
    fn bulk_windows_hold_the_pass_time_between_one_row_and_the_most() {
        let ms = Duration::from_millis;
        let budget = ms(250);
        // long descriptions at 40 ms a row: 6 rows; short synopses at 2 ms: capped at 64
        assert_eq!(bulk_window(Some(ms(40)), budget, 64), 6);
        assert_eq!(bulk_window(Some(ms(2)), budget, 64), 64);
        // a row slower than the whole budget still moves, one at a time
        assert_eq!(bulk_window(Some(ms(900)), budget, 64), 1);
        // before anything is known: a small first window, never above the most
        assert_eq!(bulk_window(None, budget, 64), FIRST_BULK_WINDOW);
        assert_eq!(bulk_window(None, budget, 3), 3);
        assert_eq!(bulk_window(Some(Duration::ZERO), budget, 64), FIRST_BULK_WINDOW);
        // no budget: the row count of 0.2.0
        assert_eq!(bulk_window(Some(ms(40)), Duration::ZERO, 64), 64);
    }
}
