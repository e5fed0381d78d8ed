//! Chunked embeddings (`watch(..., chunking => true)`): a row's text is cut into passages by the
//! model's own tokenizer (`embed_core::Chunker`) and each passage gets a vector of its own in the
//! sidecar, keyed (source key, chunk number) with its character offsets and its hash.
//!
//! The drain (src/drain/mod.rs) calls `split` between the lookup and the inference: a changed row is
//! chunked again, and only passages whose hash the row does not already have a vector for (with
//! the current model) are embedded; the write copies the others' vectors over (sql/drain.sql).
//! The tokenizer is loaded in this process even when the inference service embeds: it is small,
//! and the passage offsets must be known here to write them.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use embed_core::{content_hash, Chunk, Chunker};
use pgrx::prelude::*;

use crate::error::SidecarError;
use crate::gucs;
use crate::inference::{self as model, Side};

/// Passage budgets below this say nothing a single sentence would not.
const MIN_CHUNK_TOKENS: i32 = 16;

/// (model id, passage budget, overlap): the model id changes with the tokenizer file.
type ChunkerKey = (String, usize, usize);

thread_local! {
    /// Chunkers by their key.
    static CHUNKERS: RefCell<Vec<(ChunkerKey, Rc<Chunker>)>> = const { RefCell::new(Vec::new()) };
    /// Tokens a passage may take, by model id (verify() asks once per row).
    static ROOM: RefCell<HashMap<String, i32>> = RefCell::new(HashMap::new());
}

/// `(chunk_tokens, chunk_overlap)` for `model`: the defaults filled in (the model's window less its
/// special tokens and its passage prefix; an eighth of that) and checked. With `fit` (a model
/// switch) values that are too large for the new model shrink to fit instead of failing.
pub fn settings(model: &str, tokens: Option<i32>, overlap: Option<i32>, fit: bool) -> Result<(i32, i32), SidecarError> {
    let files = model::model_files(model)?;
    let room = match ROOM.with(|r| r.borrow().get(&files.model_id).copied()) {
        Some(room) => room,
        None => {
            // the passage prefix comes off the budget (see `Chunker::room`), so truncation to the
            // window never cuts a passage: its offsets stay offsets of what was embedded
            let room = Chunker::room(&files.tokenizer, files.max_length, Side::Passage.prefix(&files))? as i32;
            ROOM.with(|r| r.borrow_mut().insert(files.model_id.clone(), room));
            room
        }
    };
    let mut tokens = tokens.unwrap_or(room);
    if fit {
        tokens = tokens.min(room);
    }
    if !(MIN_CHUNK_TOKENS..=room).contains(&tokens) {
        return Err(SidecarError::Chunking(format!(
            "chunk_tokens {tokens} is outside {MIN_CHUNK_TOKENS}..{room} for model \"{model}\""
        )));
    }
    let mut overlap = overlap.unwrap_or(tokens / 8);
    if fit {
        overlap = overlap.min((tokens - 1) / 2);
    }
    if overlap < 0 || overlap * 2 >= tokens {
        return Err(SidecarError::Chunking(format!(
            "chunk_overlap {overlap} must be at least 0 and less than half of chunk_tokens {tokens}"
        )));
    }
    Ok((tokens, overlap))
}

/// The passages of `text` for `model`, as a chunked sidecar stores them.
pub fn chunks(model: &str, tokens: usize, overlap: usize, text: &str) -> Result<Vec<Chunk>, SidecarError> {
    cut(&*chunker(model, tokens, overlap)?, text)
}

/// `chunker.chunks(text)`, after the size check: tokenising holds memory in proportion to the
/// text, so the limit is checked before (`pg_embed_sidecar.chunk_text_max`).
fn cut(chunker: &Chunker, text: &str) -> Result<Vec<Chunk>, SidecarError> {
    let max = gucs::chunk_text_max_bytes();
    if text.len() > max {
        return Err(SidecarError::Refused {
            code: pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            message: format!("text of {} bytes is over pg_embed_sidecar.chunk_text_max ({} kB)", text.len(), max / 1024),
            hint: "A superuser can raise pg_embed_sidecar.chunk_text_max; tokenising takes about 170 bytes of memory per byte of text.",
        });
    }
    Ok(chunker.chunks(text)?)
}

/// The chunker for a model and budget, loaded once per process (and again if its files change).
fn chunker(model: &str, tokens: usize, overlap: usize) -> Result<Rc<Chunker>, SidecarError> {
    let files = model::model_files(model)?;
    let key = (files.model_id.clone(), tokens, overlap);
    CHUNKERS.with(|cell| {
        let mut cached = cell.borrow_mut();
        if let Some((_, c)) = cached.iter().find(|(k, _)| *k == key) {
            return Ok(c.clone());
        }
        let c = Rc::new(Chunker::load(&files.tokenizer, tokens, overlap)?);
        if cached.len() >= 4 {
            cached.remove(0);
        }
        cached.push((key, c.clone()));
        Ok(c)
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One changed row of a pass, cut into passages.
pub struct RowChunks {
    pub key: String,
    /// Hash of the row's whole text (the write re-checks it against the row).
    pub hash: Vec<u8>,
    /// Character offsets of each passage.
    pub spans: Vec<(usize, usize)>,
    /// Per passage: the index of its text in `Split::texts`, or `None` when the row already has a
    /// vector for a passage with the same hash (the write copies it).
    pub slots: Vec<Option<usize>>,
}

/// What a pass over a chunked source embeds: distinct passage texts, and each row's layout.
#[derive(Default)]
pub struct Split {
    pub texts: Vec<String>,
    pub rows: Vec<RowChunks>,
    /// Rows that could not be chunked, with the error.
    pub failed: Vec<(String, String)>,
}

/// Cut each changed row `(key, text, hash)` into passages. `known` holds, per key, the hashes of
/// the passages it has vectors for already, in hex.
pub fn split(
    model: &str,
    (tokens, overlap): (usize, usize),
    rows: Vec<(String, String, Vec<u8>)>,
    known: &HashMap<String, HashSet<String>>,
) -> Split {
    let mut out = Split::default();
    // looked up once per pass, not per row
    let chunker = match chunker(model, tokens, overlap) {
        Ok(c) => c,
        Err(e) => {
            out.failed = rows.into_iter().map(|(key, _, _)| (key, e.to_string())).collect();
            return out;
        }
    };
    // a passage repeated within the pass (boilerplate paragraphs) is embedded once
    let mut slot_of: HashMap<String, usize> = HashMap::new();
    let none = HashSet::new();
    for (key, text, hash) in rows {
        let chunks = match cut(&chunker, &text) {
            Ok(c) => c,
            Err(e) => {
                out.failed.push((key, e.to_string()));
                continue;
            }
        };
        let have = known.get(&key).unwrap_or(&none);
        let mut row =
            RowChunks { key, hash, spans: Vec::with_capacity(chunks.len()), slots: Vec::with_capacity(chunks.len()) };
        for c in &chunks {
            let passage = c.text(&text);
            let h = hex(&content_hash(passage));
            row.spans.push((c.char_start, c.char_end));
            row.slots.push(if have.contains(&h) {
                None
            } else {
                Some(*slot_of.entry(h).or_insert_with(|| {
                    out.texts.push(passage.to_string());
                    out.texts.len() - 1
                }))
            });
        }
        out.rows.push(row);
    }
    out
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use crate::error::OrReport;
    use crate::gucs::embed_settings;

    /// `{chunk_tokens, chunk_overlap}` for a model, defaults filled in and checked (watch, set_model).
    #[pg_extern(stable, parallel_restricted, name = "_chunking")]
    fn chunking(model: &str, chunk_tokens: Option<i32>, chunk_overlap: Option<i32>, fit: bool) -> Vec<i32> {
        let (t, o) = super::settings(model, chunk_tokens, chunk_overlap, fit).or_report();
        vec![t, o]
    }

    /// The passages a chunked sidecar makes of `content`: what `watch(..., chunking => true)`
    /// stores, for a look before watching and for verify().
    #[pg_extern(stable, parallel_restricted)]
    fn chunk_text(
        content: Option<&str>,
        model: default!(Option<&str>, "NULL"),
        chunk_tokens: default!(Option<i32>, "NULL"),
        chunk_overlap: default!(Option<i32>, "NULL"),
    ) -> TableIterator<
        'static,
        (name!(chunk, i32), name!(char_start, i32), name!(char_end, i32), name!(tokens, i32), name!(passage, String)),
    > {
        let Some(content) = content else {
            return TableIterator::new(Vec::new());
        };
        let model = model.map(str::to_string).unwrap_or_else(|| embed_settings(None).model);
        let (tokens, overlap) = super::settings(&model, chunk_tokens, chunk_overlap, false).or_report();
        let rows: Vec<_> = super::chunks(&model, tokens as usize, overlap as usize, content)
            .or_report()
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                (i as i32, c.char_start as i32, c.char_end as i32, c.tokens as i32, c.text(content).to_string())
            })
            .collect();
        TableIterator::new(rows)
    }
}
