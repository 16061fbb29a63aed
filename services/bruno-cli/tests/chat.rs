//! A chat turn through the whole fleet: gateway → retriever (LanceDB) →
//! generator → the LLM (a small server in the test speaking Ollama's
//! streaming NDJSON) → gateway; and the turn written back to memory by the
//! embedder and the writer, so the next turn of the session can use it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use bruno_cli::{Config, run_parts};
use bruno_embed::EmbedderInfo;
use bruno_events::EventData;
use bruno_events::payload::{DocFormat, DocumentSubmitted};
use bruno_generator::LlmConfig;
use bruno_store::StoreConfig;
use bruno_system_tests::{
    BrokerKind, Harness, await_indexed, await_ready, open_store, post_event, spawn_fleet,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

type Seen = Arc<Mutex<Vec<Value>>>;

/// Answers from what the prompt holds: the first passage, or the name the
/// user gave in an earlier turn of the session.
async fn ollama(
    State(seen): State<Seen>,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    seen.lock().unwrap().push(body.clone());
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let question = messages
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned();
    if question.contains("Take your time") {
        // Hangs past the gateway's timeout, then answers after all.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let answer = if question.contains("What is my name?") {
        let name = messages
            .iter()
            .filter(|m| m["role"] == "user")
            .filter_map(|m| m["content"].as_str())
            .find_map(|t| {
                t.split("My name is ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
            })
            .map(|n| n.trim_matches(|c: char| !c.is_alphanumeric()).to_owned());
        match name {
            Some(n) => format!("Your name is {n}."),
            None => "I do not know your name.".to_owned(),
        }
    } else {
        let passage = question
            .split("<passage n=\"1\"")
            .nth(1)
            .and_then(|p| p.split_once('\n').map(|(_, rest)| rest))
            .and_then(|p| p.split("\n</passage>").next())
            .unwrap_or("nothing");
        format!("According to [1]: {passage}")
    };
    let words: Vec<String> = answer.split_inclusive(' ').map(str::to_owned).collect();
    let mut lines: Vec<String> = words
        .iter()
        .map(|w| {
            json!({"model": "stub", "message": {"role": "assistant", "content": w}, "done": false})
                .to_string()
        })
        .collect();
    lines.push(
        json!({"model": "stub", "done": true, "prompt_eval_count": 100, "eval_count": words.len()})
            .to_string(),
    );
    let body = lines.join("\n") + "\n";
    axum::response::Response::builder()
        .status(200)
        .body(Body::from(body))
        .unwrap()
}

async fn llm() -> (Seen, String) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/api/chat", axum::routing::post(ollama))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (seen, url)
}

fn info() -> EmbedderInfo {
    EmbedderInfo {
        model: "sentence-transformers/all-MiniLM-L6-v2".into(),
        dimension: 384,
    }
}

async fn chat(gateway: SocketAddr, session: &str, message: &str) -> Value {
    let r = reqwest::Client::new()
        .post(format!("http://{gateway}/v1/chat"))
        .json(&json!({"session_id": session, "message": message}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The whole fleet in this process against `llm_url`.
fn fleet_config(h: &Harness, dir: &tempfile::TempDir, llm_url: String) -> Config {
    let mut config = Config {
        broker: h.config.clone(),
        store: StoreConfig {
            uri: dir.path().display().to_string(),
            read_consistency_ms: 100,
            ..StoreConfig::default()
        },
        backup: bruno_system_tests::backup_config(dir.path()),
        ..Config::default()
    };
    config.ingress.listen = "127.0.0.1:0".parse().unwrap();
    config.gateway.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config.writer.batch_ms = 100;
    config.generator.llm = LlmConfig::Ollama {
        url: llm_url,
        model: "stub".into(),
    };
    config
}

/// Shut the fleet down (it must stop cleanly) and remove the test's queues.
async fn stop(
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    h: Harness,
) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    h.cleanup().await;
}

async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap())
        .unwrap_or(0.0)
}

async fn a_chat_turn_cites_the_ingested_document_and_the_next_turn_remembers(kind: BrokerKind) {
    let h = Harness::on(kind, bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let (seen, url) = llm().await;
    let config = fleet_config(&h, &dir, url);
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = spawn_fleet(
        &h,
        config,
        &bruno_cli::registry::runnable(),
        shutdown.clone(),
        Some(tx),
    );
    let bound = rx.await.unwrap();
    let gateway = bound.gateway.unwrap();

    // Ingest one document and wait until it is searchable.
    let doc = DocumentSubmitted {
        doc_id: "geology.md".into(),
        source: "handbook".into(),
        title: Some("Vorpalite".into()),
        text: "# Vorpalite\n\nVorpalite is a rare blue mineral found in basalt caves.".into(),
        format: DocFormat::Markdown,
        metadata: BTreeMap::new(),
    };
    let status = post_event(
        bound.ingress.unwrap(),
        "doc-1",
        DocumentSubmitted::TYPE,
        &serde_json::to_vec(&doc).unwrap(),
    )
    .await;
    assert_eq!(status, 202);
    assert!(
        await_indexed(dir.path(), "geology.md", Duration::from_secs(30)).await,
        "the document was not indexed"
    );
    let store = open_store(dir.path()).await;
    // The retriever reads with a 100 ms consistency interval.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let a = chat(gateway, "s1", "What is vorpalite?").await;
    assert!(
        a["answer"]
            .as_str()
            .unwrap()
            .contains("Vorpalite is a rare blue mineral"),
        "{a}"
    );
    assert_eq!(a["fallback"], false);
    assert_eq!(a["model"], "stub");
    let citations = a["citations"].as_array().unwrap();
    assert!(
        citations
            .iter()
            .any(|c| c["title"] == "Vorpalite" && c["source"] == "handbook"),
        "{a}"
    );

    // Streamed: the deltas add up to the final answer.
    let body = reqwest::Client::new()
        .post(format!("http://{gateway}/v1/chat/stream"))
        .json(&json!({"session_id": "s1", "message": "What is vorpalite?"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut streamed = String::new();
    let mut done = Value::Null;
    for block in body.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let name = block
            .lines()
            .find_map(|l| l.strip_prefix("event:"))
            .map(str::trim)
            .unwrap_or("");
        let data: Value = serde_json::from_str(
            block
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .unwrap()
                .trim(),
        )
        .unwrap();
        match name {
            "delta" => streamed.push_str(data["text"].as_str().unwrap()),
            "done" => done = data,
            other => panic!("unexpected event {other}: {data}"),
        }
    }
    assert_eq!(done["answer"].as_str().unwrap(), streamed);
    assert!(streamed.contains("Vorpalite is a rare blue mineral"));

    // Memory: the first turn is embedded and written to `conversations` ...
    let first = chat(gateway, "s2", "My name is Ada and I like basalt.").await;
    assert!(!first["answer"].as_str().unwrap().is_empty());
    let mut remembered = false;
    for _ in 0..300 {
        if let Some(t) = store.existing_conversations(&info()).await.unwrap()
            && t.count(Some("s2")).await.unwrap() >= 2
        {
            remembered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        remembered,
        "the first turn never reached the conversations table"
    );
    // The user turn was stored with the retriever's vector of the question
    // (not embedded a second time), and that vector is the model's own.
    let reused = metric(bound.admin, "bruno_embedder_question_vectors_reused_total").await;
    assert!(reused >= 1.0, "no question vector reused");
    let model = bruno_embed::AnyEmbedder::from_config(&Default::default()).unwrap();
    let question = "My name is Ada and I like basalt.".to_owned();
    let fresh = bruno_embed::Embedder::embed(&model, std::slice::from_ref(&question))
        .await
        .unwrap()
        .pop()
        .unwrap();
    let turns = store
        .existing_conversations(&info())
        .await
        .unwrap()
        .unwrap();
    let nearest = turns.related("s2", &fresh, 1).await.unwrap();
    assert_eq!(nearest[0].text, question);
    let cosine: f32 = nearest[0]
        .vector
        .iter()
        .zip(&fresh)
        .map(|(a, b)| a * b)
        .sum();
    assert!(
        cosine > 0.999,
        "stored question vector off: cosine {cosine}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... and the second turn of the session gets it as history.
    let second = chat(gateway, "s2", "What is my name?").await;
    assert_eq!(second["answer"], "Your name is Ada.", "{second}");
    // Another session does not see it.
    let other = chat(gateway, "s3", "What is my name?").await;
    assert_eq!(other["answer"], "I do not know your name.", "{other}");
    let prompts = seen.lock().unwrap().clone();
    assert!(prompts.iter().all(|p| p["messages"][0]["role"] == "system"));

    stop(shutdown, task, h).await;
}

bruno_system_tests::on_both!(a_chat_turn_cites_the_ingested_document_and_the_next_turn_remembers);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_llm_gets_a_504_and_its_late_answer_is_dropped_and_counted() {
    let h = Harness::new(bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_seen, url) = llm().await;
    let mut config = fleet_config(&h, &dir, url);
    config.gateway.chat_timeout_ms = 1000;
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(run_parts(
        config,
        &bruno_cli::registry::runnable(),
        shutdown.clone(),
        Some(tx),
    ));
    let bound = rx.await.unwrap();
    let gateway = bound.gateway.unwrap();
    await_ready(bound.admin).await;

    let r = reqwest::Client::new()
        .post(format!("http://{gateway}/v1/chat"))
        .json(&json!({"session_id": "h", "message": "Take your time: what is basalt?"}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let problem: Value = r.json().await.unwrap();
    assert_eq!(status, 504, "{problem}");
    assert!(problem["correlation_id"].is_string(), "{problem}");
    // The gateway gave up before the LLM (2.5 s) answered.
    assert_eq!(
        metric(bound.admin, "bruno_gateway_late_replies_total").await,
        0.0
    );

    // The LLM answers after all: that completion reaches the gateway late,
    // is dropped and counted.
    let mut late = 0.0;
    for _ in 0..100 {
        late = metric(bound.admin, "bruno_gateway_late_replies_total").await;
        if late >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(late >= 1.0, "the late completion was not counted");
    // Nothing crashed: the next turn is answered.
    let next = chat(gateway, "h", "What is my name?").await;
    assert_eq!(next["answer"], "I do not know your name.", "{next}");

    stop(shutdown, task, h).await;
}
