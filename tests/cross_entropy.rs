//! Multi-head cross-entropy through the emulator against the f64 reference
//! (`cdcl::reference::cross_entropy`): heads of 2..=40 classes that differ per dataset, padding
//! channels filled with NaN (a kernel that reads them into the loss fails), mixed-dataset
//! batches, random ignore masks up to "every label ignored", u8 and i32 labels, f32/f16/bf16
//! storage; invalid labels (typed error naming the first one, dlogits untouched); parity with
//! the two-step definition; bitwise determinism across emulator seeds.
//!
//! Tolerances. Per pixel the kernel computes lse = m + log(s) with an online sum of at most 40
//! exponentials in f32: |error of s| <= ~(40 + 2)·u·s with u = 2^-24, so log(s) is off by
//! <= ~2.5e-6 absolute, and m + log(s) - x[label] adds ~2u·(|m| + |x|) with |x| <= ~25 here:
//! ~3e-6 per pixel. The loss sum runs in f32 over a fixed tree (5 shuffle levels, 8 warps, then
//! chunks strided over 256 threads and an 8-level tree): a relative error of at most
//! ~(5 + 8 + 8 + K/256 + 1)·u of a sum of non-negative terms, < 2e-6 here. So Loss_d is within
//! ~5e-6·(1 + Loss_d) of the f64 value; we allow 5e-5·(1 + |Loss|), a 10x margin, and the same
//! for the weighted total (weights <= 2). dlogits = (exp(x - lse) - onehot)·scale: the
//! probability inherits lse's absolute error as a relative one (<= ~5e-6), plus one rounding
//! of exp and of the product; we allow 5e-5·scale + 2·u_storage·|want| (f16/bf16 round the
//! stored gradient); f16 also flushes gradients below 2^-25 to 0 (one subnormal step). A kernel
//! that mixes up heads, datasets, valid counts or weights misses by orders of magnitude more:
//! one valid pixel more or less moves a dataset's scale by >= 1/2040 relative and its loss by
//! ~1e-3 for these data.

mod common;

use cdcl::ops::cross_entropy::{self, CrossEntropyOptions};
use cdcl::reference::cross_entropy as refce;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, host, quantize, tensor, unit_roundoff, Rng};
use ndarray::{ArrayView3, ArrayView4};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    heads: Vec<usize>,
    pad: usize,
    datasets: Vec<usize>,
    /// Probability that a label is 255.
    ignore: f64,
    /// Number of invalid labels planted (0 in most cases).
    invalid: usize,
    u8_labels: bool,
    weights: Option<Vec<f32>>,
    grad_scale: f32,
    seed: u64,
}

impl Case {
    fn cmax(&self) -> usize {
        self.heads.iter().copied().max().unwrap() + self.pad
    }
    fn shape(&self) -> [usize; 4] {
        [self.n, self.h, self.w, self.cmax()]
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=5,
        1usize..=20,
        1usize..=17,
        proptest::collection::vec(2usize..=40, 1..=3),
        0usize..=3,
        prop_oneof![Just(0.0), Just(0.2), Just(0.7), Just(1.0)],
        prop_oneof![4 => Just(0usize), 1 => 1usize..=3],
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_flat_map(|(n, h, w, heads, pad, ignore, invalid, u8_labels, weighted, seed)| {
            let d = heads.len();
            (proptest::collection::vec(0..d, n), proptest::collection::vec(0.0f32..2.0, d)).prop_map(
                move |(datasets, wts)| Case {
                    n,
                    h,
                    w,
                    heads: heads.clone(),
                    pad,
                    datasets,
                    ignore,
                    invalid,
                    u8_labels,
                    weights: weighted.then_some(wts),
                    grad_scale: if weighted { 0.37 } else { 1.0 },
                    seed,
                },
            )
        })
}

struct Data {
    /// Logits rounded to the storage type; padding channels are NaN.
    logits: Vec<f64>,
    labels: Vec<i64>,
}

fn make_data(k: &Case, dtype: DType) -> Data {
    let mut r = Rng(k.seed);
    let cmax = k.cmax();
    let hw = k.h * k.w;
    // Per (dataset, class) offsets so the heads differ; per-case spread up to 4.
    let spread = r.uniform(0.5, 4.0);
    let offsets: Vec<f64> = (0..k.heads.len() * cmax).map(|_| r.uniform(-3.0, 3.0)).collect();
    let mut logits = Vec::with_capacity(k.n * hw * cmax);
    let mut labels = Vec::with_capacity(k.n * hw);
    for n in 0..k.n {
        let d = k.datasets[n];
        let classes = k.heads[d];
        for _ in 0..hw {
            for c in 0..cmax {
                logits.push(if c < classes { offsets[d * cmax + c] + spread * r.normal() } else { f64::NAN });
            }
            labels.push(if r.uniform(0.0, 1.0) < k.ignore { refce::IGNORE_LABEL } else { r.below(classes) as i64 });
        }
    }
    for _ in 0..k.invalid {
        let pix = r.below(labels.len());
        let classes = k.heads[k.datasets[pix / hw]] as i64;
        let bad = match r.below(3) {
            0 => classes, // one past the head
            1 => 254,
            _ if k.u8_labels => 200,
            _ => -1 - r.below(1000) as i64,
        };
        labels[pix] = if bad == refce::IGNORE_LABEL { classes } else { bad };
    }
    Data { logits: quantize(&logits, dtype), labels }
}

fn label_tensor(dev: &Device, k: &Case, labels: &[i64]) -> Tensor {
    let shape = [k.n, k.h, k.w];
    if k.u8_labels {
        Tensor::from_slice(dev, &shape, &labels.iter().map(|&l| l as u8).collect::<Vec<_>>()).unwrap()
    } else {
        Tensor::from_slice(dev, &shape, &labels.iter().map(|&l| l as i32).collect::<Vec<_>>()).unwrap()
    }
}

fn dataset_tensor(dev: &Device, ds: &[usize]) -> Tensor {
    Tensor::from_slice(dev, &[ds.len()], &ds.iter().map(|&d| d as i32).collect::<Vec<_>>()).unwrap()
}

fn opts(k: &Case) -> CrossEntropyOptions {
    CrossEntropyOptions { weights: k.weights.clone(), grad_scale: k.grad_scale }
}

fn ref_weights(k: &Case) -> Vec<f64> {
    match &k.weights {
        Some(w) => w.iter().map(|&v| v as f64).collect(),
        None => vec![1.0; k.heads.len()],
    }
}

// Exact in f32, f16 and bf16.
const SENTINEL: f64 = -96.0;

fn check_case(k: &Case, dtype: DType, dev: &Device) -> Result<(), String> {
    let data = make_data(k, dtype);
    let shape = k.shape();
    let logits = tensor(dev, &shape, &data.logits, dtype);
    let labels = label_tensor(dev, k, &data.labels);
    let datasets = dataset_tensor(dev, &k.datasets);
    let sentinel = vec![SENTINEL; data.logits.len()];
    let mut dlogits = tensor(dev, &shape, &sentinel, dtype);
    let got = cross_entropy::forward_backward_into(&logits, &labels, &datasets, &k.heads, &opts(k), &mut dlogits);

    // The reference sees the logits as stored, padding included (it must not read it).
    let lv = ArrayView4::from_shape((k.n, k.h, k.w, k.cmax()), &data.logits[..]).unwrap();
    let yv = ArrayView3::from_shape((k.n, k.h, k.w), &data.labels[..]).unwrap();
    let w = ref_weights(k);
    let want = refce::multi_head_cross_entropy(lv, yv, &k.datasets, &k.heads, &w);
    let want = match want {
        Err(refce::LossReferenceError::InvalidLabel { dataset, label, position, num_classes }) => {
            let expected = Error::InvalidLabel { dataset, label, position, num_classes };
            return match got {
                Err(e) if e == expected => {
                    // Nothing written: dlogits keeps its sentinel in every element.
                    assert_close("dlogits after error", &host(&dlogits), &sentinel, |_| 0.0)?;
                    // The loss-only path reports the same error.
                    match cross_entropy::forward(&logits, &labels, &datasets, &k.heads, &opts(k)) {
                        Err(e2) if e2 == expected => Ok(()),
                        other => Err(format!("forward: expected {expected:?}, got {other:?}")),
                    }
                }
                other => Err(format!("expected {expected:?}, got {other:?}")),
            };
        }
        Err(e) => return Err(format!("reference failed: {e}")),
        Ok(v) => v,
    };
    let loss = got.map_err(|e| format!("kernel failed: {e}"))?;
    let tol = |v: f64| 5e-5 * (1.0 + v.abs());
    assert_close(
        "per-dataset loss",
        &loss.per_dataset.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &want.per_dataset,
        |i| tol(want.per_dataset[i]),
    )?;
    assert_close("total loss", &[loss.total as f64], &[want.total], |_| tol(want.total) * 2.0)?;
    // Datasets without valid pixels: exactly 0.
    for (d, &v) in want.valid.iter().enumerate() {
        if v == 0 && loss.per_dataset[d] != 0.0 {
            return Err(format!("dataset {d} has no valid pixel but loss {}", loss.per_dataset[d]));
        }
    }

    let wg = refce::multi_head_cross_entropy_grad(lv, yv, &k.datasets, &k.heads, &w, k.grad_scale as f64)
        .map_err(|e| e.to_string())?;
    let wg: Vec<f64> = wg.iter().copied().collect();
    let got_g = host(&dlogits);
    let u = unit_roundoff(dtype);
    // f16 stores gradients below 2^-14 as subnormals with a spacing of 2^-24.
    let underflow = if dtype == DType::F16 { 2f64.powi(-24) } else { 0.0 };
    let hw = k.h * k.w;
    let cmax = k.cmax();
    assert_close("dlogits", &got_g, &wg, |e| {
        let d = k.datasets[e / (hw * cmax)];
        let valid = want.valid[d].max(1) as f64;
        let scale = (w[d] / valid * k.grad_scale as f64).abs();
        5e-5 * scale + 2.0 * u * wg[e].abs() + underflow
    })?;
    // Exact zeros where the reference has exact zeros (ignored pixels, padding, empty datasets);
    // a softmax that underflows to 0 only happens for logit gaps > ~87 in f32, not in these data.
    if let Some(e) = (0..wg.len()).find(|&e| wg[e] == 0.0 && got_g[e] != 0.0) {
        return Err(format!("dlogits element {e} should be exactly 0, got {}", got_g[e]));
    }
    Ok(())
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn loss_and_gradient_match_reference_f32(k in case_strategy()) {
        check_case(&k, DType::F32, &device()).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn loss_and_gradient_match_reference_half_types(k in case_strategy(), bf in any::<bool>()) {
        check_case(&k, if bf { DType::BF16 } else { DType::F16 }, &device()).map_err(TestCaseError::fail)?;
    }
}

fn fixed_case(datasets: Vec<usize>, ignore: f64, seed: u64) -> Case {
    Case {
        n: datasets.len(),
        h: 13,
        w: 23, // 299 pixels: two chunks per sample, the second partial
        heads: vec![19, 2, 40],
        pad: 2,
        datasets,
        ignore,
        invalid: 0,
        u8_labels: false,
        weights: Some(vec![1.0, 0.4, 1.5]),
        grad_scale: 1.0,
        seed,
    }
}

#[test]
fn every_label_ignored_gives_zero_loss_and_zero_gradient() {
    let dev = device();
    for dtype in [DType::F32, DType::F16] {
        let k = fixed_case(vec![0, 2, 1, 0], 1.0, 3);
        let data = make_data(&k, dtype);
        let logits = tensor(&dev, &k.shape(), &data.logits, dtype);
        let (loss, dlogits) = cross_entropy::forward_backward(
            &logits,
            &label_tensor(&dev, &k, &data.labels),
            &dataset_tensor(&dev, &k.datasets),
            &k.heads,
            &opts(&k),
        )
        .unwrap();
        assert_eq!(loss.total, 0.0);
        assert_eq!(loss.per_dataset, vec![0.0; 3]);
        assert!(host(&dlogits).iter().all(|&v| v == 0.0), "gradient must be exactly 0, no NaN");
        check_case(&k, dtype, &dev).unwrap();
    }
    // A dataset absent from the batch (dataset 1) next to present ones.
    check_case(&fixed_case(vec![0, 2, 2, 0], 0.2, 4), DType::F32, &dev).unwrap();
}

/// The two-step definition on the host in f64: split the batch by dataset, log-softmax over
/// each head, NLL averaged over the valid pixels of the split, weighted sum.
fn two_step(k: &Case, logits: &[f64], labels: &[i64], w: &[f64]) -> (f64, Vec<f64>) {
    let (hw, cmax) = (k.h * k.w, k.cmax());
    let mut per = Vec::new();
    for (d, &classes) in k.heads.iter().enumerate() {
        let samples: Vec<usize> = (0..k.n).filter(|&n| k.datasets[n] == d).collect();
        let mut nll = Vec::new();
        for &n in &samples {
            for p in 0..hw {
                let x = &logits[(n * hw + p) * cmax..(n * hw + p) * cmax + classes];
                let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let log_softmax: Vec<f64> =
                    x.iter().map(|v| v - max - x.iter().map(|u| (u - max).exp()).sum::<f64>().ln()).collect();
                let y = labels[n * hw + p];
                if y != 255 {
                    nll.push(-log_softmax[y as usize]);
                }
            }
        }
        per.push(if nll.is_empty() { 0.0 } else { nll.iter().sum::<f64>() / nll.len() as f64 });
    }
    (per.iter().zip(w).map(|(l, w)| l * w).sum(), per)
}

#[test]
fn parity_with_the_two_step_definition() {
    let dev = device();
    for (i, ds) in [vec![0, 1, 2, 0, 2], vec![2, 2], vec![1, 0, 0]].into_iter().enumerate() {
        let k = fixed_case(ds, 0.3, 10 + i as u64);
        let data = make_data(&k, DType::F32);
        let w = ref_weights(&k);
        let (total, per) = two_step(&k, &data.logits, &data.labels, &w);
        let lv = ArrayView4::from_shape((k.n, k.h, k.w, k.cmax()), &data.logits[..]).unwrap();
        let yv = ArrayView3::from_shape((k.n, k.h, k.w), &data.labels[..]).unwrap();
        let r = refce::multi_head_cross_entropy(lv, yv, &k.datasets, &k.heads, &w).unwrap();
        // Reference and two-step are both f64 with different summation orders.
        assert!((r.total - total).abs() <= 1e-12 * (1.0 + total.abs()), "reference {} vs two-step {total}", r.total);
        let loss = cross_entropy::forward(
            &tensor(&dev, &k.shape(), &data.logits, DType::F32),
            &label_tensor(&dev, &k, &data.labels),
            &dataset_tensor(&dev, &k.datasets),
            &k.heads,
            &opts(&k),
        )
        .unwrap();
        // Kernel (f32) vs two-step (f64): the tolerance of the module doc.
        assert_close("kernel total vs two-step", &[loss.total as f64], &[total], |_| 1e-4 * (1.0 + total)).unwrap();
        let got: Vec<f64> = loss.per_dataset.iter().map(|&v| v as f64).collect();
        assert_close("kernel per-dataset vs two-step", &got, &per, |d| 5e-5 * (1.0 + per[d])).unwrap();
    }
}

fn run_bits(seed: u64, threads: u32) -> (Vec<u8>, Vec<u32>) {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let k = fixed_case(vec![0, 2, 1, 2, 0, 0], 0.25, 77);
    let data = make_data(&k, DType::F32);
    let (loss, dlogits) = cross_entropy::forward_backward(
        &tensor(&dev, &k.shape(), &data.logits, DType::F32),
        &label_tensor(&dev, &k, &data.labels),
        &dataset_tensor(&dev, &k.datasets),
        &k.heads,
        &opts(&k),
    )
    .unwrap();
    let losses = std::iter::once(loss.total).chain(loss.per_dataset).map(f32::to_bits).collect();
    (common::bits(&dlogits), losses)
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    let base = run_bits(0, 1);
    for (seed, threads) in [(1, 2), (0xDEAD_BEEF, 0), (42, 1)] {
        assert!(run_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

#[test]
fn bad_inputs_are_typed_errors_and_write_nothing() {
    let dev = device();
    let k = fixed_case(vec![0, 1], 0.0, 5);
    let data = make_data(&k, DType::F32);
    let logits = tensor(&dev, &k.shape(), &data.logits, DType::F32);
    let labels = label_tensor(&dev, &k, &data.labels);
    let o = CrossEntropyOptions::default();
    let mut dlogits = tensor(&dev, &k.shape(), &vec![SENTINEL; data.logits.len()], DType::F32);

    // Dataset index out of range: the first bad sample.
    for (bad, first) in [([0i32, 3], 1usize), ([-1, 7], 0)] {
        let ds = Tensor::from_slice(&dev, &[2], &bad).unwrap();
        let err = cross_entropy::forward_backward_into(&logits, &labels, &ds, &k.heads, &o, &mut dlogits).unwrap_err();
        assert_eq!(err, Error::DatasetIndexOutOfRange { sample: first, index: bad[first] as i64, num_datasets: 3 });
        assert!(host(&dlogits).iter().all(|&v| v == SENTINEL));
    }
    let ds = dataset_tensor(&dev, &k.datasets);
    // Labels: the first invalid one in element order, for u8 and i32 labels.
    let mut bad_labels = data.labels.clone();
    let hw = k.h * k.w;
    bad_labels[hw + 7] = 2; // dataset 1 has 2 classes: label 2 is one past its head
    bad_labels[hw + 9] = 0;
    bad_labels[hw + 40] = 254;
    for u8_labels in [true, false] {
        let kk = Case { u8_labels, ..k.clone() };
        let lt = label_tensor(&dev, &kk, &bad_labels);
        let err = cross_entropy::forward_backward_into(&logits, &lt, &ds, &k.heads, &o, &mut dlogits).unwrap_err();
        assert_eq!(err, Error::InvalidLabel { dataset: 1, label: 2, position: hw + 7, num_classes: 2 });
        assert!(host(&dlogits).iter().all(|&v| v == SENTINEL));
    }
    let mut neg = data.labels.clone();
    neg[3] = -5;
    neg[hw + 1] = 300;
    let err = cross_entropy::forward(&logits, &label_tensor(&dev, &k, &neg), &ds, &k.heads, &o).unwrap_err();
    assert_eq!(err, Error::InvalidLabel { dataset: 0, label: -5, position: 3, num_classes: 19 });

    // Host-side validation.
    let too_many = [19, 2, 99];
    assert!(matches!(cross_entropy::forward(&logits, &labels, &ds, &too_many, &o), Err(Error::InvalidArgument(_))));
    assert!(matches!(cross_entropy::forward(&logits, &labels, &ds, &[], &o), Err(Error::InvalidArgument(_))));
    assert!(matches!(cross_entropy::forward(&logits, &labels, &ds, &[19, 0, 3], &o), Err(Error::InvalidArgument(_))));
    let wrong_w = CrossEntropyOptions { weights: Some(vec![1.0]), ..o.clone() };
    assert!(matches!(
        cross_entropy::forward(&logits, &labels, &ds, &k.heads, &wrong_w),
        Err(Error::InvalidArgument(_))
    ));
    let nan_scale = CrossEntropyOptions { grad_scale: f32::NAN, ..o.clone() };
    assert!(matches!(
        cross_entropy::forward(&logits, &labels, &ds, &k.heads, &nan_scale),
        Err(Error::InvalidArgument(_))
    ));
    let f_labels = Tensor::zeros(&dev, &[k.n, k.h, k.w], DType::F32).unwrap();
    assert!(matches!(
        cross_entropy::forward(&logits, &f_labels, &ds, &k.heads, &o),
        Err(Error::UnsupportedDType { .. })
    ));
    let short = Tensor::zeros(&dev, &[k.n, k.h, k.w + 1], DType::U8).unwrap();
    assert!(matches!(cross_entropy::forward(&logits, &short, &ds, &k.heads, &o), Err(Error::ShapeMismatch { .. })));
    let int_logits = Tensor::zeros(&dev, &k.shape(), DType::I32).unwrap();
    assert!(matches!(
        cross_entropy::forward(&int_logits, &labels, &ds, &k.heads, &o),
        Err(Error::UnsupportedDType { .. })
    ));
    let mut half_grad = Tensor::zeros(&dev, &k.shape(), DType::F16).unwrap();
    assert!(matches!(
        cross_entropy::forward_backward_into(&logits, &labels, &ds, &k.heads, &o, &mut half_grad),
        Err(Error::DTypeMismatch { .. })
    ));
    let other = device();
    let ds_other = dataset_tensor(&other, &k.datasets);
    assert!(matches!(
        cross_entropy::forward(&logits, &labels, &ds_other, &k.heads, &o),
        Err(Error::DeviceMismatch { .. })
    ));
}

// ---- fused bilinear upsampling of the logits -------------------------------------------------
//
// Logits [N, lh, lw, Cmax] (lh, lw 1..=9), labels [N, H, W] at any size (1..=20 x 1..=17:
// integer and non-integer ratios, 1x1 logit maps, labels smaller than the logits), both
// align_corners modes, against the reference composition resize -> multi-head CE (and the
// resize backward of its gradient).
//
// Tolerances: on top of the per-pixel errors above, each interpolated logit carries the error
// of the f32 resize, δ = u M (8 (In + 2) + 3) with M = max|logit| and In = max(lh, lw)
// (tests/pool.rs), which enters lse and x[label] once each: the losses get 4δ more. A
// low-resolution gradient is a sum of high-resolution terms w·g with g = (p - onehot)·scale_d,
// each off by at most (5e-5 + 2δ)·scale_d relative to the same bound as above, plus the f32
// summation of the gather (64u, generous for the <= (Out/In + 2)^2 terms): the tolerance is
// 2 (5e-5 + 2δ + 64u) · resize_backward(scale mask) + the storage rounding, plus the terms of
// taps whose exact weight is 0 but whose f32 weight is a few ulps (see check_up_case).

#[derive(Debug, Clone)]
struct UpCase {
    /// The labels' case: its h, w are the label resolution.
    base: Case,
    lh: usize,
    lw: usize,
    align_corners: bool,
}

impl UpCase {
    fn logit_shape(&self) -> [usize; 4] {
        [self.base.n, self.lh, self.lw, self.base.cmax()]
    }
}

fn up_strategy() -> impl Strategy<Value = UpCase> {
    (case_strategy(), 1usize..=9, 1usize..=9, any::<bool>()).prop_map(|(base, lh, lw, align_corners)| UpCase {
        base,
        lh,
        lw,
        align_corners,
    })
}

/// Low-resolution logits (NaN padding) and label-resolution labels.
fn make_up_data(k: &UpCase, dtype: DType) -> Data {
    let low = Case { h: k.lh, w: k.lw, invalid: 0, seed: k.base.seed ^ 0x5EED, ..k.base.clone() };
    Data { logits: make_data(&low, dtype).logits, labels: make_data(&k.base, dtype).labels }
}

fn check_up_case(k: &UpCase, dtype: DType, dev: &Device) -> Result<(), String> {
    let b = &k.base;
    let data = make_up_data(k, dtype);
    let shape = k.logit_shape();
    let logits = tensor(dev, &shape, &data.logits, dtype);
    let labels = label_tensor(dev, b, &data.labels);
    let datasets = dataset_tensor(dev, &b.datasets);
    let sentinel = vec![SENTINEL; data.logits.len()];
    let mut dlogits = tensor(dev, &shape, &sentinel, dtype);
    let got = cross_entropy::forward_backward_upsampled_into(
        &logits,
        &labels,
        &datasets,
        &b.heads,
        k.align_corners,
        &opts(b),
        &mut dlogits,
    );

    let lv = ArrayView4::from_shape(shape, &data.logits[..]).unwrap();
    let yv = ArrayView3::from_shape((b.n, b.h, b.w), &data.labels[..]).unwrap();
    let w = ref_weights(b);
    let want = refce::multi_head_cross_entropy_upsampled(lv, yv, &b.datasets, &b.heads, &w, k.align_corners);
    let want = match want {
        Err(refce::LossReferenceError::InvalidLabel { dataset, label, position, num_classes }) => {
            let expected = Error::InvalidLabel { dataset, label, position, num_classes };
            return match got {
                Err(e) if e == expected => {
                    assert_close("dlogits after error", &host(&dlogits), &sentinel, |_| 0.0)?;
                    match cross_entropy::forward_upsampled(
                        &logits,
                        &labels,
                        &datasets,
                        &b.heads,
                        k.align_corners,
                        &opts(b),
                    ) {
                        Err(e2) if e2 == expected => Ok(()),
                        other => Err(format!("forward_upsampled: expected {expected:?}, got {other:?}")),
                    }
                }
                other => Err(format!("expected {expected:?}, got {other:?}")),
            };
        }
        Err(e) => return Err(format!("reference failed: {e}")),
        Ok(v) => v,
    };
    let loss = got.map_err(|e| format!("kernel failed: {e}"))?;
    let u = f32::EPSILON as f64 / 2.0;
    let m = data.logits.iter().filter(|v| !v.is_nan()).fold(0.0f64, |a, v| a.max(v.abs()));
    let delta = u * m * (8.0 * (k.lh.max(k.lw) + 2) as f64 + 3.0);
    let tol = |v: f64| 5e-5 * (1.0 + v.abs()) + 4.0 * delta;
    assert_close(
        "per-dataset loss",
        &loss.per_dataset.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &want.per_dataset,
        |i| tol(want.per_dataset[i]),
    )?;
    assert_close("total loss", &[loss.total as f64], &[want.total], |_| tol(want.total) * 2.0)?;

    let wg = refce::multi_head_cross_entropy_upsampled_grad(
        lv,
        yv,
        &b.datasets,
        &b.heads,
        &w,
        b.grad_scale as f64,
        k.align_corners,
    )
    .map_err(|e| e.to_string())?;
    // The magnitude each low-resolution gradient gathers: scale_d at every valid label pixel
    // and class of its head, through the resize backward.
    let cmax = b.cmax();
    let mut mask = ndarray::Array4::<f64>::zeros((b.n, b.h, b.w, cmax));
    for ((n, y, x, c), v) in mask.indexed_iter_mut() {
        let d = b.datasets[n];
        let label = data.labels[(n * b.h + y) * b.w + x];
        if label != refce::IGNORE_LABEL && c < b.heads[d] {
            *v = (w[d] / want.valid[d].max(1) as f64 * b.grad_scale as f64).abs();
        }
    }
    let mag = cdcl::reference::pool::resize_bilinear_backward(mask.view(), k.lh, k.lw, k.align_corners);
    let (wg, mag): (Vec<f64>, Vec<f64>) = (wg.iter().copied().collect(), mag.iter().copied().collect());
    let got_g = host(&dlogits);
    let us = unit_roundoff(dtype);
    let underflow = if dtype == DType::F16 { 2f64.powi(-24) } else { 0.0 };
    // A tap whose exact weight is 0 (an integer source index) may get a weight of a few ulps in
    // f32, as in PyTorch: each of the <= kk candidate terms can add 2u (In + 2) scale.
    let scale_max = mask.iter().fold(0.0f64, |a, &v| a.max(v));
    let kk = ((b.h.div_ceil(k.lh) + 3) * (b.w.div_ceil(k.lw) + 3)) as f64;
    let floor = 2.0 * u * (k.lh.max(k.lw) + 2) as f64 * kk * scale_max;
    assert_close("dlogits", &got_g, &wg, |e| {
        2.0 * ((5e-5 + 2.0 * delta + 64.0 * u) * mag[e] + floor) + 2.0 * us * wg[e].abs() + underflow
    })?;
    // Exact zeros where no term is ever evaluated: padding channels and datasets without a
    // valid pixel.
    let lhw = k.lh * k.lw;
    let no_terms = |e: usize| {
        let d = b.datasets[e / (lhw * cmax)];
        e % cmax >= b.heads[d] || want.valid[d] == 0
    };
    if let Some(e) = (0..wg.len()).find(|&e| no_terms(e) && got_g[e] != 0.0) {
        return Err(format!("dlogits element {e} should be exactly 0, got {}", got_g[e]));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn upsampled_loss_and_gradient_match_reference_f32(k in up_strategy()) {
        check_up_case(&k, DType::F32, &device()).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn upsampled_loss_and_gradient_match_reference_half_types(k in up_strategy(), bf in any::<bool>()) {
        check_up_case(&k, if bf { DType::BF16 } else { DType::F16 }, &device()).map_err(TestCaseError::fail)?;
    }
}

fn up_case(lh: usize, lw: usize, h: usize, w: usize, align_corners: bool, seed: u64) -> UpCase {
    let base = Case { h, w, ..fixed_case(vec![0, 2, 1, 2], 0.2, seed) };
    UpCase { base, lh, lw, align_corners }
}

/// Shapes worth naming: 1x1 logits, PSPNet's factor 8, non-integer ratios both ways, the same
/// size (the identity), labels smaller than the logits, one row or column.
const UP_SHAPES: [(usize, usize, usize, usize); 7] =
    [(1, 1, 9, 6), (4, 3, 32, 24), (3, 5, 7, 13), (5, 7, 11, 8), (6, 6, 6, 6), (9, 8, 4, 3), (1, 7, 5, 19)];

#[test]
fn upsampled_named_shapes() {
    let dev = device();
    for (i, &(lh, lw, h, w)) in UP_SHAPES.iter().enumerate() {
        for align_corners in [false, true] {
            let k = up_case(lh, lw, h, w, align_corners, 30 + i as u64);
            check_up_case(&k, DType::F32, &dev)
                .unwrap_or_else(|e| panic!("{lh}x{lw} -> {h}x{w} ac {align_corners}: {e}"));
        }
    }
}

/// In f32, the fused op equals the unfused chain — resize the logits, the cross-entropy at the
/// label resolution, the resize backward of its gradient — bit for bit: same taps, same
/// interpolation, same per-pixel expression, same gather order.
#[test]
fn upsampled_equals_resize_then_loss_bitwise() {
    let dev = device();
    for (i, &(lh, lw, h, w)) in UP_SHAPES.iter().enumerate() {
        for align_corners in [false, true] {
            let k = up_case(lh, lw, h, w, align_corners, 50 + i as u64);
            let b = &k.base;
            let data = make_up_data(&k, DType::F32);
            let logits = tensor(&dev, &k.logit_shape(), &data.logits, DType::F32);
            let labels = label_tensor(&dev, b, &data.labels);
            let ds = dataset_tensor(&dev, &b.datasets);
            let (fused_loss, fused_g) =
                cross_entropy::forward_backward_upsampled(&logits, &labels, &ds, &b.heads, align_corners, &opts(b))
                    .unwrap();
            let up = cdcl::ops::pool::resize_bilinear(&logits, h, w, align_corners).unwrap();
            let (loss, g_high) = cross_entropy::forward_backward(&up, &labels, &ds, &b.heads, &opts(b)).unwrap();
            let g = cdcl::ops::pool::resize_bilinear_backward(&g_high, 0, &k.logit_shape(), align_corners).unwrap();
            let what = format!("{lh}x{lw} -> {h}x{w}, align_corners {align_corners}");
            assert_eq!(fused_loss.total.to_bits(), loss.total.to_bits(), "{what}: total loss");
            assert_eq!(
                fused_loss.per_dataset.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                loss.per_dataset.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{what}: per-dataset losses"
            );
            assert!(common::bits(&fused_g) == common::bits(&g), "{what}: dlogits differ");
            let fwd_only =
                cross_entropy::forward_upsampled(&logits, &labels, &ds, &b.heads, align_corners, &opts(b)).unwrap();
            assert_eq!(fwd_only.total.to_bits(), loss.total.to_bits(), "{what}: loss-only path");
        }
    }
}

fn run_up_bits(seed: u64, threads: u32) -> (Vec<u8>, Vec<u32>) {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let k = up_case(5, 7, 37, 51, false, 78);
    let b = &k.base;
    let data = make_up_data(&k, DType::F32);
    let (loss, dlogits) = cross_entropy::forward_backward_upsampled(
        &tensor(&dev, &k.logit_shape(), &data.logits, DType::F32),
        &label_tensor(&dev, b, &data.labels),
        &dataset_tensor(&dev, &b.datasets),
        &b.heads,
        k.align_corners,
        &opts(b),
    )
    .unwrap();
    let losses = std::iter::once(loss.total).chain(loss.per_dataset).map(f32::to_bits).collect();
    (common::bits(&dlogits), losses)
}

#[test]
fn upsampled_bitwise_identical_across_emulator_seeds() {
    let base = run_up_bits(0, 1);
    for (seed, threads) in [(1, 2), (0xFEED, 0), (42, 1)] {
        assert!(run_up_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

#[test]
fn upsampled_bad_inputs_are_typed_errors_and_write_nothing() {
    let dev = device();
    let k = up_case(3, 4, 13, 23, true, 5);
    let b = &k.base;
    let data = make_up_data(&k, DType::F32);
    let shape = k.logit_shape();
    let logits = tensor(&dev, &shape, &data.logits, DType::F32);
    let ds = dataset_tensor(&dev, &b.datasets);
    let o = CrossEntropyOptions::default();
    let mut dlogits = tensor(&dev, &shape, &vec![SENTINEL; data.logits.len()], DType::F32);
    let untouched = |t: &Tensor| host(t).iter().all(|&v| v == SENTINEL);

    // The first bad label in label-pixel order, for u8 and i32 labels.
    let hw = b.h * b.w;
    let mut bad = data.labels.clone();
    bad[2 * hw + 40] = 2; // sample 2 is dataset 1, 2 classes
    bad[2 * hw + 41] = 254;
    bad[3 * hw + 1] = 77;
    for u8_labels in [true, false] {
        let kk = Case { u8_labels, ..b.clone() };
        let lt = label_tensor(&dev, &kk, &bad);
        let err = cross_entropy::forward_backward_upsampled_into(&logits, &lt, &ds, &b.heads, true, &o, &mut dlogits)
            .unwrap_err();
        assert_eq!(err, Error::InvalidLabel { dataset: 1, label: 2, position: 2 * hw + 40, num_classes: 2 });
        assert!(untouched(&dlogits));
    }
    // A bad dataset index.
    let labels = label_tensor(&dev, b, &data.labels);
    let bad_ds = Tensor::from_slice(&dev, &[4], &[0i32, 2, 3, 1]).unwrap();
    let err =
        cross_entropy::forward_backward_upsampled_into(&logits, &labels, &bad_ds, &b.heads, false, &o, &mut dlogits)
            .unwrap_err();
    assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 2, index: 3, num_datasets: 3 });
    assert!(untouched(&dlogits));

    // Host-side: labels of another batch size or rank, dlogits at the label resolution.
    let l2 = Tensor::zeros(&dev, &[b.h, b.w], DType::U8).unwrap();
    assert!(matches!(
        cross_entropy::forward_upsampled(&logits, &l2, &ds, &b.heads, true, &o),
        Err(Error::InvalidShape { .. })
    ));
    let l3 = Tensor::zeros(&dev, &[b.n + 1, b.h, b.w], DType::U8).unwrap();
    assert!(matches!(
        cross_entropy::forward_upsampled(&logits, &l3, &ds, &b.heads, true, &o),
        Err(Error::InvalidShape { .. })
    ));
    let lf = Tensor::zeros(&dev, &[b.n, b.h, b.w], DType::F32).unwrap();
    assert!(matches!(
        cross_entropy::forward_upsampled(&logits, &lf, &ds, &b.heads, true, &o),
        Err(Error::UnsupportedDType { .. })
    ));
    let mut high = Tensor::zeros(&dev, &[b.n, b.h, b.w, b.cmax()], DType::F32).unwrap();
    assert!(matches!(
        cross_entropy::forward_backward_upsampled_into(&logits, &labels, &ds, &b.heads, true, &o, &mut high),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        cross_entropy::forward_upsampled(&logits, &labels, &ds, &[19, 2, 99], true, &o),
        Err(Error::InvalidArgument(_))
    ));
    // The plain op still wants labels at the logits' resolution.
    assert!(matches!(cross_entropy::forward(&logits, &labels, &ds, &b.heads, &o), Err(Error::ShapeMismatch { .. })));
}
