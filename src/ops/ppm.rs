//! PSPNet's pyramid pooling module (PPM), dataset-aware: for each bin `b` of a list (PSPNet's
//! 1, 2, 3, 6 by default), adaptive average pooling of the input to `b × b`, a Dataset-Aware
//! Block (1×1 convolution shared by all datasets, no bias → DSBN with each sample's dataset
//! slice → ReLU) and a bilinear upsampling back to the input size; the output is the channel
//! concatenation `[x, branch_1, …, branch_L]`, `[N, H, W, C + Σ K_i]`, NHWC.
//!
//! The op is a composition of the crate's kernels, with no concatenation pass: the input is
//! copied into channels `0..C` of the output by the pooling kernel at the input's own size (a
//! bin of one pixel: an exact copy, except that −0.0 becomes +0.0), and each branch's upsampling
//! writes its channel slice directly ([`pool::resize_bilinear_into`]). The backward reads each
//! branch's slice of `dy` in place ([`pool::resize_bilinear_backward`]); `dx` — the identity
//! slice of `dy` plus the pooling backward of every branch, summed in bin order — is produced
//! by one gather kernel that reads each source once and writes `dx` once
//! ([`pool::adaptive_avg_pool_backward_sum`]). Every step is deterministic, so the whole op
//! gives the same bits on every run.
//!
//! Semantics follow the common PyTorch PSPNet code (`align_corners=True` by default, an
//! option); the DSBN follows [`crate::ops::dsbn`]. A 1×1 bin leaves each sample one value per
//! channel, so a training batch in which a dataset has a single sample cannot have batch
//! statistics there: [`forward_train`] returns [`Error::TooFewValues`] (PyTorch's `BatchNorm2d`
//! raises as well). [`forward_infer`] has no such limit.
//!
//! **Nothing is written on error.** Every shape, dtype, device and option is checked before the
//! first launch. Bad data on the device (a dataset index out of range, too few values) is found
//! by the first branch's DSBN statistics pass before it moves any running statistic; the
//! training forward runs the branches in increasing bin size, and a dataset that has more than
//! one value per channel at the smallest bin has more at every larger one, so no later branch
//! can fail on data after an earlier one moved its statistics.
//!
//! Storage: f32, f16 or bf16 for the forwards and the backward (DSBN tables and their
//! gradients f32). Reference: [`crate::reference::ppm`].

use crate::error::{Error, Result};
use crate::ops::check;
use crate::ops::conv::ConvGeometry;
use crate::ops::dab::{self, DabForward, DabOptions};
use crate::ops::dsbn::{DsbnOptions, DsbnState};
use crate::ops::pool;
use crate::tensor::{DType, Tensor};

/// Options of the PPM.
#[derive(Debug, Clone, PartialEq)]
pub struct PpmOptions {
    /// Pooled size `b × b` of each branch, in output channel order (PSPNet: 1, 2, 3, 6).
    pub bins: Vec<usize>,
    /// `align_corners` of the bilinear upsampling (the common PSPNet code uses `true`).
    pub align_corners: bool,
    /// The branches' DSBN: eps, momentum, and `relu` (the branch's ReLU, `true` in PSPNet).
    pub dsbn: DsbnOptions,
}

impl Default for PpmOptions {
    fn default() -> Self {
        PpmOptions {
            bins: vec![1, 2, 3, 6],
            align_corners: true,
            dsbn: DsbnOptions { relu: true, ..DsbnOptions::default() },
        }
    }
}

/// One branch's parameters: the 1×1 convolution weight `[K, 1, 1, C]` (the input's dtype) and the
/// DSBN state (`[D, K]` f32 tables).
#[derive(Debug)]
pub struct PpmBranch {
    /// `[K, 1, 1, C]`, KRSC.
    pub weight: Tensor,
    /// γ, β and running statistics per (dataset, channel).
    pub state: DsbnState,
}

impl PpmBranch {
    /// A branch with `weight` `[K, 1, 1, C]` and PyTorch's initial DSBN state for
    /// `num_datasets` datasets.
    pub fn new(weight: Tensor, num_datasets: usize) -> Result<Self> {
        let k = weight.shape().first().copied().unwrap_or(0);
        let state = DsbnState::new(weight.device(), num_datasets, k)?;
        Ok(PpmBranch { weight, state })
    }

    /// Output channels K of the branch.
    pub fn channels(&self) -> usize {
        self.weight.shape().first().copied().unwrap_or(0)
    }

    /// The branch as the training forward takes it.
    pub fn view_mut(&mut self) -> PpmBranchMut<'_> {
        PpmBranchMut { weight: &self.weight, state: &mut self.state }
    }

    /// The branch as the inference forward and the backward take it.
    pub fn view(&self) -> PpmBranchRef<'_> {
        PpmBranchRef { weight: &self.weight, state: &self.state }
    }
}

/// A branch's parameters, borrowed for a training forward (the running statistics move): the
/// weight and the DSBN state may live apart (a model's parameter store holds them).
#[derive(Debug)]
pub struct PpmBranchMut<'a> {
    /// `[K, 1, 1, C]`, KRSC.
    pub weight: &'a Tensor,
    /// γ, β and running statistics per (dataset, channel).
    pub state: &'a mut DsbnState,
}

/// A branch's parameters, borrowed read-only (inference forward, backward).
#[derive(Debug, Clone, Copy)]
pub struct PpmBranchRef<'a> {
    /// `[K, 1, 1, C]`, KRSC.
    pub weight: &'a Tensor,
    /// γ, β and running statistics per (dataset, channel).
    pub state: &'a DsbnState,
}

impl PpmBranchRef<'_> {
    fn channels(&self) -> usize {
        self.weight.shape().first().copied().unwrap_or(0)
    }
}

/// What one branch's training forward saved for the backward.
#[derive(Debug)]
pub struct PpmBranchSaved {
    /// The pooled input `[N, b, b, C]` (the DAB's input).
    pub pooled: Tensor,
    /// The DAB's forward: convolution output, batch statistics and the low-resolution output.
    pub dab: DabForward,
}

/// What a training forward produced.
#[derive(Debug)]
pub struct PpmForward {
    /// `[N, H, W, C + Σ K_i]`.
    pub output: Tensor,
    /// What the backward needs.
    pub saved: PpmSaved,
}

/// What a training forward saves for [`backward_train`].
#[derive(Debug)]
pub struct PpmSaved {
    /// Per branch, in bin order.
    pub branches: Vec<PpmBranchSaved>,
    /// The output's shape `[N, H, W, C + Σ K_i]` and storage type.
    output_shape: [usize; 4],
    output_dtype: DType,
}

/// One branch's parameter gradients.
#[derive(Debug)]
pub struct PpmBranchGrads {
    /// `[K, 1, 1, C]`.
    pub dweight: Tensor,
    /// `[D, K]` f32; zero for datasets absent from the batch.
    pub dgamma: Tensor,
    /// `[D, K]` f32; zero for datasets absent from the batch.
    pub dbeta: Tensor,
}

/// Gradients of a PPM.
#[derive(Debug)]
pub struct PpmGrads {
    /// Gradient with respect to the input, `[N, H, W, C]`.
    pub dx: Tensor,
    /// Per branch, in bin order.
    pub branches: Vec<PpmBranchGrads>,
}

/// Output channels of a PPM over `in_channels` input channels: `C + Σ K_i`.
pub fn output_channels(in_channels: usize, branches: &[PpmBranchRef<'_>]) -> usize {
    in_channels + branches.iter().map(PpmBranchRef::channels).sum::<usize>()
}

const ONE_BY_ONE: ConvGeometry = ConvGeometry { stride: (1, 1), padding: (0, 0), dilation: (1, 1) };

/// The validated geometry of one call.
struct Checked {
    n: usize,
    h: usize,
    w: usize,
    /// First output channel of each branch.
    offsets: Vec<usize>,
    total: usize,
}

fn check_inputs(x: &Tensor, datasets: &Tensor, branches: &[PpmBranchRef<'_>], opts: &PpmOptions) -> Result<Checked> {
    let [n, h, w, c] = check::nhwc("PPM input", x)?;
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType { what: "PPM input", dtype: x.dtype() });
    }
    if h > pool::MAX_RESIZE_DIM || w > pool::MAX_RESIZE_DIM {
        return Err(Error::InvalidShape {
            what: "PPM input",
            shape: x.shape().to_vec(),
            reason: format!("the bilinear upsampling supports spatial sizes up to {}", pool::MAX_RESIZE_DIM),
        });
    }
    check::dtype("dataset indices", datasets, DType::I32)?;
    check::shape("dataset indices", datasets, &[n])?;
    check::same_device(x.device(), &[datasets])?;
    if opts.bins.is_empty() {
        return Err(Error::InvalidArgument("a PPM needs at least one bin".into()));
    }
    if let Some(b) = opts.bins.iter().find(|&&b| b == 0 || b > pool::MAX_RESIZE_DIM) {
        return Err(Error::InvalidArgument(format!("PPM bin {b}: bins must be in 1..={}", pool::MAX_RESIZE_DIM)));
    }
    if branches.len() != opts.bins.len() {
        return Err(Error::InvalidArgument(format!(
            "{} PPM branches for {} bins: one branch per bin",
            branches.len(),
            opts.bins.len()
        )));
    }
    check::finite_positive("eps", opts.dsbn.eps)?;
    if !(opts.dsbn.momentum.is_finite() && (0.0..=1.0).contains(&opts.dsbn.momentum)) {
        return Err(Error::InvalidArgument(format!("momentum must be in [0, 1], got {}", opts.dsbn.momentum)));
    }
    let d = branches[0].state.num_datasets();
    let mut offsets = Vec::with_capacity(branches.len());
    let mut total = c;
    for br in branches {
        let k = br.channels();
        check::dtype("PPM branch weight", br.weight, x.dtype())?;
        if k == 0 || br.weight.shape().len() != 4 {
            return Err(Error::InvalidShape {
                what: "PPM branch weight",
                shape: br.weight.shape().to_vec(),
                reason: format!("expected [K, 1, 1, {c}] with K >= 1"),
            });
        }
        check::shape("PPM branch weight", br.weight, &[k, 1, 1, c])?;
        if br.state.gamma.shape().len() != 2 || br.state.num_datasets() != d || d == 0 {
            return Err(Error::InvalidShape {
                what: "PPM branch DSBN gamma",
                shape: br.state.gamma.shape().to_vec(),
                reason: format!("expected [D, K] with the same D >= 1 for every branch (D = {d})"),
            });
        }
        for (what, t) in [
            ("PPM branch DSBN gamma", &br.state.gamma),
            ("PPM branch DSBN beta", &br.state.beta),
            ("PPM branch DSBN running_mean", &br.state.running_mean),
            ("PPM branch DSBN running_var", &br.state.running_var),
        ] {
            check::dtype(what, t, DType::F32)?;
            check::shape(what, t, &[d, k])?;
        }
        check::same_device(
            x.device(),
            &[br.weight, &br.state.gamma, &br.state.beta, &br.state.running_mean, &br.state.running_var],
        )?;
        offsets.push(total);
        total = total.saturating_add(k);
    }
    if total > i32::MAX as usize {
        return Err(Error::InvalidShape {
            what: "PPM output",
            shape: vec![n, h, w, total],
            reason: "more than 2^31 - 1 channels".into(),
        });
    }
    let out_numel = [n, h, w, total].iter().try_fold(1usize, |a, &v| a.checked_mul(v));
    if out_numel.is_none_or(|e| e > i64::MAX as usize / 8) {
        return Err(Error::InvalidShape {
            what: "PPM output",
            shape: vec![n, h, w, total],
            reason: "the element count must fit in 64-bit indexing".into(),
        });
    }
    Ok(Checked { n, h, w, offsets, total })
}

/// Training forward: batch statistics per branch and dataset, running statistics moved for the
/// datasets present. `x` `[N, H, W, C]` f32/f16/bf16; `datasets` `[N]` i32 in `0..D`; one branch
/// per bin of `opts.bins`, with the same D. Returns the concatenated output and what the
/// backward needs. On any error nothing is written (running statistics included).
pub fn forward_train(
    x: &Tensor,
    datasets: &Tensor,
    branches: &mut [PpmBranchMut<'_>],
    opts: &PpmOptions,
) -> Result<PpmForward> {
    let views: Vec<PpmBranchRef<'_>> =
        branches.iter().map(|b| PpmBranchRef { weight: b.weight, state: &*b.state }).collect();
    let g = check_inputs(x, datasets, &views, opts)?;
    drop(views);
    let mut output = Tensor::uninit(x.device(), &[g.n, g.h, g.w, g.total], x.dtype())?;
    // Smallest bin first: it is where bad data (too few values per channel) shows first, before
    // any branch has moved its running statistics (see the module documentation).
    let mut order: Vec<usize> = (0..branches.len()).collect();
    order.sort_by_key(|&i| opts.bins[i]);
    let mut saved: Vec<Option<PpmBranchSaved>> = (0..branches.len()).map(|_| None).collect();
    for i in order {
        let b = opts.bins[i];
        let br = &mut branches[i];
        let pooled = pool::adaptive_avg_pool(x, b, b)?;
        let dab_opts = DabOptions { geometry: ONE_BY_ONE, dsbn: opts.dsbn, materialize: true, ..Default::default() };
        let f = dab::forward_train(&pooled, br.weight, datasets, br.state, &dab_opts)?;
        let low = f.output.as_ref().ok_or_else(|| Error::InvalidArgument("the DAB did not materialise".into()))?;
        pool::resize_bilinear_into(low, &mut output, g.offsets[i], opts.align_corners)?;
        saved[i] = Some(PpmBranchSaved { pooled, dab: f });
    }
    pool::adaptive_avg_pool_into(x, &mut output, 0)?;
    let saved = PpmSaved {
        branches: saved.into_iter().flatten().collect(),
        output_shape: [g.n, g.h, g.w, g.total],
        output_dtype: x.dtype(),
    };
    Ok(PpmForward { output, saved })
}

/// Inference forward: each branch normalised with the running statistics of each sample's
/// dataset; nothing is updated. Any number of samples per dataset is fine.
pub fn forward_infer(
    x: &Tensor,
    datasets: &Tensor,
    branches: &[PpmBranchRef<'_>],
    opts: &PpmOptions,
) -> Result<Tensor> {
    let g = check_inputs(x, datasets, branches, opts)?;
    let mut output = Tensor::uninit(x.device(), &[g.n, g.h, g.w, g.total], x.dtype())?;
    for (i, br) in branches.iter().enumerate() {
        let b = opts.bins[i];
        let pooled = pool::adaptive_avg_pool(x, b, b)?;
        let dab_opts = DabOptions { geometry: ONE_BY_ONE, dsbn: opts.dsbn, ..Default::default() };
        let low = dab::forward_infer(&pooled, br.weight, datasets, br.state, &dab_opts)?;
        pool::resize_bilinear_into(&low, &mut output, g.offsets[i], opts.align_corners)?;
    }
    pool::adaptive_avg_pool_into(x, &mut output, 0)?;
    Ok(output)
}

/// Backward of [`forward_train`]: `dy` is the gradient of the whole output
/// `[N, H, W, C + Σ K_i]`, in the forward's storage type; `branches` and `opts` as in the
/// forward (γ and β unchanged since), `forward` what it saved ([`PpmForward::saved`]). Returns
/// `dx` `[N, H, W, C]` (identity slice included) and every branch's weight, γ and β gradients.
pub fn backward_train(
    dy: &Tensor,
    datasets: &Tensor,
    branches: &[PpmBranchRef<'_>],
    forward: &PpmSaved,
    opts: &PpmOptions,
) -> Result<PpmGrads> {
    let [n, h, w, total] = forward.output_shape;
    check::dtype("PPM output gradient", dy, forward.output_dtype)?;
    check::shape("PPM output gradient", dy, &[n, h, w, total])?;
    if let Some(b) = forward.branches.first() {
        check::same_device(b.pooled.device(), &[dy])?;
    }
    if branches.is_empty() || forward.branches.len() != branches.len() || opts.bins.len() != branches.len() {
        return Err(Error::InvalidArgument(format!(
            "the forward saved {} branches; {} branches and {} bins given",
            forward.branches.len(),
            branches.len(),
            opts.bins.len()
        )));
    }
    // The input's shape, from what the forward saved; each branch's low-resolution shape.
    let c = forward.branches[0].pooled.shape().get(3).copied().unwrap_or(0);
    let x_shape = [n, h, w, c];
    let mut offsets = Vec::with_capacity(branches.len());
    let mut off = c;
    for ((br, saved), &b) in branches.iter().zip(&forward.branches).zip(&opts.bins) {
        check::shape("PPM saved pooled input", &saved.pooled, &[n, b, b, c])?;
        check::shape("PPM branch weight", br.weight, &[br.channels(), 1, 1, c])?;
        offsets.push(off);
        off += br.channels();
    }
    if off != total {
        return Err(Error::ShapeMismatch {
            what: "PPM output gradient",
            expected: vec![n, h, w, off],
            got: dy.shape().to_vec(),
        });
    }
    let mut grads = Vec::with_capacity(branches.len());
    let mut dpooled = Vec::with_capacity(branches.len());
    for (i, (br, saved)) in branches.iter().zip(&forward.branches).enumerate() {
        let b = opts.bins[i];
        let dlow = pool::resize_bilinear_backward(dy, offsets[i], &[n, b, b, br.channels()], opts.align_corners)?;
        let dab_opts = DabOptions { geometry: ONE_BY_ONE, dsbn: opts.dsbn, materialize: true, ..Default::default() };
        let g = dab::backward_train(&dlow, &saved.pooled, br.weight, datasets, br.state, saved.dab.saved(), &dab_opts)?;
        dpooled.push(g.dx.ok_or_else(|| Error::InvalidArgument("the branch DAB returned no input gradient".into()))?);
        grads.push(PpmBranchGrads { dweight: g.dweight, dgamma: g.dgamma, dbeta: g.dbeta });
    }
    // The identity slice of dy plus every branch's pooling backward, in one pass.
    let levels: Vec<&Tensor> = dpooled.iter().collect();
    let dx = pool::adaptive_avg_pool_backward_sum(dy, &levels, &x_shape)?;
    Ok(PpmGrads { dx, branches: grads })
}
