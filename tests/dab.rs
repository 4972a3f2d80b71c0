//! The fused Dataset-Aware Block (conv → DSBN → ReLU, optional residual) against the
//! composition of the f64 references — in f32, and in f16 / bf16 storage (`run16`, with its own
//! tolerances) — fused chains against unfused ones (bitwise, all three types), the one-kernel
//! inference path against conv + inference DSBN (bitwise), and determinism.
//!
//! Tolerances. A DAB output is a normalised convolution: the convolution's relative error is
//! bounded by gamma_D * sum|a*b| / |y| (see tests/conv.rs), and normalisation divides the
//! absolute error by the channel's standard deviation, which the random data keep within a
//! factor ~10 of the output scale. The backward chains the BN backward (see tests/dsbn.rs)
//! into two more convolutions. We therefore assert max|got - ref| <= 2e-4 * max|ref| per output
//! tensor: ~20x above the error these bounds give for the shapes drawn, and orders of
//! magnitude below what a wrong index, dataset or channel produces.

mod common;

use cdcl::ops::conv::ConvGeometry;
use cdcl::ops::dab::{self, DabOptions, Prologue};
use cdcl::ops::dsbn::{self, DsbnOptions, DsbnState};
use cdcl::reference::{conv as rconv, dsbn as rdsbn};
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{bits, host, tensor, Rng};
use ndarray::{Array4, ArrayView2, ArrayView4};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    r: usize,
    geom: ConvGeometry,
    d: usize,
    datasets: Vec<usize>,
    relu: bool,
    residual: bool,
    seed: u64,
}

fn strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=5,
        2usize..=9,
        2usize..=9,
        1usize..=20,
        1usize..=40,
        prop_oneof![Just(1usize), Just(3)],
        (1usize..=2, 1usize..=2),
        1usize..=3,
        any::<(bool, bool)>(),
        any::<u64>(),
    )
        .prop_flat_map(|(n, h, w, c, k, r, (stride, dil), d, (relu, residual), seed)| {
            proptest::collection::vec(0..d, n).prop_map(move |datasets| {
                let pad = if r == 3 { dil } else { 0 };
                Case {
                    n,
                    h,
                    w,
                    c,
                    k,
                    r,
                    geom: ConvGeometry::square(stride, pad, dil),
                    d,
                    datasets,
                    relu,
                    residual,
                    seed,
                }
            })
        })
}

fn out_hw(k: &Case) -> (usize, usize) {
    k.geom.output_size(k.h, k.w, k.r, k.r).unwrap()
}

struct Data {
    x: Vec<f64>,
    w: Vec<f64>,
    res: Vec<f64>,
    dy: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
}

fn data(k: &Case) -> Data {
    let mut g = Rng(k.seed);
    let (p, q) = out_hw(k);
    let mut v = |len: usize, lo: f64, hi: f64| -> Vec<f64> {
        (0..len).map(|_| (lo + (hi - lo) * g.uniform(0.0, 1.0)) as f32 as f64).collect()
    };
    let x = v(k.n * k.h * k.w * k.c, -2.0, 2.0);
    let w = v(k.k * k.r * k.r * k.c, -1.0, 1.0);
    let res = v(k.n * p * q * k.k, -1.0, 1.0);
    let dy = v(k.n * p * q * k.k, -1.0, 1.0);
    let gamma = v(k.d * k.k, 0.5, 1.5);
    let beta = v(k.d * k.k, -0.5, 0.5);
    Data { x, w, res, dy, gamma, beta }
}

fn spec(k: &Case) -> rconv::ConvSpec {
    rconv::ConvSpec { stride: k.geom.stride, padding: k.geom.padding, dilation: k.geom.dilation }
}

fn close(what: &str, got: &[f64], want: &[f64]) -> Result<(), String> {
    let max_ref = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (i, err) = got.iter().zip(want).enumerate().fold((0, 0.0f64), |(bi, be), (i, (g, w))| {
        let e = (g - w).abs();
        if e > be || e.is_nan() {
            (i, e)
        } else {
            (bi, be)
        }
    });
    let within = err <= 2e-4 * max_ref.max(1e-12); // false for NaN too
    if !within {
        return Err(format!("{what}: element {i}: got {} want {} (max |ref| {max_ref:e})", got[i], want[i]));
    }
    Ok(())
}

/// A bound on the terms that each dx and dweight element of the DAB backward sums. Those sums
/// cancel by construction (the BN backward's outputs sum to zero per (dataset, channel)), so their
/// size says nothing about the rounding of the terms. The bound is the BN backward output's scale
/// per element, γ·invstd·(|g| + S/M) with S the sum over its (dataset, channel) of |g|(1 + |x̂|),
/// pushed through the convolution backward on |x| and |w|. `g` is the gradient after the ReLU
/// mask, `conv` the convolution output the statistics `bn` were taken of.
fn backward_magnitude(
    k: &Case,
    g: &[f64],
    conv: &[f64],
    bn: &rdsbn::DsbnTrainOutput,
    gamma: &[f64],
    x: &[f64],
    w: &[f64],
) -> rconv::ConvGrads {
    let (p, q) = out_hw(k);
    let cd = |e: usize| (e % k.k, k.datasets[e / (p * q * k.k)]);
    let mut group = vec![0.0f64; k.d * k.k];
    for (e, ge) in g.iter().enumerate() {
        let (c, d) = cd(e);
        let xhat = (conv[e] - bn.mean[[d, c]]) * bn.invstd[[d, c]];
        group[d * k.k + c] += ge.abs() * (1.0 + xhat.abs());
    }
    let scale: Vec<f64> = (0..g.len())
        .map(|e| {
            let (c, d) = cd(e);
            gamma[d * k.k + c] * bn.invstd[[d, c]] * (g[e].abs() + group[d * k.k + c] / bn.counts[d] as f64)
        })
        .collect();
    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let (ax, aw) = (abs(x), abs(w));
    rconv::conv2d_backward(
        ArrayView4::from_shape((k.n, p, q, k.k), &scale).unwrap(),
        ArrayView4::from_shape((k.n, k.h, k.w, k.c), &ax).unwrap(),
        ArrayView4::from_shape((k.k, k.r, k.r, k.c), &aw).unwrap(),
        &spec(k),
    )
}

fn state(dev: &Device, k: &Case, dt: &Data) -> DsbnState {
    let mut s = DsbnState::new(dev, k.d, k.k).unwrap();
    s.gamma = tensor(dev, &[k.d, k.k], &dt.gamma, DType::F32);
    s.beta = tensor(dev, &[k.d, k.k], &dt.beta, DType::F32);
    s
}

fn run(k: &Case, dev: &Device) -> Result<(), String> {
    let dt = data(k);
    let (p, q) = out_hw(k);
    let (xd, wd, yd) = ((k.n, k.h, k.w, k.c), (k.k, k.r, k.r, k.c), (k.n, p, q, k.k));
    let x = tensor(dev, &[k.n, k.h, k.w, k.c], &dt.x, DType::F32);
    let w = tensor(dev, &[k.k, k.r, k.r, k.c], &dt.w, DType::F32);
    let res = tensor(dev, &[k.n, p, q, k.k], &dt.res, DType::F32);
    let ds: Vec<i32> = k.datasets.iter().map(|&d| d as i32).collect();
    let ds = Tensor::from_slice(dev, &[k.n], &ds).unwrap();
    let mut st = state(dev, k, &dt);
    let opts = DsbnOptions { relu: k.relu, ..DsbnOptions::default() };
    let residual = k.residual.then_some(&res);

    // Reference: conv, DSBN (no ReLU), + residual, ReLU.
    let conv = rconv::conv2d(
        ArrayView4::from_shape(xd, &dt.x).unwrap(),
        ArrayView4::from_shape(wd, &dt.w).unwrap(),
        None,
        &spec(k),
    );
    let (ones, zeros) = (vec![1.0; k.d * k.k], vec![0.0; k.d * k.k]);
    let v2 = |v: &'static str, a: &[f64]| -> Vec<f64> {
        let _ = v;
        a.to_vec()
    };
    let (g2, b2) = (v2("g", &dt.gamma), v2("b", &dt.beta));
    let a2 = |v: &Vec<f64>| ArrayView2::from_shape((k.d, k.k), v.as_slice()).unwrap().to_owned();
    let cfg = rdsbn::DsbnConfig { relu: false, ..rdsbn::DsbnConfig::default() };
    let bn = rdsbn::dsbn_forward_train(
        conv.view(),
        &k.datasets,
        a2(&g2).view(),
        a2(&b2).view(),
        a2(&zeros).view(),
        a2(&ones).view(),
        &cfg,
    );
    let fwd = dab::forward_train(
        &x,
        &w,
        &ds,
        &mut st,
        &DabOptions { geometry: k.geom, dsbn: opts, residual, materialize: true, ..Default::default() },
    );
    let bn = match bn {
        Err(rdsbn::ReferenceError::TooFewValues { .. }) => {
            return match fwd {
                Err(Error::TooFewValues { .. }) => Ok(()),
                other => Err(format!("expected TooFewValues, got {other:?}")),
            };
        }
        Err(e) => return Err(e.to_string()),
        Ok(b) => b,
    };
    let fwd = fwd.map_err(|e| e.to_string())?;
    close("conv_out", &host(&fwd.conv_out), conv.as_slice().unwrap())?;
    let pre: Vec<f64> = bn.y.iter().zip(&dt.res).map(|(y, r)| y + if k.residual { *r } else { 0.0 }).collect();
    let out: Vec<f64> = pre.iter().map(|&v| if k.relu { v.max(0.0) } else { v }).collect();
    close("output", &host(fwd.output.as_ref().unwrap()), &out)?;
    close("running_mean", &host(&st.running_mean), bn.running_mean.as_slice().unwrap())?;
    close("running_var", &host(&st.running_var), bn.running_var.as_slice().unwrap())?;

    // Backward: dy zeroed where the ReLU mask is ambiguous.
    let dy_h: Vec<f64> =
        dt.dy.iter().zip(&pre).map(|(&g, &v)| if k.relu && v.abs() < 1e-3 { 0.0 } else { g }).collect();
    let dy = tensor(dev, &[k.n, p, q, k.k], &dy_h, DType::F32);
    let grads = dab::backward_train(
        &dy,
        &x,
        &w,
        &ds,
        &st,
        fwd.saved(),
        &DabOptions { geometry: k.geom, dsbn: opts, residual, materialize: true, ..Default::default() },
    )
    .map_err(|e| e.to_string())?;
    let g: Vec<f64> = dy_h.iter().zip(&pre).map(|(&g, &v)| if !k.relu || v > 0.0 { g } else { 0.0 }).collect();
    let rb = rdsbn::dsbn_backward_train(
        ArrayView4::from_shape(yd, &g).unwrap(),
        conv.view(),
        &k.datasets,
        a2(&g2).view(),
        a2(&b2).view(),
        &cfg,
    )
    .map_err(|e| e.to_string())?;
    let rc = rconv::conv2d_backward(
        rb.dx.view(),
        ArrayView4::from_shape(xd, &dt.x).unwrap(),
        ArrayView4::from_shape(wd, &dt.w).unwrap(),
        &spec(k),
    );
    close("dgamma", &host(&grads.dgamma), rb.dgamma.as_slice().unwrap())?;
    close("dbeta", &host(&grads.dbeta), rb.dbeta.as_slice().unwrap())?;
    // dweight and dx: against the bound on their terms (`backward_magnitude`); 1e-4 of it is
    // ~10x the f32 error of the chain.
    let mag = backward_magnitude(k, &g, conv.as_slice().unwrap(), &bn, &dt.gamma, &dt.x, &dt.w);
    common::assert_close("dweight", &host(&grads.dweight), rc.dw.as_slice().unwrap(), |i| {
        1e-4 * mag.dw.as_slice().unwrap()[i] + 1e-30
    })?;
    common::assert_close("dx", &host(grads.dx.as_ref().unwrap()), rc.dx.as_slice().unwrap(), |i| {
        1e-4 * mag.dx.as_slice().unwrap()[i] + 1e-30
    })?;
    match (&grads.dresidual, k.residual) {
        (Some(dr), true) => close("dresidual", &host(dr), &g)?,
        (None, false) => {}
        _ => return Err("dresidual presence does not follow the residual".into()),
    }
    Ok(())
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn dab_matches_reference(k in strategy()) {
        run(&k, &device()).map_err(TestCaseError::fail)?;
    }
}

/// Two blocks where block 2 applies block 1's BN + ReLU in its prologue equal two blocks with a
/// separate apply pass, bit for bit — forward, running statistics and every gradient. In 16-bit
/// storage too: the separate pass rounds the activation to T once when it stores it, and the
/// prologue rounds the same f32 value to T once when it stashes it for the tensor cores.
#[test]
fn chained_prologue_fusion_equals_separate_apply() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        chained_prologue_case(dtype);
    }
}

fn chained_prologue_case(dtype: DType) {
    let dev = device();
    let (n, h, w, c0, c1, c2) = (4, 11, 9, 5, 12, 7);
    let mut g = Rng(5);
    let mut v = |len: usize| -> Vec<f64> { common::quantize(&(0..len).map(|_| g.normal()).collect::<Vec<_>>(), dtype) };
    let x = tensor(&dev, &[n, h, w, c0], &v(n * h * w * c0), dtype);
    let w1 = tensor(&dev, &[c1, 3, 3, c0], &v(c1 * 9 * c0), dtype);
    let w2 = tensor(&dev, &[c2, 3, 3, c1], &v(c2 * 9 * c1), dtype);
    let dy = tensor(&dev, &[n, 6, 5, c2], &v(n * 6 * 5 * c2), dtype);
    let ds = Tensor::from_slice(&dev, &[n], &[0i32, 2, 2, 0]).unwrap();
    let g1 = ConvGeometry::square(1, 2, 2);
    let g2 = ConvGeometry::square(2, 1, 1);
    let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };

    let run = |fused: bool| -> Vec<Vec<u8>> {
        let mut s1 = DsbnState::new(&dev, 3, c1).unwrap();
        let mut s2 = DsbnState::new(&dev, 3, c2).unwrap();
        let b1 = dab::forward_train(
            &x,
            &w1,
            &ds,
            &mut s1,
            &DabOptions { geometry: g1, dsbn: opts, materialize: !fused, ..Default::default() },
        )
        .unwrap();
        let (input2, pro) = if fused {
            (&b1.conv_out, Some(Prologue { state: &s1, saved: &b1.saved, relu: true }))
        } else {
            (b1.output.as_ref().unwrap(), None)
        };
        let b2 = dab::forward_train(
            input2,
            &w2,
            &ds,
            &mut s2,
            &DabOptions { geometry: g2, dsbn: opts, prologue: pro, materialize: true, ..Default::default() },
        )
        .unwrap();
        let gr2 = dab::backward_train(
            &dy,
            input2,
            &w2,
            &ds,
            &s2,
            b2.saved(),
            &DabOptions { geometry: g2, dsbn: opts, prologue: pro, materialize: true, ..Default::default() },
        )
        .unwrap();
        let gr1 = dab::backward_train(
            gr2.dx.as_ref().unwrap(),
            &x,
            &w1,
            &ds,
            &s1,
            b1.saved(),
            &DabOptions { geometry: g1, dsbn: opts, materialize: true, ..Default::default() },
        )
        .unwrap();
        [
            b2.output.as_ref().unwrap(),
            &s1.running_mean,
            &s2.running_var,
            &gr2.dweight,
            &gr2.dgamma,
            &gr1.dweight,
            gr1.dx.as_ref().unwrap(),
            &gr1.dbeta,
        ]
        .iter()
        .map(|t| bits(t))
        .collect()
    };
    assert!(run(true) == run(false), "{dtype}: prologue fusion changed the results");
}

/// The one-kernel inference path equals conv followed by the inference DSBN, bit for bit.
#[test]
fn inference_kernel_equals_conv_then_dsbn() {
    let dev = device();
    let (n, h, w, c, k) = (5, 7, 8, 6, 10);
    let mut g = Rng(8);
    let mut v = |len: usize, lo: f64, hi: f64| -> Vec<f64> { (0..len).map(|_| g.uniform(lo, hi)).collect() };
    let x = tensor(&dev, &[n, h, w, c], &v(n * h * w * c, -1.0, 1.0), DType::F32);
    let wt = tensor(&dev, &[k, 3, 3, c], &v(k * 9 * c, -1.0, 1.0), DType::F32);
    let ds = Tensor::from_slice(&dev, &[n], &[1i32, 0, 1, 1, 0]).unwrap();
    let mut st = DsbnState::new(&dev, 2, k).unwrap();
    st.running_mean = tensor(&dev, &[2, k], &v(2 * k, -0.5, 0.5), DType::F32);
    st.running_var = tensor(&dev, &[2, k], &v(2 * k, 0.5, 2.0), DType::F32);
    st.gamma = tensor(&dev, &[2, k], &v(2 * k, 0.5, 1.5), DType::F32);
    let geom = ConvGeometry::square(1, 1, 1);
    for relu in [false, true] {
        let opts = DsbnOptions { relu, ..DsbnOptions::default() };
        let fused =
            dab::forward_infer(&x, &wt, &ds, &st, &DabOptions { geometry: geom, dsbn: opts, ..Default::default() })
                .unwrap();
        let conv = cdcl::ops::conv::conv2d(&x, &wt, None, &geom).unwrap();
        let unfused = dsbn::forward_infer(&conv, &ds, &st, &opts).unwrap();
        assert!(bits(&fused) == bits(&unfused), "relu {relu}");
        // With a residual: y + r before the ReLU.
        let r = tensor(&dev, &[n, h, w, k], &v(n * h * w * k, -1.0, 1.0), DType::F32);
        let with_r = host(
            &dab::forward_infer(
                &x,
                &wt,
                &ds,
                &st,
                &DabOptions { geometry: geom, dsbn: opts, residual: Some(&r), ..Default::default() },
            )
            .unwrap(),
        );
        let no_relu = host(&dsbn::forward_infer(&conv, &ds, &st, &DsbnOptions { relu: false, ..opts }).unwrap());
        let want: Vec<f64> =
            no_relu.iter().zip(host(&r)).map(|(a, b)| if relu { (a + b).max(0.0) } else { a + b }).collect();
        close("inference with residual", &with_r, &want).unwrap();
    }
    let bad = Tensor::from_slice(&dev, &[n], &[1i32, 0, 2, 1, 0]).unwrap();
    assert_eq!(
        dab::forward_infer(
            &x,
            &wt,
            &bad,
            &st,
            &DabOptions { geometry: geom, dsbn: DsbnOptions::default(), ..Default::default() }
        )
        .unwrap_err(),
        Error::DatasetIndexOutOfRange { sample: 2, index: 2, num_datasets: 2 }
    );
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    let k = Case {
        n: 4,
        h: 12,
        w: 10,
        c: 6,
        k: 9,
        r: 3,
        geom: ConvGeometry::square(1, 1, 1),
        d: 3,
        datasets: vec![2, 0, 2, 1],
        relu: true,
        residual: true,
        seed: 4,
    };
    let one = |seed: u64, threads: u32| -> Vec<Vec<u8>> {
        let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
        let dt = data(&k);
        let x = tensor(&dev, &[k.n, k.h, k.w, k.c], &dt.x, DType::F32);
        let w = tensor(&dev, &[k.k, 3, 3, k.c], &dt.w, DType::F32);
        let r = tensor(&dev, &[k.n, k.h, k.w, k.k], &dt.res, DType::F32);
        let dy = tensor(&dev, &[k.n, k.h, k.w, k.k], &dt.dy, DType::F32);
        let ds = Tensor::from_slice(&dev, &[k.n], &[2i32, 0, 2, 1]).unwrap();
        let mut st = state(&dev, &k, &dt);
        let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
        let f = dab::forward_train(
            &x,
            &w,
            &ds,
            &mut st,
            &DabOptions { geometry: k.geom, dsbn: opts, residual: Some(&r), materialize: true, ..Default::default() },
        )
        .unwrap();
        let g = dab::backward_train(
            &dy,
            &x,
            &w,
            &ds,
            &st,
            f.saved(),
            &DabOptions { geometry: k.geom, dsbn: opts, residual: Some(&r), materialize: true, ..Default::default() },
        )
        .unwrap();
        [
            &f.conv_out,
            f.output.as_ref().unwrap(),
            &st.running_var,
            g.dx.as_ref().unwrap(),
            &g.dweight,
            &g.dgamma,
            g.dresidual.as_ref().unwrap(),
        ]
        .iter()
        .map(|t| bits(t))
        .collect()
    };
    let base = one(0, 1);
    for (seed, threads) in [(3, 2), (99, 0), (0xABC, 1)] {
        assert!(one(seed, threads) == base, "seed {seed} threads {threads}");
    }
    let _ = Array4::<f64>::zeros((1, 1, 1, 1));
}

/// Training forward in f16 / bf16 storage (the tensor-core convolution): the convolution output
/// against the f64 convolution of the same 16-bit inputs, within 2·u_T·max|ref| (f32
/// accumulation, ~2^-24 relative, plus one rounding to the storage type, u_T = 2^-11 for f16 and
/// 2^-8 for bf16); the statistics and the output against the f64 DSBN of the *stored*
/// convolution output (the epilogue rounds to T before its statistics, so they describe what is
/// stored): statistics within the f32 tolerance of `close`, the output within one more
/// rounding to T. The same bits on every emulator seed.
#[test]
fn dab_forward_in_16_bit_storage() {
    let k = Case {
        n: 4,
        h: 9,
        w: 7,
        c: 12,
        k: 20,
        r: 3,
        geom: ConvGeometry::square(1, 1, 1),
        d: 2,
        datasets: vec![1, 0, 1, 1],
        relu: true,
        residual: true,
        seed: 21,
    };
    let dt = data(&k);
    let (p, q) = out_hw(&k);
    for dtype in [DType::F16, DType::BF16] {
        let u = common::unit_roundoff(dtype);
        let (xq, wq, rq) =
            (common::quantize(&dt.x, dtype), common::quantize(&dt.w, dtype), common::quantize(&dt.res, dtype));
        let one = |seed: u64, threads: u32| {
            let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
            let x = tensor(&dev, &[k.n, k.h, k.w, k.c], &xq, dtype);
            let w = tensor(&dev, &[k.k, 3, 3, k.c], &wq, dtype);
            let r = tensor(&dev, &[k.n, p, q, k.k], &rq, dtype);
            let ds = Tensor::from_slice(&dev, &[k.n], &[1i32, 0, 1, 1]).unwrap();
            let mut st = state(&dev, &k, &dt);
            let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
            let f = dab::forward_train(
                &x,
                &w,
                &ds,
                &mut st,
                &DabOptions {
                    geometry: k.geom,
                    dsbn: opts,
                    residual: Some(&r),
                    materialize: true,
                    ..Default::default()
                },
            )
            .unwrap();
            (f, st)
        };
        let (f, st) = one(0, 1);
        assert_eq!(f.conv_out.dtype(), dtype);
        let conv = rconv::conv2d(
            ArrayView4::from_shape((k.n, k.h, k.w, k.c), &xq).unwrap(),
            ArrayView4::from_shape((k.k, 3, 3, k.c), &wq).unwrap(),
            None,
            &spec(&k),
        );
        let max_conv = conv.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        common::assert_close(&format!("{dtype} conv_out"), &host(&f.conv_out), conv.as_slice().unwrap(), |_| {
            2.0 * u * max_conv
        })
        .unwrap();
        let stored = host(&f.conv_out);
        let a2 = |v: &[f64]| ArrayView2::from_shape((k.d, k.k), v).unwrap().to_owned();
        let (ones, zeros) = (vec![1.0; k.d * k.k], vec![0.0; k.d * k.k]);
        let cfg = rdsbn::DsbnConfig { relu: false, ..rdsbn::DsbnConfig::default() };
        let bn = rdsbn::dsbn_forward_train(
            ArrayView4::from_shape((k.n, p, q, k.k), &stored).unwrap(),
            &k.datasets,
            a2(&dt.gamma).view(),
            a2(&dt.beta).view(),
            a2(&zeros).view(),
            a2(&ones).view(),
            &cfg,
        )
        .unwrap();
        close("running_mean", &host(&st.running_mean), bn.running_mean.as_slice().unwrap()).unwrap();
        close("running_var", &host(&st.running_var), bn.running_var.as_slice().unwrap()).unwrap();
        let out: Vec<f64> = bn.y.iter().zip(&rq).map(|(y, r)| (y + r).max(0.0)).collect();
        let max_out = out.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        common::assert_close(&format!("{dtype} output"), &host(f.output.as_ref().unwrap()), &out, |i| {
            u * out[i].abs() + 2e-4 * max_out
        })
        .unwrap();
        let bits_of = |f: &dab::DabForward, st: &DsbnState| {
            [&f.conv_out, f.output.as_ref().unwrap(), &st.running_mean, &st.running_var]
                .iter()
                .map(|t| bits(t))
                .collect::<Vec<_>>()
        };
        let base = bits_of(&f, &st);
        for (seed, threads) in [(5, 2), (0xBEEF, 1)] {
            let (f2, st2) = one(seed, threads);
            assert!(bits_of(&f2, &st2) == base, "{dtype}: seed {seed} threads {threads} changed the bits");
        }
    }
}

/// Training backward with f16 / bf16 activations, weights and output gradient: the values
/// against the f64 references as `run16` checks them, the output types (16-bit dx and dweight,
/// f32 dγ), the DAB backward as the composition of the public DSBN and convolution backwards,
/// bit for bit, and the same bits on every emulator seed.
#[test]
fn dab_backward_in_16_bit_storage() {
    let k = Case {
        n: 4,
        h: 9,
        w: 7,
        c: 12,
        k: 20,
        r: 3,
        geom: ConvGeometry::square(1, 2, 2),
        d: 3,
        datasets: vec![1, 0, 1, 1],
        relu: true,
        residual: true,
        seed: 22,
    };
    let dt = data(&k);
    let (p, q) = out_hw(&k);
    let ds_i32: Vec<i32> = k.datasets.iter().map(|&d| d as i32).collect();
    for dtype in [DType::F16, DType::BF16] {
        run16(&k, &device(), dtype).unwrap();
        let q16 = |v: &[f64]| common::quantize(v, dtype);
        let (xq, wq, rq, dyq) = (q16(&dt.x), q16(&dt.w), q16(&dt.res), q16(&dt.dy));
        let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
        let one = |seed: u64, threads: u32| {
            let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
            let x = tensor(&dev, &[k.n, k.h, k.w, k.c], &xq, dtype);
            let w = tensor(&dev, &[k.k, 3, 3, k.c], &wq, dtype);
            let r = tensor(&dev, &[k.n, p, q, k.k], &rq, dtype);
            let dy = tensor(&dev, &[k.n, p, q, k.k], &dyq, dtype);
            let ds = Tensor::from_slice(&dev, &[k.n], &ds_i32).unwrap();
            let mut st = state(&dev, &k, &dt);
            let f = dab::forward_train(
                &x,
                &w,
                &ds,
                &mut st,
                &DabOptions {
                    geometry: k.geom,
                    dsbn: opts,
                    residual: Some(&r),
                    materialize: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let g = dab::backward_train(
                &dy,
                &x,
                &w,
                &ds,
                &st,
                f.saved(),
                &DabOptions {
                    geometry: k.geom,
                    dsbn: opts,
                    residual: Some(&r),
                    materialize: true,
                    ..Default::default()
                },
            )
            .unwrap();
            // The same chain through the public ops.
            let bn = dsbn::backward_train_residual(&dy, &f.conv_out, Some(&r), &ds, &st, &f.saved, &opts).unwrap();
            let dx = cdcl::ops::conv::conv2d_backward_data(&bn.dx, &w, (k.h, k.w), &k.geom).unwrap();
            let fg = cdcl::ops::conv::conv2d_backward_filter(&bn.dx, &x, (k.k, 3, 3), false, &k.geom).unwrap();
            assert!(
                bits(&dx) == bits(g.dx.as_ref().unwrap()) && bits(&fg.dweight) == bits(&g.dweight),
                "{dtype}: not the composition"
            );
            g
        };
        let g = one(0, 1);
        assert_eq!((g.dx.as_ref().unwrap().dtype(), g.dweight.dtype(), g.dgamma.dtype()), (dtype, dtype, DType::F32));
        let all = |g: &dab::DabGrads| {
            [g.dx.as_ref().unwrap(), &g.dweight, &g.dgamma, &g.dbeta, g.dresidual.as_ref().unwrap()].map(bits).to_vec()
        };
        let base = all(&g);
        for (seed, threads) in [(7, 2), (0xC0DE, 1)] {
            assert!(all(&one(seed, threads)) == base, "{dtype}: seed {seed} threads {threads} changed the bits");
        }
    }
}

/// The whole DAB in f16 / bf16 storage on one case against the f64 references of the same
/// (rounded) inputs: training forward (convolution output, running statistics, output),
/// every backward output, and the one-kernel inference forward. Tolerances:
/// - convolution output: exact 16-bit products, f32 accumulation (gamma_D·sum|a·b|), one
///   rounding to T (u_T·|y|), as tests/conv.rs;
/// - statistics and output: against the f64 DSBN of the *stored* convolution output (the
///   epilogue rounds before its statistics), the output within one more rounding to T;
/// - backward: as `dab_backward_in_16_bit_storage`, (2·u_T + 1e-4) times the magnitude bound;
/// - inference: the f32 accumulator goes through the epilogue unrounded, so the error is
///   |γ|/σ times the convolution's f32 error, a few f32 roundings of the epilogue's terms, and
///   one rounding of the result to T.
fn run16(k: &Case, dev: &Device, dtype: DType) -> Result<(), String> {
    // gamma_D of the f32 accumulation (tests/conv.rs), with slack for the reduction's tail.
    let gamma = |d: usize| {
        let du = (d as f64 + 2.0) * 2f64.powi(-24);
        du / (1.0 - du)
    };
    let dt = data(k);
    let (p, q) = out_hw(k);
    let (xd, wd, yd) = ((k.n, k.h, k.w, k.c), (k.k, k.r, k.r, k.c), (k.n, p, q, k.k));
    let u = common::unit_roundoff(dtype);
    let q16 = |v: &[f64]| common::quantize(v, dtype);
    let (xq, wq, rq, dyq) = (q16(&dt.x), q16(&dt.w), q16(&dt.res), q16(&dt.dy));
    let x = tensor(dev, &[k.n, k.h, k.w, k.c], &xq, dtype);
    let w = tensor(dev, &[k.k, k.r, k.r, k.c], &wq, dtype);
    let res = tensor(dev, &[k.n, p, q, k.k], &rq, dtype);
    let dy = tensor(dev, &[k.n, p, q, k.k], &dyq, dtype);
    let ds: Vec<i32> = k.datasets.iter().map(|&d| d as i32).collect();
    let ds = Tensor::from_slice(dev, &[k.n], &ds).unwrap();
    let mut st = state(dev, k, &dt);
    let opts = DsbnOptions { relu: k.relu, ..DsbnOptions::default() };
    let residual = k.residual.then_some(&res);
    let rq_used: Vec<f64> = if k.residual { rq.clone() } else { vec![0.0; rq.len()] };
    let a2 = |v: &[f64]| ArrayView2::from_shape((k.d, k.k), v).unwrap().to_owned();
    let (ones, zeros) = (vec![1.0; k.d * k.k], vec![0.0; k.d * k.k]);
    let cfg = rdsbn::DsbnConfig { relu: false, ..rdsbn::DsbnConfig::default() };
    let bn_ref = |conv: ArrayView4<f64>| {
        rdsbn::dsbn_forward_train(
            conv,
            &k.datasets,
            a2(&dt.gamma).view(),
            a2(&dt.beta).view(),
            a2(&zeros).view(),
            a2(&ones).view(),
            &cfg,
        )
    };
    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let conv = rconv::conv2d(
        ArrayView4::from_shape(xd, &xq).unwrap(),
        ArrayView4::from_shape(wd, &wq).unwrap(),
        None,
        &spec(k),
    );
    let (ax, aw) = (abs(&xq), abs(&wq));
    let mag = rconv::conv2d(
        ArrayView4::from_shape(xd, &ax).unwrap(),
        ArrayView4::from_shape(wd, &aw).unwrap(),
        None,
        &spec(k),
    );
    let (conv, mag) = (conv.as_slice().unwrap().to_vec(), mag.as_slice().unwrap().to_vec());
    let depth = k.r * k.r * k.c;

    let fwd = dab::forward_train(
        &x,
        &w,
        &ds,
        &mut st,
        &DabOptions { geometry: k.geom, dsbn: opts, residual, materialize: true, ..Default::default() },
    );
    if let Err(rdsbn::ReferenceError::TooFewValues { .. }) = bn_ref(ArrayView4::from_shape(yd, &conv).unwrap()) {
        return match fwd {
            Err(Error::TooFewValues { .. }) => Ok(()),
            other => Err(format!("expected TooFewValues, got {other:?}")),
        };
    }
    let f = fwd.map_err(|e| e.to_string())?;
    let stored = host(&f.conv_out);
    common::assert_close(&format!("{dtype} conv_out"), &stored, &conv, |i| {
        let acc = gamma(depth) * mag[i];
        u * (conv[i].abs() + acc) + acc + 2f64.powi(-25)
    })?;
    let bn = bn_ref(ArrayView4::from_shape(yd, &stored).unwrap()).map_err(|e| e.to_string())?;
    close("running_mean", &host(&st.running_mean), bn.running_mean.as_slice().unwrap())?;
    close("running_var", &host(&st.running_var), bn.running_var.as_slice().unwrap())?;
    let pre: Vec<f64> = bn.y.iter().zip(&rq_used).map(|(y, r)| y + r).collect();
    let want: Vec<f64> = pre.iter().map(|&v| if k.relu { v.max(0.0) } else { v }).collect();
    let max_out = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let out = host(f.output.as_ref().unwrap());
    common::assert_close(&format!("{dtype} output"), &out, &want, |i| u * want[i].abs() + 2e-4 * max_out + 1e-30)?;

    // The kernel's ReLU mask (its own output's sign) agrees with the reference wherever the
    // pre-activation is not too close to 0 for the two to decide differently.
    if k.relu {
        for (i, (&o, &v)) in out.iter().zip(&pre).enumerate() {
            if (o > 0.0) != (v > 0.0) && v.abs() >= 4.0 * u * (1.0 + v.abs()) + 1e-3 {
                return Err(format!("{dtype}: ReLU mask at {i}: kernel {o}, reference pre-activation {v}"));
            }
        }
    }
    // Backward, with the ReLU mask the kernel took (its own output's sign).
    let grads = dab::backward_train(
        &dy,
        &x,
        &w,
        &ds,
        &st,
        f.saved(),
        &DabOptions { geometry: k.geom, dsbn: opts, residual, materialize: true, ..Default::default() },
    )
    .map_err(|e| e.to_string())?;
    let gm: Vec<f64> = dyq.iter().zip(&out).map(|(&g, &o)| if !k.relu || o > 0.0 { g } else { 0.0 }).collect();
    let stored4 = ArrayView4::from_shape(yd, &stored).unwrap();
    let rb = rdsbn::dsbn_backward_train(
        ArrayView4::from_shape(yd, &gm).unwrap(),
        stored4,
        &k.datasets,
        a2(&dt.gamma).view(),
        a2(&dt.beta).view(),
        &cfg,
    )
    .map_err(|e| e.to_string())?;
    close("dgamma", &host(&grads.dgamma), rb.dgamma.as_slice().unwrap())?;
    close("dbeta", &host(&grads.dbeta), rb.dbeta.as_slice().unwrap())?;
    let rc = rconv::conv2d_backward(
        rb.dx.view(),
        ArrayView4::from_shape(xd, &xq).unwrap(),
        ArrayView4::from_shape(wd, &wq).unwrap(),
        &spec(k),
    );
    let bmag = backward_magnitude(k, &gm, &stored, &bn, &dt.gamma, &xq, &wq);
    let cd = |e: usize| (e % k.k, k.datasets[e / (p * q * k.k)]);
    let tol = 2.0 * u + 1e-4;
    let (dwm, dxm) = (bmag.dw.as_slice().unwrap(), bmag.dx.as_slice().unwrap());
    common::assert_close(&format!("{dtype} dweight"), &host(&grads.dweight), rc.dw.as_slice().unwrap(), |i| {
        tol * dwm[i] + 1e-30
    })?;
    common::assert_close(&format!("{dtype} dx"), &host(grads.dx.as_ref().unwrap()), rc.dx.as_slice().unwrap(), |i| {
        tol * dxm[i] + 1e-30
    })?;
    match (&grads.dresidual, k.residual) {
        (Some(dr), true) => common::assert_close(&format!("{dtype} dresidual"), &host(dr), &gm, |_| 0.0)?,
        (None, false) => {}
        _ => return Err("dresidual presence does not follow the residual".into()),
    }

    // Inference with the running statistics the training forward left.
    let inf = dab::forward_infer(
        &x,
        &w,
        &ds,
        &st,
        &DabOptions { geometry: k.geom, dsbn: opts, residual, ..Default::default() },
    )
    .map_err(|e| e.to_string())?;
    let (rm, rv) = (host(&st.running_mean), host(&st.running_var));
    let eps = f64::from(opts.eps);
    let mut want = vec![0.0; conv.len()];
    let mut tols = vec![0.0; conv.len()];
    for e in 0..conv.len() {
        let (c, d) = cd(e);
        let s = dt.gamma[d * k.k + c] / (rv[d * k.k + c] + eps).sqrt();
        let v = s * (conv[e] - rm[d * k.k + c]) + dt.beta[d * k.k + c] + rq_used[e];
        want[e] = if k.relu { v.max(0.0) } else { v };
        let terms = s.abs() * (conv[e].abs() + rm[d * k.k + c].abs()) + dt.beta[d * k.k + c].abs() + rq_used[e].abs();
        tols[e] = s.abs() * gamma(depth) * mag[e] + 2f64.powi(-20) * terms + u * want[e].abs() + 2f64.powi(-25);
    }
    common::assert_close(&format!("{dtype} inference"), &host(&inf), &want, |i| tols[i])?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn dab_f16_matches_reference(k in strategy()) {
        run16(&k, &device(), DType::F16).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn dab_bf16_matches_reference(k in strategy()) {
        run16(&k, &device(), DType::BF16).map_err(TestCaseError::fail)?;
    }
}
