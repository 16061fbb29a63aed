//! Exchanges, queues and bindings, declared idempotently.
//!
//! ```text
//! producers ─▶ {p}bruno.events (headers) ──x-match=all──▶ {p}<part>   (quorum; classic for requests, ADR 17)
//!                   │ alternate-exchange                    │ ▲  └─ delivery limit ─▶ {p}<part>.dlq
//!                   ▼                                       │ │ TTL expiry
//!              {p}bruno.alternate (headers)                 ▼ │
//!                   │ ├─ type ∈ observed ─▶ {p}bruno.observed   {p}<part>.retry.<ms>ms (quorum, queue TTL)
//!                   │ │                     (bounded, short TTL: notifications nobody listened to)
//!                   ▼ alternate-exchange
//!              {p}bruno.unroutable (fanout ─▶ quorum, bounded, alerting)
//! ```
//! Retries go through one wait queue per delay tier whose queue-level TTL
//! dead-letters back into the part's queue, so no worker sleeps and no
//! message blocks another one's head of line.
//!
//! An interactive part's work is requests a caller awaits (`search.requested`,
//! `chat.requested`, `chat.contextualized`): its queue is a classic queue
//! (persistent messages, bounded length, a TTL beyond the gateway's
//! timeouts, expired requests dead-lettered), because a quorum queue's
//! consensus round before delivery made one hop 0.52–0.59 ms against
//! 0.18 ms on an idle 2-core machine, and 1.7–3.9 against 0.6 ms with both
//! cores busy (ADR 17). Everything else stays quorum.
//!
//! Notifications that have observers but no consumer by design
//! (`document.indexed`, `backup.completed`, replies whose requester is gone)
//! end in `bruno.observed` when nobody listens; only events nobody was meant
//! to miss reach `bruno.unroutable` (ADR 12).

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// Delivery limit of queues that only people drain (DLQ, unroutable): high,
/// and explicit, because RabbitMQ 4 defaults quorum queues to 20.
const PARKING_DELIVERY_LIMIT: i32 = 1_000_000;

/// Names of everything Bruno declares, under an optional prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix` (empty in production; unique per test).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }
    /// The headers exchange every event is published to.
    pub fn exchange(&self) -> String {
        format!("{}bruno.events", self.prefix)
    }
    /// The alternate exchange and queue that keep unroutable events.
    pub fn unroutable(&self) -> String {
        format!("{}bruno.unroutable", self.prefix)
    }
    /// The events exchange's alternate exchange, which sorts notifications
    /// from unroutable events.
    pub fn alternate(&self) -> String {
        format!("{}bruno.alternate", self.prefix)
    }
    /// The bounded queue of notifications nobody observed.
    pub fn observed(&self) -> String {
        format!("{}bruno.observed", self.prefix)
    }
    /// A part's work queue.
    pub fn queue(&self, part: &str) -> String {
        format!("{}{part}", self.prefix)
    }
    /// A part's dead-letter queue.
    pub fn dlq(&self, part: &str) -> String {
        format!("{}{part}.dlq", self.prefix)
    }
    /// A part's wait queue for one retry delay tier.
    pub fn retry(&self, part: &str, delay: Duration) -> String {
        format!("{}{part}.retry.{}ms", self.prefix, delay.as_millis())
    }
}

/// A part (consumer) and the events it subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    /// Part name, e.g. `embedder`.
    pub name: String,
    /// Each binding is a set of header values that must all match
    /// (`x-match=all`); the part gets an event if any binding matches.
    pub bindings: Vec<BTreeMap<String, String>>,
    /// Only one consumer at a time receives (hot standby for the others).
    pub single_active_consumer: bool,
    /// Its work is requests a caller awaits: a classic queue with a TTL
    /// instead of a quorum queue (ADR 17).
    pub interactive: bool,
}

impl PartSpec {
    /// A part bound on a list of event types.
    pub fn on_types(name: impl Into<String>, types: &[&str]) -> Self {
        Self {
            name: name.into(),
            bindings: types
                .iter()
                .map(|t| BTreeMap::from([("type".to_owned(), (*t).to_owned())]))
                .collect(),
            single_active_consumer: false,
            interactive: false,
        }
    }

    /// Mark the queue single-active-consumer.
    pub fn single_active(mut self) -> Self {
        self.single_active_consumer = true;
        self
    }

    /// Mark the part interactive: its queue holds requests a caller awaits.
    pub fn interactive(mut self) -> Self {
        self.interactive = true;
        self
    }
}

/// Everything to declare.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Names under the configured prefix.
    pub names: Names,
    /// Parts and their bindings.
    pub parts: Vec<PartSpec>,
    /// Retry delay tiers.
    pub retry_delays: Vec<Duration>,
    /// `x-delivery-limit` of the part queues.
    pub delivery_limit: u32,
    /// Bounds of an interactive part's queue (length, request TTL).
    pub request_bounds: (u32, Duration),
    /// Event types that are notifications: kept briefly in the observed
    /// queue when nobody listens, instead of in the unroutable queue.
    pub observed: Vec<String>,
    /// Bounds of the unroutable queue (length, TTL).
    pub unroutable_bounds: (u32, Duration),
    /// Bounds of the observed queue (length, TTL).
    pub observed_bounds: (u32, Duration),
}

/// Why [`Topology::declare_all`] stopped.
enum Declare {
    /// An interactive part's queue exists with other arguments.
    Stale {
        queue: String,
        source: lapin::Error,
    },
    Failed(TopologyError),
}
use Declare::{Failed, Stale};

impl From<TopologyError> for Declare {
    fn from(e: TopologyError) -> Self {
        Failed(e)
    }
}

/// A topology that cannot be declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A name is too long for AMQP.
    #[error("name {0:?} is longer than 255 bytes")]
    NameTooLong(String),
    /// The broker refused a declaration.
    #[error("declaring {what}: {source}")]
    Broker {
        /// What was being declared.
        what: String,
        /// The broker's error.
        #[source]
        source: lapin::Error,
    },
    /// A replaced queue came back with other arguments: another process
    /// (a replica of an older version) declared it again meanwhile.
    #[error(
        "queue {0} was declared with other arguments again right after its replacement: is an older version still running?"
    )]
    StillStale(String),
    /// No connection to declare on.
    #[error("not connected to the broker")]
    NotConnected,
    /// An interactive part's queue exists with other arguments (a quorum
    /// queue from before ADR 17, or another request TTL or length) and
    /// cannot be replaced yet.
    #[error(
        "queue {queue} exists with other arguments and holds {messages} messages for {consumers} consumers; \
         stop the {part} part's consumers, let it drain, then run `bruno topology --replace` again \
         (docs/adr/0017-interactive-requests-on-classic-queues.md)"
    )]
    Replace {
        /// The queue.
        queue: String,
        /// Its part.
        part: String,
        /// Messages ready in it.
        messages: u32,
        /// Consumers on it.
        consumers: u32,
    },
}

/// The broker refused a declaration because the entity exists with other
/// arguments (`PRECONDITION_FAILED`).
fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 406)
}

/// The broker refused something while `what` was being declared.
fn broker_error(what: &str) -> impl FnOnce(lapin::Error) -> TopologyError + use<> {
    let what = what.to_owned();
    move |source| TopologyError::Broker { what, source }
}

fn name(n: String) -> Result<ShortString, TopologyError> {
    ShortString::try_new(n.clone()).map_err(|_| TopologyError::NameTooLong(n))
}

fn table(entries: impl IntoIterator<Item = (&'static str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn limit(n: u32) -> AMQPValue {
    AMQPValue::LongInt(i32::try_from(n).unwrap_or(i32::MAX))
}

impl Topology {
    /// A topology from broker config and parts.
    pub fn new(config: &crate::BrokerConfig, parts: Vec<PartSpec>) -> Self {
        Self {
            names: Names::new(config.prefix.clone()),
            parts,
            retry_delays: config.retry_delays(),
            delivery_limit: config.delivery_limit,
            request_bounds: (
                config.request_max_length,
                Duration::from_millis(config.request_ttl_ms),
            ),
            observed: Vec::new(),
            unroutable_bounds: (
                config.unroutable_max_length,
                Duration::from_millis(config.unroutable_ttl_ms),
            ),
            observed_bounds: (
                config.observed_max_length,
                Duration::from_millis(config.observed_ttl_ms),
            ),
        }
    }

    /// The same topology with `types` as notifications.
    pub fn with_observed(mut self, types: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.observed = types.into_iter().map(Into::into).collect();
        self
    }

    /// The spec of a part, if it is part of this topology.
    pub fn part(&self, name: &str) -> Option<&PartSpec> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// Arguments of a part's work queue.
    fn part_queue_args(&self, part: &PartSpec) -> FieldTable {
        let mut args = if part.interactive {
            // Classic (ADR 17): no consensus round before delivery. It has
            // no delivery limit, so the TTL bounds a request that keeps
            // killing its consumers (a requeued message keeps its expiry).
            let (max, ttl) = self.request_bounds;
            table([
                ("x-queue-type", s("classic")),
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
                ),
                ("x-max-length", limit(max)),
                ("x-overflow", s("reject-publish")),
                ("x-dead-letter-exchange", s("")),
                ("x-dead-letter-routing-key", s(&self.names.dlq(&part.name))),
            ])
        } else {
            table([
                ("x-queue-type", s("quorum")),
                ("x-delivery-limit", limit(self.delivery_limit)),
                ("x-dead-letter-exchange", s("")),
                ("x-dead-letter-routing-key", s(&self.names.dlq(&part.name))),
                ("x-dead-letter-strategy", s("at-least-once")),
                ("x-overflow", s("reject-publish")),
            ])
        };
        if part.single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        args
    }

    /// A queue that drops its oldest messages past `max` or after `ttl`.
    fn bounded_args((max, ttl): (u32, Duration)) -> FieldTable {
        table([
            ("x-queue-type", s("quorum")),
            ("x-max-length", limit(max)),
            ("x-overflow", s("drop-head")),
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            ),
            (
                "x-delivery-limit",
                AMQPValue::LongInt(PARKING_DELIVERY_LIMIT),
            ),
        ])
    }

    fn parking_args() -> FieldTable {
        table([
            ("x-queue-type", s("quorum")),
            (
                "x-delivery-limit",
                AMQPValue::LongInt(PARKING_DELIVERY_LIMIT),
            ),
        ])
    }

    fn retry_args(&self, part: &str, delay: Duration) -> FieldTable {
        table([
            ("x-queue-type", s("quorum")),
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            ),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&self.names.queue(part))),
            ("x-dead-letter-strategy", s("at-least-once")),
            ("x-overflow", s("reject-publish")),
            ("x-delivery-limit", limit(self.delivery_limit)),
        ])
    }

    /// Declare everything on `connection`; safe to call again with the
    /// same topology. An interactive part's queue that exists with other
    /// arguments (a quorum queue from before ADR 17, another request TTL)
    /// is kept as it is, with a warning: it still takes and delivers the
    /// part's events, and no process fails to start over it (every process
    /// declares the whole topology) while older replicas still consume it.
    /// [`Topology::replace_stale`] replaces it. Returns the queues kept.
    pub async fn declare_on(
        &self,
        connection: &lapin::Connection,
    ) -> Result<Vec<String>, TopologyError> {
        let mut kept = Vec::new();
        loop {
            let channel = connection
                .create_channel()
                .await
                .map_err(broker_error("a channel"))?;
            match self.declare_all(&channel, &kept).await {
                Ok(()) => {
                    let _ = channel.close(200, "topology declared".into()).await;
                    return Ok(kept);
                }
                // The broker closed that channel; declare again on a fresh
                // one, keeping this queue as it is.
                Err(Stale { queue, source }) if !kept.contains(&queue) => {
                    tracing::warn!(
                        %queue,
                        error = %source,
                        "an interactive part's queue exists with other arguments (a quorum queue from before ADR 17?); kept as it is: run `bruno topology --replace` once its consumers are stopped"
                    );
                    kept.push(queue);
                }
                Err(Stale { queue, source }) => {
                    return Err(TopologyError::Broker {
                        what: queue,
                        source,
                    });
                }
                Err(Failed(e)) => return Err(e),
            }
        }
    }

    /// Declare everything, replacing each interactive part's queue that
    /// exists with other arguments by the one this topology declares, if
    /// it is empty and nobody consumes it (else [`TopologyError::Replace`]
    /// says what holds it). An operator's step (`bruno topology --replace`)
    /// with the part's consumers stopped: a request published between the
    /// check and the deletion would go with the old queue. Returns the
    /// queues replaced.
    pub async fn replace_stale(
        &self,
        connection: &lapin::Connection,
    ) -> Result<Vec<String>, TopologyError> {
        let stale = self.declare_on(connection).await?;
        for queue in &stale {
            let channel = connection
                .create_channel()
                .await
                .map_err(broker_error("a channel"))?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let found = channel
                .queue_declare(name(queue.clone())?, passive, FieldTable::default())
                .await
                .map_err(broker_error(queue))?;
            if found.message_count() > 0 || found.consumer_count() > 0 {
                let part = self
                    .parts
                    .iter()
                    .find(|p| &self.names.queue(&p.name) == queue)
                    .map_or_else(String::new, |p| p.name.clone());
                let _ = channel.close(200, "queue in use".into()).await;
                return Err(TopologyError::Replace {
                    queue: queue.clone(),
                    part,
                    messages: found.message_count(),
                    consumers: found.consumer_count(),
                });
            }
            channel
                .queue_delete(
                    name(queue.clone())?,
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await
                .map_err(broker_error(queue))?;
            let _ = channel.close(200, "stale queue deleted".into()).await;
            tracing::info!(%queue, "deleted an interactive part's queue declared with other arguments (ADR 17)");
        }
        let left = self.declare_on(connection).await?;
        match left.first() {
            None => Ok(stale),
            Some(queue) => Err(TopologyError::StillStale(queue.clone())),
        }
    }

    /// Declare everything; the queues in `keep` are not declared (they
    /// exist with other arguments) but bound as usual.
    async fn declare_all(&self, channel: &Channel, keep: &[String]) -> Result<(), Declare> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let queue_opts = QueueDeclareOptions::durable();
        let unroutable = self.names.unroutable();
        channel
            .exchange_declare(
                name(unroutable.clone())?,
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(broker_error(&unroutable))?;
        channel
            .queue_declare(
                name(unroutable.clone())?,
                queue_opts,
                Self::bounded_args(self.unroutable_bounds),
            )
            .await
            .map_err(broker_error(&unroutable))?;
        channel
            .queue_bind(
                name(unroutable.clone())?,
                name(unroutable.clone())?,
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker_error(&unroutable))?;
        let alternate = self.names.alternate();
        channel
            .exchange_declare(
                name(alternate.clone())?,
                ExchangeKind::Headers,
                durable,
                table([("alternate-exchange", s(&unroutable))]),
            )
            .await
            .map_err(broker_error(&alternate))?;
        let observed = self.names.observed();
        channel
            .queue_declare(
                name(observed.clone())?,
                queue_opts,
                Self::bounded_args(self.observed_bounds),
            )
            .await
            .map_err(broker_error(&observed))?;
        for ty in &self.observed {
            channel
                .queue_bind(
                    name(observed.clone())?,
                    name(alternate.clone())?,
                    "".into(),
                    QueueBindOptions::default(),
                    table([("x-match", s("all")), ("type", s(ty))]),
                )
                .await
                .map_err(broker_error(&format!("binding of {observed}")))?;
        }
        let exchange = self.names.exchange();
        channel
            .exchange_declare(
                name(exchange.clone())?,
                ExchangeKind::Headers,
                durable,
                table([("alternate-exchange", s(&alternate))]),
            )
            .await
            .map_err(broker_error(&exchange))?;

        for part in &self.parts {
            let dlq = self.names.dlq(&part.name);
            channel
                .queue_declare(name(dlq.clone())?, queue_opts, Self::parking_args())
                .await
                .map_err(broker_error(&dlq))?;
            let queue = self.names.queue(&part.name);
            if !keep.contains(&queue) {
                let declared = channel
                    .queue_declare(name(queue.clone())?, queue_opts, self.part_queue_args(part))
                    .await;
                match declared {
                    Ok(_) => {}
                    Err(source) if part.interactive && precondition_failed(&source) => {
                        return Err(Stale { queue, source });
                    }
                    Err(source) => return Err(broker_error(&queue)(source).into()),
                }
            }
            for delay in &self.retry_delays {
                let retry = self.names.retry(&part.name, *delay);
                channel
                    .queue_declare(
                        name(retry.clone())?,
                        queue_opts,
                        self.retry_args(&part.name, *delay),
                    )
                    .await
                    .map_err(broker_error(&retry))?;
            }
            for binding in &part.bindings {
                let mut args = table([("x-match", s("all"))]);
                for (k, v) in binding {
                    args.insert(name(k.clone())?, s(v));
                }
                channel
                    .queue_bind(
                        name(queue.clone())?,
                        name(exchange.clone())?,
                        "".into(),
                        QueueBindOptions::default(),
                        args,
                    )
                    .await
                    .map_err(broker_error(&format!("binding of {queue}")))?;
            }
        }
        Ok(())
    }

    /// Every queue this topology declares.
    pub fn queues(&self) -> Vec<String> {
        let names = &self.names;
        let mut queues = vec![names.unroutable(), names.observed()];
        for part in &self.parts {
            queues.push(names.queue(&part.name));
            queues.push(names.dlq(&part.name));
            for d in &self.retry_delays {
                queues.push(names.retry(&part.name, *d));
            }
        }
        queues
    }

    /// Every exchange this topology declares.
    pub fn exchanges(&self) -> Vec<String> {
        let names = &self.names;
        vec![names.exchange(), names.alternate(), names.unroutable()]
    }

    /// Delete every queue and exchange of this topology (tests, tenants
    /// being removed). Messages in the queues are lost.
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        for q in self.queues() {
            channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for e in self.exchanges() {
            channel
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// The wait queue for a retry after `failures` failed attempts.
    pub fn retry_queue(&self, part: &str, failures: u32) -> Option<String> {
        let last = self.retry_delays.len().checked_sub(1)?;
        let tier = (failures.saturating_sub(1) as usize).min(last);
        Some(self.names.retry(part, self.retry_delays[tier]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_tiers_cap_at_the_last() {
        let config = crate::BrokerConfig {
            retry_delays_ms: vec![10, 100],
            ..Default::default()
        };
        let t = Topology::new(&config, vec![]);
        assert_eq!(t.retry_queue("p", 1).as_deref(), Some("p.retry.10ms"));
        assert_eq!(t.retry_queue("p", 2).as_deref(), Some("p.retry.100ms"));
        assert_eq!(t.retry_queue("p", 9).as_deref(), Some("p.retry.100ms"));
        let none = Topology::new(
            &crate::BrokerConfig {
                retry_delays_ms: vec![],
                ..Default::default()
            },
            vec![],
        );
        assert_eq!(none.retry_queue("p", 1), None);
    }

    #[test]
    fn names_carry_the_prefix() {
        let n = Names::new("t1.");
        assert_eq!(n.exchange(), "t1.bruno.events");
        assert_eq!(n.queue("embedder"), "t1.embedder");
        assert_eq!(n.dlq("embedder"), "t1.embedder.dlq");
        assert_eq!(n.unroutable(), "t1.bruno.unroutable");
    }
}

/// The topology as RabbitMQ Messaging Topology Operator resources
/// (`rabbitmq.com/v1beta1` Exchange, Queue, Binding), built from the same
/// argument tables the code declares, so a cluster set up from the
/// manifests and a part declaring at start-up never disagree.
pub mod manifests {
    use serde_json::{Map, Value, json};

    use super::*;

    fn value(v: &AMQPValue) -> Value {
        match v {
            AMQPValue::LongString(s) => {
                Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
            AMQPValue::Boolean(b) => Value::Bool(*b),
            AMQPValue::LongInt(i) => json!(i),
            AMQPValue::LongLongInt(i) => json!(i),
            other => Value::String(format!("{other:?}")),
        }
    }

    /// Arguments as JSON, without `x-queue-type` (the resource's `type` field).
    fn arguments(table: &FieldTable) -> Value {
        let map: Map<String, Value> = table
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != "x-queue-type")
            .map(|(k, v)| (k.as_str().to_owned(), value(v)))
            .collect();
        Value::Object(map)
    }

    /// A Kubernetes object name for an AMQP name.
    fn k8s_name(amqp: &str) -> String {
        amqp.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_matches('-')
            .to_owned()
    }

    fn resource(kind: &str, name: &str, cluster: &str, spec: Value) -> Value {
        let mut spec = spec;
        spec["rabbitmqClusterReference"] = json!({ "name": cluster });
        json!({
            "apiVersion": "rabbitmq.com/v1beta1",
            "kind": kind,
            "metadata": { "name": k8s_name(name), "labels": { "app.kubernetes.io/part-of": "bruno" } },
            "spec": spec,
        })
    }

    fn queue(name: &str, cluster: &str, args: &FieldTable) -> Value {
        let kind = match args.inner().get("x-queue-type") {
            Some(AMQPValue::LongString(t)) => String::from_utf8_lossy(t.as_bytes()).into_owned(),
            _ => "quorum".to_owned(),
        };
        resource(
            "Queue",
            name,
            cluster,
            json!({ "name": name, "type": kind, "durable": true, "autoDelete": false, "arguments": arguments(args) }),
        )
    }

    /// Every Exchange, Queue and Binding of `topology` on `cluster`.
    pub fn render(topology: &Topology, cluster: &str) -> Vec<Value> {
        let names = &topology.names;
        let exchange = names.exchange();
        let unroutable = names.unroutable();
        let alternate = names.alternate();
        let observed = names.observed();
        let mut out = vec![
            resource(
                "Exchange",
                &unroutable,
                cluster,
                json!({ "name": unroutable, "type": "fanout", "durable": true, "autoDelete": false }),
            ),
            queue(
                &unroutable,
                cluster,
                &Topology::bounded_args(topology.unroutable_bounds),
            ),
            resource(
                "Binding",
                &format!("{unroutable}-to-{unroutable}"),
                cluster,
                json!({ "source": unroutable, "destination": unroutable, "destinationType": "queue" }),
            ),
            resource(
                "Exchange",
                &alternate,
                cluster,
                json!({ "name": alternate, "type": "headers", "durable": true, "autoDelete": false,
                        "arguments": { "alternate-exchange": unroutable } }),
            ),
            queue(
                &observed,
                cluster,
                &Topology::bounded_args(topology.observed_bounds),
            ),
            resource(
                "Exchange",
                &exchange,
                cluster,
                json!({ "name": exchange, "type": "headers", "durable": true, "autoDelete": false,
                        "arguments": { "alternate-exchange": alternate } }),
            ),
        ];
        for (i, ty) in topology.observed.iter().enumerate() {
            out.push(resource(
                "Binding",
                &format!("{alternate}-to-{observed}-{i}"),
                cluster,
                json!({ "source": alternate, "destination": observed, "destinationType": "queue",
                        "arguments": { "x-match": "all", "type": ty } }),
            ));
        }
        for part in &topology.parts {
            out.push(queue(
                &names.dlq(&part.name),
                cluster,
                &Topology::parking_args(),
            ));
            out.push(queue(
                &names.queue(&part.name),
                cluster,
                &topology.part_queue_args(part),
            ));
            for delay in &topology.retry_delays {
                out.push(queue(
                    &names.retry(&part.name, *delay),
                    cluster,
                    &topology.retry_args(&part.name, *delay),
                ));
            }
            for (i, binding) in part.bindings.iter().enumerate() {
                let mut args = Map::new();
                args.insert("x-match".into(), json!("all"));
                for (k, v) in binding {
                    args.insert(k.clone(), json!(v));
                }
                out.push(resource(
                    "Binding",
                    &format!("{exchange}-to-{}-{i}", names.queue(&part.name)),
                    cluster,
                    json!({ "source": exchange, "destination": names.queue(&part.name),
                            "destinationType": "queue", "arguments": Value::Object(args) }),
                ));
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn manifests_carry_the_declared_arguments() {
            let config = crate::BrokerConfig {
                retry_delays_ms: vec![1000],
                ..Default::default()
            };
            let t = Topology::new(
                &config,
                vec![PartSpec::on_types("writer", &["bruno.memory.write.v1"]).single_active()],
            );
            let docs = render(&t, "rmq");
            let q = docs.iter().find(|d| d["spec"]["name"] == "writer").unwrap();
            assert_eq!(q["metadata"]["name"], "writer");
            assert_eq!(q["spec"]["type"], "quorum");
            assert_eq!(q["spec"]["arguments"]["x-delivery-limit"], 10);
            assert_eq!(q["spec"]["arguments"]["x-single-active-consumer"], true);
            assert_eq!(
                q["spec"]["arguments"]["x-dead-letter-routing-key"],
                "writer.dlq"
            );
            assert!(q["spec"]["arguments"].get("x-queue-type").is_none());
            let r = docs
                .iter()
                .find(|d| d["spec"]["name"] == "writer.retry.1000ms")
                .unwrap();
            assert_eq!(r["metadata"]["name"], "writer-retry-1000ms");
            assert_eq!(r["spec"]["arguments"]["x-message-ttl"], 1000);
            let b = docs
                .iter()
                .find(|d| d["kind"] == "Binding" && d["spec"]["destination"] == "writer")
                .unwrap();
            assert_eq!(b["spec"]["arguments"]["type"], "bruno.memory.write.v1");
            assert_eq!(b["spec"]["rabbitmqClusterReference"]["name"], "rmq");
        }

        #[test]
        fn an_interactive_part_gets_a_bounded_classic_queue_with_a_request_ttl() {
            let config = crate::BrokerConfig {
                request_ttl_ms: 90_000,
                request_max_length: 500,
                ..Default::default()
            };
            let t = Topology::new(
                &config,
                vec![PartSpec::on_types("retriever", &["bruno.search.requested.v1"]).interactive()],
            );
            let docs = render(&t, "rmq");
            let q = docs
                .iter()
                .find(|d| d["kind"] == "Queue" && d["spec"]["name"] == "retriever")
                .unwrap();
            assert_eq!(q["spec"]["type"], "classic");
            let args = &q["spec"]["arguments"];
            assert_eq!(args["x-message-ttl"], 90_000);
            assert_eq!(args["x-max-length"], 500);
            assert_eq!(args["x-overflow"], "reject-publish");
            assert_eq!(args["x-dead-letter-routing-key"], "retriever.dlq");
            // Quorum-only arguments a classic queue refuses.
            assert!(args.get("x-delivery-limit").is_none());
            assert!(args.get("x-dead-letter-strategy").is_none());
            // Its DLQ and retry tiers stay quorum.
            let dlq = docs
                .iter()
                .find(|d| d["spec"]["name"] == "retriever.dlq")
                .unwrap();
            assert_eq!(dlq["spec"]["type"], "quorum");
        }
    }
}
