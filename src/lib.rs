//! pg_embed_sidecar: embeddings computed inside PostgreSQL, kept in step with their source rows.
//!
//! Reading order: `gucs` (settings) → `inference` (embedding: in this process over the pgrx-free
//! `embed_core` crate, or through the instance's inference service) → `api` (SQL functions) → sql/registry.sql (what is watched) →
//! sql/manage.sql (watch & co.) → sql/triggers.sql + `enqueue` (changed keys onto pgmq) →
//! `drain` (queue → vectors, shared by `process()` and the worker; its decisions in `settle`,
//! its SQL in sql/drain.sql, long texts cut into passages by `chunking`) → `authority` (whose
//! rights each step runs with) → `xact` →
//! `roster` (which worker serves which database) → `launcher` → `worker` → `wake` (commit →
//! worker latch, CREATE EXTENSION → launcher) → `db_guard` (DROP DATABASE with a worker) →
//! sql/status.sql → `error` (how failures reach the user).

use pgrx::prelude::*;

mod api;
mod bgw;
mod drain;
mod enqueue;
mod error;
mod gucs;
mod inference;
mod pg;
mod roster;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    roster::init();
    inference::ring::init();
    inference::worker::register();
    bgw::launcher::register();
    roster::db_guard::install();
}

// Hand-written SQL, in dependency order (each file says what it holds).
extension_sql_file!("../sql/drain.sql", name = "drain_sql", requires = ["registry"]);
extension_sql_file!("../sql/queues.sql", name = "queues", requires = ["registry"]);
extension_sql_file!("../sql/manage.sql", name = "manage", requires = ["registry", "queues", "triggers", "drain_sql"]);
extension_sql_file!("../sql/events.sql", name = "events", requires = ["manage"]);
extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
