//! CPU reference for the multi-head cross-entropy.
//!
//! Every dataset `d` has its own classifier head of `C_d = num_classes[d]` classes; sample `n`
//! (dataset `d = datasets[n]`) uses the first `C_d` channels of its logits `[N, H, W, Cmax]`;
//! the other channels are padding and take no part. Per pixel with label `y` (not
//! [`IGNORE_LABEL`]):
//!
//! `nll = -log_softmax(x[0..C_d])[y] = log(sum_c exp(x_c - max)) + max - x_y`.
//!
//! `Loss_d = (1 / V_d) * sum of nll over the V_d valid pixels of dataset d's samples`, and the
//! total is `sum_d w_d * Loss_d`. A dataset with `V_d = 0` contributes exactly 0 (PyTorch's
//! mean would be 0/0 = NaN).
//!
//! Gradient of `grad_scale * total` with respect to a logit of a valid pixel in the head:
//! `(softmax_c - [c == y]) * w_d / V_d * grad_scale`; 0 for ignored pixels and padding.
//!
//! Plain loops, f64 throughout, max-shifted two-pass log-sum-exp (no online softmax).
//!
//! The upsampled variants ([`multi_head_cross_entropy_upsampled`] and its gradient) are the
//! composition PyTorch users write: the logits `[N, h, w, Cmax]` resized bilinearly to the
//! labels' `H × W` ([`super::pool::resize_bilinear`]), the loss above, and for the gradient the
//! resize's backward ([`super::pool::resize_bilinear_backward`]) applied to the gradient of the
//! high-resolution logits.

use std::fmt;

use ndarray::{Array4, ArrayView3, ArrayView4};

use super::pool::{resize_bilinear, resize_bilinear_backward};

/// The label that marks a pixel to ignore.
pub const IGNORE_LABEL: i64 = 255;

/// Errors of the loss and metric references.
#[derive(Debug, Clone, PartialEq)]
pub enum LossReferenceError {
    /// Inconsistent shapes; the message says which.
    Shape(String),
    /// `datasets[sample] == index >= num_datasets`.
    DatasetOutOfRange {
        /// The sample.
        sample: usize,
        /// Its dataset index.
        index: usize,
        /// Number of datasets.
        num_datasets: usize,
    },
    /// The first label (in element order) that is neither in `0..num_classes` nor 255.
    InvalidLabel {
        /// The pixel's dataset.
        dataset: usize,
        /// The label found.
        label: i64,
        /// Linear pixel index `(n*H + h)*W + w`.
        position: usize,
        /// Classes of that dataset's head.
        num_classes: usize,
    },
    /// A head with 0 classes or more classes than the logits have channels.
    InvalidHead {
        /// The dataset.
        dataset: usize,
        /// Its class count.
        num_classes: usize,
    },
}

impl fmt::Display for LossReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for LossReferenceError {}

/// Losses of one batch.
#[derive(Clone, Debug)]
pub struct MultiHeadLoss {
    /// `sum_d w_d * per_dataset[d]`.
    pub total: f64,
    /// Mean NLL per dataset (0 without valid pixels).
    pub per_dataset: Vec<f64>,
    /// Valid (non-ignored) pixels per dataset.
    pub valid: Vec<usize>,
}

/// Checks shapes, dataset indices, heads and labels; labels are checked in element order after
/// every dataset index.
pub(crate) fn check(
    shape: (usize, usize, usize, usize),
    labels: &ArrayView3<i64>,
    datasets: &[usize],
    num_classes: &[usize],
) -> Result<(), LossReferenceError> {
    let (n, h, w, cmax) = shape;
    if labels.dim() != (n, h, w) {
        return Err(LossReferenceError::Shape(format!(
            "labels {:?} vs logits [N, H, W] = [{n}, {h}, {w}]",
            labels.shape()
        )));
    }
    if datasets.len() != n {
        return Err(LossReferenceError::Shape(format!("{} dataset indices for {n} samples", datasets.len())));
    }
    for (dataset, &c) in num_classes.iter().enumerate() {
        if c == 0 || c > cmax {
            return Err(LossReferenceError::InvalidHead { dataset, num_classes: c });
        }
    }
    for (sample, &index) in datasets.iter().enumerate() {
        if index >= num_classes.len() {
            return Err(LossReferenceError::DatasetOutOfRange { sample, index, num_datasets: num_classes.len() });
        }
    }
    for ((ni, hi, wi), &label) in labels.indexed_iter() {
        let d = datasets[ni];
        if label != IGNORE_LABEL && !(0..num_classes[d] as i64).contains(&label) {
            return Err(LossReferenceError::InvalidLabel {
                dataset: d,
                label,
                position: (ni * h + hi) * w + wi,
                num_classes: num_classes[d],
            });
        }
    }
    Ok(())
}

/// `log(sum_{c < classes} exp(x_c))` of one pixel, shifted by the maximum.
fn log_sum_exp(logits: &ArrayView4<f64>, (n, h, w): (usize, usize, usize), classes: usize) -> f64 {
    let mut max = f64::NEG_INFINITY;
    for c in 0..classes {
        max = max.max(logits[[n, h, w, c]]);
    }
    let mut sum = 0.0;
    for c in 0..classes {
        sum += (logits[[n, h, w, c]] - max).exp();
    }
    sum.ln() + max
}

/// The multi-head loss (see the module documentation). `weights` has one entry per dataset.
pub fn multi_head_cross_entropy(
    logits: ArrayView4<f64>,
    labels: ArrayView3<i64>,
    datasets: &[usize],
    num_classes: &[usize],
    weights: &[f64],
) -> Result<MultiHeadLoss, LossReferenceError> {
    check(logits.dim(), &labels, datasets, num_classes)?;
    if weights.len() != num_classes.len() {
        return Err(LossReferenceError::Shape(format!("{} weights for {} datasets", weights.len(), num_classes.len())));
    }
    let d = num_classes.len();
    let mut sum = vec![0.0f64; d];
    let mut valid = vec![0usize; d];
    for ((ni, hi, wi), &label) in labels.indexed_iter() {
        if label == IGNORE_LABEL {
            continue;
        }
        let ds = datasets[ni];
        let lse = log_sum_exp(&logits, (ni, hi, wi), num_classes[ds]);
        sum[ds] += lse - logits[[ni, hi, wi, label as usize]];
        valid[ds] += 1;
    }
    let per_dataset: Vec<f64> = (0..d).map(|k| if valid[k] > 0 { sum[k] / valid[k] as f64 } else { 0.0 }).collect();
    let total = (0..d).map(|k| weights[k] * per_dataset[k]).sum();
    Ok(MultiHeadLoss { total, per_dataset, valid })
}

/// Gradient of `grad_scale * total` with respect to the logits, `[N, H, W, Cmax]`.
pub fn multi_head_cross_entropy_grad(
    logits: ArrayView4<f64>,
    labels: ArrayView3<i64>,
    datasets: &[usize],
    num_classes: &[usize],
    weights: &[f64],
    grad_scale: f64,
) -> Result<Array4<f64>, LossReferenceError> {
    let loss = multi_head_cross_entropy(logits, labels, datasets, num_classes, weights)?;
    let mut grad = Array4::<f64>::zeros(logits.dim());
    for ((ni, hi, wi), &label) in labels.indexed_iter() {
        if label == IGNORE_LABEL {
            continue;
        }
        let ds = datasets[ni];
        let scale = weights[ds] / loss.valid[ds] as f64 * grad_scale;
        let lse = log_sum_exp(&logits, (ni, hi, wi), num_classes[ds]);
        for c in 0..num_classes[ds] {
            let softmax = (logits[[ni, hi, wi, c]] - lse).exp();
            let onehot = if c as i64 == label { 1.0 } else { 0.0 };
            grad[[ni, hi, wi, c]] = (softmax - onehot) * scale;
        }
    }
    Ok(grad)
}

/// The logits upsampled to the labels' resolution, after checking that the batch sizes agree
/// and no size is zero.
fn upsample_to_labels(
    logits: &ArrayView4<f64>,
    labels: &ArrayView3<i64>,
    align_corners: bool,
) -> Result<Array4<f64>, LossReferenceError> {
    let (n, h, w, c) = logits.dim();
    let (ln, lh, lw) = labels.dim();
    if ln != n || [n, h, w, c, lh, lw].contains(&0) {
        return Err(LossReferenceError::Shape(format!(
            "labels {:?} vs logits {:?}: same N, every size at least 1",
            labels.shape(),
            logits.shape()
        )));
    }
    Ok(resize_bilinear(logits.view(), lh, lw, align_corners))
}

/// The multi-head loss of `logits` `[N, h, w, Cmax]` bilinearly upsampled (`align_corners` as in
/// PyTorch's `interpolate`) to the resolution of `labels` `[N, H, W]`.
pub fn multi_head_cross_entropy_upsampled(
    logits: ArrayView4<f64>,
    labels: ArrayView3<i64>,
    datasets: &[usize],
    num_classes: &[usize],
    weights: &[f64],
    align_corners: bool,
) -> Result<MultiHeadLoss, LossReferenceError> {
    let up = upsample_to_labels(&logits, &labels, align_corners)?;
    multi_head_cross_entropy(up.view(), labels, datasets, num_classes, weights)
}

/// Gradient of `grad_scale * total` of [`multi_head_cross_entropy_upsampled`] with respect to
/// the low-resolution `logits`, `[N, h, w, Cmax]`: the resize's backward of the gradient of the
/// upsampled logits.
pub fn multi_head_cross_entropy_upsampled_grad(
    logits: ArrayView4<f64>,
    labels: ArrayView3<i64>,
    datasets: &[usize],
    num_classes: &[usize],
    weights: &[f64],
    grad_scale: f64,
    align_corners: bool,
) -> Result<Array4<f64>, LossReferenceError> {
    let up = upsample_to_labels(&logits, &labels, align_corners)?;
    let g = multi_head_cross_entropy_grad(up.view(), labels, datasets, num_classes, weights, grad_scale)?;
    let (_, h, w, _) = logits.dim();
    Ok(resize_bilinear_backward(g.view(), h, w, align_corners))
}
