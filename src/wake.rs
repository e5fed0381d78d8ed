//! Wake on commit: a transaction that put keys on a queue sets the latch of its database's drain
//! worker when it commits, so the worker starts at once instead of at its next heartbeat
//! (`pg_embed_sidecar.idle_naptime`).
//!
//! The workers announce themselves in a small table in shared memory (database → the worker's
//! `pgprocno`); the commit callback looks its database up and signals that process. Without
//! preloading there is no shared memory and no worker, and all of this is skipped.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, register_xact_callback, PgLwLock, PgXactCallbackEvent, PGRXSharedMemory};

/// Databases with a drain worker at once; more than that and the extra ones simply run on their
/// heartbeat.
const SLOTS: usize = 64;

/// (database oid, pgprocno of its drain worker); oid 0 marks a free slot.
#[derive(Clone, Copy)]
pub struct Workers {
    slots: [(u32, i32); SLOTS],
}

impl Default for Workers {
    fn default() -> Self {
        Self { slots: [(0, 0); SLOTS] }
    }
}

// SAFETY: plain integers, no pointers: valid in any process that maps the segment
unsafe impl PGRXSharedMemory for Workers {}

// SAFETY: the name is unique to this extension
static WORKERS: PgLwLock<Workers> = unsafe { PgLwLock::new(c"pg_embed_sidecar_workers") };
/// Set in the postmaster when the table was requested; inherited by every backend it forks.
static READY: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The transaction whose commit already has a wake-up registered.
    static ARMED_FOR: Cell<pg_sys::TransactionId> = const { Cell::new(pg_sys::InvalidTransactionId) };
}

/// Request the shared table; only while preloading (from `_PG_init`).
pub fn init() {
    // SAFETY: reading a flag the postmaster sets while loading shared_preload_libraries
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(WORKERS);
        READY.store(true, Ordering::Relaxed);
    }
}

/// The drain worker of the current database announces itself (replacing a predecessor's entry).
pub fn register_worker() {
    if !READY.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: backend globals, set once this worker is connected to its database
    let (db, procno) = unsafe { (pg_sys::MyDatabaseId.to_u32(), (*pg_sys::MyProc).pgprocno) };
    let mut table = WORKERS.exclusive();
    let slot = table.slots.iter().position(|s| s.0 == db).or_else(|| table.slots.iter().position(|s| s.0 == 0));
    if let Some(i) = slot {
        table.slots[i] = (db, procno);
    }
}

/// This transaction put work on a queue: wake the database's worker when (and only if) it
/// commits. Cheap to call many times in one transaction.
pub fn on_commit() {
    if !READY.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: plain reads of backend state
    let (xid, db) = unsafe { (pg_sys::GetTopTransactionIdIfAny(), pg_sys::MyDatabaseId.to_u32()) };
    if xid == pg_sys::InvalidTransactionId || ARMED_FOR.with(Cell::get) == xid {
        return;
    }
    ARMED_FOR.with(|a| a.set(xid));
    register_xact_callback(PgXactCallbackEvent::Commit, move || wake(db));
}

fn wake(db: u32) {
    let procno = WORKERS.share().slots.iter().find(|s| s.0 == db).map(|s| s.1);
    if let Some(procno) = procno {
        // SAFETY: sets the latch of that PGPROC; a stale entry only wakes some process once
        unsafe { pg_sys::ProcSendSignal(procno) };
    }
}
