//! Cuts a long text into passages that each fit the model's window, for chunked sidecars.
//!
//! The text is tokenised once with the model's own tokenizer (no truncation, no special tokens),
//! so a chunk's size is counted in the tokens the model will see, not guessed from characters.
//! Each chunk takes at most `max_tokens` tokens and ends at the best boundary in the back half of
//! its window: a paragraph break, else a sentence end, else a line break, else a space, else any
//! token boundary (a text without spaces, CJK). The next chunk starts up to `overlap` tokens before
//! the previous end, at the best boundary found there, so a sentence cut by one chunk is whole in
//! the next (after a paragraph break it starts at the break: nothing was cut). Everything is a function of the text alone: the same text always gives the same
//! chunks, and an edit leaves the chunks before it untouched (the drain re-embeds only chunks
//! whose text changed; the ones after an edit realign at the next paragraph break they share).

use std::path::Path;

use sha2::{Digest, Sha256};
use tokenizers::{PostProcessor, Tokenizer};

use crate::EmbedError;

/// One passage: byte offsets (for slicing in Rust) and character offsets (what SQL's `substr`
/// counts, stored in the sidecar), end exclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub start: usize,
    pub end: usize,
    pub char_start: usize,
    pub char_end: usize,
    pub tokens: usize,
}

impl Chunk {
    pub fn text<'a>(&self, of: &'a str) -> &'a str {
        &of[self.start..self.end]
    }
}

/// The content hash of a text: sha256 of its UTF-8 bytes, the same as SQL's
/// `embed_sidecar._content_hash` (sql/registry.sql), so the drain can tell which chunks it
/// already has vectors for without asking the database.
pub fn content_hash(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

pub struct Chunker {
    tokenizer: Tokenizer,
    max_tokens: usize,
    overlap: usize,
}

impl Chunker {
    /// The tokens one passage may take in a model whose window is `window`: the window less the
    /// special tokens the tokenizer adds around every text ([CLS] and [SEP] for BERT), and less
    /// the `prefix` put before every passage (the manifest's `passage_prefix`, e5's "passage: ").
    ///
    /// The prefix is taken off the budget because the embedder truncates prefix + passage to the
    /// window, which would cut the passage's end off unseen. Its tokens are counted alone, plus one:
    /// where the tokenizer splits at the prefix's end (a prefix ending in a space or punctuation,
    /// as e5's, bge's and nomic's do), prefix + passage tokenise to exactly the sum of the two; the
    /// one more covers a prefix whose last piece the tokenizer joins to the passage's first.
    pub fn room(tokenizer_path: &Path, window: usize, prefix: Option<&str>) -> Result<usize, EmbedError> {
        let tokenizer = load(tokenizer_path)?;
        let specials = tokenizer.get_post_processor().map(|p| p.added_tokens(false)).unwrap_or(0);
        let prefixed = match prefix.filter(|p| !p.is_empty()) {
            Some(p) => tokenizer.encode(p, false).map_err(|e| EmbedError::Tokenize(e.to_string()))?.len() + 1,
            None => 0,
        };
        Ok(window.saturating_sub(specials + prefixed).max(1))
    }

    /// A chunker with the tokenizer at `tokenizer_path`. `max_tokens` must be at least 2 and
    /// `overlap` below half of it, so every chunk moves forward.
    pub fn load(tokenizer_path: &Path, max_tokens: usize, overlap: usize) -> Result<Self, EmbedError> {
        if max_tokens < 2 || overlap * 2 >= max_tokens {
            return Err(EmbedError::Tokenize(format!(
                "chunk overlap {overlap} must be less than half of the chunk size {max_tokens}"
            )));
        }
        Ok(Self { tokenizer: load(tokenizer_path)?, max_tokens, overlap })
    }

    /// The chunks of `text`, in order. A text without any token (empty, or only characters the
    /// tokenizer drops) is one chunk, embedded as the unchunked path would embed it.
    pub fn chunks(&self, text: &str) -> Result<Vec<Chunk>, EmbedError> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let offsets = enc.get_offsets();
        if offsets.is_empty() {
            let chars = text.chars().count();
            return Ok(vec![Chunk { start: 0, end: text.len(), char_start: 0, char_end: chars, tokens: 0 }]);
        }
        let spans = plan(text, offsets, self.max_tokens, self.overlap);
        let mut chars = CharCounter::new(text);
        let mut chars_end = CharCounter::new(text);
        Ok(spans
            .into_iter()
            .map(|(first, last)| {
                let (start, end) = (offsets[first].0, offsets[last - 1].1);
                Chunk { start, end, char_start: chars.at(start), char_end: chars_end.at(end), tokens: last - first }
            })
            .collect())
    }
}

fn load(path: &Path) -> Result<Tokenizer, EmbedError> {
    let mut t = Tokenizer::from_file(path)
        .map_err(|e| EmbedError::Tokenizer { path: path.to_path_buf(), reason: e.to_string() })?;
    t.with_padding(None);
    t.with_truncation(None).map_err(|e| EmbedError::Tokenizer { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(t)
}

/// Characters before a byte offset, for offsets asked in increasing order (one pass per text).
struct CharCounter<'a> {
    text: &'a str,
    byte: usize,
    chars: usize,
}

impl<'a> CharCounter<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, byte: 0, chars: 0 }
    }

    fn at(&mut self, byte: usize) -> usize {
        if byte < self.byte {
            *self = Self::new(self.text);
        }
        self.chars += self.text[self.byte..byte].chars().count();
        self.byte = byte;
        self.chars
    }
}

const PARAGRAPH: u8 = 4;

/// How good a place the gap before token `i` is to cut: higher is better.
fn boundary(text: &str, offsets: &[(usize, usize)], i: usize) -> u8 {
    // tokens cut from one character (a Hangul syllable split into jamo) share its offsets: no gap
    let gap = text.get(offsets[i - 1].1..offsets[i].0).unwrap_or("");
    let prev = &text[offsets[i - 1].0..offsets[i - 1].1];
    let ends_sentence = prev.ends_with(['.', '!', '?', ';', ':']) || prev.ends_with(['。', '！', '？', '；']);
    if gap.matches('\n').count() >= 2 {
        PARAGRAPH
    } else if ends_sentence && (!gap.is_empty() || prev.ends_with(['。', '！', '？', '；'])) {
        3
    } else if gap.contains('\n') {
        2
    } else if !gap.is_empty() {
        1
    } else {
        0
    }
}

/// Token spans `[first, last)` of the chunks. Each ends at the best boundary in the back half of
/// its window (ties: the latest); the next starts at the best boundary within `overlap` tokens
/// before that end (ties: the earliest, the longest overlap), or at the end when overlap is 0 or
/// the end is a paragraph break.
fn plan(text: &str, offsets: &[(usize, usize)], max_tokens: usize, overlap: usize) -> Vec<(usize, usize)> {
    let n = offsets.len();
    let mut spans = Vec::new();
    let mut first = 0;
    loop {
        if n - first <= max_tokens {
            spans.push((first, n));
            return spans;
        }
        let limit = first + max_tokens;
        let mut last = limit;
        let mut best = boundary(text, offsets, limit);
        for i in (first + max_tokens / 2..limit).rev() {
            let b = boundary(text, offsets, i);
            if b > best {
                best = b;
                last = i;
            }
        }
        spans.push((first, last));
        let mut next = last;
        // a paragraph break cuts nothing, so the next passage starts right there
        if overlap > 0 && best < PARAGRAPH {
            let mut best = 0;
            for i in last - overlap..last {
                let b = boundary(text, offsets, i);
                if b > best || (b == best && best == 0 && next == last) {
                    best = b;
                    next = i;
                }
            }
        }
        first = next.max(first + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of a whitespace tokenizer that splits off punctuation, enough to test the planner.
    fn words(text: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices() {
            let punct = c.is_ascii_punctuation() || "。！？；".contains(c);
            if c.is_whitespace() || punct {
                if let Some(s) = start.take() {
                    out.push((s, i));
                }
                if punct {
                    out.push((i, i + c.len_utf8()));
                }
            } else if start.is_none() {
                start = Some(i);
            }
        }
        if let Some(s) = start {
            out.push((s, text.len()));
        }
        out
    }

    #[test]
    fn short_text_is_one_chunk() {
        let t = "one two three";
        assert_eq!(plan(t, &words(t), 10, 2), vec![(0, 3)]);
    }

    #[test]
    fn chunks_end_at_paragraph_breaks_when_one_is_in_the_back_half() {
        let t = "a b c d e f g.\n\nh i j k l m n o p q r s t";
        let spans = plan(t, &words(t), 10, 3);
        // tokens: a..g (7) '.' (8): the paragraph break is before token 8 ("h"); no overlap across it
        assert_eq!(spans[0], (0, 8));
        assert_eq!(spans[1].0, 8);
    }

    #[test]
    fn chunks_prefer_sentence_ends_over_spaces() {
        let t = "w w w w w w. x x x x x x x x x x";
        let spans = plan(t, &words(t), 10, 0);
        assert_eq!(spans[0], (0, 7));
    }

    #[test]
    fn overlap_starts_the_next_chunk_before_the_previous_end() {
        let t = (0..100).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let offs = words(&t);
        let spans = plan(&t, &offs, 20, 5);
        for pair in spans.windows(2) {
            assert!(pair[1].0 < pair[0].1 && pair[0].1 - pair[1].0 <= 5, "{pair:?}");
            assert!(pair[1].0 > pair[0].0);
        }
        assert_eq!(spans.last().map(|s| s.1), Some(offs.len()));
        assert!(spans.iter().all(|(a, b)| b - a <= 20));
    }

    #[test]
    fn text_without_boundaries_is_cut_at_the_window() {
        // one token per character, no gaps at all (as CJK text tokenises)
        let t = "漢".repeat(45);
        let offs: Vec<_> = (0..45).map(|i| (i * 3, i * 3 + 3)).collect();
        assert_eq!(plan(&t, &offs, 20, 0), vec![(0, 20), (20, 40), (40, 45)]);
        let with_overlap = plan(&t, &offs, 20, 4);
        assert_eq!(with_overlap[0], (0, 20));
        assert_eq!(with_overlap[1].0, 16);
    }

    #[test]
    fn char_counter_counts_multibyte_characters() {
        let t = "é漢🎉x";
        let mut c = CharCounter::new(t);
        assert_eq!(c.at(2), 1);
        assert_eq!(c.at(5), 2);
        assert_eq!(c.at(t.len()), 4);
        assert_eq!(c.at(0), 0);
    }

    #[test]
    fn content_hash_is_sha256_of_utf8() {
        assert_eq!(
            content_hash("abc").iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
