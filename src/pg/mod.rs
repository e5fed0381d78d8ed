//! PostgreSQL mechanics the rest builds on: whose rights a step runs with (`authority`) and
//! transactions of our own in background workers (`xact`).

pub mod authority;
pub mod xact;
