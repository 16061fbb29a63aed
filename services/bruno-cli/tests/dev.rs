//! `bruno dev` with nothing installed (ADR 14): no `broker.url`, so the
//! embedded broker, journaled to a temp dir. A newcomer's path, from
//! outside, through the real binary: ingest the repo's `docs/` and wait
//! until searchable, `bruno search`, a cited answer from `/v1/chat`, `bruno
//! dlq list`; and a `bruno dev` killed with SIGKILL while documents wait in
//! its queues indexes them after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use bruno_events::EventData;
use bruno_events::payload::{DocFormat, DocumentSubmitted};
use bruno_system_tests::{PartProcess, await_indexed, await_ready, post_event};
use serde_json::{Value, json};

/// An OpenAI-compatible server that answers every chat with a citation.
async fn llm() -> SocketAddr {
    async fn complete() -> axum::response::Response {
        let mut sse = String::new();
        for piece in ["The journal ", "keeps confirmed messages [1]."] {
            sse.push_str(&format!(
                "data: {}\n\n",
                json!({"choices": [{"delta": {"content": piece}}]})
            ));
        }
        sse.push_str("data: [DONE]\n\n");
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(sse))
            .unwrap()
    }
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(complete));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bruno"))
}

/// The environment of a `bruno dev` in `dir` with no broker URL at all.
fn dev_env(dir: &Path, llm: SocketAddr) -> Vec<(String, String)> {
    [
        (
            "BRUNO_BROKER__EMBEDDED_DIR",
            dir.join("broker").display().to_string(),
        ),
        ("BRUNO_BROKER__RETRY_DELAYS_MS", "[300, 600]".to_owned()),
        (
            "BRUNO_STORE__URI",
            dir.join("lancedb").display().to_string(),
        ),
        ("BRUNO_STORE__READ_CONSISTENCY_MS", "100".to_owned()),
        ("BRUNO_ADMIN__LISTEN", "127.0.0.1:0".to_owned()),
        ("BRUNO_INGRESS__LISTEN", "127.0.0.1:0".to_owned()),
        ("BRUNO_GATEWAY__LISTEN", "127.0.0.1:0".to_owned()),
        ("BRUNO_WRITER__BATCH_MS", "100".to_owned()),
        ("BRUNO_LOG__JSON", "true".to_owned()),
        ("BRUNO_GENERATOR__LLM__BACKEND", "openai".to_owned()),
        ("BRUNO_GENERATOR__LLM__URL", format!("http://{llm}")),
        ("BRUNO_GENERATOR__LLM__MODEL", "stub".to_owned()),
        (
            "BRUNO_BACKUP__TARGET",
            dir.join("backups").display().to_string(),
        ),
        (
            "BRUNO_BACKUP__KEY_FILE",
            dir.join("backup.key").display().to_string(),
        ),
        (
            "BRUNO_BACKUP__WORK_DIR",
            dir.join("backup-work").display().to_string(),
        ),
        ("BRUNO_BACKUP__INTERVAL_MINUTES", "0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A one-shot `bruno` command with `env`: success, stdout, stderr.
async fn bruno(args: &[&str], env: &[(String, String)]) -> (bool, String, String) {
    bruno_system_tests::run_bruno(bin(), args, env).await
}

fn repo_docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

fn doc(id: &str, text: &str) -> Vec<u8> {
    serde_json::to_vec(&DocumentSubmitted {
        doc_id: id.into(),
        source: "handbook".into(),
        title: Some(id.into()),
        text: text.into(),
        format: DocFormat::Markdown,
        metadata: Default::default(),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bruno_dev_without_rabbitmq_ingests_answers_searches_and_survives_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let llm = llm().await;
    let env = dev_env(dir.path(), llm);

    // Only the ingress: accepted documents wait in the embedder's queue,
    // journaled. Then SIGKILL, with no chance to flush anything.
    let mut front = PartProcess::spawn_args(bin(), &["dev", "--parts", "ingress"], &env);
    let ingress = front.listening("ingress").await;
    await_ready(front.listening("admin").await).await;
    assert!(
        front
            .lines()
            .iter()
            .any(|l| l.contains("embedded broker running")),
        "{:?}",
        front.lines()
    );
    let waiting = [
        (
            "kept-1.md",
            "Obsidian is volcanic glass that forms when lava cools fast.",
        ),
        (
            "kept-2.md",
            "Pumice is a light volcanic rock full of gas bubbles.",
        ),
        (
            "kept-3.md",
            "Tuff is rock made of consolidated volcanic ash.",
        ),
    ];
    for (id, text) in waiting {
        let status = post_event(ingress, id, DocumentSubmitted::TYPE, &doc(id, text)).await;
        assert_eq!(status, 202, "{id}");
    }
    front.kill().await;

    // The whole fleet on the same directories: the journal gives the
    // embedder what the killed process had accepted.
    let mut dev = PartProcess::spawn_args(bin(), &["dev"], &env);
    let ingress = dev.listening("ingress").await;
    let gateway = dev.listening("gateway").await;
    await_ready(dev.listening("admin").await).await;
    for (id, _) in waiting {
        assert!(
            await_indexed(&dir.path().join("lancedb"), id, Duration::from_secs(60)).await,
            "{id}, accepted before the kill, was never indexed:\n{}",
            dev.lines().join("\n")
        );
    }

    // The README's first steps: ingest the docs and wait until searchable.
    let docs = repo_docs();
    let (ok, out, err) = bruno(
        &[
            "ingest",
            docs.to_str().unwrap(),
            "--url",
            &format!("http://{ingress}/"),
            "--wait",
            "--wait-timeout",
            "300",
        ],
        &env,
    )
    .await;
    assert!(ok, "bruno ingest --wait failed:\n{out}\n{err}");
    assert!(out.contains("0 failed, 0 still pending"), "{out}");

    let (ok, out, err) = bruno(
        &["search", "embedded broker journal durability", "--json"],
        &env,
    )
    .await;
    assert!(ok, "bruno search failed:\n{out}\n{err}");
    let found: Value = serde_json::from_str(&out).unwrap();
    let hits = found["hits"].as_array().unwrap();
    assert!(!hits.is_empty(), "{out}");
    assert!(
        hits.iter()
            .take(3)
            .any(|h| h["doc_id"].as_str().unwrap().contains("embedded-broker")),
        "the embedded-broker ADR is not among the top hits: {out}"
    );

    let answer: Value = reqwest::Client::new()
        .post(format!("http://{gateway}/v1/chat"))
        .json(&json!({"session_id": "newcomer", "message": "What does the embedded broker's journal keep?"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["answer"], "The journal keeps confirmed messages [1].",
        "{answer}"
    );
    let citations = answer["citations"].as_array().unwrap();
    assert!(!citations.is_empty(), "{answer}");

    let (ok, out, err) = bruno(&["dlq", "list", "--part", "embedder", "--json"], &env).await;
    assert!(ok, "bruno dlq list failed:\n{out}\n{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));

    dev.kill().await;
}

#[tokio::test]
async fn without_broker_url_single_parts_and_commands_say_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![(
        "BRUNO_BROKER__EMBEDDED_DIR".to_owned(),
        dir.path().join("broker").display().to_string(),
    )];
    let (ok, _, err) = bruno(&["writer"], &env).await;
    assert!(!ok);
    assert!(
        err.contains("broker.url is not set") && err.contains("only `bruno dev`"),
        "{err}"
    );
    // Push mode needs no broker.url: a push-mode consumer only publishes,
    // to the Knative Broker (ADR 15).
    let mut push_env = env.clone();
    for (k, v) in [
        ("BRUNO_CONSUMERS__PUSH_LISTEN", "127.0.0.1:0"),
        ("BRUNO_BROKER__PUBLISH_URL", "http://127.0.0.1:9/"),
        ("BRUNO_ADMIN__LISTEN", "127.0.0.1:0"),
        ("BRUNO_LOG__JSON", "true"),
    ] {
        push_env.push((k.to_owned(), v.to_owned()));
    }
    let mut generator = PartProcess::spawn_args(bin(), &["generator"], &push_env);
    let served = generator.listening("generator").await;
    let ready = reqwest::get(format!("http://{served}/ready"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    generator.kill().await;
    let (ok, _, err) = bruno(&["search", "anything"], &env).await;
    assert!(!ok);
    assert!(
        err.contains("no bruno dev runs its embedded broker") && err.contains("broker.url"),
        "{err}"
    );
}
