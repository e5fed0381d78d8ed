//! The index builder: a short-lived background worker that builds one source's deferred HNSW
//! index once its large backfill is done (sql/watch.sql, `_build_index_if_ready`). A build takes
//! seconds to minutes; run by the drain worker itself it would hold every other table of the
//! database for that long. So the drain worker starts a builder and goes on; while the builder
//! holds the source's registry row, the drain skips that one source (its passes skip locked rows).
//! One builder per database at a time, listed in the roster, so that `DROP DATABASE` stops it as it
//! stops the drain worker. When no background worker slot is free the drain worker builds the index
//! itself, as before.

use pgrx::bgworkers::*;
use pgrx::prelude::*;

use crate::drain::{build_index_now, record_error};
use crate::pg::compat;
use crate::pg::xact::run_in_transaction;
use crate::roster;

/// Start a builder for source `id` of this (the drain worker's) database, connected as the same
/// role. The handle says whether it still runs; None when no background worker slot was free.
pub fn start(id: i32) -> Option<DynamicBackgroundWorker> {
    // SAFETY: this connected worker's database and the role it was connected as
    let (db, role) = unsafe { (pg_sys::MyDatabaseId, pg_sys::GetAuthenticatedUserId()) };
    BackgroundWorkerBuilder::new(&format!("pg_embed_sidecar index build {id}"))
        .set_type("pg_embed_sidecar index build")
        .set_library("pg_embed_sidecar")
        .set_function("pg_embed_sidecar_index_builder_main")
        .set_argument(Some(pg_sys::Datum::from(id as usize)))
        .set_extra(&format!("{} {}", db.to_u32(), role.to_u32()))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // one try: a failed build leaves index_pending set, and the drain worker starts another
        .set_restart_time(None)
        .load_dynamic()
        .ok()
}

/// Main function of an index builder: argument the source id, `bgw_extra` "database role" oids.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_embed_sidecar_index_builder_main(arg: pg_sys::Datum) {
    let id = arg.value() as i32;
    let extra = BackgroundWorker::get_extra();
    let mut oids = extra.split(' ').filter_map(|s| s.parse::<u32>().ok()).map(pg_sys::Oid::from);
    let (Some(db), Some(role)) = (oids.next(), oids.next()) else {
        return;
    };
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SIGTERM (shutdown, DROP DATABASE) ends the build at its next interrupt check; the index is
    // then not there and index_pending still set, so the drain worker starts a builder again
    // `die`: Postgres' own SIGTERM handler for processes connected to a database
    compat::set_signal_handler(libc::SIGTERM, Some(super::die));
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), Some(role));
    if !roster::claim_builder() {
        return;
    }
    // SAFETY: registers a callback that runs on every exit path, FATAL included
    unsafe { pg_sys::before_shmem_exit(Some(release), pg_sys::Datum::from(0usize)) };
    #[cfg(feature = "fault_injection")]
    wait_ms(crate::gucs::index_build_delay_ms());
    match build_index_now(id) {
        Ok(true) => log!("pg_embed_sidecar: source {id}: HNSW index built"),
        Ok(false) => {}
        Err(e) => {
            warning!("pg_embed_sidecar: source {id}: index build failed: {e}");
            if let Err(e2) = run_in_transaction(|| record_error(id, &e)) {
                warning!("pg_embed_sidecar: source {id}: could not record the error: {e2}");
            }
        }
    }
}

/// # Safety
/// Called by PostgreSQL on process exit (registered with `before_shmem_exit`).
#[pg_guard]
unsafe extern "C-unwind" fn release(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    roster::release_builder();
}

/// Wait `ms` milliseconds on the latch, honouring SIGTERM.
#[cfg(feature = "fault_injection")]
fn wait_ms(ms: u64) {
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while std::time::Instant::now() < until {
        BackgroundWorker::wait_latch(Some(std::time::Duration::from_millis(100)));
        pg_sys::check_for_interrupts!();
    }
}
