//! Dropout2d over NHWC in f64, and the definition of its mask.
//!
//! The keep/drop decision for (seed, sample n, channel c) is output number `i = n·2³² + c` of
//! the splitmix64 generator seeded with `seed` (Steele, Lea & Flood, "Fast splittable
//! pseudorandom number generators", 2014; the constants of Vigna's reference `splitmix64.c`):
//! `z = seed + (i + 1)·0x9E3779B97F4A7C15`, then the mix. Its top 24 bits give
//! `u = (h >> 40) / 2²⁴ ∈ [0, 1)`, and the channel is dropped when `u < p`. Kept channels are
//! scaled by `1 / (1 − p)`; dropped ones are exactly 0.

use ndarray::{Array4, ArrayView4};

pub use crate::rng::splitmix64;

/// The uniform number in [0, 1) that decides channel `c` of sample `n`.
pub fn uniform(seed: u64, n: usize, c: usize) -> f64 {
    crate::rng::dropout_uniform(seed, n, c)
}

/// True when channel `c` of sample `n` is kept at drop probability `p`.
pub fn keep(seed: u64, n: usize, c: usize, p: f64) -> bool {
    crate::rng::dropout_keep(seed, n, c, p)
}

/// Forward: `x` `[N, H, W, C]`; kept channels times `1 / (1 − p)`, dropped ones 0.
pub fn dropout2d(x: ArrayView4<f64>, p: f64, seed: u64) -> Array4<f64> {
    let (n, h, w, c) = x.dim();
    let mut y = Array4::zeros((n, h, w, c));
    for ni in 0..n {
        for ci in 0..c {
            if !keep(seed, ni, ci, p) {
                continue;
            }
            for hi in 0..h {
                for wi in 0..w {
                    y[[ni, hi, wi, ci]] = x[[ni, hi, wi, ci]] / (1.0 - p);
                }
            }
        }
    }
    y
}

/// Backward: the same linear map applied to `dy` (it is its own transpose: a diagonal scaling).
pub fn dropout2d_backward(dy: ArrayView4<f64>, p: f64, seed: u64) -> Array4<f64> {
    dropout2d(dy, p, seed)
}
