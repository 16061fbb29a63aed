//! The consumer runtime: delayed retries that block nobody, redelivery after
//! a crash, graceful shutdown, reconnect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bruno_events::{AttributesReader, Event};
use bruno_runtime::{Context, Handler, HandlerError, Incoming, Raw};
use bruno_system_tests::{Attempts, BrokerKind, Harness, Proxy, Recorder, amqp_addr, recv_n};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{doc_event, doc_part};

/// Fails the first `failures` attempts of events whose id starts with "flaky".
struct Flaky {
    failures: u32,
    attempts: Attempts,
    tx: mpsc::UnboundedSender<(String, u32, Instant)>,
}

impl Handler for Flaky {
    type Input = Raw;
    async fn handle(
        &self,
        input: Incoming<Raw>,
        _ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let id = input.event.id().to_owned();
        let n = self.attempts.bump(&id);
        let _ = self.tx.send((id.clone(), n, Instant::now()));
        if id.starts_with("flaky") && n <= self.failures {
            return Err(HandlerError::dependency(format!("attempt {n} fails")));
        }
        Ok(vec![])
    }
}

async fn a_handler_failing_twice_is_retried_after_the_delays_without_blocking_others(
    kind: BrokerKind,
) {
    let h = Harness::on(kind, vec![doc_part("flaky")]).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = Arc::new(Flaky {
        failures: 2,
        attempts: Attempts::default(),
        tx,
    });
    let shutdown = CancellationToken::new();
    // Prefetch 1: a worker that slept on the failing message would stall the healthy one.
    let consumer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "flaky",
        1,
        handler.clone(),
        shutdown.clone(),
    ));

    let mut flaky = doc_event("x");
    bruno_events::AttributesWriter::set_id(&mut flaky, "flaky-1");
    let healthy = doc_event("y");
    h.broker.publish(&flaky).await.unwrap();
    h.broker.publish(&healthy).await.unwrap();

    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(id, n, _): &(String, u32, Instant)| id == "flaky-1" && *n == 3)
    {
        let item = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("flaky event never succeeded")
            .unwrap();
        seen.push(item);
    }
    let flaky_times: Vec<Instant> = seen
        .iter()
        .filter(|(id, _, _)| id == "flaky-1")
        .map(|(_, _, t)| *t)
        .collect();
    let healthy_at = seen
        .iter()
        .find(|(id, _, _)| id == healthy.id())
        .map(|(_, _, t)| *t)
        .expect("healthy event handled");
    assert_eq!(flaky_times.len(), 3, "{seen:?}");
    // The healthy message did not wait behind the failing one's retries.
    assert!(
        healthy_at < flaky_times[1],
        "healthy event was blocked by the retry"
    );
    // Each retry waited at least its delay tier (300 ms, then 600 ms).
    assert!(
        flaky_times[1] - flaky_times[0] >= Duration::from_millis(300),
        "{:?}",
        flaky_times[1] - flaky_times[0]
    );
    assert!(
        flaky_times[2] - flaky_times[1] >= Duration::from_millis(600),
        "{:?}",
        flaky_times[2] - flaky_times[1]
    );
    assert_eq!(handler.attempts.get(healthy.id()), 1);

    shutdown.cancel();
    consumer.await.unwrap();
    assert_eq!(h.depth(&h.topology.names.dlq("flaky")).await, 0);
    assert_eq!(h.depth(&h.queue("flaky")).await, 0);
    h.cleanup().await;
}

/// Signals when it starts an event, then never finishes the first one.
struct Hang {
    started: mpsc::UnboundedSender<String>,
}

impl Handler for Hang {
    type Input = Raw;
    async fn handle(
        &self,
        input: Incoming<Raw>,
        _ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let _ = self.started.send(input.event.id().to_owned());
        std::future::pending::<()>().await;
        Ok(vec![])
    }
}

#[tokio::test]
async fn a_consumer_killed_mid_message_loses_nothing() {
    let h = Harness::new(vec![doc_part("crashy")]).await;
    let proxy = Proxy::start(amqp_addr()).await;
    let (doomed_broker, doomed_cancel) = h.second_broker(Some(&proxy.host())).await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let doomed = tokio::spawn(bruno_runtime::run_pull(
        doomed_broker,
        "crashy",
        1,
        Arc::new(Hang {
            started: started_tx,
        }),
        CancellationToken::new(),
    ));
    let event = doc_event("crash");
    h.broker.publish(&event).await.unwrap();
    let id = tokio::time::timeout(Duration::from_secs(10), started.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, event.id());

    // Kill the worker: its task dies and its TCP connection drops without an ack.
    doomed.abort();
    proxy.cut(Duration::from_secs(60));
    doomed_cancel.cancel();

    let (recorder, mut rx) = Recorder::new();
    let shutdown = CancellationToken::new();
    let survivor = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "crashy",
        1,
        recorder,
        shutdown.clone(),
    ));
    let got = recv_n(&mut rx, 1, Duration::from_secs(15)).await;
    assert_eq!(got[0].id(), event.id());
    assert_eq!(got[0], {
        // The redelivered event is the event that was published.
        let (p, b) = bruno_broker::codec::encode(&event).unwrap();
        bruno_broker::codec::decode(&p, &b).unwrap()
    });
    shutdown.cancel();
    survivor.await.unwrap();
    assert_eq!(h.depth(&h.queue("crashy")).await, 0);
    h.cleanup().await;
}

/// Takes a while per event.
struct Slow {
    done: mpsc::UnboundedSender<String>,
}

impl Handler for Slow {
    type Input = Raw;
    async fn handle(
        &self,
        input: Incoming<Raw>,
        _ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let _ = self.done.send(input.event.id().to_owned());
        Ok(vec![])
    }
}

async fn shutdown_finishes_in_flight_messages_and_acks_them(kind: BrokerKind) {
    let h = Harness::on(kind, vec![doc_part("slow")]).await;
    for i in 0..3 {
        h.broker
            .publish(&doc_event(&format!("s{i}")))
            .await
            .unwrap();
    }
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "slow",
        3,
        Arc::new(Slow { done: done_tx }),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("consumer did not stop")
        .unwrap();
    let mut finished = Vec::new();
    while let Ok(id) = done.try_recv() {
        finished.push(id);
    }
    assert_eq!(
        finished.len(),
        3,
        "in-flight messages were abandoned: {finished:?}"
    );
    // Everything was acked before the channel closed: nothing comes back.
    assert_eq!(h.depth(&h.queue("slow")).await, 0);
    h.cleanup().await;
}

#[tokio::test]
async fn a_consumer_reconnects_after_the_connection_is_cut() {
    let h = Harness::new(vec![doc_part("recon")]).await;
    let proxy = Proxy::start(amqp_addr()).await;
    let (broker, broker_cancel) = h.second_broker(Some(&proxy.host())).await;
    let (recorder, mut rx) = Recorder::new();
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(bruno_runtime::run_pull(
        broker.clone(),
        "recon",
        2,
        recorder,
        shutdown.clone(),
    ));
    h.broker.publish(&doc_event("before")).await.unwrap();
    recv_n(&mut rx, 1, Duration::from_secs(10)).await;

    proxy.cut(Duration::from_millis(800));
    let deadline = Instant::now() + Duration::from_secs(5);
    while broker.is_connected() {
        assert!(Instant::now() < deadline, "the cut was not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.broker.publish(&doc_event("after")).await.unwrap();
    assert!(
        broker.wait_connected(Duration::from_secs(10)).await,
        "did not reconnect"
    );
    // "before" may come again: if the cut beat its ack, the broker redelivers
    // it (at-least-once). Anything else would be a bug.
    loop {
        let got = recv_n(&mut rx, 1, Duration::from_secs(10)).await;
        let doc = bruno_events::decode_data::<bruno_events::payload::DocumentSubmitted>(&got[0]);
        match doc.unwrap().doc_id.as_str() {
            "after" => break,
            "before" => continue,
            other => panic!("unexpected event {other}"),
        }
    }
    let reconnects = broker.metrics().reconnects.get();
    assert!(reconnects >= 1, "reconnects metric {reconnects}");

    shutdown.cancel();
    consumer.await.unwrap();
    broker_cancel.cancel();
    h.cleanup().await;
}

bruno_runtime::inputs! {
    /// Two payload types on one part.
    enum TwoKinds {
        Doc(bruno_events::payload::DocumentSubmitted),
        Failed(bruno_events::payload::ChatFailed),
    }
}

/// Records its lifecycle; emits one event before its final outcome.
struct Lifecycle {
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Lifecycle {
    fn note(&self, what: impl Into<String>) {
        self.log.lock().unwrap().push(what.into());
    }
}

impl Handler for Lifecycle {
    type Input = TwoKinds;

    async fn handle(
        &self,
        input: Incoming<TwoKinds>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        match input.data {
            TwoKinds::Doc(d) => {
                self.note(format!("doc {}", d.doc_id));
                // Streamed before the outcome, confirmed before the ack.
                let early = bruno_events::reply_event(
                    &input.event,
                    &ctx.source,
                    0,
                    &bruno_events::payload::ChatFailed {
                        reason: "early".into(),
                        message: d.doc_id,
                    },
                );
                ctx.emit(&[early]).await?;
                Ok(vec![])
            }
            TwoKinds::Failed(f) => {
                self.note(format!("failed {}", f.reason));
                Ok(vec![])
            }
        }
    }

    async fn start(&self, ctx: &Context) {
        self.note("start");
        let log = self.log.clone();
        ctx.spawn(|stopped| async move {
            stopped.cancelled().await;
            log.lock().unwrap().push("background ends".into());
        });
    }

    fn tick_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }

    async fn tick(&self, _ctx: &Context) {
        let mut log = self.log.lock().unwrap();
        if !log.iter().any(|l| l == "tick") {
            log.push("tick".into());
        }
    }

    async fn stop(&self, _ctx: &Context) {
        self.note("stop");
    }
}

async fn one_handler_takes_several_types_with_hooks_and_streamed_outputs(kind: BrokerKind) {
    use bruno_events::EventData;
    use bruno_events::payload::{ChatFailed, DocumentSubmitted, SearchRequested};
    let h = Harness::on(
        kind,
        vec![
            bruno_broker::PartSpec::on_types(
                "multi",
                &[
                    DocumentSubmitted::TYPE,
                    ChatFailed::TYPE,
                    SearchRequested::TYPE,
                ],
            ),
            bruno_broker::PartSpec::on_types("observer", &[ChatFailed::TYPE]),
        ],
    )
    .await;
    assert_eq!(
        <TwoKinds as bruno_runtime::FromEvent>::types(),
        [DocumentSubmitted::TYPE, ChatFailed::TYPE]
    );
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "multi",
        4,
        Arc::new(Lifecycle { log: log.clone() }),
        shutdown.clone(),
    ));
    let (recorder, mut seen) = Recorder::new();
    let obs_stop = CancellationToken::new();
    let observer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "observer",
        4,
        recorder,
        obs_stop.clone(),
    ));
    let failed = bruno_events::new_event(
        "tests",
        &ChatFailed {
            reason: "direct".into(),
            message: "m".into(),
        },
    );
    // A type the queue is bound on but the handler does not take.
    let stray = bruno_events::new_event(
        "tests",
        &SearchRequested {
            query: "q".into(),
            k: 1,
            filters: Default::default(),
            mode: Default::default(),
        },
    );
    h.broker
        .publish_all(&[doc_event("d1"), failed, stray.clone()])
        .await
        .unwrap();
    // The observer sees the direct ChatFailed and the one emitted early.
    let got = recv_n(&mut seen, 2, Duration::from_secs(10)).await;
    let reasons: Vec<String> = got
        .iter()
        .map(|e| bruno_events::decode_data::<ChatFailed>(e).unwrap().reason)
        .collect();
    assert!(reasons.contains(&"early".to_owned()), "{reasons:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.depth(&h.topology.names.dlq("multi")).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the stray type was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let letters = bruno_broker::dlq::list(&h.broker, "multi", 10)
        .await
        .unwrap();
    assert_eq!(letters[0].id, stray.id());
    assert_eq!(letters[0].code, "unknown_type");
    assert_eq!(letters[0].attempts, 1, "an unknown type is not retried");
    while !log.lock().unwrap().iter().any(|l| l == "tick") {
        assert!(Instant::now() < deadline, "no tick");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    consumer.await.unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(log.first().map(String::as_str), Some("start"), "{log:?}");
    assert!(log.contains(&"doc d1".to_owned()) && log.contains(&"failed direct".to_owned()));
    // stop runs after the handling, and the background work ends after stop.
    let at = |what: &str| log.iter().position(|l| l == what).unwrap();
    assert_eq!(
        &log[log.len() - 2..],
        ["stop", "background ends"],
        "{log:?}"
    );
    assert!(at("doc d1") < at("stop"));
    obs_stop.cancel();
    observer.await.unwrap();
    h.cleanup().await;
}

bruno_system_tests::on_both!(
    a_handler_failing_twice_is_retried_after_the_delays_without_blocking_others,
    shutdown_finishes_in_flight_messages_and_acks_them,
    one_handler_takes_several_types_with_hooks_and_streamed_outputs
);
