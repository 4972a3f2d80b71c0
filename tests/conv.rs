//! Convolution kernels (implicit GEMM) through the emulator against the direct f64 reference
//! (`cdcl::reference::conv`): random sizes (tiny and odd included), channel counts 1..80,
//! filters 1/3/7, stride 1-2, padding 0-3, dilation 1-4; forward with and without bias, data
//! gradient, filter and bias gradients; gradient check of the reference by finite differences;
//! bitwise determinism across emulator seeds; typed errors.
//!
//! Tolerances. Each output is a dot product of D = R*S*C (forward), R*S*K (data gradient) or
//! N*P*Q (filter gradient) terms accumulated in f32 with FMAs in a fixed order (plus the split-K
//! and bias sums): the standard bound is |err| <= gamma_D * sum|a*b| with gamma_D = D*u/(1-D*u),
//! u = 2^-24. `sum|a*b|` is the reference run on |x| and |w|. On top of that element-wise bound
//! every result must satisfy the acceptance criterion max|err| <= 1e-4 * max|reference|.
//! These hold on devices with TF32 off (`common::test_device`); TF32 has its own bound, derived
//! at `tf32_bound`.

mod common;

use cdcl::ops::conv::{self, ConvGeometry};
use cdcl::reference::conv as rconv;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, host, tensor, Rng};
use ndarray::{Array1, Array4, ArrayView4};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    r: usize,
    s: usize,
    geom: ConvGeometry,
    bias: bool,
    seed: u64,
}

impl Case {
    fn spec(&self) -> rconv::ConvSpec {
        rconv::ConvSpec { stride: self.geom.stride, padding: self.geom.padding, dilation: self.geom.dilation }
    }
    fn out(&self) -> (usize, usize) {
        self.spec().output_size(self.h, self.w, self.r, self.s).unwrap()
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=3,
        prop_oneof![Just(1usize), Just(3), Just(7)],
        (1usize..=2, 0usize..=3, 1usize..=4),
        (0usize..=9, 0usize..=9),
        (1usize..=80, 1usize..=80),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(n, r, (stride, pad, dil), (eh, ew), (c, k), bias, seed)| {
            // Big filters get fewer channels so one case stays well under a second.
            let (c, k) = if r == 7 { (c % 12 + 1, k % 24 + 1) } else { (c, k) };
            let span = dil * (r - 1) + 1;
            let min = span.saturating_sub(2 * pad).max(1);
            let geom = ConvGeometry::square(stride, pad, dil);
            Case { n, h: min + eh, w: min + ew, c, k, r, s: r, geom, bias, seed }
        })
}

struct Host {
    x: Vec<f64>,
    w: Vec<f64>,
    b: Vec<f64>,
    dy: Vec<f64>,
}

fn make(k: &Case) -> Host {
    let mut rng = Rng(k.seed);
    let (p, q) = k.out();
    let mut v = |len: usize| -> Vec<f64> { (0..len).map(|_| rng.normal() as f32 as f64).collect() };
    Host { x: v(k.n * k.h * k.w * k.c), w: v(k.k * k.r * k.s * k.c), b: v(k.k), dy: v(k.n * p * q * k.k) }
}

fn a4<'a>(v: &'a [f64], d: (usize, usize, usize, usize)) -> ArrayView4<'a, f64> {
    ArrayView4::from_shape(d, v).unwrap()
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn gamma(d: usize) -> f64 {
    let u = 2f64.powi(-24);
    (d as f64 + 2.0) * u / (1.0 - (d as f64 + 2.0) * u)
}

/// TF32 (`Device::allow_tf32`): every operand a, b is rounded once to nearest with ties away
/// from zero to 10 mantissa bits, a relative error of at most u = 2^-11 each (subnormal inputs
/// aside: f32 subnormals keep an absolute error below 2^-137, far under the 1e-30 floor's
/// neighbours here, since the test data are normal(0, 1)). So each product changes by at most
/// (2u + u^2)|a*b|, and the f32 accumulation of the D rounded products (exact in f32: 11 x 11
/// significant bits) in 8-deep tensor-core steps, then across steps, the bias add and up to 32
/// split-K slices adds gamma(D + 32) * sum|a~ b~| <= gamma(D + 32) (1 + u)^2 sum|a*b|. Together:
/// |err| <= ((2u + u^2) + gamma(D + 32) (1 + u)^2) * sum|a*b| (sum|a*b| includes |bias|, which is
/// not rounded: an over-estimate).
fn tf32_bound(depth: usize, magnitude: f64) -> f64 {
    let u = 2f64.powi(-11);
    ((2.0 * u + u * u) + gamma(depth + 32) * (1.0 + u) * (1.0 + u)) * magnitude + 1e-30
}

fn check(what: &str, got: &[f64], want: &[f64], magnitude: &[f64], depth: usize, tf32: bool) -> Result<(), String> {
    if tf32 {
        return assert_close(&format!("TF32 {what}"), got, want, |i| tf32_bound(depth, magnitude[i]));
    }
    assert_close(what, got, want, |i| gamma(depth) * magnitude[i] + 1e-30)?;
    let max_ref = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let max_err = got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    if max_err > 1e-4 * max_ref.max(1e-30) {
        return Err(format!("{what}: max error {max_err:e} > 1e-4 * max|ref| {max_ref:e}"));
    }
    Ok(())
}

fn run_case(k: &Case, dev: &Device) -> Result<(), String> {
    let tf32 = dev.allow_tf32();
    let hst = make(k);
    let (p, q) = k.out();
    let (xd, wd, yd) = ((k.n, k.h, k.w, k.c), (k.k, k.r, k.s, k.c), (k.n, p, q, k.k));
    let x = tensor(dev, &[k.n, k.h, k.w, k.c], &hst.x, DType::F32);
    let w = tensor(dev, &[k.k, k.r, k.s, k.c], &hst.w, DType::F32);
    let b = tensor(dev, &[k.k], &hst.b, DType::F32);
    let dy = tensor(dev, &[k.n, p, q, k.k], &hst.dy, DType::F32);
    let spec = k.spec();
    let bias = Array1::from(hst.b.clone());

    let y = conv::conv2d(&x, &w, k.bias.then_some(&b), &k.geom).map_err(|e| e.to_string())?;
    let want = rconv::conv2d(a4(&hst.x, xd), a4(&hst.w, wd), k.bias.then(|| bias.view()), &spec);
    let absb = Array1::from(abs(&hst.b));
    let mag = rconv::conv2d(a4(&abs(&hst.x), xd), a4(&abs(&hst.w), wd), k.bias.then(|| absb.view()), &spec);
    check("forward", &host(&y), want.as_slice().unwrap(), mag.as_slice().unwrap(), k.r * k.s * k.c, tf32)?;

    let wg = rconv::conv2d_backward(a4(&hst.dy, yd), a4(&hst.x, xd), a4(&hst.w, wd), &spec);
    let mg = rconv::conv2d_backward(a4(&abs(&hst.dy), yd), a4(&abs(&hst.x), xd), a4(&abs(&hst.w), wd), &spec);
    let dx = conv::conv2d_backward_data(&dy, &w, (k.h, k.w), &k.geom).map_err(|e| e.to_string())?;
    check("data gradient", &host(&dx), wg.dx.as_slice().unwrap(), mg.dx.as_slice().unwrap(), k.r * k.s * k.k, tf32)?;
    let fg = conv::conv2d_backward_filter(&dy, &x, (k.k, k.r, k.s), k.bias, &k.geom).map_err(|e| e.to_string())?;
    let npq = k.n * p * q;
    check("filter gradient", &host(&fg.dweight), wg.dw.as_slice().unwrap(), mg.dw.as_slice().unwrap(), npq, tf32)?;
    match (&fg.dbias, k.bias) {
        (Some(db), true) => {
            // The bias gradient sums dy in f32 on every path: no TF32 rounding.
            check("bias gradient", &host(db), wg.dbias.as_slice().unwrap(), mg.dbias.as_slice().unwrap(), npq, false)?
        }
        (None, false) => {}
        _ => return Err("bias gradient presence does not follow the request".into()),
    }
    Ok(())
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn conv_matches_reference(k in case_strategy()) {
        run_case(&k, &device()).map_err(TestCaseError::fail)?;
    }
}

/// Shapes of the dilated ResNet and PSPNet at toy sizes, plus a filter-gradient reduction long
/// enough to be split into several slices (N*P*Q > 8192).
#[test]
fn network_shapes() {
    let dev = device();
    let cases = [
        (2, 17, 17, 3, 16, 7, 2, 3, 1), // stem: 7x7 stride 2
        (2, 9, 9, 16, 16, 3, 1, 2, 2),  // layer3: dilation 2
        (1, 9, 9, 16, 8, 3, 1, 4, 4),   // layer4: dilation 4
        (2, 9, 9, 33, 65, 1, 1, 0, 1),  // 1x1 projection, odd channels
        (3, 64, 48, 2, 3, 3, 1, 1, 1),  // N*P*Q = 9216: split-K of the filter gradient
    ];
    for (i, &(n, h, w, c, k, r, stride, pad, dil)) in cases.iter().enumerate() {
        let case =
            Case { n, h, w, c, k, r, s: r, geom: ConvGeometry::square(stride, pad, dil), bias: true, seed: i as u64 };
        run_case(&case, &dev).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    }
}

fn all_bits(seed: u64, threads: u32, tf32: bool) -> Vec<Vec<u8>> {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    dev.set_allow_tf32(tf32);
    let k =
        Case { n: 3, h: 60, w: 50, c: 5, k: 7, r: 3, s: 3, geom: ConvGeometry::square(1, 2, 2), bias: true, seed: 9 };
    let hst = make(&k);
    let (p, q) = k.out();
    let x = tensor(&dev, &[k.n, k.h, k.w, k.c], &hst.x, DType::F32);
    let w = tensor(&dev, &[k.k, k.r, k.s, k.c], &hst.w, DType::F32);
    let b = tensor(&dev, &[k.k], &hst.b, DType::F32);
    let dy = tensor(&dev, &[k.n, p, q, k.k], &hst.dy, DType::F32);
    let y = conv::conv2d(&x, &w, Some(&b), &k.geom).unwrap();
    let dx = conv::conv2d_backward_data(&dy, &w, (k.h, k.w), &k.geom).unwrap();
    let g = conv::conv2d_backward_filter(&dy, &x, (k.k, k.r, k.s), true, &k.geom).unwrap();
    [&y, &dx, &g.dweight, g.dbias.as_ref().unwrap()].iter().map(|t| common::bits(t)).collect()
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    for tf32 in [false, true] {
        let base = all_bits(0, 1, tf32);
        for (seed, threads) in [(1, 2), (77, 0), (0xFEED, 1)] {
            assert!(
                all_bits(seed, threads, tf32) == base,
                "TF32 {tf32}: seed {seed}, threads {threads} changed the bits"
            );
        }
    }
}

// ---- f32 storage in TF32 (tensor cores) -------------------------------------------------------

fn tf32_device() -> Device {
    let dev = common::test_device();
    dev.set_allow_tf32(true);
    dev
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]

    /// Forward, data and filter (+ bias) gradients in TF32 within `tf32_bound`.
    #[test]
    fn conv_tf32_matches_reference(k in case_strategy()) {
        run_case(&k, &tf32_device()).map_err(TestCaseError::fail)?;
    }
}

/// TF32 at the network's shapes (split-K filter gradient included), within `tf32_bound`.
#[test]
fn tf32_network_shapes() {
    let dev = tf32_device();
    let cases = [
        (2, 17, 17, 3, 16, 7, 2, 3, 1), // stem: 7x7 stride 2
        (2, 9, 9, 33, 65, 1, 1, 0, 1),  // 1x1 projection, odd channels
        (2, 65, 65, 5, 6, 3, 1, 1, 1),  // N*P*Q = 8450: split-K of the filter gradient
    ];
    for (i, &(n, h, w, c, k, r, stride, pad, dil)) in cases.iter().enumerate() {
        let case =
            Case { n, h, w, c, k, r, s: r, geom: ConvGeometry::square(stride, pad, dil), bias: true, seed: i as u64 };
        run_case(&case, &dev).unwrap_or_else(|e| panic!("{case:?}: {e}"));
    }
}

/// The setting is honoured on all three problems: an input that TF32 cannot hold (1 + 2^-20 is
/// 1 in TF32) gives C exactly with TF32 on and C * (1 + 2^-20) with it off; and `set_allow_tf32`
/// is on by default, as PyTorch's `allow_tf32`.
#[test]
fn tf32_setting_selects_the_path() {
    let (c, k) = (8usize, 4usize);
    let g = ConvGeometry::default();
    let v = 1.0 + 2f64.powi(-20);
    for on in [true, false] {
        let dev = Device::emulator_with(EmulatorConfig { seed: 0, threads: 1 }).unwrap();
        assert!(dev.allow_tf32(), "TF32 is on by default");
        dev.set_allow_tf32(on);
        let x = tensor(&dev, &[1, 2, 2, c], &vec![v; 4 * c], DType::F32);
        let w = tensor(&dev, &[k, 1, 1, c], &vec![1.0; k * c], DType::F32);
        let dy = tensor(&dev, &[1, 2, 2, k], &vec![v; 4 * k], DType::F32);
        let want = |terms: usize| if on { terms as f64 } else { terms as f64 * v };
        let y = host(&conv::conv2d(&x, &w, None, &g).unwrap());
        assert!(y.iter().all(|&e| e == want(c)), "forward, TF32 {on}: {y:?}");
        let dx = host(&conv::conv2d_backward_data(&dy, &w, (2, 2), &g).unwrap());
        assert!(dx.iter().all(|&e| e == want(k)), "data gradient, TF32 {on}: {dx:?}");
        let dw = host(&conv::conv2d_backward_filter(&dy, &x, (k, 1, 1), false, &g).unwrap().dweight);
        // dw = sum over 4 pixels of dy * x = 4 v^2 exactly in f64; TF32 rounds both to 1.
        let want_w = if on { 4.0 } else { ((v * v) as f32 as f64) * 4.0 };
        assert!(dw.iter().all(|&e| (e - want_w).abs() <= 4.0 * 2f64.powi(-23)), "filter gradient, TF32 {on}: {dw:?}");
        assert!(on == (dw[0] == 4.0), "filter gradient, TF32 {on}: {dw:?}");
    }
}

/// Central differences on the f64 reference: L = sum(y * g) for a fixed g, so dL/dθ is what the
/// reference backward returns. Truncation O(h^2) vanishes for a function linear in each input,
/// leaving rounding ~1e-16/h: 1e-7 relative is far above it and far below any indexing mistake.
#[test]
fn reference_backward_matches_finite_differences() {
    let spec = rconv::ConvSpec { stride: (2, 1), padding: (1, 2), dilation: (2, 1) };
    let (n, h, w, c, k, r, s) = (2, 6, 5, 3, 4, 3, 2);
    let (p, q) = spec.output_size(h, w, r, s).unwrap();
    let mut rng = Rng(3);
    let mut v = |len: usize| -> Vec<f64> { (0..len).map(|_| rng.normal()).collect() };
    let (x, wt, b, g) = (v(n * h * w * c), v(k * r * s * c), v(k), v(n * p * q * k));
    let loss = |x: &[f64], wt: &[f64], b: &[f64]| -> f64 {
        let bias = Array1::from(b.to_vec());
        let y = rconv::conv2d(a4(x, (n, h, w, c)), a4(wt, (k, r, s, c)), Some(bias.view()), &spec);
        y.iter().zip(&g).map(|(a, b)| a * b).sum()
    };
    let grads = rconv::conv2d_backward(a4(&g, (n, p, q, k)), a4(&x, (n, h, w, c)), a4(&wt, (k, r, s, c)), &spec);
    let hstep = 1e-6;
    let numeric = |which: usize, i: usize| {
        let (mut xs, mut ws, mut bs) = (x.clone(), wt.clone(), b.clone());
        let bump = |v: &mut Vec<f64>, d: f64| v[i] += d;
        let eval = |d: f64, xs: &mut Vec<f64>, ws: &mut Vec<f64>, bs: &mut Vec<f64>| {
            match which {
                0 => bump(xs, d),
                1 => bump(ws, d),
                _ => bump(bs, d),
            }
            let l = loss(xs, ws, bs);
            match which {
                0 => bump(xs, -d),
                1 => bump(ws, -d),
                _ => bump(bs, -d),
            }
            l
        };
        (eval(hstep, &mut xs, &mut ws, &mut bs) - eval(-hstep, &mut xs, &mut ws, &mut bs)) / (2.0 * hstep)
    };
    for (which, analytic) in
        [(0, grads.dx.as_slice().unwrap()), (1, grads.dw.as_slice().unwrap()), (2, grads.dbias.as_slice().unwrap())]
    {
        for (i, &a) in analytic.iter().enumerate() {
            let num = numeric(which, i);
            assert!(
                (num - a).abs() <= 1e-7 * a.abs().max(1.0),
                "param {which} element {i}: numeric {num} analytic {a}"
            );
        }
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device();
    let x = Tensor::zeros(&dev, &[1, 5, 5, 3], DType::F32).unwrap();
    let w = Tensor::zeros(&dev, &[4, 3, 3, 3], DType::F32).unwrap();
    let g = ConvGeometry::default();
    let w_bad_c = Tensor::zeros(&dev, &[4, 3, 3, 2], DType::F32).unwrap();
    assert!(matches!(conv::conv2d(&x, &w_bad_c, None, &g), Err(Error::ShapeMismatch { .. })));
    let w_big = Tensor::zeros(&dev, &[4, 7, 7, 3], DType::F32).unwrap();
    assert!(matches!(conv::conv2d(&x, &w_big, None, &g), Err(Error::InvalidShape { .. })));
    assert!(matches!(conv::conv2d(&x, &w, None, &ConvGeometry::square(0, 0, 1)), Err(Error::InvalidArgument(_))));
    let x16 = Tensor::zeros(&dev, &[1, 5, 5, 3], DType::F16).unwrap();
    assert!(matches!(conv::conv2d(&x16, &w, None, &g), Err(Error::DTypeMismatch { .. })));
    let xi = Tensor::zeros(&dev, &[1, 5, 5, 3], DType::I32).unwrap();
    let wi = Tensor::zeros(&dev, &[4, 3, 3, 3], DType::I32).unwrap();
    assert!(matches!(conv::conv2d(&xi, &wi, None, &g), Err(Error::UnsupportedDType { .. })));
    // The backward passes want one storage type throughout.
    let w16 = Tensor::zeros(&dev, &[4, 3, 3, 3], DType::F16).unwrap();
    let dy16 = Tensor::zeros(&dev, &[1, 3, 3, 4], DType::F16).unwrap();
    let dyb16 = Tensor::zeros(&dev, &[1, 3, 3, 4], DType::BF16).unwrap();
    assert!(matches!(conv::conv2d_backward_data(&dyb16, &w16, (5, 5), &g), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(conv::conv2d_backward_filter(&dy16, &x, (4, 3, 3), false, &g), Err(Error::DTypeMismatch { .. })));
    let dyi = Tensor::zeros(&dev, &[1, 3, 3, 4], DType::I32).unwrap();
    assert!(matches!(conv::conv2d_backward_data(&dyi, &wi, (5, 5), &g), Err(Error::UnsupportedDType { .. })));
    assert!(conv::conv2d_backward_data(&dy16, &w16, (5, 5), &g).is_ok());
    let bias_bad = Tensor::zeros(&dev, &[5], DType::F32).unwrap();
    assert!(matches!(conv::conv2d(&x, &w, Some(&bias_bad), &g), Err(Error::ShapeMismatch { .. })));
    let dy_bad = Tensor::zeros(&dev, &[1, 4, 3, 4], DType::F32).unwrap();
    assert!(matches!(conv::conv2d_backward_data(&dy_bad, &w, (5, 5), &g), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(
        conv::conv2d_backward_filter(&dy_bad, &x, (4, 3, 3), false, &g),
        Err(Error::ShapeMismatch { .. })
    ));
    let _ = Array4::<f64>::zeros((1, 1, 1, 1));
}

// ---- f16 / bf16 storage: the tensor-core mainloop ---------------------------------------------

/// Forward, data gradient and filter (+ bias) gradient with 16-bit x, weight and dy (bias and
/// its gradient f32) against the f64 reference computed from the same 16-bit-rounded inputs.
/// Tolerance: a product of two 16-bit values is exact in f32, so the f32 accumulation of the D
/// products (D = R*S*C forward, R*S*K data gradient, N*P*Q filter gradient; in 16-deep
/// tensor-core steps, then across steps, then across at most 32 split-K slices kept in f32) and
/// the bias add are bounded as in the f32 path by gamma(D + 32)·sum|a·b|; the result is then
/// rounded once to the storage type: at most u_T·|y| (u_T = 2^-11 for f16, 2^-8 for bf16), plus
/// half the smallest f16 subnormal (2^-25) for results that land in f16's subnormal range. The
/// bias gradient is an f32 sum of 16-bit dy values: gamma(N*P*Q)·sum|dy| with no final rounding.
fn run_case_16(k: &Case, dev: &Device, dtype: DType) -> Result<Vec<u8>, String> {
    let hst = make(k);
    let (p, q) = k.out();
    let (xd, wd) = ((k.n, k.h, k.w, k.c), (k.k, k.r, k.s, k.c));
    let (xq, wq) = (common::quantize(&hst.x, dtype), common::quantize(&hst.w, dtype));
    let x = tensor(dev, &[k.n, k.h, k.w, k.c], &xq, dtype);
    let w = tensor(dev, &[k.k, k.r, k.s, k.c], &wq, dtype);
    let b = tensor(dev, &[k.k], &hst.b, DType::F32);
    let spec = k.spec();
    let bias = Array1::from(hst.b.clone());
    let y = conv::conv2d(&x, &w, k.bias.then_some(&b), &k.geom).map_err(|e| e.to_string())?;
    if y.dtype() != dtype || y.shape() != [k.n, p, q, k.k] {
        return Err(format!("output {:?} {:?}", y.dtype(), y.shape()));
    }
    let want = rconv::conv2d(a4(&xq, xd), a4(&wq, wd), k.bias.then(|| bias.view()), &spec);
    let absb = Array1::from(abs(&hst.b));
    let mag = rconv::conv2d(a4(&abs(&xq), xd), a4(&abs(&wq), wd), k.bias.then(|| absb.view()), &spec);
    let (want, mag) = (want.as_slice().unwrap(), mag.as_slice().unwrap());
    let u = common::unit_roundoff(dtype);
    let rounded = |want: &[f64], mag: &[f64], depth: usize| {
        let (want, mag) = (want.to_vec(), mag.to_vec());
        move |i: usize| {
            let acc = gamma(depth + 32) * mag[i];
            u * (want[i].abs() + acc) + acc + 2f64.powi(-25)
        }
    };
    assert_close(&format!("{dtype} forward"), &host(&y), want, rounded(want, mag, k.r * k.s * k.c))?;

    let yd = (k.n, p, q, k.k);
    let dyq = common::quantize(&hst.dy, dtype);
    let dy = tensor(dev, &[k.n, p, q, k.k], &dyq, dtype);
    let wg = rconv::conv2d_backward(a4(&dyq, yd), a4(&xq, xd), a4(&wq, wd), &spec);
    let mg = rconv::conv2d_backward(a4(&abs(&dyq), yd), a4(&abs(&xq), xd), a4(&abs(&wq), wd), &spec);
    let dx = conv::conv2d_backward_data(&dy, &w, (k.h, k.w), &k.geom).map_err(|e| e.to_string())?;
    if dx.dtype() != dtype {
        return Err(format!("data gradient is {:?}", dx.dtype()));
    }
    let (want, mag) = (wg.dx.as_slice().unwrap(), mg.dx.as_slice().unwrap());
    assert_close(&format!("{dtype} data gradient"), &host(&dx), want, rounded(want, mag, k.r * k.s * k.k))?;
    let fg = conv::conv2d_backward_filter(&dy, &x, (k.k, k.r, k.s), k.bias, &k.geom).map_err(|e| e.to_string())?;
    if fg.dweight.dtype() != dtype {
        return Err(format!("filter gradient is {:?}", fg.dweight.dtype()));
    }
    let npq = k.n * p * q;
    let (want, mag) = (wg.dw.as_slice().unwrap(), mg.dw.as_slice().unwrap());
    assert_close(&format!("{dtype} filter gradient"), &host(&fg.dweight), want, rounded(want, mag, npq))?;
    let mut bits = [common::bits(&y), common::bits(&dx), common::bits(&fg.dweight)].concat();
    match (&fg.dbias, k.bias) {
        (Some(db), true) => {
            if db.dtype() != DType::F32 {
                return Err(format!("bias gradient is {:?}", db.dtype()));
            }
            let (want, mag) = (wg.dbias.as_slice().unwrap(), mg.dbias.as_slice().unwrap());
            assert_close(&format!("{dtype} bias gradient"), &host(db), want, |i| gamma(npq) * mag[i] + 1e-30)?;
            bits.extend(common::bits(db));
        }
        (None, false) => {}
        _ => return Err("bias gradient presence does not follow the request".into()),
    }
    Ok(bits)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn conv_f16_matches_reference(k in case_strategy()) {
        run_case_16(&k, &device(), DType::F16).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn conv_bf16_matches_reference(k in case_strategy()) {
        run_case_16(&k, &device(), DType::BF16).map_err(TestCaseError::fail)?;
    }
}

/// Network shapes in 16-bit storage, and the same bits on every emulator seed and worker count.
#[test]
fn conv_16bit_network_shapes_and_bitwise_determinism() {
    let cases = [
        (2, 17, 17, 3, 16, 7, 2, 3, 1), // stem: 7x7 stride 2
        (2, 9, 9, 16, 16, 3, 1, 2, 2),  // layer3: dilation 2
        (2, 9, 9, 33, 65, 1, 1, 0, 1),  // 1x1 projection, odd channels
        (2, 65, 65, 5, 6, 3, 1, 1, 1),  // N*P*Q = 8450: a split-K filter gradient
    ];
    for dtype in [DType::F16, DType::BF16] {
        for (i, &(n, h, w, c, k, r, stride, pad, dil)) in cases.iter().enumerate() {
            let case = Case {
                n,
                h,
                w,
                c,
                k,
                r,
                s: r,
                geom: ConvGeometry::square(stride, pad, dil),
                bias: true,
                seed: i as u64,
            };
            let base = run_case_16(&case, &device(), dtype).unwrap_or_else(|e| panic!("{case:?}: {e}"));
            if i >= 2 {
                for (seed, threads) in [(1, 2), (0xFEED, 1)] {
                    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
                    assert!(run_case_16(&case, &dev, dtype).unwrap() == base, "{dtype}: seed {seed} changed the bits");
                }
            }
        }
    }
}
