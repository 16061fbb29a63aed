//! The writer against the real RabbitMQ and LanceDB in a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bruno_broker::{PartSpec, dlq};
use bruno_events::legacy::{MemoryRowV1, MemoryWriteV1};
use bruno_events::payload::{
    ChunkRecord, ChunkWrite, DocumentIndexed, EmbedderInfo, MemoryWrite, Role, Table, TurnRecord,
    TurnWrite,
};
use bruno_events::{AttributesReader, Event, EventData, decode_data, new_event};
use bruno_runtime::FromEvent;
use bruno_store::{EmbedderInfo as StoreEmbedder, Store, StoreConfig};
use bruno_system_tests::{Harness, Recorder, recv_n};
use bruno_writer::{Writer, WriterConfig, WriterInput, WriterMetrics};
use tokio_util::sync::CancellationToken;

const DIM: u32 = 8;

fn embedder(dim: u32) -> EmbedderInfo {
    EmbedderInfo {
        model: "test/fake".into(),
        dimension: dim,
    }
}

fn write_event(doc: usize, version: &str, chunks: usize, dim: u32) -> Event {
    let doc_id = format!("doc-{doc}");
    let ids: Vec<String> = (0..chunks)
        .map(|i| format!("{doc_id}:{version}:{i}"))
        .collect();
    let rows = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut vector = vec![0.0; dim as usize];
            vector[(doc + i) % dim as usize] = 1.0;
            ChunkRecord {
                id: id.clone(),
                chunk_index: i as u32,
                text: format!("chunk {i} of {doc_id} version {version}"),
                vector,
            }
        })
        .collect();
    new_event(
        "tests",
        &MemoryWrite::Chunks(ChunkWrite {
            embedder: embedder(dim),
            doc_id,
            source: "tests".into(),
            title: Some(format!("Doc {doc}")),
            content_hash: version.into(),
            chunk_ids: ids,
            rows,
        }),
    )
}

/// The writer's queue, bound on every type its handler takes.
fn writer_spec() -> PartSpec {
    PartSpec::on_types("writer", &WriterInput::types()).single_active()
}

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics: WriterMetrics,
}

fn start_writer(broker: bruno_broker::Broker, store: Store) -> Running {
    start_writer_with(
        broker,
        store,
        WriterConfig {
            batch_ms: 300,
            ..WriterConfig::default()
        },
    )
}

fn start_writer_with(broker: bruno_broker::Broker, store: Store, config: WriterConfig) -> Running {
    let shutdown = CancellationToken::new();
    let metrics = WriterMetrics::default();
    let writer = Writer::new(store, &config, metrics.clone());
    let task = tokio::spawn(bruno_runtime::run_pull(
        broker,
        "writer",
        config.concurrency,
        Arc::new(writer),
        shutdown.clone(),
    ));
    Running {
        shutdown,
        task,
        metrics,
    }
}

async fn open_store(dir: &tempfile::TempDir) -> Store {
    Store::open(StoreConfig {
        uri: dir.path().display().to_string(),
        read_consistency_ms: 0,
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn writes_are_batched_exactly_once_and_survive_a_killed_writer() {
    let h = Harness::new(vec![
        writer_spec(),
        PartSpec::on_types("observer", &[DocumentIndexed::TYPE]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir).await;
    let (recorder, mut indexed) = Recorder::new();
    let obs_stop = CancellationToken::new();
    let observer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "observer",
        32,
        recorder,
        obs_stop.clone(),
    ));

    // 60 documents of 3 chunks, published at once: the writer batches them.
    let events: Vec<Event> = (0..60).map(|d| write_event(d, "v1", 3, DIM)).collect();
    h.broker.publish_all(&events).await.unwrap();
    let w = start_writer(h.broker.clone(), store.clone());
    let got = recv_n(&mut indexed, 60, Duration::from_secs(60)).await;
    let chunks = store
        .chunks(&StoreEmbedder {
            model: "test/fake".into(),
            dimension: DIM,
        })
        .await
        .unwrap();
    assert_eq!(chunks.count(None).await.unwrap(), 180);
    let commits = w.metrics.commits();
    assert!(
        commits < 60,
        "{commits} commits for 60 messages: no batching"
    );
    eprintln!("60 messages, 180 rows in {commits} commits");
    let d: DocumentIndexed = decode_data(&got[0]).unwrap();
    assert_eq!(d.chunks_written, 3);
    assert!(
        got.iter()
            .all(|e| bruno_events::ext_str(e, "correlationid").is_none())
    );

    // Redelivered writes (same ids) change nothing.
    h.broker.publish_all(&events[..10]).await.unwrap();
    recv_n(&mut indexed, 10, Duration::from_secs(30)).await;
    assert_eq!(chunks.count(None).await.unwrap(), 180);

    // A new version of doc-0 replaces its chunks and reports what it removed.
    h.broker
        .publish(&write_event(0, "v2", 2, DIM))
        .await
        .unwrap();
    let got = recv_n(&mut indexed, 1, Duration::from_secs(30)).await;
    let d: DocumentIndexed = decode_data(&got[0]).unwrap();
    assert_eq!(
        (d.doc_id.as_str(), d.chunks_written, d.chunks_removed),
        ("doc-0", 2, 3)
    );
    assert_eq!(chunks.count(Some("doc-0")).await.unwrap(), 2);
    w.shutdown.cancel();
    w.task.await.unwrap();

    // Kill a writer mid-run (its connection drops without acks), start another:
    // every document ends up stored exactly once.
    let (doomed_broker, doomed_cancel) = h.second_broker(None).await;
    let more: Vec<Event> = (100..160).map(|d| write_event(d, "v1", 4, DIM)).collect();
    h.broker.publish_all(&more).await.unwrap();
    let doomed = start_writer(doomed_broker, store.clone());
    tokio::time::sleep(Duration::from_millis(400)).await;
    doomed.task.abort();
    doomed_cancel.cancel();
    let w = start_writer(h.broker.clone(), store.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while chunks.count(None).await.unwrap() < 179 + 240 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rows missing after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        chunks.count(None).await.unwrap(),
        179 + 240,
        "duplicates or losses"
    );
    for d in 100..160 {
        assert_eq!(chunks.count(Some(&format!("doc-{d}"))).await.unwrap(), 4);
    }
    w.shutdown.cancel();
    w.task.await.unwrap();
    obs_stop.cancel();
    observer.await.unwrap();
    h.cleanup().await;
}

#[tokio::test]
async fn bad_writes_are_dead_lettered_with_a_reason() {
    let h = Harness::new(vec![writer_spec()]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir).await;
    let w = start_writer(h.broker.clone(), store.clone());
    h.broker
        .publish(&write_event(1, "v1", 2, DIM))
        .await
        .unwrap();
    // Another embedder than the one that filled the table.
    let other_dim = write_event(2, "v1", 2, 16);
    // A row outside the declared chunk-id set.
    let mut stray = write_event(3, "v1", 2, DIM);
    let mut data: MemoryWrite = decode_data(&stray).unwrap();
    if let MemoryWrite::Chunks(w) = &mut data {
        w.chunk_ids = vec!["somewhere-else".into()];
    }
    stray.set_data(bruno_events::JSON, serde_json::to_value(&data).unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let chunks = loop {
        if let Ok(c) = store
            .chunks(&StoreEmbedder {
                model: "test/fake".into(),
                dimension: DIM,
            })
            .await
            && c.count(None).await.unwrap() == 2
        {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    h.broker
        .publish_all(&[other_dim.clone(), stray.clone()])
        .await
        .unwrap();
    let dlq_name = h.topology.names.dlq("writer");
    while h.depth(&dlq_name).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bad writes not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = dlq::list(&h.broker, "writer", 10).await.unwrap();
    let mismatch = letters.iter().find(|d| d.id == other_dim.id()).unwrap();
    assert_eq!(mismatch.code, "invalid_payload");
    assert!(
        mismatch.reason.contains("test/fake/8") && mismatch.reason.contains("16"),
        "{}",
        mismatch.reason
    );
    let stray_letter = letters.iter().find(|d| d.id == stray.id()).unwrap();
    assert!(
        stray_letter.reason.contains("not in chunk_ids"),
        "{}",
        stray_letter.reason
    );
    assert_eq!(chunks.count(None).await.unwrap(), 2);
    w.shutdown.cancel();
    w.task.await.unwrap();
    h.cleanup().await;
}

fn turn_event(n: usize) -> Event {
    let row = |role: Role, text: String| TurnRecord {
        id: format!("turn-{n}-{}", role.as_str()),
        session_id: "s1".into(),
        role,
        correlation_id: format!("c{n}"),
        created_at: format!("2026-11-25T10:00:{n:02}Z").parse().unwrap(),
        text,
        vector: {
            let mut v = vec![0.0; DIM as usize];
            v[n % DIM as usize] = 1.0;
            v
        },
    };
    new_event(
        "tests",
        &MemoryWrite::Conversations(TurnWrite {
            embedder: embedder(DIM),
            rows: vec![
                row(Role::User, format!("question {n}")),
                row(Role::Assistant, format!("answer {n}")),
            ],
        }),
    )
}

/// `memory.write.v1` messages (still in a queue from before the upgrade,
/// or from an embedder not yet upgraded) are read, not lost (ADR 0009).
#[tokio::test]
async fn retired_v1_writes_are_still_stored() {
    let h = Harness::new(vec![writer_spec()]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir).await;
    let w = start_writer(h.broker.clone(), store.clone());
    let vector = |i: usize| {
        let mut v = vec![0.0; DIM as usize];
        v[i] = 1.0;
        v
    };
    let chunk = |i: usize| MemoryRowV1 {
        id: format!("old-doc:{i}"),
        text: format!("old chunk {i}"),
        vector: vector(i),
        metadata: BTreeMap::from([
            ("source".to_owned(), serde_json::json!("legacy")),
            ("title".to_owned(), serde_json::json!("Old")),
            ("chunk_index".to_owned(), serde_json::json!(i)),
        ]),
    };
    let turn = |role: &str| MemoryRowV1 {
        id: format!("old-turn-{role}"),
        text: format!("{role} said"),
        vector: vector(3),
        metadata: BTreeMap::from([
            ("session_id".to_owned(), serde_json::json!("old-session")),
            ("role".to_owned(), serde_json::json!(role)),
            ("correlation_id".to_owned(), serde_json::json!("c-old")),
            (
                "created_at".to_owned(),
                serde_json::json!("2026-01-02T03:04:05Z"),
            ),
        ]),
    };
    let docs = MemoryWriteV1 {
        table: Table::Chunks,
        rows: vec![chunk(0), chunk(1)],
        embedder: embedder(DIM),
        doc_id: Some("old-doc".into()),
        chunk_ids: Some(vec!["old-doc:0".into(), "old-doc:1".into()]),
        content_hash: Some("h".into()),
    };
    let turns = MemoryWriteV1 {
        table: Table::Conversations,
        rows: vec![turn("user"), turn("assistant")],
        embedder: embedder(DIM),
        doc_id: None,
        chunk_ids: None,
        content_hash: None,
    };
    // One v1 turn with a role the typed payload cannot hold: dead-lettered.
    let mut bad = turns.clone();
    bad.rows[0]
        .metadata
        .insert("role".into(), serde_json::json!("narrator"));
    bad.rows.truncate(1);
    let bad = new_event("tests", &bad);
    h.broker
        .publish_all(&[
            new_event("tests", &docs),
            new_event("tests", &turns),
            bad.clone(),
        ])
        .await
        .unwrap();
    let info = StoreEmbedder {
        model: "test/fake".into(),
        dimension: DIM,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let chunks = match store.existing_chunks(&info).await.unwrap() {
            Some(c) => c.count(Some("old-doc")).await.unwrap(),
            None => 0,
        };
        let turns = match store.existing_conversations(&info).await.unwrap() {
            Some(c) => c.count(Some("old-session")).await.unwrap(),
            None => 0,
        };
        let dead = h.depth(&h.topology.names.dlq("writer")).await;
        if (chunks, turns, dead) == (2, 2, 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "v1 writes not stored: {chunks} chunks, {turns} turns, {dead} dead letters"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conversations = store.existing_conversations(&info).await.unwrap().unwrap();
    let recent = conversations.recent("old-session", 10).await.unwrap();
    let mut roles: Vec<_> = recent.iter().map(|t| t.role.as_str()).collect();
    roles.sort_unstable();
    assert_eq!(roles, ["assistant", "user"]);
    let letters = dlq::list(&h.broker, "writer", 10).await.unwrap();
    assert_eq!(letters[0].id, bad.id());
    assert_eq!(letters[0].code, "invalid_payload");
    assert!(
        letters[0].reason.contains("narrator"),
        "{}",
        letters[0].reason
    );
    w.shutdown.cancel();
    w.task.await.unwrap();
    h.cleanup().await;
}

#[tokio::test]
async fn the_writer_compacts_a_table_every_few_commits() {
    let h = Harness::new(vec![writer_spec()]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir).await;
    let w = start_writer_with(
        h.broker.clone(),
        store.clone(),
        WriterConfig {
            batch_ms: 20,
            compact_every_commits: 3,
            ..WriterConfig::default()
        },
    );
    // One turn at a time, each its own commit.
    for n in 0..9 {
        h.broker.publish(&turn_event(n)).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while w.metrics.commits() < n as u64 + 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "turn {n} never committed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while w.metrics.compactions() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} compactions after 9 commits",
            w.metrics.compactions()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conversations = store
        .conversations(&StoreEmbedder {
            model: "test/fake".into(),
            dimension: DIM,
        })
        .await
        .unwrap();
    assert_eq!(conversations.count(None).await.unwrap(), 18);
    // Nine one-commit files became at most two: LanceDB merges files
    // already covered by the indexes apart from those that are not yet.
    let files = conversations.files().await.unwrap();
    assert!(files <= 2, "{files} files after 3 compactions");
    let recent = conversations.recent("s1", 2).await.unwrap();
    assert_eq!(recent[1].text, "answer 8");
    w.shutdown.cancel();
    w.task.await.unwrap();
    h.cleanup().await;
}

/// Once writes pause, the writer compacts what it wrote since its last
/// compaction, and after a start what an earlier run left, so reads after
/// a burst of writes (an ingest, a chat turn) open one file with every row
/// indexed instead of waiting for the next burst or the hourly maintenance;
/// with nothing new it does not compact again.
#[tokio::test]
async fn the_writer_compacts_once_writes_pause_and_what_an_earlier_run_left() {
    let h = Harness::new(vec![writer_spec()]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir).await;
    let info = StoreEmbedder {
        model: "test/fake".into(),
        dimension: DIM,
    };
    let commit_each = |w: &Running, events: Vec<Event>| {
        let (broker, metrics) = (h.broker.clone(), w.metrics.clone());
        async move {
            for e in events {
                let before = metrics.commits();
                broker.publish(&e).await.unwrap();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while metrics.commits() == before {
                    assert!(tokio::time::Instant::now() < deadline, "never committed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    };
    let await_compactions = |w: &Running, n: u64| {
        let metrics = w.metrics.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while metrics.compactions() < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} compactions, expected {n}",
                    metrics.compactions()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // An earlier run that never compacts: four turns and two documents, a
    // commit each.
    let never = WriterConfig {
        batch_ms: 20,
        compact_every_commits: 1000,
        compact_idle_ms: 0,
        ..WriterConfig::default()
    };
    let earlier = start_writer_with(h.broker.clone(), store.clone(), never);
    commit_each(&earlier, (0..4).map(turn_event).collect()).await;
    commit_each(
        &earlier,
        (0..2).map(|d| write_event(d, "v1", 3, DIM)).collect(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(earlier.metrics.compactions(), 0);
    earlier.shutdown.cancel();
    earlier.task.await.unwrap();
    let conversations = store.conversations(&info).await.unwrap();
    let chunks = store.chunks(&info).await.unwrap();
    assert_eq!(conversations.files().await.unwrap(), 4);
    assert_eq!(chunks.files().await.unwrap(), 2);

    // A new run compacts both tables once it has been idle for a while.
    let w = start_writer_with(
        h.broker.clone(),
        store.clone(),
        WriterConfig {
            batch_ms: 20,
            compact_every_commits: 1000,
            compact_idle_ms: 500,
            ..WriterConfig::default()
        },
    );
    await_compactions(&w, 2).await;
    // One file each: every row was folded into the indexes first (LanceDB
    // merges indexed and unindexed files apart).
    assert_eq!(conversations.files().await.unwrap(), 1);
    assert_eq!(chunks.files().await.unwrap(), 1);
    assert_eq!(conversations.count(None).await.unwrap(), 8);
    assert_eq!(chunks.count(None).await.unwrap(), 6);

    // Three more turns, a commit each, then a pause: a compaction after
    // the last commit (a slow machine may add one between two of them).
    commit_each(&w, (4..7).map(turn_event).collect()).await;
    let after_writes = w.metrics.compactions();
    await_compactions(&w, after_writes + 1).await;
    assert_eq!(conversations.files().await.unwrap(), 1);
    let recent = conversations.recent("s1", 2).await.unwrap();
    assert_eq!(recent[1].text, "answer 6");
    // Nothing new: no more compactions.
    let settled = w.metrics.compactions();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(w.metrics.compactions(), settled);
    w.shutdown.cancel();
    w.task.await.unwrap();
    h.cleanup().await;
}

/// The scheduled maintenance and the batcher's compactions take turns:
/// two compactions of one table at once conflict in Lance's commit, and
/// one of them failed. Here a commit and a compaction every ~80 ms meet a
/// maintenance run every second for about four seconds.
#[tokio::test]
async fn maintenance_and_compactions_do_not_collide() {
    let h = Harness::new(vec![writer_spec()]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir).await;
    let w = start_writer_with(
        h.broker.clone(),
        store.clone(),
        WriterConfig {
            batch_ms: 10,
            compact_every_commits: 1,
            compact_idle_ms: 100,
            maintenance_interval_secs: 1,
            ..WriterConfig::default()
        },
    );
    let turns = 50;
    for n in 0..turns {
        h.broker.publish(&turn_event(n)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let conversations = store
        .conversations(&StoreEmbedder {
            model: "test/fake".into(),
            dimension: DIM,
        })
        .await
        .unwrap();
    // Every turn stored (a commit may hold several) and a few maintenance runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows = conversations.count(None).await.unwrap();
        if rows == 2 * turns && w.metrics.maintenance().0 >= 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{rows} rows, maintenance {:?}",
            w.metrics.maintenance()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(w.metrics.compactions() > 0);
    assert_eq!(w.metrics.compaction_failures(), 0, "compactions failed");
    assert_eq!(w.metrics.maintenance().1, 0, "maintenance failed");
    w.shutdown.cancel();
    w.task.await.unwrap();
    h.cleanup().await;
}
