//! Max pooling kernels through the emulator against the f64 reference
//! (`cdcl::reference::maxpool`): random sizes (1x1 and odd included), channels 1..40 (not
//! multiples of 8 or 32), windows 1-4 per axis, strides 1-3, padding up to half the window,
//! f32/f16/bf16 storage; data with many ties, -inf and NaN; the ResNet stem 3x3/2/1; the
//! reference backward against finite differences; bitwise determinism across emulator seeds;
//! typed errors.
//!
//! Tolerances. The forward is exact: the maximum is one of the inputs (or -inf), converted to
//! f32 and back without rounding, so values and indices must agree bit for bit (NaN with NaN).
//! The backward sums, in f32, the dy of the m <= ceil(kh/sh)*ceil(kw/sw) <= 16 outputs whose
//! argmax is the element, then rounds once to the storage type: |err| <= (m*2^-24 + u_T) *
//! sum|dy terms|, u_T the storage unit roundoff. The tolerance is twice that, with sum|dy terms|
//! from the reference backward run on |dy|. A wrong index or a lost contribution misses by |dy|.

mod common;

use cdcl::ops::maxpool::{self, PoolGeometry};
use cdcl::reference::maxpool as rpool;
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
    geom: PoolGeometry,
    dtype: DType,
    /// 0: continuous values; 1: small integers (many ties); 2: with -inf and NaN sprinkled in.
    flavour: u8,
    seed: u64,
}

impl Case {
    fn spec(&self) -> rpool::PoolSpec {
        rpool::PoolSpec { kernel: self.geom.kernel, stride: self.geom.stride, padding: self.geom.padding }
    }
    fn out(&self) -> (usize, usize) {
        self.spec().output_size(self.h, self.w).unwrap()
    }
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=3,
        (1usize..=4, 1usize..=4),
        (1usize..=3, 1usize..=3),
        (0usize..=2, 0usize..=2),
        (0usize..=12, 0usize..=12),
        1usize..=40,
        dtype_strategy(),
        0u8..3,
        any::<u64>(),
    )
        .prop_map(|(n, (kh, kw), (sh, sw), (ph, pw), (eh, ew), c, dtype, flavour, seed)| {
            let (ph, pw) = (ph.min(kh / 2), pw.min(kw / 2));
            let geom = PoolGeometry { kernel: (kh, kw), stride: (sh, sw), padding: (ph, pw) };
            let h = kh.saturating_sub(2 * ph).max(1) + eh;
            let w = kw.saturating_sub(2 * pw).max(1) + ew;
            Case { n, h, w, c, geom, dtype, flavour, seed }
        })
}

fn make_x(k: &Case) -> Vec<f64> {
    let mut rng = Rng(k.seed);
    let len = k.n * k.h * k.w * k.c;
    let v: Vec<f64> = (0..len)
        .map(|_| match k.flavour {
            0 => rng.normal(),
            1 => (rng.below(5) as f64) - 2.0,
            _ => match rng.below(12) {
                0 => f64::NAN,
                1 => f64::NEG_INFINITY,
                _ => rng.normal(),
            },
        })
        .collect();
    quantize(&v, k.dtype)
}

fn a4<T>(v: &[T], d: (usize, usize, usize, usize)) -> ArrayView4<'_, T> {
    ArrayView4::from_shape(d, v).unwrap()
}

fn same_value(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

fn run_case(k: &Case, dev: &Device) -> Result<(), String> {
    let (p, q) = k.out();
    let xv = make_x(k);
    let x = tensor(dev, &[k.n, k.h, k.w, k.c], &xv, k.dtype);
    let out = maxpool::max_pool2d(&x, &k.geom).map_err(|e| e.to_string())?;
    let (want_y, want_idx) = rpool::max_pool2d(a4(&xv, (k.n, k.h, k.w, k.c)), &k.spec());
    let got_y = host(&out.y);
    let got_idx = out.indices.to_vec::<i32>().unwrap();
    for (i, (g, w)) in got_y.iter().zip(want_y.iter()).enumerate() {
        if !same_value(*g, *w) {
            return Err(format!("forward element {i}: got {g} want {w}"));
        }
    }
    for (i, (g, w)) in got_idx.iter().zip(want_idx.iter()).enumerate() {
        if *g as i64 != *w {
            return Err(format!("index element {i}: got {g} want {w}"));
        }
    }

    let mut rng = Rng(k.seed ^ 0x5EED);
    let dyv = quantize(&(0..k.n * p * q * k.c).map(|_| rng.normal()).collect::<Vec<_>>(), k.dtype);
    let dy = tensor(dev, &[k.n, p, q, k.c], &dyv, k.dtype);
    let dx = maxpool::max_pool2d_backward(&dy, &out.indices, (k.h, k.w), &k.geom).map_err(|e| e.to_string())?;
    let yd = (k.n, p, q, k.c);
    let want = rpool::max_pool2d_backward(a4(&dyv, yd), want_idx.view(), k.h, k.w);
    let absdy: Vec<f64> = dyv.iter().map(|v| v.abs()).collect();
    let mag = rpool::max_pool2d_backward(a4(&absdy, yd), want_idx.view(), k.h, k.w);
    let m = k.geom.kernel.0.div_ceil(k.geom.stride.0) * k.geom.kernel.1.div_ceil(k.geom.stride.1);
    let rel = 2.0 * (m as f64 * 2f64.powi(-24) + unit_roundoff(k.dtype));
    let mag = mag.as_slice().unwrap();
    assert_close("backward", &host(&dx), want.as_slice().unwrap(), |i| rel * mag[i])
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn maxpool_matches_reference(k in case_strategy()) {
        run_case(&k, &device()).map_err(TestCaseError::fail)?;
    }
}

/// The ResNet stem (3x3, stride 2, padding 1) on odd and even sizes, 1x1 included.
#[test]
fn resnet_stem_shapes() {
    let dev = device();
    let shapes = [(1, 1, 1, 1), (2, 7, 9, 3), (1, 16, 16, 64), (2, 17, 15, 33), (1, 2, 2, 5)];
    for (i, &(n, h, w, c)) in shapes.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let k = Case { n, h, w, c, geom: PoolGeometry::default(), dtype, flavour: (i % 3) as u8, seed: i as u64 };
            run_case(&k, &dev).unwrap_or_else(|e| panic!("{k:?}: {e}"));
        }
    }
}

/// Padding never wins: an all-negative input keeps negative maxima at the border, and an
/// all -inf window reports its first in-image pixel.
#[test]
fn padding_never_wins_and_nan_propagates() {
    let dev = device();
    let x = Tensor::from_slice(&dev, &[1, 2, 2, 1], &[-5.0f32, -3.0, f32::NEG_INFINITY, -4.0]).unwrap();
    let out = maxpool::max_pool2d(&x, &PoolGeometry::default()).unwrap();
    assert_eq!(out.y.to_vec::<f32>().unwrap(), vec![-3.0]);
    assert_eq!(out.indices.to_vec::<i32>().unwrap(), vec![1]);
    let x = Tensor::from_slice(&dev, &[1, 1, 2, 1], &[f32::NEG_INFINITY; 2]).unwrap();
    let out = maxpool::max_pool2d(&x, &PoolGeometry::square(2, 1, 1)).unwrap();
    assert_eq!(out.indices.to_vec::<i32>().unwrap(), vec![0, 0, 1, 0, 0, 1]);
    let x = Tensor::from_slice(&dev, &[1, 1, 3, 1], &[1.0f32, f32::NAN, 7.0]).unwrap();
    let out = maxpool::max_pool2d(&x, &PoolGeometry { kernel: (1, 3), stride: (1, 1), padding: (0, 1) }).unwrap();
    let y = out.y.to_vec::<f32>().unwrap();
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    assert_eq!(out.indices.to_vec::<i32>().unwrap(), vec![1, 1, 1]);
}

fn all_bits(seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let k = Case { n: 2, h: 33, w: 31, c: 19, geom: PoolGeometry::default(), dtype: DType::F16, flavour: 1, seed: 4 };
    let (p, q) = k.out();
    let x = tensor(&dev, &[k.n, k.h, k.w, k.c], &make_x(&k), k.dtype);
    let mut rng = Rng(8);
    let dy =
        tensor(&dev, &[k.n, p, q, k.c], &(0..k.n * p * q * k.c).map(|_| rng.normal()).collect::<Vec<_>>(), k.dtype);
    let out = maxpool::max_pool2d(&x, &k.geom).unwrap();
    let dx = maxpool::max_pool2d_backward(&dy, &out.indices, (k.h, k.w), &k.geom).unwrap();
    [&out.y, &out.indices, &dx].iter().map(|t| common::bits(t)).collect()
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    let base = all_bits(0, 1);
    for (seed, threads) in [(1, 2), (0xC0FFEE, 0), (99, 1)] {
        assert!(all_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

/// Central differences on the f64 reference: L = sum(y * g). With inputs spaced at least 1e-2
/// apart, a step of 1e-6 never changes an argmax, so L is linear along each coordinate and the
/// difference quotient equals the gradient up to rounding (~1e-16 / 1e-6).
#[test]
fn reference_backward_matches_finite_differences() {
    let spec = rpool::PoolSpec { kernel: (3, 2), stride: (2, 1), padding: (1, 1) };
    let (n, h, w, c) = (2, 5, 4, 3);
    let (p, q) = spec.output_size(h, w).unwrap();
    let mut rng = Rng(5);
    let len = n * h * w * c;
    // A random permutation of 0.01 * (0..len): distinct values.
    let mut x: Vec<f64> = (0..len).map(|i| i as f64 * 0.01).collect();
    for i in (1..len).rev() {
        x.swap(i, rng.below(i + 1));
    }
    let g: Vec<f64> = (0..n * p * q * c).map(|_| rng.normal()).collect();
    let loss = |x: &[f64]| -> f64 {
        let (y, _) = rpool::max_pool2d(a4(x, (n, h, w, c)), &spec);
        y.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let (_, idx) = rpool::max_pool2d(a4(&x, (n, h, w, c)), &spec);
    let analytic = rpool::max_pool2d_backward(a4(&g, (n, p, q, c)), idx.view(), h, w);
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
    let x = Tensor::zeros(&dev, &[1, 5, 5, 3], DType::F32).unwrap();
    let bad = |g: PoolGeometry| maxpool::max_pool2d(&x, &g).unwrap_err();
    assert!(matches!(bad(PoolGeometry::square(3, 0, 1)), Error::InvalidArgument(_)));
    assert!(matches!(bad(PoolGeometry::square(3, 2, 2)), Error::InvalidArgument(_)));
    assert!(matches!(bad(PoolGeometry::square(6, 1, 0)), Error::InvalidShape { .. }));
    let xi = Tensor::zeros(&dev, &[1, 5, 5, 3], DType::I32).unwrap();
    assert!(matches!(maxpool::max_pool2d(&xi, &PoolGeometry::default()), Err(Error::UnsupportedDType { .. })));
    let x3 = Tensor::zeros(&dev, &[5, 5, 3], DType::F32).unwrap();
    assert!(matches!(maxpool::max_pool2d(&x3, &PoolGeometry::default()), Err(Error::InvalidShape { .. })));
    let out = maxpool::max_pool2d(&x, &PoolGeometry::default()).unwrap();
    let g = PoolGeometry::default();
    let dy_bad = Tensor::zeros(&dev, &[1, 2, 3, 3], DType::F32).unwrap();
    let idx_bad = Tensor::zeros(&dev, &[1, 2, 3, 3], DType::I32).unwrap();
    assert!(matches!(maxpool::max_pool2d_backward(&dy_bad, &idx_bad, (5, 5), &g), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(maxpool::max_pool2d_backward(&out.y, &out.y, (5, 5), &g), Err(Error::DTypeMismatch { .. })));
    let other = Device::emulator_with(EmulatorConfig { seed: 1, threads: 1 }).unwrap();
    let idx_other = Tensor::zeros(&other, &[1, 3, 3, 3], DType::I32).unwrap();
    assert!(matches!(maxpool::max_pool2d_backward(&out.y, &idx_other, (5, 5), &g), Err(Error::DeviceMismatch { .. })));
}
