//! Matrix products with few rows: a query's dozen tokens against a layer's
//! weights.
//!
//! At 9 tokens the `gemm` crate took ~9 ms for the encoder's 24 weight
//! products (~21 GFLOP/s), where reading the 42 MB of weights once from
//! memory takes ~2 ms on the same machine: its kernels are built for many
//! rows. Here the weights are packed once at load into panels of 16
//! columns (`[n / 16][k][16]`), so a product streams each panel front to
//! back, and every row of `x` is multiplied into register accumulators
//! with AVX2 FMA (pulp's runtime dispatch; a scalar loop elsewhere). The
//! panels are split over rayon's pool.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// Columns per panel: two AVX2 vectors of f32.
const PANEL: usize = 16;

/// Rows of `x` sharing one pass over a panel (12 accumulators, 2 weight
/// vectors and a broadcast fit AVX2's 16 registers).
const ROW_GROUP: usize = 6;

/// Up to this many rows a product takes the thin path; above it the
/// `gemm` crate's blocked kernels win (measured by the embed bench).
pub const MAX_ROWS: usize = 48;

/// A `[k, n]` weight matrix packed in panels of 16 columns.
pub struct Panels {
    data: Vec<f32>,
    k: usize,
    n: usize,
    /// The SIMD level, detected once at load.
    arch: Arch,
}

impl Panels {
    /// Pack `w` (`[k, n]`, any layout) for [`Panels::matmul`]. `n` must be
    /// a multiple of 16 (every width of a BERT encoder is).
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (k, n) = w.dims2()?;
        if n % PANEL != 0 {
            return Err(candle_core::Error::Msg(format!(
                "thin matmul: {n} columns are not a multiple of {PANEL}"
            )));
        }
        let rows = w.to_vec2::<f32>()?;
        let mut data = Vec::with_capacity(k * n);
        for p in 0..n / PANEL {
            for row in &rows {
                data.extend_from_slice(&row[p * PANEL..(p + 1) * PANEL]);
            }
        }
        Ok(Self {
            data,
            k,
            n,
            arch: Arch::new(),
        })
    }

    /// `x · w`: `x` `[rows, k]` f32 → `[rows, n]`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for Panels {
    fn name(&self) -> &'static str {
        "thin-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            return Err(candle_core::Error::Msg("thin matmul: x is not f32".into()));
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            return Err(candle_core::Error::RequiresContiguous { op: "thin-matmul" });
        };
        let x = &v[start..end];
        let (k, n) = (self.k, self.n);
        let &[m, xk] = l.dims() else {
            return Err(candle_core::Error::Msg(format!(
                "thin matmul: x {:?}",
                l.dims()
            )));
        };
        if xk != k {
            return Err(candle_core::Error::Msg(format!(
                "thin matmul: x {:?} against [{k}, {n}]",
                l.dims()
            )));
        }
        Ok((
            CpuStorage::F32(self.product(x, m)),
            Shape::from_dims(&[m, n]),
        ))
    }
}

impl Panels {
    fn product(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let panels = n / PANEL;
        // The output panel by panel (`[n / 16][m][16]`), so each task
        // writes one contiguous run; rows are put back together below.
        let mut staged = vec![0f32; m * n];
        if m == 0 || k == 0 {
            return staged;
        }
        let per_task = panels.div_ceil(2 * rayon::current_num_threads()).max(1);
        let arch = self.arch;
        staged
            .par_chunks_mut(per_task * m * PANEL)
            .zip(self.data.par_chunks(per_task * k * PANEL))
            .for_each(|(out, w)| {
                arch.dispatch(Panel { x, k, m, w, out });
            });
        let mut out = vec![0f32; m * n];
        for (p, block) in staged.chunks_exact(m * PANEL).enumerate() {
            for (r, cols) in block.chunks_exact(PANEL).enumerate() {
                out[r * n + p * PANEL..r * n + (p + 1) * PANEL].copy_from_slice(cols);
            }
        }
        out
    }
}

/// Some whole panels of one product.
struct Panel<'a> {
    x: &'a [f32],
    k: usize,
    m: usize,
    /// `[panels][k][16]`.
    w: &'a [f32],
    /// `[panels][m][16]`.
    out: &'a mut [f32],
}

impl WithSimd for Panel<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Panel { x, k, m, w, out } = self;
        for (w, out) in w
            .chunks_exact(k * PANEL)
            .zip(out.chunks_exact_mut(m * PANEL))
        {
            let mut first = 0;
            while first < m {
                let rows = (m - first).min(ROW_GROUP);
                let x = &x[first * k..(first + rows) * k];
                let out = &mut out[first * PANEL..(first + rows) * PANEL];
                if S::F32_LANES * 2 == PANEL {
                    match rows {
                        6 => group::<S, 6>(simd, x, k, w, out),
                        5 => group::<S, 5>(simd, x, k, w, out),
                        4 => group::<S, 4>(simd, x, k, w, out),
                        3 => group::<S, 3>(simd, x, k, w, out),
                        2 => group::<S, 2>(simd, x, k, w, out),
                        _ => group::<S, 1>(simd, x, k, w, out),
                    }
                } else {
                    scalar(x, k, w, out);
                }
                first += rows;
            }
        }
    }
}

/// `R` rows of `x` (`[R, k]`) times one panel (`[k][16]`) into `out`
/// (`[R][16]`), the accumulators in registers.
#[inline(always)]
fn group<S: Simd, const R: usize>(simd: S, x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; 2]; R];
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
    for (i, line) in w.chunks_exact(PANEL).enumerate() {
        let (v, _) = S::as_simd_f32s(line);
        let (w0, w1) = (v[0], v[1]);
        for r in 0..R {
            let b = simd.splat_f32s(rows[r][i]);
            acc[r][0] = simd.mul_add_e_f32s(b, w0, acc[r][0]);
            acc[r][1] = simd.mul_add_e_f32s(b, w1, acc[r][1]);
        }
    }
    for (r, o) in out.chunks_exact_mut(PANEL).enumerate() {
        let (v, _) = S::as_mut_simd_f32s(o);
        v[0] = acc[r][0];
        v[1] = acc[r][1];
    }
}

fn scalar(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
    for (row, o) in x.chunks_exact(k).zip(out.chunks_exact_mut(PANEL)) {
        o.fill(0.0);
        for (&a, line) in row.iter().zip(w.chunks_exact(PANEL)) {
            for (o, &b) in o.iter_mut().zip(line) {
                *o += a * b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_for_every_row_count_up_to_the_limit() {
        let (k, n) = (40, 48);
        let w = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
        let panels = Panels::pack(&w).unwrap();
        for m in 1..=MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let ours = panels.matmul(&x).unwrap().to_vec2::<f32>().unwrap();
            let theirs = x.matmul(&w).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{m} rows: {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_scalar_kernel_agrees() {
        let (k, m) = (7, 3);
        let x: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let w: Vec<f32> = (0..k * PANEL).map(|i| (i % 11) as f32 - 5.0).collect();
        let mut out = vec![0f32; m * PANEL];
        scalar(&x, k, &w, &mut out);
        for r in 0..m {
            for c in 0..PANEL {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[i * PANEL + c]).sum();
                assert!((out[r * PANEL + c] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn a_width_off_the_panel_is_refused() {
        let w = Tensor::zeros((4, 20), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(Panels::pack(&w).is_err());
    }
}
