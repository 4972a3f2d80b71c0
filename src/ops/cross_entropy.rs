//! Multi-head cross-entropy: one classifier head per dataset, one launch sequence for a batch
//! that mixes datasets.
//!
//! Layout: logits `[N, H, W, Cmax]` (f32, f16 or bf16 storage; all arithmetic in f32). Sample
//! `n` belongs to dataset `d = datasets[n]`, whose head has `num_classes[d] = C_d <= Cmax`
//! classes: the first `C_d` channels of that sample's logits. The remaining channels are padding:
//! never read into the loss, and their gradient is 0. Labels `[N, H, W]` (u8 or i32) hold a class
//! in `0..C_d` or [`IGNORE_LABEL`].
//!
//! Per pixel, `nll = logsumexp(x[0..C_d]) - x[label]`. `Loss_d` is the mean of `nll` over the
//! valid (non-ignored) pixels of dataset `d`'s samples; the total is `sum_d w_d * Loss_d`
//! (weights default to 1), which is the sum of PyTorch's `cross_entropy(ignore_index=255,
//! reduction="mean")` applied per dataset to its part of the batch. The gradient is
//! `dlogits = (softmax - onehot(label)) * w_d / valid_d * grad_scale`, 0 for ignored pixels and
//! padding channels.
//!
//! **Difference from PyTorch:** a dataset with no valid pixel (all labels ignored, or no sample
//! in the batch) contributes a loss of exactly 0 and a gradient of exactly 0, where PyTorch's
//! mean reduction would give 0/0 = NaN and poison the whole step.
//!
//! **Fused bilinear upsampling.** PSPNet predicts at 1/8 of the label resolution and upsamples
//! the logits bilinearly before the loss. [`forward_upsampled`] and
//! [`forward_backward_upsampled`] take the low-resolution logits `[N, h, w, Cmax]` and the
//! labels `[N, H, W]` and compute exactly the loss of
//! `cross_entropy(interpolate(logits, size=(H, W), mode="bilinear", align_corners), labels)`
//! (per head, as above), interpolating each label pixel's logits on the fly; the gradient is
//! with respect to the low-resolution logits (the upsampling's backward applied to the
//! high-resolution gradient, as a deterministic gather). The upsampled logits and their gradient
//! are never stored. Error positions are label pixels. In f32 storage the results equal
//! [`crate::ops::pool::resize_bilinear`] followed by [`forward_backward`] and
//! [`crate::ops::pool::resize_bilinear_backward`] bit for bit.
//!
//! Kernels: `kernels/cross_entropy.cu`. Reference: [`crate::reference::cross_entropy`].

use crate::device::{launcher, workspace_bytes, Device, DeviceBuffer, DeviceErrorRecord, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::ops::pool::MAX_RESIZE_DIM;
use crate::tensor::{DType, Tensor};

/// The label that marks a pixel to ignore (PyTorch's `ignore_index` as CDCL uses it).
pub const IGNORE_LABEL: i64 = ffi::CDCL_IGNORE_LABEL as i64;

/// Options of [`forward`] and [`forward_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropyOptions {
    /// Weight `w_d` of each dataset's loss in the total; `None` means 1 for every dataset.
    pub weights: Option<Vec<f32>>,
    /// Gradient of the final objective with respect to the total loss (1 when the total is the
    /// objective); scales `dlogits`.
    pub grad_scale: f32,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions { weights: None, grad_scale: 1.0 }
    }
}

/// The losses of one batch, read back to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropyLoss {
    /// `sum_d w_d * per_dataset[d]`.
    pub total: f32,
    /// Mean NLL over the valid pixels of each dataset; 0 for a dataset without valid pixels.
    pub per_dataset: Vec<f32>,
}

const CROSS_ENTROPY: Launcher<ffi::cdcl_cross_entropy_params> =
    launcher!(cross_entropy: cdcl_emu_cross_entropy, cdcl_cuda_cross_entropy);

/// Checks the class counts of the heads against the channel count of the logits, and returns
/// them as i32 for the kernels.
pub(crate) fn check_heads(num_classes: &[usize], cmax: usize) -> Result<Vec<i32>> {
    if num_classes.is_empty() || num_classes.len() > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "num_classes must name between 1 and 2^31 - 1 datasets, got {}",
            num_classes.len()
        )));
    }
    num_classes
        .iter()
        .enumerate()
        .map(|(d, &c)| {
            if c == 0 || c > cmax {
                Err(Error::InvalidArgument(format!(
                    "dataset {d} has {c} classes: every head needs 1..={cmax} classes (the logits' channels)"
                )))
            } else {
                Ok(c as i32)
            }
        })
        .collect()
}

/// Labels `[N, H, W]` as u8 or i32, on `device`, with N*H*W < 2^31 (a pixel's index fits the
/// error record and the kernels' 32-bit positions).
pub(crate) fn check_labels(what: &'static str, labels: &Tensor, nhw: [usize; 3]) -> Result<()> {
    if !matches!(labels.dtype(), DType::U8 | DType::I32) {
        return Err(Error::UnsupportedDType { what, dtype: labels.dtype() });
    }
    check::shape(what, labels, &nhw)?;
    if nhw.iter().product::<usize>() > i32::MAX as usize {
        return Err(Error::InvalidShape {
            what,
            shape: nhw.to_vec(),
            reason: "N*H*W must be below 2^31 pixels".into(),
        });
    }
    Ok(())
}

/// Reads `datasets` back to name the dataset of a bad pixel in an error (error path only).
pub(crate) fn dataset_of_pixel(datasets: &Tensor, position: usize, hw: usize) -> Result<usize> {
    let ds = datasets.to_vec::<i32>()?;
    Ok(ds.get(position / hw).copied().unwrap_or(0).max(0) as usize)
}

struct Checked {
    n: usize,
    /// Label (loss) resolution.
    h: usize,
    w: usize,
    cmax: usize,
    classes: Vec<i32>,
    weights: Vec<f32>,
    /// `Some(align_corners)`: the logits are `[n, logit_hw.0, logit_hw.1, cmax]` and upsampled.
    upsample: Option<bool>,
    logit_hw: (usize, usize),
}

fn check_inputs(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    num_classes: &[usize],
    opts: &CrossEntropyOptions,
    upsample: Option<bool>,
) -> Result<Checked> {
    let [n, lh, lw, cmax] = check::nhwc("cross-entropy logits", logits)?;
    if !logits.dtype().is_float() {
        return Err(Error::UnsupportedDType { what: "cross-entropy logits", dtype: logits.dtype() });
    }
    let (h, w) = match upsample {
        None => (lh, lw),
        Some(_) => {
            let s = labels.shape();
            if s.len() != 3 || s[0] != n || s[1] == 0 || s[2] == 0 {
                return Err(Error::InvalidShape {
                    what: "cross-entropy labels",
                    shape: s.to_vec(),
                    reason: format!("expected [N, H, W] with N = {n} (the logits' batch) and H, W >= 1"),
                });
            }
            if [lh, lw, s[1], s[2]].iter().any(|&d| d > MAX_RESIZE_DIM) {
                return Err(Error::InvalidShape {
                    what: "cross-entropy labels",
                    shape: vec![n, lh, lw, s[1], s[2]],
                    reason: format!("the bilinear upsampling supports spatial sizes up to {MAX_RESIZE_DIM}"),
                });
            }
            (s[1], s[2])
        }
    };
    check_labels("cross-entropy labels", labels, [n, h, w])?;
    check::dtype("dataset indices", datasets, DType::I32)?;
    check::shape("dataset indices", datasets, &[n])?;
    check::same_device(logits.device(), &[labels, datasets])?;
    let classes = check_heads(num_classes, cmax)?;
    let weights = match &opts.weights {
        None => vec![1.0; num_classes.len()],
        Some(w) if w.len() != num_classes.len() => {
            return Err(Error::InvalidArgument(format!("{} loss weights for {} datasets", w.len(), num_classes.len())))
        }
        Some(w) => w.clone(),
    };
    if let Some(bad) = weights.iter().find(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!("loss weights must be finite, got {bad}")));
    }
    if !opts.grad_scale.is_finite() {
        return Err(Error::InvalidArgument(format!("grad_scale must be finite, got {}", opts.grad_scale)));
    }
    Ok(Checked { n, h, w, cmax, classes, weights, upsample, logit_hw: (lh, lw) })
}

fn run(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    g: &Checked,
    opts: &CrossEntropyOptions,
    dlogits: Option<&mut Tensor>,
) -> Result<CrossEntropyLoss> {
    let v = run_on_device(logits, labels, datasets, g, opts, dlogits)?.to_vec::<f32>()?;
    Ok(CrossEntropyLoss { total: v[0], per_dataset: v[1..].to_vec() })
}

/// The launch sequence; the losses stay on the device as `[1 + D]` f32 (total, per dataset).
fn run_on_device(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    g: &Checked,
    opts: &CrossEntropyOptions,
    dlogits: Option<&mut Tensor>,
) -> Result<Tensor> {
    let device = logits.device();
    let d = g.classes.len();
    let classes = Tensor::from_slice(device, &[d], &g.classes)?;
    let weights = Tensor::from_slice(device, &[d], &g.weights)?;
    let mut loss = Tensor::uninit(device, &[1 + d], DType::F32)?;
    let mut record = DeviceErrorRecord::new(device)?;
    let mut p = ffi::cdcl_cross_entropy_params {
        n: g.n as i32,
        h: g.h as i32,
        w: g.w as i32,
        cmax: g.cmax as i32,
        num_datasets: d as i32,
        dtype: logits.dtype().to_ffi(),
        label_dtype: labels.dtype().to_ffi(),
        grad_scale: opts.grad_scale,
        dataset: datasets.ptr().cast(),
        num_classes: classes.ptr().cast(),
        weights: weights.ptr().cast(),
        logits: logits.ptr(),
        labels: labels.ptr(),
        loss: loss.ptr_mut().cast(),
        upsample: g.upsample.is_some() as i32,
        align_corners: g.upsample.unwrap_or(false) as i32,
        logit_h: g.logit_hw.0 as i32,
        logit_w: g.logit_hw.1 as i32,
        ..Default::default()
    };
    let mut ws = workspace(device, &p)?;
    p.workspace = ws.as_mut_ptr().cast();
    p.err = record.as_mut_ptr();
    if let Some(dx) = dlogits {
        p.dlogits = dx.ptr_mut();
    }
    device.launch(&CROSS_ENTROPY, &p)?;
    device_errors(record, datasets, g)?;
    Ok(loss)
}

/// The loss (optionally of the logits upsampled to the labels' size, `upsample =
/// Some(align_corners)`) and, with `with_grad`, its gradient, as the public functions of this
/// module compute them, but with the losses left on the device as an f32 `[1 + D]` tensor
/// (total, then per dataset), so that a training step reads every loss once at its end.
pub(crate) fn loss_on_device(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    num_classes: &[usize],
    opts: &CrossEntropyOptions,
    upsample: Option<bool>,
    with_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let g = check_inputs(logits, labels, datasets, num_classes, opts, upsample)?;
    if !with_grad {
        return Ok((run_on_device(logits, labels, datasets, &g, opts, None)?, None));
    }
    let mut dlogits = Tensor::uninit(logits.device(), logits.shape(), logits.dtype())?;
    let loss = run_on_device(logits, labels, datasets, &g, opts, Some(&mut dlogits))?;
    Ok((loss, Some(dlogits)))
}

fn workspace(device: &Device, p: &ffi::cdcl_cross_entropy_params) -> Result<DeviceBuffer> {
    DeviceBuffer::uninit_words(device, workspace_bytes(ffi::cdcl_emu_cross_entropy_workspace_bytes, p))
}

/// Turns what the kernel found into typed errors (now, or with a training step's read of its
/// losses: see `src/device/step.rs`); the dataset indices are kept to name a bad label's dataset.
fn device_errors(record: DeviceErrorRecord, datasets: &Tensor, g: &Checked) -> Result<()> {
    let (classes, hw) = (g.classes.clone(), g.h * g.w);
    record.check(Some(datasets), move |faults, datasets| {
        if let Some(f) = faults[ffi::CDCL_ERRSLOT_DATASET_INDEX as usize] {
            return Err(Error::DatasetIndexOutOfRange {
                sample: f.position as usize,
                index: f.value as i64,
                num_datasets: classes.len(),
            });
        }
        if let Some(f) = faults[ffi::CDCL_ERRSLOT_LABEL as usize] {
            let dataset = match datasets {
                Some(ds) => dataset_of_pixel(ds, f.position as usize, hw)?,
                None => 0,
            };
            return Err(Error::InvalidLabel {
                dataset,
                label: f.value as i64,
                position: f.position as usize,
                num_classes: classes.get(dataset).copied().unwrap_or(0) as usize,
            });
        }
        Ok(())
    })
}

/// The multi-head loss without its gradient (validation loss).
///
/// `logits`: `[N, H, W, Cmax]` f32/f16/bf16. `labels`: `[N, H, W]` u8 or i32, each in
/// `0..num_classes[datasets[n]]` or [`IGNORE_LABEL`]. `datasets`: `[N]` i32 in
/// `0..num_classes.len()`. `num_classes[d]` in `1..=Cmax`.
///
/// Errors: shape, dtype, device and option errors before any launch; on the device, the first
/// bad dataset index ([`Error::DatasetIndexOutOfRange`]) or else the first bad label in element
/// order ([`Error::InvalidLabel`], `position` = linear pixel index `(n*H + h)*W + w`).
pub fn forward(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    num_classes: &[usize],
    opts: &CrossEntropyOptions,
) -> Result<CrossEntropyLoss> {
    let g = check_inputs(logits, labels, datasets, num_classes, opts, None)?;
    run(logits, labels, datasets, &g, opts, None)
}

/// The loss and its gradient with respect to the logits, in a new tensor like `logits`.
pub fn forward_backward(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    num_classes: &[usize],
    opts: &CrossEntropyOptions,
) -> Result<(CrossEntropyLoss, Tensor)> {
    let mut dlogits = Tensor::uninit(logits.device(), logits.shape(), logits.dtype())?;
    let loss = forward_backward_into(logits, labels, datasets, num_classes, opts, &mut dlogits)?;
    Ok((loss, dlogits))
}

/// As [`forward_backward`], writing the gradient into `dlogits` (same shape and dtype as
/// `logits`; every element is overwritten). On any error `dlogits` is left untouched.
pub fn forward_backward_into(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    num_classes: &[usize],
    opts: &CrossEntropyOptions,
    dlogits: &mut Tensor,
) -> Result<CrossEntropyLoss> {
    let g = check_inputs(logits, labels, datasets, num_classes, opts, None)?;
    run_into(logits, labels, datasets, &g, opts, dlogits)
}

fn run_into(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    g: &Checked,
    opts: &CrossEntropyOptions,
    dlogits: &mut Tensor,
) -> Result<CrossEntropyLoss> {
    check::dtype("cross-entropy dlogits", dlogits, logits.dtype())?;
    check::shape("cross-entropy dlogits", dlogits, logits.shape())?;
    check::same_device(logits.device(), &[dlogits])?;
    run(logits, labels, datasets, g, opts, Some(dlogits))
}

/// The multi-head loss of the logits upsampled bilinearly to the labels' resolution, without
/// its gradient: `logits` `[N, h, w, Cmax]`, `labels` `[N, H, W]` (any `H, W >= 1`, not
/// necessarily multiples of `h, w`; smaller works too), `align_corners` as in PyTorch's
/// `interpolate`. Otherwise as [`forward`]; error positions are label pixels
/// `(n*H + y)*W + x`.
pub fn forward_upsampled(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    num_classes: &[usize],
    align_corners: bool,
    opts: &CrossEntropyOptions,
) -> Result<CrossEntropyLoss> {
    let g = check_inputs(logits, labels, datasets, num_classes, opts, Some(align_corners))?;
    run(logits, labels, datasets, &g, opts, None)
}

/// The loss of [`forward_upsampled`] and its gradient with respect to the low-resolution
/// `logits`, in a new tensor like `logits`.
pub fn forward_backward_upsampled(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    num_classes: &[usize],
    align_corners: bool,
    opts: &CrossEntropyOptions,
) -> Result<(CrossEntropyLoss, Tensor)> {
    let mut dlogits = Tensor::uninit(logits.device(), logits.shape(), logits.dtype())?;
    let loss =
        forward_backward_upsampled_into(logits, labels, datasets, num_classes, align_corners, opts, &mut dlogits)?;
    Ok((loss, dlogits))
}

/// As [`forward_backward_upsampled`], writing the gradient into `dlogits` (same shape and dtype
/// as `logits`; every element is overwritten). On any error `dlogits` is left untouched.
pub fn forward_backward_upsampled_into(
    logits: &Tensor,
    labels: &Tensor,
    datasets: &Tensor,
    num_classes: &[usize],
    align_corners: bool,
    opts: &CrossEntropyOptions,
    dlogits: &mut Tensor,
) -> Result<CrossEntropyLoss> {
    let g = check_inputs(logits, labels, datasets, num_classes, opts, Some(align_corners))?;
    run_into(logits, labels, datasets, &g, opts, dlogits)
}
