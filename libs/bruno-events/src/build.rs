//! Building catalogue events and reading their payloads.

use std::borrow::Cow;

use cloudevents::{AttributesReader, AttributesWriter, Data, Event};
use serde::de::DeserializeOwned;

use crate::{EventData, JSON, ValidationError, ext, ext_str};

/// An event whose attributes the caller sets: `Event::default()` draws a
/// random UUID (a `getrandom` call), asks for the host name (`uname`) and
/// reads the clock on every call — about two thirds of the ingress's
/// request parsing (perf) — so this clones one made once. Set the id,
/// source, type and time; the rest is unset.
pub fn blank_event() -> Event {
    static BLANK: std::sync::LazyLock<Event> = std::sync::LazyLock::new(|| {
        let mut event = Event::default();
        event.set_time(None::<chrono::DateTime<chrono::Utc>>);
        event
    });
    BLANK.clone()
}

/// A new event of a catalogue type with a fresh random id and the current time.
pub fn new_event<T: EventData>(source: &str, data: &T) -> Event {
    build(uuid::Uuid::new_v4().to_string(), source, data)
}

/// An event caused by `cause`: its id is derived from the cause (so redelivery
/// of the cause produces the same id) and it carries the cause's correlation,
/// reply-to and trace-context extensions.
pub fn reply_event<T: EventData>(cause: &Event, source: &str, index: u32, data: &T) -> Event {
    let mut event = build(derive_id(cause, T::TYPE, index), source, data);
    for name in ext::PROPAGATED {
        if let Some(value) = cause.extension(name) {
            event.set_extension(name, value.clone());
        }
    }
    event
}

/// A deterministic id for the `index`-th event of type `ty` caused by `cause`:
/// a UUIDv5 over the cause's idempotency key (`source`, `id`).
pub fn derive_id(cause: &Event, ty: &str, index: u32) -> String {
    let name = format!(
        "{}\u{0}{}\u{0}{}\u{0}{}",
        cause.source(),
        cause.id(),
        ty,
        index
    );
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string()
}

fn build<T: EventData>(id: String, source: &str, data: &T) -> Event {
    let mut event = blank_event();
    event.set_id(id);
    event.set_source(source);
    event.set_type(T::TYPE);
    event.set_time(Some(chrono::Utc::now()));
    // Serializing a payload struct (strings, numbers, maps with string keys) cannot fail.
    let value = serde_json::to_value(data).unwrap_or(serde_json::Value::Null);
    event.set_data(JSON, value);
    event
}

/// The `data` of an event as the bytes that travel on the wire.
pub fn data_bytes(event: &Event) -> Option<Cow<'_, [u8]>> {
    match event.data()? {
        Data::Binary(b) => Some(Cow::Borrowed(b.as_slice())),
        Data::String(s) => Some(Cow::Borrowed(s.as_bytes())),
        Data::Json(v) => Some(Cow::Owned(serde_json::to_vec(v).unwrap_or_default())),
    }
}

/// Decode an event's `data` into a payload type; the error names the field.
pub fn decode_data<T: DeserializeOwned>(event: &Event) -> Result<T, ValidationError> {
    if let Some(ct) = event.datacontenttype() {
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if !(essence == JSON || essence.ends_with("+json")) {
            return Err(ValidationError::new(
                "datacontenttype",
                format!("must be {JSON}, got {ct:?}"),
            ));
        }
    }
    // Plain serde first; only a payload that fails is read again with its
    // path tracked, for the error's field.
    match event.data() {
        None => Err(ValidationError::new("data", "is required")),
        Some(Data::Json(v)) => {
            T::deserialize(v).or_else(|_| serde_path_to_error::deserialize(v).map_err(field_error))
        }
        Some(Data::Binary(b)) => {
            serde_json::from_slice(b).or_else(|_| tracked(serde_json::Deserializer::from_slice(b)))
        }
        Some(Data::String(s)) => {
            serde_json::from_str(s).or_else(|_| tracked(serde_json::Deserializer::from_str(s)))
        }
    }
}

/// Deserialize with the failing field's path, and nothing after the value.
fn tracked<'de, T: DeserializeOwned, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
) -> Result<T, ValidationError> {
    let value = serde_path_to_error::deserialize(&mut de).map_err(field_error)?;
    de.end()
        .map_err(|e| ValidationError::new("data", e.to_string()))?;
    Ok(value)
}

fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> ValidationError {
    let path = e.path().to_string();
    let field = if path == "." {
        "data".to_owned()
    } else {
        format!("data.{path}")
    };
    ValidationError::new(field, e.into_inner().to_string())
}

/// The correlation id of an event, if any.
pub fn correlation_id(event: &Event) -> Option<&str> {
    ext_str(event, ext::CORRELATION_ID)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{ChatDelta, SearchRequested};
    use cloudevents::event::ExtensionValue;

    #[test]
    fn reply_ids_are_deterministic_and_extensions_propagate() {
        let mut cause = new_event(
            "test",
            &ChatDelta {
                seq: 1,
                text: "x".into(),
            },
        );
        cause.set_extension(ext::CORRELATION_ID, ExtensionValue::from("c-1"));
        cause.set_extension(ext::REPLY_TO, ExtensionValue::from("gw-1"));
        cause.set_extension("other", ExtensionValue::from("no"));
        let a = reply_event(
            &cause,
            "r",
            0,
            &ChatDelta {
                seq: 2,
                text: "y".into(),
            },
        );
        let b = reply_event(
            &cause,
            "r",
            0,
            &ChatDelta {
                seq: 2,
                text: "y".into(),
            },
        );
        let c = reply_event(
            &cause,
            "r",
            1,
            &ChatDelta {
                seq: 2,
                text: "y".into(),
            },
        );
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
        assert_eq!(correlation_id(&a), Some("c-1"));
        assert_eq!(ext_str(&a, ext::REPLY_TO), Some("gw-1"));
        assert!(a.extension("other").is_none());
    }

    #[test]
    fn decode_names_the_bad_field() {
        let mut e = Event::default();
        e.set_data(JSON, serde_json::json!({"query": "q", "k": "five"}));
        let err = decode_data::<SearchRequested>(&e).unwrap_err();
        assert_eq!(err.field, "data.k");
        let mut e = Event::default();
        e.set_data(JSON, Data::Binary(b"{\"k\":3}".to_vec()));
        let err = decode_data::<SearchRequested>(&e).unwrap_err();
        assert_eq!(err.field, "data");
        assert!(err.message.contains("query"), "{err}");
        // Nothing may follow the payload.
        let mut e = Event::default();
        e.set_data(
            JSON,
            Data::Binary(b"{\"query\":\"q\",\"k\":3} trailing".to_vec()),
        );
        let err = decode_data::<SearchRequested>(&e).unwrap_err();
        assert_eq!(err.field, "data");
        assert!(err.message.contains("trailing"), "{err}");
    }

    #[test]
    fn blank_events_carry_no_default_time_and_are_independent() {
        let mut a = blank_event();
        a.set_id("a");
        let b = blank_event();
        assert_ne!(b.id(), "a");
        assert!(b.time().is_none());
        assert!(b.subject().is_none() && b.datacontenttype().is_none());
    }
}
