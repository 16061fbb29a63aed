//! Bruno's state in LanceDB.
//!
//! - `chunks`: the knowledge base (id, doc_id, source, title, text,
//!   content_hash, chunk_index, vector, embedder, updated_at);
//! - `conversations`: the turns of every session (id, session_id, role,
//!   text, correlation_id, vector, embedder, created_at, updated_at);
//! - every table records the embedder (model, dimension) that filled it in
//!   its schema metadata; opening it with another embedder is an error.
//!
//! Writes are idempotent: rows are keyed by deterministic ids and upserted
//! with one `merge_insert` per batch, which also deletes the stale chunks of
//! the documents in the batch. Searches are hybrid: a vector leg and a
//! full-text (BM25) leg fused by their scaled scores (or by Reciprocal Rank
//! Fusion), optionally an MMR step for diversity (`Ranking`). Filter values
//! are always quoted and escaped, never spliced.
#![forbid(unsafe_code)]

mod chunks;
mod conversations;
mod rank;
mod sql;

use std::time::Duration;

pub use bruno_events::payload::EmbedderInfo;
pub use bruno_events::payload::SearchMode;
pub use chunks::TABLE as CHUNKS_TABLE;
pub use chunks::{ChunkRow, Chunks, DocumentWrite, Hit, SearchFilters, WriteOutcome};
pub use conversations::TABLE as CONVERSATIONS_TABLE;
pub use conversations::{Conversations, TurnRow};
use lancedb::arrow::arrow_schema::SchemaRef;
use lancedb::database::CreateTableMode;
use lancedb::index::Index;
use lancedb::index::scalar::FtsIndexBuilder;
use lancedb::{Connection, Table};
pub use rank::{Fusion, Ranking, fuse_min_max, fuse_scores, mmr, rrf, rrf_weighted};
use serde::Deserialize;
pub use sql::quote;

/// Run `op` in a client span of one LanceDB operation on `table`
/// (OpenTelemetry database conventions), recording the rows it returned or
/// wrote and whether it failed.
pub(crate) async fn traced<T>(
    operation: &'static str,
    table: &'static str,
    rows: impl Fn(&T) -> u64,
    op: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "db",
        otel.name = %format_args!("{operation} {table}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        "db.system.name" = "lancedb",
        "db.operation.name" = operation,
        "db.collection.name" = table,
        "db.response.returned_rows" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    let result = op.instrument(span.clone()).await;
    match &result {
        Ok(value) => {
            span.record("db.response.returned_rows", rows(value));
        }
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", e.to_string());
        }
    }
    result
}

/// Schema-metadata key of the embedder model id.
pub const META_MODEL: &str = "bruno.embedder.model";
/// Schema-metadata key of the embedder dimension.
pub const META_DIMENSION: &str = "bruno.embedder.dimension";

/// `[store]` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// A local path (a PersistentVolume, `./data/lancedb`) or `s3://bucket/prefix`.
    pub uri: String,
    /// How stale a reader may be: new commits are seen within this interval.
    pub read_consistency_ms: u64,
    /// Rows before a vector index is built (brute force below).
    pub vector_index_min_rows: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            uri: "./data/lancedb".into(),
            read_consistency_ms: 1000,
            vector_index_min_rows: 50_000,
        }
    }
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// LanceDB failed.
    #[error("lancedb: {0}")]
    Lance(#[from] lancedb::Error),
    /// Arrow data could not be built or read.
    #[error("arrow: {0}")]
    Arrow(#[from] lancedb::arrow::arrow_schema::ArrowError),
    /// The table was filled by another embedder.
    #[error("table {table} holds vectors of {stored}; refusing {requested}")]
    EmbedderMismatch {
        /// The table.
        table: String,
        /// What filled it (`model/dimension`).
        stored: String,
        /// What was asked for.
        requested: String,
    },
    /// A row does not fit the table.
    #[error("invalid row: {0}")]
    InvalidRow(String),
    /// The table's data is not what Bruno wrote.
    #[error("corrupt table {0}")]
    Corrupt(String),
}

impl bruno_core::Classify for StoreError {
    fn code(&self) -> bruno_core::ErrorCode {
        use bruno_core::ErrorCode;
        match self {
            // The input can never be stored: rows of another embedder, or
            // rows that do not fit the table.
            Self::EmbedderMismatch { .. } | Self::InvalidRow(_) => ErrorCode::InvalidPayload,
            Self::Corrupt(_) => ErrorCode::Internal,
            Self::Lance(_) | Self::Arrow(_) => ErrorCode::Dependency,
        }
    }
}

/// A connection to Bruno's LanceDB database.
#[derive(Clone)]
pub struct Store {
    db: Connection,
    config: StoreConfig,
}

impl Store {
    /// Connect (creating a local directory if needed).
    pub async fn open(config: StoreConfig) -> Result<Self, StoreError> {
        let db = lancedb::connect(&config.uri)
            .read_consistency_interval(Duration::from_millis(config.read_consistency_ms))
            .execute()
            .await?;
        Ok(Self { db, config })
    }

    /// The `chunks` table, created for `embedder` if missing.
    pub async fn chunks(&self, embedder: &EmbedderInfo) -> Result<Chunks, StoreError> {
        Chunks::open(&self.db, embedder, &self.config, true).await
    }

    /// The `chunks` table for reading only: `None` while it does not exist
    /// (nothing is created; readers never write).
    pub async fn existing_chunks(
        &self,
        embedder: &EmbedderInfo,
    ) -> Result<Option<Chunks>, StoreError> {
        match self.db.open_table(chunks::TABLE).execute().await {
            Ok(_) => Ok(Some(
                Chunks::open(&self.db, embedder, &self.config, false).await?,
            )),
            Err(lancedb::Error::TableNotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The `conversations` table for reading only: `None` while it does not exist.
    pub async fn existing_conversations(
        &self,
        embedder: &EmbedderInfo,
    ) -> Result<Option<Conversations>, StoreError> {
        match self.db.open_table(conversations::TABLE).execute().await {
            Ok(_) => Ok(Some(Conversations::open(&self.db, embedder, false).await?)),
            Err(lancedb::Error::TableNotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The `conversations` table, created for `embedder` if missing.
    pub async fn conversations(
        &self,
        embedder: &EmbedderInfo,
    ) -> Result<Conversations, StoreError> {
        Conversations::open(&self.db, embedder, true).await
    }

    /// The storage URI.
    pub fn uri(&self) -> &str {
        &self.config.uri
    }

    /// The names of the tables present.
    pub async fn table_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.db.table_names().execute().await?)
    }

    /// Compact the table `name` (see [`Chunks::compact`]) through a handle
    /// of its own, if it has more than one data file or rows not yet in its
    /// indexes; `false` when it does not exist or had nothing to do. The
    /// writer does this at start-up for what an earlier run left (it learns
    /// the tables' embedder only from the writes).
    pub async fn settle_table(&self, name: &str) -> Result<bool, StoreError> {
        let Some(table) = self.raw_table(name).await? else {
            return Ok(false);
        };
        if !unsettled(&table).await? {
            return Ok(false);
        }
        compact_table(&table).await?;
        Ok(true)
    }

    /// A table as LanceDB has it, for whole-table work (backups pin a
    /// version with a tag and copy its files); `None` if it does not exist.
    pub async fn raw_table(&self, name: &str) -> Result<Option<Table>, StoreError> {
        match self.db.open_table(name).execute().await {
            Ok(t) => Ok(Some(t)),
            Err(lancedb::Error::TableNotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Row `i` of a vector column, or no vector when the query did not read
/// the column.
fn vector_at(
    vectors: Option<&lancedb::arrow::arrow_array::FixedSizeListArray>,
    i: usize,
) -> Vec<f32> {
    use lancedb::arrow::arrow_array::{Array, Float32Array};
    vectors
        .and_then(|v| {
            v.value(i)
                .as_any()
                .downcast_ref::<Float32Array>()
                .map(|a| a.values().to_vec())
        })
        .unwrap_or_default()
}

fn embedder_label(model: &str, dimension: impl std::fmt::Display) -> String {
    format!("{model}/{dimension}")
}

/// Open `name` (the writer creates it with `schema` if missing) and check
/// that its embedder is `embedder`; the writer also makes sure it has a
/// full-text index on `text`.
async fn open_checked(
    db: &Connection,
    name: &str,
    schema: SchemaRef,
    embedder: &EmbedderInfo,
    writer: bool,
) -> Result<Table, StoreError> {
    // Open first: creating with another embedder's schema would fail with a
    // schema error instead of the mismatch we want to report.
    let table = match db.open_table(name).execute().await {
        Ok(table) => table,
        Err(lancedb::Error::TableNotFound { .. }) if writer => {
            db.create_empty_table(name, schema)
                .mode(CreateTableMode::exist_ok(|request| request))
                .execute()
                .await?
        }
        Err(e) => return Err(e.into()),
    };
    let actual = table.schema().await?;
    let stored_model = actual.metadata.get(META_MODEL).cloned().unwrap_or_default();
    let stored_dim = actual
        .metadata
        .get(META_DIMENSION)
        .cloned()
        .unwrap_or_default();
    if stored_model != embedder.model || stored_dim != embedder.dimension.to_string() {
        return Err(StoreError::EmbedderMismatch {
            table: name.into(),
            stored: embedder_label(&stored_model, &stored_dim),
            requested: embedder_label(&embedder.model, embedder.dimension),
        });
    }
    let indices = if writer {
        table.list_indices().await?
    } else {
        Vec::new()
    };
    if writer
        && !indices
            .iter()
            .any(|i| i.columns.iter().any(|c| c == "text"))
    {
        table
            .create_index(&["text"], Index::FTS(FtsIndexBuilder::default()))
            .execute()
            .await?;
    }
    Ok(table)
}

/// Fold new rows into the indexes, compact files and drop versions older
/// than `keep`.
async fn maintain_table(table: &Table, keep: chrono::Duration) -> Result<(), StoreError> {
    use lancedb::table::OptimizeAction;
    compact_table(table).await?;
    table
        .optimize(OptimizeAction::Prune {
            older_than: Some(keep),
            delete_unverified: None,
            error_if_tagged_old_versions: None,
        })
        .await?;
    Ok(())
}

/// Data files (fragments) in the table's current version.
async fn table_files(table: &Table) -> Result<usize, StoreError> {
    Ok(table.stats().await?.fragment_stats.num_fragments)
}

/// Fold new rows into the indexes, then merge the data files into one.
/// Every commit adds a file, and a query opens every file and scans the
/// rows no index covers yet, so a table written in many small commits slows
/// its readers down until this runs (a dev-profile search over 1,799 chunks
/// in 12 files, 45 rows outside the full-text index: 92 ms p50; after
/// this: 50 ms). The writer runs it every few commits and when writes
/// pause. Indexes first: LanceDB merges covered and uncovered files
/// apart, so the other order leaves two files.
async fn compact_table(table: &Table) -> Result<(), StoreError> {
    use lancedb::table::{CompactionOptions, OptimizeAction};
    table
        .optimize(OptimizeAction::Index(Default::default()))
        .await?;
    table
        .optimize(OptimizeAction::Compact {
            options: CompactionOptions::default(),
            remap_options: None,
        })
        .await?;
    Ok(())
}

/// Whether [`compact_table`] has anything to do: more than one data file,
/// or rows an index does not cover yet.
async fn unsettled(table: &Table) -> Result<bool, StoreError> {
    if table_files(table).await? > 1 {
        return Ok(true);
    }
    for index in table.list_indices().await? {
        if table
            .index_stats(&index.name)
            .await?
            .is_some_and(|s| s.num_unindexed_rows > 0)
        {
            return Ok(true);
        }
    }
    Ok(false)
}
