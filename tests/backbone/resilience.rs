//! The broker connection is cut while the ingress is under load: it answers
//! 503 meanwhile, reconnects by itself, and every 202 it gave is in the queue.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bruno_events::AttributesReader;
use bruno_ingress::IngressConfig;
use bruno_system_tests::{Harness, Proxy, amqp_addr};
use tokio::sync::Mutex;

use crate::doc_event;

#[tokio::test]
async fn ingress_answers_503_during_a_broker_cut_and_loses_no_accepted_event() {
    let h = Harness::new(vec![crate::doc_part("loaded")]).await;
    let proxy = Proxy::start(amqp_addr()).await;
    let (broker, broker_cancel) = h.second_broker(Some(&proxy.host())).await;
    let (addr, stop) = h.ingress(broker.clone(), IngressConfig::default()).await;
    let url = format!("http://{addr}/");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let running = Arc::new(AtomicBool::new(true));
    let results = Arc::new(Mutex::new(Vec::<(String, u16, bool)>::new()));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, url, running, results) = (
            client.clone(),
            url.clone(),
            running.clone(),
            results.clone(),
        );
        workers.push(tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                let event = doc_event("load");
                let r = client
                    .post(&url)
                    .header("content-type", "application/cloudevents+json")
                    .body(serde_json::to_vec(&event).unwrap())
                    .send()
                    .await
                    .expect("the ingress must answer, not drop the request");
                let retry_after = r.headers().contains_key("retry-after");
                results.lock().await.push((
                    event.id().to_owned(),
                    r.status().as_u16(),
                    retry_after,
                ));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        client
            .get(format!("{url}ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    proxy.cut(Duration::from_millis(1500));
    // The serving port's readiness (what Knative probes) follows the broker.
    let cut_at = tokio::time::Instant::now();
    while client
        .get(format!("{url}ready"))
        .send()
        .await
        .unwrap()
        .status()
        != 503
    {
        assert!(
            cut_at.elapsed() < Duration::from_secs(5),
            "/ready stayed 200 during the cut"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        client
            .get(format!("{url}live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(cut_at.elapsed())).await;
    running.store(false, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    assert!(
        broker.wait_connected(Duration::from_secs(10)).await,
        "ingress did not reconnect by itself"
    );

    // After the reconnect the ingress accepts again.
    let mut after = Vec::new();
    for _ in 0..5 {
        let event = doc_event("after");
        let r = client
            .post(&url)
            .header("content-type", "application/cloudevents+json")
            .body(serde_json::to_vec(&event).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        after.push(event.id().to_owned());
    }

    let results = results.lock().await;
    let accepted: HashSet<&str> = results
        .iter()
        .filter(|r| r.1 == 202)
        .map(|r| r.0.as_str())
        .collect();
    let unavailable = results.iter().filter(|r| r.1 == 503).count();
    let other: Vec<_> = results
        .iter()
        .filter(|r| r.1 != 202 && r.1 != 503)
        .collect();
    eprintln!(
        "under load: {} accepted, {unavailable} answered 503, {} other",
        accepted.len(),
        other.len()
    );
    assert!(other.is_empty(), "unexpected statuses: {other:?}");
    assert!(
        unavailable > 0,
        "the cut produced no 503: it did not happen"
    );
    assert!(
        results.iter().filter(|r| r.1 == 503).all(|r| r.2),
        "503 without Retry-After"
    );
    assert!(!accepted.is_empty());

    let queued = h.drain(&h.queue("loaded"), Duration::from_secs(1)).await;
    let ids: HashSet<String> = queued
        .iter()
        .map(|d| {
            bruno_broker::codec::decode(&d.properties, &d.data)
                .unwrap()
                .id()
                .to_owned()
        })
        .collect();
    let missing: Vec<_> = accepted.iter().filter(|id| !ids.contains(**id)).collect();
    assert!(
        missing.is_empty(),
        "{} accepted events are not in the queue: {missing:?}",
        missing.len()
    );
    assert!(after.iter().all(|id| ids.contains(id)));
    eprintln!(
        "queue holds {} events for {} accepted (+5 after)",
        ids.len(),
        accepted.len()
    );

    stop.cancel();
    broker_cancel.cancel();
    h.cleanup().await;
}
