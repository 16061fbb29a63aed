//! Raw MiniLM embedding throughput: batch 32 of ~230-token chunks.
//! Run: `cargo bench -p bruno-embed --bench embed` (BENCH_CHUNKS to change the count).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use bruno_embed::MiniLm;

fn main() {
    let dir = std::env::var_os("BRUNO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/bruno/models/all-MiniLM-L6-v2")
        });
    let m = MiniLm::load(&dir).expect("model (scripts/fetch-model.sh)");
    let n: usize = std::env::var("BENCH_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let words = [
        "backup",
        "restore",
        "queue",
        "broker",
        "router",
        "lease",
        "volume",
        "snapshot",
        "cluster",
        "node",
        "certificate",
        "renewal",
        "firewall",
        "rule",
        "disk",
        "latency",
        "replica",
        "index",
        "vector",
        "memory",
    ];
    // ~230 tokens each, varied so batches are not identical.
    let chunks: Vec<String> = (0..n)
        .map(|i| {
            let mut s = String::new();
            let mut k = i;
            while m.tokenizer().encode(s.as_str(), true).unwrap().len() < 230 {
                s.push_str(words[k % words.len()]);
                s.push(if k % 7 == 0 { '.' } else { ' ' });
                k = k * 31 + 7;
            }
            s
        })
        .collect();
    let tokens: usize = chunks
        .iter()
        .map(|c| m.tokenizer().encode(c.as_str(), true).unwrap().len())
        .sum();
    m.embed_blocking(&chunks[..32.min(n)]).unwrap(); // warm-up
    let started = Instant::now();
    for batch in chunks.chunks(32) {
        m.embed_blocking(batch).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let ours = tokens as f64 / secs;
    println!(
        "MiniLM raw (bruno-embed): {n} chunks, {:.0} tokens/chunk, batch 32: {ours:.0} tokens/s, {:.1} chunks/s ({secs:.2} s) — goal >= 2500 tokens/s",
        tokens as f64 / n as f64,
        n as f64 / secs
    );

    // Baseline: candle-transformers' BertModel on the same batches (the
    // encoder alone: tokenization and pooling are not timed for it).
    use candle_core::{Device, Tensor};
    use candle_transformers::models::bert::{BertModel, Config, DTYPE};
    let config: Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        DTYPE,
        &Device::Cpu,
    )
    .unwrap();
    let reference = BertModel::load(vb, &config).unwrap();
    let mut tokenizer = m.tokenizer().clone();
    tokenizer.with_padding(Some(tokenizers::PaddingParams::default()));
    let inputs: Vec<(Tensor, Tensor)> = chunks
        .chunks(32)
        .map(|batch| {
            let enc = tokenizer.encode_batch(batch.to_vec(), true).unwrap();
            let len = enc[0].get_ids().len();
            let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
            let mask: Vec<u32> = enc
                .iter()
                .flat_map(|e| e.get_attention_mask().to_vec())
                .collect();
            (
                Tensor::from_vec(ids, (enc.len(), len), &Device::Cpu).unwrap(),
                Tensor::from_vec(mask, (enc.len(), len), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let started = Instant::now();
    for (ids, mask) in &inputs {
        reference
            .forward(ids, &ids.zeros_like().unwrap(), Some(mask))
            .unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let baseline = tokens as f64 / secs;
    println!(
        "baseline candle-transformers BertModel, same batches: {baseline:.0} tokens/s ({secs:.2} s); bruno-embed is {:.2}x",
        ours / baseline
    );
}
