//! A generic dataset described by list files, for any other data: `{root}/{split}.txt` holds
//! one sample a line, `IMAGE LABEL` (paths relative to `root`, separated by white space; blank
//! lines and lines starting with `#` are skipped), and `{root}/classes.txt` one class name a
//! line, in label order. Label maps hold the class indices directly, 255 = ignore.

use std::path::Path;

use super::{non_empty, require_dir, with_one_mapping};
use crate::data::dataset::FileDataset;
use crate::data::image::data_err;
use crate::data::labels::{generated_palette, LabelMapping};
use crate::error::Result;

/// The classes of `classes.txt`.
fn read_classes(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| data_err(path, format!("cannot read the class names: {e}")))?;
    let classes: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    if classes.is_empty() || classes.len() > 254 {
        return Err(data_err(path, format!("needs 1..=254 class names, found {}", classes.len())));
    }
    Ok(classes)
}

/// Split `split` of the list dataset at `root`.
pub fn open(root: &Path, split: &str) -> Result<FileDataset> {
    require_dir(root)?;
    let classes = read_classes(&root.join("classes.txt"))?;
    let list = root.join(format!("{split}.txt"));
    let text = std::fs::read_to_string(&list).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => data_err(&list, "no such list file"),
        _ => data_err(&list, format!("cannot read: {e}")),
    })?;
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [image, label] = fields[..] else {
            return Err(data_err(
                &list,
                format!("line {}: expected `IMAGE LABEL` (two relative paths), found {} fields", n + 1, fields.len()),
            ));
        };
        let (image, label) = (root.join(image), root.join(label));
        for p in [&image, &label] {
            if !p.is_file() {
                return Err(data_err(p, format!("no such file (line {} of {})", n + 1, list.display())));
            }
        }
        pairs.push((image, label));
    }
    let n = classes.len();
    let ds = with_one_mapping("list", split, classes, generated_palette(n), LabelMapping::identity(n), pairs);
    non_empty(ds, &list, "line")
}
