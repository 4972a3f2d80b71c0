//! Held-out evaluation: per-dataset confusion matrices and mIoU with the model in evaluation
//! mode (running statistics, no dropout, nothing recorded).

use crate::autograd::Graph;
use crate::backend::Backend;
use crate::error::Result;
use crate::ops::metrics::{confusion_offsets, ConfusionMatrices};

use super::{Batch, Trainer};

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
/// prediction) pairs; labels 255 are skipped, labels outside the head are an error.
pub fn evaluate<B: Backend>(trainer: &mut Trainer<B>, batches: &[Batch]) -> Result<EvalResult> {
    let heads = trainer.model.config.num_classes.clone();
    let (offsets, total) = confusion_offsets(&heads);
    let mut confusion = ConfusionMatrices::new(&heads);
    for b in batches {
        super::check_batch(b)?;
        let be = trainer.backend().clone();
        let mut g = Graph::new(&be, false);
        let x = g.input(be.tensor_f32(&[b.n, b.h, b.w, 3], &b.images)?);
        let ds = g.datasets(&vec![trainer.bn_slice(b.dataset); b.n])?;
        let head = trainer.head_of(b.dataset);
        let out = trainer.model.forward(&mut g, &mut trainer.store, x, ds, head, 0)?;
        let up = g.resize_bilinear(out.main, b.h, b.w, trainer.model.config.align_corners)?;
        let zeros = be.tensor_i32(&[b.n], &vec![0; b.n])?;
        let pred = be.to_i32(&be.argmax(g.value(up), &zeros, &[heads[head]])?)?;
        let labels = trainer.labels_for(b);
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
        confusion.add_counts(&counts)?;
    }
    Ok(EvalResult { confusion })
}
