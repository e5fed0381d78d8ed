//! Stopping an inference call from another thread. ONNX Runtime checks a run's terminate flag
//! between two graph nodes, so a raised interrupt ends the run within one node's time (a few
//! milliseconds even for a window-long batch), where waiting for the call would take the whole
//! batch. The inference worker raises it when a search arrives during a drain round, serves the
//! search, and embeds the drain texts again (src/inference/worker.rs).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ort::session::RunOptions;

use crate::runtime::init_runtime;
use crate::EmbedError;

/// Shared by the thread that runs the embedder and the one that may stop it (cheap to clone).
#[derive(Clone)]
pub struct Interrupt {
    options: Arc<RunOptions>,
    /// Ours, beside ONNX Runtime's flag: a failed run is an interrupt only when this is set, and
    /// a call checks it between batches without entering a run at all.
    raised: Arc<AtomicBool>,
}

impl Interrupt {
    /// ONNX Runtime must be loaded to make run options: `library` as for [`crate::Embedder::load`].
    pub fn new(library: &Path) -> Result<Self, EmbedError> {
        init_runtime(library)?;
        let options = RunOptions::new().map_err(|e| EmbedError::Inference(e.to_string()))?;
        Ok(Self { options: Arc::new(options), raised: Arc::new(AtomicBool::new(false)) })
    }

    /// Stop the current call of an embedder that was given this interrupt (from any thread).
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        // (fails only if ONNX Runtime cannot set a flag; the check between batches still stops
        // the call at the next batch)
        let _ = self.options.terminate();
    }

    /// Clear it for the next call. Only while no call that uses it runs.
    pub fn reset(&self) {
        self.raised.store(false, Ordering::Release);
        let _ = self.options.unterminate();
    }

    pub fn raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    pub(crate) fn run_options(&self) -> &RunOptions {
        &self.options
    }
}
