//! Whose rights a piece of work runs with.
//!
//! The worker connects as a superuser (or `pg_embed_sidecar.worker_role`) and management functions
//! are SECURITY DEFINER, yet the tables they act on belong to ordinary roles, and those roles can
//! attach code to them: triggers, index expressions, CHECKs, domain checks on key types, column
//! defaults, row-level security policies. So every statement that reads a source or writes a
//! sidecar runs as the table's owner inside a security-restricted operation, the way PostgreSQL
//! runs VACUUM, ANALYZE and REFRESH MATERIALIZED VIEW (`vacuum.c`, `matview.c`): whatever the owner
//! planted runs with the owner's rights, and cannot SET ROLE, create temporary objects or leave
//! state behind for later privileged code. Queue and registry work keeps the caller's identity.
//!
//! Nothing the owner's code does may outlive the operation: settings it changes (even with a plain
//! `SET` or `set_config(..., false)`) are rolled back when the operation ends, as VACUUM, ANALYZE
//! and index builds roll back what index functions set (`AtEOXact_GUC(false, ...)`). Otherwise a
//! planted `SET search_path` would survive into the worker's next, privileged, statement.
//! Restoring on error needs nothing here: aborting the (sub)transaction puts the user id, the
//! security context and the GUC nest level back, exactly as for VACUUM.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::SidecarError;

const PINNED_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// Longest, in milliseconds, a table owner's code may run inside one restricted operation of the
/// drain worker (0: no limit, as in a session, where the caller's own statement_timeout applies).
/// One worker serves every table of its database, so a trigger that sleeps would hold them all.
static OWNER_CODE_LIMIT_MS: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

pub fn limit_owner_code(ms: i32) {
    OWNER_CODE_LIMIT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// Microseconds this process has spent in restricted operations (a table owner's code and our
/// statements on the owner's tables), since it started: the drain worker charges them to the
/// source whose pass ran them.
static OWNER_CODE_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn owner_code_time() -> std::time::Duration {
    std::time::Duration::from_micros(OWNER_CODE_US.load(std::sync::atomic::Ordering::Relaxed))
}

// The statement timeout's timer (utils/timeout.h), which pgrx does not bind; SPI does not arm it,
// so the worker arms it itself around the owner's code.
extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
}
/// `STATEMENT_TIMEOUT` in `enum TimeoutId` (the same in PostgreSQL 15 to 18).
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;

/// Adds the time since it was made to `OWNER_CODE_US` when dropped, also when an ERROR unwinds
/// through `run_as`: owner code that ends in an error (the step limit, say) is charged too.
struct Charged(std::time::Instant);

impl Drop for Charged {
    fn drop(&mut self) {
        OWNER_CODE_US.fetch_add(self.0.elapsed().as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Disarms the statement timeout when dropped, also when an ERROR unwinds through `run_as`.
struct Armed;

impl Armed {
    fn arm(ms: i32) -> Self {
        // SAFETY: the timeout is registered by InitPostgres in every backend and worker
        unsafe { enable_timeout_after(STATEMENT_TIMEOUT, ms) };
        Armed
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        // SAFETY: disarming a timer that may or may not be pending is always allowed
        unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
    }
}

/// Run `f` as `role`. `restricted` adds SECURITY_RESTRICTED_OPERATION (for code that touches user
/// tables); without it the switch is a plain local user-id change (for queue work done on behalf
/// of a writer). Either way `search_path` is pinned while `f` runs, so nothing a user creates in a
/// writable schema can shadow what our statements call, and so is how keys are printed (floats
/// exactly, intervals in one style), so a key made in a session with other settings (a backfill
/// run by `watch()`) is the key the drain looks up.
pub fn run_as<R>(
    role: pg_sys::Oid,
    restricted: bool,
    f: impl FnOnce() -> Result<R, SidecarError>,
) -> Result<R, SidecarError> {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    let flag = if restricted { pg_sys::SECURITY_RESTRICTED_OPERATION } else { pg_sys::SECURITY_LOCAL_USERID_CHANGE };
    // SAFETY: the sequence vacuum.c uses: save, switch, open a GUC nest level for the pinned
    // search_path; undone below on success and by (sub)transaction abort on error.
    let nest_level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(role, saved_context | flag as i32);
        let level = pg_sys::NewGUCNestLevel();
        set_setting(c"search_path", PINNED_SEARCH_PATH, pg_sys::GucAction::GUC_ACTION_SAVE);
        set_setting(c"extra_float_digits", c"1", pg_sys::GucAction::GUC_ACTION_SAVE);
        set_setting(c"IntervalStyle", c"postgres", pg_sys::GucAction::GUC_ACTION_SAVE);
        level
    };
    // Inside another restricted operation (owner code that called back into us) the outer one's
    // timer and charge go on: arming (and then disarming) a timer of our own would end the outer
    // limit (review 5: owner code slept past it this way).
    let outermost = restricted && saved_context & pg_sys::SECURITY_RESTRICTED_OPERATION as i32 == 0;
    let limit = OWNER_CODE_LIMIT_MS.load(std::sync::atomic::Ordering::Relaxed);
    let armed = (outermost && limit > 0).then(|| Armed::arm(limit));
    let charged = outermost.then(|| Charged(std::time::Instant::now()));
    let result = f();
    drop(charged);
    drop(armed);
    // SAFETY: undoes exactly the switch above, in reverse order; `false` discards every setting
    // changed at this level or below (the pinned path and whatever the owner's code set)
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest_level);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
    }
    result
}

/// Set a user-settable setting to a value of ours (never a user's) inside a transaction.
fn set_setting(name: &std::ffi::CStr, value: &std::ffi::CStr, action: pg_sys::GucAction::Type) {
    // SAFETY: plain GUC assignment inside a transaction; our values parse
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            0,
            false,
        );
    }
}

/// Pin `search_path` until the end of the current transaction (`SET LOCAL`).
pub fn pin_search_path_local() {
    set_setting(c"search_path", PINNED_SEARCH_PATH, pg_sys::GucAction::GUC_ACTION_LOCAL);
}

/// The extension's owner (queue and registry work done on behalf of a writer runs as it).
pub fn extension_owner(client: &pgrx::spi::SpiClient<'_>) -> Result<pg_sys::Oid, SidecarError> {
    client
        .select("SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_embed_sidecar'", None, &[])?
        .first()
        .get_one::<pg_sys::Oid>()?
        .ok_or_else(|| SidecarError::Corrupt("pg_embed_sidecar has no row in pg_extension".into()))
}

/// Run `f` as the owner of a user's table, inside a security-restricted operation.
pub fn as_table_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    run_as(owner, true, f)
}

/// Releases, when dropped (also while an ERROR unwinds), the session-level advisory locks that a
/// table owner's code took in a session that is not the worker's (process(), the replica triggers
/// in the apply worker or a replica-mode session): nothing the owner's code does may stay in a
/// session that lives on, as PostgreSQL's VACUUM would leave nothing. The worker releases after
/// every phase itself (src/drain/mod.rs). Only when the session held no advisory lock before: one
/// it held cannot be told apart from one the owner's code took, so then they all stay.
pub struct OwnerLocks {
    release: bool,
}

impl OwnerLocks {
    /// Release after, if this session holds no session-level advisory lock now.
    pub fn release_after(client: &pgrx::spi::SpiClient<'_>) -> Result<Self, SidecarError> {
        let held = client
            .select(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_locks
                                 WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'advisory')",
                None,
                &[],
            )?
            .first()
            .get_one::<bool>()?
            .unwrap_or(true);
        Ok(OwnerLocks { release: !held })
    }

    /// Release nothing (no owner code runs).
    pub fn keep() -> Self {
        OwnerLocks { release: false }
    }
}

impl Drop for OwnerLocks {
    fn drop(&mut self) {
        if self.release {
            // SAFETY: releases this session's session-level advisory locks, none of them its own
            // (the session held none when the guard was made); it raises no error
            unsafe { pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID) };
        }
    }
}

/// The role the current user id stands for right now (inside a SECURITY DEFINER function: the
/// definer).
pub fn current_role() -> pg_sys::Oid {
    // SAFETY: reads a backend-global variable
    unsafe { pg_sys::GetUserId() }
}

// ---- who is calling ----
//
// Management and search functions are SECURITY DEFINER underneath (they write the registry and
// pgmq's schema), so inside them `current_user` is the extension's owner and the outer role
// (`GetOuterUserId`, the session's role after SET ROLE) is not who PostgreSQL would judge either:
// inside a SECURITY DEFINER function of role B, called by a superuser, PostgreSQL's own commands
// judge B, and inside the drain's security-restricted operation the outer role is the worker's
// superuser while the code running is the table owner's. So each public function is a thin
// SECURITY INVOKER wrapper that first calls `_enter()`, which records `GetUserId()` — the role
// PostgreSQL judges at that point — in `pg_embed_sidecar.caller`, scoped to the wrapper by its
// own `SET pg_embed_sidecar.caller = ''` clause; the definer body then asks `_calling_role()`.
// The value carries a keyed hash of the role, with a key only this backend knows, so setting
// the variable by hand (anyone may) forges nothing.

thread_local! {
    /// This backend's key for the caller mark: random, never shown.
    static CALLER_KEY: std::collections::hash_map::RandomState = std::collections::hash_map::RandomState::new();
}

fn caller_mark(role: pg_sys::Oid) -> String {
    use std::hash::BuildHasher;
    let mac = CALLER_KEY.with(|k| k.hash_one(("pg_embed_sidecar caller", role.to_u32())));
    format!("{}:{mac:016x}", role.to_u32())
}

fn refuse_in_restricted_operation() {
    // SAFETY: reads a backend-global variable
    if unsafe { pg_sys::InSecurityRestrictedOperation() } {
        SidecarError::Refused {
            code: pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            message: "cannot manage or search embeddings inside a security-restricted operation".into(),
            hint: "Triggers, index expressions and policies run by the drain, VACUUM or REFRESH MATERIALIZED VIEW \
                   act for the table's owner and may not call pg_embed_sidecar's functions.",
        }
        .report();
    }
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use super::{caller_mark, refuse_in_restricted_operation};
    use crate::error::SidecarError;

    /// Record the calling role for the function that calls this (see "who is calling" above).
    #[pg_extern(volatile, parallel_restricted, name = "_enter")]
    fn enter() -> bool {
        refuse_in_restricted_operation();
        set_caller(&caller_mark(super::current_role()));
        true
    }

    /// Refused inside a security-restricted operation, as the public functions are: for the
    /// PUBLIC helpers they call (`_fan_out` of search_shards), which a caller could call directly.
    #[pg_extern(volatile, parallel_restricted, name = "_outside_restricted")]
    fn outside_restricted() -> bool {
        refuse_in_restricted_operation();
        true
    }

    /// Forget the caller before code of others runs in the same function (the policies and
    /// operators a search's query runs): a definer function there must not be judged as the
    /// searcher. `set_config()` cannot do it: it returns the value, which only superusers may read.
    #[pg_extern(volatile, parallel_restricted, name = "_leave")]
    fn leave() -> bool {
        set_caller("");
        true
    }

    fn set_caller(mark: &str) {
        let mark = std::ffi::CString::new(mark).unwrap_or_default();
        super::set_setting(c"pg_embed_sidecar.caller", &mark, pg_sys::GucAction::GUC_ACTION_LOCAL);
    }

    /// The role that called the public function running now, as recorded by `_enter()`. Refused
    /// inside a security-restricted operation, and when no public function recorded a caller
    /// (an internal function called directly).
    #[pg_extern(stable, parallel_restricted, name = "_calling_role")]
    fn calling_role() -> pg_sys::Oid {
        refuse_in_restricted_operation();
        let mark = crate::gucs::caller();
        let role = mark.split(':').next().and_then(|r| r.parse::<u32>().ok()).map(pg_sys::Oid::from);
        match role.filter(|&r| caller_mark(r) == mark) {
            Some(role) => role,
            None => SidecarError::Refused {
                code: pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                message: "no caller recorded: call pg_embed_sidecar's public functions, not its internal ones".into(),
                hint: "Use embed_sidecar.watch(), unwatch(), search() and the other documented functions.",
            }
            .report(),
        }
    }

    /// The session's role (after SET ROLE): for the status view, which asks per row whether the
    /// reader may see a source's backlog and has no wrapper to record a caller.
    #[pg_extern(stable, parallel_safe, name = "_session_role")]
    fn session_role() -> pg_sys::Oid {
        refuse_in_restricted_operation();
        // SAFETY: reads a backend-global variable
        unsafe { pg_sys::GetOuterUserId() }
    }

    extension_sql_file!(
        "../../sql/registry.sql",
        name = "registry",
        requires = [calling_role, session_role, enter, leave]
    );
}
