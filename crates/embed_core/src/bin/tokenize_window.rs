//! Tokenising the first window of long texts: the cut before tokenising (`WindowTokenizer`, 0.3)
//! against the 64-bytes-a-token cut of 0.2, on the same texts in the same run.
//!
//! tokenize_window <model-dir> <texts.jsonl> [--rounds N]
//! Each line of the file is a JSON string. Prints one JSON object: texts, mean_bytes, both rates
//! (texts/s), their ratio, and whether every text's ids were equal.

use std::path::PathBuf;
use std::time::Instant;

use embed_core::{cut_at_char_boundary, WindowTokenizer};
use tokenizers::{Tokenizer, TruncationParams};

fn main() {
    if let Err(e) = run() {
        eprintln!("tokenize_window: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: tokenize_window <model-dir> <texts.jsonl> [--rounds N]".into());
    }
    let dir = PathBuf::from(&args[1]);
    let rounds: usize = match args.get(3).map(String::as_str) {
        Some("--rounds") => args.get(4).ok_or("--rounds needs a number")?.parse()?,
        Some(other) => return Err(format!("unknown option {other}").into()),
        None => 3,
    };
    let texts: Vec<String> = std::fs::read_to_string(&args[2])?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("embed_model.json"))?)?;
    let window = manifest["max_length"].as_u64().ok_or("manifest without max_length")? as usize;

    let cut = WindowTokenizer::load(&dir.join("tokenizer.json"), window)?;
    let mut before = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    before.with_padding(None);
    before.with_truncation(Some(TruncationParams { max_length: window, ..Default::default() }))?;

    let mut equal = true;
    let (mut t_before, mut t_cut) = (0.0, 0.0);
    for _ in 0..rounds {
        // interleaved, so that the machine's load falls on both alike
        let start = Instant::now();
        let old: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| before.encode_fast(cut_at_char_boundary(t, window * 64), true).map(|e| e.get_ids().to_vec()))
            .collect::<Result<_, _>>()?;
        t_before += start.elapsed().as_secs_f64();
        let start = Instant::now();
        let new: Vec<Vec<u32>> = texts.iter().map(|t| cut.encode(t).map(|(ids, _)| ids)).collect::<Result<_, _>>()?;
        t_cut += start.elapsed().as_secs_f64();
        equal &= old == new;
    }
    let n = (texts.len() * rounds) as f64;
    let mean_bytes = texts.iter().map(String::len).sum::<usize>() / texts.len().max(1);
    println!(
        "{{\"texts\": {}, \"mean_bytes\": {mean_bytes}, \"before_per_s\": {:.1}, \"cut_per_s\": {:.1}, \"ratio\": {:.2}, \"ids_equal\": {equal}}}",
        texts.len(),
        n / t_before,
        n / t_cut,
        t_before / t_cut
    );
    Ok(())
}
