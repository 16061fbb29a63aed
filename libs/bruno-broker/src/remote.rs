//! One-shot commands (`bruno search`, `bruno dlq`, `bruno ingest --wait`,
//! `bruno backup run`) next to a `bruno dev` that runs the embedded broker:
//! the dev process serves its broker on a loopback HTTP endpoint with a
//! bearer token, and writes both to `endpoint.json` in its broker
//! directory (mode 0600); a command's [`Broker`] then publishes, awaits
//! replies and works on dead letters through it.
//!
//! - `GET /broker/ping`
//! - `POST /broker/publish` `{exchange, routing_key, messages: [{properties, body}]}`
//!   → 204 once confirmed, 404 no route, 503 refused
//! - `GET /broker/inbox/{inbox-id}?types=a,b` → NDJSON: `{"ready":true}`,
//!   then one message per line (`{}` every few seconds while idle); the
//!   inbox exists while the response streams
//! - `GET /broker/dlq/{part}?limit=N`, `POST /broker/dlq/{part}/replay`
//!   (a [`Filter`]), `DELETE /broker/dlq/{part}`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bruno_core::Secret;
use futures_util::StreamExt;
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};

use crate::dlq::{self, DeadLetter, DlqError, Filter, ReplayReport};
use crate::{Broker, PublishError};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// How often an idle inbox stream says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The file a `bruno dev` writes in its broker directory.
pub const ENDPOINT_FILE: &str = "endpoint.json";

/// Where a running `bruno dev` serves its embedded broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The bearer token it requires.
    pub token: String,
    /// The process that serves it.
    pub pid: u32,
}

impl Endpoint {
    /// Write `endpoint.json` in `dir`, readable by the owner only.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(ENDPOINT_FILE);
        let tmp = dir.join(format!("{ENDPOINT_FILE}.tmp"));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        std::io::Write::write_all(
            &mut f,
            &serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Read `endpoint.json` from `dir`, if a `bruno dev` wrote one.
    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(dir.join(ENDPOINT_FILE))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WireMessage {
    properties: BasicProperties,
    /// Base64.
    body: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct PublishBody {
    exchange: String,
    routing_key: String,
    messages: Vec<WireMessage>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Line {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<WireMessage>,
}

/// A client of another process's embedded broker.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Arc<str>,
    token: Secret,
    publish_timeout: Duration,
}

/// How long a DLQ call may take.
const DLQ_TIMEOUT: Duration = Duration::from_secs(60);

fn unavailable(e: impl std::fmt::Display) -> PublishError {
    PublishError::Unavailable(format!("embedded broker endpoint: {e}"))
}

impl Client {
    /// A client of the endpoint at `url`; a publish waits at most
    /// `publish_timeout` for its confirm.
    pub fn new(url: &str, token: Secret, publish_timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .unwrap_or_default();
        Self {
            http,
            base: Arc::from(url.trim_end_matches('/')),
            token,
            publish_timeout,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.expose())
    }

    /// Whether the endpoint answers and accepts the token.
    pub async fn ping(&self) -> Result<(), String> {
        let r = self
            .request(reqwest::Method::GET, "/broker/ping")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("ping answered {}", r.status()))
        }
    }

    /// Publish raw messages; returns once the embedded broker confirmed them.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: Vec<(BasicProperties, &[u8])>,
    ) -> Result<(), PublishError> {
        let body = PublishBody {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            messages: messages
                .into_iter()
                .map(|(properties, body)| WireMessage {
                    properties,
                    body: B64.encode(body),
                })
                .collect(),
        };
        let r = self
            .request(reqwest::Method::POST, "/broker/publish")
            .timeout(self.publish_timeout + Duration::from_secs(1))
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    PublishError::Timeout(self.publish_timeout)
                } else {
                    unavailable(e)
                }
            })?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(PublishError::Returned(text)),
            StatusCode::INSUFFICIENT_STORAGE => Err(PublishError::Nacked),
            StatusCode::GATEWAY_TIMEOUT => Err(PublishError::Timeout(self.publish_timeout)),
            StatusCode::BAD_REQUEST => {
                Err(PublishError::Codec(crate::codec::CodecError::Invalid {
                    name: "message".into(),
                    reason: text,
                }))
            }
            StatusCode::UNAUTHORIZED => Err(unavailable(
                "the token was refused (a bruno dev restarted since endpoint.json was read?)",
            )),
            s => Err(unavailable(format!("publish answered {s}: {text}"))),
        }
    }

    /// Hold inbox `id` bound on `reply_types` open; `ready` once it is
    /// bound, `message` for each reply. Returns when the stream ends.
    pub async fn inbox(
        &self,
        id: &str,
        reply_types: &[String],
        ready: impl FnOnce(),
        mut message: impl FnMut(BasicProperties, Vec<u8>),
    ) -> Result<(), String> {
        let r = self
            .request(reqwest::Method::GET, &format!("/broker/inbox/{id}"))
            .query(&[("types", reply_types.join(","))])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("inbox answered {}", r.status()));
        }
        let mut ready = Some(ready);
        let mut stream = r.bytes_stream();
        let mut pending = Vec::new();
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line: Line = serde_json::from_slice(&line).map_err(|e| e.to_string())?;
                if line.ready
                    && let Some(f) = ready.take()
                {
                    f();
                }
                if let Some(m) = line.message
                    && let Ok(body) = B64.decode(m.body.as_bytes())
                {
                    message(m.properties, body);
                }
            }
        }
        Ok(())
    }

    async fn dlq_call<T: serde::de::DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
        part: &str,
    ) -> Result<T, DlqError> {
        let r = r
            .timeout(DLQ_TIMEOUT)
            .send()
            .await
            .map_err(|e| DlqError::Publish(unavailable(e)))?;
        match r.status() {
            s if s.is_success() => r
                .json()
                .await
                .map_err(|e| DlqError::Embedded(e.to_string())),
            StatusCode::NOT_FOUND => Err(DlqError::UnknownPart(part.to_owned())),
            s => Err(DlqError::Embedded(format!(
                "{s}: {}",
                r.text().await.unwrap_or_default()
            ))),
        }
    }

    /// [`dlq::list`] through the endpoint.
    pub async fn dlq_list(&self, part: &str, limit: usize) -> Result<Vec<DeadLetter>, DlqError> {
        let r = self
            .request(reqwest::Method::GET, &format!("/broker/dlq/{part}"))
            .query(&[("limit", limit.min(u32::MAX as usize))]);
        self.dlq_call(r, part).await
    }

    /// [`dlq::replay`] through the endpoint.
    pub async fn dlq_replay(&self, part: &str, filter: &Filter) -> Result<ReplayReport, DlqError> {
        let r = self
            .request(reqwest::Method::POST, &format!("/broker/dlq/{part}/replay"))
            .json(filter);
        self.dlq_call(r, part).await
    }

    /// [`dlq::purge`] through the endpoint.
    pub async fn dlq_purge(&self, part: &str) -> Result<u32, DlqError> {
        let r = self.request(reqwest::Method::DELETE, &format!("/broker/dlq/{part}"));
        self.dlq_call(r, part).await
    }
}

#[derive(Clone)]
struct Served {
    broker: Broker,
    token: Arc<str>,
    /// Ends open inbox streams, so a graceful shutdown need not wait for
    /// clients to leave.
    stop: tokio_util::sync::CancellationToken,
}

fn problem(status: StatusCode, detail: impl std::fmt::Display) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
        serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "detail": detail.to_string(),
        })
        .to_string(),
    )
        .into_response()
}

async fn authorize(State(s): State<Served>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        use subtle::ConstantTimeEq as _;
        bool::from(g.as_bytes().ct_eq(s.token.as_bytes()))
    });
    if !ok {
        return problem(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    next.run(request).await
}

/// The endpoint's routes for the embedded `broker`, requiring `token`;
/// open inbox streams end when `stop` fires.
pub fn router(
    broker: Broker,
    token: &Secret,
    stop: tokio_util::sync::CancellationToken,
) -> axum::Router {
    let state = Served {
        broker,
        token: Arc::from(token.expose()),
        stop,
    };
    axum::Router::new()
        .route("/broker/ping", get(|| async { StatusCode::NO_CONTENT }))
        .route("/broker/publish", post(publish))
        .route("/broker/inbox/{id}", get(inbox))
        .route("/broker/dlq/{part}", get(dlq_list).delete(dlq_purge))
        .route("/broker/dlq/{part}/replay", post(dlq_replay))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

async fn publish(State(s): State<Served>, Json(body): Json<PublishBody>) -> Response {
    let mut decoded = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        match B64.decode(m.body.as_bytes()) {
            Ok(b) => decoded.push((m.properties, b)),
            Err(e) => return problem(StatusCode::BAD_REQUEST, format!("body is not base64: {e}")),
        }
    }
    let messages = decoded
        .iter()
        .map(|(p, b)| (p.clone(), b.as_slice()))
        .collect();
    match s
        .broker
        .publish_many(&body.exchange, &body.routing_key, messages)
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ PublishError::Returned(_)) => problem(StatusCode::NOT_FOUND, e),
        Err(e @ PublishError::Codec(_)) => problem(StatusCode::BAD_REQUEST, e),
        Err(e @ PublishError::Nacked) => problem(StatusCode::INSUFFICIENT_STORAGE, e),
        Err(e @ PublishError::Timeout(_)) => problem(StatusCode::GATEWAY_TIMEOUT, e),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[derive(Deserialize)]
struct InboxQuery {
    types: String,
}

/// Deletes its inbox when the response stream is dropped (the client left).
struct InboxGuard {
    embedded: Arc<crate::embedded::Embedded>,
    id: String,
}

impl Drop for InboxGuard {
    fn drop(&mut self) {
        self.embedded.delete_inbox(&self.id);
    }
}

fn ndjson(line: &Line) -> Result<axum::body::Bytes, std::io::Error> {
    let mut v = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    v.push(b'\n');
    Ok(v.into())
}

async fn inbox(
    State(s): State<Served>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<InboxQuery>,
) -> Response {
    let well_formed = id
        .strip_prefix("inbox-")
        .is_some_and(|u| uuid::Uuid::parse_str(u).is_ok());
    if !well_formed {
        return problem(StatusCode::BAD_REQUEST, "an inbox id is inbox-<uuid>");
    }
    let types: Vec<String> = q
        .types
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    if types.is_empty() {
        return problem(StatusCode::BAD_REQUEST, "types: at least one reply type");
    }
    let Some(embedded) = s.broker.as_embedded().cloned() else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "not an embedded broker");
    };
    embedded.declare_inbox(&id, crate::reply::Inbox::bindings(&id, &types));
    let consumer = match embedded.consume(&id, u16::MAX) {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let guard = InboxGuard { embedded, id };
    let stop = s.stop.clone();
    let first = futures_util::stream::once(async {
        ndjson(&Line {
            ready: true,
            ..Default::default()
        })
    });
    let rest = futures_util::stream::unfold(
        (consumer, guard, stop),
        |(consumer, guard, stop)| async move {
            let line = tokio::select! {
                _ = stop.cancelled() => return None,
                next = consumer.next() => {
                    let d = next?;
                    let line = Line {
                        ready: false,
                        message: Some(WireMessage {
                            properties: d.properties.clone(),
                            body: B64.encode(&d.data),
                        }),
                    };
                    d.handle.ack();
                    line
                }
                _ = tokio::time::sleep(HEARTBEAT) => Line::default(),
            };
            Some((ndjson(&line), (consumer, guard, stop)))
        },
    );
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(axum::body::Body::from_stream(first.chain(rest)))
        .unwrap_or_else(|e| problem(StatusCode::INTERNAL_SERVER_ERROR, e))
}

fn dlq_problem(e: DlqError) -> Response {
    match e {
        DlqError::UnknownPart(_) => problem(StatusCode::NOT_FOUND, e),
        e => problem(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn dlq_list(
    State(s): State<Served>,
    UrlPath(part): UrlPath<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    match dlq::list(&s.broker, &part, q.limit.unwrap_or(100)).await {
        Ok(letters) => Json(letters).into_response(),
        Err(e) => dlq_problem(e),
    }
}

async fn dlq_replay(
    State(s): State<Served>,
    UrlPath(part): UrlPath<String>,
    Json(filter): Json<Filter>,
) -> Response {
    match dlq::replay(&s.broker, &part, &filter).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => dlq_problem(e),
    }
}

async fn dlq_purge(State(s): State<Served>, UrlPath(part): UrlPath<String>) -> Response {
    match dlq::purge(&s.broker, &part).await {
        Ok(n) => Json(n).into_response(),
        Err(e) => dlq_problem(e),
    }
}
