//! Fused elementwise passes of the encoder, vectorisable and split over
//! the cores (rows on rayon's pool, the one candle's own ops use):
//!
//! - the intermediate layer's bias add and erf-GELU as one pass. candle's
//!   `gelu_erf` calls libm's scalar `erff` (branches, no SIMD) on one thread
//!   after a separate bias-add pass: on MiniLM's `[tokens, 1536]`
//!   intermediate that was a large share of the encoder's time outside its
//!   matrix products. Here `erf` is Abramowitz & Stegun 7.1.26 (absolute
//!   error ≤ 1.5e-7, below f32's resolution near 1) with a branch-free
//!   `exp`, so the loop compiles to SIMD;
//! - the fused Q, K, V projection's bias added while its output is laid
//!   out per head (`[3, batch, heads, len, head size]`), where candle added
//!   the bias in one pass and copied Q, K and V out in three more;
//! - a projection's bias and the residual added in one pass (candle: two
//!   passes, two new tensors);
//! - the padding mask's add and the softmax of the attention scores as one
//!   pass (`[batch, heads, len, len]`, the largest tensor of the forward
//!   pass: ~81 MB at batch 32 × 230 tokens), where candle made the masked
//!   scores in one pass and the softmax in another.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `gelu_erf(x + bias)`: `x` `[rows, cols]` f32, `bias` `[cols]` f32.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(bias, &BiasGelu)
}

struct BiasGelu;

/// `exp(y)` for `y` ≤ 0: range reduction to `r` in ±ln2/2 and
/// Cephes' `expf` polynomial, the power of two made from bits.
#[inline(always)]
fn exp_neg(y: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Below -87 the result is under f32's normal range: 0 (a select, so
    // the loop stays vectorised).
    let under = y < -87.0;
    let y = y.max(-87.0);
    let t = y * LOG2E + ROUND;
    let n = t - ROUND;
    let k = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = y - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let v = e * f32::from_bits((k.wrapping_add(127) << 23) as u32);
    if under { 0.0 } else { v }
}

/// `erf(x)`, Abramowitz & Stegun 7.1.26.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs().min(6.0);
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp_neg(-a * a)).copysign(x)
}

/// `gelu_erf(v)`.
#[inline(always)]
pub fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

fn gelu_rows(out: &mut [f32], x: &[f32], bias: &[f32]) {
    for (o, x) in out
        .chunks_exact_mut(bias.len())
        .zip(x.chunks_exact(bias.len()))
    {
        for ((o, &x), &b) in o.iter_mut().zip(x).zip(bias) {
            *o = gelu(x + b);
        }
    }
}

/// Rows of one parallel task: about 64k elements, so a short input (a
/// query) runs as one task.
fn rows_per_task(cols: usize) -> usize {
    (ROWS_TASK_ELEMENTS / cols.max(1)).max(1)
}

const ROWS_TASK_ELEMENTS: usize = 1 << 16;

/// Run `f(out rows, in rows, first row)` over `x`'s rows of `cols` on
/// rayon's pool.
fn par_rows(x: &[f32], cols: usize, f: impl Fn(&mut [f32], &[f32], usize) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let per = rows_per_task(cols);
    out.par_chunks_mut(per * cols)
        .zip(x.par_chunks(per * cols))
        .enumerate()
        .for_each(|(i, (o, x))| f(o, x, i * per));
    out
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(candle_core::Error::UnsupportedDTypeForOp(s.dtype(), op));
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        return Err(candle_core::Error::RequiresContiguous { op });
    };
    Ok(&v[start..end])
}

/// The fused Q, K, V projection `x` (`[batch·len, 3·hidden]`, before its
/// bias) plus `bias` (`[3·hidden]`), laid out as `[3, batch, heads, len,
/// hidden / heads]`: Q, K and V are then contiguous along the first axis.
pub fn qkv_heads(x: &Tensor, bias: &Tensor, batch: usize, heads: usize) -> Result<Tensor> {
    x.apply_op2_no_bwd(bias, &QkvHeads { batch, heads })
}

struct QkvHeads {
    batch: usize,
    heads: usize,
}

impl CustomOp2 for QkvHeads {
    fn name(&self) -> &'static str {
        "qkv-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "qkv-heads")?;
        let bias = contiguous(s2, l2, "qkv-heads")?;
        let (b, heads) = (self.batch, self.heads);
        let width = bias.len();
        let &[tokens, w] = l1.dims() else {
            return Err(candle_core::Error::Msg(format!(
                "qkv-heads: x {:?}",
                l1.dims()
            )));
        };
        let hidden = width / 3;
        if w != width || width % 3 != 0 || b == 0 || tokens % b != 0 || hidden % heads.max(1) != 0 {
            return Err(candle_core::Error::Msg(format!(
                "qkv-heads: x {:?}, bias {:?}, batch {b}, heads {heads}",
                l1.dims(),
                l2.dims()
            )));
        }
        let (len, hd) = (tokens / b, hidden / heads);
        let block = heads * len * hd; // one (part, sequence) of the output
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(block.max(1))
            .enumerate()
            .for_each(|(i, o)| {
                let (part, seq) = (i / b, i % b);
                for h in 0..heads {
                    let col = part * hidden + h * hd;
                    let bias = &bias[col..col + hd];
                    for pos in 0..len {
                        let row = (seq * len + pos) * width + col;
                        let dst = &mut o[(h * len + pos) * hd..(h * len + pos + 1) * hd];
                        for ((d, &v), &c) in dst.iter_mut().zip(&x[row..row + hd]).zip(bias) {
                            *d = v + c;
                        }
                    }
                }
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&[3, b, heads, len, hd]),
        ))
    }
}

/// `x + bias + residual`: `x` and `residual` `[rows, cols]` f32, `bias`
/// `[cols]` f32.
pub fn bias_residual(x: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    x.apply_op3_no_bwd(bias, residual, &BiasResidual)
}

struct BiasResidual;

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "bias-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "bias-residual")?;
        let bias = contiguous(s2, l2, "bias-residual")?;
        let residual = contiguous(s3, l3, "bias-residual")?;
        let cols = bias.len();
        if cols == 0 || l1.dims().last() != Some(&cols) || l1.dims() != l3.dims() {
            return Err(candle_core::Error::Msg(format!(
                "bias-residual: x {:?}, bias {:?}, residual {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )));
        }
        let out = par_rows(x, cols, |out, x, first| {
            let residual = &residual[first * cols..first * cols + x.len()];
            for ((o, x), r) in out
                .chunks_exact_mut(cols)
                .zip(x.chunks_exact(cols))
                .zip(residual.chunks_exact(cols))
            {
                for (((o, &x), &b), &r) in o.iter_mut().zip(x).zip(bias).zip(r) {
                    *o = x + b + r;
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `softmax(scores + mask)` over the last dimension: `scores`
/// `[batch, heads, len, len]` f32, `mask` `[batch, 1, 1, len]` f32 (0 for a
/// token, a large negative number for padding).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    scores.apply_op2_no_bwd(mask, &MaskedSoftmax)
}

struct MaskedSoftmax;

fn softmax_row(out: &mut [f32], scores: &[f32], mask: &[f32]) {
    for ((o, &s), &m) in out.iter_mut().zip(scores).zip(mask) {
        *o = s + m;
    }
    // Eight running maxima (a plain comparison, not `f32::max` with its NaN
    // rule): a loop the compiler keeps in vectors. Scores are finite.
    let mut maxes = [f32::NEG_INFINITY; 8];
    let mut chunks = out.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in maxes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for &v in chunks.remainder() {
        maxes[0] = if v > maxes[0] { v } else { maxes[0] };
    }
    let max = maxes
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    // Eight running sums: a sum the compiler may keep in one vector.
    let mut sums = [0f32; 8];
    let mut chunks = out.chunks_exact_mut(8);
    for c in &mut chunks {
        for (o, s) in c.iter_mut().zip(sums.iter_mut()) {
            *o = exp_neg(*o - max);
            *s += *o;
        }
    }
    for o in chunks.into_remainder() {
        *o = exp_neg(*o - max);
        sums[0] += *o;
    }
    let inv = 1.0 / sums.iter().sum::<f32>();
    for o in out.iter_mut() {
        *o *= inv;
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let scores = contiguous(s1, l1, "masked-softmax")?;
        let mask = contiguous(s2, l2, "masked-softmax")?;
        let (&[b, heads, rows, len], &[mb, 1, 1, ml]) = (l1.dims(), l2.dims()) else {
            return Err(candle_core::Error::Msg(format!(
                "masked-softmax: scores {:?}, mask {:?}",
                l1.dims(),
                l2.dims()
            )));
        };
        if (mb, ml) != (b, len) || len == 0 {
            return Err(candle_core::Error::Msg(format!(
                "masked-softmax: mask {:?} for scores {:?}",
                l2.dims(),
                l1.dims()
            )));
        }
        let per_batch = heads * rows;
        let out = par_rows(scores, len, |out, scores, first| {
            for (i, (o, s)) in out
                .chunks_exact_mut(len)
                .zip(scores.chunks_exact(len))
                .enumerate()
            {
                let batch = (first + i) / per_batch;
                softmax_row(o, s, &mask[batch * len..(batch + 1) * len]);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The whole attention of a short input in one pass: `qkv`
/// `[3, batch, heads, len, head size]` (from [`qkv_heads`], the scale
/// already in Q), `mask` `[batch, 1, 1, len]` → the context
/// `[batch·len, heads·head size]`, i.e. `softmax(QKᵀ + mask)·V` per head,
/// written straight into token-major order. For a query's dozen tokens
/// the two batched products per head were 24 calls into the `gemm` crate
/// per layer, each costing more than its arithmetic.
pub fn short_attention(qkv: &Tensor, mask: &Tensor) -> Result<Tensor> {
    qkv.apply_op2_no_bwd(mask, &ShortAttention)
}

struct ShortAttention;

impl CustomOp2 for ShortAttention {
    fn name(&self) -> &'static str {
        "short-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous(s1, l1, "short-attention")?;
        let mask = contiguous(s2, l2, "short-attention")?;
        let (&[3, b, heads, len, hd], &[mb, 1, 1, ml]) = (l1.dims(), l2.dims()) else {
            return Err(candle_core::Error::Msg(format!(
                "short-attention: qkv {:?}, mask {:?}",
                l1.dims(),
                l2.dims()
            )));
        };
        if (mb, ml) != (b, len) || len == 0 {
            return Err(candle_core::Error::Msg(format!(
                "short-attention: mask {:?} for qkv {:?}",
                l2.dims(),
                l1.dims()
            )));
        }
        let width = heads * hd;
        let part = b * heads * len * hd; // Q, K or V
        let mut out = vec![0f32; b * len * width];
        // One sequence per task: a query is one task, run on this thread.
        out.par_chunks_mut(len * width)
            .enumerate()
            .for_each(|(seq, out)| {
                let mask = &mask[seq * len..(seq + 1) * len];
                let (mut scores, mut probs) = (vec![0f32; len], vec![0f32; len]);
                for h in 0..heads {
                    let at = |which: usize, pos: usize| {
                        let start = which * part + ((seq * heads + h) * len + pos) * hd;
                        &qkv[start..start + hd]
                    };
                    for i in 0..len {
                        let q = at(0, i);
                        for (j, s) in scores.iter_mut().enumerate() {
                            *s = q.iter().zip(at(1, j)).map(|(a, b)| a * b).sum();
                        }
                        softmax_row(&mut probs, &scores, mask);
                        let dst = &mut out[i * width + h * hd..i * width + (h + 1) * hd];
                        for (j, &p) in probs.iter().enumerate() {
                            for (d, &v) in dst.iter_mut().zip(at(2, j)) {
                                *d += p * v;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b * len, width])))
    }
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "bias-gelu-erf")?;
        let bias = contiguous(s2, l2, "bias-gelu-erf")?;
        let cols = bias.len();
        if cols == 0 || l1.dims().last() != Some(&cols) {
            return Err(candle_core::Error::Msg(format!(
                "bias-gelu-erf: bias of {cols} for {:?}",
                l1.dims()
            )));
        }
        let out = par_rows(x, cols, |o, x, _| gelu_rows(o, x, bias));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_erf_gelu_to_f32_precision() {
        let mut worst: f32 = 0.0;
        let mut v = -12.0f32;
        while v <= 12.0 {
            let exact = (0.5 * f64::from(v) * (1.0 + libm_erf(f64::from(v) / 2f64.sqrt()))) as f32;
            let err = (gelu(v) - exact).abs() / exact.abs().max(1.0);
            worst = worst.max(err);
            v += 0.001_3;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(gelu(0.0), 0.0);
        assert!(gelu(-100.0).abs() < 1e-20 && gelu(100.0) == 100.0);
    }

    /// erf in f64 (libm's, through candle).
    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }

    #[test]
    fn the_op_adds_the_bias_first_and_keeps_the_shape() {
        let device = candle_core::Device::Cpu;
        let x = Tensor::new(&[[0.5f32, -1.0, 2.0], [3.0, 0.0, -0.25]], &device).unwrap();
        let b = Tensor::new(&[0.25f32, 1.0, -2.0], &device).unwrap();
        let got: Vec<Vec<f32>> = bias_gelu(&x, &b).unwrap().to_vec2().unwrap();
        let want: Vec<Vec<f32>> = x
            .broadcast_add(&b)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec2()
            .unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!(bias_gelu(&x, &Tensor::new(&[1f32, 2.0], &device).unwrap()).is_err());
    }

    #[test]
    fn qkv_heads_adds_the_bias_and_splits_the_heads_as_candle_would() {
        let device = candle_core::Device::Cpu;
        let (b, len, heads, hd) = (3, 5, 2, 4);
        let h = heads * hd;
        let x = Tensor::randn(0f32, 1.0, (b * len, 3 * h), &device).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 3 * h, &device).unwrap();
        let got = qkv_heads(&x, &bias, b, heads).unwrap();
        let full = x
            .broadcast_add(&bias)
            .unwrap()
            .reshape((b, len, 3, heads, hd))
            .unwrap();
        for part in 0..3 {
            let want: Vec<f32> = full
                .narrow(2, part, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = got
                .get(part)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "part {part}");
        }
        assert!(qkv_heads(&x, &bias, 4, heads).is_err());
    }

    #[test]
    fn bias_and_residual_add_up() {
        let device = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let r = Tensor::randn(0f32, 1.0, (5, 3), &device).unwrap();
        let b = Tensor::new(&[0.5f32, -1.0, 2.0], &device).unwrap();
        let got: Vec<f32> = bias_residual(&x, &b, &r)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = (x.broadcast_add(&b).unwrap() + &r)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, want);
        assert!(bias_residual(&x, &b, &r.narrow(0, 0, 4).unwrap()).is_err());
    }

    #[test]
    fn short_attention_matches_the_products_and_softmax() {
        let (b, heads, len, hd) = (2, 3, 5, 4);
        let qkv =
            Tensor::randn(0f32, 1.0, (3, b, heads, len, hd), &candle_core::Device::Cpu).unwrap();
        // The second sequence has two padding tokens.
        let mask = Tensor::new(
            &[0f32, 0., 0., 0., 0., 0., 0., 0., -1e9, -1e9],
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .reshape((b, 1, 1, len))
        .unwrap();
        let ours = short_attention(&qkv, &mask).unwrap();
        let (q, k, v) = (
            qkv.get(0).unwrap(),
            qkv.get(1).unwrap(),
            qkv.get(2).unwrap(),
        );
        let probs = masked_softmax(&q.matmul(&k.t().unwrap()).unwrap(), &mask).unwrap();
        let theirs = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b * len, heads * hd))
            .unwrap();
        let (ours, theirs) = (
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn masked_softmax_matches_candle_and_ignores_padding() {
        let device = candle_core::Device::Cpu;
        // len 101: full chunks of 8 and a remainder; 4 × 12 × 101 rows are
        // several parallel tasks, so a task's rows must find their sequence.
        let (b, h, len) = (4, 12, 101);
        let scores = Tensor::randn(0f32, 3.0, (b, h, len, len), &device).unwrap();
        let mut mask = vec![0f32; b * len];
        for m in &mut mask[len + 7..2 * len] {
            *m = -1e9; // the second sequence is 7 tokens long
        }
        assert!(b * h * len > rows_per_task(len), "one task only");
        let mask = Tensor::from_vec(mask, (b, 1, 1, len), &device).unwrap();
        let got = masked_softmax(&scores, &mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        let diff: f32 = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6, "largest difference {diff}");
        let padded: Vec<f32> = got
            .narrow(0, 1, 1)
            .unwrap()
            .narrow(3, 7, len - 7)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(padded.iter().all(|&p| p == 0.0), "{padded:?}");
        assert!(masked_softmax(&scores, &mask.narrow(0, 0, 2).unwrap()).is_err());
    }
}
