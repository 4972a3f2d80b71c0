//! PyTorch's initialisations, drawn from a counter-based generator so that a model is a pure
//! function of its seed.

use crate::rng::splitmix64;

/// Uniform in [0, 1) from output `i` of the stream `seed` (53 bits).
fn uniform(seed: u64, i: u64) -> f64 {
    (splitmix64(seed, i) >> 11) as f64 / (1u64 << 53) as f64
}

/// `n` standard normal draws (Box–Muller on pairs of uniforms).
pub fn normal(seed: u64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let u1 = 1.0 - uniform(seed, 2 * i as u64); // (0, 1]: ln is finite
            let u2 = uniform(seed, 2 * i as u64 + 1);
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect()
}

/// `torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")` for a KRSC weight,
/// as torchvision's ResNet initialises its convolutions: N(0, 2 / (K·R·S)).
pub fn kaiming_normal_fan_out(seed: u64, k: usize, r: usize, s: usize, c: usize) -> Vec<f32> {
    let std = (2.0 / (k * r * s) as f64).sqrt();
    normal(seed, k * r * s * c).into_iter().map(|z| (z * std) as f32).collect()
}

/// `torch.nn.Conv2d`'s default: weight and bias U(−1/√fan_in, 1/√fan_in) with fan_in = C·R·S
/// (kaiming_uniform with a = √5). Returns (weight KRSC, bias `[K]`).
pub fn conv_default(seed: u64, k: usize, r: usize, s: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let bound = 1.0 / ((c * r * s) as f64).sqrt();
    let draw = |stream: u64, n: usize| -> Vec<f32> {
        (0..n).map(|i| ((2.0 * uniform(stream, i as u64) - 1.0) * bound) as f32).collect()
    };
    (draw(seed, k * r * s * c), draw(splitmix64(seed, u64::MAX), k))
}
