//! Broker conformance: what the fleet relies on from its broker, run from
//! the same code on RabbitMQ and on the embedded broker (ADR 14). The
//! consumer and DLQ tests in `consumer.rs` and `dlq.rs` (retries that block
//! nobody, shutdown drain, multi-type parts, dead letters with error
//! headers and replay) are run on both as well.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bruno_broker::{Delivered, Disposition, PartSpec, Processor, PublishError, Topology, codec};
use bruno_events::payload::{DocumentIndexed, SearchCompleted, SearchRequested};
use bruno_events::{AttributesReader, AttributesWriter, Event, EventData, new_event, reply_event};
use bruno_runtime::{Context, Handler, HandlerError, Incoming};
use bruno_system_tests::{BrokerKind, Harness, Recorder, recv_n, test_config};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{doc_event, doc_part};

fn ids(messages: &[(lapin::BasicProperties, Vec<u8>)]) -> Vec<String> {
    messages
        .iter()
        .map(|(p, b)| codec::decode(p, b).unwrap().id().to_owned())
        .collect()
}

fn typed(ty: &str, source: &str) -> Event {
    let mut e = doc_event("any");
    e.set_type(ty);
    e.set_source(source);
    e
}

async fn routing_matches_all_headers_then_observed_then_unroutable(kind: BrokerKind) {
    let config = test_config();
    let searcher = PartSpec {
        name: "searcher".into(),
        bindings: vec![BTreeMap::from([
            ("type".to_owned(), SearchRequested::TYPE.to_owned()),
            ("source".to_owned(), "tests/mine".to_owned()),
        ])],
        single_active_consumer: false,
        // Requests: a classic queue on RabbitMQ (ADR 17).
        interactive: true,
    };
    let topology = Topology::new(&config, vec![doc_part("docs"), searcher])
        .with_observed([DocumentIndexed::TYPE]);
    let h = Harness::on_topology(kind, config, topology).await;
    let doc = doc_event("d");
    let mine = typed(SearchRequested::TYPE, "tests/mine");
    let theirs = typed(SearchRequested::TYPE, "tests/theirs");
    let note = typed(DocumentIndexed::TYPE, "tests");
    h.broker
        .publish_all(&[doc.clone(), mine.clone(), theirs.clone(), note.clone()])
        .await
        .unwrap();
    let names = &h.topology.names;
    let settle = Duration::from_millis(300);
    assert_eq!(ids(&h.take(&names.queue("docs"), settle).await), [doc.id()]);
    // x-match=all: the type alone is not enough, the source must match too.
    assert_eq!(
        ids(&h.take(&names.queue("searcher"), settle).await),
        [mine.id()]
    );
    assert_eq!(
        ids(&h.take(&names.unroutable(), settle).await),
        [theirs.id()]
    );
    assert_eq!(ids(&h.take(&names.observed(), settle).await), [note.id()]);
    h.cleanup().await;
}

async fn the_unroutable_queue_is_bounded_dropping_the_oldest(kind: BrokerKind) {
    let mut config = test_config();
    config.unroutable_max_length = 5;
    let h = Harness::on_config(kind, config, vec![doc_part("docs")]).await;
    let events: Vec<Event> = (0..8)
        .map(|i| {
            let mut e = typed("com.example.nobody", "tests");
            e.set_id(format!("lost-{i}"));
            e
        })
        .collect();
    for e in &events {
        h.broker.publish(e).await.unwrap();
    }
    let kept = ids(&h
        .take(&h.topology.names.unroutable(), Duration::from_millis(300))
        .await);
    assert_eq!(kept, ["lost-3", "lost-4", "lost-5", "lost-6", "lost-7"]);
    h.cleanup().await;
}

async fn a_confirmed_publish_is_queued_and_a_missing_queue_is_refused(kind: BrokerKind) {
    let h = Harness::on(kind, vec![doc_part("docs")]).await;
    let events: Vec<Event> = (0..50).map(|i| doc_event(&format!("c{i}"))).collect();
    h.broker.publish_all(&events).await.unwrap();
    // Confirmed means queued: counted at once, no waiting.
    assert_eq!(h.depth(&h.queue("docs")).await, 50);
    let (props, body) = codec::encode(&events[0]).unwrap();
    let refused = h
        .broker
        .publish_raw("", &h.queue("no-such-part"), props, &body)
        .await;
    assert!(
        matches!(refused, Err(PublishError::Returned(_))),
        "{refused:?}"
    );
    h.cleanup().await;
}

/// Holds every event forever, reporting each start and redelivery flag.
struct Holder {
    seen: mpsc::UnboundedSender<(String, bool)>,
}

impl Processor for Holder {
    async fn process(&self, event: Event, delivered: Delivered) -> Disposition {
        let _ = self
            .seen
            .send((event.id().to_owned(), delivered.redelivered));
        std::future::pending::<()>().await;
        Disposition::Ack(vec![])
    }
}

/// Acks everything, reporting the redelivery flag.
struct Taker {
    seen: mpsc::UnboundedSender<(String, bool)>,
}

impl Processor for Taker {
    async fn process(&self, event: Event, delivered: Delivered) -> Disposition {
        let _ = self
            .seen
            .send((event.id().to_owned(), delivered.redelivered));
        Disposition::Ack(vec![])
    }
}

async fn a_dead_consumer_s_messages_are_redelivered_marked(kind: BrokerKind) {
    let h = Harness::on(kind, vec![doc_part("crashy")]).await;
    let (doomed_broker, doomed_cancel) = h.doomed().await;
    let (tx, mut started) = mpsc::unbounded_channel();
    let doomed = tokio::spawn(bruno_broker::consume(
        doomed_broker,
        "crashy".into(),
        2,
        Arc::new(Holder { seen: tx }),
        CancellationToken::new(),
    ));
    let a = doc_event("a");
    let b = doc_event("b");
    h.broker.publish_all(&[a.clone(), b.clone()]).await.unwrap();
    for _ in 0..2 {
        let (_, redelivered) = tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(!redelivered);
    }
    // Kill the consumer holding both (and, on RabbitMQ, its connection).
    doomed.abort();
    let _ = doomed.await;
    doomed_cancel.cancel();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let survivor = tokio::spawn(bruno_broker::consume(
        h.broker.clone(),
        "crashy".into(),
        2,
        Arc::new(Taker { seen: tx }),
        stop.clone(),
    ));
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            tokio::time::timeout(Duration::from_secs(15), seen.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    got.sort();
    let mut expected = vec![(a.id().to_owned(), true), (b.id().to_owned(), true)];
    expected.sort();
    assert_eq!(got, expected, "both come back, marked redelivered");
    stop.cancel();
    survivor.await.unwrap();
    assert_eq!(h.depth(&h.queue("crashy")).await, 0);
    h.cleanup().await;
}

/// A consumer of `part` that takes a message and dies holding it, as a
/// crash does; whether it took one within `wait`.
async fn killed_holding(h: &Harness, part: &str, wait: Duration) -> bool {
    let (broker, cancel) = h.doomed().await;
    let (tx, mut started) = mpsc::unbounded_channel();
    let doomed = tokio::spawn(bruno_broker::consume(
        broker,
        part.into(),
        1,
        Arc::new(Holder { seen: tx }),
        CancellationToken::new(),
    ));
    let took = tokio::time::timeout(wait, started.recv()).await;
    doomed.abort();
    let _ = doomed.await;
    cancel.cancel();
    took.is_ok()
}

/// Panics-free handler that never settles: its messages come back until
/// the delivery limit dead-letters them.
async fn a_message_that_keeps_killing_consumers_is_dead_lettered_by_the_limit(kind: BrokerKind) {
    let mut config = test_config();
    config.delivery_limit = 2;
    let h = Harness::on_config(kind, config, vec![doc_part("deadly")]).await;
    let event = doc_event("deadly");
    h.broker.publish(&event).await.unwrap();
    let dlq = h.topology.names.dlq("deadly");
    let mut kills = 0;
    while h.depth(&dlq).await == 0 {
        assert!(kills < 10, "never dead-lettered after {kills} kills");
        if killed_holding(&h, "deadly", Duration::from_secs(3)).await {
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(kills >= 2, "dead-lettered after only {kills} deliveries");
    let letters = bruno_broker::dlq::list(&h.broker, "deadly", 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, event.id());
    assert_eq!(letters[0].code, "broker", "{:?}", letters[0]);
    assert_eq!(h.depth(&h.queue("deadly")).await, 0);
    h.cleanup().await;
}

/// An interactive part (ADR 17): it takes searches, on a classic queue on
/// RabbitMQ.
fn asker() -> PartSpec {
    PartSpec::on_types("asker", &[SearchRequested::TYPE]).interactive()
}

fn search_request(id: &str) -> Event {
    let mut e = typed(SearchRequested::TYPE, "tests");
    e.set_id(id);
    e
}

/// Waits (up to 15 s) for `queue` to hold `n` messages.
async fn await_depth(h: &Harness, queue: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while h.depth(queue).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} never held {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request nobody takes is dead-lettered once its TTL passed (nobody
/// awaits it any more), saying why, and leaves its queue.
async fn a_request_nobody_takes_within_its_ttl_is_dead_lettered_as_expired(kind: BrokerKind) {
    let mut config = test_config();
    config.request_ttl_ms = 300;
    let h = Harness::on_config(kind, config, vec![asker()]).await;
    h.broker.publish(&search_request("late")).await.unwrap();
    let dlq = h.topology.names.dlq("asker");
    await_depth(&h, &dlq, 1).await;
    let letters = bruno_broker::dlq::list(&h.broker, "asker", 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, "late");
    assert_eq!(letters[0].code, "broker");
    assert!(letters[0].reason.contains("expired"), "{:?}", letters[0]);
    assert_eq!(h.depth(&h.queue("asker")).await, 0);
    h.cleanup().await;
}

/// A classic queue has no delivery limit: a request that kills every
/// consumer taking it still leaves, at its TTL (a requeued message keeps
/// its expiry), instead of killing consumers for ever.
async fn a_request_that_keeps_killing_consumers_expires_instead_of_looping(kind: BrokerKind) {
    let mut config = test_config();
    config.request_ttl_ms = 1_500;
    // Far above what 1.5 s of crashes reach: the TTL must end it.
    config.delivery_limit = 1_000;
    let h = Harness::on_config(kind, config, vec![asker()]).await;
    h.broker.publish(&search_request("deadly")).await.unwrap();
    let dlq = h.topology.names.dlq("asker");
    let mut kills = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while h.depth(&dlq).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never expired after {kills} kills"
        );
        if killed_holding(&h, "asker", Duration::from_millis(400)).await {
            kills += 1;
        }
        // A restarting consumer's pause (else the embedded broker, in this
        // process, would reach its own delivery limit within the TTL).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(kills >= 2, "expired after only {kills} deliveries");
    let letters = bruno_broker::dlq::list(&h.broker, "asker", 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, "deadly");
    assert!(letters[0].reason.contains("expired"), "{:?}", letters[0]);
    assert_eq!(h.depth(&h.queue("asker")).await, 0);
    h.cleanup().await;
}

/// An interactive part's queue is bounded: past `request_max_length` the
/// publish is refused (the gateway answers 503) and nothing is queued.
async fn a_full_request_queue_refuses_the_publish(kind: BrokerKind) {
    let mut config = test_config();
    config.request_max_length = 2;
    let h = Harness::on_config(kind, config, vec![asker()]).await;
    h.broker.publish(&search_request("r1")).await.unwrap();
    h.broker.publish(&search_request("r2")).await.unwrap();
    let refused = h.broker.publish(&search_request("r3")).await;
    assert!(matches!(refused, Err(PublishError::Nacked)), "{refused:?}");
    let taken = h.take(&h.queue("asker"), Duration::from_millis(300)).await;
    assert_eq!(ids(&taken), ["r1", "r2"]);
    h.cleanup().await;
}

/// Answers every event with one event of type `ty`, counting calls.
struct Forwarder {
    ty: &'static str,
    calls: Arc<AtomicU32>,
}

impl Processor for Forwarder {
    async fn process(&self, event: Event, _delivered: Delivered) -> Disposition {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut out = typed(self.ty, "tests/forwarder");
        out.set_id(format!("{}-out", event.id()));
        Disposition::Ack(vec![out])
    }
}

/// Outputs the broker refuses (a full request queue downstream) send the
/// input through the retry tiers to its DLQ after `max_attempts`; requeued
/// at once, it would come straight back until its TTL, as a classic queue
/// has no delivery limit.
async fn outputs_refused_by_a_full_queue_are_retried_after_a_delay_not_requeued(kind: BrokerKind) {
    const FULL: &str = "tests.full.v1";
    let mut config = test_config();
    config.request_max_length = 1;
    let max_attempts = config.max_attempts;
    let full = PartSpec::on_types("full", &[FULL]).interactive();
    let h = Harness::on_config(kind, config, vec![asker(), full]).await;
    h.broker.publish(&typed(FULL, "tests")).await.unwrap();
    h.broker.publish(&search_request("blocked")).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(bruno_broker::consume(
        h.broker.clone(),
        "asker".into(),
        1,
        Arc::new(Forwarder {
            ty: FULL,
            calls: calls.clone(),
        }),
        stop.clone(),
    ));
    let dlq = h.topology.names.dlq("asker");
    await_depth(&h, &dlq, 1).await;
    stop.cancel();
    consumer.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), max_attempts);
    let letters = bruno_broker::dlq::list(&h.broker, "asker", 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, "blocked");
    assert_eq!(letters[0].code, "dependency", "{:?}", letters[0]);
    assert!(letters[0].reason.contains("refused"), "{:?}", letters[0]);
    // The full queue kept what it had, and nothing more.
    assert_eq!(h.depth(&h.queue("full")).await, 1);
    h.cleanup().await;
}

/// RabbitMQ: a part that became interactive finds its quorum queue from
/// before ADR 17. Declaring keeps it as it is (every process declares the
/// whole topology, and older replicas may still consume it); replacing
/// (`bruno topology --replace`) refuses while it holds messages or
/// consumers, and replaces it once it is empty and unconsumed.
#[tokio::test]
async fn a_quorum_queue_from_before_adr_17_is_kept_and_replaced_only_when_empty() {
    let config = test_config();
    let mut old = PartSpec::on_types("asker", &[SearchRequested::TYPE]);
    old.interactive = false;
    let h = Harness::with_config(config.clone(), vec![old]).await;
    let new = Topology::new(&config, vec![asker()]);
    let conn = h.raw().await;
    let queue = h.queue("asker");

    // Declaring keeps it, and the rest is declared: requests still reach it.
    h.broker.publish(&search_request("waiting")).await.unwrap();
    assert_eq!(
        new.declare_on(&conn).await.unwrap(),
        std::slice::from_ref(&queue)
    );
    // A process of the new version connects and stays connected: the
    // refused declaration is not taken for a broken connection (it was, in
    // a reconnect loop, before the supervisor told them apart).
    let cancel = CancellationToken::new();
    let upgraded = bruno_broker::Broker::start(
        config.clone(),
        new.clone(),
        "test-new",
        bruno_broker::BrokerMetrics::default(),
        cancel.clone(),
    );
    assert!(upgraded.wait_connected(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(upgraded.metrics().reconnects.get(), 0);
    upgraded.publish(&search_request("queued")).await.unwrap();
    cancel.cancel();
    assert_eq!(h.depth(&queue).await, 2);

    // Holding messages: not replaced, and the error says what to do.
    let err = new.replace_stale(&conn).await.unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            bruno_broker::TopologyError::Replace {
                messages: 2,
                consumers: 0,
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("bruno topology --replace"), "{message}");
    assert_eq!(h.depth(&queue).await, 2);

    // Empty: replaced. Declaring the classic queue again then keeps
    // nothing (RabbitMQ refuses a redeclaration with another type or
    // arguments).
    let taken = h.take(&queue, Duration::from_millis(300)).await;
    assert_eq!(ids(&taken), ["waiting", "queued"]);
    assert_eq!(
        new.replace_stale(&conn).await.unwrap(),
        std::slice::from_ref(&queue)
    );
    assert!(new.declare_on(&conn).await.unwrap().is_empty());
    // Its bindings were declared anew with it: requests reach it.
    h.broker.publish(&search_request("fresh")).await.unwrap();
    assert_eq!(h.depth(&queue).await, 1);
    bruno_system_tests::close(&conn).await;
    h.cleanup().await;
}

/// Answers every search with one `search.completed`.
struct Answerer;

impl Handler for Answerer {
    type Input = SearchRequested;
    async fn handle(
        &self,
        input: Incoming<SearchRequested>,
        _ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let _ = input.data;
        Ok(vec![reply_event(
            &input.event,
            "tests/answerer",
            0,
            &SearchCompleted { hits: vec![] },
        )])
    }
}

async fn request_reply_gets_the_correlated_answer_and_the_inbox_goes_away(kind: BrokerKind) {
    let h = Harness::on(
        kind,
        vec![PartSpec::on_types("answerer", &[SearchRequested::TYPE])],
    )
    .await;
    let stop = CancellationToken::new();
    let answerer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "answerer",
        4,
        Arc::new(Answerer),
        stop.clone(),
    ));
    let request = |q: &str| {
        new_event(
            "tests",
            &SearchRequested {
                query: q.into(),
                k: 1,
                filters: Default::default(),
                mode: Default::default(),
            },
        )
    };
    let mut answers = Vec::new();
    for q in ["one", "two", "three"] {
        let sent = request(q);
        let reply = bruno_broker::reply::request(
            &h.broker,
            sent.clone(),
            &[SearchCompleted::TYPE],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(reply.ty(), SearchCompleted::TYPE);
        answers.push(reply);
    }
    let correlations: std::collections::HashSet<_> = answers
        .iter()
        .map(|r| bruno_events::correlation_id(r).unwrap().to_owned())
        .collect();
    assert_eq!(correlations.len(), 3, "each request got its own answer");
    // The inboxes left with their requests: a late reply now routes nowhere
    // a requester listens (it is a notification kept briefly, or unroutable).
    if let Some(embedded) = h.broker.as_embedded() {
        let inboxes = || {
            embedded
                .queue_names()
                .into_iter()
                .filter(|q| q.starts_with("inbox-"))
                .collect::<Vec<_>>()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !inboxes().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "inboxes outlived their requests: {:?}",
                inboxes()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.cancel();
    answerer.await.unwrap();
    h.cleanup().await;
}

async fn only_the_single_active_consumer_takes_until_it_leaves(kind: BrokerKind) {
    let h = Harness::on(kind, vec![doc_part("single").single_active()]).await;
    let (first_rx, first_stop, first) = {
        let (recorder, rx) = Recorder::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(bruno_runtime::run_pull(
            h.broker.clone(),
            "single",
            4,
            recorder,
            stop.clone(),
        ));
        (rx, stop, task)
    };
    // Let the first consumer register before the second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (recorder, mut second_rx) = Recorder::new();
    let second_stop = CancellationToken::new();
    let second = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "single",
        4,
        recorder,
        second_stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut first_rx = first_rx;
    let batch: Vec<Event> = (0..20).map(|i| doc_event(&format!("s{i}"))).collect();
    h.broker.publish_all(&batch).await.unwrap();
    recv_n(&mut first_rx, 20, Duration::from_secs(10)).await;
    assert!(
        second_rx.try_recv().is_err(),
        "the standby consumer took a message while the active one lived"
    );
    first_stop.cancel();
    first.await.unwrap();
    let later: Vec<Event> = (0..5).map(|i| doc_event(&format!("t{i}"))).collect();
    h.broker.publish_all(&later).await.unwrap();
    let got = recv_n(&mut second_rx, 5, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 5);
    second_stop.cancel();
    second.await.unwrap();
    h.cleanup().await;
}

bruno_system_tests::on_both!(
    routing_matches_all_headers_then_observed_then_unroutable,
    the_unroutable_queue_is_bounded_dropping_the_oldest,
    a_confirmed_publish_is_queued_and_a_missing_queue_is_refused,
    a_dead_consumer_s_messages_are_redelivered_marked,
    a_message_that_keeps_killing_consumers_is_dead_lettered_by_the_limit,
    request_reply_gets_the_correlated_answer_and_the_inbox_goes_away,
    only_the_single_active_consumer_takes_until_it_leaves,
    a_request_nobody_takes_within_its_ttl_is_dead_lettered_as_expired,
    a_request_that_keeps_killing_consumers_expires_instead_of_looping,
    a_full_request_queue_refuses_the_publish,
    outputs_refused_by_a_full_queue_are_retried_after_a_delay_not_requeued,
);

/// Counts handled events.
struct Counter(Arc<AtomicU32>);

impl Handler for Counter {
    type Input = bruno_runtime::Raw;
    async fn handle(
        &self,
        _input: Incoming<bruno_runtime::Raw>,
        _ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(vec![])
    }
}

/// Embedded only: what was confirmed survives a restart of the broker from
/// its journal; what was acked does not come back.
#[tokio::test]
async fn the_embedded_journal_keeps_confirmed_messages_across_a_restart() {
    let mut h = Harness::on(BrokerKind::Embedded, vec![doc_part("kept")]).await;
    let first: Vec<Event> = (0..10).map(|i| doc_event(&format!("k{i}"))).collect();
    h.broker.publish_all(&first).await.unwrap();
    // Consume five, then "crash": a new broker opens the same journal.
    let handled = Arc::new(AtomicU32::new(0));
    let stop = CancellationToken::new();
    let consumer = h
        .broker
        .as_embedded()
        .unwrap()
        .consume(&h.queue("kept"), 5)
        .unwrap();
    for _ in 0..5 {
        let d = consumer.next().await.unwrap();
        d.handle.ack();
    }
    drop(consumer);
    h.broker.sync().await;
    let tempdir = h.dir.take().unwrap();
    let dir = tempdir.path().to_path_buf();
    let config = h.config.clone();
    let topology = h.topology.clone();
    drop(h);
    // The first broker's journal writer has stopped once its last handle went.
    let reopened = {
        let mut tries = 0;
        loop {
            match bruno_broker::embedded::Journal::open(&dir, 1 << 20) {
                Ok(j) => break j,
                Err(e) if tries < 20 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(reopened.1.len(), 5, "five confirmed and unacked remain");
    let broker = bruno_broker::Broker::embedded(
        config,
        topology,
        "restarted",
        bruno_broker::BrokerMetrics::default(),
        CancellationToken::new(),
        Some(reopened),
    );
    let task = tokio::spawn(bruno_runtime::run_pull(
        broker.clone(),
        "kept",
        4,
        Arc::new(Counter(handled.clone())),
        stop.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handled.load(Ordering::SeqCst) < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "restored messages not handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        5,
        "acked messages came back"
    );
    stop.cancel();
    task.await.unwrap();
    drop(tempdir);
}
