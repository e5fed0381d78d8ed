//! PostgreSQL mechanics the rest builds on: whose rights a step runs with (`authority`) and
//! transactions of our own in background workers (`xact`), rows of our own queries (`row`).

pub mod authority;
pub mod compat;
pub mod row;
pub mod xact;
