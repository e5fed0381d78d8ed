//! How much of a text to hand the tokenizer. Only the first window of tokens is embedded, but the
//! tokenizer normalises and splits all it is given: a 48 KB text cost ~190× the work of the
//! ~1 KB it needs, and 24 sessions of such texts starved the inference worker (issue 22). We cut
//! the text first, and keep the cut only when it provably changes no token of the window.
//!
//! The proof: with a normaliser that works character by character and a pre-tokenizer that splits
//! at spaces, the words before a space are tokenised alike whatever follows the space. So when the
//! prefix's window was truncated (it held more tokens than the window) and its last window token
//! ends before a space of the prefix, the whole text's window is the same tokens. Otherwise (a
//! text without spaces in that stretch, a tokenizer of another kind) the longer cut is used.

use std::path::Path;

use serde_json::Value;
use tokenizers::{Encoding, Tokenizer, TruncationParams};
use unicode_segmentation::UnicodeSegmentation;

/// Bytes tokenised first, per token of the window. The texts of every script we test need 1–6
/// bytes a token (English ~4.5, CJK 3 a character), so 8 fills the window with room to spare.
const FIRST_CUT_BYTES_PER_TOKEN: usize = 8;
/// Bytes tokenised at most, per token of the window (the only cut before 0.3): bounds the work
/// for a text of any length when the first cut cannot be proved exact.
const MAX_CUT_BYTES_PER_TOKEN: usize = 64;

/// A model's tokenizer that returns the first window of a text, cutting long texts first.
pub struct WindowTokenizer {
    tokenizer: Tokenizer,
    window: usize,
    /// Whether the proof above covers this tokenizer; fixed by its kind, so worked out once.
    short_cut_provable: bool,
}

impl WindowTokenizer {
    pub fn load(path: &Path, window: usize) -> Result<Self, String> {
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| e.to_string())?;
        // Exports often pad every text to a fixed length; the embedder pads per batch instead.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: window, ..Default::default() }))
            .map_err(|e| e.to_string())?;
        let short_cut_provable = splits_at_spaces(&tokenizer);
        Ok(Self { tokenizer, window, short_cut_provable })
    }

    /// Token ids of `text`'s first window (special tokens included), and how many bytes of the
    /// text were tokenised: a short prefix when that provably gives the same window, else the
    /// longer cut.
    pub fn encode(&self, text: &str) -> Result<(Vec<u32>, usize), String> {
        let encode = |part: &str| self.tokenizer.encode_fast(part, true).map_err(|e| e.to_string());
        if self.short_cut_provable && text.len() > self.window * FIRST_CUT_BYTES_PER_TOKEN {
            let prefix = cut_at_char_boundary(text, self.window * FIRST_CUT_BYTES_PER_TOKEN);
            let enc = encode(prefix)?;
            if window_is_settled(prefix, &enc) {
                return Ok((enc.get_ids().to_vec(), prefix.len()));
            }
        }
        let prefix = cut_at_char_boundary(text, self.window * MAX_CUT_BYTES_PER_TOKEN);
        Ok((encode(prefix)?.get_ids().to_vec(), prefix.len()))
    }
}

/// Whether `tokenizer` is of the kind the proof above covers: every normaliser step acts on single
/// characters (or replaces runs of spaces), and the pre-tokenizer splits at spaces.
fn splits_at_spaces(tokenizer: &Tokenizer) -> bool {
    let as_json = |v: Result<Value, serde_json::Error>| v.unwrap_or(Value::Null);
    let normalizer = as_json(serde_json::to_value(tokenizer.get_normalizer()));
    let pre_tokenizer = as_json(serde_json::to_value(tokenizer.get_pre_tokenizer()));
    local_normalizer(&normalizer) && splits_pre_tokens_at_spaces(&pre_tokenizer)
}

fn kind(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("")
}

fn all_of(v: &Value, key: &str, each: fn(&Value) -> bool) -> bool {
    v.get(key).and_then(Value::as_array).is_some_and(|steps| steps.iter().all(each))
}

fn local_normalizer(n: &Value) -> bool {
    match kind(n) {
        _ if n.is_null() => true,
        "BertNormalizer" | "Precompiled" | "NFC" | "NFD" | "NFKC" | "NFKD" | "Lowercase" | "StripAccents" | "Strip"
        | "Prepend" => true,
        // e5's Replace(" {2,}", " "): a pattern of spaces only touches what follows the space
        "Replace" => n
            .get("pattern")
            .and_then(|p| p.get("String").or_else(|| p.get("Regex")))
            .and_then(Value::as_str)
            .is_some_and(|p| p.contains(' ') && p.chars().all(|c| " {},0123456789+*".contains(c))),
        "Sequence" => all_of(n, "normalizers", local_normalizer),
        _ => false,
    }
}

fn splits_pre_tokens_at_spaces(p: &Value) -> bool {
    match kind(p) {
        "BertPreTokenizer" | "Whitespace" | "WhitespaceSplit" => true,
        "Metaspace" => p.get("split").and_then(Value::as_bool).unwrap_or(true),
        // later steps only split further
        "Sequence" => p
            .get("pretokenizers")
            .and_then(Value::as_array)
            .is_some_and(|steps| steps.first().is_some_and(splits_pre_tokens_at_spaces)),
        _ => false,
    }
}

/// Whether `enc`, the truncated encoding of `prefix`, holds the same window as the whole text
/// would: it was truncated, and after its last window token the prefix has a space that is a
/// grapheme of its own (the next character, inside the prefix, starts a new one). Normalisers that
/// work on graphemes (sentencepiece's charsmap) then see the same graphemes up to that space in
/// the prefix as in the whole text.
fn window_is_settled(prefix: &str, enc: &Encoding) -> bool {
    if enc.get_overflowing().is_empty() {
        return false;
    }
    let window_end = enc
        .get_offsets()
        .iter()
        .zip(enc.get_special_tokens_mask())
        .filter(|(_, &special)| special == 0)
        .map(|((_, end), _)| *end)
        .max()
        .unwrap_or(0);
    let Some(rest) = prefix.get(window_end..) else { return false };
    rest.match_indices(' ').any(|(at, _)| at + 1 < rest.len() && rest[at..].graphemes(true).next() == Some(" "))
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on a char boundary.
pub fn cut_at_char_boundary(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::cut_at_char_boundary;

    #[test]
    fn cut_never_splits_a_character() {
        assert_eq!(cut_at_char_boundary("abc", 10), "abc");
        assert_eq!(cut_at_char_boundary("aé", 2), "a"); // é is two bytes
        assert_eq!(cut_at_char_boundary("日本", 4), "日");
    }
}
