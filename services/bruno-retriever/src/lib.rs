//! The retriever: hybrid search over LanceDB, read-only.
//!
//! - `search.requested` → `search.completed` with the hits, as a reply that
//!   carries the request's `correlationid` and `replyto`;
//! - `chat.requested` → `chat.contextualized`: the question's passages from
//!   `chunks`, plus the session's recent turns and its earlier turns nearest
//!   to the question from `conversations`; `chat.failed` when that cannot be
//!   done for a reason retrying will not fix.
//!
//! The query is embedded in-process with the same embedder that filled the
//! tables (another one is refused). Tables are opened with a bounded read
//! consistency interval (`store.read_consistency_ms`), so new commits are
//! seen within about that long.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Instant;

use bruno_embed::{AnyEmbedder, Embedder};
use bruno_events::payload::{
    ChatContextualized, ChatFailed, ChatRequested, MemoryTurn, QuestionVector, SearchCompleted,
    SearchFilters, SearchHit, SearchMode, SearchRequested,
};
use bruno_events::{Event, reply_event};
use bruno_runtime::{Context, Handler, HandlerError, Incoming};
use bruno_store::{Chunks, Conversations, Ranking, Store, TurnRow};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::Mutex;

/// `[retriever]` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrieverConfig {
    /// Passages for a chat turn when the request does not say.
    pub chat_k: u32,
    /// The session's most recent turns given to the generator.
    pub memory_recent: usize,
    /// Earlier turns of the session nearest to the question.
    pub memory_related: usize,
    /// How chunks are ranked (`[retriever.ranking]`).
    pub ranking: Ranking,
}

impl Default for RetrieverConfig {
    fn default() -> Self {
        Self {
            chat_k: 4,
            memory_recent: 6,
            memory_related: 4,
            ranking: Ranking::default(),
        }
    }
}

/// Retriever metrics (`bruno_retriever_*`).
#[derive(Clone, Debug)]
pub struct RetrieverMetrics {
    search_seconds: Histogram,
}

impl Default for RetrieverMetrics {
    fn default() -> Self {
        Self {
            search_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        }
    }
}

impl RetrieverMetrics {
    /// Register in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bruno_retriever_search_duration_seconds",
            "Embedding the query plus the hybrid search",
            self.search_seconds.clone(),
        );
    }
}

bruno_runtime::inputs! {
    /// What the retriever takes.
    pub enum RetrieverInput {
        /// A search awaiting its hits.
        Search(SearchRequested),
        /// A chat turn awaiting its context.
        Chat(ChatRequested),
    }
}

/// The retriever's handler.
pub struct Retriever {
    embedder: Arc<AnyEmbedder>,
    store: Store,
    chunks: Mutex<Option<Chunks>>,
    conversations: Mutex<Option<Conversations>>,
    config: RetrieverConfig,
    metrics: RetrieverMetrics,
}

impl Retriever {
    /// A retriever reading `store` with `embedder`.
    pub fn new(
        embedder: Arc<AnyEmbedder>,
        store: Store,
        config: RetrieverConfig,
        metrics: RetrieverMetrics,
    ) -> Self {
        Self {
            embedder,
            store,
            chunks: Mutex::new(None),
            conversations: Mutex::new(None),
            config,
            metrics,
        }
    }

    async fn chunks(&self) -> Result<Option<Chunks>, HandlerError> {
        let mut cached = self.chunks.lock().await;
        if cached.is_none() {
            *cached = self.store.existing_chunks(self.embedder.info()).await?;
        }
        Ok(cached.clone())
    }

    async fn conversations(&self) -> Result<Option<Conversations>, HandlerError> {
        let mut cached = self.conversations.lock().await;
        if cached.is_none() {
            *cached = self
                .store
                .existing_conversations(self.embedder.info())
                .await?;
        }
        Ok(cached.clone())
    }

    async fn embed_query(&self, query: &str) -> Result<Vec<f32>, HandlerError> {
        let mut vectors = self.embedder.embed(&[query.to_owned()]).await?;
        vectors
            .pop()
            .ok_or_else(|| HandlerError::internal("the embedder returned no vector"))
    }

    async fn hits(
        &self,
        vector: &[f32],
        query: &str,
        k: usize,
        filters: &SearchFilters,
        mode: SearchMode,
    ) -> Result<Vec<SearchHit>, HandlerError> {
        let Some(chunks) = self.chunks().await? else {
            return Ok(Vec::new());
        };
        let filters = bruno_store::SearchFilters {
            source: filters.source.clone(),
            doc_id: filters.doc_id.clone(),
        };
        let hits = chunks
            .search_ranked(vector, query, k, &filters, mode, &self.config.ranking)
            .await?;
        Ok(hits
            .into_iter()
            .map(|h| SearchHit {
                chunk_id: h.chunk_id,
                doc_id: h.doc_id,
                title: h.title,
                source: h.source,
                text: h.text,
                score: h.score,
            })
            .collect())
    }

    /// Embed `query` and search (what `search.requested` does).
    pub async fn search(
        &self,
        query: &str,
        k: usize,
        filters: &SearchFilters,
        mode: SearchMode,
    ) -> Result<Vec<SearchHit>, HandlerError> {
        let started = Instant::now();
        let vector = self.embed_query(query).await?;
        let hits = self.hits(&vector, query, k, filters, mode).await?;
        self.metrics
            .search_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(hits)
    }

    /// The session's most recent turns (no vector needed, so this runs
    /// while the query is being embedded).
    async fn recent(&self, session_id: &str) -> Result<Vec<TurnRow>, HandlerError> {
        let Some(conversations) = self.conversations().await? else {
            return Ok(Vec::new());
        };
        if self.config.memory_recent == 0 {
            return Ok(Vec::new());
        }
        Ok(conversations
            .recent(session_id, self.config.memory_recent)
            .await?)
    }

    /// The session's earlier turns nearest to the question.
    async fn related(
        &self,
        session_id: &str,
        vector: &[f32],
    ) -> Result<Vec<TurnRow>, HandlerError> {
        let Some(conversations) = self.conversations().await? else {
            return Ok(Vec::new());
        };
        if self.config.memory_related == 0 {
            return Ok(Vec::new());
        }
        Ok(conversations
            .related(session_id, vector, self.config.memory_related)
            .await?)
    }

    async fn contextualize(
        &self,
        event: &Event,
        request: ChatRequested,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let k = request
            .options
            .k
            .unwrap_or(self.config.chat_k)
            .clamp(1, 100) as usize;
        // Independent reads run concurrently: the recent turns while the
        // query is embedded, then the passages and the related turns.
        let result = async {
            let (vector, recent) = tokio::try_join!(
                self.embed_query(&request.message),
                self.recent(&request.session_id)
            )?;
            let no_filters = SearchFilters::default();
            let (passages, related) = tokio::try_join!(
                self.hits(
                    &vector,
                    &request.message,
                    k,
                    &no_filters,
                    SearchMode::Hybrid
                ),
                self.related(&request.session_id, &vector)
            )?;
            Ok::<_, HandlerError>((passages, memory(recent, related), vector))
        }
        .await;
        match result {
            Ok((passages, memory, vector)) => {
                let out = ChatContextualized {
                    request,
                    passages,
                    memory,
                    question_vector: Some(QuestionVector {
                        embedder: self.embedder.info().clone(),
                        vector,
                    }),
                };
                Ok(vec![reply_event(event, &ctx.source, 0, &out)])
            }
            // Permanent: the user is told now rather than left waiting.
            Err(e) if e.is_permanent() => {
                let failed = ChatFailed {
                    reason: "retrieval".into(),
                    message: e.message,
                };
                Ok(vec![reply_event(event, &ctx.source, 0, &failed)])
            }
            Err(e) => Err(e),
        }
    }
}

/// Related earlier turns first (oldest first, those also among the recent
/// ones left out), then the recent ones.
fn memory(recent: Vec<TurnRow>, related: Vec<TurnRow>) -> Vec<MemoryTurn> {
    let mut earlier: Vec<_> = related
        .into_iter()
        .filter(|t| !recent.iter().any(|r| r.id == t.id))
        .collect();
    earlier.sort_by_key(|t| t.at_micros);
    earlier
        .into_iter()
        .chain(recent)
        .map(|t| MemoryTurn {
            id: t.id,
            role: t.role,
            text: t.text,
        })
        .collect()
}

impl Handler for Retriever {
    type Input = RetrieverInput;

    async fn handle(
        &self,
        input: Incoming<RetrieverInput>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        match input.data {
            RetrieverInput::Search(request) => {
                let hits = self
                    .search(
                        &request.query,
                        request.k as usize,
                        &request.filters,
                        request.mode,
                    )
                    .await?;
                Ok(vec![reply_event(
                    &input.event,
                    &ctx.source,
                    0,
                    &SearchCompleted { hits },
                )])
            }
            RetrieverInput::Chat(request) => self.contextualize(&input.event, request, ctx).await,
        }
    }
}
