//! 2-D max pooling over NHWC with indices, PyTorch's `max_pool2d(return_indices=True)` (floor
//! mode, no dilation), straight from its definition in f64:
//!
//! `y[n, p, q, c] = max { x[n, h, w, c] : h ∈ [p·sh − ph, p·sh − ph + kh) ∩ [0, H), likewise w }`
//!
//! Positions outside the image take no part (PyTorch's −∞ padding). Ties go to the first
//! position in row-major order; a NaN beats everything, and of several NaNs the last one gives
//! the index (PyTorch: `if (val > maxval || isnan(val))` over the window in row-major order).
//! The index is `h·W + w`. The backward scatters: `dx[n, idx / W, idx % W, c] += dy[n, p, q, c]`.

use ndarray::{Array4, ArrayView4};

/// Window, stride and padding, (height, width) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    /// Window size.
    pub kernel: (usize, usize),
    /// Step between windows.
    pub stride: (usize, usize),
    /// Padding on each side.
    pub padding: (usize, usize),
}

impl PoolSpec {
    /// Output height and width, or `None` when the window does not fit the padded input.
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let one =
            |len: usize, k: usize, s: usize, pad: usize| (len + 2 * pad >= k).then(|| (len + 2 * pad - k) / s + 1);
        Some((
            one(h, self.kernel.0, self.stride.0, self.padding.0)?,
            one(w, self.kernel.1, self.stride.1, self.padding.1)?,
        ))
    }
}

/// Forward: the maxima and their flat indices (as i64).
pub fn max_pool2d(x: ArrayView4<f64>, spec: &PoolSpec) -> (Array4<f64>, Array4<i64>) {
    let (n, h, w, c) = x.dim();
    let (p, q) = spec.output_size(h, w).expect("window larger than the padded input");
    let mut y = Array4::zeros((n, p, q, c));
    let mut idx = Array4::zeros((n, p, q, c));
    for ni in 0..n {
        for pi in 0..p {
            for qi in 0..q {
                for ci in 0..c {
                    let mut best: Option<(f64, i64)> = None;
                    for r in 0..spec.kernel.0 {
                        let hh = (pi * spec.stride.0 + r) as isize - spec.padding.0 as isize;
                        if hh < 0 || hh as usize >= h {
                            continue;
                        }
                        for s in 0..spec.kernel.1 {
                            let ww = (qi * spec.stride.1 + s) as isize - spec.padding.1 as isize;
                            if ww < 0 || ww as usize >= w {
                                continue;
                            }
                            let v = x[[ni, hh as usize, ww as usize, ci]];
                            let at = hh as i64 * w as i64 + ww as i64;
                            best = match best {
                                None => Some((v, at)),
                                // NaN wins and a later NaN replaces an earlier one; otherwise
                                // only a strictly larger value (ties keep the first).
                                Some((b, _)) if v.is_nan() || (!b.is_nan() && v > b) => Some((v, at)),
                                keep => keep,
                            };
                        }
                    }
                    let (v, at) = best.expect("every window meets the image when padding <= window / 2");
                    y[[ni, pi, qi, ci]] = v;
                    idx[[ni, pi, qi, ci]] = at;
                }
            }
        }
    }
    (y, idx)
}

/// Backward by scattering every output gradient to its argmax, for an `h`×`w` input.
pub fn max_pool2d_backward(dy: ArrayView4<f64>, idx: ArrayView4<i64>, h: usize, w: usize) -> Array4<f64> {
    let (n, p, q, c) = dy.dim();
    assert_eq!(idx.dim(), dy.dim(), "indices and dy differ in shape");
    let mut dx = Array4::zeros((n, h, w, c));
    for ni in 0..n {
        for pi in 0..p {
            for qi in 0..q {
                for ci in 0..c {
                    let at = idx[[ni, pi, qi, ci]] as usize;
                    dx[[ni, at / w, at % w, ci]] += dy[[ni, pi, qi, ci]];
                }
            }
        }
    }
    dx
}
