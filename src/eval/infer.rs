//! Segmentation inference of one image, as the PSPNet reference tests and mmsegmentation
//! infers: whole-image or sliding-window, optionally at several scales and with horizontal
//! flips, averaging the *softmax* (not the logits).
//!
//! - **One window**: the model (evaluation mode: running statistics of the chosen BN slice,
//!   no dropout) gives the chosen head's logits at 1/8 resolution; they are resized bilinearly
//!   to the window (with the model's `align_corners`, as in training) and turned into
//!   probabilities. With flips, the mirrored window's probabilities are mirrored back and
//!   averaged with the plain ones.
//! - **Sliding window** (mmsegmentation's grid): windows of `crop` every `stride`, the last
//!   one flush with the bottom/right edge (`⌈(H − crop)/stride⌉ + 1` rows of windows); a
//!   window never exceeds the image, so a small image is one window of its own size. Each
//!   pixel's probabilities are the mean over the windows that cover it.
//! - **Scales**: the image is resized bilinearly (pixel centres) to `round(s·H) × round(s·W)`,
//!   inferred as above, and its probabilities resized back to `H × W`; the result is the mean
//!   over the scales. Scale 1 is used as is (no resampling).

use crate::autograd::Graph;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::train::Trainer;

/// How an image is covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The whole image at once.
    Whole,
    /// Windows of `crop` (height, width) every `stride` (rows, columns).
    Slide {
        /// Window height and width.
        crop: (usize, usize),
        /// Vertical and horizontal step.
        stride: (usize, usize),
    },
}

/// What the inference of one image does.
#[derive(Debug, Clone, PartialEq)]
pub struct InferOptions {
    /// Whole image or sliding window.
    pub window: Window,
    /// Scales (1 = the image as it is).
    pub scales: Vec<f32>,
    /// Average with the horizontally flipped image.
    pub flip: bool,
}

impl Default for InferOptions {
    fn default() -> Self {
        InferOptions { window: Window::Whole, scales: vec![1.0], flip: false }
    }
}

impl InferOptions {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.scales.is_empty() || self.scales.iter().any(|s| !(s.is_finite() && *s > 0.0 && *s <= 8.0)) {
            return Err(Error::InvalidArgument(format!("scales {:?} must be in (0, 8]", self.scales)));
        }
        if let Window::Slide { crop, stride } = self.window {
            if crop.0 == 0 || crop.1 == 0 || stride.0 == 0 || stride.1 == 0 {
                return Err(Error::InvalidArgument("sliding-window crop and stride must be positive".into()));
            }
        }
        Ok(())
    }
}

/// A normalised `[H, W, 3]` image.
#[derive(Debug, Clone, Copy)]
pub struct ImageRef<'a> {
    /// The pixels.
    pub data: &'a [f32],
    /// H.
    pub height: usize,
    /// W.
    pub width: usize,
}

/// Bilinear resize of `[h, w, c]` to `[oh, ow, c]` with pixel centres (`align_corners=False`).
pub fn resize_bilinear(src: &[f32], h: usize, w: usize, c: usize, oh: usize, ow: usize) -> Vec<f32> {
    if (h, w) == (oh, ow) {
        return src.to_vec();
    }
    let taps = |o: usize, i: usize| -> Vec<(usize, usize, f32)> {
        (0..o)
            .map(|d| {
                let s = ((d as f64 + 0.5) * i as f64 / o as f64 - 0.5).max(0.0);
                let a = (s.floor() as usize).min(i - 1);
                let b = (a + 1).min(i - 1);
                (a, b, if a == b { 0.0 } else { (s - a as f64) as f32 })
            })
            .collect()
    };
    let (ty, tx) = (taps(oh, h), taps(ow, w));
    let mut out = vec![0.0; oh * ow * c];
    for (y, &(y0, y1, wy)) in ty.iter().enumerate() {
        for (x, &(x0, x1, wx)) in tx.iter().enumerate() {
            for k in 0..c {
                let p = |yy: usize, xx: usize| src[(yy * w + xx) * c + k];
                let top = p(y0, x0) * (1.0 - wx) + p(y0, x1) * wx;
                let bottom = p(y1, x0) * (1.0 - wx) + p(y1, x1) * wx;
                out[(y * ow + x) * c + k] = top * (1.0 - wy) + bottom * wy;
            }
        }
    }
    out
}

fn flip_rows<T: Copy>(data: &[T], h: usize, w: usize, c: usize) -> Vec<T> {
    crate::data::augment::hflip(data, h, w, c)
}

/// Softmax over the last axis of `[.., c]`, in place.
fn softmax(v: &mut [f32], c: usize) {
    for px in v.chunks_exact_mut(c) {
        let m = px.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for x in px.iter_mut() {
            *x = (*x - m).exp();
            sum += *x as f64;
        }
        let inv = (1.0 / sum) as f32;
        px.iter_mut().for_each(|x| *x *= inv);
    }
}

/// The model's probabilities for one window `[h, w, 3]` (head `head`, BN slice `bn`).
fn window_probs<B: Backend>(
    trainer: &mut Trainer<B>,
    img: &[f32],
    h: usize,
    w: usize,
    head: usize,
    bn: usize,
) -> Result<Vec<f32>> {
    let be = trainer.backend().clone();
    let mut g = Graph::new(&be, false);
    let x = g.input(be.tensor_f32(&[1, h, w, 3], img)?);
    let ds = g.datasets(&[bn as i32])?;
    let out = trainer.model.forward(&mut g, &mut trainer.store, x, ds, head, 0)?;
    let up = g.resize_bilinear(out.main, h, w, trainer.model.config.align_corners)?;
    let mut p = be.to_f32(g.value(up))?;
    softmax(&mut p, trainer.model.config.num_classes[head]);
    Ok(p)
}

/// With flips, the mean of the window's and its mirror's probabilities.
fn flipped_probs<B: Backend>(
    trainer: &mut Trainer<B>,
    img: &[f32],
    h: usize,
    w: usize,
    head: usize,
    bn: usize,
    flip: bool,
) -> Result<Vec<f32>> {
    let mut p = window_probs(trainer, img, h, w, head, bn)?;
    if flip {
        let c = trainer.model.config.num_classes[head];
        let mirrored = window_probs(trainer, &flip_rows(img, h, w, 3), h, w, head, bn)?;
        for (a, b) in p.iter_mut().zip(flip_rows(&mirrored, h, w, c)) {
            *a = (*a + b) * 0.5;
        }
    }
    Ok(p)
}

/// The windows of an `h × w` image: (top, left, height, width).
pub fn windows(h: usize, w: usize, window: Window) -> Vec<(usize, usize, usize, usize)> {
    match window {
        Window::Whole => vec![(0, 0, h, w)],
        Window::Slide { crop, stride } => {
            let (ch, cw) = (crop.0.min(h), crop.1.min(w));
            let rows = (h - ch).div_ceil(stride.0) + 1;
            let cols = (w - cw).div_ceil(stride.1) + 1;
            let mut out = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                let top = (r * stride.0).min(h - ch);
                for c in 0..cols {
                    let left = (c * stride.1).min(w - cw);
                    out.push((top, left, ch, cw));
                }
            }
            out
        }
    }
}

/// Probabilities `[H, W, C]` of head `head` (BN slice `bn`) for a normalised image.
pub fn predict_probs<B: Backend>(
    trainer: &mut Trainer<B>,
    image: ImageRef<'_>,
    head: usize,
    bn: usize,
    opts: &InferOptions,
) -> Result<Vec<f32>> {
    opts.validate()?;
    let heads = trainer.model.num_heads();
    if head >= heads || bn >= trainer.model.config.num_bn {
        return Err(Error::InvalidArgument(format!(
            "head {head} / BN slice {bn}: the model has {heads} heads and {} BN slices",
            trainer.model.config.num_bn
        )));
    }
    let (h, w) = (image.height, image.width);
    if h == 0 || w == 0 || image.data.len() != h * w * 3 {
        return Err(Error::InvalidShape {
            what: "image to segment",
            shape: vec![h, w, 3],
            reason: format!("{} values", image.data.len()),
        });
    }
    let c = trainer.model.config.num_classes[head];
    let mut total = vec![0.0f32; h * w * c];
    for &s in &opts.scales {
        let (sh, sw) = if s == 1.0 {
            (h, w)
        } else {
            (((h as f64 * s as f64).round() as usize).max(1), ((w as f64 * s as f64).round() as usize).max(1))
        };
        let scaled = resize_bilinear(image.data, h, w, 3, sh, sw);
        let mut sum = vec![0.0f32; sh * sw * c];
        let mut count = vec![0u32; sh * sw];
        for (top, left, wh, ww) in windows(sh, sw, opts.window) {
            let crop: Vec<f32> = (top..top + wh)
                .flat_map(|y| scaled[(y * sw + left) * 3..(y * sw + left + ww) * 3].iter().copied())
                .collect();
            let p = flipped_probs(trainer, &crop, wh, ww, head, bn, opts.flip)?;
            for y in 0..wh {
                let dst = ((top + y) * sw + left) * c;
                for (a, b) in sum[dst..dst + ww * c].iter_mut().zip(&p[y * ww * c..(y + 1) * ww * c]) {
                    *a += b;
                }
                count[(top + y) * sw + left..(top + y) * sw + left + ww].iter_mut().for_each(|n| *n += 1);
            }
        }
        for (px, &n) in sum.chunks_exact_mut(c).zip(&count) {
            if n > 1 {
                let inv = 1.0 / n as f32;
                px.iter_mut().for_each(|v| *v *= inv);
            }
        }
        let back = resize_bilinear(&sum, sh, sw, c, h, w);
        for (a, b) in total.iter_mut().zip(back) {
            *a += b;
        }
    }
    if opts.scales.len() > 1 {
        let inv = 1.0 / opts.scales.len() as f32;
        total.iter_mut().for_each(|v| *v *= inv);
    }
    Ok(total)
}

/// The most probable class of each pixel of `[H, W, C]` probabilities (the first on ties).
pub fn argmax(probs: &[f32], c: usize) -> Vec<u8> {
    probs
        .chunks_exact(c)
        .map(|p| {
            let mut best = 0;
            for k in 1..c {
                if p[k] > p[best] {
                    best = k;
                }
            }
            best as u8
        })
        .collect()
}
