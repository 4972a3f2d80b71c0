//! Per-dataset SyncBN over the in-process communicator on the CPU backend: W ranks × their
//! shards equal one process with the concatenated batch — one DSBN layer forward and backward
//! (a dataset on one rank only, one on no rank), and whole data-parallel training steps (losses,
//! gradients, parameters, running statistics); with SyncBN off each rank keeps its own
//! statistics.

use std::sync::Arc;
use std::thread;

use cdcl::backend::{BnStats, CpuTensor, StatsReduce};
use cdcl::dist::{local_group, Communicator};
use cdcl::ops::dsbn::DsbnOptions;

use super::*;

const U: f64 = f32::EPSILON as f64 / 2.0; // unit roundoff of f32

fn host(be: &CpuBackend, t: &CpuTensor) -> Vec<f32> {
    be.to_f32(t).unwrap()
}

/// One layer: what the reference (one process) or a rank computed.
struct LayerRun {
    y: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    running: [Vec<f32>; 2],
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

const D: usize = 4;
const C: usize = 5;
const HW: (usize, usize) = (3, 4);

fn value(seed: u64, i: usize, offset: f32) -> f32 {
    offset + 2.0 * unit(seed, i as u64) - 1.0
}

/// Sample `n`'s input, output gradient and residual, the same wherever the sample runs.
fn sample(n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let len = HW.0 * HW.1 * C;
    // Channel c has mean ≈ 3 + c: far from the first step's shift (the running mean, 0.25).
    let x = (0..len).map(|i| value(100 + n as u64, i, 3.0 + (i % C) as f32)).collect();
    let dy = (0..len).map(|i| value(200 + n as u64, i, 0.0)).collect();
    let r = (0..len).map(|i| value(300 + n as u64, i, 0.0)).collect();
    (x, dy, r)
}

/// Runs the layer on samples `ids` (dataset `ds[k]` each); `reduce` = None: the local op.
fn run_layer(ids: &[usize], ds: &[i32], reduce: Option<&mut StatsReduce<'_, CpuTensor>>) -> LayerRun {
    let be = CpuBackend::new();
    let (mut xs, mut dys, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for &n in ids {
        let (x, dy, r) = sample(n);
        xs.extend(x);
        dys.extend(dy);
        rs.extend(r);
    }
    let shape = [ids.len(), HW.0, HW.1, C];
    let (x, dy, r) = (
        be.tensor_f32(&shape, &xs).unwrap(),
        be.tensor_f32(&shape, &dys).unwrap(),
        be.tensor_f32(&shape, &rs).unwrap(),
    );
    let dsv = be.tensor_i32(&[ids.len()], ds).unwrap();
    let mut bn = be.bn_new(D, C).unwrap();
    {
        let [g, b, m, v] = bn.tables_mut();
        be.write_f32(g, &(0..D * C).map(|i| 0.5 + 0.1 * i as f32).collect::<Vec<_>>()).unwrap();
        be.write_f32(b, &(0..D * C).map(|i| 0.05 * i as f32 - 0.3).collect::<Vec<_>>()).unwrap();
        be.write_f32(m, &[0.25; D * C]).unwrap();
        be.write_f32(v, &[2.0; D * C]).unwrap();
    }
    let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
    let mut reduce = reduce;
    let (y, saved) = match reduce.as_deref_mut() {
        Some(f) => be.dsbn_forward_train_synced(&x, &dsv, &mut bn, &opts, Some(&r), f).unwrap(),
        None => be.dsbn_forward_train(&x, &dsv, &mut bn, &opts, Some(&r)).unwrap(),
    };
    let g = match reduce {
        Some(f) => be.dsbn_backward_train_synced(&dy, &x, Some(&r), &dsv, &bn, &saved, &opts, f).unwrap(),
        None => be.dsbn_backward_train(&dy, &x, Some(&r), &dsv, &bn, &saved, &opts).unwrap(),
    };
    let [_, _, m, v] = bn.tables();
    LayerRun {
        y: host(&be, &y),
        mean: host(&be, saved.mean()),
        invstd: host(&be, saved.invstd()),
        running: [host(&be, m), host(&be, v)],
        dx: host(&be, &g.dx),
        dgamma: host(&be, &g.dgamma),
        dbeta: host(&be, &g.dbeta),
    }
}

/// `|a − b| ≤ tol · scale` element-wise, with a message naming what and where.
fn close(what: &str, a: &[f32], b: &[f32], tol: f64, scale: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let err = (*x as f64 - *y as f64).abs();
        assert!(err <= tol * scale, "{what}[{i}]: {x} vs {y} (|diff| {err:e} > {:e})", tol * scale);
    }
}

#[test]
fn a_synced_layer_on_w_ranks_equals_one_layer_on_the_concatenated_batch() {
    // Datasets: 0 on every rank, 1 on rank 0 only, 2 on the last rank only, 3 on none.
    for world in [2usize, 3] {
        let mut shards: Vec<(Vec<usize>, Vec<i32>)> = vec![(vec![0, 1, 2], vec![0, 1, 0])];
        for r in 1..world {
            let ids = vec![3 * r, 3 * r + 1];
            let ds = if r == world - 1 { vec![2, 0] } else { vec![0, 0] };
            shards.push((ids, ds));
        }
        let all_ids: Vec<usize> = shards.iter().flat_map(|s| s.0.clone()).collect();
        let all_ds: Vec<i32> = shards.iter().flat_map(|s| s.1.clone()).collect();
        let reference = run_layer(&all_ids, &all_ds, None);

        let comms = local_group(world).unwrap();
        let ranks: Vec<LayerRun> = comms
            .into_iter()
            .zip(shards.clone())
            .map(|(comm, (ids, ds))| {
                thread::spawn(move || {
                    let mut reduce = |t: &mut CpuTensor| {
                        let be = CpuBackend::new();
                        let mut v = be.to_f32(t)?;
                        comm.all_reduce_sum(&mut v)?;
                        be.write_f32(t, &v)
                    };
                    run_layer(&ids, &ds, Some(&mut reduce))
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();

        // Every rank holds the same statistics and running statistics, bit for bit.
        for r in &ranks[1..] {
            assert_eq!(r.mean, ranks[0].mean);
            assert_eq!(r.invstd, ranks[0].invstd);
            assert_eq!(r.running, ranks[0].running);
        }
        // Dataset 3 (no rank): untouched running statistics, zero saved statistics.
        for i in 3 * C..4 * C {
            assert_eq!((ranks[0].running[0][i], ranks[0].running[1][i]), (0.25, 2.0));
            assert_eq!((ranks[0].mean[i], ranks[0].invstd[i]), (0.0, 0.0));
        }

        // Tolerances. The synchronised statistics come from f32 sums S₁ = Σ(x−K), S₂ = Σ(x−K)²
        // (each rank's f64 sum rounded once, then W − 1 f32 additions): each carries a relative
        // error ≤ W·u. With M values, mean μ, variance σ² and shift K: |δμ| ≤ W·u·E|x−K| + u·|μ|
        // and |δσ²| ≤ 2·W·u·(σ² + (μ−K)²) (S₂/M and (S₁/M)² both ≤ σ² + (μ−K)²), so δ(1/σ)/(1/σ)
        // ≤ W·u·(1 + (μ−K)²/σ²) + 2u (the f32 rounding of both results). Here |x − K| < 8,
        // (μ−K)² < 49 and σ² ≥ 1/3 − small (uniform on ±1): relative ≤ W·u·150 + 2u; take
        // ×4 for the f64 rounding chain and the normalisation's own rounding.
        let w = world as f64;
        let stat_rel = 4.0 * (w * U * 150.0 + 2.0 * U);
        close("batch mean", &ranks[0].mean, &reference.mean, stat_rel, 8.0);
        close("batch invstd", &ranks[0].invstd, &reference.invstd, stat_rel, 2.0);
        // Running: (1−m)·r + m·μ, unbiased variance: the statistics' errors, scaled by m ≤ 1.
        close("running mean", &ranks[0].running[0], &reference.running[0], stat_rel, 8.0);
        close("running var", &ranks[0].running[1], &reference.running[1], stat_rel, 2.0);
        // y = (x−μ)·invstd·γ + β + r: |x̂| ≤ 8/σ < 16, γ < 2.5 → |δy| ≤ 2.5·16·stat_rel·(1 + 1)
        // plus the output's rounding (|y| < 45).
        let y_tol = 2.5 * 16.0 * 2.0 * stat_rel + 45.0 * U;
        // dx = γ·invstd·(g − Σg/M − x̂·Σgx̂/M): the sums travel in f32 (relative W·u of sums of
        // at most |g|·M and 16·|g|·M), everything else as y: |δdx| ≤ 2.5·2·(16·W·u·17 + 16·stat_rel·3).
        let dx_tol = 2.5 * 2.0 * (16.0 * w * U * 17.0 + 16.0 * stat_rel * 3.0);
        let mut at = 0;
        for (rank, (ids, _)) in ranks.iter().zip(&shards) {
            let len = ids.len() * HW.0 * HW.1 * C;
            close("y", &rank.y, &reference.y[at..at + len], y_tol, 1.0);
            close("dx", &rank.dx, &reference.dx[at..at + len], dx_tol, 1.0);
            at += len;
        }
        // dγ, dβ: each rank's own sums; the ranks' sum is the reference's (M·|g|·16 at most,
        // the normalisation's error through x̂ and the ReLU mask — which may flip where
        // y ≈ 0, a bounded |g| < 1 per flipped value: count it as one value's worth).
        let sum = |f: fn(&LayerRun) -> &Vec<f32>| -> Vec<f32> {
            (0..D * C).map(|i| ranks.iter().map(|r| f(r)[i]).sum()).collect()
        };
        let m_max = (all_ids.len() * HW.0 * HW.1) as f64;
        close("dbeta", &sum(|r| &r.dbeta), &reference.dbeta, m_max * U * 4.0 + 1e-5, 1.0);
        close("dgamma", &sum(|r| &r.dgamma), &reference.dgamma, m_max * 16.0 * (stat_rel + U * 4.0) + 1e-5, 1.0);
    }
}

// ---- whole data-parallel steps -------------------------------------------------------------

type Snapshot = Vec<(String, Vec<f32>, Option<Vec<f32>>)>;

/// What a run recorded: the first iteration's total loss and gradients (before any update),
/// then the totals of `STEPS` training steps and the state after them.
struct Run {
    first_total: f32,
    grads: Snapshot,
    totals: Vec<f32>,
    after: Snapshot,
}

const STEPS: usize = 2;

fn valid(b: &Batch) -> usize {
    b.labels.iter().filter(|&&l| l != 255).count()
}

/// Rank r's loss weight for dataset d, `W·v_rd / v_d` (v: labelled pixels): each loss is a
/// mean over the rank's pixels, and with these weights the ranks' mean loss is the
/// concatenated batch's loss (whose per-dataset means run over every rank's pixels).
fn rank_weights(shards: &[Vec<Batch>], num_datasets: usize) -> Vec<Vec<f32>> {
    let v = |r: usize, d: usize| shards[r].iter().filter(|b| b.dataset == d).map(valid).sum::<usize>() as f32;
    let total = |d: usize| (0..shards.len()).map(|r| v(r, d)).sum::<f32>();
    (0..shards.len())
        .map(|r| (0..num_datasets).map(|d| shards.len() as f32 * v(r, d) / total(d).max(1.0)).collect())
        .collect()
}

/// Every shard's batch of each dataset, concatenated in rank order.
fn concatenated(shards: &[Vec<Batch>], num_datasets: usize) -> Vec<Batch> {
    (0..num_datasets)
        .filter_map(|d| {
            let parts: Vec<&Batch> = shards.iter().flatten().filter(|b| b.dataset == d).collect();
            let first = parts.first()?;
            Some(Batch {
                dataset: d,
                n: parts.iter().map(|b| b.n).sum(),
                h: first.h,
                w: first.w,
                images: parts.iter().flat_map(|b| b.images.clone()).collect(),
                labels: parts.iter().flat_map(|b| b.labels.clone()).collect(),
            })
        })
        .collect()
}

fn train_run<B: Backend>(t: &mut Trainer<B>, batches: &[Batch]) -> Run {
    let first = t.compute_gradients(batches).unwrap();
    let grads = snapshot(&t.store);
    t.store.zero_grad();
    // The emulator runs every kernel on fibers: there the first iteration's loss, gradients
    // and running statistics only (the SGD step is the same code on every rank), for time.
    let steps = if t.backend().name() == "cpu" { STEPS } else { 0 };
    let totals = (0..steps).map(|_| t.step(batches).unwrap().total).collect();
    Run { first_total: first.total, grads, totals, after: snapshot(&t.store) }
}

fn model(classes: Vec<usize>, seed: u64) -> ModelConfig {
    ModelConfig { seed, ..tiny_model(classes, 0.0) }
}

/// Rank r (model initialised with seed 7 + r: the start broadcast makes it rank 0's) on
/// `shards[r]`, SyncBN `sync`.
fn run_ranks(classes: &[usize], shards: &[Vec<Batch>], sync: bool) -> Vec<Run> {
    run_ranks_on(CpuBackend::new, classes, shards, sync)
}

fn run_ranks_on<B: Backend>(make: fn() -> B, classes: &[usize], shards: &[Vec<Batch>], sync: bool) -> Vec<Run> {
    let weights = rank_weights(shards, classes.len());
    let comms = local_group(shards.len()).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .zip(shards.to_vec())
        .zip(weights)
        .enumerate()
        .map(|(rank, ((comm, shard), loss_weights))| {
            let classes = classes.to_vec();
            thread::spawn(move || {
                let be = make();
                let config = TrainConfig { loss_weights, ..TrainConfig::default() };
                let mut t = Trainer::new(&be, model(classes, 7 + rank as u64), config).unwrap();
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                t.set_data_parallel(comm).unwrap();
                t.set_sync_bn(sync).unwrap();
                train_run(&mut t, &shard)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn single(classes: &[usize], batches: &[Batch]) -> Run {
    single_on(CpuBackend::new(), classes, batches)
}

fn single_on<B: Backend>(be: B, classes: &[usize], batches: &[Batch]) -> Run {
    let mut t = Trainer::new(&be, model(classes.to_vec(), 7), TrainConfig::default()).unwrap();
    train_run(&mut t, batches)
}

/// Dataset 0 on every rank (2 samples), dataset 1 on rank 0 (2 samples) and on rank 2 (1).
fn shards(world: usize, size: usize) -> Vec<Vec<Batch>> {
    (0..world)
        .map(|r| {
            let mut s = vec![batch(0, 2, size, size, 3, 10 + r as u64)];
            match r {
                0 => s.push(batch(1, 2, size, size, 4, 20)),
                // One sample: its 1×1 pyramid bin has one value, too few for local statistics.
                2 => s.push(batch(1, 1, size, size, 4, 22)),
                _ => {}
            }
            s
        })
        .collect()
}

/// Worst ‖a − b‖/‖b‖ over the named tensors (gradients: the ranks' mean, a missing one zero).
fn worst(name: &str, a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    let mut w: f64 = 0.0;
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let e = rel_err(va, vb);
        if e > w {
            w = e;
            eprintln!("{name}: {na} {e:e}");
        }
    }
    w
}

#[test]
fn w_ranks_with_sync_bn_train_as_one_process_on_the_concatenated_batch() {
    for world in [2usize, 3] {
        let shards = shards(world, 24);
        let reference = single(&[3, 4], &concatenated(&shards, 2));
        check_equal(world, &reference, &run_ranks(&[3, 4], &shards, true), 1e-3);
    }
}

/// The same through the emulator's device backend (kernels for everything but the
/// synchronised normalisation, which goes through the host): 2 ranks, smaller images.
#[test]
fn the_same_holds_on_the_emulator() {
    let shards = shards(2, 16);
    let reference = single_on(device_backend(), &[3, 4], &concatenated(&shards, 2));
    // The ranks' normalisations are the CPU backend's (f64 statistics) and the reference's the
    // device kernels' (f32 tile statistics): a ReLU input that lands on the other side of zero
    // moves a small layer's gradient by ~1e-3 of its norm (tests/train/backends.rs measures
    // and bounds this the same way), so gradients get that backend comparison's 3e-2; the
    // losses and the state keep 1e-3 (measured: gradients 6e-4, state 8e-6).
    check_equal(2, &reference, &run_ranks_on(device_backend, &[3, 4], &shards, true), 3e-2);
}

fn check_equal(world: usize, reference: &Run, ranks: &[Run], grad_tol: f64) {
    let w = world as f32;
    // Every rank ends with the same state, running statistics included, bit for bit.
    for r in &ranks[1..] {
        let v = |s: &Snapshot| s.iter().map(|x| x.1.clone()).collect::<Vec<_>>();
        assert_eq!(v(&r.after), v(&ranks[0].after));
    }
    let values = |s: &Snapshot| s.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect::<Vec<_>>();
    let grads =
        |s: &Snapshot| s.iter().filter_map(|(n, _, g)| g.as_ref().map(|g| (n.clone(), g.clone()))).collect::<Vec<_>>();
    let mean_grads: Vec<(String, Vec<f32>)> = grads(&reference.grads)
        .into_iter()
        .map(|(name, g)| {
            let mut m = vec![0.0f32; g.len()];
            for r in ranks {
                if let Some((_, _, Some(rg))) = r.grads.iter().find(|(n, ..)| *n == name) {
                    m.iter_mut().zip(rg).for_each(|(a, b)| *a += b / w);
                }
            }
            (name, m)
        })
        .collect();
    // Tolerance. Each synchronised normalisation differs from the one-process one by the
    // f32 rounding of its shifted sums: relative ≤ 4·(W·u·(1 + (μ−K)²/σ²) + 2u) in its
    // statistics (the layer test's bound), ≈ 1e-5 at W = 3 for activations whose mean is
    // within 3σ of the running mean. The network has 23 normalisations, passed through
    // forward and backward: ≤ 46 such errors adding up in a gradient, ≈ 5e-4; the
    // parameters (and γ, β from 0/1) move by lr × gradient, the running statistics by the
    // statistics' own errors. Losses: one more rounding of the mean of W values.
    const TOL: f64 = 1e-3;
    let mean_first: f32 = ranks.iter().map(|r| r.first_total).sum::<f32>() / w;
    assert!(
        (mean_first as f64 - reference.first_total as f64).abs() <= TOL * reference.first_total as f64,
        "world {world}: first loss {mean_first} vs {}",
        reference.first_total
    );
    for (s, t) in reference.totals.iter().enumerate() {
        let m: f32 = ranks.iter().map(|r| r.totals[s]).sum::<f32>() / w;
        assert!((m as f64 - *t as f64).abs() <= TOL * *t as f64, "world {world} step {s}: loss {m} vs {t}");
    }
    let g_err = worst("grad", &mean_grads, &grads(&reference.grads));
    let p_err = worst("after", &values(&ranks[0].after), &values(&reference.after));
    eprintln!("world {world}: worst relative error of a gradient {g_err:e}, of a parameter or statistic {p_err:e}");
    assert!(g_err <= grad_tol, "world {world}: gradients {g_err:e} > {grad_tol:e}");
    assert!(p_err <= TOL, "world {world}: state {p_err:e} > {TOL:e}");
    // Every parameter got a gradient somewhere and the comparison saw them all.
    assert_eq!(mean_grads.len(), grads(&reference.grads).len());
    assert!(mean_grads.len() > 20);
}

#[test]
fn with_sync_bn_off_each_rank_keeps_its_own_statistics() {
    let classes = [3, 4];
    let shards = shards(2, 24);
    let ranks = run_ranks(&classes, &shards, false);
    let running = |s: &Snapshot| {
        s.iter().filter(|(n, ..)| n.contains(".running_")).map(|(n, v, _)| (n.clone(), v.clone())).collect::<Vec<_>>()
    };
    // After the first forward (from rank 0's broadcast initialisation), rank r's running
    // statistics are those of one process on rank r's shard alone, bit for bit.
    for (r, shard) in shards.iter().enumerate() {
        let local = single(&classes, shard);
        assert_eq!(running(&ranks[r].grads), running(&local.grads), "rank {r}");
    }
    assert_ne!(running(&ranks[0].grads), running(&ranks[1].grads));
}

#[test]
fn a_run_checkpointed_on_two_ranks_resumes_on_three() {
    let classes = [3, 4];
    // Two ranks train a step; rank 0's checkpoint is the run's (they are identical anyway).
    let two = shards(2, 24);
    let comms = local_group(2).unwrap();
    let checkpoints: Vec<_> = comms
        .into_iter()
        .zip(two.clone())
        .zip(rank_weights(&two, 2))
        .enumerate()
        .map(|(rank, ((comm, shard), loss_weights))| {
            thread::spawn(move || {
                let be = CpuBackend::new();
                let config = TrainConfig { loss_weights, ..TrainConfig::default() };
                let mut t = Trainer::new(&be, model(vec![3, 4], 7 + rank as u64), config).unwrap();
                t.set_data_parallel(Arc::new(comm)).unwrap();
                t.set_sync_bn(true).unwrap();
                t.step(&shard).unwrap();
                t.checkpoint().unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let ck = Arc::new(checkpoints.into_iter().next().unwrap());

    // Three ranks resume from it (each initialised differently first) and take a step; one
    // process resumed from it takes the step on the concatenated batch.
    let three = shards(3, 24);
    let comms = local_group(3).unwrap();
    let ranks: Vec<(usize, Snapshot)> = comms
        .into_iter()
        .zip(three.clone())
        .zip(rank_weights(&three, 2))
        .enumerate()
        .map(|(rank, ((comm, shard), loss_weights))| {
            let ck = ck.clone();
            thread::spawn(move || {
                let be = CpuBackend::new();
                let config = TrainConfig { loss_weights, ..TrainConfig::default() };
                let mut t = Trainer::new(&be, model(vec![3, 4], 30 + rank as u64), config).unwrap();
                t.restore(&ck).unwrap();
                t.set_data_parallel(Arc::new(comm)).unwrap();
                t.set_sync_bn(true).unwrap();
                t.step(&shard).unwrap();
                (t.iteration(), snapshot(&t.store))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let be = CpuBackend::new();
    let mut one = Trainer::new(&be, model(classes.to_vec(), 7), TrainConfig::default()).unwrap();
    one.restore(&ck).unwrap();
    one.step(&concatenated(&three, 2)).unwrap();

    let values = |s: &Snapshot| s.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect::<Vec<_>>();
    for (it, s) in &ranks {
        assert_eq!(*it, 2);
        assert_eq!(values(s), values(&ranks[0].1));
    }
    // The tolerance of the equality test above.
    let err = worst("resumed", &values(&ranks[0].1), &values(&snapshot(&one.store)));
    assert!(err <= 1e-3, "resumed on three ranks vs one process: {err:e}");
}

#[test]
fn ranks_that_run_different_forward_passes_fail_together_instead_of_pairing_wrong_layers() {
    // Rank 0's datasets have two image sizes (two passes), rank 1's one.
    let shards = vec![vec![batch(0, 2, 24, 24, 3, 1), batch(1, 2, 16, 16, 4, 2)], vec![batch(0, 2, 24, 24, 3, 3)]];
    let comms = local_group(2).unwrap();
    let errors: Vec<String> = comms
        .into_iter()
        .zip(shards)
        .enumerate()
        .map(|(rank, (comm, shard))| {
            thread::spawn(move || {
                let be = CpuBackend::new();
                let mut t = Trainer::new(&be, model(vec![3, 4], 7 + rank as u64), TrainConfig::default()).unwrap();
                t.set_data_parallel(Arc::new(comm)).unwrap();
                t.set_sync_bn(true).unwrap();
                match t.step(&shard) {
                    Err(e @ cdcl::Error::Distributed { .. }) => e.to_string(),
                    other => panic!("rank {rank}: expected a distributed error, got {other:?}"),
                }
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(errors[0].contains("rank 0 runs 2 forward passes"), "{}", errors[0]);
    assert!(errors[1].contains("rank 1 runs 1 forward passes"), "{}", errors[1]);
    // Without a data-parallel run there is nothing to synchronise with.
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, model(vec![3, 4], 7), TrainConfig::default()).unwrap();
    assert!(matches!(t.set_sync_bn(true), Err(cdcl::Error::InvalidArgument(_))));
}
