//! The training augmentation of PSPNet's reference training (and of the paper): random scale,
//! random crop with padding, random horizontal flip, ImageNet normalisation.
//!
//! 1. **Scale** by `s` uniform in `[lo, hi]` (default [0.5, 2.0]): the image bilinearly, the
//!    labels by nearest neighbour, to `round(h·s) × round(w·s)`. Both use pixel centres
//!    (`src = (dst + ½)·in/out − ½`, as OpenCV's `INTER_LINEAR` and PyTorch's
//!    `align_corners=False`; the nearest source pixel is the one whose centre is nearest,
//!    `floor((dst + ½)·in/out)`), so the labels stay aligned with the image.
//! 2. **Pad** a side shorter than the crop, equally on both sides (the extra pixel at the
//!    bottom/right), the image with the mean (0 after normalisation) and the labels with 255.
//! 3. **Crop** `crop_h × crop_w` at a uniform offset.
//! 4. **Flip** horizontally with probability ½.
//! 5. **Normalise**: `(v/255 − mean)/std` with the ImageNet mean and std.
//!
//! Only the crop is computed: each output pixel samples the source image directly through the
//! scale, so a 2048×1024 image scaled by 2 costs what its 512×512 crop costs.
//!
//! Every random draw is a pure function of `(seed, epoch, dataset, index)` ([`AugmentConfig::draw`]),
//! so a run's batches do not depend on how many threads decode them.

use super::dataset::LabelMap;
use super::image::RgbImage;
use super::labels::IGNORE_LABEL;
use super::rng::{derive, splitmix64};
use super::{NORM_MEAN, NORM_STD};
use crate::error::{Error, Result};

/// Separates the augmentation's random stream from every other use of the run's seed.
const AUGMENT_STREAM: u64 = 0x4155_474D_454E_5421; // "AUGMENT!"

/// What the augmentation does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentConfig {
    /// Crop height and width.
    pub crop: (usize, usize),
    /// Range of the random scale factor, `lo <= hi`, both positive.
    pub scale: (f32, f32),
    /// Random horizontal flip.
    pub flip: bool,
    /// Per-channel mean of RGB in [0, 1], subtracted.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, divided by.
    pub std: [f32; 3],
}

impl Default for AugmentConfig {
    /// 512×512 crops, scale in [0.5, 2.0], flips, ImageNet normalisation.
    fn default() -> Self {
        AugmentConfig { crop: (512, 512), scale: (0.5, 2.0), flip: true, mean: NORM_MEAN, std: NORM_STD }
    }
}

/// The random choices for one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentDraw {
    /// The scale factor.
    pub scale: f32,
    /// The scaled image's height and width.
    pub scaled: (usize, usize),
    /// Top-left corner of the crop in the padded, scaled image (row, column).
    pub offset: (usize, usize),
    /// Whether the crop is mirrored.
    pub flip: bool,
}

/// Uniform integer in `0..n` from one hash (`n >= 1`).
fn below(h: u64, n: usize) -> usize {
    ((h as u128 * n as u128) >> 64) as usize
}

impl AugmentConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = self.scale;
        if self.crop.0 == 0 || self.crop.1 == 0 || self.crop.0 > 16384 || self.crop.1 > 16384 {
            return Err(Error::InvalidArgument(format!("crop {:?} must be within 1..=16384 on each side", self.crop)));
        }
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi && hi <= 16.0) {
            return Err(Error::InvalidArgument(format!("scale range [{lo}, {hi}] must satisfy 0 < lo <= hi <= 16")));
        }
        if !self.std.iter().all(|s| s.is_finite() && *s > 0.0) || !self.mean.iter().all(|m| m.is_finite()) {
            return Err(Error::InvalidArgument("normalisation mean must be finite and std positive".into()));
        }
        Ok(())
    }

    /// The draws for sample `index` of dataset `dataset` in epoch `epoch` of a run seeded with
    /// `seed`, whose image is `height × width`: a pure function of its arguments.
    pub fn draw(
        &self,
        seed: u64,
        epoch: u64,
        dataset: usize,
        index: usize,
        height: usize,
        width: usize,
    ) -> AugmentDraw {
        let key = derive(seed, &[AUGMENT_STREAM, dataset as u64, epoch, index as u64]);
        let u = |k: u64| (splitmix64(key, k) >> 40) as f32 / (1u32 << 24) as f32;
        let (lo, hi) = self.scale;
        let scale = lo + u(0) * (hi - lo);
        let sized = |n: usize| ((n as f64 * scale as f64).round() as usize).max(1);
        let scaled = (sized(height), sized(width));
        let padded = (scaled.0.max(self.crop.0), scaled.1.max(self.crop.1));
        let offset = (
            below(splitmix64(key, 1), padded.0 - self.crop.0 + 1),
            below(splitmix64(key, 2), padded.1 - self.crop.1 + 1),
        );
        let flip = self.flip && splitmix64(key, 3) >> 63 == 1;
        AugmentDraw { scale, scaled, offset, flip }
    }

    /// Applies `draw` to an image and its labels: a normalised `[crop_h, crop_w, 3]` image and
    /// `[crop_h, crop_w]` labels (255 where padded).
    pub fn apply(
        &self,
        image: &RgbImage,
        labels: Option<&LabelMap>,
        draw: &AugmentDraw,
    ) -> Result<(Vec<f32>, Option<Vec<u8>>)> {
        let (h, w) = (image.height, image.width);
        if image.data.len() != h * w * 3 || h == 0 || w == 0 {
            return Err(Error::InvalidShape {
                what: "RGB image",
                shape: vec![h, w, 3],
                reason: format!("{} bytes", image.data.len()),
            });
        }
        if let Some(l) = labels {
            if (l.height, l.width) != (h, w) || l.data.len() != h * w {
                return Err(Error::ShapeMismatch {
                    what: "labels of the image",
                    expected: vec![h, w],
                    got: vec![l.height, l.width],
                });
            }
        }
        let (ch, cw) = self.crop;
        let (sh, sw) = draw.scaled;
        let pad_top = (sh.max(ch) - sh) / 2;
        let pad_left = (sw.max(cw) - sw) / 2;
        // Per output row and column: the scaled coordinate (None = padding), the bilinear taps
        // and weight, and the nearest source pixel.
        let rows: Vec<Option<Tap>> = (0..ch)
            .map(|y| (y + draw.offset.0).checked_sub(pad_top).filter(|&s| s < sh).map(|s| Tap::new(s, sh, h)))
            .collect();
        let cols: Vec<Option<Tap>> = (0..cw)
            .map(|x| {
                let x = if draw.flip { cw - 1 - x } else { x };
                (x + draw.offset.1).checked_sub(pad_left).filter(|&s| s < sw).map(|s| Tap::new(s, sw, w))
            })
            .collect();
        let scale: [f32; 3] = [0, 1, 2].map(|k| 1.0 / (255.0 * self.std[k]));
        let shift: [f32; 3] = [0, 1, 2].map(|k| self.mean[k] / self.std[k]);
        let mut out = vec![0.0f32; ch * cw * 3];
        let px = |y: usize, x: usize, k: usize| image.data[(y * w + x) * 3 + k] as f32;
        for (y, row) in rows.iter().enumerate() {
            let Some(r) = row else { continue };
            for (x, col) in cols.iter().enumerate() {
                let Some(c) = col else { continue };
                for k in 0..3 {
                    let top = px(r.i0, c.i0, k) * (1.0 - c.t) + px(r.i0, c.i1, k) * c.t;
                    let bottom = px(r.i1, c.i0, k) * (1.0 - c.t) + px(r.i1, c.i1, k) * c.t;
                    let v = top * (1.0 - r.t) + bottom * r.t;
                    out[(y * cw + x) * 3 + k] = v * scale[k] - shift[k];
                }
            }
        }
        let labels = labels.map(|l| {
            let mut o = vec![IGNORE_LABEL; ch * cw];
            for (y, row) in rows.iter().enumerate() {
                let Some(r) = row else { continue };
                for (x, col) in cols.iter().enumerate() {
                    if let Some(c) = col {
                        o[y * cw + x] = l.data[r.nearest * w + c.nearest];
                    }
                }
            }
            o
        });
        Ok((out, labels))
    }

    /// The whole image normalised, without any augmentation (evaluation).
    pub fn normalize(&self, image: &RgbImage) -> Vec<f32> {
        let scale: [f32; 3] = [0, 1, 2].map(|k| 1.0 / (255.0 * self.std[k]));
        let shift: [f32; 3] = [0, 1, 2].map(|k| self.mean[k] / self.std[k]);
        image.data.iter().enumerate().map(|(i, &v)| v as f32 * scale[i % 3] - shift[i % 3]).collect()
    }
}

/// One output coordinate's source: bilinear taps `i0`, `i1` with weight `t` on `i1`, and the
/// nearest source pixel.
#[derive(Debug, Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    t: f32,
    nearest: usize,
}

impl Tap {
    /// Coordinate `s` of a dimension scaled from `input` to `output` pixels.
    fn new(s: usize, output: usize, input: usize) -> Tap {
        let ratio = input as f64 / output as f64;
        let src = ((s as f64 + 0.5) * ratio - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let t = if i1 == i0 { 0.0 } else { (src - i0 as f64) as f32 };
        // floor((s + ½)·in/out) in integers.
        let nearest = (((2 * s + 1) * input) / (2 * output)).min(input - 1);
        Tap { i0, i1, t, nearest }
    }
}

/// Mirrors a row-major `[height, width, channels]` array left to right.
pub fn hflip<T: Copy>(data: &[T], height: usize, width: usize, channels: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len());
    for y in 0..height {
        for x in (0..width).rev() {
            let at = (y * width + x) * channels;
            out.extend_from_slice(&data[at..at + channels]);
        }
    }
    out
}
