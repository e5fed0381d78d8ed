//! The few PostgreSQL APIs that differ between the majors we build for (15, 17, 18), each behind
//! one function, so that no other module needs a `#[cfg(feature = "pgNN")]`.
//!
//! - 17 replaced `PGPROC.pgprocno` with `MyProcNumber` (a `ProcNumber`, still an `int`).
//! - 16 replaced the per-class owner checks (`pg_database_ownercheck`, …) with `object_ownercheck`.
//! - 18 made `pqsignal` a macro for `pqsignal_be` (which no longer returns the previous handler).
//! - Minor releases differ too: `have_createdb_privilege` is exported by Debian's 15.20 but not by
//!   15.18 (bookworm's main archive), so a library built against one would not load into the other.
use pgrx::pg_sys;

/// Installs `handler` for signal `signo` in this process, as PostgreSQL's own code does.
pub fn set_signal_handler(signo: std::ffi::c_int, handler: pg_sys::pqsigfunc) {
    // SAFETY: PostgreSQL's own way to install a handler (SA_RESTART, blocked signals as its own
    // handlers expect); called from a background worker's main before it handles any signal
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(signo, handler);
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signo, handler);
    }
}

/// This process's number in the PGPROC array: what `ProcSendSignal` takes to set its latch.
pub fn my_proc_number() -> i32 {
    #[cfg(feature = "pg15")]
    // SAFETY: MyProc is set for every backend and background worker before any of our code runs
    let n = unsafe { (*pg_sys::MyProc).pgprocno };
    #[cfg(not(feature = "pg15"))]
    // SAFETY: as above; MyProcNumber is this process's own global
    let n = unsafe { pg_sys::MyProcNumber };
    n
}

/// Sets the latch of the process numbered `n` (`my_proc_number` of that process). A stale number
/// only wakes some other process once: every waiter rechecks its condition.
pub fn wake_proc(n: i32) {
    // SAFETY: ProcSendSignal indexes the PGPROC array with a number that came from
    // my_proc_number() of a live or once-live process, always within MaxBackends + auxiliaries
    unsafe { pg_sys::ProcSendSignal(n) };
}

/// Whether `role` owns database `db` (superusers included, as PostgreSQL's own checks do).
pub fn owns_database(db: pg_sys::Oid, role: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups inside a transaction, as every ownership check
    unsafe {
        #[cfg(feature = "pg15")]
        let owns = pg_sys::pg_database_ownercheck(db, role);
        #[cfg(not(feature = "pg15"))]
        let owns = pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, db, role);
        owns
    }
}

/// Whether the current user may create databases: a superuser, or a role with CREATEDB. What
/// PostgreSQL's `have_createdb_privilege` answers, read from the role's catalog row ourselves
/// (see the module comment).
pub fn may_create_databases() -> bool {
    // SAFETY: a syscache lookup of the current user inside a transaction; the tuple is read while
    // pinned and released before return
    unsafe {
        if pg_sys::superuser() {
            return true;
        }
        let id = pg_sys::SysCacheIdentifier::AUTHOID as std::ffi::c_int;
        let tuple = pg_sys::SearchSysCache1(id, pg_sys::Datum::from(pg_sys::GetUserId()));
        if tuple.is_null() {
            return false;
        }
        let createdb = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_authid>(tuple)).rolcreatedb;
        pg_sys::ReleaseSysCache(tuple);
        createdb
    }
}
