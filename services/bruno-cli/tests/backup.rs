//! Backups with the whole fleet: the restore drill (ingest, back up while
//! the writer writes, wipe, `bruno restore`, start again) and a backup
//! process SIGKILLed mid-backup. Real RabbitMQ, LanceDB, MiniLM, and the
//! `bruno` binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use bruno_cli::{Config, run_parts};
use bruno_events::payload::{
    BackupCompleted, BackupFailed, BackupRequested, ChatCompleted, ChatContextualized, ChatOptions,
    ChatRequested, DocFormat, DocumentSubmitted, SearchCompleted, SearchFilters, SearchRequested,
    TokenUsage,
};
use bruno_events::{EventData, decode_data, new_event};
use bruno_store::StoreConfig;
use bruno_system_tests::{Harness, backup_config};
use futures_util::TryStreamExt;
use lancedb::arrow::arrow_array::{Array, StringArray};
use lancedb::query::{ExecutableQuery, QueryBase, Select};
use tokio_util::sync::CancellationToken;

fn config(h: &Harness, store: &Path, backups: &Path) -> Config {
    let mut c = Config {
        broker: h.config.clone(),
        store: StoreConfig {
            uri: store.display().to_string(),
            read_consistency_ms: 100,
            ..StoreConfig::default()
        },
        backup: backup_config(backups),
        ..Config::default()
    };
    c.ingress.listen = "127.0.0.1:0".parse().unwrap();
    c.gateway.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c
}

/// The same config as `BRUNO_*` variables, for the `bruno` binary.
fn env(h: &Harness, store: &Path, backups: &Path) -> Vec<(String, String)> {
    let b = backup_config(backups);
    let mut envs: Vec<(String, String)> = bruno_system_tests::broker_env(&h.config)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    envs.extend([
        ("BRUNO_STORE__URI".into(), store.display().to_string()),
        ("BRUNO_BACKUP__TARGET".into(), b.target.unwrap()),
        (
            "BRUNO_BACKUP__KEY_FILE".into(),
            b.key_file.unwrap().display().to_string(),
        ),
        (
            "BRUNO_BACKUP__WORK_DIR".into(),
            b.work_dir.unwrap().display().to_string(),
        ),
        ("BRUNO_BACKUP__INTERVAL_MINUTES".into(), "0".into()),
        ("BRUNO_ADMIN__LISTEN".into(), "127.0.0.1:0".into()),
        ("BRUNO_LOG__FILTER".into(), "warn".into()),
    ]);
    envs
}

struct Fleet {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Fleet {
    async fn start(config: Config, parts: &[&str]) -> Self {
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_parts(config, parts, stop.clone(), Some(tx)));
        rx.await.expect("parts did not start");
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn document(n: usize) -> DocumentSubmitted {
    DocumentSubmitted {
        doc_id: format!("doc-{n}"),
        source: "drill".into(),
        title: Some(format!("Runbook page {n}")),
        text: format!(
            "# Page {n}\n\nThe {n}th procedure: restart the vorpalite service number {n} \
             after draining its queue, then check the dashboard for errors."
        ),
        format: DocFormat::Markdown,
        metadata: BTreeMap::new(),
    }
}

fn turn(n: usize) -> bruno_events::Event {
    let mut e = new_event(
        "tests",
        &ChatCompleted {
            session_id: "drill-session".into(),
            question: format!("question {n} about the kettle"),
            answer: format!("answer {n}: descale it with vinegar"),
            citations: vec![],
            usage: TokenUsage::default(),
            model: "stub".into(),
            fallback: false,
            question_vector: None,
        },
    );
    e.set_extension(
        bruno_events::ext::CORRELATION_ID,
        bruno_events::ExtensionValue::String(format!("drill-turn-{n}")),
    );
    e
}

/// `len` characters of pseudo-random hex (a fixed LCG seeded with `seed`).
fn noise(seed: usize, len: usize) -> String {
    let mut x = seed as u64 ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from_digit(((x >> 60) & 0xf) as u32, 16).unwrap_or('0')
        })
        .collect()
}

async fn table(store: &Path, name: &str) -> lancedb::Table {
    lancedb::connect(&store.display().to_string())
        .execute()
        .await
        .unwrap()
        .open_table(name)
        .execute()
        .await
        .unwrap()
}

/// The row ids of a table, at `version` when given.
async fn ids(store: &Path, name: &str, version: Option<u64>) -> HashSet<String> {
    let t = table(store, name).await;
    if let Some(v) = version {
        t.checkout(v).await.unwrap();
    }
    let batches: Vec<_> = t
        .query()
        .select(Select::columns(&["id"]))
        .execute()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut out = HashSet::new();
    for b in batches {
        let col = b
            .column_by_name("id")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .clone();
        for i in 0..col.len() {
            out.insert(col.value(i).to_owned());
        }
    }
    out
}

async fn count(store: &Path, name: &str) -> usize {
    match lancedb::connect(&store.display().to_string())
        .execute()
        .await
        .unwrap()
        .open_table(name)
        .execute()
        .await
    {
        Ok(t) => t.count_rows(None).await.unwrap(),
        Err(_) => 0,
    }
}

async fn eventually(timeout: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn request_backup(h: &Harness) -> BackupCompleted {
    let reply = bruno_broker::reply::request(
        &h.broker,
        new_event("tests", &BackupRequested::default()),
        &[BackupCompleted::TYPE, BackupFailed::TYPE],
        Duration::from_secs(300),
    )
    .await
    .unwrap();
    match decode_data::<BackupCompleted>(&reply) {
        Ok(done) => done,
        Err(_) => panic!("{:?}", decode_data::<BackupFailed>(&reply)),
    }
}

fn bruno(envs: &[(String, String)], args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bruno"))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap()
}

/// The drill: documents and chat turns in, a backup while the writer keeps
/// writing, the storage wiped, `bruno restore --latest`, the fleet started
/// again: every row of the backed-up version is back, search and chat
/// memory work, and the tables take new writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_drill_brings_back_every_row_of_the_backed_up_version() {
    let h = Harness::new(bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("lancedb");
    let backups = dir.path().join("backup-volume");
    const PARTS: [&str; 4] = ["embedder", "writer", "retriever", "backup"];
    let fleet = Fleet::start(config(&h, &store, &backups), &PARTS).await;

    let docs: Vec<_> = (0..30).map(|n| new_event("tests", &document(n))).collect();
    h.broker.publish_all(&docs).await.unwrap();
    let turns: Vec<_> = (0..8).map(turn).collect();
    h.broker.publish_all(&turns).await.unwrap();
    eventually(
        Duration::from_secs(120),
        "30 documents and 16 turns",
        async || count(&store, "chunks").await >= 30 && count(&store, "conversations").await == 16,
    )
    .await;

    // The writer keeps writing while the backup runs.
    let writing = CancellationToken::new();
    let writer_load = tokio::spawn({
        let broker = h.broker.clone();
        let writing = writing.clone();
        async move {
            let mut n = 1000;
            while !writing.is_cancelled() {
                broker
                    .publish(&new_event("tests", &document(n)))
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            n - 1000
        }
    });
    let done = request_backup(&h).await;
    writing.cancel();
    let extra = writer_load.await.unwrap();
    println!("{extra} documents were sent while the backup ran");
    assert!(!done.duplicate);
    tokio::time::sleep(Duration::from_secs(2)).await; // let the writer settle
    fleet.stop().await;

    let version = |name: &str| done.tables.iter().find(|t| t.name == name).unwrap().version;
    let expected_chunks = ids(&store, "chunks", Some(version("chunks"))).await;
    let expected_turns = ids(&store, "conversations", Some(version("conversations"))).await;
    assert!(expected_chunks.len() >= 30 && expected_turns.len() == 16);
    let rows = |name: &str| done.tables.iter().find(|t| t.name == name).unwrap().rows;
    assert_eq!(rows("chunks") as usize, expected_chunks.len());

    // Disaster: the storage is gone.
    std::fs::remove_dir_all(&store).unwrap();
    let envs = env(&h, &store, &backups);
    let started = Instant::now();
    let out = bruno(&envs, &["restore", "--latest", "--json"]);
    let restore_secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["backup_id"], done.backup_id.as_str());
    println!(
        "restore of {} chunks and {} turns took {restore_secs:.2} s (bruno restore, download and checks included)",
        expected_chunks.len(),
        expected_turns.len()
    );
    assert_eq!(ids(&store, "chunks", None).await, expected_chunks);
    assert_eq!(ids(&store, "conversations", None).await, expected_turns);

    // The fleet runs on the restored tables.
    let fleet = Fleet::start(config(&h, &store, &backups), &PARTS).await;
    let search = bruno_broker::reply::request(
        &h.broker,
        new_event(
            "tests",
            &SearchRequested {
                query: "restart the vorpalite service number 7".into(),
                k: 3,
                filters: SearchFilters::default(),
                mode: Default::default(),
            },
        ),
        &[SearchCompleted::TYPE],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let hits = decode_data::<SearchCompleted>(&search).unwrap().hits;
    assert_eq!(hits[0].doc_id, "doc-7", "{hits:?}");
    let context = bruno_broker::reply::request(
        &h.broker,
        new_event(
            "tests",
            &ChatRequested {
                session_id: "drill-session".into(),
                message: "how do I descale the kettle?".into(),
                options: ChatOptions::default(),
            },
        ),
        &[ChatContextualized::TYPE],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let memory = decode_data::<ChatContextualized>(&context).unwrap().memory;
    assert!(
        memory
            .iter()
            .any(|m| m.text.contains("descale it with vinegar")),
        "{memory:?}"
    );
    // And takes new writes.
    h.broker
        .publish(&new_event("tests", &document(5000)))
        .await
        .unwrap();
    h.broker.publish(&turn(99)).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "new writes after the restore",
        async || {
            count(&store, "chunks").await > expected_chunks.len()
                && count(&store, "conversations").await == expected_turns.len() + 2
        },
    )
    .await;
    fleet.stop().await;
    h.cleanup().await;
}

/// A backup process SIGKILLed mid-backup leaves nothing that lists as
/// complete; the next run removes its leftovers and its tag and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_midway_leaves_nothing_complete_and_the_next_run_succeeds() {
    let h = Harness::new(bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("lancedb");
    let backups = dir.path().join("backup-volume");
    // A table of ~20 MB, uploaded at 2 MiB/s: seconds to catch it midway.
    {
        let s = bruno_system_tests::open_store(&store).await;
        let chunks = s
            .chunks(&bruno_store::EmbedderInfo {
                model: "test/fake".into(),
                dimension: 384,
            })
            .await
            .unwrap();
        let filling = Instant::now();
        for batch in 0..2 {
            let writes: Vec<bruno_store::DocumentWrite> = (0..100)
                .map(|d| {
                    let doc = format!("big-{batch}-{d}");
                    let ids: Vec<String> = (0..10).map(|i| format!("{doc}:{i}")).collect();
                    bruno_store::DocumentWrite {
                        doc_id: doc.clone(),
                        rows: ids
                            .iter()
                            .enumerate()
                            .map(|(i, id)| bruno_store::ChunkRow {
                                id: id.clone(),
                                doc_id: doc.clone(),
                                source: "bulk".into(),
                                title: None,
                                // Incompressible, so the table really is ~20 MB.
                                text: format!(
                                    "{id} {}",
                                    noise(batch * 100_000 + d * 10 + i, 10_000)
                                ),
                                content_hash: "h".into(),
                                chunk_index: i as u32,
                                vector: (0..384)
                                    .map(|k| ((k * 31 + i) % 97) as f32 / 97.0)
                                    .collect(),
                            })
                            .collect(),
                        chunk_ids: ids,
                    }
                })
                .collect();
            chunks.write(&writes).await.unwrap();
        }
        println!("filled 2,000 chunks in {:?}", filling.elapsed());
    }
    let mut envs = env(&h, &store, &backups);
    envs.push(("BRUNO_BACKUP__MAX_MIB_PER_SEC".into(), "2".into()));
    let spawn = |envs: &[(String, String)]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bruno"))
            .arg("backup")
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut part = spawn(&envs);
    h.broker
        .publish(&new_event("tests", &BackupRequested::default()))
        .await
        .unwrap();
    // Kill it while it uploads: the clone of the pinned version exists in
    // its scratch space, and at 2 MiB/s the ~20 MB take seconds.
    let target = backups.join("backups");
    let work = backups.join("backup-work");
    let started = Instant::now();
    loop {
        let cloned = walkdir::WalkDir::new(&work)
            .into_iter()
            .filter_map(Result::ok)
            .any(|e| e.path().ends_with("_versions"));
        if cloned {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the backup never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    println!("killing the backup part after {:?}", started.elapsed());
    part.kill().unwrap(); // SIGKILL
    part.wait().unwrap();
    let written: Vec<String> = walkdir::WalkDir::new(&target)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(
        !written.iter().any(|f| f.ends_with("manifest.json")),
        "the manifest was written before the kill: {written:?}"
    );
    let list = bruno(&envs, &["backup", "list", "--json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0]["complete"], false,
        "a killed backup must not list as complete"
    );
    let verify = bruno(
        &envs,
        &["backup", "verify", listed[0]["id"].as_str().unwrap()],
    );
    assert!(
        !verify.status.success(),
        "verify accepted an incomplete backup"
    );
    assert!(String::from_utf8_lossy(&verify.stderr).contains("no manifest"));

    // A kill while the version is pinned (during the clone) leaves its tag.
    table(&store, "chunks")
        .await
        .tags()
        .await
        .unwrap()
        .create("bruno-backup-killed-while-cloning", 1)
        .await
        .unwrap();
    // The next run: the leftovers and the tag go, the backup succeeds.
    envs.retain(|(k, _)| k != "BRUNO_BACKUP__MAX_MIB_PER_SEC");
    let mut part = spawn(&envs);
    println!("listed and verified; next run");
    let run = bruno(&envs, &["backup", "run", "--json", "--timeout", "120"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let done: BackupCompleted = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(done.tables[0].rows, 2_000);
    let list = bruno(&envs, &["backup", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], done.backup_id.as_str());
    assert_eq!(listed[0]["verified"], true);
    let tags = table(&store, "chunks")
        .await
        .tags()
        .await
        .unwrap()
        .list()
        .await
        .unwrap();
    assert!(tags.is_empty(), "{tags:?}");
    part.kill().unwrap();
    part.wait().unwrap();
    h.cleanup().await;
}
