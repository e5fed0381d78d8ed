//! Embedding for this process. With the inference service (preloaded, `inference = shared`) the
//! texts go to the instance's inference workers (src/service.rs) and nothing is loaded here;
//! otherwise — and inside an inference worker — this process holds the embedder itself: loaded
//! lazily on first use, reused for every call, reloaded when a setting that shapes it changes.
//! Only this thread touches it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use embed_core::{Embedder, ModelFiles};

pub mod client;
pub mod worker;

use crate::error::SidecarError;
use crate::gucs::{embed_settings, EmbedSettings};
use client::Priority;

struct Loaded {
    settings: EmbedSettings,
    embedder: Embedder,
    /// Size and mtime of the ONNX and tokenizer files when loaded: a file replaced in place is a
    /// new model.
    stamp: Stamp,
}

type Stamp = [Option<(u64, SystemTime)>; 2];

/// Models one process keeps loaded at most.
const RESIDENT: usize = 3;

fn file_stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

fn files_stamp(embedder: &Embedder) -> Stamp {
    let files = embedder.files();
    [file_stamp(&files.onnx), file_stamp(&files.tokenizer)]
}

thread_local! {
    static LOADED: RefCell<Vec<Loaded>> = const { RefCell::new(Vec::new()) };
    /// Texts run through the model by this process: lets tests prove a query is embedded once.
    static TEXTS_EMBEDDED: Cell<i64> = const { Cell::new(0) };
    /// The last single text embedded and its vector. `embed_text` is STABLE (it depends on
    /// settings), so a plan that evaluates `embed_text('query')` per row hits this memo instead
    /// of the model.
    static LAST: RefCell<Option<(String, String, Vec<f32>)>> = const { RefCell::new(None) };
    /// Model files resolved without loading the model (the service's model ids, the chunker's
    /// tokenizer), per model directory, with the files' stamps they were resolved from.
    static FILES: RefCell<HashMap<PathBuf, (Stamp, ModelFiles)>> = RefCell::new(HashMap::new());
    /// Model ids the inference service was seen to load (`ensure_loadable`).
    static LOADABLE: RefCell<std::collections::HashSet<String>> = RefCell::new(std::collections::HashSet::new());
}

fn validate_model_name(name: &str) -> Result<(), SidecarError> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(SidecarError::BadModelName(name.to_string()))
    }
}

/// Run `f` with this process's embedder for the session's model, loading it first if needed.
pub fn with_embedder<R>(f: impl FnOnce(&mut Embedder) -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    with_model(None, f)
}

/// Run `f` with the embedder of `model` (default: `pg_embed_sidecar.model`), loading it if needed.
/// Up to `RESIDENT` models stay loaded, the least recently used one making room: a model switch
/// drains with two models at once (the current and the shadow sidecar's), and swapping one
/// session for the other on every pass would cost a model load each time.
fn with_model<R>(model: Option<&str>, f: impl FnOnce(&mut Embedder) -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    let settings = embed_settings(model);
    validate_model_name(&settings.model)?;
    LOADED.with(|cell| {
        let mut loaded = cell.borrow_mut();
        let found = loaded.iter().position(|l| l.settings.model == settings.model);
        let fresh = found.filter(|&i| loaded[i].settings == settings && files_stamp(&loaded[i].embedder) == loaded[i].stamp);
        let at = match fresh {
            Some(i) => i,
            None => {
                // drop what is replaced or evicted before loading, so memory never holds both
                if let Some(i) = found {
                    loaded.remove(i);
                } else if loaded.len() >= RESIDENT {
                    loaded.remove(0);
                }
                let embedder = Embedder::load(&settings.library, &settings.model_dir, settings.load_options())?;
                let stamp = files_stamp(&embedder);
                if stamp.iter().any(Option::is_none) {
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

/// Embed many texts in input order with the session's model, counting them.
pub fn embed_many(texts: &[&str]) -> Result<Vec<Vec<f32>>, SidecarError> {
    embed_many_inner(None, texts, Priority::Interactive)
}

/// Embed many texts with a named model for a drain (the service serves searches first).
pub fn embed_many_with(model: &str, texts: &[&str]) -> Result<Vec<Vec<f32>>, SidecarError> {
    start_many_with(model, texts).wait()
}

fn model_name(model: Option<&str>) -> Result<String, SidecarError> {
    let name = embed_settings(model).model;
    validate_model_name(&name)?;
    Ok(name)
}

fn embed_many_inner(model: Option<&str>, texts: &[&str], priority: Priority) -> Result<Vec<Vec<f32>>, SidecarError> {
    start(model, texts, priority).wait()
}

/// Texts on their way through the model: with the service they are embedded by another process
/// while this one goes on until `wait()`; without it they were embedded by `start` itself.
pub enum Started {
    Service(client::Pending),
    Done(Result<Vec<Vec<f32>>, SidecarError>),
}

impl Started {
    pub fn wait(self) -> Result<Vec<Vec<f32>>, SidecarError> {
        let vectors = match self {
            Started::Service(pending) => pending.collect()?,
            Started::Done(result) => result?,
        };
        TEXTS_EMBEDDED.with(|c| c.set(c.get() + vectors.len() as i64));
        Ok(vectors)
    }
}

/// Start embedding texts with a named model for a drain (the service serves searches first).
pub fn start_many_with(model: &str, texts: &[&str]) -> Started {
    start(Some(model), texts, Priority::Drain)
}

fn start(model: Option<&str>, texts: &[&str], priority: Priority) -> Started {
    if client::usable() {
        return match model_name(model).and_then(|name| client::submit(&name, texts, priority)) {
            Ok(pending) => Started::Service(pending),
            Err(e) => Started::Done(Err(e)),
        };
    }
    // the interrupt check may raise (cancel, statement_timeout): that unwinds out of the
    // embedder between two batches, which leaves it intact for the next call
    Started::Done(with_model(model, |e| {
        Ok(e.embed_checked(texts, &mut || {
            pgrx::check_for_interrupts!();
        })?)
    }))
}

/// Embed one text with `model` (default: the session's), answering a repeat of the previous
/// text from the memo.
pub fn embed_one_with(model: Option<&str>, text: &str) -> Result<Vec<f32>, SidecarError> {
    embed_one_as(model, None, text)
}

/// Embed a search query with `model`, whose vectors in the sidecar were made by `model_id`: if
/// the model's files have changed since (replaced in place, the source not re-embedded yet), the
/// query would be ranked against another model's vectors, so it is refused instead.
pub fn embed_query(model: &str, model_id: &str, text: &str) -> Result<Vec<f32>, SidecarError> {
    embed_one_as(Some(model), Some(model_id), text)
}

fn embed_one_as(model: Option<&str>, expected: Option<&str>, text: &str) -> Result<Vec<f32>, SidecarError> {
    let id = if client::usable() {
        model_id_of(&model_name(model)?)?
    } else {
        with_model(model, |e| Ok(e.model_id().to_string()))?
    };
    if let Some(expected) = expected.filter(|&e| e != id) {
        return Err(SidecarError::Refused {
            code: pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            message: format!("the files of model \"{}\" changed since its vectors were made ({expected}, now {id})", model.unwrap_or("")),
            hint: "The drain re-embeds the rows when it next runs (unless the source is paused); embed_sidecar.reembed() starts it now.",
        });
    }
    let hit = LAST.with(|m| match &*m.borrow() {
        Some((last_id, t, v)) if *last_id == id && t == text => Some(v.clone()),
        _ => None,
    });
    if let Some(v) = hit {
        return Ok(v);
    }
    let v = embed_many_inner(model, &[text], Priority::Interactive)?.pop().unwrap_or_default();
    LAST.with(|m| *m.borrow_mut() = Some((id, text.to_string(), v.clone())));
    Ok(v)
}

/// The id of a named model's current files. With the service, read from the files (hashed again
/// only when they change) instead of loading the model here.
pub fn model_id_of(model: &str) -> Result<String, SidecarError> {
    if !client::usable() {
        return with_model(Some(model), |e| Ok(e.model_id().to_string()));
    }
    Ok(model_files(model)?.model_id)
}

/// A named model's files, resolved again (and the model id hashed again) only when they change.
pub fn model_files(model: &str) -> Result<ModelFiles, SidecarError> {
    let settings = embed_settings(Some(model));
    validate_model_name(&settings.model)?;
    FILES.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((stamp, files)) = cache.get(&settings.model_dir) {
            if stamp.iter().all(Option::is_some) && [file_stamp(&files.onnx), file_stamp(&files.tokenizer)] == *stamp {
                return Ok(files.clone());
            }
        }
        let f = ModelFiles::resolve(&settings.model_dir)?;
        let stamp = [file_stamp(&f.onnx), file_stamp(&f.tokenizer)];
        cache.insert(settings.model_dir.clone(), (stamp, f.clone()));
        Ok(f)
    })
}

/// Make sure the model with files `model_id` loads before a drain reads any message for it, so a
/// missing or corrupt file costs no attempts. Without the service `model_id_of` has loaded it
/// already; with it, only the files were hashed, so one text goes through the service, once per
/// model id and process (a file replaced in place is a new id and is checked again).
pub fn ensure_loadable(model: &str, model_id: &str) -> Result<(), SidecarError> {
    if !client::usable() || LOADABLE.with(|ids| ids.borrow().contains(model_id)) {
        return Ok(());
    }
    client::embed(model, &["loadable"], Priority::Drain)?;
    LOADABLE.with(|ids| ids.borrow_mut().insert(model_id.to_string()));
    Ok(())
}

/// `(model_id, dims)` of a named model.
pub fn identity_of(model: &str) -> Result<(String, i32), SidecarError> {
    if !client::usable() {
        return with_model(Some(model), |e| Ok((e.model_id().to_string(), e.dims() as i32)));
    }
    let dims = client::embed(model, &["dimensions"], Priority::Interactive)?.pop().unwrap_or_default().len();
    Ok((model_id_of(model)?, dims as i32))
}

pub fn texts_embedded() -> i64 {
    TEXTS_EMBEDDED.with(|c| c.get())
}
