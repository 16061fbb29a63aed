//! Request/reply over the events exchange: publish a request carrying
//! `replyto` and `correlationid`, and await the reply on an exclusive,
//! auto-delete queue bound on `{type, replyto}` (one queue per requester).

use std::time::Duration;

use bruno_events::{AttributesReader, Event, ExtensionValue, ext};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use prometheus_client::metrics::counter::Counter;

use crate::{Broker, codec};

/// A request that got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The broker could not be used.
    #[error("broker: {0}")]
    Broker(String),
    /// No reply within the timeout.
    #[error("no reply within {0:?} (correlation id {1})")]
    Timeout(Duration, String),
}

fn broker_err(e: impl std::fmt::Display) -> RequestError {
    RequestError::Broker(e.to_string())
}

/// Publish `request` and return the first event of one of `reply_types`
/// that answers it (same `correlationid`), or time out. A one-off
/// [`Inbox`] lives for the call.
pub async fn request(
    broker: &Broker,
    request: Event,
    reply_types: &[&str],
    timeout: Duration,
) -> Result<Event, RequestError> {
    let stop = tokio_util::sync::CancellationToken::new();
    let inbox = Inbox::start(
        broker.clone(),
        reply_types.iter().map(|t| (*t).to_owned()).collect(),
        stop.clone(),
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let result = async {
        while !inbox.is_ready() {
            if tokio::time::Instant::now() >= deadline {
                return Err(RequestError::Broker(
                    "the reply queue was not ready in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        inbox.request(broker, request, reply_types, left).await
    }
    .await;
    stop.cancel();
    result
}

/// What an [`Inbox`] registration receives.
#[derive(Debug)]
pub enum Reply {
    /// An event for this correlation id.
    Event(Box<Event>),
    /// The broker connection was lost: replies in flight cannot arrive.
    Lost,
}

type Waiters =
    std::sync::Mutex<std::collections::HashMap<String, tokio::sync::mpsc::UnboundedSender<Reply>>>;

struct InboxInner {
    id: String,
    waiters: Waiters,
    ready: std::sync::atomic::AtomicBool,
    late: Counter,
}

/// One process's reply queue: exclusive and auto-delete, bound on
/// `{type, replyto = <inbox id>}` for each reply type, re-declared by itself
/// after every reconnect. Replies are matched to waiters by `correlationid`;
/// one nobody waits for (late, or unknown) is dropped and counted. When the
/// connection drops, every waiter gets [`Reply::Lost`] at once.
#[derive(Clone)]
pub struct Inbox {
    inner: std::sync::Arc<InboxInner>,
}

/// A waiter for one correlation id; unregisters when dropped.
pub struct Registration {
    inbox: Inbox,
    correlation: String,
    /// Replies in arrival order.
    pub replies: tokio::sync::mpsc::UnboundedReceiver<Reply>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut w) = self.inbox.inner.waiters.lock() {
            w.remove(&self.correlation);
        }
    }
}

impl Inbox {
    /// Start consuming replies of `reply_types` for a new inbox id until `shutdown`.
    pub fn start(
        broker: Broker,
        reply_types: Vec<String>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self::start_counting(broker, reply_types, Counter::default(), shutdown)
    }

    /// Like [`Inbox::start`], counting late or unknown replies in `late`
    /// (a counter the caller may already have registered: clones share
    /// their value).
    pub fn start_counting(
        broker: Broker,
        reply_types: Vec<String>,
        late: Counter,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let inner = std::sync::Arc::new(InboxInner {
            id: format!("inbox-{}", uuid::Uuid::new_v4()),
            waiters: Waiters::default(),
            ready: std::sync::atomic::AtomicBool::new(false),
            late,
        });
        let inbox = Self { inner };
        tokio::spawn(inbox.clone().run(broker, reply_types, shutdown));
        inbox
    }

    /// The id requests carry as `replyto`.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// True while the reply queue is declared, bound and consumed.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Replies dropped because nobody waited for them.
    pub fn late_replies(&self) -> u64 {
        self.inner.late.get()
    }

    /// Wait for replies to `correlation` (register before publishing).
    pub fn register(&self, correlation: &str) -> Registration {
        let (tx, replies) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut w) = self.inner.waiters.lock() {
            w.insert(correlation.to_owned(), tx);
        }
        Registration {
            inbox: self.clone(),
            correlation: correlation.to_owned(),
            replies,
        }
    }

    /// Set `replyto` and `correlationid` on a request.
    pub fn address(&self, request: &mut Event, correlation: &str) {
        request.set_extension(ext::REPLY_TO, ExtensionValue::String(self.inner.id.clone()));
        request.set_extension(
            ext::CORRELATION_ID,
            ExtensionValue::String(correlation.to_owned()),
        );
    }

    /// Send `request` under a fresh correlation id: address it to this
    /// inbox, register its waiter (before publishing, so a fast reply
    /// cannot arrive unregistered), then publish it. Returns the
    /// correlation id and the registration that receives the replies; on a
    /// publish error the registration is dropped again.
    pub async fn send(
        &self,
        broker: &Broker,
        mut request: Event,
    ) -> Result<(String, Registration), crate::PublishError> {
        let correlation = uuid::Uuid::new_v4().to_string();
        self.address(&mut request, &correlation);
        let registration = self.register(&correlation);
        broker.publish(&request).await?;
        Ok((correlation, registration))
    }

    /// Send `request` through this inbox ([`Inbox::send`]) and return the
    /// first reply of one of `reply_types`, or time out. The inbox must be
    /// ready ([`Inbox::is_ready`]); one inbox serves any number of requests.
    pub async fn request(
        &self,
        broker: &Broker,
        request: Event,
        reply_types: &[&str],
        timeout: Duration,
    ) -> Result<Event, RequestError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (correlation, mut registration) =
            self.send(broker, request).await.map_err(broker_err)?;
        loop {
            match tokio::time::timeout_at(deadline, registration.replies.recv()).await {
                Err(_) => return Err(RequestError::Timeout(timeout, correlation)),
                Ok(None) | Ok(Some(Reply::Lost)) => {
                    return Err(RequestError::Broker("connection lost".into()));
                }
                Ok(Some(Reply::Event(e))) if reply_types.contains(&e.ty()) => return Ok(*e),
                Ok(Some(Reply::Event(_))) => continue,
            }
        }
    }

    /// The bindings an inbox needs: `{type, replyto = id}` per reply type.
    pub(crate) fn bindings(
        id: &str,
        reply_types: &[String],
    ) -> Vec<std::collections::BTreeMap<String, String>> {
        reply_types
            .iter()
            .map(|ty| {
                std::collections::BTreeMap::from([
                    ("type".to_owned(), ty.clone()),
                    (ext::REPLY_TO.to_owned(), id.to_owned()),
                ])
            })
            .collect()
    }

    fn take(&self, properties: &lapin::BasicProperties, data: &[u8]) {
        if let Ok(event) = codec::decode(properties, data) {
            let span = crate::trace::receive_span(&self.inner.id, &event);
            let _entered = span.enter();
            self.deliver(event);
        }
    }

    async fn run_embedded(
        self,
        embedded: std::sync::Arc<crate::embedded::Embedded>,
        reply_types: Vec<String>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let id = self.inner.id.clone();
        embedded.declare_inbox(&id, Self::bindings(&id, &reply_types));
        let consumer = match embedded.consume(&id, u16::MAX) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot consume the reply inbox");
                return;
            }
        };
        self.inner
            .ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                next = consumer.next() => match next {
                    Some(d) => {
                        self.take(&d.properties, &d.data);
                        d.handle.ack();
                    }
                    None => break,
                }
            }
        }
        drop(consumer);
        embedded.delete_inbox(&id);
        self.lose_all();
    }

    async fn run_remote(
        self,
        client: crate::remote::Client,
        reply_types: Vec<String>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let ended = client.inbox(
                &self.inner.id,
                &reply_types,
                || {
                    self.inner
                        .ready
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                },
                |props, body| self.take(&props, &body),
            );
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.lose_all();
                    return;
                }
                ended = ended => {
                    if let Err(e) = ended {
                        tracing::warn!(error = %e, "reply inbox at the embedded broker lost");
                    }
                }
            }
            self.lose_all();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn lose_all(&self) {
        self.inner
            .ready
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Ok(w) = self.inner.waiters.lock() {
            for tx in w.values() {
                let _ = tx.send(Reply::Lost);
            }
        }
    }

    fn deliver(&self, event: Event) {
        let Some(correlation) = bruno_events::correlation_id(&event).map(str::to_owned) else {
            self.inner.late.inc();
            return;
        };
        let sent = match self.inner.waiters.lock() {
            Ok(w) => w
                .get(&correlation)
                .map(|tx| tx.send(Reply::Event(Box::new(event))).is_ok())
                .unwrap_or(false),
            Err(_) => false,
        };
        if !sent {
            self.inner.late.inc();
            tracing::debug!(%correlation, "reply nobody waits for: dropped");
        }
    }

    async fn run(
        self,
        broker: Broker,
        reply_types: Vec<String>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        match broker.transport() {
            crate::connection::Transport::Amqp => {}
            crate::connection::Transport::Embedded(embedded) => {
                self.run_embedded(embedded.clone(), reply_types, shutdown)
                    .await;
                return;
            }
            crate::connection::Transport::Remote(client) => {
                self.run_remote(client.clone(), reply_types, shutdown).await;
                return;
            }
            crate::connection::Transport::SinkOnly => {
                tracing::error!("no broker.url: a reply inbox needs one (push mode)");
                return;
            }
        }
        loop {
            let Some(session) = broker.session(&shutdown).await else {
                return;
            };
            let setup = async {
                let channel = session
                    .connection
                    .create_channel()
                    .await
                    .map_err(broker_err)?;
                let queue = channel
                    .queue_declare(
                        ShortString::from(""),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(broker_err)?;
                let exchange =
                    ShortString::try_new(broker.topology().names.exchange()).map_err(broker_err)?;
                for ty in &reply_types {
                    let mut args = FieldTable::default();
                    args.insert(
                        "x-match".into(),
                        AMQPValue::LongString(LongString::from("all")),
                    );
                    args.insert(
                        "type".into(),
                        AMQPValue::LongString(LongString::from(ty.as_str())),
                    );
                    args.insert(
                        ext::REPLY_TO.into(),
                        AMQPValue::LongString(LongString::from(self.inner.id.as_str())),
                    );
                    channel
                        .queue_bind(
                            queue.name().clone(),
                            exchange.clone(),
                            "".into(),
                            QueueBindOptions::default(),
                            args,
                        )
                        .await
                        .map_err(broker_err)?;
                }
                let consumer = channel
                    .basic_consume(
                        queue.name().clone(),
                        "".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            exclusive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(broker_err)?;
                Ok::<_, RequestError>((channel, consumer))
            };
            let (channel, mut consumer) = match setup.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set up the reply queue");
                    broker.mark_broken(&session);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            self.inner
                .ready
                .store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!(inbox = %self.inner.id, "reply queue ready");
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = channel.close(200, "shutdown".into()).await;
                        self.lose_all();
                        return;
                    }
                    _ = session.broken.cancelled() => break,
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            if let Ok(event) = codec::decode(&delivery.properties, &delivery.data) {
                                let span = crate::trace::receive_span(&self.inner.id, &event);
                                let _entered = span.enter();
                                self.deliver(event);
                            }
                        }
                        Some(Err(_)) | None => break,
                    }
                }
            }
            tracing::warn!(inbox = %self.inner.id, "reply queue lost; failing in-flight requests");
            self.lose_all();
            broker.mark_broken(&session);
        }
    }
}
