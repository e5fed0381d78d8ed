//! Embedding, as every other module asks for it. Each call goes one of two ways, chosen in one
//! place (`through_service`): to the instance's inference service — texts into the shared ring
//! (`ring`, `client`), embedded by the inference workers (`worker`), nothing loaded here — when
//! the library is preloaded and `pg_embed_sidecar.inference = shared`; otherwise in this process
//! (`local`). The inference workers themselves always embed locally.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::time::{Duration, Instant};

use embed_core::{Embedder, ModelFiles};

use crate::error::SidecarError;
use crate::gucs;

pub mod client;
mod local;
pub mod ring;
pub mod worker;

use ring::{Priority, Ring};

/// `LAST`: (model id, side, text) and the text's vector.
type Memo = (String, Side, String, Vec<f32>);

thread_local! {
    /// Texts run through the model by this process: lets tests prove a query is embedded once.
    static TEXTS_EMBEDDED: Cell<i64> = const { Cell::new(0) };
    /// The last single text embedded, by model id and side, and its vector. `embed_text` is
    /// STABLE (it depends on settings), so a plan that evaluates `embed_text('query')` per row
    /// hits this memo instead of the model. (The side is part of the key: with a prefixed model
    /// a query and a passage of the same text are different vectors.)
    static LAST: RefCell<Option<Memo>> = const { RefCell::new(None) };
    /// Model ids the inference service was seen to load (`ensure_loadable`).
    static LOADABLE: RefCell<HashSet<String>> = RefCell::new(HashSet::new());
}

/// Which end of a search a text is on. A model's manifest may ask for a prefix before each
/// (`query_prefix`, `passage_prefix`; e5 wants "query: " and "passage: "): every text embedded
/// here has a side, and `Side::shape` is the one place its prefix goes on, for local embedding
/// (src/inference/local.rs) and for the service (`start`) alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A search query (search(), hybrid_search(), embed_query()).
    Query,
    /// A document or passage: what the drain stores in a sidecar, embed_text(), embed_texts().
    Passage,
}

impl Side {
    /// This side's prefix for a model, if its manifest sets a non-empty one.
    pub fn prefix(self, files: &ModelFiles) -> Option<&str> {
        match self {
            Side::Query => files.query_prefix.as_deref(),
            Side::Passage => files.passage_prefix.as_deref(),
        }
        .filter(|p| !p.is_empty())
    }

    /// `texts` as the model must see them on this side, or `None` when they go as they are.
    pub fn shape(self, files: &ModelFiles, texts: &[&str]) -> Option<Vec<String>> {
        let prefix = self.prefix(files)?;
        Some(texts.iter().map(|t| format!("{prefix}{t}")).collect())
    }
}

/// The ring, when this call should embed through the service: preloaded, the service chosen, and
/// the files the workers load from are the configured ones (a superuser who points this session
/// at other files gets them loaded locally, as without preloading).
fn through_service() -> Option<Ring> {
    Ring::attached().filter(|_| gucs::inference_shared() && gucs::paths_as_configured())
}

/// Run `f` with this process's embedder for the session's model (`embed_sidecar.model_info`).
pub fn with_embedder<R>(f: impl FnOnce(&mut Embedder) -> Result<R, SidecarError>) -> Result<R, SidecarError> {
    local::with_model(None, None, f)
}

/// Embed many documents (`Side::Passage`) in input order with the session's model, counting them.
pub fn embed_many(texts: &[&str]) -> Result<Vec<Vec<f32>>, SidecarError> {
    start(None, Side::Passage, texts, Priority::Interactive).wait()
}

fn model_name(model: Option<&str>) -> Result<String, SidecarError> {
    let name = gucs::embed_settings(model).model;
    local::validate_model_name(&name)?;
    Ok(name)
}

/// Texts on their way through the model: with the service they are embedded by another process
/// while this one goes on until `wait()`; without it they were embedded by `start` itself (in the
/// time given).
pub enum InFlight {
    Service(client::Pending),
    Done(Result<Vec<Vec<f32>>, SidecarError>, Duration),
}

impl InFlight {
    pub fn wait(self) -> Result<Vec<Vec<f32>>, SidecarError> {
        self.wait_timed().map(|(vectors, _)| vectors)
    }

    /// Like `wait`, with the inference time these texts took: the workers' time on them through
    /// the service (not the time they queued behind other rounds), this process's own otherwise.
    pub fn wait_timed(self) -> Result<(Vec<Vec<f32>>, Duration), SidecarError> {
        let (vectors, spent) = match self {
            InFlight::Service(pending) => pending.collect_timed()?,
            InFlight::Done(result, spent) => (result?, spent),
        };
        TEXTS_EMBEDDED.with(|c| c.set(c.get() + vectors.len() as i64));
        Ok((vectors, spent))
    }
}

/// Start embedding a sidecar's texts (`Side::Passage`) with a named model for a drain (the
/// service serves searches first).
pub fn start_for_drain(model: &str, texts: &[&str]) -> InFlight {
    start(Some(model), Side::Passage, texts, Priority::Drain)
}

/// Whether the inference service could take `n` texts of a session right now: the service is
/// what this session embeds through, a worker is alive and `n` interactive slots are free. Never
/// loads a model or waits.
pub fn room_now(n: usize) -> bool {
    through_service().is_some_and(|ring| client::room(ring, n, Priority::Interactive))
}

/// Start embedding a sidecar's texts (`Side::Passage`) with a named model through the inference
/// service, as a session does, only if the service has a free slot for each of them right now:
/// `None` otherwise, and without the service (a session never loads a model for this). The answers
/// are waited for at most `limit`.
pub fn start_now(model: &str, texts: &[&str], limit: std::time::Duration) -> Result<Option<InFlight>, SidecarError> {
    let Some(ring) = through_service() else { return Ok(None) };
    let name = model_name(Some(model))?;
    let texts = for_service(&name, Side::Passage, texts)?;
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    Ok(client::submit_now(ring, &name, &texts, Priority::Interactive, limit)?.map(InFlight::Service))
}

/// `texts` as the service must get them: the workers embed what they are given, so the side's
/// prefix goes on here.
fn for_service(name: &str, side: Side, texts: &[&str]) -> Result<Vec<String>, SidecarError> {
    Ok(side.shape(&local::model_files(name)?, texts).unwrap_or_else(|| texts.iter().map(|t| t.to_string()).collect()))
}

fn start(model: Option<&str>, side: Side, texts: &[&str], priority: Priority) -> InFlight {
    match through_service() {
        Some(ring) => {
            let submitted = model_name(model).and_then(|name| {
                let texts = for_service(&name, side, texts)?;
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                client::submit(ring, &name, &texts, priority)
            });
            match submitted {
                Ok(pending) => InFlight::Service(pending),
                Err(e) => InFlight::Done(Err(e), Duration::ZERO),
            }
        }
        None => {
            let began = Instant::now();
            let result = local::embed(model, Some(side), texts, None);
            InFlight::Done(result, began.elapsed())
        }
    }
}

/// Embed one text as `side` with `model` (default: the session's), answering a repeat of the
/// previous text from the memo.
pub fn embed_one(model: Option<&str>, side: Side, text: &str) -> Result<Vec<f32>, SidecarError> {
    embed_one_as(model, None, side, text)
}

/// Embed a search query with `model`, whose vectors in the sidecar were made by `model_id`: if
/// the model's files have changed since (replaced in place, the source not re-embedded yet), the
/// query would be ranked against another model's vectors, so it is refused instead.
pub fn embed_query(model: &str, model_id: &str, text: &str) -> Result<Vec<f32>, SidecarError> {
    embed_one_as(Some(model), Some(model_id), Side::Query, text)
}

fn embed_one_as(model: Option<&str>, expected: Option<&str>, side: Side, text: &str) -> Result<Vec<f32>, SidecarError> {
    let id = match through_service() {
        Some(_) => model_id_of(&model_name(model)?)?,
        None => local::with_model(model, None, |e| Ok(e.model_id().to_string()))?,
    };
    if let Some(expected) = expected.filter(|&e| e != id) {
        return Err(SidecarError::Refused {
            code: pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            message: format!("the files of model \"{}\" changed since its vectors were made ({expected}, now {id})", model.unwrap_or("")),
            hint: "The drain re-embeds the rows when it next runs (unless the source is paused); embed_sidecar.reembed() starts it now.",
        });
    }
    let hit = LAST.with(|m| match &*m.borrow() {
        Some((last_id, last_side, t, v)) if *last_id == id && *last_side == side && t == text => Some(v.clone()),
        _ => None,
    });
    if let Some(v) = hit {
        return Ok(v);
    }
    let v = start(model, side, &[text], Priority::Interactive).wait()?.pop().unwrap_or_default();
    LAST.with(|m| *m.borrow_mut() = Some((id, side, text.to_string(), v.clone())));
    Ok(v)
}

/// The id of a named model's current files. With the service, read from the files (hashed again
/// only when they change) instead of loading the model here.
pub fn model_id_of(model: &str) -> Result<String, SidecarError> {
    match through_service() {
        Some(_) => Ok(local::model_files(model)?.model_id),
        None => local::with_model(Some(model), None, |e| Ok(e.model_id().to_string())),
    }
}

/// A named model's files (the chunker's tokenizer), without loading the model.
pub fn model_files(model: &str) -> Result<ModelFiles, SidecarError> {
    local::model_files(model)
}

/// Make sure the model with files `model_id` loads before a drain reads any message for it, so a
/// missing or corrupt file costs no attempts. Without the service `model_id_of` has loaded it
/// already; with it, only the files were hashed, so one text goes through the service, once per
/// model id and process (a file replaced in place is a new id and is checked again).
pub fn ensure_loadable(model: &str, model_id: &str) -> Result<(), SidecarError> {
    let Some(ring) = through_service() else { return Ok(()) };
    if LOADABLE.with(|ids| ids.borrow().contains(model_id)) {
        return Ok(());
    }
    client::submit(ring, model, &["loadable"], Priority::Drain)?.collect()?;
    LOADABLE.with(|ids| ids.borrow_mut().insert(model_id.to_string()));
    Ok(())
}

/// Run `f` with every signal blocked in this thread (its mask restored after). Threads started
/// meanwhile inherit the mask and keep it. Every thread ONNX Runtime starts (its environment's,
/// each session's pool) and the inference worker's watching thread are started this way: a signal
/// sent to the process is then always taken by the main thread, the only one Postgres' handlers
/// may run on. pgrx's handlers (the background workers' SIGHUP and SIGTERM) abort the whole
/// process when they run on another thread ("postgres FFI may not be called from multiple
/// threads"), and the postmaster then resets the instance; C handlers there would touch
/// Postgres' state from a thread it does not know. (A signal that comes while the main thread
/// blocks it waits until the mask is restored.)
pub(crate) fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain libc calls on sigset_t values owned here; the old mask is restored below
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        // restored however `f` ends (an ERROR raised inside unwinds through here)
        struct Restore(libc::sigset_t);
        impl Drop for Restore {
            fn drop(&mut self) {
                // SAFETY: restores the mask saved above
                unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
            }
        }
        let _restore = Restore(old);
        f()
    }
}

/// `(model_id, dims)` of a named model.
pub fn identity_of(model: &str) -> Result<(String, i32), SidecarError> {
    let Some(ring) = through_service() else {
        return local::with_model(Some(model), None, |e| Ok((e.model_id().to_string(), e.dims() as i32)));
    };
    let dims =
        client::submit(ring, model, &["dimensions"], Priority::Interactive)?.collect()?.pop().unwrap_or_default().len();
    Ok((model_id_of(model)?, dims as i32))
}

/// Whether a drain can overlap its SQL with inference (only when another process embeds).
pub fn overlaps() -> bool {
    through_service().is_some()
}

pub fn texts_embedded() -> i64 {
    TEXTS_EMBEDDED.with(|c| c.get())
}
