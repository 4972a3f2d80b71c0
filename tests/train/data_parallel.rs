//! Data-parallel DAT over the in-process communicator on the CPU backend: ranks that start from
//! different initialisations agree after `set_data_parallel`, step on the mean of their
//! gradients, stay bitwise identical, and train a dataset that only one rank holds.

use std::sync::Arc;
use std::thread;

use cdcl::dist::{local_group, Communicator};

use super::*;

type Snapshot = Vec<(String, Vec<f32>, Option<Vec<f32>>)>;

/// The trained state (parameters and BN affine tables; running statistics stay per rank).
fn trained(s: &Snapshot) -> Vec<(String, Vec<f32>)> {
    s.iter().filter(|(n, ..)| !n.contains(".running_")).map(|(n, v, _)| (n.clone(), v.clone())).collect()
}

fn bits(v: &[(String, Vec<f32>)]) -> Vec<(String, Vec<u32>)> {
    v.iter().map(|(n, x)| (n.clone(), x.iter().map(|f| f.to_bits()).collect())).collect()
}

fn model(classes: Vec<usize>, seed: u64) -> ModelConfig {
    ModelConfig { seed, ..tiny_model(classes, 0.0) }
}

/// Runs `steps` data-parallel iterations, rank r on `shards[r]` (rank r's model initialised
/// with seed 7 + r, so the start broadcast matters); returns every rank's snapshot before the
/// first step and after the last.
fn run_ranks(classes: Vec<usize>, shards: Vec<Vec<Batch>>, steps: usize) -> Vec<(Snapshot, Snapshot)> {
    let comms = local_group(shards.len()).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .zip(shards)
        .enumerate()
        .map(|(rank, (comm, shard))| {
            let classes = classes.clone();
            thread::spawn(move || {
                let be = CpuBackend::new();
                let mut t = Trainer::new(&be, model(classes, 7 + rank as u64), TrainConfig::default()).unwrap();
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                t.set_data_parallel(comm).unwrap();
                let start = snapshot(&t.store);
                for _ in 0..steps {
                    t.step(&shard).unwrap();
                }
                (start, snapshot(&t.store))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// One single-process step of the rank-0 model on `shard`: (parameters before, after).
fn single_step(classes: Vec<usize>, shard: &[Batch]) -> (Snapshot, Snapshot) {
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, model(classes, 7), TrainConfig::default()).unwrap();
    let before = snapshot(&t.store);
    t.step(shard).unwrap();
    (before, snapshot(&t.store))
}

#[test]
fn ranks_step_on_the_mean_gradient_and_stay_identical() {
    let classes = vec![3, 4];
    let shard = |r: u64| vec![batch(0, 2, 24, 24, 3, 10 + r), batch(1, 2, 24, 24, 4, 20 + r)];
    let ranks = run_ranks(classes.clone(), vec![shard(0), shard(1)], 1);
    // The start broadcast: rank 1 (initialised with another seed) now holds rank 0's values.
    assert_eq!(bits(&trained(&ranks[0].0)), bits(&trained(&ranks[1].0)));
    assert_eq!(bits(&trained(&ranks[0].1)), bits(&trained(&ranks[1].1)));

    // A first SGD step moves p by -lr (g + wd p) (the momentum buffer starts as g), which is
    // linear in g: the data-parallel step is the mean of the two single-process steps. The
    // only differences are f32 roundings of p' = p + Δ (the sum and the halving are exact up
    // to one rounding each): a few ulps of the magnitudes involved.
    let (p0, a0) = single_step(classes.clone(), &shard(0));
    let (_, a1) = single_step(classes, &shard(1));
    let dp = trained(&ranks[0].1);
    let (p0, a0, a1) = (trained(&p0), trained(&a0), trained(&a1));
    let mut moved = 0;
    for ((((name, p), x0), x1), d) in p0.iter().zip(&a0).zip(&a1).zip(&dp) {
        assert_eq!(name, &d.0);
        for (i, (((&p, &v0), &v1), &got)) in p.iter().zip(&x0.1).zip(&x1.1).zip(&d.1).enumerate() {
            let (d0, d1) = (v0 - p, v1 - p);
            let expected = p + 0.5 * (d0 + d1);
            let tol = 8.0 * f32::EPSILON * (p.abs() + d0.abs() + d1.abs()) + 1e-30;
            assert!((got - expected).abs() <= tol, "{name}[{i}]: {got} vs {expected} (tol {tol})");
            moved += (got != p) as usize;
        }
    }
    assert!(moved > 1000, "the step moved only {moved} values");

    // Several steps: still bitwise identical on both ranks.
    let ranks = run_ranks(vec![3, 4], vec![shard(0), shard(1)], 3);
    assert_eq!(bits(&trained(&ranks[0].1)), bits(&trained(&ranks[1].1)));
}

#[test]
fn a_dataset_on_one_rank_trains_on_every_rank_and_an_absent_one_on_none() {
    // Three datasets: 0 on both ranks, 1 only on rank 0, 2 on no rank.
    let classes = vec![3, 4, 5];
    let shards = vec![vec![batch(0, 2, 24, 24, 3, 1), batch(1, 2, 24, 24, 4, 2)], vec![batch(0, 2, 24, 24, 3, 3)]];
    let ranks = run_ranks(classes, shards, 2);
    let (start, end1) = (trained(&ranks[0].0), trained(&ranks[1].1));
    assert_eq!(bits(&trained(&ranks[0].1)), bits(&end1));
    let mut checked = 0;
    for ((name, before), (_, after)) in start.iter().zip(&end1) {
        if !(name.ends_with(".gamma") || name.ends_with(".beta")) {
            continue;
        }
        let c = before.len() / 3;
        // Dataset 1's rows moved on rank 1 too, whose forwards never saw it.
        assert_ne!(before[c..2 * c], after[c..2 * c], "{name}: dataset 1 did not train");
        assert_eq!(before[2 * c..], after[2 * c..], "{name}: dataset 2 moved");
        checked += 1;
    }
    assert!(checked > 10);
}

#[test]
fn one_rank_is_the_single_process_run_and_dsbn_without_dat_is_refused() {
    let shard = vec![batch(0, 2, 24, 24, 3, 5), batch(1, 2, 24, 24, 4, 6)];
    let dp = run_ranks(vec![3, 4], vec![shard.clone()], 2).remove(0).1;
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, model(vec![3, 4], 7), TrainConfig::default()).unwrap();
    for _ in 0..2 {
        t.step(&shard).unwrap();
    }
    let single = snapshot(&t.store);
    let values = |s: &Snapshot| bits(&s.iter().map(|(n, v, _)| (n.clone(), v.clone())).collect::<Vec<_>>());
    assert_eq!(values(&dp), values(&single));

    let config = TrainConfig { mode: Mode::DsbnNoDat, ..TrainConfig::default() };
    let mut t = Trainer::new(&be, model(vec![3, 4], 7), config).unwrap();
    let comm: Arc<dyn Communicator> = Arc::new(local_group(1).unwrap().remove(0));
    assert!(t.set_data_parallel(comm).is_err());
}
