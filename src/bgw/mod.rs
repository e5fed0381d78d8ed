//! The background workers that connect to databases: the launcher (one per instance, starts and
//! stops the others) and the drain workers (one per database with the extension). The inference
//! workers, which connect to none, live with the ring in src/inference/.

pub mod drain_worker;
pub mod launcher;
