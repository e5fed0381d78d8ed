//! Runs the real default model (installed by scripts/setup.sh). Paths can be overridden with
//! EMBED_ORT_LIB and EMBED_MODEL_DIR.

use std::path::PathBuf;

use embed_core::{cosine, Embedder, EmbedError, LoadOptions};

fn paths() -> (PathBuf, PathBuf) {
    let lib = std::env::var("EMBED_ORT_LIB")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/lib/pg_embed_sidecar/libonnxruntime.so".into());
    let dir = std::env::var("EMBED_MODEL_DIR")
        .unwrap_or_else(|_| "/usr/share/postgresql/15/extension/pg_embed_sidecar/models/all-MiniLM-L6-v2".into());
    (lib.into(), dir.into())
}

fn load(opts: LoadOptions) -> Embedder {
    let (lib, dir) = paths();
    Embedder::load(&lib, &dir, opts).expect("default model loads (run scripts/setup.sh first)")
}

#[test]
fn vectors_have_model_dims_and_unit_length() {
    let mut e = load(LoadOptions::default());
    assert_eq!(e.dims(), 384);
    assert!(e.model_id().starts_with("all-MiniLM-L6-v2@"));
    let v = e.embed(&["hello world", "", "日本語のテキスト 🎉"]).unwrap();
    assert_eq!(v.len(), 3);
    for x in &v {
        assert_eq!(x.len(), 384);
        let norm: f32 = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
}

#[test]
fn batching_and_order_do_not_change_results() {
    // texts of very different lengths land in different batches after sorting by length
    let texts: Vec<String> = (0..40).map(|i| "word ".repeat(1 + (i * 7) % 60) + &i.to_string()).collect();
    let mut batched = load(LoadOptions { intra_threads: 2, max_batch: 8, max_batch_tokens: 300, ..LoadOptions::default() });
    let all = batched.embed(&texts).unwrap();
    let mut single = load(LoadOptions { max_batch: 1, ..LoadOptions::default() });
    for (t, v) in texts.iter().zip(&all) {
        let one = single.embed(&[t.as_str()]).unwrap();
        assert!(cosine(&one[0], v) > 0.9999, "{t}");
    }
}

#[test]
fn semantic_sanity() {
    let mut e = load(LoadOptions::default());
    let v = e.embed(&["A cat sits on the mat", "A kitten is sitting on a rug", "Stock markets fell sharply today"]).unwrap();
    let close = cosine(&v[0], &v[1]);
    let far = cosine(&v[0], &v[2]);
    assert!(close > far + 0.3, "close {close} far {far}");
}

#[test]
fn long_text_is_truncated_to_the_window() {
    let mut e = load(LoadOptions::default());
    let head = "The quick brown fox jumps over the lazy dog. ".repeat(60); // > 256 tokens
    let ids = e.tokenize(&head).unwrap();
    assert_eq!(ids.len(), 256);
    let huge = head.clone() + &"zebra ".repeat(2_000_000); // ~12 MB, same first 256 tokens
    let v = e.embed(&[head.as_str(), huge.as_str()]).unwrap();
    assert!(cosine(&v[0], &v[1]) > 0.9999);
}

#[test]
fn errors_name_what_is_missing() {
    let (lib, dir) = paths();
    let missing_lib = Embedder::load(&PathBuf::from("/nonexistent/libonnxruntime.so"), &dir, LoadOptions::default());
    // the runtime may already be loaded by another test in this process; then the error is not
    // reachable, and loading must simply succeed
    if let Err(e) = missing_lib {
        assert!(matches!(e, EmbedError::Runtime { .. }), "{e}");
    }
    let no_dir = Embedder::load(&lib, &PathBuf::from("/nonexistent/model"), LoadOptions::default());
    assert!(matches!(no_dir, Err(EmbedError::ModelDirMissing(_))));

    // a corrupt model file: a directory with garbage in model.onnx
    let bad = std::env::temp_dir().join(format!("embed_core_corrupt_{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(dir.join("tokenizer.json"), bad.join("tokenizer.json")).unwrap();
    std::fs::write(bad.join("model.onnx"), b"this is not an onnx graph").unwrap();
    assert!(matches!(Embedder::load(&lib, &bad, LoadOptions::default()), Err(EmbedError::Model { .. })));
    std::fs::write(bad.join("tokenizer.json"), b"{ broken").unwrap();
    assert!(matches!(Embedder::load(&lib, &bad, LoadOptions::default()), Err(EmbedError::Tokenizer { .. })));
}
