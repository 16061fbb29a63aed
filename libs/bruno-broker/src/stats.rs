//! Queue depths and consumer counts, read from the broker for the metrics:
//! each process watches the queues of the parts it runs and the shared
//! unroutable and observed queues (a passive declare per queue, on its own
//! channel, every `broker.queue_stats_ms`).

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::Broker;
use crate::metrics::QueueLabels;

/// The queues a process running `parts` watches.
pub fn watched(broker: &Broker, parts: &[&str]) -> Vec<QueueLabels> {
    let topology = broker.topology();
    let names = &topology.names;
    let mut out = vec![
        QueueLabels {
            queue: names.unroutable(),
            part: String::new(),
            kind: "unroutable",
        },
        QueueLabels {
            queue: names.observed(),
            part: String::new(),
            kind: "observed",
        },
    ];
    for part in parts.iter().filter_map(|p| topology.part(p)) {
        let label = |queue: String, kind| QueueLabels {
            queue,
            part: part.name.clone(),
            kind,
        };
        out.push(label(names.queue(&part.name), "work"));
        out.push(label(names.dlq(&part.name), "dlq"));
        for d in &topology.retry_delays {
            out.push(label(names.retry(&part.name, *d), "retry"));
        }
    }
    out
}

/// Read the depth of every queue in `queues` every `every` until `cancel`.
pub async fn watch(
    broker: Broker,
    queues: Vec<QueueLabels>,
    every: Duration,
    cancel: CancellationToken,
) {
    if every.is_zero() || queues.is_empty() {
        return;
    }
    let metrics = broker.metrics().clone();
    if matches!(
        broker.transport(),
        crate::connection::Transport::SinkOnly | crate::connection::Transport::Remote(_)
    ) {
        return;
    }
    if let Some(embedded) = broker.as_embedded() {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            for labels in &queues {
                if let Some((messages, consumers)) = embedded.depth(&labels.queue) {
                    metrics
                        .queue_messages
                        .get_or_create(labels)
                        .set(i64::from(messages));
                    metrics
                        .queue_consumers
                        .get_or_create(labels)
                        .set(i64::from(consumers));
                }
            }
        }
    }
    let mut channel = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for labels in &queues {
            let ch = match &channel {
                Some(c) if broker.is_connected() => c,
                _ => match broker.open_channel().await {
                    Ok(c) => channel.insert(c),
                    Err(_) => break,
                },
            };
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match ch
                .queue_declare(labels.queue.as_str().into(), passive, FieldTable::default())
                .await
            {
                Ok(q) => {
                    metrics
                        .queue_messages
                        .get_or_create(labels)
                        .set(i64::from(q.message_count()));
                    metrics
                        .queue_consumers
                        .get_or_create(labels)
                        .set(i64::from(q.consumer_count()));
                }
                Err(e) => {
                    // A missing queue closes the channel; open another next time.
                    tracing::debug!(queue = %labels.queue, error = %e, "queue depth not read");
                    channel = None;
                }
            }
        }
    }
}
