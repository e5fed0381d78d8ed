//! The launcher: one background worker per instance (registered when the library is preloaded)
//! that starts a drain worker (src/bgw/drain_worker.rs) for every database that has the extension, as
//! dynamic background workers. Nothing to configure and nothing to restart when a database is
//! added: `CREATE EXTENSION` asks for a worker when it commits (src/roster/wake.rs), a new database is
//! looked at on the next heartbeat, `DROP EXTENSION` makes the worker exit, and `DROP DATABASE`
//! stops it first (src/roster/db_guard.rs). `pg_embed_sidecar.databases`, if set, limits the databases.
//!
//! The launcher connects to no database: it reads `pg_database` (a shared catalog) directly, and
//! a worker decides for itself whether its database has the extension, recording the answer in
//! the roster (src/roster/mod.rs) so the launcher does not ask again until something changes.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

use pgrx::bgworkers::*;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

use crate::error::SidecarError;
use crate::gucs;
use crate::pg::xact::run_in_transaction;
use crate::roster;

/// How often the launcher looks for new or dropped databases when nothing wakes it.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// A worker that stopped without finding its database empty (crashed, was terminated) is started
/// again after this; it also paces retries when no worker slot is free.
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// A database known to have no extension is looked at again after this, in case an announcement
/// was lost (e.g. the launcher itself was restarting at that moment).
const REPROBE: Duration = Duration::from_secs(600);

pub fn register() {
    // SAFETY: reading a flag the postmaster sets while loading shared_preload_libraries
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    BackgroundWorkerBuilder::new("pg_embed_sidecar launcher")
        .set_type("pg_embed_sidecar launcher")
        .set_library("pg_embed_sidecar")
        .set_function("pg_embed_sidecar_launcher_main")
        .enable_spi_access()
        // a standby runs no drain; after promotion the launcher starts
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_embed_sidecar_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // no database: only shared catalogs (pg_database, pg_authid) are readable
    BackgroundWorker::connect_worker_to_spi(None, None);
    roster::set_launcher();
    log!("pg_embed_sidecar: launcher started");
    let mut launcher = Launcher::default();
    let mut nap = Duration::ZERO;
    while BackgroundWorker::wait_latch(Some(nap)) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the documented way for a background worker to reload postgresql.conf
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        nap = launcher.round().unwrap_or_else(|e| {
            warning!("pg_embed_sidecar launcher: {e}");
            HEARTBEAT
        });
    }
    // Workers do not depend on the launcher: they stop with the server or with their extension.
    // Exit code 1 so that the postmaster restarts a launcher that was terminated by hand.
    // SAFETY: ends this process through Postgres' normal exit path
    unsafe { pg_sys::proc_exit(1) };
}

/// A drain worker this launcher started, and when.
struct Launched {
    handle: DynamicBackgroundWorker,
    at: Instant,
}

impl Launched {
    fn running(&self) -> bool {
        matches!(self.handle.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted))
    }
}

#[derive(Default)]
struct Launcher {
    /// The last worker started per database (running or not).
    launched: HashMap<u32, Launched>,
    /// Databases whose missing worker slot was already logged (once until a start succeeds).
    told_no_slot: HashSet<u32>,
}

impl Launcher {
    /// Start what is missing; returns how long to nap.
    fn round(&mut self) -> Result<Duration, SidecarError> {
        let (databases, role) = run_in_transaction(|| Ok((list_databases(), worker_role()?)))?;
        let existing: HashSet<u32> = databases.iter().map(|d| d.0).collect();
        roster::forget_unless(|db| existing.contains(&db));
        let allowed = gucs::worker_databases();
        let wanted: HashMap<u32, String> =
            databases.into_iter().filter(|(_, name)| allowed.is_empty() || allowed.contains(name)).collect();
        // a database that was dropped or left the allow-list: its worker stops
        let gone: Vec<u32> = self.launched.keys().filter(|db| !wanted.contains_key(db)).copied().collect();
        for db in gone {
            if let Some(s) = self.launched.remove(&db).filter(Launched::running) {
                s.handle.terminate();
            }
        }

        let mut nap = HEARTBEAT;
        // databases waiting for a slot first, longest waiting first: a slot an idle worker gave
        // up goes to them, not back to the database it came from
        let mut order: Vec<(&u32, &String)> = wanted.iter().collect();
        order.sort_by_key(|(db, _)| match roster::get(**db).waiting_since {
            0 => i64::MAX,
            since => since,
        });
        for (db, name) in order {
            if self.launched.get(db).is_some_and(Launched::running) {
                continue;
            }
            let entry = roster::get(*db);
            if entry.held() || entry.worker_alive() {
                continue;
            }
            if let Some(last) = self.launched.get(db) {
                let delay = if entry.known_absent() {
                    REPROBE
                } else if entry.absent_at.is_some() {
                    Duration::ZERO // the extension was created since a worker found none
                } else {
                    RESTART_DELAY
                };
                let since = last.at.elapsed();
                if since < delay {
                    nap = nap.min(delay - since);
                    continue;
                }
            }
            match start_worker(*db, name, role) {
                Some(handle) => {
                    self.launched.insert(*db, Launched { handle, at: Instant::now() });
                    self.told_no_slot.remove(db);
                    roster::set_no_slot(*db, false);
                }
                None => {
                    roster::set_no_slot(*db, true);
                    if self.told_no_slot.insert(*db) {
                        // SAFETY: reads a server setting
                        let max = unsafe { pg_sys::max_worker_processes };
                        log!(
                            "pg_embed_sidecar: no background worker slot free for database \"{name}\"; its queues are not drained until one is (max_worker_processes = {max})"
                        );
                    }
                    nap = nap.min(RESTART_DELAY);
                }
            }
        }
        Ok(nap)
    }
}

fn start_worker(db: u32, name: &str, role: Option<pg_sys::Oid>) -> Option<DynamicBackgroundWorker> {
    let title: String = format!("pg_embed_sidecar worker {name}").chars().take(80).collect();
    // SAFETY: this process's pid
    let launcher_pid = unsafe { pg_sys::MyProcPid };
    // the handle must outlive this round's memory: keep it in the launcher's top context
    // SAFETY: TopMemoryContext lives as long as the process
    unsafe {
        PgMemoryContexts::TopMemoryContext.switch_to(|_| {
            BackgroundWorkerBuilder::new(&title)
                .set_type("pg_embed_sidecar worker")
                .set_library("pg_embed_sidecar")
                .set_function("pg_embed_sidecar_worker_main")
                .set_argument(Some(pg_sys::Datum::from(db as usize)))
                .set_extra(&role.map(|r| r.to_u32().to_string()).unwrap_or_default())
                .enable_spi_access()
                .set_start_time(BgWorkerStartTime::RecoveryFinished)
                // never restarted by the postmaster: the launcher decides (it is notified of the exit)
                .set_restart_time(None)
                .set_notify_pid(launcher_pid)
                .load_dynamic()
                .ok()
        })
    }
}

/// (oid, name) of every database a worker could connect to.
fn list_databases() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: a catalog heap scan inside the caller's transaction, as autovacuum's launcher does;
    // tuples are read before the scan moves on
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let d = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            if d.datallowconn && !d.datistemplate && d.datconnlimit != pg_sys::DATCONNLIMIT_INVALID_DB {
                out.push((d.oid.to_u32(), CStr::from_ptr(d.datname.data.as_ptr()).to_string_lossy().into_owned()));
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    out
}

/// `pg_embed_sidecar.worker_role` as an oid (None: the bootstrap superuser).
fn worker_role() -> Result<Option<pg_sys::Oid>, SidecarError> {
    let Some(name) = gucs::worker_role() else {
        return Ok(None);
    };
    let cname = CString::new(name.as_str()).map_err(|_| SidecarError::NoWorkerRole(name.clone()))?;
    // SAFETY: syscache lookup on a shared catalog inside the caller's transaction
    let oid = unsafe { pg_sys::get_role_oid(cname.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        return Err(SidecarError::NoWorkerRole(name));
    }
    Ok(Some(oid))
}
