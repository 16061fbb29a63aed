//! The knowledge pipeline end to end: real RabbitMQ (unique prefix), real
//! LanceDB in a temp dir, the real MiniLM model (scripts/fetch-model.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bruno_broker::{PartSpec, codec, dlq};
use bruno_cli::{Bound, Config, run_parts};
use bruno_embed::{EmbedderInfo, MiniLm, default_model_dir};
use bruno_embedder::{ChunkingConfig, chunk_id, content_hash, split};
use bruno_events::payload::{
    DocFormat, DocumentSubmitted, MemoryWrite, SearchCompleted, SearchFilters, SearchRequested,
};
use bruno_events::{EventData, decode_data, new_event};
use bruno_store::{Store, StoreConfig};
use bruno_system_tests::{BrokerKind, Harness, Recorder, open_store, recv_n};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn minilm() -> MiniLm {
    MiniLm::load(&default_model_dir()).unwrap_or_else(|e| panic!("{e}; run scripts/fetch-model.sh"))
}

fn config(h: &Harness, dir: &Path) -> Config {
    let mut c = Config {
        broker: h.config.clone(),
        store: StoreConfig {
            uri: dir.display().to_string(),
            read_consistency_ms: 100,
            ..StoreConfig::default()
        },
        backup: bruno_system_tests::backup_config(dir),
        ..Config::default()
    };
    c.ingress.listen = "127.0.0.1:0".parse().unwrap();
    c.gateway.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c.writer.batch_ms = 100;
    c
}

struct InProc {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    bound: Bound,
}

impl InProc {
    async fn start(config: Config, parts: &[&str]) -> Self {
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_parts(config, parts, shutdown.clone(), Some(tx)));
        let bound = rx.await.expect("parts did not start");
        Self {
            shutdown,
            task,
            bound,
        }
    }

    /// On the harness's broker, whichever it is.
    async fn start_on(h: &Harness, config: Config, parts: &[&str]) -> Self {
        let shutdown = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = bruno_system_tests::spawn_fleet(h, config, parts, shutdown.clone(), Some(tx));
        let bound = rx.await.expect("parts did not start");
        Self {
            shutdown,
            task,
            bound,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.bound.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The value of the unlabelled counter `name` in a Prometheus text page.
fn counter(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics page:\n{page}"))
}

async fn post(ingress: std::net::SocketAddr, doc: &DocumentSubmitted) {
    let r = reqwest::Client::new()
        .post(format!("http://{ingress}/"))
        .header("ce-specversion", "1.0")
        .header("ce-id", uuid::Uuid::new_v4().to_string())
        .header("ce-type", DocumentSubmitted::TYPE)
        .header("ce-source", "tests")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(doc).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
}

fn doc(doc_id: &str, title: &str, text: &str) -> DocumentSubmitted {
    DocumentSubmitted {
        doc_id: doc_id.into(),
        source: "handbook".into(),
        title: Some(title.into()),
        text: text.into(),
        format: DocFormat::Markdown,
        metadata: BTreeMap::new(),
    }
}

/// Poll `check` until it holds or `timeout` passes (then panic with `what`).
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn search(
    h: &Harness,
    query: &str,
    k: u32,
    filters: SearchFilters,
) -> Vec<bruno_events::payload::SearchHit> {
    let request = new_event(
        "tests",
        &SearchRequested {
            query: query.into(),
            k,
            filters,
            mode: Default::default(),
        },
    );
    let reply = bruno_broker::reply::request(
        &h.broker,
        request,
        &[SearchCompleted::TYPE],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    decode_data::<SearchCompleted>(&reply).unwrap().hits
}

fn info() -> EmbedderInfo {
    EmbedderInfo {
        model: MODEL.into(),
        dimension: 384,
    }
}

/// A deterministic ~230-word document (two chunks) with one unique keyword.
fn generated(i: usize) -> DocumentSubmitted {
    const WORDS: &[&str] = &[
        "river", "engine", "ledger", "harvest", "signal", "garden", "market", "bridge", "winter",
        "copper", "lantern", "meadow", "harbor", "circuit", "orchard", "canyon", "timber",
        "voyage", "thunder", "pepper", "silver", "candle", "forest", "anchor", "marble", "saddle",
        "beacon", "falcon", "glacier", "velvet",
    ];
    let mut state = (i as u64 + 1).wrapping_mul(6364136223846793005);
    let mut word = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        WORDS[(state >> 33) as usize % WORDS.len()]
    };
    let mut text = format!("# Report {i}\n\n");
    for s in 0..24 {
        if s == 11 {
            text.push_str(&format!("The code word is kw{i}zq. "));
        }
        let sentence: Vec<&str> = (0..9).map(|_| word()).collect();
        text.push_str(&sentence.join(" "));
        text.push_str(if s % 4 == 3 { ".\n\n" } else { ". " });
    }
    doc(&format!("gen/{i:03}.md"), &format!("Report {i}"), &text)
}

/// The embedder's dead letters, once there are at least `n` (30 s at most).
async fn dead_letters(h: &Harness, n: usize) -> Vec<dlq::DeadLetter> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let letters = dlq::list(&h.broker, "embedder", 10).await.unwrap();
        if letters.len() >= n {
            return letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} dead letters: {letters:?}",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spawn_part(part: &str, h: &Harness, dir: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_bruno"))
        .arg(part)
        .envs(bruno_system_tests::broker_env(&h.config))
        .env("BRUNO_STORE__URI", dir.display().to_string())
        .env("BRUNO_STORE__READ_CONSISTENCY_MS", "100")
        .env("BRUNO_ADMIN__LISTEN", "127.0.0.1:0")
        .env("BRUNO_WRITER__BATCH_MS", "100")
        .env("BRUNO_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn kill(mut child: tokio::process::Child) {
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_documents_exactly_once_across_killed_embedder_and_writer() {
    let h = Harness::new(bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let ingress = InProc::start(config(&h, dir.path()), &["ingress"]).await;
    let mut embedder = spawn_part("embedder", &h, dir.path());
    let mut writer = spawn_part("writer", &h, dir.path());

    // What the table must hold: every chunk of every document, once.
    let counter = bruno_embedder::counting_tokenizer(minilm().tokenizer()).unwrap();
    let chunking = ChunkingConfig::default();
    let docs: Vec<DocumentSubmitted> = (0..200).map(generated).collect();
    let mut expected = HashSet::new();
    for d in &docs {
        let hash = content_hash(d, &chunking);
        let n = split(&chunking, Some(counter.clone()), d.format, &d.text).len();
        assert!(n >= 1);
        expected.extend((0..n).map(|i| (chunk_id(&d.doc_id, &hash, i), d.doc_id.clone())));
    }

    let addr = ingress.bound.ingress.unwrap();
    futures_util::future::join_all(docs.iter().map(|d| post(addr, d))).await;

    let store = open_store(dir.path()).await;
    let rows = |min: usize| {
        let store = store.clone();
        async move {
            match store.existing_chunks(&info()).await.unwrap() {
                Some(t) => t.count(None).await.unwrap() >= min,
                None => false,
            }
        }
    };
    // Kill both mid-run (SIGKILL: no graceful anything), then start new ones.
    eventually(Duration::from_secs(300), "a first third indexed", || {
        rows(expected.len() / 3)
    })
    .await;
    kill(embedder).await;
    kill(writer).await;
    embedder = spawn_part("embedder", &h, dir.path());
    writer = spawn_part("writer", &h, dir.path());
    // And the writer once more, later.
    eventually(Duration::from_secs(300), "two thirds indexed", || {
        rows(expected.len() * 2 / 3)
    })
    .await;
    kill(writer).await;
    writer = spawn_part("writer", &h, dir.path());

    eventually(Duration::from_secs(300), "every chunk indexed", || {
        rows(expected.len())
    })
    .await;
    eventually(Duration::from_secs(60), "queues drained", || async {
        h.depth(&h.queue("embedder")).await == 0 && h.depth(&h.queue("writer")).await == 0
    })
    .await;
    let table = store.chunks(&info()).await.unwrap();
    let ids = table.ids().await.unwrap();
    let stored: HashSet<(String, String)> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), stored.len(), "a chunk is stored twice");
    assert_eq!(
        stored, expected,
        "stored chunks differ from the documents' chunks"
    );
    for part in ["embedder", "writer"] {
        let letters = dlq::list(&h.broker, part, 10).await.unwrap();
        assert!(letters.is_empty(), "dead letters in {part}: {letters:?}");
    }
    eprintln!(
        "200 documents, {} chunks, each stored once after 3 kills",
        ids.len()
    );

    kill(embedder).await;
    kill(writer).await;
    ingress.stop().await;
    h.cleanup().await;
}

const GEOLOGY: &str = "# Field notes on vorpalite\n\nVorpalite is a rare blue mineral found in basalt \
    caves of the northern ridge. Samples crumble when exposed to humid air, so store them sealed.";
const KETTLE: &str = "# Kettle care\n\nDescale the kettle every month with citric acid: limescale \
    from hard water makes the heating element slow and noisy.";
const OTHERS: &[(&str, &str, &str)] = &[
    (
        "tax.md",
        "Filing taxes",
        "# Filing taxes\n\nSubmit the annual tax return before April. Keep receipts for deductions.",
    ),
    (
        "bikes.md",
        "Bicycle repair",
        "# Bicycle repair\n\nTo fix a flat tyre, remove the wheel, patch the inner tube and reinflate it.",
    ),
    (
        "python.md",
        "Python tips",
        "# Python tips\n\nUse virtual environments to isolate project dependencies; pin versions in a lock file.",
    ),
    (
        "garden.md",
        "Tomatoes",
        "# Growing tomatoes\n\nTomatoes need six hours of sun, deep watering and a stake for support.",
    ),
    (
        "dogs.md",
        "Puppy training",
        "# Puppy training\n\nReward the puppy with treats right after it sits on command; keep sessions short.",
    ),
    (
        "sql.md",
        "Database indexes",
        "# Database indexes\n\nAn index on the filtered column turns a full table scan into a quick lookup.",
    ),
];

async fn search_finds_keywords_and_paraphrases_and_changed_documents_replace_their_chunks(
    kind: BrokerKind,
) {
    let h = Harness::on(kind, bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let fleet =
        InProc::start_on(&h, config(&h, dir.path()), &bruno_cli::registry::runnable()).await;
    let addr = fleet.bound.ingress.unwrap();
    let chunking = ChunkingConfig::default();
    let store = open_store(dir.path()).await;
    let stored_hash = |doc_id: &'static str| {
        let store = store.clone();
        async move {
            match store.existing_chunks(&info()).await.unwrap() {
                Some(t) => t.content_hash(doc_id).await.unwrap(),
                None => None,
            }
        }
    };

    let mut all = vec![
        doc("geology.md", "Vorpalite", GEOLOGY),
        doc("kettle.md", "Kettle care", KETTLE),
    ];
    all.extend(OTHERS.iter().map(|(id, title, text)| doc(id, title, text)));
    for d in &all {
        post(addr, d).await;
    }
    for d in &all {
        let want = content_hash(d, &chunking);
        let id: &'static str = Box::leak(d.doc_id.clone().into_boxed_str());
        eventually(Duration::from_secs(120), &format!("{id} indexed"), || {
            let want = want.clone();
            let f = stored_hash(id);
            async move { f.await.as_deref() == Some(want.as_str()) }
        })
        .await;
    }

    // Full-text path: the exact rare keyword finds its document first.
    let hits = search(&h, "vorpalite", 5, SearchFilters::default()).await;
    assert_eq!(hits[0].doc_id, "geology.md", "{hits:?}");
    assert_eq!(hits[0].title.as_deref(), Some("Vorpalite"));
    assert_eq!(hits[0].source, "handbook");
    // Vector path: a paraphrase sharing no word with the document.
    let hits = search(
        &h,
        "how do I get rid of mineral buildup in my water boiler?",
        3,
        SearchFilters::default(),
    )
    .await;
    assert!(
        hits.iter().any(|h| h.doc_id == "kettle.md"),
        "kettle.md not in the top 3: {hits:?}"
    );

    // Filter values are data, never SQL.
    for evil in [
        "x' OR '1'='1",
        "handbook' OR source != '",
        "'; DROP TABLE chunks; --",
        "\\' OR 1=1 --",
    ] {
        let hits = search(
            &h,
            "vorpalite",
            5,
            SearchFilters {
                source: Some(evil.into()),
                doc_id: None,
            },
        )
        .await;
        assert!(hits.is_empty(), "filter {evil:?} matched {hits:?}");
        let hits = search(
            &h,
            "vorpalite",
            5,
            SearchFilters {
                source: None,
                doc_id: Some(evil.into()),
            },
        )
        .await;
        assert!(hits.is_empty(), "filter {evil:?} matched {hits:?}");
    }
    let hits = search(
        &h,
        "vorpalite",
        5,
        SearchFilters {
            source: Some("handbook".into()),
            doc_id: Some("geology.md".into()),
        },
    )
    .await;
    assert!(
        !hits.is_empty() && hits.iter().all(|h| h.doc_id == "geology.md"),
        "{hits:?}"
    );

    // Unchanged: nothing is embedded or written. Counted by the writer's
    // commits, not by the table's version: the writer compacts the table
    // once writes pause (`writer.compact_idle_ms`), and that maintenance
    // may land at any moment here without a row written.
    let commits = counter(&fleet.metrics().await, "bruno_writer_commits_total");
    assert!(commits > 0, "the documents above were never committed");
    post(addr, &all[0]).await;
    eventually(
        Duration::from_secs(60),
        "the unchanged document skipped",
        || async {
            fleet
                .metrics()
                .await
                .contains("bruno_embedder_unchanged_total 1")
        },
    )
    .await;
    assert_eq!(
        counter(&fleet.metrics().await, "bruno_writer_commits_total"),
        commits,
        "an unchanged document was written"
    );

    // Changed: the new version replaces every old chunk.
    let v2 = doc(
        "geology.md",
        "Basalt caves",
        "# Basalt caves\n\nThe northern ridge has basalt caves with blue crystals.",
    );
    post(addr, &v2).await;
    let want = content_hash(&v2, &chunking);
    eventually(Duration::from_secs(60), "version 2 indexed", || {
        let want = want.clone();
        let f = stored_hash("geology.md");
        async move { f.await.as_deref() == Some(want.as_str()) }
    })
    .await;
    let table = store.chunks(&info()).await.unwrap();
    assert_eq!(table.count(Some("geology.md")).await.unwrap(), 1);
    let hits = search(
        &h,
        "vorpalite humid air sealed",
        10,
        SearchFilters::default(),
    )
    .await;
    assert!(
        hits.iter()
            .all(|h| !h.text.to_lowercase().contains("vorpalite")),
        "old text still searchable: {hits:?}"
    );

    fleet.stop().await;
    h.cleanup().await;
}

bruno_system_tests::on_both!(
    search_finds_keywords_and_paraphrases_and_changed_documents_replace_their_chunks
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_documents_and_a_foreign_embedder_are_dead_lettered_and_the_pipeline_goes_on() {
    let mut parts = bruno_cli::registry::part_specs();
    parts.push(PartSpec::on_types("observer", &[MemoryWrite::TYPE]));
    let h = Harness::new(parts).await;
    let dir = tempfile::tempdir().unwrap();
    let fleet = InProc::start(config(&h, dir.path()), &["embedder"]).await;
    let (recorder, mut writes) = Recorder::new();
    let obs_stop = CancellationToken::new();
    let observer = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        "observer",
        8,
        recorder,
        obs_stop.clone(),
    ));

    // Each bad body rides on a valid event's headers.
    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "empty",
            br#"{"doc_id":"empty","source":"s","text":"   "}"#.to_vec(),
        ),
        (
            "huge",
            serde_json::to_vec(&doc("huge", "Huge", &"a".repeat(50 << 20))).unwrap(),
        ),
        (
            "utf8",
            b"{\"doc_id\":\"utf8\",\"source\":\"s\",\"text\":\"caf\xe9 \xff\xfe\"}".to_vec(),
        ),
        ("noid", br#"{"source":"s","text":"no id here"}"#.to_vec()),
    ];
    let mut ids = BTreeMap::new();
    for (name, body) in &bad {
        let template = new_event("tests", &doc(name, name, "placeholder"));
        ids.insert(
            bruno_events::AttributesReader::id(&template).to_owned(),
            *name,
        );
        let (props, _) = codec::encode(&template).unwrap();
        h.broker
            .publish_raw(&h.topology.names.exchange(), "", props, body)
            .await
            .unwrap();
    }
    let good = new_event(
        "tests",
        &doc("good.md", "Good", "# Good\n\nA perfectly fine document."),
    );
    h.broker.publish(&good).await.unwrap();

    let got = recv_n(&mut writes, 1, Duration::from_secs(60)).await;
    let MemoryWrite::Chunks(write) = decode_data(&got[0]).unwrap() else {
        panic!("a document becomes chunks");
    };
    assert_eq!(write.doc_id, "good.md");
    assert_eq!(write.embedder, info());
    assert!(write.rows.iter().all(|r| r.vector.len() == 384));

    let letters = dead_letters(&h, 4).await;
    assert_eq!(letters.len(), 4, "{letters:?}");
    for l in &letters {
        let name = ids[&l.id];
        assert_eq!(l.code, "invalid_payload", "{name}: {l:?}");
        assert_eq!(l.attempts, 1, "{name}: permanent errors are not retried");
        let expect: &[&str] = match name {
            "empty" => &["data.text"],
            "huge" => &["exceeds the limit"],
            "utf8" => &["utf-8", "unicode"],
            _ => &["doc_id"],
        };
        let reason = l.reason.to_lowercase();
        assert!(
            expect.iter().any(|e| reason.contains(e)),
            "{name}: {}",
            l.reason
        );
    }
    fleet.stop().await;

    // A table filled by another embedder refuses this one, with a clear reason.
    let other = tempfile::tempdir().unwrap();
    let foreign = Store::open(StoreConfig {
        uri: other.path().display().to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    foreign
        .chunks(&EmbedderInfo {
            model: "acme/other-model".into(),
            dimension: 768,
        })
        .await
        .unwrap();
    dlq::purge(&h.broker, "embedder").await.unwrap();
    let fleet = InProc::start(config(&h, other.path()), &["embedder"]).await;
    h.broker
        .publish(&new_event("tests", &doc("x.md", "X", "# X\n\nSome text.")))
        .await
        .unwrap();
    let letters = dead_letters(&h, 1).await;
    assert!(
        letters[0].reason.contains("acme/other-model/768")
            && letters[0].reason.contains(&format!("{MODEL}/384")),
        "{}",
        letters[0].reason
    );

    fleet.stop().await;
    obs_stop.cancel();
    observer.await.unwrap();
    h.cleanup().await;
}

/// Runs `bruno ingest <dir> --wait --json` against the fleet; returns its
/// exit status and JSON report.
async fn ingest_and_wait(
    h: &Harness,
    ingress: std::net::SocketAddr,
    dir: &Path,
) -> (bool, serde_json::Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bruno"))
        .args([
            "ingest",
            "--wait",
            "--json",
            "--concurrency",
            "8",
            "--wait-timeout",
            "300",
        ])
        .arg("--url")
        .arg(format!("http://{ingress}/"))
        .arg(dir)
        .envs(bruno_system_tests::broker_env(&h.config))
        .output()
        .await
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_documents_are_all_accounted_for_and_nothing_is_unroutable() {
    let h = Harness::new(bruno_cli::registry::part_specs()).await;
    let store_dir = tempfile::tempdir().unwrap();
    let docs = tempfile::tempdir().unwrap();
    for i in 0..1000 {
        std::fs::write(
            docs.path().join(format!("note-{i:04}.md")),
            format!(
                "# Note {i}\n\nField note number {i} about rock sample {}.",
                i * 7
            ),
        )
        .unwrap();
    }
    let mut c = config(&h, store_dir.path());
    c.chunking.max_document_bytes = 2_000;
    let fleet = InProc::start(c, &["ingress", "embedder", "writer"]).await;
    let ingress = fleet.bound.ingress.unwrap();

    let (ok, report) = ingest_and_wait(&h, ingress, docs.path()).await;
    assert!(ok, "{report}");
    assert_eq!(report["files"]["accepted"], 1000, "{report}");
    assert_eq!(report["wait"]["indexed"], 1000, "{report}");
    assert_eq!(report["wait"]["failed"], serde_json::json!([]));
    assert_eq!(report["wait"]["pending"], serde_json::json!([]));
    let store = open_store(store_dir.path()).await;
    let table = store
        .existing_chunks(&EmbedderInfo {
            model: MODEL.into(),
            dimension: 384,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(table.count(None).await.unwrap(), 1000);
    // Every document.indexed went to the waiting CLI: none to the observed
    // queue, none unroutable.
    let names = bruno_broker::Names::new(h.config.prefix.clone());
    assert_eq!(h.depth(&names.unroutable()).await, 0);
    assert_eq!(h.depth(&names.observed()).await, 0);

    // Again, unchanged, plus one document too big to embed: the unchanged
    // ones count as searchable at once, the big one as failed, and the CLI
    // says so with a non-zero exit.
    std::fs::write(
        docs.path().join("huge.md"),
        "# Huge\n\n".to_owned() + &"rock ".repeat(1_000),
    )
    .unwrap();
    let (ok, report) = ingest_and_wait(&h, ingress, docs.path()).await;
    assert!(!ok, "{report}");
    assert_eq!(report["wait"]["indexed"], 1000, "{report}");
    let failed = report["wait"]["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{report}");
    assert!(
        failed[0][0].as_str().unwrap().ends_with("huge.md"),
        "{report}"
    );
    assert!(
        failed[0][1].as_str().unwrap().contains("invalid_payload"),
        "{report}"
    );
    assert_eq!(table.count(None).await.unwrap(), 1000);
    assert_eq!(h.depth(&names.unroutable()).await, 0);

    fleet.stop().await;
    h.cleanup().await;
}

/// A long markdown document: sections of 9-word sentences, enough for at
/// least `chunks` chunks of `chunking`.
fn long_document(chunking: &ChunkingConfig, chunks: usize) -> String {
    let counter = bruno_embedder::counting_tokenizer(minilm().tokenizer()).unwrap();
    let mut words = 40 * chunks;
    loop {
        let mut text = String::from("# Long field manual\n\n");
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let base = generated(7).text;
        let pool: Vec<&str> = base
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| w.len() > 2)
            .collect();
        for n in 0..words {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if n % 400 == 0 {
                text.push_str(&format!("\n\n## Section {}\n\n", n / 400));
            }
            text.push_str(pool[(state % pool.len() as u64) as usize]);
            text.push_str(if n % 9 == 8 { ". " } else { " " });
        }
        let n = split(chunking, Some(counter.clone()), DocFormat::Markdown, &text).len();
        if n >= chunks {
            return text;
        }
        words = words * chunks / n.max(1) + 100;
    }
}

/// Issue 14: a long document is split once, then embedded as batches that
/// any embedder replica takes and each is retried on its own (ADR 16).
/// Its embedders are SIGKILLed in turn while its 1,000+ chunks are
/// embedded: every batch finishes between two kills, where the whole
/// document as one unit of work never would, and `bruno ingest --wait`
/// returns only once every chunk is stored, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_chunk_document_is_indexed_exactly_once_while_its_embedders_are_killed() {
    let h = Harness::new(bruno_cli::registry::part_specs()).await;
    let dir = tempfile::tempdir().unwrap();
    let docs = tempfile::tempdir().unwrap();
    // Small chunks keep the dev-profile embedding time short; the batching
    // is the same at any chunk size.
    let chunking = ChunkingConfig {
        chunk_tokens: 48,
        overlap_tokens: 8,
        ..ChunkingConfig::default()
    };
    let text = long_document(&chunking, 1_000);
    let expected_chunks = split(
        &chunking,
        Some(bruno_embedder::counting_tokenizer(minilm().tokenizer()).unwrap()),
        DocFormat::Markdown,
        &text,
    )
    .len();
    std::fs::write(docs.path().join("manual.md"), &text).unwrap();

    let ingress = InProc::start(config(&h, dir.path()), &["ingress"]).await;
    let embedder = |h: &Harness| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_bruno"));
        c.arg("embedder")
            .envs(bruno_system_tests::broker_env(&h.config))
            .env("BRUNO_STORE__URI", dir.path().display().to_string())
            .env("BRUNO_STORE__READ_CONSISTENCY_MS", "100")
            .env("BRUNO_ADMIN__LISTEN", "127.0.0.1:0")
            .env("BRUNO_CHUNKING__CHUNK_TOKENS", "48")
            .env("BRUNO_CHUNKING__OVERLAP_TOKENS", "8")
            .env("BRUNO_LOG__FILTER", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        c.spawn().unwrap()
    };
    let mut embedders = [embedder(&h), embedder(&h)];
    let writer = spawn_part("writer", &h, dir.path());

    let addr = ingress.bound.ingress.unwrap();
    let wait = {
        let h_config = h.config.clone();
        let docs = docs.path().to_owned();
        tokio::spawn(async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_bruno"))
                .args(["ingest", "--wait", "--json", "--wait-timeout", "600"])
                .arg("--url")
                .arg(format!("http://{addr}/"))
                .arg(docs)
                .envs(bruno_system_tests::broker_env(&h_config))
                .output()
                .await
                .unwrap()
        })
    };

    // Kill an embedder (in turn) each time two more batches are stored.
    let store = open_store(dir.path()).await;
    let stored = || {
        let store = store.clone();
        async move {
            match store.existing_chunks(&info()).await.unwrap() {
                Some(t) => t.count(None).await.unwrap(),
                None => 0,
            }
        }
    };
    let mut kills = 0;
    let mut last = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while kills < 8 {
        let now = stored().await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "{now} chunks stored after {kills} kills in 600 s"
        );
        assert!(
            !wait.is_finished(),
            "ingest returned after {kills} kills, {now} chunks stored"
        );
        if now >= last + 64 {
            let i = kills % 2;
            let old = std::mem::replace(&mut embedders[i], embedder(&h));
            kill(old).await;
            kills += 1;
            last = now;
        }
        assert!(
            now < expected_chunks,
            "the document was indexed before the kills were over ({kills} kills)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = tokio::time::timeout(Duration::from_secs(600), wait)
        .await
        .expect("ingest --wait returned")
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{report}");
    assert_eq!(report["wait"]["indexed"], 1, "{report}");

    // --wait returned only once every chunk was committed: a fresh reader
    // sees them all now, each once, with the ids of this version.
    let store = open_store(dir.path()).await;
    let table = store.chunks(&info()).await.unwrap();
    let ids = table.ids().await.unwrap();
    let doc_id = ids[0].1.clone();
    let hash = table.content_hash(&doc_id).await.unwrap().unwrap();
    let stored: HashSet<(String, String)> = ids.iter().cloned().collect();
    let expected: HashSet<(String, String)> = (0..expected_chunks)
        .map(|i| (chunk_id(&doc_id, &hash, i), doc_id.clone()))
        .collect();
    assert_eq!(ids.len(), stored.len(), "a chunk is stored twice");
    assert_eq!(ids.len(), expected_chunks);
    assert_eq!(stored, expected, "stored chunks differ from the document's");
    for part in ["embedder", "writer"] {
        let letters = dlq::list(&h.broker, part, 10).await.unwrap();
        assert!(letters.is_empty(), "dead letters in {part}: {letters:?}");
    }
    eventually(Duration::from_secs(60), "queues drained", || async {
        h.depth(&h.queue("embedder")).await == 0 && h.depth(&h.queue("writer")).await == 0
    })
    .await;
    eprintln!(
        "one document, {expected_chunks} chunks, each stored once after {kills} embedder kills"
    );

    for e in embedders {
        kill(e).await;
    }
    kill(writer).await;
    ingress.stop().await;
    h.cleanup().await;
}
