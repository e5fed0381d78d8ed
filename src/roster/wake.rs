//! Wake on commit. A transaction that put keys on a queue sets the latch of its database's drain
//! worker when it commits, so the worker starts at once instead of at its next heartbeat
//! (`pg_embed_sidecar.idle_naptime`); a transaction that created the extension asks the launcher
//! for a worker when it commits. Both go through the roster (src/roster/mod.rs); without preloading
//! there is none, and all of this is skipped.
//!
//! On commit, not at once: a worker woken before the commit would find nothing visible yet.

use std::cell::Cell;

use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgXactCallbackEvent};

use crate::pg::compat;
use crate::roster;

thread_local! {
    /// The transaction whose commit already has a wake-up registered.
    static ARMED_FOR: Cell<pg_sys::TransactionId> = const { Cell::new(pg_sys::InvalidTransactionId) };
}

/// This transaction put work on a queue: wake the database's worker when (and only if) it
/// commits. Cheap to call many times in one transaction.
pub fn on_commit() {
    if !roster::available() {
        return;
    }
    // SAFETY: plain read of backend state
    let (xid, db) = (unsafe { pg_sys::GetTopTransactionIdIfAny() }, roster::current_db());
    if xid == pg_sys::InvalidTransactionId || ARMED_FOR.with(Cell::get) == xid {
        return;
    }
    ARMED_FOR.with(|a| a.set(xid));
    register_xact_callback(PgXactCallbackEvent::Commit, move || {
        if let Some(procno) = roster::worker_procno(db) {
            compat::wake_proc(procno);
        }
    });
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;
    use pgrx::{register_xact_callback, PgXactCallbackEvent};

    use crate::roster;

    /// Called by the extension's install script: once this transaction commits, the launcher starts
    /// a drain worker for this database (no configuration, no restart).
    #[pg_extern(volatile, name = "_announce_extension")]
    fn announce_extension() {
        if roster::available() {
            let db = roster::current_db();
            register_xact_callback(PgXactCallbackEvent::Commit, move || roster::request(db));
        }
    }
}
