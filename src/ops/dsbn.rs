//! Dataset-specific batch normalisation (DSBN) over NHWC activations.
//!
//! Sample `n` of a batch belongs to dataset `datasets[n]` and is normalised with that dataset's
//! statistics and its slice of γ, β, running μ and running σ² (tables of shape
//! `[num_datasets, C]`, f32). A batch may mix datasets freely; datasets absent from it keep
//! their running statistics and get zero gradients. Semantics follow PyTorch's `BatchNorm2d`
//! per dataset: momentum 0.1, eps 1e-5, biased variance to normalise, unbiased variance in the
//! running estimate.
//!
//! Kernels: `kernels/dsbn.cu`. Reference: [`crate::reference::dsbn`].

use crate::device::{launcher, workspace_bytes, Device, DeviceBuffer, DeviceErrorRecord, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::tensor::{DType, Tensor};

/// Options shared by the DSBN ops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DsbnOptions {
    /// Added to the variance before the square root (PyTorch default 1e-5).
    pub eps: f32,
    /// Weight of the new batch statistic in the running estimate (PyTorch default 0.1).
    pub momentum: f32,
    /// Apply ReLU after the affine transform (and its mask in the backward).
    pub relu: bool,
}

impl Default for DsbnOptions {
    fn default() -> Self {
        DsbnOptions { eps: 1e-5, momentum: 0.1, relu: false }
    }
}

/// The per-dataset parameters and running statistics of one DSBN layer, each `[D, C]` f32.
#[derive(Debug)]
pub struct DsbnState {
    /// Scale γ per (dataset, channel).
    pub gamma: Tensor,
    /// Shift β per (dataset, channel).
    pub beta: Tensor,
    /// Running mean per (dataset, channel), updated by [`forward_train`].
    pub running_mean: Tensor,
    /// Running (unbiased) variance per (dataset, channel), updated by [`forward_train`].
    pub running_var: Tensor,
}

impl DsbnState {
    /// PyTorch's initial state for `num_datasets` datasets: γ = 1, β = 0, μ = 0, σ² = 1.
    pub fn new(device: &Device, num_datasets: usize, channels: usize) -> Result<Self> {
        if num_datasets == 0 || channels == 0 || num_datasets.saturating_mul(channels) > i32::MAX as usize {
            return Err(Error::InvalidShape {
                what: "DSBN state",
                shape: vec![num_datasets, channels],
                reason: "needs at least one dataset and one channel, and D*C < 2^31".into(),
            });
        }
        let shape = [num_datasets, channels];
        Ok(DsbnState {
            gamma: Tensor::full(device, &shape, 1.0f32)?,
            beta: Tensor::zeros(device, &shape, DType::F32)?,
            running_mean: Tensor::zeros(device, &shape, DType::F32)?,
            running_var: Tensor::full(device, &shape, 1.0f32)?,
        })
    }

    /// Number of datasets D.
    pub fn num_datasets(&self) -> usize {
        self.gamma.shape().first().copied().unwrap_or(0)
    }

    /// Number of channels C.
    pub fn channels(&self) -> usize {
        self.gamma.shape().get(1).copied().unwrap_or(0)
    }
}

/// What the training forward saves for the backward: batch mean and 1/sqrt(var + eps) per
/// (dataset, channel), `[D, C]` f32; zero for datasets absent from the batch.
#[derive(Debug)]
pub struct DsbnSaved {
    /// Batch mean.
    pub mean: Tensor,
    /// Inverse standard deviation of the batch (biased variance).
    pub invstd: Tensor,
}

/// Gradients of a DSBN layer.
#[derive(Debug)]
pub struct DsbnGrads {
    /// Gradient with respect to the input, like `x`.
    pub dx: Tensor,
    /// Gradient with respect to γ, `[D, C]` f32 (zero for absent datasets).
    pub dgamma: Tensor,
    /// Gradient with respect to β, `[D, C]` f32 (zero for absent datasets).
    pub dbeta: Tensor,
    /// Gradient with respect to the residual input, like `x`, when the forward added one.
    pub dresidual: Option<Tensor>,
}

const FORWARD_TRAIN: Launcher<ffi::cdcl_dsbn_params> =
    launcher!(dsbn_forward_train: cdcl_emu_dsbn_forward_train, cdcl_cuda_dsbn_forward_train);
const FORWARD_INFER: Launcher<ffi::cdcl_dsbn_params> =
    launcher!(dsbn_forward_infer: cdcl_emu_dsbn_forward_infer, cdcl_cuda_dsbn_forward_infer);
const BACKWARD_TRAIN: Launcher<ffi::cdcl_dsbn_params> =
    launcher!(dsbn_backward_train: cdcl_emu_dsbn_backward_train, cdcl_cuda_dsbn_backward_train);
const BACKWARD_INFER: Launcher<ffi::cdcl_dsbn_params> =
    launcher!(dsbn_backward_infer: cdcl_emu_dsbn_backward_infer, cdcl_cuda_dsbn_backward_infer);
const STATS_FROM_PARTIALS: Launcher<ffi::cdcl_dsbn_params> =
    launcher!(dsbn_stats_from_partials: cdcl_emu_dsbn_stats_from_partials, cdcl_cuda_dsbn_stats_from_partials);
const APPLY: Launcher<ffi::cdcl_dsbn_params> = launcher!(dsbn_apply: cdcl_emu_dsbn_apply, cdcl_cuda_dsbn_apply);
const VALIDATE: Launcher<ffi::cdcl_dsbn_params> =
    launcher!(dsbn_validate_indices: cdcl_emu_dsbn_validate_indices, cdcl_cuda_dsbn_validate_indices);

/// Validated geometry of one DSBN call.
struct Checked {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    d: usize,
}

fn check_common(x: &Tensor, datasets: &Tensor, state: &DsbnState, opts: &DsbnOptions) -> Result<Checked> {
    let [n, h, w, c] = check::nhwc("DSBN input", x)?;
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType { what: "DSBN input", dtype: x.dtype() });
    }
    check::dtype("dataset indices", datasets, DType::I32)?;
    check::shape("dataset indices", datasets, &[n])?;
    let d = state.num_datasets();
    if state.gamma.shape().len() != 2 || d == 0 {
        return Err(Error::InvalidShape {
            what: "DSBN gamma",
            shape: state.gamma.shape().to_vec(),
            reason: "expected [num_datasets, channels]".into(),
        });
    }
    for (what, t) in [
        ("DSBN gamma", &state.gamma),
        ("DSBN beta", &state.beta),
        ("DSBN running_mean", &state.running_mean),
        ("DSBN running_var", &state.running_var),
    ] {
        check::dtype(what, t, DType::F32)?;
        check::shape(what, t, &[d, c])?;
    }
    check::same_device(x.device(), &[datasets, &state.gamma, &state.beta, &state.running_mean, &state.running_var])?;
    check::finite_positive("eps", opts.eps)?;
    if !(opts.momentum.is_finite() && (0.0..=1.0).contains(&opts.momentum)) {
        return Err(Error::InvalidArgument(format!("momentum must be in [0, 1], got {}", opts.momentum)));
    }
    Ok(Checked { n, h, w, c, d })
}

fn base_params(
    g: &Checked,
    x: &Tensor,
    datasets: &Tensor,
    state: &DsbnState,
    opts: &DsbnOptions,
) -> ffi::cdcl_dsbn_params {
    ffi::cdcl_dsbn_params {
        n: g.n as i32,
        h: g.h as i32,
        w: g.w as i32,
        c: g.c as i32,
        num_datasets: g.d as i32,
        dtype: x.dtype().to_ffi(),
        relu: opts.relu as i32,
        eps: opts.eps,
        momentum: opts.momentum,
        dataset: datasets.ptr().cast(),
        x: x.ptr(),
        gamma: state.gamma.ptr().cast(),
        beta: state.beta.ptr().cast(),
        ..Default::default()
    }
}

/// The outputs of a statistics pass: running statistics (moved in place) and the saved batch
/// statistics.
fn bind_batch_statistics(p: &mut ffi::cdcl_dsbn_params, state: &mut DsbnState, saved: &mut DsbnSaved) {
    p.running_mean = state.running_mean.ptr_mut().cast();
    p.running_var = state.running_var.ptr_mut().cast();
    p.save_mean = saved.mean.ptr_mut().cast();
    p.save_invstd = saved.invstd.ptr_mut().cast();
}

fn workspace(device: &Device, p: &ffi::cdcl_dsbn_params) -> Result<DeviceBuffer> {
    DeviceBuffer::uninit_words(device, workspace_bytes(ffi::cdcl_emu_dsbn_workspace_bytes, p))
}

/// Turns what the kernels found on the device into typed errors (now, or with a training
/// step's read of its losses: see `src/device/step.rs`).
fn device_errors(record: DeviceErrorRecord, g: &Checked) -> Result<()> {
    let num_datasets = g.d;
    record.check(None, move |faults, _| {
        if let Some(f) = faults[ffi::CDCL_ERRSLOT_DATASET_INDEX as usize] {
            return Err(Error::DatasetIndexOutOfRange {
                sample: f.position as usize,
                index: f.value as i64,
                num_datasets,
            });
        }
        if let Some(f) = faults[ffi::CDCL_ERRSLOT_TOO_FEW_VALUES as usize] {
            return Err(Error::TooFewValues { dataset: f.position as usize, count: f.value.max(0) as usize });
        }
        Ok(())
    })
}

/// Training forward: per-dataset batch statistics, normalise with each sample's dataset, γ/β,
/// optional ReLU. Moves the running statistics of the datasets present in the batch.
///
/// `x`: `[N, H, W, C]` f32, f16 or bf16. `datasets`: `[N]` i32 in `0..D`. Returns `y` like `x`
/// and the statistics the backward needs. On any error nothing is written (the running
/// statistics included).
pub fn forward_train(
    x: &Tensor,
    datasets: &Tensor,
    state: &mut DsbnState,
    opts: &DsbnOptions,
) -> Result<(Tensor, DsbnSaved)> {
    let g = check_common(x, datasets, state, opts)?;
    let device = x.device();
    let mut y = Tensor::uninit(device, x.shape(), x.dtype())?;
    let mut saved = DsbnSaved {
        mean: Tensor::uninit(device, &[g.d, g.c], DType::F32)?,
        invstd: Tensor::uninit(device, &[g.d, g.c], DType::F32)?,
    };
    let mut record = DeviceErrorRecord::new(device)?;
    let mut p = base_params(&g, x, datasets, state, opts);
    let mut ws = workspace(device, &p)?;
    p.y = y.ptr_mut();
    bind_batch_statistics(&mut p, state, &mut saved);
    p.workspace = ws.as_mut_ptr().cast();
    p.err = record.as_mut_ptr();
    device.launch(&FORWARD_TRAIN, &p)?;
    device_errors(record, &g)?;
    Ok((y, saved))
}

/// Inference forward: normalise with the running statistics of each sample's dataset, γ/β,
/// optional ReLU, in one pass. Nothing is updated.
pub fn forward_infer(x: &Tensor, datasets: &Tensor, state: &DsbnState, opts: &DsbnOptions) -> Result<Tensor> {
    let g = check_common(x, datasets, state, opts)?;
    let device = x.device();
    let mut y = Tensor::uninit(device, x.shape(), x.dtype())?;
    let mut record = DeviceErrorRecord::new(device)?;
    let mut p = base_params(&g, x, datasets, state, opts);
    p.y = y.ptr_mut();
    // Read-only here: the inference kernels never write the running statistics.
    p.running_mean = state.running_mean.ptr().cast_mut().cast();
    p.running_var = state.running_var.ptr().cast_mut().cast();
    p.err = record.as_mut_ptr();
    device.launch(&FORWARD_INFER, &p)?;
    device_errors(record, &g)?;
    Ok(y)
}

fn check_backward(dy: &Tensor, x: &Tensor) -> Result<()> {
    check::dtype("DSBN output gradient", dy, x.dtype())?;
    check::shape("DSBN output gradient", dy, x.shape())?;
    check::same_device(x.device(), &[dy])
}

fn check_residual(residual: Option<&Tensor>, x: &Tensor) -> Result<()> {
    if let Some(r) = residual {
        check::dtype("DSBN residual", r, x.dtype())?;
        check::shape("DSBN residual", r, x.shape())?;
        check::same_device(x.device(), &[r])?;
    }
    Ok(())
}

fn run_backward(
    launcher: &Launcher<ffi::cdcl_dsbn_params>,
    g: &Checked,
    mut p: ffi::cdcl_dsbn_params,
    dy: &Tensor,
    x: &Tensor,
    residual: Option<&Tensor>,
) -> Result<DsbnGrads> {
    check_residual(residual, x)?;
    let device = x.device();
    let mut grads = DsbnGrads {
        dx: Tensor::uninit(device, x.shape(), x.dtype())?,
        dgamma: Tensor::uninit(device, &[g.d, g.c], DType::F32)?,
        dbeta: Tensor::uninit(device, &[g.d, g.c], DType::F32)?,
        dresidual: match residual {
            Some(_) => Some(Tensor::uninit(device, x.shape(), x.dtype())?),
            None => None,
        },
    };
    if let Some(r) = residual {
        p.residual = r.ptr();
    }
    if let Some(dr) = grads.dresidual.as_mut() {
        p.dresidual = dr.ptr_mut();
    }
    let mut record = DeviceErrorRecord::new(device)?;
    let mut ws = workspace(device, &p)?;
    p.dy = dy.ptr();
    p.dx = grads.dx.ptr_mut();
    p.dgamma = grads.dgamma.ptr_mut().cast();
    p.dbeta = grads.dbeta.ptr_mut().cast();
    p.workspace = ws.as_mut_ptr().cast();
    p.err = record.as_mut_ptr();
    device.launch(launcher, &p)?;
    device_errors(record, g)?;
    Ok(grads)
}

/// Backward of [`forward_train`]: `dy` like `x`, `saved` from the forward on the same `x`.
pub fn backward_train(
    dy: &Tensor,
    x: &Tensor,
    datasets: &Tensor,
    state: &DsbnState,
    saved: &DsbnSaved,
    opts: &DsbnOptions,
) -> Result<DsbnGrads> {
    backward_train_residual(dy, x, None, datasets, state, saved, opts)
}

/// Backward of the residual form `y = relu(BN(x) + residual)` ([`apply`] with a residual): the
/// ReLU mask sees the residual, and [`DsbnGrads::dresidual`] holds the residual's gradient.
pub fn backward_train_residual(
    dy: &Tensor,
    x: &Tensor,
    residual: Option<&Tensor>,
    datasets: &Tensor,
    state: &DsbnState,
    saved: &DsbnSaved,
    opts: &DsbnOptions,
) -> Result<DsbnGrads> {
    let g = check_common(x, datasets, state, opts)?;
    check_backward(dy, x)?;
    check_saved(&g, x, saved)?;
    let mut p = base_params(&g, x, datasets, state, opts);
    p.save_mean = saved.mean.ptr().cast_mut().cast();
    p.save_invstd = saved.invstd.ptr().cast_mut().cast();
    run_backward(&BACKWARD_TRAIN, &g, p, dy, x, residual)
}

/// Backward of [`forward_infer`] (frozen statistics: the running mean and variance are
/// constants, so `dx = dy · γ / sqrt(σ² + eps)` behind the ReLU mask).
pub fn backward_infer(
    dy: &Tensor,
    x: &Tensor,
    datasets: &Tensor,
    state: &DsbnState,
    opts: &DsbnOptions,
) -> Result<DsbnGrads> {
    let g = check_common(x, datasets, state, opts)?;
    check_backward(dy, x)?;
    let mut p = base_params(&g, x, datasets, state, opts);
    p.running_mean = state.running_mean.ptr().cast_mut().cast();
    p.running_var = state.running_var.ptr().cast_mut().cast();
    run_backward(&BACKWARD_INFER, &g, p, dy, x, None)
}

fn check_saved(g: &Checked, x: &Tensor, saved: &DsbnSaved) -> Result<()> {
    for (what, t) in [("DSBN saved mean", &saved.mean), ("DSBN saved invstd", &saved.invstd)] {
        check::dtype(what, t, DType::F32)?;
        check::shape(what, t, &[g.d, g.c])?;
    }
    check::same_device(x.device(), &[&saved.mean, &saved.invstd])
}

/// The apply pass alone: `y = relu?(BN(x) + residual)` with statistics a training forward
/// saved — the separate-pass alternative to applying them in the next convolution's prologue,
/// and ResNet's BN + residual add + ReLU.
pub fn apply(
    x: &Tensor,
    residual: Option<&Tensor>,
    datasets: &Tensor,
    state: &DsbnState,
    saved: &DsbnSaved,
    opts: &DsbnOptions,
) -> Result<Tensor> {
    let g = check_common(x, datasets, state, opts)?;
    check_saved(&g, x, saved)?;
    check_residual(residual, x)?;
    let device = x.device();
    let mut y = Tensor::uninit(device, x.shape(), x.dtype())?;
    let mut record = DeviceErrorRecord::new(device)?;
    let mut p = base_params(&g, x, datasets, state, opts);
    p.y = y.ptr_mut();
    p.save_mean = saved.mean.ptr().cast_mut().cast();
    p.save_invstd = saved.invstd.ptr().cast_mut().cast();
    p.residual = residual.map_or(std::ptr::null(), |r| r.ptr());
    p.err = record.as_mut_ptr();
    device.launch(&APPLY, &p)?;
    device_errors(record, &g)?;
    Ok(y)
}

/// Finishes the statistics of a training forward whose per-chunk partials (mean, M2 of
/// `chunk_pixels`-pixel chunks of each sample, in the DSBN partial layout) were produced by
/// another kernel — the convolution's training epilogue. Moves the running statistics.
pub(crate) fn stats_from_partials(
    conv_out: &Tensor,
    datasets: &Tensor,
    state: &mut DsbnState,
    opts: &DsbnOptions,
    partials: &mut DeviceBuffer,
    chunk_pixels: usize,
) -> Result<DsbnSaved> {
    let g = check_common(conv_out, datasets, state, opts)?;
    let device = conv_out.device();
    let mut saved = DsbnSaved {
        mean: Tensor::uninit(device, &[g.d, g.c], DType::F32)?,
        invstd: Tensor::uninit(device, &[g.d, g.c], DType::F32)?,
    };
    let mut record = DeviceErrorRecord::new(device)?;
    let mut p = base_params(&g, conv_out, datasets, state, opts);
    p.chunk_pixels = chunk_pixels as i32;
    if partials.len() < workspace_bytes(ffi::cdcl_emu_dsbn_workspace_bytes, &p) {
        return Err(Error::InvalidArgument("DSBN partials buffer too small".into()));
    }
    bind_batch_statistics(&mut p, state, &mut saved);
    p.workspace = partials.as_mut_ptr().cast();
    p.err = record.as_mut_ptr();
    device.launch(&STATS_FROM_PARTIALS, &p)?;
    device_errors(record, &g)?;
    Ok(saved)
}

/// Bytes of the DSBN partial layout for an `[N, H, W, C]` tensor in `chunk_pixels` chunks.
pub(crate) fn partials_bytes(shape: [usize; 4], num_datasets: usize, chunk_pixels: usize) -> usize {
    let p = ffi::cdcl_dsbn_params {
        n: shape[0] as i32,
        h: shape[1] as i32,
        w: shape[2] as i32,
        c: shape[3] as i32,
        num_datasets: num_datasets as i32,
        chunk_pixels: chunk_pixels as i32,
        ..Default::default()
    };
    workspace_bytes(ffi::cdcl_emu_dsbn_workspace_bytes, &p)
}

/// Checks every dataset index against the state's dataset count on the device (for fused
/// consumers that read the indices themselves); `x` is the batch they index.
pub(crate) fn validate_indices_checked(datasets: &Tensor, x: &Tensor, num_datasets: usize) -> Result<()> {
    let [n, ..] = check::nhwc("input", x)?;
    check::dtype("dataset indices", datasets, DType::I32)?;
    check::shape("dataset indices", datasets, &[n])?;
    check::same_device(x.device(), &[datasets])?;
    if num_datasets == 0 {
        return Err(Error::InvalidArgument("no datasets".into()));
    }
    let device = datasets.device();
    // Once per step and index tensor: every block of a step reads the same indices.
    if device.validated_in_step(datasets.buffer(), num_datasets) {
        return Ok(());
    }
    let mut record = DeviceErrorRecord::new(device)?;
    let p = ffi::cdcl_dsbn_params {
        n: n as i32,
        num_datasets: num_datasets as i32,
        dataset: datasets.ptr().cast(),
        err: record.as_mut_ptr(),
        ..Default::default()
    };
    device.launch(&VALIDATE, &p)?;
    let g = Checked { n, h: 1, w: 1, c: 1, d: num_datasets };
    device_errors(record, &g)
}
