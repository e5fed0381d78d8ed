//! The model directory contract. A directory holds an ONNX file and a `tokenizer.json`; an
//! optional `embed_model.json` manifest names them and sets the token window. Without a manifest
//! the layout of Hugging Face exports (e.g. `Supabase/gte-small`: `onnx/model.onnx` +
//! `tokenizer.json`) is recognised as it is, so such a directory drops in unchanged.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::EmbedError;

pub const MANIFEST: &str = "embed_model.json";
const ONNX_CANDIDATES: [&str; 3] = ["model.onnx", "onnx/model.onnx", "onnx/model_quantized.onnx"];
/// BERT's position table; the window when nothing in the directory says otherwise.
const DEFAULT_MAX_LENGTH: usize = 512;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    name: Option<String>,
    onnx: Option<String>,
    tokenizer: Option<String>,
    max_length: Option<usize>,
    /// The graph output to read; default: `last_hidden_state`, else the first of rank 3 or 2.
    output: Option<String>,
    /// `mean` (token states `[batch, seq, dims]`, averaged over the attention mask) or `none`
    /// (the output is already one vector per text, `[batch, dims]`). Default: by the output's rank.
    pooling: Option<Pooling>,
    /// Put before every search query (e5: `"query: "`), and before every passage the model embeds
    /// for storage (e5: `"passage: "`): models trained with such prefixes rank worse without them.
    query_prefix: Option<String>,
    passage_prefix: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation fields the installer writes
    source: Option<serde_json::Value>,
}

/// How the chosen output becomes one vector per text (before L2 normalisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    None,
}

/// The resolved files of one model and the identity vectors made with it carry.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub name: String,
    pub onnx: PathBuf,
    pub tokenizer: PathBuf,
    pub max_length: usize,
    /// What the manifest chose; `None` leaves the choice to the output's name and rank.
    pub output: Option<String>,
    pub pooling: Option<Pooling>,
    /// What goes before a query / a passage (`embed_model.json`); `None` when the manifest sets none.
    pub query_prefix: Option<String>,
    pub passage_prefix: Option<String>,
    /// `name@` + the first 12 hex digits of a sha256 over everything that shapes a vector: the
    /// ONNX file (graph and weights), the tokenizer, the window, the output read and its pooling,
    /// and the query and passage prefixes (a passage embedded with another prefix is another vector).
    /// Changing any of them is a new model, so every vector made with the old one is stale.
    pub model_id: String,
}

impl ModelFiles {
    pub fn resolve(dir: &Path) -> Result<Self, EmbedError> {
        if !dir.is_dir() {
            return Err(EmbedError::ModelDirMissing(dir.to_path_buf()));
        }
        let manifest_path = dir.join(MANIFEST);
        let manifest: Manifest = match fs::read_to_string(&manifest_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| EmbedError::Manifest { path: manifest_path.clone(), reason: e.to_string() })?,
            Err(_) => Manifest::default(),
        };

        let onnx = match &manifest.onnx {
            Some(rel) => Some(dir.join(rel)).filter(|p| p.is_file()),
            None => ONNX_CANDIDATES.iter().map(|c| dir.join(c)).find(|p| p.is_file()),
        }
        .ok_or_else(|| EmbedError::ModelFileMissing(dir.to_path_buf()))?;

        let tokenizer = dir.join(manifest.tokenizer.as_deref().unwrap_or("tokenizer.json"));
        if !tokenizer.is_file() {
            return Err(EmbedError::TokenizerMissing(dir.to_path_buf()));
        }

        let max_length = match manifest.max_length {
            Some(0) => {
                return Err(EmbedError::Manifest { path: manifest_path, reason: "max_length must be positive".into() })
            }
            Some(n) => n,
            None => max_length_from_configs(dir),
        };

        let name = manifest.name.clone().unwrap_or_else(|| {
            dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        });
        // what the manifest does not set adds nothing, so ids of existing models stay as they were
        let mut shaping = format!("max_length={max_length}");
        if let Some(o) = &manifest.output {
            shaping += &format!(";output={o}");
        }
        if let Some(p) = manifest.pooling {
            shaping += &format!(";pooling={p:?}");
        }
        // quoted (Debug), so a prefix holding `;` or `=` cannot pass for another field
        if let Some(p) = &manifest.query_prefix {
            shaping += &format!(";query_prefix={p:?}");
        }
        if let Some(p) = &manifest.passage_prefix {
            shaping += &format!(";passage_prefix={p:?}");
        }
        let model_id = format!("{name}@{}", &identity_digest(&onnx, &tokenizer, &shaping)?[..12]);
        Ok(Self {
            dir: dir.to_path_buf(),
            name,
            onnx,
            tokenizer,
            max_length,
            output: manifest.output,
            pooling: manifest.pooling,
            query_prefix: manifest.query_prefix,
            passage_prefix: manifest.passage_prefix,
            model_id,
        })
    }
}

/// The window a sentence-transformers export was trained with, in the order of precedence its
/// own tooling uses: `sentence_bert_config.json`, then `tokenizer_config.json`, then the
/// position table in `config.json`.
fn max_length_from_configs(dir: &Path) -> usize {
    let read = |file: &str, key: &str| -> Option<usize> {
        let text = fs::read_to_string(dir.join(file)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        // tokenizer_config.json uses a huge sentinel for "no limit"
        v.get(key)?.as_u64().filter(|n| *n > 0 && *n <= 100_000).map(|n| n as usize)
    };
    read("sentence_bert_config.json", "max_seq_length")
        .or_else(|| read("tokenizer_config.json", "model_max_length"))
        .or_else(|| read("config.json", "max_position_embeddings"))
        .unwrap_or(DEFAULT_MAX_LENGTH)
}

fn identity_digest(onnx: &Path, tokenizer: &Path, shaping: &str) -> Result<String, EmbedError> {
    let mut hasher = Sha256::new();
    for path in [onnx, tokenizer] {
        hash_file(&mut hasher, path)?;
    }
    hasher.update(shaping.as_bytes());
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn hash_file(hasher: &mut Sha256, path: &Path) -> Result<(), EmbedError> {
    let io_err = |e: std::io::Error| EmbedError::Io { path: path.to_path_buf(), reason: e.to_string() };
    let mut file = fs::File::open(path).map_err(io_err)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("embed_core_test_{name}_{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn hugging_face_layout_is_recognised_without_manifest() {
        let dir = scratch("hf");
        fs::create_dir_all(dir.join("onnx")).unwrap();
        fs::write(dir.join("onnx/model_quantized.onnx"), b"not really onnx").unwrap();
        fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        fs::write(dir.join("tokenizer_config.json"), br#"{"model_max_length": 512}"#).unwrap();
        let files = ModelFiles::resolve(&dir).unwrap();
        assert!(files.onnx.ends_with("onnx/model_quantized.onnx"));
        assert_eq!(files.max_length, 512);
        assert!(files.model_id.starts_with(&format!("{}@", files.name)));
        assert_eq!(files.model_id.len(), files.name.len() + 13);
    }

    #[test]
    fn manifest_overrides_and_sentence_bert_config_wins_over_position_table() {
        let dir = scratch("manifest");
        fs::write(dir.join("weights.onnx"), b"x").unwrap();
        fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        fs::write(dir.join("config.json"), br#"{"max_position_embeddings": 512}"#).unwrap();
        fs::write(dir.join("sentence_bert_config.json"), br#"{"max_seq_length": 256}"#).unwrap();
        fs::write(dir.join(MANIFEST), br#"{"name": "mini", "onnx": "weights.onnx"}"#).unwrap();
        let files = ModelFiles::resolve(&dir).unwrap();
        assert_eq!(files.name, "mini");
        assert_eq!(files.max_length, 256);
        fs::write(dir.join(MANIFEST), br#"{"onnx": "weights.onnx", "max_length": 64}"#).unwrap();
        assert_eq!(ModelFiles::resolve(&dir).unwrap().max_length, 64);
    }

    #[test]
    fn missing_pieces_are_named() {
        let dir = scratch("missing");
        assert!(matches!(ModelFiles::resolve(&dir.join("nope")), Err(EmbedError::ModelDirMissing(_))));
        assert!(matches!(ModelFiles::resolve(&dir), Err(EmbedError::ModelFileMissing(_))));
        fs::write(dir.join("model.onnx"), b"x").unwrap();
        assert!(matches!(ModelFiles::resolve(&dir), Err(EmbedError::TokenizerMissing(_))));
        fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        fs::write(dir.join(MANIFEST), b"{not json").unwrap();
        assert!(matches!(ModelFiles::resolve(&dir), Err(EmbedError::Manifest { .. })));
    }

    #[test]
    fn identity_covers_onnx_tokenizer_window_and_pooling() {
        let dir = scratch("identity");
        fs::write(dir.join("model.onnx"), b"graph").unwrap();
        fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        let id = || ModelFiles::resolve(&dir).unwrap().model_id;
        let mut seen = vec![id()];
        fs::write(dir.join("tokenizer.json"), b"{ }").unwrap();
        seen.push(id());
        fs::write(dir.join(MANIFEST), br#"{"max_length": 128}"#).unwrap();
        seen.push(id());
        fs::write(dir.join(MANIFEST), br#"{"max_length": 128, "output": "pooled", "pooling": "none"}"#).unwrap();
        seen.push(id());
        fs::write(dir.join(MANIFEST), br#"{"max_length": 128, "output": "pooled", "pooling": "mean"}"#).unwrap();
        seen.push(id());
        fs::write(dir.join("model.onnx"), b"graph2").unwrap();
        seen.push(id());
        let distinct: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(distinct.len(), 6, "{seen:?}");
        assert_eq!(id(), seen[5], "the same files give the same identity");
        fs::write(dir.join(MANIFEST), br#"{"pooling": "max"}"#).unwrap();
        assert!(matches!(ModelFiles::resolve(&dir), Err(EmbedError::Manifest { .. })), "unknown pooling is refused");
    }

    #[test]
    fn identity_covers_each_prefix_and_no_prefix_keeps_the_old_id() {
        let dir = scratch("prefixes");
        fs::write(dir.join("model.onnx"), b"graph").unwrap();
        fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        let resolve = || ModelFiles::resolve(&dir).unwrap();
        let plain = resolve();
        assert_eq!((plain.query_prefix.as_deref(), plain.passage_prefix.as_deref()), (None, None));
        // the shaping string of a manifest without prefixes, as before prefixes existed
        let old = identity_digest(&plain.onnx, &plain.tokenizer, &format!("max_length={}", plain.max_length)).unwrap();
        assert_eq!(plain.model_id, format!("{}@{}", plain.name, &old[..12]), "models without prefixes keep their id");
        fs::write(dir.join(MANIFEST), br#"{"max_length": 512}"#).unwrap();
        assert_eq!(resolve().model_id, plain.model_id, "a manifest that sets no prefix changes nothing");

        let mut seen = vec![plain.model_id.clone()];
        for manifest in [
            r#"{"query_prefix": "query: "}"#,
            r#"{"passage_prefix": "query: "}"#,
            r#"{"query_prefix": "query: ", "passage_prefix": "passage: "}"#,
            r#"{"query_prefix": "query: ", "passage_prefix": "passage:"}"#,
            r#"{"query_prefix": "search_query: ", "passage_prefix": "passage: "}"#,
            r#"{"query_prefix": ""}"#,
        ] {
            fs::write(dir.join(MANIFEST), manifest).unwrap();
            seen.push(resolve().model_id);
        }
        let distinct: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "{seen:?}");

        fs::write(dir.join(MANIFEST), br#"{"query_prefix": "query: ", "passage_prefix": "passage: "}"#).unwrap();
        let files = resolve();
        assert_eq!(files.query_prefix.as_deref(), Some("query: "));
        assert_eq!(files.passage_prefix.as_deref(), Some("passage: "));
        assert_eq!(files.model_id, seen[3], "the same prefixes give the same identity");
        fs::write(dir.join(MANIFEST), br#"{"query_prefix": 3}"#).unwrap();
        assert!(matches!(ModelFiles::resolve(&dir), Err(EmbedError::Manifest { .. })), "a prefix is a string");
    }
}
