//! The USSS entropy loss on the CPU backend ([`crate::ops::usss`]'s contract, every pixel
//! taking part): per pixel and per dataset `d'`, the entropy of the softmax over the
//! similarities `⟨f, proto_j⟩ / T` to `d'`'s prototypes; the own dataset's entropy is the
//! within term, the mean over the other datasets the cross term; both averaged over pixels.
//!
//! Per pixel in f64, with log-probabilities from a max-shifted log-sum-exp (so a probability
//! that underflows to 0 contributes 0 to the entropy and to its gradient, without a `0 · ln 0`).
//! Per-sample partial sums are merged in sample order: the same bits whatever the thread count.

use rayon::prelude::*;

use super::check::{dataset_indices, f32_of, float_of, i32_of, nhwc, shape_is};
use super::tensor::CpuTensor;
use crate::error::{Error, Result};
use crate::ops::check::finite_positive;
use crate::ops::usss::{UsssOptions, MAX_SHARED_VALUES};

/// Losses `[3]` f32 (α·cross + β·within, cross, within) and, with `grad = Some(g)`, the gradient
/// `g · ∂total/∂x` in x's storage.
pub(crate) fn usss_entropy(
    x: &CpuTensor,
    datasets: &CpuTensor,
    protos: &CpuTensor,
    classes_per_dataset: &[usize],
    opts: &UsssOptions,
    grad: Option<f32>,
) -> Result<(CpuTensor, Option<CpuTensor>)> {
    let [n, h, w, e] = nhwc("USSS features", x)?;
    let xv = float_of("USSS features", x)?;
    let dv = i32_of("dataset indices", datasets)?;
    shape_is("dataset indices", datasets, &[n])?;
    let table = f32_of("USSS prototypes", protos)?;
    let offsets = check_prototypes(protos, classes_per_dataset, e)?;
    if let Some(i) = table.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "USSS prototypes: row {} column {} is not finite ({})",
            i / e,
            i % e,
            table[i]
        )));
    }
    finite_positive("USSS temperature", opts.temperature)?;
    let inv_t = 1.0 / opts.temperature;
    if !inv_t.is_finite() {
        return Err(Error::InvalidArgument(format!("USSS temperature {} is too small", opts.temperature)));
    }
    for (what, v) in [("alpha", opts.alpha), ("beta", opts.beta)] {
        if !v.is_finite() {
            return Err(Error::InvalidArgument(format!("USSS {what} must be finite, got {v}")));
        }
    }
    if let Some(g) = grad.filter(|g| !g.is_finite()) {
        return Err(Error::InvalidArgument(format!("USSS incoming gradient must be finite, got {g}")));
    }
    let nd = classes_per_dataset.len();
    let ds = dataset_indices(dv, nd)?;
    let hw = h * w;
    let m = n * hw;
    // The kernels' scale: 1/T as the f32 they use, the rest in f64.
    let inv_t = inv_t as f64;
    let (alpha, beta) = (opts.alpha as f64, opts.beta as f64);
    let cross_share = if nd > 1 { 1.0 / (nd - 1) as f64 } else { 0.0 };
    let row = |j: usize| &table[j * e..(j + 1) * e];

    // Log-probabilities of feature f over the prototypes `rows` (one dataset's) and their
    // entropy.
    let softmax_entropy = |f: &[f32], rows: std::ops::Range<usize>, logp: &mut Vec<f64>| -> f64 {
        logp.clear();
        for j in rows {
            let dot: f64 = row(j).iter().zip(f).map(|(&a, &b)| a as f64 * b as f64).sum();
            logp.push(dot * inv_t);
        }
        let max = logp.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = logp.iter().map(|&s| (s - max).exp()).sum::<f64>().ln() + max;
        logp.iter_mut().for_each(|s| *s -= lse);
        -logp.iter().map(|&lp| lp.exp() * lp).sum::<f64>()
    };

    type Part = (f64, f64, Vec<f64>);
    let parts: Vec<Part> = (0..n)
        .into_par_iter()
        .map(|ni| {
            let own = ds[ni];
            let (mut within, mut cross) = (0.0f64, 0.0f64);
            let mut dx = if grad.is_some() { vec![0.0f64; hw * e] } else { Vec::new() };
            let mut logp = Vec::new();
            for pix in 0..hw {
                let f = &xv[(ni * hw + pix) * e..(ni * hw + pix + 1) * e];
                for (d, span) in offsets.windows(2).enumerate() {
                    let ent = softmax_entropy(f, span[0]..span[1], &mut logp);
                    let weight = if d == own {
                        within += ent;
                        beta
                    } else {
                        cross += ent * cross_share;
                        alpha * cross_share
                    };
                    let Some(g) = grad else { continue };
                    // ∂H/∂s_j = −p_j (ln p_j + H); ∂s_j/∂f = proto_j / T.
                    let scale = g as f64 * weight / m as f64 * inv_t;
                    let out = &mut dx[pix * e..(pix + 1) * e];
                    for (k, &lp) in logp.iter().enumerate() {
                        let dh = -lp.exp() * (lp + ent) * scale;
                        for (o, &pv) in out.iter_mut().zip(row(span[0] + k)) {
                            *o += dh * pv as f64;
                        }
                    }
                }
            }
            (within, cross, dx)
        })
        .collect();
    let (mut within, mut cross) = (0.0f64, 0.0f64);
    for (wi, c, _) in &parts {
        within += wi;
        cross += c;
    }
    let (within, cross) = (within / m as f64, cross / m as f64);
    let total = alpha * cross + beta * within;
    let loss = CpuTensor::f32_unchecked(vec![3], vec![total as f32, cross as f32, within as f32]);
    let dx = grad.map(|_| {
        let v: Vec<f32> = parts.into_iter().flat_map(|(_, _, d)| d).map(|v| v as f32).collect();
        CpuTensor::float(vec![n, h, w, e], v, x.dtype())
    });
    Ok((loss, dx))
}

/// The table's shape against the class counts and the features' channels; returns each
/// dataset's first row (and the total last).
fn check_prototypes(protos: &CpuTensor, classes_per_dataset: &[usize], e: usize) -> Result<Vec<usize>> {
    let s = protos.shape();
    if s.len() != 2 || s.contains(&0) {
        return Err(Error::InvalidShape {
            what: "USSS prototypes",
            shape: s.to_vec(),
            reason: "expected [classes, channels] with both at least 1".into(),
        });
    }
    if classes_per_dataset.is_empty() || classes_per_dataset.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "USSS prototypes: every dataset needs at least one class, got {classes_per_dataset:?}"
        )));
    }
    let total = classes_per_dataset.iter().try_fold(0usize, |a, &c| a.checked_add(c));
    if total != Some(s[0]) || s[1] != e {
        return Err(Error::ShapeMismatch {
            what: "USSS prototypes",
            expected: vec![total.unwrap_or(usize::MAX), e],
            got: s.to_vec(),
        });
    }
    // The kernels' shared-memory bound, so that both backends accept the same problems.
    if e + s[0] + 3 * classes_per_dataset.len() > MAX_SHARED_VALUES {
        return Err(Error::InvalidShape {
            what: "USSS features and prototypes",
            shape: s.to_vec(),
            reason: format!("channels + prototypes + 3 x datasets must be at most {MAX_SHARED_VALUES}"),
        });
    }
    let mut offsets = vec![0usize];
    for &c in classes_per_dataset {
        offsets.push(offsets[offsets.len() - 1] + c);
    }
    Ok(offsets)
}
