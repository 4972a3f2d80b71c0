//! CamVid in the 11-class SegNet layout: `{split}/{name}.png`, labelled by
//! `{split}annot/{name}.png` with values 0..11 (see [`CAMVID_CLASSES`]) and 11 = Unlabelled,
//! which is void (→ 255).

use std::path::Path;

use super::{files_with_suffix, non_empty, require_dir, require_label, with_one_mapping};
use crate::data::dataset::FileDataset;
use crate::data::labels::{LabelMapping, CAMVID_CLASSES, CAMVID_PALETTE};
use crate::error::Result;

/// Split `split` (`train`, `val`, `test`) at `root`.
pub fn open(root: &Path, split: &str) -> Result<FileDataset> {
    let images = root.join(split);
    let annots = root.join(format!("{split}annot"));
    require_dir(&images)?;
    require_dir(&annots)?;
    let mut pairs = Vec::new();
    for image in files_with_suffix(&images, &[".png"])? {
        let name = image.file_name().unwrap_or_default().to_owned();
        let label = require_label(annots.join(name), &image)?;
        pairs.push((image, label));
    }
    let classes = CAMVID_CLASSES.iter().map(|s| s.to_string()).collect();
    let ds = with_one_mapping("camvid", split, classes, CAMVID_PALETTE.to_vec(), LabelMapping::camvid(), pairs);
    non_empty(ds, &images, "PNG image")
}
