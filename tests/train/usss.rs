//! USSS semi-supervised training: the entropy loss through the graph (finite differences, both
//! backends), the prototypes' moving average, α = β = 0 as exactly the supervised run, the
//! unlabelled entropy falling while training on synthetic scenes with held-back labels,
//! semi-supervised steps agreeing across backends, and bad settings or batches as typed errors.

use super::*;
use cdcl::autograd::UsssSpec;
use cdcl::data::{Synthetic, SyntheticConfig};
use cdcl::ops::usss::UsssOptions;
use cdcl::reference::usss as refu;
use cdcl::train::{Prototypes, UnlabeledBatch, UsssConfig};
use ndarray::{ArrayView2, ArrayView4};

const SHAPE: [usize; 4] = [3, 2, 3, 5];
const DATASETS: [i32; 3] = [0, 1, 1];
const CLASSES: [usize; 2] = [3, 2];
const OPTS: UsssOptions = UsssOptions { temperature: 0.5, alpha: 0.7, beta: 1.3 };
/// The root is `ROOT_WEIGHT · usss(x + x)`: the graph must sum the gradients of both uses of x
/// and scale by the weight.
const ROOT_WEIGHT: f32 = 0.5;

fn features() -> Vec<f32> {
    (0..SHAPE.iter().product::<usize>()).map(|i| 3.0 * unit(5, i as u64) - 1.5).collect()
}

/// Five unit rows: dataset 0's three prototypes, then dataset 1's two.
fn prototypes() -> Vec<f32> {
    let e = SHAPE[3];
    let raw: Vec<f32> = (0..5 * e).map(|i| 2.0 * unit(9, i as u64) - 1.0).collect();
    raw.chunks(e)
        .flat_map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.iter().map(move |v| v / n)
        })
        .collect()
}

/// The root's value and (with `backward`) the gradient of x through the graph.
fn through_graph<B: Backend>(be: &B, x: &[f32], expected_grad: Option<f32>, backward: bool) -> (f32, Vec<f32>) {
    let mut g = Graph::new(be, true);
    let xv = g.input_with_grad(be.tensor_f32(&SHAPE, x).unwrap());
    let y = g.add(xv, xv).unwrap();
    let ds = g.input_i32(&[SHAPE[0]], &DATASETS).unwrap();
    let protos = be.tensor_f32(&[5, SHAPE[3]], &prototypes()).unwrap();
    let spec = UsssSpec { classes_per_dataset: CLASSES.to_vec(), options: OPTS, expected_grad };
    let s = g.usss(y, ds, protos, &spec).unwrap();
    let root = g.weighted_sum(&[(s, ROOT_WEIGHT)]);
    let value = g.scalar(root).unwrap();
    if !backward {
        return (value, Vec::new());
    }
    let mut store = ParamStore::new(be.clone());
    let grads = g.backward(root, &mut store).unwrap();
    assert_eq!(grads.len(), 1, "one input with a gradient");
    (value, be.to_f32(&grads[0].1).unwrap())
}

/// The f64 reference's loss of the same root at `x` (features `x + x`).
fn reference_root(x: &[f64]) -> f64 {
    let y: Vec<f64> = x.iter().map(|v| 2.0 * v).collect();
    let p: Vec<f64> = prototypes().iter().map(|&v| v as f64).collect();
    let e = SHAPE[3];
    let views =
        [ArrayView2::from_shape((3, e), &p[..3 * e]).unwrap(), ArrayView2::from_shape((2, e), &p[3 * e..]).unwrap()];
    let cfg =
        refu::UsssConfig { temperature: OPTS.temperature as f64, alpha: OPTS.alpha as f64, beta: OPTS.beta as f64 };
    let xv = ArrayView4::from_shape((SHAPE[0], SHAPE[1], SHAPE[2], e), &y).unwrap();
    ROOT_WEIGHT as f64 * refu::usss_forward(xv, &[0, 1, 1], &views, None, &cfg).unwrap().total
}

/// Two finite-difference checks of the gradient the graph computes (through an add that uses x
/// twice, the USSS node and a weighted root), with the gradient precomputed in the forward
/// (`expected_grad` equal to what the backward sends), recomputed (a different expectation)
/// and not asked for:
/// - against central differences of the f64 reference's loss, step 1e-4: truncation
///   h²/6·|f'''| with |f'''| ≲ 10² here (logits scale 2/T = 4, cubed, over 18 pixels) is
///   ~2e-7 and the f64 rounding ~1e-16/h negligible, so what remains is the backend's error:
///   the CPU backend rounds an f64 result once (2^-24 relative), the kernels accumulate in f32
///   over ≤ 5 prototypes × 5 channels (≲ 1e-6 relative). Allowed: 1e-5 + 1e-4·|g|.
/// - against central differences of the graph's own f32 forward, step 1e-2: the loss (≤ 2·ln 3)
///   is read as an f32 after f32 or f64 sums over 18 pixels (≤ 1e-6 absolute), so the
///   difference quotient carries ≤ 1e-4 of rounding, plus h²/6·|f'''| ≲ 2e-3 of truncation.
///   Allowed: 3e-3 + 1e-2·|g| (the gradients are ~0.1; a wrong factor of 2 or a dropped use of
///   x is far outside).
fn check_graph_gradient<B: Backend>(be: &B) {
    let x = features();
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut first: Option<Vec<f32>> = None;
    for expected in [Some(ROOT_WEIGHT), Some(1.0), None] {
        let (_, grad) = through_graph(be, &x, expected, true);
        for (i, &gv) in grad.iter().enumerate() {
            let h = 1e-4;
            let (mut xp, mut xm) = (x64.clone(), x64.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (reference_root(&xp) - reference_root(&xm)) / (2.0 * h);
            let tol = 1e-5 + 1e-4 * num.abs();
            assert!((gv as f64 - num).abs() <= tol, "{}: element {i}: graph {gv}, f64 differences {num}", be.name());
        }
        // The three paths to the gradient give the same bits.
        match &first {
            None => first = Some(grad),
            Some(f) => assert_eq!(f, &grad, "{}: precomputed and recomputed gradients differ", be.name()),
        }
    }
    let grad = first.expect("a gradient");
    for i in (0..x.len()).step_by(4) {
        let h = 1e-2f32;
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let num = (through_graph(be, &xp, None, false).0 - through_graph(be, &xm, None, false).0) / (2.0 * h);
        let tol = 3e-3 + 1e-2 * num.abs();
        assert!((grad[i] - num).abs() <= tol, "{}: element {i}: graph {}, graph differences {num}", be.name(), grad[i]);
    }
}

#[test]
fn usss_gradient_through_the_graph_matches_finite_differences() {
    check_graph_gradient(&CpuBackend::new());
    check_graph_gradient(&device_backend());
}

/// The two backends' losses (total, cross, within) agree within the kernels' f32 accumulation
/// over 18 pixels (1e-5 relative, generous), and bad input is the same typed error on both.
#[test]
fn usss_backends_agree_and_refuse_bad_input() {
    let (cpu, dev) = (CpuBackend::new(), device_backend());
    fn losses<B: Backend>(be: &B) -> Vec<f32> {
        let x = be.tensor_f32(&SHAPE, &features()).unwrap();
        let ds = be.tensor_i32(&[3], &DATASETS).unwrap();
        let p = be.tensor_f32(&[5, 5], &prototypes()).unwrap();
        let (l, _) = be.usss_entropy(&x, &ds, &p, &CLASSES, &OPTS, None).unwrap();
        be.to_f32(&l).unwrap()
    }
    let (l_cpu, l_dev) = (losses(&cpu), losses(&dev));
    for (a, b) in l_cpu.iter().zip(&l_dev) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "cpu {l_cpu:?} device {l_dev:?}");
    }
    fn errors<B: Backend>(be: &B) -> Vec<String> {
        let x = be.tensor_f32(&SHAPE, &features()).unwrap();
        let ds = be.tensor_i32(&[3], &DATASETS).unwrap();
        let bad_ds = be.tensor_i32(&[3], &[0, 2, 1]).unwrap();
        let p = be.tensor_f32(&[5, 5], &prototypes()).unwrap();
        let mut nan = prototypes();
        nan[7] = f32::NAN;
        let p_nan = be.tensor_f32(&[5, 5], &nan).unwrap();
        let hot = UsssOptions { temperature: 0.0, ..OPTS };
        [
            be.usss_entropy(&x, &bad_ds, &p, &CLASSES, &OPTS, None).map(|_| ()),
            be.usss_entropy(&x, &ds, &p, &[3, 3], &OPTS, None).map(|_| ()),
            be.usss_entropy(&x, &ds, &p, &[5, 0], &OPTS, None).map(|_| ()),
            be.usss_entropy(&x, &ds, &p_nan, &CLASSES, &OPTS, None).map(|_| ()),
            be.usss_entropy(&x, &ds, &p, &CLASSES, &hot, None).map(|_| ()),
            be.usss_entropy(&x, &ds, &p, &CLASSES, &OPTS, Some(f32::INFINITY)).map(|_| ()),
        ]
        .into_iter()
        .map(|r| format!("{:?}", std::mem::discriminant(&r.expect_err("bad input is refused"))))
        .collect()
    }
    assert_eq!(errors(&cpu), errors(&dev));
}

#[test]
fn prototypes_are_a_moving_average_of_labelled_class_means() {
    let mut p = Prototypes::default();
    // One 4×4 label map over a 2×2 feature map: each feature pixel takes the label under its
    // centre, (1, 1), (1, 3), (3, 1), (3, 3).
    let mut labels = vec![255; 16];
    labels[5] = 0;
    labels[7] = 1;
    labels[13] = 0;
    labels[15] = 255;
    let feat = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    p.update(1, 3, (&feat, [1, 2, 2, 2]), (&labels, [1, 4, 4]), 0.75);
    assert_eq!(p.means[1][0], Some(vec![3.0, 4.0]));
    assert_eq!(p.means[1][1], Some(vec![3.0, 4.0]));
    assert_eq!(p.means[1][2], None);
    assert!(p.table(2).is_none(), "dataset 0 has no prototype yet");
    let feat2 = [5.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    p.update(1, 3, (&feat2, [1, 2, 2, 2]), (&labels, [1, 4, 4]), 0.75);
    // 0.75·(3, 4) + 0.25·(2.5, 4)
    assert_eq!(p.means[1][0], Some(vec![2.875, 4.0]));
    p.update(0, 2, (&feat, [1, 2, 2, 2]), (&labels, [1, 4, 4]), 0.75);
    let (table, counts, e) = p.table(2).unwrap();
    assert_eq!((counts, e), (vec![2, 2], 2));
    assert_eq!(&table[..2], &[0.6, 0.8]);
}

fn semi_trainer(usss: UsssConfig) -> Trainer<CpuBackend> {
    let model = tiny_model(vec![8, 5], 0.1);
    Trainer::new(&CpuBackend::new(), model, TrainConfig { usss, max_iters: 20, ..TrainConfig::default() }).unwrap()
}

/// Iteration `it` of the synthetic scenes (city, dusk) with half of every batch's labels held
/// back, as `cdcl train --unlabeled-fraction 0.5` draws them.
fn held_back(data: &Synthetic, it: usize) -> (Vec<Batch>, Vec<UnlabeledBatch>) {
    let (mut labelled, mut unlabelled) = (Vec::new(), Vec::new());
    for ds in 0..2 {
        let idx: Vec<u64> = (0..4).map(|i| ((it * 2 + ds) * 4 + i) as u64).collect();
        let b = data.batch(ds, &idx[..2]).unwrap();
        labelled.push(Batch { dataset: ds, n: b.n, h: b.h, w: b.w, images: b.images, labels: b.labels });
        let u = data.batch(ds, &idx[2..]).unwrap();
        unlabelled.push(UnlabeledBatch { dataset: ds, n: u.n, h: u.h, w: u.w, images: u.images });
    }
    (labelled, unlabelled)
}

#[test]
fn alpha_and_beta_zero_is_exactly_the_supervised_run() {
    let data = Synthetic::new(SyntheticConfig::default_two_domains(32, 32, 3)).unwrap();
    let off = UsssConfig { alpha: 0.0, beta: 0.0, temperature: 0.5, prototype_momentum: 0.5 };
    let (mut semi, mut sup) = (semi_trainer(off), semi_trainer(UsssConfig::default()));
    for it in 0..2 {
        let (l, u) = held_back(&data, it);
        let a = semi.step_semi(&l, &u).unwrap();
        let b = sup.step(&l).unwrap();
        assert_eq!(a.usss, None);
        assert_eq!(a.step, b);
    }
    assert!(snapshot(&semi.store) == snapshot(&sup.store), "parameters or statistics differ");
}

/// On the synthetic scenes with half the labels held back, the unlabelled pixels' entropy
/// (within and cross, each iteration's own unlabelled batch against the prototypes of its time)
/// falls: the mean of the last three iterations is below that of the first three that had a
/// USSS term (the first has none: no prototypes yet). Measured here: within 1.741 → 1.473,
/// cross 1.738 → 1.471 (over the 11 USSS iterations the entropy falls almost monotonically).
#[test]
fn unlabelled_entropy_falls_while_training() {
    let data = Synthetic::new(SyntheticConfig::default_two_domains(32, 32, 3)).unwrap();
    let on = UsssConfig { alpha: 1.0, beta: 1.0, ..UsssConfig::default() };
    let mut t = semi_trainer(on);
    let mut within = Vec::new();
    let mut cross = Vec::new();
    for it in 0..12 {
        let (l, u) = held_back(&data, it);
        let s = t.step_semi(&l, &u).unwrap();
        assert_eq!(s.usss.is_none(), it == 0, "iteration {it}: USSS term from the second iteration on");
        assert!(s.step.total.is_finite());
        if let Some(u) = s.usss {
            assert!((u.total - (u.cross + u.within)).abs() <= 1e-5 * u.total.abs().max(1.0));
            within.push(u.within);
            cross.push(u.cross);
        }
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let n = within.len();
    eprintln!("within {within:?}\ncross {cross:?}");
    assert!(mean(&within[n - 3..]) < mean(&within[..3]), "within entropy did not fall: {within:?}");
    assert!(mean(&cross[n - 3..]) < mean(&cross[..3]), "cross entropy did not fall: {cross:?}");
    assert_eq!(t.prototypes().means.len(), 2);
}

#[test]
fn bad_usss_settings_and_unlabelled_batches_are_typed_errors() {
    let be = CpuBackend::new();
    let model = || tiny_model(vec![8, 5], 0.0);
    let on = UsssConfig { alpha: 1.0, beta: 0.5, ..UsssConfig::default() };
    for bad in [
        UsssConfig { alpha: f32::NAN, ..on },
        UsssConfig { beta: -1.0, ..on },
        UsssConfig { temperature: 0.0, ..on },
        UsssConfig { prototype_momentum: 1.0, ..on },
    ] {
        let r = Trainer::new(&be, model(), TrainConfig { usss: bad, ..TrainConfig::default() });
        assert!(matches!(r, Err(cdcl::Error::InvalidArgument(_))), "{bad:?}");
    }
    let single = Mode::Single(0);
    let m = single.model_config(&[8, 5], model()).unwrap();
    let r = Trainer::new(&be, m, TrainConfig { mode: single, usss: on, ..TrainConfig::default() });
    assert!(matches!(r, Err(cdcl::Error::InvalidArgument(_))), "USSS needs a head per dataset");

    let data = Synthetic::new(SyntheticConfig::default_two_domains(32, 32, 3)).unwrap();
    let mut t = semi_trainer(on);
    let before = snapshot(&t.store);
    let (l, u) = held_back(&data, 0);
    let mut short = u.clone();
    short[0].images.pop();
    let mut stranger = u.clone();
    stranger[1].dataset = 7;
    let mut sizes = u.clone();
    sizes[1] = UnlabeledBatch { h: 16, w: 16, images: vec![0.0; 2 * 16 * 16 * 3], ..sizes[1].clone() };
    for bad in [short, stranger, sizes] {
        assert!(t.step_semi(&l, &bad).is_err());
    }
    assert_eq!(t.iteration(), 0);
    assert!(snapshot(&t.store) == before, "a refused step changed the model");
}

/// Two semi-supervised steps (SGD included; USSS in the second) on the CPU backend and on
/// our kernels: the objective and the unlabelled entropies agree within 1e-2 relative — the
/// tolerance of the supervised ten-step comparison (tests/train/backends.rs): the two backends'
/// summation orders differ by ~1e-5 per step and the SGD steps compound that a little, while a
/// wrong USSS term or gradient on one backend is O(1).
#[test]
fn semi_steps_cpu_and_emulator_agree() {
    let on = UsssConfig { alpha: 0.5, beta: 1.0, ..UsssConfig::default() };
    let cfg = TrainConfig { usss: on, max_iters: 2, ..TrainConfig::default() };
    let classes = vec![4, 3];
    let mut a = Trainer::new(&CpuBackend::new(), tiny_model(classes.clone(), 0.1), cfg.clone()).unwrap();
    let mut b = Trainer::new(&device_backend(), tiny_model(classes, 0.1), cfg).unwrap();
    // Small images: the emulator runs every kernel of three passes per step.
    for it in 0..2u64 {
        let l = vec![batch(0, 2, 16, 16, 4, 10 + it), batch(1, 2, 16, 16, 3, 100 + it)];
        let u: Vec<UnlabeledBatch> = (0..2)
            .map(|d| UnlabeledBatch { dataset: d, n: 2, h: 16, w: 16, images: batch(d, 2, 16, 16, 3, 500 + it).images })
            .collect();
        let (sa, sb) = (a.step_semi(&l, &u).unwrap(), b.step_semi(&l, &u).unwrap());
        let close = |p: f32, q: f32| (p - q).abs() <= 1e-2 * p.abs().max(1e-3);
        assert!(close(sa.step.total, sb.step.total), "step {it}: {} vs {}", sa.step.total, sb.step.total);
        match (sa.usss, sb.usss) {
            (None, None) => assert_eq!(it, 0, "no USSS term after the first step"),
            (Some(x), Some(y)) => {
                assert!(close(x.within, y.within) && close(x.cross, y.cross), "step {it}: {x:?} vs {y:?}");
            }
            (x, y) => panic!("step {it}: USSS term on one backend only: {x:?} vs {y:?}"),
        }
    }
}
