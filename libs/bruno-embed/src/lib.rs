//! Text embeddings behind one trait, [`Embedder`], with three backends:
//!
//! - [`MiniLm`]: sentence-transformers/all-MiniLM-L6-v2 run in-process on
//!   candle from a model directory (`model.safetensors`, `tokenizer.json`,
//!   `config.json`); mask-weighted mean pooling and L2 normalisation, input
//!   truncated at 256 tokens, so vectors match sentence-transformers;
//! - [`Ollama`]: `POST /api/embed`;
//! - [`OpenAi`]: an OpenAI-compatible `POST /v1/embeddings`.
//!
//! [`AnyEmbedder`] picks one from config.
#![forbid(unsafe_code)]

mod bert;
mod fused;
mod http;
mod lanes;
mod minilm;
mod thin;

use std::future::Future;

pub use bruno_events::payload::EmbedderInfo;
pub use http::{Ollama, OpenAi};
pub use lanes::set_query_priority;
pub use minilm::MiniLm;
use serde::Deserialize;

/// Why texts could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model directory or weights cannot be used.
    #[error("model: {0}")]
    Model(String),
    /// The inference itself failed.
    #[error("inference: {0}")]
    Inference(String),
    /// An embedding server is unreachable or answered 5xx/429 (worth retrying).
    #[error("embedding server unavailable: {0}")]
    Unavailable(String),
    /// An embedding server answered something unusable (not worth retrying).
    #[error("embedding server answered badly: {0}")]
    BadResponse(String),
}

impl bruno_core::Classify for EmbedError {
    fn code(&self) -> bruno_core::ErrorCode {
        use bruno_core::ErrorCode;
        match self {
            Self::Unavailable(_) => ErrorCode::Dependency,
            // The same texts would get the same unusable answer.
            Self::BadResponse(_) => ErrorCode::BadResponse,
            Self::Model(_) | Self::Inference(_) => ErrorCode::Internal,
        }
    }
}

/// Turns texts into unit-length vectors, one per text, in order.
pub trait Embedder: Send + Sync {
    /// Which model and dimension fill the vectors.
    fn info(&self) -> &EmbedderInfo;

    /// Embed a batch of texts.
    fn embed(
        &self,
        texts: &[String],
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send;

    /// Embed work no request is waiting on (documents, conversation
    /// memory). The local model lets queries embedded in the same process
    /// go first (`lanes.rs`); a remote embedding server has no such lanes.
    fn embed_background(
        &self,
        texts: &[String],
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send {
        self.embed(texts)
    }
}

/// `[embedder]` config: which backend, and its settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum EmbedderConfig {
    /// Local all-MiniLM-L6-v2.
    Minilm {
        /// Directory with `model.safetensors`, `tokenizer.json`, `config.json`.
        model_dir: std::path::PathBuf,
    },
    /// Ollama's `/api/embed`.
    Ollama {
        /// Base URL, e.g. `http://127.0.0.1:11434`.
        url: String,
        /// Model name, e.g. `all-minilm`.
        model: String,
        /// Its vector dimension.
        dimension: u32,
    },
    /// An OpenAI-compatible `/v1/embeddings`.
    Openai {
        /// Base URL (without `/v1`).
        url: String,
        /// Model name.
        model: String,
        /// Its vector dimension.
        dimension: u32,
        /// Bearer token, if the server wants one.
        #[serde(default)]
        api_key: Option<bruno_core::Secret>,
    },
}

/// One of the backends, chosen by config.
impl Default for EmbedderConfig {
    /// MiniLM from `$BRUNO_MODEL_DIR`, else where `scripts/fetch-model.sh`
    /// puts it (`~/.cache/bruno/models/all-MiniLM-L6-v2`).
    fn default() -> Self {
        Self::Minilm {
            model_dir: default_model_dir(),
        }
    }
}

/// `$BRUNO_MODEL_DIR`, else `~/.cache/bruno/models/all-MiniLM-L6-v2`.
pub fn default_model_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("BRUNO_MODEL_DIR") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    std::path::PathBuf::from(home).join(".cache/bruno/models/all-MiniLM-L6-v2")
}

pub enum AnyEmbedder {
    /// Local MiniLM.
    MiniLm(MiniLm),
    /// Ollama.
    Ollama(Ollama),
    /// OpenAI-compatible.
    OpenAi(OpenAi),
}

impl AnyEmbedder {
    /// Build the configured backend (loads the model for MiniLM).
    pub fn from_config(config: &EmbedderConfig) -> Result<Self, EmbedError> {
        Ok(match config {
            EmbedderConfig::Minilm { model_dir } => Self::MiniLm(MiniLm::load(model_dir)?),
            EmbedderConfig::Ollama {
                url,
                model,
                dimension,
            } => Self::Ollama(Ollama::new(url, model, *dimension)),
            EmbedderConfig::Openai {
                url,
                model,
                dimension,
                api_key,
            } => Self::OpenAi(OpenAi::new(url, model, *dimension, api_key.clone())),
        })
    }
}

impl AnyEmbedder {
    /// The model's own tokenizer, where it runs in-process (for counting
    /// tokens when splitting text); `None` for remote backends.
    pub fn tokenizer(&self) -> Option<&tokenizers::Tokenizer> {
        match self {
            Self::MiniLm(e) => Some(e.tokenizer()),
            Self::Ollama(_) | Self::OpenAi(_) => None,
        }
    }
}

impl Embedder for AnyEmbedder {
    fn info(&self) -> &EmbedderInfo {
        match self {
            Self::MiniLm(e) => e.info(),
            Self::Ollama(e) => e.info(),
            Self::OpenAi(e) => e.info(),
        }
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        match self {
            Self::MiniLm(e) => e.embed(texts).await,
            Self::Ollama(e) => e.embed(texts).await,
            Self::OpenAi(e) => e.embed(texts).await,
        }
    }

    async fn embed_background(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        match self {
            Self::MiniLm(e) => e.embed_background(texts).await,
            Self::Ollama(e) => e.embed(texts).await,
            Self::OpenAi(e) => e.embed(texts).await,
        }
    }
}

/// Scale a vector to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}
