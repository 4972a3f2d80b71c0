//! The label spaces of the real datasets, and the mapping from a label file's raw values to a
//! head's classes.
//!
//! - **Cityscapes** (and KITTI semantics, which uses the same ids): the 34 label ids of
//!   cityscapesScripts' `helpers/labels.py` and their 19 train ids; every id that has no train
//!   id — and any value beyond the table — becomes 255 (ignore).
//! - **BDD100K**: its masks already hold the 19 Cityscapes train ids and 255.
//! - **CamVid** (the 11-class SegNet layout): Sky, Building, Pole, Road, Pavement, Tree,
//!   SignSymbol, Fence, Car, Pedestrian, Bicyclist; value 11 (Unlabelled) is void → 255.

use std::path::Path;

use super::image::{data_err, RawLabels};
use crate::error::Result;

/// The ignore label of every dataset.
pub const IGNORE_LABEL: u8 = 255;

/// One row of the Cityscapes label table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CityscapesLabel {
    /// The label id stored in `*_gtFine_labelIds.png`.
    pub id: u8,
    /// Its name.
    pub name: &'static str,
    /// Its train id (0..19), or 255 when the class is not trained or evaluated.
    pub train_id: u8,
    /// Its colour in the published colour maps.
    pub color: [u8; 3],
}

const fn l(id: u8, name: &'static str, train_id: u8, color: [u8; 3]) -> CityscapesLabel {
    CityscapesLabel { id, name, train_id, color }
}

/// The Cityscapes label table (ids 0–33), as published in cityscapesScripts.
pub const CITYSCAPES_LABELS: [CityscapesLabel; 34] = [
    l(0, "unlabeled", 255, [0, 0, 0]),
    l(1, "ego vehicle", 255, [0, 0, 0]),
    l(2, "rectification border", 255, [0, 0, 0]),
    l(3, "out of roi", 255, [0, 0, 0]),
    l(4, "static", 255, [0, 0, 0]),
    l(5, "dynamic", 255, [111, 74, 0]),
    l(6, "ground", 255, [81, 0, 81]),
    l(7, "road", 0, [128, 64, 128]),
    l(8, "sidewalk", 1, [244, 35, 232]),
    l(9, "parking", 255, [250, 170, 160]),
    l(10, "rail track", 255, [230, 150, 140]),
    l(11, "building", 2, [70, 70, 70]),
    l(12, "wall", 3, [102, 102, 156]),
    l(13, "fence", 4, [190, 153, 153]),
    l(14, "guard rail", 255, [180, 165, 180]),
    l(15, "bridge", 255, [150, 100, 100]),
    l(16, "tunnel", 255, [150, 120, 90]),
    l(17, "pole", 5, [153, 153, 153]),
    l(18, "polegroup", 255, [153, 153, 153]),
    l(19, "traffic light", 6, [250, 170, 30]),
    l(20, "traffic sign", 7, [220, 220, 0]),
    l(21, "vegetation", 8, [107, 142, 35]),
    l(22, "terrain", 9, [152, 251, 152]),
    l(23, "sky", 10, [70, 130, 180]),
    l(24, "person", 11, [220, 20, 60]),
    l(25, "rider", 12, [255, 0, 0]),
    l(26, "car", 13, [0, 0, 142]),
    l(27, "truck", 14, [0, 0, 70]),
    l(28, "bus", 15, [0, 60, 100]),
    l(29, "caravan", 255, [0, 0, 90]),
    l(30, "trailer", 255, [0, 0, 110]),
    l(31, "train", 16, [0, 80, 100]),
    l(32, "motorcycle", 17, [0, 0, 230]),
    l(33, "bicycle", 18, [119, 11, 32]),
];

/// The 19 Cityscapes train classes (also BDD100K's), in train-id order.
pub fn cityscapes_classes() -> Vec<String> {
    let mut names = vec![String::new(); 19];
    for lab in CITYSCAPES_LABELS.iter().filter(|l| l.train_id != 255) {
        names[lab.train_id as usize] = lab.name.to_string();
    }
    names
}

/// The colours of the 19 train classes.
pub fn cityscapes_palette() -> Vec<[u8; 3]> {
    let mut p = vec![[0; 3]; 19];
    for lab in CITYSCAPES_LABELS.iter().filter(|l| l.train_id != 255) {
        p[lab.train_id as usize] = lab.color;
    }
    p
}

/// The train id of a Cityscapes label id: 255 for ids without one and for any value beyond the
/// table (the license-plate id −1 is stored as 255 in some files).
pub fn cityscapes_train_id(id: u16) -> u8 {
    CITYSCAPES_LABELS.get(id as usize).map_or(IGNORE_LABEL, |l| l.train_id)
}

/// The 11 CamVid classes of the SegNet layout.
pub const CAMVID_CLASSES: [&str; 11] =
    ["sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian", "bicyclist"];

/// The SegNet colours of the CamVid classes.
pub const CAMVID_PALETTE: [[u8; 3]; 11] = [
    [128, 128, 128],
    [128, 0, 0],
    [192, 192, 128],
    [128, 64, 128],
    [60, 40, 222],
    [128, 128, 0],
    [192, 128, 128],
    [64, 64, 128],
    [64, 0, 128],
    [64, 64, 0],
    [0, 128, 192],
];

/// The raw value of CamVid's "Unlabelled" class, which is void.
pub const CAMVID_VOID: u16 = 11;

/// A palette for `n` classes when a dataset has none of its own: the bit-interleaved colours of
/// the PASCAL VOC palette (distinct for up to 256 classes), skipping black.
pub fn generated_palette(n: usize) -> Vec<[u8; 3]> {
    (1..=n)
        .map(|i| {
            let (mut c, mut rgb) = (i, [0u8; 3]);
            for bit in 0..8 {
                for (k, v) in rgb.iter_mut().enumerate() {
                    *v |= (((c >> k) & 1) as u8) << (7 - bit);
                }
                c >>= 3;
            }
            rgb
        })
        .collect()
}

/// The colours of a dataset's classes by its name: Cityscapes' for the 19-class datasets,
/// SegNet's for CamVid, a generated palette otherwise.
pub fn palette_for(name: &str, num_classes: usize) -> Vec<[u8; 3]> {
    match (name, num_classes) {
        ("cityscapes" | "bdd100k" | "kitti", 19) => cityscapes_palette(),
        ("camvid", 11) => CAMVID_PALETTE.to_vec(),
        _ => generated_palette(num_classes),
    }
}

/// How a label file's raw values become classes: a table over 0..=255 whose entries are a
/// class, 255 (ignore) or "invalid", and what values beyond 255 (16-bit files) become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMapping {
    table: Vec<Option<u8>>,
    beyond: Option<u8>,
    what: String,
}

impl LabelMapping {
    /// Raw values are the classes `0..num_classes`; 255 is ignore; anything else is invalid.
    pub fn identity(num_classes: usize) -> Self {
        let mut table = vec![None; 256];
        for (v, t) in table.iter_mut().enumerate().take(num_classes.min(255)) {
            *t = Some(v as u8);
        }
        table[255] = Some(IGNORE_LABEL);
        LabelMapping { table, beyond: None, what: format!("classes 0..{num_classes} and 255 (ignore)") }
    }

    /// Cityscapes label ids → train ids (every other value → 255).
    pub fn cityscapes_ids() -> Self {
        let table = (0..256u16).map(|v| Some(cityscapes_train_id(v))).collect();
        LabelMapping { table, beyond: Some(IGNORE_LABEL), what: "Cityscapes label ids".into() }
    }

    /// CamVid: classes 0..11, 11 (Unlabelled) → 255, 255 stays ignore.
    pub fn camvid() -> Self {
        let mut m = Self::identity(CAMVID_CLASSES.len());
        m.table[CAMVID_VOID as usize] = Some(IGNORE_LABEL);
        m.what = "CamVid classes 0..11, 11 (void) and 255".into();
        m
    }

    /// The class of one raw value, or `None` when the value is invalid.
    pub fn map(&self, raw: u16) -> Option<u8> {
        match self.table.get(raw as usize) {
            Some(&t) => t,
            None => self.beyond,
        }
    }

    /// Maps a whole label map; the first invalid value is an error naming the file, the value
    /// and the pixel.
    pub fn apply(&self, raw: &RawLabels, path: &Path) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(raw.data.len());
        for (i, &v) in raw.data.iter().enumerate() {
            match self.map(v) {
                Some(c) => out.push(c),
                None => {
                    return Err(data_err(
                        path,
                        format!(
                            "label value {v} at pixel (x {}, y {}) is not one of the dataset's {}",
                            i % raw.width,
                            i / raw.width,
                            self.what
                        ),
                    ))
                }
            }
        }
        Ok(out)
    }
}
