//! The writer ("memory writes"): the only process that writes LanceDB.
//!
//! Each `memory.write` handler call hands its rows to one batcher task and
//! waits; the batcher commits everything it has gathered — up to
//! `batch_rows` rows or `batch_ms` after the first — as one `merge_insert`
//! per table, then answers every waiting call. Only then do the calls return
//! their `document.indexed` events, which the runtime publishes (confirmed)
//! before it acks the messages: a message is acked only after its rows are
//! committed. Rows are keyed by deterministic ids, so redelivery is a no-op.
//! The queue is single-active-consumer: a second replica is a hot standby.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bruno_events::payload::{DocumentIndexed, EmbedderInfo, MemoryWrite, Table};
use bruno_events::{Event, reply_event};
use bruno_runtime::{Context, Handler, HandlerError, Incoming};
use bruno_store::{ChunkRow, Chunks, Conversations, DocumentWrite, Store, StoreError, TurnRow};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `[writer]` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Commit once this many rows are gathered.
    pub batch_rows: usize,
    /// Or this long after the first row of a batch arrived.
    pub batch_ms: u64,
    /// Messages in flight (the prefetch); must cover a batch's messages.
    pub concurrency: u16,
    /// Compact a table (and fold new rows into its indexes) after this many
    /// commits: each commit adds a file that every query opens.
    pub compact_every_commits: u32,
    /// Seconds between compaction / index / cleanup runs.
    pub maintenance_interval_secs: u64,
    /// Old table versions younger than this are kept.
    pub keep_versions_hours: i64,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            batch_rows: 512,
            batch_ms: 200,
            concurrency: 128,
            compact_every_commits: 16,
            maintenance_interval_secs: 3600,
            keep_versions_hours: 2,
        }
    }
}

/// Writer metrics (`bruno_writer_*`).
#[derive(Clone, Debug)]
pub struct WriterMetrics {
    rows_per_commit: Histogram,
    commit_seconds: Histogram,
    commits: Counter,
    compactions: Counter,
    chunk_rows: Gauge,
    chunk_version: Gauge,
    turn_rows: Gauge,
}

impl Default for WriterMetrics {
    fn default() -> Self {
        Self {
            rows_per_commit: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            commits: Counter::default(),
            compactions: Counter::default(),
            chunk_rows: Gauge::default(),
            chunk_version: Gauge::default(),
            turn_rows: Gauge::default(),
        }
    }
}

impl WriterMetrics {
    /// Register in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bruno_writer_rows_per_commit",
            "Rows in each merge_insert",
            self.rows_per_commit.clone(),
        );
        registry.register(
            "bruno_writer_commit_duration_seconds",
            "Time of each commit",
            self.commit_seconds.clone(),
        );
        registry.register("bruno_writer_commits", "Commits", self.commits.clone());
        registry.register(
            "bruno_writer_compactions",
            "Compactions run every writer.compact_every_commits commits",
            self.compactions.clone(),
        );
        registry.register(
            "bruno_store_chunks_rows",
            "Rows in the chunks table",
            self.chunk_rows.clone(),
        );
        registry.register(
            "bruno_store_chunks_version",
            "Version of the chunks table",
            self.chunk_version.clone(),
        );
        registry.register(
            "bruno_store_conversations_rows",
            "Rows in the conversations table",
            self.turn_rows.clone(),
        );
    }

    /// Commits so far (for tests and benches).
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }

    /// Compactions so far (for tests and benches).
    pub fn compactions(&self) -> u64 {
        self.compactions.get()
    }
}

type Reply = oneshot::Sender<Result<Committed, String>>;

/// One message's rows, waiting for the batch commit.
enum Work {
    /// A document's chunks (`chunks`).
    Doc(DocumentWrite),
    /// Conversation turns (`conversations`).
    Turns(Vec<TurnRow>),
}

impl Work {
    fn rows(&self) -> usize {
        match self {
            Work::Doc(d) => d.rows.len(),
            Work::Turns(t) => t.len(),
        }
    }
}

struct Pending {
    embedder: EmbedderInfo,
    work: Work,
    reply: Reply,
}

impl Pending {
    fn key(&self) -> (Table, String, u32) {
        let table = match self.work {
            Work::Doc(_) => Table::Chunks,
            Work::Turns(_) => Table::Conversations,
        };
        (table, self.embedder.model.clone(), self.embedder.dimension)
    }
}

#[derive(Debug, Clone, Copy)]
struct Committed {
    version: u64,
    removed: u64,
}

fn fail_all(group: Vec<Pending>, msg: &str) {
    for p in group {
        let _ = p.reply.send(Err(msg.to_owned()));
    }
}

/// The writer's handler.
pub struct Writer {
    tx: mpsc::Sender<Pending>,
}

impl Writer {
    /// Start the batcher (and the maintenance loop) over `store`.
    pub fn start(
        store: Store,
        config: &WriterConfig,
        metrics: WriterMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let tables = Tables::default();
        tokio::spawn(batcher(
            rx,
            store,
            tables.clone(),
            config.clone(),
            metrics.clone(),
        ));
        tokio::spawn(maintenance(tables, config.clone(), metrics, shutdown));
        Self { tx }
    }
}

fn meta_str(row: &bruno_events::payload::MemoryRow, key: &str) -> Option<String> {
    row.metadata
        .get(key)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

fn to_write(data: &MemoryWrite) -> Result<DocumentWrite, HandlerError> {
    let missing =
        |f: &str| HandlerError::invalid_payload(format!("memory.write to chunks needs {f}"));
    let doc_id = data.doc_id.clone().ok_or_else(|| missing("doc_id"))?;
    let chunk_ids = data.chunk_ids.clone().ok_or_else(|| missing("chunk_ids"))?;
    let content_hash = data
        .content_hash
        .clone()
        .ok_or_else(|| missing("content_hash"))?;
    let rows = data
        .rows
        .iter()
        .map(|r| {
            let source = meta_str(r, "source").ok_or_else(|| missing("rows[].metadata.source"))?;
            let chunk_index = r
                .metadata
                .get("chunk_index")
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| missing("rows[].metadata.chunk_index"))?;
            if !chunk_ids.contains(&r.id) {
                return Err(HandlerError::invalid_payload(format!(
                    "row {} is not in chunk_ids",
                    r.id
                )));
            }
            Ok(ChunkRow {
                id: r.id.clone(),
                doc_id: doc_id.clone(),
                source,
                title: meta_str(r, "title"),
                text: r.text.clone(),
                content_hash: content_hash.clone(),
                chunk_index,
                vector: r.vector.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DocumentWrite {
        doc_id,
        rows,
        chunk_ids,
    })
}

fn to_turns(data: &MemoryWrite) -> Result<Vec<TurnRow>, HandlerError> {
    let missing =
        |f: &str| HandlerError::invalid_payload(format!("memory.write to conversations needs {f}"));
    data.rows
        .iter()
        .map(|r| {
            let at =
                meta_str(r, "created_at").ok_or_else(|| missing("rows[].metadata.created_at"))?;
            let at = chrono::DateTime::parse_from_rfc3339(&at).map_err(|e| {
                HandlerError::invalid_payload(format!("rows[].metadata.created_at: {e}"))
            })?;
            let role = meta_str(r, "role").ok_or_else(|| missing("rows[].metadata.role"))?;
            if role != "user" && role != "assistant" {
                return Err(HandlerError::invalid_payload(format!(
                    "role {role:?} is neither user nor assistant"
                )));
            }
            Ok(TurnRow {
                id: r.id.clone(),
                session_id: meta_str(r, "session_id")
                    .ok_or_else(|| missing("rows[].metadata.session_id"))?,
                role,
                text: r.text.clone(),
                correlation_id: meta_str(r, "correlation_id")
                    .ok_or_else(|| missing("rows[].metadata.correlation_id"))?,
                at_micros: at.timestamp_micros(),
                vector: r.vector.clone(),
            })
        })
        .collect()
}

impl Handler for Writer {
    type Input = MemoryWrite;

    async fn handle(
        &self,
        input: Incoming<MemoryWrite>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let data = &input.data;
        let work = match data.table {
            Table::Chunks => Work::Doc(to_write(data)?),
            Table::Conversations => Work::Turns(to_turns(data)?),
        };
        let written = work.rows() as u64;
        let doc_id = match &work {
            Work::Doc(d) => Some(d.doc_id.clone()),
            Work::Turns(_) => None,
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                embedder: data.embedder.clone(),
                work,
                reply,
            })
            .await
            .map_err(|_| HandlerError::internal("writer batcher stopped"))?;
        let committed = rx
            .await
            .map_err(|_| HandlerError::internal("writer batcher dropped the write"))?
            .map_err(|e| {
                if e.starts_with("embedder:") || e.starts_with("invalid row:") {
                    HandlerError::invalid_payload(e)
                } else {
                    HandlerError::dependency(e)
                }
            })?;
        let Some(doc_id) = doc_id else {
            return Ok(Vec::new());
        };
        let indexed = DocumentIndexed {
            doc_id,
            chunks_written: written,
            chunks_removed: committed.removed,
            table_version: committed.version,
        };
        Ok(vec![reply_event(&input.event, &ctx.source, 0, &indexed)])
    }
}

/// The open tables, by embedder.
#[derive(Clone, Default)]
struct Tables {
    chunks: Arc<tokio::sync::Mutex<HashMap<(String, u32), Chunks>>>,
    conversations: Arc<tokio::sync::Mutex<HashMap<(String, u32), Conversations>>>,
}

impl Tables {
    async fn chunks(&self, store: &Store, embedder: &EmbedderInfo) -> Result<Chunks, StoreError> {
        let key = (embedder.model.clone(), embedder.dimension);
        let mut tables = self.chunks.lock().await;
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let t = store.chunks(embedder).await?;
        tables.insert(key, t.clone());
        Ok(t)
    }

    async fn conversations(
        &self,
        store: &Store,
        embedder: &EmbedderInfo,
    ) -> Result<Conversations, StoreError> {
        let key = (embedder.model.clone(), embedder.dimension);
        let mut tables = self.conversations.lock().await;
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let t = store.conversations(embedder).await?;
        tables.insert(key, t.clone());
        Ok(t)
    }
}

fn store_error(e: StoreError) -> String {
    match e {
        StoreError::EmbedderMismatch { .. } => format!("embedder: {e}"),
        StoreError::InvalidRow(_) => format!("invalid row: {e}"),
        other => other.to_string(),
    }
}

async fn batcher(
    mut rx: mpsc::Receiver<Pending>,
    store: Store,
    tables: Tables,
    config: WriterConfig,
    metrics: WriterMetrics,
) {
    let max_wait = Duration::from_millis(config.batch_ms);
    // Here, between commits, compaction never races a write.
    let mut since_compaction: HashMap<Table, u32> = HashMap::new();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut rows = batch[0].work.rows();
        let deadline = tokio::time::Instant::now() + max_wait;
        while rows < config.batch_rows {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => {
                    rows += p.work.rows();
                    batch.push(p);
                }
                Ok(None) | Err(_) => break,
            }
        }
        // One commit per table and embedder (in practice, one per table).
        let mut groups: HashMap<(Table, String, u32), Vec<Pending>> = HashMap::new();
        for p in batch {
            groups.entry(p.key()).or_default().push(p);
        }
        for ((table, _, _), group) in groups {
            let embedder = group[0].embedder.clone();
            let committed = match table {
                Table::Chunks => commit(&store, &tables, group, &metrics).await,
                Table::Conversations => commit_turns(&store, &tables, group, &metrics).await,
            };
            let n = since_compaction.entry(table).or_default();
            *n += u32::from(committed);
            if *n >= config.compact_every_commits.max(1) {
                *n = 0;
                compact(&store, &tables, table, &embedder, &metrics).await;
            }
        }
    }
}

/// Compact `table` (a failure is logged: the next run or the scheduled
/// maintenance tries again).
async fn compact(
    store: &Store,
    tables: &Tables,
    table: Table,
    embedder: &EmbedderInfo,
    metrics: &WriterMetrics,
) {
    let started = Instant::now();
    let result = match table {
        Table::Chunks => match tables.chunks(store, embedder).await {
            Ok(t) => t.compact().await,
            Err(e) => Err(e),
        },
        Table::Conversations => match tables.conversations(store, embedder).await {
            Ok(t) => t.compact().await,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => {
            metrics.compactions.inc();
            info!(?table, took = ?started.elapsed(), "compacted");
        }
        Err(e) => warn!(error = %e, ?table, "compaction failed"),
    }
}

/// Commit a batch of turns; true once committed.
async fn commit_turns(
    store: &Store,
    tables: &Tables,
    group: Vec<Pending>,
    metrics: &WriterMetrics,
) -> bool {
    let table = match tables.conversations(store, &group[0].embedder).await {
        Ok(t) => t,
        Err(e) => {
            fail_all(group, &store_error(e));
            return false;
        }
    };
    let mut rows: Vec<TurnRow> = Vec::new();
    for p in &group {
        if let Work::Turns(turns) = &p.work {
            for t in turns {
                rows.retain(|r| r.id != t.id);
                rows.push(t.clone());
            }
        }
    }
    let started = Instant::now();
    match table.write(&rows).await {
        Ok(version) => {
            metrics.commits.inc();
            metrics.rows_per_commit.observe(rows.len() as f64);
            metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            info!(
                rows = rows.len(),
                version,
                table = "conversations",
                "committed"
            );
            if let Ok(n) = table.count(None).await {
                metrics.turn_rows.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            for p in group {
                let _ = p.reply.send(Ok(Committed {
                    version,
                    removed: 0,
                }));
            }
            true
        }
        Err(e) => {
            warn!(error = %e, rows = rows.len(), "commit failed");
            fail_all(group, &store_error(e));
            false
        }
    }
}

/// Commit a batch of documents; true once committed.
async fn commit(
    store: &Store,
    tables: &Tables,
    group: Vec<Pending>,
    metrics: &WriterMetrics,
) -> bool {
    let table = match tables.chunks(store, &group[0].embedder).await {
        Ok(t) => t,
        Err(e) => {
            fail_all(group, &store_error(e));
            return false;
        }
    };
    // Several messages for one document in a batch: merge them (later rows win).
    let mut docs: Vec<DocumentWrite> = Vec::new();
    for p in &group {
        let Work::Doc(write) = &p.work else { continue };
        match docs.iter_mut().find(|d| d.doc_id == write.doc_id) {
            Some(d) => {
                d.rows.retain(|r| !write.rows.iter().any(|n| n.id == r.id));
                d.rows.extend(write.rows.iter().cloned());
                d.chunk_ids = write.chunk_ids.clone();
            }
            None => docs.push(write.clone()),
        }
    }
    let rows: usize = docs.iter().map(|d| d.rows.len()).sum();
    let started = Instant::now();
    // The single writer: nothing changes the table between these two calls.
    let stale = match table.stale_counts(&docs).await {
        Ok(s) => s,
        Err(e) => {
            fail_all(group, &e.to_string());
            return false;
        }
    };
    match table.write(&docs).await {
        Ok(outcome) => {
            metrics.commits.inc();
            metrics.rows_per_commit.observe(rows as f64);
            metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics
                .chunk_version
                .set(i64::try_from(outcome.version).unwrap_or(i64::MAX));
            info!(
                rows,
                docs = docs.len(),
                version = outcome.version,
                deleted = outcome.deleted,
                "committed"
            );
            if let Ok(n) = table.count(None).await {
                metrics.chunk_rows.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            for p in group {
                let removed = match &p.work {
                    Work::Doc(d) => stale.get(&d.doc_id).copied().unwrap_or(0),
                    Work::Turns(_) => 0,
                };
                let _ = p.reply.send(Ok(Committed {
                    version: outcome.version,
                    removed,
                }));
            }
            true
        }
        Err(e) => {
            warn!(error = %e, rows, "commit failed");
            fail_all(group, &store_error(e));
            false
        }
    }
}

async fn maintenance(
    tables: Tables,
    config: WriterConfig,
    metrics: WriterMetrics,
    shutdown: CancellationToken,
) {
    let mut tick =
        tokio::time::interval(Duration::from_secs(config.maintenance_interval_secs.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let keep = chrono::Duration::hours(config.keep_versions_hours);
        let chunks: Vec<Chunks> = tables.chunks.lock().await.values().cloned().collect();
        for t in chunks {
            match t.maintain(keep).await {
                Ok(()) => {
                    if let Ok(n) = t.count(None).await {
                        metrics.chunk_rows.set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    info!(table = "chunks", "table maintenance done");
                }
                Err(e) => warn!(error = %e, table = "chunks", "table maintenance failed"),
            }
        }
        let conversations: Vec<Conversations> = tables
            .conversations
            .lock()
            .await
            .values()
            .cloned()
            .collect();
        for t in conversations {
            match t.maintain(keep).await {
                Ok(()) => {
                    if let Ok(n) = t.count(None).await {
                        metrics.turn_rows.set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    info!(table = "conversations", "table maintenance done");
                }
                Err(e) => warn!(error = %e, table = "conversations", "table maintenance failed"),
            }
        }
    }
}
