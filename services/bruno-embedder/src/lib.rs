//! The embedder: turns documents and conversation turns into rows with
//! vectors for the writer.
//!
//! - `document.submitted`: the text is split into token-bounded chunks with
//!   overlap (markdown-aware for `format = markdown`). A document of at most
//!   `rows_per_message` chunks is embedded here and sent as one
//!   `memory.write` to `chunks` with the document's full chunk-id set, so
//!   the writer removes chunks of an older version. A longer one is sent on
//!   as `document.chunked` batches of `rows_per_message` chunks, which any
//!   embedder replica embeds and sends as `memory.write` on its own: a long
//!   document uses every replica, and a crash repeats one batch, not the
//!   document (ADR 0016). A document whose content hash equals the stored
//!   one is skipped (nothing is embedded or written). Chunk ids derive from
//!   (doc id, content hash, position): a redelivered document or batch
//!   produces the same ids and the same events.
//! - `chat.completed`: the question and the answer become two rows of
//!   `conversations` (ids from the turn's correlation id), for memory.
//!
//! The embedder only reads LanceDB (the content hash of a stored document);
//! the writer is the only process that writes it (ADR 0007).
#![forbid(unsafe_code)]

use std::sync::Arc;

use bruno_embed::{AnyEmbedder, Embedder};
use bruno_events::payload::{
    ChatCompleted, ChunkRecord, ChunkWrite, DocFormat, DocumentChunked, DocumentIndexed,
    DocumentSubmitted, MemoryWrite, Role, TurnRecord, TurnWrite,
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
    /// Chunks in one `document.chunked` batch and rows in one
    /// `memory.write`: a document with more chunks is embedded in batches
    /// of this many, on any embedder replica.
    pub rows_per_message: usize,
    /// Largest document text accepted, in bytes; larger ones are dead-lettered.
    pub max_document_bytes: usize,
    /// Skip a document whose content hash equals the stored one.
    pub skip_unchanged: bool,
    /// Begin each chunk with its context, the document's title and the
    /// markdown headings it sits under (`Title › Section › Subsection`), so
    /// that both the embedding and the full-text index see it.
    pub context: bool,
}

impl Default for ChunkingConfig {
    fn default() -> Self {
        Self {
            chunk_tokens: 240,
            overlap_tokens: 32,
            batch_size: 32,
            rows_per_message: 32,
            max_document_bytes: 8 << 20,
            skip_unchanged: true,
            context: true,
        }
    }
}

/// Embedder metrics (`bruno_embedder_*`).
#[derive(Clone, Debug, Default)]
pub struct EmbedderMetrics {
    documents: Counter,
    batches: Counter,
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
            "bruno_embedder_batches",
            "document.chunked batches embedded (a long document's chunks)",
            self.batches.clone(),
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
    split_at(config, counter, format, text)
        .into_iter()
        .map(|(_, c)| c.to_owned())
        .collect()
}

/// Chunks with their byte offsets in `text`.
fn split_at<'t>(
    config: &ChunkingConfig,
    counter: Option<Arc<Tokenizer>>,
    format: DocFormat,
    text: &'t str,
) -> Vec<(usize, &'t str)> {
    let chunks: Vec<(usize, &str)> = match splitter(config, counter, format) {
        Ok(Splitter::Text(s)) => s.chunk_indices(text).collect(),
        Ok(Splitter::Markdown(s)) => s.chunk_indices(text).collect(),
        // Unreachable with sane config; fall back to one chunk rather than lose the text.
        Err(_) => vec![(0, text)],
    };
    chunks
        .into_iter()
        .filter(|(_, c)| !c.trim().is_empty())
        .collect()
}

/// Longest context line, in characters.
const MAX_CONTEXT_CHARS: usize = 160;

/// The markdown headings in force at each byte offset of `text`: for each
/// heading line outside code fences, its start offset, level and text.
fn headings(text: &str) -> Vec<(usize, usize, &str)> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim();
        let marker = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m));
        match (fence, marker) {
            (Some(open), Some(m)) if m == open => fence = None,
            (None, Some(m)) => fence = Some(m),
            (None, None) => {
                let level = trimmed.chars().take_while(|c| *c == '#').count();
                if (1..=6).contains(&level)
                    && let Some(rest) = trimmed[level..].strip_prefix(' ')
                {
                    let heading = rest.trim().trim_end_matches('#').trim();
                    if !heading.is_empty() {
                        out.push((start, level, heading));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// `Title › Section › Subsection` for a chunk starting at `offset`: the
/// title, then the headings it sits under (the title's own `# heading` and
/// a heading the chunk itself begins with are not repeated).
fn context_line(
    title: Option<&str>,
    headings: &[(usize, usize, &str)],
    offset: usize,
    chunk: &str,
) -> String {
    let mut path: Vec<(usize, &str)> = Vec::new();
    for &(_, level, heading) in headings.iter().take_while(|(at, _, _)| *at < offset) {
        path.retain(|(l, _)| *l < level);
        path.push((level, heading));
    }
    let first_line = chunk.lines().next().unwrap_or("").trim();
    // A chunk that opens with a heading starts that section: the headings
    // of its level and below above it are a sibling's, not its context.
    let opens = first_line.chars().take_while(|c| *c == '#').count();
    if (1..=6).contains(&opens) && first_line[opens..].starts_with(' ') {
        path.retain(|(l, _)| *l < opens);
    }
    let mut parts: Vec<&str> = Vec::new();
    // A chunk that opens with the title's own heading needs no title line.
    if let Some(t) = title
        .map(str::trim)
        .filter(|t| !t.is_empty() && !first_line.ends_with(t))
    {
        parts.push(t);
    }
    for (_, heading) in path {
        if parts.last() != Some(&heading) && !first_line.ends_with(heading) {
            parts.push(heading);
        }
    }
    let line = parts.join(" › ");
    match line.char_indices().nth(MAX_CONTEXT_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// The texts a document's chunks are stored, embedded and indexed as:
/// each chunk, preceded by its context line when `config.context` is on.
pub fn chunk_texts(
    config: &ChunkingConfig,
    counter: Option<Arc<Tokenizer>>,
    format: DocFormat,
    title: Option<&str>,
    text: &str,
) -> Vec<String> {
    let chunks = split_at(config, counter, format, text);
    if !config.context {
        return chunks.into_iter().map(|(_, c)| c.to_owned()).collect();
    }
    let marks = match format {
        DocFormat::Markdown => headings(text),
        DocFormat::Text => Vec::new(),
    };
    chunks
        .into_iter()
        .map(|(offset, chunk)| {
            let context = context_line(title, &marks, offset, chunk);
            if context.is_empty() {
                chunk.to_owned()
            } else {
                format!("{context}\n\n{chunk}")
            }
        })
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
        if config.context {
            "context:1"
        } else {
            "context:0"
        },
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
        /// A batch of a long document's chunks to embed and store.
        Batch(DocumentChunked),
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
            vectors.extend(self.embedder.embed_background(batch).await?);
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
                chunk_count: 0,
                first_chunk: 0,
            };
            return Ok(vec![reply_event(event, &ctx.source, 0, &indexed)]);
        }
        let config = self.config.clone();
        let counter = self.counter.clone();
        let text = doc.text.clone();
        let title = doc.title.clone();
        let format = doc.format;
        let texts = tokio::task::spawn_blocking(move || {
            chunk_texts(&config, counter, format, title.as_deref(), &text)
        })
        .await
        .map_err(|e| HandlerError::internal(format!("splitter: {e}")))?;
        self.metrics.documents.inc();
        let per = self.config.rows_per_message.max(1);
        if texts.len() > per {
            // A long document: its batches go out as their own messages, to
            // be embedded by any replica and retried one by one.
            let chunk_count = u32::try_from(texts.len()).map_err(|_| {
                HandlerError::invalid_payload(format!("data.text: {} chunks", texts.len()))
            })?;
            debug!(doc_id = %doc.doc_id, chunks = texts.len(), "split into batches");
            let mut events = Vec::with_capacity(texts.len().div_ceil(per));
            let mut texts = texts.into_iter();
            let mut first = 0u32;
            loop {
                let batch: Vec<String> = texts.by_ref().take(per).collect();
                if batch.is_empty() {
                    break;
                }
                let n = batch.len() as u32;
                let chunked = DocumentChunked {
                    doc_id: doc.doc_id.clone(),
                    source: doc.source.clone(),
                    title: doc.title.clone(),
                    content_hash: hash.clone(),
                    chunk_count,
                    first_chunk: first,
                    texts: batch,
                };
                events.push(reply_event(
                    event,
                    &ctx.source,
                    events.len() as u32,
                    &chunked,
                ));
                first += n;
            }
            return Ok(events);
        }
        let batch = DocumentChunked {
            doc_id: doc.doc_id,
            source: doc.source,
            title: doc.title,
            content_hash: hash,
            chunk_count: u32::try_from(texts.len()).unwrap_or(u32::MAX),
            first_chunk: 0,
            texts,
        };
        self.write(event, batch, ctx).await
    }

    /// A `document.chunked` batch: embed it and send its rows to the writer.
    async fn batch(
        &self,
        event: &Event,
        batch: DocumentChunked,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        // Chunk ids are made for the whole document: bound the count by what
        // a document within the size limit can hold (a chunk has >= 1 byte).
        if batch.chunk_count as usize > self.config.max_document_bytes {
            return Err(HandlerError::invalid_payload(format!(
                "data.chunk_count: {} exceeds chunking.max_document_bytes ({})",
                batch.chunk_count, self.config.max_document_bytes
            )));
        }
        self.metrics.batches.inc();
        self.write(event, batch, ctx).await
    }

    /// Embed `batch` and make its `memory.write` events (more than one if
    /// the batch holds more than `rows_per_message` chunks).
    async fn write(
        &self,
        event: &Event,
        batch: DocumentChunked,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let DocumentChunked {
            doc_id,
            source,
            title,
            content_hash: hash,
            chunk_count,
            first_chunk,
            texts,
        } = batch;
        let vectors = self.embed(&texts).await?;
        let chunk_ids: Vec<String> = (0..chunk_count as usize)
            .map(|i| chunk_id(&doc_id, &hash, i))
            .collect();
        let first = first_chunk as usize;
        let rows: Vec<ChunkRecord> = texts
            .into_iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (text, vector))| ChunkRecord {
                id: chunk_ids
                    .get(first + i)
                    .cloned()
                    .unwrap_or_else(|| chunk_id(&doc_id, &hash, first + i)),
                chunk_index: u32::try_from(first + i).unwrap_or(u32::MAX),
                text,
                vector,
            })
            .collect();
        self.metrics.chunks.inc_by(rows.len() as u64);
        debug!(%doc_id, first, chunks = rows.len(), "embedded");
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
                    doc_id: doc_id.clone(),
                    source: source.clone(),
                    title: title.clone(),
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
            EmbedderInput::Batch(batch) => self.batch(&input.event, batch, ctx).await,
            EmbedderInput::Turn(done) => self.turn(&input.event, done, ctx).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(context: bool) -> ChunkingConfig {
        ChunkingConfig {
            chunk_tokens: 24,
            overlap_tokens: 0,
            context,
            ..ChunkingConfig::default()
        }
    }

    const DOC: &str = "# Guide\n\nIntro words that open the guide.\n\n## Install\n\nRun the installer with the defaults and wait.\n\n```sh\n# not a heading\necho hi\n```\n\n### On Linux\n\nUse the package from the distribution archive.\n\n## Use\n\nOpen the app and pick a project to work on.\n";

    #[test]
    fn headings_skip_code_fences() {
        let found: Vec<(usize, &str)> = headings(DOC).into_iter().map(|(_, l, h)| (l, h)).collect();
        assert_eq!(
            found,
            vec![(1, "Guide"), (2, "Install"), (3, "On Linux"), (2, "Use")]
        );
    }

    #[test]
    fn chunks_carry_the_title_and_the_headings_above_them() {
        let texts = chunk_texts(&config(true), None, DocFormat::Markdown, Some("Guide"), DOC);
        let plain = chunk_texts(
            &config(false),
            None,
            DocFormat::Markdown,
            Some("Guide"),
            DOC,
        );
        assert_eq!(
            texts.len(),
            plain.len(),
            "context does not change the split"
        );
        assert!(texts.len() >= 4, "{texts:#?}");
        for (with, without) in texts.iter().zip(&plain) {
            assert!(
                with.starts_with("Guide") || with.starts_with("# Guide"),
                "{with}"
            );
            assert!(with.ends_with(without.as_str()), "{with} / {without}");
        }
        let linux = texts
            .iter()
            .find(|t| t.contains("distribution archive"))
            .expect("a chunk of the Linux section");
        assert!(
            linux.starts_with("Guide › Install › On Linux\n\n")
                || linux.starts_with("Guide › Install\n\n"),
            "{linux}"
        );
        let usage = texts
            .iter()
            .find(|t| t.contains("pick a project"))
            .expect("a chunk of the Use section");
        assert!(
            !usage.contains("Install"),
            "a sibling section is not context: {usage}"
        );
        // The title's own `# heading` is not repeated.
        assert!(texts[0].starts_with("# Guide\n"), "{}", texts[0]);
    }

    #[test]
    fn plain_text_gets_the_title_only_and_long_context_is_cut() {
        let texts = chunk_texts(
            &config(true),
            None,
            DocFormat::Text,
            Some("Notes"),
            "# not markdown here\n\nsome words",
        );
        assert_eq!(
            texts,
            vec!["Notes\n\n# not markdown here\n\nsome words".to_owned()]
        );
        let long = "t".repeat(500);
        let texts = chunk_texts(&config(true), None, DocFormat::Text, Some(&long), "words");
        let line = texts[0].lines().next().unwrap_or_default();
        assert_eq!(line.chars().count(), MAX_CONTEXT_CHARS + 1);
        let untitled = chunk_texts(&config(true), None, DocFormat::Text, None, "words");
        assert_eq!(untitled, vec!["words".to_owned()]);
    }

    #[test]
    fn the_content_hash_changes_with_the_context_setting() {
        let doc = DocumentSubmitted {
            doc_id: "d".into(),
            source: "s".into(),
            title: Some("T".into()),
            text: "words".into(),
            format: DocFormat::Text,
            metadata: Default::default(),
        };
        assert_ne!(
            content_hash(&doc, &config(true)),
            content_hash(&doc, &config(false))
        );
    }
}
