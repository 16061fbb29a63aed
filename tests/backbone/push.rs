//! Push mode follows Knative's data-plane contract.

use std::sync::Arc;

use bruno_events::payload::{ChatFailed, DocumentSubmitted};
use bruno_events::{AttributesReader, Event, EventData, reply_event};
use bruno_runtime::{Context, Handler, HandlerError, Incoming};
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Replier;

impl Handler for Replier {
    type Input = DocumentSubmitted;
    async fn handle(
        &self,
        input: Incoming<DocumentSubmitted>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        match input.data.doc_id.as_str() {
            "reply" => Ok(vec![reply_event(
                &input.event,
                &ctx.source,
                0,
                &ChatFailed {
                    reason: "none".into(),
                    message: input.data.text,
                },
            )]),
            "down" => Err(HandlerError::dependency("llm down")),
            "bad" => Err(HandlerError::invalid_payload("cannot use this")),
            _ => Ok(vec![]),
        }
    }
}

#[tokio::test]
async fn push_mode_answers_per_the_knative_contract() {
    let ctx = Context::new("pushy", None, CancellationToken::new());
    let router = bruno_runtime::push_router(Arc::new(Replier), ctx, 1 << 20);
    let stop = CancellationToken::new();
    let (addr, _task) =
        bruno_runtime::admin::serve("127.0.0.1:0".parse().unwrap(), router, stop.clone())
            .await
            .unwrap();
    let url = format!("http://{addr}/");
    let client = reqwest::Client::new();
    let post_binary = |doc_id: &'static str, ty: &'static str| {
        client
            .post(&url)
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("id-{doc_id}"))
            .header("ce-source", "/knative")
            .header("ce-type", ty)
            .header("ce-correlationid", "c-9")
            .header("content-type", "application/json")
            .body(json!({"doc_id": doc_id, "source": "s", "text": "hello"}).to_string())
            .send()
    };

    let r = post_binary("reply", DocumentSubmitted::TYPE).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ce-type"], ChatFailed::TYPE);
    assert_eq!(r.headers()["ce-correlationid"], "c-9");
    assert_eq!(r.headers()["ce-source"], "bruno/pushy");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["message"], "hello");

    assert_eq!(
        post_binary("quiet", DocumentSubmitted::TYPE)
            .await
            .unwrap()
            .status(),
        202
    );
    let r = post_binary("down", DocumentSubmitted::TYPE).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        post_binary("bad", DocumentSubmitted::TYPE)
            .await
            .unwrap()
            .status(),
        400
    );
    // A type the part does not handle can never succeed: 4xx, so Knative dead-letters it.
    assert_eq!(
        post_binary("reply", ChatFailed::TYPE)
            .await
            .unwrap()
            .status(),
        400
    );

    // Structured mode works the same.
    let event = bruno_events::new_event("tests", &crate::doc("reply"));
    let r = client
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(serde_json::to_vec(&event).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["ce-id"],
        bruno_events::derive_id(&event, ChatFailed::TYPE, 0)
    );
    let _ = event.id();
    stop.cancel();
}

/// Records the order of lifecycle hooks and deliveries.
struct Lifecycle(std::sync::Mutex<Vec<String>>);

impl Handler for Lifecycle {
    type Input = DocumentSubmitted;
    async fn start(&self, _: &Context) {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        self.0.lock().unwrap().push("start".into());
    }
    async fn handle(
        &self,
        input: Incoming<DocumentSubmitted>,
        _: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        self.0.lock().unwrap().push(input.data.doc_id);
        Ok(vec![])
    }
    async fn stop(&self, _: &Context) {
        self.0.lock().unwrap().push("stop".into());
    }
}

#[tokio::test]
async fn a_push_mode_part_runs_its_start_hook_before_any_delivery_and_its_stop_hook_last() {
    let handler = Arc::new(Lifecycle(Default::default()));
    let shutdown = CancellationToken::new();
    let part = bruno_runtime::push_part("pushy", None, handler.clone(), 1 << 20, shutdown.clone());
    let http_stop = CancellationToken::new();
    let (addr, server) = bruno_runtime::admin::serve(
        "127.0.0.1:0".parse().unwrap(),
        part.router,
        http_stop.clone(),
    )
    .await
    .unwrap();
    // Sent at once: it waits for the start hook (200 ms).
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "early")
        .header("ce-source", "/knative")
        .header("ce-type", DocumentSubmitted::TYPE)
        .header("content-type", "application/json")
        .body(json!({"doc_id": "early", "source": "s", "text": "hello"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    http_stop.cancel();
    shutdown.cancel();
    server.await.unwrap().unwrap();
    part.finish.await;
    assert_eq!(*handler.0.lock().unwrap(), ["start", "early", "stop"]);
}

#[tokio::test]
async fn knative_dead_letters_land_in_the_parts_dlq_with_brunos_error_headers() {
    use base64::Engine as _;
    let h = bruno_system_tests::Harness::new(vec![crate::doc_part("sink")]).await;
    let (addr, stop) = h
        .ingress(h.broker.clone(), bruno_ingress::IngressConfig::default())
        .await;
    let problem = json!({
        "type": "https://bruno.dev/problems/invalid_payload",
        "title": "Bad Request",
        "status": 400,
        "detail": "data.text: must not be empty"
    });
    let post = |path: &str| {
        reqwest::Client::new()
            .post(format!("http://{addr}{path}"))
            .header("ce-specversion", "1.0")
            .header("ce-id", "given-up-1")
            .header("ce-source", "tests")
            .header("ce-type", DocumentSubmitted::TYPE)
            .header("ce-knativeerrorcode", "400")
            .header("ce-knativeerrordest", "http://bruno-sink.bruno.svc/")
            .header(
                "ce-knativeerrordata",
                base64::engine::general_purpose::STANDARD.encode(problem.to_string()),
            )
            .header("content-type", "application/json")
            .body(json!({"doc_id": "d", "source": "s", "text": ""}).to_string())
            .send()
    };
    assert_eq!(post("/dead-letters/sink").await.unwrap().status(), 202);
    assert_eq!(post("/dead-letters/nobody").await.unwrap().status(), 404);
    let letters = bruno_broker::dlq::list(&h.broker, "sink", 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].id, "given-up-1");
    assert_eq!(letters[0].code, "invalid_payload");
    assert!(
        letters[0].reason.contains("data.text: must not be empty"),
        "{}",
        letters[0].reason
    );
    assert!(
        letters[0].reason.contains("HTTP 400"),
        "{}",
        letters[0].reason
    );
    stop.cancel();
    h.cleanup().await;
}

/// Emits two events for every `backup.requested` it takes (more than one
/// reply, so they go through the broker handle, i.e. the sink).
struct Fanout;

impl Handler for Fanout {
    type Input = bruno_events::payload::BackupRequested;
    async fn handle(
        &self,
        input: Incoming<bruno_events::payload::BackupRequested>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        Ok((0..2)
            .map(|i| {
                reply_event(
                    &input.event,
                    &ctx.source,
                    i,
                    &ChatFailed {
                        reason: format!("out-{i}"),
                        message: "m".into(),
                    },
                )
            })
            .collect())
    }
}

type Received = Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, Event)>>>;

/// A Knative Broker ingress as far as the wire goes: binary-mode CloudEvents
/// on `POST /`, 202 once stored; `/down` answers 503, `/refuse` 400.
async fn knative_broker_ingress() -> (String, Received) {
    let got: Received = Arc::default();
    let keep = got.clone();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::post(move |headers: axum::http::HeaderMap, event: Event| {
                let keep = keep.clone();
                async move {
                    keep.lock().unwrap().push((headers, event));
                    axum::http::StatusCode::ACCEPTED
                }
            }),
        )
        .route(
            "/down",
            axum::routing::post(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
        )
        .route(
            "/refuse",
            axum::routing::post(|| async { axum::http::StatusCode::BAD_REQUEST }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

fn sink_broker(url: &str) -> bruno_broker::Broker {
    let config = bruno_broker::BrokerConfig {
        publish_url: Some(url.to_owned()),
        ..Default::default()
    };
    let topology = bruno_broker::Topology::new(&config, vec![]);
    bruno_broker::Broker::sink_only(
        config,
        topology,
        "push-test",
        bruno_broker::BrokerMetrics::default(),
        CancellationToken::new(),
    )
}

#[tokio::test]
async fn a_push_part_takes_a_ping_as_its_event_and_publishes_to_the_knative_broker() {
    use bruno_events::payload::BackupRequested;
    let (sink, got) = knative_broker_ingress().await;
    let stop = CancellationToken::new();
    let part = bruno_runtime::push_part(
        "backup",
        Some(sink_broker(&format!("{sink}/"))),
        Arc::new(Fanout),
        1 << 20,
        stop.clone(),
    );
    let (addr, _task) =
        bruno_runtime::admin::serve("127.0.0.1:0".parse().unwrap(), part.router, stop.clone())
            .await
            .unwrap();
    let client = reqwest::Client::new();
    // Knative probes the serving port.
    for path in ["/live", "/ready"] {
        let mut status = 0;
        for _ in 0..50 {
            status = client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            if status == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(status, 200, "{path}");
    }
    // What a PingSource with `ceOverrides.extensions.brunotype` sends.
    let ping = |target: Option<&str>| {
        let mut r = client
            .post(format!("http://{addr}/"))
            .header("ce-specversion", "1.0")
            .header("ce-id", uuid::Uuid::new_v4().to_string())
            .header(
                "ce-source",
                "/apis/v1/namespaces/bruno/pingsources/bruno-backup-hourly",
            )
            .header("ce-type", bruno_runtime::PING_TYPE)
            .header(
                "ce-traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .header("content-type", "application/json")
            .body("{}");
        if let Some(t) = target {
            r = r.header("ce-brunotype", t);
        }
        r.send()
    };
    let r = ping(Some(BackupRequested::TYPE)).await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let received = got.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "both outputs reached the Knative Broker");
    for (headers, event) in &received {
        assert_eq!(event.ty(), ChatFailed::TYPE);
        assert_eq!(event.source().as_str(), "bruno/backup");
        // Binary mode, with the trace context of the publish span.
        assert_eq!(headers["ce-type"], ChatFailed::TYPE);
        let parent = headers["ce-traceparent"].to_str().unwrap();
        assert!(parent.starts_with("00-") && parent.len() == 55, "{parent}");
    }
    // A ping standing for nothing this part takes is refused for good.
    let r = ping(None).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = ping(Some("bruno.nope.v1")).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(got.lock().unwrap().len(), 2);

    // A sink that cannot store: retry later (503 to Knative); one that
    // refuses: a 4xx the caller sees as returned.
    let event = bruno_events::new_event("tests", &BackupRequested::default());
    let down = sink_broker(&format!("{sink}/down")).publish(&event).await;
    assert!(
        matches!(down, Err(bruno_broker::PublishError::Unavailable(_))),
        "{down:?}"
    );
    let refused = sink_broker(&format!("{sink}/refuse")).publish(&event).await;
    assert!(
        matches!(refused, Err(bruno_broker::PublishError::Returned(_))),
        "{refused:?}"
    );
    stop.cancel();
    part.finish.await;
}
