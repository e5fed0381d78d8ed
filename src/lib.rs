//! pg_embed_sidecar: embeddings computed inside PostgreSQL, kept in step with their source rows.
//!
//! Reading order: `gucs` (settings) → `model` (the per-process embedder, over the pgrx-free
//! `embed_core` crate) → `api` (SQL functions) → sql/sidecar.sql (watch, triggers into pgmq,
//! status) → `drain` (queue → vectors, shared by `process()` and the worker) → `worker` →
//! `error` (how failures reach the user).

use pgrx::prelude::*;

mod api;
mod drain;
mod error;
mod gucs;
mod model;
mod worker;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    worker::register();
}

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
