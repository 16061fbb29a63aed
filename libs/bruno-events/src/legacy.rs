//! Retired payloads that are still read, so messages already in a queue
//! (or sent by a not-yet-upgraded producer during a rolling upgrade) are
//! not lost. ADR 0009 says why and for how long.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ValidationError;
use crate::payload::{
    ChunkRecord, ChunkWrite, EmbedderInfo, MemoryWrite, Role, Table, TurnRecord, TurnWrite,
};

/// One row of a `bruno.memory.write.v1`: table columns as untyped metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MemoryRowV1 {
    /// Deterministic row id.
    pub id: String,
    /// The text that was embedded.
    pub text: String,
    /// The embedding.
    pub vector: Vec<f32>,
    /// Table-specific columns (source, title, chunk_index; session_id,
    /// role, correlation_id, created_at).
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// `bruno.memory.write.v1` (retired; read, no longer produced): the rows
/// of a write with their columns in string-keyed metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryWriteV1 {
    /// Target table.
    pub table: Table,
    /// Rows to upsert.
    pub rows: Vec<MemoryRowV1>,
    /// The embedder that filled `rows`.
    pub embedder: EmbedderInfo,
    /// For `chunks`: the document the rows belong to.
    #[serde(default)]
    pub doc_id: Option<String>,
    /// For `chunks`: the document's full chunk-id set.
    #[serde(default)]
    pub chunk_ids: Option<Vec<String>>,
    /// For `chunks`: content hash of the document version.
    #[serde(default)]
    pub content_hash: Option<String>,
}

fn missing(field: &str) -> ValidationError {
    ValidationError::new(format!("data.{field}"), "is required")
}

fn meta_str(row: &MemoryRowV1, i: usize, key: &str) -> Result<String, ValidationError> {
    row.metadata
        .get(key)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| missing(&format!("rows[{i}].metadata.{key}")))
}

impl TryFrom<MemoryWriteV1> for MemoryWrite {
    type Error = ValidationError;

    /// The one place the v1 metadata keys are read.
    fn try_from(v1: MemoryWriteV1) -> Result<Self, ValidationError> {
        match v1.table {
            Table::Chunks => {
                let first = v1.rows.first();
                let rows = v1
                    .rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let chunk_index = r
                            .metadata
                            .get("chunk_index")
                            .and_then(|v| v.as_u64())
                            .and_then(|v| u32::try_from(v).ok())
                            .ok_or_else(|| missing(&format!("rows[{i}].metadata.chunk_index")))?;
                        Ok(ChunkRecord {
                            id: r.id.clone(),
                            chunk_index,
                            text: r.text.clone(),
                            vector: r.vector.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, ValidationError>>()?;
                // v1 carried the document's source and title on every row.
                let source = match first {
                    Some(r) => meta_str(r, 0, "source")?,
                    None => String::new(),
                };
                let title = first.and_then(|r| meta_str(r, 0, "title").ok());
                Ok(MemoryWrite::Chunks(ChunkWrite {
                    embedder: v1.embedder,
                    doc_id: v1.doc_id.ok_or_else(|| missing("doc_id"))?,
                    source,
                    title,
                    content_hash: v1.content_hash.ok_or_else(|| missing("content_hash"))?,
                    chunk_ids: v1.chunk_ids.ok_or_else(|| missing("chunk_ids"))?,
                    rows,
                }))
            }
            Table::Conversations => {
                let rows = v1
                    .rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let role = match meta_str(r, i, "role")?.as_str() {
                            "user" => Role::User,
                            "assistant" => Role::Assistant,
                            other => {
                                return Err(ValidationError::new(
                                    format!("data.rows[{i}].metadata.role"),
                                    format!("{other:?} is neither user nor assistant"),
                                ));
                            }
                        };
                        let at = meta_str(r, i, "created_at")?;
                        let created_at = chrono::DateTime::parse_from_rfc3339(&at)
                            .map_err(|e| {
                                ValidationError::new(
                                    format!("data.rows[{i}].metadata.created_at"),
                                    e.to_string(),
                                )
                            })?
                            .with_timezone(&chrono::Utc);
                        Ok(TurnRecord {
                            id: r.id.clone(),
                            session_id: meta_str(r, i, "session_id")?,
                            role,
                            correlation_id: meta_str(r, i, "correlation_id")?,
                            created_at,
                            text: r.text.clone(),
                            vector: r.vector.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, ValidationError>>()?;
                Ok(MemoryWrite::Conversations(TurnWrite {
                    embedder: v1.embedder,
                    rows,
                }))
            }
        }
    }
}
