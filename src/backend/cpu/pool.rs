//! Pooling and resizing on the CPU backend: max pooling with indices, adaptive average pooling
//! and bilinear resize (PyTorch's bins and taps, [`crate::resample`]), forward and backward.
//! Sums run in f64 in a fixed order; outputs are rounded once to the input's storage type.

use rayon::prelude::*;

use super::check::{float_of, i32_of, nhwc, shape_is};
use super::tensor::{numel_of, CpuTensor};
use crate::error::{Error, Result};
use crate::ops::maxpool::PoolGeometry;
use crate::ops::pool::MAX_RESIZE_DIM;
use crate::resample::{bilinear_taps, pool_bin};

pub(crate) fn max_pool2d(x: &CpuTensor, geometry: &PoolGeometry) -> Result<(CpuTensor, CpuTensor)> {
    let [n, h, w, c] = nhwc("max pooling input", x)?;
    let xv = float_of("max pooling input", x)?;
    let (p, q) = geometry.output_size(h, w)?;
    if h.checked_mul(w).is_none_or(|hw| hw > i32::MAX as usize) {
        return Err(Error::InvalidShape {
            what: "max pooling input",
            shape: vec![n, h, w, c],
            reason: "H·W must fit the i32 indices".into(),
        });
    }
    // The in-image rows (columns) of every window: padding never takes part (PyTorch's −∞).
    let window = |o: usize, k: usize, stride: usize, pad: usize, len: usize| -> Vec<usize> {
        (0..k).filter_map(|t| (o * stride + t).checked_sub(pad)).filter(|&v| v < len).collect()
    };
    let g = *geometry;
    let hs: Vec<Vec<usize>> = (0..p).map(|pi| window(pi, g.kernel.0, g.stride.0, g.padding.0, h)).collect();
    let ws: Vec<Vec<usize>> = (0..q).map(|qi| window(qi, g.kernel.1, g.stride.1, g.padding.1, w)).collect();
    let mut y = vec![0.0f32; n * p * q * c];
    let mut idx = vec![0i32; n * p * q * c];
    y.par_chunks_mut(q * c).zip(idx.par_chunks_mut(q * c)).enumerate().for_each(|(row, (yr, ir))| {
        let (ni, pi) = (row / p, row % p);
        let plane = &xv[ni * h * w * c..(ni + 1) * h * w * c];
        for (qi, (yo, io)) in yr.chunks_exact_mut(c).zip(ir.chunks_exact_mut(c)).enumerate() {
            let mut first = true;
            for &hh in &hs[pi] {
                for &ww in &ws[qi] {
                    let at = hh * w + ww;
                    let src = &plane[at * c..(at + 1) * c];
                    for ci in 0..c {
                        let (v, b) = (src[ci], yo[ci]);
                        // The first position starts the window; then NaN wins (a later NaN
                        // replaces an earlier one), otherwise only a strictly larger value.
                        if first || v.is_nan() || (!b.is_nan() && v > b) {
                            yo[ci] = v;
                            io[ci] = at as i32;
                        }
                    }
                    first = false;
                }
            }
        }
    });
    let shape = vec![n, p, q, c];
    Ok((CpuTensor::float(shape.clone(), y, x.dtype()), CpuTensor::i32_unchecked(shape, idx)))
}

/// Scatter of every output gradient to its argmax, in (p, q) order per sample (samples in
/// parallel). An index outside its output's window sends its gradient nowhere, as the
/// device kernel does.
pub(crate) fn max_pool2d_backward(
    dy: &CpuTensor,
    indices: &CpuTensor,
    input_hw: (usize, usize),
    geometry: &PoolGeometry,
) -> Result<CpuTensor> {
    let [n, p, q, c] = nhwc("max pooling output gradient", dy)?;
    let dyv = float_of("max pooling output gradient", dy)?;
    let iv = i32_of("max pooling indices", indices)?;
    shape_is("max pooling indices", indices, dy.shape())?;
    let (h, w) = input_hw;
    input_hw_check("max pooling input", n, input_hw, c)?;
    if h.checked_mul(w).is_none_or(|hw| hw > i32::MAX as usize) {
        return Err(Error::InvalidShape {
            what: "max pooling input",
            shape: vec![n, h, w, c],
            reason: "H·W must fit the i32 indices".into(),
        });
    }
    let (ep, eq) = geometry.output_size(h, w)?;
    if (ep, eq) != (p, q) {
        return Err(Error::ShapeMismatch {
            what: "max pooling output gradient",
            expected: vec![n, ep, eq, c],
            got: dy.shape().to_vec(),
        });
    }
    // The window of output (pp, qq) on one axis, in padded coordinates shifted back.
    let inside = |o: usize, at: usize, k: usize, s: usize, pad: usize| {
        let start = o * s;
        (start..start + k).contains(&(at + pad))
    };
    let g = geometry;
    let mut dx = vec![0.0f32; n * h * w * c];
    dx.par_chunks_mut(h * w * c).enumerate().for_each(|(ni, plane)| {
        let base = ni * p * q * c;
        for e in 0..p * q * c {
            let (at, ci, pix) = (iv[base + e], e % c, e / c);
            let Ok(at) = usize::try_from(at) else { continue };
            let (hh, ww) = (at / w, at % w);
            if hh < h
                && inside(pix / q, hh, g.kernel.0, g.stride.0, g.padding.0)
                && inside(pix % q, ww, g.kernel.1, g.stride.1, g.padding.1)
            {
                plane[at * c + ci] += dyv[base + e];
            }
        }
    });
    Ok(CpuTensor::float(vec![n, h, w, c], dx, dy.dtype()))
}

pub(crate) fn adaptive_avg_pool(x: &CpuTensor, out_h: usize, out_w: usize) -> Result<CpuTensor> {
    let [n, h, w, c] = nhwc("adaptive_avg_pool input", x)?;
    let xv = float_of("adaptive_avg_pool input", x)?;
    new_output_check("adaptive_avg_pool output", n, out_h, out_w, c)?;
    let hb: Vec<(usize, usize)> = (0..out_h).map(|i| pool_bin(i, h, out_h)).collect();
    let wb: Vec<(usize, usize)> = (0..out_w).map(|j| pool_bin(j, w, out_w)).collect();
    let mut y = vec![0.0f32; n * out_h * out_w * c];
    y.par_chunks_mut(out_w * c).enumerate().for_each(|(row, yr)| {
        let (ni, i) = (row / out_h, row % out_h);
        let (h0, h1) = hb[i];
        let mut sum = vec![0.0f64; c];
        for (j, yo) in yr.chunks_exact_mut(c).enumerate() {
            let (w0, w1) = wb[j];
            sum.fill(0.0);
            for hi in h0..h1 {
                for wi in w0..w1 {
                    let at = ((ni * h + hi) * w + wi) * c;
                    sum.iter_mut().zip(&xv[at..at + c]).for_each(|(s, &v)| *s += v as f64);
                }
            }
            let area = ((h1 - h0) * (w1 - w0)) as f64;
            yo.iter_mut().zip(&sum).for_each(|(o, &s)| *o = (s / area) as f32);
        }
    });
    Ok(CpuTensor::float(vec![n, out_h, out_w, c], y, x.dtype()))
}

/// Gather form: every input pixel sums, in (bin row, bin column) order and in f64, the
/// gradients of the bins that cover it divided by their areas.
pub(crate) fn adaptive_avg_pool_backward(dy: &CpuTensor, input_hw: (usize, usize)) -> Result<CpuTensor> {
    let [n, oh, ow, c] = nhwc("adaptive_avg_pool output gradient", dy)?;
    let dyv = float_of("adaptive_avg_pool output gradient", dy)?;
    input_hw_check("adaptive_avg_pool input gradient", n, input_hw, c)?;
    let (h, w) = input_hw;
    let area = |i: usize, j: usize| {
        let ((h0, h1), (w0, w1)) = (pool_bin(i, h, oh), pool_bin(j, w, ow));
        ((h1 - h0) * (w1 - w0)) as f64
    };
    let covers = |inp: usize, out: usize| -> Vec<Vec<usize>> {
        let mut v = vec![Vec::new(); inp];
        for o in 0..out {
            let (a, b) = pool_bin(o, inp, out);
            (a..b).for_each(|i| v[i].push(o));
        }
        v
    };
    let (hc, wc) = (covers(h, oh), covers(w, ow));
    let mut dx = vec![0.0f32; n * h * w * c];
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, xr)| {
        let (ni, hi) = (row / h, row % h);
        let mut sum = vec![0.0f64; c];
        for (wi, xo) in xr.chunks_exact_mut(c).enumerate() {
            sum.fill(0.0);
            for &i in &hc[hi] {
                for &j in &wc[wi] {
                    let a = area(i, j);
                    let at = ((ni * oh + i) * ow + j) * c;
                    sum.iter_mut().zip(&dyv[at..at + c]).for_each(|(s, &g)| *s += g as f64 / a);
                }
            }
            xo.iter_mut().zip(&sum).for_each(|(o, &s)| *o = s as f32);
        }
    });
    Ok(CpuTensor::float(vec![n, h, w, c], dx, dy.dtype()))
}

pub(crate) fn resize_bilinear(x: &CpuTensor, out_h: usize, out_w: usize, align_corners: bool) -> Result<CpuTensor> {
    let [n, h, w, c] = nhwc("resize_bilinear input", x)?;
    let xv = float_of("resize_bilinear input", x)?;
    new_output_check("resize_bilinear output", n, out_h, out_w, c)?;
    resize_limit("resize_bilinear input", [n, h, w, c], out_h, out_w)?;
    let th: Vec<[(usize, f64); 2]> = (0..out_h).map(|i| bilinear_taps(i, h, out_h, align_corners)).collect();
    let tw: Vec<[(usize, f64); 2]> = (0..out_w).map(|j| bilinear_taps(j, w, out_w, align_corners)).collect();
    let mut y = vec![0.0f32; n * out_h * out_w * c];
    y.par_chunks_mut(out_w * c).enumerate().for_each(|(row, yr)| {
        let (ni, i) = (row / out_h, row % out_h);
        for (j, yo) in yr.chunks_exact_mut(c).enumerate() {
            for (ci, o) in yo.iter_mut().enumerate() {
                let mut v = 0.0f64;
                for &(hi, wh) in &th[i] {
                    for &(wi, ww) in &tw[j] {
                        v += wh * ww * xv[((ni * h + hi) * w + wi) * c + ci] as f64;
                    }
                }
                *o = v as f32;
            }
        }
    });
    Ok(CpuTensor::float(vec![n, out_h, out_w, c], y, x.dtype()))
}

/// Gather form: every input pixel sums, in f64 and a fixed order, the output gradients of
/// the taps that read it, times their weights.
pub(crate) fn resize_bilinear_backward(
    dy: &CpuTensor,
    input_hw: (usize, usize),
    align_corners: bool,
) -> Result<CpuTensor> {
    let [n, oh, ow, c] = nhwc("resize_bilinear output gradient", dy)?;
    let dyv = float_of("resize_bilinear output gradient", dy)?;
    input_hw_check("resize_bilinear input gradient", n, input_hw, c)?;
    let (h, w) = input_hw;
    resize_limit("resize_bilinear input gradient", [n, h, w, c], oh, ow)?;
    let readers = |inp: usize, out: usize| -> Vec<Vec<(usize, f64)>> {
        let mut v = vec![Vec::new(); inp];
        for o in 0..out {
            for (i, wgt) in bilinear_taps(o, inp, out, align_corners) {
                v[i].push((o, wgt));
            }
        }
        v
    };
    let (hr, wr) = (readers(h, oh), readers(w, ow));
    let mut dx = vec![0.0f32; n * h * w * c];
    dx.par_chunks_mut(w * c).enumerate().for_each(|(row, xr)| {
        let (ni, hi) = (row / h, row % h);
        let mut sum = vec![0.0f64; c];
        for (wi, xo) in xr.chunks_exact_mut(c).enumerate() {
            sum.fill(0.0);
            for &(i, wh) in &hr[hi] {
                for &(j, ww) in &wr[wi] {
                    let at = ((ni * oh + i) * ow + j) * c;
                    sum.iter_mut().zip(&dyv[at..at + c]).for_each(|(s, &g)| *s += wh * ww * g as f64);
                }
            }
            xo.iter_mut().zip(&sum).for_each(|(o, &s)| *o = s as f32);
        }
    });
    Ok(CpuTensor::float(vec![n, h, w, c], dx, dy.dtype()))
}

/// The input gradient of a pyramid of adaptive average poolings of one input next to an
/// identity branch: `dx = dy[.., .., .., 0..C] + Σ_l pool_backward(levels[l])`, as the device's
/// `ppm_pool_bwd` computes it: each level's contribution to an element is that level's pooling
/// backward (here: an f64 sum rounded to f32), added to an f32 accumulator in level order, and
/// the sum is rounded once to the storage type. In f32 storage that is the composition of
/// [`adaptive_avg_pool_backward`] and f32 adds, bit for bit.
pub(crate) fn pool_backward_sum(dy: &CpuTensor, levels: &[&CpuTensor], c: usize) -> Result<CpuTensor> {
    let [n, h, w, total] = nhwc("pyramid pooling base gradient", dy)?;
    let dyv = float_of("pyramid pooling base gradient", dy)?;
    if c == 0 || c > total {
        return Err(Error::InvalidShape {
            what: "pyramid pooling input gradient",
            shape: vec![n, h, w, c],
            reason: format!("expected 1 <= C <= {total} (the base gradient's channels)"),
        });
    }
    let mut acc: Vec<f32> = dyv.par_chunks(total).flat_map_iter(|px| px[..c].iter().copied()).collect();
    for l in levels {
        let [ln, oh, ow, lc] = nhwc("pyramid pooling level gradient", l)?;
        let lv = float_of("pyramid pooling level gradient", l)?;
        if (ln, lc) != (n, c) {
            return Err(Error::ShapeMismatch {
                what: "pyramid pooling level gradient",
                expected: vec![n, oh, ow, c],
                got: l.shape().to_vec(),
            });
        }
        let covers = |inp: usize, out: usize| -> Vec<Vec<usize>> {
            let mut v = vec![Vec::new(); inp];
            for o in 0..out {
                let (a, b) = pool_bin(o, inp, out);
                (a..b).for_each(|i| v[i].push(o));
            }
            v
        };
        let (hc, wc) = (covers(h, oh), covers(w, ow));
        let area = |i: usize, j: usize| {
            let ((h0, h1), (w0, w1)) = (pool_bin(i, h, oh), pool_bin(j, w, ow));
            ((h1 - h0) * (w1 - w0)) as f64
        };
        acc.par_chunks_mut(w * c).enumerate().for_each(|(row, xr)| {
            let (ni, hi) = (row / h, row % h);
            let mut sum = vec![0.0f64; c];
            for (wi, xo) in xr.chunks_exact_mut(c).enumerate() {
                sum.fill(0.0);
                for &i in &hc[hi] {
                    for &j in &wc[wi] {
                        let a = area(i, j);
                        let at = ((ni * oh + i) * ow + j) * c;
                        sum.iter_mut().zip(&lv[at..at + c]).for_each(|(s, &g)| *s += g as f64 / a);
                    }
                }
                xo.iter_mut().zip(&sum).for_each(|(o, &s)| *o += s as f32);
            }
        });
    }
    Ok(CpuTensor::float(vec![n, h, w, c], acc, dy.dtype()))
}

/// A spatial size a backward was asked to produce (or an output size): `[n, h, w, c]` with
/// every dimension in 1..=i32::MAX and an element count that fits 64-bit indexing.
pub(crate) fn input_hw_check(what: &'static str, n: usize, (h, w): (usize, usize), c: usize) -> Result<()> {
    let numel = numel_of(&[n, h, w, c]).ok();
    if h == 0
        || w == 0
        || h > i32::MAX as usize
        || w > i32::MAX as usize
        || numel.is_none_or(|e| e > i64::MAX as usize / 8)
    {
        return Err(Error::InvalidShape {
            what,
            shape: vec![n, h, w, c],
            reason: "every dimension must be in 1..=i32::MAX, and the element count fit in 64-bit indexing".into(),
        });
    }
    Ok(())
}

pub(crate) fn new_output_check(what: &'static str, n: usize, out_h: usize, out_w: usize, c: usize) -> Result<()> {
    if out_h == 0 || out_w == 0 {
        return Err(Error::InvalidShape {
            what,
            shape: vec![n, out_h, out_w, c],
            reason: "every dimension must be at least 1".into(),
        });
    }
    input_hw_check(what, n, (out_h, out_w), c)
}

pub(crate) fn resize_limit(what: &'static str, [n, h, w, c]: [usize; 4], oh: usize, ow: usize) -> Result<()> {
    if [h, w, oh, ow].iter().any(|&d| d > MAX_RESIZE_DIM) {
        return Err(Error::InvalidShape {
            what,
            shape: vec![n, h, w, c, oh, ow],
            reason: format!("bilinear resize supports spatial sizes up to {MAX_RESIZE_DIM} (f32 source indices)"),
        });
    }
    Ok(())
}
