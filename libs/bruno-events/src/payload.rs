//! Typed `data` payloads of the catalogue. Field names are the wire names.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a submitted document's text is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DocFormat {
    /// Plain text.
    #[default]
    Text,
    /// CommonMark / GitHub-flavoured markdown.
    Markdown,
}

/// `bruno.document.submitted.v1`: a document to add to (or replace in) the knowledge base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentSubmitted {
    /// Stable id of the document; a later submission with the same id replaces it.
    pub doc_id: String,
    /// Where the document came from (path, URL, system name).
    pub source: String,
    /// Human-readable title.
    #[serde(default)]
    pub title: Option<String>,
    /// The document's full text.
    pub text: String,
    /// Whether `text` is plain text or markdown.
    #[serde(default)]
    pub format: DocFormat,
    /// Free-form string metadata kept with every chunk.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `bruno.document.chunked.v1`: one batch of a long document's chunks, split
/// by the embedder that took the document and embedded by whichever embedder
/// replica takes the batch (each batch is retried on its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentChunked {
    /// The document.
    pub doc_id: String,
    /// The document's source.
    pub source: String,
    /// The document's title.
    #[serde(default)]
    pub title: Option<String>,
    /// Content hash of the document version the chunks belong to.
    pub content_hash: String,
    /// Chunks of this document version in all (over every batch).
    pub chunk_count: u32,
    /// Position of this batch's first chunk in the document.
    pub first_chunk: u32,
    /// The chunks' texts, as stored and embedded (context line included).
    pub texts: Vec<String>,
}

/// Which LanceDB table a write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// The knowledge base.
    Chunks,
    /// Conversation turns (memory).
    Conversations,
}

/// The embedder that produced a set of vectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EmbedderInfo {
    /// Model id, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub model: String,
    /// Vector dimension.
    pub dimension: u32,
}

/// `bruno.memory.write.v2`: rows with vectors for the single LanceDB
/// writer, typed per table (the JSON form carries `"table": "chunks"` or
/// `"table": "conversations"` beside the fields of that variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "table", rename_all = "lowercase")]
pub enum MemoryWrite {
    /// Chunks of one document version for the knowledge base.
    Chunks(ChunkWrite),
    /// Conversation turns for memory.
    Conversations(TurnWrite),
}

impl MemoryWrite {
    /// The target table.
    pub fn table(&self) -> Table {
        match self {
            Self::Chunks(_) => Table::Chunks,
            Self::Conversations(_) => Table::Conversations,
        }
    }
    /// The embedder that filled the rows.
    pub fn embedder(&self) -> &EmbedderInfo {
        match self {
            Self::Chunks(w) => &w.embedder,
            Self::Conversations(w) => &w.embedder,
        }
    }
}

/// Chunks of one document version. Chunks of the document not in
/// `chunk_ids` are removed by the same commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkWrite {
    /// The embedder that filled `rows`.
    pub embedder: EmbedderInfo,
    /// The document.
    pub doc_id: String,
    /// The document's source.
    pub source: String,
    /// The document's title.
    #[serde(default)]
    pub title: Option<String>,
    /// Content hash of the document version.
    pub content_hash: String,
    /// The document's full chunk-id set (a long document's chunks come in
    /// several messages; each carries the whole set).
    pub chunk_ids: Vec<String>,
    /// Chunks to upsert.
    pub rows: Vec<ChunkRecord>,
}

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkRecord {
    /// Deterministic chunk id (one of the write's `chunk_ids`).
    pub id: String,
    /// Position in the document.
    pub chunk_index: u32,
    /// The chunk's text, as embedded.
    pub text: String,
    /// Its unit-length embedding.
    pub vector: Vec<f32>,
}

/// Who said a conversation turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person asking.
    User,
    /// Bruno.
    Assistant,
}

impl Role {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// Conversation turns to remember.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TurnWrite {
    /// The embedder that filled `rows`.
    pub embedder: EmbedderInfo,
    /// Turns to upsert.
    pub rows: Vec<TurnRecord>,
}

/// One turn (a question or an answer) of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TurnRecord {
    /// Deterministic id (from the turn's correlation id and role).
    pub id: String,
    /// The session.
    pub session_id: String,
    /// Who said it.
    pub role: Role,
    /// The correlation id of the chat turn.
    pub correlation_id: String,
    /// When it was said.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// What was said, as embedded.
    pub text: String,
    /// Its unit-length embedding.
    pub vector: Vec<f32>,
}

/// `bruno.document.indexed.v1`: the writer committed a document's chunks,
/// or the embedder found its content already indexed (`unchanged`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DocumentIndexed {
    /// The document.
    pub doc_id: String,
    /// Chunks upserted.
    pub chunks_written: u64,
    /// Stale chunks removed.
    pub chunks_removed: u64,
    /// Table version after the commit (0 when `unchanged`: nothing was committed).
    pub table_version: u64,
    /// The same content was already indexed; nothing was written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
    /// Chunks of this document version in all. A long document is written
    /// in parts, each with its own `document.indexed`: it is fully indexed
    /// once the parts' `chunks_written` (distinct `first_chunk`s) add up to
    /// this. 0 from a writer before this field: the event says nothing of
    /// other parts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_count: u64,
    /// Position of the first chunk this part wrote.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_chunk: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DocumentIndexed {
    /// Whether this event alone says the whole document is indexed (it was
    /// unchanged, or written in one part, or comes from an older writer).
    pub fn whole(&self) -> bool {
        self.unchanged || self.chunk_count == 0 || self.chunks_written >= self.chunk_count
    }
}

/// Metadata filters of a search; each is an exact match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchFilters {
    /// Only chunks from this source.
    #[serde(default)]
    pub source: Option<String>,
    /// Only chunks of this document.
    #[serde(default)]
    pub doc_id: Option<String>,
}

fn default_k() -> u32 {
    5
}

/// `bruno.search.requested.v1`: a search over the knowledge base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequested {
    /// The query text.
    pub query: String,
    /// Number of hits wanted.
    #[serde(default = "default_k")]
    pub k: u32,
    /// Metadata filters.
    #[serde(default)]
    pub filters: SearchFilters,
    /// Which ranking: both legs fused (the default), or one alone (to
    /// measure each leg, as `bruno eval --mode` does).
    #[serde(default, skip_serializing_if = "SearchMode::is_hybrid")]
    pub mode: SearchMode,
}

/// How a search ranks chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Vector similarity and BM25 fused (what chat turns use).
    #[default]
    Hybrid,
    /// Vector similarity alone.
    Vector,
    /// BM25 full-text alone.
    Text,
}

impl SearchMode {
    /// The default mode.
    pub fn is_hybrid(&self) -> bool {
        *self == Self::Hybrid
    }

    /// The mode's name, as in the payload.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Hybrid => "hybrid",
            Self::Vector => "vector",
            Self::Text => "text",
        }
    }
}

/// One retrieved chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SearchHit {
    /// Chunk id.
    pub chunk_id: String,
    /// Document id.
    pub doc_id: String,
    /// Document title.
    #[serde(default)]
    pub title: Option<String>,
    /// Document source.
    pub source: String,
    /// Chunk text.
    pub text: String,
    /// Fused relevance score (higher is better).
    pub score: f32,
}

/// `bruno.search.completed.v1`: the reply to a search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SearchCompleted {
    /// Hits, best first.
    pub hits: Vec<SearchHit>,
}

/// Per-request generation options.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatOptions {
    /// Model override.
    #[serde(default)]
    pub model: Option<String>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Maximum completion tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Passages to retrieve.
    #[serde(default)]
    pub k: Option<u32>,
    /// Stream `chat.delta` events.
    #[serde(default)]
    pub stream: bool,
}

/// `bruno.chat.requested.v1`: one user turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequested {
    /// Conversation session.
    pub session_id: String,
    /// The user's message.
    pub message: String,
    /// Generation options.
    #[serde(default)]
    pub options: ChatOptions,
}

/// A remembered conversation turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MemoryTurn {
    /// Turn id.
    pub id: String,
    /// `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub text: String,
}

/// The question's embedding as the retriever made it, carried to the
/// embedder with the answer so the user turn is not embedded twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuestionVector {
    /// The embedder that made it.
    pub embedder: EmbedderInfo,
    /// Unit-length vector of `embedder.dimension` numbers.
    pub vector: Vec<f32>,
}

impl QuestionVector {
    /// Usable as `embedder`'s vector: same model and dimension, finite,
    /// unit length (anything else is embedded again, never stored).
    pub fn usable_for(&self, embedder: &EmbedderInfo) -> bool {
        let norm: f32 = self.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        self.embedder == *embedder
            && self.vector.len() == embedder.dimension as usize
            && self.vector.iter().all(|x| x.is_finite())
            && (norm - 1.0).abs() < 1e-3
    }
}

/// `bruno.chat.contextualized.v1`: a chat turn with its retrieved context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChatContextualized {
    /// The original request.
    pub request: ChatRequested,
    /// Knowledge-base passages.
    pub passages: Vec<SearchHit>,
    /// Conversation memory.
    pub memory: Vec<MemoryTurn>,
    /// The question's embedding (passed on in `chat.completed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_vector: Option<QuestionVector>,
}

/// `bruno.chat.delta.v1`: a streamed piece of the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChatDelta {
    /// 0-based order of this delta within the turn.
    pub seq: u64,
    /// Text to append.
    pub text: String,
}

/// A source the answer used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Citation {
    /// Chunk id.
    pub chunk_id: String,
    /// Document title.
    #[serde(default)]
    pub title: Option<String>,
    /// Document source.
    pub source: String,
}

/// LLM token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

/// `bruno.chat.completed.v1`: the final answer of a turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChatCompleted {
    /// Conversation session.
    pub session_id: String,
    /// The user's message.
    pub question: String,
    /// The answer.
    pub answer: String,
    /// Sources used.
    pub citations: Vec<Citation>,
    /// Token usage.
    pub usage: TokenUsage,
    /// Model that answered (or `extractive-fallback`).
    pub model: String,
    /// True when the LLM was unavailable and the answer was extracted from passages.
    pub fallback: bool,
    /// The question's embedding from the retriever, for the memory write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_vector: Option<QuestionVector>,
}

/// `bruno.chat.failed.v1`: a turn that could not be answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChatFailed {
    /// Machine-readable reason code.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

/// `bruno.backup.requested.v1`: take a backup.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequested {
    /// Tables to back up; empty means all.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Backup target URI; absent means the configured one.
    #[serde(default)]
    pub target: Option<String>,
}

/// One table in a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TableBackup {
    /// Table name.
    pub name: String,
    /// Table version captured.
    pub version: u64,
    /// Rows captured.
    pub rows: u64,
    /// Encrypted bytes written.
    pub bytes: u64,
}

/// `bruno.backup.completed.v1`: a verified backup exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackupCompleted {
    /// Backup id.
    pub backup_id: String,
    /// Where it was written.
    pub target: String,
    /// Tables captured.
    pub tables: Vec<TableBackup>,
    /// SHA-256 of the manifest.
    pub manifest_sha256: String,
    /// The request was answered by a backup that started after it was made.
    #[serde(default)]
    pub duplicate: bool,
}

/// `bruno.backup.failed.v1`: a backup could not be taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct BackupFailed {
    /// Machine-readable reason code.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_vector_is_reused_only_when_it_is_the_embedders_own() {
        let info = EmbedderInfo {
            model: "m".into(),
            dimension: 2,
        };
        let q = |model: &str, vector: Vec<f32>| QuestionVector {
            embedder: EmbedderInfo {
                model: model.into(),
                dimension: 2,
            },
            vector,
        };
        assert!(q("m", vec![0.6, 0.8]).usable_for(&info));
        assert!(!q("other", vec![0.6, 0.8]).usable_for(&info));
        assert!(!q("m", vec![1.0]).usable_for(&info));
        assert!(!q("m", vec![f32::NAN, 0.8]).usable_for(&info));
        assert!(!q("m", vec![3.0, 4.0]).usable_for(&info));
    }
}
