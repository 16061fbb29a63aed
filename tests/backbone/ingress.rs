//! Events POSTed in every mode reach the consumer bound on their type, intact.

use std::sync::Arc;
use std::time::Duration;

use bruno_events::payload::DocumentSubmitted;
use bruno_events::{AttributesReader, EventData, data_bytes, ext_str};
use bruno_ingress::IngressConfig;
use bruno_system_tests::{Harness, Recorder, recv_n};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::doc_part;

#[tokio::test]
async fn every_mode_arrives_with_attributes_and_data_intact() {
    let h = Harness::new(vec![doc_part("sink")]).await;
    let (addr, stop) = h.ingress(h.broker.clone(), IngressConfig::default()).await;
    let url = format!("http://{addr}/");
    let client = reqwest::Client::new();

    // Binary mode: attributes in ce- headers, data as the body, byte for byte.
    let body = br#"{"doc_id":"b1","source":"s","text":"caf\u00e9 \u2603 r\u00e9sum\u00e9",  "metadata":{"k":"v"}}"#;
    let r = client
        .post(&url)
        .header("ce-specversion", "1.0")
        .header("ce-id", "bin-1")
        .header("ce-source", "/tests/binary")
        .header("ce-type", DocumentSubmitted::TYPE)
        .header("ce-time", "2026-11-25T10:00:00.123456Z")
        .header("ce-subject", "doc/b1")
        .header("ce-correlationid", "corr-1")
        .header(
            "ce-traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("ce-tracestate", "vendor=x")
        .header("ce-custom", "yes")
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());

    // Structured mode.
    let data = json!({"doc_id": "s1", "source": "s", "text": "Grüße, 世界", "format": "markdown"});
    let r = client
        .post(&url)
        .header(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )
        .body(
            json!({
                "specversion": "1.0", "id": "str-1", "source": "/tests/structured",
                "type": DocumentSubmitted::TYPE, "datacontenttype": "application/json",
                "replyto": "gw-7", "data": data
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());

    // Batch mode.
    let member = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "/tests/batch", "type": DocumentSubmitted::TYPE,
               "datacontenttype": "application/json", "data": {"doc_id": id, "source": "s", "text": "t"}})
    };
    let r = client
        .post(&url)
        .header("content-type", "application/cloudevents-batch+json")
        .body(json!([member("bat-1"), member("bat-2")]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let accepted: serde_json::Value = r.json().await.unwrap();
    assert_eq!(accepted["accepted"], 2);

    let (recorder, mut rx) = Recorder::new();
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "sink",
        4,
        Arc::clone(&recorder),
        shutdown.clone(),
    ));
    let mut got = recv_n(&mut rx, 4, Duration::from_secs(10)).await;
    got.sort_by(|a, b| a.id().cmp(b.id()));
    let ids: Vec<&str> = got.iter().map(|e| e.id()).collect();
    assert_eq!(ids, ["bat-1", "bat-2", "bin-1", "str-1"]);

    let bin = &got[2];
    assert_eq!(bin.source(), "/tests/binary");
    assert_eq!(bin.ty(), DocumentSubmitted::TYPE);
    assert_eq!(bin.subject(), Some("doc/b1"));
    assert_eq!(
        bin.time().unwrap().to_rfc3339(),
        "2026-11-25T10:00:00.123456+00:00"
    );
    assert_eq!(bin.datacontenttype(), Some("application/json"));
    assert_eq!(ext_str(bin, "correlationid"), Some("corr-1"));
    assert_eq!(
        ext_str(bin, "traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(ext_str(bin, "tracestate"), Some("vendor=x"));
    assert_eq!(ext_str(bin, "custom"), Some("yes"));
    assert_eq!(
        data_bytes(bin).unwrap().as_ref(),
        body.as_slice(),
        "binary data must be byte-identical"
    );

    let st = &got[3];
    assert_eq!(st.source(), "/tests/structured");
    assert_eq!(ext_str(st, "replyto"), Some("gw-7"));
    let decoded: serde_json::Value = serde_json::from_slice(&data_bytes(st).unwrap()).unwrap();
    assert_eq!(decoded, data);
    // Key order survives too (serde_json preserve_order), so the bytes are the compact form of what was sent.
    assert_eq!(
        data_bytes(st).unwrap().as_ref(),
        serde_json::to_vec(&data).unwrap().as_slice()
    );

    shutdown.cancel();
    consumer.await.unwrap();
    stop.cancel();
    h.cleanup().await;
}

#[tokio::test]
async fn an_event_no_binding_matches_is_kept_in_the_unroutable_queue() {
    let h = Harness::new(vec![doc_part("sink")]).await;
    let (addr, stop) = h.ingress(h.broker.clone(), IngressConfig::default()).await;
    let event = bruno_events::new_event(
        "tests",
        &bruno_events::payload::BackupFailed {
            reason: "disk".into(),
            message: "full".into(),
        },
    );
    let body = serde_json::to_vec(&event).unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/"))
        .header("content-type", "application/cloudevents+json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let kept = h
        .drain(&h.topology.names.unroutable(), Duration::from_millis(500))
        .await;
    assert_eq!(kept.len(), 1);
    let back = bruno_broker::codec::decode(&kept[0].properties, &kept[0].data).unwrap();
    assert_eq!(back.id(), event.id());
    assert_eq!(back.ty(), bruno_events::payload::BackupFailed::TYPE);
    assert_eq!(h.depth(&h.queue("sink")).await, 0);
    stop.cancel();
    h.cleanup().await;
}

#[tokio::test]
async fn notifications_nobody_observes_go_to_the_observed_queue_and_both_queues_are_bounded() {
    let config = bruno_broker::BrokerConfig {
        unroutable_max_length: 3,
        observed_max_length: 2,
        ..bruno_system_tests::test_config()
    };
    let topology = bruno_broker::Topology::new(&config, vec![doc_part("sink")])
        .with_observed([bruno_events::payload::BackupCompleted::TYPE]);
    let h = Harness::with_topology(config, topology).await;
    let completed = |i: u64| {
        bruno_events::new_event(
            "tests",
            &bruno_events::payload::BackupCompleted {
                backup_id: format!("b{i}"),
                target: "t".into(),
                tables: Vec::new(),
                manifest_sha256: String::new(),
                duplicate: false,
            },
        )
    };
    let failed = |i: u64| {
        bruno_events::new_event(
            "tests",
            &bruno_events::payload::BackupFailed {
                reason: format!("r{i}"),
                message: "full".into(),
            },
        )
    };
    // Publishing succeeds either way (the publishes are mandatory: a
    // message routed nowhere would fail). One at a time, so the queues see
    // them in this order.
    let events: Vec<_> = (0..5).map(completed).chain((0..5).map(failed)).collect();
    for e in &events {
        h.broker.publish(e).await.unwrap();
    }
    let names = &h.topology.names;
    // The oldest went first: the newest two notifications, the newest
    // three unroutable events are kept.
    let ids = |deliveries: Vec<lapin::message::Delivery>| -> Vec<String> {
        deliveries
            .iter()
            .map(|d| {
                let e = bruno_broker::codec::decode(&d.properties, &d.data).unwrap();
                e.id().to_owned()
            })
            .collect()
    };
    let settle = Duration::from_millis(500);
    let observed = ids(h.drain(&names.observed(), settle).await);
    assert_eq!(observed, [events[3].id(), events[4].id()]);
    let unroutable = ids(h.drain(&names.unroutable(), settle).await);
    assert_eq!(unroutable, [events[7].id(), events[8].id(), events[9].id()]);
    h.cleanup().await;
}
