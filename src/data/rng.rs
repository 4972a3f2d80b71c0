//! Counter-based random numbers for the synthetic data: splitmix64 (Steele, Lea & Flood, 2014,
//! with the constants of Vigna's `splitmix64.c`), integer and f32 arithmetic only, so every
//! platform draws the same numbers.
//!
//! This is deliberately a private copy rather than a call into `reference::dropout`: the bytes of
//! the synthetic datasets must not change when another module's definition does.

/// Output number `index` (counting from 0) of the splitmix64 stream seeded with `seed`.
pub(crate) fn splitmix64(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key derived from a parent key and a list of words (domain, index, purpose, ...).
pub(crate) fn derive(key: u64, words: &[u64]) -> u64 {
    words.iter().fold(key, |k, &w| splitmix64(k, w))
}

/// A standard-normal-like number from one hash: the sum of four 16-bit uniforms (Irwin–Hall),
/// centred and scaled to unit variance. Bounded by ±2√3, which is what image noise wants.
pub(crate) fn gaussianish(h: u64) -> f32 {
    let s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48);
    // s / 65536 has mean 2 (minus half a step) and variance 4/12.
    (s as f32 / 65536.0 - 2.0) * 1.732_050_8
}

/// A uniform number in [0, 1) from one hash (24 bits, exact in f32).
pub(crate) fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u32 << 24) as f32
}

/// A sequential stream over one key.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    key: u64,
    counter: u64,
}

impl Rng {
    pub(crate) fn new(key: u64) -> Self {
        Rng { key, counter: 0 }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let v = splitmix64(self.key, self.counter);
        self.counter += 1;
        v
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub(crate) fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            // Still draw, so that the stream position does not depend on the image size.
            self.next_u64();
            return lo;
        }
        let n = (hi - lo) as u128;
        lo + ((self.next_u64() as u128 * n) >> 64) as i64
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range_incl(&mut self, lo: i64, hi: i64) -> i64 {
        self.range(lo, hi + 1)
    }

    /// True with probability `permille / 1000`.
    pub(crate) fn chance(&mut self, permille: u64) -> bool {
        self.range(0, 1000) < permille as i64
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        unit(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs of Vigna's splitmix64.c seeded with 0.
        assert_eq!(splitmix64(0, 0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0, 1), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn gaussianish_has_unit_variance() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0f64, 0f64);
        for i in 0..n {
            let g = gaussianish(splitmix64(7, i)) as f64;
            s += g;
            s2 += g * g;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }

    #[test]
    fn range_stays_in_bounds() {
        let mut r = Rng::new(3);
        for _ in 0..10_000 {
            let v = r.range(-5, 7);
            assert!((-5..7).contains(&v));
        }
        assert_eq!(r.range(4, 4), 4);
    }
}
