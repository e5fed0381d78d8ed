//! Cutting texts sorted by length into batches. A batch is padded to its longest text, so a batch
//! of mixed lengths computes mostly padding; many small batches each pay a run's fixed cost. The
//! cut minimises padded tokens plus a fixed cost per run over all ways of cutting the sorted list
//! into consecutive batches (a small dynamic programme: rounds hold at most a few hundred texts).
//! A window of 256 texts sorted first leaves little to choose, but a drain pass of eight texts of
//! random lengths cut as one batch padded ~40% more tokens than it embedded (README, "Mixed load").

/// A run's fixed cost, in padded tokens: launching a run, its threads and its small tensors.
const RUN_COST_TOKENS: usize = 64;

/// Ends (exclusive) of the batches of `lengths` (ascending), each at most `max_batch` texts and
/// `max_batch_tokens` padded tokens (a single text may exceed it: it goes alone).
pub fn cut(lengths: &[usize], max_batch: usize, max_batch_tokens: usize) -> Vec<usize> {
    let n = lengths.len();
    // best[i]: least cost of the first i texts; from[i]: where the last batch of that begins
    let mut best = vec![usize::MAX; n + 1];
    let mut from = vec![0; n + 1];
    best[0] = 0;
    for end in 1..=n {
        let longest = lengths[end - 1].max(1);
        for start in (0..end).rev() {
            let rows = end - start;
            if rows > 1 && (rows > max_batch || rows * longest > max_batch_tokens) {
                break;
            }
            let cost = best[start].saturating_add(rows * longest + RUN_COST_TOKENS);
            if cost < best[end] {
                best[end] = cost;
                from[end] = start;
            }
        }
    }
    let mut ends = Vec::new();
    let mut end = n;
    while end > 0 {
        ends.push(end);
        end = from[end];
    }
    ends.reverse();
    ends
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn equal_lengths_go_in_one_batch_up_to_the_limits() {
        assert_eq!(cut(&[20; 10], 64, 2048), vec![10]);
        // (equal lengths: any cut into the fewest batches costs the same)
        assert_eq!(cut(&[20; 10], 4, 2048).len(), 3);
        assert_eq!(cut(&[100; 30], 64, 2048).len(), 2, "20 texts of 100 tokens fill 2048");
    }

    #[test]
    fn mixed_lengths_are_cut_where_padding_costs_more_than_a_run() {
        // four short texts and four window-long ones: two batches, not one padded to 256
        let lengths = [20, 22, 25, 30, 250, 252, 255, 256];
        assert_eq!(cut(&lengths, 64, 2048), vec![4, 8]);
        // close lengths stay together
        assert_eq!(cut(&[100, 104, 110, 118], 64, 2048), vec![4]);
    }

    #[test]
    fn a_text_over_the_token_limit_goes_alone_and_nothing_is_lost() {
        assert_eq!(cut(&[10, 3000], 64, 2048), vec![1, 2]);
        assert!(cut(&[], 64, 2048).is_empty());
        let lengths: Vec<usize> = (1..=200).map(|i| i * 2).collect();
        let ends = cut(&lengths, 64, 2048);
        assert_eq!(*ends.last().unwrap(), 200);
        let mut start = 0;
        for &end in &ends {
            assert!(end > start && end - start <= 64 && (end - start) * lengths[end - 1] <= 2048);
            start = end;
        }
    }
}
