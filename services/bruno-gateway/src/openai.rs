//! The OpenAI-compatible routes: `POST /v1/chat/completions` (plain and
//! `stream: true`) and `GET /v1/models`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bruno_events::payload::{ChatRequested, TokenUsage};
use bruno_runtime::Problem;
use futures_util::StreamExt;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Gateway;
use crate::admit::parse;
use crate::config::record;
use crate::correlate::options;
use crate::stream::{Piece, SseItem, pieces};

#[derive(Debug, Deserialize)]
struct OpenAiMessage {
    role: String,
    content: Value,
}

#[derive(Debug, Deserialize)]
struct OpenAiRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<OpenAiMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    stream_options: Option<Value>,
}

/// The text of a message's `content`: a string, or the text parts of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn openai_usage(u: &TokenUsage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens})
}

fn chunk(id: &str, created: i64, model: &str, delta: Value, finish: Option<&str>) -> SseEvent {
    SseEvent::default().data(
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string(),
    )
}

/// `POST /v1/chat/completions`: an OpenAI chat completion, plain or streamed.
pub(crate) async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let result = async {
        gw.admit(&headers)?;
        let b: OpenAiRequest = parse(&body)?;
        let last = b
            .messages
            .last()
            .ok_or_else(|| Problem::invalid("messages", "must not be empty"))?;
        if last.role != "user" {
            return Err(Problem::invalid(
                "messages",
                "the last message must be the user's",
            ));
        }
        let message = content_text(&last.content);
        // The session: X-Session-Id, else OpenAI's `user`, else a one-off.
        let session_id = headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or(b.user.clone())
            .unwrap_or_else(|| format!("openai-{}", uuid::Uuid::new_v4()));
        let request = ChatRequested {
            session_id,
            message,
            options: options(None, b.temperature, b.max_tokens, b.stream),
        };
        let pending = gw.chat(request).await?;
        Ok((b, pending))
    }
    .await;
    let (b, pending) = match result {
        Ok(x) => x,
        Err(p) => return record(&gw, "/v1/chat/completions", p.into_response()),
    };
    let id = format!("chatcmpl-{}", pending.correlation);
    let created = chrono::Utc::now().timestamp();
    let model = b
        .model
        .clone()
        .unwrap_or_else(|| gw.config.model_name.clone());
    if !b.stream {
        let response = match gw.finish(pending).await {
            Ok(a) => {
                gw.metrics
                    .turn_seconds
                    .observe(started.elapsed().as_secs_f64());
                axum::Json(json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": a.answer}, "finish_reason": "stop"}],
                    "usage": openai_usage(&a.usage),
                }))
                .into_response()
            }
            Err(p) => p.into_response(),
        };
        return record(&gw, "/v1/chat/completions", response);
    }
    let include_usage = b
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let first = chunk(
        &id,
        created,
        &model,
        json!({"role": "assistant", "content": ""}),
        None,
    );
    let head = futures_util::stream::iter(vec![Ok::<_, Infallible>(first)]);
    let body = pieces(gw.clone(), pending, started).flat_map(move |piece| {
        let events: Vec<SseItem> = match piece {
            Piece::Text(t) => vec![Ok(chunk(&id, created, &model, json!({"content": t}), None))],
            Piece::Done(answer) => {
                let mut events = vec![Ok(chunk(&id, created, &model, json!({}), Some("stop")))];
                if include_usage {
                    events.push(Ok(SseEvent::default().data(
                        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": openai_usage(&answer.usage)})
                        .to_string(),
                    )));
                }
                events.push(Ok(SseEvent::default().data("[DONE]")));
                events
            }
            Piece::Failed(p) => {
                let error = json!({"error": {"message": p.detail, "type": "bruno_error", "code": p.status}});
                vec![Ok(SseEvent::default().data(error.to_string()))]
            }
        };
        futures_util::stream::iter(events)
    });
    record(
        &gw,
        "/v1/chat/completions",
        Sse::new(head.chain(body))
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}

/// `GET /v1/models`: the one model the gateway answers as.
pub(crate) async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(p) = gw.admit(&headers) {
        return p.into_response();
    }
    axum::Json(json!({"object": "list", "data": [
        {"id": gw.config.model_name, "object": "model", "created": 0, "owned_by": "bruno"}
    ]}))
    .into_response()
}
