//! `[gateway]` config and the gateway's metrics.

use std::net::SocketAddr;

use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::Gateway;

/// `[gateway]` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// SHA-256 hex digests of accepted API keys (`bruno keys hash KEY`); empty: no auth.
    pub api_key_hashes: Vec<String>,
    /// Refuse to start when `api_key_hashes` is empty (staging, prod).
    pub require_api_keys: bool,
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
            require_api_keys: false,
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
    pub(crate) turn_seconds: Histogram,
    /// Shared with the reply inbox, which counts into it.
    pub(crate) late_replies: Counter,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            turn_seconds: Histogram::new(exponential_buckets(0.002, 2.0, 16)),
            late_replies: Counter::default(),
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

/// Count `response` under `route` and its status, and pass it on.
pub(crate) fn record(gw: &Gateway, route: &'static str, response: Response) -> Response {
    gw.metrics
        .requests
        .get_or_create(&RouteLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}
