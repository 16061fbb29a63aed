//! Rank fusion and diversity.

use std::collections::HashMap;

/// Reciprocal Rank Fusion of ranked id lists: score(d) = Σ 1 / (k + rank).
/// Returns ids with fused scores, best first (ties by id for determinism).
pub fn rrf(lists: &[Vec<String>], k: f32) -> Vec<(String, f32)> {
    let mut scores: HashMap<&str, f32> = HashMap::new();
    for list in lists {
        for (rank, id) in list.iter().enumerate() {
            *scores.entry(id.as_str()).or_default() += 1.0 / (k + rank as f32 + 1.0);
        }
    }
    let mut out: Vec<(String, f32)> = scores
        .into_iter()
        .map(|(id, s)| (id.to_owned(), s))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Maximal Marginal Relevance over unit vectors: pick `k` of `candidates`
/// (index, relevance in 0..=1, vector), trading relevance against similarity
/// to what is already picked; `lambda` = 1 is pure relevance.
pub fn mmr(candidates: &[(usize, f32, &[f32])], k: usize, lambda: f32) -> Vec<usize> {
    // Each candidate left keeps its largest similarity to anything picked
    // so far, updated with the one new pick per round: O(k·n·d), not
    // O(k²·n·d).
    let mut picked: Vec<usize> = Vec::with_capacity(k.min(candidates.len()));
    let mut left: Vec<(usize, f32)> = (0..candidates.len())
        .map(|c| (c, f32::NEG_INFINITY))
        .collect();
    while picked.len() < k && !left.is_empty() {
        let best = left
            .iter()
            .enumerate()
            .map(|(pos, &(c, most_similar))| {
                let redundancy = if picked.is_empty() {
                    0.0
                } else {
                    most_similar.max(0.0)
                };
                (pos, lambda * candidates[c].1 - (1.0 - lambda) * redundancy)
            })
            .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
        let Some((pos, _)) = best else { break };
        let (chosen, _) = left.remove(pos);
        let v = candidates[chosen].2;
        for (c, most_similar) in &mut left {
            *most_similar = most_similar.max(dot(candidates[*c].2, v));
        }
        picked.push(chosen);
    }
    picked.into_iter().map(|c| candidates[c].0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_rewards_agreement() {
        let fused = rrf(
            &[
                vec!["a".into(), "b".into(), "c".into()],
                vec!["b".into(), "d".into()],
            ],
            60.0,
        );
        assert_eq!(fused[0].0, "b");
        assert_eq!(fused.len(), 4);
    }

    /// The definition, recomputing every similarity on each pick.
    fn mmr_by_definition(candidates: &[(usize, f32, &[f32])], k: usize, lambda: f32) -> Vec<usize> {
        let mut picked: Vec<usize> = Vec::new();
        let mut left: Vec<usize> = (0..candidates.len()).collect();
        while picked.len() < k && !left.is_empty() {
            let best = left
                .iter()
                .enumerate()
                .map(|(pos, &c)| {
                    let (_, rel, v) = candidates[c];
                    let redundancy = picked
                        .iter()
                        .map(|&p| dot(v, candidates[p].2))
                        .fold(f32::NEG_INFINITY, f32::max)
                        .max(0.0);
                    let redundancy = if picked.is_empty() { 0.0 } else { redundancy };
                    (pos, lambda * rel - (1.0 - lambda) * redundancy)
                })
                .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
            let Some((pos, _)) = best else { break };
            picked.push(left.remove(pos));
        }
        picked.into_iter().map(|c| candidates[c].0).collect()
    }

    #[test]
    fn mmr_picks_what_the_definition_picks() {
        // Deterministic pseudo-random unit vectors, with near-duplicates.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f32 / 1000.0 - 1.0
        };
        for round in 0..20 {
            let n = 10 + round * 7;
            let mut vectors: Vec<Vec<f32>> = (0..n)
                .map(|_| {
                    let mut v: Vec<f32> = (0..16).map(|_| next()).collect();
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    v.iter_mut().for_each(|x| *x /= norm);
                    v
                })
                .collect();
            vectors[1] = vectors[0].clone();
            let candidates: Vec<(usize, f32, &[f32])> = vectors
                .iter()
                .enumerate()
                .map(|(i, v)| (i * 3, 1.0 / (1.0 + i as f32), v.as_slice()))
                .collect();
            for k in [1, 3, 10, n] {
                for lambda in [0.0, 0.5, 0.7, 1.0] {
                    assert_eq!(
                        mmr(&candidates, k, lambda),
                        mmr_by_definition(&candidates, k, lambda),
                        "n={n} k={k} lambda={lambda}"
                    );
                }
            }
        }
    }

    #[test]
    fn mmr_skips_near_duplicates() {
        let a = [1.0, 0.0];
        let a2 = [0.999, 0.0447];
        let b = [0.0, 1.0];
        let cands = [(0, 1.0, &a[..]), (1, 0.99, &a2[..]), (2, 0.8, &b[..])];
        assert_eq!(mmr(&cands, 2, 0.5), vec![0, 2]);
        assert_eq!(mmr(&cands, 2, 1.0), vec![0, 1]);
        assert_eq!(mmr(&cands, 5, 0.5).len(), 3);
    }
}
