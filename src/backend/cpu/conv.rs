//! Convolution on the CPU backend: GEMMs on blocks of an im2col matrix that is never
//! materialised whole.
//!
//! With NHWC activations and KRSC weights both operands are plain row-major matrices: the
//! im2col row of output pixel `(n, p, q)` is the `R·S` input pixels it reads, `C` contiguous
//! channels each, in the weight's `(r, s, c)` order, so `y[M, K] = col[M, R·S·C] · Wᵀ`.
//!
//! - **Forward**: tiles of output pixels in parallel; each tile gathers its im2col rows into a
//!   per-thread buffer (about 1 MiB, at least 256 rows) and runs one GEMM into its rows of `y`.
//!   A 1×1 convolution with stride 1 and no padding is one GEMM per tile on the input itself.
//! - **Data gradient**: with stride 1 (and padding at most the dilated filter's reach) it is the
//!   forward convolution of `dy` with the filter flipped in (r, s) and transposed in (k, c), so
//!   it runs through the forward's tiles; otherwise `dcol = dy · W` per sample followed by a
//!   gather of every input pixel's taps (col2im). A pointwise convolution is `dx = dy · W`.
//! - **Filter gradient**: `dWᵀ = colᵀ · dy`, in blocks of (tile of output pixels × range of
//!   im2col columns), each block one GEMM into its own f32 partial; partials are summed in f64
//!   in tile order, a fixed number of tiles at a time (bounding the partials' memory).
//!
//! Every block size is a function of the shapes only and every output element is written by
//! one GEMM call (or one ordered f64 sum), so the bits do not depend on the thread count.
//! Outputs are rounded once to the input's storage type (the bias gradient stays f32), where
//! the tensor-core kernels round theirs.

use rayon::prelude::*;

use super::check::{f32_of, float_as, float_of, nhwc, shape_is};
use super::tensor::{numel_of, CpuTensor};
use crate::error::{Error, Result};
use crate::ffi::gemm::{gemm, Mat};
use crate::ops::conv::ConvGeometry;

/// The sizes of one convolution.
#[derive(Clone, Copy)]
pub(crate) struct Conv {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
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
        Ok(Conv { n, h, w, c, k, r, s, p, q, g: *g })
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

    /// Writes columns `j0 .. j0 + width` of im2col rows `row0 ..` (as many as `col` holds,
    /// `width` values each) of `x`: the input values output pixel (n, p, q) reads, in (r, s, c)
    /// order, zeros for taps in the padding.
    fn im2col(&self, x: &[f32], row0: usize, j0: usize, width: usize, col: &mut [f32]) {
        let (c, pq) = (self.c, self.p * self.q);
        let g = &self.g;
        let (t0, t1) = (j0 / c, (j0 + width).div_ceil(c));
        for (i, row) in col.chunks_exact_mut(width).enumerate() {
            let m = row0 + i;
            let (ni, rem) = (m / pq, m % pq);
            let (pi, qi) = (rem / self.q, rem % self.q);
            let plane = &x[ni * self.h * self.w * c..(ni + 1) * self.h * self.w * c];
            for t in t0..t1 {
                // The part of tap t's C channels inside the column range.
                let (lo, hi) = (j0.max(t * c), (j0 + width).min((t + 1) * c));
                let dst = &mut row[lo - j0..hi - j0];
                let (ri, si) = (t / self.s, t % self.s);
                let hi_src = Conv::source(pi, ri, g.stride.0, g.padding.0, g.dilation.0, self.h);
                let wi_src = Conv::source(qi, si, g.stride.1, g.padding.1, g.dilation.1, self.w);
                match (hi_src, wi_src) {
                    (Some(y), Some(xw)) => {
                        let at = (y * self.w + xw) * c;
                        dst.copy_from_slice(&plane[at + lo - t * c..at + hi - t * c]);
                    }
                    _ => dst.fill(0.0),
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

    /// The data gradient as a forward convolution (stride 1, padding within the dilated
    /// filter's reach on both axes): of `dy` (K channels) with the flipped, transposed filter and
    /// padding `dil·(taps − 1) − pad`, whose output is the input's size.
    fn transposed(&self) -> Option<Conv> {
        if self.g.stride != (1, 1) {
            return None;
        }
        let pad0 = (self.g.dilation.0 * (self.r - 1)).checked_sub(self.g.padding.0)?;
        let pad1 = (self.g.dilation.1 * (self.s - 1)).checked_sub(self.g.padding.1)?;
        let g = ConvGeometry { stride: (1, 1), padding: (pad0, pad1), dilation: self.g.dilation };
        let t = Conv::new(self.n, self.p, self.q, self.k, self.c, self.r, self.s, &g).ok()?;
        ((t.p, t.q) == (self.h, self.w)).then_some(t)
    }
}

/// Rows of one im2col tile: about 1 MiB of f32, at least 32 rows, at most 512. A function of
/// the shapes only, so the work split never depends on the thread count.
fn tile_rows(kdim: usize, budget: usize) -> usize {
    (budget / kdim.max(1)).clamp(32, 512)
}

/// Rows of a forward tile: [`tile_rows`], but at least 256 (each GEMM call packs the whole
/// filter, R·S·C × K values: with 32-row tiles of a 3×3 convolution of 1024 channels the packing
/// costs as much as the multiplication), at most a quarter of the output pixels (rounded up to
/// 16) so that small images still give every core work, and at least 64.
fn forward_rows(m: usize, kdim: usize) -> usize {
    tile_rows(kdim, 1 << 18).max(256).min(m.div_ceil(4).next_multiple_of(16)).max(64)
}

/// `y[M, K] = col · Wᵀ` for convolution `cv` of `x` with the KRSC filter `w`, tile by tile;
/// `epilogue(row0, tile)` runs on each tile of rows right after its GEMM, while it is in cache.
pub(crate) fn forward_into(
    cv: &Conv,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    epilogue: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let (k, kdim) = (cv.k, cv.kdim());
    let rows = forward_rows(cv.m(), kdim);
    let wt = Mat::transposed(w, k, kdim);
    y.par_chunks_mut(rows * k).enumerate().for_each_init(Vec::new, |col, (t, out)| {
        let (row0, nrows) = (t * rows, out.len() / k);
        let a = if cv.pointwise() {
            Mat::row_major(&x[row0 * kdim..(row0 + nrows) * kdim], nrows, kdim)
        } else {
            col.resize(nrows * kdim, 0.0);
            cv.im2col(x, row0, 0, kdim, &mut col[..nrows * kdim]);
            Mat::row_major(&col[..nrows * kdim], nrows, kdim)
        };
        gemm(a, wt, out);
        epilogue(row0, out);
    });
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

/// The checked problem of a forward convolution of `x` with `w`, and both operands' values.
pub(crate) fn forward_problem<'a>(
    x: &'a CpuTensor,
    w: &'a CpuTensor,
    geometry: &ConvGeometry,
) -> Result<(Conv, &'a [f32], &'a [f32])> {
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
    Ok((Conv::new(n, h, wd, c, k, r, s, geometry)?, xv, wv))
}

impl Conv {
    /// The output's NHWC shape.
    pub(crate) fn out_shape(&self) -> Vec<usize> {
        vec![self.n, self.p, self.q, self.k]
    }
}

pub(crate) fn conv2d(
    x: &CpuTensor,
    w: &CpuTensor,
    bias: Option<&CpuTensor>,
    geometry: &ConvGeometry,
) -> Result<CpuTensor> {
    let (cv, xv, wv) = forward_problem(x, w, geometry)?;
    let k = cv.k;
    let bv = match bias {
        Some(b) => {
            let v = f32_of("convolution bias", b)?;
            shape_is("convolution bias", b, &[k])?;
            Some(v)
        }
        None => None,
    };
    let mut y = vec![0.0f32; cv.m() * k];
    forward_into(&cv, xv, wv, &mut y, &|_, out| {
        if let Some(b) = bv {
            for row in out.chunks_exact_mut(k) {
                row.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
            }
        }
    });
    Ok(CpuTensor::float(cv.out_shape(), y, x.dtype()))
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
    if cv.pointwise() {
        // dx rows are dcol rows: dx = dy · W, tile by tile.
        let mut dx = vec![0.0f32; n * h * wd * c];
        let rows = tile_rows(kdim, 1 << 18);
        dx.par_chunks_mut(rows * c).enumerate().for_each(|(t, out)| {
            let nrows = out.len() / c;
            gemm(Mat::row_major(&dyv[t * rows * k..(t * rows + nrows) * k], nrows, k), wm, out);
        });
        return Ok(CpuTensor::float(vec![n, h, wd, c], dx, dy.dtype()));
    }
    if let Some(tc) = cv.transposed() {
        // W'[c, r', s', k] = W[k, R−1−r', S−1−s', c].
        let mut wt = vec![0.0f32; k * r * s * c];
        for (ci, row) in wt.chunks_exact_mut(r * s * k).enumerate() {
            for (t, taps) in row.chunks_exact_mut(k).enumerate() {
                let src = r * s - 1 - t;
                taps.iter_mut().enumerate().for_each(|(ki, o)| *o = wv[(ki * r * s + src) * c + ci]);
            }
        }
        let mut dx = vec![0.0f32; n * h * wd * c];
        forward_into(&tc, dyv, &wt, &mut dx, &|_, _| {});
        return Ok(CpuTensor::float(vec![n, h, wd, c], dx, dy.dtype()));
    }
    // Per sample: dcol = dy_n · W (tiles in parallel), then every input pixel gathers its
    // taps from dcol in (r, s) order (rows of the image in parallel).
    let mut dx = vec![0.0f32; n * h * wd * c];
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

/// Output pixels per filter-gradient tile (the GEMM's inner dimension).
const FILTER_ROWS: usize = 256;
/// im2col columns per filter-gradient block.
const FILTER_COLS: usize = 256;
/// f32 elements of the partials held at once (16 MiB): tiles are summed in groups this bounds.
const FILTER_PARTIALS: usize = 1 << 22;

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
    // dWᵀ [kdim, K] = colᵀ · dy: blocks (tile of FILTER_ROWS pixels, FILTER_COLS columns),
    // each one GEMM into its own partial; a group of tiles at a time, summed in tile order.
    let tiles = m.div_ceil(FILTER_ROWS);
    let blocks = kdim.div_ceil(FILTER_COLS);
    let group = (FILTER_PARTIALS / (kdim * k)).clamp(1, tiles);
    let mut acc = vec![0.0f64; kdim * k];
    let mut parts: Vec<Vec<f32>> = Vec::new();
    for g0 in (0..tiles).step_by(group) {
        let gn = group.min(tiles - g0);
        parts.resize_with(gn * blocks, Vec::new);
        parts[..gn * blocks].par_iter_mut().enumerate().for_each_init(Vec::new, |col, (i, part)| {
            let (tile, jb) = (g0 + i / blocks, i % blocks);
            let (row0, j0) = (tile * FILTER_ROWS, jb * FILTER_COLS);
            let (nrows, jn) = (FILTER_ROWS.min(m - row0), FILTER_COLS.min(kdim - j0));
            // Columns j0 .. j0 + jn of the tile, transposed: jn × nrows.
            let a = if cv.pointwise() {
                Mat { data: &xv[row0 * kdim + j0..], rows: jn, cols: nrows, rs: 1, cs: kdim }
            } else {
                col.resize(nrows * jn, 0.0);
                cv.im2col(xv, row0, j0, jn, &mut col[..nrows * jn]);
                Mat { data: &col[..nrows * jn], rows: jn, cols: nrows, rs: 1, cs: jn }
            };
            part.resize(jn * k, 0.0);
            gemm(a, Mat::row_major(&dyv[row0 * k..(row0 + nrows) * k], nrows, k), part);
        });
        // Column blocks own disjoint rows of the sum; within one, tiles are added in order.
        acc.par_chunks_mut(FILTER_COLS * k).enumerate().for_each(|(jb, acc)| {
            for t in 0..gn {
                acc.iter_mut().zip(&parts[t * blocks + jb]).for_each(|(s, &v)| *s += v as f64);
            }
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
