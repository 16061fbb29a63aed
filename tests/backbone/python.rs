//! Events from the official CloudEvents Python SDK (PyPI `cloudevents`),
//! over HTTP in binary and structured mode, and as AMQP messages written by
//! its RabbitMQ protocol binding.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bruno_events::payload::DocumentSubmitted;
use bruno_events::{AttributesReader, Event, EventData, data_bytes, decode_data, ext_str};
use bruno_ingress::IngressConfig;
use bruno_system_tests::{Harness, Recorder, recv_n};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/send_events.py")
}

/// Run the SDK script; a missing Python or SDK fails the test (`.ci/run` installs them).
async fn python(args: &[&str]) -> Value {
    let out = tokio::process::Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .await
        .expect("python3 must be installed");
    assert!(
        out.status.success(),
        "the Python SDK script failed (pip install cloudevents): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check_event(got: &Event, sent: &Value) {
    assert_eq!(got.id(), sent["id"].as_str().unwrap());
    assert_eq!(got.source(), "/python-sdk");
    assert_eq!(got.ty(), DocumentSubmitted::TYPE);
    assert_eq!(got.subject(), Some("py doc \u{2603} 100%"));
    assert_eq!(ext_str(got, "correlationid"), Some("py-corr"));
    let sent_time = chrono::DateTime::parse_from_rfc3339(sent["time"].as_str().unwrap()).unwrap();
    assert_eq!(got.time().unwrap(), &sent_time.with_timezone(&chrono::Utc));
    let doc: DocumentSubmitted = decode_data(got).unwrap();
    assert_eq!(doc.doc_id, "py-1");
    assert_eq!(doc.text, "h\u{e9}llo \u{2603} from the official SDK");
}

#[tokio::test]
async fn python_sdk_events_are_accepted_and_arrive_intact() {
    let h = Harness::new(vec![crate::doc_part("py")]).await;
    let (addr, stop) = h.ingress(h.broker.clone(), IngressConfig::default()).await;
    let url = format!("http://{addr}/");
    let binary = python(&["http-binary", &url]).await;
    assert_eq!(binary["status"], 202, "{binary}");
    let structured = python(&["http-structured", &url]).await;
    assert_eq!(structured["status"], 202, "{structured}");

    let (recorder, mut rx) = Recorder::new();
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "py",
        2,
        Arc::clone(&recorder),
        shutdown.clone(),
    ));
    let got = recv_n(&mut rx, 2, Duration::from_secs(10)).await;
    let find = |sent: &Value| {
        got.iter()
            .find(|e| e.id() == sent["id"].as_str().unwrap())
            .unwrap()
            .clone()
    };
    let b = find(&binary);
    check_event(&b, &binary);
    // Binary mode: the body the SDK sent is the data, byte for byte.
    assert_eq!(
        data_bytes(&b).unwrap().as_ref(),
        hex::decode(binary["body_hex"].as_str().unwrap())
            .unwrap()
            .as_slice()
    );
    check_event(&find(&structured), &structured);

    shutdown.cancel();
    consumer.await.unwrap();
    stop.cancel();
    h.cleanup().await;
}

#[tokio::test]
async fn messages_from_the_sdk_rabbitmq_binding_decode() {
    for mode in ["rabbitmq-binary", "rabbitmq-structured"] {
        let sent = python(&[mode]).await;
        let mut headers = FieldTable::default();
        for (k, v) in sent["headers"].as_object().unwrap() {
            headers.insert(
                k.as_str().into(),
                AMQPValue::LongString(LongString::from(v.as_str().unwrap())),
            );
        }
        let mut props = BasicProperties::default().with_headers(headers);
        if let Some(ct) = sent["content_type"].as_str() {
            props = props.with_content_type(ct.into());
        }
        let body = hex::decode(sent["body_hex"].as_str().unwrap()).unwrap();
        let event =
            bruno_broker::codec::decode(&props, &body).unwrap_or_else(|e| panic!("{mode}: {e}"));
        check_event(&event, &sent);
    }
}
