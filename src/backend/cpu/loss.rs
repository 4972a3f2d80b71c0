//! The multi-head cross-entropy (with the bilinear upsampling of the logits fused in, as the
//! device computes it) and the per-head argmax on the CPU backend.

use rayon::prelude::*;

use super::check::{dataset_indices, float_of, i32_of, nhwc, shape_is};
use super::pool;
use super::tensor::CpuTensor;
use crate::backend::LossOptions;
use crate::error::{Error, Result};
use crate::ops::cross_entropy::{check_heads, CrossEntropyOptions, IGNORE_LABEL};
use crate::ops::pool::MAX_RESIZE_DIM;

/// Losses `[1 + D]` f32 (total, per dataset) and, with `opts.with_grad`, the gradient with
/// respect to `logits` in their storage type. With `opts.upsample`, the logits are first
/// upsampled to the labels' size in f32 (never rounded to a 16-bit storage type: the device
/// interpolates on the fly), and the gradient of the upsampled logits goes through the resize
/// backward in f64 before the one rounding to the logits' storage type.
pub(crate) fn cross_entropy(
    logits: &CpuTensor,
    labels: &CpuTensor,
    datasets: &CpuTensor,
    num_classes: &[usize],
    opts: &LossOptions,
) -> Result<(CpuTensor, Option<CpuTensor>)> {
    let Some(align) = opts.upsample else {
        return loss_at_label_resolution(logits, labels, datasets, num_classes, &opts.ce, opts.with_grad);
    };
    let [n, lh, lw, cmax] = nhwc("cross-entropy logits", logits)?;
    let xv = float_of("cross-entropy logits", logits)?;
    let s = labels.shape();
    if s.len() != 3 || s[0] != n || s[1] == 0 || s[2] == 0 {
        return Err(Error::InvalidShape {
            what: "cross-entropy labels",
            shape: s.to_vec(),
            reason: format!("expected [N, H, W] with N = {n} (the logits' batch) and H, W >= 1"),
        });
    }
    let (h, w) = (s[1], s[2]);
    if [lh, lw, h, w].iter().any(|&d| d > MAX_RESIZE_DIM) {
        return Err(Error::InvalidShape {
            what: "cross-entropy labels",
            shape: vec![n, lh, lw, h, w],
            reason: format!("the bilinear upsampling supports spatial sizes up to {MAX_RESIZE_DIM}"),
        });
    }
    let wide = CpuTensor::from_f32(logits.shape(), xv.to_vec())?;
    let up = pool::resize_bilinear(&wide, h, w, align)?;
    let (loss, dup) = loss_at_label_resolution(&up, labels, datasets, num_classes, &opts.ce, opts.with_grad)?;
    let Some(dup) = dup else { return Ok((loss, None)) };
    let d = pool::resize_bilinear_backward(&dup, (lh, lw), align)?;
    let dv = float_of("cross-entropy dlogits", &d)?.to_vec();
    Ok((loss, Some(CpuTensor::float(vec![n, lh, lw, cmax], dv, logits.dtype()))))
}

/// Per pixel a max-shifted log-sum-exp in f64; per-sample (sum, valid count) partials merged
/// in sample order; the gradient in f64, rounded once.
fn loss_at_label_resolution(
    logits: &CpuTensor,
    labels: &CpuTensor,
    datasets: &CpuTensor,
    num_classes: &[usize],
    opts: &CrossEntropyOptions,
    with_grad: bool,
) -> Result<(CpuTensor, Option<CpuTensor>)> {
    let [n, h, w, cmax] = nhwc("cross-entropy logits", logits)?;
    let xv = float_of("cross-entropy logits", logits)?;
    let lv = labels.as_i32().ok_or(Error::UnsupportedDType { what: "cross-entropy labels", dtype: labels.dtype() })?;
    shape_is("cross-entropy labels", labels, &[n, h, w])?;
    if n * h * w > i32::MAX as usize {
        return Err(Error::InvalidShape {
            what: "cross-entropy labels",
            shape: vec![n, h, w],
            reason: "N*H*W must be below 2^31 pixels".into(),
        });
    }
    let dv = i32_of("dataset indices", datasets)?;
    shape_is("dataset indices", datasets, &[n])?;
    check_heads(num_classes, cmax)?;
    let nd = num_classes.len();
    let weights: Vec<f32> = match &opts.weights {
        None => vec![1.0; nd],
        Some(wv) if wv.len() != nd => {
            return Err(Error::InvalidArgument(format!("{} loss weights for {nd} datasets", wv.len())))
        }
        Some(wv) => wv.clone(),
    };
    if let Some(bad) = weights.iter().find(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!("loss weights must be finite, got {bad}")));
    }
    if !opts.grad_scale.is_finite() {
        return Err(Error::InvalidArgument(format!("grad_scale must be finite, got {}", opts.grad_scale)));
    }
    let ds = dataset_indices(dv, nd)?;
    let hw = h * w;
    for (position, &label) in lv.iter().enumerate() {
        let dataset = ds[position / hw];
        if label as i64 != IGNORE_LABEL && !(label >= 0 && (label as usize) < num_classes[dataset]) {
            return Err(Error::InvalidLabel {
                dataset,
                label: label as i64,
                position,
                num_classes: num_classes[dataset],
            });
        }
    }
    let lse = |pix: usize, classes: usize| -> f64 {
        let x = &xv[pix * cmax..pix * cmax + classes];
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max
    };
    let parts: Vec<(f64, usize)> = (0..n)
        .into_par_iter()
        .map(|ni| {
            let classes = num_classes[ds[ni]];
            let (mut sum, mut valid) = (0.0f64, 0usize);
            for pix in ni * hw..(ni + 1) * hw {
                let label = lv[pix];
                if label as i64 == IGNORE_LABEL {
                    continue;
                }
                sum += lse(pix, classes) - xv[pix * cmax + label as usize] as f64;
                valid += 1;
            }
            (sum, valid)
        })
        .collect();
    let mut sums = vec![0.0f64; nd];
    let mut valid = vec![0usize; nd];
    for (ni, &(s, v)) in parts.iter().enumerate() {
        sums[ds[ni]] += s;
        valid[ds[ni]] += v;
    }
    let per: Vec<f64> = (0..nd).map(|d| if valid[d] > 0 { sums[d] / valid[d] as f64 } else { 0.0 }).collect();
    let total: f64 = (0..nd).map(|d| weights[d] as f64 * per[d]).sum();
    let mut values = vec![total as f32];
    values.extend(per.iter().map(|&v| v as f32));
    let loss = CpuTensor::f32_unchecked(vec![1 + nd], values);
    if !with_grad {
        return Ok((loss, None));
    }
    let mut grad = vec![0.0f32; xv.len()];
    grad.par_chunks_mut(cmax).enumerate().for_each(|(pix, gr)| {
        let label = lv[pix];
        if label as i64 == IGNORE_LABEL {
            return;
        }
        let d = ds[pix / hw];
        let scale = weights[d] as f64 / valid[d] as f64 * opts.grad_scale as f64;
        let l = lse(pix, num_classes[d]);
        for (c, g) in gr[..num_classes[d]].iter_mut().enumerate() {
            let soft = (xv[pix * cmax + c] as f64 - l).exp();
            let onehot = if c == label as usize { 1.0 } else { 0.0 };
            *g = ((soft - onehot) * scale) as f32;
        }
    });
    Ok((loss, Some(CpuTensor::float(logits.shape().to_vec(), grad, logits.dtype()))))
}

pub(crate) fn argmax(logits: &CpuTensor, datasets: &CpuTensor, num_classes: &[usize]) -> Result<CpuTensor> {
    let [n, h, w, cmax] = nhwc("argmax logits", logits)?;
    let xv = float_of("argmax logits", logits)?;
    if n * h * w > i32::MAX as usize {
        return Err(Error::InvalidShape {
            what: "argmax logits",
            shape: logits.shape().to_vec(),
            reason: "N*H*W must be below 2^31 pixels".into(),
        });
    }
    let dv = i32_of("dataset indices", datasets)?;
    shape_is("dataset indices", datasets, &[n])?;
    check_heads(num_classes, cmax)?;
    let ds = dataset_indices(dv, num_classes.len())?;
    let hw = h * w;
    let pred = (0..n * hw)
        .into_par_iter()
        .map(|pix| {
            let x = &xv[pix * cmax..pix * cmax + num_classes[ds[pix / hw]]];
            let mut best = 0usize;
            for (c, &v) in x.iter().enumerate().skip(1) {
                let b = x[best];
                if b.is_nan() {
                    break;
                }
                if v.is_nan() || v > b {
                    best = c;
                }
            }
            best as i32
        })
        .collect();
    Ok(CpuTensor::i32_unchecked(vec![n, h, w], pred))
}
