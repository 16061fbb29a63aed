//! Malformed input gets the documented 4xx with a problem+json body and
//! publishes nothing.

use std::time::Duration;

use bruno_events::EventData;
use bruno_events::payload::DocumentSubmitted;
use bruno_ingress::{IngressConfig, hash_key};
use bruno_system_tests::Harness;
use serde_json::{Value, json};

use crate::doc_part;

const TY: &str = DocumentSubmitted::TYPE;

fn good() -> Value {
    json!({"specversion": "1.0", "id": "m-1", "source": "/t", "type": TY,
           "datacontenttype": "application/json", "data": {"doc_id": "d", "source": "s", "text": "t"}})
}

fn without(field: &str) -> Value {
    let mut v = good();
    v.as_object_mut().unwrap().remove(field);
    v
}

fn with(field: &str, value: Value) -> Value {
    let mut v = good();
    v[field] = value;
    v
}

struct Case {
    name: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    field: Option<&'static str>,
}

fn structured(name: &'static str, body: Value, status: u16, field: Option<&'static str>) -> Case {
    Case {
        name,
        headers: vec![("content-type", "application/cloudevents+json".into())],
        body: body.to_string().into_bytes(),
        status,
        field,
    }
}

fn binary(name: &'static str, drop: Option<&str>, specversion: &str, field: &'static str) -> Case {
    let mut headers = vec![
        ("ce-specversion", specversion.to_owned()),
        ("ce-id", "b-1".to_owned()),
        ("ce-source", "/t".to_owned()),
        ("ce-type", TY.to_owned()),
        ("content-type", "application/json".to_owned()),
    ];
    headers.retain(|(k, _)| Some(*k) != drop);
    Case {
        name,
        headers,
        body: br#"{"doc_id":"d","source":"s","text":"t"}"#.to_vec(),
        status: 400,
        field: Some(field),
    }
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_publish_nothing() {
    let h = Harness::new(vec![doc_part("guarded")]).await;
    let config = IngressConfig {
        max_body_bytes: 64 * 1024,
        max_data_bytes: 16 * 1024,
        ..IngressConfig::default()
    };
    let (addr, stop) = h.ingress(h.broker.clone(), config).await;
    let url = format!("http://{addr}/");

    let big_text = "x".repeat(32 * 1024);
    let cases = vec![
        structured("bad json", Value::Null, 400, Some("body"))
            .with_body(b"{\"specversion\": \"1.0\", ".to_vec()),
        structured("missing id", without("id"), 400, Some("id")),
        structured("missing source", without("source"), 400, Some("source")),
        structured("missing type", without("type"), 400, Some("type")),
        structured(
            "missing specversion",
            without("specversion"),
            400,
            Some("specversion"),
        ),
        structured(
            "wrong specversion",
            with("specversion", json!("0.3")),
            400,
            Some("specversion"),
        ),
        structured("empty id", with("id", json!("")), 400, Some("id")),
        structured(
            "unknown type",
            with("type", json!("bruno.nope.v1")),
            400,
            Some("type"),
        ),
        structured(
            "payload missing field",
            with("data", json!({"doc_id": "d", "source": "s"})),
            400,
            Some("data"),
        ),
        structured(
            "payload wrong type",
            with("data", json!({"doc_id": 7, "source": "s", "text": "t"})),
            400,
            Some("data.doc_id"),
        ),
        structured(
            "data too large",
            with(
                "data",
                json!({"doc_id": "d", "source": "s", "text": big_text}),
            ),
            400,
            Some("data"),
        ),
        structured("not an object", json!([1, 2]), 400, Some("body")),
        binary("binary missing id", Some("ce-id"), "1.0", "id"),
        binary("binary missing source", Some("ce-source"), "1.0", "source"),
        binary("binary missing type", Some("ce-type"), "1.0", "type"),
        binary("binary wrong specversion", None, "0.3", "specversion"),
        Case {
            name: "plain json without ce headers",
            headers: vec![("content-type", "application/json".into())],
            body: b"{}".to_vec(),
            status: 400,
            field: Some("specversion"),
        },
        Case {
            name: "bad batch member",
            headers: vec![("content-type", "application/cloudevents-batch+json".into())],
            body: json!([good(), with("id", json!("m-2")), without("source")])
                .to_string()
                .into_bytes(),
            status: 400,
            field: Some("[2].source"),
        },
        Case {
            name: "batch member with invalid payload",
            headers: vec![("content-type", "application/cloudevents-batch+json".into())],
            body: json!([good(), with("data", json!({"doc_id": "d"}))])
                .to_string()
                .into_bytes(),
            status: 400,
            field: Some("[1].data"),
        },
        Case {
            name: "unknown content type",
            headers: vec![("content-type", "text/xml".into())],
            body: b"<event/>".to_vec(),
            status: 415,
            field: None,
        },
        Case {
            name: "unsupported event format",
            headers: vec![("content-type", "application/cloudevents+avro".into())],
            body: b"x".to_vec(),
            status: 415,
            field: None,
        },
        structured(
            "oversized body",
            with(
                "data",
                json!({"doc_id": "d", "source": "s", "text": "y".repeat(100 * 1024)}),
            ),
            413,
            None,
        ),
    ];

    let client = reqwest::Client::new();
    for case in &cases {
        let mut req = client.post(&url).body(case.body.clone());
        for (k, v) in &case.headers {
            req = req.header(*k, v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(
            r.status().as_u16(),
            case.status,
            "{}: {:?}",
            case.name,
            r.text().await
        );
        assert_eq!(
            r.headers().get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/problem+json"),
            "{}",
            case.name
        );
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], case.status, "{}", case.name);
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{}",
            case.name
        );
        if let Some(field) = case.field {
            assert_eq!(problem["field"], field, "{}: {problem}", case.name);
        }
    }

    // An oversized body sent chunked (no Content-Length) is cut off at the
    // limit too, with a problem that names the setting.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..100).map(|_| Ok(vec![b'z'; 1024])).collect();
    let r = client
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("ingress.max_body_bytes")),
        "{problem}"
    );

    // Nothing at all reached a queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.depth(&h.queue("guarded")).await, 0);
    assert_eq!(h.depth(&h.topology.names.unroutable()).await, 0);

    // A good event still goes through, so the zero above means something.
    let r = client
        .post(&url)
        .header("content-type", "application/cloudevents+json")
        .body(good().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        h.drain(&h.queue("guarded"), Duration::from_millis(300))
            .await
            .len(),
        1
    );
    stop.cancel();
    h.cleanup().await;
}

trait WithBody {
    fn with_body(self, body: Vec<u8>) -> Self;
}

impl WithBody for Case {
    fn with_body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    let h = Harness::new(vec![doc_part("locked")]).await;
    let config = IngressConfig {
        api_key_hashes: vec![hash_key("s3cret-key")],
        ..IngressConfig::default()
    };
    let (addr, stop) = h.ingress(h.broker.clone(), config).await;
    let url = format!("http://{addr}/");
    let client = reqwest::Client::new();
    let send = |key: Option<&'static str>| {
        let mut req = client
            .post(&url)
            .header("content-type", "application/cloudevents+json")
            .body(good().to_string());
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        req.send()
    };
    let r = send(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(send(Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(h.depth(&h.queue("locked")).await, 0);
    assert_eq!(send(Some("s3cret-key")).await.unwrap().status(), 202);
    let r = client
        .post(&url)
        .header("x-api-key", "s3cret-key")
        .header("content-type", "application/cloudevents+json")
        .body(with("id", json!("m-9")).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        h.drain(&h.queue("locked"), Duration::from_millis(300))
            .await
            .len(),
        2
    );
    stop.cancel();
    h.cleanup().await;
}
