//! The `conversations` table: every turn of every session, for memory.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::TryStreamExt;
use lancedb::arrow::arrow_array::{
    Array, FixedSizeListArray, Float32Array, RecordBatch, RecordBatchIterator, RecordBatchReader,
    StringArray, TimestampMicrosecondArray,
};
use lancedb::arrow::arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use lancedb::index::Index;
use lancedb::index::scalar::BTreeIndexBuilder;
use lancedb::query::{ColumnOrdering, ExecutableQuery, QueryBase, Select};
use lancedb::{Connection, DistanceType, Table};

use crate::sql::quote;
use crate::{EmbedderInfo, META_DIMENSION, META_MODEL, StoreError, embedder_label, open_checked};

/// The table's name.
pub const TABLE: &str = "conversations";

/// One turn (a question or an answer) of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnRow {
    /// Deterministic id (from the turn's correlation id and role).
    pub id: String,
    /// The session.
    pub session_id: String,
    /// `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub text: String,
    /// The correlation id of the chat turn.
    pub correlation_id: String,
    /// When it was said (µs since the epoch, UTC).
    pub at_micros: i64,
    /// Unit-length embedding of the text (empty from [`Conversations::recent`],
    /// which does not read vectors).
    pub vector: Vec<f32>,
}

/// Handle to the `conversations` table.
#[derive(Clone)]
pub struct Conversations {
    table: Table,
    schema: SchemaRef,
    embedder: EmbedderInfo,
}

fn schema(embedder: &EmbedderInfo) -> Schema {
    let vector = DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, true)),
        embedder.dimension as i32,
    );
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("session_id", DataType::Utf8, false),
        Field::new("role", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("correlation_id", DataType::Utf8, false),
        Field::new("vector", vector, false),
        Field::new("embedder", DataType::Utf8, false),
        Field::new("created_at", ts.clone(), false),
        Field::new("updated_at", ts, false),
    ])
    .with_metadata(HashMap::from([
        (META_MODEL.to_owned(), embedder.model.clone()),
        (META_DIMENSION.to_owned(), embedder.dimension.to_string()),
    ]))
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, StoreError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| StoreError::Corrupt(format!("{TABLE}.{name}")))
}

fn turns(batches: &[RecordBatch]) -> Result<Vec<TurnRow>, StoreError> {
    let mut out = Vec::new();
    for batch in batches {
        let ids = column::<StringArray>(batch, "id")?;
        let sessions = column::<StringArray>(batch, "session_id")?;
        let roles = column::<StringArray>(batch, "role")?;
        let texts = column::<StringArray>(batch, "text")?;
        let correlations = column::<StringArray>(batch, "correlation_id")?;
        let created = column::<TimestampMicrosecondArray>(batch, "created_at")?;
        // Absent when the query did not select it (`recent` does not).
        let vectors = batch
            .column_by_name("vector")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>());
        for i in 0..batch.num_rows() {
            let vector = crate::vector_at(vectors, i);
            out.push(TurnRow {
                id: ids.value(i).to_owned(),
                session_id: sessions.value(i).to_owned(),
                role: roles.value(i).to_owned(),
                text: texts.value(i).to_owned(),
                correlation_id: correlations.value(i).to_owned(),
                at_micros: created.value(i),
                vector,
            });
        }
    }
    Ok(out)
}

impl Conversations {
    pub(crate) async fn open(
        db: &Connection,
        embedder: &EmbedderInfo,
        writer: bool,
    ) -> Result<Self, StoreError> {
        let wanted = Arc::new(schema(embedder));
        let table = open_checked(db, TABLE, wanted.clone(), embedder, writer).await?;
        // Every read is of one session: a B-tree on session_id spares the
        // readers a scan of the whole table.
        if writer
            && !table
                .list_indices()
                .await?
                .iter()
                .any(|i| i.columns.iter().any(|c| c == "session_id"))
        {
            table
                .create_index(&["session_id"], Index::BTree(BTreeIndexBuilder::default()))
                .execute()
                .await?;
        }
        Ok(Self {
            table,
            schema: wanted,
            embedder: embedder.clone(),
        })
    }

    /// The embedder this table holds vectors of.
    pub fn embedder(&self) -> &EmbedderInfo {
        &self.embedder
    }

    /// Upsert turns by id in one commit (a redelivered write changes nothing).
    /// Returns the table version after the commit.
    pub async fn write(&self, rows: &[TurnRow]) -> Result<u64, StoreError> {
        let n = rows.len() as u64;
        crate::traced(
            "merge_insert",
            "conversations",
            |_| n,
            self.write_untraced(rows),
        )
        .await
    }

    async fn write_untraced(&self, rows: &[TurnRow]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(self.table.version().await?);
        }
        let dim = self.embedder.dimension as usize;
        if let Some(r) = rows.iter().find(|r| r.vector.len() != dim) {
            return Err(StoreError::InvalidRow(format!(
                "turn {} has {} dimensions, the table holds {dim}",
                r.id,
                r.vector.len()
            )));
        }
        let now = chrono::Utc::now().timestamp_micros();
        let values =
            Float32Array::from_iter_values(rows.iter().flat_map(|r| r.vector.iter().copied()));
        let item = Arc::new(Field::new("item", DataType::Float32, true));
        let vectors = FixedSizeListArray::try_new(item, dim as i32, Arc::new(values), None)?;
        let label = embedder_label(&self.embedder.model, self.embedder.dimension);
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.id.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.session_id.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.role.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.text.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.correlation_id.as_str()),
                )),
                Arc::new(vectors),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|_| label.as_str()),
                )),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.at_micros))
                        .with_timezone("UTC"),
                ),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|_| now))
                        .with_timezone("UTC"),
                ),
            ],
        )?;
        let reader: Box<dyn RecordBatchReader + Send> = Box::new(RecordBatchIterator::new(
            vec![Ok(batch)],
            self.schema.clone(),
        ));
        let mut merge = self.table.merge_insert(&["id"]);
        merge
            .when_matched_update_all(None)
            .when_not_matched_insert_all();
        Ok(merge.execute(reader).await?.version)
    }

    /// The session's last `n` turns, oldest first.
    pub async fn recent(&self, session_id: &str, n: usize) -> Result<Vec<TurnRow>, StoreError> {
        let recent = self.recent_untraced(session_id, n);
        crate::traced(
            "recent",
            "conversations",
            |t: &Vec<TurnRow>| t.len() as u64,
            recent,
        )
        .await
    }

    async fn recent_untraced(
        &self,
        session_id: &str,
        n: usize,
    ) -> Result<Vec<TurnRow>, StoreError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        // Newest first, the last `n` only: LanceDB sorts the session's
        // timestamps and roles (a top-n) and reads the texts of those `n`
        // rows alone, so a long session costs little more than a short one.
        // At the same instant an answer is newer than its question.
        let batches: Vec<RecordBatch> = self
            .table
            .query()
            .only_if(format!("session_id = {}", quote(session_id)))
            .order_by(Some(vec![
                ColumnOrdering::desc_nulls_last("created_at".into()),
                ColumnOrdering::asc_nulls_last("role".into()),
            ]))
            .limit(n)
            .select(Select::columns(&[
                "id",
                "session_id",
                "role",
                "text",
                "correlation_id",
                "created_at",
            ]))
            .execute()
            .await?
            .try_collect()
            .await?;
        let mut last = turns(&batches)?;
        // Oldest first; a question sorts before its answer at the same
        // instant (the same order, whatever order the batches came in).
        last.sort_by(|a, b| {
            a.at_micros
                .cmp(&b.at_micros)
                .then_with(|| b.role.cmp(&a.role))
        });
        Ok(last)
    }

    /// The session's `k` turns nearest to `vector`, best first.
    pub async fn related(
        &self,
        session_id: &str,
        vector: &[f32],
        k: usize,
    ) -> Result<Vec<TurnRow>, StoreError> {
        let related = self.related_untraced(session_id, vector, k);
        crate::traced(
            "vector_search",
            "conversations",
            |t: &Vec<TurnRow>| t.len() as u64,
            related,
        )
        .await
    }

    async fn related_untraced(
        &self,
        session_id: &str,
        vector: &[f32],
        k: usize,
    ) -> Result<Vec<TurnRow>, StoreError> {
        if vector.len() != self.embedder.dimension as usize {
            return Err(StoreError::InvalidRow(format!(
                "query vector has {} dimensions, the table holds {}",
                vector.len(),
                self.embedder.dimension
            )));
        }
        let query = self
            .table
            .query()
            .nearest_to(vector)?
            .column("vector")
            .distance_type(DistanceType::Cosine)
            .only_if(format!("session_id = {}", quote(session_id)))
            .limit(k)
            .select(Select::columns(&[
                "id",
                "session_id",
                "role",
                "text",
                "correlation_id",
                "created_at",
                "vector",
            ]));
        let batches: Vec<RecordBatch> = query.execute().await?.try_collect().await?;
        turns(&batches)
    }

    /// Rows in the table (optionally of one session).
    pub async fn count(&self, session_id: Option<&str>) -> Result<usize, StoreError> {
        Ok(self
            .table
            .count_rows(session_id.map(|s| format!("session_id = {}", quote(s))))
            .await?)
    }

    /// Data files in the current version (each commit adds one; a
    /// compaction merges them).
    pub async fn files(&self) -> Result<usize, StoreError> {
        crate::table_files(&self.table).await
    }

    /// Fold new rows into the indexes and merge the data files (no version
    /// is dropped): what the writer runs every few commits and when writes
    /// pause.
    pub async fn compact(&self) -> Result<(), StoreError> {
        crate::compact_table(&self.table).await
    }

    /// Compact files and drop versions older than `keep`.
    pub async fn maintain(&self, keep: chrono::Duration) -> Result<(), StoreError> {
        crate::maintain_table(&self.table, keep).await
    }
}
