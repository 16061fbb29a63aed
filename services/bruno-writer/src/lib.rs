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

use bruno_events::legacy::MemoryWriteV1;
use bruno_events::payload::{
    ChunkWrite, DocumentIndexed, EmbedderInfo, MemoryWrite, Table, TurnWrite,
};
use bruno_events::{Event, reply_event};
use bruno_runtime::{Context, Handler, HandlerError, Incoming};
use bruno_store::{ChunkRow, Chunks, Conversations, DocumentWrite, Store, StoreError, TurnRow};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

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
    /// Once no write came for this long, compact the tables written since
    /// their last compaction (and, after a start, those an earlier run left
    /// with several files or unindexed rows), so reads after a burst of
    /// writes do not pay for its files until the next burst; 0: never.
    pub compact_idle_ms: u64,
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
            compact_idle_ms: 2000,
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
    compaction_failures: Counter,
    maintenance: Family<MaintenanceLabels, Counter>,
    chunk_rows: Gauge,
    chunk_version: Gauge,
    turn_rows: Gauge,
}

impl Default for WriterMetrics {
    fn default() -> Self {
        // Every table and result exported from the start (at 0), so the
        // first failure is an increase an alert can see.
        let maintenance = Family::<MaintenanceLabels, Counter>::default();
        for table in ["chunks", "conversations"] {
            for result in ["done", "failed"] {
                maintenance
                    .get_or_create(&MaintenanceLabels { table, result })
                    .inc_by(0);
            }
        }
        Self {
            rows_per_commit: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            commits: Counter::default(),
            compactions: Counter::default(),
            compaction_failures: Counter::default(),
            maintenance,
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
            "bruno_writer_compaction_failures",
            "Compactions that failed (the next one or the scheduled maintenance tries again)",
            self.compaction_failures.clone(),
        );
        registry.register(
            "bruno_writer_maintenance_runs",
            "Scheduled table maintenance (index, compaction, cleanup) by table and result",
            self.maintenance.clone(),
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

    /// Failed compactions so far (for tests).
    pub fn compaction_failures(&self) -> u64 {
        self.compaction_failures.get()
    }

    /// Table maintenance runs done and failed so far, all tables (for tests).
    pub fn maintenance(&self) -> (u64, u64) {
        let count = |result| {
            ["chunks", "conversations"]
                .into_iter()
                .map(|table| {
                    self.maintenance
                        .get_or_create(&MaintenanceLabels { table, result })
                        .get()
                })
                .sum()
        };
        (count("done"), count("failed"))
    }

    fn maintained(&self, table: &'static str, result: &'static str) {
        self.maintenance
            .get_or_create(&MaintenanceLabels { table, result })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MaintenanceLabels {
    table: &'static str,
    result: &'static str,
}

type Reply = oneshot::Sender<Result<Committed, HandlerError>>;

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
    /// The span of the message the rows came with.
    span: tracing::Span,
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

fn fail_all(group: Vec<Pending>, error: StoreError) {
    let error = HandlerError::from(error);
    for p in group {
        let _ = p.reply.send(Err(error.clone()));
    }
}

bruno_runtime::inputs! {
    /// What the writer takes.
    pub enum WriterInput {
        /// Typed rows.
        Write(MemoryWrite),
        /// Rows of the retired v1 payload, converted (ADR 0009).
        Legacy(MemoryWriteV1),
    }
}

/// The writer's handler: hands each message's rows to the batcher task
/// (started by the runtime's `start` hook) and waits for their commit; the
/// runtime's tick runs table maintenance.
pub struct Writer {
    tx: mpsc::Sender<Pending>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Pending>>>,
    store: Store,
    tables: Tables,
    config: WriterConfig,
    metrics: WriterMetrics,
}

impl Writer {
    /// A writer over `store`; its batcher starts with the part.
    pub fn new(store: Store, config: &WriterConfig, metrics: WriterMetrics) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        Self {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
            store,
            tables: Tables::default(),
            config: config.clone(),
            metrics,
        }
    }
}

fn to_write(w: ChunkWrite) -> DocumentWrite {
    let rows = w
        .rows
        .into_iter()
        .map(|r| ChunkRow {
            id: r.id,
            doc_id: w.doc_id.clone(),
            source: w.source.clone(),
            title: w.title.clone(),
            text: r.text,
            content_hash: w.content_hash.clone(),
            chunk_index: r.chunk_index,
            vector: r.vector,
        })
        .collect();
    DocumentWrite {
        doc_id: w.doc_id,
        rows,
        chunk_ids: w.chunk_ids,
    }
}

fn to_turns(w: TurnWrite) -> Vec<TurnRow> {
    w.rows
        .into_iter()
        .map(|r| TurnRow {
            id: r.id,
            session_id: r.session_id,
            role: r.role.as_str().to_owned(),
            text: r.text,
            correlation_id: r.correlation_id,
            at_micros: r.created_at.timestamp_micros(),
            vector: r.vector,
        })
        .collect()
}

impl Handler for Writer {
    type Input = WriterInput;

    async fn handle(
        &self,
        input: Incoming<WriterInput>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let data = match input.data {
            WriterInput::Write(w) => w,
            WriterInput::Legacy(v1) => MemoryWrite::try_from(v1)
                .map_err(|e| HandlerError::invalid_payload(e.to_string()))?,
        };
        let embedder = data.embedder().clone();
        let work = match data {
            MemoryWrite::Chunks(w) => Work::Doc(to_write(w)),
            MemoryWrite::Conversations(w) => Work::Turns(to_turns(w)),
        };
        let written = work.rows() as u64;
        let doc = match &work {
            Work::Doc(d) => Some((
                d.doc_id.clone(),
                d.chunk_ids.len() as u64,
                d.rows.iter().map(|r| r.chunk_index).min().unwrap_or(0),
            )),
            Work::Turns(_) => None,
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                embedder,
                work,
                reply,
                span: tracing::Span::current(),
            })
            .await
            .map_err(|_| HandlerError::internal("writer batcher stopped"))?;
        let committed = rx
            .await
            .map_err(|_| HandlerError::internal("writer batcher dropped the write"))??;
        let Some((doc_id, chunk_count, first_chunk)) = doc else {
            return Ok(Vec::new());
        };
        let indexed = DocumentIndexed {
            doc_id,
            chunks_written: written,
            chunks_removed: committed.removed,
            table_version: committed.version,
            unchanged: false,
            chunk_count,
            first_chunk: u64::from(first_chunk),
        };
        Ok(vec![reply_event(&input.event, &ctx.source, 0, &indexed)])
    }

    async fn start(&self, ctx: &Context) {
        let rx = self.rx.lock().ok().and_then(|mut rx| rx.take());
        let Some(rx) = rx else {
            warn!("writer started twice; the batcher runs already");
            return;
        };
        let (store, tables) = (self.store.clone(), self.tables.clone());
        let (config, metrics) = (self.config.clone(), self.metrics.clone());
        ctx.spawn(|stopped| batcher(rx, store, tables, config, metrics, stopped));
    }

    fn tick_every(&self) -> Option<Duration> {
        Some(Duration::from_secs(
            self.config.maintenance_interval_secs.max(1),
        ))
    }

    async fn tick(&self, _ctx: &Context) {
        maintain(&self.tables, &self.config, &self.metrics).await;
    }
}

/// The open tables, by embedder.
#[derive(Clone, Default)]
struct Tables {
    chunks: Arc<tokio::sync::Mutex<HashMap<(String, u32), Chunks>>>,
    conversations: Arc<tokio::sync::Mutex<HashMap<(String, u32), Conversations>>>,
    /// Held while a table is compacted or maintained. Two compactions of
    /// one table at once conflict in Lance's commit and one of them fails,
    /// so the scheduled maintenance waits for the batcher's compaction,
    /// and the batcher (which must not stall commits behind a long index
    /// build) leaves its compaction for its next pause while maintenance runs.
    upkeep: Arc<tokio::sync::Mutex<()>>,
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

async fn batcher(
    mut rx: mpsc::Receiver<Pending>,
    store: Store,
    tables: Tables,
    config: WriterConfig,
    metrics: WriterMetrics,
    stopped: CancellationToken,
) {
    let max_wait = Duration::from_millis(config.batch_ms);
    let idle = Duration::from_millis(config.compact_idle_ms);
    // Here, between commits, compaction never races a write.
    let mut since_compaction: HashMap<Table, u32> = HashMap::new();
    // Tables written since their last compaction, with their embedder;
    // `None`: left by an earlier run (compacted only if they need it).
    let mut unsettled: HashMap<Table, Option<EmbedderInfo>> = if idle.is_zero() {
        HashMap::new()
    } else {
        [(Table::Chunks, None), (Table::Conversations, None)].into()
    };
    // Stopped fires once every in-flight message settled: nothing waits here then.
    loop {
        let next = if unsettled.is_empty() {
            tokio::select! {
                p = rx.recv() => p,
                _ = stopped.cancelled() => None,
            }
        } else {
            tokio::select! {
                p = rx.recv() => p,
                _ = stopped.cancelled() => None,
                _ = tokio::time::sleep(idle) => {
                    // Maintenance running: try again after the next pause.
                    let Ok(_upkeep) = tables.upkeep.try_lock() else { continue };
                    for (table, embedder) in std::mem::take(&mut unsettled) {
                        since_compaction.remove(&table);
                        settle(&store, &tables, table, embedder, &metrics).await;
                    }
                    continue;
                }
            }
        };
        let Some(first) = next else { break };
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
            // One commit serves several messages, each in its own trace: the
            // commit is a child of the first and follows from the others.
            let span = tracing::info_span!(parent: &group[0].span, "commit", ?table, messages = group.len());
            for p in &group[1..] {
                span.follows_from(&p.span);
            }
            let committed = match table {
                Table::Chunks => {
                    commit(&store, &tables, group, &metrics)
                        .instrument(span)
                        .await
                }
                Table::Conversations => {
                    commit_turns(&store, &tables, group, &metrics)
                        .instrument(span)
                        .await
                }
            };
            let n = since_compaction.entry(table).or_default();
            *n += u32::from(committed);
            if *n >= config.compact_every_commits.max(1) {
                *n = 0;
                unsettled.remove(&table);
                if let Ok(_upkeep) = tables.upkeep.try_lock() {
                    compact(&store, &tables, table, &embedder, &metrics).await;
                } else if !idle.is_zero() {
                    // Maintenance is compacting it; the next pause settles the rest.
                    unsettled.insert(table, Some(embedder));
                }
            } else if committed && !idle.is_zero() {
                unsettled.insert(table, Some(embedder));
            }
        }
    }
}

/// Compact `table` once writes paused: through the writer's own handle
/// when this run wrote it, else (what an earlier run left) only if it has
/// several files or unindexed rows.
async fn settle(
    store: &Store,
    tables: &Tables,
    table: Table,
    embedder: Option<EmbedderInfo>,
    metrics: &WriterMetrics,
) {
    if let Some(embedder) = embedder {
        return compact(store, tables, table, &embedder, metrics).await;
    }
    let name = match table {
        Table::Chunks => bruno_store::CHUNKS_TABLE,
        Table::Conversations => bruno_store::CONVERSATIONS_TABLE,
    };
    let started = Instant::now();
    match store.settle_table(name).await {
        Ok(true) => {
            metrics.compactions.inc();
            info!(?table, took = ?started.elapsed(), "compacted what an earlier run left");
        }
        Ok(false) => {}
        Err(e) => {
            metrics.compaction_failures.inc();
            warn!(error = %e, ?table, "compaction failed");
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
        Err(e) => {
            metrics.compaction_failures.inc();
            warn!(error = %e, ?table, "compaction failed");
        }
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
            fail_all(group, e);
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
            fail_all(group, e);
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
            fail_all(group, e);
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
            fail_all(group, e);
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
            fail_all(group, e);
            false
        }
    }
}

/// Compaction, index and cleanup of every open table (the runtime's tick).
async fn maintain(tables: &Tables, config: &WriterConfig, metrics: &WriterMetrics) {
    let _upkeep = tables.upkeep.lock().await;
    let keep = chrono::Duration::hours(config.keep_versions_hours);
    let chunks: Vec<Chunks> = tables.chunks.lock().await.values().cloned().collect();
    for t in chunks {
        match t.maintain(keep).await {
            Ok(()) => {
                if let Ok(n) = t.count(None).await {
                    metrics.chunk_rows.set(i64::try_from(n).unwrap_or(i64::MAX));
                }
                metrics.maintained("chunks", "done");
                info!(table = "chunks", "table maintenance done");
            }
            Err(e) => {
                metrics.maintained("chunks", "failed");
                warn!(error = %e, table = "chunks", "table maintenance failed");
            }
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
                metrics.maintained("conversations", "done");
                info!(table = "conversations", "table maintenance done");
            }
            Err(e) => {
                metrics.maintained("conversations", "failed");
                warn!(error = %e, table = "conversations", "table maintenance failed");
            }
        }
    }
}
