//! Permanent failures and exhausted retries land in `<part>.dlq` with error
//! headers; replay puts them back and they are processed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bruno_broker::{dlq, headers};
use bruno_events::{AttributesReader, Event, EventData, payload::DocumentSubmitted};
use bruno_runtime::{Context, Handler, HandlerError, Incoming};
use bruno_system_tests::{BrokerKind, Harness, recv_n};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{doc_event, doc_part};

/// Rejects docs whose id starts with "poison" and fails those starting with
/// "down" while `broken`; records what it processed.
struct Picky {
    broken: AtomicBool,
    done: mpsc::UnboundedSender<Event>,
}

impl Handler for Picky {
    type Input = DocumentSubmitted;
    async fn handle(
        &self,
        input: Incoming<DocumentSubmitted>,
        _ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let broken = self.broken.load(Ordering::SeqCst);
        if broken && input.data.doc_id.starts_with("poison") {
            return Err(HandlerError::invalid_payload("poisoned document"));
        }
        if broken && input.data.doc_id.starts_with("down") {
            return Err(HandlerError::dependency("embedding server down"));
        }
        let _ = self.done.send(input.event);
        Ok(vec![])
    }
}

async fn permanent_and_exhausted_failures_are_dead_lettered_then_replayed(kind: BrokerKind) {
    let h = Harness::on(kind, vec![doc_part("picky")]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = Arc::new(Picky {
        broken: AtomicBool::new(true),
        done: tx,
    });
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "picky",
        4,
        handler.clone(),
        shutdown.clone(),
    ));

    let poison = doc_event("poison-1");
    let down = doc_event("down-1");
    let fine = doc_event("fine-1");
    h.broker
        .publish_all(&[poison.clone(), down.clone(), fine.clone()])
        .await
        .unwrap();
    // A message that is not a CloudEvent at all.
    h.broker
        .publish_raw(
            &h.topology.names.exchange(),
            "",
            lapin::BasicProperties::default().with_headers({
                let mut t = lapin::types::FieldTable::default();
                t.insert(
                    "type".into(),
                    lapin::types::AMQPValue::LongString(DocumentSubmitted::TYPE.into()),
                );
                t
            }),
            b"garbage",
        )
        .await
        .unwrap();

    let got = recv_n(&mut rx, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].id(), fine.id());

    // down-1 fails 3 times (300 ms + 600 ms of delays) then is dead-lettered.
    let dlq_name = h.topology.names.dlq("picky");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while h.depth(&dlq_name).await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead letters did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = dlq::list(&h.broker, "picky", 10).await.unwrap();
    assert_eq!(letters.len(), 3);
    let by_id = |id: &str| {
        letters
            .iter()
            .find(|d| d.id == id)
            .unwrap_or_else(|| panic!("{id} not dead-lettered: {letters:?}"))
    };
    let p = by_id(poison.id());
    assert_eq!(p.code, "invalid_payload");
    assert!(p.reason.contains("poisoned document"), "{}", p.reason);
    assert_eq!(p.attempts, 1);
    assert_eq!(p.headers[headers::PART], "picky");
    assert!(p.failed_at.is_some());
    assert_eq!(p.r#type, DocumentSubmitted::TYPE);
    let d = by_id(down.id());
    assert_eq!(d.code, "dependency");
    assert_eq!(d.attempts, 3);
    assert!(
        d.reason.contains("gave up after 3 attempts"),
        "{}",
        d.reason
    );
    let garbage = letters
        .iter()
        .find(|d| d.code == "invalid_event")
        .expect("garbage dead-lettered");
    assert!(garbage.reason.contains("specversion"), "{}", garbage.reason);
    assert_eq!(garbage.data, "garbage");
    // Listing removes nothing.
    assert_eq!(h.depth(&dlq_name).await, 3);
    let shown = dlq::show(&h.broker, "picky", down.id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shown.code, "dependency");

    // Fix the handler; replay one by id, then the rest by code; the garbage stays.
    handler.broken.store(false, Ordering::SeqCst);
    let one = dlq::replay(
        &h.broker,
        "picky",
        &dlq::Filter {
            id: Some(poison.id().into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((one.replayed, one.kept), (1, 2));
    let got = recv_n(&mut rx, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].id(), poison.id());
    let rest = dlq::replay(
        &h.broker,
        "picky",
        &dlq::Filter {
            code: Some("dependency".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((rest.replayed, rest.kept), (1, 1));
    let got = recv_n(&mut rx, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].id(), down.id());
    assert_eq!(h.depth(&dlq_name).await, 1);
    assert_eq!(dlq::purge(&h.broker, "picky").await.unwrap(), 1);
    assert_eq!(h.depth(&dlq_name).await, 0);

    shutdown.cancel();
    consumer.await.unwrap();
    h.cleanup().await;
}

async fn dlq_tools_refuse_unknown_parts(kind: BrokerKind) {
    let h = Harness::on(kind, vec![doc_part("known")]).await;
    let err = dlq::list(&h.broker, "nope", 10).await.unwrap_err();
    assert!(err.to_string().contains("unknown part"), "{err}");
    h.cleanup().await;
}

bruno_system_tests::on_both!(
    permanent_and_exhausted_failures_are_dead_lettered_then_replayed,
    dlq_tools_refuse_unknown_parts
);
