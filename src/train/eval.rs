//! Held-out evaluation: per-dataset confusion matrices and mIoU with the model in evaluation
//! mode (running statistics, no dropout, nothing recorded).

use crate::autograd::Graph;
use crate::backend::Backend;
use crate::error::Result;
use crate::ops::metrics::{confusion_offsets, ConfusionMatrices};

use super::{Batch, Route, Trainer};

/// Confusion matrices of every head over the evaluated batches.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// Row = label, column = prediction, per head.
    pub confusion: ConfusionMatrices,
}

impl EvalResult {
    /// Mean IoU of dataset `d`'s head, over the classes seen.
    pub fn miou(&self, d: usize) -> Option<f64> {
        (d < self.confusion.num_classes().len()).then(|| self.confusion.miou(d)).flatten()
    }

    /// Pixel accuracy of dataset `d`'s head.
    pub fn pixel_accuracy(&self, d: usize) -> Option<f64> {
        let c = *self.confusion.num_classes().get(d)?;
        let m = self.confusion.matrix(d);
        let total: u64 = m.iter().sum();
        let diag: u64 = (0..c).map(|k| m[k * c + k]).sum();
        (total > 0).then(|| diag as f64 / total as f64)
    }
}

/// Predicts every batch with its dataset's head at label resolution and counts (label,
/// prediction) pairs; labels 255 are skipped, labels outside the head are an error. Each batch
/// goes where the mode routes its dataset ([`Trainer::route`]; a dataset the mode has no head
/// for is an error) and is scored in that head's classes (label remapping maps another
/// dataset's labels into them first).
pub fn evaluate<B: Backend>(trainer: &mut Trainer<B>, batches: &[Batch]) -> Result<EvalResult> {
    let mut confusion = ConfusionMatrices::new(&trainer.model.config.num_classes);
    for b in batches {
        super::check_batch(b)?;
        let route = trainer.route(b.dataset)?;
        let labels = trainer.labels_for(b)?;
        add_batch(trainer, b, &labels, route, &mut confusion)?;
    }
    Ok(EvalResult { confusion })
}

/// [`evaluate`] through an explicit route — BN slice, head and conv set — whatever the
/// batches' datasets (e.g. an unseen domain through each slice in turn); the labels are taken
/// as they are and must be in the head's classes.
pub fn evaluate_routed<B: Backend>(trainer: &mut Trainer<B>, batches: &[Batch], route: Route) -> Result<EvalResult> {
    let cfg = &trainer.model.config;
    if route.bn >= cfg.num_bn || route.head >= cfg.num_classes.len() || route.conv_set >= cfg.conv_sets.max(1) {
        return Err(crate::Error::InvalidArgument(format!("{route:?} is not a route of this network")));
    }
    let mut confusion = ConfusionMatrices::new(&cfg.num_classes);
    for b in batches {
        super::check_batch(b)?;
        add_batch(trainer, b, &b.labels, route, &mut confusion)?;
    }
    Ok(EvalResult { confusion })
}

fn add_batch<B: Backend>(
    trainer: &mut Trainer<B>,
    b: &Batch,
    labels: &[i32],
    route: Route,
    confusion: &mut ConfusionMatrices,
) -> Result<()> {
    let heads = trainer.model.config.num_classes.clone();
    let (offsets, total) = confusion_offsets(&heads);
    let be = trainer.backend().clone();
    let mut g = Graph::new(&be, false);
    let x = g.input(be.tensor_f32(&[b.n, b.h, b.w, 3], &b.images)?);
    let ds = g.datasets(&vec![route.bn as i32; b.n])?;
    let head = route.head;
    let model = trainer.model.in_conv_set(route.conv_set);
    let (f, a) = model.features(&mut g, &mut trainer.store, x, ds, 0)?;
    let out = model.classify(&mut g, &trainer.store, (f, a), head)?;
    let up = g.resize_bilinear(out.main, b.h, b.w, trainer.model.config.align_corners)?;
    let zeros = be.tensor_i32(&[b.n], &vec![0; b.n])?;
    let pred = be.to_i32(&be.argmax(g.value(up), &zeros, &[heads[head]])?)?;
    let c = heads[head];
    let mut counts = vec![0i32; total];
    for (i, (&l, &p)) in labels.iter().zip(&pred).enumerate() {
        if l == 255 {
            continue;
        }
        if l < 0 || l as usize >= c {
            return Err(crate::Error::InvalidLabel {
                dataset: b.dataset,
                label: l as i64,
                position: i,
                num_classes: c,
            });
        }
        counts[offsets[head] + l as usize * c + p as usize] += 1;
    }
    confusion.add_counts(&counts)
}
