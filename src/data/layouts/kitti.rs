//! KITTI semantic segmentation: `training/image_2/{name}.png`, labelled by
//! `training/semantic/{name}.png` in Cityscapes label ids (mapped to the 19 train ids, every
//! other id → 255). Only the 200 `training` images have labels, so every labelled split name
//! (`train`, `val`, `training`) reads them: KITTI is the unseen domain that a model trained on
//! other datasets is evaluated on.

use std::path::Path;

use super::{files_with_suffix, non_empty, require_dir, require_label, with_one_mapping};
use crate::data::dataset::FileDataset;
use crate::data::image::data_err;
use crate::data::labels::{cityscapes_classes, cityscapes_palette, LabelMapping};
use crate::error::Result;

/// The labelled images at `root` (`split` must be `train`, `val` or `training`).
pub fn open(root: &Path, split: &str) -> Result<FileDataset> {
    if !matches!(split, "train" | "val" | "training") {
        return Err(data_err(root, format!("KITTI has labels only in `training`; split {split:?} is not one")));
    }
    let images = root.join("training").join("image_2");
    let labels = root.join("training").join("semantic");
    require_dir(&images)?;
    require_dir(&labels)?;
    let mut pairs = Vec::new();
    for image in files_with_suffix(&images, &[".png"])? {
        let name = image.file_name().unwrap_or_default().to_owned();
        let label = require_label(labels.join(name), &image)?;
        pairs.push((image, label));
    }
    let ds = with_one_mapping(
        "kitti",
        split,
        cityscapes_classes(),
        cityscapes_palette(),
        LabelMapping::cityscapes_ids(),
        pairs,
    );
    non_empty(ds, &images, "PNG image")
}
