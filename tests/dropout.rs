//! Dropout2d kernels through the emulator against the f64 reference (`cdcl::reference::dropout`):
//! random shapes (1x1 and odd sizes included, channels not multiples of 8 or 32), p = 0, p = 1
//! and random p, random mask seeds, f32/f16/bf16 storage; the exact keep/drop pattern (the
//! device hash must agree with the reference's bit for bit); drop rate statistics; finite
//! differences on the reference backward; bitwise determinism across emulator seeds; typed
//! errors.
//!
//! Tolerances. A kept value is x * m with m = 1 / (1 - p) formed in f32 (1 - p and the division:
//! two roundings, relative 2 * 2^-24), the product rounded in f32 (2^-24) and then to the storage
//! type (u_T): |err| <= (3 * 2^-24 + u_T) * |x / (1 - p)|. The tolerance is twice that. Dropped
//! values must be exact zeros, and the zero pattern must be the reference's exactly.

mod common;

use cdcl::ops::dropout::{self, Dropout2dOptions};
use cdcl::reference::dropout as rdrop;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, host, quantize, tensor, unit_roundoff, Rng};
use ndarray::ArrayView4;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    p: f32,
    mask_seed: u64,
    dtype: DType,
    seed: u64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        (1usize..=6, 1usize..=9, 1usize..=9, 1usize..=70),
        prop_oneof![Just(0.0f32), Just(1.0f32), Just(0.1f32), 0.0f32..0.999],
        any::<u64>(),
        prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        any::<u64>(),
    )
        .prop_map(|((n, h, w, c), p, mask_seed, dtype, seed)| Case { n, h, w, c, p, mask_seed, dtype, seed })
}

fn a4(v: &[f64], d: (usize, usize, usize, usize)) -> ArrayView4<'_, f64> {
    ArrayView4::from_shape(d, v).unwrap()
}

/// Non-zero data, so that a zero in the output can only come from a dropped channel.
fn nonzero(rng: &mut Rng, len: usize, dtype: DType) -> Vec<f64> {
    let v: Vec<f64> = (0..len).map(|_| rng.uniform(0.5, 2.0) * if rng.below(2) == 0 { -1.0 } else { 1.0 }).collect();
    quantize(&v, dtype)
}

fn check(what: &str, k: &Case, got: &[f64], want: &[f64]) -> Result<(), String> {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if (*w == 0.0) != (*g == 0.0) {
            return Err(format!("{what} element {i}: zero pattern differs: got {g} want {w}"));
        }
    }
    let rel = 2.0 * (3.0 * 2f64.powi(-24) + unit_roundoff(k.dtype));
    assert_close(what, got, want, |i| rel * want[i].abs())
}

fn run_case(k: &Case, dev: &Device) -> Result<(), String> {
    let dims = (k.n, k.h, k.w, k.c);
    let shape = [k.n, k.h, k.w, k.c];
    let len = k.n * k.h * k.w * k.c;
    let mut rng = Rng(k.seed);
    let (xv, dyv) = (nonzero(&mut rng, len, k.dtype), nonzero(&mut rng, len, k.dtype));
    let opts = Dropout2dOptions { p: k.p, seed: k.mask_seed };
    let y = dropout::dropout2d(&tensor(dev, &shape, &xv, k.dtype), &opts).map_err(|e| e.to_string())?;
    let want = rdrop::dropout2d(a4(&xv, dims), k.p as f64, k.mask_seed);
    check("forward", k, &host(&y), want.as_slice().unwrap())?;
    let dx = dropout::dropout2d_backward(&tensor(dev, &shape, &dyv, k.dtype), &opts).map_err(|e| e.to_string())?;
    let want = rdrop::dropout2d_backward(a4(&dyv, dims), k.p as f64, k.mask_seed);
    check("backward", k, &host(&dx), want.as_slice().unwrap())?;
    if k.p == 0.0 && host(&y) != xv {
        return Err("p = 0 is not the identity".into());
    }
    Ok(())
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn dropout_matches_reference(k in case_strategy()) {
        run_case(&k, &device()).map_err(TestCaseError::fail)?;
    }
}

/// p = 1 writes zeros even over inf and NaN inputs; p = 0 is the identity bit for bit.
#[test]
fn extreme_probabilities() {
    let dev = device();
    let x = Tensor::from_slice(&dev, &[1, 1, 2, 3], &[f32::NAN, f32::INFINITY, -1.0, 2.5, -0.0, 7.0]).unwrap();
    let y = dropout::dropout2d(&x, &Dropout2dOptions { p: 1.0, seed: 3 }).unwrap();
    assert!(y.to_vec::<f32>().unwrap().iter().all(|v| v.to_bits() == 0));
    let y = dropout::dropout2d(&x, &Dropout2dOptions { p: 0.0, seed: 3 }).unwrap();
    assert_eq!(common::bits(&y), common::bits(&x));
}

/// The drop rate over 40 000 (sample, channel) pairs is p within 5 standard deviations, on the
/// device (zeros of an all-ones input) and in the reference hash.
#[test]
fn drop_rate_matches_p() {
    let dev = device();
    let (n, c) = (200, 200);
    let x = Tensor::full(&dev, &[n, 1, 1, c], 1.0f32).unwrap();
    for (p, seed) in [(0.1f32, 1u64), (0.5, 2), (0.9, 0xFFFF_FFFF_FFFF_FFFF)] {
        let y = dropout::dropout2d(&x, &Dropout2dOptions { p, seed }).unwrap().to_vec::<f32>().unwrap();
        let dropped = y.iter().filter(|v| **v == 0.0).count() as f64;
        let total = (n * c) as f64;
        let sd = (total * p as f64 * (1.0 - p as f64)).sqrt();
        assert!((dropped - total * p as f64).abs() <= 5.0 * sd, "p {p}: dropped {dropped} of {total}");
        let kept_ref = (0..n)
            .flat_map(|i| (0..c).map(move |j| (i, j)))
            .filter(|&(i, j)| rdrop::keep(seed, i, j, p as f64))
            .count();
        assert_eq!(kept_ref as f64, total - dropped, "device and reference masks differ");
    }
    // The mask depends on (seed, n, c) only, not on H or W.
    let x2 = Tensor::full(&dev, &[3, 4, 5, 7], 1.0f32).unwrap();
    let y2 = dropout::dropout2d(&x2, &Dropout2dOptions { p: 0.5, seed: 9 }).unwrap().to_vec::<f32>().unwrap();
    for (e, v) in y2.iter().enumerate() {
        let (nn, cc) = (e / (4 * 5 * 7), e % 7);
        assert_eq!(*v != 0.0, rdrop::keep(9, nn, cc, 0.5), "element {e}");
    }
}

fn all_bits(seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let mut rng = Rng(5);
    let shape = [4, 13, 11, 37];
    let len = shape.iter().product();
    let x = tensor(&dev, &shape, &nonzero(&mut rng, len, DType::BF16), DType::BF16);
    let opts = Dropout2dOptions { p: 0.3, seed: 1234 };
    let y = dropout::dropout2d(&x, &opts).unwrap();
    let dx = dropout::dropout2d_backward(&y, &opts).unwrap();
    vec![common::bits(&y), common::bits(&dx)]
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    let base = all_bits(0, 1);
    for (seed, threads) in [(1, 2), (0x1234_5678, 0), (3, 1)] {
        assert!(all_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

/// Central differences on the f64 reference: L = sum(dropout2d(x) * g) is linear in x, so the
/// quotient equals the gradient up to rounding (~1e-16 / 1e-6).
#[test]
fn reference_backward_matches_finite_differences() {
    let dims = (3, 2, 3, 5);
    let len = 3 * 2 * 3 * 5;
    let mut rng = Rng(2);
    let x: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
    let g: Vec<f64> = (0..len).map(|_| rng.normal()).collect();
    let (p, seed) = (0.4, 77);
    let loss = |x: &[f64]| -> f64 { rdrop::dropout2d(a4(x, dims), p, seed).iter().zip(&g).map(|(y, g)| y * g).sum() };
    let analytic = rdrop::dropout2d_backward(a4(&g, dims), p, seed);
    assert!(analytic.iter().any(|v| *v == 0.0) && analytic.iter().any(|v| *v != 0.0), "seed gives a mixed mask");
    let step = 1e-6;
    for (i, &a) in analytic.iter().enumerate() {
        let (mut up, mut down) = (x.clone(), x.clone());
        up[i] += step;
        down[i] -= step;
        let num = (loss(&up) - loss(&down)) / (2.0 * step);
        assert!((num - a).abs() <= 1e-7 * a.abs().max(1.0), "element {i}: numeric {num} analytic {a}");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device();
    let x = Tensor::zeros(&dev, &[1, 2, 2, 3], DType::F32).unwrap();
    for p in [-0.1f32, 1.5, f32::NAN] {
        let r = dropout::dropout2d(&x, &Dropout2dOptions { p, seed: 0 });
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "p = {p}");
    }
    let xi = Tensor::zeros(&dev, &[1, 2, 2, 3], DType::I32).unwrap();
    assert!(matches!(dropout::dropout2d(&xi, &Dropout2dOptions::default()), Err(Error::UnsupportedDType { .. })));
    let x2 = Tensor::zeros(&dev, &[2, 3], DType::F32).unwrap();
    assert!(matches!(dropout::dropout2d_backward(&x2, &Dropout2dOptions::default()), Err(Error::InvalidShape { .. })));
}
