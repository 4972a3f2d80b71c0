//! Looking at samples: 8-bit RGB conversions and binary PPM files (which every image viewer and
//! converter reads), without an image dependency.

use std::io::Write;
use std::path::Path;

use super::{DatasetInfo, IGNORE, NORM_MEAN, NORM_STD, NUM_FINE_CLASSES};

/// A normalised `[H, W, 3]` image back to 8-bit RGB.
pub fn to_rgb8(image: &[f32]) -> Vec<u8> {
    image
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let k = i % 3;
            let c = (v * NORM_STD[k] + NORM_MEAN[k]).clamp(0.0, 1.0);
            (c * 255.0 + 0.5) as u8
        })
        .collect()
}

/// The Cityscapes colours of the fine classes, in label order.
const FINE_PALETTE: [[u8; 3]; NUM_FINE_CLASSES] = [
    [128, 64, 128],
    [244, 35, 232],
    [70, 70, 70],
    [107, 142, 35],
    [70, 130, 180],
    [153, 153, 153],
    [0, 0, 142],
    [220, 20, 60],
];

/// A `[H, W]` label map of dataset `info` to 8-bit RGB: each class in the Cityscapes colour of
/// the first fine class it covers (so "flat" looks like road), black for 255 (ignore), white
/// for anything else.
pub fn label_to_rgb8(labels: &[i32], info: &DatasetInfo) -> Vec<u8> {
    let colors: Vec<[u8; 3]> = (0..info.num_classes() as i32)
        .map(|c| info.fine_classes_of(c).first().map_or([255, 255, 255], |f| FINE_PALETTE[*f as usize]))
        .collect();
    labels
        .iter()
        .flat_map(|&l| match usize::try_from(l) {
            _ if l == IGNORE => [0, 0, 0],
            Ok(c) if c < colors.len() => colors[c],
            _ => [255, 255, 255],
        })
        .collect()
}

/// Writes 8-bit RGB `[H, W, 3]` as a binary PPM (P6) file.
pub fn write_ppm(path: impl AsRef<Path>, width: usize, height: usize, rgb: &[u8]) -> std::io::Result<()> {
    if rgb.len() != width * height * 3 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} bytes is not a {width}x{height} RGB image", rgb.len()),
        ));
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    write!(f, "P6\n{width} {height}\n255\n")?;
    f.write_all(rgb)?;
    f.flush()
}
