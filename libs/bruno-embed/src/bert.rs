//! A compact BERT encoder forward pass for inference on the CPU.
//!
//! Same weights and the same arithmetic as candle-transformers' `BertModel`
//! (checked against sentence-transformers by the fixture test), arranged for
//! throughput on few cores:
//! - every linear layer is one 2-D GEMM over all tokens of the batch
//!   (`[batch·len, in] × [in, out]`), Q, K and V fused into one;
//! - the padding mask and the softmax over attention scores are one
//!   parallel pass (`fused.rs`); the attention scale is folded into the
//!   query weights at load;
//! - layer norms are candle's fused `layer_norm`;
//! - a short input (a query: up to `thin::MAX_ROWS` tokens in the batch)
//!   takes the thin path: weight products on panels packed at load
//!   (`thin.rs`) and the whole attention as one pass per sequence
//!   (`fused::short_attention`), where the `gemm` crate's kernels, built
//!   for many rows, took most of a query's time;
//! - the intermediate layer's bias and erf-GELU are one vectorised pass
//!   over all cores (`fused.rs`), not a bias pass and libm's scalar `erff`
//!   on one thread.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use candle_transformers::models::bert::Config;

use crate::lanes::Lane;
use crate::thin::Panels;

struct Linear {
    /// `[in, out]`, contiguous (pre-transposed once at load).
    weight_t: Tensor,
    /// The same, packed for products with few rows (`thin.rs`).
    panels: Panels,
    bias: Tensor,
}

impl Linear {
    fn load(vb: &VarBuilder, inp: usize, out: usize) -> Result<Self> {
        let (weight_t, bias) = Self::parts(vb, inp, out)?;
        Self::new(weight_t, bias)
    }

    /// `(weight_t, bias)` as stored, not yet packed.
    fn parts(vb: &VarBuilder, inp: usize, out: usize) -> Result<(Tensor, Tensor)> {
        let weight = vb.get((out, inp), "weight")?;
        Ok((weight.t()?.contiguous()?, vb.get(out, "bias")?))
    }

    fn new(weight_t: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            panels: Panels::pack(&weight_t)?,
            weight_t,
            bias,
        })
    }

    /// `x · weight_t` (no bias): the thin kernel for a few rows, the
    /// `gemm` crate for more.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(0)? <= crate::thin::MAX_ROWS {
            self.panels.matmul(x)
        } else {
            x.matmul(&self.weight_t)
        }
    }

    fn fused(parts: &[(Tensor, Tensor)]) -> Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.0).collect();
        let biases: Vec<&Tensor> = parts.iter().map(|p| &p.1).collect();
        Self::new(
            Tensor::cat(&weights, 1)?.contiguous()?,
            Tensor::cat(&biases, 0)?,
        )
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// The encoder: token ids and attention mask in, last hidden states out.
pub struct Bert {
    word: Embedding,
    position: Tensor,
    token_type: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
}

impl Bert {
    /// Load from a sentence-transformers / Hugging Face BERT checkpoint.
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = config.hidden_size;
        let e = vb.pp("embeddings");
        let word = Embedding::new(e.get((config.vocab_size, h), "word_embeddings.weight")?, h);
        let position = e.get(
            (config.max_position_embeddings, h),
            "position_embeddings.weight",
        )?;
        let token_type = e
            .get((config.type_vocab_size, h), "token_type_embeddings.weight")?
            .narrow(0, 0, 1)?;
        let embed_norm = LayerNorm::load(&e.pp("LayerNorm"), h, config.layer_norm_eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            let s = a.pp("self");
            // The attention's 1/sqrt(head size), folded into the query.
            let scale = 1.0 / ((h / config.num_attention_heads) as f64).sqrt();
            let (query, query_bias) = Linear::parts(&s.pp("query"), h, h)?;
            let qkv = Linear::fused(&[
                ((query * scale)?, (query_bias * scale)?),
                Linear::parts(&s.pp("key"), h, h)?,
                Linear::parts(&s.pp("value"), h, h)?,
            ])?;
            layers.push(Layer {
                qkv,
                attn_out: Linear::load(&a.pp("output").pp("dense"), h, h)?,
                attn_norm: LayerNorm::load(
                    &a.pp("output").pp("LayerNorm"),
                    h,
                    config.layer_norm_eps,
                )?,
                intermediate: Linear::load(
                    &l.pp("intermediate").pp("dense"),
                    h,
                    config.intermediate_size,
                )?,
                output: Linear::load(&l.pp("output").pp("dense"), config.intermediate_size, h)?,
                out_norm: LayerNorm::load(
                    &l.pp("output").pp("LayerNorm"),
                    h,
                    config.layer_norm_eps,
                )?,
            });
        }
        let heads = config.num_attention_heads;
        Ok(Self {
            word,
            position,
            token_type,
            embed_norm,
            layers,
            heads,
            hidden: h,
        })
    }

    /// `ids`, `mask`: `[batch, len]` (u32) → `[batch, len, hidden]`. In
    /// the background lane the pass pauses before each weight product
    /// while a query is being embedded in this process (`lanes.rs`).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, lane: Lane) -> Result<Tensor> {
        let (b, len) = ids.dims2()?;
        let (h, heads) = (self.hidden, self.heads);
        let tokens = b * len;
        let x = self
            .word
            .forward(&ids.flatten_all()?)?
            .reshape((b, len, h))?
            .broadcast_add(&self.position.narrow(0, 0, len)?)?
            .broadcast_add(&self.token_type)?
            .reshape((tokens, h))?;
        let mut x = self.embed_norm.forward(&x)?;
        // 0 for real tokens, a large negative number for padding: [b, 1, 1, len].
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, len))?;
        let pause = || {
            if lane == Lane::Background {
                crate::lanes::yield_to_queries();
            }
        };
        for layer in &self.layers {
            pause();
            let qkv = crate::fused::qkv_heads(&layer.qkv.product(&x)?, &layer.qkv.bias, b, heads)?;
            let context = if tokens <= crate::thin::MAX_ROWS {
                crate::fused::short_attention(&qkv, &bias)?
            } else {
                let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
                let probs = crate::fused::masked_softmax(&q.matmul(&k.t()?)?, &bias)?;
                probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((tokens, h))?
            };
            pause();
            let attn = layer.attn_norm.forward(&crate::fused::bias_residual(
                &layer.attn_out.product(&context)?,
                &layer.attn_out.bias,
                &x,
            )?)?;
            pause();
            let inter = crate::fused::bias_gelu(
                &layer.intermediate.product(&attn)?,
                &layer.intermediate.bias,
            )?;
            pause();
            x = layer.out_norm.forward(&crate::fused::bias_residual(
                &layer.output.product(&inter)?,
                &layer.output.bias,
                &attn,
            )?)?;
        }
        x.reshape((b, len, h))
    }
}
