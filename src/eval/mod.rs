//! Evaluation of a trained model on a dataset split: each image is decoded and normalised on a
//! pool of loader threads (a few images ahead), segmented with the chosen head and BN slice
//! ([`infer`]: whole image or sliding window, scales, flips), and counted into the split's
//! confusion matrix ([`report`]).

pub mod infer;
pub mod report;

use std::sync::Arc;

use rayon::prelude::*;

pub use infer::{argmax, predict_probs, ImageRef, InferOptions, Window};
pub use report::{to_csv, ClassScore, DatasetReport};

use crate::backend::Backend;
use crate::data::{AugmentConfig, Prefetcher, SegDataset};
use crate::error::{Error, Result};
use crate::train::Trainer;

/// Which head and BN slice segment a dataset, and under which names the report shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The classifier head.
    pub head: usize,
    /// The DSBN slice.
    pub bn: usize,
    /// Name of the head's dataset.
    pub head_name: String,
    /// Name of the slice's dataset.
    pub bn_name: String,
}

/// One evaluated image, handed to the caller (to save a colourised prediction, to advance a
/// progress bar).
#[derive(Debug, Clone, Copy)]
pub struct Predicted<'a> {
    /// Index in the split.
    pub index: usize,
    /// Width.
    pub width: usize,
    /// Height.
    pub height: usize,
    /// The predicted class of every pixel.
    pub classes: &'a [u8],
}

struct Loaded {
    index: usize,
    image: Vec<f32>,
    labels: Vec<u8>,
    width: usize,
    height: usize,
}

/// Evaluates `dataset` (which must have labels) with `route`, decoding on `workers` threads.
pub fn evaluate_dataset<B: Backend>(
    trainer: &mut Trainer<B>,
    dataset: Arc<dyn SegDataset>,
    route: &Route,
    opts: &InferOptions,
    workers: usize,
    mut on_image: impl FnMut(Predicted<'_>) -> Result<()>,
) -> Result<DatasetReport> {
    opts.validate()?;
    let heads = &trainer.model.config.num_classes;
    let classes = *heads.get(route.head).ok_or_else(|| {
        Error::InvalidArgument(format!("head {} does not exist: the model has {}", route.head, heads.len()))
    })?;
    if dataset.num_classes() != classes {
        return Err(Error::InvalidArgument(format!(
            "{} has {} classes but head {} ({}) predicts {classes}: evaluate it with a head of its label space",
            dataset.name(),
            dataset.num_classes(),
            route.head,
            route.head_name
        )));
    }
    if !dataset.has_labels() || dataset.is_empty() {
        return Err(Error::Data {
            path: format!("{} ({} split)", dataset.name(), dataset.split()),
            message: "nothing to evaluate: the split has no labelled samples".into(),
        });
    }
    let mut report = DatasetReport::new(
        dataset.name(),
        dataset.split(),
        &route.head_name,
        &route.bn_name,
        dataset.class_names().to_vec(),
    );
    let chunk = workers.max(1);
    let len = dataset.len();
    let norm = AugmentConfig::default();
    let ds = dataset.clone();
    let mut loader = Prefetcher::new(0, len.div_ceil(chunk), workers, 2, move |k| -> Result<Vec<Loaded>> {
        (k * chunk..((k + 1) * chunk).min(len))
            .into_par_iter()
            .map(|index| {
                let s = ds.sample(index)?;
                let labels = s.labels.map(|l| l.data).unwrap_or_default();
                let (width, height) = (s.image.width, s.image.height);
                Ok(Loaded { index, image: norm.normalize(&s.image), labels, width, height })
            })
            .collect()
    })?;
    while let Some(batch) = loader.next() {
        for item in batch? {
            let image = ImageRef { data: &item.image, height: item.height, width: item.width };
            let probs = predict_probs(trainer, image, route.head, route.bn, opts)?;
            let pred = argmax(&probs, classes);
            report.add(&item.labels, &pred)?;
            on_image(Predicted { index: item.index, width: item.width, height: item.height, classes: &pred })?;
        }
    }
    Ok(report)
}

/// A colourised prediction: each class in its palette colour (black beyond the palette).
pub fn colorize(classes: &[u8], palette: &[[u8; 3]]) -> Vec<u8> {
    classes.iter().flat_map(|&c| palette.get(c as usize).copied().unwrap_or([0, 0, 0])).collect()
}
