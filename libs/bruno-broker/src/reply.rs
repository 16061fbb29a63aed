//! Request/reply over the events exchange: publish a request carrying
//! `replyto` and `correlationid`, and await the reply on an exclusive,
//! auto-delete queue bound on `{type, replyto}` (one queue per requester).

use std::time::Duration;

use bruno_events::{AttributesReader, Event, ExtensionValue, ext};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

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
/// that answers it (same `correlationid`), or time out.
pub async fn request(
    broker: &Broker,
    mut request: Event,
    reply_types: &[&str],
    timeout: Duration,
) -> Result<Event, RequestError> {
    let inbox = format!("cli-{}", uuid::Uuid::new_v4());
    let correlation = uuid::Uuid::new_v4().to_string();
    request.set_extension(ext::REPLY_TO, ExtensionValue::String(inbox.clone()));
    request.set_extension(
        ext::CORRELATION_ID,
        ExtensionValue::String(correlation.clone()),
    );
    let channel = broker.open_channel().await.map_err(broker_err)?;
    let work = async {
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
        for ty in reply_types {
            let mut args = FieldTable::default();
            args.insert(
                "x-match".into(),
                AMQPValue::LongString(LongString::from("all")),
            );
            args.insert("type".into(), AMQPValue::LongString(LongString::from(*ty)));
            args.insert(
                ext::REPLY_TO.into(),
                AMQPValue::LongString(LongString::from(inbox.as_str())),
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
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker_err)?;
        broker.publish(&request).await.map_err(broker_err)?;
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery.map_err(broker_err)?;
            let Ok(event) = codec::decode(&delivery.properties, &delivery.data) else {
                continue;
            };
            if bruno_events::correlation_id(&event) == Some(correlation.as_str())
                && reply_types.contains(&event.ty())
            {
                return Ok(event);
            }
        }
        Err(RequestError::Broker("reply consumer closed".into()))
    };
    let result = tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(RequestError::Timeout(timeout, correlation.clone())));
    let _ = channel.close(200, "done".into()).await;
    result
}
