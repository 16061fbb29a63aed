//! The ingress: a thin HTTP front (a Knative Service) that takes CloudEvents
//! in binary, structured or batch mode, validates them against the catalogue
//! and publishes them to RabbitMQ. It answers 202 only after the broker
//! confirmed every event of the request; a batch is validated whole before
//! anything is published.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bruno_broker::{Broker, PublishError};
use bruno_events::{AttributesReader, Limits, validate};
use bruno_runtime::Problem;
use bruno_runtime::http_events::{Mode, parse};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;

/// Ingress settings (`[ingress]` in the config file, `BRUNO_INGRESS__*`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Largest event `data`, in bytes (400 above it).
    pub max_data_bytes: usize,
    /// SHA-256 (hex) of the accepted API keys; empty means no auth.
    /// `bruno keys hash` prints the hash of a key.
    pub api_key_hashes: Vec<String>,
    /// Refuse to start when `api_key_hashes` is empty (staging, prod).
    pub require_api_keys: bool,
    /// `Retry-After` seconds while the broker is unreachable.
    pub retry_after_secs: u32,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_body_bytes: 4 << 20,
            max_data_bytes: 2 << 20,
            api_key_hashes: Vec::new(),
            require_api_keys: false,
            retry_after_secs: 1,
        }
    }
}

use bruno_runtime::keys::ApiKeys;
pub use bruno_runtime::keys::{KeyError, hash_key};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Ingress metrics.
#[derive(Clone, Debug)]
pub struct IngressMetrics {
    requests: Family<OutcomeLabels, Counter>,
    events: Counter,
    publish_seconds: Histogram,
}

impl Default for IngressMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            events: Counter::default(),
            publish_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

impl IngressMetrics {
    /// Register in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bruno_ingress_requests",
            "Ingress requests by outcome",
            self.requests.clone(),
        );
        registry.register(
            "bruno_ingress_events_accepted",
            "Events confirmed by the broker",
            self.events.clone(),
        );
        registry.register(
            "bruno_ingress_publish_duration_seconds",
            "Time from a request's first publish to its last confirm",
            self.publish_seconds.clone(),
        );
    }
    fn outcome(&self, outcome: &'static str) {
        self.requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// Shared state of the ingress handlers.
pub struct Ingress {
    broker: Broker,
    keys: ApiKeys,
    limits: Limits,
    max_body_bytes: usize,
    retry_after: u32,
    metrics: IngressMetrics,
}

impl Ingress {
    /// Ingress state over a started broker.
    pub fn new(
        config: &IngressConfig,
        broker: Broker,
        metrics: IngressMetrics,
    ) -> Result<Self, KeyError> {
        let keys = ApiKeys::from_hashes(
            "ingress.api_key_hashes",
            &config.api_key_hashes,
            config.require_api_keys,
        )?;
        Ok(Self {
            broker,
            keys,
            limits: Limits {
                max_data_bytes: config.max_data_bytes,
                ..Limits::default()
            },
            max_body_bytes: config.max_body_bytes,
            retry_after: config.retry_after_secs,
            metrics,
        })
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        self.keys.check(headers).is_some()
    }
}

/// The ingress router. Its one layer is the request span; the handlers
/// read the body themselves, within `max_body_bytes`, so one function
/// gives every 413 its problem+json body (no limit layer whose bare 413
/// another layer has to rewrite).
pub fn router(state: Arc<Ingress>) -> Router {
    Router::new()
        .route("/", post(ingest))
        .route("/dead-letters/{part}", post(dead_letter))
        // Knative's queue-proxy probes the serving port; the admin server
        // (with /metrics) stays on its own port.
        .route("/live", get(|| async { "live" }))
        .route("/ready", get(ready))
        .with_state(state)
        .layer(axum::middleware::from_fn(
            bruno_runtime::telemetry::http_span,
        ))
}

/// The request body, at most `max` bytes: a Content-Length above it is
/// refused before anything is read, a longer chunked body once it passes
/// the limit; both with the same problem+json 413.
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large(max));
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        if is_length_limit(&e) {
            too_large(max)
        } else {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "bad-body",
                format!("cannot read body: {e}"),
            )
        }
    })
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        current = err.source();
    }
    false
}

fn too_large(max: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("body over {max} bytes (ingress.max_body_bytes)"),
    )
}

async fn ready(State(state): State<Arc<Ingress>>) -> Response {
    if state.broker.is_connected() {
        (StatusCode::OK, "ready").into_response()
    } else {
        Problem::unavailable("the broker is unreachable", state.retry_after).into_response()
    }
}

async fn ingest(State(state): State<Arc<Ingress>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if !state.authorized(&parts.headers) {
        state.metrics.outcome("unauthorized");
        let mut r = Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required",
        )
        .into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let body = match read_body(&parts.headers, body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(p) => {
            state.metrics.outcome("rejected");
            return p.into_response();
        }
    };
    let (mode, events) = match parse(&parts.headers, &body) {
        Ok(parsed) => parsed,
        Err(p) => {
            state.metrics.outcome("rejected");
            return p.into_response();
        }
    };
    for (i, event) in events.iter().enumerate() {
        if let Err(e) = validate(event, &state.limits) {
            state.metrics.outcome("rejected");
            let mut p = Problem::from(e);
            if mode == Mode::Batch {
                p.field = p.field.map(|f| format!("[{i}].{f}"));
                p.detail = format!("batch member {i}: {}", p.detail);
            }
            return p.into_response();
        }
    }
    if !state.broker.is_connected() {
        state.metrics.outcome("unavailable");
        return Problem::unavailable("the broker is unreachable; retry later", state.retry_after)
            .into_response();
    }
    let started = Instant::now();
    match state.broker.publish_all(&events).await {
        Ok(()) => {
            state
                .metrics
                .publish_seconds
                .observe(started.elapsed().as_secs_f64());
            state.metrics.outcome("accepted");
            state.metrics.events.inc_by(events.len() as u64);
            let accepted = Accepted {
                accepted: events.len(),
                ids: events.iter().map(|e| e.id()).collect(),
            };
            (StatusCode::ACCEPTED, axum::Json(accepted)).into_response()
        }
        Err(PublishError::Codec(e)) => {
            state.metrics.outcome("rejected");
            Problem::new(StatusCode::BAD_REQUEST, "invalid-event", e.to_string()).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "publish failed");
            state.metrics.outcome("unavailable");
            Problem::unavailable(
                format!("not confirmed by the broker: {e}"),
                state.retry_after,
            )
            .into_response()
        }
    }
}

/// The 202 body: how many events were accepted, and their ids.
#[derive(serde::Serialize)]
struct Accepted<'a> {
    accepted: usize,
    ids: Vec<&'a str>,
}

/// What Knative says about an event it gave up on (the extensions its
/// dispatcher adds before sending it to the dead-letter sink), as Bruno's
/// error code and reason.
fn knative_failure(event: &bruno_events::Event) -> (bruno_runtime::ErrorCode, String) {
    use base64::Engine as _;
    use bruno_runtime::ErrorCode;
    let status = bruno_events::ext_str(event, "knativeerrorcode").unwrap_or("none");
    let dest = bruno_events::ext_str(event, "knativeerrordest").unwrap_or("the subscriber");
    // The subscriber's answer: a Bruno part answers problem+json whose type
    // ends in its error code.
    let problem = bruno_events::ext_str(event, "knativeerrordata")
        .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let slug = problem
        .as_ref()
        .and_then(|p| p["type"].as_str())
        .and_then(|t| t.rsplit('/').next())
        .and_then(|slug| ErrorCode::ALL.into_iter().find(|c| c.as_str() == slug));
    let detail = problem
        .as_ref()
        .and_then(|p| p["detail"].as_str())
        .unwrap_or("no answer");
    let code = slug.unwrap_or(if status.starts_with('4') {
        ErrorCode::InvalidEvent
    } else {
        ErrorCode::Dependency
    });
    (
        code,
        format!("Knative gave up delivering to {dest} (HTTP {status}): {detail}"),
    )
}

/// The dead-letter sink of push mode (a Trigger's `delivery.deadLetterSink`):
/// the event goes to `<part>.dlq` with Bruno's error headers, so `bruno dlq`
/// lists, replays and purges push-mode failures as it does pull-mode ones.
async fn dead_letter(
    State(state): State<Arc<Ingress>>,
    Path(part): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    if !state.authorized(&headers) {
        state.metrics.outcome("unauthorized");
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required",
        )
        .into_response();
    }
    if state.broker.topology().part(&part).is_none() {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "unknown-part",
            format!("no part {part:?}"),
        )
        .into_response();
    }
    let body = match read_body(&headers, body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(p) => return p.into_response(),
    };
    let event = match parse(&headers, &body) {
        Ok((Mode::Batch, _)) => {
            return Problem::invalid("body", "one dead letter per request").into_response();
        }
        Ok((_, mut events)) if events.len() == 1 => events.remove(0),
        Ok(_) => return Problem::invalid("body", "one dead letter per request").into_response(),
        Err(p) => return p.into_response(),
    };
    let (code, reason) = knative_failure(&event);
    let (props, body) = match bruno_broker::codec::encode(&event) {
        Ok(encoded) => encoded,
        Err(e) => {
            return Problem::new(StatusCode::BAD_REQUEST, "invalid-event", e.to_string())
                .into_response();
        }
    };
    let props = bruno_broker::dlq::failed_props(props, &part, code, &reason, 1);
    let dlq = state.broker.topology().names.dlq(&part);
    match state.broker.publish_raw("", &dlq, props, &body).await {
        Ok(()) => {
            tracing::warn!(%part, %code, %reason, "push-mode dead letter stored");
            StatusCode::ACCEPTED.into_response()
        }
        Err(e) => Problem::unavailable(
            format!("not confirmed by the broker: {e}"),
            state.retry_after,
        )
        .into_response(),
    }
}
