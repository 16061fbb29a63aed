//! The chat gateway: HTTP in, `chat.requested` / `search.requested` out,
//! correlated reply events back.
//!
//! Each instance owns one reply inbox (an exclusive, auto-delete queue bound
//! on `{type, replyto = <instance id>}`, re-declared after reconnects); a
//! request registers its correlation id before it publishes, then waits for
//! its replies. A timeout answers 504 with the correlation id; a broker
//! connection lost while waiting answers 503 at once; a late or unknown
//! reply is dropped and counted.
//!
//! Routes: `POST /v1/chat`, `POST /v1/chat/stream` (SSE), `POST /v1/search`,
//! OpenAI-compatible `POST /v1/chat/completions` (plain and `stream: true`)
//! and `GET /v1/models`. API keys (hashed at rest), a per-key rate limit
//! (429 + Retry-After), body limits and input validation (400 problem+json).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bruno_broker::Broker;
use bruno_broker::reply::{Inbox, Registration, Reply};
use bruno_events::payload::{
    ChatCompleted, ChatDelta, ChatFailed, ChatOptions, ChatRequested, Citation, SearchCompleted,
    SearchFilters, SearchRequested, TokenUsage,
};
use bruno_events::{AttributesReader, EventData, ExtensionValue, decode_data, new_event};
use bruno_runtime::Problem;
use bruno_runtime::keys::{ApiKeys, BadKeyHash, Caller};
use futures_util::{Stream, StreamExt};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The event types the gateway awaits.
pub const REPLY_TYPES: [&str; 4] = [
    ChatDelta::TYPE,
    ChatCompleted::TYPE,
    ChatFailed::TYPE,
    SearchCompleted::TYPE,
];

/// `[gateway]` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// SHA-256 hex digests of accepted API keys (`bruno keys hash KEY`); empty: no auth.
    pub api_key_hashes: Vec<String>,
    /// Requests per minute per key (0: no limit).
    pub requests_per_minute: u32,
    /// Requests a key may send at once above the steady rate.
    pub burst: u32,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest message or query, in characters.
    pub max_message_chars: usize,
    /// How long a chat turn may take.
    pub chat_timeout_ms: u64,
    /// How long a search may take.
    pub search_timeout_ms: u64,
    /// The model name shown to OpenAI clients.
    pub model_name: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            api_key_hashes: Vec::new(),
            requests_per_minute: 600,
            burst: 60,
            max_body_bytes: 256 << 10,
            max_message_chars: 8000,
            chat_timeout_ms: 60_000,
            search_timeout_ms: 10_000,
            model_name: "bruno".into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    status: u16,
}

/// Gateway metrics (`bruno_gateway_*`).
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    requests: Family<RouteLabels, Counter>,
    turn_seconds: Histogram,
    late_replies: Gauge,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            turn_seconds: Histogram::new(exponential_buckets(0.002, 2.0, 16)),
            late_replies: Gauge::default(),
        }
    }
}

impl GatewayMetrics {
    /// Register in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bruno_gateway_requests",
            "Requests by route and status",
            self.requests.clone(),
        );
        registry.register(
            "bruno_gateway_turn_duration_seconds",
            "Chat request in to final reply out",
            self.turn_seconds.clone(),
        );
        registry.register(
            "bruno_gateway_late_replies",
            "Replies that arrived after their request gave up (or were unknown)",
            self.late_replies.clone(),
        );
    }
}

/// The gateway's state.
pub struct Gateway {
    broker: Broker,
    inbox: Inbox,
    keys: ApiKeys,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    config: GatewayConfig,
    metrics: GatewayMetrics,
}

/// What a finished chat turn answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatAnswer {
    /// The answer.
    pub answer: String,
    /// The passages it cites.
    pub citations: Vec<Citation>,
    /// Token usage.
    pub usage: TokenUsage,
    /// The model (`extractive` for a fallback answer).
    pub model: String,
    /// True when the LLM was unavailable and the answer is extractive.
    pub fallback: bool,
    /// The turn's correlation id.
    pub correlation_id: String,
    /// The W3C trace id of the turn.
    pub trace_id: String,
    /// The session.
    pub session_id: String,
}

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
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Problem> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        Problem::invalid(field, e.inner().to_string())
    })
}

fn trace() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    (format!("00-{trace_id}-{span_id}-01"), trace_id)
}

/// A published request and its waiter.
struct Pending {
    registration: Registration,
    correlation: String,
    trace_id: String,
    deadline: tokio::time::Instant,
}

enum Next {
    Delta(ChatDelta),
    Done(Box<ChatCompleted>),
    Search(SearchCompleted),
    Failed(Problem),
}

impl Pending {
    async fn next(&mut self) -> Next {
        loop {
            match tokio::time::timeout_at(self.deadline, self.registration.replies.recv()).await {
                Err(_) => {
                    return Next::Failed(
                        Problem::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            format!("no answer in time; correlation id {}", self.correlation),
                        )
                        .with_correlation(&self.correlation),
                    );
                }
                Ok(None) | Ok(Some(Reply::Lost)) => {
                    return Next::Failed(
                        Problem::unavailable(
                            format!(
                                "the broker connection was lost; correlation id {}",
                                self.correlation
                            ),
                            1,
                        )
                        .with_correlation(&self.correlation),
                    );
                }
                Ok(Some(Reply::Event(e))) => {
                    let decoded = match e.ty() {
                        ChatDelta::TYPE => decode_data::<ChatDelta>(&e).map(Next::Delta),
                        ChatCompleted::TYPE => {
                            decode_data::<ChatCompleted>(&e).map(|d| Next::Done(Box::new(d)))
                        }
                        SearchCompleted::TYPE => {
                            decode_data::<SearchCompleted>(&e).map(Next::Search)
                        }
                        ChatFailed::TYPE => decode_data::<ChatFailed>(&e).map(|f| {
                            Next::Failed(
                                Problem::new(
                                    StatusCode::BAD_GATEWAY,
                                    "chat-failed",
                                    format!(
                                        "{}: {}; correlation id {}",
                                        f.reason, f.message, self.correlation
                                    ),
                                )
                                .with_correlation(&self.correlation),
                            )
                        }),
                        _ => continue,
                    };
                    match decoded {
                        Ok(next) => return next,
                        Err(err) => tracing::warn!(error = %err, "undecodable reply dropped"),
                    }
                }
            }
        }
    }
}

impl Gateway {
    /// A gateway over a started broker; starts its reply inbox.
    pub fn new(
        config: GatewayConfig,
        broker: Broker,
        metrics: GatewayMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self, BadKeyHash> {
        let keys = ApiKeys::from_hashes("gateway.api_key_hashes", &config.api_key_hashes)?;
        let limiter = NonZeroU32::new(config.requests_per_minute).map(|rpm| {
            let burst = NonZeroU32::new(config.burst.max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_minute(rpm).allow_burst(burst))
        });
        let inbox = Inbox::start(
            broker.clone(),
            REPLY_TYPES.iter().map(|t| (*t).to_owned()).collect(),
            shutdown.clone(),
        );
        let late = metrics.late_replies.clone();
        let watched = inbox.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        late.set(i64::try_from(watched.late_replies()).unwrap_or(i64::MAX));
                    }
                }
            }
        });
        Ok(Self {
            broker,
            inbox,
            keys,
            limiter,
            config,
            metrics,
        })
    }

    /// The reply inbox (its id is this instance's `replyto`).
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// True when requests can be published and replies received.
    pub fn is_ready(&self) -> bool {
        self.broker.is_connected() && self.inbox.is_ready()
    }

    fn admit(&self, headers: &HeaderMap) -> Result<(), Problem> {
        let caller = self.keys.check(headers).ok_or_else(|| {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required",
            )
        })?;
        if let Some(limiter) = &self.limiter {
            let key = match caller {
                Caller::Anonymous => "anonymous".to_owned(),
                Caller::Key(k) => k,
            };
            if let Err(not_until) = limiter.check_key(&key) {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                let secs = u32::try_from(wait.as_secs() + 1).unwrap_or(u32::MAX);
                return Err(Problem {
                    retry_after: Some(secs),
                    ..Problem::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate-limited",
                        "too many requests for this key",
                    )
                });
            }
        }
        Ok(())
    }

    fn check_text(&self, field: &str, text: &str) -> Result<(), Problem> {
        if text.trim().is_empty() {
            return Err(Problem::invalid(field, "must not be empty"));
        }
        let n = text.chars().count();
        if n > self.config.max_message_chars {
            return Err(Problem::invalid(
                field,
                format!(
                    "{n} characters exceeds the limit of {} (gateway.max_message_chars)",
                    self.config.max_message_chars
                ),
            ));
        }
        Ok(())
    }

    async fn send<T: EventData>(&self, data: &T, timeout_ms: u64) -> Result<Pending, Problem> {
        if !self.inbox.is_ready() {
            return Err(Problem::unavailable(
                "the reply queue is not ready (broker unreachable)",
                1,
            ));
        }
        let correlation = uuid::Uuid::new_v4().to_string();
        let (traceparent, trace_id) = trace();
        let mut event = new_event("bruno/gateway", data);
        self.inbox.address(&mut event, &correlation);
        event.set_extension("traceparent", ExtensionValue::String(traceparent));
        let registration = self.inbox.register(&correlation);
        self.broker
            .publish(&event)
            .await
            .map_err(|e| Problem::unavailable(format!("cannot publish: {e}"), 1))?;
        Ok(Pending {
            registration,
            correlation,
            trace_id,
            deadline: tokio::time::Instant::now() + Duration::from_millis(timeout_ms),
        })
    }

    async fn chat(&self, request: ChatRequested) -> Result<Pending, Problem> {
        self.check_text("message", &request.message)?;
        self.check_text("session_id", &request.session_id)?;
        self.send(&request, self.config.chat_timeout_ms).await
    }

    fn answer(pending: &Pending, done: ChatCompleted) -> ChatAnswer {
        ChatAnswer {
            answer: done.answer,
            citations: done.citations,
            usage: done.usage,
            model: done.model,
            fallback: done.fallback,
            correlation_id: pending.correlation.clone(),
            trace_id: pending.trace_id.clone(),
            session_id: done.session_id,
        }
    }

    /// Wait for the final reply of a chat turn, ignoring deltas.
    async fn finish(&self, mut pending: Pending) -> Result<ChatAnswer, Problem> {
        loop {
            match pending.next().await {
                Next::Delta(_) | Next::Search(_) => continue,
                Next::Done(done) => return Ok(Self::answer(&pending, *done)),
                Next::Failed(p) => return Err(p),
            }
        }
    }
}

fn record(gw: &Gateway, route: &'static str, response: Response) -> Response {
    gw.metrics
        .requests
        .get_or_create(&RouteLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

fn options(
    k: Option<u32>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    stream: bool,
) -> ChatOptions {
    ChatOptions {
        model: None,
        temperature,
        max_tokens,
        k,
        stream,
    }
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

async fn chat(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
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

/// Deltas in `seq` order (duplicates dropped, gaps waited for), then the end.
struct Ordered {
    next_seq: u64,
    held: BTreeMap<u64, String>,
    streamed: String,
}

impl Ordered {
    fn new() -> Self {
        Self {
            next_seq: 0,
            held: BTreeMap::new(),
            streamed: String::new(),
        }
    }

    fn push(&mut self, delta: ChatDelta) -> Vec<String> {
        if delta.seq >= self.next_seq {
            self.held.insert(delta.seq, delta.text);
        }
        let mut out = Vec::new();
        while let Some(text) = self.held.remove(&self.next_seq) {
            self.next_seq += 1;
            self.streamed.push_str(&text);
            out.push(text);
        }
        out
    }

    /// What the final answer adds to what was streamed (all of it for a
    /// fallback answer that had no deltas).
    fn rest(&mut self, answer: &str) -> Option<String> {
        let rest = answer
            .strip_prefix(self.streamed.as_str())
            .unwrap_or(answer);
        (!rest.is_empty()).then(|| rest.to_owned())
    }
}

type SseItem = Result<SseEvent, Infallible>;

fn sse_json(name: &str, value: &impl Serialize) -> SseEvent {
    SseEvent::default()
        .event(name)
        .data(serde_json::to_string(value).unwrap_or_default())
}

/// What a streamed turn yields, in order: text as the answer grows, then
/// how it ended.
enum Piece {
    Text(String),
    Done(Box<ChatAnswer>),
    Failed(Problem),
}

/// A turn's replies as [`Piece`]s: deltas in `seq` order, then whatever of
/// the final answer was not streamed, then the end. Records the turn time.
fn pieces(gw: Arc<Gateway>, pending: Pending, started: Instant) -> impl Stream<Item = Piece> {
    futures_util::stream::unfold(Some((pending, Ordered::new())), move |state| {
        let gw = gw.clone();
        async move {
            let (mut pending, mut order) = state?;
            loop {
                match pending.next().await {
                    Next::Delta(d) => {
                        let texts = order.push(d);
                        if texts.is_empty() {
                            continue;
                        }
                        let out: Vec<Piece> = texts.into_iter().map(Piece::Text).collect();
                        return Some((futures_util::stream::iter(out), Some((pending, order))));
                    }
                    Next::Search(_) => continue,
                    Next::Done(done) => {
                        gw.metrics
                            .turn_seconds
                            .observe(started.elapsed().as_secs_f64());
                        let mut out = Vec::new();
                        if let Some(rest) = order.rest(&done.answer) {
                            out.push(Piece::Text(rest));
                        }
                        out.push(Piece::Done(Box::new(Gateway::answer(&pending, *done))));
                        return Some((futures_util::stream::iter(out), None));
                    }
                    Next::Failed(p) => {
                        return Some((futures_util::stream::iter(vec![Piece::Failed(p)]), None));
                    }
                }
            }
        }
    })
    .flatten()
}

/// Bruno's SSE: `delta` events, then `done` with the answer (or `error`).
fn stream_events(
    gw: Arc<Gateway>,
    pending: Pending,
    started: Instant,
) -> impl Stream<Item = SseItem> {
    pieces(gw, pending, started).map(|piece| {
        Ok(match piece {
            Piece::Text(t) => sse_json("delta", &json!({ "text": t })),
            Piece::Done(answer) => sse_json("done", &answer),
            Piece::Failed(p) => sse_json("error", &p),
        })
    })
}

async fn chat_stream(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
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

async fn search(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        gw.admit(&headers)?;
        let b: SearchBody = parse(&body)?;
        gw.check_text("query", &b.query)?;
        let request = SearchRequested { query: b.query, k: b.k.unwrap_or(5), filters: b.filters };
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

async fn chat_completions(
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

async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(p) = gw.admit(&headers) {
        return p.into_response();
    }
    axum::Json(json!({"object": "list", "data": [
        {"id": gw.config.model_name, "object": "model", "created": 0, "owned_by": "bruno"}
    ]}))
    .into_response()
}

async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        Problem::unavailable("broker or reply queue not ready", 1).into_response()
    }
}

async fn too_large(
    gw: Arc<Gateway>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = gw.config.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("body over {limit} bytes (gateway.max_body_bytes)"),
        )
        .into_response();
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("body over {limit} bytes (gateway.max_body_bytes)"),
        )
        .into_response();
    }
    response
}

/// The gateway's HTTP routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    let limit = gw.config.max_body_bytes;
    let guard = gw.clone();
    Router::new()
        .route("/v1/chat", post(chat))
        .route("/v1/chat/stream", post(chat_stream))
        .route("/v1/search", post(search))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/live", get(|| async { "live" }))
        .route("/ready", get(ready))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(move |req, next| {
            too_large(guard.clone(), req, next)
        }))
        .with_state(gw)
}
