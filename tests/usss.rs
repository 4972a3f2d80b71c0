//! USSS entropy-loss kernels through the emulator against the f64 reference
//! (`cdcl::reference::usss`): random N, H, W (1x1 included), E 1..70, 1..4 datasets with 2..40
//! classes each, mixed-dataset batches, masks (none, random, all zero, all one), f32/f16/bf16
//! storage; gradient check of the reference by finite differences; bitwise determinism across
//! emulator seeds; typed errors.
//!
//! Tolerances: first-order error bounds, evaluated per pixel from the case's own data, times a
//! safety factor of 2. With u = 2^-24 (the kernels compute in f32; features are rounded to their
//! storage type before the reference sees them, so storage adds nothing to the forward):
//! - a logit s_j = <f, proto_j> / T is an E-term FMA dot product, then one multiply by 1/T:
//!   |ds_j| <= (E + 2) u sum_k |f_k proto_jk| / T, and z_j = s_j - max adds u |s|:
//!   ds := 2 ((E + 2) u max_j sum_k |f_k proto_jk| / T + 2 u max_j |s_j|).
//! - dH = sum_j p_j (ln p_j + H)(-dz_j) over a dataset's C logits, and
//!   sum_j p_j |ln p_j + H| <= 2H <= 2 ln C, so |dH| <= 2 ln C ds; the C-term sums of e^z and
//!   e^z z and the log add (C + 4) u (1 + |ln Z| + sum_j p_j |z_j|).
//! - the means add at most (M + 8) u times the mean entropy (blocked f32 sums of M terms).
//! - gradient coefficients c_j = -(w/T) p_j (ln p_j + H):
//!   sum_j |dc_j| <= (w/T) (dlp (1 + 2 ln C) + dH) with dlp = 2 ds + (C + 4) u (1 + |lse|) the
//!   error of ln p_j; dx_k = sum_j c_j P_jk adds (P + 2) u sum_j |c_j P_jk|, at most
//!   (P + 2) u (w/T) 2 ln C max_j |P_jk|; half storage of dx adds one rounding, u_storage |dx|
//!   (plus 2^-25 absolute for f16's subnormal range).
//!
//! A kernel that mixes datasets, classes, pixels or weights misses these by orders of magnitude
//! (a 1e-4 relative error in the logits, or the cross weight divided by D instead of D - 1,
//! fails them 6x to 300x).

mod common;

use cdcl::ops::usss::{self, UsssOptions, UsssPrototypes};
use cdcl::reference::usss as refu;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, host, quantize, tensor, unit_roundoff, Rng};
use ndarray::{Array3, ArrayView2, ArrayView3, ArrayView4};
use proptest::prelude::*;

const U32: f64 = 1.0 / (1u64 << 24) as f64;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    e: usize,
    classes: Vec<usize>,
    datasets: Vec<usize>,
    /// 0: no mask, 1: random, 2: all zero, 3: all one.
    mask_kind: u8,
    temperature: f64,
    alpha: f64,
    beta: f64,
    scale: f64,
    seed: u64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        (1usize..=3, 1usize..=5, 1usize..=5, 1usize..=70),
        proptest::collection::vec(2usize..=40, 1..=4),
        (0u8..4, 0.2f64..2.0, -1.0f64..2.0, 0.0f64..2.0, 0.3f64..2.0),
        any::<u64>(),
    )
        .prop_flat_map(|((n, h, w, e), classes, (mask_kind, temperature, alpha, beta, scale), seed)| {
            let d = classes.len();
            proptest::collection::vec(0..d, n).prop_map(move |datasets| Case {
                n,
                h,
                w,
                e,
                classes: classes.clone(),
                datasets,
                mask_kind,
                temperature,
                alpha,
                beta,
                scale,
                seed,
            })
        })
}

struct Data {
    x: Vec<f64>,
    /// Per dataset, `[C_d, E]` rows of unit norm, rounded to f32.
    protos: Vec<Vec<f64>>,
    mask: Option<Vec<u8>>,
}

fn make_data(k: &Case, dtype: DType) -> Data {
    let mut r = Rng(k.seed);
    let x: Vec<f64> = (0..k.n * k.h * k.w * k.e).map(|_| k.scale * r.normal()).collect();
    let protos = k
        .classes
        .iter()
        .map(|&c| {
            let mut rows = Vec::with_capacity(c * k.e);
            for _ in 0..c {
                let row: Vec<f64> = (0..k.e).map(|_| r.normal()).collect();
                let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-30);
                rows.extend(row.iter().map(|v| v / norm));
            }
            quantize(&rows, DType::F32)
        })
        .collect();
    let pixels = k.n * k.h * k.w;
    let mask = match k.mask_kind {
        0 => None,
        1 => Some((0..pixels).map(|_| if r.below(3) == 0 { 0 } else { 1 + r.below(255) as u8 }).collect()),
        2 => Some(vec![0; pixels]),
        _ => Some(vec![1; pixels]),
    };
    Data { x: quantize(&x, dtype), protos, mask }
}

struct Inputs {
    x: Tensor,
    datasets: Tensor,
    protos: UsssPrototypes,
    mask: Option<Tensor>,
}

fn upload(dev: &Device, k: &Case, data: &Data, dtype: DType) -> Inputs {
    let table: Vec<f64> = data.protos.concat();
    let ds: Vec<i32> = k.datasets.iter().map(|&d| d as i32).collect();
    Inputs {
        x: tensor(dev, &[k.n, k.h, k.w, k.e], &data.x, dtype),
        datasets: Tensor::from_slice(dev, &[k.n], &ds).unwrap(),
        protos: UsssPrototypes::new(tensor(dev, &[table.len() / k.e, k.e], &table, DType::F32), &k.classes).unwrap(),
        mask: data.mask.as_ref().map(|m| Tensor::from_slice(dev, &[k.n, k.h, k.w], m).unwrap()),
    }
}

fn opts(k: &Case) -> UsssOptions {
    UsssOptions { temperature: k.temperature as f32, alpha: k.alpha as f32, beta: k.beta as f32 }
}

/// The reference sees the values the kernel sees: T, alpha, beta rounded to f32.
fn cfg(k: &Case) -> refu::UsssConfig {
    let o = opts(k);
    refu::UsssConfig { temperature: o.temperature as f64, alpha: o.alpha as f64, beta: o.beta as f64 }
}

fn mask_bool(k: &Case, data: &Data) -> Option<Array3<bool>> {
    data.mask.as_ref().map(|m| Array3::from_shape_vec((k.n, k.h, k.w), m.iter().map(|&b| b != 0).collect()).unwrap())
}

fn proto_views<'a>(k: &Case, data: &'a Data) -> Vec<ArrayView2<'a, f64>> {
    data.protos.iter().zip(&k.classes).map(|(p, &c)| ArrayView2::from_shape((c, k.e), p).unwrap()).collect()
}

/// Error bounds of one pixel (see the module comment), per dataset.
struct PixelBounds {
    /// Bound on the error of H_d'.
    dh: Vec<f64>,
    /// Bound on sum_j |dc_j| / (w/T) (coefficient error per unit weight).
    dc: Vec<f64>,
    /// Reference entropies.
    h: Vec<f64>,
}

fn pixel_bounds(k: &Case, data: &Data, pix: usize) -> PixelBounds {
    let f = &data.x[pix * k.e..(pix + 1) * k.e];
    let t = cfg(k).temperature;
    let (mut dh, mut dc, mut hs) = (vec![], vec![], vec![]);
    for (d, rows) in data.protos.iter().enumerate() {
        let c = k.classes[d];
        let s: Vec<f64> = rows.chunks(k.e).map(|r| r.iter().zip(f).map(|(a, b)| a * b).sum::<f64>() / t).collect();
        let mag = rows.chunks(k.e).map(|r| r.iter().zip(f).map(|(a, b)| (a * b).abs()).sum::<f64>() / t);
        let max_mag = mag.fold(0.0f64, f64::max);
        let max_s = s.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let ds = 2.0 * ((k.e as f64 + 2.0) * U32 * max_mag + 2.0 * U32 * max_s);
        let p = refu::softmax(&s);
        let h = refu::entropy(&p);
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z_sum: f64 = s.iter().map(|v| (v - m).exp()).sum();
        let pz: f64 = p.iter().zip(&s).map(|(pj, sj)| pj * (sj - m).abs()).sum();
        let lnc = (c as f64).ln();
        let cu = (c as f64 + 4.0) * U32;
        let dhd = 2.0 * lnc * ds + cu * (1.0 + z_sum.ln().abs() + pz);
        let dlp = 2.0 * ds + cu * (1.0 + (m + z_sum.ln()).abs());
        dh.push(dhd);
        dc.push(dlp * (1.0 + 2.0 * lnc) + dhd);
        hs.push(h);
    }
    PixelBounds { dh, dc, h: hs }
}

fn included(data: &Data, pix: usize) -> bool {
    data.mask.as_ref().is_none_or(|m| m[pix] != 0)
}

fn check_case(k: &Case, dtype: DType, dev: &Device) -> Result<(), String> {
    let data = make_data(k, dtype);
    let inp = upload(dev, k, &data, dtype);
    let mb = mask_bool(k, &data);
    let xv = ArrayView4::from_shape((k.n, k.h, k.w, k.e), &data.x).unwrap();
    let pv = proto_views(k, &data);
    let c = cfg(k);
    let want =
        refu::usss_forward(xv, &k.datasets, &pv, mb.as_ref().map(|m| m.view()), &c).map_err(|e| e.to_string())?;
    let got =
        usss::forward(&inp.x, &inp.datasets, &inp.protos, inp.mask.as_ref(), &opts(k)).map_err(|e| e.to_string())?;

    let pixels = k.n * k.h * k.w;
    let nd = k.classes.len();
    let bounds: Vec<Option<PixelBounds>> =
        (0..pixels).map(|pix| included(&data, pix).then(|| pixel_bounds(k, &data, pix))).collect();
    let m = bounds.iter().flatten().count();
    if m == 0 {
        // No pixel takes part: exact zeros, not NaN.
        if (got.total, got.cross, got.within) != (0.0, 0.0, 0.0) {
            return Err(format!("empty mask: expected exact zeros, got {got:?}"));
        }
    } else {
        let hw = k.h * k.w;
        let (mut tw, mut tc, mut hw_sum, mut hc_sum) = (0.0, 0.0, 0.0, 0.0);
        for (pix, b) in bounds.iter().enumerate() {
            let Some(b) = b else { continue };
            let own = k.datasets[pix / hw];
            for d in 0..nd {
                if d == own {
                    tw += b.dh[d];
                    hw_sum += b.h[d];
                } else {
                    tc += b.dh[d] / (nd - 1) as f64;
                    hc_sum += b.h[d] / (nd - 1) as f64;
                }
            }
        }
        let acc = (m as f64 + 8.0) * U32;
        let tol_w = 2.0 * (tw + acc * hw_sum) / m as f64 + 1e-30;
        let tol_c = 2.0 * (tc + acc * hc_sum) / m as f64 + 1e-30;
        let tol_t = c.alpha.abs() * tol_c + c.beta.abs() * tol_w + 4.0 * U32 * want.total.abs() + 1e-30;
        assert_close("within", &[got.within as f64], &[want.within], |_| tol_w)?;
        assert_close("cross", &[got.cross as f64], &[want.cross], |_| tol_c)?;
        assert_close("total", &[got.total as f64], &[want.total], |_| tol_t)?;
    }

    let grad = 0.75;
    let dx = usss::backward(grad as f32, &inp.x, &inp.datasets, &inp.protos, inp.mask.as_ref(), &opts(k))
        .map_err(|e| e.to_string())?;
    let wdx = refu::usss_backward(grad, xv, &k.datasets, &pv, mb.as_ref().map(|m| m.view()), &c)
        .map_err(|e| e.to_string())?;
    let wdx: Vec<f64> = wdx.iter().copied().collect();
    let us = unit_roundoff(dtype);
    let p_total: usize = k.classes.iter().sum();
    let mf = m.max(1) as f64;
    let dxh = host(&dx);
    // f16 stores values below 2^-14 with a fixed spacing of 2^-24: half of it is the rounding.
    let subnormal = if dtype == DType::F16 { 2f64.powi(-25) } else { 0.0 };
    assert_close("dx", &dxh, &wdx, |i| {
        let pix = i / k.e;
        let kk = i % k.e;
        let Some(b) = &bounds[pix] else { return 0.0 }; // excluded pixels: exactly 0
        let own = k.datasets[pix / (k.h * k.w)];
        let mut t = 0.0;
        for (d, rows) in data.protos.iter().enumerate() {
            let w = if d == own { c.beta / mf } else { c.alpha / (mf * (nd - 1) as f64) };
            let scale = grad * w.abs() / c.temperature;
            let maxp = rows.chunks(k.e).fold(0.0f64, |acc, r| acc.max(r[kk].abs()));
            let lnc = (k.classes[d] as f64).ln();
            t += scale * maxp * (b.dc[d] + (p_total as f64 + 2.0) * U32 * 2.0 * lnc);
        }
        2.0 * t + us * wdx[i].abs() + subnormal + 1e-30
    })
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn matches_reference_f32(k in case_strategy()) {
        check_case(&k, DType::F32, &device()).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn matches_reference_half_types(k in case_strategy(), bf in any::<bool>()) {
        check_case(&k, if bf { DType::BF16 } else { DType::F16 }, &device()).map_err(TestCaseError::fail)?;
    }
}

/// Cases the random ones might miss: one dataset (cross = 0), 1x1 inputs, E = 1, every sample
/// of one dataset, an all-zero mask, many pixels (several blocks), a dataset absent from the
/// batch, low temperature (peaked softmax).
#[test]
fn named_cases() {
    let dev = device();
    let base = Case {
        n: 2,
        h: 3,
        w: 2,
        e: 16,
        classes: vec![19, 19],
        datasets: vec![0, 1],
        mask_kind: 0,
        temperature: 0.1,
        alpha: 0.5,
        beta: 1.0,
        scale: 1.0,
        seed: 5,
    };
    let cases = [
        Case { classes: vec![7], datasets: vec![0, 0], ..base.clone() },
        Case { n: 1, h: 1, w: 1, datasets: vec![1], ..base.clone() },
        Case { e: 1, mask_kind: 1, ..base.clone() },
        Case { classes: vec![2, 40, 3, 11], datasets: vec![3, 3], mask_kind: 1, ..base.clone() },
        Case { mask_kind: 2, ..base.clone() },
        Case { n: 4, h: 9, w: 7, e: 33, classes: vec![5, 9, 2], datasets: vec![0, 2, 2, 1], ..base.clone() },
        Case { temperature: 0.02, scale: 2.0, ..base.clone() },
    ];
    for k in &cases {
        check_case(k, DType::F32, &dev).unwrap_or_else(|e| panic!("{k:?}: {e}"));
    }
}

fn run_bits(seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let k = Case {
        n: 4,
        h: 9,
        w: 7,
        e: 37,
        classes: vec![5, 19, 3],
        datasets: vec![2, 0, 2, 1],
        mask_kind: 1,
        temperature: 0.3,
        alpha: 0.7,
        beta: 1.3,
        scale: 1.0,
        seed: 11,
    };
    let data = make_data(&k, DType::F32);
    let inp = upload(&dev, &k, &data, DType::F32);
    let l = usss::forward(&inp.x, &inp.datasets, &inp.protos, inp.mask.as_ref(), &opts(&k)).unwrap();
    let dx = usss::backward(1.0, &inp.x, &inp.datasets, &inp.protos, inp.mask.as_ref(), &opts(&k)).unwrap();
    let loss_bits = [l.total, l.cross, l.within].iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
    vec![loss_bits, common::bits(&dx)]
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    let base = run_bits(0, 1);
    for (seed, threads) in [(1, 2), (77, 0), (0xFEED, 1)] {
        assert!(run_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

/// Central differences of the reference loss: the entropy is smooth, so with step 1e-5 the
/// truncation error (~h^2 |f'''|) and the rounding (~1e-16 / h) are both below 1e-8; 1e-6
/// relative is far above them and far below any mistake in the analytic gradient.
#[test]
fn reference_backward_matches_finite_differences() {
    let (n, h, w, e) = (3, 2, 1, 5);
    let classes = [2usize, 3, 4];
    let datasets = [2usize, 0, 2];
    let mut r = Rng(21);
    let x: Vec<f64> = (0..n * h * w * e).map(|_| r.normal()).collect();
    let protos: Vec<Vec<f64>> = classes
        .iter()
        .map(|&c| {
            let v: Vec<f64> = (0..c * e).map(|_| r.normal()).collect();
            v.chunks(e)
                .flat_map(|row| {
                    let nrm = row.iter().map(|a| a * a).sum::<f64>().sqrt();
                    row.iter().map(move |a| a / nrm)
                })
                .collect()
        })
        .collect();
    let pv: Vec<ArrayView2<f64>> =
        protos.iter().zip(&classes).map(|(p, &c)| ArrayView2::from_shape((c, e), p).unwrap()).collect();
    let mask = Array3::from_shape_vec((n, h, w), vec![true, false, true, true, true, false]).unwrap();
    for (alpha, beta, t) in [(0.7, 1.3, 0.5), (1.0, 0.0, 2.0), (0.0, 1.0, 0.3)] {
        let c = refu::UsssConfig { temperature: t, alpha, beta };
        let loss = |x: &[f64]| {
            let xv = ArrayView4::from_shape((n, h, w, e), x).unwrap();
            refu::usss_forward(xv, &datasets, &pv, Some(mask.view()), &c).unwrap().total
        };
        let g = 1.7;
        let xv = ArrayView4::from_shape((n, h, w, e), &x).unwrap();
        let dx = refu::usss_backward(g, xv, &datasets, &pv, Some(mask.view()), &c).unwrap();
        let step = 1e-5;
        for (i, &a) in dx.iter().enumerate() {
            let mut xp = x.clone();
            xp[i] += step;
            let lp = loss(&xp);
            xp[i] -= 2.0 * step;
            let lm = loss(&xp);
            let num = g * (lp - lm) / (2.0 * step);
            assert!(
                (num - a).abs() <= 1e-6 * a.abs().max(1.0),
                "({alpha}, {beta}, {t}) element {i}: numeric {num} analytic {a}"
            );
        }
    }
    // Sanity of the entropy definition: uniform over C classes gives ln C.
    assert!((refu::entropy(&refu::softmax(&[0.3; 7])) - 7f64.ln()).abs() < 1e-12);
    let _: Option<ArrayView3<bool>> = None;
}

#[test]
fn normalize_prototypes_gives_unit_rows() {
    let dev = device();
    let v: Vec<f32> = vec![3.0, 4.0, 0.0, -1.0, 1e-3, 2e-3, 0.0, 0.0, 7.5];
    let t = Tensor::from_slice(&dev, &[3, 3], &v).unwrap();
    let out = usss::normalize_prototypes(&t).unwrap().to_vec::<f32>().unwrap();
    for (row, got) in v.chunks(3).zip(out.chunks(3)) {
        let norm = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
        for (&a, &g) in row.iter().zip(got) {
            // One f32 rounding of the f64 quotient.
            assert!((g as f64 - a as f64 / norm).abs() <= 1e-7, "{out:?}");
        }
    }
    let zero_row = Tensor::from_slice(&dev, &[2, 2], &[1.0f32, 0.0, 0.0, 0.0]).unwrap();
    assert!(matches!(usss::normalize_prototypes(&zero_row), Err(Error::InvalidArgument(_))));
    let nan_row = Tensor::from_slice(&dev, &[1, 2], &[f32::NAN, 1.0]).unwrap();
    assert!(matches!(usss::normalize_prototypes(&nan_row), Err(Error::InvalidArgument(_))));
}

fn small(dev: &Device) -> (Tensor, Tensor, UsssPrototypes) {
    let x = Tensor::from_slice(dev, &[2, 2, 1, 3], &(0..12).map(|i| i as f32 * 0.1).collect::<Vec<_>>()).unwrap();
    let ds = Tensor::from_slice(dev, &[2], &[0i32, 1]).unwrap();
    let table =
        Tensor::from_slice(dev, &[5, 3], &[1.0f32, 0., 0., 0., 1., 0., 0., 0., 1., 1., 0., 0., 0., 1., 0.]).unwrap();
    (x, ds, UsssPrototypes::new(table, &[2, 3]).unwrap())
}

#[test]
fn dataset_index_out_of_range_is_a_typed_error() {
    let dev = device();
    let (x, _, protos) = small(&dev);
    let o = UsssOptions::default();
    for bad in [[0i32, 2], [-1, 0], [5, 7]] {
        let ds = Tensor::from_slice(&dev, &[2], &bad).unwrap();
        let first = bad.iter().position(|&d| !(0..2).contains(&d)).unwrap();
        let want = Error::DatasetIndexOutOfRange { sample: first, index: bad[first] as i64, num_datasets: 2 };
        assert_eq!(usss::forward(&x, &ds, &protos, None, &o).unwrap_err(), want);
        assert_eq!(usss::backward(1.0, &x, &ds, &protos, None, &o).unwrap_err(), want);
    }
}

#[test]
fn wrong_shapes_dtypes_and_options_are_typed_errors() {
    let dev = device();
    let (x, ds, protos) = small(&dev);
    let o = UsssOptions::default();
    let xi = Tensor::zeros(&dev, &[2, 2, 1, 3], DType::I32).unwrap();
    assert!(matches!(usss::forward(&xi, &ds, &protos, None, &o), Err(Error::UnsupportedDType { .. })));
    let x3 = Tensor::zeros(&dev, &[2, 2, 3], DType::F32).unwrap();
    assert!(matches!(usss::forward(&x3, &ds, &protos, None, &o), Err(Error::InvalidShape { .. })));
    let x4 = Tensor::zeros(&dev, &[2, 2, 1, 4], DType::F32).unwrap();
    assert!(matches!(usss::forward(&x4, &ds, &protos, None, &o), Err(Error::ShapeMismatch { .. })));
    let ds_f = Tensor::zeros(&dev, &[2], DType::F32).unwrap();
    assert!(matches!(usss::forward(&x, &ds_f, &protos, None, &o), Err(Error::DTypeMismatch { .. })));
    let ds3 = Tensor::zeros(&dev, &[3], DType::I32).unwrap();
    assert!(matches!(usss::forward(&x, &ds3, &protos, None, &o), Err(Error::ShapeMismatch { .. })));
    let mask_f = Tensor::zeros(&dev, &[2, 2, 1], DType::F32).unwrap();
    assert!(matches!(usss::forward(&x, &ds, &protos, Some(&mask_f), &o), Err(Error::DTypeMismatch { .. })));
    let mask_bad = Tensor::zeros(&dev, &[2, 1, 2], DType::U8).unwrap();
    assert!(matches!(usss::forward(&x, &ds, &protos, Some(&mask_bad), &o), Err(Error::ShapeMismatch { .. })));
    for bad in [
        UsssOptions { temperature: 0.0, ..o },
        UsssOptions { temperature: -1.0, ..o },
        UsssOptions { temperature: f32::NAN, ..o },
        UsssOptions { temperature: 1e-40, ..o },
        UsssOptions { alpha: f32::INFINITY, ..o },
        UsssOptions { beta: f32::NAN, ..o },
    ] {
        assert!(matches!(usss::forward(&x, &ds, &protos, None, &bad), Err(Error::InvalidArgument(_))), "{bad:?}");
        assert!(matches!(usss::backward(1.0, &x, &ds, &protos, None, &bad), Err(Error::InvalidArgument(_))));
    }
    assert!(matches!(usss::backward(f32::NAN, &x, &ds, &protos, None, &o), Err(Error::InvalidArgument(_))));
    let other = device();
    let ds_other = Tensor::from_slice(&other, &[2], &[0i32, 1]).unwrap();
    assert!(matches!(usss::forward(&x, &ds_other, &protos, None, &o), Err(Error::DeviceMismatch { .. })));

    // Prototype tables.
    let t = |v: &[f32], s: &[usize]| Tensor::from_slice(&dev, s, v).unwrap();
    assert!(matches!(UsssPrototypes::new(t(&[1.0; 6], &[2, 3]), &[1, 2]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(UsssPrototypes::new(t(&[1.0; 6], &[2, 3]), &[2, 0]), Err(Error::InvalidArgument(_))));
    assert!(matches!(UsssPrototypes::new(t(&[1.0; 6], &[2, 3]), &[]), Err(Error::InvalidArgument(_))));
    assert!(matches!(UsssPrototypes::new(t(&[1.0; 6], &[6]), &[6]), Err(Error::InvalidShape { .. })));
    let mut nan = [1.0f32; 6];
    nan[4] = f32::INFINITY;
    assert!(matches!(UsssPrototypes::new(t(&nan, &[2, 3]), &[1, 1]), Err(Error::InvalidArgument(_))));
    let half = Tensor::zeros(&dev, &[2, 3], DType::F16).unwrap();
    assert!(matches!(UsssPrototypes::new(half, &[2]), Err(Error::DTypeMismatch { .. })));
    // Too many channels + prototypes for the kernels' shared memory.
    let big_e = usss::MAX_SHARED_VALUES;
    let big = UsssPrototypes::new(Tensor::zeros(&dev, &[1, big_e], DType::F32).unwrap(), &[1]).unwrap();
    let xb = Tensor::zeros(&dev, &[1, 1, 1, big_e], DType::F32).unwrap();
    let d1 = Tensor::from_slice(&dev, &[1], &[0i32]).unwrap();
    assert!(matches!(usss::forward(&xb, &d1, &big, None, &o), Err(Error::InvalidShape { .. })));
}
