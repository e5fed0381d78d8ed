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
//! Restoring on error needs nothing here: aborting the (sub)transaction puts the user id, the
//! security context and the GUC nest level back, exactly as for VACUUM.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::SidecarError;

const PINNED_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// Run `f` as `role`. `restricted` adds SECURITY_RESTRICTED_OPERATION (for code that touches user
/// tables); without it the switch is a plain local user-id change (for queue work done on behalf
/// of a writer). Either way `search_path` is pinned while `f` runs, so nothing a user creates in a
/// writable schema can shadow what our statements call.
pub fn run_as<R>(role: pg_sys::Oid, restricted: bool, f: impl FnOnce() -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    let mut saved_user = pg_sys::InvalidOid;
    let mut saved_context = 0;
    let flag = if restricted { pg_sys::SECURITY_RESTRICTED_OPERATION } else { pg_sys::SECURITY_LOCAL_USERID_CHANGE };
    // SAFETY: the sequence vacuum.c uses: save, switch, open a GUC nest level for the pinned
    // search_path; undone below on success and by (sub)transaction abort on error.
    let nest_level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(role, saved_context | flag as i32);
        let level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            PINNED_SEARCH_PATH.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        level
    };
    let result = f();
    // SAFETY: undoes exactly the switch above, in reverse order
    unsafe {
        pg_sys::AtEOXact_GUC(true, nest_level);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
    }
    result
}

/// Run `f` as the owner of a user's table, inside a security-restricted operation.
pub fn as_table_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    run_as(owner, true, f)
}

/// The role the current user id stands for right now (inside a SECURITY DEFINER function: the
/// definer).
pub fn current_role() -> pg_sys::Oid {
    // SAFETY: reads a backend-global variable
    unsafe { pg_sys::GetUserId() }
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    /// The role the session acts as outside any SECURITY DEFINER function: the login role, or the
    /// role chosen with SET ROLE (a pooler such as PostgREST's authenticator switches roles that
    /// way). Management functions check ownership against it: `session_user` would be the pooler's
    /// login and `current_user` inside them is the definer.
    #[pg_extern(stable, parallel_safe, name = "_calling_role")]
    fn calling_role() -> pg_sys::Oid {
        // SAFETY: reads a backend-global variable
        unsafe { pg_sys::GetOuterUserId() }
    }

    extension_sql_file!("../sql/registry.sql", name = "registry", requires = [calling_role]);
}
