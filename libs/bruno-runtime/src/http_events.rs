//! CloudEvents over HTTP: binary, structured and batch mode, with errors
//! that name the attribute at fault.

use std::borrow::Cow;

use bruno_events::{AttributesWriter, Event};
use http::{HeaderMap, StatusCode, header};
use serde_json::{Map, Value};

use crate::Problem;

/// Content type of a structured-mode event.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// Content type of a batch.
pub const BATCH: &str = "application/cloudevents-batch+json";

/// How the events arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `ce-*` headers and the data as body.
    Binary,
    /// One JSON envelope.
    Structured,
    /// A JSON array of envelopes.
    Batch,
}

/// The media type of the request (no parameters), lower-cased; borrowed
/// from the header when it is lower-case already, as it nearly always is.
fn content_type(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let essence = v.split(';').next().unwrap_or_default().trim();
            if essence.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(essence.to_ascii_lowercase())
            } else {
                Cow::Borrowed(essence)
            }
        })
}

/// Parse a request into events. Nothing is half-accepted: any invalid batch
/// member fails the whole request.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<(Mode, Vec<Event>), Problem> {
    let ct = content_type(headers);
    match ct.as_deref() {
        Some(BATCH) => {
            let value: Value = serde_json::from_slice(body)
                .map_err(|e| Problem::invalid("body", format!("not JSON: {e}")))?;
            let Value::Array(members) = value else {
                return Err(Problem::invalid("body", "a batch must be a JSON array"));
            };
            if members.is_empty() {
                return Err(Problem::invalid("body", "a batch must not be empty"));
            }
            let events = members
                .into_iter()
                .enumerate()
                .map(|(i, m)| {
                    structured(m).map_err(|mut p| {
                        let field = p.field.take().unwrap_or_default();
                        p.detail = format!("batch member {i}: {}", p.detail);
                        p.field = Some(format!("[{i}].{field}"));
                        p
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((Mode::Batch, events))
        }
        Some(STRUCTURED) => {
            let value: Value = serde_json::from_slice(body)
                .map_err(|e| Problem::invalid("body", format!("not JSON: {e}")))?;
            Ok((Mode::Structured, vec![structured(value)?]))
        }
        Some(other) if other.starts_with("application/cloudevents") => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!("unsupported event format {other:?}; use {STRUCTURED} or {BATCH}"),
        )),
        _ if headers.contains_key("ce-specversion") => {
            Ok((Mode::Binary, vec![binary(headers, body)?]))
        }
        Some("application/json") | None => Err(Problem::invalid(
            "specversion",
            "is required (binary mode needs the ce-specversion header; structured mode needs content type application/cloudevents+json)",
        )),
        Some(other) => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!("content type {other:?} without ce-* headers is not a CloudEvent"),
        )),
    }
}

fn required_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, Problem> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(Problem::invalid(name, "is required")),
        Some(Value::String(s)) if s.is_empty() => Err(Problem::invalid(name, "must not be empty")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Problem::invalid(name, "must be a string")),
    }
}

fn check_specversion(v: &str) -> Result<(), Problem> {
    if v == bruno_events::SPEC_VERSION {
        Ok(())
    } else {
        Err(Problem::invalid(
            "specversion",
            format!("must be 1.0, got {v:?}"),
        ))
    }
}

fn structured(value: Value) -> Result<Event, Problem> {
    let Value::Object(obj) = &value else {
        return Err(Problem::invalid(
            "body",
            "a structured event must be a JSON object",
        ));
    };
    check_specversion(required_str(obj, "specversion")?)?;
    for name in ["id", "source", "type"] {
        required_str(obj, name)?;
    }
    serde_json::from_value::<Event>(value).map_err(|e| Problem::invalid("body", e.to_string()))
}

/// Binary mode, decoded here rather than by the SDK so that header values
/// are percent-decoded (HTTP binding §3.1.3.2) and errors name the attribute.
fn binary(headers: &HeaderMap, body: &[u8]) -> Result<Event, Problem> {
    let get = |name: &str| -> Result<Option<String>, Problem> {
        let attr = &name["ce-".len()..];
        headers
            .get(name)
            .map(|v| decode_header(attr, v.as_bytes()))
            .transpose()
    };
    let required = |name: &str| -> Result<String, Problem> {
        let attr = &name["ce-".len()..];
        match get(name)? {
            None => Err(Problem::invalid(
                attr,
                format!("is required (header {name})"),
            )),
            Some(v) if v.is_empty() => Err(Problem::invalid(attr, "must not be empty")),
            Some(v) => Ok(v),
        }
    };
    check_specversion(&required("ce-specversion")?)?;
    let mut event = bruno_events::blank_event();
    event.set_id(required("ce-id")?);
    event.set_source(required("ce-source")?);
    event.set_type(required("ce-type")?);
    let time = get("ce-time")?
        .map(|t| chrono::DateTime::parse_from_rfc3339(&t).map(|t| t.with_timezone(&chrono::Utc)))
        .transpose()
        .map_err(|e| Problem::invalid("time", format!("not RFC 3339: {e}")))?;
    event.set_time(time);
    event.set_subject(get("ce-subject")?);
    let schema = get("ce-dataschema")?
        .map(|s| bruno_events::Url::parse(&s))
        .transpose()
        .map_err(|e| Problem::invalid("dataschema", format!("not a URI: {e}")))?;
    event.set_dataschema(schema);
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if matches!(
            attr,
            "specversion" | "id" | "source" | "type" | "time" | "subject" | "dataschema"
        ) {
            continue;
        }
        let value = decode_header(attr, value.as_bytes())?;
        event.set_extension(attr, bruno_events::ExtensionValue::String(value));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| Problem::invalid("datacontenttype", "is not valid ASCII"))?;
    if body.is_empty() {
        event.set_datacontenttype(content_type);
    } else if let Some(ct) = content_type {
        event.set_data(ct, bruno_events::Data::Binary(body.to_vec()));
    } else {
        event.set_data_unchecked(bruno_events::Data::Binary(body.to_vec()));
    }
    Ok(event)
}

fn decode_header(attr: &str, raw: &[u8]) -> Result<String, Problem> {
    percent_encoding::percent_decode(raw)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| Problem::invalid(attr, "is not UTF-8 after percent-decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bruno_events::AttributesReader;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn binary_mode() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("ce-correlationid", "c"),
            ("content-type", "application/json"),
        ]);
        let (mode, events) = parse(&h, b"{\"a\":1}").unwrap();
        assert_eq!(mode, Mode::Binary);
        assert_eq!(events[0].id(), "1");
        assert_eq!(
            bruno_events::ext_str(&events[0], "correlationid"),
            Some("c")
        );
        assert_eq!(
            bruno_events::data_bytes(&events[0]).unwrap().as_ref(),
            b"{\"a\":1}"
        );
    }

    #[test]
    fn binary_header_values_are_percent_decoded() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("ce-subject", "a%20b%E2%98%83%25"),
            ("ce-time", "2026-11-25T10:00:00Z"),
        ]);
        let (_, events) = parse(&h, b"").unwrap();
        use bruno_events::AttributesReader;
        assert_eq!(events[0].subject(), Some("a b\u{2603}%"));
        assert!(events[0].data().is_none());
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
            ("ce-time", "yesterday"),
        ]);
        assert_eq!(parse(&h, b"").unwrap_err().field.as_deref(), Some("time"));
    }

    #[test]
    fn missing_attributes_are_named() {
        let h = headers(&[("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")]);
        assert_eq!(parse(&h, b"").unwrap_err().field.as_deref(), Some("source"));
        let h = headers(&[
            ("ce-specversion", "0.3"),
            ("ce-id", "1"),
            ("ce-source", "s"),
            ("ce-type", "t"),
        ]);
        assert_eq!(
            parse(&h, b"").unwrap_err().field.as_deref(),
            Some("specversion")
        );
        let h = headers(&[("content-type", STRUCTURED)]);
        let p = parse(&h, br#"{"specversion":"1.0","source":"s","type":"t"}"#).unwrap_err();
        assert_eq!(p.field.as_deref(), Some("id"));
        let h = headers(&[("content-type", BATCH)]);
        let p = parse(&h, br#"[{"specversion":"1.0","id":"1","source":"s","type":"t"},{"specversion":"1.0","id":"2","source":"s"}]"#).unwrap_err();
        assert_eq!(p.field.as_deref(), Some("[1].type"));
    }

    #[test]
    fn unknown_content_types_are_415() {
        let h = headers(&[("content-type", "text/xml")]);
        assert_eq!(parse(&h, b"<x/>").unwrap_err().status, 415);
        let h = headers(&[("content-type", "application/cloudevents+xml")]);
        assert_eq!(parse(&h, b"<x/>").unwrap_err().status, 415);
        let h = headers(&[("content-type", "application/json")]);
        assert_eq!(parse(&h, b"{}").unwrap_err().status, 400);
    }
}
