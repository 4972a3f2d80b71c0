//! CPU reference for the pyramid-pooling building blocks: adaptive average pooling and bilinear
//! resize over NHWC arrays, forward and backward, in `f64`.
//!
//! Semantics are PyTorch's:
//! - `adaptive_avg_pool2d`: output bin `i` of `Out` along an axis of `In` averages the input
//!   indices `floor(i * In / Out) .. ceil((i + 1) * In / Out)` (bins may overlap when `Out`
//!   does not divide `In`, and repeat input indices when `Out > In`).
//! - `interpolate(mode="bilinear")` with a given output size: along each axis the source index
//!   of output index `d` is `d * (In - 1) / (Out - 1)` with `align_corners=True` (0 when
//!   `Out == 1`) and `max((d + 0.5) * In / Out - 0.5, 0)` with `align_corners=False`; the two
//!   taps are `lo = floor(src)` and `hi = min(lo + 1, In - 1)` with weights `1 - λ` and `λ`,
//!   `λ = src - lo`, and the 2-D weights are products of the per-axis ones.
//!
//! The backward passes are written in scatter form (each output element adds its gradient to
//! the inputs it read), the direct adjoint of the forward loops; the kernels use the gather form,
//! so the two are independent. Everything is plain loops, obviously right rather than fast.

use ndarray::{Array4, ArrayView4};

pub use crate::resample::{bilinear_taps, pool_bin};

fn check_sizes(what: &str, sizes: &[usize]) {
    assert!(sizes.iter().all(|&s| s >= 1), "{what}: every size must be at least 1, got {sizes:?}");
}

/// Adaptive average pooling of `x` `[N, H, W, C]` to `[N, out_h, out_w, C]`.
///
/// # Panics
/// If any size is zero.
pub fn adaptive_avg_pool2d(x: ArrayView4<'_, f64>, out_h: usize, out_w: usize) -> Array4<f64> {
    let (n, h, w, c) = x.dim();
    check_sizes("adaptive_avg_pool2d", &[n, h, w, c, out_h, out_w]);
    let mut y = Array4::zeros((n, out_h, out_w, c));
    for ni in 0..n {
        for i in 0..out_h {
            let (h0, h1) = pool_bin(i, h, out_h);
            for j in 0..out_w {
                let (w0, w1) = pool_bin(j, w, out_w);
                let area = ((h1 - h0) * (w1 - w0)) as f64;
                for ci in 0..c {
                    let mut sum = 0.0;
                    for hi in h0..h1 {
                        for wi in w0..w1 {
                            sum += x[[ni, hi, wi, ci]];
                        }
                    }
                    y[[ni, i, j, ci]] = sum / area;
                }
            }
        }
    }
    y
}

/// Backward of [`adaptive_avg_pool2d`]: `dy` `[N, out_h, out_w, C]` to `dx` `[N, in_h, in_w, C]`.
///
/// # Panics
/// If any size is zero.
pub fn adaptive_avg_pool2d_backward(dy: ArrayView4<'_, f64>, in_h: usize, in_w: usize) -> Array4<f64> {
    let (n, out_h, out_w, c) = dy.dim();
    check_sizes("adaptive_avg_pool2d_backward", &[n, out_h, out_w, c, in_h, in_w]);
    let mut dx = Array4::zeros((n, in_h, in_w, c));
    for ni in 0..n {
        for i in 0..out_h {
            let (h0, h1) = pool_bin(i, in_h, out_h);
            for j in 0..out_w {
                let (w0, w1) = pool_bin(j, in_w, out_w);
                let area = ((h1 - h0) * (w1 - w0)) as f64;
                for ci in 0..c {
                    let g = dy[[ni, i, j, ci]] / area;
                    for hi in h0..h1 {
                        for wi in w0..w1 {
                            dx[[ni, hi, wi, ci]] += g;
                        }
                    }
                }
            }
        }
    }
    dx
}

/// Bilinear resize of `x` `[N, H, W, C]` to `[N, out_h, out_w, C]`.
///
/// # Panics
/// If any size is zero.
pub fn resize_bilinear(x: ArrayView4<'_, f64>, out_h: usize, out_w: usize, align_corners: bool) -> Array4<f64> {
    let (n, h, w, c) = x.dim();
    check_sizes("resize_bilinear", &[n, h, w, c, out_h, out_w]);
    let mut y = Array4::zeros((n, out_h, out_w, c));
    for ni in 0..n {
        for i in 0..out_h {
            let th = bilinear_taps(i, h, out_h, align_corners);
            for j in 0..out_w {
                let tw = bilinear_taps(j, w, out_w, align_corners);
                for ci in 0..c {
                    let mut v = 0.0;
                    for &(hi, wh) in &th {
                        for &(wi, ww) in &tw {
                            v += wh * ww * x[[ni, hi, wi, ci]];
                        }
                    }
                    y[[ni, i, j, ci]] = v;
                }
            }
        }
    }
    y
}

/// Backward of [`resize_bilinear`]: `dy` `[N, out_h, out_w, C]` to `dx` `[N, in_h, in_w, C]`.
///
/// # Panics
/// If any size is zero.
pub fn resize_bilinear_backward(dy: ArrayView4<'_, f64>, in_h: usize, in_w: usize, align_corners: bool) -> Array4<f64> {
    let (n, out_h, out_w, c) = dy.dim();
    check_sizes("resize_bilinear_backward", &[n, out_h, out_w, c, in_h, in_w]);
    let mut dx = Array4::zeros((n, in_h, in_w, c));
    for ni in 0..n {
        for i in 0..out_h {
            let th = bilinear_taps(i, in_h, out_h, align_corners);
            for j in 0..out_w {
                let tw = bilinear_taps(j, in_w, out_w, align_corners);
                for ci in 0..c {
                    let g = dy[[ni, i, j, ci]];
                    for &(hi, wh) in &th {
                        for &(wi, ww) in &tw {
                            dx[[ni, hi, wi, ci]] += wh * ww * g;
                        }
                    }
                }
            }
        }
    }
    dx
}
