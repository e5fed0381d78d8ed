//! The background workers that connect to databases: the launcher (one per instance, starts and
//! stops the others), the drain workers (one per database with the extension) and the index
//! builders they start. The inference workers, which connect to none, live with the ring in
//! src/inference/.

pub mod drain_worker;
pub mod index_builder;
pub mod launcher;

// Postgres' `die` itself, the SIGTERM handler of processes connected to a database: pgrx's binding
// wraps it for calls from Rust, which a signal handler must not go through.
extern "C-unwind" {
    fn die(signal: std::ffi::c_int);
}
