//! BDD100K semantic segmentation (the 10K images): `images/10k/{split}/{name}.jpg`, labelled
//! by `labels/sem_seg/masks/{split}/{name}.png`, whose values are already the 19 Cityscapes
//! train ids and 255.

use std::path::Path;

use super::{files_with_suffix, non_empty, require_dir, require_label, with_one_mapping};
use crate::data::dataset::FileDataset;
use crate::data::labels::{cityscapes_classes, cityscapes_palette, LabelMapping};
use crate::error::Result;

/// Split `split` (`train`, `val`) at `root`.
pub fn open(root: &Path, split: &str) -> Result<FileDataset> {
    let images = root.join("images").join("10k").join(split);
    let masks = root.join("labels").join("sem_seg").join("masks").join(split);
    require_dir(&images)?;
    require_dir(&masks)?;
    let mut pairs = Vec::new();
    for image in files_with_suffix(&images, &[".jpg", ".jpeg", ".png"])? {
        let stem = image.file_stem().unwrap_or_default().to_string_lossy().to_string();
        let label = require_label(masks.join(format!("{stem}.png")), &image)?;
        pairs.push((image, label));
    }
    let ds = with_one_mapping(
        "bdd100k",
        split,
        cityscapes_classes(),
        cityscapes_palette(),
        LabelMapping::identity(19),
        pairs,
    );
    non_empty(ds, &images, "image")
}
