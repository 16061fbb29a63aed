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
