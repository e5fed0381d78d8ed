//! Pure vector arithmetic: mean pooling over the attention mask and L2 normalisation.

/// Mean of the token states of one sequence, counting only positions whose mask is 1.
/// `states` is `seq_len * dims` row-major; `mask` has `seq_len` entries.
pub fn mean_pool(states: &[f32], mask: &[i64], dims: usize) -> Vec<f32> {
    let mut sum = vec![0f32; dims];
    let mut count = 0f32;
    for (row, &m) in states.chunks_exact(dims).zip(mask) {
        if m != 0 {
            for (s, v) in sum.iter_mut().zip(row) {
                *s += v;
            }
            count += 1.0;
        }
    }
    if count > 0.0 {
        sum.iter_mut().for_each(|s| *s /= count);
    }
    sum
}

/// Scale to unit length so that cosine distance is a dot product. A zero vector stays zero
/// (dividing by zero would produce NaNs that pgvector rejects).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Cosine similarity of two vectors of equal length.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_ignores_padding() {
        // two real tokens and one padding token that must not count
        let states = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        let pooled = mean_pool(&states, &[1, 1, 0], 2);
        assert_eq!(pooled, vec![2.0, 3.0]);
    }

    #[test]
    fn mean_pool_of_empty_mask_is_zero() {
        assert_eq!(mean_pool(&[5.0, 5.0], &[0], 2), vec![0.0, 0.0]);
    }

    #[test]
    fn normalize_gives_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut zero = vec![0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }

    #[test]
    fn cosine_of_parallel_and_orthogonal() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-6);
    }
}
