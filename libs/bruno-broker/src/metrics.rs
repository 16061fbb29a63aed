//! Broker metrics, named by the spec in docs/metrics.md: `bruno_<name>_<unit>`,
//! counters end in `_total`, labels are small fixed sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of consumed-message counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The part.
    pub part: String,
    /// `ack`, `retry`, `dead_letter` or `requeue`.
    pub outcome: &'static str,
}

/// Labels of per-part histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabels {
    /// The part.
    pub part: String,
}

/// Labels of publish counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    /// `confirmed`, `nacked`, `returned`, `timeout` or `unavailable`.
    pub outcome: &'static str,
}

/// Labels of queue gauges read from the broker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// The queue's name.
    pub queue: String,
    /// The part it belongs to (empty for the shared queues).
    pub part: String,
    /// `work`, `retry`, `dlq`, `unroutable` or `observed`.
    pub kind: &'static str,
}

/// Everything the broker layer measures.
#[derive(Clone, Debug)]
pub struct BrokerMetrics {
    /// Messages consumed, by part and outcome.
    pub consumed: Family<OutcomeLabels, Counter>,
    /// Handler time per message, by part.
    pub handle_seconds: Family<PartLabels, Histogram>,
    /// Publishes by outcome.
    pub published: Family<PublishLabels, Counter>,
    /// 1 while connected.
    pub connected: Gauge,
    /// Successful reconnects after a lost connection.
    pub reconnects: Counter,
    /// Messages ready in a queue, as the broker last said (a work queue's
    /// backlog is its consumers' lag).
    pub queue_messages: Family<QueueLabels, Gauge>,
    /// Consumers on a queue, as the broker last said.
    pub queue_consumers: Family<QueueLabels, Gauge>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self {
            consumed: Family::default(),
            handle_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            published: Family::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            queue_messages: Family::default(),
            queue_consumers: Family::default(),
        }
    }
}

impl BrokerMetrics {
    /// Register every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bruno_queue_messages",
            "Messages ready in a queue (backlog; for a work queue, its consumers' lag), read from the broker",
            self.queue_messages.clone(),
        );
        registry.register(
            "bruno_queue_consumers",
            "Consumers on a queue, read from the broker",
            self.queue_consumers.clone(),
        );
        registry.register(
            "bruno_events_consumed",
            "Messages consumed, by part and outcome",
            self.consumed.clone(),
        );
        registry.register(
            "bruno_event_handle_duration_seconds",
            "Time from delivery to ack, by part",
            self.handle_seconds.clone(),
        );
        registry.register(
            "bruno_events_published",
            "Publishes, by outcome",
            self.published.clone(),
        );
        registry.register(
            "bruno_broker_connected",
            "1 while connected to RabbitMQ",
            self.connected.clone(),
        );
        registry.register(
            "bruno_broker_reconnects",
            "Reconnects after a lost connection",
            self.reconnects.clone(),
        );
    }

    pub(crate) fn outcome(&self, part: &str, outcome: &'static str) {
        self.consumed
            .get_or_create(&OutcomeLabels {
                part: part.to_owned(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn publish(&self, outcome: &'static str) {
        self.published
            .get_or_create(&PublishLabels { outcome })
            .inc();
    }
}
