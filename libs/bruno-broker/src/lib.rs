//! CloudEvents on RabbitMQ, laid out as Knative's RabbitMQ broker does it.
//!
//! - [`codec`]: CloudEvent ⇄ AMQP message.
//! - [`Topology`]: the headers exchange, per-part quorum queues, retry delay
//!   tiers, dead-letter queues and the unroutable queue, declared idempotently.
//! - [`Broker`]: one supervised connection that reconnects with backoff, and a
//!   publisher whose every publish returns only once the broker confirmed it.
//! - [`consume`]: the consumer loop that turns a [`Disposition`] into ack,
//!   delayed retry or dead letter, confirming every publish before the ack.
//! - [`dlq`]: list, inspect, replay and purge dead letters.
#![forbid(unsafe_code)]

pub mod codec;
mod config;
mod connection;
mod consume;
pub mod dlq;
pub mod embedded;
mod metrics;
/// One-shot commands against another process's embedded broker.
pub mod remote;
/// Request/reply for tools.
pub mod reply;
/// Push mode's HTTP publisher.
pub mod sink;
/// Queue depths for the metrics.
pub mod stats;
mod topology;
pub mod trace;

pub use config::BrokerConfig;
pub use connection::{Broker, PublishError};
pub use consume::{Delivered, Disposition, Processor, consume};
pub use metrics::{BrokerMetrics, QueueLabels};
pub use topology::manifests::render as topology_manifests;
pub use topology::{Names, PartSpec, Topology, TopologyError};

/// AMQP headers Bruno adds to a message besides the CloudEvent attributes.
/// They start with `x-` so they can never collide with a CloudEvent
/// attribute name (those are lowercase letters and digits only).
pub mod headers {
    /// How many times a handler has already failed on this message.
    pub const ATTEMPTS: &str = "x-bruno-attempts";
    /// Why the message was dead-lettered or last retried.
    pub const ERROR_REASON: &str = "x-bruno-error-reason";
    /// A small fixed code for the error (see `ErrorCode`).
    pub const ERROR_CODE: &str = "x-bruno-error-code";
    /// The part that gave up on the message.
    pub const PART: &str = "x-bruno-part";
    /// When it gave up (RFC 3339).
    pub const FAILED_AT: &str = "x-bruno-failed-at";
    /// Set on a message put back by `bruno dlq replay`.
    pub const REPLAYED: &str = "x-bruno-replayed";
}
