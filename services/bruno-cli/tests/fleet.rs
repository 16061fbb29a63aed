//! The fleet as an operator runs it: one `bruno <part>` process per part,
//! exporting traces to an OTLP receiver inside the test and logging JSON
//! lines. One ingested document and one chat turn must each be one trace
//! across every process; secrets and personal data fed in through config,
//! URLs and requests must never reach a log line; every part's `/metrics`
//! must parse and move; nothing may land in the unroutable queue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use bruno_events::EventData;
use bruno_events::payload::{DocFormat, DocumentSubmitted};
use bruno_system_tests::{
    Harness, OtlpReceiver, PartProcess, ReceivedSpan, assert_one_tree, await_indexed, await_ready,
    metrics_text, parse_prometheus, post_event,
};
use serde_json::{Value, json};

const API_KEY: &str = "sk-bruno-test-0123456789abcdefXYZ";
const URL_PASSWORD: &str = "hunter2-pass";
const EMAIL: &str = "ada.lovelace@example.com";
const CLIENT_IP: &str = "203.0.113.7";

/// An OpenAI-compatible server: streams a fixed answer with its usage, or,
/// for a message containing FAIL, fails with a body that echoes the
/// request's Authorization header and the user's message, as some
/// upstreams do.
async fn openai(
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if last.contains("FAIL") {
        let tail: String = last
            .chars()
            .rev()
            .take(120)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return axum::response::Response::builder()
            .status(502)
            .body(Body::from(format!(
                "upstream rejected Authorization: {auth} for {tail}"
            )))
            .unwrap();
    }
    let mut sse = String::new();
    for piece in ["According ", "to [1]: ", "ok."] {
        sse.push_str(&format!(
            "data: {}\n\n",
            json!({"choices": [{"delta": {"content": piece}}]})
        ));
    }
    sse.push_str(&format!(
        "data: {}\n\ndata: [DONE]\n\n",
        json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}})
    ));
    axum::response::Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from(sse))
        .unwrap()
}

async fn llm() -> SocketAddr {
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(openai));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn attr<'a>(span: &'a ReceivedSpan, key: &str) -> Option<&'a str> {
    span.attributes.get(key).map(String::as_str)
}

/// Wait until no new span arrived for a while, then return the trace.
async fn settled(otlp: &OtlpReceiver, trace_id: &str) -> Vec<ReceivedSpan> {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let spans = otlp.trace(trace_id);
        if spans.len() == last {
            return spans;
        }
        last = spans.len();
    }
}

async fn scrape(admin: SocketAddr) -> Vec<bruno_system_tests::Sample> {
    parse_prometheus(&metrics_text(admin).await)
}

fn value(samples: &[bruno_system_tests::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_turn_and_document_across_processes_with_clean_logs_and_moving_metrics() {
    let h = Harness::new(bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let otlp = OtlpReceiver::start().await;
    let llm = llm().await;

    let mut env: Vec<(String, String)> = bruno_system_tests::broker_env(&h.config)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    for (k, v) in [
        ("BRUNO_BROKER__QUEUE_STATS_MS", "200".to_owned()),
        ("BRUNO_STORE__URI", dir.path().display().to_string()),
        ("BRUNO_STORE__READ_CONSISTENCY_MS", "100".to_owned()),
        ("BRUNO_ADMIN__LISTEN", "127.0.0.1:0".to_owned()),
        ("BRUNO_INGRESS__LISTEN", "127.0.0.1:0".to_owned()),
        ("BRUNO_GATEWAY__LISTEN", "127.0.0.1:0".to_owned()),
        ("BRUNO_WRITER__BATCH_MS", "100".to_owned()),
        ("BRUNO_LOG__JSON", "true".to_owned()),
        (
            "BRUNO_LOG__FILTER",
            "info,bruno=debug,lapin=warn".to_owned(),
        ),
        ("BRUNO_TELEMETRY__OTLP_ENDPOINT", otlp.endpoint.clone()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("BRUNO_GENERATOR__LLM__BACKEND", "openai".to_owned()),
        (
            "BRUNO_GENERATOR__LLM__URL",
            format!("http://bruno:{URL_PASSWORD}@{llm}"),
        ),
        ("BRUNO_GENERATOR__LLM__MODEL", "stub".to_owned()),
        ("BRUNO_GENERATOR__LLM__API_KEY", API_KEY.to_owned()),
        (
            "BRUNO_BACKUP__TARGET",
            dir.path().join("backups").display().to_string(),
        ),
        (
            "BRUNO_BACKUP__KEY_FILE",
            dir.path().join("backup.key").display().to_string(),
        ),
        (
            "BRUNO_BACKUP__WORK_DIR",
            dir.path().join("backup-work").display().to_string(),
        ),
        ("BRUNO_BACKUP__INTERVAL_MINUTES", "0".to_owned()),
    ] {
        env.push((k.to_owned(), v));
    }
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_bruno"));
    let mut fleet: Vec<PartProcess> = [
        "ingress",
        "gateway",
        "embedder",
        "writer",
        "retriever",
        "generator",
        "backup",
    ]
    .iter()
    .map(|p| PartProcess::spawn(bin, p, &env))
    .collect();
    let ingress = fleet[0].listening("ingress").await;
    let gateway = fleet[1].listening("gateway").await;
    let mut admins = BTreeMap::new();
    for p in &mut fleet {
        admins.insert(p.part.clone(), p.listening("admin").await);
    }
    for admin in admins.values() {
        await_ready(*admin).await;
    }
    let client = reqwest::Client::new();

    // One document: ingress → embedder → writer is one trace.
    let doc = DocumentSubmitted {
        doc_id: "basalt.md".into(),
        source: "handbook".into(),
        title: Some("Basalt".into()),
        text: "# Basalt\n\nBasalt is a dark volcanic rock formed from lava.".into(),
        format: DocFormat::Markdown,
        metadata: BTreeMap::new(),
    };
    let status = post_event(
        ingress,
        "trace-doc-1",
        DocumentSubmitted::TYPE,
        &serde_json::to_vec(&doc).unwrap(),
    )
    .await;
    assert_eq!(status, 202);
    assert!(
        await_indexed(dir.path(), "basalt.md", Duration::from_secs(60)).await,
        "the document was not indexed"
    );
    let mut doc_trace = None;
    for _ in 0..100 {
        doc_trace = otlp
            .spans()
            .into_iter()
            .find(|s| {
                s.service == "bruno-ingress"
                    && s.kind == 4
                    && attr(s, "messaging.message.id") == Some("trace-doc-1")
            })
            .map(|s| s.trace_id);
        if doc_trace.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let doc_trace = doc_trace.expect("no producer span of the ingress for the document");
    otlp.await_services(
        &doc_trace,
        &["bruno-ingress", "bruno-embedder", "bruno-writer"],
        Duration::from_secs(20),
    )
    .await;
    let spans = settled(&otlp, &doc_trace).await;
    assert_one_tree(&spans);
    assert!(
        spans.iter().any(|s| s.service == "bruno-writer"
            && attr(s, "db.system.name") == Some("lancedb")
            && attr(s, "db.response.returned_rows").is_some_and(|n| n != "0")),
        "no LanceDB write span with its rows"
    );

    // One chat turn: gateway → retriever → generator → gateway, then
    // embedder → writer for its memory, is one trace.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer: Value = client
        .post(format!("http://{gateway}/v1/chat"))
        .json(&json!({"session_id": "t1", "message": "What is basalt?"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["answer"], "According to [1]: ok.", "{answer}");
    let trace_id = answer["trace_id"].as_str().unwrap().to_owned();
    let correlation = answer["correlation_id"].as_str().unwrap().to_owned();
    otlp.await_services(
        &trace_id,
        &[
            "bruno-gateway",
            "bruno-retriever",
            "bruno-generator",
            "bruno-embedder",
            "bruno-writer",
        ],
        // A few full suite runs never got the writer's span of the turn's
        // memory write: a LanceDB `log` level check just before hid the
        // writer's `process` span from both layers, so the commit started a
        // trace of its own (fixed: `Fresh` in bruno_runtime::telemetry).
        Duration::from_secs(90),
    )
    .await;
    let spans = settled(&otlp, &trace_id).await;
    assert_one_tree(&spans);
    let root = spans
        .iter()
        .find(|s| !spans.iter().any(|p| p.span_id == s.parent_span_id))
        .unwrap();
    assert_eq!(
        (root.service.as_str(), root.name.as_str(), root.kind),
        ("bruno-gateway", "POST /v1/chat", 2)
    );
    let exchange = format!("{}bruno.events", h.config.prefix);
    let producers: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == 4).collect();
    assert!(producers.len() >= 4, "{producers:#?}");
    for p in &producers {
        assert_eq!(attr(p, "messaging.system"), Some("rabbitmq"));
        assert_eq!(attr(p, "messaging.operation.type"), Some("send"));
        assert_eq!(
            attr(p, "messaging.destination.name"),
            Some(exchange.as_str())
        );
        assert!(attr(p, "messaging.message.id").is_some_and(|id| !id.is_empty()));
    }
    let consumers: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == 5 && attr(s, "messaging.operation.type") == Some("process"))
        .collect();
    for part in ["retriever", "generator", "embedder", "writer"] {
        let c = consumers
            .iter()
            .find(|s| attr(s, "messaging.consumer.group.name") == Some(part))
            .unwrap_or_else(|| panic!("no consumer span of the {part}"));
        assert_eq!(
            attr(c, "messaging.message.conversation_id"),
            Some(correlation.as_str()),
            "{c:#?}"
        );
    }
    assert!(
        spans.iter().any(|s| s.service == "bruno-gateway"
            && attr(s, "messaging.operation.type") == Some("receive")),
        "the gateway's reply is not in the trace"
    );
    // The chat bench's per-hop breakdown reads these spans: across the
    // processes, the turn's hops come out in order and add up.
    let hops = bruno_system_tests::hop_breakdown(&spans, "POST /v1/chat");
    let segment = |name: &str| {
        hops.iter()
            .find(|h| h.segment == name)
            .unwrap_or_else(|| panic!("no {name:?} in {hops:#?}"))
    };
    let whole = segment("POST /v1/chat: whole request");
    for name in [
        "POST /v1/chat: in, to the first publish",
        "publish + confirm chat.requested",
        "publish → process chat.requested",
        "retriever handler, own time",
        "publish → process chat.contextualized",
        "generator handler, own time",
        "publish → receive chat.completed",
        "POST /v1/chat: last reply received, to the response",
    ] {
        let h = segment(name);
        assert!(
            h.traces == 1 && h.p50 >= 0.0 && h.p50 <= whole.p50 && h.at <= whole.at,
            "{h:#?} / {whole:#?}"
        );
    }
    assert!(
        segment("publish → process chat.requested").at
            < segment("publish → process chat.contextualized").at,
        "{hops:#?}"
    );
    assert!(
        !hops.iter().any(|h| h.segment.starts_with("writer")),
        "memory writes after the reply are off the turn's path: {hops:#?}"
    );
    let llm_span = spans
        .iter()
        .find(|s| attr(s, "gen_ai.operation.name") == Some("chat"))
        .expect("no LLM span");
    assert_eq!(llm_span.kind, 3);
    assert_eq!(attr(llm_span, "gen_ai.usage.input_tokens"), Some("12"));
    assert_eq!(attr(llm_span, "gen_ai.usage.output_tokens"), Some("3"));
    assert!(
        spans.iter().any(|s| s.service == "bruno-retriever"
            && attr(s, "db.operation.name") == Some("hybrid_search")
            && attr(s, "db.response.returned_rows").is_some_and(|n| n != "0")),
        "no LanceDB search span with its rows"
    );

    // A turn whose LLM fails with a body echoing the API key and the
    // user's e-mail and IP address: the answer falls back, and the log
    // lines that report it hold none of them.
    let fallback: Value = client
        .post(format!("http://{gateway}/v1/chat"))
        .json(&json!({
            "session_id": "t2",
            "message": format!("FAIL please: I am {EMAIL}, writing from {CLIENT_IP}")
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fallback["fallback"], true, "{fallback}");

    // A backup, requested as a producer would.
    let status = post_event(
        ingress,
        "trace-backup-1",
        "bruno.backup.requested.v1",
        b"{}",
    )
    .await;
    assert_eq!(status, 202);
    let mut backed_up = false;
    for _ in 0..300 {
        let samples = scrape(admins["backup"]).await;
        if value(
            &samples,
            "bruno_backup_runs_total",
            &[("result", "verified")],
        ) >= 1.0
        {
            backed_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(backed_up, "no verified backup");

    // Metrics: every part's /metrics parses and moved; the dashboards and
    // alert rules name only metrics some part declares.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut declared = std::collections::BTreeSet::new();
    for (part, admin) in &admins {
        let text = metrics_text(*admin).await;
        declared.extend(bruno_system_tests::declared_metrics(&text));
        let samples = parse_prometheus(&text);
        assert_eq!(
            value(&samples, "bruno_broker_connected", &[]),
            1.0,
            "{part}"
        );
        let moved = match part.as_str() {
            "ingress" => value(&samples, "bruno_ingress_events_accepted_total", &[]),
            "gateway" => value(&samples, "bruno_gateway_requests_total", &[]),
            consumer => value(
                &samples,
                "bruno_events_consumed_total",
                &[("part", consumer), ("outcome", "ack")],
            ),
        };
        assert!(moved >= 1.0, "{part}: nothing moved");
        let unroutable = samples
            .iter()
            .find(|s| s.name == "bruno_queue_messages" && s.labels["kind"] == "unroutable")
            .unwrap_or_else(|| panic!("{part}: no unroutable depth"));
        assert_eq!(unroutable.value, 0.0, "{part}");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let problems = bruno_system_tests::observability_problems(&root, &declared);
    assert!(problems.is_empty(), "{problems:#?}");
    let writer = scrape(admins["writer"]).await;
    assert!(
        value(
            &writer,
            "bruno_queue_messages",
            &[("kind", "work"), ("part", "writer")]
        ) >= 0.0
    );
    assert!(
        value(
            &writer,
            "bruno_queue_consumers",
            &[("kind", "work"), ("part", "writer")]
        ) >= 1.0,
        "the writer's own queue shows no consumer"
    );
    assert_eq!(
        h.depth(&format!("{}bruno.unroutable", h.config.prefix))
            .await,
        0
    );
    assert!(
        h.depth(&format!("{}bruno.observed", h.config.prefix)).await >= 1,
        "document.indexed (observed by nobody here) did not end in the observed queue"
    );

    // Logs: JSON lines, trace ids inside spans, no secret and no personal data.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut all = Vec::new();
    for p in fleet {
        let lines = p.lines();
        p.kill().await;
        all.extend(lines);
    }
    assert!(all.len() > 20, "too few log lines: {all:?}");
    let mut traced = 0;
    for line in &all {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|n| n == "process"))
        {
            assert_eq!(v["trace_id"].as_str().map(str::len), Some(32), "{line}");
            traced += 1;
        }
        for secret in [API_KEY, URL_PASSWORD, EMAIL, CLIENT_IP] {
            assert!(!line.contains(secret), "{secret} leaked: {line}");
        }
    }
    assert!(traced > 0, "no log line inside a consumer span");
    // The leaks were there to be made: the redacted places show.
    let joined = all.join("\n");
    for placeholder in [
        "bruno:[REDACTED]@",
        "Authorization: [REDACTED]",
        "[EMAIL]",
        "[IP]",
    ] {
        assert!(
            joined.contains(placeholder),
            "nothing was redacted as {placeholder}"
        );
    }
    h.cleanup().await;
}
