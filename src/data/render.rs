//! Appearance: turns a scene into a normalised `[H, W, 3]` f32 image.
//!
//! Only `+ − × ÷`, comparisons and integer→float conversions, each evaluated in a fixed order
//! (Rust never contracts `a * b + c` into a fused multiply-add), so every IEEE-754 platform
//! computes the same bits.

use super::rng::{derive, gaussianish, splitmix64};
use super::scene::{Depth, Scene};
use super::{Appearance, NORM_MEAN, NORM_STD};

/// Renders `scene` in appearance `app`; `key` seeds the noise.
pub(crate) fn render(scene: &Scene, app: &Appearance, key: u64) -> Vec<f32> {
    let (h, w) = (scene.h, scene.w);
    let pixel_key = derive(key, &[1]);
    let texture_key = derive(key, &[2]);
    let lattice = Lattice::new(h, w, app.lowfreq_cell, derive(key, &[3]));
    let span = (h - scene.horizon) as f32;
    let mut out = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        let row_shade = y as f32 / h as f32 - 0.5;
        let ground_depth = if y < scene.horizon { 0.0 } else { (y - scene.horizon) as f32 / span };
        for x in 0..w {
            let p = y * w + x;
            let s = &scene.surfaces[scene.surf[p] as usize];
            let depth = match s.depth {
                Depth::Fixed(d) => d,
                Depth::Ground => ground_depth,
            };
            let shade = 1.0 + s.vgrad * row_shade;
            let grain = if s.texture > 0.0 { s.texture * gaussianish(splitmix64(texture_key, p as u64)) } else { 0.0 };
            let c: [f32; 3] = std::array::from_fn(|k| (s.color[k] * shade + grain) * app.gain * app.tint[k]);
            let grey = (c[0] + c[1] + c[2]) / 3.0;
            let haze = app.haze * (1.0 - 0.75 * depth);
            let blotch = app.lowfreq_noise_std * lattice.at(x, y);
            for k in 0..3 {
                let v = grey + app.saturation * (c[k] - grey);
                let v = v + haze * (app.haze_color[k] - v);
                let n = app.noise_std * gaussianish(splitmix64(pixel_key, (p * 3 + k) as u64));
                let v = (v + blotch + n).clamp(0.0, 1.0);
                out.push((v - NORM_MEAN[k]) / NORM_STD[k]);
            }
        }
    }
    out
}

/// Smooth noise: unit-variance values on a lattice of `cell`-pixel squares, interpolated
/// bilinearly.
struct Lattice {
    cell: usize,
    gw: usize,
    values: Vec<f32>,
}

impl Lattice {
    fn new(h: usize, w: usize, cell: usize, key: u64) -> Self {
        let (gh, gw) = (h / cell + 2, w / cell + 2);
        let values = (0..gh * gw).map(|i| gaussianish(splitmix64(key, i as u64))).collect();
        Lattice { cell, gw, values }
    }

    fn at(&self, x: usize, y: usize) -> f32 {
        let (gx, gy) = (x / self.cell, y / self.cell);
        let fx = (x % self.cell) as f32 / self.cell as f32;
        let fy = (y % self.cell) as f32 / self.cell as f32;
        let v = |i: usize, j: usize| self.values[(gy + j) * self.gw + gx + i];
        let top = v(0, 0) + fx * (v(1, 0) - v(0, 0));
        let bottom = v(0, 1) + fx * (v(1, 1) - v(0, 1));
        top + fy * (bottom - top)
    }
}
