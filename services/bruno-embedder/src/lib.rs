//! The embedder: turns documents and conversation turns into rows with
//! vectors for the writer.
//!
//! - `document.submitted`: the text is split into token-bounded chunks with
//!   overlap (markdown-aware for `format = markdown`), embedded in batches,
//!   and sent as `memory.write` to `chunks` with the document's full chunk-id
//!   set, so the writer removes chunks of an older version. A document whose
//!   content hash equals the stored one is skipped (nothing is embedded or
//!   written). Chunk ids derive from (doc id, content hash, position): a
//!   redelivered document produces the same ids and the same events.
//! - `chat.completed`: the question and the answer become two rows of
//!   `conversations` (ids from the turn's correlation id), for memory.
//!
//! The embedder only reads LanceDB (the content hash of a stored document);
//! the writer is the only process that writes it (ADR 0007).
#![forbid(unsafe_code)]

use std::sync::Arc;

use bruno_embed::{AnyEmbedder, Embedder};
use bruno_events::payload::{
    ChatCompleted, ChunkRecord, ChunkWrite, DocFormat, DocumentIndexed, DocumentSubmitted,
    MemoryWrite, Role, TurnRecord, TurnWrite,
};
use bruno_events::{AttributesReader, Event, correlation_id, reply_event};
use bruno_runtime::{Context, Handler, HandlerError, Incoming};
use bruno_store::{Chunks, Store};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use text_splitter::{ChunkConfig, ChunkSizer, MarkdownSplitter, TextSplitter};
use tokenizers::Tokenizer;
use tokio::sync::Mutex;
use tracing::{debug, info};
use uuid::Uuid;

/// `[chunking]` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChunkingConfig {
    /// Most tokens in one chunk (MiniLM reads at most 256 with its two
    /// special tokens).
    pub chunk_tokens: usize,
    /// Tokens shared by neighbouring chunks.
    pub overlap_tokens: usize,
    /// Chunks embedded in one call.
    pub batch_size: usize,
    /// Rows in one `memory.write` message (a long document becomes several).
    pub rows_per_message: usize,
    /// Largest document text accepted, in bytes; larger ones are dead-lettered.
    pub max_document_bytes: usize,
    /// Skip a document whose content hash equals the stored one.
    pub skip_unchanged: bool,
}

impl Default for ChunkingConfig {
    fn default() -> Self {
        Self {
            chunk_tokens: 240,
            overlap_tokens: 32,
            batch_size: 32,
            rows_per_message: 64,
            max_document_bytes: 8 << 20,
            skip_unchanged: true,
        }
    }
}

/// Embedder metrics (`bruno_embedder_*`).
#[derive(Clone, Debug, Default)]
pub struct EmbedderMetrics {
    documents: Counter,
    unchanged: Counter,
    chunks: Counter,
    turns: Counter,
    question_vectors_reused: Counter,
}

impl EmbedderMetrics {
    /// Register in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bruno_embedder_documents",
            "Documents embedded",
            self.documents.clone(),
        );
        registry.register(
            "bruno_embedder_unchanged",
            "Documents skipped: content hash unchanged",
            self.unchanged.clone(),
        );
        registry.register(
            "bruno_embedder_chunks",
            "Chunks embedded",
            self.chunks.clone(),
        );
        registry.register(
            "bruno_embedder_turns",
            "Conversation turns embedded",
            self.turns.clone(),
        );
        registry.register(
            "bruno_embedder_question_vectors_reused",
            "Turns whose question vector came from the retriever (not embedded again)",
            self.question_vectors_reused.clone(),
        );
    }
}

/// Counts chunk sizes in the model's tokens (or ~4 characters per token for
/// remote models whose tokenizer is not here).
enum Sizer {
    Tokens(Arc<Tokenizer>),
    Chars,
}

impl ChunkSizer for Sizer {
    fn size(&self, chunk: &str) -> usize {
        match self {
            Sizer::Tokens(t) => t
                .encode(chunk, false)
                .map(|e| e.len())
                .unwrap_or_else(|_| chunk.len().div_ceil(4)),
            Sizer::Chars => chunk.chars().count().div_ceil(4),
        }
    }
}

enum Splitter {
    Text(TextSplitter<Sizer>),
    Markdown(MarkdownSplitter<Sizer>),
}

/// A copy of the model's tokenizer that counts every token: no truncation,
/// no padding (built once, at start-up).
pub fn counting_tokenizer(tokenizer: &Tokenizer) -> Result<Arc<Tokenizer>, String> {
    let mut t = tokenizer.clone();
    t.with_truncation(None).map_err(|e| e.to_string())?;
    t.with_padding(None);
    Ok(Arc::new(t))
}

fn splitter(
    config: &ChunkingConfig,
    counter: Option<Arc<Tokenizer>>,
    format: DocFormat,
) -> Result<Splitter, String> {
    let sizer = match counter {
        Some(t) => Sizer::Tokens(t),
        None => Sizer::Chars,
    };
    let chunk = ChunkConfig::new(config.chunk_tokens.max(8))
        .with_overlap(config.overlap_tokens.min(config.chunk_tokens.max(8) / 2))
        .map_err(|e| e.to_string())?
        .with_sizer(sizer);
    Ok(match format {
        DocFormat::Text => Splitter::Text(TextSplitter::new(chunk)),
        DocFormat::Markdown => Splitter::Markdown(MarkdownSplitter::new(chunk)),
    })
}

/// Split `text` into chunks (trimmed, non-empty); `counter` (from
/// [`counting_tokenizer`]) sizes them in model tokens, else ~4 characters
/// per token.
pub fn split(
    config: &ChunkingConfig,
    counter: Option<Arc<Tokenizer>>,
    format: DocFormat,
    text: &str,
) -> Vec<String> {
    let chunks: Vec<String> = match splitter(config, counter, format) {
        Ok(Splitter::Text(s)) => s.chunks(text).map(str::to_owned).collect(),
        Ok(Splitter::Markdown(s)) => s.chunks(text).map(str::to_owned).collect(),
        // Unreachable with sane config; fall back to one chunk rather than lose the text.
        Err(_) => vec![text.to_owned()],
    };
    chunks
        .into_iter()
        .filter(|c| !c.trim().is_empty())
        .collect()
}

/// The content hash of a document version: what a chunk row is made of,
/// plus how it was chunked.
pub fn content_hash(doc: &DocumentSubmitted, config: &ChunkingConfig) -> String {
    let mut h = Sha256::new();
    for part in [
        doc.source.as_str(),
        doc.title.as_deref().unwrap_or(""),
        match doc.format {
            DocFormat::Text => "text",
            DocFormat::Markdown => "markdown",
        },
        &config.chunk_tokens.to_string(),
        &config.overlap_tokens.to_string(),
        doc.text.as_str(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_29d0_8a4e_4c52_9d8e_51a1_b7c3_e0f4);

/// The id of chunk `index` of a document version.
pub fn chunk_id(doc_id: &str, hash: &str, index: usize) -> String {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("chunk\0{doc_id}\0{hash}\0{index}").as_bytes(),
    )
    .to_string()
}

fn turn_id(correlation: &str, role: Role) -> String {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("turn\0{correlation}\0{}", role.as_str()).as_bytes(),
    )
    .to_string()
}

bruno_runtime::inputs! {
    /// What the embedder takes.
    pub enum EmbedderInput {
        /// A document to split, embed and store.
        Document(DocumentSubmitted),
        /// A finished chat turn to remember.
        Turn(ChatCompleted),
    }
}

/// The embedder's handler (`document.submitted` and `chat.completed`).
pub struct EmbedderService {
    embedder: Arc<AnyEmbedder>,
    store: Option<Store>,
    chunks: Mutex<Option<Chunks>>,
    counter: Option<Arc<Tokenizer>>,
    config: ChunkingConfig,
    metrics: EmbedderMetrics,
}

impl EmbedderService {
    /// An embedder over `embedder`; `store` (read-only use) enables the
    /// unchanged-document check.
    pub fn new(
        embedder: Arc<AnyEmbedder>,
        store: Option<Store>,
        config: ChunkingConfig,
        metrics: EmbedderMetrics,
    ) -> Self {
        let counter = embedder
            .tokenizer()
            .and_then(|t| counting_tokenizer(t).ok());
        Self {
            embedder,
            store,
            chunks: Mutex::new(None),
            counter,
            config,
            metrics,
        }
    }

    /// The stored content hash of `doc_id`, if the table exists and holds it.
    async fn stored_hash(&self, doc_id: &str) -> Result<Option<String>, HandlerError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let mut cached = self.chunks.lock().await;
        if cached.is_none() {
            *cached = store.existing_chunks(self.embedder.info()).await?;
        }
        match cached.as_ref() {
            Some(t) => Ok(t.content_hash(doc_id).await?),
            None => Ok(None),
        }
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, HandlerError> {
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.config.batch_size.max(1)) {
            vectors.extend(self.embedder.embed(batch).await?);
        }
        if vectors.len() != texts.len() {
            return Err(HandlerError::internal(format!(
                "{} vectors for {} texts",
                vectors.len(),
                texts.len()
            )));
        }
        Ok(vectors)
    }

    async fn document(
        &self,
        event: &Event,
        doc: DocumentSubmitted,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        if doc.text.trim().is_empty() {
            return Err(HandlerError::invalid_payload(
                "data.text: must not be empty",
            ));
        }
        if doc.text.len() > self.config.max_document_bytes {
            return Err(HandlerError::invalid_payload(format!(
                "data.text: {} bytes exceeds the limit of {} (chunking.max_document_bytes)",
                doc.text.len(),
                self.config.max_document_bytes
            )));
        }
        let hash = content_hash(&doc, &self.config);
        if self.config.skip_unchanged
            && self.stored_hash(&doc.doc_id).await?.as_deref() == Some(hash.as_str())
        {
            self.metrics.unchanged.inc();
            info!(doc_id = %doc.doc_id, "unchanged, skipped");
            // Already searchable: say so, for whoever waits on the document.
            let indexed = DocumentIndexed {
                doc_id: doc.doc_id,
                chunks_written: 0,
                chunks_removed: 0,
                table_version: 0,
                unchanged: true,
            };
            return Ok(vec![reply_event(event, &ctx.source, 0, &indexed)]);
        }
        let config = self.config.clone();
        let counter = self.counter.clone();
        let text = doc.text.clone();
        let format = doc.format;
        let texts = tokio::task::spawn_blocking(move || split(&config, counter, format, &text))
            .await
            .map_err(|e| HandlerError::internal(format!("splitter: {e}")))?;
        let vectors = self.embed(&texts).await?;
        let chunk_ids: Vec<String> = (0..texts.len())
            .map(|i| chunk_id(&doc.doc_id, &hash, i))
            .collect();
        let rows: Vec<ChunkRecord> = texts
            .into_iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (text, vector))| ChunkRecord {
                id: chunk_ids[i].clone(),
                chunk_index: u32::try_from(i).unwrap_or(u32::MAX),
                text,
                vector,
            })
            .collect();
        self.metrics.documents.inc();
        self.metrics.chunks.inc_by(rows.len() as u64);
        debug!(doc_id = %doc.doc_id, chunks = rows.len(), "embedded");
        let per = self.config.rows_per_message.max(1);
        let mut parts: Vec<Vec<ChunkRecord>> =
            rows.chunks(per).map(<[ChunkRecord]>::to_vec).collect();
        if parts.is_empty() {
            parts.push(Vec::new());
        }
        Ok(parts
            .into_iter()
            .enumerate()
            .map(|(n, rows)| {
                let write = MemoryWrite::Chunks(ChunkWrite {
                    embedder: self.embedder.info().clone(),
                    doc_id: doc.doc_id.clone(),
                    source: doc.source.clone(),
                    title: doc.title.clone(),
                    content_hash: hash.clone(),
                    chunk_ids: chunk_ids.clone(),
                    rows,
                });
                reply_event(event, &ctx.source, n as u32, &write)
            })
            .collect())
    }

    async fn turn(
        &self,
        event: &Event,
        done: ChatCompleted,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let correlation = correlation_id(event)
            .unwrap_or_else(|| event.id())
            .to_owned();
        let created_at = event.time().copied().unwrap_or_else(chrono::Utc::now);
        let texts = vec![done.question.clone(), done.answer.clone()];
        // The retriever already embedded the question with this model.
        let vectors = match done.question_vector {
            Some(q) if q.usable_for(self.embedder.info()) => {
                let mut answer = self.embed(&texts[1..]).await?;
                self.metrics.question_vectors_reused.inc();
                let mut both = vec![q.vector];
                both.append(&mut answer);
                both
            }
            _ => self.embed(&texts).await?,
        };
        let rows = texts
            .into_iter()
            .zip(vectors)
            .zip([Role::User, Role::Assistant])
            .map(|((text, vector), role)| TurnRecord {
                id: turn_id(&correlation, role),
                session_id: done.session_id.clone(),
                role,
                correlation_id: correlation.clone(),
                created_at,
                text,
                vector,
            })
            .collect();
        self.metrics.turns.inc();
        let write = MemoryWrite::Conversations(TurnWrite {
            embedder: self.embedder.info().clone(),
            rows,
        });
        Ok(vec![reply_event(event, &ctx.source, 0, &write)])
    }
}

impl Handler for EmbedderService {
    type Input = EmbedderInput;

    async fn handle(
        &self,
        input: Incoming<EmbedderInput>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        match input.data {
            EmbedderInput::Document(doc) => self.document(&input.event, doc, ctx).await,
            EmbedderInput::Turn(done) => self.turn(&input.event, done, ctx).await,
        }
    }
}
