//! Tests of the CPU reference for dataset-specific batch normalisation.
//!
//! The reference is the oracle for the GPU kernels, so these tests check it against things that
//! do not share its code: finite differences of its own forward pass (for the backward passes),
//! statistics recomputed here from gathered values, hand-computed numbers, and structural
//! properties (datasets are independent, absent datasets are untouched, error cases).

mod common;

use cdcl::reference::dsbn::*;
use common::Rng;
use ndarray::{s, Array2, Array4, ArrayView2, ArrayView4, Axis};

// ---------------------------------------------------------------------------------------------
// Deterministic test data
// ---------------------------------------------------------------------------------------------

fn rand4(rng: &mut Rng, shape: (usize, usize, usize, usize), lo: f64, hi: f64) -> Array4<f64> {
    Array4::from_shape_simple_fn(shape, || rng.uniform(lo, hi))
}

fn rand2(rng: &mut Rng, shape: (usize, usize), lo: f64, hi: f64) -> Array2<f64> {
    Array2::from_shape_simple_fn(shape, || rng.uniform(lo, hi))
}

/// All inputs of a DSBN layer.
#[derive(Clone)]
struct Problem {
    x: Array4<f64>,
    datasets: Vec<usize>,
    gamma: Array2<f64>,
    beta: Array2<f64>,
    running_mean: Array2<f64>,
    running_var: Array2<f64>,
}

impl Problem {
    /// Random problem of shape `[N, H, W, C]` (N = `datasets.len()`) with `d` datasets.
    /// Each (dataset, channel) gets its own offset and scale so that means and variances differ.
    fn new(seed: u64, datasets: &[usize], (h, w, c): (usize, usize, usize), d: usize) -> Self {
        let mut rng = Rng(seed);
        let n = datasets.len();
        let offset = rand2(&mut rng, (d, c), -2.0, 2.0);
        let scale = rand2(&mut rng, (d, c), 0.5, 2.0);
        let mut x = rand4(&mut rng, (n, h, w, c), -1.0, 1.0);
        for ni in 0..n {
            for hi in 0..h {
                for wi in 0..w {
                    for ci in 0..c {
                        let ds = datasets[ni];
                        x[[ni, hi, wi, ci]] = offset[[ds, ci]] + scale[[ds, ci]] * x[[ni, hi, wi, ci]];
                    }
                }
            }
        }
        // |gamma| in [0.5, 1.5] with a random sign.
        let mut gamma = rand2(&mut rng, (d, c), 0.5, 1.5);
        for g in gamma.iter_mut() {
            if rng.unit() < 0.5 {
                *g = -*g;
            }
        }
        let beta = rand2(&mut rng, (d, c), -0.5, 0.5);
        let running_mean = rand2(&mut rng, (d, c), -1.0, 1.0);
        let running_var = rand2(&mut rng, (d, c), 0.5, 2.0);
        Problem { x, datasets: datasets.to_vec(), gamma, beta, running_mean, running_var }
    }

    fn train(&self, cfg: &DsbnConfig) -> Result<DsbnTrainOutput, ReferenceError> {
        dsbn_forward_train(
            self.x.view(),
            &self.datasets,
            self.gamma.view(),
            self.beta.view(),
            self.running_mean.view(),
            self.running_var.view(),
            cfg,
        )
    }

    fn infer(&self, cfg: &DsbnConfig) -> Result<Array4<f64>, ReferenceError> {
        dsbn_forward_infer(
            self.x.view(),
            &self.datasets,
            self.gamma.view(),
            self.beta.view(),
            self.running_mean.view(),
            self.running_var.view(),
            cfg,
        )
    }

    fn backward_train(&self, dy: &Array4<f64>, cfg: &DsbnConfig) -> Result<DsbnGrads, ReferenceError> {
        dsbn_backward_train(dy.view(), self.x.view(), &self.datasets, self.gamma.view(), self.beta.view(), cfg)
    }

    fn backward_infer(&self, dy: &Array4<f64>, cfg: &DsbnConfig) -> Result<DsbnGrads, ReferenceError> {
        dsbn_backward_infer(
            dy.view(),
            self.x.view(),
            &self.datasets,
            self.gamma.view(),
            self.beta.view(),
            self.running_mean.view(),
            self.running_var.view(),
            cfg,
        )
    }

    /// The samples of dataset `d` alone, as a problem with a single dataset (D = 1).
    fn only_dataset(&self, d: usize) -> Problem {
        let idx: Vec<usize> = (0..self.datasets.len()).filter(|&n| self.datasets[n] == d).collect();
        Problem {
            x: self.x.select(Axis(0), &idx),
            datasets: vec![0; idx.len()],
            gamma: self.gamma.slice(s![d..d + 1, ..]).to_owned(),
            beta: self.beta.slice(s![d..d + 1, ..]).to_owned(),
            running_mean: self.running_mean.slice(s![d..d + 1, ..]).to_owned(),
            running_var: self.running_var.slice(s![d..d + 1, ..]).to_owned(),
        }
    }
}

fn cfg(eps: f64, momentum: f64, relu: bool) -> DsbnConfig {
    DsbnConfig { eps, momentum, relu }
}

fn assert_close(actual: f64, expected: f64, rel: f64, what: &str) {
    let tol = rel * expected.abs().max(1.0);
    assert!(
        (actual - expected).abs() <= tol,
        "{what}: got {actual:e}, expected {expected:e} (diff {:e}, tol {tol:e})",
        (actual - expected).abs()
    );
}

fn assert_close4(actual: ArrayView4<f64>, expected: ArrayView4<f64>, rel: f64, what: &str) {
    assert_eq!(actual.dim(), expected.dim(), "{what}: shape");
    for (idx, a) in actual.indexed_iter() {
        assert_close(*a, expected[idx], rel, &format!("{what}{idx:?}"));
    }
}

fn assert_close2(actual: ArrayView2<f64>, expected: ArrayView2<f64>, rel: f64, what: &str) {
    assert_eq!(actual.dim(), expected.dim(), "{what}: shape");
    for (idx, a) in actual.indexed_iter() {
        assert_close(*a, expected[idx], rel, &format!("{what}{idx:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// 1 & 2. Gradient checks by central finite differences
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Mode {
    Train,
    Infer,
}

#[derive(Clone, Copy, Debug)]
enum Param {
    X,
    Gamma,
    Beta,
}

fn forward_y(p: &Problem, mode: Mode, c: &DsbnConfig) -> Array4<f64> {
    match mode {
        Mode::Train => p.train(c).expect("train forward").y,
        Mode::Infer => p.infer(c).expect("infer forward"),
    }
}

/// L = sum(y * w).
fn loss(y: &Array4<f64>, w: &Array4<f64>) -> f64 {
    let mut l = 0.0;
    for (a, b) in y.iter().zip(w.iter()) {
        l += a * b;
    }
    l
}

fn perturbed(p: &Problem, which: Param, i: usize, delta: f64) -> Problem {
    let mut q = p.clone();
    let data = match which {
        Param::X => q.x.as_slice_mut().unwrap(),
        Param::Gamma => q.gamma.as_slice_mut().unwrap(),
        Param::Beta => q.beta.as_slice_mut().unwrap(),
    };
    data[i] += delta;
    q
}

/// Checks every element of dx, dgamma, dbeta against central differences of L = sum(y * w).
///
/// Tolerance: the central difference (L(p+h) - L(p-h)) / 2h has truncation error
/// O(h^2 * L''') ~ 1e-10 with h = 1e-5 (all third derivatives are O(1)-O(10) here: invstd is
/// O(1) by construction), and rounding error ~ eps_f64 * |L| / h ~ 2e-16 * 10 / 1e-5 ~ 2e-10.
/// So ~1e-9..1e-7 relative to the gradient scale is what a correct gradient achieves, while any
/// wrong term (a missing 1/M, a wrong sign, biased vs unbiased variance, ...) is O(1e-2) or
/// larger. We assert |numeric - analytic| <= 1e-6 * max(1, |analytic|).
///
/// ReLU: L is not differentiable where a pre-activation is exactly 0, and a finite difference
/// whose two sides straddle the kink measures a mixture of both slopes. A perturbation of size
/// h moves each pre-activation by at most ~|gamma| * invstd * h * (1 + small) ~ 1e-4 here, so
/// for each perturbed element we recompute the pre-activations (forward with relu off) at p+h
/// and p-h and skip the element if any pre-activation that the perturbation changes lies within
/// 1e-3 of 0 on either side. Outputs the perturbation does not change (other datasets/channels)
/// cannot straddle anything. The test also asserts that only a few elements are skipped and
/// that the ReLU mask is non-trivial, so the relu path is really exercised.
fn grad_check(mode: Mode, relu: bool, seed: u64) {
    const H: f64 = 1e-5;
    const TOL: f64 = 1e-6;
    const KINK: f64 = 1e-3;

    // N = 3, dataset 1 absent; dataset 2 has a single sample (M = H * W = 6).
    let datasets = [0, 2, 0];
    let p = Problem::new(seed, &datasets, (2, 3, 5), 3);
    let c = cfg(1e-5, 0.1, relu);
    let c_pre = cfg(1e-5, 0.1, false);
    let mut rng = Rng(seed ^ 0xDEAD_BEEF);
    let w = rand4(&mut rng, p.x.dim(), -1.0, 1.0);

    // dL/dy = w.
    let grads = match mode {
        Mode::Train => p.backward_train(&w, &c).unwrap(),
        Mode::Infer => p.backward_infer(&w, &c).unwrap(),
    };

    // The absent dataset's parameter gradients are exactly zero.
    for ci in 0..5 {
        assert_eq!(grads.dgamma[[1, ci]], 0.0);
        assert_eq!(grads.dbeta[[1, ci]], 0.0);
    }

    if relu {
        let pre = forward_y(&p, mode, &c_pre);
        let clamped = pre.iter().filter(|&&v| v <= 0.0).count();
        let frac = clamped as f64 / pre.len() as f64;
        assert!((0.1..=0.9).contains(&frac), "ReLU mask is trivial (clamped fraction {frac}); pick another seed");
    }

    let mut checked = 0usize;
    let mut skipped = 0usize;
    let mut max_err = 0.0f64;
    for which in [Param::X, Param::Gamma, Param::Beta] {
        let analytic = match which {
            Param::X => grads.dx.as_slice().unwrap(),
            Param::Gamma => grads.dgamma.as_slice().unwrap(),
            Param::Beta => grads.dbeta.as_slice().unwrap(),
        };
        for (i, &a) in analytic.iter().enumerate() {
            let plus = perturbed(&p, which, i, H);
            let minus = perturbed(&p, which, i, -H);
            if relu {
                let pre_plus = forward_y(&plus, mode, &c_pre);
                let pre_minus = forward_y(&minus, mode, &c_pre);
                let mut near_kink = false;
                for (a, b) in pre_plus.iter().zip(pre_minus.iter()) {
                    if a != b && (a.abs() < KINK || b.abs() < KINK) {
                        near_kink = true;
                    }
                }
                if near_kink {
                    skipped += 1;
                    continue;
                }
            }
            let l_plus = loss(&forward_y(&plus, mode, &c), &w);
            let l_minus = loss(&forward_y(&minus, mode, &c), &w);
            let numeric = (l_plus - l_minus) / (2.0 * H);
            let err = (numeric - a).abs() / a.abs().max(1.0);
            max_err = max_err.max(err);
            assert!(
                err <= TOL,
                "{mode:?} relu={relu} d{which:?}[{i}]: analytic {a:e}, numeric {numeric:e}, rel err {err:e}"
            );
            checked += 1;
        }
    }
    let total = checked + skipped;
    assert_eq!(total, 90 + 15 + 15);
    assert!(
        skipped * 10 <= total,
        "{mode:?} relu={relu}: too many elements skipped near the ReLU kink ({skipped}/{total})"
    );
    eprintln!("{mode:?} relu={relu}: checked {checked}, skipped {skipped}, max rel err {max_err:e}");
}

#[test]
fn grad_check_train_no_relu() {
    grad_check(Mode::Train, false, 1);
    grad_check(Mode::Train, false, 2);
}

#[test]
fn grad_check_train_relu() {
    grad_check(Mode::Train, true, 3);
    grad_check(Mode::Train, true, 4);
}

#[test]
fn grad_check_infer_no_relu() {
    grad_check(Mode::Infer, false, 5);
    grad_check(Mode::Infer, false, 6);
}

#[test]
fn grad_check_infer_relu() {
    grad_check(Mode::Infer, true, 7);
    grad_check(Mode::Infer, true, 8);
}

// ---------------------------------------------------------------------------------------------
// 3. Properties
// ---------------------------------------------------------------------------------------------

/// Hand-computed example, all values exact in binary (eps = 0).
#[test]
fn hand_computed_example() {
    // N = 2, H = 1, W = 2, C = 1; sample 0 in dataset 0, sample 1 in dataset 1.
    let x = Array4::from_shape_vec((2, 1, 2, 1), vec![1.0, 3.0, 2.0, 6.0]).unwrap();
    let gamma = Array2::from_shape_vec((2, 1), vec![2.0, 3.0]).unwrap();
    let beta = Array2::from_shape_vec((2, 1), vec![0.5, -1.0]).unwrap();
    let rm = Array2::from_shape_vec((2, 1), vec![0.0, 10.0]).unwrap();
    let rv = Array2::from_shape_vec((2, 1), vec![1.0, 1.0]).unwrap();
    let run = |relu: bool| {
        dsbn_forward_train(x.view(), &[0, 1], gamma.view(), beta.view(), rm.view(), rv.view(), &cfg(0.0, 0.5, relu))
            .unwrap()
    };
    // Dataset 0: values {1, 3}: mean 2, biased var 1, unbiased 2, xhat {-1, 1}.
    // Dataset 1: values {2, 6}: mean 4, biased var 4, unbiased 8, xhat {-1, 1}.
    let out = run(false);
    assert_eq!(out.y.iter().copied().collect::<Vec<_>>(), vec![-1.5, 2.5, -4.0, 2.0]);
    assert_eq!(out.mean.iter().copied().collect::<Vec<_>>(), vec![2.0, 4.0]);
    assert_eq!(out.var.iter().copied().collect::<Vec<_>>(), vec![1.0, 4.0]);
    assert_eq!(out.invstd.iter().copied().collect::<Vec<_>>(), vec![1.0, 0.5]);
    assert_eq!(out.running_mean.iter().copied().collect::<Vec<_>>(), vec![1.0, 7.0]);
    assert_eq!(out.running_var.iter().copied().collect::<Vec<_>>(), vec![1.5, 4.5]);
    assert_eq!(out.counts, vec![2, 2]);
    let out = run(true);
    assert_eq!(out.y.iter().copied().collect::<Vec<_>>(), vec![0.0, 2.5, 0.0, 2.0]);

    // Inference with running stats (0, 1) and (10, 1), eps = 0:
    // y = (x - rm) / sqrt(rv) * gamma + beta.
    let y =
        dsbn_forward_infer(x.view(), &[0, 1], gamma.view(), beta.view(), rm.view(), rv.view(), &cfg(0.0, 0.5, false))
            .unwrap();
    assert_eq!(y.iter().copied().collect::<Vec<_>>(), vec![2.5, 6.5, -25.0, -13.0]);
}

#[test]
fn default_config_matches_pytorch() {
    let c = DsbnConfig::default();
    assert_eq!(c.eps, 1e-5);
    assert_eq!(c.momentum, 0.1);
    assert!(!c.relu);
}

/// Per dataset and channel: the statistics are those of the gathered values, the output has
/// mean beta and biased variance gamma^2 * var / (var + eps), and the running statistics follow
/// PyTorch's update with the unbiased variance.
#[test]
fn per_dataset_statistics_and_output_moments() {
    // Dataset 1 absent; dataset 3 has a single sample. Large eps so that its placement matters.
    let datasets = [2, 0, 2, 2, 0, 3, 0];
    let (h, w, c, d) = (3, 2, 4, 4);
    let p = Problem::new(11, &datasets, (h, w, c), d);
    let (eps, momentum) = (0.1, 0.3);
    let out = p.train(&cfg(eps, momentum, false)).unwrap();

    for ds in 0..d {
        let members: Vec<usize> = (0..datasets.len()).filter(|&n| datasets[n] == ds).collect();
        let m = members.len() * h * w;
        assert_eq!(out.counts[ds], m, "count of dataset {ds}");
        if m == 0 {
            continue;
        }
        for ci in 0..c {
            let mut xs = Vec::new();
            let mut ys = Vec::new();
            for &n in &members {
                for hi in 0..h {
                    for wi in 0..w {
                        xs.push(p.x[[n, hi, wi, ci]]);
                        ys.push(out.y[[n, hi, wi, ci]]);
                    }
                }
            }
            let mean_x = xs.iter().sum::<f64>() / m as f64;
            let var_x = xs.iter().map(|v| (v - mean_x).powi(2)).sum::<f64>() / m as f64;
            let mean_y = ys.iter().sum::<f64>() / m as f64;
            let var_y = ys.iter().map(|v| (v - mean_y).powi(2)).sum::<f64>() / m as f64;
            let what = format!("dataset {ds} channel {ci}");

            assert_close(out.mean[[ds, ci]], mean_x, 1e-12, &format!("mean, {what}"));
            assert_close(out.var[[ds, ci]], var_x, 1e-12, &format!("var, {what}"));
            assert_close(out.invstd[[ds, ci]], 1.0 / (var_x + eps).sqrt(), 1e-12, &format!("invstd, {what}"));
            assert_close(mean_y, p.beta[[ds, ci]], 1e-12, &format!("output mean, {what}"));
            let g = p.gamma[[ds, ci]];
            assert_close(var_y, g * g * var_x / (var_x + eps), 1e-12, &format!("output variance, {what}"));
            assert_close(
                out.running_mean[[ds, ci]],
                (1.0 - momentum) * p.running_mean[[ds, ci]] + momentum * mean_x,
                1e-12,
                &format!("running mean, {what}"),
            );
            assert_close(
                out.running_var[[ds, ci]],
                (1.0 - momentum) * p.running_var[[ds, ci]] + momentum * var_x * m as f64 / (m as f64 - 1.0),
                1e-12,
                &format!("running var, {what}"),
            );
        }
    }
}

/// An absent dataset's running statistics come back bit for bit, and its reported mean, var and
/// invstd are 0. Includes -0.0 and NaN, which any arithmetic "update" would alter.
#[test]
fn absent_dataset_is_untouched() {
    let datasets = [0, 2, 0, 2];
    let mut p = Problem::new(21, &datasets, (2, 2, 3), 3);
    p.running_mean[[1, 0]] = -0.0;
    p.running_var[[1, 1]] = f64::NAN;
    p.running_mean[[1, 2]] = 1.0e-310; // subnormal
    for relu in [false, true] {
        let out = p.train(&cfg(1e-5, 0.25, relu)).unwrap();
        assert_eq!(out.counts, vec![8, 0, 8]);
        for ci in 0..3 {
            assert_eq!(out.running_mean[[1, ci]].to_bits(), p.running_mean[[1, ci]].to_bits(), "running_mean[1, {ci}]");
            assert_eq!(out.running_var[[1, ci]].to_bits(), p.running_var[[1, ci]].to_bits(), "running_var[1, {ci}]");
            assert_eq!(out.mean[[1, ci]], 0.0);
            assert_eq!(out.var[[1, ci]], 0.0);
            assert_eq!(out.invstd[[1, ci]], 0.0);
            // Present datasets are updated.
            assert_ne!(out.running_mean[[0, ci]], p.running_mean[[0, ci]]);
            assert_ne!(out.running_var[[2, ci]], p.running_var[[2, ci]]);
        }
        let dy = rand4(&mut Rng(5), p.x.dim(), -1.0, 1.0);
        let grads = p.backward_train(&dy, &cfg(1e-5, 0.25, relu)).unwrap();
        for ci in 0..3 {
            assert_eq!(grads.dgamma[[1, ci]].to_bits(), 0.0f64.to_bits());
            assert_eq!(grads.dbeta[[1, ci]].to_bits(), 0.0f64.to_bits());
        }
    }
}

/// A dataset with a single sample (but H * W > 1 values) is normalised with its own statistics
/// only: identical to running the reference on that sample alone with D = 1.
#[test]
fn single_sample_dataset_uses_own_stats() {
    let datasets = [0, 2, 0];
    let p = Problem::new(31, &datasets, (2, 3, 5), 3);
    let alone = p.only_dataset(2);
    assert_eq!(alone.x.dim().0, 1);
    for relu in [false, true] {
        let c = cfg(1e-5, 0.1, relu);
        let mixed = p.train(&c).unwrap();
        let single = alone.train(&c).unwrap();
        let what = format!("relu={relu}");
        assert_close4(mixed.y.slice(s![1..2, .., .., ..]), single.y.view(), 1e-13, &what);
        assert_close2(mixed.mean.slice(s![2..3, ..]), single.mean.view(), 1e-13, &what);
        assert_close2(mixed.var.slice(s![2..3, ..]), single.var.view(), 1e-13, &what);
        assert_close2(mixed.running_var.slice(s![2..3, ..]), single.running_var.view(), 1e-13, &what);

        let dy = rand4(&mut Rng(9), p.x.dim(), -1.0, 1.0);
        let gm = p.backward_train(&dy, &c).unwrap();
        let gs = alone.backward_train(&dy.slice(s![1..2, .., .., ..]).to_owned(), &c).unwrap();
        assert_close4(gm.dx.slice(s![1..2, .., .., ..]), gs.dx.view(), 1e-13, &what);
        assert_close2(gm.dgamma.slice(s![2..3, ..]), gs.dgamma.view(), 1e-13, &what);
        assert_close2(gm.dbeta.slice(s![2..3, ..]), gs.dbeta.view(), 1e-13, &what);
    }
}

/// A mixed batch gives the same results as running each dataset's samples as a separate batch
/// with D = 1, for the training forward, both backward passes and the inference forward.
#[test]
fn mixed_batch_equals_separate_batches() {
    let datasets = [1, 0, 1, 2, 0, 1];
    let d = 4; // dataset 3 absent
    let p = Problem::new(41, &datasets, (2, 2, 3), d);
    let dy = rand4(&mut Rng(77), p.x.dim(), -1.0, 1.0);
    for relu in [false, true] {
        let c = cfg(1e-3, 0.2, relu);
        let mixed = p.train(&c).unwrap();
        let mixed_infer = p.infer(&c).unwrap();
        let gm = p.backward_train(&dy, &c).unwrap();
        let gim = p.backward_infer(&dy, &c).unwrap();
        for ds in 0..d {
            let idx: Vec<usize> = (0..datasets.len()).filter(|&n| datasets[n] == ds).collect();
            let what = format!("relu={relu} dataset {ds}");
            if idx.is_empty() {
                assert_eq!(mixed.counts[ds], 0);
                continue;
            }
            let sub = p.only_dataset(ds);
            let sub_dy = dy.select(Axis(0), &idx);
            let sep = sub.train(&c).unwrap();
            let sep_infer = sub.infer(&c).unwrap();
            let gs = sub.backward_train(&sub_dy, &c).unwrap();
            let gis = sub.backward_infer(&sub_dy, &c).unwrap();
            let rows = s![ds..ds + 1, ..];

            assert_eq!(mixed.counts[ds], sep.counts[0], "{what}");
            assert_close4(mixed.y.select(Axis(0), &idx).view(), sep.y.view(), 1e-13, &what);
            assert_close2(mixed.mean.slice(rows), sep.mean.view(), 1e-13, &what);
            assert_close2(mixed.var.slice(rows), sep.var.view(), 1e-13, &what);
            assert_close2(mixed.invstd.slice(rows), sep.invstd.view(), 1e-13, &what);
            assert_close2(mixed.running_mean.slice(rows), sep.running_mean.view(), 1e-13, &what);
            assert_close2(mixed.running_var.slice(rows), sep.running_var.view(), 1e-13, &what);
            assert_close4(mixed_infer.select(Axis(0), &idx).view(), sep_infer.view(), 1e-13, &what);
            assert_close4(gm.dx.select(Axis(0), &idx).view(), gs.dx.view(), 1e-13, &what);
            assert_close2(gm.dgamma.slice(rows), gs.dgamma.view(), 1e-13, &what);
            assert_close2(gm.dbeta.slice(rows), gs.dbeta.view(), 1e-13, &what);
            assert_close4(gim.dx.select(Axis(0), &idx).view(), gis.dx.view(), 1e-13, &what);
            assert_close2(gim.dgamma.slice(rows), gis.dgamma.view(), 1e-13, &what);
            assert_close2(gim.dbeta.slice(rows), gis.dbeta.view(), 1e-13, &what);
        }
    }
}

/// Inference with running statistics set to the batch statistics (biased variance) reproduces
/// the training output, and the ReLU variants are exactly max(0, y) of the plain ones.
#[test]
fn inference_with_batch_stats_matches_training_and_relu_is_max_zero() {
    let datasets = [0, 1, 1, 0, 1];
    let p = Problem::new(51, &datasets, (3, 3, 4), 2);
    for relu in [false, true] {
        let c = cfg(1e-2, 0.1, relu);
        let out = p.train(&c).unwrap();
        let mut q = p.clone();
        q.running_mean = out.mean.clone();
        q.running_var = out.var.clone();
        let y_infer = q.infer(&c).unwrap();
        assert_close4(y_infer.view(), out.y.view(), 1e-12, &format!("relu={relu}"));
    }
    let plain = p.train(&cfg(1e-5, 0.1, false)).unwrap().y;
    let relu = p.train(&cfg(1e-5, 0.1, true)).unwrap().y;
    assert_eq!(relu, plain.mapv(|v| v.max(0.0)));
    let plain = p.infer(&cfg(1e-5, 0.1, false)).unwrap();
    let relu = p.infer(&cfg(1e-5, 0.1, true)).unwrap();
    assert_eq!(relu, plain.mapv(|v| v.max(0.0)));
}

/// Adding a constant to all inputs of one (dataset, channel) group leaves the training output
/// unchanged, so without ReLU the input gradient of every group sums to zero.
#[test]
fn train_dx_sums_to_zero_per_group() {
    let datasets = [0, 2, 0, 1];
    let (h, w, c) = (2, 3, 3);
    let p = Problem::new(61, &datasets, (h, w, c), 3);
    let dy = rand4(&mut Rng(13), p.x.dim(), -1.0, 1.0);
    let g = p.backward_train(&dy, &cfg(1e-5, 0.1, false)).unwrap();
    let mut sums = Array2::<f64>::zeros((3, c));
    let mut scale = Array2::<f64>::zeros((3, c));
    for ((n, _, _, ci), v) in g.dx.indexed_iter() {
        sums[[datasets[n], ci]] += v;
        scale[[datasets[n], ci]] += v.abs();
    }
    for ((ds, ci), s) in sums.indexed_iter() {
        assert!(scale[[ds, ci]] > 0.1, "dx is trivially zero");
        assert!(s.abs() <= 1e-12 * scale[[ds, ci]], "sum of dx[{ds}, {ci}] = {s:e}");
    }
}

#[test]
fn too_few_values_per_channel_is_an_error() {
    let c = DsbnConfig::default();
    // H = W = 1: a dataset with one sample has one value per channel.
    let p = Problem::new(71, &[0, 1], (1, 1, 3), 2);
    let dy = Array4::<f64>::ones(p.x.dim());
    let expected = ReferenceError::TooFewValues { dataset: 0, count: 1 };
    assert_eq!(p.train(&c).unwrap_err(), expected);
    assert_eq!(p.backward_train(&dy, &c).unwrap_err(), expected);
    // Inference needs no batch statistics.
    assert!(p.infer(&c).is_ok());
    assert!(p.backward_infer(&dy, &c).is_ok());

    let p = Problem::new(72, &[0, 0, 1], (1, 1, 3), 2);
    let expected = ReferenceError::TooFewValues { dataset: 1, count: 1 };
    assert_eq!(p.train(&c).unwrap_err(), expected);
    assert!(expected.to_string().contains("more than 1 value per channel"));

    // Two samples of one dataset (the other absent) are fine, as is one sample with H * W > 1.
    let p = Problem::new(73, &[1, 1], (1, 1, 3), 2);
    assert_eq!(p.train(&c).unwrap().counts, vec![0, 2]);
    let p = Problem::new(74, &[0], (1, 2, 3), 2);
    assert_eq!(p.train(&c).unwrap().counts, vec![2, 0]);
}

#[test]
fn out_of_range_dataset_is_an_error() {
    let c = DsbnConfig::default();
    let p = Problem::new(81, &[0, 1, 1], (2, 2, 2), 3);
    let mut bad = p.clone();
    bad.datasets = vec![0, 3, 1];
    let dy = Array4::<f64>::ones(p.x.dim());
    let expected = ReferenceError::DatasetOutOfRange { sample: 1, index: 3, num_datasets: 3 };
    assert_eq!(bad.train(&c).unwrap_err(), expected);
    assert_eq!(bad.infer(&c).unwrap_err(), expected);
    assert_eq!(bad.backward_train(&dy, &c).unwrap_err(), expected);
    assert_eq!(bad.backward_infer(&dy, &c).unwrap_err(), expected);
    assert!(!expected.to_string().is_empty());
}

#[test]
fn inconsistent_shapes_are_errors() {
    let c = DsbnConfig::default();
    let p = Problem::new(91, &[0, 1, 1], (2, 2, 2), 2);
    let dy = Array4::<f64>::ones(p.x.dim());
    let is_shape = |r: Result<(), ReferenceError>| matches!(r, Err(ReferenceError::Shape(_)));

    let mut q = p.clone();
    q.datasets = vec![0, 1];
    assert!(is_shape(q.train(&c).map(|_| ())));
    assert!(is_shape(q.infer(&c).map(|_| ())));

    let mut q = p.clone();
    q.gamma = Array2::ones((2, 3)); // wrong C
    assert!(is_shape(q.train(&c).map(|_| ())));
    assert!(is_shape(q.backward_train(&dy, &c).map(|_| ())));

    let mut q = p.clone();
    q.running_var = Array2::ones((3, 2)); // wrong D
    assert!(is_shape(q.train(&c).map(|_| ())));
    assert!(is_shape(q.infer(&c).map(|_| ())));
    assert!(is_shape(q.backward_infer(&dy, &c).map(|_| ())));

    let mut q = p.clone();
    q.beta = Array2::ones((1, 2)); // D differs from gamma
    assert!(is_shape(q.backward_train(&dy, &c).map(|_| ())));

    let bad_dy = Array4::<f64>::ones((3, 2, 2, 3));
    assert!(is_shape(p.backward_train(&bad_dy, &c).map(|_| ())));
    assert!(is_shape(p.backward_infer(&bad_dy, &c).map(|_| ())));
}
