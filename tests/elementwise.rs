//! Element-wise kernels (residual add, ReLU, add + ReLU, ReLU backward) through the emulator
//! against the f64 reference (`cdcl::reference::elementwise`): random shapes of rank 1-4 (single
//! elements and odd sizes included), f32/f16/bf16 storage, data with exact zeros, signed zeros,
//! infinities and NaNs; finite differences on the reference backward; bitwise determinism
//! across emulator seeds; typed errors.
//!
//! Tolerances. ReLU and its backward are exact (a selection, no arithmetic): compared bit for
//! value (NaN with NaN, -0 with +0). The add rounds a + b once in f32 and once more to the
//! storage type: |err| <= (2^-24 + u_T) * |a + b|, u_T the storage unit roundoff (the f32
//! rounding is exact for f16/bf16 operands whose exponents are close, but not in general, so it
//! stays in the bound). The tolerance is twice that, plus the smallest f16 subnormal for results
//! that underflow.

mod common;

use cdcl::ops::elementwise as elt;
use cdcl::reference::elementwise as relt;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, host, quantize, tensor, unit_roundoff, Rng};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    shape: Vec<usize>,
    dtype: DType,
    special: bool,
    seed: u64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(1usize..=13, 1..=4),
        prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(shape, dtype, special, seed)| Case { shape, dtype, special, seed })
}

fn data(rng: &mut Rng, len: usize, special: bool, dtype: DType) -> Vec<f64> {
    let v: Vec<f64> = (0..len)
        .map(|_| match if special { rng.below(10) } else { 9 } {
            0 => 0.0,
            1 => -0.0,
            2 => f64::NAN,
            3 => f64::INFINITY,
            4 => f64::NEG_INFINITY,
            _ => rng.normal() * 3.0,
        })
        .collect();
    quantize(&v, dtype)
}

fn same_value(what: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !(g == w || (g.is_nan() && w.is_nan())) {
            return Err(format!("{what} element {i}: got {g} want {w}"));
        }
    }
    Ok(())
}

fn close_sum(what: &str, got: &[f64], want: &[f64], dtype: DType) -> Result<(), String> {
    let rel = 2.0 * (2f64.powi(-24) + unit_roundoff(dtype));
    // Infinite or NaN sums must agree exactly (inf - inf = NaN on both sides).
    let finite: Vec<bool> = want.iter().map(|w| w.is_finite()).collect();
    for i in 0..want.len() {
        let same = got[i] == want[i] || (got[i].is_nan() && want[i].is_nan());
        if !finite[i] && !same {
            return Err(format!("{what} element {i}: got {} want {}", got[i], want[i]));
        }
    }
    let g: Vec<f64> = got.iter().zip(&finite).map(|(v, f)| if *f { *v } else { 0.0 }).collect();
    let w: Vec<f64> = want.iter().zip(&finite).map(|(v, f)| if *f { *v } else { 0.0 }).collect();
    assert_close(what, &g, &w, |i| rel * w[i].abs() + 2f64.powi(-24))
}

fn run_case(k: &Case, dev: &Device) -> Result<(), String> {
    let len: usize = k.shape.iter().product();
    let mut rng = Rng(k.seed);
    let (av, bv, gv) = (
        data(&mut rng, len, k.special, k.dtype),
        data(&mut rng, len, k.special, k.dtype),
        data(&mut rng, len, false, k.dtype),
    );
    let (a, b, g) =
        (tensor(dev, &k.shape, &av, k.dtype), tensor(dev, &k.shape, &bv, k.dtype), tensor(dev, &k.shape, &gv, k.dtype));
    let e = |r: cdcl::Result<Tensor>| r.map_err(|e| e.to_string());

    let sum = e(elt::add(&a, &b))?;
    close_sum("add", &host(&sum), &relt::add(&av, &bv), k.dtype)?;
    let r = e(elt::relu(&a))?;
    same_value("relu", &host(&r), &relt::relu(&av))?;
    let ar = e(elt::add_relu(&a, &b))?;
    let want_ar = relt::add_relu(&av, &bv);
    close_sum("add_relu", &host(&ar), &want_ar, k.dtype)?;
    // The backward masks with the kernel's own forward output (as a training step would).
    let yr = host(&r);
    same_value("relu backward", &host(&e(elt::relu_backward(&g, &r))?), &relt::relu_backward(&gv, &yr))?;
    let yar = host(&ar);
    same_value("add_relu backward", &host(&e(elt::relu_backward(&g, &ar))?), &relt::relu_backward(&gv, &yar))?;
    Ok(())
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn elementwise_matches_reference(k in case_strategy()) {
        run_case(&k, &device()).map_err(TestCaseError::fail)?;
    }
}

/// A tensor longer than the grid (4096 blocks x 256 threads) exercises the grid-stride loop.
#[test]
fn longer_than_one_grid() {
    let k = Case { shape: vec![4096 * 256 + 77], dtype: DType::BF16, special: true, seed: 3 };
    run_case(&k, &device()).unwrap();
}

#[test]
fn nan_and_zero_semantics() {
    let dev = device();
    let x = Tensor::from_slice(&dev, &[5], &[f32::NAN, -0.0, 0.0, -1.0, 2.0]).unwrap();
    let y = elt::relu(&x).unwrap().to_vec::<f32>().unwrap();
    assert!(y[0].is_nan());
    assert_eq!(&y[1..], &[0.0, 0.0, 0.0, 2.0]);
    let dy = Tensor::from_slice(&dev, &[5], &[1.0f32; 5]).unwrap();
    let out = Tensor::from_slice(&dev, &[5], &[f32::NAN, -0.0, 0.0, -1.0, 2.0]).unwrap();
    // Mask from the output: NaN passes, zeros (either sign) and negatives block.
    assert_eq!(elt::relu_backward(&dy, &out).unwrap().to_vec::<f32>().unwrap(), vec![1.0, 0.0, 0.0, 0.0, 1.0]);
}

fn all_bits(seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let mut rng = Rng(11);
    let shape = [3, 17, 19, 23];
    let len = shape.iter().product();
    let a = tensor(&dev, &shape, &data(&mut rng, len, true, DType::F16), DType::F16);
    let b = tensor(&dev, &shape, &data(&mut rng, len, true, DType::F16), DType::F16);
    let s = elt::add(&a, &b).unwrap();
    let r = elt::relu(&a).unwrap();
    let ar = elt::add_relu(&a, &b).unwrap();
    let d = elt::relu_backward(&b, &ar).unwrap();
    [&s, &r, &ar, &d].iter().map(|t| common::bits(t)).collect()
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    let base = all_bits(0, 1);
    for (seed, threads) in [(1, 2), (0xABCD, 0), (7, 1)] {
        assert!(all_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

/// Central differences on the f64 reference. L = sum(relu(a + b) * g); inputs kept at least
/// 1e-2 away from the kink at 0, so a step of 1e-6 stays on one linear piece and the quotient
/// is exact up to rounding (~1e-16 / 1e-6).
#[test]
fn reference_backward_matches_finite_differences() {
    let mut rng = Rng(21);
    let n = 64;
    let away = |v: f64| if v.abs() < 1e-2 { v.signum() * 1e-2 + v } else { v };
    let a: Vec<f64> = (0..n).map(|_| away(rng.normal())).collect();
    let b: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let b: Vec<f64> = b.iter().zip(&a).map(|(bv, av)| away(av + bv) - av).collect();
    let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let loss_ar = |a: &[f64], b: &[f64]| -> f64 { relt::add_relu(a, b).iter().zip(&g).map(|(y, g)| y * g).sum() };
    let loss_r = |a: &[f64]| -> f64 { relt::relu(a).iter().zip(&g).map(|(y, g)| y * g).sum() };
    let d_ar = relt::relu_backward(&g, &relt::add_relu(&a, &b));
    let d_r = relt::relu_backward(&g, &relt::relu(&a));
    let step = 1e-6;
    for i in 0..n {
        let bump = |v: &[f64], d: f64| {
            let mut v = v.to_vec();
            v[i] += d;
            v
        };
        let num_a = (loss_ar(&bump(&a, step), &b) - loss_ar(&bump(&a, -step), &b)) / (2.0 * step);
        let num_b = (loss_ar(&a, &bump(&b, step)) - loss_ar(&a, &bump(&b, -step))) / (2.0 * step);
        let num_r = (loss_r(&bump(&a, step)) - loss_r(&bump(&a, -step))) / (2.0 * step);
        for (what, num, an) in
            [("add_relu da", num_a, d_ar[i]), ("add_relu db", num_b, d_ar[i]), ("relu", num_r, d_r[i])]
        {
            assert!((num - an).abs() <= 1e-7 * an.abs().max(1.0), "{what} element {i}: numeric {num} analytic {an}");
        }
        // The residual add alone: dL/da = dL/db = g.
        let loss_add = |a: &[f64]| -> f64 { relt::add(a, &b).iter().zip(&g).map(|(y, g)| y * g).sum() };
        let num_add = (loss_add(&bump(&a, step)) - loss_add(&bump(&a, -step))) / (2.0 * step);
        assert!((num_add - g[i]).abs() <= 1e-7 * g[i].abs().max(1.0), "add element {i}");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device();
    let a = Tensor::zeros(&dev, &[2, 3], DType::F32).unwrap();
    let b16 = Tensor::zeros(&dev, &[2, 3], DType::F16).unwrap();
    let b_shape = Tensor::zeros(&dev, &[3, 2], DType::F32).unwrap();
    let ai = Tensor::zeros(&dev, &[2, 3], DType::I32).unwrap();
    assert!(matches!(elt::add(&a, &b16), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(elt::add_relu(&a, &b_shape), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(elt::relu(&ai), Err(Error::UnsupportedDType { .. })));
    assert!(matches!(elt::relu_backward(&a, &b_shape), Err(Error::ShapeMismatch { .. })));
    let other = Device::emulator_with(EmulatorConfig { seed: 1, threads: 1 }).unwrap();
    let b_other = Tensor::zeros(&other, &[2, 3], DType::F32).unwrap();
    assert!(matches!(elt::add(&a, &b_other), Err(Error::DeviceMismatch { .. })));
    // Empty tensors are fine and launch nothing.
    let e = Tensor::zeros(&dev, &[0, 3], DType::F32).unwrap();
    assert_eq!(elt::add(&e, &e).unwrap().shape(), &[0, 3]);
}
