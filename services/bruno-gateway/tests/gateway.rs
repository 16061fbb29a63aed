//! The gateway against the real RabbitMQ. A small responder part answers
//! `chat.requested` (deltas, then `chat.completed`) and `search.requested`
//! the way the retriever and generator do, so these tests isolate the
//! gateway: correlation, streaming, timeouts, reconnects, auth and limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bruno_broker::{Broker, BrokerConfig, PartSpec};
use bruno_core::Secret;
use bruno_events::payload::{
    ChatCompleted, ChatDelta, ChatFailed, ChatRequested, SearchCompleted, SearchHit,
    SearchRequested, TokenUsage,
};
use bruno_events::{AttributesReader, Event, EventData, reply_event};
use bruno_gateway::{Gateway, GatewayConfig, GatewayMetrics, router};
use bruno_runtime::{Context, FromEvent, Handler, HandlerError, Incoming, Raw};
use bruno_system_tests::{Harness, PrivateBroker, Proxy, amqp_addr, amqp_url, test_config};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Answers like the fleet would: "echo: <message>" in three deltas.
struct Responder;

impl Handler for Responder {
    type Input = Raw;

    async fn handle(
        &self,
        input: Incoming<Raw>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let e = &input.event;
        if e.ty() == SearchRequested::TYPE {
            let r = SearchRequested::from_event(e)?;
            let hit = SearchHit {
                chunk_id: "c1".into(),
                doc_id: "d1".into(),
                title: None,
                source: "s".into(),
                text: format!("about {}", r.query),
                score: 1.0,
            };
            return Ok(vec![reply_event(
                e,
                &ctx.source,
                0,
                &SearchCompleted { hits: vec![hit] },
            )]);
        }
        let r = ChatRequested::from_event(e)?;
        if r.message.contains("slow") {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        // Long enough that stopping a RabbitMQ node surely happens first,
        // even on a busy machine.
        if r.message.contains("glacial") {
            tokio::time::sleep(Duration::from_millis(8000)).await;
        }
        if r.message.contains("fail") {
            let failed = ChatFailed {
                reason: "retrieval".into(),
                message: "the table is broken".into(),
            };
            return Ok(vec![reply_event(e, &ctx.source, 0, &failed)]);
        }
        let answer = format!("echo: {}", r.message);
        let pieces: Vec<String> = answer.split_inclusive(' ').map(str::to_owned).collect();
        // Published out of order on purpose: the gateway orders by seq.
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        if order.len() > 2 {
            order.swap(0, 1);
        }
        for i in order {
            let d = ChatDelta {
                seq: i as u64,
                text: pieces[i].clone(),
            };
            ctx.emit(&[reply_event(e, &ctx.source, i as u32 + 1, &d)])
                .await?;
        }
        let done = ChatCompleted {
            session_id: r.session_id,
            question: r.message,
            answer,
            citations: vec![],
            usage: TokenUsage {
                prompt_tokens: 10,
                completion_tokens: pieces.len() as u64,
            },
            model: "echo".into(),
            fallback: false,
            question_vector: None,
        };
        Ok(vec![reply_event(e, &ctx.source, 0, &done)])
    }
}

struct Running {
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    stop: CancellationToken,
}

async fn gateway(broker: Broker, config: GatewayConfig) -> Running {
    let stop = CancellationToken::new();
    let gateway =
        Arc::new(Gateway::new(config, broker, GatewayMetrics::default(), stop.clone()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(gateway.clone());
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap()
    });
    for _ in 0..100 {
        if gateway.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gateway.is_ready(), "reply queue never ready");
    Running {
        addr,
        gateway,
        stop,
    }
}

fn open() -> GatewayConfig {
    GatewayConfig {
        requests_per_minute: 0,
        chat_timeout_ms: 10_000,
        ..GatewayConfig::default()
    }
}

async fn setup() -> (Harness, CancellationToken) {
    setup_on(test_config()).await
}

/// The responder part on the broker `config` names.
async fn setup_on(config: BrokerConfig) -> (Harness, CancellationToken) {
    let h = Harness::with_config(
        config,
        vec![PartSpec::on_types(
            "responder",
            &[ChatRequested::TYPE, SearchRequested::TYPE],
        )],
    )
    .await;
    let stop = CancellationToken::new();
    tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "responder",
        64,
        Arc::new(Responder),
        stop.clone(),
    ));
    (h, stop)
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// `(event name, data)` of each SSE event in a body.
fn sse(body: &str) -> Vec<(String, String)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .filter_map(|block| {
            let mut name = String::from("message");
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = n.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d).to_owned());
                }
            }
            (!data.is_empty()).then(|| (name, data.join("\n")))
        })
        .collect()
}

#[tokio::test]
async fn chat_stream_search_and_the_openai_api() {
    let (h, stop) = setup().await;
    let g = gateway(h.broker.clone(), open()).await;

    let r = post(
        g.addr,
        "/v1/chat",
        json!({"session_id": "s1", "message": "hello there world"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["answer"], "echo: hello there world");
    assert_eq!(a["session_id"], "s1");
    assert_eq!(a["usage"]["prompt_tokens"], 10);
    assert_eq!(a["correlation_id"].as_str().unwrap().len(), 36);
    assert_eq!(a["trace_id"].as_str().unwrap().len(), 32);

    // Streamed: deltas in order (the responder sends seq 1 before 0), then done.
    let r = post(
        g.addr,
        "/v1/chat/stream",
        json!({"session_id": "s1", "message": "stream me please"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse(&r.text().await.unwrap());
    let (last, deltas) = events.split_last().unwrap();
    assert_eq!(last.0, "done");
    let done: Value = serde_json::from_str(&last.1).unwrap();
    let joined: String = deltas
        .iter()
        .map(|(n, d)| {
            assert_eq!(n, "delta");
            serde_json::from_str::<Value>(d).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(joined, "echo: stream me please");
    assert_eq!(done["answer"], joined);

    let r = post(g.addr, "/v1/search", json!({"query": "vorpalite", "k": 3})).await;
    assert_eq!(r.status(), 200);
    let s: Value = r.json().await.unwrap();
    assert_eq!(s["hits"][0]["text"], "about vorpalite");

    // OpenAI-compatible, plain and streamed.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        json!({"model": "bruno", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi openai"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["content"], "echo: hi openai");
    assert_eq!(c["usage"]["total_tokens"], 10 + 3);
    let r = post(
        g.addr,
        "/v1/chat/completions",
        json!({"model": "bruno", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": [{"type": "text", "text": "stream openai"}]}]}),
    )
    .await;
    let events = sse(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "echo: stream openai");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop")
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 3);
    let m: Value = reqwest::get(format!("http://{}/v1/models", g.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["data"][0]["id"], "bruno");

    // A turn the fleet could not answer: 502 with the reason.
    let r = post(
        g.addr,
        "/v1/chat",
        json!({"session_id": "s1", "message": "please fail"}),
    )
    .await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("the table is broken"));

    g.stop.cancel();
    stop.cancel();
    h.cleanup().await;
}

#[tokio::test]
async fn two_gateways_200_concurrent_chats_never_cross() {
    let (h, stop) = setup().await;
    let (broker2, cancel2) = h.second_broker(None).await;
    let a = gateway(h.broker.clone(), open()).await;
    let b = gateway(broker2, open()).await;
    assert_ne!(a.gateway.inbox().id(), b.gateway.inbox().id());
    let calls = (0..200).map(|i| {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        async move {
            let message = format!("question number {i} from client {i}");
            let r = post(
                addr,
                "/v1/chat",
                json!({"session_id": format!("s{i}"), "message": message}),
            )
            .await;
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            assert_eq!(
                v["answer"],
                format!("echo: {message}"),
                "client {i} got another's answer"
            );
            assert_eq!(v["session_id"], format!("s{i}"));
        }
    });
    futures_util::future::join_all(calls).await;
    assert_eq!(
        a.gateway.inbox().late_replies() + b.gateway.inbox().late_replies(),
        0
    );
    a.stop.cancel();
    b.stop.cancel();
    cancel2.cancel();
    stop.cancel();
    h.cleanup().await;
}

#[tokio::test]
async fn a_slow_turn_answers_504_and_its_late_reply_is_dropped_and_counted() {
    let (h, stop) = setup().await;
    let g = gateway(
        h.broker.clone(),
        GatewayConfig {
            chat_timeout_ms: 300,
            ..open()
        },
    )
    .await;
    let r = post(
        g.addr,
        "/v1/chat",
        json!({"session_id": "s", "message": "be slow"}),
    )
    .await;
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.unwrap();
    let correlation = p["correlation_id"].as_str().unwrap();
    assert!(p["detail"].as_str().unwrap().contains(correlation), "{p}");
    for _ in 0..60 {
        if g.gateway.inbox().late_replies() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        g.gateway.inbox().late_replies() >= 1,
        "the late reply was not counted"
    );
    let r = post(
        g.addr,
        "/v1/chat",
        json!({"session_id": "s", "message": "fast now"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    g.stop.cancel();
    stop.cancel();
    h.cleanup().await;
}

#[tokio::test]
async fn the_broker_connection_lost_mid_turn_fails_fast_and_the_reply_queue_comes_back() {
    let (h, stop) = setup().await;
    let proxy = Proxy::start(amqp_addr()).await;
    let mut config = h.config.clone();
    config.url = Some(Secret::new(amqp_url(&proxy.host())));
    let cancel = CancellationToken::new();
    let broker = Broker::start(
        config,
        h.topology.clone(),
        "gw",
        Default::default(),
        cancel.clone(),
    );
    assert!(broker.wait_connected(Duration::from_secs(10)).await);
    let g = gateway(
        broker,
        GatewayConfig {
            chat_timeout_ms: 30_000,
            ..open()
        },
    )
    .await;
    let addr = g.addr;
    let slow = tokio::spawn(async move {
        post(
            addr,
            "/v1/chat",
            json!({"session_id": "s", "message": "slow one"}),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut_at = std::time::Instant::now();
    proxy.cut(Duration::from_millis(500));
    let r = slow.await.unwrap();
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    eprintln!(
        "in-flight turn answered 503 {:?} after the cut (timeout was 30 s)",
        cut_at.elapsed()
    );
    // It reconnects and re-declares its reply queue by itself.
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if g.gateway.is_ready() {
            let r = post(
                g.addr,
                "/v1/chat",
                json!({"session_id": "s", "message": "after the cut"}),
            )
            .await;
            if r.status() == 200 {
                ok = true;
                break;
            }
        }
    }
    assert!(ok, "no successful chat after the reconnect");
    g.stop.cancel();
    cancel.cancel();
    stop.cancel();
    h.cleanup().await;
}

#[tokio::test]
async fn the_broker_restarting_mid_turn_fails_fast_and_chats_resume_after_it() {
    // A RabbitMQ node of this test's own: stopping the shared one would
    // disturb every other test.
    let node = PrivateBroker::start().await;
    let mut config = test_config();
    config.url = Some(Secret::new(node.url()));
    let (h, stop) = setup_on(config).await;
    let g = gateway(
        h.broker.clone(),
        GatewayConfig {
            chat_timeout_ms: 60_000,
            ..open()
        },
    )
    .await;
    let r = post(
        g.addr,
        "/v1/chat",
        json!({"session_id": "s", "message": "before the restart"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let addr = g.addr;
    let in_flight: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(async move {
                post(
                    addr,
                    "/v1/chat",
                    json!({"session_id": format!("s{i}"), "message": "glacial one"}),
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted_at = std::time::Instant::now();
    let restart = tokio::spawn(async move {
        node.restart().await;
        node
    });
    for t in in_flight {
        let r = t.await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body["correlation_id"].is_string(), "{body}");
    }
    let failed_after = restarted_at.elapsed();
    let node = restart.await.unwrap();
    eprintln!(
        "in-flight turns answered 503 {failed_after:?} after the stop began (timeout 60 s); node back after {:?}",
        restarted_at.elapsed()
    );
    assert!(
        failed_after < Duration::from_secs(30),
        "in-flight turns hung for {failed_after:?}"
    );
    // The gateway reconnects and re-declares its reply queue by itself.
    let mut ok = None;
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !g.gateway.is_ready() {
            continue;
        }
        let r = post(
            g.addr,
            "/v1/chat",
            json!({"session_id": "s", "message": "after the restart"}),
        )
        .await;
        if r.status() == 200 {
            ok = Some(r.json::<Value>().await.unwrap());
            break;
        }
    }
    let body = ok.expect("no successful chat after the broker restart");
    assert_eq!(body["answer"], "echo: after the restart");
    g.stop.cancel();
    stop.cancel();
    h.cleanup().await;
    drop(node);
}

#[tokio::test]
async fn keys_limits_and_bad_input_get_problem_json() {
    let (h, stop) = setup().await;
    let config = GatewayConfig {
        api_key_hashes: vec![bruno_runtime::keys::hash_key("k1")],
        requests_per_minute: 60,
        burst: 2,
        max_body_bytes: 4096,
        max_message_chars: 100,
        ..open()
    };
    let g = gateway(h.broker.clone(), config).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/chat", g.addr);
    let r = client
        .post(&url)
        .json(&json!({"session_id": "s", "message": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let send = |body: Value| client.post(&url).bearer_auth("k1").json(&body).send();
    let r = send(json!({"session_id": "s", "message": "  "}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "message");
    let r = send(json!({"session_id": "s", "message": "x".repeat(101)}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        r.json::<Value>().await.unwrap()["detail"]
            .as_str()
            .unwrap()
            .contains("exceeds the limit")
    );
    // The burst (2) is spent: the next one is limited, with Retry-After.
    let r = send(json!({"session_id": "s", "message": "hi"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(r.headers().contains_key("retry-after"));
    // Another gateway and key; X-Api-Key works too.
    let g2 = gateway(
        h.broker.clone(),
        GatewayConfig {
            api_key_hashes: vec![bruno_runtime::keys::hash_key("k2")],
            max_body_bytes: 4096,
            max_message_chars: 100,
            ..open()
        },
    )
    .await;
    let url2 = format!("http://{}/v1/chat", g2.addr);
    let r = client
        .post(&url2)
        .header("x-api-key", "k2")
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(&url2)
        .header("x-api-key", "k2")
        .json(&json!({"session_id": "s", "message": "y".repeat(8000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = client
        .post(&url2)
        .header("x-api-key", "k2")
        .json(&json!({"session_id": "s", "message": "ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    g.stop.cancel();
    g2.stop.cancel();
    stop.cancel();
    h.cleanup().await;
}

#[tokio::test]
async fn the_official_openai_python_client_works_unchanged() {
    let (h, stop) = setup().await;
    let g = gateway(h.broker.clone(), open()).await;
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/python/openai_chat.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("http://{}/v1", g.addr))
        .output()
        .await
        .expect("python3 must be installed");
    assert!(
        out.status.success(),
        "the openai client failed (pip install -r tests/python/requirements.txt): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"][0], "bruno");
    assert_eq!(v["plain"], "echo: hello from python");
    assert_eq!(v["plain_usage"], 10 + 4); // prompt 10 + 4 pieces
    assert_eq!(v["streamed"], "echo: stream from python");
    g.stop.cancel();
    stop.cancel();
    h.cleanup().await;
}
