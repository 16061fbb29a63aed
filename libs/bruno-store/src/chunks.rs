//! The `chunks` table: the knowledge base.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::TryStreamExt;
use lancedb::arrow::arrow_array::{
    Array, FixedSizeListArray, Float32Array, RecordBatch, RecordBatchIterator, RecordBatchReader,
    StringArray, TimestampMicrosecondArray, UInt32Array,
};
use lancedb::arrow::arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use lancedb::index::Index;
use lancedb::index::scalar::FullTextSearchQuery;
use lancedb::query::{ExecutableQuery, QueryBase, Select};
use lancedb::{Connection, DistanceType, Table};

use crate::sql::{in_list, quote};
use crate::{
    EmbedderInfo, Fusion, META_DIMENSION, META_MODEL, Ranking, SearchMode, StoreConfig, StoreError,
    embedder_label, open_checked,
};

/// The table's name.
pub const TABLE: &str = "chunks";

/// One chunk to store.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRow {
    /// Deterministic chunk id.
    pub id: String,
    /// Its document.
    pub doc_id: String,
    /// The document's source.
    pub source: String,
    /// The document's title.
    pub title: Option<String>,
    /// The chunk's text.
    pub text: String,
    /// Hash of the document version the chunk came from.
    pub content_hash: String,
    /// Position in the document.
    pub chunk_index: u32,
    /// Unit-length embedding.
    pub vector: Vec<f32>,
}

/// Chunks of one document version.
#[derive(Debug, Clone)]
pub struct DocumentWrite {
    /// The document.
    pub doc_id: String,
    /// Chunks to upsert.
    pub rows: Vec<ChunkRow>,
    /// The document's full chunk-id set: its stored chunks not in here are removed.
    pub chunk_ids: Vec<String>,
}

/// What one batch commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Rows inserted.
    pub inserted: u64,
    /// Rows updated in place.
    pub updated: u64,
    /// Stale rows deleted.
    pub deleted: u64,
    /// Table version after the commit.
    pub version: u64,
}

/// Exact-match metadata filters.
#[derive(Debug, Clone, Default)]
pub struct SearchFilters {
    /// Only this source.
    pub source: Option<String>,
    /// Only this document.
    pub doc_id: Option<String>,
}

impl SearchFilters {
    fn predicate(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(s) = &self.source {
            parts.push(format!("source = {}", quote(s)));
        }
        if let Some(d) = &self.doc_id {
            parts.push(format!("doc_id = {}", quote(d)));
        }
        (!parts.is_empty()).then(|| parts.join(" AND "))
    }
}

/// A search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Chunk id.
    pub chunk_id: String,
    /// Document id.
    pub doc_id: String,
    /// Document title.
    pub title: Option<String>,
    /// Document source.
    pub source: String,
    /// Chunk text.
    pub text: String,
    /// Fused score (higher is better; see [`crate::Ranking`]).
    pub score: f32,
}

/// Handle to the `chunks` table.
#[derive(Clone)]
pub struct Chunks {
    table: Table,
    schema: SchemaRef,
    embedder: EmbedderInfo,
    vector_index_min_rows: usize,
}

fn schema(embedder: &EmbedderInfo) -> Schema {
    let vector = DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, true)),
        embedder.dimension as i32,
    );
    Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("title", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, false),
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("chunk_index", DataType::UInt32, false),
        Field::new("vector", vector, false),
        Field::new("embedder", DataType::Utf8, false),
        Field::new(
            "updated_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
    ])
    .with_metadata(HashMap::from([
        (META_MODEL.to_owned(), embedder.model.clone()),
        (META_DIMENSION.to_owned(), embedder.dimension.to_string()),
    ]))
}

/// Stale = a stored chunk of one of these documents outside its new id set.
/// Chunk ids are unique across documents (they derive from the doc id), so
/// "doc in the batch and id in none of the batch's id sets" is the same as
/// the per-document test, and it is two hash-set lookups per row instead of
/// one OR term per document.
fn stale_filter(docs: &[DocumentWrite]) -> String {
    let doc_ids: Vec<&str> = docs.iter().map(|d| d.doc_id.as_str()).collect();
    let chunk_ids: Vec<&str> = docs
        .iter()
        .flat_map(|d| d.chunk_ids.iter().map(String::as_str))
        .collect();
    format!(
        "{} AND NOT ({})",
        in_list("doc_id", &doc_ids),
        in_list("id", &chunk_ids)
    )
}

fn ids_of(ranked: Vec<(String, f32)>) -> Vec<String> {
    ranked.into_iter().map(|(id, _)| id).collect()
}

fn strings<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, StoreError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| StoreError::Corrupt(format!("{TABLE}.{name}")))
}

impl Chunks {
    pub(crate) async fn open(
        db: &Connection,
        embedder: &EmbedderInfo,
        config: &StoreConfig,
        writer: bool,
    ) -> Result<Self, StoreError> {
        let wanted = Arc::new(schema(embedder));
        let table = open_checked(db, TABLE, wanted.clone(), embedder, writer).await?;
        let chunks = Self {
            table,
            schema: wanted,
            embedder: embedder.clone(),
            vector_index_min_rows: config.vector_index_min_rows,
        };
        Ok(chunks)
    }

    /// The embedder this table holds vectors of.
    pub fn embedder(&self) -> &EmbedderInfo {
        &self.embedder
    }

    fn batch(&self, rows: &[&ChunkRow]) -> Result<RecordBatch, StoreError> {
        let dim = self.embedder.dimension as usize;
        for row in rows {
            if row.vector.len() != dim {
                return Err(StoreError::InvalidRow(format!(
                    "chunk {} has {} dimensions, the table holds {}",
                    row.id,
                    row.vector.len(),
                    dim
                )));
            }
        }
        let now = chrono::Utc::now().timestamp_micros();
        let values =
            Float32Array::from_iter_values(rows.iter().flat_map(|r| r.vector.iter().copied()));
        let item = Arc::new(Field::new("item", DataType::Float32, true));
        let vectors = FixedSizeListArray::try_new(item, dim as i32, Arc::new(values), None)?;
        let label = embedder_label(&self.embedder.model, self.embedder.dimension);
        Ok(RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.id.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.doc_id.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.source.as_str()),
                )),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.title.as_deref()).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.text.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.content_hash.as_str()),
                )),
                Arc::new(UInt32Array::from_iter_values(
                    rows.iter().map(|r| r.chunk_index),
                )),
                Arc::new(vectors),
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|_| label.as_str()),
                )),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(rows.iter().map(|_| now))
                        .with_timezone("UTC"),
                ),
            ],
        )?)
    }

    /// Upsert the documents of a batch in one commit: every chunk keyed by
    /// id (a redelivered write changes nothing), and the chunks of these
    /// documents that are not in the batch removed.
    pub async fn write(&self, docs: &[DocumentWrite]) -> Result<WriteOutcome, StoreError> {
        let written = |o: &WriteOutcome| o.inserted + o.updated + o.deleted;
        crate::traced("merge_insert", "chunks", written, self.write_untraced(docs)).await
    }

    async fn write_untraced(&self, docs: &[DocumentWrite]) -> Result<WriteOutcome, StoreError> {
        if docs.is_empty() {
            return Ok(WriteOutcome {
                inserted: 0,
                updated: 0,
                deleted: 0,
                version: self.table.version().await?,
            });
        }
        let rows: Vec<&ChunkRow> = docs.iter().flat_map(|d| d.rows.iter()).collect();
        if let Some(r) = docs
            .iter()
            .flat_map(|d| d.rows.iter().map(move |r| (d, r)))
            .find(|(d, r)| r.doc_id != d.doc_id)
        {
            return Err(StoreError::InvalidRow(format!(
                "chunk {} belongs to {}, not {}",
                r.1.id, r.1.doc_id, r.0.doc_id
            )));
        }
        let stale = stale_filter(docs);
        let batch = self.batch(&rows)?;
        let reader: Box<dyn RecordBatchReader + Send> = Box::new(RecordBatchIterator::new(
            vec![Ok(batch)],
            self.schema.clone(),
        ));
        let mut merge = self.table.merge_insert(&["id"]);
        merge
            .when_matched_update_all(None)
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(Some(stale));
        let result = merge.execute(reader).await?;
        Ok(WriteOutcome {
            inserted: result.num_inserted_rows,
            updated: result.num_updated_rows,
            deleted: result.num_deleted_rows,
            version: result.version,
        })
    }

    /// How many stored chunks of each document a write of `docs` would remove.
    pub async fn stale_counts(
        &self,
        docs: &[DocumentWrite],
    ) -> Result<HashMap<String, u64>, StoreError> {
        let mut counts: HashMap<String, u64> = docs.iter().map(|d| (d.doc_id.clone(), 0)).collect();
        if docs.is_empty() {
            return Ok(counts);
        }
        let batches: Vec<RecordBatch> = self
            .table
            .query()
            .only_if(stale_filter(docs))
            .select(Select::columns(&["doc_id"]))
            .execute()
            .await?
            .try_collect()
            .await?;
        for batch in &batches {
            let ids = strings(batch, "doc_id")?;
            for i in 0..ids.len() {
                *counts.entry(ids.value(i).to_owned()).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// The content hash of a stored document, if any of its chunks exist.
    pub async fn content_hash(&self, doc_id: &str) -> Result<Option<String>, StoreError> {
        let batches: Vec<RecordBatch> = self
            .table
            .query()
            .only_if(format!("doc_id = {}", quote(doc_id)))
            .select(Select::columns(&["content_hash"]))
            .limit(1)
            .execute()
            .await?
            .try_collect()
            .await?;
        for batch in &batches {
            let hashes = strings(batch, "content_hash")?;
            if hashes.len() > 0 {
                return Ok(Some(hashes.value(0).to_owned()));
            }
        }
        Ok(None)
    }

    /// Every `(chunk id, doc id)` in the table (for audits and tests).
    pub async fn ids(&self) -> Result<Vec<(String, String)>, StoreError> {
        let batches = Self::collect(
            self.table
                .query()
                .select(Select::columns(&["id", "doc_id"])),
        )
        .await?;
        let mut out = Vec::new();
        for batch in &batches {
            let ids = strings(batch, "id")?;
            let docs = strings(batch, "doc_id")?;
            for i in 0..batch.num_rows() {
                out.push((ids.value(i).to_owned(), docs.value(i).to_owned()));
            }
        }
        Ok(out)
    }

    /// Rows in the table (optionally of one document).
    pub async fn count(&self, doc_id: Option<&str>) -> Result<usize, StoreError> {
        Ok(self
            .table
            .count_rows(doc_id.map(|d| format!("doc_id = {}", quote(d))))
            .await?)
    }

    /// Current table version.
    pub async fn version(&self) -> Result<u64, StoreError> {
        Ok(self.table.version().await?)
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

    /// Fold new rows into the indexes, build the vector index once the table
    /// is large enough, compact files and drop versions older than `keep`.
    pub async fn maintain(&self, keep: chrono::Duration) -> Result<(), StoreError> {
        let rows = self.table.count_rows(None).await?;
        let has_vector_index = self
            .table
            .list_indices()
            .await?
            .iter()
            .any(|i| i.columns.iter().any(|c| c == "vector"));
        if !has_vector_index && rows >= self.vector_index_min_rows.max(256) {
            let index = lancedb::index::vector::IvfHnswSqIndexBuilder::default()
                .distance_type(DistanceType::Cosine);
            self.table
                .create_index(&["vector"], Index::IvfHnswSq(index))
                .execute()
                .await?;
        }
        crate::maintain_table(&self.table, keep).await
    }

    async fn collect(query: impl ExecutableQuery) -> Result<Vec<RecordBatch>, StoreError> {
        Ok(query.execute().await?.try_collect().await?)
    }

    /// Hybrid search with the default [`Ranking`].
    pub async fn search(
        &self,
        query_vector: &[f32],
        query_text: &str,
        k: usize,
        filters: &SearchFilters,
    ) -> Result<Vec<Hit>, StoreError> {
        self.search_ranked(
            query_vector,
            query_text,
            k,
            filters,
            SearchMode::Hybrid,
            &Ranking::default(),
        )
        .await
    }

    /// Search: the best candidates by vector and by BM25 (or by one alone,
    /// per `mode`), fused by their scaled scores or by weighted RRF, each
    /// chunk lifted by a share of its document's other candidates, then `k`
    /// picked by MMR (all per `ranking`; docs/retrieval.md measured them).
    pub async fn search_ranked(
        &self,
        query_vector: &[f32],
        query_text: &str,
        k: usize,
        filters: &SearchFilters,
        mode: SearchMode,
        ranking: &Ranking,
    ) -> Result<Vec<Hit>, StoreError> {
        let search = self.search_untraced(query_vector, query_text, k, filters, mode, ranking);
        crate::traced(
            "hybrid_search",
            "chunks",
            |h: &Vec<Hit>| h.len() as u64,
            search,
        )
        .await
    }

    async fn search_untraced(
        &self,
        query_vector: &[f32],
        query_text: &str,
        k: usize,
        filters: &SearchFilters,
        mode: SearchMode,
        ranking: &Ranking,
    ) -> Result<Vec<Hit>, StoreError> {
        if query_vector.len() != self.embedder.dimension as usize {
            return Err(StoreError::InvalidRow(format!(
                "query vector has {} dimensions, the table holds {}",
                query_vector.len(),
                self.embedder.dimension
            )));
        }
        let candidates = ranking.candidates(k);
        // The vectors only serve MMR; at λ = 1 (the default) it needs none.
        let with_vectors = ranking.mmr_lambda < 1.0;
        let columns: &[&str] = if with_vectors {
            &["id", "doc_id", "source", "title", "text", "vector"]
        } else {
            &["id", "doc_id", "source", "title", "text"]
        };
        let vector_leg = async {
            if mode == SearchMode::Text {
                return Ok(Vec::new());
            }
            let mut vector_query = self
                .table
                .query()
                .nearest_to(query_vector)?
                .column("vector")
                .distance_type(DistanceType::Cosine)
                .limit(candidates)
                .select(Select::columns(&[columns, &["_distance"]].concat()));
            if let Some(p) = filters.predicate() {
                vector_query = vector_query.only_if(p);
            }
            Self::collect(vector_query).await
        };
        // The two legs run concurrently: each is its own LanceDB scan.
        let text_leg = async {
            if mode == SearchMode::Vector || query_text.trim().is_empty() {
                return Ok(Vec::new());
            }
            let mut text_query = self
                .table
                .query()
                .full_text_search(FullTextSearchQuery::new(query_text.to_owned()))
                .limit(candidates)
                .select(Select::columns(&[columns, &["_score"]].concat()));
            if let Some(p) = filters.predicate() {
                text_query = text_query.only_if(p);
            }
            Self::collect(text_query).await
        };
        let (vector_batches, text_batches) = futures_util::try_join!(vector_leg, text_leg)?;

        // Rows by id, and each leg's ranking.
        let mut rows: HashMap<String, (Hit, Vec<f32>)> = HashMap::new();
        // Each leg's ids, best first, with the leg's own relevance (cosine
        // similarity, BM25), higher is better.
        let mut rank_of =
            |batches: &[RecordBatch], column: &str| -> Result<Vec<(String, f32)>, StoreError> {
                let mut ranked = Vec::new();
                // Cosine distance is 0..=2; similarity is 1 - distance.
                let is_distance = column == "_distance";
                for batch in batches {
                    let relevance = batch
                        .column_by_name(column)
                        .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
                        .ok_or_else(|| StoreError::Corrupt(format!("{TABLE}.{column}")))?;
                    let ids = strings(batch, "id")?;
                    let doc_ids = strings(batch, "doc_id")?;
                    let sources = strings(batch, "source")?;
                    let titles = strings(batch, "title")?;
                    let texts = strings(batch, "text")?;
                    let vectors = if with_vectors {
                        Some(
                            batch
                                .column_by_name("vector")
                                .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
                                .ok_or_else(|| StoreError::Corrupt(format!("{TABLE}.vector")))?,
                        )
                    } else {
                        None
                    };
                    for i in 0..batch.num_rows() {
                        let id = ids.value(i).to_owned();
                        let value = relevance.value(i);
                        let value = if is_distance { 1.0 - value } else { value };
                        ranked.push((id.clone(), value));
                        rows.entry(id.clone()).or_insert_with(|| {
                            let vector = crate::vector_at(vectors, i);
                            let hit = Hit {
                                chunk_id: id,
                                doc_id: doc_ids.value(i).to_owned(),
                                title: (!titles.is_null(i)).then(|| titles.value(i).to_owned()),
                                source: sources.value(i).to_owned(),
                                text: texts.value(i).to_owned(),
                                score: 0.0,
                            };
                            (hit, vector)
                        });
                    }
                }
                Ok(ranked)
            };
        let by_vector = rank_of(&vector_batches, "_distance")?;
        let by_text = rank_of(&text_batches, "_score")?;
        let fused = match ranking.fusion {
            Fusion::Rrf => crate::rrf_weighted(
                &[
                    (ids_of(by_vector), ranking.vector_weight),
                    (ids_of(by_text), ranking.text_weight),
                ],
                ranking.rrf_k,
            ),
            Fusion::Scores => crate::rank::fuse_scores(&[
                (by_vector, ranking.vector_weight),
                (by_text, ranking.text_weight),
            ]),
            Fusion::MinMax => crate::rank::fuse_min_max(&[
                (by_vector, ranking.vector_weight),
                (by_text, ranking.text_weight),
            ]),
        };
        let mut pool: Vec<(String, f32)> = fused.into_iter().take(candidates).collect();
        if ranking.document_share > 0.0 {
            let doc_of = |id: &str| rows.get(id).map(|(h, _)| h.doc_id.as_str());
            crate::rank::share_with_document(&mut pool, doc_of, ranking.document_share);
        }
        let best = pool
            .first()
            .map(|(_, s)| *s)
            .filter(|s| *s > 0.0)
            .unwrap_or(1.0);
        let cands: Vec<(usize, f32, &[f32])> = pool
            .iter()
            .enumerate()
            .filter_map(|(i, (id, score))| {
                rows.get(id).map(|(_, v)| (i, score / best, v.as_slice()))
            })
            .collect();
        let picked = crate::mmr(&cands, k, ranking.mmr_lambda);
        Ok(picked
            .into_iter()
            .filter_map(|i| {
                let (id, score) = &pool[i];
                rows.get(id).map(|(hit, _)| Hit {
                    score: *score,
                    ..hit.clone()
                })
            })
            .collect())
    }
}
