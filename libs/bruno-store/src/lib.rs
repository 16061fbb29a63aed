//! Bruno's state in LanceDB.
//!
//! - `chunks`: the knowledge base (id, doc_id, source, title, text,
//!   content_hash, chunk_index, vector, embedder, updated_at);
//! - every table records the embedder (model, dimension) that filled it in
//!   its schema metadata; opening it with another embedder is an error.
//!
//! Writes are idempotent: rows are keyed by deterministic ids and upserted
//! with one `merge_insert` per batch, which also deletes the stale chunks of
//! the documents in the batch. Searches are hybrid: a vector leg and a
//! full-text (BM25) leg fused by Reciprocal Rank Fusion, then an MMR step
//! for diversity. Filter values are always quoted and escaped, never spliced.
#![forbid(unsafe_code)]

mod chunks;
mod rank;
mod sql;

use std::time::Duration;

pub use bruno_events::payload::EmbedderInfo;
pub use chunks::{ChunkRow, Chunks, DocumentWrite, Hit, SearchFilters, WriteOutcome};
use lancedb::Connection;
pub use rank::{mmr, rrf};
use serde::Deserialize;
pub use sql::quote;

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
        Self { uri: "./data/lancedb".into(), read_consistency_ms: 1000, vector_index_min_rows: 50_000 }
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
        Chunks::open_or_create(&self.db, embedder, &self.config).await
    }

    /// The names of the tables present.
    pub async fn table_names(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.db.table_names().execute().await?)
    }
}

fn embedder_label(model: &str, dimension: impl std::fmt::Display) -> String {
    format!("{model}/{dimension}")
}
