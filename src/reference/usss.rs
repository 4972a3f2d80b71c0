//! CPU reference for the USSS (Universal Semi-Supervised Segmentation) entropy loss.
//!
//! Features are NHWC `[N, H, W, E]`; sample `n` belongs to dataset `datasets[n]`; dataset `d`
//! has prototypes `protos[d]` of shape `[C_d, E]`. For a pixel feature `f` and a dataset `d'`:
//! `s_j = ⟨f, protos[d'][j]⟩ / T`, `p = softmax(s)`, `H_d'(f) = −Σ_j p_j ln p_j` (with
//! `0 · ln 0 = 0`). Over the `M` included pixels (all, or those whose mask is true), with `d`
//! the pixel's own dataset and `D` datasets:
//!
//! - `within = (1/M) Σ_pixels H_d(f)`
//! - `cross = (1/M) Σ_pixels (1/(D−1)) Σ_{d'≠d} H_d'(f)`, and `cross = 0` when `D = 1`
//! - `total = α·cross + β·within`; everything is 0 when `M = 0`.
//!
//! The gradient uses `∂H/∂s_j = −p_j (ln p_j + H)` and `∂s_j/∂f = protos[d'][j] / T`.
//! Plain loops in f64, written from the definitions; tests check the gradient against finite
//! differences.

use ndarray::{Array4, ArrayView2, ArrayView3, ArrayView4};

use super::dsbn::ReferenceError;

/// Temperature and weights of the loss.
#[derive(Debug, Clone, Copy)]
pub struct UsssConfig {
    /// Softmax temperature T.
    pub temperature: f64,
    /// Weight of the cross-dataset entropy.
    pub alpha: f64,
    /// Weight of the within-dataset entropy.
    pub beta: f64,
}

/// The loss and its parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsssLoss {
    /// `alpha * cross + beta * within`.
    pub total: f64,
    /// Mean entropy against the other datasets' prototypes.
    pub cross: f64,
    /// Mean entropy against the own dataset's prototypes.
    pub within: f64,
}

/// Softmax probabilities of `logits` (max subtracted before exponentiating).
pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&s| (s - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// Shannon entropy (nats) of a probability vector, `0 · ln 0 = 0`.
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter().filter(|&&v| v > 0.0).map(|&v| v * v.ln()).sum::<f64>()
}

fn check(
    x: &ArrayView4<f64>,
    datasets: &[usize],
    protos: &[ArrayView2<f64>],
    mask: Option<&ArrayView3<bool>>,
) -> Result<(), ReferenceError> {
    let (n, h, w, e) = x.dim();
    if datasets.len() != n {
        return Err(ReferenceError::Shape(format!("{} dataset indices for {n} samples", datasets.len())));
    }
    if protos.is_empty() {
        return Err(ReferenceError::Shape("no datasets".into()));
    }
    for (d, pr) in protos.iter().enumerate() {
        if pr.ncols() != e || pr.nrows() == 0 {
            return Err(ReferenceError::Shape(format!(
                "prototypes of dataset {d} are {:?}, features have {e}",
                pr.dim()
            )));
        }
    }
    if let Some(m) = mask {
        if m.dim() != (n, h, w) {
            return Err(ReferenceError::Shape(format!("mask {:?} for features {:?}", m.dim(), x.dim())));
        }
    }
    if let Some((sample, &index)) = datasets.iter().enumerate().find(|(_, &d)| d >= protos.len()) {
        return Err(ReferenceError::DatasetOutOfRange { sample, index, num_datasets: protos.len() });
    }
    Ok(())
}

/// Logits of feature `f` against the prototypes of one dataset.
fn logits(f: &[f64], protos: &ArrayView2<f64>, temperature: f64) -> Vec<f64> {
    protos.rows().into_iter().map(|row| row.iter().zip(f).map(|(a, b)| a * b).sum::<f64>() / temperature).collect()
}

fn included(mask: Option<&ArrayView3<bool>>, n: usize, y: usize, x: usize) -> bool {
    mask.is_none_or(|m| m[[n, y, x]])
}

/// Number of pixels that take part.
pub fn included_pixels(x: ArrayView4<f64>, mask: Option<ArrayView3<bool>>) -> usize {
    let (n, h, w, _) = x.dim();
    mask.map_or(n * h * w, |m| m.iter().filter(|&&b| b).count())
}

/// The loss (see the module documentation).
pub fn usss_forward(
    x: ArrayView4<f64>,
    datasets: &[usize],
    protos: &[ArrayView2<f64>],
    mask: Option<ArrayView3<bool>>,
    cfg: &UsssConfig,
) -> Result<UsssLoss, ReferenceError> {
    check(&x, datasets, protos, mask.as_ref())?;
    let (n, h, w, _) = x.dim();
    let num_d = protos.len();
    let (mut within, mut cross, mut m) = (0.0, 0.0, 0usize);
    for ni in 0..n {
        for yi in 0..h {
            for xi in 0..w {
                if !included(mask.as_ref(), ni, yi, xi) {
                    continue;
                }
                m += 1;
                let f: Vec<f64> = (0..x.dim().3).map(|k| x[[ni, yi, xi, k]]).collect();
                for (d, pr) in protos.iter().enumerate() {
                    let hd = entropy(&softmax(&logits(&f, pr, cfg.temperature)));
                    if d == datasets[ni] {
                        within += hd;
                    } else {
                        cross += hd / (num_d - 1) as f64;
                    }
                }
            }
        }
    }
    if m == 0 {
        return Ok(UsssLoss { total: 0.0, cross: 0.0, within: 0.0 });
    }
    let (within, cross) = (within / m as f64, cross / m as f64);
    Ok(UsssLoss { total: cfg.alpha * cross + cfg.beta * within, cross, within })
}

/// `grad · ∂total/∂x`, like `x`; zero at excluded pixels.
pub fn usss_backward(
    grad: f64,
    x: ArrayView4<f64>,
    datasets: &[usize],
    protos: &[ArrayView2<f64>],
    mask: Option<ArrayView3<bool>>,
    cfg: &UsssConfig,
) -> Result<Array4<f64>, ReferenceError> {
    check(&x, datasets, protos, mask.as_ref())?;
    let (n, h, w, e) = x.dim();
    let num_d = protos.len();
    let mut dx = Array4::zeros(x.dim());
    let m = included_pixels(x, mask);
    if m == 0 {
        return Ok(dx);
    }
    for ni in 0..n {
        for yi in 0..h {
            for xi in 0..w {
                if !included(mask.as_ref(), ni, yi, xi) {
                    continue;
                }
                let f: Vec<f64> = (0..e).map(|k| x[[ni, yi, xi, k]]).collect();
                for (d, pr) in protos.iter().enumerate() {
                    let weight = if d == datasets[ni] {
                        cfg.beta / m as f64
                    } else {
                        cfg.alpha / (m as f64 * (num_d - 1) as f64)
                    };
                    let p = softmax(&logits(&f, pr, cfg.temperature));
                    let hd = entropy(&p);
                    for (j, row) in pr.rows().into_iter().enumerate() {
                        let dh_ds = if p[j] > 0.0 { -p[j] * (p[j].ln() + hd) } else { 0.0 };
                        for k in 0..e {
                            dx[[ni, yi, xi, k]] += grad * weight * dh_ds * row[k] / cfg.temperature;
                        }
                    }
                }
            }
        }
    }
    Ok(dx)
}
