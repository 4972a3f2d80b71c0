//! Universal Semi-Supervised Segmentation (USSS, Kalluri et al.) on top of DAT: per-dataset
//! unlabelled batches beside the labelled ones, and the objective
//! `L = L_sup + α·L_cross + β·L_within`.
//!
//! - **Features.** The trunk's features (the input of every head: after the PPM, the 3×3 DAB
//!   and Dropout2d, at output stride 8). The unlabelled images of an iteration run as ONE more
//!   forward pass through the trunk (each sample in its dataset's BN slice), after the labelled
//!   passes; no head sees them.
//! - **Prototypes** ([`Prototypes`]): per (dataset, class) the mean feature of the labelled
//!   pixels of that class, the labels taken at the feature resolution by nearest neighbour
//!   (ignored pixels skipped), kept as an **exponential moving average** over iterations:
//!   `proto ← m·proto + (1 − m)·batch_mean` (`m` = [`UsssConfig::prototype_momentum`]), the first
//!   batch mean taken as it is. Why not per-iteration batch means: a batch of a few crops lacks
//!   most classes, and a class missing from the batch would then have no prototype at all; the
//!   average also damps the noise of Dropout2d in the features. An iteration uses the
//!   prototypes of the iterations before it and then adds its own labelled features (read back
//!   once, after the step): they are constants of the step, no gradient flows into them. Rows
//!   are L2-normalised before use (our option; the source says "dot product"), the similarity is
//!   `⟨f, proto⟩ / T`.
//! - **Loss** ([`crate::ops::usss`] through [`Graph::usss`]): for an unlabelled pixel of
//!   dataset d, `H_within` is the entropy of the softmax over its similarities to d's
//!   prototypes, `H_cross` the mean over the other datasets d' of the entropy against d''s; each
//!   averaged over the unlabelled pixels. A class without a prototype yet takes no part; while a
//!   dataset has no prototype at all (the first iteration), the iteration has no USSS term.
//! - **α = β = 0** turns USSS off: the unlabelled batches are not forwarded at all (they would
//!   only move the BN statistics), so the run is exactly the supervised one.
//!
//! Prototypes are not written to checkpoints: a resumed run rebuilds them from its first
//! iterations.

use crate::autograd::{Graph, Scalar, UsssSpec, Var};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::usss::{UsssLoss, UsssOptions};
use crate::rng::splitmix64;

use super::{Batch, Mode, StepStats, Trainer};

/// USSS settings of a run ([`super::TrainConfig::usss`]); α = β = 0 (the default) is off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsssConfig {
    /// Weight α of the cross-dataset entropy.
    pub alpha: f32,
    /// Weight β of the within-dataset entropy.
    pub beta: f32,
    /// Softmax temperature T of the similarities.
    pub temperature: f32,
    /// Momentum m of the prototypes' moving average, in `[0, 1)` (0: the previous iteration's
    /// batch means).
    pub prototype_momentum: f32,
}

impl Default for UsssConfig {
    fn default() -> Self {
        UsssConfig { alpha: 0.0, beta: 0.0, temperature: 1.0, prototype_momentum: 0.9 }
    }
}

impl UsssConfig {
    /// Whether the run trains with the USSS term (α or β nonzero).
    pub fn active(&self) -> bool {
        self.alpha != 0.0 || self.beta != 0.0
    }

    /// Finite, non-negative weights; a positive finite temperature; a momentum in `[0, 1)`.
    pub fn check(&self) -> Result<()> {
        for (name, v) in [("alpha", self.alpha), ("beta", self.beta)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::InvalidArgument(format!("USSS {name} must be finite and >= 0, got {v}")));
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "USSS temperature must be finite and positive, got {}",
                self.temperature
            )));
        }
        if !(0.0..1.0).contains(&self.prototype_momentum) {
            return Err(Error::InvalidArgument(format!(
                "USSS prototype momentum must be in [0, 1), got {}",
                self.prototype_momentum
            )));
        }
        Ok(())
    }

    /// The settings and the trainer's mode together: USSS needs one head per dataset (dataset
    /// d's prototypes in head d's classes) and one backward per iteration.
    pub(crate) fn check_mode(&self, mode: &Mode) -> Result<()> {
        self.check()?;
        if self.active() && !matches!(mode, Mode::Dat | Mode::SharedBn) {
            return Err(Error::InvalidArgument(format!(
                "USSS trains with modes dat and shared-bn (one head per dataset, one backward per iteration), not {}",
                mode.name()
            )));
        }
        Ok(())
    }
}

/// One dataset's unlabelled images, on the host: `[N, H, W, 3]` f32.
#[derive(Debug, Clone, PartialEq)]
pub struct UnlabeledBatch {
    /// Which dataset the images come from.
    pub dataset: usize,
    /// Samples.
    pub n: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// NHWC images.
    pub images: Vec<f32>,
}

/// What one semi-supervised iteration measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SemiStepStats {
    /// The supervised figures; `total` includes the USSS term.
    pub step: StepStats,
    /// The USSS loss of the unlabelled pixels (`None`: no USSS term this iteration — off, no
    /// unlabelled batch, or a dataset without prototypes yet).
    pub usss: Option<UsssLoss>,
}

/// The class prototypes of every dataset: a moving average of labelled features per
/// (dataset, class), in f64 on the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prototypes {
    /// `[dataset][class]`: the averaged feature, once the class was seen.
    pub means: Vec<Vec<Option<Vec<f64>>>>,
}

impl Prototypes {
    /// Folds one labelled batch's features `[n, fh, fw, e]` (f32 host values) and its labels
    /// `[n, h, w]` into dataset `dataset`'s prototypes (classes `0..classes`; 255 and other
    /// labels outside are skipped).
    pub fn update(
        &mut self,
        dataset: usize,
        classes: usize,
        feat: (&[f32], [usize; 4]),
        labels: (&[i32], [usize; 3]),
        momentum: f64,
    ) {
        let (fv, [n, fh, fw, e]) = feat;
        let (lv, [_, h, w]) = labels;
        if self.means.len() <= dataset {
            self.means.resize(dataset + 1, Vec::new());
        }
        let mut sums = vec![(vec![0.0f64; e], 0usize); classes];
        for ni in 0..n {
            for i in 0..fh {
                // The label under the feature pixel's centre (nearest neighbour).
                let y = (((2 * i + 1) * h) / (2 * fh)).min(h - 1);
                for j in 0..fw {
                    let x = (((2 * j + 1) * w) / (2 * fw)).min(w - 1);
                    let l = lv[(ni * h + y) * w + x];
                    let Some((sum, count)) = usize::try_from(l).ok().and_then(|l| sums.get_mut(l)) else { continue };
                    let f = &fv[((ni * fh + i) * fw + j) * e..][..e];
                    sum.iter_mut().zip(f).for_each(|(s, &v)| *s += v as f64);
                    *count += 1;
                }
            }
        }
        let slot = &mut self.means[dataset];
        if slot.len() < classes {
            slot.resize(classes, None);
        }
        for (c, (sum, count)) in sums.into_iter().enumerate() {
            if count == 0 {
                continue;
            }
            let mean = sum.into_iter().map(|s| s / count as f64);
            slot[c] = Some(match slot[c].take() {
                Some(old) if old.len() == e => {
                    old.iter().zip(mean).map(|(o, m)| momentum * o + (1.0 - momentum) * m).collect()
                }
                _ => mean.collect(),
            });
        }
    }

    /// The table of `num_datasets` datasets for the loss: every known prototype, L2-normalised,
    /// dataset 0's first, with the number of rows of each dataset; `None` while a dataset has
    /// none (or a prototype is all zeros).
    pub fn table(&self, num_datasets: usize) -> Option<(Vec<f32>, Vec<usize>, usize)> {
        let mut table = Vec::new();
        let mut counts = Vec::with_capacity(num_datasets);
        let mut e = None;
        for d in 0..num_datasets {
            let mut count = 0;
            for p in self.means.get(d)?.iter().flatten() {
                let norm = p.iter().map(|v| v * v).sum::<f64>().sqrt();
                if !(norm.is_finite() && norm > 0.0) || e.is_some_and(|e| e != p.len()) {
                    return None;
                }
                e = Some(p.len());
                table.extend(p.iter().map(|v| (v / norm) as f32));
                count += 1;
            }
            if count == 0 {
                return None;
            }
            counts.push(count);
        }
        Some((table, counts, e?))
    }
}

fn check_unlabeled(b: &UnlabeledBatch) -> Result<()> {
    let px = b.n.checked_mul(b.h).and_then(|v| v.checked_mul(b.w));
    match px {
        Some(px) if px > 0 && b.images.len() == px * 3 => Ok(()),
        _ => Err(Error::InvalidShape {
            what: "unlabelled batch",
            shape: vec![b.n, b.h, b.w],
            reason: format!("{} image values do not make N×H×W×3", b.images.len()),
        }),
    }
}

impl<B: Backend> Trainer<B> {
    /// The class prototypes built so far.
    pub fn prototypes(&self) -> &Prototypes {
        &self.prototypes
    }

    /// One semi-supervised iteration: the labelled `batches` as [`Trainer::step`] runs them,
    /// plus the USSS entropy of the `unlabeled` images (one pass, one image size) against the
    /// prototypes of the iterations before; then this iteration's labelled features update the
    /// prototypes. With USSS off (α = β = 0) exactly [`Trainer::step`] on `batches`.
    pub fn step_semi(&mut self, batches: &[Batch], unlabeled: &[UnlabeledBatch]) -> Result<SemiStepStats> {
        if !self.config.usss.active() {
            return Ok(SemiStepStats { step: self.step(batches)?, usss: None });
        }
        self.backend.begin_step()?;
        let stats = self.semi_in_scope(batches, unlabeled);
        self.backend.end_step();
        stats
    }

    fn semi_in_scope(&mut self, batches: &[Batch], unlabeled: &[UnlabeledBatch]) -> Result<SemiStepStats> {
        let heads = self.model.num_heads();
        for b in unlabeled {
            check_unlabeled(b)?;
            self.route(b.dataset)?;
            if (b.h, b.w) != (unlabeled[0].h, unlabeled[0].w) {
                return Err(Error::InvalidArgument(
                    "the unlabelled batches of an iteration need one image size".into(),
                ));
            }
        }
        let lr = self.learning_rate(self.iter);
        self.store.sync_copies()?;
        let tracked = self.batches_tracked();
        self.captured = Some(Vec::new());
        let forward = self.forward_all(batches);
        let captured = self.captured.take().unwrap_or_default();
        let (mut g, root, mains) = forward?;
        let table = self.prototypes.table(heads);
        let usss = match (table, unlabeled.is_empty()) {
            (Some(table), false) => Some(self.unlabeled_pass(&mut g, unlabeled, table)?),
            _ => None,
        };
        let root = match usss {
            Some(s) => g.weighted_sum(&[(root, 1.0), (s, 1.0)]),
            None => root,
        };
        let flag = self.optimise(&mut g, root, lr, &tracked)?;
        let stats = self.read_stats(&g, root, &mains, flag.as_ref(), batches)?;
        self.scale_after(stats.skipped);
        let usss = match usss.and_then(|s| g.loss_tensor(s)) {
            Some(t) => match self.backend.to_f32(t)?[..] {
                [total, cross, within] => Some(UsssLoss { total, cross, within }),
                _ => None,
            },
            None => None,
        };
        let momentum = self.config.usss.prototype_momentum as f64;
        for (b, var) in batches.iter().zip(captured) {
            let f = g.value(var);
            let dims = match *crate::backend::TensorLike::shape(f) {
                [n, h, w, e] => [n, h, w, e],
                ref s => {
                    return Err(Error::InvalidShape {
                        what: "trunk features",
                        shape: s.to_vec(),
                        reason: "expected NHWC".into(),
                    })
                }
            };
            let values = self.backend.to_f32(f)?;
            let labels = self.labels_for(b)?;
            let classes = self.model.config.num_classes[self.head_of(b.dataset)?];
            self.prototypes.update(b.dataset, classes, (&values, dims), (&labels, [b.n, b.h, b.w]), momentum);
        }
        self.iter += 1;
        Ok(SemiStepStats { step: stats, usss })
    }

    /// The unlabelled images through the trunk (one pass) and their USSS loss.
    fn unlabeled_pass(
        &mut self,
        g: &mut Graph<B>,
        unlabeled: &[UnlabeledBatch],
        (table, counts, e): (Vec<f32>, Vec<usize>, usize),
    ) -> Result<Scalar> {
        let (h, w) = (unlabeled[0].h, unlabeled[0].w);
        let n: usize = unlabeled.iter().map(|b| b.n).sum();
        let mut images = Vec::with_capacity(n * h * w * 3);
        let (mut slices, mut owners) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for b in unlabeled {
            images.extend_from_slice(&b.images);
            slices.extend(std::iter::repeat_n(self.bn_slice(b.dataset)?, b.n));
            owners.extend(std::iter::repeat_n(b.dataset as i32, b.n));
        }
        let x = self.backend.tensor_float(&[n, h, w, 3], &images, self.config.precision.storage())?;
        let x = g.input(x);
        let dsv = g.datasets(&slices)?;
        // Dropout masks of their own: the labelled passes use pass numbers from 0.
        let seed = splitmix64(self.config.seed, ((self.iter as u64) << 16) | 0x8000);
        let set = self.route(unlabeled[0].dataset)?.conv_set;
        let (feat, _) = self.model.features_in_set(g, &mut self.store, x, dsv, seed, set)?;
        let owners: Var = g.input_i32(&[n], &owners)?;
        let protos = self.backend.tensor_f32(&[table.len() / e, e], &table)?;
        let c = &self.config.usss;
        let spec = UsssSpec {
            classes_per_dataset: counts,
            options: UsssOptions { temperature: c.temperature, alpha: c.alpha, beta: c.beta },
            expected_grad: Some(self.seed()),
        };
        g.usss(feat, owners, protos, &spec)
    }
}
