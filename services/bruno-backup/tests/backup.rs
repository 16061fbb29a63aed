//! Backups against real LanceDB tables in temp dirs, a filesystem target
//! and a real S3-compatible server (moto), and the backup part on the real
//! RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bruno_backup::{BackupConfig, BackupError, Engine, Key, Policy, Quiet, S3Config, Target};
use bruno_events::payload::{BackupCompleted, BackupFailed, BackupRequested, EmbedderInfo};
use bruno_events::{AttributesReader, EventData, decode_data, new_event};
use bruno_store::{ChunkRow, DocumentWrite, Store, StoreConfig, TurnRow};
use bruno_system_tests::{Harness, Recorder, S3Server, recv_n};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

const DIM: u32 = 8;

fn info() -> EmbedderInfo {
    EmbedderInfo {
        model: "test/fake".into(),
        dimension: DIM,
    }
}

async fn open(dir: &Path) -> Store {
    Store::open(StoreConfig {
        uri: dir.display().to_string(),
        read_consistency_ms: 0,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn vector(i: usize) -> Vec<f32> {
    let mut v = vec![0.0; DIM as usize];
    v[i % DIM as usize] = 1.0;
    v
}

/// Write `docs` documents of 3 chunks (ids `d<n>:<i>`) and a turn pair per
/// document, one commit per call.
async fn fill(store: &Store, from: usize, docs: usize) {
    let chunks = store.chunks(&info()).await.unwrap();
    let writes: Vec<DocumentWrite> = (from..from + docs)
        .map(|d| {
            let ids: Vec<String> = (0..3).map(|i| format!("d{d}:{i}")).collect();
            DocumentWrite {
                doc_id: format!("d{d}"),
                rows: ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| ChunkRow {
                        id: id.clone(),
                        doc_id: format!("d{d}"),
                        source: "tests".into(),
                        title: Some(format!("Doc {d}")),
                        text: format!(
                            "chunk {i} of document {d} about vorpalite {}",
                            "x".repeat(200)
                        ),
                        content_hash: "h".into(),
                        chunk_index: i as u32,
                        vector: vector(d + i),
                    })
                    .collect(),
                chunk_ids: ids,
            }
        })
        .collect();
    chunks.write(&writes).await.unwrap();
    let turns = store.conversations(&info()).await.unwrap();
    let rows: Vec<TurnRow> = (from..from + docs)
        .flat_map(|d| {
            ["user", "assistant"].map(|role| TurnRow {
                id: format!("t{d}-{role}"),
                session_id: "s1".into(),
                role: role.into(),
                text: format!("{role} turn {d}"),
                correlation_id: format!("c{d}"),
                at_micros: 1_700_000_000_000_000 + d as i64,
                vector: vector(d),
            })
        })
        .collect();
    turns.write(&rows).await.unwrap();
}

fn engine(store: Store, target: Target, key: Key, work: &Path) -> Engine {
    Engine::new(store, target, key, work.to_path_buf(), Policy::default())
}

/// Every file under `dir` with its SHA-256 (to prove a refused restore
/// touched nothing).
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let bytes = std::fs::read(e.path()).unwrap();
            (
                e.path().strip_prefix(dir).unwrap().display().to_string(),
                hex::encode(sha2::Sha256::digest(bytes)),
            )
        })
        .collect()
}

async fn round_trip(target: Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("lancedb")).await;
    fill(&store, 0, 40).await;
    fill(&store, 40, 40).await;
    let key = Key::generate();
    let e = engine(store.clone(), target, key.clone(), &dir.path().join("work"));
    let m = e.run(&[], &Quiet).await.unwrap();
    let rows: BTreeMap<&str, u64> = m.tables.iter().map(|t| (t.name.as_str(), t.rows)).collect();
    assert_eq!(
        rows,
        BTreeMap::from([("chunks", 240), ("conversations", 160)])
    );
    let listed = e.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].complete && listed[0].verified, "{listed:?}");
    // No tag is left pinning a version.
    let chunks = store.raw_table("chunks").await.unwrap().unwrap();
    assert!(
        chunks
            .tags()
            .await
            .unwrap()
            .list()
            .await
            .unwrap()
            .is_empty()
    );
    // Restore into a new location: every row, searchable.
    let to = dir.path().join("restored");
    let r = e
        .restore(&m.backup_id, &to.display().to_string(), false, &Quiet)
        .await
        .unwrap();
    assert_eq!(r.tables.len(), 2);
    let restored = open(&to).await;
    let c = restored.existing_chunks(&info()).await.unwrap().unwrap();
    assert_eq!(c.count(None).await.unwrap(), 240);
    let hits = c
        .search(&vector(3), "vorpalite", 3, &Default::default())
        .await
        .unwrap();
    assert_eq!(hits.len(), 3);
    let t = restored
        .existing_conversations(&info())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.count(Some("s1")).await.unwrap(), 160);
    // And it takes new writes.
    fill(&restored, 80, 1).await;
    assert_eq!(c.count(None).await.unwrap(), 243);
}

#[tokio::test]
async fn a_backup_round_trips_through_a_filesystem_target() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::open(&dir.path().display().to_string(), &S3Config::default()).unwrap();
    round_trip(target).await;
}

#[tokio::test]
async fn a_backup_round_trips_through_a_real_s3_server() {
    let s3 = S3Server::start("bruno-backups").await;
    let config = S3Config {
        endpoint: Some(s3.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        allow_http: true,
    };
    let target = Target::open(&format!("s3://{}/nightly", s3.bucket), &config).unwrap();
    round_trip(target.clone()).await;
    // The objects really are in the bucket, under the prefix.
    let listing = reqwest::get(format!(
        "{}/{}?list-type=2&prefix=nightly/",
        s3.endpoint, s3.bucket
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(
        listing.contains("manifest.json") && listing.contains("verified.json"),
        "{listing}"
    );
}

/// Verify and a forced restore into the live store must both refuse.
async fn refuse(what: &str, e: &Engine, id: &str, live: &Path) -> BackupError {
    let verify = e.verify(id, &Quiet).await;
    assert!(verify.is_err(), "{what}: verify accepted it");
    let err = e
        .restore(id, &live.display().to_string(), true, &Quiet)
        .await
        .expect_err(what);
    println!("{what}: {err}");
    err
}

/// One flipped byte, a truncated object, a missing manifest and a wrong key
/// are each refused by verify and by restore, and the current data is left
/// exactly as it was.
#[tokio::test]
async fn damaged_backups_are_refused_and_the_current_data_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("lancedb");
    let store = open(&live).await;
    fill(&store, 0, 30).await;
    let backups = dir.path().join("backups");
    let target = Target::open(&backups.display().to_string(), &S3Config::default()).unwrap();
    let key = Key::generate();
    let e = engine(
        store.clone(),
        target.clone(),
        key.clone(),
        &dir.path().join("work"),
    );
    let m = e.run(&[], &Quiet).await.unwrap();
    let id = m.backup_id.clone();
    let before = snapshot(&live);
    let biggest = m.tables[0]
        .objects
        .iter()
        .max_by_key(|o| o.size)
        .unwrap()
        .path
        .clone();
    let object = backups.join(&id).join("chunks").join(&biggest);
    let original = std::fs::read(&object).unwrap();

    let mut flipped = original.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    std::fs::write(&object, &flipped).unwrap();
    let err = refuse("flipped byte", &e, &id, &live).await;
    assert!(
        matches!(err, BackupError::Authentication | BackupError::Corrupt(_)),
        "{err}"
    );
    assert_eq!(snapshot(&live), before);

    std::fs::write(&object, &original[..original.len() - 100]).unwrap();
    refuse("truncated object", &e, &id, &live).await;
    assert_eq!(snapshot(&live), before);
    std::fs::write(&object, &original).unwrap();

    let other = engine(
        store.clone(),
        target.clone(),
        Key::generate(),
        &dir.path().join("work2"),
    );
    let err = refuse("wrong key", &other, &id, &live).await;
    assert!(matches!(err, BackupError::WrongKey { .. }), "{err}");
    assert_eq!(snapshot(&live), before);

    let manifest = backups.join(&id).join("manifest.json");
    std::fs::remove_file(&manifest).unwrap();
    let err = refuse("missing manifest", &e, &id, &live).await;
    assert!(err.to_string().contains("no manifest"), "{err}");
    assert_eq!(snapshot(&live), before);
    // An incomplete backup lists as such, and the next run removes it.
    let listed = e.list().await.unwrap();
    assert!(!listed[0].complete, "{listed:?}");
    e.run(&[], &Quiet).await.unwrap();
    let listed = e.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].verified && listed[0].id != id);
}

/// The writer keeps committing, compacting and pruning every old version
/// while a backup runs: the backup is still of one consistent version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_version_cleanup_during_a_backup_do_not_break_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("lancedb")).await;
    for i in 0..10 {
        fill(&store, i * 20, 20).await;
    }
    let target = Target::open(
        &dir.path().join("backups").display().to_string(),
        &S3Config::default(),
    )
    .unwrap();
    let e = Arc::new(engine(
        store.clone(),
        target,
        Key::generate(),
        &dir.path().join("work"),
    ));
    let stop = CancellationToken::new();
    let churn = tokio::spawn({
        let store = store.clone();
        let stop = stop.clone();
        async move {
            let mut n = 0;
            let chunks = store.chunks(&info()).await.unwrap();
            while !stop.is_cancelled() {
                fill(&store, 1000 + n * 5, 5).await;
                chunks.compact().await.unwrap();
                chunks.maintain(chrono::Duration::zero()).await.unwrap();
                n += 1;
            }
            n
        }
    });
    let m = e.run(&[], &Quiet).await.unwrap();
    stop.cancel();
    let rounds = churn.await.unwrap();
    println!("{rounds} write+compact+prune rounds ran during the backup");
    assert!(rounds >= 1, "nothing ran during the backup");
    let chunks = m.tables.iter().find(|t| t.name == "chunks").unwrap();
    // A version is whole documents of 3 chunks.
    assert_eq!(chunks.rows % 3, 0);
    assert!(chunks.rows >= 600, "{}", chunks.rows);
    assert!(e.list().await.unwrap()[0].verified);
}

/// Two requests at once run one backup: the second is answered by the
/// backup that started after it was made.
#[tokio::test]
async fn two_requests_at_once_run_one_backup() {
    let h = Harness::new(vec![
        bruno_broker::PartSpec::on_types("backup", &[BackupRequested::TYPE]).single_active(),
        bruno_broker::PartSpec::on_types("observer", &[BackupCompleted::TYPE, BackupFailed::TYPE]),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("lancedb")).await;
    fill(&store, 0, 20).await;
    let config = BackupConfig {
        interval_minutes: 0,
        ..Default::default()
    };
    let engine = config.engine(store.clone()).unwrap();
    assert!(
        dir.path().join("backup.key").exists(),
        "the key is created beside the store"
    );
    let metrics = bruno_backup::BackupMetrics::default();
    let service = Arc::new(bruno_backup::BackupService::new(
        engine,
        config.clone(),
        metrics.clone(),
    ));
    let stop = CancellationToken::new();
    let part = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "backup",
        1,
        service,
        stop.clone(),
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
    let request = || new_event("tests", &BackupRequested::default());
    h.broker.publish_all(&[request(), request()]).await.unwrap();
    let replies = recv_n(&mut seen, 2, Duration::from_secs(120)).await;
    let done: Vec<BackupCompleted> = replies
        .iter()
        .map(|e| {
            assert_eq!(e.ty(), BackupCompleted::TYPE);
            decode_data(e).unwrap()
        })
        .collect();
    assert_eq!(done[0].backup_id, done[1].backup_id, "{done:?}");
    assert_eq!(done.iter().filter(|d| d.duplicate).count(), 1);
    let listed = config.engine(store.clone()).unwrap().list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(metrics.last_verified() > 0.0);
    // A request for a table that does not exist is answered as failed.
    h.broker
        .publish(&new_event(
            "tests",
            &BackupRequested {
                tables: vec!["nope".into()],
                target: None,
            },
        ))
        .await
        .unwrap();
    let failed = recv_n(&mut seen, 1, Duration::from_secs(60)).await;
    let failed: BackupFailed = decode_data(&failed[0]).unwrap();
    assert!(failed.message.contains("no table nope"), "{failed:?}");
    stop.cancel();
    part.await.unwrap();
    obs_stop.cancel();
    observer.await.unwrap();
    h.cleanup().await;
}
