//! DSBN kernels through the emulator against the f64 reference (`cdcl::reference::dsbn`):
//! random shapes (odd sizes, channels that are not multiples of 8 or 32), random dataset mixes
//! (absent datasets, single-sample datasets), ReLU on and off, f32/f16/bf16 storage; typed
//! errors for bad input; bitwise determinism across emulator seeds.
//!
//! Tolerances. The kernels accumulate in f32 in a blocked order: a thread's Welford over at
//! most 32 values, Chan merges of 8 rows, then of the chunks in sample order. The classical
//! bound for such a sum of M terms is about (32 + 8 + M/256) * u * sum|terms| with u = 2^-24,
//! which for M <= 9 * 17 * 17 = 2601 is under 1e-6 * sum|terms|. The data are drawn with
//! |mean| / std <= 6, so the relative error of the mean and of 1/std stays below ~1e-5 and a
//! normalised output (|xhat| <= ~5) is off by at most ~1e-5 * (1 + |y|). Every tolerance below
//! keeps a 5-10x margin over these bounds; f16/bf16 add one rounding of the stored output
//! (relative u = 2^-11 / 2^-8). A kernel that mixes up datasets, channels or the variance
//! misses by orders of magnitude more.

mod common;

use cdcl::ops::dsbn::{self, DsbnOptions, DsbnState};
use cdcl::reference::dsbn as refd;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, host, quantize, tensor, unit_roundoff, Rng};
use ndarray::{Array2, Array4, ArrayView2, ArrayView4};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    d: usize,
    relu: bool,
    datasets: Vec<usize>,
    seed: u64,
}

fn case_strategy(max_c: usize) -> impl Strategy<Value = Case> {
    (1usize..=9, 1usize..=17, 1usize..=17, 1usize..=max_c, 1usize..=4, any::<bool>(), any::<u64>()).prop_flat_map(
        |(n, h, w, c, d, relu, seed)| {
            proptest::collection::vec(0..d, n).prop_map(move |datasets| Case { n, h, w, c, d, relu, datasets, seed })
        },
    )
}

/// Host data of one case, already rounded to the storage type (so the reference sees exactly
/// what the kernel reads).
struct Data {
    x: Vec<f64>,
    dy: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    rmean: Vec<f64>,
    rvar: Vec<f64>,
}

fn make_data(k: &Case, dtype: DType) -> Data {
    let mut r = Rng(k.seed);
    let dc = k.d * k.c;
    // Each dataset gets its own distribution per channel: |offset| <= 3, scale in [0.5, 2].
    let off: Vec<f64> = (0..dc).map(|_| r.uniform(-3.0, 3.0)).collect();
    let scale: Vec<f64> = (0..dc).map(|_| r.uniform(0.5, 2.0)).collect();
    let hw = k.h * k.w;
    let mut x = Vec::with_capacity(k.n * hw * k.c);
    for n in 0..k.n {
        for _ in 0..hw {
            for c in 0..k.c {
                let s = k.datasets[n] * k.c + c;
                x.push(off[s] + scale[s] * r.normal());
            }
        }
    }
    let dy: Vec<f64> = (0..x.len()).map(|_| r.normal()).collect();
    Data {
        x: quantize(&x, dtype),
        dy: quantize(&dy, dtype),
        gamma: quantize(&(0..dc).map(|_| r.uniform(0.5, 1.5)).collect::<Vec<_>>(), DType::F32),
        beta: quantize(&(0..dc).map(|_| r.uniform(-1.0, 1.0)).collect::<Vec<_>>(), DType::F32),
        rmean: quantize(&(0..dc).map(|_| r.uniform(-1.0, 1.0)).collect::<Vec<_>>(), DType::F32),
        rvar: quantize(&(0..dc).map(|_| r.uniform(0.5, 2.0)).collect::<Vec<_>>(), DType::F32),
    }
}

struct Inputs {
    x: Tensor,
    dy: Tensor,
    datasets: Tensor,
    state: DsbnState,
}

fn upload(dev: &Device, k: &Case, data: &Data, dtype: DType) -> Inputs {
    let shape = [k.n, k.h, k.w, k.c];
    let ds: Vec<i32> = k.datasets.iter().map(|&d| d as i32).collect();
    let t = |v: &[f64]| tensor(dev, &[k.d, k.c], v, DType::F32);
    Inputs {
        x: tensor(dev, &shape, &data.x, dtype),
        dy: tensor(dev, &shape, &data.dy, dtype),
        datasets: Tensor::from_slice(dev, &[k.n], &ds).unwrap(),
        state: DsbnState {
            gamma: t(&data.gamma),
            beta: t(&data.beta),
            running_mean: t(&data.rmean),
            running_var: t(&data.rvar),
        },
    }
}

fn view4<'a>(k: &Case, v: &'a [f64]) -> ArrayView4<'a, f64> {
    ArrayView4::from_shape((k.n, k.h, k.w, k.c), v).unwrap()
}
fn view2<'a>(k: &Case, v: &'a [f64]) -> ArrayView2<'a, f64> {
    ArrayView2::from_shape((k.d, k.c), v).unwrap()
}

fn opts(k: &Case) -> DsbnOptions {
    DsbnOptions { relu: k.relu, ..DsbnOptions::default() }
}
fn cfg(k: &Case) -> refd::DsbnConfig {
    refd::DsbnConfig { eps: 1e-5, momentum: 0.1, relu: k.relu }
}

/// Pre-activation values of the reference forward (before ReLU).
fn preactivation(k: &Case, data: &Data, mean: &Array2<f64>, invstd: &Array2<f64>) -> Vec<f64> {
    let hw = k.h * k.w;
    (0..data.x.len())
        .map(|e| {
            let c = e % k.c;
            let d = k.datasets[e / (hw * k.c)];
            (data.x[e] - mean[[d, c]]) * invstd[[d, c]] * data.gamma[d * k.c + c] + data.beta[d * k.c + c]
        })
        .collect()
}

/// With ReLU, an output within rounding of 0 may be masked differently by the kernel and the
/// f64 reference; zeroing dy there makes the mask irrelevant for those elements only.
fn zero_ambiguous(dy: &mut [f64], pre: &[f64], relu: bool) {
    if relu {
        for (g, &v) in dy.iter_mut().zip(pre) {
            if v.abs() < 1e-3 {
                *g = 0.0;
            }
        }
    }
}

fn check_training(k: &Case, dtype: DType, dev: &Device) -> Result<(), String> {
    let mut data = make_data(k, dtype);
    let reference = refd::dsbn_forward_train(
        view4(k, &data.x),
        &k.datasets,
        view2(k, &data.gamma),
        view2(k, &data.beta),
        view2(k, &data.rmean),
        view2(k, &data.rvar),
        &cfg(k),
    );
    let mut inp = upload(dev, k, &data, dtype);
    let result = dsbn::forward_train(&inp.x, &inp.datasets, &mut inp.state, &opts(k));
    let want = match reference {
        Err(refd::ReferenceError::TooFewValues { dataset, count }) => {
            return match result {
                Err(Error::TooFewValues { dataset: d2, count: c2 }) if d2 == dataset && c2 == count => {
                    // Nothing written: running statistics as they were.
                    assert_close("running_mean after error", &host(&inp.state.running_mean), &data.rmean, |_| 0.0)?;
                    assert_close("running_var after error", &host(&inp.state.running_var), &data.rvar, |_| 0.0)
                }
                other => Err(format!("expected TooFewValues {{ dataset: {dataset}, count: {count} }}, got {other:?}")),
            };
        }
        Err(e) => return Err(format!("reference failed: {e}")),
        Ok(w) => w,
    };
    let (y, saved) = result.map_err(|e| format!("kernel failed: {e}"))?;
    let u = unit_roundoff(dtype);
    let present: Vec<bool> = want.counts.iter().map(|&m| m > 0).collect();

    let wy: Vec<f64> = want.y.iter().copied().collect();
    assert_close("y", &host(&y), &wy, |i| 1e-4 * (1.0 + wy[i].abs()) + 2.0 * u * wy[i].abs())?;

    let (wmean, winv): (Vec<f64>, Vec<f64>) =
        (want.mean.iter().copied().collect(), want.invstd.iter().copied().collect());
    assert_close("saved mean", &host(&saved.mean), &wmean, |i| 1e-5 * (1.0 + wmean[i].abs()))?;
    assert_close("saved invstd", &host(&saved.invstd), &winv, |i| 1e-5 * winv[i])?;
    let wrm: Vec<f64> = want.running_mean.iter().copied().collect();
    let wrv: Vec<f64> = want.running_var.iter().copied().collect();
    // Absent datasets: running statistics bit for bit unchanged (tolerance 0).
    let absent_exact = |i: usize, t: f64| if present[i / k.c] { t } else { 0.0 };
    assert_close("running_mean", &host(&inp.state.running_mean), &wrm, |i| {
        absent_exact(i, 1e-5 * (1.0 + wrm[i].abs()))
    })?;
    assert_close("running_var", &host(&inp.state.running_var), &wrv, |i| absent_exact(i, 1e-5 * (1.0 + wrv[i].abs())))?;

    // Backward, with dy zeroed where the ReLU mask is ambiguous.
    let pre = preactivation(k, &data, &want.mean, &want.invstd);
    zero_ambiguous(&mut data.dy, &pre, k.relu);
    inp.dy = tensor(dev, &[k.n, k.h, k.w, k.c], &data.dy, dtype);
    let grads = dsbn::backward_train(&inp.dy, &inp.x, &inp.datasets, &inp.state, &saved, &opts(k))
        .map_err(|e| format!("kernel backward failed: {e}"))?;
    let wg = refd::dsbn_backward_train(
        view4(k, &data.dy),
        view4(k, &data.x),
        &k.datasets,
        view2(k, &data.gamma),
        view2(k, &data.beta),
        &cfg(k),
    )
    .map_err(|e| format!("reference backward failed: {e}"))?;
    check_grads(k, dtype, &data, &pre, &want.mean, &want.invstd, &want.counts, &grads, &wg, true)
}

/// Tolerances of the backward from the conditioning of each sum: S = sum |g| (1 + |xhat|) over
/// the (dataset, channel) group bounds the error of dbeta and dgamma; dx inherits it through
/// the 1/M terms, plus its own rounding of g.
#[allow(clippy::too_many_arguments)]
fn check_grads(
    k: &Case,
    dtype: DType,
    data: &Data,
    pre: &[f64],
    mean: &Array2<f64>,
    invstd: &Array2<f64>,
    counts: &[usize],
    got: &dsbn::DsbnGrads,
    want: &refd::DsbnGrads,
    training: bool,
) -> Result<(), String> {
    let hw = k.h * k.w;
    let mut s = vec![0.0f64; k.d * k.c];
    let g: Vec<f64> = (0..data.dy.len()).map(|e| if !k.relu || pre[e] > 0.0 { data.dy[e] } else { 0.0 }).collect();
    let xhat = |e: usize| {
        let (c, d) = (e % k.c, k.datasets[e / (hw * k.c)]);
        (data.x[e] - mean[[d, c]]) * invstd[[d, c]]
    };
    for (e, ge) in g.iter().enumerate() {
        let (c, d) = (e % k.c, k.datasets[e / (hw * k.c)]);
        s[d * k.c + c] += ge.abs() * (1.0 + xhat(e).abs());
    }
    let wdb: Vec<f64> = want.dbeta.iter().copied().collect();
    let wdg: Vec<f64> = want.dgamma.iter().copied().collect();
    // Absent datasets: exactly zero.
    assert_close("dbeta", &host(&got.dbeta), &wdb, |i| 1e-5 * s[i])?;
    assert_close("dgamma", &host(&got.dgamma), &wdg, |i| 1e-5 * s[i])?;
    let wdx: Vec<f64> = want.dx.iter().copied().collect();
    let u = unit_roundoff(dtype);
    assert_close("dx", &host(&got.dx), &wdx, |e| {
        let (c, d) = (e % k.c, k.datasets[e / (hw * k.c)]);
        let sidx = d * k.c + c;
        let scale = data.gamma[sidx].abs() * invstd[[d, c]];
        let group = if training { s[sidx] / counts[d] as f64 * (1.0 + xhat(e).abs()) } else { 0.0 };
        1e-4 * scale * (g[e].abs() + group) + 1e-7 + 2.0 * u * wdx[e].abs()
    })
}

fn check_inference(k: &Case, dtype: DType, dev: &Device) -> Result<(), String> {
    let mut data = make_data(k, dtype);
    let inp = upload(dev, k, &data, dtype);
    let y = dsbn::forward_infer(&inp.x, &inp.datasets, &inp.state, &opts(k)).map_err(|e| e.to_string())?;
    let want = refd::dsbn_forward_infer(
        view4(k, &data.x),
        &k.datasets,
        view2(k, &data.gamma),
        view2(k, &data.beta),
        view2(k, &data.rmean),
        view2(k, &data.rvar),
        &cfg(k),
    )
    .map_err(|e| e.to_string())?;
    let wy: Vec<f64> = want.iter().copied().collect();
    let u = unit_roundoff(dtype);
    // One pass, no reductions: a few roundings of f32 arithmetic.
    assert_close("inference y", &host(&y), &wy, |i| 1e-5 * (1.0 + wy[i].abs()) + 2.0 * u * wy[i].abs())?;

    let mean = Array2::from_shape_vec((k.d, k.c), data.rmean.clone()).unwrap();
    let invstd = mean.clone().into_shape_with_order((k.d, k.c)).unwrap().mapv(|_| 0.0)
        + Array2::from_shape_vec((k.d, k.c), data.rvar.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect()).unwrap();
    let pre = preactivation(k, &data, &mean, &invstd);
    zero_ambiguous(&mut data.dy, &pre, k.relu);
    let dy = tensor(dev, &[k.n, k.h, k.w, k.c], &data.dy, dtype);
    let grads = dsbn::backward_infer(&dy, &inp.x, &inp.datasets, &inp.state, &opts(k)).map_err(|e| e.to_string())?;
    let wg = refd::dsbn_backward_infer(
        view4(k, &data.dy),
        view4(k, &data.x),
        &k.datasets,
        view2(k, &data.gamma),
        view2(k, &data.beta),
        view2(k, &data.rmean),
        view2(k, &data.rvar),
        &cfg(k),
    )
    .map_err(|e| e.to_string())?;
    check_grads(k, dtype, &data, &pre, &mean, &invstd, &[], &grads, &wg, false)
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn training_matches_reference_f32(k in case_strategy(70)) {
        check_training(&k, DType::F32, &device()).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn inference_matches_reference_f32(k in case_strategy(70)) {
        check_inference(&k, DType::F32, &device()).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn training_matches_reference_f16(k in case_strategy(40)) {
        check_training(&k, DType::F16, &device()).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn training_matches_reference_bf16(k in case_strategy(40)) {
        check_training(&k, DType::BF16, &device()).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn inference_matches_reference_half_types(k in case_strategy(40), bf in any::<bool>()) {
        check_inference(&k, if bf { DType::BF16 } else { DType::F16 }, &device()).map_err(TestCaseError::fail)?;
    }
}

/// Fixed mixes the random ones might miss: every dataset absent but one, a single-sample
/// dataset beside a large one, a 1x1 input where a lone sample must be refused.
#[test]
fn named_dataset_mixes() {
    let dev = device();
    let mixes: &[(usize, usize, usize, usize, &[usize])] = &[
        (5, 3, 7, 33, &[2, 2, 2, 2, 2]),
        (6, 5, 5, 9, &[0, 0, 0, 0, 0, 3]),
        (4, 1, 1, 17, &[1, 1, 0, 0]),
        (3, 1, 1, 17, &[1, 1, 0]), // dataset 0 has a single value per channel: TooFewValues
        (1, 17, 17, 70, &[1]),
        (9, 2, 3, 1, &[0, 1, 2, 3, 0, 1, 2, 3, 0]),
    ];
    for (i, &(n, h, w, c, ds)) in mixes.iter().enumerate() {
        for relu in [false, true] {
            let k = Case { n, h, w, c, d: 4, relu, datasets: ds.to_vec(), seed: 1000 + i as u64 };
            check_training(&k, DType::F32, &dev).unwrap_or_else(|e| panic!("{k:?}: {e}"));
            check_inference(&k, DType::F32, &dev).unwrap_or_else(|e| panic!("{k:?}: {e}"));
        }
    }
}

fn run_all_bits(seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let k = Case { n: 7, h: 13, w: 11, c: 45, d: 3, relu: true, datasets: vec![0, 2, 2, 0, 0, 2, 0], seed: 7 };
    case_bits(&k, seed, threads)
}

fn case_bits(k: &Case, seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let k = k.clone();
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let data = make_data(&k, DType::F32);
    let mut inp = upload(&dev, &k, &data, DType::F32);
    let (y, saved) = dsbn::forward_train(&inp.x, &inp.datasets, &mut inp.state, &opts(&k)).unwrap();
    let g = dsbn::backward_train(&inp.dy, &inp.x, &inp.datasets, &inp.state, &saved, &opts(&k)).unwrap();
    let yi = dsbn::forward_infer(&inp.x, &inp.datasets, &inp.state, &opts(&k)).unwrap();
    [&y, &saved.mean, &saved.invstd, &inp.state.running_mean, &inp.state.running_var, &g.dx, &g.dgamma, &g.dbeta, &yi]
        .iter()
        .map(|t| common::bits(t))
        .collect()
}

#[test]
fn bitwise_identical_across_emulator_seeds_and_thread_counts() {
    let base = run_all_bits(0, 1);
    for (seed, threads) in [(1, 2), (0xDEAD_BEEF, 0), (42, 1)] {
        assert!(run_all_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

/// The finalize kernels reduce each (dataset, channel) with 16 lanes, each merging a fixed range
/// of the sample-ordered chunks, then a fixed pairwise tree. Here 9 samples of 40x40 pixels make
/// 63 chunks of 256 (the last of each sample partial), so every lane has several, a dataset's
/// samples are spread over many lanes' ranges and one dataset (3) is absent: the statistics,
/// the running statistics and the gradients match the reference and keep their bits for any
/// block order and thread count.
#[test]
fn the_finalize_tree_keeps_its_bits_for_any_block_order() {
    let k = Case { n: 9, h: 40, w: 40, c: 20, d: 4, relu: false, datasets: vec![1, 0, 2, 1, 1, 0, 2, 2, 1], seed: 11 };
    check_training(&k, DType::F32, &device()).unwrap();
    let base = case_bits(&k, 0, 1);
    for (seed, threads) in [(3, 2), (0xFEED, 0), (99, 1)] {
        assert!(case_bits(&k, seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

fn small_inputs(dev: &Device) -> (Tensor, Tensor, DsbnState) {
    let x = Tensor::from_slice(dev, &[2, 2, 2, 3], &(0..24).map(|i| i as f32 * 0.25).collect::<Vec<_>>()).unwrap();
    let ds = Tensor::from_slice(dev, &[2], &[0i32, 1]).unwrap();
    (x, ds, DsbnState::new(dev, 2, 3).unwrap())
}

#[test]
fn dataset_index_out_of_range_is_a_typed_error_and_nothing_is_written() {
    let dev = device();
    let (x, _, mut state) = small_inputs(&dev);
    for bad in [[0i32, 2], [-1, 0], [5, 7]] {
        let ds = Tensor::from_slice(&dev, &[2], &bad).unwrap();
        let first_bad = bad.iter().position(|&d| !(0..2).contains(&d)).unwrap();
        let err = dsbn::forward_train(&x, &ds, &mut state, &DsbnOptions::default()).unwrap_err();
        assert_eq!(
            err,
            Error::DatasetIndexOutOfRange { sample: first_bad, index: bad[first_bad] as i64, num_datasets: 2 }
        );
        assert_eq!(state.running_mean.to_vec::<f32>().unwrap(), vec![0.0; 6]);
        assert_eq!(state.running_var.to_vec::<f32>().unwrap(), vec![1.0; 6]);
        assert!(matches!(
            dsbn::forward_infer(&x, &ds, &state, &DsbnOptions::default()),
            Err(Error::DatasetIndexOutOfRange { .. })
        ));
        assert!(matches!(
            dsbn::backward_infer(&x, &x, &ds, &state, &DsbnOptions::default()),
            Err(Error::DatasetIndexOutOfRange { .. })
        ));
    }
}

#[test]
fn wrong_shapes_dtypes_and_options_are_typed_errors() {
    let dev = device();
    let (x, ds, mut state) = small_inputs(&dev);
    let o = DsbnOptions::default();
    let x3 = Tensor::zeros(&dev, &[2, 2, 6], DType::F32).unwrap();
    assert!(matches!(dsbn::forward_train(&x3, &ds, &mut state, &o), Err(Error::InvalidShape { .. })));
    let xi = Tensor::zeros(&dev, &[2, 2, 2, 3], DType::I32).unwrap();
    assert!(matches!(dsbn::forward_train(&xi, &ds, &mut state, &o), Err(Error::UnsupportedDType { .. })));
    let ds_f = Tensor::zeros(&dev, &[2], DType::F32).unwrap();
    assert!(matches!(dsbn::forward_train(&x, &ds_f, &mut state, &o), Err(Error::DTypeMismatch { .. })));
    let ds3 = Tensor::zeros(&dev, &[3], DType::I32).unwrap();
    assert!(matches!(dsbn::forward_train(&x, &ds3, &mut state, &o), Err(Error::ShapeMismatch { .. })));
    let mut wrong_c = DsbnState::new(&dev, 2, 4).unwrap();
    assert!(matches!(dsbn::forward_train(&x, &ds, &mut wrong_c, &o), Err(Error::ShapeMismatch { .. })));
    for bad in [DsbnOptions { eps: 0.0, ..o }, DsbnOptions { eps: f32::NAN, ..o }, DsbnOptions { momentum: 1.5, ..o }] {
        assert!(matches!(dsbn::forward_train(&x, &ds, &mut state, &bad), Err(Error::InvalidArgument(_))));
    }
    let zero = Tensor::zeros(&dev, &[0, 2, 2, 3], DType::F32).unwrap();
    assert!(matches!(dsbn::forward_infer(&zero, &ds, &state, &o), Err(Error::InvalidShape { .. })));
    let other = device();
    let ds_other = Tensor::from_slice(&other, &[2], &[0i32, 1]).unwrap();
    assert!(matches!(dsbn::forward_train(&x, &ds_other, &mut state, &o), Err(Error::DeviceMismatch { .. })));
    let (_, saved) = dsbn::forward_train(&x, &ds, &mut state, &o).unwrap();
    let dy16 = Tensor::zeros(&dev, &[2, 2, 2, 3], DType::F16).unwrap();
    assert!(matches!(dsbn::backward_train(&dy16, &x, &ds, &state, &saved, &o), Err(Error::DTypeMismatch { .. })));
}

#[test]
fn cuda_without_a_driver_is_a_typed_error() {
    match Device::cuda(0) {
        Ok(dev) => eprintln!("a GPU is present: {}", dev.name()),
        Err(e) => assert!(
            matches!(e, Error::CudaNotBuilt | Error::NoDriver | Error::NoDevice { .. }),
            "unexpected error without a GPU: {e:?}"
        ),
    }
    let _ = Array4::<f64>::zeros((1, 1, 1, 1)); // keep ndarray's 4-D type in scope for the helpers
}
