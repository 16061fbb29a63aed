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
