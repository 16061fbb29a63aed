use std::time::Duration;

use bruno_core::Secret;
use serde::Deserialize;

/// How to reach RabbitMQ and how to treat failures.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// AMQP URI, credentials included (hence secret). `amqps://` for TLS.
    /// Unset: `bruno dev` runs the embedded broker (ADR 14); every other
    /// process that needs a broker refuses to start without it.
    pub url: Option<Secret>,
    /// The embedded broker's directory: its journal and the endpoint file
    /// one-shot commands find it by.
    pub embedded_dir: std::path::PathBuf,
    /// Journal the embedded broker's messages so a restart loses none.
    pub embedded_journal: bool,
    /// Where the embedded broker serves one-shot commands (loopback).
    pub embedded_listen: std::net::SocketAddr,
    /// Journal size past which it is rewritten with only live messages.
    pub embedded_compact_bytes: u64,
    /// Push mode (ADR 15): publish events as CloudEvents over HTTP to this
    /// sink, the Knative `Broker`'s ingress, instead of the events exchange.
    /// A push-mode consumer needs nothing else; raw publishes (dead
    /// letters, retries) and inboxes still need `url`.
    pub publish_url: Option<String>,
    /// Push mode: the parts Knative Triggers serve, left out of the AMQP
    /// topology so no queue fills up that nobody consumes.
    pub push_parts: Vec<String>,
    /// PEM file of the CA(s) that signed the broker's certificate, for
    /// `amqps://` to a broker with a private CA (else the public web roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// Prefix for every exchange and queue name (isolates tests and tenants).
    pub prefix: String,
    /// `x-delivery-limit` of the part queues: redeliveries (crashes, nacks)
    /// before the broker itself dead-letters a message.
    pub delivery_limit: u32,
    /// Retry delay tiers in milliseconds; attempt n waits tier min(n, last).
    pub retry_delays_ms: Vec<u64>,
    /// Handler attempts before a retryable failure is dead-lettered.
    pub max_attempts: u32,
    /// How long a publish may wait for the broker's confirm.
    pub publish_timeout_ms: u64,
    /// Channels used for publishing (confirms are pipelined on each).
    pub publish_channels: usize,
    /// First reconnect delay.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_max_ms: u64,
    /// Most messages the unroutable queue keeps (the oldest go first).
    pub unroutable_max_length: u32,
    /// How long an unroutable message is kept.
    pub unroutable_ttl_ms: u64,
    /// Most notifications (`document.indexed`, …) kept for nobody.
    pub observed_max_length: u32,
    /// How long a notification nobody observed is kept.
    pub observed_ttl_ms: u64,
    /// How often queue depths are read for the metrics (0: never).
    pub queue_stats_ms: u64,
    /// How long a request a caller awaits (the work of an interactive
    /// part: `search.requested`, `chat.requested`, …) may wait in its
    /// queue before it is dead-lettered as expired (ADR 17). Longer than
    /// the gateway's timeouts, so no awaited request expires.
    pub request_ttl_ms: u64,
    /// Most requests an interactive part's queue holds; past it a publish
    /// is refused (the gateway answers 503) instead of queueing work
    /// nobody will wait for.
    pub request_max_length: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: None,
            embedded_dir: "./data/broker".into(),
            embedded_journal: true,
            embedded_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            embedded_compact_bytes: 64 << 20,
            publish_url: None,
            push_parts: Vec::new(),
            ca_file: None,
            prefix: String::new(),
            delivery_limit: 10,
            retry_delays_ms: vec![1_000, 10_000, 60_000],
            max_attempts: 5,
            publish_timeout_ms: 5_000,
            publish_channels: 4,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            unroutable_max_length: 10_000,
            unroutable_ttl_ms: 7 * 24 * 3_600_000,
            observed_max_length: 1_000,
            observed_ttl_ms: 600_000,
            queue_stats_ms: 15_000,
            request_ttl_ms: 120_000,
            request_max_length: 10_000,
        }
    }
}

impl BrokerConfig {
    /// The AMQP URL to RabbitMQ on this machine's default port (tools and tests).
    pub const LOCAL_RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10";

    /// The retry delay tiers.
    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect()
    }
    /// The publish-confirm timeout.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}
