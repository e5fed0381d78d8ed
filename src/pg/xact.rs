//! Transactions for the background worker, which runs outside any: each phase of a drain pass gets
//! its own short transaction. Its own module so the drain and the worker both use it without
//! depending on each other.

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
    // the closure's captures are only used again if it returns normally
    let f = std::panic::AssertUnwindSafe(f);
    let result = PgTryBuilder::new(move || {
        let f = f;
        (f.0)()
    })
    .catch_others(|e| {
        let r = match &e {
            CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
            CaughtError::RustPanic { ereport, .. } => ereport,
        };
        Err(SidecarError::Caught {
            code: r.sql_error_code(),
            message: r.message().to_string(),
            hint: r.hint().map(str::to_string),
        })
    })
    .execute();
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
