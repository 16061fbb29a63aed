//! Push mode's publisher (ADR 15): events as binary-mode CloudEvents over
//! HTTP to a sink, the Knative `Broker`'s ingress, which answers 2xx only
//! once it stored the event (the RabbitMQ broker class publishes with
//! confirms first). The encoding is the CloudEvents SDK's own HTTP
//! serializer, so every attribute and extension travels as a `ce-` header.

use std::sync::Arc;
use std::time::Duration;

use bruno_events::{Event, ExtensionValue};
use cloudevents::binding::http::{Builder, Serializer};
use cloudevents::message::BinaryDeserializer;
use futures_util::future::join_all;

use crate::PublishError;

/// Where push-mode parts publish: a CloudEvents HTTP sink.
#[derive(Clone)]
pub struct Sink {
    http: reqwest::Client,
    url: Arc<str>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("url", &self.url).finish()
    }
}

struct Request(Option<reqwest::RequestBuilder>);

impl Builder<reqwest::RequestBuilder> for Request {
    fn header(&mut self, key: &str, value: http::HeaderValue) {
        self.0 = self.0.take().map(|r| r.header(key, value));
    }

    fn body(&mut self, bytes: Vec<u8>) -> cloudevents::message::Result<reqwest::RequestBuilder> {
        self.0
            .take()
            .map(|r| r.body(bytes))
            .ok_or_else(|| cloudevents::message::Error::Other {
                source: "request already built".into(),
            })
    }

    fn finish(&mut self) -> cloudevents::message::Result<reqwest::RequestBuilder> {
        self.body(Vec::new())
    }
}

impl Sink {
    /// A publisher to the sink at `url`.
    pub fn new(url: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            url: Arc::from(url),
        }
    }

    /// POST each event (with `traces[i]` as its trace context, when set),
    /// concurrently; returns once the sink accepted every one, or with the
    /// first refusal.
    pub async fn publish(
        &self,
        events: &[Event],
        traces: Vec<Option<(String, Option<String>)>>,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let mut sends = Vec::with_capacity(events.len());
        for (event, trace) in events.iter().zip(traces) {
            let mut event = event.clone();
            if let Some((parent, state)) = trace {
                event.set_extension("traceparent", ExtensionValue::String(parent));
                if let Some(state) = state {
                    event.set_extension("tracestate", ExtensionValue::String(state));
                }
            }
            let request = BinaryDeserializer::deserialize_binary(
                event,
                Serializer::new(Request(Some(
                    self.http.post(self.url.as_ref()).timeout(timeout),
                ))),
            )
            .map_err(|e| {
                PublishError::Codec(crate::codec::CodecError::Invalid {
                    name: "event".into(),
                    reason: e.to_string(),
                })
            })?;
            sends.push(request.send());
        }
        let mut first = None;
        for sent in join_all(sends).await {
            let outcome = match sent {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) if r.status().is_client_error() => Err(PublishError::Returned(format!(
                    "the sink refused the event: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ))),
                Ok(r) => Err(PublishError::Unavailable(format!(
                    "the sink answered {}",
                    r.status()
                ))),
                Err(e) if e.is_timeout() => Err(PublishError::Timeout(timeout)),
                Err(e) => Err(PublishError::Unavailable(format!("the sink: {e}"))),
            };
            if let Err(e) = outcome {
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}
