//! The benchmark's ceiling: raw ONNX Runtime inference (tokenisation, batching, pooling included)
//! on texts from a file, outside PostgreSQL. Same code path as the extension, nothing else.
//!
//! embed_ceiling <ort-lib> <model-dir> <texts.jsonl> [--threads N] [--batch N] [--batch-tokens N]
//!               [--window N] [--arena 0|1] [--mem-pattern 0|1] [--spin 0|1]
//! Each line of the file is a JSON string. Prints one JSON object: rows, seconds, rows_per_s,
//! peak_rss_kib.

use std::path::PathBuf;
use std::time::Instant;

use embed_core::{Embedder, LoadOptions};

fn main() {
    if let Err(e) = run() {
        eprintln!("embed_ceiling: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: embed_ceiling <ort-lib> <model-dir> <texts.jsonl> [--threads N] [--batch N] [--batch-tokens N] [--window N]".into());
    }
    let mut opts = LoadOptions::default();
    let mut window = usize::MAX; // texts handed to one embed() call (the drain's read window)
    let mut i = 4;
    while i + 1 < args.len() {
        let n: usize = args[i + 1].parse()?;
        match args[i].as_str() {
            "--threads" => opts.intra_threads = n,
            "--batch" => opts.max_batch = n,
            "--batch-tokens" => opts.max_batch_tokens = n,
            "--window" => window = n,
            "--arena" => opts.cpu_arena = n != 0,
            "--spin" => opts.spinning = n != 0,
            "--mem-pattern" => opts.memory_pattern = n != 0,
            other => return Err(format!("unknown option {other}").into()),
        }
        i += 2;
    }
    let texts: Vec<String> = std::fs::read_to_string(&args[3])?
        .lines()
        .filter(|l| !l.is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let mut embedder = Embedder::load(&PathBuf::from(&args[1]), &PathBuf::from(&args[2]), opts)?;
    let start = Instant::now();
    let mut rows = 0;
    for chunk in texts.chunks(window.max(1)) {
        rows += embedder.embed(chunk)?.len();
    }
    let secs = start.elapsed().as_secs_f64();
    // peak resident memory of this process: model, arena and activations
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map(|v| v.trim().trim_end_matches(" kB").trim().to_string());
    println!(
        "{{\"rows\": {rows}, \"seconds\": {secs:.3}, \"rows_per_s\": {:.1}, \"peak_rss_kib\": {}}}",
        rows as f64 / secs,
        peak_kib.unwrap_or_else(|| "null".into())
    );
    Ok(())
}
