//! The inference core of pg_embed_sidecar, kept free of pgrx so it can be unit-tested with plain
//! `cargo test` and reused by the benchmark's "ceiling" binary (raw ONNX Runtime, no Postgres).
//!
//! One text travels: `model_dir` finds the files → `runtime` loads ONNX Runtime once per process →
//! `embedder` tokenises, batches by length, runs the session → `pooling` turns token states into
//! one unit-length vector.

// Everything unsafe (FFI, shared memory) lives in the extension crate; this one has none.
#![forbid(unsafe_code)]

mod batching;
mod chunker;
mod embedder;
mod error;
mod interrupt;
mod model_dir;
mod pooling;
mod runtime;
mod window_cut;

pub use chunker::{content_hash, Chunk, Chunker};
pub use embedder::{Embedder, LoadOptions};
pub use error::EmbedError;
pub use interrupt::Interrupt;
pub use model_dir::{ModelFiles, Pooling, MANIFEST};
pub use pooling::{cosine, l2_normalize, mean_pool};
pub use runtime::init_runtime;
pub use window_cut::{cut_at_char_boundary, WindowTokenizer};
