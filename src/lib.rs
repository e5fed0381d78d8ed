//! pg_embed_sidecar: embeddings computed inside PostgreSQL, kept in step with their source rows.
//!
//! One text's way, in folder order: sql/triggers.sql + `enqueue` (a writer's changed keys onto
//! the source's pgmq queue) → `drain/` (a pass: read the queue, look the rows up, embed, write the
//! sidecar; its decisions in `drain/settle`, its SQL in sql/drain.sql, long texts cut by
//! `drain/chunking`) → `inference/` (in this process, or through the ring to the instance's
//! inference workers) → the sidecar. Around it: `bgw/` (the launcher and one drain worker per
//! database), `roster/` (which worker serves which database, commit wake-ups, DROP DATABASE),
//! `pg/` (whose rights each step runs with, the workers' transactions, reading our rows).
//! One query's way: sql/search.sql (its filter checked by `search_filter`) → `api` (`_embed_query`) →
//! `inference/`. What is watched and
//! how: sql/registry.sql, sql/watch.sql, sql/switch.sql, sql/operations.sql, sql/status.sql.
//! Settings in `gucs` (imports nothing of ours), failures in `error`.

use pgrx::prelude::*;

mod adopt;
mod api;
mod bgw;
mod drain;
mod enqueue;
mod error;
mod gucs;
mod inference;
mod pg;
mod replica;
mod roster;
mod search_filter;

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
extension_sql_file!("../sql/watch.sql", name = "watch", requires = ["registry", "queues", "triggers", "drain_sql"]);
extension_sql_file!("../sql/switch.sql", name = "switch", requires = ["watch"]);
extension_sql_file!("../sql/operations.sql", name = "operations", requires = ["watch"]);
extension_sql_file!("../sql/events.sql", name = "events", requires = ["watch", "switch"]);
extension_sql_file!("../sql/shards.sql", name = "shards", requires = ["registry", "replica", "search", "api"]);
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
