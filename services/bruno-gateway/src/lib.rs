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

mod admit;
mod config;
mod correlate;
mod native;
mod openai;
mod stream;

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bruno_broker::Broker;
use bruno_broker::reply::Inbox;
use bruno_events::EventData;
use bruno_events::payload::{ChatCompleted, ChatDelta, ChatFailed, SearchCompleted};
use bruno_runtime::Problem;
use bruno_runtime::keys::{ApiKeys, KeyError};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::StatusCode;
use tokio_util::sync::CancellationToken;

pub use config::{GatewayConfig, GatewayMetrics};
pub use correlate::ChatAnswer;

/// The event types the gateway awaits.
pub const REPLY_TYPES: [&str; 4] = [
    ChatDelta::TYPE,
    ChatCompleted::TYPE,
    ChatFailed::TYPE,
    SearchCompleted::TYPE,
];

/// The gateway's state.
pub struct Gateway {
    broker: Broker,
    inbox: Inbox,
    keys: ApiKeys,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    config: GatewayConfig,
    metrics: GatewayMetrics,
}

impl Gateway {
    /// A gateway over a started broker; starts its reply inbox, which counts
    /// late replies into `metrics`.
    pub fn new(
        config: GatewayConfig,
        broker: Broker,
        metrics: GatewayMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self, KeyError> {
        let keys = ApiKeys::from_hashes(
            "gateway.api_key_hashes",
            &config.api_key_hashes,
            config.require_api_keys,
        )?;
        let limiter = NonZeroU32::new(config.requests_per_minute).map(|rpm| {
            let burst = NonZeroU32::new(config.burst.max(1)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_minute(rpm).allow_burst(burst))
        });
        let inbox = Inbox::start_counting(
            broker.clone(),
            REPLY_TYPES.iter().map(|t| (*t).to_owned()).collect(),
            metrics.late_replies.clone(),
            shutdown,
        );
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
}

async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        Problem::unavailable("broker or reply queue not ready", 1).into_response()
    }
}

/// The gateway's HTTP routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    let limit = gw.config.max_body_bytes;
    let guard = gw.clone();
    Router::new()
        .route("/v1/chat", post(native::chat))
        .route("/v1/chat/stream", post(native::chat_stream))
        .route("/v1/search", post(native::search))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/live", get(|| async { "live" }))
        .route("/ready", get(ready))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(move |req, next| {
            admit::too_large(guard.clone(), req, next)
        }))
        .layer(axum::middleware::from_fn(
            bruno_runtime::telemetry::http_span,
        ))
        .with_state(gw)
}
