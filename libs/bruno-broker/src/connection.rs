//! One supervised connection per process: connect with backoff, declare the
//! topology, open confirm-mode publish channels, and start over whenever the
//! connection (or a channel) dies. Readiness is "a session exists".

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bruno_events::Event;
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::BoxStream;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::codec::{self, CodecError};
use crate::topology::TopologyError;
use crate::{BrokerConfig, BrokerMetrics, Topology};

/// Why a publish did not get a positive confirm. Every variant means the
/// message may not be stored: the caller must not acknowledge its input.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No connection to the broker right now (reconnecting).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused to store the message.
    #[error("broker nacked the publish")]
    Nacked,
    /// The broker had no queue for a mandatory publish.
    #[error("message returned unroutable: {0}")]
    Returned(String),
    /// No confirm within the publish timeout.
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    /// The event cannot be encoded as an AMQP message.
    #[error("cannot encode event: {0}")]
    Codec(#[from] CodecError),
}

impl bruno_core::Classify for PublishError {
    fn code(&self) -> bruno_core::ErrorCode {
        match self {
            // An event this process built that cannot be encoded is a bug.
            Self::Codec(_) => bruno_core::ErrorCode::Internal,
            _ => bruno_core::ErrorCode::Dependency,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connecting: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("reading broker.ca_file {0}: {1}")]
    CaFile(String, std::io::Error),
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

/// A live connection with its publish channels.
pub(crate) struct Session {
    pub(crate) connection: Connection,
    channels: Vec<Channel>,
    next: AtomicUsize,
    pub(crate) broken: CancellationToken,
}

impl Session {
    fn channel(&self) -> &Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        &self.channels[i]
    }
}

struct Inner {
    config: BrokerConfig,
    topology: Topology,
    connection_name: String,
    /// AMQP only: the live session, if any (never set on the others).
    session: watch::Sender<Option<Arc<Session>>>,
    transport: Transport,
    /// Push mode: where events go instead of the events exchange.
    sink: Option<crate::sink::Sink>,
    cancel: CancellationToken,
    metrics: BrokerMetrics,
}

/// Which broker a [`Broker`] handle talks to.
pub(crate) enum Transport {
    /// RabbitMQ over AMQP 0-9-1.
    Amqp,
    /// The in-process broker (`bruno dev` without `broker.url`).
    Embedded(Arc<crate::embedded::Embedded>),
    /// Another process's embedded broker, over its local HTTP endpoint
    /// (one-shot commands next to a `bruno dev`).
    Remote(crate::remote::Client),
    /// None: a push-mode consumer, which only publishes, to its sink.
    SinkOnly,
}

/// Handle to the supervised broker connection; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("connection_name", &self.inner.connection_name)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Broker {
    /// Start the connection supervisor. Returns at once; use
    /// [`Broker::wait_connected`] or [`Broker::is_connected`] for readiness.
    /// The supervisor closes the connection when `cancel` fires.
    pub fn start(
        config: BrokerConfig,
        topology: Topology,
        connection_name: impl Into<String>,
        metrics: BrokerMetrics,
        cancel: CancellationToken,
    ) -> Self {
        let broker = Self::with_transport(
            config,
            topology,
            connection_name.into(),
            metrics,
            cancel,
            Transport::Amqp,
        );
        tokio::spawn(supervise(broker.inner.clone()));
        broker
    }

    /// The embedded broker (ADR 14) with this topology declared, restoring
    /// the messages `journal` kept. Always connected.
    pub fn embedded(
        config: BrokerConfig,
        topology: Topology,
        connection_name: impl Into<String>,
        metrics: BrokerMetrics,
        cancel: CancellationToken,
        journal: Option<(
            crate::embedded::Journal,
            Vec<crate::embedded::journal::Record>,
        )>,
    ) -> Self {
        let embedded = crate::embedded::Embedded::start(&topology, journal);
        metrics.connected.set(1);
        Self::with_transport(
            config,
            topology,
            connection_name.into(),
            metrics,
            cancel,
            Transport::Embedded(embedded),
        )
    }

    /// A handle on another process's embedded broker, served at `url` with
    /// bearer `token` (see [`crate::remote`]). For one-shot commands.
    pub fn remote(
        config: BrokerConfig,
        topology: Topology,
        url: &str,
        token: bruno_core::Secret,
        cancel: CancellationToken,
    ) -> Self {
        let client = crate::remote::Client::new(url, token, config.publish_timeout());
        Self::with_transport(
            config,
            topology,
            "bruno-cli".into(),
            BrokerMetrics::default(),
            cancel,
            Transport::Remote(client),
        )
    }

    /// A push-mode consumer's broker: events go to `config.publish_url`;
    /// there is nothing to consume from and no inbox (ADR 15).
    pub fn sink_only(
        config: BrokerConfig,
        topology: Topology,
        connection_name: impl Into<String>,
        metrics: BrokerMetrics,
        cancel: CancellationToken,
    ) -> Self {
        metrics.connected.set(1);
        Self::with_transport(
            config,
            topology,
            connection_name.into(),
            metrics,
            cancel,
            Transport::SinkOnly,
        )
    }

    fn with_transport(
        config: BrokerConfig,
        topology: Topology,
        connection_name: String,
        metrics: BrokerMetrics,
        cancel: CancellationToken,
        transport: Transport,
    ) -> Self {
        let (session, _) = watch::channel(None);
        // An empty publish_url is unset (a Pod's env overriding the ConfigMap).
        let sink = config
            .publish_url
            .as_deref()
            .filter(|u| !u.is_empty())
            .map(crate::sink::Sink::new);
        Self {
            inner: Arc::new(Inner {
                config,
                topology,
                connection_name,
                session,
                transport,
                sink,
                cancel,
                metrics,
            }),
        }
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// The in-process embedded broker, when this handle is one.
    pub fn as_embedded(&self) -> Option<&Arc<crate::embedded::Embedded>> {
        match &self.inner.transport {
            Transport::Embedded(e) => Some(e),
            _ => None,
        }
    }

    /// True while a connection with declared topology is up.
    pub fn is_connected(&self) -> bool {
        match &self.inner.transport {
            Transport::Amqp => self.inner.session.borrow().is_some(),
            Transport::Embedded(_) | Transport::Remote(_) | Transport::SinkOnly => true,
        }
    }

    /// Wait until connected, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        match &self.inner.transport {
            Transport::Amqp => {
                let mut rx = self.inner.session.subscribe();
                tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
                    .await
                    .is_ok()
            }
            Transport::Embedded(_) | Transport::SinkOnly => true,
            Transport::Remote(c) => tokio::time::timeout(timeout, c.ping())
                .await
                .is_ok_and(|r| r.is_ok()),
        }
    }

    /// Wait until every journaled effect so far is on disk (embedded broker
    /// with a journal); at once otherwise.
    pub async fn sync(&self) {
        if let Transport::Embedded(e) = &self.inner.transport
            && let Err(e) = e.sync().await
        {
            warn!(error = %e, "broker journal sync failed");
        }
    }

    /// The topology this broker declared.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// Its metrics.
    pub fn metrics(&self) -> &BrokerMetrics {
        &self.inner.metrics
    }

    pub(crate) fn current(&self) -> Option<Arc<Session>> {
        self.inner.session.borrow().clone()
    }

    /// Wait for a session; `None` once `cancel` fires.
    pub(crate) async fn session(&self, cancel: &CancellationToken) -> Option<Arc<Session>> {
        let mut rx = self.inner.session.subscribe();
        tokio::select! {
            _ = cancel.cancelled() => None,
            r = rx.wait_for(Option::is_some) => r.ok().and_then(|s| s.clone()),
        }
    }

    /// Tell the supervisor this session is unusable; it reconnects.
    pub(crate) fn mark_broken(&self, session: &Session) {
        session.broken.cancel();
    }

    /// Replace the interactive parts' queues that exist with other
    /// arguments (quorum queues from before ADR 17) by the ones the topology
    /// declares, if empty and unconsumed: `bruno topology --replace`.
    /// Returns the queues replaced; none on the embedded broker.
    pub async fn replace_stale_queues(&self) -> Result<Vec<String>, TopologyError> {
        if !matches!(self.inner.transport, Transport::Amqp) {
            return Ok(Vec::new());
        }
        let session = self.current().ok_or(TopologyError::NotConnected)?;
        self.inner.topology.replace_stale(&session.connection).await
    }

    /// Open a fresh channel on the current connection (for consumers and tools).
    pub async fn open_channel(&self) -> Result<Channel, PublishError> {
        let session = self
            .current()
            .ok_or_else(|| PublishError::Unavailable("not connected".into()))?;
        session.connection.create_channel().await.map_err(|e| {
            self.mark_broken(&session);
            PublishError::Unavailable(e.to_string())
        })
    }

    /// Publish one event to the events exchange; returns once confirmed.
    pub async fn publish(&self, event: &Event) -> Result<(), PublishError> {
        self.publish_all(std::slice::from_ref(event)).await
    }

    /// Publish events to the events exchange, pipelined on one channel (so
    /// a queue that gets several of them gets them in this order); returns
    /// once every one is confirmed, or with the first failure.
    pub async fn publish_all(&self, events: &[Event]) -> Result<(), PublishError> {
        let exchange = self.inner.topology.names.exchange();
        // One producer span per event, open until the broker confirmed; its
        // context travels as the event's `traceparent`.
        let spans: Vec<_> = events
            .iter()
            .map(|e| crate::trace::publish_span(&exchange, e))
            .collect();
        if let Some(sink) = &self.inner.sink {
            let traces = spans.iter().map(crate::trace::context_of).collect();
            let result = sink
                .publish(events, traces, self.inner.config.publish_timeout())
                .await;
            let label = match &result {
                Ok(()) => "confirmed",
                Err(PublishError::Returned(_)) => "returned",
                Err(PublishError::Timeout(_)) => "timeout",
                Err(_) => "unavailable",
            };
            for _ in events {
                self.inner.metrics.publish(label);
            }
            if result.is_err() {
                spans.iter().for_each(crate::trace::failed);
            }
            return result;
        }
        let (props, bodies): (Vec<_>, Vec<_>) = events
            .iter()
            .zip(&spans)
            .map(|(e, span)| codec::encode_borrowed(e, crate::trace::context_of(span)))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        // The properties move into the publish (their header table is a
        // map: a clone per event showed in the ingress's profile).
        let messages: Vec<_> = props.into_iter().zip(bodies.iter().map(|b| &**b)).collect();
        let result = self.publish_many(&exchange, "", messages).await;
        if result.is_err() {
            spans.iter().for_each(crate::trace::failed);
        }
        result
    }

    /// Publish one raw message; returns once confirmed.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: &[u8],
    ) -> Result<(), PublishError> {
        self.publish_many(exchange, routing_key, vec![(props, body)])
            .await
    }

    pub(crate) async fn publish_many(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: Vec<(BasicProperties, &[u8])>,
    ) -> Result<(), PublishError> {
        if messages.is_empty() {
            return Ok(());
        }
        let metrics = &self.inner.metrics;
        match &self.inner.transport {
            Transport::Amqp => {}
            Transport::SinkOnly => {
                metrics.publish("unavailable");
                return Err(PublishError::Unavailable(
                    "push mode without broker.url publishes events to broker.publish_url only"
                        .into(),
                ));
            }
            Transport::Embedded(embedded) => {
                let n = messages.len();
                let count = |label: &'static str| (0..n).for_each(|_| metrics.publish(label));
                let mut confirms = Vec::with_capacity(messages.len());
                let mut refused = None;
                for (props, body) in messages {
                    match embedded.publish(exchange, routing_key, props, Arc::from(body)) {
                        Ok(c) => confirms.push(c),
                        Err(e) => {
                            refused = Some(e);
                            break;
                        }
                    }
                }
                let timeout = self.inner.config.publish_timeout();
                let waited = tokio::time::timeout(timeout, async {
                    for c in confirms {
                        c.wait().await?;
                    }
                    Ok(())
                })
                .await;
                let outcome = match (refused, waited) {
                    (Some(e), _) | (None, Ok(Err(e))) => Err(e),
                    (None, Ok(Ok(()))) => Ok(()),
                    (None, Err(_)) => {
                        count("timeout");
                        return Err(PublishError::Timeout(timeout));
                    }
                };
                return match outcome {
                    Ok(()) => {
                        count("confirmed");
                        Ok(())
                    }
                    Err(crate::embedded::Refused::NoRoute(q)) => {
                        count("returned");
                        Err(PublishError::Returned(format!("NO_ROUTE {q}")))
                    }
                    Err(e @ crate::embedded::Refused::Full(_)) => {
                        count("nacked");
                        warn!(error = %e, "embedded broker refused a publish: the queue is full");
                        Err(PublishError::Nacked)
                    }
                    Err(e @ crate::embedded::Refused::Journal(_)) => {
                        count("nacked");
                        warn!(error = %e, "embedded broker refused a publish");
                        Err(PublishError::Nacked)
                    }
                };
            }
            Transport::Remote(client) => {
                let n = messages.len();
                let result = client.publish(exchange, routing_key, messages).await;
                let label = match &result {
                    Ok(()) => "confirmed",
                    Err(PublishError::Returned(_)) => "returned",
                    Err(PublishError::Nacked) => "nacked",
                    Err(PublishError::Timeout(_)) => "timeout",
                    Err(_) => "unavailable",
                };
                for _ in 0..n {
                    metrics.publish(label);
                }
                return result;
            }
        }
        let Some(session) = self.current() else {
            metrics.publish("unavailable");
            return Err(PublishError::Unavailable("not connected".into()));
        };
        let exchange = ShortString::try_new(exchange).map_err(|e| {
            PublishError::Codec(CodecError::Invalid {
                name: "exchange".into(),
                reason: e.to_string(),
            })
        })?;
        let routing_key = ShortString::try_new(routing_key).map_err(|e| {
            PublishError::Codec(CodecError::Invalid {
                name: "routing key".into(),
                reason: e.to_string(),
            })
        })?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        // One channel for the whole call: its messages reach their queues
        // in the order given (a turn's last deltas, then its final reply).
        let channel = session.channel();
        let mut confirms = Vec::with_capacity(messages.len());
        for (props, body) in messages {
            let sent = channel
                .basic_publish(exchange.clone(), routing_key.clone(), options, body, props)
                .await;
            match sent {
                Ok(confirm) => confirms.push(confirm),
                Err(e) => {
                    metrics.publish("unavailable");
                    self.mark_broken(&session);
                    return Err(PublishError::Unavailable(e.to_string()));
                }
            }
        }
        let timeout = self.inner.config.publish_timeout();
        let results = match tokio::time::timeout(timeout, join_all(confirms)).await {
            Ok(results) => results,
            Err(_) => {
                metrics.publish("timeout");
                self.mark_broken(&session);
                return Err(PublishError::Timeout(timeout));
            }
        };
        let mut first_error = None;
        for result in results {
            let outcome = match result {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(returned))) => Err((
                    "returned",
                    PublishError::Returned(returned.reply_text.to_string()),
                )),
                Ok(Confirmation::Nack(_)) => Err(("nacked", PublishError::Nacked)),
                Ok(Confirmation::NotRequested) => Err((
                    "unavailable",
                    PublishError::Unavailable("channel not in confirm mode".into()),
                )),
                Err(e) => {
                    self.mark_broken(&session);
                    Err(("unavailable", PublishError::Unavailable(e.to_string())))
                }
            };
            match outcome {
                Ok(()) => metrics.publish("confirmed"),
                Err((label, e)) => {
                    metrics.publish(label);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

async fn open(inner: &Inner) -> Result<(Session, BoxStream<'static, lapin::Event>), ConnectError> {
    let props =
        ConnectionProperties::default().with_connection_name(inner.connection_name.clone().into());
    let tls = match &inner.config.ca_file {
        Some(path) => lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: Some(
                std::fs::read_to_string(path)
                    .map_err(|e| ConnectError::CaFile(path.display().to_string(), e))?,
            ),
        },
        None => lapin::tcp::OwnedTLSConfig::default(),
    };
    let url = inner
        .config
        .url
        .as_ref()
        .map_or(crate::BrokerConfig::LOCAL_RABBITMQ, |u| u.expose());
    let connection =
        Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?)
            .await?;
    let events = connection.events_listener().boxed();
    // Queues kept as they were declared are warned about in declare_on.
    inner.topology.declare_on(&connection).await?;
    let mut channels = Vec::new();
    for _ in 0..inner.config.publish_channels.max(1) {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
    let session = Session {
        connection,
        channels,
        next: AtomicUsize::new(0),
        broken: inner.cancel.child_token(),
    };
    Ok((session, events))
}

async fn supervise(inner: Arc<Inner>) {
    let mut connected_before = false;
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(inner.config.reconnect_min_ms))
        .with_max_delay(Duration::from_millis(inner.config.reconnect_max_ms))
        .with_jitter()
        .without_max_times();
    loop {
        let attempt = (|| open(&inner))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .notify(|e, next| warn!(error = %e, retry_in = ?next, "broker connection failed"));
        let (session, mut events) = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = attempt => match r {
                Ok(ok) => ok,
                Err(e) => {
                    warn!(error = %e, "broker connection failed");
                    continue;
                }
            },
        };
        if connected_before {
            inner.metrics.reconnects.inc();
        }
        connected_before = true;
        let session = Arc::new(session);
        inner.metrics.connected.set(1);
        inner.session.send_replace(Some(session.clone()));
        info!(name = %inner.connection_name, "connected to broker");

        let mut poll = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = session.broken.cancelled() => break,
                event = events.next() => match event {
                    // A channel-level error (a declaration refused because
                    // the queue exists with other arguments, ADR 17; a
                    // passive declare of a missing queue) closes only that
                    // channel, and its owner opens another: the consumer
                    // loops, the reply inbox and the stats poller do. The
                    // connection is lost only when one of this session's
                    // own publish channels is the one that closed.
                    Some(lapin::Event::Error(e))
                        if e.is_amqp_soft_error()
                            && session.channels.iter().all(|c| c.status().connected()) =>
                    {
                        tracing::debug!(error = %e, "a channel was closed by the broker");
                    }
                    Some(lapin::Event::Error(e)) => {
                        warn!(error = %e, "broker connection error");
                        break;
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = poll.tick() => {
                    if !session.connection.status().connected() {
                        break;
                    }
                }
            }
        }
        inner.metrics.connected.set(0);
        inner.session.send_replace(None);
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            session.connection.close(320, "closing".into()),
        )
        .await;
        if inner.cancel.is_cancelled() {
            info!(name = %inner.connection_name, "broker connection closed");
            return;
        }
        warn!(name = %inner.connection_name, "broker connection lost; reconnecting");
    }
}
