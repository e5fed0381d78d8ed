//! Runs the real default model (installed by scripts/setup.sh). Paths can be overridden with
//! EMBED_ORT_LIB and EMBED_MODEL_DIR.

use std::path::PathBuf;

use embed_core::{cosine, EmbedError, Embedder, Interrupt, LoadOptions};

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
    let mut batched =
        load(LoadOptions { intra_threads: 2, max_batch: 8, max_batch_tokens: 300, ..LoadOptions::default() });
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
    let v = e
        .embed(&["A cat sits on the mat", "A kitten is sitting on a rug", "Stock markets fell sharply today"])
        .unwrap();
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

fn chunker(max_tokens: usize, overlap: usize) -> (embed_core::Chunker, tokenizers::Tokenizer) {
    let (_, dir) = paths();
    let path = dir.join("tokenizer.json");
    let mut plain = tokenizers::Tokenizer::from_file(&path).unwrap();
    plain.with_truncation(None).unwrap();
    plain.with_padding(None);
    (embed_core::Chunker::load(&path, max_tokens, overlap).unwrap(), plain)
}

/// Properties every chunking must have, checked against the real tokenizer: chunks in order,
/// each within the budget (re-tokenised on its own), offsets on character boundaries that agree
/// with the byte offsets, consecutive chunks moving forward, and every
/// token of the text inside some chunk.
fn check_chunks(text: &str, max_tokens: usize, overlap: usize) -> Vec<embed_core::Chunk> {
    let (c, plain) = chunker(max_tokens, overlap);
    let chunks = c.chunks(text).unwrap();
    assert_eq!(c.chunks(text).unwrap(), chunks, "same text, same chunks");
    for ch in &chunks {
        assert!(ch.tokens <= max_tokens);
        let own = plain.encode(ch.text(text), false).unwrap().get_ids().len();
        assert!(own <= max_tokens, "chunk re-tokenises to {own} > {max_tokens}");
        assert_eq!(text.chars().take(ch.char_start).map(char::len_utf8).sum::<usize>(), ch.start);
        assert_eq!(text.chars().take(ch.char_end).map(char::len_utf8).sum::<usize>(), ch.end);
    }
    for pair in chunks.windows(2) {
        assert!(pair[1].start > pair[0].start && pair[1].end > pair[0].end);
    }
    let enc = plain.encode(text, false).unwrap();
    for (a, b) in enc.get_offsets() {
        assert!(chunks.iter().any(|ch| ch.start <= *a && *b <= ch.end), "token at {a}..{b} in no chunk");
    }
    chunks
}

#[test]
fn chunks_of_real_text_respect_paragraphs_and_the_budget() {
    let para =
        |i: usize| format!("Paragraph {i} talks about topic {i}. It has a second sentence with more words in it. ");
    let text: String = (0..40).map(|i| para(i).repeat(3) + "\n\n").collect();
    let chunks = check_chunks(&text, 126, 16);
    assert!(chunks.len() > 5);
    // a paragraph break lies in the back half of every window here: no chunk ends mid-paragraph
    for ch in &chunks[..chunks.len() - 1] {
        assert!(text[ch.end..].trim_start_matches(' ').starts_with("\n\n"), "{:?}", &text[ch.end - 10..ch.end]);
    }
}

#[test]
fn chunks_of_text_without_whitespace_and_mixed_scripts() {
    // Japanese has no spaces; every character is a token of its own
    check_chunks(&"日本語の文章には空白がありません。".repeat(60), 50, 8);
    // Korean: a syllable is split into jamo tokens sharing the syllable's offsets (this panicked)
    check_chunks(&"한국어 문서입니다. ".repeat(60), 50, 8);
    // one very long paragraph of words joined by punctuation only
    check_chunks(&(0..600).map(|i| format!("part{i}")).collect::<Vec<_>>().join("-"), 64, 10);
    // emoji, combining accents, right-to-left script, control characters, in one huge paragraph
    let mixed = "Caf\u{0065}\u{0301} 🎉 مرحبا بالعالم \u{0007} naïve résumé ".repeat(200);
    let chunks = check_chunks(&mixed, 40, 0);
    assert!(chunks.len() > 10);
    // nothing to tokenise: one chunk covering the text
    let c = check_chunks("\u{0007}\u{0007}", 40, 0);
    assert_eq!((c.len(), c[0].char_end), (1, 2));
}

#[test]
fn an_edit_changes_only_the_chunks_around_it() {
    let doc: Vec<String> = (0..30)
        .map(|i| {
            format!("Section {i}. The fox number {i} jumps over the lazy dog number {i} again and again. ").repeat(4)
        })
        .collect();
    let before = doc.join("\n\n");
    let mut edited = doc.clone();
    edited[15] = "A short replacement paragraph.".into();
    let after = edited.join("\n\n");
    let (c, _) = chunker(126, 16);
    let old: std::collections::HashSet<_> =
        c.chunks(&before).unwrap().iter().map(|ch| ch.text(&before).to_string()).collect();
    let new = c.chunks(&after).unwrap();
    let changed = new.iter().filter(|ch| !old.contains(ch.text(&after))).count();
    assert!(changed <= 3, "{changed} of {} chunks changed", new.len());
}

#[test]
fn room_leaves_space_for_special_tokens() {
    let (_, dir) = paths();
    assert_eq!(embed_core::Chunker::room(&dir.join("tokenizer.json"), 256, None).unwrap(), 254);
    // "passage: " is two WordPiece tokens ("passage", ":"), and one more is kept in reserve
    assert_eq!(embed_core::Chunker::room(&dir.join("tokenizer.json"), 256, Some("passage: ")).unwrap(), 251);
    assert_eq!(embed_core::Chunker::room(&dir.join("tokenizer.json"), 256, Some("")).unwrap(), 254);
}

/// An interrupt raised before a call stops it before any run; reset, the same embedder gives the
/// vectors of an uninterrupted call.
#[test]
fn interrupt_raised_before_a_call_stops_it_and_reset_clears_it() {
    let (lib, _) = paths();
    let mut e = load(LoadOptions::default());
    let interrupt = Interrupt::new(&lib).unwrap();
    let texts = ["first text", "a second, longer text about something else"];
    interrupt.raise();
    let mut runs = 0;
    let stopped = e.embed_interruptible(&texts, &mut || runs += 1, &interrupt);
    assert!(matches!(stopped, Err(EmbedError::Interrupted)), "{stopped:?}");
    assert_eq!(runs, 1, "stopped at the first batch");
    interrupt.reset();
    let again = e.embed_interruptible(&texts, &mut || {}, &interrupt).unwrap();
    let plain = e.embed(&texts).unwrap();
    for (a, b) in again.iter().zip(&plain) {
        assert!(cosine(a, b) > 0.99999);
    }
}

/// Raised from another thread while a call of many window-long batches runs, the interrupt stops
/// it before its last batch. The first batch's callback waits until the other thread has raised
/// it, so the raise lands during the first run or before the second: no timing decides the
/// outcome. Whether ONNX Runtime stopped inside the first run is printed (it does, when its
/// terminate flag works): `batches started 1`.
#[test]
fn interrupt_raised_from_another_thread_stops_a_long_call() {
    let (lib, _) = paths();
    let mut e = load(LoadOptions { intra_threads: 2, max_batch_tokens: 2048, ..LoadOptions::default() });
    let interrupt = Interrupt::new(&lib).unwrap();
    let texts: Vec<String> = (0..32).map(|i| format!("sentence number {i} of a long document. ").repeat(80)).collect();
    let (go, raise) = std::sync::mpsc::channel::<()>();
    let (raised, confirmed) = std::sync::mpsc::channel::<()>();
    let other = interrupt.clone();
    let raiser = std::thread::spawn(move || {
        raise.recv().unwrap();
        // let the first run begin, then stop it
        std::thread::sleep(std::time::Duration::from_millis(20));
        other.raise();
        raised.send(()).unwrap();
    });
    let mut batches = 0;
    let result = e.embed_interruptible(
        &texts,
        &mut || {
            batches += 1;
            match batches {
                1 => go.send(()).unwrap(),
                2 => confirmed.recv().unwrap(),
                _ => {}
            }
        },
        &interrupt,
    );
    raiser.join().unwrap();
    assert!(matches!(result, Err(EmbedError::Interrupted)), "{result:?}");
    assert!(batches <= 2, "32 window-long texts are 8 batches; {batches} started");
    println!("batches started {batches}");
}
