//! Convolution on the CPU backend: im2col + GEMM.
//!
//! With NHWC activations and KRSC weights both operands are plain row-major matrices: the
//! im2col row of output pixel `(n, p, q)` is the `R·S` input pixels it reads, `C` contiguous
//! channels each, in the weight's `(r, s, c)` order, so `y[M, K] = col[M, R·S·C] · Wᵀ`. A 1×1
//! convolution with stride 1 and no padding uses the input itself as `col`. The data gradient is
//! `dcol = dy · W` followed by a gather of every input pixel's taps (col2im); the filter gradient
//! is `dWᵀ = colᵀ · dy`, one tile of output pixels at a time, each tile's f32 product accumulated
//! into an f64 sum. Outputs are rounded once to the input's storage type (the bias gradient
//! stays f32), where the tensor-core kernels round theirs.

use rayon::prelude::*;

use super::check::{f32_of, float_as, float_of, nhwc, shape_is};
use super::gemm::{gemm, Mat};
use super::tensor::{numel_of, CpuTensor};
use crate::error::{Error, Result};
use crate::ops::conv::ConvGeometry;

/// The sizes of one convolution.
#[derive(Clone, Copy)]
struct Conv {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    r: usize,
    s: usize,
    p: usize,
    q: usize,
    g: ConvGeometry,
}

impl Conv {
    /// As `ops::conv::params`: the output size and the 32-bit limits of the kernels.
    #[allow(clippy::too_many_arguments)]
    fn new(n: usize, h: usize, w: usize, c: usize, k: usize, r: usize, s: usize, g: &ConvGeometry) -> Result<Self> {
        let (p, q) = g.output_size(h, w, r, s)?;
        let fits = |v: usize| v <= i32::MAX as usize;
        let all = [g.stride.0, g.stride.1, g.padding.0, g.padding.1, g.dilation.0, g.dilation.1];
        if !all.iter().copied().all(fits) || r * s * c > i32::MAX as usize || r * s * k > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!("convolution too large for 32-bit indexing: {g:?}")));
        }
        // The largest buffers: the output (N·P·Q·K) and the data gradient's dcol (P·Q·R·S·C).
        numel_of(&[n, p, q, r * s * c.max(k)])?;
        Ok(Conv { n, h, w, c, r, s, p, q, g: *g })
    }

    /// Columns of the im2col matrix: R·S·C.
    fn kdim(&self) -> usize {
        self.r * self.s * self.c
    }

    /// Rows of the im2col matrix: N·P·Q.
    fn m(&self) -> usize {
        self.n * self.p * self.q
    }

    /// A 1×1 filter with stride 1 and no padding: the input is its own im2col matrix.
    fn pointwise(&self) -> bool {
        self.r == 1 && self.s == 1 && self.g.stride == (1, 1) && self.g.padding == (0, 0)
    }

    /// Input row (or column) read by output position `o` with tap `t`, if inside the image.
    fn source(o: usize, t: usize, stride: usize, pad: usize, dil: usize, len: usize) -> Option<usize> {
        let pos = (o * stride + t * dil).checked_sub(pad)?;
        (pos < len).then_some(pos)
    }

    /// Writes im2col rows `row0 ..` (as many as `col` holds) of `x`: each row the R·S·C input
    /// values output pixel (n, p, q) reads, zeros for taps in the padding.
    fn im2col(&self, x: &[f32], row0: usize, col: &mut [f32]) {
        let (c, kdim, pq) = (self.c, self.kdim(), self.p * self.q);
        let g = &self.g;
        for (i, row) in col.chunks_exact_mut(kdim).enumerate() {
            let m = row0 + i;
            let (ni, rem) = (m / pq, m % pq);
            let (pi, qi) = (rem / self.q, rem % self.q);
            let plane = &x[ni * self.h * self.w * c..(ni + 1) * self.h * self.w * c];
            for (ri, taps) in row.chunks_exact_mut(self.s * c).enumerate() {
                let Some(hi) = Conv::source(pi, ri, g.stride.0, g.padding.0, g.dilation.0, self.h) else {
                    taps.fill(0.0);
                    continue;
                };
                for (si, dst) in taps.chunks_exact_mut(c).enumerate() {
                    match Conv::source(qi, si, g.stride.1, g.padding.1, g.dilation.1, self.w) {
                        Some(wi) => dst.copy_from_slice(&plane[(hi * self.w + wi) * c..(hi * self.w + wi + 1) * c]),
                        None => dst.fill(0.0),
                    }
                }
            }
        }
    }

    /// Output positions `o` and taps `t` with `o·stride + t·dil − pad = i`, `o < out`.
    fn sources_of(i: usize, taps: usize, stride: usize, pad: usize, dil: usize, out: usize) -> Vec<(usize, usize)> {
        (0..taps)
            .filter_map(|t| {
                let v = (i + pad).checked_sub(t * dil)?;
                (v % stride == 0 && v / stride < out).then_some((v / stride, t))
            })
            .collect()
    }
}

/// Rows of one im2col tile: about 1 MiB of f32, at least 32 rows, at most 512. A function of
/// the shapes only, so the work split never depends on the thread count.
fn tile_rows(kdim: usize, budget: usize) -> usize {
    (budget / kdim.max(1)).clamp(32, 512)
}

fn filter_shape(w: &CpuTensor) -> Result<[usize; 4]> {
    let s = w.shape();
    if s.len() != 4 || s.contains(&0) || s.iter().any(|&d| d > i32::MAX as usize) {
        return Err(Error::InvalidShape {
            what: "convolution weight",
            shape: s.to_vec(),
            reason: "expected 4 dimensions KRSC, each at least 1".into(),
        });
    }
    Ok([s[0], s[1], s[2], s[3]])
}

pub(crate) fn conv2d(
    x: &CpuTensor,
    w: &CpuTensor,
    bias: Option<&CpuTensor>,
    geometry: &ConvGeometry,
) -> Result<CpuTensor> {
    let [n, h, wd, c] = nhwc("convolution input", x)?;
    let [k, r, s, wc] = filter_shape(w)?;
    let xv = float_of("convolution input", x)?;
    let wv = float_as("convolution weight", w, x.dtype())?;
    if wc != c {
        return Err(Error::ShapeMismatch {
            what: "convolution weight",
            expected: vec![k, r, s, c],
            got: w.shape().to_vec(),
        });
    }
    let bv = match bias {
        Some(b) => {
            let v = f32_of("convolution bias", b)?;
            shape_is("convolution bias", b, &[k])?;
            Some(v)
        }
        None => None,
    };
    let cv = Conv::new(n, h, wd, c, k, r, s, geometry)?;
    let kdim = cv.kdim();
    let rows = tile_rows(kdim, 1 << 18);
    let mut y = vec![0.0f32; cv.m() * k];
    let wt = Mat::transposed(wv, k, kdim);
    y.par_chunks_mut(rows * k).enumerate().for_each_init(Vec::new, |col, (t, out)| {
        let (row0, nrows) = (t * rows, out.len() / k);
        let a = if cv.pointwise() {
            Mat::row_major(&xv[row0 * kdim..(row0 + nrows) * kdim], nrows, kdim)
        } else {
            col.resize(nrows * kdim, 0.0);
            cv.im2col(xv, row0, &mut col[..nrows * kdim]);
            Mat::row_major(&col[..nrows * kdim], nrows, kdim)
        };
        gemm(a, wt, out);
        if let Some(b) = bv {
            for row in out.chunks_exact_mut(k) {
                row.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
            }
        }
    });
    Ok(CpuTensor::float(vec![n, cv.p, cv.q, k], y, x.dtype()))
}

pub(crate) fn backward_data(
    dy: &CpuTensor,
    w: &CpuTensor,
    input_hw: (usize, usize),
    geometry: &ConvGeometry,
) -> Result<CpuTensor> {
    let [n, p_out, q_out, k] = nhwc("convolution output gradient", dy)?;
    let [wk, r, s, c] = filter_shape(w)?;
    let dyv = float_of("convolution output gradient", dy)?;
    let wv = float_as("convolution weight", w, dy.dtype())?;
    if wk != k {
        return Err(Error::ShapeMismatch {
            what: "convolution weight",
            expected: vec![k, r, s, c],
            got: w.shape().to_vec(),
        });
    }
    let (h, wd) = input_hw;
    if h == 0 || wd == 0 {
        return Err(Error::InvalidShape {
            what: "convolution input size",
            shape: vec![h, wd],
            reason: "must be at least 1x1".into(),
        });
    }
    let cv = Conv::new(n, h, wd, c, k, r, s, geometry)?;
    if (cv.p, cv.q) != (p_out, q_out) {
        return Err(Error::ShapeMismatch {
            what: "convolution output gradient",
            expected: vec![n, cv.p, cv.q, k],
            got: dy.shape().to_vec(),
        });
    }
    let kdim = cv.kdim();
    let wm = Mat::row_major(wv, k, kdim);
    let mut dx = vec![0.0f32; n * h * wd * c];
    if cv.pointwise() {
        // dx rows are dcol rows: dx = dy · W, tile by tile.
        let rows = tile_rows(kdim, 1 << 18);
        dx.par_chunks_mut(rows * c).enumerate().for_each(|(t, out)| {
            let nrows = out.len() / c;
            gemm(Mat::row_major(&dyv[t * rows * k..(t * rows + nrows) * k], nrows, k), wm, out);
        });
        return Ok(CpuTensor::float(vec![n, h, wd, c], dx, dy.dtype()));
    }
    // Per sample: dcol = dy_n · W (tiles in parallel), then every input pixel gathers its
    // taps from dcol in (r, s) order (rows of the image in parallel).
    let pq = cv.p * cv.q;
    let rows = tile_rows(kdim, 1 << 18);
    let g = cv.g;
    let hsrc: Vec<Vec<(usize, usize)>> =
        (0..h).map(|hi| Conv::sources_of(hi, r, g.stride.0, g.padding.0, g.dilation.0, cv.p)).collect();
    let wsrc: Vec<Vec<(usize, usize)>> =
        (0..wd).map(|wi| Conv::sources_of(wi, s, g.stride.1, g.padding.1, g.dilation.1, cv.q)).collect();
    let mut dcol = vec![0.0f32; pq * kdim];
    for (ni, dx_n) in dx.chunks_exact_mut(h * wd * c).enumerate() {
        let dy_n = &dyv[ni * pq * k..(ni + 1) * pq * k];
        dcol.par_chunks_mut(rows * kdim).enumerate().for_each(|(t, out)| {
            let nrows = out.len() / kdim;
            gemm(Mat::row_major(&dy_n[t * rows * k..(t * rows + nrows) * k], nrows, k), wm, out);
        });
        dx_n.par_chunks_mut(wd * c).enumerate().for_each(|(hi, row)| {
            for (wi, px) in row.chunks_exact_mut(c).enumerate() {
                for &(pi, ri) in &hsrc[hi] {
                    for &(qi, si) in &wsrc[wi] {
                        let at = (pi * cv.q + qi) * kdim + (ri * s + si) * c;
                        px.iter_mut().zip(&dcol[at..at + c]).for_each(|(o, &v)| *o += v);
                    }
                }
            }
        });
    }
    Ok(CpuTensor::float(vec![n, h, wd, c], dx, dy.dtype()))
}

pub(crate) fn backward_filter(
    dy: &CpuTensor,
    x: &CpuTensor,
    filter_krs: (usize, usize, usize),
    with_bias: bool,
    geometry: &ConvGeometry,
) -> Result<(CpuTensor, Option<CpuTensor>)> {
    let [n, h, wd, c] = nhwc("convolution input", x)?;
    let [dn, p_out, q_out, k] = nhwc("convolution output gradient", dy)?;
    let xv = float_of("convolution input", x)?;
    let dyv = float_as("convolution output gradient", dy, x.dtype())?;
    let (fk, r, s) = filter_krs;
    if fk != k || r == 0 || s == 0 {
        return Err(Error::ShapeMismatch {
            what: "convolution filter",
            expected: vec![k, r.max(1), s.max(1), c],
            got: vec![fk, r, s, c],
        });
    }
    let cv = Conv::new(n, h, wd, c, k, r, s, geometry)?;
    if (dn, p_out, q_out) != (n, cv.p, cv.q) {
        return Err(Error::ShapeMismatch {
            what: "convolution output gradient",
            expected: vec![n, cv.p, cv.q, k],
            got: dy.shape().to_vec(),
        });
    }
    let (kdim, m) = (cv.kdim(), cv.m());
    // dWᵀ [kdim, K] = colᵀ · dy, over tiles of output pixels in order; within a tile the
    // kdim rows are split in fixed blocks, each owning its rows of the f64 sum.
    let rows = tile_rows(kdim, 1 << 21);
    const JB: usize = 64;
    let mut acc = vec![0.0f64; kdim * k];
    let mut col = if cv.pointwise() { Vec::new() } else { vec![0.0f32; rows * kdim] };
    for row0 in (0..m).step_by(rows) {
        let nrows = rows.min(m - row0);
        let col_t: &[f32] = if cv.pointwise() {
            &xv[row0 * kdim..(row0 + nrows) * kdim]
        } else {
            let buf = &mut col[..nrows * kdim];
            buf.par_chunks_mut(16 * kdim).enumerate().for_each(|(i, part)| cv.im2col(xv, row0 + 16 * i, part));
            buf
        };
        let dy_t = Mat::row_major(&dyv[row0 * k..(row0 + nrows) * k], nrows, k);
        acc.par_chunks_mut(JB * k).enumerate().for_each_init(Vec::new, |part, (jb, acc)| {
            let (j0, jn) = (jb * JB, acc.len() / k);
            part.resize(jn * k, 0.0);
            // Columns j0 .. j0 + jn of the tile, transposed: jn × nrows, strides (1, kdim).
            let a = Mat { data: &col_t[j0..], rows: jn, cols: nrows, rs: 1, cs: kdim };
            gemm(a, dy_t, &mut part[..jn * k]);
            acc.iter_mut().zip(part.iter()).for_each(|(s, &v)| *s += v as f64);
        });
    }
    let mut dw = vec![0.0f32; k * kdim];
    dw.par_chunks_mut(kdim).enumerate().for_each(|(ki, row)| {
        row.iter_mut().enumerate().for_each(|(j, o)| *o = acc[j * k + ki] as f32);
    });
    let dw = CpuTensor::float(vec![k, r, s, c], dw, x.dtype());
    let db = with_bias.then(|| {
        let pq = cv.p * cv.q;
        let parts: Vec<Vec<f64>> = (0..n)
            .into_par_iter()
            .map(|ni| {
                let mut sum = vec![0.0f64; k];
                for row in dyv[ni * pq * k..(ni + 1) * pq * k].chunks_exact(k) {
                    sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
                }
                sum
            })
            .collect();
        let mut total = vec![0.0f64; k];
        for part in &parts {
            total.iter_mut().zip(part).for_each(|(t, &v)| *t += v);
        }
        CpuTensor::f32_unchecked(vec![k], total.into_iter().map(|v| v as f32).collect())
    });
    Ok((dw, db))
}
