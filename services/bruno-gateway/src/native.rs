//! Bruno's own routes: `POST /v1/chat`, `POST /v1/chat/stream` (SSE) and
//! `POST /v1/search`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bruno_events::EventData;
use bruno_events::payload::{ChatRequested, SearchFilters, SearchMode, SearchRequested};
use bruno_runtime::Problem;
use http::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::json;

use crate::Gateway;
use crate::admit::parse;
use crate::config::record;
use crate::correlate::{Next, Pending, options};
use crate::stream::stream_events;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    session_id: String,
    message: String,
    #[serde(default)]
    k: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    max_tokens: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchBody {
    query: String,
    #[serde(default)]
    k: Option<u32>,
    #[serde(default)]
    filters: SearchFilters,
    #[serde(default)]
    mode: SearchMode,
}

/// Admit and parse a `/v1/chat` or `/v1/chat/stream` body, and publish the turn.
async fn open_chat(
    gw: &Gateway,
    headers: &HeaderMap,
    body: &Bytes,
    stream: bool,
) -> Result<Pending, Problem> {
    gw.admit(headers)?;
    let b: ChatBody = parse(body)?;
    let request = ChatRequested {
        session_id: b.session_id,
        message: b.message,
        options: options(b.k, b.temperature, b.max_tokens, stream),
    };
    gw.chat(request).await
}

/// `POST /v1/chat`: the whole answer at once.
pub(crate) async fn chat(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let result = async {
        let pending = open_chat(&gw, &headers, &body, false).await?;
        gw.finish(pending).await
    }
    .await;
    let response = match result {
        Ok(answer) => {
            gw.metrics
                .turn_seconds
                .observe(started.elapsed().as_secs_f64());
            axum::Json(answer).into_response()
        }
        Err(p) => p.into_response(),
    };
    record(&gw, "/v1/chat", response)
}

/// `POST /v1/chat/stream`: the answer as server-sent events.
pub(crate) async fn chat_stream(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let result = open_chat(&gw, &headers, &body, true).await;
    let response = match result {
        Ok(pending) => {
            let id = pending.correlation.clone();
            let mut r = Sse::new(stream_events(gw.clone(), pending, started))
                .keep_alive(KeepAlive::default())
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&id) {
                r.headers_mut().insert("x-correlation-id", v);
            }
            r
        }
        Err(p) => p.into_response(),
    };
    record(&gw, "/v1/chat/stream", response)
}

/// `POST /v1/search`: hybrid search without an answer.
pub(crate) async fn search(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        gw.admit(&headers)?;
        let b: SearchBody = parse(&body)?;
        gw.check_text("query", &b.query)?;
        let request = SearchRequested { query: b.query, k: b.k.unwrap_or(5), filters: b.filters, mode: b.mode };
        request.check()?;
        let mut pending = gw.send(&request, gw.config.search_timeout_ms).await?;
        loop {
            match pending.next().await {
                Next::Search(done) => {
                    return Ok(json!({ "hits": done.hits, "correlation_id": pending.correlation, "trace_id": pending.trace_id }));
                }
                Next::Failed(p) => return Err(p),
                _ => continue,
            }
        }
    }
    .await;
    let response = match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(p) => p.into_response(),
    };
    record(&gw, "/v1/search", response)
}
