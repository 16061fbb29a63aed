//! CloudEvents over HTTP: binary, structured and batch mode, with errors
//! that name the attribute at fault.

use bruno_events::Event;
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

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
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
        _ if headers.contains_key("ce-specversion") => Ok((Mode::Binary, vec![binary(headers, body)?])),
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
        Err(Problem::invalid("specversion", format!("must be 1.0, got {v:?}")))
    }
}

fn structured(value: Value) -> Result<Event, Problem> {
    let Value::Object(obj) = &value else {
        return Err(Problem::invalid("body", "a structured event must be a JSON object"));
    };
    check_specversion(required_str(obj, "specversion")?)?;
    for name in ["id", "source", "type"] {
        required_str(obj, name)?;
    }
    serde_json::from_value::<Event>(value).map_err(|e| Problem::invalid("body", e.to_string()))
}

fn binary(headers: &HeaderMap, body: &[u8]) -> Result<Event, Problem> {
    let get = |name: &str| -> Result<&str, Problem> {
        let attr = &name["ce-".len()..];
        match headers.get(name) {
            None => Err(Problem::invalid(attr, format!("is required (header {name})"))),
            Some(v) => match v.to_str() {
                Ok("") => Err(Problem::invalid(attr, "must not be empty")),
                Ok(s) => Ok(s),
                Err(_) => Err(Problem::invalid(attr, "is not valid ASCII")),
            },
        }
    };
    check_specversion(get("ce-specversion")?)?;
    for name in ["ce-id", "ce-source", "ce-type"] {
        get(name)?;
    }
    cloudevents::binding::http::to_event(headers, body.to_vec())
        .map_err(|e| Problem::invalid("headers", e.to_string()))
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
        assert_eq!(bruno_events::ext_str(&events[0], "correlationid"), Some("c"));
        assert_eq!(bruno_events::data_bytes(&events[0]).unwrap().as_ref(), b"{\"a\":1}");
    }

    #[test]
    fn missing_attributes_are_named() {
        let h = headers(&[("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")]);
        assert_eq!(parse(&h, b"").unwrap_err().field.as_deref(), Some("source"));
        let h = headers(&[("ce-specversion", "0.3"), ("ce-id", "1"), ("ce-source", "s"), ("ce-type", "t")]);
        assert_eq!(parse(&h, b"").unwrap_err().field.as_deref(), Some("specversion"));
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
