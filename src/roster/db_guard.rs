//! A drain worker stays connected to its database, and Postgres refuses `DROP DATABASE`,
//! `ALTER DATABASE ... RENAME TO` / `SET TABLESPACE` and `CREATE DATABASE ... TEMPLATE` while any
//! other session is connected there ("database is being accessed by other users"). This
//! `ProcessUtility` hook (installed only when preloaded, like the workers) holds the launcher off
//! that database and stops its drain worker (and index builder) before such a command runs, so the command proceeds as if
//! the extension were not there; afterwards (or if it fails) the worker comes back, except after a
//! successful `DROP DATABASE`. Only a command that can pass its own checks does so (`may_run`):
//! anyone may type `DROP DATABASE x`, and a loop of failing ones must not keep x's drain down.

use std::ffi::CStr;
use std::sync::OnceLock;

use pgrx::prelude::*;
use pgrx::{is_a, PgList};

use crate::pg::compat;
use crate::roster;

/// The `ProcessUtility` hook installed before ours, called in its place.
static PREV_HOOK: OnceLock<pg_sys::ProcessUtility_hook_type> = OnceLock::new();

pub fn install() {
    // SAFETY: _PG_init runs in the postmaster while it loads shared_preload_libraries, before any
    // other process exists: reading the flag and chaining the hook cannot race
    unsafe {
        if pg_sys::process_shared_preload_libraries_in_progress {
            let _ = PREV_HOOK.set(pg_sys::ProcessUtility_hook);
            pg_sys::ProcessUtility_hook = Some(guard_utility);
        }
    }
}

/// Commands that need a database to themselves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    Drop,
    Rename,
    /// `CREATE DATABASE ... TEMPLATE` it
    CopyFrom,
    /// `ALTER DATABASE ... SET TABLESPACE`
    Move,
}

/// The database a statement needs to itself, and how.
///
/// # Safety
/// `stmt` is a valid parse node of the statement being executed, inside a transaction.
unsafe fn database_needed(stmt: *mut pg_sys::Node) -> Option<(pg_sys::Oid, Needs)> {
    // SAFETY: node tags are checked before each cast; names are NUL-terminated strings of the
    // node; the catalog lookup runs in the statement's transaction
    unsafe {
        let (name, needs) = if is_a(stmt, pg_sys::NodeTag::T_DropdbStmt) {
            ((*stmt.cast::<pg_sys::DropdbStmt>()).dbname, Needs::Drop)
        } else if is_a(stmt, pg_sys::NodeTag::T_RenameStmt) {
            let s = &*stmt.cast::<pg_sys::RenameStmt>();
            if s.renameType != pg_sys::ObjectType::OBJECT_DATABASE {
                return None;
            }
            (s.subname, Needs::Rename)
        } else if is_a(stmt, pg_sys::NodeTag::T_CreatedbStmt) {
            (option_value((*stmt.cast::<pg_sys::CreatedbStmt>()).options, c"template")?, Needs::CopyFrom)
        } else if is_a(stmt, pg_sys::NodeTag::T_AlterDatabaseStmt) {
            let s = &*stmt.cast::<pg_sys::AlterDatabaseStmt>();
            option_value(s.options, c"tablespace")?;
            (s.dbname, Needs::Move)
        } else {
            return None;
        };
        if name.is_null() {
            return None;
        }
        let db = pg_sys::get_database_oid(name, true);
        (db != pg_sys::InvalidOid).then_some((db, needs))
    }
}

/// Whether the command can pass its own privilege checks: it is the database's owner's (or a
/// superuser's), and renaming or copying a database also takes CREATEDB (copying a template
/// database one does not own is left to fail as it would without us); DROP DATABASE cannot run in
/// a transaction block or a function.
fn may_run(db: pg_sys::Oid, needs: Needs, context: pg_sys::ProcessUtilityContext::Type) -> bool {
    // SAFETY: privilege and transaction-state lookups inside the statement's transaction
    unsafe {
        let owner = pg_sys::superuser() || compat::owns_database(db, pg_sys::GetUserId());
        match needs {
            Needs::Drop => {
                owner
                    && context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
                    && !pg_sys::IsTransactionBlock()
            }
            Needs::Rename | Needs::CopyFrom => owner && compat::may_create_databases(),
            Needs::Move => owner,
        }
    }
}

/// The string value of option `wanted` in a statement's option list.
///
/// # Safety
/// `options` is NIL or a valid list of `DefElem` nodes of the statement being executed.
unsafe fn option_value(options: *mut pg_sys::List, wanted: &CStr) -> Option<*mut std::ffi::c_char> {
    // SAFETY: the list and its elements are the statement's own, valid for its execution
    unsafe {
        PgList::<pg_sys::DefElem>::from_pg(options)
            .iter_ptr()
            .find(|d| !(**d).defname.is_null() && CStr::from_ptr((**d).defname) == wanted && !(**d).arg.is_null())
            .map(|d| pg_sys::defGetString(d))
    }
}

/// # Safety
/// Called by PostgreSQL as its `ProcessUtility_hook`, with the arguments it passes every hook.
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn guard_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: the statement is handed on unchanged, to the previous hook or the standard one
    let run = move || unsafe {
        match PREV_HOOK.get().copied().flatten() {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, query_env, dest, qc),
            None => pg_sys::standard_ProcessUtility(pstmt, query, read_only_tree, context, params, query_env, dest, qc),
        }
    };
    // SAFETY: pstmt is the planned utility statement PostgreSQL is executing
    let Some((db, needs)) = (unsafe { database_needed((*pstmt).utilityStmt) }) else {
        return run();
    };
    // a command that will fail its own checks leaves the worker alone (and raises its own error)
    if !may_run(db, needs, context) {
        return run();
    }
    for pid in roster::hold(db.to_u32()) {
        // each ends at its next interrupt check; the command itself waits up to 5 s for the
        // database's other sessions to go (CountOtherDBBackends)
        // SAFETY: a signal to our worker's process
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    PgTryBuilder::new(run)
        .catch_others(|e| {
            roster::unhold(db.to_u32());
            e.rethrow()
        })
        .execute();
    if needs != Needs::Drop {
        roster::unhold(db.to_u32());
    }
}
