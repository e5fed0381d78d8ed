//! Who serves which database: a small table in shared memory that the launcher, the drain workers,
//! committing backends and the DROP DATABASE guard all read and write under one lock.
//!
//! Per database it holds the drain worker (pid, and pgprocno for setting its latch), the index
//! builder it started (pid), a request
//! counter bumped when `CREATE EXTENSION` commits there, the counter's value when a worker last
//! found no extension (so a request made while that worker was looking is never lost), whether
//! the last start found no free background worker slot, and whether a `DROP DATABASE` (or another
//! command that needs the database to itself) is holding workers off. Without preloading there is
//! no table and everything here is a no-op.

pub mod db_guard;
pub mod wake;

use std::sync::atomic::{AtomicBool, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::inference::ring::alive;
use crate::pg::compat;

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
    /// The index builder's pid (src/bgw/index_builder.rs), 0 when none runs.
    pub builder_pid: i32,
    /// Bumped by each committed `CREATE EXTENSION` in this database.
    pub requested: u32,
    /// `requested` as a worker saw it when it found no extension, if one did.
    pub absent_at: Option<u32>,
    /// Since when (`GetCurrentTimestamp`) the launcher has found no free background worker slot
    /// for this database; 0 when it is not waiting for one. Idle workers of other databases give
    /// theirs up while any database waits (src/bgw/drain_worker.rs).
    pub waiting_since: i64,
    /// Since when (`GetCurrentTimestamp`) a command that needs the database to itself has held
    /// workers off; 0 when none does.
    pub held_since: i64,
}

impl Entry {
    const FREE: Entry = Entry {
        db: 0,
        pid: 0,
        procno: 0,
        builder_pid: 0,
        requested: 0,
        absent_at: None,
        waiting_since: 0,
        held_since: 0,
    };

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
    /// Seconds this database has waited for a worker slot, if it waits.
    pub fn waited_s(&self) -> Option<i64> {
        (self.waiting_since != 0).then(|| (now() - self.waiting_since) / 1_000_000)
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
    /// When every entry is taken (more databases than `SLOTS` were probed), the entry of a database
    /// known to have no extension, with no worker, no hold and no wait, is recycled: all it records
    /// is that answer, and the launcher only asks again (after `REPROBE`). Without this, databases
    /// past the 256th never got a worker.
    fn entry(&mut self, db: u32) -> Option<&mut Entry> {
        let i = self
            .entries
            .iter()
            .position(|e| e.db == db)
            .or_else(|| self.entries.iter().position(|e| e.db == 0))
            .or_else(|| {
                self.entries.iter().position(|e| {
                    e.known_absent() && e.pid == 0 && e.builder_pid == 0 && e.held_since == 0 && e.waiting_since == 0
                })
            })?;
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
    let (db, pid, procno) = (current_db(), unsafe { pg_sys::MyProcPid }, compat::my_proc_number());
    let mut roster = ROSTER.exclusive();
    let Some(e) = roster.entry(db) else {
        return false;
    };
    if (e.pid != pid && alive(e.pid)) || e.held() {
        return false;
    }
    e.pid = pid;
    e.procno = procno;
    e.waiting_since = 0;
    // a crash from now on is a crash, not "the extension was created since" (src/bgw/launcher.rs)
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

// ---- the index builder of the current database ----

/// Become the database's index builder, unless another live one is, or its database is held.
pub fn claim_builder() -> bool {
    // SAFETY: backend globals of this (connected) process
    let (db, pid) = unsafe { (current_db(), pg_sys::MyProcPid) };
    let mut roster = ROSTER.exclusive();
    let Some(e) = roster.entry(db) else {
        return false;
    };
    if (e.builder_pid != pid && alive(e.builder_pid)) || e.held() {
        return false;
    }
    e.builder_pid = pid;
    true
}

/// The builder leaves (any exit path: registered with `before_shmem_exit`).
pub fn release_builder() {
    // SAFETY: backend globals
    let (db, pid) = unsafe { (current_db(), pg_sys::MyProcPid) };
    let mut roster = ROSTER.exclusive();
    if let Some(e) = roster.entry(db).filter(|e| e.builder_pid == pid) {
        e.builder_pid = 0;
    }
}

/// Whether an index builder runs for `db`.
pub fn builder_running(db: u32) -> bool {
    ROSTER.share().find(db).is_some_and(|e| alive(e.builder_pid))
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
    ROSTER.exclusive().launcher_procno = Some(compat::my_proc_number());
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
        compat::wake_proc(procno);
    }
}

/// The launcher found no worker slot for `db` (`true`), or started its worker.
pub fn set_no_slot(db: u32, no_slot: bool) {
    if let Some(e) = ROSTER.exclusive().entry(db) {
        e.waiting_since = match (no_slot, e.waiting_since) {
            (false, _) => 0,
            (true, 0) => now(),
            (true, since) => since,
        };
    }
}

/// Whether a database other than `db` waits for a worker slot.
pub fn others_waiting(db: u32) -> bool {
    ROSTER.share().entries.iter().any(|e| e.db != 0 && e.db != db && e.waiting_since != 0)
}

/// Free the entries of databases that no longer exist (`keep` returns false for them).
pub fn forget_unless(keep: impl Fn(u32) -> bool) {
    let mut roster = ROSTER.exclusive();
    for e in roster.entries.iter_mut().filter(|e| e.db != 0 && !keep(e.db)) {
        *e = Entry::FREE;
    }
}

// ---- commands that need a database to themselves (src/roster/db_guard.rs) ----

/// Hold workers off `db` and return the pids of ours connected there (drain worker, index
/// builder).
pub fn hold(db: u32) -> Vec<i32> {
    let mut roster = ROSTER.exclusive();
    let Some(e) = roster.entry(db) else {
        return Vec::new();
    };
    e.held_since = now();
    [e.pid, e.builder_pid].into_iter().filter(|&p| alive(p)).collect()
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
    fn worker_state() -> String {
        if !roster::available() {
            return "not running: pg_embed_sidecar is not in shared_preload_libraries (drain with embed_sidecar.process())".into();
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
            return "not running: standby (the promoted server drains)".into();
        }
        let allowed = gucs::worker_databases();
        if !allowed.is_empty() && !allowed.contains(&name) {
            return "not running: database not in pg_embed_sidecar.databases".into();
        }
        if !gucs::drain_worker() {
            return "not running: pg_embed_sidecar.drain_worker is off here (drain with embed_sidecar.process())"
                .into();
        }
        let entry = roster::get(roster::current_db());
        if entry.worker_alive() {
            "running".into()
        } else if let Some(waited) = entry.waited_s() {
            format!(
                "waiting {waited} s for a background worker slot (idle workers of other databases give theirs up; raise max_worker_processes)"
            )
        } else {
            "starting".into()
        }
    }

    // the status view shows the worker state
    extension_sql_file!("../../sql/status.sql", name = "status", requires = ["registry", "replica", worker_state]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_roster_recycles_an_absent_databases_entry() {
        let mut roster = Roster::default();
        for db in 1..=SLOTS as u32 {
            let e = roster.entry(db).expect("a free entry");
            e.absent_at = Some(e.requested);
        }
        // database 2 has the extension and a worker pending: never recycled
        roster.entries[1].absent_at = None;
        let e = roster.entry(10_000).expect("an absent database's entry");
        assert_eq!((e.db, e.absent_at), (10_000, None));
        assert!(roster.find(1).is_none() && roster.find(2).is_some());
        // nothing absent left to recycle except the remaining ones; a database with a pending
        // request is never recycled either
        for e in roster.entries.iter_mut() {
            e.requested = e.requested.wrapping_add(1);
        }
        assert!(roster.entry(10_001).is_none());
    }
}
