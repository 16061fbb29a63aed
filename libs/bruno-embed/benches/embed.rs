//! Raw MiniLM embedding throughput: batch 32 of ~230-token chunks, against
//! this machine's fp32 GEMM bound at the model's own shapes.
//!
//! The bound: every matrix product of the encoder's forward pass over the
//! same padded batches (per layer: the fused QKV projection, the attention
//! scores and context per head, the attention output, the intermediate and
//! output projections; 6 layers), timed alone through candle's matmul, which
//! is the `gemm` crate on the CPU. All-MiniLM-L6-v2 costs ~23.3 MFLOP per
//! token at 230-token windows, nearly all of it in those products: a
//! forward pass cannot beat them. Printed as a median of `BENCH_RUNS` (3) interleaved
//! runs, with numpy's BLAS (OpenBLAS) at the same shapes for reference.
//!
//! Run: `cargo bench -p bruno-embed --bench embed` (BENCH_CHUNKS to change
//! the count).
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The allocator of the `bruno` binary: the encoder allocates every
// intermediate tensor afresh, so the allocator is part of its cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use bruno_embed::MiniLm;
use candle_core::{Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config, DTYPE};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The encoder's matrix products over given `(batch, padded length)`
/// batches, with random operands made once.
struct Gemms {
    /// `(lhs, rhs)` pairs, each product once per layer.
    products: Vec<(Tensor, Tensor)>,
    /// `m,k,n[,batch]` of each product, for the BLAS reference.
    shapes: Vec<String>,
    layers: usize,
    /// FLOPs of all products over all layers.
    flops: f64,
}

impl Gemms {
    fn new(config: &Config, batches: &[(usize, usize)]) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let heads = config.num_attention_heads;
        let hd = h / heads;
        let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
        let mut products = Vec::new();
        let mut shapes = Vec::new();
        let mut flops = 0.0;
        for &(b, len) in batches {
            let t = b * len;
            // (rows, inner, cols, batch) of each product of one layer.
            for (m, k, n, batch) in [
                (t, h, 3 * h, 1),          // fused Q, K, V
                (len, hd, len, b * heads), // attention scores
                (len, len, hd, b * heads), // attention context
                (t, h, h, 1),              // attention output
                (t, h, i, 1),              // intermediate
                (t, i, h, 1),              // output
            ] {
                let (lhs, rhs) = if batch == 1 {
                    (rand(&[m, k]), rand(&[k, n]))
                } else {
                    (rand(&[batch, m, k]), rand(&[batch, k, n]))
                };
                products.push((lhs, rhs));
                shapes.push(format!("{m},{k},{n},{batch}"));
                flops += 2.0 * (m * k * n * batch) as f64 * config.num_hidden_layers as f64;
            }
        }
        Self {
            products,
            shapes,
            layers: config.num_hidden_layers,
            flops,
        }
    }

    /// Seconds for every product of every layer.
    fn run(&self) -> f64 {
        let started = Instant::now();
        for _ in 0..self.layers {
            for (lhs, rhs) in &self.products {
                std::hint::black_box(lhs.matmul(rhs).unwrap());
            }
        }
        started.elapsed().as_secs_f64()
    }

    /// numpy's BLAS on the same products (`scripts/blas-gemm.py`):
    /// GFLOP/s and the BLAS's name.
    fn blas_reference(&self) -> Result<(f64, String), String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/blas-gemm.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg("3")
            .args(&self.shapes)
            .output()
            .map_err(|e| format!("python3: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (gflops, blas) = text.trim().split_once(' ').ok_or("no figure")?;
        Ok((
            gflops.parse().map_err(|e| format!("{e}: {text}"))?,
            blas.to_owned(),
        ))
    }
}

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
    let config: Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("query") {
        single_queries(&m, &config, &dir);
        return;
    }
    let mut padded = m.tokenizer().clone();
    padded.with_padding(Some(tokenizers::PaddingParams::default()));
    let lens: Vec<(usize, usize)> = chunks
        .chunks(32)
        .map(|batch| {
            let enc = padded.encode_batch(batch.to_vec(), true).unwrap();
            (enc.len(), enc[0].get_ids().len())
        })
        .collect();
    let gemm = Gemms::new(&config, &lens);
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut ours_runs, mut bound_runs) = (Vec::new(), Vec::new());
    let mut secs = 0.0;
    for _ in 0..runs {
        let started = Instant::now();
        for batch in chunks.chunks(32) {
            m.embed_blocking(batch).unwrap();
        }
        secs = started.elapsed().as_secs_f64();
        ours_runs.push(tokens as f64 / secs);
        if std::env::var("BENCH_ONLY").as_deref() != Ok("minilm") {
            bound_runs.push(tokens as f64 / gemm.run());
        }
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("minilm") {
        println!("MiniLM raw: {:.0} tokens/s", median(&mut ours_runs));
        return;
    }
    let ours = median(&mut ours_runs);
    let bound = median(&mut bound_runs);
    println!(
        "MiniLM raw (bruno-embed): {n} chunks, {:.0} tokens/chunk, batch 32: {ours:.0} tokens/s, {:.1} chunks/s ({secs:.2} s) — goal >= 2500 tokens/s",
        tokens as f64 / n as f64,
        n as f64 / secs
    );
    let flop_per_token = gemm.flops / tokens as f64;
    println!(
        "fp32 GEMM bound (gemm crate via candle, the encoder's own products, {:.1} MFLOP/token): {bound:.0} tokens/s = {:.1} GFLOP/s; bruno-embed reaches {:.1} % of it (median of {runs}) — goal >= 70 %",
        flop_per_token / 1e6,
        bound * flop_per_token / 1e9,
        100.0 * ours / bound
    );
    match gemm.blas_reference() {
        Ok((gflops, blas)) => println!(
            "reference {blas} via numpy, same products: {gflops:.1} GFLOP/s = {:.0} tokens/s bound; bruno-embed reaches {:.1} % of it",
            gflops * 1e9 / flop_per_token,
            100.0 * ours / (gflops * 1e9 / flop_per_token)
        ),
        Err(e) => println!("reference BLAS not measured: {e}"),
    }

    // Baseline: candle-transformers' BertModel on the same batches (the
    // encoder alone: tokenization and pooling are not timed for it).
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
    single_queries(&m, &config, &dir);
}

/// p50 and p99 of `samples` (seconds), in ms.
fn quantiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] * 1e3;
    (at(0.5), at(0.99))
}

/// One short query at a time, as the retriever embeds them: latency, against
/// the floor of reading every weight once from memory (at a dozen tokens
/// the products are thin, 12 rows against 384-1,536-wide weights, and the
/// weights are streamed once per query), against the same forward pass's
/// matrix products through the `gemm` crate alone (what the encoder used
/// before its thin path) and against candle-transformers' `BertModel`.
fn single_queries(m: &MiniLm, config: &Config, dir: &std::path::Path) {
    const N: usize = 300;
    let queries: Vec<String> = (0..N)
        .map(|t| format!("how do I restore backup {t}?"))
        .collect();
    let len = m
        .tokenizer()
        .encode(queries[0].as_str(), true)
        .unwrap()
        .len();
    for q in queries.iter().take(20) {
        m.embed_blocking(std::slice::from_ref(q)).unwrap();
    }
    let gemm = Gemms::new(config, &[(1, len)]);
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        DTYPE,
        &Device::Cpu,
    )
    .unwrap();
    let reference = BertModel::load(vb, config).unwrap();
    let (mut ours, mut bound, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so all three see the same machine.
    for q in &queries {
        let started = Instant::now();
        m.embed_blocking(std::slice::from_ref(q)).unwrap();
        ours.push(started.elapsed().as_secs_f64());
        bound.push(gemm.run());
        let started = Instant::now();
        let enc = m.tokenizer().encode(q.as_str(), true).unwrap();
        let ids = Tensor::new(enc.get_ids(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mask = Tensor::new(enc.get_attention_mask(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        reference
            .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
            .unwrap();
        theirs.push(started.elapsed().as_secs_f64());
    }
    // Streaming every layer's weights once: a parallel sum over a buffer of
    // the same size, four such buffers in turn (168 MB), so a read is not
    // served from the cache the previous one filled.
    let weights = config.num_hidden_layers
        * (config.hidden_size * 3 * config.hidden_size
            + config.hidden_size * config.hidden_size
            + 2 * config.hidden_size * config.intermediate_size);
    let buffers: Vec<Vec<f32>> = (0..4).map(|i| vec![i as f32; weights]).collect();
    let mut stream = Vec::new();
    for r in 0..N {
        let buf = &buffers[r % buffers.len()];
        let started = Instant::now();
        use rayon::prelude::*;
        // Sixteen running sums, so the adds vectorise and the loads, not
        // the adds' latency, bound the loop.
        let sum: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for block in c.chunks_exact(16) {
                    for (a, v) in acc.iter_mut().zip(block) {
                        *a += v;
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(sum);
        stream.push(started.elapsed().as_secs_f64());
    }
    let (o50, o99) = quantiles(&mut ours);
    let (b50, b99) = quantiles(&mut bound);
    let (t50, t99) = quantiles(&mut theirs);
    let (s50, _) = quantiles(&mut stream);
    println!(
        "one query of {len} tokens ({N} queries, interleaved): bruno-embed p50 {o50:.2} ms p99 {o99:.2} ms, {:.2}x the floor of reading its {:.0} MB of weights once from memory (p50 {s50:.2} ms); the same products through the gemm crate alone p50 {b50:.2} ms p99 {b99:.2} ms; candle-transformers BertModel p50 {t50:.2} ms p99 {t99:.2} ms ({:.2}x bruno-embed)",
        o50 / s50,
        (weights * 4) as f64 / 1e6,
        t50 / o50
    );
}
