//! Dead-letter queue tooling: list, show, replay, purge.
//!
//! Listing browses with `basic.get` and no ack, holding every message
//! unacked on one channel until the channel closes, so each is seen once and
//! all go back. Replay republishes a matching message to its part's queue
//! (not the exchange: other parts already handled the event) with the error
//! headers removed, waits for the confirm, and only then acks the dead letter.

use std::collections::BTreeMap;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::{BasicProperties, Channel};
use serde::Serialize;

use crate::codec::{header_str, header_u32};
use crate::connection::Transport;
use crate::{Broker, PublishError, headers};

/// A dead letter as the CLI shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// CloudEvent id (or AMQP message id).
    pub id: String,
    /// CloudEvent type.
    pub r#type: String,
    /// CloudEvent source.
    pub source: String,
    /// Error code (`invalid_payload`, ..., or `broker` when RabbitMQ
    /// dead-lettered it after the delivery limit).
    pub code: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Handler attempts.
    pub attempts: u32,
    /// When (RFC 3339), if Bruno dead-lettered it.
    pub failed_at: Option<String>,
    /// All AMQP headers, rendered as strings.
    pub headers: BTreeMap<String, String>,
    /// Content type of the body.
    pub content_type: Option<String>,
    /// The body, as UTF-8 (lossy).
    pub data: String,
}

/// Which dead letters a replay takes.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Filter {
    /// Only this event id.
    pub id: Option<String>,
    /// Only this event type.
    pub r#type: Option<String>,
    /// Only this error code.
    pub code: Option<String>,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters put back on the part's queue.
    pub replayed: u64,
    /// Dead letters left in the DLQ (not matching the filter).
    pub kept: u64,
}

/// A DLQ operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The broker is unreachable.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// An AMQP operation failed.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// The part is not in the topology.
    #[error("unknown part {0:?}")]
    UnknownPart(String),
    /// The embedded broker refused.
    #[error("embedded broker: {0}")]
    Embedded(String),
}

fn render(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        other => format!("{other:?}"),
    }
}

fn describe(props: &BasicProperties, body: &[u8]) -> DeadLetter {
    let headers: BTreeMap<String, String> = props
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), render(v)))
                .collect()
        })
        .unwrap_or_default();
    let handler = match (
        header_str(props, headers::ERROR_CODE),
        header_str(props, headers::ERROR_REASON),
    ) {
        (Some(code), Some(reason)) => Some((code, reason)),
        _ => None,
    };
    let (code, reason) = match (latest_death(props), handler) {
        // The broker moved it here from the part's queue (delivery limit,
        // or an expired request, ADR 17), maybe after handler failures
        // that sent it through the retry tiers (whose own deaths, `expired`
        // into the part's queue, are not why it is here).
        (Some((why, queue)), handler) if !queue.contains(".retry.") => (
            "broker".to_owned(),
            match handler {
                Some((code, reason)) => {
                    format!(
                        "dead-lettered by RabbitMQ: {why} (earlier attempts failed: {code}: {reason})"
                    )
                }
                None => format!("dead-lettered by RabbitMQ: {why}"),
            },
        ),
        (_, Some(handler)) => handler,
        (death, None) => (
            "broker".to_owned(),
            format!(
                "dead-lettered by RabbitMQ: {}",
                death.map_or_else(|| "unknown".to_owned(), |(why, _)| why)
            ),
        ),
    };
    DeadLetter {
        id: header_str(props, "id")
            .or_else(|| props.message_id().as_ref().map(|m| m.as_str().to_owned()))
            .unwrap_or_default(),
        r#type: header_str(props, "type").unwrap_or_default(),
        source: header_str(props, "source").unwrap_or_default(),
        code,
        reason,
        attempts: header_u32(props, headers::ATTEMPTS).unwrap_or(0),
        failed_at: header_str(props, headers::FAILED_AT),
        headers,
        content_type: props.content_type().as_ref().map(|c| c.as_str().to_owned()),
        data: String::from_utf8_lossy(body).into_owned(),
    }
}

fn dlq_name(broker: &Broker, part: &str) -> Result<ShortString, DlqError> {
    if broker.topology().part(part).is_none() {
        return Err(DlqError::UnknownPart(part.to_owned()));
    }
    ShortString::try_new(broker.topology().names.dlq(part))
        .map_err(|_| DlqError::UnknownPart(part.to_owned()))
}

async fn get(
    channel: &Channel,
    queue: &ShortString,
) -> Result<Option<lapin::message::Delivery>, DlqError> {
    Ok(channel
        .basic_get(queue.clone(), BasicGetOptions { no_ack: false })
        .await?
        .map(|m| m.delivery))
}

/// Up to `limit` dead letters of a part, oldest first; none are removed.
pub async fn list(broker: &Broker, part: &str, limit: usize) -> Result<Vec<DeadLetter>, DlqError> {
    let queue = dlq_name(broker, part)?;
    match broker.transport() {
        Transport::Amqp => {}
        Transport::Embedded(e) => {
            let letters = e
                .browse(queue.as_str(), limit)
                .ok_or_else(|| DlqError::UnknownPart(part.to_owned()))?;
            return Ok(letters.iter().map(|(p, b)| describe(p, b)).collect());
        }
        Transport::Remote(c) => return c.dlq_list(part, limit).await,
        Transport::SinkOnly => {
            return Err(DlqError::Publish(PublishError::Unavailable(
                "no broker.url (push mode)".into(),
            )));
        }
    }
    let channel = broker.open_channel().await?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(delivery) = get(&channel, &queue).await? else {
            break;
        };
        out.push(describe(&delivery.properties, &delivery.data));
    }
    channel.close(200, "browsed".into()).await?;
    Ok(out)
}

/// One dead letter by event id.
pub async fn show(broker: &Broker, part: &str, id: &str) -> Result<Option<DeadLetter>, DlqError> {
    let all = list(broker, part, usize::MAX).await?;
    Ok(all.into_iter().find(|d| d.id == id))
}

fn matches(filter: &Filter, d: &DeadLetter) -> bool {
    filter.id.as_ref().is_none_or(|id| *id == d.id)
        && filter.r#type.as_ref().is_none_or(|t| *t == d.r#type)
        && filter.code.as_ref().is_none_or(|c| *c == d.code)
}

/// Put matching dead letters back on the part's queue.
pub async fn replay(
    broker: &Broker,
    part: &str,
    filter: &Filter,
) -> Result<ReplayReport, DlqError> {
    let queue = dlq_name(broker, part)?;
    let target = broker.topology().names.queue(part);
    match broker.transport() {
        Transport::Amqp => {}
        Transport::Embedded(e) => {
            let (replayed, kept) = e
                .move_where(queue.as_str(), &target, |props, body| {
                    matches(filter, &describe(props, body)).then(|| replay_props(props))
                })
                .await
                .map_err(|e| DlqError::Embedded(e.to_string()))?;
            return Ok(ReplayReport { replayed, kept });
        }
        Transport::Remote(c) => return c.dlq_replay(part, filter).await,
        Transport::SinkOnly => {
            return Err(DlqError::Publish(PublishError::Unavailable(
                "no broker.url (push mode)".into(),
            )));
        }
    }
    let channel = broker.open_channel().await?;
    let mut report = ReplayReport::default();
    while let Some(delivery) = get(&channel, &queue).await? {
        let d = describe(&delivery.properties, &delivery.data);
        if !matches(filter, &d) {
            report.kept += 1;
            continue;
        }
        let props = replay_props(&delivery.properties);
        broker
            .publish_raw("", &target, props, &delivery.data)
            .await?;
        delivery.ack(BasicAckOptions::default()).await?;
        report.replayed += 1;
    }
    channel.close(200, "replayed".into()).await?;
    Ok(report)
}

/// The reason and queue of the broker's latest dead-lettering of a message:
/// the first entry of `x-death` (RabbitMQ keeps the latest first), else
/// `x-first-death-*`.
fn latest_death(props: &BasicProperties) -> Option<(String, String)> {
    let headers = props.headers().as_ref()?;
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death")
        && let Some(AMQPValue::FieldTable(latest)) = deaths.as_slice().first()
    {
        let entry = latest.inner();
        if let (Some(why), Some(queue)) = (entry.get("reason"), entry.get("queue")) {
            return Some((render(why), render(queue)));
        }
    }
    Some((
        header_str(props, "x-first-death-reason")?,
        header_str(props, "x-first-death-queue").unwrap_or_default(),
    ))
}

/// `props` as a replay puts them back: every error and death header
/// removed, marked replayed.
fn replay_props(props: &BasicProperties) -> BasicProperties {
    let h = props.headers().clone().unwrap_or_default();
    let mut fresh = lapin::types::FieldTable::default();
    for (k, v) in h.inner() {
        let k_str = k.as_str();
        let cleared = k_str.starts_with("x-bruno-")
            || k_str.starts_with("x-death")
            || k_str.starts_with("x-first-death")
            || k_str.starts_with("x-last-death");
        if !cleared {
            fresh.insert(k.clone(), v.clone());
        }
    }
    fresh.insert(headers::REPLAYED.into(), AMQPValue::Boolean(true));
    props.clone().with_headers(fresh)
}

/// Drop every dead letter of a part; returns how many.
pub async fn purge(broker: &Broker, part: &str) -> Result<u32, DlqError> {
    let queue = dlq_name(broker, part)?;
    match broker.transport() {
        Transport::Amqp => {}
        Transport::Embedded(e) => {
            return e
                .purge(queue.as_str())
                .ok_or_else(|| DlqError::UnknownPart(part.to_owned()));
        }
        Transport::Remote(c) => return c.dlq_purge(part).await,
        Transport::SinkOnly => {
            return Err(DlqError::Publish(PublishError::Unavailable(
                "no broker.url (push mode)".into(),
            )));
        }
    }
    let channel = broker.open_channel().await?;
    let n = channel
        .queue_purge(queue, QueuePurgeOptions::default())
        .await?;
    channel.close(200, "purged".into()).await?;
    Ok(n)
}

/// `props` with Bruno's error headers: how many attempts failed, the error
/// code and reason, the part that gave up and when. Every dead letter and
/// retry carries them, whoever wrote it.
pub fn failed_props(
    props: lapin::BasicProperties,
    part: &str,
    code: bruno_core::ErrorCode,
    reason: &str,
    attempts: u32,
) -> lapin::BasicProperties {
    use lapin::types::{AMQPValue, LongString};
    let mut h = props.headers().clone().unwrap_or_default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    h.insert(
        crate::headers::ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    h.insert(crate::headers::ERROR_REASON.into(), s(reason));
    h.insert(crate::headers::ERROR_CODE.into(), s(code.as_str()));
    h.insert(crate::headers::PART.into(), s(part));
    h.insert(
        crate::headers::FAILED_AT.into(),
        s(&chrono::Utc::now().to_rfc3339()),
    );
    props.with_headers(h)
}
