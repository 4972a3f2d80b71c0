//! Precise BN (the paper's Table 7: BN recalibration on an unseen domain): forward a whole set
//! through the network with training-mode statistics, without updating a weight, and set one
//! BN slice's running mean and variance of every layer to the set's population statistics.
//!
//! **The estimate.** Batch b of the set gives, per channel, its pixel count n_b, mean μ_b and
//! (biased) variance σ²_b of the layer's input — the statistics the training forward
//! normalised with. With N = Σ n_b:
//!
//! ```text
//! μ  = Σ_b n_b·μ_b / N
//! σ² = Σ_b n_b·(σ²_b + (μ_b − μ)²) / N
//! ```
//!
//! For batches of one size this is "the mean of the per-batch means" and "the mean of the
//! per-batch variances plus the variance of the per-batch means" — the law of total variance,
//! so σ² is exactly the variance of the layer's inputs over the whole set (as each batch's
//! training forward produced them). This is the population statistic of Wu & Johnson,
//! "Rethinking 'Batch' in BatchNorm" (2021, arXiv:2105.07576, Sec. 3), where the plain
//! exponential moving average is shown to lag and the average of batch variances alone to
//! underestimate the population variance. The variance is the biased one of the N pixels (the
//! set is the population); PyTorch's unbiased N/(N−1) correction would change it by less than
//! 1/N, under 0.1% for any layer of a set of a few images.
//!
//! Only the chosen slice's running mean and variance change. γ, β, every weight, the other
//! slices and the `num_batches_tracked` counts stay bit for bit as they were.

use crate::autograd::Graph;
use crate::backend::{Backend, BnStats, BnTables, TensorLike};
use crate::error::{Error, Result};
use crate::ops::dsbn::DsbnOptions;

use super::{Batch, Trainer};

/// What [`precise_bn`] recalibrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PreciseBnOptions {
    /// The BN slice whose running statistics are set (every sample is normalised with it).
    pub bn_slice: usize,
    /// The convolution set the images go through (0 unless the convolutions are unshared).
    pub conv_set: usize,
}

/// What [`precise_bn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreciseBnReport {
    /// Images forwarded.
    pub images: usize,
    /// Batches forwarded.
    pub batches: usize,
    /// BN layers recalibrated.
    pub layers: usize,
}

/// Per layer, per batch: (pixel count, mean, biased variance) per channel.
type Moments = Vec<Vec<(f64, Vec<f64>, Vec<f64>)>>;

/// Combines per-batch moments into the population mean and (biased) variance per channel
/// (the formula of the module documentation).
pub fn population_stats(batches: &[(f64, Vec<f64>, Vec<f64>)]) -> Option<(Vec<f64>, Vec<f64>)> {
    let total: f64 = batches.iter().map(|b| b.0).sum();
    let c = batches.first()?.1.len();
    if total <= 0.0 {
        return None;
    }
    let mut mean = vec![0.0; c];
    for (n, m, _) in batches {
        for (acc, &v) in mean.iter_mut().zip(m) {
            *acc += n * v;
        }
    }
    mean.iter_mut().for_each(|v| *v /= total);
    let mut var = vec![0.0; c];
    for (n, m, s) in batches {
        for k in 0..c {
            var[k] += n * (s[k] + (m[k] - mean[k]).powi(2));
        }
    }
    var.iter_mut().for_each(|v| *v /= total);
    Some((mean, var))
}

/// Recalibrates BN slice `opts.bn_slice` of every layer on the images of `batches` (their
/// labels and dataset are not read): see the module documentation. Batches may differ in
/// size. An error before anything changed for a slice or conv set the model lacks, a
/// malformed batch or an empty set.
pub fn precise_bn<B, I>(trainer: &mut Trainer<B>, opts: &PreciseBnOptions, batches: I) -> Result<PreciseBnReport>
where
    B: Backend,
    I: IntoIterator<Item = Result<Batch>>,
{
    let cfg = &trainer.model.config;
    if opts.bn_slice >= cfg.num_bn || opts.conv_set >= cfg.conv_sets.max(1) {
        return Err(Error::InvalidArgument(format!(
            "BN slice {} / conv set {}: the model has {} slice(s) and {} conv set(s)",
            opts.bn_slice, opts.conv_set, cfg.num_bn, cfg.conv_sets
        )));
    }
    let be = trainer.backend().clone();
    let eps = DsbnOptions::default().eps as f64;
    let slice = opts.bn_slice;
    // Everything the training forwards move, to put back (all but the slice's statistics).
    let mut before = Vec::new();
    for l in trainer.store.bn_layers() {
        let t = l.tables.tables();
        let host: Vec<Vec<f32>> = t.iter().map(|t| be.to_f32(t)).collect::<Result<_>>()?;
        before.push((host, l.batches_tracked.clone()));
    }
    let mut moments: Moments = vec![Vec::new(); before.len()];
    let (mut images, mut count) = (0usize, 0usize);
    let mut result = Ok(());
    for b in batches {
        let step = b.and_then(|b| forward_moments(trainer, &b, opts, eps, &mut moments).map(|_| b.n));
        match step {
            Ok(n) => {
                images += n;
                count += 1;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() && count == 0 {
        result = Err(Error::InvalidArgument("precise BN needs at least one batch".into()));
    }
    let mut layers = 0;
    for ((l, (mut host, tracked)), m) in trainer.store.bn_layers_mut().iter_mut().zip(before).zip(&moments) {
        let c = l.channels;
        if result.is_ok() {
            if let Some((mean, var)) = population_stats(m) {
                for k in 0..c {
                    host[2][slice * c + k] = mean[k] as f32;
                    host[3][slice * c + k] = var[k] as f32;
                }
                layers += 1;
            }
        }
        for (t, v) in l.tables.tables_mut().into_iter().zip(&host) {
            be.write_f32(t, v)?;
        }
        l.batches_tracked = tracked;
    }
    result?;
    Ok(PreciseBnReport { images, batches: count, layers })
}

/// One training-mode forward of batch `b` through slice `opts.bn_slice`; appends each BN
/// layer's batch moments of that slice.
fn forward_moments<B: Backend>(
    trainer: &mut Trainer<B>,
    b: &Batch,
    opts: &PreciseBnOptions,
    eps: f64,
    moments: &mut Moments,
) -> Result<()> {
    let px = b.n.checked_mul(b.h).and_then(|v| v.checked_mul(b.w)).filter(|&p| p > 0);
    if px.and_then(|p| p.checked_mul(3)) != Some(b.images.len()) {
        return Err(Error::InvalidShape {
            what: "precise BN batch",
            shape: vec![b.n, b.h, b.w],
            reason: format!("{} image values do not make N×H×W×3", b.images.len()),
        });
    }
    let be = trainer.backend().clone();
    let mut g = Graph::new(&be, true);
    let x = be.tensor_float(&[b.n, b.h, b.w, 3], &b.images, trainer.config.precision.storage())?;
    let x = g.input(x);
    let ds = g.datasets(&vec![opts.bn_slice as i32; b.n])?;
    trainer.model.features_in_set(&mut g, &mut trainer.store, x, ds, 0, opts.conv_set)?;
    for rec in g.norm_records() {
        let c = trainer.store.bn(rec.bn).channels;
        let index = rec.bn.0;
        let shape = rec.x.shape();
        let n = shape[..shape.len() - 1].iter().product::<usize>() as f64;
        let row = opts.bn_slice * c..(opts.bn_slice + 1) * c;
        let mean = be.to_f32(rec.stats.mean())?;
        let invstd = be.to_f32(rec.stats.invstd())?;
        // invstd = 1/sqrt(var + eps) (biased batch variance): var = 1/invstd² − eps.
        let var: Vec<f64> = invstd[row.clone()].iter().map(|&s| (1.0 / (s as f64 * s as f64) - eps).max(0.0)).collect();
        let mean: Vec<f64> = mean[row].iter().map(|&v| v as f64).collect();
        if let Some(m) = moments.get_mut(index) {
            m.push((n, mean, var));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::population_stats;

    #[test]
    fn population_of_batches_is_the_law_of_total_variance() {
        // Two batches of the values {1, 3} and {5, 7, 9}: the set {1, 3, 5, 7, 9} has mean 5
        // and variance (16 + 4 + 0 + 4 + 16) / 5 = 8.
        let b = vec![(2.0, vec![2.0], vec![1.0]), (3.0, vec![7.0], vec![8.0 / 3.0])];
        let (m, v) = population_stats(&b).unwrap();
        assert!((m[0] - 5.0).abs() < 1e-12 && (v[0] - 8.0).abs() < 1e-12, "{m:?} {v:?}");
        assert!(population_stats(&[]).is_none());
    }
}
