//! `bruno eval` as a regression check on retrieval quality: the labelled
//! set `scripts/build-eval-set.py` builds from the Rust standard library's
//! docs (docs/retrieval.md), ingested into a `bruno dev` on RabbitMQ,
//! measured through the broker and the retriever in each mode, against
//! floors a little under what docs/retrieval.md measured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use bruno_system_tests::{Harness, PartProcess, await_ready};
use serde_json::Value;

/// The set of docs/retrieval.md: 800 documents (about four minutes to
/// ingest in the dev profile on two cores), 300 queries.
const DOCS: &str = "800";
const QUERIES: &str = "300";

/// Floors on the document-level metrics of hybrid search on that set, a
/// little under what it measured (docs/retrieval.md: 0.58, 0.46, 0.74;
/// runs differ by about 0.002), so a drop below them is a regression.
const FLOOR_MRR: f64 = 0.56;
const FLOOR_RECALL_1: f64 = 0.44;
const FLOOR_RECALL_5: f64 = 0.71;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bruno"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A one-shot `bruno` command with `env`: success, stdout, stderr.
async fn bruno(args: &[&str], env: &[(String, String)]) -> (bool, String, String) {
    bruno_system_tests::run_bruno(bin(), args, env).await
}

fn metric(report: &Value, level: &str, name: &str) -> f64 {
    report[level][name]
        .as_f64()
        .unwrap_or_else(|| panic!("{level}.{name} missing: {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_search_on_the_labelled_set_stays_above_its_floors_and_beats_each_leg() {
    let h = Harness::new(bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("set");
    let built = std::process::Command::new("python3")
        .arg(repo().join("scripts/build-eval-set.py"))
        .arg(&set)
        .args(["--docs", DOCS, "--queries", QUERIES])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "build-eval-set.py: {}",
        String::from_utf8_lossy(&built.stderr)
    );

    let mut env: Vec<(String, String)> = bruno_system_tests::broker_env(&h.config)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    for (k, v) in [
        (
            "BRUNO_STORE__URI",
            dir.path().join("lancedb").display().to_string(),
        ),
        ("BRUNO_STORE__READ_CONSISTENCY_MS", "100".to_owned()),
        ("BRUNO_ADMIN__LISTEN", "127.0.0.1:0".to_owned()),
        ("BRUNO_INGRESS__LISTEN", "127.0.0.1:0".to_owned()),
        ("BRUNO_WRITER__BATCH_MS", "100".to_owned()),
        ("BRUNO_LOG__JSON", "true".to_owned()),
    ] {
        env.push((k.to_owned(), v));
    }
    let mut dev = PartProcess::spawn_args(
        bin(),
        &["dev", "--parts", "ingress,embedder,writer,retriever"],
        &env,
    );
    let ingress = dev.listening("ingress").await;
    await_ready(dev.listening("admin").await).await;

    let corpus = set.join("corpus");
    let (ok, out, err) = bruno(
        &[
            "ingest",
            corpus.to_str().unwrap(),
            "--url",
            &format!("http://{ingress}/"),
            "--source",
            "std",
            "--wait",
            "--wait-timeout",
            "900",
        ],
        &env,
    )
    .await;
    assert!(ok, "bruno ingest --wait failed:\n{out}\n{err}");
    assert!(out.contains("0 failed, 0 still pending"), "{out}");

    let queries = set.join("queries.jsonl");
    let mut reports = Vec::new();
    for mode in ["hybrid", "vector", "text"] {
        let (ok, out, err) = bruno(
            &["eval", queries.to_str().unwrap(), "--mode", mode, "--json"],
            &env,
        )
        .await;
        assert!(ok, "bruno eval --mode {mode} failed:\n{out}\n{err}");
        let report: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["mode"], mode);
        assert_eq!(report["failed"], 0, "{report}");
        assert_eq!(
            report["per_query"].as_array().unwrap().len(),
            QUERIES.parse::<usize>().unwrap()
        );
        assert!(metric(&report, "latency", "p50_ms") > 0.0);
        eprintln!(
            "{mode}: MRR@10 {:.4} R@1 {:.3} R@5 {:.3} (document level)",
            metric(&report, "document", "mrr_at_10"),
            metric(&report, "document", "recall_at_1"),
            metric(&report, "document", "recall_at_5"),
        );
        reports.push(report);
    }
    let (hybrid, vector, text) = (&reports[0], &reports[1], &reports[2]);
    let mrr = |r: &Value| metric(r, "document", "mrr_at_10");
    assert!(mrr(hybrid) >= FLOOR_MRR, "hybrid MRR@10 {}", mrr(hybrid));
    assert!(metric(hybrid, "document", "recall_at_1") >= FLOOR_RECALL_1);
    assert!(metric(hybrid, "document", "recall_at_5") >= FLOOR_RECALL_5);
    assert!(
        mrr(hybrid) > mrr(vector) && mrr(hybrid) > mrr(text),
        "hybrid {} does not beat vector {} and text {}",
        mrr(hybrid),
        mrr(vector),
        mrr(text)
    );
    // Chunk level can only be as good as document level or worse: a
    // document's best chunk comes no earlier among chunks than among documents.
    assert!(metric(hybrid, "chunk", "mrr_at_10") <= mrr(hybrid));

    // The human table, and a broken queries file is refused with its line.
    let (ok, out, err) = bruno(&["eval", queries.to_str().unwrap(), "--k", "5"], &env).await;
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("MRR@10") && out.contains("document") && out.contains("p50"),
        "{out}"
    );
    let broken = dir.path().join("broken.jsonl");
    std::fs::write(
        &broken,
        "{\"query\": \"a\", \"relevant\": [\"x.md\"]}\n{\"query\": \"b\"}\n",
    )
    .unwrap();
    let (ok, _, err) = bruno(&["eval", broken.to_str().unwrap()], &env).await;
    assert!(!ok);
    assert!(err.contains("broken.jsonl:2"), "{err}");

    dev.kill().await;
    h.cleanup().await;
}
