//! Counter-based random numbers shared by the model (initialisation, dropout seeds), the CPU
//! backend (the Dropout2d mask) and the f64 oracle: pure functions of a seed and an index, so a
//! model, a mask or a batch is the same on every machine and in every backend.
//!
//! The generator is splitmix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number
//! generators", 2014; the constants of Vigna's reference `splitmix64.c`). The dropout mask is the
//! kernels' definition (kernels/dropout.cu): the keep/drop decision for (seed, sample n,
//! channel c) is output number `n·2³² + c` of the stream; its top 24 bits give a uniform
//! `u ∈ [0, 1)`, and the channel is dropped when `u < p`.

/// Output number `index` (counting from 0) of the splitmix64 stream seeded with `seed`:
/// `z = seed + (index + 1)·0x9E3779B97F4A7C15`, then the mix.
pub fn splitmix64(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform number in [0, 1) that decides Dropout2d's channel `c` of sample `n`.
pub fn dropout_uniform(seed: u64, n: usize, c: usize) -> f64 {
    let h = splitmix64(seed, ((n as u64) << 32) | c as u64);
    (h >> 40) as f64 / (1u64 << 24) as f64
}

/// True when Dropout2d keeps channel `c` of sample `n` at drop probability `p`.
pub fn dropout_keep(seed: u64, n: usize, c: usize, p: f64) -> bool {
    dropout_uniform(seed, n, c) >= p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of Vigna's `splitmix64.c` seeded with 0 (its state starts at the seed
    /// and is advanced before each output, which is index + 1 increments here).
    #[test]
    fn splitmix64_matches_the_reference_stream() {
        assert_eq!(splitmix64(0, 0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0, 1), 0x6E78_9E6A_A1B9_65F4);
    }
}
