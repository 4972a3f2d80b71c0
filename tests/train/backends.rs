//! The same DAT steps on the CPU backend (host code, f64 reductions) and on our kernels.

use super::*;
use cdcl::autograd::NormRecord;
use cdcl::backend::{BnStats, TensorLike};

/// A normalisation's ReLU input `(x − mean)·invstd·γ + β + residual`, computed on the host in
/// f64 from what the backend stored (f32 values, so the host value is within an f32 rounding
/// of the backend's own).
pub(super) fn relu_input<B: Backend>(store: &ParamStore<B>, r: &NormRecord<'_, B>) -> Vec<f64> {
    let be = store.backend();
    let x = be.to_f32(r.x).unwrap();
    let (mean, inv) = (be.to_f32(r.stats.mean()).unwrap(), be.to_f32(r.stats.invstd()).unwrap());
    let [g, b, ..] = store.bn(r.bn).tables.tables();
    let (g, b) = (be.to_f32(g).unwrap(), be.to_f32(b).unwrap());
    let res = r.residual.map(|t| be.to_f32(t).unwrap());
    let ds = be.to_i32(r.datasets).unwrap();
    let c = *r.x.shape().last().unwrap();
    let per_sample = x.len() / ds.len();
    (0..x.len())
        .map(|e| {
            let ch = e % c;
            let s = ds[e / per_sample] as usize * c + ch;
            let v = (x[e] as f64 - mean[s] as f64) * inv[s] as f64 * g[s] as f64 + b[s] as f64;
            v + res.as_ref().map_or(0.0, |r| r[e] as f64)
        })
        .collect()
}

/// One DAT step of a tiny PSPNet-ResNet-18 (two datasets, aux head) on the CPU backend and on
/// the device backend: the losses, the running statistics and every gradient agree. The device
/// runs the fused ops (blocks with the statistics in the convolution's epilogue and the
/// normalisation in the next convolution's prologue, the PPM, the upsampled loss); the CPU
/// backend composes its primitives.
///
/// **Why the comparison is in two parts.** Both compute in f32 with different summation orders
/// (GEMM blocking vs the kernels' tiles, f64 vs f32 partials in the BN statistics); the forward is
/// continuous, so its values agree to ~1e-5 relative through ~25 layers. The backward is not: a
/// ReLU whose input lies within that disagreement of zero may pass its gradient on one backend
/// and not on the other, which moves every gradient upstream of it by about one element's share
/// (~1e-3 of a small layer's gradient norm) — as large as the differences the summation orders
/// cause, so one fixed tolerance cannot tell such a flip from an error. So the test:
/// 1. compares every ReLU input of the step element by element (host f64 recomputation from each
///    backend's stored convolution output, statistics, γ, β and residual): within 1e-3 of the
///    layer's largest magnitude (forward errors are caught here, layer by layer);
/// 2. takes as the layer's rounding bound its largest observed disagreement (plus an f32
///    rounding of the value), flags the ReLU inputs within that bound of zero — the only ones
///    whose mask can differ — and counts them and the actual mask differences;
/// 3. compares every gradient with the tolerance of the summation orders alone (2e-4 relative to
///    each tensor's norm: measured differences are ~1e-5, a wrong formula is O(1)) when no mask
///    differs, and with a tolerance that admits a few masks (3e-2: each flip moves the gradients
///    upstream of it by one element's share of a ≥ 256-element layer, ≤ 1/√256 ≈ 6e-2 for the
///    smallest) when some do — still far below the O(1) of an error, which (2) has already had
///    the chance to catch in the forward.
#[test]
fn dat_step_cpu_and_emulator_agree() {
    let cpu = CpuBackend::new();
    let emu = device_backend();
    let classes = vec![5, 3];
    let batches = vec![batch(0, 2, 32, 32, 5, 1), batch(1, 2, 32, 32, 3, 2)];
    let cfg = TrainConfig::default();
    let mut a = Trainer::new(&cpu, tiny_model(classes.clone(), 0.1), cfg.clone()).unwrap();
    let mut b = Trainer::new(&emu, tiny_model(classes, 0.1), cfg).unwrap();
    let (sa, ga) = a.trace_gradients(&batches).unwrap();
    let (sb, gb) = b.trace_gradients(&batches).unwrap();
    assert!((sa.total - sb.total).abs() <= 1e-4 * sa.total.abs(), "{} vs {}", sa.total, sb.total);
    for d in 0..2 {
        assert!((sa.per_dataset[d] - sb.per_dataset[d]).abs() <= 1e-4 * sa.per_dataset[d].abs());
    }
    // (1) and (2): every ReLU input, and the masks that may differ.
    let (ra, rb) = (ga.norm_records(), gb.norm_records());
    assert_eq!(ra.len(), rb.len());
    assert!(ra.len() >= 26, "{} normalisations recorded", ra.len());
    let (mut flagged, mut flips, mut relus) = (0usize, 0usize, 0usize);
    for (i, (x, y)) in ra.iter().zip(&rb).enumerate() {
        let (pa, pb) = (relu_input(&a.store, x), relu_input(&b.store, y));
        let scale = pa.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let delta = pa.iter().zip(&pb).fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
        assert!(delta <= 1e-3 * scale.max(1.0), "normalisation {i}: ReLU inputs differ by {delta} (scale {scale})");
        if !x.relu {
            continue;
        }
        relus += pa.len();
        for (p, q) in pa.iter().zip(&pb) {
            if p.abs() <= delta + 1e-6 * (1.0 + p.abs()) {
                flagged += 1;
                flips += ((*p > 0.0) != (*q > 0.0)) as usize;
            }
        }
    }
    eprintln!("{relus} ReLU inputs, {flagged} within the rounding bound of zero, {flips} masks differ");
    assert!(flips <= 3, "{flips} ReLU masks differ between the backends: more than rounding explains");
    let tol = if flips == 0 { 2e-4 } else { 3e-2 };
    // (3): every gradient and running statistic.
    let (pa, pb) = (snapshot(&a.store), snapshot(&b.store));
    assert_eq!(pa.len(), pb.len());
    let (mut with_grad, mut worst) = (0, 0.0f64);
    for ((name, va, ga), (_, vb, gb)) in pa.iter().zip(&pb) {
        if name.contains(".running_") {
            // The running mean moved by 0.1 × a batch mean of conv outputs whose mean nearly
            // cancels: summation-order differences (1e-7 of the summands) are ~1e-5 of the
            // result's norm; 1e-4 still catches a wrong momentum or a missed update (O(1)).
            assert!(rel_err(vb, va) <= 1e-4, "{name} values differ: {}", rel_err(vb, va));
        } else {
            assert_eq!(va, vb, "{name}: the same seed must give the same initial parameters");
        }
        match (ga, gb) {
            (Some(ga), Some(gb)) => {
                with_grad += 1;
                let e = rel_err(gb, ga);
                worst = worst.max(e);
                assert!(e <= tol, "{name}: gradient relative error {e} ({flips} masks differ)");
            }
            (None, None) => {}
            _ => panic!("{name}: gradient on one backend only"),
        }
    }
    eprintln!("largest gradient relative error {worst:.2e} (tolerance {tol:.0e})");
    assert!(with_grad > 40, "only {with_grad} tensors got gradients");
}

/// Ten DAT steps (SGD included) on both backends: the loss curves agree.
#[test]
fn ten_steps_cpu_and_emulator_agree() {
    let cpu = CpuBackend::new();
    let emu = device_backend();
    let classes = vec![4, 3];
    let cfg = TrainConfig { max_iters: 10, ..TrainConfig::default() };
    let mut a = Trainer::new(&cpu, tiny_model(classes.clone(), 0.1), cfg.clone()).unwrap();
    let mut b = Trainer::new(&emu, tiny_model(classes, 0.1), cfg).unwrap();
    for it in 0..10u64 {
        let batches = vec![batch(0, 2, 24, 24, 4, 10 + it), batch(1, 2, 24, 24, 3, 100 + it)];
        let la = a.step(&batches).unwrap().total;
        let lb = b.step(&batches).unwrap().total;
        // Ten SGD steps at lr 0.01 (head 0.1) let the gradient differences compound a little;
        // 1e-2 relative is still far below any systematic error.
        assert!((la - lb).abs() <= 1e-2 * la.abs(), "step {it}: {la} vs {lb}");
    }
}

/// The device step is one pass for both datasets and reads the host once: it asks the device
/// for far fewer launches than separate passes, and its host reads are the error records of
/// the ops plus ONE read of the losses (issue the ops' error records later and the step has one
/// synchronisation).
#[test]
fn device_step_accounting() {
    let emu = device_backend();
    let batches = vec![batch(0, 2, 16, 16, 4, 1), batch(1, 2, 16, 16, 3, 2)];
    let run_with = |fuse: bool, precision| {
        let cfg = TrainConfig { fuse_datasets: fuse, precision, ..TrainConfig::default() };
        let mut t = Trainer::new(&emu, tiny_model(vec![4, 3], 0.1), cfg).unwrap();
        t.step(&batches).unwrap(); // momentum buffers, first allocations
        let (d0, o0) = (emu.device_counters().unwrap(), emu.op_counters().unwrap());
        t.step(&batches).unwrap();
        (emu.device_counters().unwrap() - d0, emu.op_counters().unwrap() - o0)
    };
    let run = |fuse: bool| run_with(fuse, cdcl::train::Precision::F32);
    let ((fused, ofused), (separate, oseparate)) = (run(true), run(false));
    eprintln!("one pass: {fused} | {ofused}\nseparate passes: {separate} | {oseparate}");
    assert!(fused.kernel_launches * 10 < separate.kernel_launches * 7, "{fused} vs {separate}");
    assert!(ofused.activation_tensors < oseparate.activation_tensors);
    // Every convolution of the step is one of the three problems in f32.
    assert_eq!(ofused.convolution_kinds().len(), 3, "{ofused}");
    // In bf16 the same step: the convolutions in bf16, and no weight travels through the host
    // (the SGD kernel writes the 16-bit copies): the reads back are the f32 step's, and one
    // launch more (the gather of the bf16 weight gradients).
    let (half, ohalf) = run_with(true, cdcl::train::Precision::Bf16);
    assert!(ohalf.convolution_kinds().iter().all(|k| k.1 == cdcl::DType::BF16), "{ohalf}");
    assert_eq!(half.device_to_host_bytes, fused.device_to_host_bytes, "{half}");
    assert_eq!(half.kernel_launches, fused.kernel_launches + 1, "{half}");
}
