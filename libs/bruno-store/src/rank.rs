//! Rank fusion and diversity.

use std::collections::HashMap;

use serde::Deserialize;

/// How a search ranks chunks (`[retriever.ranking]`). The defaults are the
/// ones `docs/retrieval.md` measured best on the labelled set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ranking {
    /// Candidates each leg returns per hit asked for...
    pub candidates_per_hit: usize,
    /// ...and at least this many.
    pub min_candidates: usize,
    /// How the two legs are fused.
    pub fusion: Fusion,
    /// RRF's k: a larger k flattens the difference between ranks.
    pub rrf_k: f32,
    /// Weight of the vector leg's reciprocal ranks.
    pub vector_weight: f32,
    /// Weight of the full-text (BM25) leg's reciprocal ranks.
    pub text_weight: f32,
    /// Each candidate also gets this share of the fused scores of the other
    /// candidates of its document (0: chunks stand alone).
    pub document_share: f32,
    /// MMR's λ: 1 keeps the fused order; lower trades relevance for
    /// diversity among the picked chunks.
    pub mmr_lambda: f32,
}

impl Default for Ranking {
    fn default() -> Self {
        Self {
            candidates_per_hit: 4,
            min_candidates: 20,
            fusion: Fusion::MinMax,
            rrf_k: 60.0,
            vector_weight: 1.0,
            text_weight: 1.0,
            document_share: 0.0,
            mmr_lambda: 1.0,
        }
    }
}

/// How the vector and full-text legs are fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Reciprocal Rank Fusion: Σ wᵢ / (k + rankᵢ); ranks only.
    Rrf,
    /// A weighted sum of each leg's own relevance (cosine similarity,
    /// BM25), each scaled to 0..=1 by its best candidate of the query.
    Scores,
    /// The same sum with each leg min-max scaled over its candidates of
    /// the query (its worst candidate 0, its best 1).
    #[default]
    MinMax,
}

impl Ranking {
    /// Candidates each leg returns for `k` hits.
    pub fn candidates(&self, k: usize) -> usize {
        k.saturating_mul(self.candidates_per_hit.max(1))
            .max(self.min_candidates)
            .max(k)
    }

    /// A configuration error, if any.
    pub fn check(&self) -> Result<(), String> {
        let finite = [
            ("rrf_k", self.rrf_k),
            ("vector_weight", self.vector_weight),
            ("text_weight", self.text_weight),
            ("document_share", self.document_share),
            ("mmr_lambda", self.mmr_lambda),
        ];
        for (name, value) in finite {
            if !value.is_finite() || value < 0.0 {
                return Err(format!(
                    "retriever.ranking.{name} must be a number >= 0, not {value}"
                ));
            }
        }
        if self.mmr_lambda > 1.0 {
            return Err(format!(
                "retriever.ranking.mmr_lambda must be within 0..=1, not {}",
                self.mmr_lambda
            ));
        }
        if self.vector_weight + self.text_weight <= 0.0 {
            return Err("retriever.ranking: vector_weight and text_weight cannot both be 0".into());
        }
        Ok(())
    }
}

/// Reciprocal Rank Fusion of ranked id lists: score(d) = Σ 1 / (k + rank).
/// Returns ids with fused scores, best first (ties by id for determinism).
pub fn rrf(lists: &[Vec<String>], k: f32) -> Vec<(String, f32)> {
    let weighted: Vec<(Vec<String>, f32)> = lists.iter().map(|l| (l.clone(), 1.0)).collect();
    rrf_weighted(&weighted, k)
}

/// Weighted RRF: score(d) = Σ wᵢ / (k + rankᵢ(d)), best first (ties by id).
pub fn rrf_weighted(lists: &[(Vec<String>, f32)], k: f32) -> Vec<(String, f32)> {
    let mut scores: HashMap<&str, f32> = HashMap::new();
    for (list, weight) in lists {
        for (rank, id) in list.iter().enumerate() {
            *scores.entry(id.as_str()).or_default() += weight / (k + rank as f32 + 1.0);
        }
    }
    best_first(scores)
}

/// Score fusion: Σ wᵢ · sᵢ(d) / maxᵢ, each leg's relevance scaled by its
/// best candidate (a leg whose best is not positive adds nothing), best
/// first (ties by id).
pub fn fuse_scores(legs: &[(Vec<(String, f32)>, f32)]) -> Vec<(String, f32)> {
    fuse(legs, false)
}

/// Score fusion with each leg min-max scaled over its candidates: Σ wᵢ ·
/// (sᵢ(d) − minᵢ) / (maxᵢ − minᵢ) (a leg whose candidates all score the
/// same gives each 1).
pub fn fuse_min_max(legs: &[(Vec<(String, f32)>, f32)]) -> Vec<(String, f32)> {
    fuse(legs, true)
}

fn fuse(legs: &[(Vec<(String, f32)>, f32)], min_max: bool) -> Vec<(String, f32)> {
    let mut scores: HashMap<&str, f32> = HashMap::new();
    for (leg, weight) in legs {
        let best = leg
            .iter()
            .map(|(_, s)| *s)
            .fold(f32::NEG_INFINITY, f32::max);
        let worst = leg.iter().map(|(_, s)| *s).fold(f32::INFINITY, f32::min);
        for (id, s) in leg {
            let scaled = if min_max {
                if best > worst {
                    (s - worst) / (best - worst)
                } else {
                    1.0
                }
            } else if best > 0.0 {
                (s / best).max(0.0)
            } else {
                0.0
            };
            *scores.entry(id.as_str()).or_default() += weight * scaled;
        }
    }
    best_first(scores)
}

fn best_first(scores: HashMap<&str, f32>) -> Vec<(String, f32)> {
    let mut out: Vec<(String, f32)> = scores
        .into_iter()
        .map(|(id, s)| (id.to_owned(), s))
        .collect();
    sort_best_first(&mut out);
    out
}

fn sort_best_first(scored: &mut [(String, f32)]) {
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
}

/// Document-level aggregation: each candidate's score gains `share` × the
/// sum of the scores of the other candidates of its document (a document
/// that several candidates point at is more likely the one meant), then the
/// list is sorted again. `doc_of` maps a candidate id to its document.
pub fn share_with_document<'a>(
    scored: &mut [(String, f32)],
    doc_of: impl Fn(&str) -> Option<&'a str>,
    share: f32,
) {
    let mut per_doc: HashMap<&str, f32> = HashMap::new();
    for (id, score) in scored.iter() {
        if let Some(doc) = doc_of(id) {
            *per_doc.entry(doc).or_default() += *score;
        }
    }
    for (id, score) in scored.iter_mut() {
        if let Some(total) = doc_of(id).and_then(|d| per_doc.get(d)) {
            *score += share * (total - *score);
        }
    }
    sort_best_first(scored);
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Maximal Marginal Relevance over unit vectors: pick `k` of `candidates`
/// (index, relevance in 0..=1, vector), trading relevance against similarity
/// to what is already picked; `lambda` = 1 is pure relevance.
pub fn mmr(candidates: &[(usize, f32, &[f32])], k: usize, lambda: f32) -> Vec<usize> {
    if lambda >= 1.0 {
        // Pure relevance (the default): the same picks without a single
        // similarity, so the vectors need not even be read.
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by(|&a, &b| {
            candidates[b]
                .1
                .total_cmp(&candidates[a].1)
                .then_with(|| a.cmp(&b))
        });
        return order.into_iter().take(k).map(|c| candidates[c].0).collect();
    }
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

    #[test]
    fn weights_shift_the_fusion() {
        let vector = vec!["a".to_owned(), "b".to_owned()];
        let text = vec!["b".to_owned(), "a".to_owned()];
        let even = rrf_weighted(&[(vector.clone(), 1.0), (text.clone(), 1.0)], 60.0);
        assert_eq!(even[0].1, even[1].1, "a tie when both legs weigh the same");
        let text_heavy = rrf_weighted(&[(vector.clone(), 1.0), (text.clone(), 2.0)], 60.0);
        assert_eq!(text_heavy[0].0, "b");
        let vector_only = rrf_weighted(&[(vector, 1.0), (text, 0.0)], 60.0);
        assert_eq!(vector_only[0].0, "a");
        assert!(vector_only[0].1 > vector_only[1].1);
    }

    #[test]
    fn score_fusion_scales_each_leg_by_its_best() {
        let vector = vec![("a".to_owned(), 0.8), ("b".to_owned(), 0.4)];
        // BM25 is unbounded; scaled by its best it weighs like the vector leg.
        let text = vec![("b".to_owned(), 12.0), ("c".to_owned(), 6.0)];
        let fused = fuse_scores(&[(vector.clone(), 1.0), (text.clone(), 1.0)]);
        let b = fused.iter().find(|(id, _)| id == "b").map(|(_, s)| *s);
        assert_eq!(fused[0].0, "b", "{fused:?}");
        assert_eq!(b, Some(1.5));
        let vector_heavy = fuse_scores(&[(vector, 3.0), (text, 1.0)]);
        assert_eq!(vector_heavy[0].0, "a", "{vector_heavy:?}");
        let nothing = fuse_scores(&[(vec![("z".to_owned(), 0.0)], 1.0)]);
        assert_eq!(nothing, vec![("z".to_owned(), 0.0)]);
        // Min-max: the worst candidate of a leg gets 0, its best 1.
        let spread = fuse_min_max(&[(
            vec![
                ("p".to_owned(), 0.9),
                ("q".to_owned(), 0.8),
                ("r".to_owned(), 0.7),
            ],
            1.0,
        )]);
        let got: Vec<f32> = spread
            .iter()
            .map(|(_, s)| (s * 100.0).round() / 100.0)
            .collect();
        assert_eq!(got, vec![1.0, 0.5, 0.0]);
    }

    #[test]
    fn documents_with_several_candidates_rise() {
        // x1 is best alone; y1 and y2 together point at document y.
        let mut scored = vec![
            ("x1".to_owned(), 1.0),
            ("y1".to_owned(), 0.8),
            ("y2".to_owned(), 0.6),
        ];
        let doc_of = |id: &str| -> Option<&'static str> {
            Some(if id.starts_with('x') { "x" } else { "y" })
        };
        let mut unchanged = scored.clone();
        share_with_document(&mut unchanged, doc_of, 0.0);
        assert_eq!(unchanged[0].0, "x1");
        share_with_document(&mut scored, doc_of, 0.5);
        assert_eq!(scored[0].0, "y1", "{scored:?}");
        assert!((scored[0].1 - 1.1).abs() < 1e-6);
        let x1 = scored.iter().find(|(id, _)| id == "x1").map(|(_, s)| *s);
        assert_eq!(x1, Some(1.0), "x has no other candidate to gain from");
    }

    #[test]
    fn ranking_checks_its_numbers() {
        assert!(Ranking::default().check().is_ok());
        let bad = Ranking {
            mmr_lambda: 1.5,
            ..Ranking::default()
        };
        assert!(bad.check().unwrap_err().contains("mmr_lambda"));
        let none = Ranking {
            vector_weight: 0.0,
            text_weight: 0.0,
            ..Ranking::default()
        };
        assert!(none.check().is_err());
        let nan = Ranking {
            rrf_k: f32::NAN,
            ..Ranking::default()
        };
        assert!(nan.check().is_err());
        assert_eq!(Ranking::default().candidates(5), 20);
        assert_eq!(Ranking::default().candidates(10), 40);
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
                .map(|(i, v)| {
                    // Odd rounds: relevance out of order and with ties.
                    let relevance = if round % 2 == 0 {
                        1.0 / (1.0 + i as f32)
                    } else {
                        ((i * 7) % 5) as f32 / 4.0
                    };
                    (i * 3, relevance, v.as_slice())
                })
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
