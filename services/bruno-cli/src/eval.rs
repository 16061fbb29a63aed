//! `bruno eval`: how well the fleet finds what a labelled query set says
//! it should, measured through the broker and the retriever exactly as the
//! gateway searches.
//!
//! The queries file is JSON Lines, one query per line:
//! `{"query": "...", "relevant": ["doc id", ...]}`, or with graded
//! relevance `{"query": "...", "relevant": {"doc id": 2, "other": 1}}`.
//! An id names a document (or a chunk, by chunk id). A document id matches
//! a hit's document when it is the same or a path suffix of it
//! (`std/vec/struct.Vec.md` matches `corpus/std/vec/struct.Vec.md`), so a
//! set written relative to a directory works wherever it was ingested from.
//!
//! Measured at two levels:
//! - **document**: the hits collapsed to documents, each document at the
//!   place of its best chunk;
//! - **chunk**: the hits as they are, each labelled item found at its first
//!   matching chunk.
//!
//! Metrics at each: MRR@10, nDCG@10 (linear gains), Recall@1/5/10 (the
//! share of a query's relevant items found within that rank), averaged
//! over the queries, and the latency of each search round trip.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bruno_broker::Broker;
use bruno_broker::reply::Inbox;
use bruno_events::EventData;
use bruno_events::payload::{
    SearchCompleted, SearchFilters, SearchHit, SearchMode, SearchRequested,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// One labelled query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// What is asked.
    pub query: String,
    /// Relevant document (or chunk) ids with their grades (> 0).
    pub relevant: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Relevant {
    Ids(Vec<String>),
    Graded(BTreeMap<String, f64>),
}

#[derive(Deserialize)]
struct Line {
    query: String,
    relevant: Relevant,
}

/// Parse a queries file; errors name the line.
pub fn parse(text: &str, name: &str) -> anyhow::Result<Vec<Query>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("{name}:{}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: expected {{\"query\": \"...\", \"relevant\": [\"doc id\", ...]}}",
                at()
            )
        })?;
        anyhow::ensure!(!parsed.query.trim().is_empty(), "{}: empty query", at());
        let relevant: BTreeMap<String, f64> = match parsed.relevant {
            Relevant::Ids(ids) => ids.into_iter().map(|id| (id, 1.0)).collect(),
            Relevant::Graded(graded) => graded,
        };
        anyhow::ensure!(
            !relevant.is_empty(),
            "{}: \"relevant\" lists no document",
            at()
        );
        for (id, grade) in &relevant {
            anyhow::ensure!(!id.trim().is_empty(), "{}: an empty relevant id", at());
            anyhow::ensure!(
                grade.is_finite() && *grade > 0.0,
                "{}: the grade of {id:?} must be a number > 0, not {grade}",
                at()
            );
        }
        out.push(Query {
            query: parsed.query,
            relevant,
        });
    }
    anyhow::ensure!(!out.is_empty(), "{name}: no queries");
    Ok(out)
}

/// Whether labelled id `id` names the document `doc_id` (same, or a path
/// suffix of it).
pub fn names_document(id: &str, doc_id: &str) -> bool {
    doc_id == id
        || (doc_id.len() > id.len()
            && doc_id.ends_with(id)
            && doc_id.as_bytes()[doc_id.len() - id.len() - 1] == b'/')
}

/// The ranks (1-based) at which each relevant item of `query` was found in
/// `hits`, at document and at chunk level.
pub fn ranks(
    query: &Query,
    hits: &[SearchHit],
) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let mut documents: Vec<&str> = Vec::new();
    let mut by_document = HashMap::new();
    let mut by_chunk = HashMap::new();
    for (i, hit) in hits.iter().enumerate() {
        let document_rank = match documents.iter().position(|d| *d == hit.doc_id) {
            Some(p) => p + 1,
            None => {
                documents.push(&hit.doc_id);
                documents.len()
            }
        };
        for id in query.relevant.keys() {
            if *id == hit.chunk_id || names_document(id, &hit.doc_id) {
                by_document.entry(id.clone()).or_insert(document_rank);
                by_chunk.entry(id.clone()).or_insert(i + 1);
            }
        }
    }
    (by_document, by_chunk)
}

/// Retrieval metrics averaged over queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Mean reciprocal rank of the first relevant item within 10.
    pub mrr_at_10: f64,
    /// Normalised discounted cumulative gain within 10.
    pub ndcg_at_10: f64,
    /// Share of relevant items at rank 1.
    pub recall_at_1: f64,
    /// Within 5.
    pub recall_at_5: f64,
    /// Within 10.
    pub recall_at_10: f64,
}

/// The metrics of one query from the ranks its items were found at.
pub fn score(query: &Query, found: &HashMap<String, usize>) -> Metrics {
    let first = found.values().copied().filter(|r| *r <= 10).min();
    let dcg: f64 = found
        .iter()
        .filter(|(_, r)| **r <= 10)
        .map(|(id, r)| query.relevant.get(id).copied().unwrap_or(0.0) / ((*r as f64) + 1.0).log2())
        .sum();
    let mut grades: Vec<f64> = query.relevant.values().copied().collect();
    grades.sort_by(|a, b| b.total_cmp(a));
    let ideal: f64 = grades
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, g)| g / ((i as f64) + 2.0).log2())
        .sum();
    let total = query.relevant.len() as f64;
    let within = |k: usize| found.values().filter(|r| **r <= k).count() as f64 / total;
    Metrics {
        mrr_at_10: first.map_or(0.0, |r| 1.0 / r as f64),
        ndcg_at_10: if ideal > 0.0 { dcg / ideal } else { 0.0 },
        recall_at_1: within(1),
        recall_at_5: within(5),
        recall_at_10: within(10),
    }
}

fn mean(all: &[Metrics]) -> Metrics {
    let n = all.len().max(1) as f64;
    let sum = |f: fn(&Metrics) -> f64| all.iter().map(f).sum::<f64>() / n;
    Metrics {
        mrr_at_10: sum(|m| m.mrr_at_10),
        ndcg_at_10: sum(|m| m.ndcg_at_10),
        recall_at_1: sum(|m| m.recall_at_1),
        recall_at_5: sum(|m| m.recall_at_5),
        recall_at_10: sum(|m| m.recall_at_10),
    }
}

/// Latency of the search round trips, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

fn latency(samples: &mut [Duration]) -> Latency {
    if samples.is_empty() {
        return Latency::default();
    }
    samples.sort();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1].as_secs_f64() * 1e3
    };
    Latency {
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        mean_ms: samples.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3
            / samples.len() as f64,
    }
}

/// One query's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct QueryOutcome {
    /// The query.
    pub query: String,
    /// The best rank of a relevant document (None: not in the hits).
    pub document_rank: Option<usize>,
    /// The best rank of a relevant chunk.
    pub chunk_rank: Option<usize>,
    /// The first hit's document.
    pub top_document: Option<String>,
    /// The round trip, in milliseconds.
    pub latency_ms: f64,
    /// Why the search failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Queries asked.
    pub queries: usize,
    /// Searches that got no answer (they count as misses).
    pub failed: usize,
    /// The ranking measured.
    pub mode: SearchMode,
    /// Chunks asked for per query.
    pub k: u32,
    /// Document-level metrics.
    pub document: Metrics,
    /// Chunk-level metrics.
    pub chunk: Metrics,
    /// Search round trips.
    pub latency: Latency,
    /// Each query.
    pub per_query: Vec<QueryOutcome>,
}

/// How to run the queries.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Which ranking.
    pub mode: SearchMode,
    /// Chunks per query.
    pub k: u32,
    /// Searches in flight.
    pub concurrency: usize,
    /// How long one search may take.
    pub timeout: Duration,
}

async fn search(
    broker: &Broker,
    inbox: &Inbox,
    request: &SearchRequested,
    timeout: Duration,
) -> Result<Vec<SearchHit>, String> {
    let event = bruno_events::new_event("bruno/eval", request);
    let reply = inbox
        .request(broker, event, &[SearchCompleted::TYPE], timeout)
        .await
        .map_err(|e| e.to_string())?;
    let done: SearchCompleted = bruno_events::decode_data(&reply).map_err(|e| e.to_string())?;
    Ok(done.hits)
}

/// Run every query through `broker` and score the hits; `progress` is
/// called once per query answered.
pub async fn run(
    broker: &Broker,
    queries: &[Query],
    settings: &Settings,
    progress: impl Fn(),
) -> anyhow::Result<Report> {
    let stop = tokio_util::sync::CancellationToken::new();
    let inbox = Inbox::start(
        broker.clone(),
        vec![SearchCompleted::TYPE.to_owned()],
        stop.clone(),
    );
    let ready_by = Instant::now() + settings.timeout;
    while !inbox.is_ready() {
        if Instant::now() >= ready_by {
            stop.cancel();
            anyhow::bail!(
                "the reply queue was not ready within {:?}",
                settings.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcomes: Vec<(usize, Duration, Result<Vec<SearchHit>, String>)> =
        futures_util::stream::iter(queries.iter().enumerate())
            .map(|(i, q)| {
                let inbox = &inbox;
                let request = SearchRequested {
                    query: q.query.clone(),
                    k: settings.k,
                    filters: SearchFilters::default(),
                    mode: settings.mode,
                };
                async move {
                    let started = Instant::now();
                    let hits = search(broker, inbox, &request, settings.timeout).await;
                    (i, started.elapsed(), hits)
                }
            })
            .buffer_unordered(settings.concurrency.max(1))
            .inspect(|_| progress())
            .collect()
            .await;
    stop.cancel();

    let mut sorted = outcomes;
    sorted.sort_by_key(|(i, _, _)| *i);
    let mut documents = Vec::with_capacity(queries.len());
    let mut chunks = Vec::with_capacity(queries.len());
    let mut latencies = Vec::with_capacity(queries.len());
    let mut per_query = Vec::with_capacity(queries.len());
    let mut failed = 0;
    for (i, elapsed, result) in sorted {
        let query = &queries[i];
        let (hits, error) = match result {
            Ok(hits) => {
                latencies.push(elapsed);
                (hits, None)
            }
            Err(e) => {
                failed += 1;
                (Vec::new(), Some(e))
            }
        };
        let (by_document, by_chunk) = ranks(query, &hits);
        documents.push(score(query, &by_document));
        chunks.push(score(query, &by_chunk));
        per_query.push(QueryOutcome {
            query: query.query.clone(),
            document_rank: by_document.values().copied().min(),
            chunk_rank: by_chunk.values().copied().min(),
            top_document: hits.first().map(|h| h.doc_id.clone()),
            latency_ms: elapsed.as_secs_f64() * 1e3,
            error,
        });
    }
    Ok(Report {
        queries: queries.len(),
        failed,
        mode: settings.mode,
        k: settings.k,
        document: mean(&documents),
        chunk: mean(&chunks),
        latency: latency(&mut latencies),
        per_query,
    })
}

/// The report as a table.
pub fn table(report: &Report) -> String {
    let row = |level: &str, m: &Metrics| {
        format!(
            "{level:<9} {:>7.4} {:>8.4} {:>6.3} {:>6.3} {:>6.3}\n",
            m.mrr_at_10, m.ndcg_at_10, m.recall_at_1, m.recall_at_5, m.recall_at_10
        )
    };
    let mut out = format!(
        "{} queries, mode {}, k {}{}\n{:<9} {:>7} {:>8} {:>6} {:>6} {:>6}\n",
        report.queries,
        report.mode.as_str(),
        report.k,
        if report.failed > 0 {
            format!(", {} FAILED (counted as misses)", report.failed)
        } else {
            String::new()
        },
        "level",
        "MRR@10",
        "nDCG@10",
        "R@1",
        "R@5",
        "R@10"
    );
    out += &row("document", &report.document);
    out += &row("chunk", &report.chunk);
    out += &format!(
        "latency   p50 {:.1} ms, p99 {:.1} ms, mean {:.1} ms\n",
        report.latency.p50_ms, report.latency.p99_ms, report.latency.mean_ms
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(chunk: &str, doc: &str) -> SearchHit {
        SearchHit {
            chunk_id: chunk.into(),
            doc_id: doc.into(),
            title: None,
            source: "s".into(),
            text: String::new(),
            score: 0.0,
        }
    }

    #[test]
    fn lines_parse_with_lists_or_grades_and_errors_name_the_line() {
        let text = "{\"query\": \"a\", \"relevant\": [\"x.md\"]}\n\n{\"query\": \"b\", \"relevant\": {\"y.md\": 2, \"z.md\": 1}}\n";
        let q = parse(text, "q.jsonl").unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].relevant, BTreeMap::from([("x.md".to_owned(), 1.0)]));
        assert_eq!(q[1].relevant.get("y.md"), Some(&2.0));
        for (bad, wanted) in [
            ("{\"query\": \"a\"}", "q.jsonl:1: expected"),
            (
                "{\"query\": \"\", \"relevant\": [\"x\"]}",
                "q.jsonl:1: empty query",
            ),
            ("{\"query\": \"a\", \"relevant\": []}", "lists no document"),
            (
                "{\"query\": \"a\", \"relevant\": {\"x\": 0}}",
                "must be a number > 0",
            ),
            ("not json", "q.jsonl:1"),
            ("", "no queries"),
        ] {
            let e = parse(bad, "q.jsonl").unwrap_err();
            assert!(format!("{e:#}").contains(wanted), "{bad}: {e:#}");
        }
        let e = parse("{\"query\": \"a\", \"relevant\": [\"x\"]}\nnope", "q.jsonl").unwrap_err();
        assert!(format!("{e:#}").starts_with("q.jsonl:2"), "{e:#}");
    }

    #[test]
    fn ids_match_documents_by_path_suffix() {
        assert!(names_document("a/b.md", "a/b.md"));
        assert!(names_document("a/b.md", "/tmp/corpus/a/b.md"));
        assert!(!names_document("b.md", "a/xb.md"));
        assert!(!names_document("a/b.md", "b.md"));
    }

    #[test]
    fn documents_count_at_their_best_chunk_and_chunks_as_they_come() {
        let q = Query {
            query: "q".into(),
            relevant: BTreeMap::from([("d2".to_owned(), 1.0)]),
        };
        // d1 twice, then d2: d2 is the 2nd document but the 3rd chunk.
        let hits = [
            hit("c1", "d1"),
            hit("c2", "d1"),
            hit("c3", "d2"),
            hit("c4", "d2"),
        ];
        let (by_document, by_chunk) = ranks(&q, &hits);
        assert_eq!(by_document.get("d2"), Some(&2));
        assert_eq!(by_chunk.get("d2"), Some(&3));
        let d = score(&q, &by_document);
        assert_eq!(d.mrr_at_10, 0.5);
        assert_eq!(d.recall_at_1, 0.0);
        assert_eq!(d.recall_at_5, 1.0);
        assert!((d.ndcg_at_10 - 1.0 / 3f64.log2()).abs() < 1e-12);
        let c = score(&q, &by_chunk);
        assert!((c.mrr_at_10 - 1.0 / 3.0).abs() < 1e-12);
        // A chunk id is an item of its own.
        let q = Query {
            query: "q".into(),
            relevant: BTreeMap::from([("c2".to_owned(), 1.0)]),
        };
        let (by_document, by_chunk) = ranks(&q, &hits);
        assert_eq!(
            (by_document.get("c2"), by_chunk.get("c2")),
            (Some(&1), Some(&2))
        );
    }

    #[test]
    fn graded_ndcg_and_partial_recall() {
        let q = Query {
            query: "q".into(),
            relevant: BTreeMap::from([("a".to_owned(), 2.0), ("b".to_owned(), 1.0)]),
        };
        // b first, a second: below the ideal order.
        let (by_document, _) = ranks(&q, &[hit("1", "b"), hit("2", "a")]);
        let m = score(&q, &by_document);
        let ideal = 2.0 + 1.0 / 3f64.log2();
        let got = 1.0 + 2.0 / 3f64.log2();
        assert!((m.ndcg_at_10 - got / ideal).abs() < 1e-12);
        assert_eq!(m.recall_at_1, 0.5);
        assert_eq!(m.recall_at_5, 1.0);
        let nothing = score(&q, &HashMap::new());
        assert_eq!(nothing, Metrics::default());
        let mut samples = vec![
            Duration::from_millis(3),
            Duration::from_millis(1),
            Duration::from_millis(2),
        ];
        let l = latency(&mut samples);
        assert_eq!((l.p50_ms, l.p99_ms), (2.0, 3.0));
    }
}
