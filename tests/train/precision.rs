//! Mixed precision: a bf16 or f16 step against the f32 step, the two backends in 16-bit, and
//! dynamic loss scaling recovering from a loss scale far too large.

use super::*;
use cdcl::train::{LossScaleConfig, Precision};

type Snapshot = Vec<(String, Vec<f32>, Option<Vec<f32>>)>;

/// One DAT step's loss and gradients of a tiny model in `precision`, with every β at 4: a ReLU
/// input is then `4 + γ·x̂ (+ residual ≥ 0)`, below zero only for normalised values under −4
/// (6e-5 of a Gaussian), so the masks do not depend on the rounding and the comparison measures
/// arithmetic, not mask flips (with β at 0, rounding the images alone to bf16 moves the f32
/// gradients of this model by ~50%: a fraction u of the ReLU inputs lies within u of zero and
/// flips). The loss scale starts at 2⁸: in this nearly linear regime the gradients are O(1), and
/// 2¹⁶ would overflow f16.
fn shifted_step<B: Backend>(be: &B, precision: Precision) -> (f32, Snapshot, Vec<Vec<f64>>) {
    let cfg = TrainConfig {
        precision,
        loss_scale: LossScaleConfig { init: 256.0, ..LossScaleConfig::default() },
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(be, tiny_model(vec![5, 3], 0.0), cfg).unwrap();
    for l in t.store.bn_layers_mut() {
        let n = l.num_datasets * l.channels;
        be.write_f32(l.tables.tables_mut()[1], &vec![4.0; n]).unwrap();
    }
    let (s, g) = t.trace_gradients(&[batch(0, 2, 32, 32, 5, 1), batch(1, 2, 32, 32, 3, 2)]).unwrap();
    assert!(!s.skipped, "{precision:?}: the loss scale overflowed");
    let inputs = g.norm_records().iter().map(|r| super::backends::relu_input(&t.store, r)).collect();
    (s.total, snapshot(&t.store), inputs)
}

/// ‖a − b‖ / (‖b‖ + ρ) per gradient, in units of `u`, the worst one: ρ is the tensor's share of
/// the whole gradient's norm (‖G‖·√(n/N)), the floor for tensors whose exact gradient is ~0
/// (a β followed by a batch-statistics BN: the next mean subtraction removes any shift).
fn worst_gradient(a: &Snapshot, b: &Snapshot, u: f64) -> (f64, String) {
    let grads = |s: &Snapshot| -> Vec<(String, Vec<f32>)> {
        s.iter()
            .filter(|(n, _, _)| !n.ends_with(".half"))
            .filter_map(|(n, _, g)| g.clone().map(|g| (n.clone(), g)))
            .collect()
    };
    let (ga, gb) = (grads(a), grads(b));
    assert_eq!(ga.len(), gb.len());
    let total_len: usize = gb.iter().map(|g| g.1.len()).sum();
    let total: f64 = gb.iter().flat_map(|g| g.1.iter()).map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let mut worst = (0.0f64, String::new());
    for ((name, x), (name_b, y)) in ga.iter().zip(&gb) {
        assert_eq!(name, name_b);
        let d: f64 = x.iter().zip(y).map(|(p, q)| ((*p - *q) as f64).powi(2)).sum::<f64>().sqrt();
        let n: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
        let e = d / (n + total * (y.len() as f64 / total_len as f64).sqrt()) / u;
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    worst
}

/// ReLU inputs whose sign differs between two runs.
fn mask_differences(a: &[Vec<f64>], b: &[Vec<f64>]) -> usize {
    a.iter().zip(b).map(|(x, y)| x.iter().zip(y).filter(|(p, q)| (**p > 0.0) != (**q > 0.0)).count()).sum()
}

/// One DAT step in bf16 and in f16 against f32, on each backend.
///
/// Tolerance, derived: 16-bit storage rounds every activation and activation gradient once per
/// op with a relative error of at most u (bf16 2⁻⁸, f16 2⁻¹¹); statistics, accumulation and the
/// loss are f32. The loss, a mean over thousands of pixels, averages the per-pixel errors: within
/// 4u. A gradient gathers the roundings of the ~30 ops on its path as a random walk, √30·u ≈ 5.5u,
/// and the BN backward's mean subtractions (`dx = γ·invstd·(g − mean g − x̂·mean(g·x̂))`)
/// cancel up to a few bits of the relative accuracy of their input: with 2^1.5 for that and a
/// factor 2 of margin, 32u of [`worst_gradient`]'s norm. Measured: ≤ 17u (bf16), ≤ 6u (f16),
/// largest on the stem (the longest path). An error in a 16-bit path — the wrong weight copy,
/// an unscaled or doubly scaled gradient, a dropped rounding-point contract — is O(1) = 256u.
fn check_against_f32<B: Backend>(be: &B) {
    let (l32, g32, r32) = shifted_step(be, Precision::F32);
    for (precision, u) in [(Precision::Bf16, 2f64.powi(-8)), (Precision::F16, 2f64.powi(-11))] {
        let (l, g, r) = shifted_step(be, precision);
        let flips = mask_differences(&r32, &r);
        let dl = (l as f64 - l32 as f64).abs() / l32 as f64;
        let (worst, name) = worst_gradient(&g, &g32, u);
        eprintln!(
            "{}: {precision:?} loss {:.2}u, worst gradient {worst:.1}u ({name}), {flips} masks differ",
            be.name(),
            dl / u
        );
        assert!(flips == 0, "{}: {precision:?}: {flips} ReLU masks differ although every β is 4", be.name());
        assert!(dl <= 4.0 * u, "{}: {precision:?} loss {l} vs f32 {l32}", be.name());
        assert!(worst <= 32.0, "{}: {precision:?} gradient of {name} off by {worst:.1}u", be.name());
        // The 16-bit copies are the rounded masters; checkpoints save the masters.
        for (name, v, _) in &g {
            if let Some(base) = name.strip_suffix(".half") {
                let master = &g.iter().find(|(n, _, _)| n == base).unwrap().1;
                let round = |x: f32| match precision {
                    Precision::F16 => half::f16::from_f32(x).to_f32(),
                    _ => half::bf16::from_f32(x).to_f32(),
                };
                assert!(v.iter().zip(master).all(|(h, m)| h.to_bits() == round(*m).to_bits()), "{name}");
            }
        }
    }
}

#[test]
fn mixed_precision_step_is_close_to_f32_on_the_cpu_backend() {
    check_against_f32(&CpuBackend::new());
}

#[test]
fn mixed_precision_step_is_close_to_f32_on_the_device() {
    check_against_f32(&device_backend());
}

/// The two backends in bf16 round at the same points: they agree as the two agree in f32, up to
/// the values a summation-order difference puts on the other side of a bf16 rounding boundary
/// (one ulp, u): within the same 32u.
#[test]
fn bf16_step_cpu_and_device_agree() {
    let u = 2f64.powi(-8);
    let (la, ga, ra) = shifted_step(&CpuBackend::new(), Precision::Bf16);
    let (lb, gb, rb) = shifted_step(&device_backend(), Precision::Bf16);
    assert_eq!(mask_differences(&ra, &rb), 0);
    assert!(((la - lb) as f64).abs() <= 4.0 * u * la as f64, "{la} vs {lb}");
    let (worst, name) = worst_gradient(&gb, &ga, u);
    eprintln!("bf16, CPU backend against the device: worst gradient {worst:.1}u ({name})");
    assert!(worst <= 32.0, "{name}: {worst:.1}u");
    for ((name, va, _), (_, vb, _)) in ga.iter().zip(&gb) {
        if !name.contains(".running_") {
            assert_eq!(va, vb, "{name}: initial parameters and their copies are the same bits");
        }
    }
}

/// f16 with an initial loss scale of 2³⁰: the scaled gradients overflow f16, the optimiser
/// skips the step on the device (no weight, momentum buffer or 16-bit copy changes, bit for bit),
/// the scale halves, and after enough halvings the steps go through; after a run of good steps
/// the scale grows again.
#[test]
fn f16_loss_scaling_recovers_from_a_huge_scale() {
    let be = CpuBackend::new();
    let cfg = TrainConfig {
        precision: Precision::F16,
        loss_scale: LossScaleConfig { init: 2f32.powi(30), growth_interval: 3, ..LossScaleConfig::default() },
        max_iters: 60,
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(&be, tiny_model(vec![4, 3], 0.1), cfg).unwrap();
    let data = |it: u64| vec![batch(0, 2, 16, 16, 4, 7 + it), batch(1, 2, 16, 16, 3, 70 + it)];
    // Weights, γ, β and copies; and the momentum buffers (a skipped first step may create
    // them, as zeros: PyTorch's first real step gives the same buffer, `d`).
    let trainable = |t: &Trainer<CpuBackend>| {
        let mut v = snapshot(&t.store);
        v.retain(|(name, _, _)| !name.contains(".running_"));
        let zero = |len| vec![0.0f32; len];
        let moms: Vec<Vec<f32>> = t
            .store
            .weights()
            .iter()
            .map(|w| {
                w.momentum.as_ref().map_or_else(|| zero(w.value.as_f32().unwrap().len()), |m| be.to_f32(m).unwrap())
            })
            .collect();
        (v, moms)
    };
    let (mut skipped, mut scales) = (0, Vec::new());
    let mut it = 0;
    loop {
        let before = trainable(&t);
        let s = t.step(&data(it)).unwrap();
        scales.push(s.loss_scale);
        it += 1;
        if !s.skipped {
            assert!(s.total.is_finite());
            assert_ne!(trainable(&t).0, before.0, "a good step changed nothing");
            break;
        }
        skipped += 1;
        let after = trainable(&t);
        assert!(before.0 == after.0, "step {it}: a skipped step changed a weight, γ, β or copy");
        assert!(before.1 == after.1, "step {it}: a skipped step changed a momentum buffer");
        assert_eq!(t.loss_scaler().scale(), s.loss_scale / 2.0, "the scale halves after an overflow");
        assert!(it < 40, "no step went through after {it} halvings: {scales:?}");
    }
    assert!(skipped >= 5, "the huge scale should overflow for a while: {scales:?}");
    // Three good steps in a row double the scale.
    let good = t.loss_scaler().scale();
    for _ in 0..3 {
        let s = t.step(&data(it)).unwrap();
        it += 1;
        if s.skipped {
            return; // an overflow at the edge restarts the run; the halving rule was checked above
        }
    }
    assert_eq!(t.loss_scaler().scale(), 2.0 * good, "the scale grows after growth_interval good steps");

    // A checkpoint keeps the scale reached and the run of good steps, so a resumed f16 run does
    // not start over from 2³⁰ (and skip a dozen steps again).
    let ck = t.checkpoint().unwrap();
    let mut resumed = Trainer::new(&be, tiny_model(vec![4, 3], 0.1), t.config.clone()).unwrap();
    resumed.restore(&ck).unwrap();
    assert_eq!(resumed.loss_scaler(), t.loss_scaler());
    let meta = cdcl::train::ModelMeta::of(&ck).unwrap();
    assert_eq!(meta.precision, "f16");
}
