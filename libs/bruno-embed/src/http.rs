//! Embedding servers: Ollama's `/api/embed` and OpenAI-compatible `/v1/embeddings`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::{EmbedError, Embedder, EmbedderInfo, normalize};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Send a JSON request and map transport and status failures.
async fn post(request: reqwest::RequestBuilder) -> Result<reqwest::Response, EmbedError> {
    let response = request
        .send()
        .await
        .map_err(|e| EmbedError::Unavailable(e.to_string()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    if status.is_server_error() || status.as_u16() == 429 {
        Err(EmbedError::Unavailable(format!("{status}: {body}")))
    } else {
        Err(EmbedError::BadResponse(format!("{status}: {body}")))
    }
}

/// Check count and dimension, then normalise.
fn finish(
    mut vectors: Vec<Vec<f32>>,
    expected: usize,
    info: &EmbedderInfo,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    if vectors.len() != expected {
        return Err(EmbedError::BadResponse(format!(
            "{} vectors for {expected} texts",
            vectors.len()
        )));
    }
    for v in &mut vectors {
        if v.len() != info.dimension as usize {
            return Err(EmbedError::BadResponse(format!(
                "a vector has {} dimensions, {} expects {}",
                v.len(),
                info.model,
                info.dimension
            )));
        }
        normalize(v);
    }
    Ok(vectors)
}

/// Ollama (`POST {url}/api/embed`).
pub struct Ollama {
    client: reqwest::Client,
    url: String,
    info: EmbedderInfo,
}

impl Ollama {
    /// A client for `model` (of `dimension`) at `url`.
    pub fn new(url: &str, model: &str, dimension: u32) -> Self {
        Self {
            client: client(),
            url: url.trim_end_matches('/').to_owned(),
            info: EmbedderInfo {
                model: model.to_owned(),
                dimension,
            },
        }
    }
}

#[derive(Deserialize)]
struct OllamaEmbed {
    embeddings: Vec<Vec<f32>>,
}

impl Embedder for Ollama {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let request = self
            .client
            .post(format!("{}/api/embed", self.url))
            .json(&json!({ "model": self.info.model, "input": texts, "truncate": true }));
        let body: OllamaEmbed = post(request)
            .await?
            .json()
            .await
            .map_err(|e| EmbedError::BadResponse(e.to_string()))?;
        finish(body.embeddings, texts.len(), &self.info)
    }
}

/// An OpenAI-compatible server (`POST {url}/v1/embeddings`).
pub struct OpenAi {
    client: reqwest::Client,
    url: String,
    api_key: Option<bruno_core::Secret>,
    info: EmbedderInfo,
}

impl OpenAi {
    /// A client for `model` (of `dimension`) at `url` (without `/v1`).
    pub fn new(
        url: &str,
        model: &str,
        dimension: u32,
        api_key: Option<bruno_core::Secret>,
    ) -> Self {
        Self {
            client: client(),
            url: url.trim_end_matches('/').trim_end_matches("/v1").to_owned(),
            api_key,
            info: EmbedderInfo {
                model: model.to_owned(),
                dimension,
            },
        }
    }
}

#[derive(Deserialize)]
struct OpenAiEmbeddings {
    data: Vec<OpenAiEmbedding>,
}

#[derive(Deserialize)]
struct OpenAiEmbedding {
    index: usize,
    embedding: Vec<f32>,
}

impl Embedder for OpenAi {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let mut request = self
            .client
            .post(format!("{}/v1/embeddings", self.url))
            .json(&json!({ "model": self.info.model, "input": texts, "encoding_format": "float" }));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose());
        }
        let mut body: OpenAiEmbeddings = post(request)
            .await?
            .json()
            .await
            .map_err(|e| EmbedError::BadResponse(e.to_string()))?;
        body.data.sort_by_key(|d| d.index);
        if body.data.iter().enumerate().any(|(i, d)| d.index != i) {
            return Err(EmbedError::BadResponse(
                "embedding indexes are not 0..n".into(),
            ));
        }
        finish(
            body.data.into_iter().map(|d| d.embedding).collect(),
            texts.len(),
            &self.info,
        )
    }
}
