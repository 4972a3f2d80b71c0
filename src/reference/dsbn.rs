//! CPU reference for dataset-specific batch normalisation (DSBN).
//!
//! DSBN is `BatchNorm2d` with one set of parameters and running statistics per dataset: every
//! sample of a batch carries a dataset index `d`, and it is normalised with the batch statistics
//! (training) or the running statistics (inference) of its own dataset, then scaled and shifted
//! with `gamma[d, ·]` and `beta[d, ·]`. Within one dataset the semantics are exactly those of
//! PyTorch's `BatchNorm2d` (biased variance for normalisation, unbiased variance for the running
//! variance update, `running = (1 - momentum) * running + momentum * batch`), optionally followed
//! by a ReLU.
//!
//! Layout: activations are NHWC, `[N, H, W, C]`; parameters and running statistics are
//! `[D, C]`; `datasets` has one entry per sample. Statistics of dataset `d` and channel `c` are
//! taken over all `(n, h, w)` with `datasets[n] == d`, i.e. over `M_d = n_d * H * W` values.
//!
//! Everything is computed in `f64` with plain loops, directly from the definitions (two-pass
//! mean / variance, no Welford, no fused formulas). This module is the oracle the GPU kernels are
//! tested against, so it favours being obviously right over being fast.
//!
//! NaN handling: NaNs in the inputs propagate into the outputs; the ReLU passes NaN through (as
//! PyTorch's does), and in the backward pass an output that is NaN or `<= 0` blocks the gradient.

use std::fmt;

use ndarray::{Array2, Array4, ArrayView2, ArrayView4};

/// Errors reported by the reference implementations.
#[derive(Debug, Clone, PartialEq)]
pub enum ReferenceError {
    /// Array shapes are inconsistent with each other; the message says which.
    Shape(String),
    /// `datasets[sample] == index`, but there are only `num_datasets` datasets (rows of `gamma`).
    DatasetOutOfRange {
        /// Position of the offending sample in the batch.
        sample: usize,
        /// The dataset index found for that sample.
        index: usize,
        /// Number of datasets `D` (the number of parameter rows).
        num_datasets: usize,
    },
    /// In training mode, a dataset present in the batch has fewer than two values per channel
    /// (`count = n_d * H * W < 2`), so its unbiased variance is undefined. PyTorch raises
    /// "Expected more than 1 value per channel when training" in that case.
    TooFewValues {
        /// The dataset with too few values.
        dataset: usize,
        /// The number of values per channel it has in the batch (`n_d * H * W`).
        count: usize,
    },
}

impl fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReferenceError::Shape(msg) => write!(f, "shape mismatch: {msg}"),
            ReferenceError::DatasetOutOfRange { sample, index, num_datasets } => {
                write!(f, "sample {sample} has dataset index {index}, but there are only {num_datasets} datasets")
            }
            ReferenceError::TooFewValues { dataset, count } => {
                write!(f, "expected more than 1 value per channel when training, but dataset {dataset} has {count}")
            }
        }
    }
}

impl std::error::Error for ReferenceError {}

/// Hyper-parameters of a DSBN layer.
#[derive(Clone, Copy, Debug)]
pub struct DsbnConfig {
    /// Added to the variance before taking the square root.
    pub eps: f64,
    /// Weight of the batch statistic in the running-statistics update
    /// (`running = (1 - momentum) * running + momentum * batch`).
    pub momentum: f64,
    /// Apply a ReLU (`max(0, y)`) after the affine transform.
    pub relu: bool,
}

impl Default for DsbnConfig {
    /// PyTorch's defaults: `eps = 1e-5`, `momentum = 0.1`, and no ReLU.
    fn default() -> Self {
        DsbnConfig { eps: 1e-5, momentum: 0.1, relu: false }
    }
}

/// Everything the training forward pass produces.
#[derive(Clone, Debug)]
pub struct DsbnTrainOutput {
    /// Normalised (and optionally ReLU'd) output, `[N, H, W, C]`.
    pub y: Array4<f64>,
    /// Batch mean per dataset and channel, `[D, C]`; 0 for datasets absent from the batch.
    pub mean: Array2<f64>,
    /// Biased batch variance (divided by `M_d`), `[D, C]`; 0 for absent datasets.
    pub var: Array2<f64>,
    /// `1 / sqrt(var + eps)`, `[D, C]`; 0 for absent datasets.
    pub invstd: Array2<f64>,
    /// Updated running mean, `[D, C]`; rows of absent datasets are copied unchanged.
    pub running_mean: Array2<f64>,
    /// Updated running variance (updated with the unbiased batch variance), `[D, C]`; rows of
    /// absent datasets are copied unchanged.
    pub running_var: Array2<f64>,
    /// `M_d = n_d * H * W`, the number of values per channel of dataset `d` in the batch
    /// (0 if absent). Length `D`.
    pub counts: Vec<usize>,
}

/// Gradients of a scalar loss with respect to the inputs of a DSBN forward pass.
#[derive(Clone, Debug)]
pub struct DsbnGrads {
    /// Gradient with respect to the input `x`, `[N, H, W, C]`.
    pub dx: Array4<f64>,
    /// Gradient with respect to `gamma`, `[D, C]`; 0 for datasets absent from the batch.
    pub dgamma: Array2<f64>,
    /// Gradient with respect to `beta`, `[D, C]`; 0 for datasets absent from the batch.
    pub dbeta: Array2<f64>,
}

/// Sizes of one call: batch `n`, height `h`, width `w`, channels `c`, datasets `d`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    d: usize,
}

/// Checks that every `[D, C]` array in `params` has the shape of the first one, that its channel
/// count matches `x`, that `datasets` has one entry per sample and that every entry is `< D`.
fn check_inputs(
    x: &ArrayView4<f64>,
    datasets: &[usize],
    params: &[(&str, &ArrayView2<f64>)],
) -> Result<Dims, ReferenceError> {
    let (n, h, w, c) = x.dim();
    let d = params[0].1.nrows();
    for (name, p) in params {
        if p.dim() != (d, c) {
            return Err(ReferenceError::Shape(format!(
                "{name} has shape {:?}, expected [D, C] = [{d}, {c}] (D from {}, C from x)",
                p.shape(),
                params[0].0
            )));
        }
    }
    if datasets.len() != n {
        return Err(ReferenceError::Shape(format!(
            "datasets has {} entries, but x has N = {n} samples",
            datasets.len()
        )));
    }
    for (sample, &index) in datasets.iter().enumerate() {
        if index >= d {
            return Err(ReferenceError::DatasetOutOfRange { sample, index, num_datasets: d });
        }
    }
    Ok(Dims { n, h, w, c, d })
}

/// Checks that the output gradient `dy` has the shape of `x`.
fn check_same_shape(dy: &ArrayView4<f64>, x: &ArrayView4<f64>) -> Result<(), ReferenceError> {
    if dy.dim() != x.dim() {
        return Err(ReferenceError::Shape(format!("dy has shape {:?}, but x has shape {:?}", dy.shape(), x.shape())));
    }
    Ok(())
}

/// ReLU that propagates NaN, like PyTorch's.
fn relu(v: f64) -> f64 {
    if v.is_nan() || v > 0.0 {
        v
    } else {
        0.0
    }
}

/// Batch statistics of every dataset present in the batch.
struct BatchStats {
    mean: Array2<f64>,
    var: Array2<f64>,
    invstd: Array2<f64>,
    counts: Vec<usize>,
}

/// Computes per-(dataset, channel) mean, biased variance and `1/sqrt(var + eps)` from the
/// definition, in two passes. Absent datasets get zeros. Fails with `TooFewValues` for the first
/// (lowest-index) present dataset with fewer than two values per channel.
fn batch_stats(x: &ArrayView4<f64>, datasets: &[usize], dims: Dims, eps: f64) -> Result<BatchStats, ReferenceError> {
    let Dims { n, h, w, c, d } = dims;

    let mut samples = vec![0usize; d];
    for &ds in datasets {
        samples[ds] += 1;
    }
    let mut counts = vec![0usize; d];
    for ds in 0..d {
        counts[ds] = samples[ds] * h * w;
        if samples[ds] > 0 && counts[ds] < 2 {
            return Err(ReferenceError::TooFewValues { dataset: ds, count: counts[ds] });
        }
    }

    // First pass: mean = (1/M_d) * sum of x over the dataset's samples and all pixels.
    let mut sum = Array2::<f64>::zeros((d, c));
    for ni in 0..n {
        let ds = datasets[ni];
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    sum[[ds, ci]] += x[[ni, hi, wi, ci]];
                }
            }
        }
    }
    let mut mean = Array2::<f64>::zeros((d, c));
    for ds in 0..d {
        if counts[ds] == 0 {
            continue;
        }
        for ci in 0..c {
            mean[[ds, ci]] = sum[[ds, ci]] / counts[ds] as f64;
        }
    }

    // Second pass: biased variance = (1/M_d) * sum of (x - mean)^2.
    let mut sq = Array2::<f64>::zeros((d, c));
    for ni in 0..n {
        let ds = datasets[ni];
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    let dev = x[[ni, hi, wi, ci]] - mean[[ds, ci]];
                    sq[[ds, ci]] += dev * dev;
                }
            }
        }
    }
    let mut var = Array2::<f64>::zeros((d, c));
    let mut invstd = Array2::<f64>::zeros((d, c));
    for ds in 0..d {
        if counts[ds] == 0 {
            continue;
        }
        for ci in 0..c {
            var[[ds, ci]] = sq[[ds, ci]] / counts[ds] as f64;
            invstd[[ds, ci]] = 1.0 / (var[[ds, ci]] + eps).sqrt();
        }
    }

    Ok(BatchStats { mean, var, invstd, counts })
}

/// Training-mode forward pass.
///
/// For every dataset `d` present in the batch and every channel `c`, computes the batch mean and
/// biased variance over the `M_d = n_d * H * W` values of that dataset and channel, and outputs
/// `y = (x - mean) * invstd * gamma[d, c] + beta[d, c]` (then `max(0, y)` if `cfg.relu`), where
/// `invstd = 1 / sqrt(var + eps)` and `d` is the sample's own dataset.
///
/// Running statistics are updated only for present datasets:
/// `running_mean = (1 - momentum) * running_mean + momentum * mean` and
/// `running_var = (1 - momentum) * running_var + momentum * var * M_d / (M_d - 1)`.
///
/// Errors: [`ReferenceError::Shape`] if `gamma`, `beta`, `running_mean`, `running_var` are not all
/// `[D, C]` with `C` the channel count of `x`, or `datasets.len() != N`;
/// [`ReferenceError::DatasetOutOfRange`] if some `datasets[n] >= D`;
/// [`ReferenceError::TooFewValues`] if a present dataset has `M_d < 2`.
pub fn dsbn_forward_train(
    x: ArrayView4<f64>,
    datasets: &[usize],
    gamma: ArrayView2<f64>,
    beta: ArrayView2<f64>,
    running_mean: ArrayView2<f64>,
    running_var: ArrayView2<f64>,
    cfg: &DsbnConfig,
) -> Result<DsbnTrainOutput, ReferenceError> {
    let dims = check_inputs(
        &x,
        datasets,
        &[("gamma", &gamma), ("beta", &beta), ("running_mean", &running_mean), ("running_var", &running_var)],
    )?;
    let Dims { n, h, w, c, d } = dims;
    let stats = batch_stats(&x, datasets, dims, cfg.eps)?;

    let mut y = Array4::<f64>::zeros((n, h, w, c));
    for ni in 0..n {
        let ds = datasets[ni];
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    let xhat = (x[[ni, hi, wi, ci]] - stats.mean[[ds, ci]]) * stats.invstd[[ds, ci]];
                    let v = xhat * gamma[[ds, ci]] + beta[[ds, ci]];
                    y[[ni, hi, wi, ci]] = if cfg.relu { relu(v) } else { v };
                }
            }
        }
    }

    let mut new_mean = running_mean.to_owned();
    let mut new_var = running_var.to_owned();
    for ds in 0..d {
        let m = stats.counts[ds];
        if m == 0 {
            continue; // absent: running statistics stay exactly as they were
        }
        for ci in 0..c {
            let unbiased = stats.var[[ds, ci]] * m as f64 / (m - 1) as f64;
            new_mean[[ds, ci]] = (1.0 - cfg.momentum) * running_mean[[ds, ci]] + cfg.momentum * stats.mean[[ds, ci]];
            new_var[[ds, ci]] = (1.0 - cfg.momentum) * running_var[[ds, ci]] + cfg.momentum * unbiased;
        }
    }

    Ok(DsbnTrainOutput {
        y,
        mean: stats.mean,
        var: stats.var,
        invstd: stats.invstd,
        running_mean: new_mean,
        running_var: new_var,
        counts: stats.counts,
    })
}

/// Inference-mode forward pass:
/// `y = (x - running_mean[d, c]) / sqrt(running_var[d, c] + eps) * gamma[d, c] + beta[d, c]`,
/// then `max(0, y)` if `cfg.relu`, with `d` the sample's dataset. No statistics are computed and
/// any number of samples per dataset (including one) is fine. `cfg.momentum` is not used.
///
/// Errors: [`ReferenceError::Shape`] and [`ReferenceError::DatasetOutOfRange`], as for
/// [`dsbn_forward_train`].
pub fn dsbn_forward_infer(
    x: ArrayView4<f64>,
    datasets: &[usize],
    gamma: ArrayView2<f64>,
    beta: ArrayView2<f64>,
    running_mean: ArrayView2<f64>,
    running_var: ArrayView2<f64>,
    cfg: &DsbnConfig,
) -> Result<Array4<f64>, ReferenceError> {
    let Dims { n, h, w, c, .. } = check_inputs(
        &x,
        datasets,
        &[("gamma", &gamma), ("beta", &beta), ("running_mean", &running_mean), ("running_var", &running_var)],
    )?;

    let mut y = Array4::<f64>::zeros((n, h, w, c));
    for ni in 0..n {
        let ds = datasets[ni];
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    let xhat =
                        (x[[ni, hi, wi, ci]] - running_mean[[ds, ci]]) / (running_var[[ds, ci]] + cfg.eps).sqrt();
                    let v = xhat * gamma[[ds, ci]] + beta[[ds, ci]];
                    y[[ni, hi, wi, ci]] = if cfg.relu { relu(v) } else { v };
                }
            }
        }
    }
    Ok(y)
}

/// Backward pass of [`dsbn_forward_train`] (batch statistics, recomputed here from `x`).
///
/// Given `dy = dL/dy`, returns `dL/dx`, `dL/dgamma` and `dL/dbeta`. With `cfg.relu`, the
/// gradient only flows where the forward output (before clamping) is `> 0`. The running
/// statistics do not influence `y` in training mode, so they are not inputs here.
///
/// Derivation, for one (dataset, channel) group of `M` values `x_i`, with `g_i` the gradient
/// reaching the affine output (`dy_i`, masked by the ReLU), `s = invstd = (var + eps)^(-1/2)`,
/// `xhat_i = (x_i - mean) * s` and `y_i = gamma * xhat_i + beta`:
///
/// * `dL/dbeta = sum_i g_i`, `dL/dgamma = sum_i g_i * xhat_i`.
/// * `d mean / d x_i = 1/M`; `d var / d x_i = 2 (x_i - mean) / M` (the term through `mean`
///   vanishes because `sum_j (x_j - mean) = 0`); `d s / d var = -s^3 / 2`.
/// * Hence `d xhat_j / d x_i = s (delta_ij - 1/M) - (x_j - mean) * s^3 (x_i - mean) / M
///   = s (delta_ij - 1/M - xhat_i xhat_j / M)`.
/// * `dL/dx_i = sum_j gamma g_j d xhat_j / d x_i
///   = gamma s / M * (M g_i - sum_j g_j - xhat_i sum_j g_j xhat_j)
///   = gamma s / M * (M g_i - dbeta - xhat_i dgamma)`.
///
/// Samples of different datasets never share statistics, so groups are independent. Datasets
/// absent from the batch get `dgamma = dbeta = 0`.
///
/// Errors: as [`dsbn_forward_train`] (including [`ReferenceError::TooFewValues`], since the
/// forward pass is undefined then), plus [`ReferenceError::Shape`] if `dy` and `x` differ in
/// shape.
pub fn dsbn_backward_train(
    dy: ArrayView4<f64>,
    x: ArrayView4<f64>,
    datasets: &[usize],
    gamma: ArrayView2<f64>,
    beta: ArrayView2<f64>,
    cfg: &DsbnConfig,
) -> Result<DsbnGrads, ReferenceError> {
    let dims = check_inputs(&x, datasets, &[("gamma", &gamma), ("beta", &beta)])?;
    check_same_shape(&dy, &x)?;
    let Dims { n, h, w, c, d } = dims;
    let stats = batch_stats(&x, datasets, dims, cfg.eps)?;

    // xhat and the gradient g reaching the affine output (dy masked by the ReLU), and the sums
    // dbeta = sum g, dgamma = sum g * xhat per (dataset, channel).
    let mut xhat = Array4::<f64>::zeros((n, h, w, c));
    let mut g = Array4::<f64>::zeros((n, h, w, c));
    let mut dgamma = Array2::<f64>::zeros((d, c));
    let mut dbeta = Array2::<f64>::zeros((d, c));
    for ni in 0..n {
        let ds = datasets[ni];
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    // Same expression, in the same order, as the forward pass, so the ReLU
                    // mask is bit-for-bit the forward one.
                    let xh = (x[[ni, hi, wi, ci]] - stats.mean[[ds, ci]]) * stats.invstd[[ds, ci]];
                    let v = xh * gamma[[ds, ci]] + beta[[ds, ci]];
                    let passes = !cfg.relu || v > 0.0;
                    let gi = if passes { dy[[ni, hi, wi, ci]] } else { 0.0 };
                    xhat[[ni, hi, wi, ci]] = xh;
                    g[[ni, hi, wi, ci]] = gi;
                    dbeta[[ds, ci]] += gi;
                    dgamma[[ds, ci]] += gi * xh;
                }
            }
        }
    }

    let mut dx = Array4::<f64>::zeros((n, h, w, c));
    for ni in 0..n {
        let ds = datasets[ni];
        let m = stats.counts[ds] as f64;
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    let scale = gamma[[ds, ci]] * stats.invstd[[ds, ci]] / m;
                    dx[[ni, hi, wi, ci]] =
                        scale * (m * g[[ni, hi, wi, ci]] - dbeta[[ds, ci]] - xhat[[ni, hi, wi, ci]] * dgamma[[ds, ci]]);
                }
            }
        }
    }

    Ok(DsbnGrads { dx, dgamma, dbeta })
}

/// Backward pass of [`dsbn_forward_infer`] (frozen running statistics).
///
/// With `g = dy` (masked by `y > 0` if `cfg.relu`), `s = 1 / sqrt(running_var + eps)` and
/// `xhat = (x - running_mean) * s`, the statistics are constants, so `y = gamma * xhat + beta`
/// is affine in `x`: `dx = g * gamma * s`, `dgamma = sum g * xhat`, `dbeta = sum g`, the sums
/// running over all samples of the dataset and all pixels. Absent datasets get zeros.
///
/// Errors: [`ReferenceError::Shape`] and [`ReferenceError::DatasetOutOfRange`], as for
/// [`dsbn_forward_infer`], plus [`ReferenceError::Shape`] if `dy` and `x` differ in shape.
#[allow(clippy::too_many_arguments)]
pub fn dsbn_backward_infer(
    dy: ArrayView4<f64>,
    x: ArrayView4<f64>,
    datasets: &[usize],
    gamma: ArrayView2<f64>,
    beta: ArrayView2<f64>,
    running_mean: ArrayView2<f64>,
    running_var: ArrayView2<f64>,
    cfg: &DsbnConfig,
) -> Result<DsbnGrads, ReferenceError> {
    let Dims { n, h, w, c, d } = check_inputs(
        &x,
        datasets,
        &[("gamma", &gamma), ("beta", &beta), ("running_mean", &running_mean), ("running_var", &running_var)],
    )?;
    check_same_shape(&dy, &x)?;

    let mut dx = Array4::<f64>::zeros((n, h, w, c));
    let mut dgamma = Array2::<f64>::zeros((d, c));
    let mut dbeta = Array2::<f64>::zeros((d, c));
    for ni in 0..n {
        let ds = datasets[ni];
        for hi in 0..h {
            for wi in 0..w {
                for ci in 0..c {
                    let std = (running_var[[ds, ci]] + cfg.eps).sqrt();
                    // Same expression, in the same order, as the forward pass.
                    let xh = (x[[ni, hi, wi, ci]] - running_mean[[ds, ci]]) / std;
                    let v = xh * gamma[[ds, ci]] + beta[[ds, ci]];
                    let passes = !cfg.relu || v > 0.0;
                    let gi = if passes { dy[[ni, hi, wi, ci]] } else { 0.0 };
                    dx[[ni, hi, wi, ci]] = gi * gamma[[ds, ci]] / std;
                    dgamma[[ds, ci]] += gi * xh;
                    dbeta[[ds, ci]] += gi;
                }
            }
        }
    }

    Ok(DsbnGrads { dx, dgamma, dbeta })
}
