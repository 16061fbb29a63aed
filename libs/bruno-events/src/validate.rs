//! Validation of incoming events: attributes, sizes, known type, payload.

use cloudevents::event::{ExtensionValue, SpecVersion};
use cloudevents::{AttributesReader, Event};

use crate::{data_bytes, entry, ext};

/// An event that is not acceptable, naming the offending attribute or field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct ValidationError {
    /// The attribute (`id`, `type`, ...) or payload field (`data.doc_id`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// A new error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Size limits applied to every event.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest `data`, in bytes.
    pub max_data_bytes: usize,
    /// Longest attribute or extension value, in bytes.
    pub max_attribute_bytes: usize,
    /// Most extensions on one event.
    pub max_extensions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_data_bytes: 1 << 20,
            max_attribute_bytes: 4096,
            max_extensions: 32,
        }
    }
}

/// Check an event against the catalogue: spec version 1.0, required attributes
/// present and not empty, extension names and values well formed, size limits,
/// a known type, and a `data` that decodes into the type's payload.
pub fn validate(event: &Event, limits: &Limits) -> Result<(), ValidationError> {
    if event.specversion() != SpecVersion::V10 {
        return Err(ValidationError::new(
            "specversion",
            format!("must be 1.0, got {}", event.specversion()),
        ));
    }
    for (field, value) in [
        ("id", event.id()),
        ("source", event.source().as_str()),
        ("type", event.ty()),
    ] {
        if value.is_empty() {
            return Err(ValidationError::new(field, "must not be empty"));
        }
        if value.len() > limits.max_attribute_bytes {
            return Err(ValidationError::new(field, too_long(value.len(), limits)));
        }
    }
    if let Some(subject) = event.subject()
        && subject.len() > limits.max_attribute_bytes
    {
        return Err(ValidationError::new(
            "subject",
            too_long(subject.len(), limits),
        ));
    }
    let mut count = 0;
    for (name, value) in event.iter_extensions() {
        count += 1;
        if !valid_attribute_name(name) {
            return Err(ValidationError::new(
                name,
                "extension names must be 1-20 lowercase letters or digits",
            ));
        }
        let len = match value {
            ExtensionValue::String(s) => s.len(),
            _ => 0,
        };
        if len > limits.max_attribute_bytes {
            return Err(ValidationError::new(name, too_long(len, limits)));
        }
        if ext::PROPAGATED.contains(&name) && !matches!(value, ExtensionValue::String(_)) {
            return Err(ValidationError::new(name, "must be a string"));
        }
    }
    if count > limits.max_extensions {
        return Err(ValidationError::new(
            "extensions",
            format!(
                "{count} extensions, at most {} allowed",
                limits.max_extensions
            ),
        ));
    }
    if let Some(tp) = crate::ext_str(event, ext::TRACEPARENT)
        && !valid_traceparent(tp)
    {
        return Err(ValidationError::new(
            ext::TRACEPARENT,
            "is not a W3C traceparent",
        ));
    }
    if let Some(len) = data_bytes(event).map(|d| d.len())
        && len > limits.max_data_bytes
    {
        return Err(ValidationError::new(
            "data",
            format!("is {len} bytes, at most {} allowed", limits.max_data_bytes),
        ));
    }
    let Some(entry) = entry(event.ty()) else {
        return Err(ValidationError::new(
            "type",
            format!("unknown event type {:?}", event.ty()),
        ));
    };
    (entry.check)(event)
}

fn too_long(len: usize, limits: &Limits) -> String {
    format!(
        "is {len} bytes, at most {} allowed",
        limits.max_attribute_bytes
    )
}

/// CloudEvents attribute names: lowercase ASCII letters or digits, at most 20.
pub(crate) fn valid_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
fn valid_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() >= 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000"
        && parts[2] != "0000000000000000"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JSON, new_event, payload::DocumentSubmitted};
    use cloudevents::AttributesWriter;

    fn doc() -> Event {
        new_event(
            "test",
            &DocumentSubmitted {
                doc_id: "d1".into(),
                source: "s".into(),
                title: None,
                text: "hello".into(),
                format: Default::default(),
                metadata: Default::default(),
            },
        )
    }

    #[test]
    fn a_catalogue_event_is_valid() {
        validate(&doc(), &Limits::default()).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let limits = Limits::default();
        let mut e = doc();
        e.set_type("bruno.nope.v1");
        assert_eq!(validate(&e, &limits).unwrap_err().field, "type");

        let mut e = doc();
        e.set_id("");
        assert_eq!(validate(&e, &limits).unwrap_err().field, "id");

        let mut e = doc();
        e.set_data(JSON, serde_json::json!({"doc_id": "d", "source": "s"}));
        let err = validate(&e, &limits).unwrap_err();
        assert_eq!(err.field, "data");
        assert!(err.message.contains("text"), "{err}");

        let mut e = doc();
        e.set_data(
            JSON,
            serde_json::json!({"doc_id": " ", "source": "s", "text": "t"}),
        );
        assert_eq!(validate(&e, &limits).unwrap_err().field, "data.doc_id");

        let mut e = doc();
        e.set_extension(ext::TRACEPARENT, ExtensionValue::from("garbage"));
        assert_eq!(validate(&e, &limits).unwrap_err().field, "traceparent");

        let mut e = doc();
        e.set_extension("Bad-Name", ExtensionValue::from("x"));
        assert_eq!(validate(&e, &limits).unwrap_err().field, "Bad-Name");

        let small = Limits {
            max_data_bytes: 10,
            ..Limits::default()
        };
        assert_eq!(validate(&doc(), &small).unwrap_err().field, "data");
    }

    #[test]
    fn traceparent_format() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01"
        ));
    }
}
