//! CloudEvent ⇄ AMQP message, as Knative's RabbitMQ broker lays it out:
//! every attribute and extension is an un-prefixed AMQP header, the data is
//! the body, `content_type` is `datacontenttype`, `message_id` is the event
//! id and the delivery mode is persistent.
//!
//! Headers that are not CloudEvent attribute names (anything with a dash or
//! an upper-case letter, such as `x-death` or `x-bruno-attempts`) are
//! transport metadata and are not turned into extensions.

use bruno_events::{AttributesReader, AttributesWriter, Data, Event, data_bytes};
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// A message that is not a CloudEvent, or an event that cannot be an AMQP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A required attribute is absent.
    #[error("missing attribute {0}")]
    Missing(&'static str),
    /// An attribute is present but unusable.
    #[error("invalid attribute {name}: {reason}")]
    Invalid {
        /// The attribute.
        name: String,
        /// Why.
        reason: String,
    },
}

fn invalid(name: &str, reason: impl Into<String>) -> CodecError {
    CodecError::Invalid {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

const PERSISTENT: u8 = 2;

/// Attribute names carried as headers (besides extensions).
const ATTRIBUTES: [&str; 7] = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "dataschema",
];

fn short(name: &str, value: &str) -> Result<ShortString, CodecError> {
    ShortString::try_new(value).map_err(|e| invalid(name, e.to_string()))
}

/// Encode an event as AMQP properties and body.
pub fn encode(event: &Event) -> Result<(BasicProperties, Vec<u8>), CodecError> {
    encode_traced(event, None)
}

/// Encode an event with `trace` (`traceparent`, optional `tracestate`) in
/// place of the trace context it carries.
pub fn encode_traced(
    event: &Event,
    trace: Option<(String, Option<String>)>,
) -> Result<(BasicProperties, Vec<u8>), CodecError> {
    encode_borrowed(event, trace).map(|(props, body)| (props, body.into_owned()))
}

/// [`encode_traced`] with the body borrowed from the event where its data
/// is bytes or text already (the ingress's events: no copy of the body
/// between the request and the publish).
pub(crate) fn encode_borrowed(
    event: &Event,
    trace: Option<(String, Option<String>)>,
) -> Result<(BasicProperties, std::borrow::Cow<'_, [u8]>), CodecError> {
    let mut headers = FieldTable::default();
    let mut put = |name: &str, value: &str| {
        headers.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value)),
        );
    };
    put("specversion", event.specversion().as_str());
    put("id", event.id());
    put("source", event.source().as_str());
    put("type", event.ty());
    if let Some(time) = event.time() {
        put("time", &time.to_rfc3339_opts(SecondsFormat::AutoSi, true));
    }
    if let Some(subject) = event.subject() {
        put("subject", subject);
    }
    if let Some(schema) = event.dataschema() {
        put("dataschema", schema.as_str());
    }
    for (name, value) in event.iter_extensions() {
        if trace.is_some() && (name == "traceparent" || name == "tracestate") {
            continue;
        }
        let value = match value {
            bruno_events::ExtensionValue::String(s) => {
                AMQPValue::LongString(LongString::from(s.as_str()))
            }
            bruno_events::ExtensionValue::Boolean(b) => AMQPValue::Boolean(*b),
            bruno_events::ExtensionValue::Integer(i) => AMQPValue::LongLongInt(*i),
        };
        headers.insert(short(name, name)?, value);
    }
    if let Some((traceparent, tracestate)) = trace {
        headers.insert(
            ShortString::from(bruno_events::ext::TRACEPARENT),
            AMQPValue::LongString(LongString::from(traceparent)),
        );
        if let Some(ts) = tracestate {
            headers.insert(
                ShortString::from(bruno_events::ext::TRACESTATE),
                AMQPValue::LongString(LongString::from(ts)),
            );
        }
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Ok(id) = ShortString::try_new(event.id()) {
        props = props.with_message_id(id);
    }
    if let Some(ct) = event.datacontenttype() {
        props = props.with_content_type(short("datacontenttype", ct)?);
    }
    if let Some(time) = event.time() {
        props = props.with_timestamp(u64::try_from(time.timestamp()).unwrap_or(0));
    }
    let body = data_bytes(event).unwrap_or_default();
    Ok((props, body))
}

fn header_string(name: &str, value: &AMQPValue) -> Result<String, CodecError> {
    match value {
        AMQPValue::LongString(s) => {
            String::from_utf8(s.as_bytes().to_vec()).map_err(|_| invalid(name, "is not UTF-8"))
        }
        AMQPValue::ShortString(s) => Ok(s.as_str().to_owned()),
        other => Err(invalid(name, format!("must be a string, got {other:?}"))),
    }
}

/// Whether a header name can be a CloudEvent attribute or extension name.
fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Decode AMQP properties and body into an event.
///
/// Besides Bruno's own un-prefixed layout this reads what the CloudEvents
/// RabbitMQ protocol binding writes (the Python SDK's `rabbitmq` binding):
/// `ce-`-prefixed headers in binary mode, and structured mode with content
/// type `application/cloudevents+json` and the whole envelope as the body.
pub fn decode(props: &BasicProperties, body: &[u8]) -> Result<Event, CodecError> {
    let empty = FieldTable::default();
    let raw = props.headers().as_ref().unwrap_or(&empty);
    // Attribute name -> value; an un-prefixed header wins over a `ce-` one.
    let mut headers: std::collections::BTreeMap<&str, &AMQPValue> =
        std::collections::BTreeMap::new();
    for (name, value) in raw.inner() {
        if let Some(attr) = name.as_str().strip_prefix("ce-") {
            headers.entry(attr).or_insert(value);
        }
    }
    for (name, value) in raw.inner() {
        headers.insert(name.as_str(), value);
    }
    let content_type = props.content_type().as_ref().map(|c| c.as_str().to_owned());
    if !headers.contains_key("specversion")
        && content_type
            .as_deref()
            .is_some_and(|ct| ct.starts_with("application/cloudevents+json"))
    {
        return serde_json::from_slice::<Event>(body)
            .map_err(|e| invalid("body", format!("structured-mode event is not valid: {e}")));
    }
    let get = |name: &'static str| -> Result<Option<String>, CodecError> {
        headers
            .get(name)
            .map(|v| header_string(name, v))
            .transpose()
    };
    match get("specversion")? {
        Some(v) if v == bruno_events::SPEC_VERSION => {}
        Some(v) => return Err(invalid("specversion", format!("must be 1.0, got {v:?}"))),
        None => return Err(CodecError::Missing("specversion")),
    }
    let id = match get("id")? {
        Some(id) => id,
        None => props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .ok_or(CodecError::Missing("id"))?,
    };
    let source = get("source")?.ok_or(CodecError::Missing("source"))?;
    let ty = get("type")?.ok_or(CodecError::Missing("type"))?;
    if id.is_empty() {
        return Err(invalid("id", "must not be empty"));
    }
    if source.is_empty() {
        return Err(invalid("source", "must not be empty"));
    }
    if ty.is_empty() {
        return Err(invalid("type", "must not be empty"));
    }

    let mut event = bruno_events::blank_event();
    event.set_id(id);
    event.set_source(source);
    event.set_type(ty);
    let time = get("time")?
        .map(|t| DateTime::parse_from_rfc3339(&t).map(|t| t.with_timezone(&Utc)))
        .transpose()
        .map_err(|e| invalid("time", e.to_string()))?;
    event.set_time(time);
    event.set_subject(get("subject")?);
    let schema = get("dataschema")?
        .map(|s| bruno_events::Url::parse(&s))
        .transpose()
        .map_err(|e| invalid("dataschema", e.to_string()))?;
    event.set_dataschema(schema);

    for (&name, &value) in &headers {
        if ATTRIBUTES.contains(&name) || name == "datacontenttype" || !is_attribute_name(name) {
            continue;
        }
        let value = match value {
            AMQPValue::Boolean(b) => bruno_events::ExtensionValue::Boolean(*b),
            AMQPValue::ShortShortInt(i) => bruno_events::ExtensionValue::Integer(i64::from(*i)),
            AMQPValue::ShortShortUInt(i) => bruno_events::ExtensionValue::Integer(i64::from(*i)),
            AMQPValue::ShortInt(i) => bruno_events::ExtensionValue::Integer(i64::from(*i)),
            AMQPValue::ShortUInt(i) => bruno_events::ExtensionValue::Integer(i64::from(*i)),
            AMQPValue::LongInt(i) => bruno_events::ExtensionValue::Integer(i64::from(*i)),
            AMQPValue::LongUInt(i) => bruno_events::ExtensionValue::Integer(i64::from(*i)),
            AMQPValue::LongLongInt(i) => bruno_events::ExtensionValue::Integer(*i),
            AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
                bruno_events::ExtensionValue::String(header_string(name, value)?)
            }
            // Other AMQP types have no CloudEvents counterpart.
            _ => continue,
        };
        event.set_extension(name, value);
    }

    if body.is_empty() {
        event.set_datacontenttype(content_type);
    } else {
        match content_type {
            Some(ct) => {
                event.set_data(ct, Data::Binary(body.to_vec()));
            }
            None => {
                event.set_data_unchecked(Data::Binary(body.to_vec()));
            }
        }
    }
    Ok(event)
}

/// Read an integer header, whatever integer type the broker used.
pub fn header_u32(props: &BasicProperties, name: &str) -> Option<u32> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    let n: i64 = match value {
        AMQPValue::ShortShortInt(i) => i64::from(*i),
        AMQPValue::ShortShortUInt(i) => i64::from(*i),
        AMQPValue::ShortInt(i) => i64::from(*i),
        AMQPValue::ShortUInt(i) => i64::from(*i),
        AMQPValue::LongInt(i) => i64::from(*i),
        AMQPValue::LongUInt(i) => i64::from(*i),
        AMQPValue::LongLongInt(i) => *i,
        _ => return None,
    };
    u32::try_from(n).ok()
}

/// Read a string header.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    header_string(name, value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bruno_events::ExtensionValue;
    use proptest::prelude::*;

    fn attr_name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9]{0,19}".prop_filter("not a core attribute", |n| {
            !ATTRIBUTES.contains(&n.as_str()) && n != "datacontenttype"
        })
    }

    fn ext_value() -> impl Strategy<Value = ExtensionValue> {
        prop_oneof![
            any::<String>().prop_map(ExtensionValue::String),
            any::<bool>().prop_map(ExtensionValue::Boolean),
            any::<i64>().prop_map(ExtensionValue::Integer),
        ]
    }

    fn data() -> impl Strategy<Value = Option<(String, Vec<u8>)>> {
        prop_oneof![
            Just(None),
            proptest::collection::vec(any::<u8>(), 1..512)
                .prop_map(|b| Some(("application/octet-stream".to_owned(), b))),
            ".+".prop_map(|s: String| Some((
                "text/plain; charset=utf-8".to_owned(),
                s.into_bytes()
            ))),
            any::<(String, i64, bool)>().prop_map(|(s, i, b)| {
                let v = serde_json::json!({"s": s, "i": i, "b": b, "nested": [s, {"ü": "☃"}]});
                Some((
                    "application/json".to_owned(),
                    serde_json::to_vec(&v).unwrap(),
                ))
            }),
        ]
    }

    prop_compose! {
        fn event()(
            id in "\\PC{1,64}",
            source in "\\PC{1,64}",
            ty in "[a-z.]{1,40}",
            subject in proptest::option::of("\\PC{0,40}"),
            secs in proptest::option::of(0i64..4_000_000_000),
            nanos in 0u32..1_000_000_000,
            exts in proptest::collection::btree_map(attr_name(), ext_value(), 0..6),
            data in data(),
        ) -> Event {
            let mut e = Event::default();
            e.set_id(id);
            e.set_source(source);
            e.set_type(ty);
            e.set_subject(subject);
            e.set_time(secs.map(|s| DateTime::from_timestamp(s, nanos).unwrap()));
            for (k, v) in exts {
                e.set_extension(&k, v);
            }
            match data {
                Some((ct, bytes)) => { e.set_data(ct, Data::Binary(bytes)); }
                None => { e.set_datacontenttype(None::<String>); }
            }
            e
        }
    }

    proptest! {
        #[test]
        fn round_trip(e in event()) {
            let (props, body) = encode(&e).unwrap();
            let back = decode(&props, &body).unwrap();
            prop_assert_eq!(back, e);
        }

        #[test]
        fn json_data_travels_as_bytes(v in any::<(String, u32)>()) {
            let mut e = Event::default();
            e.set_data("application/json", serde_json::json!({"text": v.0, "n": v.1}));
            let (props, body) = encode(&e).unwrap();
            let back = decode(&props, &body).unwrap();
            let original: serde_json::Value = serde_json::from_slice(&data_bytes(&e).unwrap()).unwrap();
            let decoded: serde_json::Value = serde_json::from_slice(&data_bytes(&back).unwrap()).unwrap();
            prop_assert_eq!(original, decoded);
        }
    }

    #[test]
    fn knative_layout() {
        let mut e = Event::default();
        e.set_id("abc");
        e.set_source("/src");
        e.set_type("bruno.chat.requested.v1");
        e.set_extension("correlationid", ExtensionValue::from("c1"));
        e.set_data("application/json", Data::Binary(b"{}".to_vec()));
        let (props, body) = encode(&e).unwrap();
        assert_eq!(body, b"{}");
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "abc");
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(
            header_str(&props, "type").as_deref(),
            Some("bruno.chat.requested.v1")
        );
        assert_eq!(header_str(&props, "correlationid").as_deref(), Some("c1"));
        assert_eq!(header_str(&props, "specversion").as_deref(), Some("1.0"));
    }

    #[test]
    fn transport_headers_are_not_extensions() {
        let (mut props, body) = encode(&Event::default()).unwrap();
        let mut headers = props.headers().clone().unwrap();
        headers.insert("x-death".into(), AMQPValue::LongString("q".into()));
        headers.insert("x-bruno-attempts".into(), AMQPValue::LongLongInt(2));
        props = props.with_headers(headers);
        let back = decode(&props, &body).unwrap();
        assert_eq!(back.iter_extensions().count(), 0);
        assert_eq!(header_u32(&props, "x-bruno-attempts"), Some(2));
    }

    #[test]
    fn missing_and_bad_attributes_are_errors() {
        let (props, body) = encode(&Event::default()).unwrap();
        let mut headers = props.headers().clone().unwrap();
        headers.insert("specversion".into(), AMQPValue::LongString("0.3".into()));
        let err = decode(&props.clone().with_headers(headers), &body).unwrap_err();
        assert!(matches!(err, CodecError::Invalid { ref name, .. } if name == "specversion"));
        let err = decode(&BasicProperties::default(), b"").unwrap_err();
        assert_eq!(err, CodecError::Missing("specversion"));
        let mut headers = props.headers().clone().unwrap();
        headers.insert(
            "source".into(),
            AMQPValue::LongString(vec![0xff, 0xfe].into()),
        );
        let err = decode(&props.with_headers(headers), &body).unwrap_err();
        assert!(matches!(err, CodecError::Invalid { ref name, .. } if name == "source"));
    }
}
