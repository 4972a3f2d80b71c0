//! One synthetic domain as a [`SegDataset`]: a range of sample indices (training from 0,
//! held-out from [`HELD_OUT_START`]) whose images are the rendered scenes quantised to 8-bit RGB,
//! so that the real-data loader, augmentation and evaluation run on them like on files.

use std::sync::Arc;

use super::dataset::{LabelMap, SegDataset, SegSample};
use super::image::RgbImage;
use super::labels::palette_for;
use super::{to_rgb8, Synthetic, HELD_OUT_START};
use crate::error::{Error, Result};

/// Samples `start..start + len` of domain `domain`.
#[derive(Debug, Clone)]
pub struct SyntheticSplit {
    data: Arc<Synthetic>,
    domain: usize,
    split: String,
    start: u64,
    len: usize,
    classes: Vec<String>,
}

impl SyntheticSplit {
    /// `len` samples of `domain` from index `start`.
    pub fn new(data: Arc<Synthetic>, domain: usize, split: &str, start: u64, len: usize) -> Result<Self> {
        if domain >= data.num_domains() {
            return Err(Error::DatasetIndexOutOfRange {
                sample: 0,
                index: domain as i64,
                num_datasets: data.num_domains(),
            });
        }
        let classes = data.info(domain).class_names.clone();
        Ok(SyntheticSplit { data, domain, split: split.into(), start, len, classes })
    }

    /// The training split (`len` samples from index 0).
    pub fn train(data: Arc<Synthetic>, domain: usize, len: usize) -> Result<Self> {
        Self::new(data, domain, "train", 0, len)
    }

    /// The held-out split (`len` samples from [`HELD_OUT_START`]), which `cdcl train` evaluates.
    pub fn held_out(data: Arc<Synthetic>, domain: usize, len: usize) -> Result<Self> {
        Self::new(data, domain, "val", HELD_OUT_START, len)
    }

    fn index(&self, index: usize) -> Result<u64> {
        if index >= self.len {
            return Err(Error::InvalidArgument(format!(
                "sample {index} of synthetic {} {}: the split has {}",
                self.name(),
                self.split,
                self.len
            )));
        }
        Ok(self.start + index as u64)
    }
}

impl SegDataset for SyntheticSplit {
    fn name(&self) -> &str {
        &self.data.info(self.domain).name
    }
    fn split(&self) -> &str {
        &self.split
    }
    fn len(&self) -> usize {
        self.len
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
    fn palette(&self) -> Vec<[u8; 3]> {
        palette_for(self.name(), self.classes.len())
    }
    fn has_labels(&self) -> bool {
        true
    }
    fn sample_name(&self, index: usize) -> String {
        format!("{}_{:06}", self.name(), index)
    }
    fn describe(&self, index: usize) -> String {
        format!("synthetic {} sample {}", self.name(), self.start.wrapping_add(index as u64))
    }
    fn image(&self, index: usize) -> Result<RgbImage> {
        Ok(self.sample(index)?.image)
    }
    fn sample(&self, index: usize) -> Result<SegSample> {
        let s = self.data.sample(self.domain, self.index(index)?)?;
        let image = RgbImage { width: s.width, height: s.height, data: to_rgb8(&s.image) };
        let data = s.label.iter().map(|&l| l as u8).collect();
        Ok(SegSample { image, labels: Some(LabelMap { width: s.width, height: s.height, data }) })
    }
}
