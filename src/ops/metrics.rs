//! Evaluation of a multi-head segmentation model: per-head argmax predictions, per-dataset
//! confusion matrices, and per-class IoU / mIoU from them.
//!
//! Heads, layouts and the ignore label are those of [`crate::ops::cross_entropy`]: logits
//! `[N, H, W, Cmax]`, sample `n` uses the first `num_classes[datasets[n]]` channels.
//!
//! Confusion matrices of all datasets live in one flat buffer: dataset `d`'s `C_d x C_d`
//! row-major matrix (row = label, column = prediction) starts at
//! `confusion_offsets(num_classes)[d] = sum_{e<d} C_e^2`. The device counts one batch into i32
//! (N*H*W < 2^31, so no cell can overflow); [`ConfusionMatrices`] accumulates batches on the
//! host in u64.
//!
//! Kernels: `kernels/metrics.cu`. Reference: [`crate::reference::metrics`].

use crate::device::{launcher, DeviceErrorRecord, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::ops::cross_entropy::{check_heads, check_labels, dataset_of_pixel};
use crate::tensor::{DType, Tensor};

const ARGMAX: Launcher<ffi::cdcl_argmax_params> = launcher!(argmax: cdcl_emu_argmax, cdcl_cuda_argmax);
const CONFUSION: Launcher<ffi::cdcl_confusion_params> =
    launcher!(confusion_matrix: cdcl_emu_confusion_matrix, cdcl_cuda_confusion_matrix);

/// Per pixel, the class of the largest logit of the sample's own head: `[N, H, W]` i32.
///
/// Ties go to the first maximum; a NaN counts as the maximum (the first NaN wins), as in
/// `torch.argmax`. Errors: shapes/dtypes before any launch; [`Error::DatasetIndexOutOfRange`]
/// for the first sample with a bad dataset index.
pub fn argmax(logits: &Tensor, datasets: &Tensor, num_classes: &[usize]) -> Result<Tensor> {
    let [n, h, w, cmax] = check::nhwc("argmax logits", logits)?;
    if !logits.dtype().is_float() {
        return Err(Error::UnsupportedDType { what: "argmax logits", dtype: logits.dtype() });
    }
    if n * h * w > i32::MAX as usize {
        return Err(Error::InvalidShape {
            what: "argmax logits",
            shape: logits.shape().to_vec(),
            reason: "N*H*W must be below 2^31 pixels".into(),
        });
    }
    check::dtype("dataset indices", datasets, DType::I32)?;
    check::shape("dataset indices", datasets, &[n])?;
    check::same_device(logits.device(), &[datasets])?;
    let classes = check_heads(num_classes, cmax)?;
    let device = logits.device();
    let classes_t = Tensor::from_slice(device, &[classes.len()], &classes)?;
    let mut pred = Tensor::uninit(device, &[n, h, w], DType::I32)?;
    let mut record = DeviceErrorRecord::new(device)?;
    let p = ffi::cdcl_argmax_params {
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cmax: cmax as i32,
        num_datasets: classes.len() as i32,
        dtype: logits.dtype().to_ffi(),
        dataset: datasets.ptr().cast(),
        num_classes: classes_t.ptr().cast(),
        logits: logits.ptr(),
        pred: pred.ptr_mut().cast(),
        err: record.as_mut_ptr(),
    };
    device.launch(&ARGMAX, &p)?;
    let num_datasets = classes.len();
    record.check(None, move |faults, _| match faults[ffi::CDCL_ERRSLOT_DATASET_INDEX as usize] {
        Some(f) => {
            Err(Error::DatasetIndexOutOfRange { sample: f.position as usize, index: f.value as i64, num_datasets })
        }
        None => Ok(()),
    })?;
    Ok(pred)
}

/// Start of each dataset's matrix in the flat confusion buffer, and the total length.
pub fn confusion_offsets(num_classes: &[usize]) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(num_classes.len());
    let mut total = 0usize;
    for &c in num_classes {
        offsets.push(total);
        total += c * c;
    }
    (offsets, total)
}

/// Counts one batch: a flat i32 tensor of `sum_d C_d^2` cells laid out as [`confusion_offsets`]
/// says (row = label, column = prediction), over the pixels whose label is not ignored.
///
/// `pred`: `[N, H, W]` i32 (e.g. from [`argmax`]); `labels`: `[N, H, W]` u8 or i32; `datasets`:
/// `[N]` i32. Errors, first match wins: [`Error::DatasetIndexOutOfRange`]; then
/// [`Error::InvalidLabel`] for the first label outside its head and not ignored; then
/// [`Error::InvalidPrediction`] for the first prediction outside its head at a non-ignored pixel.
pub fn confusion_matrix(pred: &Tensor, labels: &Tensor, datasets: &Tensor, num_classes: &[usize]) -> Result<Tensor> {
    check::dtype("predictions", pred, DType::I32)?;
    let s = pred.shape();
    if s.len() != 3 || s.contains(&0) || s.iter().any(|&v| v > i32::MAX as usize) {
        return Err(Error::InvalidShape {
            what: "predictions",
            shape: s.to_vec(),
            reason: "expected [N, H, W], every dimension in 1..2^31".into(),
        });
    }
    let (n, h, w) = (s[0], s[1], s[2]);
    check_labels("confusion labels", labels, [n, h, w])?;
    check::dtype("dataset indices", datasets, DType::I32)?;
    check::shape("dataset indices", datasets, &[n])?;
    check::same_device(pred.device(), &[labels, datasets])?;
    // A head's matrix must be indexable with i32 offsets: C_d^2 summed below 2^31.
    let classes = check_heads(num_classes, 46_340)?;
    let (offsets, total) = confusion_offsets(num_classes);
    if total > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("confusion matrices of {total} cells do not fit 32-bit offsets")));
    }
    let device = pred.device();
    let classes_t = Tensor::from_slice(device, &[classes.len()], &classes)?;
    let offsets_i: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
    let offsets_t = Tensor::from_slice(device, &[offsets_i.len()], &offsets_i)?;
    let mut counts = Tensor::zeros(device, &[total], DType::I32)?;
    let mut record = DeviceErrorRecord::new(device)?;
    let p = ffi::cdcl_confusion_params {
        n: n as i32,
        h: h as i32,
        w: w as i32,
        num_datasets: classes.len() as i32,
        label_dtype: labels.dtype().to_ffi(),
        max_classes: classes.iter().copied().max().unwrap_or(1),
        dataset: datasets.ptr().cast(),
        num_classes: classes_t.ptr().cast(),
        offsets: offsets_t.ptr().cast(),
        pred: pred.ptr().cast(),
        labels: labels.ptr(),
        counts: counts.ptr_mut().cast(),
        err: record.as_mut_ptr(),
    };
    device.launch(&CONFUSION, &p)?;
    let hw = h * w;
    record.check(Some(datasets), move |faults, datasets| {
        if let Some(f) = faults[ffi::CDCL_ERRSLOT_DATASET_INDEX as usize] {
            return Err(Error::DatasetIndexOutOfRange {
                sample: f.position as usize,
                index: f.value as i64,
                num_datasets: classes.len(),
            });
        }
        for (slot, is_label) in [(ffi::CDCL_ERRSLOT_LABEL, true), (ffi::CDCL_ERRSLOT_PREDICTION, false)] {
            if let Some(f) = faults[slot as usize] {
                let dataset = match datasets {
                    Some(ds) => dataset_of_pixel(ds, f.position as usize, hw)?,
                    None => 0,
                };
                let num_classes = classes.get(dataset).copied().unwrap_or(0) as usize;
                let (position, value) = (f.position as usize, f.value as i64);
                return Err(if is_label {
                    Error::InvalidLabel { dataset, label: value, position, num_classes }
                } else {
                    Error::InvalidPrediction { dataset, prediction: value, position, num_classes }
                });
            }
        }
        Ok(())
    })?;
    Ok(counts)
}

/// Confusion matrices of every dataset accumulated over batches on the host, with IoU and mIoU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrices {
    num_classes: Vec<usize>,
    offsets: Vec<usize>,
    counts: Vec<u64>,
}

impl ConfusionMatrices {
    /// Empty matrices for heads of `num_classes[d]` classes.
    pub fn new(num_classes: &[usize]) -> Self {
        let (offsets, total) = confusion_offsets(num_classes);
        ConfusionMatrices { num_classes: num_classes.to_vec(), offsets, counts: vec![0; total] }
    }

    /// Adds one batch counted by [`confusion_matrix`] (a flat i32 tensor of the same heads).
    pub fn add(&mut self, batch: &Tensor) -> Result<()> {
        check::dtype("confusion counts", batch, DType::I32)?;
        check::shape("confusion counts", batch, &[self.counts.len()])?;
        let v = batch.to_vec::<i32>()?;
        self.add_counts(&v)
    }

    /// Adds one batch given as host counts in the flat layout (each count >= 0).
    pub fn add_counts(&mut self, batch: &[i32]) -> Result<()> {
        if batch.len() != self.counts.len() {
            return Err(Error::ShapeMismatch {
                what: "confusion counts",
                expected: vec![self.counts.len()],
                got: vec![batch.len()],
            });
        }
        if let Some(bad) = batch.iter().find(|&&c| c < 0) {
            return Err(Error::InvalidArgument(format!("negative confusion count {bad}")));
        }
        for (acc, &c) in self.counts.iter_mut().zip(batch) {
            *acc += c as u64;
        }
        Ok(())
    }

    /// Number of classes of each dataset's head.
    pub fn num_classes(&self) -> &[usize] {
        &self.num_classes
    }

    /// Dataset `d`'s `C_d x C_d` matrix, row-major, row = label, column = prediction.
    ///
    /// # Panics
    /// If `d` is not a dataset of these matrices.
    pub fn matrix(&self, d: usize) -> &[u64] {
        let c = self.num_classes[d];
        &self.counts[self.offsets[d]..self.offsets[d] + c * c]
    }

    /// Per class of dataset `d`: `TP / (TP + FP + FN)`, or `None` for a class that appears
    /// neither among the labels nor among the predictions (0 / 0).
    ///
    /// # Panics
    /// If `d` is not a dataset of these matrices.
    pub fn iou(&self, d: usize) -> Vec<Option<f64>> {
        let c = self.num_classes[d];
        let m = self.matrix(d);
        (0..c)
            .map(|k| {
                let tp = m[k * c + k];
                let row: u64 = (0..c).map(|j| m[k * c + j]).sum(); // label k
                let col: u64 = (0..c).map(|i| m[i * c + k]).sum(); // predicted k
                let union = row + col - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect()
    }

    /// Mean IoU of dataset `d` over the classes that have one (see [`Self::iou`]); `None` when no
    /// class has been seen.
    ///
    /// # Panics
    /// If `d` is not a dataset of these matrices.
    pub fn miou(&self, d: usize) -> Option<f64> {
        let present: Vec<f64> = self.iou(d).into_iter().flatten().collect();
        (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
    }
}
