//! The dataset-aware pyramid pooling module (`ops::ppm`) through the emulator against the
//! composition of the f64 references (`reference::ppm`): random batches (N 1–4, H and W 1–13,
//! odd and smaller than the largest bin, C 1–20, branch channels 1–9, D 1–3 with mixed and
//! absent datasets, PSPNet's bins or random ones, both `align_corners`, with and without ReLU),
//! training forward (output, running statistics), inference forward and backward (dx, and
//! every branch's dweight, dgamma, dbeta); a finite-difference check of the reference itself;
//! bitwise determinism across emulator seeds; typed errors that write nothing.
//!
//! Tolerances, from the f32 error of each step (u = 2^-24), all computed per case from the
//! reference's intermediates:
//! - a branch's convolution output is a pooled average (a sum of at most A values, A the
//!   largest bin area) pushed through a C-term dot product: its error is at most
//!   e_conv = u (C + A + 4) Σ_c |w_kc| max|x|;
//! - batch normalisation divides that error by the group's standard deviation and adds the
//!   error of the statistics (the variance's relative error is ~2 e_conv·invstd): the
//!   pre-activation is off by at most e_pre = |γ| invstd e_conv (2 + max|x̂|) + 4u |y| per
//!   (branch, dataset, channel). The bound follows the conditioning of the group: a
//!   two-value group whose values nearly coincide gets the large tolerance it needs;
//! - the bilinear upsampling is a convex combination, plus the error of its f32 weights,
//!   u max|y| (8 (b + 2) + 3) (tests/pool.rs);
//! - the backward's relative error is at most ρ = 1e-5 + 4 invstd e_conv (2 + max|x̂|) of the
//!   magnitude of each result (the BN backward's terms, as in tests/dab.rs, weighted by their
//!   group's ρ and pushed through the convolution and pooling backwards on absolute values):
//!   1e-5 is ~170 u, well above the f32 error of the chain, the second term the error
//!   inherited from the forward's statistics (dβ = Σ g does not see them: 1e-5 alone).
//!
//! Where a group's values nearly coincide (two samples at a 1×1 bin), x̂ is ±1 almost
//! regardless of x and the BN backward is a cancellation of terms of size |γ| invstd |g|: the
//! bounds then exceed the (tiny) true gradient, as f32 arithmetic does; the other groups and
//! cases keep them far below the values. Every bound is doubled for margin. A wrong dataset slice, channel offset, tap or bin is off
//! by O(1), orders of magnitude more. With ReLU, a pre-activation within its error bound of 0
//! could be masked differently by the kernel and the reference; such groups get their β moved
//! away from the kink (β does not enter the statistics) before the comparison.

mod common;

use cdcl::ops::dsbn::{DsbnOptions, DsbnState};
use cdcl::ops::ppm::{self, PpmBranch, PpmForward, PpmOptions};
use cdcl::reference::dsbn::{DsbnConfig, ReferenceError};
use cdcl::reference::{conv as rconv, pool as rpool, ppm as rppm};
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, bits, host, tensor, Rng};
use ndarray::{s, Array2, Array4, ArrayView4};

/// The op with owned branches (the tests build their parameters as [`PpmBranch`]es).
fn train_fwd(x: &Tensor, ds: &Tensor, branches: &mut [PpmBranch], opts: &PpmOptions) -> cdcl::Result<PpmForward> {
    let mut views: Vec<_> = branches.iter_mut().map(PpmBranch::view_mut).collect();
    ppm::forward_train(x, ds, &mut views, opts)
}

fn infer_fwd(x: &Tensor, ds: &Tensor, branches: &[PpmBranch], opts: &PpmOptions) -> cdcl::Result<Tensor> {
    let views: Vec<_> = branches.iter().map(PpmBranch::view).collect();
    ppm::forward_infer(x, ds, &views, opts)
}

fn train_bwd(
    dy: &Tensor,
    ds: &Tensor,
    branches: &[PpmBranch],
    fwd: &PpmForward,
    opts: &PpmOptions,
) -> cdcl::Result<ppm::PpmGrads> {
    let views: Vec<_> = branches.iter().map(PpmBranch::view).collect();
    ppm::backward_train(dy, ds, &views, &fwd.saved, opts)
}
use proptest::prelude::*;

const U: f64 = f32::EPSILON as f64 / 2.0;
/// The backward chain's own relative error bound: ~170 u, a few times the longest chain of
/// f32 roundings between dy and a gradient (resize, BN, convolution and pooling backwards).
const RHO_BASE: f64 = 1e-5;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    bins: Vec<usize>,
    /// Output channels of each branch.
    ks: Vec<usize>,
    d: usize,
    datasets: Vec<usize>,
    align_corners: bool,
    relu: bool,
    seed: u64,
}

impl Case {
    fn total(&self) -> usize {
        self.c + self.ks.iter().sum::<usize>()
    }
    fn offsets(&self) -> Vec<usize> {
        let mut off = self.c;
        self.ks
            .iter()
            .map(|&k| {
                off += k;
                off - k
            })
            .collect()
    }
}

/// Moves every sample of a single-sample dataset to another sample's dataset (N >= 2), so that
/// a 1×1 bin has batch statistics everywhere.
fn no_singletons(datasets: &mut [usize]) {
    let n = datasets.len();
    if n < 2 {
        return;
    }
    for i in 0..n {
        if datasets.iter().filter(|&&d| d == datasets[i]).count() == 1 {
            datasets[i] = datasets[(i + 1) % n];
        }
    }
}

fn strategy() -> impl Strategy<Value = Case> {
    (
        (1usize..=4, 1usize..=13, 1usize..=13, 1usize..=20),
        prop_oneof![Just(vec![1usize, 2, 3, 6]), proptest::collection::vec(1usize..=7, 1..=4)],
        1usize..=3,
        any::<(bool, bool, bool)>(),
        any::<u64>(),
    )
        .prop_flat_map(|((n, h, w, c), bins, d, (align_corners, relu, pairs), seed)| {
            let nb = bins.len();
            (proptest::collection::vec(0..d, n), proptest::collection::vec(1usize..=9, nb)).prop_map(
                move |(mut datasets, ks)| {
                    // Most cases keep every dataset at two samples or more so that the 1×1 bin
                    // trains; the rest test the TooFewValues path.
                    if pairs || c % 3 != 0 {
                        no_singletons(&mut datasets);
                    }
                    Case { n, h, w, c, bins: bins.clone(), ks, d, datasets, align_corners, relu, seed }
                },
            )
        })
}

struct BranchData {
    w: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    rmean: Vec<f64>,
    rvar: Vec<f64>,
}

struct Data {
    x: Vec<f64>,
    dy: Vec<f64>,
    branches: Vec<BranchData>,
}

fn make_data(k: &Case) -> Data {
    let mut g = Rng(k.seed);
    let mut v =
        |len: usize, lo: f64, hi: f64| -> Vec<f64> { (0..len).map(|_| g.uniform(lo, hi) as f32 as f64).collect() };
    let x = v(k.n * k.h * k.w * k.c, -2.0, 2.0);
    let dy = v(k.n * k.h * k.w * k.total(), -1.0, 1.0);
    let branches =
        k.ks.iter()
            .map(|&kk| BranchData {
                w: v(kk * k.c, -1.0, 1.0),
                gamma: v(k.d * kk, 0.5, 1.5),
                beta: v(k.d * kk, -0.5, 0.5),
                rmean: v(k.d * kk, -0.5, 0.5),
                rvar: v(k.d * kk, 0.5, 2.0),
            })
            .collect();
    Data { x, dy, branches }
}

fn a2(d: usize, k: usize, v: &[f64]) -> Array2<f64> {
    Array2::from_shape_vec((d, k), v.to_vec()).unwrap()
}

fn ref_branches(k: &Case, dt: &Data) -> Vec<rppm::PpmBranch> {
    dt.branches
        .iter()
        .zip(&k.ks)
        .map(|(b, &kk)| rppm::PpmBranch {
            weight: Array4::from_shape_vec((kk, 1, 1, k.c), b.w.clone()).unwrap(),
            gamma: a2(k.d, kk, &b.gamma),
            beta: a2(k.d, kk, &b.beta),
            running_mean: a2(k.d, kk, &b.rmean),
            running_var: a2(k.d, kk, &b.rvar),
        })
        .collect()
}

fn ref_config(k: &Case, relu: bool) -> rppm::PpmConfig {
    rppm::PpmConfig {
        bins: k.bins.clone(),
        align_corners: k.align_corners,
        dsbn: DsbnConfig { relu, ..DsbnConfig::default() },
    }
}

fn options(k: &Case) -> PpmOptions {
    PpmOptions {
        bins: k.bins.clone(),
        align_corners: k.align_corners,
        dsbn: DsbnOptions { relu: k.relu, ..DsbnOptions::default() },
    }
}

fn kernel_branches(dev: &Device, k: &Case, dt: &Data, dtype: DType) -> Vec<PpmBranch> {
    dt.branches
        .iter()
        .zip(&k.ks)
        .map(|(b, &kk)| {
            let mut state = DsbnState::new(dev, k.d, kk).unwrap();
            state.gamma = tensor(dev, &[k.d, kk], &b.gamma, DType::F32);
            state.beta = tensor(dev, &[k.d, kk], &b.beta, DType::F32);
            state.running_mean = tensor(dev, &[k.d, kk], &b.rmean, DType::F32);
            state.running_var = tensor(dev, &[k.d, kk], &b.rvar, DType::F32);
            PpmBranch { weight: tensor(dev, &[kk, 1, 1, k.c], &b.w, dtype), state }
        })
        .collect()
}

fn dataset_tensor(dev: &Device, ds: &[usize]) -> Tensor {
    Tensor::from_slice(dev, &[ds.len()], &ds.iter().map(|&d| d as i32).collect::<Vec<_>>()).unwrap()
}

fn max_abs<'a>(v: impl IntoIterator<Item = &'a f64>) -> f64 {
    v.into_iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn abs4(a: &Array4<f64>) -> Array4<f64> {
    a.mapv(f64::abs)
}

/// The largest bin area of a `bin × bin` adaptive pooling of an `h × w` input.
fn max_area(h: usize, w: usize, bin: usize) -> usize {
    let len = |inp: usize| (0..bin).map(|i| rpool::pool_bin(i, inp, bin)).map(|(a, b)| b - a).max().unwrap();
    len(h) * len(w)
}

/// Per-branch error model (see the module documentation), from the reference's forward.
struct BranchTol {
    /// e_conv per output channel.
    conv: Vec<f64>,
    /// e_pre per (dataset, channel).
    pre: Array2<f64>,
    /// ρ per (dataset, channel).
    rho: Array2<f64>,
    /// The upsampling's weight error, absolute.
    resize: f64,
}

fn branch_tol(
    k: &Case,
    dt: &Data,
    i: usize,
    conv: &Array4<f64>,
    mean: &Array2<f64>,
    invstd: &Array2<f64>,
    y: &Array4<f64>,
) -> BranchTol {
    let kk = k.ks[i];
    let b = k.bins[i];
    let xmax = max_abs(&dt.x);
    let area = max_area(k.h, k.w, b) as f64;
    let e_conv: Vec<f64> = (0..kk)
        .map(|ch| {
            let wsum: f64 = dt.branches[i].w[ch * k.c..(ch + 1) * k.c].iter().map(|v| v.abs()).sum();
            U * (k.c as f64 + area + 4.0) * wsum * xmax
        })
        .collect();
    let mut xh_max = Array2::<f64>::zeros((k.d, kk));
    let mut y_max = Array2::<f64>::zeros((k.d, kk));
    for ((n, p, q, ch), &v) in conv.indexed_iter() {
        let d = k.datasets[n];
        let xh = (v - mean[[d, ch]]) * invstd[[d, ch]];
        xh_max[[d, ch]] = f64::max(xh_max[[d, ch]], xh.abs());
        y_max[[d, ch]] = f64::max(y_max[[d, ch]], y[[n, p, q, ch]].abs());
    }
    let gamma = &dt.branches[i].gamma;
    let mut pre = Array2::<f64>::zeros((k.d, kk));
    let mut rho = Array2::<f64>::zeros((k.d, kk));
    for d in 0..k.d {
        for ch in 0..kk {
            let cond = invstd[[d, ch]] * e_conv[ch] * (2.0 + xh_max[[d, ch]]);
            pre[[d, ch]] = gamma[d * kk + ch].abs() * cond + 4.0 * U * y_max[[d, ch]];
            rho[[d, ch]] = RHO_BASE + 4.0 * cond;
        }
    }
    let resize = U * max_abs(y.iter()) * (8.0 * (b + 2) as f64 + 3.0);
    BranchTol { conv: e_conv, pre, rho, resize }
}

/// Checks the concatenated output: the identity slice exactly, each branch's slice within
/// 2 (e_pre + resize) of its element's (dataset, channel).
fn check_output(what: &str, k: &Case, got: &[f64], want: &Array4<f64>, tols: &[BranchTol]) -> Result<(), String> {
    let total = k.total();
    let offsets = k.offsets();
    let want: Vec<f64> = want.iter().copied().collect();
    assert_close(what, got, &want, |e| {
        let ch = e % total;
        let n = e / (k.h * k.w * total);
        if ch < k.c {
            return 0.0;
        }
        let i = offsets.iter().rposition(|&o| o <= ch).unwrap();
        let t = &tols[i];
        2.0 * (t.pre[[k.datasets[n], ch - offsets[i]]] + t.resize)
    })
}

/// Moves β of every (branch, dataset, channel) group whose pre-activation comes within 4 e_pre
/// of the ReLU's kink. Returns false if some group could not be cleared.
fn clear_relu_kinks(k: &Case, dt: &mut Data, tols: &[BranchTol]) -> bool {
    for _ in 0..8 {
        let fwd = rppm::ppm_forward_train(
            ArrayView4::from_shape((k.n, k.h, k.w, k.c), &dt.x).unwrap(),
            &k.datasets,
            &ref_branches(k, dt),
            &ref_config(k, false),
        )
        .unwrap();
        let mut moved = false;
        for (i, br) in fwd.branches.iter().enumerate() {
            let kk = k.ks[i];
            for ((n, _, _, ch), &v) in br.bn.y.indexed_iter() {
                let d = k.datasets[n];
                let band = 4.0 * tols[i].pre[[d, ch]];
                if v.abs() < band {
                    dt.branches[i].beta[d * kk + ch] += (8.0 * band).max(0.05);
                    moved = true;
                }
            }
        }
        if !moved {
            return true;
        }
    }
    false
}

fn running_stats_bits(branches: &[PpmBranch]) -> Vec<Vec<u8>> {
    branches.iter().flat_map(|b| [bits(&b.state.running_mean), bits(&b.state.running_var)]).collect()
}

fn run(k: &Case, dev: &Device) -> Result<(), String> {
    let mut dt = make_data(k);
    let xd = (k.n, k.h, k.w, k.c);
    let x_view = |dt: &Data| ArrayView4::from_shape(xd, &dt.x).unwrap().to_owned();
    let ds = dataset_tensor(dev, &k.datasets);
    let opts = options(k);

    // ---- inference forward, from the random running statistics ----------------------------
    {
        let x = tensor(dev, &[k.n, k.h, k.w, k.c], &dt.x, DType::F32);
        let branches = kernel_branches(dev, k, &dt, DType::F32);
        let got = infer_fwd(&x, &ds, &branches, &opts).map_err(|e| format!("forward_infer: {e}"))?;
        let rb = ref_branches(k, &dt);
        let want = rppm::ppm_forward_infer(x_view(&dt).view(), &k.datasets, &rb, &ref_config(k, k.relu))
            .map_err(|e| e.to_string())?;
        // The statistics are constants: e_pre = |γ| invstd_running e_conv + 4u|y|.
        let mut tols = Vec::new();
        for (i, br) in rb.iter().enumerate() {
            let pooled = rpool::adaptive_avg_pool2d(x_view(&dt).view(), k.bins[i], k.bins[i]);
            let conv = rconv::conv2d(pooled.view(), br.weight.view(), None, &rconv::ConvSpec::default());
            let invstd = br.running_var.mapv(|v| 1.0 / (v + 1e-5).sqrt());
            let y = conv.clone(); // magnitudes only
            let mut t = branch_tol(k, &dt, i, &conv, &br.running_mean, &invstd, &y);
            let ymax = max_abs(want.iter());
            t.pre.indexed_iter_mut().for_each(|((d, ch), v)| {
                *v = br.gamma[[d, ch]].abs() * invstd[[d, ch]] * t.conv[ch] + 4.0 * U * ymax;
            });
            t.resize = U * ymax * (8.0 * (k.bins[i] + 2) as f64 + 3.0);
            tols.push(t);
        }
        check_output("inference output", k, &host(&got), &want, &tols)?;
    }

    // ---- training forward ---------------------------------------------------------------------
    let rf0 = rppm::ppm_forward_train(x_view(&dt).view(), &k.datasets, &ref_branches(k, &dt), &ref_config(k, false));
    let rf0 = match rf0 {
        Err(ReferenceError::TooFewValues { dataset, count }) => {
            let x = tensor(dev, &[k.n, k.h, k.w, k.c], &dt.x, DType::F32);
            let mut branches = kernel_branches(dev, k, &dt, DType::F32);
            let before = running_stats_bits(&branches);
            return match train_fwd(&x, &ds, &mut branches, &opts) {
                Err(Error::TooFewValues { dataset: d2, count: c2 }) if (d2, c2) == (dataset, count) => {
                    if running_stats_bits(&branches) != before {
                        return Err("TooFewValues moved running statistics".into());
                    }
                    Ok(())
                }
                other => Err(format!("expected TooFewValues {{ dataset: {dataset}, count: {count} }}, got {other:?}")),
            };
        }
        Err(e) => return Err(e.to_string()),
        Ok(f) => f,
    };
    let tols: Vec<BranchTol> = rf0
        .branches
        .iter()
        .enumerate()
        .map(|(i, b)| branch_tol(k, &dt, i, &b.conv, &b.bn.mean, &b.bn.invstd, &b.bn.y))
        .collect();
    if k.relu && !clear_relu_kinks(k, &mut dt, &tols) {
        return Err("could not move the pre-activations away from the ReLU kink".into());
    }
    let rbranches = ref_branches(k, &dt);
    let cfg = ref_config(k, k.relu);
    let rf = rppm::ppm_forward_train(x_view(&dt).view(), &k.datasets, &rbranches, &cfg).map_err(|e| e.to_string())?;

    let x = tensor(dev, &[k.n, k.h, k.w, k.c], &dt.x, DType::F32);
    let mut branches = kernel_branches(dev, k, &dt, DType::F32);
    let fwd = train_fwd(&x, &ds, &mut branches, &opts).map_err(|e| format!("forward_train: {e}"))?;
    if fwd.output.shape() != [k.n, k.h, k.w, k.total()] {
        return Err(format!("output shape {:?}", fwd.output.shape()));
    }
    check_output("training output", k, &host(&fwd.output), &rf.y, &tols)?;
    for (i, (br, rbr)) in branches.iter().zip(&rf.branches).enumerate() {
        let kk = k.ks[i];
        let t = &tols[i];
        // mean: e_conv plus the f32 summation of M values; variance: 2 |dev| (e_conv + e_mean)
        // plus its own summation; both scaled by momentum 0.1 and the unbiased factor (<= 2).
        let (max_conv, m_max) = (max_abs(rbr.conv.iter()), rbr.bn.counts.iter().copied().max().unwrap() as f64);
        let e_mean: Vec<f64> = (0..kk).map(|ch| t.conv[ch] + U * (m_max + 2.0) * max_conv).collect();
        let want_m = rbr.bn.running_mean.as_slice().unwrap();
        let want_v = rbr.bn.running_var.as_slice().unwrap();
        assert_close(&format!("branch {i} running_mean"), &host(&br.state.running_mean), want_m, |e| {
            2.0 * (0.1 * e_mean[e % kk] + 4.0 * U * want_m[e].abs())
        })?;
        assert_close(&format!("branch {i} running_var"), &host(&br.state.running_var), want_v, |e| {
            let (d, ch) = (e / kk, e % kk);
            let var = rbr.bn.var[[d, ch]];
            let dev = 2.0 * max_conv;
            2.0 * (0.2 * (2.0 * dev * 2.0 * e_mean[ch] + (m_max + 4.0) * U * var) + 4.0 * U * want_v[e].abs())
        })?;
    }

    // ---- backward -----------------------------------------------------------------------------
    let dyd = (k.n, k.h, k.w, k.total());
    let dy = tensor(dev, &[k.n, k.h, k.w, k.total()], &dt.dy, DType::F32);
    let grads = train_bwd(&dy, &ds, &branches, &fwd, &opts).map_err(|e| format!("backward: {e}"))?;
    let dy_view = ArrayView4::from_shape(dyd, &dt.dy).unwrap();
    let rg = rppm::ppm_backward_train(dy_view, x_view(&dt).view(), &k.datasets, &rbranches, &cfg)
        .map_err(|e| e.to_string())?;
    let mut mag_dx = Array4::<f64>::zeros(xd);
    for (i, (off, rbr)) in k.offsets().into_iter().zip(&rf.branches).enumerate() {
        let (kk, b, t) = (k.ks[i], k.bins[i], &tols[i]);
        // Magnitudes: |dy| through the resize backward, the BN backward's terms, then the
        // convolution and pooling backwards on absolute values.
        let g = rpool::resize_bilinear_backward(
            dy_view.slice(s![.., .., .., off..off + kk]).mapv(f64::abs).view(),
            b,
            b,
            k.align_corners,
        );
        let xhat = |n: usize, p: usize, q: usize, ch: usize| {
            let d = k.datasets[n];
            (rbr.conv[[n, p, q, ch]] - rbr.bn.mean[[d, ch]]) * rbr.bn.invstd[[d, ch]]
        };
        let (mut sum_g, mut sum_gx) = (Array2::<f64>::zeros((k.d, kk)), Array2::<f64>::zeros((k.d, kk)));
        for ((n, p, q, ch), &gv) in g.indexed_iter() {
            let d = k.datasets[n];
            sum_g[[d, ch]] += gv;
            sum_gx[[d, ch]] += gv * (1.0 + xhat(n, p, q, ch).abs());
        }
        let mut scale = Array4::<f64>::zeros(g.dim());
        for ((n, p, q, ch), v) in scale.indexed_iter_mut() {
            let d = k.datasets[n];
            let gamma = dt.branches[i].gamma[d * kk + ch].abs();
            *v = t.rho[[d, ch]]
                * gamma
                * rbr.bn.invstd[[d, ch]]
                * (g[[n, p, q, ch]] + sum_gx[[d, ch]] / rbr.bn.counts[d] as f64);
        }
        let mag = rconv::conv2d_backward(
            scale.view(),
            abs4(&rbr.pooled).view(),
            abs4(&rbranches[i].weight).view(),
            &rconv::ConvSpec::default(),
        );
        mag_dx += &rpool::adaptive_avg_pool2d_backward(mag.dx.view(), k.h, k.w);
        let gr = &grads.branches[i];
        let want = &rg.branches[i];
        assert_close(&format!("branch {i} dweight"), &host(&gr.dweight), want.dweight.as_slice().unwrap(), |e| {
            2.0 * mag.dw.as_slice().unwrap()[e] + 1e-30
        })?;
        assert_close(&format!("branch {i} dgamma"), &host(&gr.dgamma), want.dgamma.as_slice().unwrap(), |e| {
            let (d, ch) = (e / kk, e % kk);
            2.0 * t.rho[[d, ch]] * sum_gx[[d, ch]] + 1e-30
        })?;
        // dbeta = Σ g does not see the forward's statistics: the chain's rounding only.
        assert_close(&format!("branch {i} dbeta"), &host(&gr.dbeta), want.dbeta.as_slice().unwrap(), |e| {
            2.0 * RHO_BASE * sum_g[[e / kk, e % kk]] + 1e-30
        })?;
    }
    let want_dx = rg.dx.as_slice().unwrap();
    let mag_dx = mag_dx.as_slice().unwrap();
    assert_close("dx", &host(&grads.dx), want_dx, |e| 2.0 * mag_dx[e] + 4.0 * U * want_dx[e].abs())
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn ppm_matches_reference(k in strategy()) {
        run(&k, &device()).map_err(TestCaseError::fail)?;
    }
}

fn fixed_case() -> Case {
    Case {
        n: 4,
        h: 11,
        w: 8,
        c: 7,
        bins: vec![1, 2, 3, 6],
        ks: vec![3, 3, 3, 3],
        d: 3,
        datasets: vec![2, 0, 2, 0],
        align_corners: true,
        relu: true,
        seed: 9,
    }
}

/// Shapes the random ones may miss: a 1×1 input (every bin repeats the one pixel), an input
/// smaller than every bin but 1, bins in decreasing order, one branch, align_corners false.
#[test]
fn named_edge_shapes() {
    let dev = device();
    let base = fixed_case();
    let cases = [
        Case { h: 1, w: 1, ..base.clone() },
        Case { h: 2, w: 3, bins: vec![6, 4, 1], ks: vec![2, 5, 1], ..base.clone() },
        Case { bins: vec![3], ks: vec![9], align_corners: false, relu: false, ..base.clone() },
        Case { n: 3, datasets: vec![1, 1, 1], h: 13, w: 13, c: 20, align_corners: false, ..base.clone() },
    ];
    for k in &cases {
        run(k, &dev).unwrap_or_else(|e| panic!("{k:?}: {e}"));
    }
}

fn run_bits(seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let k = fixed_case();
    let dt = make_data(&k);
    let x = tensor(&dev, &[k.n, k.h, k.w, k.c], &dt.x, DType::F32);
    let dy = tensor(&dev, &[k.n, k.h, k.w, k.total()], &dt.dy, DType::F32);
    let ds = dataset_tensor(&dev, &k.datasets);
    let opts = options(&k);
    let mut branches = kernel_branches(&dev, &k, &dt, DType::F32);
    let infer = infer_fwd(&x, &ds, &branches, &opts).unwrap();
    let fwd = train_fwd(&x, &ds, &mut branches, &opts).unwrap();
    let g = train_bwd(&dy, &ds, &branches, &fwd, &opts).unwrap();
    let mut out = vec![bits(&infer), bits(&fwd.output), bits(&g.dx)];
    out.extend(running_stats_bits(&branches));
    for b in &g.branches {
        out.extend([bits(&b.dweight), bits(&b.dgamma), bits(&b.dbeta)]);
    }
    out
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    let base = run_bits(0, 1);
    for (seed, threads) in [(7, 2), (0xC0FFEE, 0), (12345, 1)] {
        assert!(run_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

/// Central differences of <ppm_forward_train(x).y, dy> against the reference backward, for
/// elements of x, of every branch's weight, γ and β; with and without ReLU.
#[test]
fn reference_backward_matches_finite_differences() {
    for relu in [false, true] {
        let k = Case {
            n: 4,
            h: 5,
            w: 7,
            c: 3,
            bins: vec![1, 2, 3],
            ks: vec![2, 3, 2],
            relu,
            datasets: vec![1, 0, 1, 0],
            ..fixed_case()
        };
        let dt = make_data(&k);
        let mut x = Array4::from_shape_vec((k.n, k.h, k.w, k.c), dt.x.clone()).unwrap();
        let dy = Array4::from_shape_vec((k.n, k.h, k.w, k.total()), dt.dy.clone()).unwrap();
        let mut br = ref_branches(&k, &dt);
        let cfg = ref_config(&k, relu);
        let g = rppm::ppm_backward_train(dy.view(), x.view(), &k.datasets, &br, &cfg).unwrap();
        let loss = |x: &Array4<f64>, br: &[rppm::PpmBranch]| {
            (&rppm::ppm_forward_train(x.view(), &k.datasets, br, &cfg).unwrap().y * &dy).sum()
        };
        let eps = 1e-6;
        let close = |what: String, analytic: f64, fd: f64| {
            assert!(
                (analytic - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
                "relu {relu}, {what}: analytic {analytic} vs fd {fd}"
            );
        };
        let mut rng = Rng(3);
        for _ in 0..24 {
            let idx = (rng.below(k.n), rng.below(k.h), rng.below(k.w), rng.below(k.c));
            let v = x[idx];
            x[idx] = v + eps;
            let lp = loss(&x, &br);
            x[idx] = v - eps;
            let lm = loss(&x, &br);
            x[idx] = v;
            close(format!("dx{idx:?}"), g.dx[idx], (lp - lm) / (2.0 * eps));
        }
        for i in 0..br.len() {
            for (name, which) in [("weight", 0), ("gamma", 1), ("beta", 2)] {
                let len = if which == 0 { br[i].weight.len() } else { br[i].gamma.len() };
                for e in 0..len {
                    let v = *param(&mut br[i], which, e);
                    *param(&mut br[i], which, e) = v + eps;
                    let lp = loss(&x, &br);
                    *param(&mut br[i], which, e) = v - eps;
                    let lm = loss(&x, &br);
                    *param(&mut br[i], which, e) = v;
                    let analytic = match which {
                        0 => g.branches[i].dweight.as_slice().unwrap()[e],
                        1 => g.branches[i].dgamma.as_slice().unwrap()[e],
                        _ => g.branches[i].dbeta.as_slice().unwrap()[e],
                    };
                    close(format!("branch {i} {name}[{e}]"), analytic, (lp - lm) / (2.0 * eps));
                }
            }
        }
    }
}

/// Element `e` of a branch's weight (0), γ (1) or β (2).
fn param(b: &mut rppm::PpmBranch, which: usize, e: usize) -> &mut f64 {
    match which {
        0 => &mut b.weight.as_slice_mut().unwrap()[e],
        1 => &mut b.gamma.as_slice_mut().unwrap()[e],
        _ => &mut b.beta.as_slice_mut().unwrap()[e],
    }
}

/// Forward in f16 / bf16 storage against the f64 reference of the same (rounded) inputs, then
/// the backward (see `backward_is_the_composition_of_its_ops`):
/// every stored value (pooled input, convolution output, branch output, upsampled output) is
/// rounded once more to the storage type, so the branch slices are within a few storage
/// roundings of |γ| invstd times the convolution's scale.
#[test]
fn forward_in_16_bit_storage() {
    let dev = device();
    let k = Case { n: 4, h: 12, w: 10, c: 16, datasets: vec![0, 1, 1, 0], d: 2, ..fixed_case() };
    for dtype in [DType::F16, DType::BF16] {
        let u = common::unit_roundoff(dtype);
        let mut dt = make_data(&k);
        dt.x = common::quantize(&dt.x, dtype);
        for b in &mut dt.branches {
            b.w = common::quantize(&b.w, dtype);
        }
        let x = tensor(&dev, &[k.n, k.h, k.w, k.c], &dt.x, dtype);
        let ds = dataset_tensor(&dev, &k.datasets);
        let mut branches = kernel_branches(&dev, &k, &dt, dtype);
        let fwd = train_fwd(&x, &ds, &mut branches, &options(&k)).unwrap();
        assert_eq!(fwd.output.dtype(), dtype);
        let rf = rppm::ppm_forward_train(
            ArrayView4::from_shape((k.n, k.h, k.w, k.c), &dt.x).unwrap(),
            &k.datasets,
            &ref_branches(&k, &dt),
            &ref_config(&k, true),
        )
        .unwrap();
        let offsets = k.offsets();
        let got = host(&fwd.output);
        let want: Vec<f64> = rf.y.iter().copied().collect();
        assert_close(&format!("{dtype} output"), &got, &want, |e| {
            let ch = e % k.total();
            if ch < k.c {
                return 0.0;
            }
            let i = offsets.iter().rposition(|&o| o <= ch).unwrap();
            let (n, kk) = (e / (k.h * k.w * k.total()), ch - offsets[i]);
            let d = k.datasets[n];
            let rbr = &rf.branches[i];
            let max_conv = max_abs(rbr.conv.slice(s![.., .., .., kk]).iter());
            let gamma = dt.branches[i].gamma[d * k.ks[i] + kk];
            // pooled, conv output and branch output: three roundings of O(max|conv|) before
            // normalisation, one of the result after, and one of the upsampled value.
            8.0 * u * (gamma * rbr.bn.invstd[[d, kk]] * 3.0 * max_conv + 2.0 * want[e].abs() + 1.0)
        })
        .unwrap();
        backward_is_the_composition_of_its_ops(&dev, &k, &dt, dtype, &ds, &branches, &fwd);
    }
}

/// The 16-bit backward is, bit for bit, resize backward → DAB backward per branch, then the
/// pooling-backward sum — each of which tests/pool.rs and tests/dab.rs check in f16 / bf16
/// against the f64 references with their own tolerances.
fn backward_is_the_composition_of_its_ops(
    dev: &Device,
    k: &Case,
    dt: &Data,
    dtype: DType,
    ds: &Tensor,
    branches: &[PpmBranch],
    fwd: &ppm::PpmForward,
) {
    let opts = options(k);
    let dy = tensor(dev, &[k.n, k.h, k.w, k.total()], &common::quantize(&dt.dy, dtype), dtype);
    let g = train_bwd(&dy, ds, branches, fwd, &opts).unwrap();
    assert_eq!(g.dx.dtype(), dtype);
    let mut levels = Vec::new();
    for (i, ((br, saved), off)) in branches.iter().zip(&fwd.saved.branches).zip(k.offsets()).enumerate() {
        let (b, kk) = (k.bins[i], k.ks[i]);
        let dlow = cdcl::ops::pool::resize_bilinear_backward(&dy, off, &[k.n, b, b, kk], k.align_corners).unwrap();
        let one = cdcl::ops::conv::ConvGeometry::default();
        let gb = cdcl::ops::dab::backward_train(
            &dlow,
            &saved.pooled,
            &br.weight,
            ds,
            &br.state,
            saved.dab.saved(),
            &cdcl::ops::dab::DabOptions { geometry: one, dsbn: opts.dsbn, materialize: true, ..Default::default() },
        )
        .unwrap();
        let got = &g.branches[i];
        for (what, a, b) in [
            ("dweight", &got.dweight, &gb.dweight),
            ("dgamma", &got.dgamma, &gb.dgamma),
            ("dbeta", &got.dbeta, &gb.dbeta),
        ] {
            assert!(common::bits(a) == common::bits(b), "{dtype} branch {i} {what}: not the composition");
        }
        levels.push(gb.dx.unwrap());
    }
    let refs: Vec<&Tensor> = levels.iter().collect();
    let dx = cdcl::ops::pool::adaptive_avg_pool_backward_sum(&dy, &refs, &[k.n, k.h, k.w, k.c]).unwrap();
    assert!(common::bits(&dx) == common::bits(&g.dx), "{dtype} dx: not the composition");
}

#[test]
fn bad_inputs_are_typed_errors_and_write_nothing() {
    let dev = device();
    let k = fixed_case();
    let dt = make_data(&k);
    let x = tensor(&dev, &[k.n, k.h, k.w, k.c], &dt.x, DType::F32);
    let ds = dataset_tensor(&dev, &k.datasets);
    let opts = options(&k);
    let mut branches = kernel_branches(&dev, &k, &dt, DType::F32);
    let before = running_stats_bits(&branches);

    // Bad dataset index: the first bad sample, nothing moved; inference too.
    let bad = Tensor::from_slice(&dev, &[4], &[0i32, 1, 5, -1]).unwrap();
    let want = Error::DatasetIndexOutOfRange { sample: 2, index: 5, num_datasets: 3 };
    assert_eq!(train_fwd(&x, &bad, &mut branches, &opts).unwrap_err(), want);
    assert_eq!(infer_fwd(&x, &bad, &branches, &opts).unwrap_err(), want);
    assert!(running_stats_bits(&branches) == before);

    // A dataset with a single sample and a 1×1 bin listed after larger ones: the typed error,
    // and no branch moved its statistics (the smallest bin runs first).
    let single = dataset_tensor(&dev, &[2, 1, 2, 2]);
    let o = PpmOptions { bins: vec![6, 3, 1, 2], ..opts.clone() };
    assert_eq!(train_fwd(&x, &single, &mut branches, &o).unwrap_err(), Error::TooFewValues { dataset: 1, count: 1 });
    assert!(running_stats_bits(&branches) == before);
    // Inference has no such limit; without the 1×1 bin training works too.
    infer_fwd(&x, &single, &branches, &o).unwrap();
    let o2 = PpmOptions { bins: vec![6, 3, 2, 2], ..opts.clone() };
    train_fwd(&x, &single, &mut branches, &o2).unwrap();
    let before = running_stats_bits(&branches);

    // Host-side checks, before any launch.
    fn expect_err(o: &PpmOptions, x: &Tensor, ds: &Tensor, br: &mut [PpmBranch], pred: fn(&Error) -> bool) {
        let e = train_fwd(x, ds, br, o).unwrap_err();
        assert!(pred(&e), "unexpected {e:?}");
    }
    expect_err(&PpmOptions { bins: vec![], ..opts.clone() }, &x, &ds, &mut branches, |e| {
        matches!(e, Error::InvalidArgument(_))
    });
    expect_err(&PpmOptions { bins: vec![1, 2, 0, 6], ..opts.clone() }, &x, &ds, &mut branches, |e| {
        matches!(e, Error::InvalidArgument(_))
    });
    expect_err(&PpmOptions { bins: vec![1, 2, 3], ..opts.clone() }, &x, &ds, &mut branches, |e| {
        matches!(e, Error::InvalidArgument(_))
    });
    let bad_eps = PpmOptions { dsbn: DsbnOptions { eps: 0.0, ..opts.dsbn }, ..opts.clone() };
    expect_err(&bad_eps, &x, &ds, &mut branches, |e| matches!(e, Error::InvalidArgument(_)));
    let ds_f = Tensor::zeros(&dev, &[k.n], DType::F32).unwrap();
    expect_err(&opts, &x, &ds_f, &mut branches, |e| matches!(e, Error::DTypeMismatch { .. }));
    let ds_short = dataset_tensor(&dev, &[0, 1]);
    expect_err(&opts, &x, &ds_short, &mut branches, |e| matches!(e, Error::ShapeMismatch { .. }));
    let x3 = Tensor::zeros(&dev, &[k.n, k.h, k.w], DType::F32).unwrap();
    expect_err(&opts, &x3, &ds, &mut branches, |e| matches!(e, Error::InvalidShape { .. }));
    let xi = Tensor::zeros(&dev, &[k.n, k.h, k.w, k.c], DType::I32).unwrap();
    expect_err(&opts, &xi, &ds, &mut branches, |e| matches!(e, Error::UnsupportedDType { .. }));
    let xh = Tensor::zeros(&dev, &[k.n, k.h, k.w, k.c], DType::F16).unwrap();
    expect_err(&opts, &xh, &ds, &mut branches, |e| matches!(e, Error::DTypeMismatch { .. }));
    // A branch weight with the wrong input channels (the last branch: checked before the first
    // launch), a state with another D, a state table of the wrong shape.
    let good_w =
        std::mem::replace(&mut branches[3].weight, Tensor::zeros(&dev, &[3, 1, 1, k.c + 1], DType::F32).unwrap());
    expect_err(&opts, &x, &ds, &mut branches, |e| matches!(e, Error::ShapeMismatch { .. }));
    branches[3].weight = Tensor::zeros(&dev, &[3, 3, 3, k.c], DType::F32).unwrap();
    expect_err(&opts, &x, &ds, &mut branches, |e| matches!(e, Error::ShapeMismatch { .. }));
    branches[3].weight = good_w;
    let good_state = std::mem::replace(&mut branches[2].state, DsbnState::new(&dev, 2, 3).unwrap());
    expect_err(&opts, &x, &ds, &mut branches, |e| matches!(e, Error::InvalidShape { .. }));
    branches[2].state = good_state;
    let good_rv =
        std::mem::replace(&mut branches[1].state.running_var, Tensor::zeros(&dev, &[3, 4], DType::F32).unwrap());
    expect_err(&opts, &x, &ds, &mut branches, |e| matches!(e, Error::ShapeMismatch { .. }));
    branches[1].state.running_var = good_rv;
    let other = device();
    let ds_other = dataset_tensor(&other, &k.datasets);
    expect_err(&opts, &x, &ds_other, &mut branches, |e| matches!(e, Error::DeviceMismatch { .. }));
    assert!(running_stats_bits(&branches) == before, "a rejected call moved running statistics");

    // Backward: dy of the wrong shape or dtype, mismatched branch lists.
    let fwd = train_fwd(&x, &ds, &mut branches, &opts).unwrap();
    let dy_bad = Tensor::zeros(&dev, &[k.n, k.h, k.w, k.total() + 1], DType::F32).unwrap();
    assert!(matches!(train_bwd(&dy_bad, &ds, &branches, &fwd, &opts), Err(Error::ShapeMismatch { .. })));
    let dy_h = Tensor::zeros(&dev, &[k.n, k.h, k.w, k.total()], DType::F16).unwrap();
    assert!(matches!(train_bwd(&dy_h, &ds, &branches, &fwd, &opts), Err(Error::DTypeMismatch { .. })));
    let dy = Tensor::zeros(&dev, &[k.n, k.h, k.w, k.total()], DType::F32).unwrap();
    assert!(matches!(train_bwd(&dy, &ds, &branches[..3], &fwd, &opts), Err(Error::InvalidArgument(_))));
    let no_bins = PpmOptions { bins: vec![], ..opts.clone() };
    assert!(matches!(train_bwd(&dy, &ds, &[], &fwd, &no_bins), Err(Error::InvalidArgument(_))));
    let g = train_bwd(&dy, &ds, &branches, &fwd, &opts).unwrap();
    assert!(host(&g.dx).iter().all(|&v| v == 0.0), "zero dy, zero dx");
    let views: Vec<_> = branches.iter().map(PpmBranch::view).collect();
    assert_eq!(ppm::output_channels(k.c, &views), k.total());
}
