//! Who serves which database: a small table in shared memory that the launcher, the drain workers,
//! committing backends and the DROP DATABASE guard all read and write under one lock.
//!
//! Per database it holds the drain worker (pid, and pgprocno for setting its latch), a request
//! counter bumped when `CREATE EXTENSION` commits there, the counter's value when a worker last
//! found no extension (so a request made while that worker was looking is never lost), whether
//! the last start found no free background worker slot, and whether a `DROP DATABASE` (or another
//! command that needs the database to itself) is holding workers off. Without preloading there is
//! no table and everything here is a no-op.

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::service::alive;

/// Databases tracked at once. Entries of dropped databases are recycled, so this bounds the
/// databases that have (or had, since the last restart) the extension at the same time.
const SLOTS: usize = 256;

#[derive(Clone, Copy)]
pub struct Entry {
    /// Database oid; 0 marks a free slot.
    pub db: u32,
    /// The drain worker's pid, 0 when none runs.
    pub pid: i32,
    procno: i32,
    /// Bumped by each committed `CREATE EXTENSION` in this database.
    pub requested: u32,
    /// `requested` as a worker saw it when it found no extension, if one did.
    pub absent_at: Option<u32>,
    /// The launcher's last start attempt found no free background worker slot.
    pub no_slot: bool,
    /// Since when (`GetCurrentTimestamp`) a command that needs the database to itself has held
    /// workers off; 0 when none does.
    pub held_since: i64,
}

impl Entry {
    const FREE: Entry =
        Entry { db: 0, pid: 0, procno: 0, requested: 0, absent_at: None, no_slot: false, held_since: 0 };

    /// A worker found no extension and nothing asked for one since.
    pub fn known_absent(&self) -> bool {
        self.absent_at == Some(self.requested)
    }
    pub fn worker_alive(&self) -> bool {
        alive(self.pid)
    }
    pub fn held(&self) -> bool {
        self.held_since != 0 && now() - self.held_since < HOLD_EXPIRES_US
    }
}

#[derive(Clone, Copy)]
pub struct Roster {
    launcher_procno: Option<i32>,
    entries: [Entry; SLOTS],
}

impl Default for Roster {
    fn default() -> Self {
        Self { launcher_procno: None, entries: [Entry::FREE; SLOTS] }
    }
}

// SAFETY: plain integers, no pointers: valid in any process that maps the segment
unsafe impl PGRXSharedMemory for Roster {}

// SAFETY: the name is unique to this extension
static ROSTER: PgLwLock<Roster> = unsafe { PgLwLock::new(c"pg_embed_sidecar_roster") };
/// Set in the postmaster when the table was requested; inherited by every process it forks.
static READY: AtomicBool = AtomicBool::new(false);

/// Request the table; only while preloading (from `_PG_init`).
pub fn init() {
    // SAFETY: reading a flag the postmaster sets while loading shared_preload_libraries
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(ROSTER);
        READY.store(true, Ordering::Relaxed);
    }
}

pub fn available() -> bool {
    READY.load(Ordering::Relaxed)
}

pub fn current_db() -> u32 {
    // SAFETY: backend global, set once connected
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

fn now() -> i64 {
    // SAFETY: reads the clock
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// A hold older than this is ignored: its backend died before it could lift it.
const HOLD_EXPIRES_US: i64 = 60_000_000;

impl Roster {
    fn find(&self, db: u32) -> Option<&Entry> {
        self.entries.iter().find(|e| e.db == db)
    }
    /// The entry of `db`, taking a free slot if it has none.
    fn entry(&mut self, db: u32) -> Option<&mut Entry> {
        let i = self.entries.iter().position(|e| e.db == db).or_else(|| self.entries.iter().position(|e| e.db == 0))?;
        let e = &mut self.entries[i];
        if e.db != db {
            *e = Entry { db, ..Entry::FREE };
        }
        Some(e)
    }
}

/// What the table says of `db` (a free entry if nothing).
pub fn get(db: u32) -> Entry {
    if !available() {
        return Entry::FREE;
    }
    ROSTER.share().find(db).copied().unwrap_or(Entry { db, ..Entry::FREE })
}

// ---- the drain worker of the current database ----

/// Become the database's worker, unless another live one is, or its database is held.
pub fn claim_worker() -> bool {
    // SAFETY: backend globals of this (connected) process
    let (db, pid, procno) = unsafe { (current_db(), pg_sys::MyProcPid, (*pg_sys::MyProc).pgprocno) };
    let mut roster = ROSTER.exclusive();
    let Some(e) = roster.entry(db) else {
        return false;
    };
    if (e.pid != pid && alive(e.pid)) || e.held() {
        return false;
    }
    e.pid = pid;
    e.procno = procno;
    e.no_slot = false;
    // a crash from now on is a crash, not "the extension was created since" (src/launcher.rs)
    e.absent_at = None;
    true
}

/// The worker leaves (any exit path: registered with `before_shmem_exit`).
pub fn release_worker() {
    // SAFETY: backend globals
    let (db, pid) = unsafe { (current_db(), pg_sys::MyProcPid) };
    let mut roster = ROSTER.exclusive();
    if let Some(e) = roster.entry(db).filter(|e| e.pid == pid) {
        e.pid = 0;
    }
}

/// The worker found no extension; `seen` is `requested` as read before it looked.
pub fn mark_absent(seen: u32) {
    let mut roster = ROSTER.exclusive();
    if let Some(e) = roster.entry(current_db()) {
        e.absent_at = Some(seen);
    }
}

/// The latch to set to wake `db`'s worker, if one runs.
pub fn worker_procno(db: u32) -> Option<i32> {
    ROSTER.share().find(db).filter(|e| e.pid != 0).map(|e| e.procno)
}

// ---- the launcher ----

pub fn set_launcher() {
    // SAFETY: backend global of this process
    ROSTER.exclusive().launcher_procno = Some(unsafe { (*pg_sys::MyProc).pgprocno });
}

/// Ask the launcher to (re)consider `db`: its extension was just created.
pub fn request(db: u32) {
    let procno = {
        let mut roster = ROSTER.exclusive();
        if let Some(e) = roster.entry(db) {
            e.requested = e.requested.wrapping_add(1);
        }
        roster.launcher_procno
    };
    wake_launcher(procno);
}

fn wake_launcher(procno: Option<i32>) {
    if let Some(procno) = procno {
        // SAFETY: sets that PGPROC's latch; a stale number only wakes some process once
        unsafe { pg_sys::ProcSendSignal(procno) };
    }
}

pub fn set_no_slot(db: u32, no_slot: bool) {
    if let Some(e) = ROSTER.exclusive().entry(db) {
        e.no_slot = no_slot;
    }
}

/// Free the entries of databases that no longer exist (`keep` returns false for them).
pub fn forget_unless(keep: impl Fn(u32) -> bool) {
    let mut roster = ROSTER.exclusive();
    for e in roster.entries.iter_mut().filter(|e| e.db != 0 && !keep(e.db)) {
        *e = Entry::FREE;
    }
}

// ---- commands that need a database to themselves (src/db_guard.rs) ----

/// Hold workers off `db` and return the pid of the one running there, if any.
pub fn hold(db: u32) -> Option<i32> {
    let mut roster = ROSTER.exclusive();
    let e = roster.entry(db)?;
    e.held_since = now();
    Some(e.pid).filter(|&p| alive(p))
}

/// Lift the hold and let the launcher start the worker again.
pub fn unhold(db: u32) {
    let procno = {
        let mut roster = ROSTER.exclusive();
        if let Some(e) = roster.entry(db) {
            e.held_since = 0;
        }
        roster.launcher_procno
    };
    wake_launcher(procno);
}

#[pg_schema]
mod embed_sidecar {
    use std::ffi::CStr;

    use pgrx::prelude::*;

    use crate::{gucs, roster};

    /// The `worker` column of `embed_sidecar.status`: does a drain worker serve this database, and
    /// if not, why.
    #[pg_extern(stable, name = "_worker_state")]
    fn worker_state() -> &'static str {
        if !roster::available() {
            return "not running: pg_embed_sidecar is not in shared_preload_libraries (drain with embed_sidecar.process())";
        }
        // SAFETY: plain reads of server state inside a transaction
        let (standby, name) = unsafe {
            let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
            (
                pg_sys::RecoveryInProgress(),
                if name.is_null() { String::new() } else { CStr::from_ptr(name).to_string_lossy().into_owned() },
            )
        };
        if standby {
            return "not running: standby (the promoted server drains)";
        }
        let allowed = gucs::worker_databases();
        if !allowed.is_empty() && !allowed.contains(&name) {
            return "not running: database not in pg_embed_sidecar.databases";
        }
        if !gucs::drain_worker() {
            return "not running: pg_embed_sidecar.drain_worker is off here (drain with embed_sidecar.process())";
        }
        let entry = roster::get(roster::current_db());
        if entry.worker_alive() {
            "running"
        } else if entry.no_slot {
            "waiting: no free background worker slot (raise max_worker_processes)"
        } else {
            "starting"
        }
    }

    // the status view shows the worker state
    extension_sql_file!("../sql/status.sql", name = "status", requires = ["registry", worker_state]);
}
