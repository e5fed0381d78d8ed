//! ONNX Runtime is loaded with dlopen from a path the user controls (`load-dynamic`), once per
//! process: the library cannot be swapped inside a running process, so later calls with another
//! path keep the first library.

use std::path::Path;
use std::sync::OnceLock;

use ort::environment::Environment;

use crate::EmbedError;

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();

/// Load the ONNX Runtime shared library and create the process-wide environment.
pub fn init_runtime(library: &Path) -> Result<Environment, EmbedError> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env.clone());
    }
    let err = |reason: String| EmbedError::Runtime { path: library.to_path_buf(), reason };
    if !library.is_file() {
        return Err(err("file not found".into()));
    }
    let env = ort::init_from(library)
        .map_err(|e| err(e.to_string()))?
        .with_name("pg_embed_sidecar")
        .with_telemetry(false)
        .build()
        .map_err(|e| err(e.to_string()))?;
    Ok(ENVIRONMENT.get_or_init(|| env).clone())
}
