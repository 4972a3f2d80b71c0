//! CPU reference for the evaluation metrics: per-head argmax, per-dataset confusion matrices,
//! IoU and mIoU. Plain loops, straight from the definitions.

use ndarray::{Array2, Array3, ArrayView3, ArrayView4};

use super::cross_entropy::{LossReferenceError, IGNORE_LABEL};

/// Per pixel, the first index of the maximum over the sample's head `x[0..C_d]`; a NaN counts as
/// larger than any number (the first NaN wins), as in `torch.argmax`.
pub fn argmax(
    logits: ArrayView4<f64>,
    datasets: &[usize],
    num_classes: &[usize],
) -> Result<Array3<i64>, LossReferenceError> {
    let (n, h, w, cmax) = logits.dim();
    let no_labels = Array3::<i64>::from_elem((n, h, w), IGNORE_LABEL);
    super::cross_entropy::check((n, h, w, cmax), &no_labels.view(), datasets, num_classes)?;
    Ok(Array3::from_shape_fn((n, h, w), |(ni, hi, wi)| {
        let mut best = 0usize;
        for c in 1..num_classes[datasets[ni]] {
            let (v, b) = (logits[[ni, hi, wi, c]], logits[[ni, hi, wi, best]]);
            if b.is_nan() {
                break;
            }
            if v.is_nan() || v > b {
                best = c;
            }
        }
        best as i64
    }))
}

/// One `C_d x C_d` matrix per dataset (row = label, column = prediction) over the pixels whose
/// label is not ignored. Errors: shapes, dataset indices, then the first bad label (in element
/// order), then the first bad prediction at a non-ignored pixel (reported as `InvalidLabel` with
/// the prediction as `label`; the two are told apart by the caller's test).
pub fn confusion(
    pred: ArrayView3<i64>,
    labels: ArrayView3<i64>,
    datasets: &[usize],
    num_classes: &[usize],
) -> Result<Vec<Array2<u64>>, LossReferenceError> {
    let (n, h, w) = pred.dim();
    let cmax = num_classes.iter().copied().max().unwrap_or(0);
    super::cross_entropy::check((n, h, w, cmax), &labels, datasets, num_classes)?;
    let mut m: Vec<Array2<u64>> = num_classes.iter().map(|&c| Array2::zeros((c, c))).collect();
    for ((ni, hi, wi), &label) in labels.indexed_iter() {
        if label == IGNORE_LABEL {
            continue;
        }
        let d = datasets[ni];
        let p = pred[[ni, hi, wi]];
        if !(0..num_classes[d] as i64).contains(&p) {
            return Err(LossReferenceError::InvalidLabel {
                dataset: d,
                label: p,
                position: (ni * h + hi) * w + wi,
                num_classes: num_classes[d],
            });
        }
        m[d][[label as usize, p as usize]] += 1;
    }
    Ok(m)
}

/// Per class: `TP / (TP + FP + FN)`, `None` where the class is neither a label nor a prediction.
pub fn iou(matrix: &Array2<u64>) -> Vec<Option<f64>> {
    let c = matrix.nrows();
    (0..c)
        .map(|k| {
            let tp = matrix[[k, k]] as f64;
            let fn_: f64 = (0..c).filter(|&j| j != k).map(|j| matrix[[k, j]] as f64).sum();
            let fp: f64 = (0..c).filter(|&i| i != k).map(|i| matrix[[i, k]] as f64).sum();
            let denom = tp + fp + fn_;
            (denom > 0.0).then(|| tp / denom)
        })
        .collect()
}

/// Mean of the IoUs that exist; `None` if none does.
pub fn miou(matrix: &Array2<u64>) -> Option<f64> {
    let v: Vec<f64> = iou(matrix).into_iter().flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}
