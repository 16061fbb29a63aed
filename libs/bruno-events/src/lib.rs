//! The CloudEvent catalogue of Bruno.
//!
//! Every event that crosses the broker is a CloudEvents 1.0 event whose `type`
//! is one of [`catalogue`]'s entries (`bruno.<name>.v<version>`), whose `data`
//! is the JSON form of that entry's payload struct, and which may carry the
//! extensions in [`ext`].
#![forbid(unsafe_code)]

pub mod asyncapi;
mod build;
mod catalogue;
pub mod legacy;
pub mod payload;
mod validate;

pub use build::{
    blank_event, correlation_id, data_bytes, decode_data, derive_id, new_event, reply_event,
};
pub use catalogue::{CatalogueEntry, EventData, catalogue, entry};
pub use cloudevents::event::ExtensionValue;
pub use cloudevents::{
    AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventBuilderV10,
};
pub use url::Url;
pub use validate::{Limits, ValidationError, validate};

/// The only CloudEvents spec version Bruno accepts.
pub const SPEC_VERSION: &str = "1.0";

/// The content type of every catalogue payload.
pub const JSON: &str = "application/json";

/// CloudEvent extension attribute names used by Bruno.
pub mod ext {
    /// Set by the gateway; copied onto every event of one conversation turn.
    pub const CORRELATION_ID: &str = "correlationid";
    /// The gateway instance awaiting the reply.
    pub const REPLY_TO: &str = "replyto";
    /// W3C trace context (CloudEvents distributed-tracing extension).
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state (CloudEvents distributed-tracing extension).
    pub const TRACESTATE: &str = "tracestate";

    /// Extensions copied from a request onto every event derived from it.
    pub const PROPAGATED: [&str; 4] = [CORRELATION_ID, REPLY_TO, TRACEPARENT, TRACESTATE];
}

/// Read a string extension, if the event has it as a string.
pub fn ext_str<'a>(event: &'a Event, name: &str) -> Option<&'a str> {
    match event.extension(name) {
        Some(cloudevents::event::ExtensionValue::String(s)) => Some(s.as_str()),
        _ => None,
    }
}
