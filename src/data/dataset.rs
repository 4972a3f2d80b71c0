//! The dataset abstraction every loader, trainer and evaluator reads through: a split of a
//! segmentation dataset as a list of samples, each an RGB image and (when the split has labels)
//! a label map in the dataset's own classes with 255 as the ignore label.
//!
//! [`FileDataset`] is a split on disk — a list of (image file, label file) pairs with the label
//! mapping of its layout; the published layouts of Cityscapes, BDD100K, CamVid and KITTI and a
//! generic list file build one ([`DatasetKind::open`], `super::layouts`). The synthetic domains
//! are one too ([`super::SyntheticSplit`]).

use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::image::{data_err, decode_image, decode_labels, RgbImage};
use super::labels::{palette_for, LabelMapping};
use crate::error::{Error, Result};

/// A label map in a dataset's classes: `0..num_classes` or 255, row-major `[height, width]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// One class (or 255) per pixel.
    pub data: Vec<u8>,
}

/// One decoded sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegSample {
    /// The photo.
    pub image: RgbImage,
    /// Its labels, of the image's size; `None` for an unlabelled split.
    pub labels: Option<LabelMap>,
}

/// A split of a segmentation dataset.
///
/// Implementations are cheap to share between threads: the loader decodes samples of one
/// dataset on several threads at once.
pub trait SegDataset: Send + Sync + fmt::Debug {
    /// The dataset's name (`cityscapes`, `bdd100k`, ...): checkpoints and reports use it.
    fn name(&self) -> &str;
    /// The split (`train`, `val`, ...).
    fn split(&self) -> &str;
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when the split has no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// One name per class; their number is the width of the dataset's head.
    fn class_names(&self) -> &[String];
    /// Number of classes.
    fn num_classes(&self) -> usize {
        self.class_names().len()
    }
    /// One colour per class, for colourised predictions.
    fn palette(&self) -> Vec<[u8; 3]> {
        palette_for(self.name(), self.num_classes())
    }
    /// Whether samples carry labels.
    fn has_labels(&self) -> bool;
    /// A short name of sample `index`, unique in the split (file stem): saved predictions use it.
    fn sample_name(&self, index: usize) -> String;
    /// Where sample `index` comes from (its image file), for messages.
    fn describe(&self, index: usize) -> String;
    /// Decodes the image of sample `index` only (unlabelled use: no label file is read).
    fn image(&self, index: usize) -> Result<RgbImage>;
    /// Decodes sample `index`: its image and, when the split has labels, its labels, which
    /// must have the image's size.
    fn sample(&self, index: usize) -> Result<SegSample>;
}

/// Checks a dataset before anything uses it: it has samples, and every sample decodes (image
/// and labels, same size, labels within the classes). Runs on `workers` threads (0 = the
/// current thread); the error returned is the one of the lowest index, whatever the threads.
pub fn verify(dataset: &dyn SegDataset, workers: usize, progress: &(dyn Fn(usize) + Sync)) -> Result<()> {
    if dataset.is_empty() {
        return Err(Error::Data {
            path: format!("{} ({} split)", dataset.name(), dataset.split()),
            message: "the split has no samples".into(),
        });
    }
    let check = |i: usize| {
        let r = dataset.sample(i).map(|_| ());
        progress(i);
        r
    };
    if workers == 0 {
        return (0..dataset.len()).try_for_each(check);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers)
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start {workers} verification threads: {e}")))?;
    let results: Vec<Result<()>> = pool.install(|| (0..dataset.len()).into_par_iter().map(check).collect());
    results.into_iter().collect()
}

/// One sample of a [`FileDataset`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileItem {
    /// The image file (PNG or JPEG).
    pub image: PathBuf,
    /// The label file (PNG) and the index of its mapping in [`FileDataset::mappings`].
    pub labels: Option<(PathBuf, usize)>,
}

/// A split on disk: image and label files with their label mappings.
#[derive(Debug, Clone, PartialEq)]
pub struct FileDataset {
    /// Dataset name.
    pub name: String,
    /// Split name.
    pub split: String,
    /// Class names.
    pub classes: Vec<String>,
    /// Class colours.
    pub palette: Vec<[u8; 3]>,
    /// The label mappings the items refer to.
    pub mappings: Vec<LabelMapping>,
    /// The samples, in a fixed order (sorted paths).
    pub items: Vec<FileItem>,
}

impl FileDataset {
    /// An unlabelled view of the same split: the images only (for semi-supervised training or
    /// for predicting on images without ground truth).
    pub fn without_labels(mut self) -> Self {
        for it in &mut self.items {
            it.labels = None;
        }
        self
    }

    fn labels_of(&self, index: usize, item: &FileItem, image: &RgbImage) -> Result<Option<LabelMap>> {
        let Some((path, mapping)) = &item.labels else { return Ok(None) };
        let raw = decode_labels(path)?;
        if (raw.width, raw.height) != (image.width, image.height) {
            return Err(data_err(
                path,
                format!(
                    "label map is {}×{} but its image {} is {}×{}",
                    raw.width,
                    raw.height,
                    self.items[index].image.display(),
                    image.width,
                    image.height
                ),
            ));
        }
        let data = self.mappings[*mapping].apply(&raw, path)?;
        Ok(Some(LabelMap { width: raw.width, height: raw.height, data }))
    }

    fn item(&self, index: usize) -> Result<&FileItem> {
        self.items.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "sample {index} of {} {}: the split has {}",
                self.name,
                self.split,
                self.len()
            ))
        })
    }
}

impl SegDataset for FileDataset {
    fn name(&self) -> &str {
        &self.name
    }
    fn split(&self) -> &str {
        &self.split
    }
    fn len(&self) -> usize {
        self.items.len()
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
    fn palette(&self) -> Vec<[u8; 3]> {
        self.palette.clone()
    }
    fn has_labels(&self) -> bool {
        self.items.iter().all(|i| i.labels.is_some())
    }
    fn sample_name(&self, index: usize) -> String {
        self.items
            .get(index)
            .and_then(|i| i.image.file_stem())
            .map_or(format!("{index}"), |s| s.to_string_lossy().trim_end_matches("_leftImg8bit").to_string())
    }
    fn describe(&self, index: usize) -> String {
        self.items.get(index).map_or(format!("sample {index}"), |i| i.image.display().to_string())
    }
    fn image(&self, index: usize) -> Result<RgbImage> {
        decode_image(&self.item(index)?.image)
    }
    fn sample(&self, index: usize) -> Result<SegSample> {
        let item = self.item(index)?;
        let image = decode_image(&item.image)?;
        let labels = self.labels_of(index, item, &image)?;
        Ok(SegSample { image, labels })
    }
}

/// The dataset layouts `--data NAME=PATH` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// `leftImg8bit/{split}/{city}/*_leftImg8bit.png` + `gtFine/{split}/{city}/*_gtFine_labelIds.png`
    /// (or `*_labelTrainIds.png`).
    Cityscapes,
    /// `images/10k/{split}/*.jpg` + `labels/sem_seg/masks/{split}/*.png`.
    Bdd100k,
    /// `{split}/*.png` + `{split}annot/*.png` (the 11-class SegNet layout).
    CamVid,
    /// `training/image_2/*.png` + `training/semantic/*.png` (Cityscapes label ids).
    Kitti,
    /// `{split}.txt` (lines of `image label` paths relative to the root) + `classes.txt`.
    List,
}

impl DatasetKind {
    /// Every kind with its name.
    pub const ALL: [(DatasetKind, &'static str); 5] = [
        (DatasetKind::Cityscapes, "cityscapes"),
        (DatasetKind::Bdd100k, "bdd100k"),
        (DatasetKind::CamVid, "camvid"),
        (DatasetKind::Kitti, "kitti"),
        (DatasetKind::List, "list"),
    ];

    /// Parses a name (`cityscapes`, `bdd100k`, `camvid`, `kitti`, `list`).
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)).map(|(k, _)| *k).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
            Error::InvalidArgument(format!("unknown dataset {name:?}: use one of {}", names.join(", ")))
        })
    }

    /// The name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(k, _)| *k == self).map_or("?", |(_, n)| n)
    }

    /// Opens split `split` of the dataset at `root` with its labels. Files are listed and
    /// paired here (a missing folder or an image without its label file is an error); they
    /// are decoded when a sample is read, or by [`verify`].
    pub fn open(self, root: &Path, split: &str) -> Result<FileDataset> {
        use super::layouts as l;
        match self {
            DatasetKind::Cityscapes => l::cityscapes::open(root, split),
            DatasetKind::Bdd100k => l::bdd100k::open(root, split),
            DatasetKind::CamVid => l::camvid::open(root, split),
            DatasetKind::Kitti => l::kitti::open(root, split),
            DatasetKind::List => l::list::open(root, split),
        }
    }
}
