//! System tests of the event backbone: on the real RabbitMQ, and the
//! broker conformance tests (`on_both!`) on the embedded broker as well.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
mod consumer;
mod dlq;
mod ingress;
mod malformed;
mod push;
mod python;
mod resilience;
mod tls;

use bruno_events::payload::DocumentSubmitted;
use bruno_events::{EventData, new_event};

/// A valid `document.submitted` payload.
pub fn doc(doc_id: &str) -> DocumentSubmitted {
    DocumentSubmitted {
        doc_id: doc_id.into(),
        source: "tests".into(),
        title: Some("Ünïcødé ☃".into()),
        text: format!("text of {doc_id}"),
        format: Default::default(),
        metadata: Default::default(),
    }
}

/// A valid `document.submitted` event.
pub fn doc_event(doc_id: &str) -> bruno_events::Event {
    new_event("tests", &doc(doc_id))
}

/// The part every test binds on `document.submitted`.
pub fn doc_part(name: &str) -> bruno_broker::PartSpec {
    bruno_broker::PartSpec::on_types(name, &[DocumentSubmitted::TYPE])
}
