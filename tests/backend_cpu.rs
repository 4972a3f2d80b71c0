//! The host backend against the f64 oracle in `cdcl::reference`, its typed errors, and its
//! determinism across rayon thread counts.
//!
//! Inputs are f32 values; the oracle gets exactly those values in f64, so every comparison
//! measures only the backend's own arithmetic. Tolerances are in units of u = 2⁻²⁴ (f32 unit
//! roundoff) times a magnitude that bounds the error of the computation:
//! - Convolutions run an f32 GEMM: a dot product of L terms computed in f32 is off by at most
//!   γ_L·Σ|aᵢbᵢ| ≈ L·u·Σ|aᵢbᵢ| (Higham, Accuracy and Stability of Numerical Algorithms, §3.1),
//!   so the tolerance is 2(L + 2)·u times the same convolution of the absolute values
//!   (the reference run on |x|, |w|, |dy|), per element.
//! - Everything else accumulates in f64 and rounds once to f32, so it is within u·|result| of
//!   the f64 value, plus the f32 rounding of intermediate values the op stores (the DSBN mean
//!   and invstd, the dropout scale), each propagated by the magnitude it multiplies.
//! - Max pooling, argmax, slices and concatenations move values without arithmetic: exact.

mod common;

use cdcl::backend::cpu::{CpuBackend, CpuBn, CpuTensor};
use cdcl::backend::{Backend, BnTables, SgdTensor};
use cdcl::ops::conv::ConvGeometry;
use cdcl::ops::cross_entropy::CrossEntropyOptions;
use cdcl::ops::dropout::Dropout2dOptions;
use cdcl::ops::dsbn::DsbnOptions;
use cdcl::ops::maxpool::PoolGeometry;
use cdcl::ops::sgd::{FrozenRows, SgdOptions};
use cdcl::reference;
use cdcl::reference::conv::ConvSpec;
use cdcl::reference::dsbn::DsbnConfig;
use cdcl::reference::maxpool::PoolSpec;
use cdcl::{DType, Error};
use common::{assert_close, Rng};
use ndarray::{Array2, Array3, Array4, ArrayView1};
use proptest::prelude::*;

/// f32 unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

fn be() -> CpuBackend {
    CpuBackend::new()
}

/// `len` f32-representable values: normal(0, 1)·scale + offset.
fn randv(rng: &mut Rng, len: usize, scale: f64, offset: f64) -> Vec<f64> {
    (0..len).map(|_| (rng.normal() * scale + offset) as f32 as f64).collect()
}

fn t32(shape: &[usize], v: &[f64]) -> CpuTensor {
    be().tensor_f32(shape, &v.iter().map(|&x| x as f32).collect::<Vec<_>>()).unwrap()
}

fn ti32(shape: &[usize], v: &[i32]) -> CpuTensor {
    be().tensor_i32(shape, v).unwrap()
}

fn host(t: &CpuTensor) -> Vec<f64> {
    t.as_f32().expect("an f32 tensor").iter().map(|&v| v as f64).collect()
}

fn bits(t: &CpuTensor) -> Vec<u32> {
    match (t.as_f32(), t.as_i32()) {
        (Some(v), _) => v.iter().map(|x| x.to_bits()).collect(),
        (_, Some(v)) => v.iter().map(|&x| x as u32).collect(),
        _ => unreachable!(),
    }
}

fn a4(s: &[usize], v: &[f64]) -> Array4<f64> {
    Array4::from_shape_vec((s[0], s[1], s[2], s[3]), v.to_vec()).unwrap()
}

fn a2(d: usize, c: usize, v: &[f64]) -> Array2<f64> {
    Array2::from_shape_vec((d, c), v.to_vec()).unwrap()
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn flat<D: ndarray::Dimension>(a: &ndarray::Array<f64, D>) -> Vec<f64> {
    a.iter().copied().collect()
}

fn spec(g: &ConvGeometry) -> ConvSpec {
    ConvSpec { stride: g.stride, padding: g.padding, dilation: g.dilation }
}

// ---- convolution --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ConvCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    r: usize,
    s: usize,
    g: ConvGeometry,
    bias: bool,
    seed: u64,
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    let taps = prop::sample::select(vec![1usize, 3, 7]);
    (
        (1..=2usize, 1..=11usize, 1..=10usize, taps.clone(), taps),
        ((1..=2usize, 1..=2usize), (0..=3usize, 0..=3usize), (1..=4usize, 1..=4usize)),
        (0..=6usize, 0..=6usize, any::<bool>(), any::<u64>()),
    )
        .prop_map(|((n, c, k, r, s), (stride, padding, dilation), (eh, ew, bias, seed))| {
            // The smallest input the dilated filter fits, plus a little.
            let min = |taps: usize, dil: usize, pad: usize| (dil * (taps - 1) + 1).saturating_sub(2 * pad).max(1);
            let h = min(r, dilation.0, padding.0) + eh;
            let w = min(s, dilation.1, padding.1) + ew;
            ConvCase { n, h, w, c, k, r, s, g: ConvGeometry { stride, padding, dilation }, bias, seed }
        })
}

/// Forward, data gradient and filter gradient (with bias) against the oracle.
fn check_conv(k: &ConvCase) -> Result<(), String> {
    let mut rng = Rng(k.seed);
    let xs = [k.n, k.h, k.w, k.c];
    let ws = [k.k, k.r, k.s, k.c];
    let x = randv(&mut rng, xs.iter().product(), 1.0, 0.3);
    let w = randv(&mut rng, ws.iter().product(), 0.5, 0.0);
    let b = randv(&mut rng, k.k, 1.0, 0.0);
    let sp = spec(&k.g);
    let (p, q) = sp.output_size(k.h, k.w, k.r, k.s).unwrap();
    let ys = [k.n, p, q, k.k];
    let dy = randv(&mut rng, ys.iter().product(), 1.0, 0.0);

    let bias = k.bias.then(|| t32(&[k.k], &b));
    let y = be().conv2d(&t32(&xs, &x), &t32(&ws, &w), bias.as_ref(), &k.g).map_err(|e| e.to_string())?;
    if y.shape() != ys {
        return Err(format!("output shape {:?}, want {ys:?}", y.shape()));
    }
    let bview = k.bias.then(|| ArrayView1::from(&b[..]));
    let absb = abs(&b);
    let want = reference::conv::conv2d(a4(&xs, &x).view(), a4(&ws, &w).view(), bview, &sp);
    let mag = reference::conv::conv2d(
        a4(&xs, &abs(&x)).view(),
        a4(&ws, &abs(&w)).view(),
        k.bias.then(|| ArrayView1::from(&absb[..])),
        &sp,
    );
    let l = (k.r * k.s * k.c) as f64;
    let mag = flat(&mag);
    assert_close("conv2d", &host(&y), &flat(&want), |i| 2.0 * (l + 2.0) * U * mag[i])?;

    let grads = reference::conv::conv2d_backward(a4(&ys, &dy).view(), a4(&xs, &x).view(), a4(&ws, &w).view(), &sp);
    let absg = reference::conv::conv2d_backward(
        a4(&ys, &abs(&dy)).view(),
        a4(&xs, &abs(&x)).view(),
        a4(&ws, &abs(&w)).view(),
        &sp,
    );
    let dx = be().conv2d_backward_data(&t32(&ys, &dy), &t32(&ws, &w), (k.h, k.w), &k.g).map_err(|e| e.to_string())?;
    // dcol is an f32 dot of K terms; each input pixel then sums at most R·S of them in f32.
    let ldx = (k.k + k.r * k.s) as f64;
    let mag = flat(&absg.dx);
    assert_close("conv2d_backward_data", &host(&dx), &flat(&grads.dx), |i| 2.0 * (ldx + 2.0) * U * mag[i])?;

    let (dw, db) = be()
        .conv2d_backward_filter(&t32(&ys, &dy), &t32(&xs, &x), (k.k, k.r, k.s), true, &k.g)
        .map_err(|e| e.to_string())?;
    // At most N·P·Q terms per weight (fewer summed in f32: the rest is f64 across tiles).
    let ldw = (k.n * p * q) as f64;
    let mag = flat(&absg.dw);
    assert_close("conv2d_backward_filter", &host(&dw), &flat(&grads.dw), |i| 2.0 * (ldw + 2.0) * U * mag[i])?;
    let db = db.ok_or("no bias gradient")?;
    let mag = flat(&absg.dbias);
    // f64 sums: only the final rounding.
    assert_close("conv bias gradient", &host(&db), &flat(&grads.dbias), |i| 2.0 * U * mag[i])?;
    let (_, none) = be()
        .conv2d_backward_filter(&t32(&ys, &dy), &t32(&xs, &x), (k.k, k.r, k.s), false, &k.g)
        .map_err(|e| e.to_string())?;
    if none.is_some() {
        return Err("a bias gradient nobody asked for".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn conv_matches_reference(k in conv_case()) {
        check_conv(&k).map_err(TestCaseError::fail)?;
    }
}

/// Shapes large enough for several GEMM tiles (forward: 512 rows; filter gradient: 512 rows
/// and 64-column blocks of R·S·C = 144), and the pointwise path that skips im2col.
#[test]
fn conv_multi_tile_and_pointwise_match_reference() {
    let cases = [
        ConvCase { n: 2, h: 20, w: 20, c: 16, k: 5, r: 3, s: 3, g: ConvGeometry::square(1, 1, 1), bias: true, seed: 1 },
        ConvCase { n: 3, h: 17, w: 13, c: 9, k: 6, r: 1, s: 1, g: ConvGeometry::square(1, 0, 1), bias: true, seed: 2 },
        ConvCase { n: 2, h: 15, w: 16, c: 5, k: 4, r: 1, s: 1, g: ConvGeometry::square(2, 0, 1), bias: false, seed: 3 },
    ];
    for k in &cases {
        check_conv(k).unwrap_or_else(|e| panic!("{k:?}: {e}"));
    }
}

// ---- DSBN ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct BnCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    d: usize,
    datasets: Vec<usize>,
    residual: bool,
    relu: bool,
    seed: u64,
}

fn bn_case(max_hw: usize) -> impl Strategy<Value = BnCase> {
    (1..=4usize, 1..=6usize)
        .prop_flat_map(move |(d, n)| {
            (
                Just(d),
                prop::collection::vec(0..d, n),
                (1..=max_hw, 1..=max_hw, 1..=11usize),
                (any::<bool>(), any::<bool>(), any::<u64>()),
            )
        })
        .prop_map(|(d, datasets, (h, w, c), (residual, relu, seed))| BnCase {
            n: datasets.len(),
            h,
            w,
            c,
            d,
            datasets,
            residual,
            relu,
            seed,
        })
}

struct BnData {
    x: Vec<f64>,
    res: Vec<f64>,
    dy: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    rm: Vec<f64>,
    rv: Vec<f64>,
}

fn bn_data(k: &BnCase) -> BnData {
    let mut rng = Rng(k.seed);
    let len = k.n * k.h * k.w * k.c;
    let dc = k.d * k.c;
    // Per-(sample, channel) offsets make the datasets' statistics differ.
    let mut x = randv(&mut rng, len, 1.5, 0.0);
    let offsets = randv(&mut rng, k.n * k.c, 2.0, 0.5);
    for (i, v) in x.iter_mut().enumerate() {
        let (ni, ci) = (i / (k.h * k.w * k.c), i % k.c);
        *v = (*v + offsets[ni * k.c + ci]) as f32 as f64;
    }
    BnData {
        x,
        res: randv(&mut rng, len, 1.0, 0.0),
        dy: randv(&mut rng, len, 1.0, 0.0),
        gamma: randv(&mut rng, dc, 0.5, 1.0),
        beta: randv(&mut rng, dc, 0.5, 0.0),
        rm: randv(&mut rng, dc, 0.3, 0.0),
        rv: (0..dc).map(|_| rng.uniform(0.5, 2.0) as f32 as f64).collect(),
    }
}

fn bn_tables(k: &BnCase, data: &BnData) -> CpuBn {
    let mut bn = be().bn_new(k.d, k.c).unwrap();
    let [g, b, m, v] = bn.tables_mut();
    for (t, vals) in [(g, &data.gamma), (b, &data.beta), (m, &data.rm), (v, &data.rv)] {
        be().write_f32(t, &vals.iter().map(|&x| x as f32).collect::<Vec<_>>()).unwrap();
    }
    bn
}

fn cfg(relu: bool) -> DsbnConfig {
    DsbnConfig { eps: 1e-5f32 as f64, momentum: 0.1f32 as f64, relu }
}

fn opts(relu: bool) -> DsbnOptions {
    DsbnOptions { relu, ..DsbnOptions::default() }
}

/// Training forward and backward, with or without residual and ReLU, against the oracle (which
/// has no residual form: BN(x) comes from it, the residual add, the ReLU and its mask are
/// applied here from their definitions).
fn check_bn_train(k: &BnCase) -> Result<(), TestCaseError> {
    let data = bn_data(k);
    let shape = [k.n, k.h, k.w, k.c];
    let (hw, c, d) = (k.h * k.w, k.c, k.d);
    let mut bn = bn_tables(k, &data);
    let before: Vec<Vec<u32>> = bn.tables().iter().map(|t| bits(t)).collect();
    let x = t32(&shape, &data.x);
    let ds = ti32(&[k.n], &k.datasets.iter().map(|&v| v as i32).collect::<Vec<_>>());
    let res = k.residual.then(|| t32(&shape, &data.res));
    let got = be().dsbn_forward_train(&x, &ds, &mut bn, &opts(k.relu), res.as_ref());

    let mut samples = vec![0usize; d];
    k.datasets.iter().for_each(|&v| samples[v] += 1);
    if let Some(bad) = (0..d).find(|&v| samples[v] > 0 && samples[v] * hw < 2) {
        // A present dataset with a single value per channel: refused, nothing written.
        match got {
            Err(Error::TooFewValues { dataset, count: 1 }) if dataset == bad => {}
            other => return Err(TestCaseError::fail(format!("want TooFewValues for dataset {bad}, got {other:?}"))),
        }
        let after: Vec<Vec<u32>> = bn.tables().iter().map(|t| bits(t)).collect();
        prop_assert_eq!(before, after);
        return Ok(());
    }
    let (y, saved) = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
    let fail = TestCaseError::fail;
    let r = reference::dsbn::dsbn_forward_train(
        a4(&shape, &data.x).view(),
        &k.datasets,
        a2(d, c, &data.gamma).view(),
        a2(d, c, &data.beta).view(),
        a2(d, c, &data.rm).view(),
        a2(d, c, &data.rv).view(),
        &cfg(false),
    )
    .map_err(|e| fail(e.to_string()))?;
    let (mean, invstd) = (flat(&r.mean), flat(&r.invstd));
    let pre: Vec<f64> =
        flat(&r.y).iter().enumerate().map(|(i, &v)| v + if k.residual { data.res[i] } else { 0.0 }).collect();
    let want_y: Vec<f64> = pre.iter().map(|&v| if k.relu { v.max(0.0) } else { v }).collect();
    let tab = |i: usize| k.datasets[i / (hw * c)] * c + i % c;
    // mean and invstd are rounded to f32 once (relative u each) and scale |x − μ| and |μ| by
    // invstd·|γ|; the f64 affine is exact to ~1e-16; the output is rounded once.
    let ytol = |i: usize| {
        let s = tab(i);
        4.0 * U
            * ((mean[s].abs() + (data.x[i] - mean[s]).abs()) * invstd[s] * data.gamma[s].abs()
                + data.beta[s].abs()
                + data.res[i].abs()
                + want_y[i].abs())
    };
    assert_close("dsbn y", &host(&y), &want_y, ytol).map_err(fail)?;
    assert_close("saved mean", &host(&saved.mean), &mean, |i| 2.0 * U * mean[i].abs()).map_err(fail)?;
    assert_close("saved invstd", &host(&saved.invstd), &invstd, |i| 2.0 * U * invstd[i].abs()).map_err(fail)?;
    // Running statistics: f64 update rounded once; absent datasets bit for bit untouched.
    let (rm_want, rv_want) = (flat(&r.running_mean), flat(&r.running_var));
    let var = flat(&r.var);
    let [_, _, rm_got, rv_got] = bn.tables();
    assert_close("running mean", &host(rm_got), &rm_want, |i| 2.0 * U * (data.rm[i].abs() + mean[i].abs()) + 1e-30)
        .map_err(fail)?;
    assert_close("running var", &host(rv_got), &rv_want, |i| 4.0 * U * (data.rv[i].abs() + var[i].abs()) + 1e-30)
        .map_err(fail)?;
    for v in (0..d).filter(|&v| samples[v] == 0) {
        for (t, b) in [(rm_got, &before[2]), (rv_got, &before[3])] {
            prop_assert_eq!(&bits(t)[v * c..(v + 1) * c], &b[v * c..(v + 1) * c], "absent dataset {} moved", v);
        }
        prop_assert!(host(&saved.mean)[v * c..(v + 1) * c].iter().all(|&m| m == 0.0));
    }

    // Backward. The ReLU mask of an element whose pre-activation is within rounding of 0 is
    // ambiguous between the two computations: such (rare) cases are skipped.
    if k.relu {
        prop_assume!(pre.iter().all(|v| v.abs() > 1e-5));
    }
    let g: Vec<f64> = data.dy.iter().zip(&pre).map(|(&dy, &v)| if !k.relu || v > 0.0 { dy } else { 0.0 }).collect();
    let rg = reference::dsbn::dsbn_backward_train(
        a4(&shape, &g).view(),
        a4(&shape, &data.x).view(),
        &k.datasets,
        a2(d, c, &data.gamma).view(),
        a2(d, c, &data.beta).view(),
        &cfg(false),
    )
    .map_err(|e| fail(e.to_string()))?;
    let grads = be()
        .dsbn_backward_train(&t32(&shape, &data.dy), &x, res.as_ref(), &ds, &bn, &saved, &opts(k.relu))
        .map_err(|e| fail(e.to_string()))?;
    // x̂ is off by u·(|μ| + |x − μ|)·invstd (the f32 statistics); with e = |x̂| + |μ|·invstd + 1,
    // dγ = Σ g·x̂ is off by ~u·Σ|g|·e, and dx = γ·invstd·(g − dβ/M − x̂·dγ/M) by the sum of
    // those through its terms.
    let xhat: Vec<f64> = (0..g.len()).map(|i| (data.x[i] - mean[tab(i)]) * invstd[tab(i)]).collect();
    let e = |i: usize| xhat[i].abs() + mean[tab(i)].abs() * invstd[tab(i)] + 1.0;
    let (mut sum_g, mut sum_ge) = (vec![0.0; d * c], vec![0.0; d * c]);
    for i in 0..g.len() {
        sum_g[tab(i)] += g[i].abs();
        sum_ge[tab(i)] += g[i].abs() * e(i);
    }
    let m = |i: usize| (samples[k.datasets[i / (hw * c)]] * hw) as f64;
    let dxtol = |i: usize| {
        let s = tab(i);
        8.0 * U * data.gamma[s].abs() * invstd[s] * (g[i].abs() + sum_g[s] / m(i) + e(i) * sum_ge[s] / m(i))
    };
    assert_close("dsbn dx", &host(&grads.dx), &flat(&rg.dx), dxtol).map_err(fail)?;
    assert_close("dsbn dbeta", &host(&grads.dbeta), &flat(&rg.dbeta), |s| 2.0 * U * sum_g[s] + 1e-30).map_err(fail)?;
    assert_close("dsbn dgamma", &host(&grads.dgamma), &flat(&rg.dgamma), |s| 4.0 * U * sum_ge[s] + 1e-30)
        .map_err(fail)?;
    for v in (0..d).filter(|&v| samples[v] == 0) {
        prop_assert!(host(&grads.dgamma)[v * c..(v + 1) * c].iter().all(|&x| x == 0.0));
        prop_assert!(host(&grads.dbeta)[v * c..(v + 1) * c].iter().all(|&x| x == 0.0));
    }
    match (&grads.dresidual, k.residual) {
        (Some(dr), true) => assert_close("dsbn dresidual", &host(dr), &g, |_| 0.0).map_err(fail)?,
        (None, false) => {}
        (got, _) => return Err(fail(format!("dresidual {got:?} with residual = {}", k.residual))),
    }
    Ok(())
}

fn check_bn_infer(k: &BnCase) -> Result<(), TestCaseError> {
    let data = bn_data(k);
    let shape = [k.n, k.h, k.w, k.c];
    let (c, d) = (k.c, k.d);
    let bn = bn_tables(k, &data);
    let ds = ti32(&[k.n], &k.datasets.iter().map(|&v| v as i32).collect::<Vec<_>>());
    let res = k.residual.then(|| t32(&shape, &data.res));
    let y = be()
        .dsbn_forward_infer(&t32(&shape, &data.x), &ds, &bn, &opts(k.relu), res.as_ref())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let r = reference::dsbn::dsbn_forward_infer(
        a4(&shape, &data.x).view(),
        &k.datasets,
        a2(d, c, &data.gamma).view(),
        a2(d, c, &data.beta).view(),
        a2(d, c, &data.rm).view(),
        a2(d, c, &data.rv).view(),
        &cfg(false),
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let want: Vec<f64> = flat(&r)
        .iter()
        .enumerate()
        .map(|(i, &v)| v + if k.residual { data.res[i] } else { 0.0 })
        .map(|v| if k.relu { v.max(0.0) } else { v })
        .collect();
    let tab = |i: usize| k.datasets[i / (k.h * k.w * c)] * c + i % c;
    // All f64 from the f32 tables: only the final rounding (plus the residual's magnitude).
    let tol = |i: usize| {
        let s = tab(i);
        let scaled = (data.x[i] - data.rm[s]).abs() / (data.rv[s] + 1e-5).sqrt() * data.gamma[s].abs();
        4.0 * U * (scaled + data.beta[s].abs() + data.res[i].abs() + want[i].abs())
    };
    assert_close("dsbn inference", &host(&y), &want, tol).map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn dsbn_train_matches_reference(k in bn_case(7)) {
        check_bn_train(&k)?;
    }

    #[test]
    fn dsbn_infer_matches_reference(k in bn_case(5)) {
        check_bn_infer(&k)?;
    }
}

/// Mixes the random cases may miss, and a plane larger than one partial-sum chunk (2048 pixels).
#[test]
fn dsbn_fixed_mixes() {
    let mk = |datasets: Vec<usize>, d: usize, h: usize, w: usize, c: usize, residual: bool, relu: bool| BnCase {
        n: datasets.len(),
        h,
        w,
        c,
        d,
        datasets,
        residual,
        relu,
        seed: 7,
    };
    let cases = [
        // Dataset 1 absent, dataset 2 a single sample, in a mixed order.
        mk(vec![2, 0, 0, 3, 0, 3], 4, 3, 2, 5, true, true),
        // One value per channel for dataset 1: TooFewValues.
        mk(vec![0, 1, 0], 2, 1, 1, 3, false, false),
        // 1×1 planes with enough samples everywhere.
        mk(vec![1, 0, 1, 0], 2, 1, 1, 4, true, false),
        // Several partial-sum chunks per sample.
        mk(vec![1, 0], 3, 50, 45, 3, false, true),
    ];
    for k in &cases {
        check_bn_train(k).unwrap_or_else(|e| panic!("{k:?}: {e}"));
        check_bn_infer(k).unwrap_or_else(|e| panic!("{k:?}: {e}"));
    }
}

// ---- pooling and resizing -----------------------------------------------------------------------

#[derive(Debug, Clone)]
struct MaxPoolCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    g: PoolGeometry,
    specials: bool,
    seed: u64,
}

fn maxpool_case() -> impl Strategy<Value = MaxPoolCase> {
    ((1..=4usize, 1..=4usize), (1..=3usize, 1..=3usize))
        .prop_flat_map(|(kernel, stride)| {
            (Just(kernel), Just(stride), (0..=kernel.0 / 2, 0..=kernel.1 / 2), (0..=6usize, 0..=6usize))
        })
        .prop_flat_map(|(kernel, stride, padding, extra)| {
            let g = PoolGeometry { kernel, stride, padding };
            let h = kernel.0.saturating_sub(2 * padding.0).max(1) + extra.0;
            let w = kernel.1.saturating_sub(2 * padding.1).max(1) + extra.1;
            (Just(g), Just(h), Just(w), 1..=3usize, 1..=6usize, any::<bool>(), any::<u64>())
        })
        .prop_map(|(g, h, w, n, c, specials, seed)| MaxPoolCase { n, h, w, c, g, specials, seed })
}

fn same_or_both_nan(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Values are drawn from a few levels so windows have ties (first maximum wins); with
    /// `specials`, some are NaN or −inf. Forward outputs and indices must be exact.
    #[test]
    fn max_pool_matches_reference(k in maxpool_case()) {
        let mut rng = Rng(k.seed);
        let shape = [k.n, k.h, k.w, k.c];
        let x: Vec<f64> = (0..shape.iter().product::<usize>())
            .map(|_| {
                let u = rng.uniform(0.0, 1.0);
                if k.specials && u < 0.05 {
                    f64::NAN
                } else if k.specials && u < 0.15 {
                    f64::NEG_INFINITY
                } else {
                    (rng.below(4) as f64) - 1.5
                }
            })
            .collect();
        let (y, idx) = be().max_pool2d(&t32(&shape, &x), &k.g).unwrap();
        let ps = PoolSpec { kernel: k.g.kernel, stride: k.g.stride, padding: k.g.padding };
        let (ry, ridx) = reference::maxpool::max_pool2d(a4(&shape, &x).view(), &ps);
        prop_assert_eq!(y.shape(), ry.shape());
        let yv = host(&y);
        for (i, (&a, &b)) in yv.iter().zip(ry.iter()).enumerate() {
            prop_assert!(same_or_both_nan(a, b), "y[{}] = {} want {}", i, a, b);
        }
        let iv: Vec<i64> = idx.as_i32().unwrap().iter().map(|&v| v as i64).collect();
        prop_assert_eq!(iv, ridx.iter().copied().collect::<Vec<_>>());

        let dy = randv(&mut rng, y.as_f32().unwrap().len(), 1.0, 0.0);
        let dx = be().max_pool2d_backward(&t32(y.shape(), &dy), &idx, (k.h, k.w), &k.g).unwrap();
        let want = reference::maxpool::max_pool2d_backward(a4(y.shape(), &dy).view(), ridx.view(), k.h, k.w);
        let absdy = a4(y.shape(), &abs(&dy));
        let mag = flat(&reference::maxpool::max_pool2d_backward(absdy.view(), ridx.view(), k.h, k.w));
        // f32 sums of at most ⌈kh/sh⌉·⌈kw/sw⌉ ≤ 16 gradients per input element.
        assert_close("max_pool2d_backward", &host(&dx), &flat(&want), |i| 16.0 * U * mag[i])
            .map_err(TestCaseError::fail)?;
    }
}

#[derive(Debug, Clone)]
struct PoolCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    oh: usize,
    ow: usize,
    align: bool,
    seed: u64,
}

fn pool_case() -> impl Strategy<Value = PoolCase> {
    ((1..=2usize, 1..=9usize, 1..=9usize, 1..=5usize), (1..=12usize, 1..=12usize, any::<bool>(), any::<u64>()))
        .prop_map(|((n, h, w, c), (oh, ow, align, seed))| PoolCase { n, h, w, c, oh, ow, align, seed })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Adaptive average pooling (bins may overlap or repeat inputs when Out does not divide In
    /// or exceeds it) and bilinear resize with both `align_corners`, forward and backward.
    /// f64 sums of non-negative weights times values: one rounding, so 2u times the same op on
    /// absolute values.
    #[test]
    fn pool_and_resize_match_reference(k in pool_case()) {
        let mut rng = Rng(k.seed);
        let xs = [k.n, k.h, k.w, k.c];
        let ys = [k.n, k.oh, k.ow, k.c];
        let x = randv(&mut rng, xs.iter().product(), 1.0, 0.2);
        let dy = randv(&mut rng, ys.iter().product(), 1.0, 0.0);
        let (ax, aabs) = (a4(&xs, &x), a4(&xs, &abs(&x)));
        let (ady, adyabs) = (a4(&ys, &dy), a4(&ys, &abs(&dy)));
        let fail = TestCaseError::fail;
        let close = |what: &str, got: &CpuTensor, want: Array4<f64>, mag: Array4<f64>| {
            let mag = flat(&mag);
            assert_close(what, &host(got), &flat(&want), |i| 2.0 * U * mag[i])
        };

        let y = be().adaptive_avg_pool(&t32(&xs, &x), k.oh, k.ow).unwrap();
        close("adaptive_avg_pool", &y,
            reference::pool::adaptive_avg_pool2d(ax.view(), k.oh, k.ow),
            reference::pool::adaptive_avg_pool2d(aabs.view(), k.oh, k.ow)).map_err(fail)?;
        let dx = be().adaptive_avg_pool_backward(&t32(&ys, &dy), (k.h, k.w)).unwrap();
        close("adaptive_avg_pool_backward", &dx,
            reference::pool::adaptive_avg_pool2d_backward(ady.view(), k.h, k.w),
            reference::pool::adaptive_avg_pool2d_backward(adyabs.view(), k.h, k.w)).map_err(fail)?;

        let y = be().resize_bilinear(&t32(&xs, &x), k.oh, k.ow, k.align).unwrap();
        close("resize_bilinear", &y,
            reference::pool::resize_bilinear(ax.view(), k.oh, k.ow, k.align),
            reference::pool::resize_bilinear(aabs.view(), k.oh, k.ow, k.align)).map_err(fail)?;
        let dx = be().resize_bilinear_backward(&t32(&ys, &dy), (k.h, k.w), k.align).unwrap();
        close("resize_bilinear_backward", &dx,
            reference::pool::resize_bilinear_backward(ady.view(), k.h, k.w, k.align),
            reference::pool::resize_bilinear_backward(adyabs.view(), k.h, k.w, k.align)).map_err(fail)?;
    }
}

// ---- cross-entropy and argmax -------------------------------------------------------------------

#[derive(Debug, Clone)]
struct CeCase {
    n: usize,
    h: usize,
    w: usize,
    cmax: usize,
    classes: Vec<usize>,
    datasets: Vec<usize>,
    weights: Option<Vec<f32>>,
    grad_scale: f32,
    all_ignored: Option<usize>,
    seed: u64,
}

fn ce_case() -> impl Strategy<Value = CeCase> {
    (1..=3usize, 1..=7usize)
        .prop_flat_map(|(d, cmax)| {
            (
                Just(cmax),
                prop::collection::vec(1..=cmax, d),
                prop::collection::vec(0..d, 1..=4usize),
                (1..=5usize, 1..=5usize),
                prop::option::of(prop::collection::vec(0.1f32..3.0, d)),
                (-2.0f32..2.0, prop::option::of(0..d), any::<u64>()),
            )
        })
        .prop_map(|(cmax, classes, datasets, (h, w), weights, (grad_scale, all_ignored, seed))| CeCase {
            n: datasets.len(),
            h,
            w,
            cmax,
            classes,
            datasets,
            weights,
            grad_scale,
            all_ignored,
            seed,
        })
}

/// Labels in each sample's own head, a quarter of them 255, every label of `all_ignored`'s
/// samples 255.
fn ce_labels(k: &CeCase, rng: &mut Rng) -> Vec<i32> {
    let hw = k.h * k.w;
    (0..k.n * hw)
        .map(|pix| {
            let d = k.datasets[pix / hw];
            if Some(d) == k.all_ignored || rng.uniform(0.0, 1.0) < 0.25 {
                255
            } else {
                rng.below(k.classes[d]) as i32
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn cross_entropy_matches_reference(k in ce_case()) {
        let mut rng = Rng(k.seed);
        let shape = [k.n, k.h, k.w, k.cmax];
        let logits = randv(&mut rng, shape.iter().product(), 3.0, 0.0);
        let labels = ce_labels(&k, &mut rng);
        let d = k.classes.len();
        let weights: Vec<f64> = match &k.weights {
            Some(w) => w.iter().map(|&v| v as f64).collect(),
            None => vec![1.0; d],
        };
        let options = CrossEntropyOptions { weights: k.weights.clone(), grad_scale: k.grad_scale };
        let ds = ti32(&[k.n], &k.datasets.iter().map(|&v| v as i32).collect::<Vec<_>>());
        let (loss, grad) = be()
            .cross_entropy(&t32(&shape, &logits), &ti32(&[k.n, k.h, k.w], &labels), &ds, &k.classes, &options, true)
            .unwrap();
        let lab = Array3::from_shape_vec((k.n, k.h, k.w), labels.iter().map(|&v| v as i64).collect()).unwrap();
        let la = a4(&shape, &logits);
        let want = reference::cross_entropy::multi_head_cross_entropy(
            la.view(), lab.view(), &k.datasets, &k.classes, &weights,
        )
        .unwrap();
        // f64 in both: the f32 results are within one rounding of the f64 ones.
        let per: Vec<f64> = loss.per_dataset.iter().map(|&v| v as f64).collect();
        assert_close("per-dataset loss", &per, &want.per_dataset, |i| 2.0 * U * want.per_dataset[i].abs())
            .map_err(TestCaseError::fail)?;
        let mag: f64 = (0..d).map(|i| (weights[i] * want.per_dataset[i]).abs()).sum();
        assert_close("total loss", &[loss.total as f64], &[want.total], |_| 4.0 * U * mag)
            .map_err(TestCaseError::fail)?;
        if let Some(z) = k.all_ignored {
            prop_assert_eq!(loss.per_dataset[z], 0.0);
        }
        let gw = reference::cross_entropy::multi_head_cross_entropy_grad(
            la.view(), lab.view(), &k.datasets, &k.classes, &weights, k.grad_scale as f64,
        )
        .unwrap();
        let grad = grad.expect("a gradient was asked for");
        let gwf = flat(&gw);
        let scale: f64 = weights.iter().map(|w| w.abs()).fold(0.0, f64::max) * (k.grad_scale as f64).abs();
        assert_close("dlogits", &host(&grad), &gwf, |i| 2.0 * U * gwf[i].abs() + 1e-15 * scale)
            .map_err(TestCaseError::fail)?;
        // Padding channels, ignored pixels and all-ignored datasets: exact zeros.
        let hw = k.h * k.w;
        for (i, &g) in host(&grad).iter().enumerate() {
            let (pix, ch) = (i / k.cmax, i % k.cmax);
            if labels[pix] == 255 || ch >= k.classes[k.datasets[pix / hw]] {
                prop_assert_eq!(g, 0.0);
            }
        }
        let (loss2, none) = be()
            .cross_entropy(&t32(&shape, &logits), &ti32(&[k.n, k.h, k.w], &labels), &ds, &k.classes, &options, false)
            .unwrap();
        prop_assert!(none.is_none());
        prop_assert_eq!(loss2, loss);
    }

    /// Argmax of each sample's own head; values from a few levels (ties: first wins) and some
    /// NaNs (the first NaN wins).
    #[test]
    fn argmax_matches_reference(k in ce_case(), nan in any::<bool>()) {
        let mut rng = Rng(k.seed);
        let shape = [k.n, k.h, k.w, k.cmax];
        let logits: Vec<f64> = (0..shape.iter().product::<usize>())
            .map(|_| if nan && rng.uniform(0.0, 1.0) < 0.1 { f64::NAN } else { rng.below(3) as f64 })
            .collect();
        let ds = ti32(&[k.n], &k.datasets.iter().map(|&v| v as i32).collect::<Vec<_>>());
        let pred = be().argmax(&t32(&shape, &logits), &ds, &k.classes).unwrap();
        let want = reference::metrics::argmax(a4(&shape, &logits).view(), &k.datasets, &k.classes).unwrap();
        prop_assert_eq!(pred.shape(), &[k.n, k.h, k.w][..]);
        let got: Vec<i64> = pred.as_i32().unwrap().iter().map(|&v| v as i64).collect();
        prop_assert_eq!(got, want.iter().copied().collect::<Vec<_>>());
    }
}

// ---- dropout, element-wise, SGD, slices ---------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The mask is `reference::dropout::keep`'s. The kept values see three f32 roundings (1 − p,
    /// its reciprocal, the product), relative u each: within 4u of the f64 value. p = 0 keeps
    /// everything, p = 1 drops everything.
    #[test]
    fn dropout_matches_reference(
        n in 1..=3usize, hw in (1..=4usize, 1..=4usize), c in 1..=9usize,
        p in prop_oneof![Just(0.0f32), Just(1.0f32), 0.0f32..1.0], seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let shape = [n, hw.0, hw.1, c];
        let x = randv(&mut rng, shape.iter().product(), 1.0, 0.0);
        let dy = randv(&mut rng, shape.iter().product(), 1.0, 0.0);
        let opt = Dropout2dOptions { p, seed };
        for (what, v, got) in [
            ("dropout2d", &x, be().dropout2d(&t32(&shape, &x), &opt).unwrap()),
            ("dropout2d_backward", &dy, be().dropout2d_backward(&t32(&shape, &dy), &opt).unwrap()),
        ] {
            let want = flat(&reference::dropout::dropout2d(a4(&shape, v).view(), p as f64, seed));
            assert_close(what, &host(&got), &want, |i| 4.0 * U * want[i].abs()).map_err(TestCaseError::fail)?;
            for (i, &g) in host(&got).iter().enumerate() {
                let keep = reference::dropout::keep(seed, i / (hw.0 * hw.1 * c), i % c, p as f64);
                prop_assert_eq!(g == 0.0, !keep || v[i] == 0.0, "element {}", i);
            }
        }
    }

    /// Dropped channels are exact zeros even where the input is inf or NaN; kept ones carry
    /// them through.
    #[test]
    fn dropout_zeroes_non_finite_inputs(seed in any::<u64>()) {
        let (n, c) = (4, 8);
        let x: Vec<f64> = (0..n * 2 * c).map(|i| [f64::INFINITY, f64::NAN, f64::NEG_INFINITY, 1.0][i % 4]).collect();
        let opt = Dropout2dOptions { p: 0.5, seed };
        let y = host(&be().dropout2d(&t32(&[n, 1, 2, c], &x), &opt).unwrap());
        for (i, (&got, &v)) in y.iter().zip(&x).enumerate() {
            if reference::dropout::keep(seed, i / (2 * c), i % c, 0.5) {
                prop_assert!(same_or_both_nan(got, v * 2.0), "kept element {}: {} from {}", i, got, v);
            } else {
                prop_assert_eq!(got.to_bits(), 0.0f64.to_bits(), "dropped element {}", i);
            }
        }
    }

    #[test]
    fn elementwise_matches_reference(len in 1..=300usize, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let a = randv(&mut rng, len, 1.0, 0.0);
        let b = randv(&mut rng, len, 1.0, 0.0);
        let shape = [len];
        // f32 add and max are correctly rounded: within u·|exact|.
        let sum = be().add(&t32(&shape, &a), &t32(&shape, &b)).unwrap();
        let want = reference::elementwise::add(&a, &b);
        assert_close("add", &host(&sum), &want, |i| U * want[i].abs()).map_err(TestCaseError::fail)?;
        let y = be().relu(&t32(&shape, &a)).unwrap();
        prop_assert_eq!(host(&y), reference::elementwise::relu(&a));
        let dx = be().relu_backward(&t32(&shape, &b), &y).unwrap();
        prop_assert_eq!(host(&dx), reference::elementwise::relu_backward(&b, &host(&y)));
    }

    /// Two steps (the first initialises the buffers) over tensors with their own learning
    /// rates. Each update is three fused multiply-adds rounded once each: within a few u of
    /// the magnitudes that enter it. Each step is compared from the backend's own state.
    #[test]
    fn sgd_matches_reference(
        lens in prop::collection::vec(1..=50usize, 1..=3), momentum in 0.0f32..1.0, wd in 0.0f32..0.01,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let mut params: Vec<CpuTensor> = lens.iter().map(|&l| t32(&[l], &randv(&mut rng, l, 1.0, 0.0))).collect();
        // Stale buffers: the first step must not read them.
        let mut bufs: Vec<CpuTensor> = lens.iter().map(|&l| t32(&[l], &randv(&mut rng, l, 1.0, 0.0))).collect();
        let lrs: Vec<f32> = lens.iter().map(|_| rng.uniform(0.0, 0.1) as f32).collect();
        let opt = SgdOptions { momentum, weight_decay: wd };
        for first in [true, false] {
            let grads: Vec<CpuTensor> = lens.iter().map(|&l| t32(&[l], &randv(&mut rng, l, 1.0, 0.0))).collect();
            let (p0, b0): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
                params.iter().zip(&bufs).map(|(p, b)| (host(p), host(b))).unzip();
            let mut list: Vec<SgdTensor<'_, CpuTensor>> = params
                .iter_mut()
                .zip(bufs.iter_mut())
                .zip(&grads)
                .zip(&lrs)
                .map(|(((param, momentum_buffer), grad), &lr)| SgdTensor { param, grad, momentum_buffer, lr, frozen_rows: None })
                .collect();
            be().sgd_step(&mut list, &opt, first).unwrap();
            for i in 0..lens.len() {
                let (mut p, mut b, g) = (p0[i].clone(), b0[i].clone(), host(&grads[i]));
                let (lr, mom, wd) = (lrs[i] as f64, momentum as f64, wd as f64);
                reference::sgd::sgd_step(&mut p, &g, &mut b, lr, mom, wd, first);
                let dmag = |j: usize| g[j].abs() + wd * p0[i][j].abs() + if first { 0.0 } else { mom * b0[i][j].abs() };
                assert_close("momentum buffer", &host(&bufs[i]), &b, |j| 4.0 * U * dmag(j))
                    .map_err(TestCaseError::fail)?;
                assert_close("parameter", &host(&params[i]), &p, |j| 4.0 * U * (p0[i][j].abs() + lr * dmag(j)))
                    .map_err(TestCaseError::fail)?;
            }
        }
    }

    /// Channel and batch concatenation are inverted by the slices, f32 and i32.
    #[test]
    fn concat_and_slices_round_trip(
        widths in prop::collection::vec(1..=5usize, 1..=4), n in 1..=3usize, h in 1..=3usize, w in 1..=3usize,
        ints in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let make = |rng: &mut Rng, shape: &[usize]| {
            let len: usize = shape.iter().product();
            if ints {
                ti32(shape, &(0..len).map(|_| rng.below(1000) as i32).collect::<Vec<_>>())
            } else {
                t32(shape, &randv(rng, len, 1.0, 0.0))
            }
        };
        let parts: Vec<CpuTensor> = widths.iter().map(|&c| make(&mut rng, &[n, h, w, c])).collect();
        let refs: Vec<&CpuTensor> = parts.iter().collect();
        let cat = be().concat_channels(&refs).unwrap();
        let total: usize = widths.iter().sum();
        prop_assert_eq!(cat.shape(), &[n, h, w, total][..]);
        let mut off = 0;
        for (p, &c) in parts.iter().zip(&widths) {
            let s = be().slice_channels(&cat, off, c).unwrap();
            prop_assert_eq!(bits(&s), bits(p));
            // Element (pixel 0, channel off) of the concatenation is part p's first value.
            prop_assert_eq!(bits(&cat)[off], bits(p)[0]);
            off += c;
        }
        let batch: Vec<CpuTensor> = (0..3).map(|i| make(&mut rng, &[i + 1, h, w])).collect();
        let cat = be().concat_batch(&batch.iter().collect::<Vec<_>>()).unwrap();
        prop_assert_eq!(cat.shape(), &[6, h, w][..]);
        for (i, (start, part)) in [(0usize, &batch[0]), (1, &batch[1]), (3, &batch[2])].into_iter().enumerate() {
            let s = be().slice_batch(&cat, start, i + 1).unwrap();
            prop_assert_eq!(bits(&s), bits(part));
        }
    }
}

// ---- typed errors -------------------------------------------------------------------------------

fn trained_bn() -> (CpuBn, Vec<Vec<u32>>) {
    // One real step first, so the tables hold values other than the defaults.
    let mut bn = be().bn_new(2, 3).unwrap();
    let mut rng = Rng(11);
    let x = t32(&[2, 2, 2, 3], &randv(&mut rng, 24, 1.0, 0.5));
    be().dsbn_forward_train(&x, &ti32(&[2], &[0, 1]), &mut bn, &DsbnOptions::default(), None).unwrap();
    let snapshot = bn.tables().iter().map(|t| bits(t)).collect();
    (bn, snapshot)
}

#[test]
fn bad_dataset_index_writes_nothing() {
    let (mut bn, before) = trained_bn();
    let mut rng = Rng(12);
    let x = t32(&[3, 2, 2, 3], &randv(&mut rng, 36, 1.0, 0.0));
    let opt = DsbnOptions::default();
    let err = be().dsbn_forward_train(&x, &ti32(&[3], &[0, 2, 5]), &mut bn, &opt, None).unwrap_err();
    assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 1, index: 2, num_datasets: 2 });
    let err = be().dsbn_forward_train(&x, &ti32(&[3], &[1, 0, -1]), &mut bn, &opt, None).unwrap_err();
    assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 2, index: -1, num_datasets: 2 });
    let after: Vec<Vec<u32>> = bn.tables().iter().map(|t| bits(t)).collect();
    assert_eq!(before, after, "a refused forward moved the tables");
    let err = be().dsbn_forward_infer(&x, &ti32(&[3], &[0, 2, 1]), &bn, &opt, None).unwrap_err();
    assert!(matches!(err, Error::DatasetIndexOutOfRange { sample: 1, .. }), "{err:?}");
}

#[test]
fn too_few_values_and_bad_residual_write_nothing() {
    let (mut bn, before) = trained_bn();
    let opt = DsbnOptions::default();
    let x = t32(&[3, 1, 1, 3], &(0..9).map(|v| v as f64).collect::<Vec<_>>());
    let err = be().dsbn_forward_train(&x, &ti32(&[3], &[1, 0, 1]), &mut bn, &opt, None).unwrap_err();
    assert_eq!(err, Error::TooFewValues { dataset: 0, count: 1 });
    let x = t32(&[2, 2, 2, 3], &[0.5; 24]);
    let bad = t32(&[2, 2, 1, 3], &[0.0; 12]);
    let err = be().dsbn_forward_train(&x, &ti32(&[2], &[0, 1]), &mut bn, &opt, Some(&bad)).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { what: "DSBN residual", .. }), "{err:?}");
    let err =
        be().dsbn_forward_train(&x, &ti32(&[2], &[0, 1]), &mut bn, &DsbnOptions { eps: 0.0, ..opt }, None).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let err = be().dsbn_forward_train(&x, &t32(&[2], &[0.0, 1.0]), &mut bn, &opt, None).unwrap_err();
    assert!(matches!(err, Error::DTypeMismatch { what: "dataset indices", .. }), "{err:?}");
    let after: Vec<Vec<u32>> = bn.tables().iter().map(|t| bits(t)).collect();
    assert_eq!(before, after, "a refused forward moved the tables");
    // Tables of the wrong width.
    let mut narrow = be().bn_new(2, 2).unwrap();
    let err = be().dsbn_forward_train(&x, &ti32(&[2], &[0, 1]), &mut narrow, &opt, None).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { what: "DSBN gamma", .. }), "{err:?}");
    assert!(matches!(be().bn_new(0, 3), Err(Error::InvalidShape { .. })));
}

#[test]
fn bad_labels_are_reported_in_element_order() {
    let shape = [2, 2, 3, 4];
    let logits = t32(&shape, &[0.25; 48]);
    let classes = [4, 2];
    let opt = CrossEntropyOptions::default();
    // Sample 1 (dataset 1, 2 classes): label 2 at pixel 6 + 1 = 7 and -1 at pixel 10; sample 0
    // (dataset 0, 4 classes) is fine with label 3 and 255.
    let mut labels = vec![3, 255, 0, 1, 2, 3, 0, 2, 1, 255, -1, 0];
    let ds = ti32(&[2], &[0, 1]);
    let err = be().cross_entropy(&logits, &ti32(&[2, 2, 3], &labels), &ds, &classes, &opt, true).unwrap_err();
    assert_eq!(err, Error::InvalidLabel { dataset: 1, label: 2, position: 7, num_classes: 2 });
    labels[7] = 1;
    let err = be().cross_entropy(&logits, &ti32(&[2, 2, 3], &labels), &ds, &classes, &opt, false).unwrap_err();
    assert_eq!(err, Error::InvalidLabel { dataset: 1, label: -1, position: 10, num_classes: 2 });
    // A bad dataset index is reported before any label.
    let err = be().cross_entropy(&logits, &ti32(&[2, 2, 3], &labels), &ti32(&[2], &[0, 2]), &classes, &opt, true);
    assert_eq!(err.unwrap_err(), Error::DatasetIndexOutOfRange { sample: 1, index: 2, num_datasets: 2 });
    labels[10] = 255;
    let (loss, _) = be().cross_entropy(&logits, &ti32(&[2, 2, 3], &labels), &ds, &classes, &opt, true).unwrap();
    assert!(loss.total.is_finite());
    // Other argument errors.
    let err = be().cross_entropy(&logits, &t32(&[2, 2, 3], &[0.0; 12]), &ds, &classes, &opt, true).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { what: "cross-entropy labels", .. }), "{err:?}");
    let err = be().cross_entropy(&logits, &ti32(&[2, 3, 2], &labels), &ds, &classes, &opt, true).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { what: "cross-entropy labels", .. }), "{err:?}");
    let err = be().cross_entropy(&logits, &ti32(&[2, 2, 3], &labels), &ds, &[5, 2], &opt, true).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let heavy = CrossEntropyOptions { weights: Some(vec![1.0]), grad_scale: 1.0 };
    let err = be().cross_entropy(&logits, &ti32(&[2, 2, 3], &labels), &ds, &classes, &heavy, true).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let err = be().argmax(&logits, &ti32(&[2], &[0, -3]), &classes).unwrap_err();
    assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 1, index: -3, num_datasets: 2 });
}

#[test]
fn shape_and_dtype_errors_are_typed() {
    let b = be();
    let x = t32(&[1, 5, 5, 3], &[1.0; 75]);
    let w = t32(&[4, 3, 3, 2], &[1.0; 72]);
    let err = b.conv2d(&x, &w, None, &ConvGeometry::default()).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { what: "convolution weight", .. }), "{err:?}");
    let w = t32(&[4, 3, 3, 3], &[1.0; 108]);
    let err = b.conv2d(&x, &w, Some(&t32(&[3], &[0.0; 3])), &ConvGeometry::default()).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { what: "convolution bias", .. }), "{err:?}");
    let xi = ti32(&[1, 5, 5, 3], &[1; 75]);
    let err = b.conv2d(&xi, &w, None, &ConvGeometry::default()).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { dtype: DType::I32, .. }), "{err:?}");
    let err = b.conv2d(&t32(&[5, 5, 3], &[1.0; 75]), &w, None, &ConvGeometry::default()).unwrap_err();
    assert!(matches!(err, Error::InvalidShape { .. }), "{err:?}");
    // A 3×3 filter with dilation 3 does not fit a 5×5 input.
    let err = b.conv2d(&x, &w, None, &ConvGeometry::square(1, 0, 3)).unwrap_err();
    assert!(matches!(err, Error::InvalidShape { what: "convolution", .. }), "{err:?}");
    let err = b.conv2d(&x, &w, None, &ConvGeometry::square(0, 0, 1)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    // Stride 2: inputs of 5 and 6 both give 2 outputs with a 3-tap filter, 8 does not.
    let dy = t32(&[1, 2, 2, 4], &[1.0; 16]);
    let g = ConvGeometry::square(2, 0, 1);
    assert_eq!(b.conv2d_backward_data(&dy, &w, (6, 6), &g).unwrap().shape(), &[1, 6, 6, 3]);
    let err = b.conv2d_backward_data(&dy, &w, (8, 8), &g).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { what: "convolution output gradient", .. }), "{err:?}");
    let err = b.conv2d_backward_filter(&dy, &x, (5, 3, 3), true, &g).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { what: "convolution filter", .. }), "{err:?}");

    let err = b.add(&x, &t32(&[1, 5, 3, 5], &[1.0; 75])).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
    let err = b.add(&x, &xi).unwrap_err();
    assert!(matches!(err, Error::DTypeMismatch { .. }), "{err:?}");
    assert!(matches!(b.to_f32(&xi), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(b.to_i32(&x), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(b.tensor_f32(&[2, 3], &[1.0; 5]), Err(Error::InvalidShape { .. })));
    assert!(matches!(b.tensor_i32(&[usize::MAX, 3], &[]), Err(Error::InvalidShape { .. })));
    let mut t = b.zeros(&[2, 2]).unwrap();
    assert!(matches!(b.write_f32(&mut t, &[1.0; 3]), Err(Error::ShapeMismatch { .. })));
    b.write_f32(&mut t, &[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(b.to_f32(&t).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);

    let err = b.max_pool2d(&x, &PoolGeometry::square(2, 2, 2)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let (y, idx) = b.max_pool2d(&x, &PoolGeometry::default()).unwrap();
    let err = b.max_pool2d_backward(&y, &y, (5, 5), &PoolGeometry::default()).unwrap_err();
    assert!(matches!(err, Error::DTypeMismatch { what: "max pooling indices", .. }), "{err:?}");
    let err = b.max_pool2d_backward(&y, &idx, (0, 5), &PoolGeometry::default()).unwrap_err();
    assert!(matches!(err, Error::InvalidShape { .. }), "{err:?}");
    assert!(matches!(b.adaptive_avg_pool(&x, 0, 2), Err(Error::InvalidShape { .. })));
    assert!(matches!(b.resize_bilinear(&x, 3, 0, true), Err(Error::InvalidShape { .. })));
    assert!(matches!(b.resize_bilinear_backward(&x, (0, 2), false), Err(Error::InvalidShape { .. })));

    for p in [1.5, -0.1, f32::NAN] {
        let err = b.dropout2d(&x, &Dropout2dOptions { p, seed: 1 }).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "p = {p}: {err:?}");
    }
    assert!(matches!(b.slice_channels(&x, 2, 2), Err(Error::InvalidArgument(_))));
    assert!(matches!(b.slice_batch(&x, 1, 1), Err(Error::InvalidArgument(_))));
    assert!(matches!(b.concat_channels(&[]), Err(Error::InvalidArgument(_))));
    let other = t32(&[1, 4, 5, 2], &[1.0; 40]);
    assert!(matches!(b.concat_channels(&[&x, &other]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(b.concat_batch(&[&x, &other]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(b.concat_batch(&[&x, &xi]), Err(Error::DTypeMismatch { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Frozen rows (none, one, every row, random ones; one-row tensors; more rows than a mask
    /// names) keep their parameter and buffer bits; the other rows match the reference as in
    /// `sgd_matches_reference`.
    #[test]
    fn sgd_frozen_rows_match_reference(
        shapes in prop::collection::vec((1..=70usize, 1..=20usize, 0u8..4, any::<u64>()), 1..=3),
        momentum in 0.0f32..1.0, wd in 0.0f32..0.01, seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let masks: Vec<FrozenRows> = shapes
            .iter()
            .map(|&(rows, row_len, kind, bits)| {
                let all = if rows >= 64 { u64::MAX } else { (1u64 << rows) - 1 };
                let mask = match kind {
                    0 => bits & all,
                    1 => 1 << (bits % rows.min(64) as u64),
                    2 => all,
                    _ => 0,
                };
                FrozenRows { row_len, rows: mask }
            })
            .collect();
        let lens: Vec<usize> = shapes.iter().map(|&(rows, row_len, ..)| rows * row_len).collect();
        let mut params: Vec<CpuTensor> = lens.iter().map(|&l| t32(&[l], &randv(&mut rng, l, 1.0, 0.0))).collect();
        let mut bufs: Vec<CpuTensor> = lens.iter().map(|&l| t32(&[l], &randv(&mut rng, l, 1.0, 0.0))).collect();
        let lrs: Vec<f32> = lens.iter().map(|_| rng.uniform(0.0, 0.1) as f32).collect();
        let opt = SgdOptions { momentum, weight_decay: wd };
        for first in [true, false] {
            let grads: Vec<CpuTensor> = lens.iter().map(|&l| t32(&[l], &randv(&mut rng, l, 1.0, 0.0))).collect();
            let (p0, b0): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
                params.iter().zip(&bufs).map(|(p, b)| (host(p), host(b))).unzip();
            let (pb0, bb0): (Vec<Vec<u32>>, Vec<Vec<u32>>) = params.iter().zip(&bufs).map(|(p, b)| (bits(p), bits(b))).unzip();
            let mut list: Vec<SgdTensor<'_, CpuTensor>> = params
                .iter_mut()
                .zip(bufs.iter_mut())
                .zip(&grads)
                .zip(&lrs)
                .zip(&masks)
                .map(|((((param, momentum_buffer), grad), &lr), &f)| SgdTensor {
                    param,
                    grad,
                    momentum_buffer,
                    lr,
                    frozen_rows: Some(f),
                })
                .collect();
            be().sgd_step(&mut list, &opt, first).unwrap();
            for i in 0..lens.len() {
                let f = masks[i];
                let frozen: Vec<usize> = (0..64).filter(|&r| f.is_frozen(r)).collect();
                let (mut p, mut b, g) = (p0[i].clone(), b0[i].clone(), host(&grads[i]));
                let (lr, mom, wd) = (lrs[i] as f64, momentum as f64, wd as f64);
                reference::sgd::sgd_step_frozen(&mut p, &g, &mut b, lr, mom, wd, first, f.row_len, &frozen);
                let dmag = |j: usize| g[j].abs() + wd * p0[i][j].abs() + if first { 0.0 } else { mom * b0[i][j].abs() };
                assert_close("momentum buffer", &host(&bufs[i]), &b, |j| 4.0 * U * dmag(j))
                    .map_err(TestCaseError::fail)?;
                assert_close("parameter", &host(&params[i]), &p, |j| 4.0 * U * (p0[i][j].abs() + lr * dmag(j)))
                    .map_err(TestCaseError::fail)?;
                let (pb, bb) = (bits(&params[i]), bits(&bufs[i]));
                for j in 0..lens[i] {
                    if frozen.contains(&(j / f.row_len)) {
                        prop_assert!(pb[j] == pb0[i][j] && bb[j] == bb0[i][j], "tensor {} element {} written", i, j);
                    }
                }
            }
        }
    }
}

#[test]
fn sgd_bad_frozen_rows_are_typed_errors() {
    let b = be();
    let mut p1 = t32(&[3], &[1.0, 2.0, 3.0]);
    let mut p2 = t32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let (mut b1, mut b2) = (b.zeros(&[3]).unwrap(), b.zeros(&[2, 2]).unwrap());
    let g1 = t32(&[3], &[0.5; 3]);
    let g2 = t32(&[2, 2], &[0.5; 4]);
    let before = bits(&p1);
    for f in [
        FrozenRows { row_len: 0, rows: 0 },
        FrozenRows { row_len: 3, rows: 1 },
        FrozenRows { row_len: 2, rows: 0b100 },
        FrozenRows { row_len: 4, rows: 0b10 },
    ] {
        let mut list = vec![
            SgdTensor { param: &mut p1, grad: &g1, momentum_buffer: &mut b1, lr: 0.1, frozen_rows: None },
            SgdTensor { param: &mut p2, grad: &g2, momentum_buffer: &mut b2, lr: 0.1, frozen_rows: Some(f) },
        ];
        let r = b.sgd_step(&mut list, &SgdOptions::default(), true);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{f:?}: {r:?}");
        drop(list);
        assert_eq!(bits(&p1), before, "{f:?}: written before the mask was checked");
    }
}

#[test]
fn sgd_validates_every_tensor_before_writing() {
    let b = be();
    let mut p1 = t32(&[3], &[1.0, 2.0, 3.0]);
    let mut p2 = t32(&[2], &[1.0, 2.0]);
    let (mut b1, mut b2) = (b.zeros(&[3]).unwrap(), b.zeros(&[2]).unwrap());
    let g1 = t32(&[3], &[0.5; 3]);
    let g2 = t32(&[3], &[0.5; 3]);
    let before = bits(&p1);
    let mut list = vec![
        SgdTensor { param: &mut p1, grad: &g1, momentum_buffer: &mut b1, lr: 0.1, frozen_rows: None },
        SgdTensor { param: &mut p2, grad: &g2, momentum_buffer: &mut b2, lr: 0.1, frozen_rows: None },
    ];
    let err = b.sgd_step(&mut list, &SgdOptions::default(), true).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { what: "SGD gradient", .. }), "{err:?}");
    drop(list);
    assert_eq!(bits(&p1), before, "the first tensor was updated before the second was checked");
    let mut list = vec![SgdTensor { param: &mut p1, grad: &g1, momentum_buffer: &mut b1, lr: -1.0, frozen_rows: None }];
    assert!(matches!(b.sgd_step(&mut list, &SgdOptions::default(), true), Err(Error::InvalidArgument(_))));
    let bad = SgdOptions { momentum: 1.5, weight_decay: 0.0 };
    assert!(matches!(b.sgd_step(&mut list, &bad, true), Err(Error::InvalidArgument(_))));
    drop(list);
    assert_eq!(bits(&p1), before);
}

#[test]
fn name_and_initial_tables() {
    assert_eq!(be().name(), "cpu");
    let bn = be().bn_new(3, 2).unwrap();
    let [g, b, m, v] = bn.tables();
    for (t, want) in [(g, 1.0), (b, 0.0), (m, 0.0), (v, 1.0)] {
        assert_eq!(t.shape(), &[3, 2]);
        assert!(host(t).iter().all(|&x| x == want));
    }
}

// ---- determinism --------------------------------------------------------------------------------

/// A forward and backward through every op with shapes that split into many pieces (several
/// GEMM tiles and column blocks, several pixel chunks per sample); the bits of every output.
fn pipeline() -> Vec<Vec<u32>> {
    let b = be();
    let mut rng = Rng(99);
    let mut out = Vec::new();
    let xs = [2, 48, 48, 16];
    let x = t32(&xs, &randv(&mut rng, xs.iter().product(), 1.0, 0.1));
    let w = t32(&[24, 3, 3, 16], &randv(&mut rng, 24 * 9 * 16, 0.2, 0.0));
    let bias = t32(&[24], &randv(&mut rng, 24, 0.1, 0.0));
    let g = ConvGeometry::square(1, 2, 2);
    let y = b.conv2d(&x, &w, Some(&bias), &g).unwrap();
    let ds = ti32(&[2], &[1, 0]);
    let mut bn = b.bn_new(2, 24).unwrap();
    let res = t32(y.shape(), &randv(&mut rng, y.numel(), 1.0, 0.0));
    let opt = DsbnOptions { relu: true, ..DsbnOptions::default() };
    let (z, saved) = b.dsbn_forward_train(&y, &ds, &mut bn, &opt, Some(&res)).unwrap();
    let pooled = b.adaptive_avg_pool(&z, 6, 6).unwrap();
    let up = b.resize_bilinear(&pooled, 48, 48, false).unwrap();
    let logits = b.concat_channels(&[&z, &up]).unwrap();
    let logits = b.slice_channels(&logits, 20, 8).unwrap();
    let labels: Vec<i32> = (0..2 * 48 * 48).map(|i| if i % 7 == 0 { 255 } else { i % 5 }).collect();
    let (loss, dlogits) = b
        .cross_entropy(&logits, &ti32(&[2, 48, 48], &labels), &ds, &[8, 5], &CrossEntropyOptions::default(), true)
        .unwrap();
    out.push(vec![loss.total.to_bits()]);
    let dl = dlogits.unwrap();
    let dz = b.resize_bilinear_backward(&b.adaptive_avg_pool(&dl, 6, 6).unwrap(), (48, 48), true).unwrap();
    let dz = b.add(&dz, &b.dropout2d(&dl, &Dropout2dOptions { p: 0.3, seed: 5 }).unwrap()).unwrap();
    let dz = b.concat_channels(&[&dz, &b.zeros(&[2, 48, 48, 16]).unwrap()]).unwrap();
    let grads = b.dsbn_backward_train(&dz, &y, Some(&res), &ds, &bn, &saved, &opt).unwrap();
    let dx = b.conv2d_backward_data(&grads.dx, &w, (48, 48), &g).unwrap();
    let (dw, db) = b.conv2d_backward_filter(&grads.dx, &x, (24, 3, 3), true, &g).unwrap();
    let w1 = t32(&[8, 1, 1, 16], &randv(&mut rng, 128, 0.3, 0.0));
    let y1 = b.conv2d(&x, &w1, None, &ConvGeometry::default()).unwrap();
    let dx1 = b.conv2d_backward_data(&y1, &w1, (48, 48), &ConvGeometry::default()).unwrap();
    let (dw1, _) = b.conv2d_backward_filter(&y1, &x, (8, 1, 1), false, &ConvGeometry::default()).unwrap();
    let (mp, idx) = b.max_pool2d(&z, &PoolGeometry::default()).unwrap();
    let dmp = b.max_pool2d_backward(&mp, &idx, (48, 48), &PoolGeometry::default()).unwrap();
    let pred = b.argmax(&logits, &ds, &[8, 5]).unwrap();
    for t in [&y, &z, &saved.mean, &saved.invstd, &up, &dl, &grads.dx, &grads.dgamma, &grads.dbeta, &dx, &dw] {
        out.push(bits(t));
    }
    for t in [db.as_ref().unwrap(), grads.dresidual.as_ref().unwrap(), &y1, &dx1, &dw1, &mp, &idx, &dmp, &pred] {
        out.push(bits(t));
    }
    out.extend(bn.tables().iter().map(|t| bits(t)));
    out
}

#[test]
fn same_bits_with_one_and_two_threads() {
    let run = |threads: usize| rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(pipeline);
    let one = run(1);
    let two = run(2);
    assert_eq!(one.len(), two.len());
    for (i, (a, b)) in one.iter().zip(&two).enumerate() {
        assert!(a == b, "output {i} differs between 1 and 2 threads");
    }
    assert!(run(2) == two, "two runs with 2 threads differ");
}

/// Indices the forward cannot have written (outside the plane, negative, or inside the plane but
/// outside their output's window) send their gradient nowhere, as the device kernel does; a
/// gradient whose size does not follow from the geometry is a typed error.
#[test]
fn max_pool_backward_drops_foreign_indices() {
    let g = PoolGeometry::square(2, 2, 0);
    let dy = t32(&[1, 2, 2, 1], &[1.0, 2.0, 4.0, 8.0]);
    let dx = be().max_pool2d_backward(&dy, &ti32(&[1, 2, 2, 1], &[5, 3, 12, 15]), (4, 4), &g).unwrap();
    let mut want = vec![0.0; 16];
    (want[5], want[3], want[12], want[15]) = (1.0, 2.0, 4.0, 8.0);
    assert_eq!(host(&dx), want);
    let dx = be().max_pool2d_backward(&dy, &ti32(&[1, 2, 2, 1], &[16, -1, 3, 15]), (4, 4), &g).unwrap();
    let mut want = vec![0.0; 16];
    want[15] = 8.0;
    assert_eq!(host(&dx), want);
    let err = be().max_pool2d_backward(&dy, &ti32(&[1, 2, 2, 1], &[0; 4]), (6, 6), &g).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
}
