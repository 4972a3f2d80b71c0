//! The published folder layouts of the real datasets, each turned into a [`FileDataset`]:
//! listing and pairing files (sorted, so a split's order is the same on every machine) and the
//! label mapping of the layout. Nothing is decoded here.

pub mod bdd100k;
pub mod camvid;
pub mod cityscapes;
pub mod kitti;
pub mod list;

use std::path::{Path, PathBuf};

use super::dataset::{FileDataset, FileItem};
use super::image::data_err;
use super::labels::LabelMapping;
use crate::error::Result;

/// `dir` must be a directory.
pub(crate) fn require_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(data_err(dir, "is not a directory")),
        Err(_) => Err(data_err(dir, "no such directory")),
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    require_dir(dir)?;
    let entries = std::fs::read_dir(dir).map_err(|e| data_err(dir, format!("cannot list: {e}")))?;
    let mut out = Vec::new();
    for e in entries {
        out.push(e.map_err(|e| data_err(dir, format!("cannot list: {e}")))?.path());
    }
    out.sort();
    Ok(out)
}

/// The files of `dir` whose name ends with one of `suffixes` (ASCII case-insensitive), sorted.
pub(crate) fn files_with_suffix(dir: &Path, suffixes: &[&str]) -> Result<Vec<PathBuf>> {
    Ok(read_dir_sorted(dir)?
        .into_iter()
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            suffixes.iter().any(|s| name.ends_with(&s.to_ascii_lowercase()))
        })
        .collect())
}

/// The sub-directories of `dir`, sorted.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(read_dir_sorted(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

/// A label file that must exist beside its image.
pub(crate) fn require_label(label: PathBuf, image: &Path) -> Result<PathBuf> {
    if label.is_file() {
        Ok(label)
    } else {
        Err(data_err(&label, format!("no such label file (the label of {})", image.display())))
    }
}

/// A dataset whose every item uses `mapping`.
pub(crate) fn with_one_mapping(
    name: &str,
    split: &str,
    classes: Vec<String>,
    palette: Vec<[u8; 3]>,
    mapping: LabelMapping,
    pairs: Vec<(PathBuf, PathBuf)>,
) -> FileDataset {
    FileDataset {
        name: name.to_string(),
        split: split.to_string(),
        classes,
        palette,
        mappings: vec![mapping],
        items: pairs.into_iter().map(|(image, label)| FileItem { image, labels: Some((label, 0)) }).collect(),
    }
}

/// An empty split is an error naming the folder that holds no image.
pub(crate) fn non_empty(ds: FileDataset, dir: &Path, what: &str) -> Result<FileDataset> {
    if ds.items.is_empty() {
        Err(data_err(dir, format!("the {} split of {} has no {what}", ds.split, ds.name)))
    } else {
        Ok(ds)
    }
}

/// A folder of unlabelled images (PNG or JPEG, sorted; sub-folders are not searched) as a split
/// of dataset `like` without labels: its name and classes, every item without a label map (the
/// loader gives such samples label 255 everywhere). No image is an error naming the folder.
pub fn image_folder(root: &Path, like: &FileDataset) -> Result<FileDataset> {
    let images = files_with_suffix(root, &[".png", ".jpg", ".jpeg"])?;
    let ds = FileDataset {
        name: like.name.clone(),
        split: "unlabeled".into(),
        classes: like.classes.clone(),
        palette: like.palette.clone(),
        mappings: Vec::new(),
        items: images.into_iter().map(|image| FileItem { image, labels: None }).collect(),
    };
    non_empty(ds, root, "PNG or JPEG image")
}
