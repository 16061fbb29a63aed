//! Knowledge-pipeline benchmark: real RabbitMQ, LanceDB in a temp dir, MiniLM.
//!
//! Prints:
//! 1. writer: rows per commit, commits/s and rows/s while `memory.write`
//!    messages wait in its queue (goal ≥ 100 rows/commit);
//! 2. hybrid search at `BENCH_ROWS` chunks (default 100,000; vector index
//!    built as the writer's maintenance would): p50/p99 of the store query
//!    in-process (the baseline), of embed + query in-process, and through
//!    the broker and the retriever service (goal p50 ≤ 20 ms, p99 ≤ 50 ms,
//!    service ≤ 1.2× in-process);
//! 3. end to end: documents through the ingress, embedder and writer, in
//!    indexed chunks/s, against the raw embedder on the same chunks
//!    (goal ≥ 85 %); then one long document (`BENCH_LONG_CHUNKS`, default
//!    600 chunks, embedded as `document.chunked` batches, ADR 16) with 1 and
//!    with 2 embedder instances (two consumers of the embedder queue in this
//!    process, sharing its cores as two processes on this machine would).
//!
//! Run: `cargo bench -p bruno-system-tests --bench knowledge`
//! (`BENCH_ONLY=e2e`: only the end-to-end runs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bruno_cli::{Config, run_parts};
use bruno_embed::{Embedder, EmbedderInfo, MiniLm, default_model_dir};
use bruno_embedder::{ChunkingConfig, chunk_texts};
use bruno_events::payload::{
    ChunkRecord, ChunkWrite, DocFormat, DocumentSubmitted, MemoryWrite, SearchCompleted,
    SearchFilters, SearchRequested,
};
use bruno_events::{EventData, new_event};
use bruno_store::{ChunkRow, DocumentWrite, Store, StoreConfig};
use bruno_system_tests::{Harness, open_store};
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const WORDS: &[&str] = &[
    "backup",
    "restore",
    "queue",
    "broker",
    "router",
    "lease",
    "volume",
    "snapshot",
    "cluster",
    "node",
    "certificate",
    "renewal",
    "firewall",
    "rule",
    "disk",
    "latency",
    "replica",
    "index",
    "vector",
    "memory",
    "kettle",
    "garden",
    "invoice",
    "tyre",
    "puppy",
    "tomato",
    "ledger",
];

fn text(seed: usize, words: usize) -> String {
    let mut k = seed.wrapping_mul(2654435761);
    (0..words)
        .map(|_| {
            k = k
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            WORDS[(k >> 33) % WORDS.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn unit(seed: usize, dim: usize) -> Vec<f32> {
    let mut k = seed as u64 + 1;
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            k = k
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((k >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    bruno_embed::normalize(&mut v);
    v
}

fn info() -> EmbedderInfo {
    EmbedderInfo {
        model: "sentence-transformers/all-MiniLM-L6-v2".into(),
        dimension: 384,
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn config(h: &Harness, dir: &std::path::Path) -> Config {
    let mut c = Config {
        broker: h.config.clone(),
        store: StoreConfig {
            uri: dir.display().to_string(),
            ..StoreConfig::default()
        },
        backup: bruno_system_tests::backup_config(dir),
        ..Config::default()
    };
    c.ingress.listen = "127.0.0.1:0".parse().unwrap();
    c.gateway.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c
}

async fn start(config: Config, parts: &[&str]) -> (CancellationToken, bruno_cli::Bound) {
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let run = run_parts(config, parts, stop, Some(tx));
    tokio::spawn(async move { run.await.unwrap() });
    (shutdown, rx.await.unwrap())
}

async fn metric(admin: std::net::SocketAddr, name: &str) -> f64 {
    let body = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn writer_bench(h: &Harness) {
    let docs = env_or("BENCH_WRITER_DOCS", 2000);
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<_> = (0..docs)
        .map(|d| {
            let doc_id = format!("doc-{d}");
            let ids: Vec<String> = (0..2).map(|i| format!("{doc_id}:{i}")).collect();
            let rows = ids
                .iter()
                .enumerate()
                .map(|(i, id)| ChunkRecord {
                    id: id.clone(),
                    chunk_index: i as u32,
                    text: text(d * 2 + i, 150),
                    vector: unit(d * 2 + i, 384),
                })
                .collect();
            new_event(
                "bench",
                &MemoryWrite::Chunks(ChunkWrite {
                    embedder: info(),
                    doc_id,
                    source: "bench".into(),
                    title: None,
                    content_hash: "h".into(),
                    chunk_ids: ids,
                    rows,
                }),
            )
        })
        .collect();
    for batch in events.chunks(500) {
        h.broker.publish_all(batch).await.unwrap();
    }
    let started = Instant::now();
    let (stop, bound) = start(config(h, dir.path()), &["writer"]).await;
    let store = open_store(dir.path()).await;
    loop {
        if let Some(t) = store.existing_chunks(&info()).await.unwrap()
            && t.count(None).await.unwrap() >= docs * 2
            && h.depth(&h.queue("writer")).await == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let commits = metric(bound.admin, "bruno_writer_commits_total ").await;
    let rows = (docs * 2) as f64;
    println!(
        "writer: {docs} messages, {rows:.0} rows in {commits:.0} commits: {:.0} rows/commit, {:.1} commits/s, {:.0} rows/s — goal >= 100 rows/commit",
        rows / commits,
        commits / secs,
        rows / secs
    );
    stop.cancel();
}

async fn search_bench(h: &Harness, model: &MiniLm) {
    let n = env_or("BENCH_ROWS", 100_000);
    let queries = env_or("BENCH_QUERIES", 200);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig {
        uri: dir.path().display().to_string(),
        read_consistency_ms: 0,
        vector_index_min_rows: 50_000,
    })
    .await
    .unwrap();
    let table = store.chunks(&info()).await.unwrap();
    let filled = Instant::now();
    // Filled in commits of 5,000 rows, 50 chunks per document.
    for start in (0..n).step_by(5000) {
        let docs: Vec<DocumentWrite> = (start..(start + 5000).min(n))
            .step_by(50)
            .map(|first| {
                let doc_id = format!("doc-{}", first / 50);
                let rows: Vec<ChunkRow> = (first..(first + 50).min(n))
                    .map(|i| ChunkRow {
                        id: format!("c-{i}"),
                        doc_id: doc_id.clone(),
                        source: "bench".into(),
                        title: None,
                        text: text(i, 60),
                        content_hash: "h".into(),
                        chunk_index: (i - first) as u32,
                        vector: unit(i, 384),
                    })
                    .collect();
                DocumentWrite {
                    chunk_ids: rows.iter().map(|r| r.id.clone()).collect(),
                    rows,
                    doc_id,
                }
            })
            .collect();
        table.write(&docs).await.unwrap();
    }
    table.maintain(chrono::Duration::hours(1)).await.unwrap();
    println!(
        "search: {n} chunks written and indexed in {:.1} s",
        filled.elapsed().as_secs_f64()
    );

    let texts: Vec<String> = (0..queries).map(|i| text(1_000_000 + i, 6)).collect();
    let vectors = model.embed(&texts).await.unwrap();
    let filters = bruno_store::SearchFilters::default();
    let mut store_only = Histogram::<u64>::new(3).unwrap();
    let mut with_embed = Histogram::<u64>::new(3).unwrap();
    let mut service = Histogram::<u64>::new(3).unwrap();
    for (t, v) in texts.iter().zip(&vectors).take(10) {
        table.search(v, t, 5, &filters).await.unwrap(); // warm-up
    }
    for (t, v) in texts.iter().zip(&vectors) {
        let s = Instant::now();
        table.search(v, t, 5, &filters).await.unwrap();
        store_only.record(s.elapsed().as_micros() as u64).unwrap();
        let s = Instant::now();
        let v = model.embed(std::slice::from_ref(t)).await.unwrap();
        table.search(&v[0], t, 5, &filters).await.unwrap();
        with_embed.record(s.elapsed().as_micros() as u64).unwrap();
    }
    let (stop, _) = start(config(h, dir.path()), &["retriever"]).await;
    // The same retriever on the embedded broker, asked in turn with it.
    let embedded = Harness::on(
        bruno_system_tests::BrokerKind::Embedded,
        bruno_cli::registry::part_specs(),
    )
    .await;
    let stop_embedded = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let embedded_fleet = bruno_system_tests::spawn_fleet(
        &embedded,
        config(&embedded, dir.path()),
        &["retriever"],
        stop_embedded.clone(),
        Some(tx),
    );
    rx.await.unwrap();
    let mut on_embedded = Histogram::<u64>::new(3).unwrap();
    // One reply inbox per broker for all requests, as the gateway and
    // `bruno eval` have (a one-off inbox per request would add a queue
    // declaration, binding and consumer to every search).
    let inbox_stop = CancellationToken::new();
    let inbox_of = |broker: &bruno_broker::Broker| {
        bruno_broker::reply::Inbox::start(
            broker.clone(),
            vec![SearchCompleted::TYPE.to_owned()],
            inbox_stop.clone(),
        )
    };
    let (rabbit_inbox, embedded_inbox) = (inbox_of(&h.broker), inbox_of(&embedded.broker));
    while !(rabbit_inbox.is_ready() && embedded_inbox.is_ready()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ask_on = |broker: &bruno_broker::Broker, inbox: &bruno_broker::reply::Inbox, t: &String| {
        let request = new_event(
            "bench",
            &SearchRequested {
                query: t.clone(),
                k: 5,
                filters: SearchFilters::default(),
                mode: Default::default(),
            },
        );
        let (broker, inbox) = (broker.clone(), inbox.clone());
        async move {
            inbox
                .request(
                    &broker,
                    request,
                    &[SearchCompleted::TYPE],
                    Duration::from_secs(30),
                )
                .await
        }
    };
    let ask = |t: &String| ask_on(&h.broker, &rabbit_inbox, t);
    for t in texts.iter().take(10) {
        ask(t).await.unwrap(); // warm-up
        ask_on(&embedded.broker, &embedded_inbox, t).await.unwrap();
    }
    for t in &texts {
        let s = Instant::now();
        ask(t).await.unwrap();
        service.record(s.elapsed().as_micros() as u64).unwrap();
        let s = Instant::now();
        ask_on(&embedded.broker, &embedded_inbox, t).await.unwrap();
        on_embedded.record(s.elapsed().as_micros() as u64).unwrap();
    }
    inbox_stop.cancel();
    stop.cancel();
    stop_embedded.cancel();
    let _ = embedded_fleet.await;
    embedded.cleanup().await;
    println!(
        "search at {n} chunks, k=5, {queries} queries:\n  in-process LanceDB hybrid query (baseline): p50 {:.2} ms  p99 {:.2} ms\n  in-process embed + query:                   p50 {:.2} ms  p99 {:.2} ms\n  through broker + retriever (request/reply): p50 {:.2} ms  p99 {:.2} ms  ({:.2}x embed+query p50) — goal p50 <= 20, p99 <= 50, <= 1.2x",
        ms(&store_only, 0.5),
        ms(&store_only, 0.99),
        ms(&with_embed, 0.5),
        ms(&with_embed, 0.99),
        ms(&service, 0.5),
        ms(&service, 0.99),
        ms(&service, 0.5) / ms(&with_embed, 0.5)
    );
    println!(
        "  through the embedded broker + retriever:    p50 {:.2} ms  p99 {:.2} ms  ({:.2}x embed+query p50); RabbitMQ's network broker costs {:+.2} ms p50, {:+.2} ms p99",
        ms(&on_embedded, 0.5),
        ms(&on_embedded, 0.99),
        ms(&on_embedded, 0.5) / ms(&with_embed, 0.5),
        ms(&service, 0.5) - ms(&on_embedded, 0.5),
        ms(&service, 0.99) - ms(&on_embedded, 0.99),
    );
}

async fn end_to_end(h: &Harness, model: &MiniLm) {
    let docs = env_or("BENCH_DOCS", 100);
    let chunking = ChunkingConfig::default();
    let documents: Vec<DocumentSubmitted> = (0..docs)
        .map(|i| DocumentSubmitted {
            doc_id: format!("e2e-{i}"),
            source: "bench".into(),
            title: None,
            text: format!("# Doc {i}\n\n{}", text(i, 380)),
            format: DocFormat::Markdown,
            metadata: BTreeMap::new(),
        })
        .collect();
    let counter = bruno_embedder::counting_tokenizer(model.tokenizer()).unwrap();
    let chunks: Vec<String> = documents
        .iter()
        .flat_map(|d| {
            chunk_texts(
                &chunking,
                Some(counter.clone()),
                d.format,
                d.title.as_deref(),
                &d.text,
            )
        })
        .collect();
    let started = Instant::now();
    for batch in chunks.chunks(chunking.batch_size) {
        model.embed(batch).await.unwrap();
    }
    let raw = chunks.len() as f64 / started.elapsed().as_secs_f64();

    let fleet = fleet_rate(h, &documents, chunks.len(), 1).await;
    println!(
        "end to end: {docs} documents, {} chunks: fleet {fleet:.2} chunks/s vs raw embedder {raw:.2} chunks/s = {:.0} % — goal >= 85 %",
        chunks.len(),
        100.0 * fleet / raw
    );

    // One long document: its batches spread over the embedder instances.
    let want = env_or("BENCH_LONG_CHUNKS", 600);
    let mut words = want * 210;
    let (long, long_chunks) = loop {
        let d = DocumentSubmitted {
            doc_id: "e2e-long".into(),
            source: "bench".into(),
            title: Some("A long manual".into()),
            text: format!("# A long manual\n\n{}", text(4242, words)),
            format: DocFormat::Markdown,
            metadata: BTreeMap::new(),
        };
        let texts = chunk_texts(
            &chunking,
            Some(counter.clone()),
            d.format,
            d.title.as_deref(),
            &d.text,
        );
        if texts.len() >= want {
            break (d, texts);
        }
        words = words * want / texts.len().max(1) + 200;
    };
    let started = Instant::now();
    for batch in long_chunks.chunks(chunking.batch_size) {
        model.embed(batch).await.unwrap();
    }
    let raw = long_chunks.len() as f64 / started.elapsed().as_secs_f64();
    let one = fleet_rate(h, std::slice::from_ref(&long), long_chunks.len(), 1).await;
    let two = fleet_rate(h, std::slice::from_ref(&long), long_chunks.len(), 2).await;
    println!(
        "one long document, {} chunks: raw embedder {raw:.2} chunks/s; fleet with 1 embedder {one:.2} chunks/s ({:.0} % of raw), with 2 embedders {two:.2} chunks/s ({:.0} % of raw, {:.2}x one)",
        long_chunks.len(),
        100.0 * one / raw,
        100.0 * two / raw,
        two / one
    );
}

/// Indexed chunks/s of `documents` (`chunks` chunks in all) sent through the
/// ingress of a fresh fleet with `embedders` embedder instances.
async fn fleet_rate(
    h: &Harness,
    documents: &[DocumentSubmitted],
    chunks: usize,
    embedders: usize,
) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (stop, bound) = start(config(h, dir.path()), &bruno_cli::registry::runnable()).await;
    let mut extra = Vec::new();
    for _ in 1..embedders {
        extra.push(start(config(h, dir.path()), &["embedder"]).await.0);
    }
    let ingress = bound.ingress.unwrap();
    let client = reqwest::Client::new();
    let started = Instant::now();
    for d in documents {
        let r = client
            .post(format!("http://{ingress}/"))
            .header("ce-specversion", "1.0")
            .header("ce-id", uuid::Uuid::new_v4().to_string())
            .header("ce-type", DocumentSubmitted::TYPE)
            .header("ce-source", "bench")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(d).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let store = open_store(dir.path()).await;
    loop {
        if let Some(t) = store.existing_chunks(&info()).await.unwrap()
            && t.count(None).await.unwrap() >= chunks
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rate = chunks as f64 / started.elapsed().as_secs_f64();
    for e in extra {
        e.cancel();
    }
    stop.cancel();
    // Let the parts stop before the next fleet declares the same queues.
    tokio::time::sleep(Duration::from_millis(500)).await;
    rate
}

#[tokio::main]
async fn main() {
    let model = MiniLm::load(&default_model_dir()).expect("model (scripts/fetch-model.sh)");
    // BENCH_ONLY=e2e: only the end-to-end runs.
    let all = std::env::var("BENCH_ONLY").as_deref() != Ok("e2e");
    if all {
        let h = Harness::new(bruno_cli::registry::part_specs()).await;
        writer_bench(&h).await;
        let h2 = Harness::new(bruno_cli::registry::part_specs()).await;
        search_bench(&h2, &model).await;
        h.cleanup().await;
        h2.cleanup().await;
    }
    let h3 = Harness::new(bruno_cli::registry::part_specs()).await;
    end_to_end(&h3, &model).await;
    h3.cleanup().await;
}
