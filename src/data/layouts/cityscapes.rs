//! Cityscapes: `leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png`, labelled by
//! `gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelTrainIds.png` when that file exists
//! (made by cityscapesScripts' `createTrainIdLabelImgs`, values 0..19 and 255), else by
//! `..._gtFine_labelIds.png` mapped to the 19 train ids (every other id → 255).

use std::path::Path;

use super::{files_with_suffix, non_empty, require_dir, subdirs};
use crate::data::dataset::{FileDataset, FileItem};
use crate::data::image::data_err;
use crate::data::labels::{cityscapes_classes, cityscapes_palette, LabelMapping};
use crate::error::Result;

const IMAGE_SUFFIX: &str = "_leftImg8bit.png";

/// Split `split` (`train`, `val`, `test`, `train_extra` with gtCoarse is not read) at `root`.
pub fn open(root: &Path, split: &str) -> Result<FileDataset> {
    let images = root.join("leftImg8bit").join(split);
    let labels = root.join("gtFine").join(split);
    require_dir(&images)?;
    require_dir(&labels)?;
    // Mapping 0: train ids as stored; 1: label ids → train ids.
    let mappings = vec![LabelMapping::identity(19), LabelMapping::cityscapes_ids()];
    let mut items = Vec::new();
    for city in subdirs(&images)? {
        let city_name = city.file_name().unwrap_or_default().to_owned();
        for image in files_with_suffix(&city, &[IMAGE_SUFFIX])? {
            let file = image.file_name().unwrap_or_default().to_string_lossy().to_string();
            let stem = &file[..file.len() - IMAGE_SUFFIX.len()];
            let dir = labels.join(&city_name);
            let train_ids = dir.join(format!("{stem}_gtFine_labelTrainIds.png"));
            let ids = dir.join(format!("{stem}_gtFine_labelIds.png"));
            let label = if train_ids.is_file() {
                (train_ids, 0)
            } else if ids.is_file() {
                (ids, 1)
            } else {
                return Err(data_err(
                    &ids,
                    format!("no such label file (nor {stem}_gtFine_labelTrainIds.png) for {}", image.display()),
                ));
            };
            items.push(FileItem { image, labels: Some(label) });
        }
    }
    let ds = FileDataset {
        name: "cityscapes".into(),
        split: split.into(),
        classes: cityscapes_classes(),
        palette: cityscapes_palette(),
        mappings,
        items,
    };
    non_empty(ds, &images, "*_leftImg8bit.png image in any city folder")
}
