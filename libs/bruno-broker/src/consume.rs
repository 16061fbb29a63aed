//! The consumer loop: deliveries in, a [`Disposition`] per message, and the
//! broker work that disposition needs, confirmed before the ack.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bruno_events::Event;
use futures_util::{FutureExt, StreamExt};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use bruno_core::ErrorCode;

use crate::PublishError;
use crate::codec::{self, header_u32};
use crate::connection::Transport;
use crate::{Broker, headers};

/// A message taken from a part's queue, on either broker.
pub(crate) struct Taken {
    properties: BasicProperties,
    data: Data,
    redelivered: bool,
    settle: Settle,
}

enum Data {
    Amqp(Vec<u8>),
    Embedded(crate::embedded::Body),
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Amqp(v) => v,
            Self::Embedded(b) => b,
        }
    }
}

enum Settle {
    /// The delivery (its data taken out), for its acker.
    Amqp(Box<lapin::message::Delivery>),
    Embedded(Box<crate::embedded::Unsettled>),
}

impl Settle {
    async fn ack(self) {
        match self {
            Self::Amqp(delivery) => {
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    // The effects are confirmed; the broker will redeliver and the
                    // handler sees the same event again (idempotent by (source, id)).
                    warn!(error = %e, "ack failed after confirmed publish");
                }
            }
            Self::Embedded(u) => (*u).ack(),
        }
    }

    async fn requeue(self) {
        match self {
            Self::Amqp(delivery) => {
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
            Self::Embedded(u) => (*u).requeue(),
        }
    }
}

impl From<lapin::message::Delivery> for Taken {
    fn from(mut d: lapin::message::Delivery) -> Self {
        Self {
            properties: d.properties.clone(),
            data: Data::Amqp(std::mem::take(&mut d.data)),
            redelivered: d.redelivered,
            settle: Settle::Amqp(Box::new(d)),
        }
    }
}

impl From<crate::embedded::Delivery> for Taken {
    fn from(d: crate::embedded::Delivery) -> Self {
        Self {
            properties: d.properties,
            data: Data::Embedded(d.data),
            redelivered: d.redelivered,
            settle: Settle::Embedded(Box::new(d.handle)),
        }
    }
}

/// What to do with a consumed message.
#[derive(Debug)]
pub enum Disposition {
    /// Done: publish these events (confirmed), then ack.
    Ack(Vec<Event>),
    /// Try again later (after the next delay tier), unless attempts are exhausted.
    Retry {
        /// Error code.
        code: ErrorCode,
        /// Human-readable reason.
        reason: String,
    },
    /// Give up now: park in the part's DLQ.
    DeadLetter {
        /// Error code.
        code: ErrorCode,
        /// Human-readable reason.
        reason: String,
    },
}

impl Disposition {
    /// A failure: dead-lettered at once when its code is permanent
    /// ([`ErrorCode::is_permanent`]), else retried.
    pub fn failed(code: ErrorCode, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        if code.is_permanent() {
            Self::DeadLetter { code, reason }
        } else {
            Self::Retry { code, reason }
        }
    }
}

/// Delivery facts a processor may use.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Failed handler attempts before this one.
    pub attempts: u32,
    /// The broker redelivered this message (a consumer died holding it).
    pub redelivered: bool,
}

/// Turns an event into a disposition. Implemented by the worker runtime.
pub trait Processor: Send + Sync + 'static {
    /// Process one event.
    fn process(
        &self,
        event: Event,
        delivered: Delivered,
    ) -> impl Future<Output = Disposition> + Send;
}

/// Consume a part's queue until `shutdown` fires, with at most `prefetch`
/// messages in flight. On shutdown: cancel the consumer, let in-flight
/// messages finish and settle, close the channel. A lost channel or
/// connection is re-established; unacked messages are redelivered by the broker.
pub async fn consume<P: Processor>(
    broker: Broker,
    part: String,
    prefetch: u16,
    processor: Arc<P>,
    shutdown: CancellationToken,
) {
    let queue = broker.topology().names.queue(&part);
    // Named once: every message's consumer span carries it.
    let span_queue: Arc<str> = Arc::from(queue.as_str());
    match broker.transport() {
        Transport::Amqp => {}
        Transport::Embedded(embedded) => {
            let consumer = match embedded.consume(&queue, prefetch) {
                Ok(c) => c,
                Err(e) => {
                    error!(%part, error = %e, "not consuming");
                    return;
                }
            };
            info!(%part, %queue, prefetch, broker = "embedded", "consuming");
            let mut inflight = JoinSet::new();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    next = consumer.next() => match next {
                        Some(d) => {
                            inflight.spawn(handle(broker.clone(), part.clone(), span_queue.clone(), processor.clone(), d.into()));
                        }
                        None => break,
                    },
                    Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                }
            }
            let n = inflight.len();
            while inflight.join_next().await.is_some() {}
            drop(consumer);
            info!(%part, drained = n, "consumer stopped");
            return;
        }
        Transport::Remote(_) => {
            error!(%part, "parts cannot consume through another process's embedded broker; set broker.url");
            return;
        }
        Transport::SinkOnly => {
            error!(%part, "no broker.url to consume from (push mode serves parts over HTTP)");
            return;
        }
    }
    let Ok(queue_name) = ShortString::try_new(queue.clone()) else {
        error!(%queue, "queue name longer than 255 bytes; not consuming");
        return;
    };
    loop {
        let Some(session) = broker.session(&shutdown).await else {
            return;
        };
        let channel = match session.connection.create_channel().await {
            Ok(c) => c,
            Err(e) => {
                warn!(%part, error = %e, "cannot open consumer channel");
                broker.mark_broken(&session);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tag = format!("{part}-{}", uuid::Uuid::new_v4());
        let consumer = async {
            channel
                .basic_qos(prefetch.max(1), BasicQosOptions::default())
                .await?;
            channel
                .basic_consume(
                    queue_name.clone(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        let mut consumer = match consumer.await {
            Ok(c) => c,
            Err(e) => {
                warn!(%part, error = %e, "cannot start consumer");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        info!(%part, %queue, prefetch, "consuming");
        let mut inflight = JoinSet::new();
        let stopped = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break true,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        inflight.spawn(handle(broker.clone(), part.clone(), span_queue.clone(), processor.clone(), delivery.into()));
                    }
                    Some(Err(e)) => {
                        warn!(%part, error = %e, "consumer stream failed");
                        break false;
                    }
                    None => break false,
                },
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
            }
        };
        if stopped {
            // Stop new deliveries; prefetched ones not yet taken go back on close.
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
            let n = inflight.len();
            while inflight.join_next().await.is_some() {}
            let _ = channel.close(200, "shutdown".into()).await;
            info!(%part, drained = n, "consumer stopped");
            return;
        }
        while inflight.join_next().await.is_some() {}
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn handle<P: Processor>(
    broker: Broker,
    part: String,
    queue: Arc<str>,
    processor: Arc<P>,
    delivery: Taken,
) {
    let started = Instant::now();
    let attempts = header_u32(&delivery.properties, headers::ATTEMPTS).unwrap_or(0);
    let (disposition, span) = match codec::decode(&delivery.properties, &delivery.data) {
        Err(e) => (
            Disposition::DeadLetter {
                code: ErrorCode::InvalidEvent,
                reason: e.to_string(),
            },
            info_span!("process", %part, invalid = true, otel.kind = "consumer"),
        ),
        Ok(event) => {
            let span = crate::trace::process_span(&part, &queue, &event, attempts + 1);
            let delivered = Delivered {
                attempts,
                redelivered: delivery.redelivered,
            };
            let work = AssertUnwindSafe(processor.process(event, delivered)).catch_unwind();
            let disposition =
                work.instrument(span.clone())
                    .await
                    .unwrap_or_else(|_| Disposition::Retry {
                        code: ErrorCode::Internal,
                        reason: "handler panicked".into(),
                    });
            (disposition, span)
        }
    };
    async {
        let outcome = settle(&broker, &part, delivery, attempts, disposition).await;
        if outcome != "ack" {
            crate::trace::failed(&tracing::Span::current());
        }
        broker.metrics().outcome(&part, outcome);
        broker
            .metrics()
            .handle_seconds
            .get_or_create(&crate::metrics::PartLabels { part: part.clone() })
            .observe(started.elapsed().as_secs_f64());
    }
    .instrument(span)
    .await;
}

/// Do what the disposition needs, then ack; on a failed publish, requeue.
/// Outputs the broker refused (a full queue's `reject-publish`) are retried
/// after a retry tier's delay instead: requeued at once they would come
/// straight back, and an interactive part's classic queue has no delivery
/// limit to end that loop (ADR 17).
async fn settle(
    broker: &Broker,
    part: &str,
    delivery: Taken,
    attempts: u32,
    disposition: Disposition,
) -> &'static str {
    let names = &broker.topology().names;
    let (code, reason, retry) = match disposition {
        Disposition::Ack(outputs) => match broker.publish_all(&outputs).await {
            Ok(()) => {
                delivery.settle.ack().await;
                return "ack";
            }
            Err(e @ (PublishError::Nacked | PublishError::Returned(_))) => (
                ErrorCode::Dependency,
                format!("the broker refused its outputs: {e}"),
                true,
            ),
            Err(e) => {
                warn!(error = %e, "publish failed; requeueing the message");
                delivery.settle.requeue().await;
                return "requeue";
            }
        },
        Disposition::Retry { code, reason } => (code, reason, true),
        Disposition::DeadLetter { code, reason } => (code, reason, false),
    };
    let failures = attempts + 1;
    let max = broker.config().max_attempts.max(1);
    let published = match broker.topology().retry_queue(part, failures) {
        Some(queue) if retry && failures < max => {
            warn!(%code, %reason, failures, "retrying later");
            let props = with_error_headers(&delivery, part, code, &reason, failures);
            broker
                .publish_raw("", &queue, props, &delivery.data)
                .await
                .map(|()| "retry")
        }
        _ => {
            let reason = if retry {
                format!("gave up after {failures} attempts: {reason}")
            } else {
                reason
            };
            error!(%code, %reason, "dead-lettering");
            let props = with_error_headers(&delivery, part, code, &reason, failures);
            broker
                .publish_raw("", &names.dlq(part), props, &delivery.data)
                .await
                .map(|()| "dead_letter")
        }
    };
    match published {
        Ok(outcome) => {
            delivery.settle.ack().await;
            outcome
        }
        Err(e) => {
            warn!(error = %e, "publish failed; requeueing the message");
            delivery.settle.requeue().await;
            "requeue"
        }
    }
}

fn with_error_headers(
    delivery: &Taken,
    part: &str,
    code: ErrorCode,
    reason: &str,
    attempts: u32,
) -> lapin::BasicProperties {
    crate::dlq::failed_props(delivery.properties.clone(), part, code, reason, attempts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_failures_are_dead_lettered_others_retried() {
        for code in ErrorCode::ALL {
            let d = Disposition::failed(code, "x");
            if code.is_permanent() {
                assert!(matches!(d, Disposition::DeadLetter { .. }), "{code}");
            } else {
                assert!(matches!(d, Disposition::Retry { .. }), "{code}");
            }
        }
    }
}
