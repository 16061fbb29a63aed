use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, DTYPE};

use crate::bert::Bert;
use crate::lanes::{self, Lane};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::{EmbedError, Embedder, EmbedderInfo};

/// The model id recorded with every vector MiniLM makes.
pub const MODEL_ID: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// sentence-transformers' `max_seq_length` for this model.
pub const MAX_TOKENS: usize = 256;

struct Inner {
    model: Bert,
    tokenizer: Tokenizer,
    device: Device,
}

/// all-MiniLM-L6-v2 on candle, on the CPU.
#[derive(Clone)]
pub struct MiniLm {
    inner: Arc<Inner>,
    info: EmbedderInfo,
}

fn model_err(what: &str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> EmbedError + '_ {
    move |e| EmbedError::Model(format!("{what}: {e}"))
}

impl MiniLm {
    /// Load from a directory holding `config.json`, `tokenizer.json` and
    /// `model.safetensors` (what `scripts/fetch-model.sh` unpacks).
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| EmbedError::Model(format!("{}: {e}", dir.join(name).display())))
        };
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| EmbedError::Model(format!("config.json: {e}")))?;
        let mut tokenizer =
            Tokenizer::from_bytes(read("tokenizer.json")?).map_err(model_err("tokenizer.json"))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(model_err("tokenizer truncation"))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let device = Device::Cpu;
        let vb = VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DTYPE, &device)
            .map_err(|e| EmbedError::Model(format!("model.safetensors: {e}")))?;
        let model =
            Bert::load(vb, &config).map_err(|e| EmbedError::Model(format!("weights: {e}")))?;
        let dimension =
            u32::try_from(config.hidden_size).map_err(|e| EmbedError::Model(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                tokenizer,
                device,
            }),
            info: EmbedderInfo {
                model: MODEL_ID.to_owned(),
                dimension,
            },
        })
    }

    /// The tokenizer (for token-bounded chunking).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// Embed on the calling thread (CPU-bound; async callers use [`Embedder::embed`]).
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.embed_in(texts, Lane::Query)
    }

    fn embed_in(&self, texts: &[String], lane: Lane) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let infer = |e: candle_core::Error| EmbedError::Inference(e.to_string());
        let encodings = inner
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Inference(format!("tokenizing: {e}")))?;
        let batch = encodings.len();
        let len = encodings.first().map(|e| e.get_ids().len()).unwrap_or(0);
        let mut ids = Vec::with_capacity(batch * len);
        let mut mask = Vec::with_capacity(batch * len);
        for enc in &encodings {
            ids.extend_from_slice(enc.get_ids());
            mask.extend_from_slice(enc.get_attention_mask());
        }
        let ids = Tensor::from_vec(ids, (batch, len), &inner.device).map_err(infer)?;
        let mask = Tensor::from_vec(mask, (batch, len), &inner.device).map_err(infer)?;
        let hidden = match lane {
            // On one of rayon's workers: the encoder's parallel passes then
            // start on this thread and short ones (a query's) run inline,
            // instead of each being handed to the pool from outside.
            Lane::Query => rayon::scope(|_| inner.model.forward(&ids, &mask, lane)),
            // From this blocking thread: when it pauses for a query
            // (`lanes.rs`), no rayon worker is held, so the query has them all.
            Lane::Background => inner.model.forward(&ids, &mask, lane),
        }
        .map_err(infer)?;
        // Mean over real tokens only, then unit length: sentence-transformers' pooling.
        let mask = mask
            .to_dtype(DType::F32)
            .map_err(infer)?
            .unsqueeze(2)
            .map_err(infer)?;
        let summed = hidden
            .broadcast_mul(&mask)
            .map_err(infer)?
            .sum(1)
            .map_err(infer)?;
        let counts = mask.sum(1).map_err(infer)?;
        let mean = summed.broadcast_div(&counts).map_err(infer)?;
        let norms = mean
            .sqr()
            .map_err(infer)?
            .sum_keepdim(1)
            .map_err(infer)?
            .sqrt()
            .map_err(infer)?;
        let unit = mean.broadcast_div(&norms).map_err(infer)?;
        unit.to_vec2::<f32>().map_err(infer)
    }
}

impl Embedder for MiniLm {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        // Counted from now, so background work already running pauses
        // while this waits for a blocking thread too.
        let query = lanes::query();
        self.run(texts, Lane::Query, query).await
    }

    async fn embed_background(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.run(texts, Lane::Background, ()).await
    }
}

impl MiniLm {
    async fn run<G: Send + 'static>(
        &self,
        texts: &[String],
        lane: Lane,
        guard: G,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let this = self.clone();
        let texts = texts.to_vec();
        tokio::task::spawn_blocking(move || {
            let vectors = this.embed_in(&texts, lane);
            drop(guard);
            vectors
        })
        .await
        .map_err(|e| EmbedError::Inference(format!("embedding task: {e}")))?
    }
}
