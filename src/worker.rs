//! The background worker: one per database named in `pg_embed_sidecar.databases`, registered when
//! the library is preloaded. It waits (without errors) for the extension to exist, then drains
//! every active source in turn, back-to-back while there is work and with a short nap when idle.

use std::collections::HashMap;
use std::ffi::CString;
use std::time::{Duration, Instant};

use pgrx::bgworkers::*;
use pgrx::prelude::*;

use crate::drain::{active_sources, drain_pass, record_error, Mode};
use crate::error::SidecarError;
use crate::gucs;
use crate::xact::run_in_transaction;

/// How long a source whose pass failed (model missing, SQL error) is left alone: long enough not
/// to spin, short enough that work resumes soon after the cause is fixed. A failed round (the
/// registry itself unreadable) naps as long.
const ERROR_NAP: Duration = Duration::from_secs(5);
/// Nap while the extension is not installed in the worker's database.
const ABSENT_NAP: Duration = Duration::from_secs(5);

pub fn register() {
    // SAFETY: reading a flag the postmaster sets while loading shared_preload_libraries
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    for db in gucs::worker_databases() {
        BackgroundWorkerBuilder::new(&format!("pg_embed_sidecar worker {db}"))
            .set_type("pg_embed_sidecar worker")
            .set_library("pg_embed_sidecar")
            .set_function("pg_embed_sidecar_worker_main")
            .set_extra(&db)
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            // pgrx's default is never to restart; a crashed worker must come back
            .set_restart_time(Some(Duration::from_secs(5)))
            .load();
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_embed_sidecar_worker_main(_arg: pg_sys::Datum) {
    let db = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let role = gucs::worker_role();
    BackgroundWorker::connect_worker_to_spi(Some(&db), role.as_deref());
    log!("pg_embed_sidecar: worker started for database \"{db}\"");
    // from now on a commit that enqueues in this database sets our latch
    crate::wake::register_worker();
    // Nothing a user creates in a writable schema may shadow what the drain calls.
    if let Err(e) = run_in_transaction(|| Ok(Spi::run("SET search_path TO pg_catalog, pg_temp")?)) {
        warning!("pg_embed_sidecar: {e}");
    }

    let mut nap = Duration::ZERO;
    let mut announced_absent = false;
    let mut benched = HashMap::new();
    while BackgroundWorker::wait_latch(Some(nap)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to reload postgresql.conf
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        nap = match round(&mut benched) {
            Ok(None) => {
                if !announced_absent {
                    log!("pg_embed_sidecar: extension not installed in \"{db}\"; waiting for CREATE EXTENSION");
                    announced_absent = true;
                }
                ABSENT_NAP
            }
            Ok(Some(full)) => {
                announced_absent = false;
                if full {
                    Duration::ZERO
                } else {
                    Duration::from_millis(gucs::idle_naptime_ms())
                }
            }
            Err(e) => {
                warning!("pg_embed_sidecar: {e}");
                ERROR_NAP
            }
        };
        report_activity("idle");
    }
    log!("pg_embed_sidecar: worker for database \"{db}\" exiting");
    // exit code 1, as worker_spi does: the postmaster restarts the worker after its restart time
    // (an exit code of 0 would unregister it for good after a pg_terminate_backend)
    // SAFETY: ends this process through Postgres' normal exit path
    unsafe { pg_sys::proc_exit(1) };
}

/// One round over all active sources. `None` when the extension is absent; otherwise whether any
/// source filled a whole batch (then the next round starts at once).
///
/// A source whose pass fails (model missing, table broken, queue dropped) is logged, its error is
/// stored in `status.last_error`, and it is skipped for `ERROR_NAP`; the other sources go on at
/// their own pace.
fn round(benched: &mut HashMap<i32, Instant>) -> Result<Option<bool>, SidecarError> {
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
    let Some(sources) = sources else { return Ok(None) };
    let batch = gucs::batch_size();
    let mut full = false;
    let now = Instant::now();
    benched.retain(|_, until| *until > now);
    for id in sources {
        if BackgroundWorker::sigterm_received() {
            break;
        }
        if benched.contains_key(&id) {
            continue;
        }
        report_activity(&format!("pg_embed_sidecar: draining source {id}"));
        match drain_pass(id, batch, Mode::Worker) {
            Ok(stats) => {
                debug1!("pg_embed_sidecar: source {id}: {} messages, {} vectors written", stats.messages, stats.embedded);
                full |= stats.more
            }
            Err(e) => {
                warning!("pg_embed_sidecar: source {id}: {e}");
                benched.insert(id, Instant::now() + ERROR_NAP);
                if let Err(e2) = run_in_transaction(|| record_error(id, &e)) {
                    warning!("pg_embed_sidecar: source {id}: could not record the error: {e2}");
                }
            }
        }
    }
    Ok(Some(full))
}

fn report_activity(what: &str) {
    if let Ok(text) = CString::new(what) {
        // SAFETY: plain call into the statistics collector with a NUL-terminated string
        unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, text.as_ptr()) };
    }
}
