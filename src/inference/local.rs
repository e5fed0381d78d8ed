//! Embedding in this process: the embedder of each model in use, loaded lazily on first use,
//! reused for every call, reloaded when a setting that shapes it or one of its files changes.
//! Used by sessions without the inference service and by the inference workers themselves. Only
//! this thread touches it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use embed_core::{Embedder, Interrupt, ModelFiles};

use super::Side;
use crate::error::SidecarError;
use crate::gucs::{embed_settings, EmbedSettings};

struct Loaded {
    settings: EmbedSettings,
    embedder: Embedder,
    /// Size and mtime of the ONNX, tokenizer and manifest files when loaded: a file replaced in
    /// place is a new model (a manifest edit can change the window, pooling or prefixes).
    stamp: Stamp,
}

/// ONNX file, tokenizer, manifest. The manifest may be absent (`None`); the other two may not.
type Stamp = [Option<(u64, SystemTime)>; 3];

/// Whether a stamp was taken from files that were all there (an absent manifest is fine).
fn complete(stamp: &Stamp) -> bool {
    stamp[..2].iter().all(Option::is_some)
}

/// Models one process keeps loaded at most.
const RESIDENT: usize = 3;

fn file_stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

fn files_stamp(files: &ModelFiles) -> Stamp {
    [file_stamp(&files.onnx), file_stamp(&files.tokenizer), file_stamp(&files.dir.join(embed_core::MANIFEST))]
}

thread_local! {
    static LOADED: RefCell<Vec<Loaded>> = const { RefCell::new(Vec::new()) };
    /// Model files resolved without loading the model (the service's model ids, the chunker's
    /// tokenizer), per model directory, with the files' stamps they were resolved from.
    static FILES: RefCell<HashMap<PathBuf, (Stamp, ModelFiles)>> = RefCell::new(HashMap::new());
}

/// A directory name, no longer than the inference service's ring carries (`ring::MODEL_MAX`
/// bytes): a longer one would be cut there, and two models sharing their first bytes mixed up.
pub fn validate_model_name(name: &str) -> Result<(), SidecarError> {
    let ok = !name.is_empty()
        && name.len() <= super::ring::MODEL_MAX
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(SidecarError::BadModelName(name.to_string()))
    }
}

/// Run `f` with the embedder of `model` (default: `pg_embed_sidecar.model`), loading it if needed;
/// `threads` overrides `pg_embed_sidecar.intra_threads` (the inference workers use
/// `inference_threads`). Up to `RESIDENT` models stay loaded, the least recently used one making
/// room: a model switch drains with two models at once (the current and the shadow sidecar's),
/// and swapping one for the other on every pass would cost a model load each time.
pub fn with_model<R>(
    model: Option<&str>,
    threads: Option<usize>,
    f: impl FnOnce(&mut Embedder) -> Result<R, SidecarError>,
) -> Result<R, SidecarError> {
    let mut settings = embed_settings(model);
    if let Some(n) = threads {
        settings.intra_threads = n;
    }
    validate_model_name(&settings.model)?;
    LOADED.with(|cell| {
        let mut loaded = cell.borrow_mut();
        let found = loaded.iter().position(|l| l.settings.model == settings.model);
        let fresh = found
            .filter(|&i| loaded[i].settings == settings && files_stamp(loaded[i].embedder.files()) == loaded[i].stamp);
        let at = match fresh {
            Some(i) => i,
            None => {
                // drop what is replaced or evicted before loading, so memory never holds both
                if let Some(i) = found {
                    loaded.remove(i);
                } else if loaded.len() >= RESIDENT {
                    loaded.remove(0);
                }
                // ONNX Runtime starts its threads here (the environment's on the first load, the
                // session's pool): they must never take this process's signals
                let embedder = super::with_signals_blocked(|| {
                    Embedder::load(&settings.library, &settings.model_dir, settings.load_options())
                })?;
                let stamp = files_stamp(embedder.files());
                if !complete(&stamp) {
                    // the files went away while they were being read: without a stamp the next
                    // call could not notice, so this is not a usable model
                    return Err(embed_core::EmbedError::ModelFileMissing(settings.model_dir).into());
                }
                loaded.push(Loaded { settings, embedder, stamp });
                loaded.len() - 1
            }
        };
        // most recently used last (moved before the call: a cancel unwinding out of `f` keeps it)
        let entry = loaded.remove(at);
        loaded.push(entry);
        let last = loaded.len() - 1;
        f(&mut loaded[last].embedder)
    })
}

/// Embed `texts` in input order with `model` in this process, as `side` (its prefix taken from
/// the files of the very embedder used, so prefix and model always agree; `None`: the texts come
/// prefixed already, as the inference workers get them). The interrupt check may raise (cancel,
/// statement_timeout): that unwinds out of the embedder between two batches, which leaves it
/// intact for the next call.
pub fn embed(
    model: Option<&str>,
    side: Option<Side>,
    texts: &[&str],
    threads: Option<usize>,
) -> Result<Vec<Vec<f32>>, SidecarError> {
    with_model(model, threads, |e| {
        let shaped = side.and_then(|s| s.shape(e.files(), texts));
        let check = &mut || {
            pgrx::check_for_interrupts!();
        };
        Ok(match &shaped {
            Some(prefixed) => e.embed_checked(prefixed, check)?,
            None => e.embed_checked(texts, check)?,
        })
    })
}

/// Like [`embed`] for texts that come prefixed (the inference workers), stopped within one graph
/// node when another thread raises `interrupt`: `EmbedError::Interrupted`. The caller resets it.
pub fn embed_interruptible(
    model: &str,
    texts: &[&str],
    threads: Option<usize>,
    interrupt: &Interrupt,
) -> Result<Vec<Vec<f32>>, SidecarError> {
    with_model(Some(model), threads, |e| {
        let check = &mut || {
            pgrx::check_for_interrupts!();
        };
        Ok(e.embed_interruptible(texts, check, interrupt)?)
    })
}

/// A named model's files, resolved again (and the model id hashed again) only when they change.
pub fn model_files(model: &str) -> Result<ModelFiles, SidecarError> {
    let settings = embed_settings(Some(model));
    validate_model_name(&settings.model)?;
    FILES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((stamp, files)) = cache.get(&settings.model_dir) {
            if complete(stamp) && files_stamp(files) == *stamp {
                return Ok(files.clone());
            }
        }
        let files = ModelFiles::resolve(&settings.model_dir)?;
        cache.insert(settings.model_dir.clone(), (files_stamp(&files), files.clone()));
        Ok(files)
    })
}
