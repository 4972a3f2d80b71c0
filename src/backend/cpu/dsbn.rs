//! Dataset-specific BatchNorm on the CPU backend: statistics in f64 in two passes (mean, then
//! the sum of squared deviations) from per-(sample, pixel chunk) partials merged in order; the
//! output normalises with the saved f32 mean and f32 1/std — exactly what the backward sees,
//! and the backward recomputes the ReLU mask with the forward's expression, so the two agree on
//! every mask bit. Outputs are rounded once to the input's storage type.

use rayon::prelude::*;

use super::check::{
    dataset_indices, f32_of, float_as, float_of, i32_of, nhwc, per_pixel_chunk, relu, same_dtype, shape_is,
};
use super::tensor::{CpuBn, CpuBnSaved, CpuTensor};
use crate::backend::{BnGrads, StatsReduce};
use crate::error::{Error, Result};
use crate::ops::check::finite_positive;
use crate::ops::dsbn::DsbnOptions;
use crate::tensor::DType;

/// Validated sizes of one DSBN call.
pub(crate) struct BnDims {
    pub(crate) n: usize,
    pub(crate) hw: usize,
    pub(crate) c: usize,
    pub(crate) d: usize,
}

/// As `ops::dsbn::check_common`.
pub(crate) fn check_bn(x: &CpuTensor, datasets: &CpuTensor, bn: &CpuBn, opts: &DsbnOptions) -> Result<BnDims> {
    let [n, h, w, c] = nhwc("DSBN input", x)?;
    float_of("DSBN input", x)?;
    i32_of("dataset indices", datasets)?;
    shape_is("dataset indices", datasets, &[n])?;
    let gs = bn.gamma.shape();
    let d = gs.first().copied().unwrap_or(0);
    if gs.len() != 2 || d == 0 {
        return Err(Error::InvalidShape {
            what: "DSBN gamma",
            shape: gs.to_vec(),
            reason: "expected [num_datasets, channels]".into(),
        });
    }
    for (what, t) in [
        ("DSBN gamma", &bn.gamma),
        ("DSBN beta", &bn.beta),
        ("DSBN running_mean", &bn.running_mean),
        ("DSBN running_var", &bn.running_var),
    ] {
        same_dtype(what, t, DType::F32)?;
        shape_is(what, t, &[d, c])?;
    }
    finite_positive("eps", opts.eps)?;
    if !(opts.momentum.is_finite() && (0.0..=1.0).contains(&opts.momentum)) {
        return Err(Error::InvalidArgument(format!("momentum must be in [0, 1], got {}", opts.momentum)));
    }
    Ok(BnDims { n, hw: h * w, c, d })
}

pub(crate) fn check_residual<'a>(residual: Option<&'a CpuTensor>, x: &CpuTensor) -> Result<Option<&'a [f32]>> {
    residual
        .map(|r| {
            let v = float_as("DSBN residual", r, x.dtype())?;
            shape_is("DSBN residual", r, x.shape())?;
            Ok(v)
        })
        .transpose()
}

/// The normalised-and-affine value, the one expression the forward output and the backward's
/// ReLU mask both use (so they agree bit for bit): `(x − mean)·invstd·γ + β` in f64.
fn affine(x: f32, mean: f32, invstd: f64, gamma: f32, beta: f32) -> f64 {
    (x as f64 - mean as f64) * invstd * gamma as f64 + beta as f64
}

/// `relu?(affine(..) + residual)` of every element, or the mask-carrying pre-activation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_apply(
    x: &[f32],
    residual: Option<&[f32]>,
    ds: &[usize],
    g: &BnDims,
    mean: &[f32],
    invstd: &[f64],
    gamma: &[f32],
    beta: &[f32],
    relu_on: bool,
) -> Vec<f32> {
    let (hw, c) = (g.hw, g.c);
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(c).enumerate().for_each(|(pix, out)| {
        let d = ds[pix / hw];
        let base = pix * c;
        for ci in 0..c {
            let s = d * c + ci;
            let mut v = affine(x[base + ci], mean[s], invstd[s], gamma[s], beta[s]);
            if let Some(r) = residual {
                v += r[base + ci] as f64;
            }
            out[ci] = (if relu_on { relu(v) } else { v }) as f32;
        }
    });
    y
}

/// PyTorch's initial tables: γ = 1, β = 0, μ = 0, σ² = 1.
pub(crate) fn bn_new(num_datasets: usize, channels: usize) -> Result<CpuBn> {
    if num_datasets == 0 || channels == 0 || num_datasets.saturating_mul(channels) > i32::MAX as usize {
        return Err(Error::InvalidShape {
            what: "DSBN state",
            shape: vec![num_datasets, channels],
            reason: "needs at least one dataset and one channel, and D*C < 2^31".into(),
        });
    }
    let (shape, len) = (vec![num_datasets, channels], num_datasets * channels);
    Ok(CpuBn {
        gamma: CpuTensor::f32_unchecked(shape.clone(), vec![1.0; len]),
        beta: CpuTensor::f32_unchecked(shape.clone(), vec![0.0; len]),
        running_mean: CpuTensor::f32_unchecked(shape.clone(), vec![0.0; len]),
        running_var: CpuTensor::f32_unchecked(shape, vec![1.0; len]),
    })
}

/// Batch statistics of a training forward, before anything moves.
pub(crate) struct BatchStats {
    pub(crate) dims: BnDims,
    pub(crate) counts: Vec<usize>,
    pub(crate) mean: Vec<f64>,
    pub(crate) var: Vec<f64>,
    /// The f32 mean and 1/std the output and the backward use.
    pub(crate) saved: CpuBnSaved,
}

impl BatchStats {
    /// The statistics from per-(dataset, channel) mean and biased variance (f64) and
    /// per-dataset counts: the f32 mean and 1/std saved exactly as [`batch_statistics`] saves
    /// them (zero for a dataset with no values).
    pub(crate) fn from_moments(dims: BnDims, counts: Vec<usize>, mean: Vec<f64>, var: Vec<f64>, eps: f32) -> Self {
        let (c, d) = (dims.c, dims.d);
        let present = |i: usize| counts[i / c] > 0;
        let eps = eps as f64;
        let mean32: Vec<f32> = (0..d * c).map(|i| if present(i) { mean[i] as f32 } else { 0.0 }).collect();
        let invstd32: Vec<f32> =
            (0..d * c).map(|i| if present(i) { (1.0 / (var[i] + eps).sqrt()) as f32 } else { 0.0 }).collect();
        let saved = CpuBnSaved {
            mean: CpuTensor::f32_unchecked(vec![d, c], mean32),
            invstd: CpuTensor::f32_unchecked(vec![d, c], invstd32),
        };
        BatchStats { dims, counts, mean, var, saved }
    }
}

/// Per (dataset, channel) mean and biased variance of `x` over the samples of each dataset
/// (f64, two passes from ordered partials); the datasets present need at least two values.
/// Nothing is written.
pub(crate) fn batch_statistics(
    x: &CpuTensor,
    datasets: &CpuTensor,
    bn: &CpuBn,
    opts: &DsbnOptions,
) -> Result<BatchStats> {
    let g = check_bn(x, datasets, bn, opts)?;
    let ds = dataset_indices(i32_of("dataset indices", datasets)?, g.d)?;
    let (hw, c, d) = (g.hw, g.c, g.d);
    let mut samples = vec![0usize; d];
    ds.iter().for_each(|&di| samples[di] += 1);
    let counts: Vec<usize> = samples.iter().map(|&s| s * hw).collect();
    if let Some(di) = (0..d).find(|&di| samples[di] > 0 && counts[di] < 2) {
        return Err(Error::TooFewValues { dataset: di, count: counts[di] });
    }
    let xv = float_of("DSBN input", x)?;
    let channel_sums = |center: Option<&[f64]>| {
        let parts = per_pixel_chunk(g.n, hw, |ni, pix| {
            let mut sum = vec![0.0f64; c];
            let off = ds[ni] * c;
            for px in xv[(ni * hw + pix.start) * c..(ni * hw + pix.end) * c].chunks_exact(c) {
                match center {
                    None => sum.iter_mut().zip(px).for_each(|(s, &v)| *s += v as f64),
                    Some(mu) => sum.iter_mut().zip(px).zip(&mu[off..off + c]).for_each(|((s, &v), &m)| {
                        let dev = v as f64 - m;
                        *s += dev * dev;
                    }),
                }
            }
            sum
        });
        let mut total = vec![0.0f64; d * c];
        for (ni, part) in &parts {
            let off = ds[*ni] * c;
            total[off..off + c].iter_mut().zip(part).for_each(|(t, &v)| *t += v);
        }
        total
    };
    let per_count = |v: Vec<f64>| -> Vec<f64> {
        v.iter().enumerate().map(|(i, &s)| if counts[i / c] > 0 { s / counts[i / c] as f64 } else { 0.0 }).collect()
    };
    let mean = per_count(channel_sums(None));
    let var = per_count(channel_sums(Some(&mean)));
    let eps = opts.eps as f64;
    let present = |i: usize| counts[i / c] > 0;
    let mean32: Vec<f32> = (0..d * c).map(|i| if present(i) { mean[i] as f32 } else { 0.0 }).collect();
    let invstd32: Vec<f32> =
        (0..d * c).map(|i| if present(i) { (1.0 / (var[i] + eps).sqrt()) as f32 } else { 0.0 }).collect();
    let saved = CpuBnSaved {
        mean: CpuTensor::f32_unchecked(vec![d, c], mean32),
        invstd: CpuTensor::f32_unchecked(vec![d, c], invstd32),
    };
    Ok(BatchStats { dims: g, counts, mean, var, saved })
}

/// Moves the running statistics of the datasets present by `momentum` (unbiased variance).
pub(crate) fn move_running(bn: &mut CpuBn, stats: &BatchStats, opts: &DsbnOptions) -> Result<()> {
    let (c, d) = (stats.dims.c, stats.dims.d);
    let present = |i: usize| stats.counts[i / c] > 0;
    let mom = opts.momentum as f64;
    let rm = bn.running_mean.as_f32_mut().ok_or(Error::InvalidArgument("running mean is not f32".into()))?;
    for i in (0..d * c).filter(|&i| present(i)) {
        rm[i] = ((1.0 - mom) * rm[i] as f64 + mom * stats.mean[i]) as f32;
    }
    let rv = bn.running_var.as_f32_mut().ok_or(Error::InvalidArgument("running var is not f32".into()))?;
    for i in (0..d * c).filter(|&i| present(i)) {
        let m = stats.counts[i / c] as f64;
        rv[i] = ((1.0 - mom) * rv[i] as f64 + mom * stats.var[i] * m / (m - 1.0)) as f32;
    }
    Ok(())
}

/// `relu?((x − mean)·invstd·γ + β + residual)` with saved statistics, rounded to x's storage.
pub(crate) fn apply_saved(
    x: &CpuTensor,
    residual: Option<&CpuTensor>,
    datasets: &CpuTensor,
    bn: &CpuBn,
    saved: &CpuBnSaved,
    relu_on: bool,
) -> Result<CpuTensor> {
    let g = check_bn(x, datasets, bn, &DsbnOptions::default())?;
    let res = check_residual(residual, x)?;
    let ds = dataset_indices(i32_of("dataset indices", datasets)?, g.d)?;
    for (what, t) in [("DSBN saved mean", &saved.mean), ("DSBN saved invstd", &saved.invstd)] {
        same_dtype(what, t, DType::F32)?;
        shape_is(what, t, &[g.d, g.c])?;
    }
    let xv = float_of("DSBN input", x)?;
    let mean = f32_of("DSBN saved mean", &saved.mean)?;
    let invstd: Vec<f64> = f32_of("DSBN saved invstd", &saved.invstd)?.iter().map(|&v| v as f64).collect();
    let gamma = f32_of("DSBN gamma", &bn.gamma)?;
    let beta = f32_of("DSBN beta", &bn.beta)?;
    let y = bn_apply(xv, res, &ds, &g, mean, &invstd, gamma, beta, relu_on);
    Ok(CpuTensor::float(x.shape().to_vec(), y, x.dtype()))
}

/// Training forward: statistics, output, then (nothing can fail any more) the running
/// statistics move.
pub(crate) fn forward_train(
    x: &CpuTensor,
    datasets: &CpuTensor,
    bn: &mut CpuBn,
    opts: &DsbnOptions,
    residual: Option<&CpuTensor>,
) -> Result<(CpuTensor, CpuBnSaved)> {
    check_bn(x, datasets, bn, opts)?;
    check_residual(residual, x)?;
    let stats = batch_statistics(x, datasets, bn, opts)?;
    let y = apply_saved(x, residual, datasets, bn, &stats.saved, opts.relu)?;
    move_running(bn, &stats, opts)?;
    Ok((y, stats.saved))
}

/// Inference forward with the running statistics.
pub(crate) fn forward_infer(
    x: &CpuTensor,
    datasets: &CpuTensor,
    bn: &CpuBn,
    opts: &DsbnOptions,
    residual: Option<&CpuTensor>,
) -> Result<CpuTensor> {
    let g = check_bn(x, datasets, bn, opts)?;
    let res = check_residual(residual, x)?;
    let ds = dataset_indices(i32_of("dataset indices", datasets)?, g.d)?;
    let xv = float_of("DSBN input", x)?;
    let rm = f32_of("DSBN running_mean", &bn.running_mean)?;
    let rv = f32_of("DSBN running_var", &bn.running_var)?;
    let invstd: Vec<f64> = rv.iter().map(|&v| 1.0 / (v as f64 + opts.eps as f64).sqrt()).collect();
    let gamma = f32_of("DSBN gamma", &bn.gamma)?;
    let beta = f32_of("DSBN beta", &bn.beta)?;
    let y = bn_apply(xv, res, &ds, &g, rm, &invstd, gamma, beta, opts.relu);
    Ok(CpuTensor::float(x.shape().to_vec(), y, x.dtype()))
}

/// `g = dy` behind the ReLU mask of `affine(x) + residual > 0` (recomputed with the forward's
/// expression); `dβ = Σg`, `dγ = Σg·x̂` per (dataset, channel) in f64 from ordered
/// partials; `dx = γ·invstd·(g − dβ/M − x̂·dγ/M)`; `dresidual = g`.
pub(crate) fn backward_train(
    dy: &CpuTensor,
    x: &CpuTensor,
    residual: Option<&CpuTensor>,
    datasets: &CpuTensor,
    bn: &CpuBn,
    saved: &CpuBnSaved,
    opts: &DsbnOptions,
) -> Result<BnGrads<CpuTensor>> {
    backward_with(dy, x, residual, datasets, bn, saved, opts, None)
}

/// [`backward_train`], or with `reduce` its synchronised form: the sums and counts of `dx`'s
/// formula are the group's (`dsbn_sync::reduce_backward`), `dγ` and `dβ` this rank's own.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_with(
    dy: &CpuTensor,
    x: &CpuTensor,
    residual: Option<&CpuTensor>,
    datasets: &CpuTensor,
    bn: &CpuBn,
    saved: &CpuBnSaved,
    opts: &DsbnOptions,
    reduce: Option<&mut StatsReduce<'_, CpuTensor>>,
) -> Result<BnGrads<CpuTensor>> {
    let g = check_bn(x, datasets, bn, opts)?;
    let dyv = float_as("DSBN output gradient", dy, x.dtype())?;
    shape_is("DSBN output gradient", dy, x.shape())?;
    for (what, t) in [("DSBN saved mean", &saved.mean), ("DSBN saved invstd", &saved.invstd)] {
        same_dtype(what, t, DType::F32)?;
        shape_is(what, t, &[g.d, g.c])?;
    }
    let res = check_residual(residual, x)?;
    let ds = dataset_indices(i32_of("dataset indices", datasets)?, g.d)?;
    let (hw, c, d) = (g.hw, g.c, g.d);
    let xv = float_of("DSBN input", x)?;
    let mean = f32_of("DSBN saved mean", &saved.mean)?;
    let invstd: Vec<f64> = f32_of("DSBN saved invstd", &saved.invstd)?.iter().map(|&v| v as f64).collect();
    let gamma = f32_of("DSBN gamma", &bn.gamma)?;
    let beta = f32_of("DSBN beta", &bn.beta)?;
    let masked = |e: usize, s: usize| -> f64 {
        let gv = dyv[e] as f64;
        if !opts.relu {
            return gv;
        }
        let mut v = affine(xv[e], mean[s], invstd[s], gamma[s], beta[s]);
        if let Some(r) = res {
            v += r[e] as f64;
        }
        if v > 0.0 {
            gv
        } else {
            0.0
        }
    };
    let xhat = |e: usize, s: usize| (xv[e] as f64 - mean[s] as f64) * invstd[s];

    let parts = per_pixel_chunk(g.n, hw, |ni, pix| {
        let mut sums = vec![0.0f64; 2 * c];
        let off = ds[ni] * c;
        for p in pix {
            let e0 = (ni * hw + p) * c;
            for ci in 0..c {
                let gv = masked(e0 + ci, off + ci);
                sums[ci] += gv;
                sums[c + ci] += gv * xhat(e0 + ci, off + ci);
            }
        }
        sums
    });
    let mut dbeta = vec![0.0f64; d * c];
    let mut dgamma = vec![0.0f64; d * c];
    for (ni, part) in &parts {
        let off = ds[*ni] * c;
        for ci in 0..c {
            dbeta[off + ci] += part[ci];
            dgamma[off + ci] += part[c + ci];
        }
    }
    let mut samples = vec![0usize; d];
    ds.iter().for_each(|&di| samples[di] += 1);
    let counts: Vec<usize> = samples.iter().map(|&s| s * hw).collect();
    let group = match reduce {
        Some(reduce) => Some(super::dsbn_sync::reduce_backward(&dbeta, &dgamma, &counts, reduce)?),
        None => None,
    };
    let (sum_beta, sum_gamma, counts) = match &group {
        Some((b, g, m)) => (b, g, m),
        None => (&dbeta, &dgamma, &counts),
    };

    let mut dx = vec![0.0f32; xv.len()];
    let mut dres = res.map(|_| vec![0.0f32; xv.len()]);
    let write = |pix: usize, out: &mut [f32], dr: Option<&mut [f32]>| {
        let di = ds[pix / hw];
        let m = counts[di] as f64;
        let mut dr = dr;
        for ci in 0..c {
            let (e, s) = (pix * c + ci, di * c + ci);
            let gv = masked(e, s);
            if let Some(dr) = dr.as_deref_mut() {
                dr[ci] = gv as f32;
            }
            let k = gamma[s] as f64 * invstd[s];
            out[ci] = (k * (gv - sum_beta[s] / m - xhat(e, s) * sum_gamma[s] / m)) as f32;
        }
    };
    match dres.as_mut() {
        Some(dr) => dx
            .par_chunks_mut(c)
            .zip(dr.par_chunks_mut(c))
            .enumerate()
            .for_each(|(pix, (out, dr))| write(pix, out, Some(dr))),
        None => dx.par_chunks_mut(c).enumerate().for_each(|(pix, out)| write(pix, out, None)),
    }
    let table = |v: Vec<f64>| CpuTensor::f32_unchecked(vec![d, c], v.into_iter().map(|x| x as f32).collect());
    Ok(BnGrads {
        dx: CpuTensor::float(x.shape().to_vec(), dx, x.dtype()),
        dgamma: table(dgamma),
        dbeta: table(dbeta),
        dresidual: dres.map(|v| CpuTensor::float(x.shape().to_vec(), v, x.dtype())),
    })
}
