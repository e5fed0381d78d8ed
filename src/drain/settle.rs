//! The drain's decisions, as plain data in and out (no SPI, no Postgres): which keys to embed or
//! clear after the lookup, and what becomes of each queue message after the write: ack, retry
//! with back-off, or dead-letter. `drain.rs` does the I/O around these; the unit tests below pin
//! the rules.

use std::collections::{BTreeMap, HashMap, HashSet};

/// One queue message as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: i64,
    pub read_ct: i32,
    /// The source key as canonical JSON text (jsonb output), e.g. `[7]`.
    pub key: String,
}

/// What the lookup (done as the table's owner) found for one distinct key.
#[derive(Debug, Clone, PartialEq)]
pub struct Looked {
    pub key: String,
    /// Row gone, or content NULL / empty / whitespace only.
    pub blank: bool,
    /// Stored vector already matches the content hash and model.
    pub unchanged: bool,
    pub content: Option<String>,
    pub hash: Option<Vec<u8>>,
    /// The lookup itself failed for this key (a policy or domain check raised).
    pub error: Option<String>,
}

/// Work for one pass, decided from the lookup.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// (key, text, content hash), sorted by key so batches are deterministic.
    pub embed: Vec<(String, String, Vec<u8>)>,
    /// Keys whose vector must go (content turned blank, or the row is gone: the foreign key
    /// removed it already, or, without one, the clear does; sql/replica.sql).
    pub clear: Vec<String>,
    /// Keys that failed already, with the error.
    pub failed: HashMap<String, String>,
}

pub fn plan(looked: Vec<Looked>) -> Plan {
    let mut p = Plan::default();
    for l in looked {
        match l {
            Looked { key, error: Some(e), .. } => {
                p.failed.insert(key, e);
            }
            Looked { key, blank: true, .. } => p.clear.push(key),
            Looked { unchanged: true, .. } => {}
            Looked { key, content: Some(text), hash: Some(hash), .. } => p.embed.push((key, text, hash)),
            // not blank yet no content: cannot happen with the lookup's SQL; nothing to do
            Looked { .. } => {}
        }
    }
    p.embed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    p.clear.sort_unstable();
    p
}

/// What happens to each message of a pass.
#[derive(Debug, Default, PartialEq)]
pub struct Settlement {
    /// Messages done with: delete from the queue.
    pub ack: Vec<i64>,
    /// Messages to retry later: (id, seconds until visible again).
    pub retry: Vec<(i64, i32)>,
    /// Messages whose row another session held locked: visible again after a while
    /// (`store::put_off`), this read not counted as an attempt (a lock is not the row's fault: a
    /// row a batch job holds for minutes must not be dead-lettered for it).
    pub busy: Vec<i64>,
    /// Messages given up on: delete from the queue...
    pub dead_ids: Vec<i64>,
    /// ...and record one dead letter per key: (key, error, attempts).
    pub dead_letters: Vec<(String, String, i32)>,
    /// One of this pass's errors, for `status.last_error`.
    pub last_error: Option<String>,
}

/// Back-off before a failed message is read again: 2^attempts seconds, at most a minute.
pub fn backoff_seconds(attempts: i32) -> i32 {
    if attempts >= 6 {
        60
    } else {
        (1i32 << attempts.max(0)).min(60)
    }
}

/// Keys of messages read more than `max_attempts` times: every pass that read them ended without
/// settling them (the process crashed on them, or the write failed each time). They fail without
/// being looked up or embedded again, so `settle` dead-letters them: a row that kills its pass
/// cannot keep killing the worker.
pub fn overdue(messages: &[Message], max_attempts: i32) -> HashMap<String, String> {
    messages
        .iter()
        .filter(|m| m.read_ct > max_attempts)
        .map(|m| {
            (
                m.key.clone(),
                format!(
                    "read {} times without being settled: its pass ended each time (a crash or a failed write)",
                    m.read_ct
                ),
            )
        })
        .collect()
}

/// Settle every message: a key without failure is acked (all its duplicate messages with it); a
/// busy key is put off without an attempt; a failed key is retried with back-off until a message
/// of it has been read `max_attempts` times, then dead-lettered once.
pub fn settle(
    messages: &[Message],
    failed: &HashMap<String, String>,
    busy: &HashSet<String>,
    max_attempts: i32,
) -> Settlement {
    let mut s = Settlement::default();
    let mut dead: BTreeMap<&str, (&str, i32)> = BTreeMap::new();
    for m in messages {
        if busy.contains(&m.key) {
            s.busy.push(m.id);
            continue;
        }
        match failed.get(&m.key) {
            None => s.ack.push(m.id),
            Some(err) if m.read_ct >= max_attempts => {
                s.dead_ids.push(m.id);
                let entry = dead.entry(&m.key).or_insert((err.as_str(), m.read_ct));
                entry.1 = entry.1.max(m.read_ct);
            }
            Some(_) => s.retry.push((m.id, backoff_seconds(m.read_ct))),
        }
    }
    s.dead_letters = dead.into_iter().map(|(k, (e, a))| (k.to_string(), e.to_string(), a)).collect();
    s.last_error = failed.iter().min_by(|a, b| a.0.cmp(b.0)).map(|(_, e)| e.clone());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, read_ct: i32, key: &str) -> Message {
        Message { id, read_ct, key: key.into() }
    }

    fn looked(key: &str, blank: bool, unchanged: bool, content: Option<&str>, error: Option<&str>) -> Looked {
        Looked {
            key: key.into(),
            blank,
            unchanged,
            content: content.map(Into::into),
            hash: content.map(|c| c.as_bytes().to_vec()),
            error: error.map(Into::into),
        }
    }

    #[test]
    fn plan_sorts_keys_into_embed_clear_skip_and_failed() {
        let p = plan(vec![
            looked("[9]", false, false, Some("nine"), None),
            looked("[10]", false, false, Some("ten"), None),
            looked("[2]", true, false, None, None),         // blank or gone
            looked("[3]", false, true, Some("same"), None), // unchanged
            looked("[4]", false, false, None, Some("policy raised")),
        ]);
        assert_eq!(p.embed.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["[10]", "[9]"]);
        assert_eq!(p.embed[1].1, "nine");
        assert_eq!(p.clear, ["[2]"]);
        assert_eq!(p.failed.get("[4]").map(String::as_str), Some("policy raised"));
        assert_eq!(p.failed.len(), 1);
    }

    #[test]
    fn everything_acked_when_nothing_failed() {
        let s = settle(&[msg(1, 1, "[1]"), msg(2, 1, "[1]"), msg(3, 5, "[2]")], &HashMap::new(), &HashSet::new(), 3);
        assert_eq!(s.ack, [1, 2, 3]);
        assert!(s.retry.is_empty() && s.dead_ids.is_empty() && s.dead_letters.is_empty());
        assert_eq!(s.last_error, None);
    }

    #[test]
    fn failures_retry_with_backoff_then_dead_letter_once_per_key() {
        let failed = HashMap::from([("[7]".to_string(), "boom".to_string())]);
        let s = settle(&[msg(1, 1, "[7]"), msg(2, 1, "[8]")], &failed, &HashSet::new(), 3);
        assert_eq!((s.ack.clone(), s.retry.clone()), (vec![2], vec![(1, 2)]));
        assert_eq!(s.last_error.as_deref(), Some("boom"));
        // two messages of the same key at the limit: both deleted, one dead letter
        let s = settle(&[msg(4, 3, "[7]"), msg(5, 4, "[7]")], &failed, &HashSet::new(), 3);
        assert_eq!(s.dead_ids, [4, 5]);
        assert_eq!(s.dead_letters, [("[7]".to_string(), "boom".to_string(), 4)]);
        assert!(s.ack.is_empty() && s.retry.is_empty());
    }

    #[test]
    fn busy_keys_are_put_off_without_an_attempt_even_at_the_limit() {
        let failed = HashMap::from([("[8]".to_string(), "boom".to_string())]);
        let busy = HashSet::from(["[7]".to_string()]);
        let s = settle(&[msg(1, 3, "[7]"), msg(2, 9, "[7]"), msg(3, 1, "[8]"), msg(4, 1, "[9]")], &failed, &busy, 3);
        assert_eq!(s.busy, [1, 2]);
        assert_eq!((s.ack, s.retry), (vec![4], vec![(3, 2)]));
        assert!(s.dead_ids.is_empty() && s.dead_letters.is_empty());
    }

    #[test]
    fn overdue_messages_fail_and_are_dead_lettered_at_once() {
        let over = overdue(&[msg(1, 4, "[1]"), msg(2, 3, "[2]"), msg(3, 1, "[3]")], 3);
        assert_eq!(over.keys().collect::<Vec<_>>(), ["[1]"]);
        let s = settle(&[msg(1, 4, "[1]"), msg(3, 1, "[3]")], &over, &HashSet::new(), 3);
        assert_eq!((s.dead_ids, s.ack), (vec![1], vec![3]));
    }

    #[test]
    fn backoff_doubles_and_is_capped_at_a_minute() {
        assert_eq!([0, 1, 2, 5, 6, 30, i32::MAX].map(backoff_seconds), [1, 2, 4, 32, 60, 60, 60]);
    }
}
