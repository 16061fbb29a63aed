//! AMQP over TLS: a private RabbitMQ node that only listens for `amqps://`,
//! with a server certificate from a CA made in the test.

use std::sync::Arc;
use std::time::Duration;

use bruno_broker::{Broker, BrokerMetrics, Topology};
use bruno_core::Secret;
use bruno_system_tests::{PrivateBroker, Recorder, recv_n, test_config};
use tokio_util::sync::CancellationToken;

use crate::{doc_event, doc_part};

#[tokio::test]
async fn amqps_works_with_the_configured_ca_and_is_refused_without_it() {
    let (node, ca) = PrivateBroker::start_tls().await;
    let mut config = test_config();
    config.url = Some(Secret::new(node.tls_url()));
    let topology = || Topology::new(&config, vec![doc_part("tls")]);

    // The public web roots do not know the test CA: no session.
    let cancel = CancellationToken::new();
    let untrusting = Broker::start(
        config.clone(),
        topology(),
        "no-ca",
        BrokerMetrics::default(),
        cancel.clone(),
    );
    assert!(
        !untrusting.wait_connected(Duration::from_secs(3)).await,
        "connected over TLS to a certificate nobody vouched for"
    );
    cancel.cancel();

    // With broker.ca_file: declared, published with confirms, consumed.
    config.ca_file = Some(ca);
    let cancel = CancellationToken::new();
    let broker = Broker::start(
        config.clone(),
        Topology::new(&config, vec![doc_part("tls")]),
        "ca",
        BrokerMetrics::default(),
        cancel.clone(),
    );
    assert!(
        broker.wait_connected(Duration::from_secs(15)).await,
        "no TLS session with the CA configured"
    );
    let (recorder, mut rx) = Recorder::new();
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(bruno_runtime::run_pull(
        broker.clone(),
        "tls",
        4,
        Arc::clone(&recorder),
        stop.clone(),
    ));
    let event = doc_event("over-tls");
    broker.publish(&event).await.unwrap();
    let got = recv_n(&mut rx, 1, Duration::from_secs(10)).await;
    assert_eq!(
        bruno_events::AttributesReader::id(&got[0]),
        bruno_events::AttributesReader::id(&event)
    );
    stop.cancel();
    consumer.await.unwrap();
    cancel.cancel();
    drop(node); // stops the node
}
