//! Precise BN: the recalibrated running statistics of a slice are the population statistics of
//! the set, computed here directly in f64 from every BN layer's inputs; nothing else changes.

use super::*;
use cdcl::backend::TensorLike;
use cdcl::train::{precise_bn, PreciseBnOptions};
use std::collections::BTreeMap;

/// Per BN layer name: every (channel-major) input value of slice-`slice` samples over `set`,
/// from training-mode forwards (what precise BN normalises with), in f64.
fn direct<B: Backend>(t: &mut Trainer<B>, set: &[Batch], slice: usize) -> BTreeMap<String, Vec<Vec<f64>>> {
    let be = t.backend().clone();
    let mut out: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    for b in set {
        let mut g = Graph::new(&be, true);
        let x = g.input(be.tensor_f32(&[b.n, b.h, b.w, 3], &b.images).unwrap());
        let ds = g.datasets(&vec![slice as i32; b.n]).unwrap();
        t.model.features(&mut g, &mut t.store, x, ds, 0).unwrap();
        for r in g.norm_records() {
            let c = *r.x.shape().last().unwrap();
            let v = be.to_f32(r.x).unwrap();
            let e = out.entry(t.store.bn(r.bn).name.clone()).or_insert_with(|| vec![Vec::new(); c]);
            for (i, &x) in v.iter().enumerate() {
                e[i % c].push(x as f64);
            }
        }
    }
    out
}

/// Recalibrates slice 1 of a tiny model on `set` and checks every layer against the direct f64
/// statistics and everything else against the snapshot before.
fn check_recalibration<B: Backend>(be: &B, set: &[Batch], images: usize) {
    let mut t = Trainer::new(be, tiny_model(vec![3, 4], 0.0), TrainConfig::default()).unwrap();
    // Trained a little, so that γ, β and the running statistics are not at their defaults.
    for it in 0..2 {
        t.step(&[batch(0, 2, 24, 24, 3, it), batch(1, 2, 24, 24, 4, 10 + it)]).unwrap();
    }
    let want = direct(&mut t, set, 1);
    let before = snapshot(&t.store);
    let tracked: Vec<Vec<i64>> = t.store.bn_layers().iter().map(|l| l.batches_tracked.clone()).collect();
    let opts = PreciseBnOptions { bn_slice: 1, conv_set: 0 };
    let report = precise_bn(&mut t, &opts, set.iter().cloned().map(Ok)).unwrap();
    assert_eq!((report.images, report.batches, report.layers), (images, set.len(), t.store.bn_layers().len()));
    let after = snapshot(&t.store);
    for ((name, a, _), (_, b, _)) in before.iter().zip(&after) {
        let c = a.len() / 2;
        if name.ends_with(".running_mean") || name.ends_with(".running_var") {
            assert_eq!(a[..c], b[..c], "{name}: slice 0 changed");
        } else {
            assert_eq!(a, b, "{name} changed");
        }
    }
    assert_eq!(tracked, t.store.bn_layers().iter().map(|l| l.batches_tracked.clone()).collect::<Vec<_>>());
    assert_eq!(want.len(), t.store.bn_layers().len(), "every BN layer saw the set");
    for l in t.store.bn_layers() {
        let [_, _, rm, rv] = l.tables.tables();
        let (rm, rv) = (be.to_f32(rm).unwrap(), be.to_f32(rv).unwrap());
        let c = l.channels;
        for (k, values) in want[&l.name].iter().enumerate() {
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let (gm, gv) = (rm[c + k] as f64, rv[c + k] as f64);
            // Each batch's statistics are f32 (mean, and 1/sqrt(var + eps) from which the
            // variance is recovered: relative error ≈ 2·2⁻²⁴ of var + eps), combined in f64 and
            // stored as f32: 1e-5 relative leaves two orders of magnitude of margin.
            assert!(
                (gm - mean).abs() <= 1e-5 * (mean.abs() + var.sqrt()) + 1e-7,
                "{} ch {k}: mean {gm} vs {mean}",
                l.name
            );
            assert!((gv - var).abs() <= 1e-5 * (var + 1e-5), "{} ch {k}: var {gv} vs {var}", l.name);
        }
    }
}

#[test]
fn recalibrated_statistics_are_the_population_statistics_and_nothing_else_moves() {
    // Batches of different sizes (the estimate weighs each by its pixel count; a batch needs
    // two images: the 1×1 pyramid bin has one value per image).
    let set = vec![batch(1, 2, 24, 24, 4, 31), batch(1, 3, 24, 24, 4, 32), batch(1, 2, 24, 24, 4, 33)];
    check_recalibration(&CpuBackend::new(), &set, 7);
}

/// The same on our kernels (the device's saved statistics are f32 per-tile partials combined in
/// a fixed order: the same tolerance holds).
#[test]
fn recalibration_on_the_device() {
    let set = vec![batch(1, 2, 24, 24, 4, 41), batch(1, 3, 24, 24, 4, 42)];
    check_recalibration(&device_backend(), &set, 5);
}

#[test]
fn bad_requests_are_typed_errors_and_change_nothing() {
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, tiny_model(vec![3, 4], 0.0), TrainConfig::default()).unwrap();
    let before = snapshot(&t.store);
    let set = [batch(1, 2, 24, 24, 4, 1)];
    let bad_slice = PreciseBnOptions { bn_slice: 2, conv_set: 0 };
    assert!(matches!(
        precise_bn(&mut t, &bad_slice, set.iter().cloned().map(Ok)),
        Err(cdcl::Error::InvalidArgument(_))
    ));
    let ok = PreciseBnOptions { bn_slice: 1, conv_set: 0 };
    assert!(precise_bn(&mut t, &ok, std::iter::empty()).is_err(), "an empty set");
    let mut short = batch(1, 2, 24, 24, 4, 2);
    short.images.pop();
    let r = precise_bn(&mut t, &ok, [Ok(set[0].clone()), Ok(short)]);
    assert!(matches!(r, Err(cdcl::Error::InvalidShape { .. })), "{r:?}");
    assert_eq!(before, snapshot(&t.store), "a failed recalibration changes nothing");
    // One image per batch: the 1×1 pyramid bin has a single value, as in PyTorch an error.
    let r = precise_bn(&mut t, &ok, [Ok(batch(1, 1, 24, 24, 4, 3))]);
    assert!(matches!(r, Err(cdcl::Error::TooFewValues { .. })), "{r:?}");
    assert_eq!(before, snapshot(&t.store));
}
