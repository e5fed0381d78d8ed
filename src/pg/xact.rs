//! Transactions for the background worker, which runs outside any: each phase of a drain pass gets
//! its own short transaction. Its own module so the drain and the worker both use it without
//! depending on each other. And subtransactions, for owner code that must not abort the caller's
//! transaction (the replica trigger's key check in the apply worker).

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::error::SidecarError;

/// Run `f` in its own transaction; commit on success, roll back on any error (a Postgres ERROR
/// raised inside is caught here, so it never takes the worker down). Each transaction starts with
/// `search_path` pinned again (`SET LOCAL`): the worker relies on it for every statement, and a
/// pin made once at start would be only as good as the guarantee that nothing ever changes it.
pub fn run_in_transaction<R>(f: impl FnOnce() -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    // SAFETY: the worker is outside any transaction here; this is the worker_spi sequence
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        crate::pg::authority::pin_search_path_local();
    }
    let result = catching(f);
    // SAFETY: ends the transaction started above, whichever way `f` finished
    unsafe {
        if result.is_ok() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    result
}

/// Run `f` in a subtransaction of the current transaction: kept if it returns Ok, rolled back if it
/// returns an error or raises one. Every error is caught, including those PL/pgSQL's `WHEN OTHERS`
/// lets through (`assert_failure`, `query_canceled`): owner code raising them must not stop the
/// apply worker. The caller's memory context and resource owner are restored either way, as the
/// procedural languages do around their subtransactions.
pub fn in_subtransaction<R>(f: impl FnOnce() -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    // SAFETY: a subtransaction begun here is ended below on every path; the caller's memory
    // context and resource owner are saved first and put back after
    let (context, owner) = unsafe {
        let saved = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(saved.0);
        saved
    };
    let result = catching(f);
    // SAFETY: ends the subtransaction begun above
    unsafe {
        if result.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    }
    result
}

/// `f()`, with a Postgres ERROR (or a panic) it raises caught and returned as an error.
fn catching<R>(f: impl FnOnce() -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    // the closure's captures are only used again if it returns normally
    let f = std::panic::AssertUnwindSafe(f);
    PgTryBuilder::new(move || {
        let f = f;
        (f.0)()
    })
    .catch_others(|e| Err(caught(e)))
    .execute()
}

fn caught(e: CaughtError) -> SidecarError {
    let r = match &e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    SidecarError::Caught {
        code: r.sql_error_code(),
        message: r.message().to_string(),
        hint: r.hint().map(str::to_string),
    }
}
