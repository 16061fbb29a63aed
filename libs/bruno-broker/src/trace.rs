//! One trace per turn: W3C trace context carried in every event's
//! `traceparent`/`tracestate` and turned into OpenTelemetry messaging spans
//! (semantic conventions for RabbitMQ).
//!
//! - a publish is a `producer` span, child of whatever span is current (an
//!   HTTP request, or the consumer span of the event being handled); its
//!   context replaces the event's `traceparent` on the wire, so the next hop
//!   hangs below it;
//! - handling an event is a `consumer` span whose parent is the event's
//!   `traceparent`.
//!
//! Without an OpenTelemetry layer in the subscriber (tools, tests) spans have
//! no context, and events keep the trace context they already carry.

use bruno_events::{AttributesReader, Event, correlation_id, ext, ext_str};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `messaging.system` of every span.
pub const SYSTEM: &str = "rabbitmq";

/// The producer span of publishing `event` to `exchange`: a child of the
/// current span, unless the event already belongs to another trace (an
/// event a producer traced, arriving at the ingress), whose context then
/// stays its parent.
pub fn publish_span(exchange: &str, event: &Event) -> Span {
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {exchange}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "send",
        "messaging.operation.name" = "publish",
        "messaging.destination.name" = %exchange,
        "messaging.message.id" = %event.id(),
        "messaging.message.conversation_id" = correlation_id(event).unwrap_or_default(),
        "cloudevents.event_type" = %event.ty(),
        "cloudevents.event_source" = %event.source(),
    );
    if !span.is_disabled() && ext_str(event, ext::TRACEPARENT).is_some() {
        let cx = TraceContextPropagator::new().extract(&EventCarrier(event));
        let theirs = cx.span().span_context().trace_id();
        if cx.span().span_context().is_valid()
            && Span::current().context().span().span_context().trace_id() != theirs
        {
            let _ = span.set_parent(cx);
        }
    }
    span
}

/// The consumer span of `part` handling `event` from `queue`, child of the
/// event's trace context.
pub fn process_span(part: &str, queue: &str, event: &Event, attempt: u32) -> Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {queue}"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        %part,
        attempt,
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "process",
        "messaging.operation.name" = "process",
        "messaging.destination.name" = %queue,
        "messaging.consumer.group.name" = %part,
        "messaging.message.id" = %event.id(),
        "messaging.message.conversation_id" = correlation_id(event).unwrap_or_default(),
        "cloudevents.event_type" = %event.ty(),
        "cloudevents.event_source" = %event.source(),
    );
    adopt(&span, event);
    span
}

/// The consumer span of a reply arriving in a request/reply inbox.
pub fn receive_span(inbox: &str, event: &Event) -> Span {
    let span = tracing::info_span!(
        "receive",
        otel.name = %format_args!("receive {inbox}"),
        otel.kind = "consumer",
        "messaging.system" = SYSTEM,
        "messaging.operation.type" = "receive",
        "messaging.operation.name" = "receive",
        "messaging.destination.name" = %inbox,
        "messaging.destination.temporary" = true,
        "messaging.message.id" = %event.id(),
        "messaging.message.conversation_id" = correlation_id(event).unwrap_or_default(),
        "cloudevents.event_type" = %event.ty(),
    );
    adopt(&span, event);
    span
}

/// Mark `span` failed (`otel.status_code = ERROR`).
pub fn failed(span: &Span) {
    span.record("otel.status_code", "ERROR");
}

struct EventCarrier<'a>(&'a Event);

impl Extractor for EventCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            ext::TRACEPARENT => ext_str(self.0, ext::TRACEPARENT),
            ext::TRACESTATE => ext_str(self.0, ext::TRACESTATE),
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec![ext::TRACEPARENT, ext::TRACESTATE]
    }
}

/// Make `event`'s trace context the parent of `span` (nothing if it has none).
pub fn adopt(span: &Span, event: &Event) {
    let cx = TraceContextPropagator::new().extract(&EventCarrier(event));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Make the W3C `traceparent` header (or `ce-traceparent`, a CloudEvent's
/// binary-mode extension) the parent of `span`.
pub fn adopt_headers(span: &Span, get: impl Fn(&str) -> Option<String>) {
    struct Headers(Vec<(&'static str, String)>);
    impl Extractor for Headers {
        fn get(&self, key: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| *k).collect()
        }
    }
    let pick = |name: &str| get(name).or_else(|| get(&format!("ce-{name}")));
    let mut found = Vec::new();
    if let Some(tp) = pick(ext::TRACEPARENT) {
        found.push((ext::TRACEPARENT, tp));
        if let Some(ts) = pick(ext::TRACESTATE) {
            found.push((ext::TRACESTATE, ts));
        }
    }
    let cx = TraceContextPropagator::new().extract(&Headers(found));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` and `tracestate` of `span`, if it has a context.
pub fn context_of(span: &Span) -> Option<(String, Option<String>)> {
    struct Out(Vec<(String, String)>);
    impl Injector for Out {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_owned(), value));
        }
    }
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = Out(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    let mut traceparent = None;
    let mut tracestate = None;
    for (k, v) in out.0 {
        match k.as_str() {
            ext::TRACEPARENT => traceparent = Some(v),
            ext::TRACESTATE if !v.is_empty() => tracestate = Some(v),
            _ => {}
        }
    }
    traceparent.map(|tp| (tp, tracestate))
}

/// The trace id of `span` (32 hex digits), if it has a context.
pub fn trace_id(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bruno_events::{AttributesWriter, ExtensionValue};

    #[test]
    fn without_a_layer_spans_have_no_context_and_events_keep_theirs() {
        let mut e = Event::default();
        e.set_id("1");
        e.set_extension(
            ext::TRACEPARENT,
            ExtensionValue::from("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        let span = process_span("p", "q", &e, 1);
        assert!(context_of(&span).is_none());
        assert!(trace_id(&span).is_none());
        let carrier = EventCarrier(&e);
        assert_eq!(
            carrier.get("traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(carrier.get("other"), None);
    }
}
