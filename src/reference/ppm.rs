//! CPU reference for PSPNet's pyramid pooling module (PPM) with dataset-specific BatchNorm,
//! composed from the other references of this module and nothing else.
//!
//! For an input `x` `[N, H, W, C]` and bins `b_1, …, b_L`, branch `i` is
//!
//! `up_i = resize_bilinear(relu?(DSBN_i(conv1x1(adaptive_avg_pool(x, b_i × b_i), w_i))), H × W)`
//!
//! with `w_i` `[K_i, 1, 1, C]` (no bias) shared by every dataset and `DSBN_i` normalising each
//! sample with its own dataset's statistics and γ, β; the output is the channel concatenation
//! `[x, up_1, …, up_L]`, `[N, H, W, C + Σ K_i]`. The backward is the chain rule through the same
//! references: the identity slice of `dy` goes straight to `dx`, each branch's slice through the
//! resize, DSBN, convolution and pooling backwards, and `dx` is the sum of the `L + 1` parts.
//!
//! Errors are those of the DSBN reference ([`ReferenceError`]); a 1×1 bin gives every sample one
//! value per channel, so a training batch in which some dataset has a single sample fails with
//! [`ReferenceError::TooFewValues`], as PyTorch's `BatchNorm2d` does.

use ndarray::{s, Array2, Array4, ArrayView4};

use super::conv::{conv2d, conv2d_backward, ConvSpec};
use super::dsbn::{
    dsbn_backward_train, dsbn_forward_infer, dsbn_forward_train, DsbnConfig, DsbnTrainOutput, ReferenceError,
};
use super::pool::{adaptive_avg_pool2d, adaptive_avg_pool2d_backward, resize_bilinear, resize_bilinear_backward};

/// Hyper-parameters of a PPM.
#[derive(Clone, Debug)]
pub struct PpmConfig {
    /// Output size `b × b` of each branch's adaptive pooling, in output channel order.
    pub bins: Vec<usize>,
    /// `align_corners` of the bilinear upsampling back to the input size.
    pub align_corners: bool,
    /// The branches' DSBN (its `relu` is the branch's ReLU).
    pub dsbn: DsbnConfig,
}

/// One branch's parameters.
#[derive(Clone, Debug)]
pub struct PpmBranch {
    /// 1×1 convolution weight, `[K, 1, 1, C]`.
    pub weight: Array4<f64>,
    /// DSBN scale, `[D, K]`.
    pub gamma: Array2<f64>,
    /// DSBN shift, `[D, K]`.
    pub beta: Array2<f64>,
    /// Running mean, `[D, K]`.
    pub running_mean: Array2<f64>,
    /// Running variance, `[D, K]`.
    pub running_var: Array2<f64>,
}

/// What one branch's training forward computed.
#[derive(Clone, Debug)]
pub struct PpmBranchTrain {
    /// The pooled input, `[N, b, b, C]`.
    pub pooled: Array4<f64>,
    /// The convolution output, `[N, b, b, K]`.
    pub conv: Array4<f64>,
    /// The DSBN forward on `conv` (its `y` is the branch's low-resolution output; its running
    /// statistics are the branch's updated ones).
    pub bn: DsbnTrainOutput,
}

/// Everything a training forward produces.
#[derive(Clone, Debug)]
pub struct PpmTrainOutput {
    /// `[N, H, W, C + Σ K_i]`.
    pub y: Array4<f64>,
    /// Per branch, in bin order.
    pub branches: Vec<PpmBranchTrain>,
}

/// One branch's parameter gradients.
#[derive(Clone, Debug)]
pub struct PpmBranchGrads {
    /// `[K, 1, 1, C]`.
    pub dweight: Array4<f64>,
    /// `[D, K]`.
    pub dgamma: Array2<f64>,
    /// `[D, K]`.
    pub dbeta: Array2<f64>,
}

/// Gradients of a PPM.
#[derive(Clone, Debug)]
pub struct PpmGrads {
    /// `[N, H, W, C]`.
    pub dx: Array4<f64>,
    /// Per branch, in bin order.
    pub branches: Vec<PpmBranchGrads>,
}

fn check(x: &ArrayView4<f64>, branches: &[PpmBranch], cfg: &PpmConfig) -> Result<usize, ReferenceError> {
    if branches.len() != cfg.bins.len() || branches.is_empty() {
        return Err(ReferenceError::Shape(format!("{} branches for {} bins", branches.len(), cfg.bins.len())));
    }
    if let Some(b) = cfg.bins.iter().find(|&&b| b == 0) {
        return Err(ReferenceError::Shape(format!("bin {b}: every bin must be at least 1")));
    }
    let c = x.dim().3;
    let mut total = c;
    for (i, br) in branches.iter().enumerate() {
        let (k, r, s, wc) = br.weight.dim();
        if (r, s, wc) != (1, 1, c) {
            return Err(ReferenceError::Shape(format!(
                "branch {i}: weight {:?}, expected [K, 1, 1, {c}]",
                br.weight.shape()
            )));
        }
        total += k;
    }
    Ok(total)
}

/// The branch's output channels `offset .. offset + K` of the concatenation.
fn offsets(c: usize, branches: &[PpmBranch]) -> Vec<usize> {
    let mut off = c;
    branches
        .iter()
        .map(|br| {
            let o = off;
            off += br.weight.dim().0;
            o
        })
        .collect()
}

/// Training forward (batch statistics; running statistics updated per branch).
pub fn ppm_forward_train(
    x: ArrayView4<f64>,
    datasets: &[usize],
    branches: &[PpmBranch],
    cfg: &PpmConfig,
) -> Result<PpmTrainOutput, ReferenceError> {
    let total = check(&x, branches, cfg)?;
    let (n, h, w, c) = x.dim();
    let mut y = Array4::zeros((n, h, w, total));
    y.slice_mut(s![.., .., .., ..c]).assign(&x);
    let mut out = Vec::with_capacity(branches.len());
    for ((br, &b), off) in branches.iter().zip(&cfg.bins).zip(offsets(c, branches)) {
        let pooled = adaptive_avg_pool2d(x, b, b);
        let conv = conv2d(pooled.view(), br.weight.view(), None, &ConvSpec::default());
        let bn = dsbn_forward_train(
            conv.view(),
            datasets,
            br.gamma.view(),
            br.beta.view(),
            br.running_mean.view(),
            br.running_var.view(),
            &cfg.dsbn,
        )?;
        let up = resize_bilinear(bn.y.view(), h, w, cfg.align_corners);
        y.slice_mut(s![.., .., .., off..off + up.dim().3]).assign(&up);
        out.push(PpmBranchTrain { pooled, conv, bn });
    }
    Ok(PpmTrainOutput { y, branches: out })
}

/// Inference forward (running statistics; nothing updated).
pub fn ppm_forward_infer(
    x: ArrayView4<f64>,
    datasets: &[usize],
    branches: &[PpmBranch],
    cfg: &PpmConfig,
) -> Result<Array4<f64>, ReferenceError> {
    let total = check(&x, branches, cfg)?;
    let (n, h, w, c) = x.dim();
    let mut y = Array4::zeros((n, h, w, total));
    y.slice_mut(s![.., .., .., ..c]).assign(&x);
    for ((br, &b), off) in branches.iter().zip(&cfg.bins).zip(offsets(c, branches)) {
        let pooled = adaptive_avg_pool2d(x, b, b);
        let conv = conv2d(pooled.view(), br.weight.view(), None, &ConvSpec::default());
        let bn = dsbn_forward_infer(
            conv.view(),
            datasets,
            br.gamma.view(),
            br.beta.view(),
            br.running_mean.view(),
            br.running_var.view(),
            &cfg.dsbn,
        )?;
        let up = resize_bilinear(bn.view(), h, w, cfg.align_corners);
        y.slice_mut(s![.., .., .., off..off + up.dim().3]).assign(&up);
    }
    Ok(y)
}

/// Backward of [`ppm_forward_train`] for the output gradient `dy` `[N, H, W, C + Σ K_i]`
/// (the forward is recomputed from `x`).
pub fn ppm_backward_train(
    dy: ArrayView4<f64>,
    x: ArrayView4<f64>,
    datasets: &[usize],
    branches: &[PpmBranch],
    cfg: &PpmConfig,
) -> Result<PpmGrads, ReferenceError> {
    let total = check(&x, branches, cfg)?;
    let (n, h, w, c) = x.dim();
    if dy.dim() != (n, h, w, total) {
        return Err(ReferenceError::Shape(format!("dy {:?}, expected [{n}, {h}, {w}, {total}]", dy.shape())));
    }
    let fwd = ppm_forward_train(x, datasets, branches, cfg)?;
    let mut dx = dy.slice(s![.., .., .., ..c]).to_owned();
    let mut grads = Vec::with_capacity(branches.len());
    for (((br, &b), off), f) in branches.iter().zip(&cfg.bins).zip(offsets(c, branches)).zip(&fwd.branches) {
        let k = br.weight.dim().0;
        let dup = dy.slice(s![.., .., .., off..off + k]);
        let dbn_out = resize_bilinear_backward(dup, b, b, cfg.align_corners);
        let bn =
            dsbn_backward_train(dbn_out.view(), f.conv.view(), datasets, br.gamma.view(), br.beta.view(), &cfg.dsbn)?;
        let cg = conv2d_backward(bn.dx.view(), f.pooled.view(), br.weight.view(), &ConvSpec::default());
        dx += &adaptive_avg_pool2d_backward(cg.dx.view(), h, w);
        grads.push(PpmBranchGrads { dweight: cg.dw, dgamma: bn.dgamma, dbeta: bn.dbeta });
    }
    Ok(PpmGrads { dx, branches: grads })
}
