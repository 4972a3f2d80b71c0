//! Helpers shared by the integration tests (one copy for every test file): a seeded PRNG, host <-> tensor conversions for
//! every float storage type, and tolerance checks that report the worst element.
#![allow(dead_code)]

use cdcl::{DType, Device, EmulatorConfig, Tensor};
use half::{bf16, f16};

/// splitmix64: tiny, seedable, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) (53 bits).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform(1e-12, 1.0);
        let u2 = self.uniform(0.0, 1.0);
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A counter-based uniform in [0, 1): output `i` of the splitmix64 stream `seed`, top 24 bits
/// (random data as a pure function of (seed, index), e.g. images).
pub fn unit(seed: u64, i: u64) -> f32 {
    (cdcl::rng::splitmix64(seed, i) >> 40) as f32 / (1u64 << 24) as f32
}

/// Rounds host values to what `dtype` stores.
pub fn quantize(v: &[f64], dtype: DType) -> Vec<f64> {
    v.iter()
        .map(|&x| match dtype {
            DType::F32 => x as f32 as f64,
            DType::F16 => f16::from_f64(x).to_f64(),
            DType::BF16 => bf16::from_f64(x).to_f64(),
            _ => panic!("not a float dtype"),
        })
        .collect()
}

/// A float tensor of `dtype` holding `v` (rounded to the storage type).
pub fn tensor(dev: &Device, shape: &[usize], v: &[f64], dtype: DType) -> Tensor {
    match dtype {
        DType::F32 => Tensor::from_slice(dev, shape, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
        DType::F16 => Tensor::from_slice(dev, shape, &v.iter().map(|&x| f16::from_f64(x)).collect::<Vec<_>>()),
        DType::BF16 => Tensor::from_slice(dev, shape, &v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>()),
        _ => panic!("not a float dtype"),
    }
    .unwrap()
}

/// Any float tensor back to f64 on the host.
pub fn host(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>().unwrap().into_iter().map(f64::from).collect(),
        DType::F16 => t.to_vec::<f16>().unwrap().into_iter().map(|x| x.to_f64()).collect(),
        DType::BF16 => t.to_vec::<bf16>().unwrap().into_iter().map(|x| x.to_f64()).collect(),
        d => panic!("not a float dtype: {d}"),
    }
}

/// Bit patterns of a tensor, for bitwise comparisons.
pub fn bits(t: &Tensor) -> Vec<u8> {
    let mut v = vec![0u8; t.buffer().len()];
    t.buffer().copy_to_host(&mut v).unwrap();
    v
}

/// Unit roundoff of a storage type (half an ulp at 1.0).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => panic!("not a float dtype"),
    }
}

/// Asserts |got[i] - want[i]| <= tol(i) for every i; the message names the worst element.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: impl Fn(usize) -> f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: length {} vs {}", got.len(), want.len()));
    }
    let mut worst: Option<(usize, f64)> = None;
    for i in 0..got.len() {
        let t = tol(i);
        let err = (got[i] - want[i]).abs();
        let ratio = if err.is_nan() { f64::INFINITY } else { err / t };
        // NaN errors fail too: `err <= t` is false for them.
        let within = err <= t;
        if !within && worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, r)) => Err(format!(
            "{what}: element {i}: got {} want {} (error {:.3e} = {r:.1}x the tolerance {:.3e})",
            got[i],
            want[i],
            (got[i] - want[i]).abs(),
            tol(i)
        )),
    }
}

/// The device the kernel tests run on: the emulator (the default, and what CI runs), or the first
/// CUDA GPU with `CDCL_TEST_DEVICE=cuda`, so that the same property tests check the nvcc build
/// on hardware (scripts/gpu-check.sh). Tests about the emulator itself (schedule seeds, worker
/// counts) build their emulators directly.
///
/// TF32 is off on it: these tests hold f32 convolutions to exact-f32 tolerances, and compare
/// whole training steps with the host backend, which is exact. TF32 has its own tests, with
/// their own derived tolerances (tests/conv.rs), on devices that turn it on.
pub fn test_device() -> Device {
    let dev = match std::env::var("CDCL_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("emulator") => Device::emulator_with(EmulatorConfig { seed: 0, threads: 0 }).unwrap(),
        Ok("cuda") => Device::cuda(0).unwrap_or_else(|e| panic!("CDCL_TEST_DEVICE=cuda, but no usable GPU: {e}")),
        Ok(other) => panic!("CDCL_TEST_DEVICE={other}: expected `emulator` or `cuda`"),
    };
    dev.set_allow_tf32(false);
    dev
}
