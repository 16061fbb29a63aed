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
