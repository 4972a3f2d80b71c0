//! The paper's baselines as modes: what each trains, what stays bitwise frozen, which datasets
//! an iteration draws, and what is evaluated.

use super::*;
use cdcl::data::{Synthetic, SyntheticConfig};
use cdcl::train::modes::synthetic_class_map;
use cdcl::train::{evaluate, Interval};

type Snap = Vec<(String, Vec<f32>, Option<Vec<f32>>)>;

fn trainer(classes: &[usize], mode: Mode, max_iters: usize) -> Trainer<CpuBackend> {
    let model = mode.model_config(classes, tiny_model(classes.to_vec(), 0.0)).unwrap();
    let cfg = TrainConfig { mode, max_iters, ..TrainConfig::default() };
    Trainer::new(&CpuBackend::new(), model, cfg).unwrap()
}

/// The batches iteration `it` of `t`'s plan asks for (datasets with `classes[d]` classes).
fn planned(t: &Trainer<CpuBackend>, it: usize, classes: &[usize]) -> Vec<Batch> {
    t.plan(it, classes.len()).iter().map(|&d| batch(d, 2, 24, 24, classes[d], 100 + 7 * it as u64 + d as u64)).collect()
}

/// Every tensor whose name passes `pick`: unchanged between the snapshots (`same`) or changed.
fn check(a: &Snap, b: &Snap, pick: impl Fn(&str) -> bool, same: bool, what: &str) {
    let mut n = 0;
    for ((name, va, _), (_, vb, _)) in a.iter().zip(b) {
        if pick(name) {
            n += 1;
            assert_eq!(va == vb, same, "{what}: {name} {}", if same { "changed" } else { "did not move" });
        }
    }
    assert!(n > 0, "{what}: no tensor selected");
}

/// BN table rows of slice `d` of `slices` (γ, β and running statistics), every layer.
fn bn_rows(s: &Snap, d: usize, slices: usize) -> Vec<Vec<f32>> {
    s.iter()
        .filter(|(n, ..)| n.ends_with(".gamma") || n.ends_with(".beta") || n.contains(".running_"))
        .map(|(_, v, _)| {
            let c = v.len() / slices;
            v[d * c..(d + 1) * c].to_vec()
        })
        .collect()
}

fn is_conv(name: &str) -> bool {
    name.ends_with(".weight") && !name.starts_with("cls.4.") && !name.starts_with("aux.4.")
}

#[test]
fn single_trains_and_evaluates_only_its_dataset() {
    let classes = [3, 4, 2];
    let mut t = trainer(&classes, Mode::Single(1), 10);
    assert_eq!(t.model.config.num_classes, [4], "one head, in dataset 1's classes");
    assert_eq!(t.model.config.num_bn, 1, "a single-dataset network has one BN");
    assert!((0..5).all(|it| t.plan(it, 3) == [1]));
    let a = snapshot(&t.store);
    t.step(&planned(&t, 0, &classes)).unwrap();
    let b = snapshot(&t.store);
    check(&a, &b, |n| n.ends_with(".weight") || n.ends_with(".gamma"), false, "single: every layer trains");
    assert!(t.step(&[batch(0, 2, 24, 24, 3, 1)]).is_err(), "dataset 0 is not trained");
    let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let evaluated: Vec<usize> = Mode::Single(1).evaluation(&names).into_iter().map(|(d, _)| d).collect();
    assert_eq!(evaluated, [1], "single evaluates only its dataset");
    assert!(evaluate(&mut t, &[batch(0, 1, 24, 24, 3, 2)]).is_err(), "no head for dataset 0");
    let r = evaluate(&mut t, &[batch(1, 1, 24, 24, 4, 2)]).unwrap();
    assert_eq!(r.confusion.num_classes(), [4]);
}

#[test]
fn finetune_restarts_the_schedule_with_a_new_classifier_and_trains_every_layer() {
    let classes = [3, 4];
    let mode = Mode::Finetune { source: 0, target: 1, switch_at: 2 };
    let mut t = trainer(&classes, mode.clone(), 4);
    assert_eq!((t.model.config.num_classes.clone(), t.model.config.num_bn), (vec![3, 4], 1));
    assert_eq!((0..4).map(|it| t.plan(it, 2)[0]).collect::<Vec<_>>(), [0, 0, 1, 1]);
    assert_eq!(t.learning_rate(2), t.learning_rate(0), "the schedule restarts at the switch");
    assert!(t.learning_rate(3) < t.learning_rate(2));
    let init = snapshot(&t.store);
    for it in 0..2 {
        t.step(&planned(&t, it, &classes)).unwrap();
    }
    let stage1 = snapshot(&t.store);
    let target_head = |n: &str| n.starts_with("cls.4.1.") || n.starts_with("aux.4.1.");
    let source_head = |n: &str| n.starts_with("cls.4.0.") || n.starts_with("aux.4.0.");
    check(&init, &stage1, target_head, true, "stage 1 leaves the target's classifier at its initialisation");
    let mom = |t: &Trainer<CpuBackend>, name: &str| {
        t.store.weights().iter().find(|w| w.name == name).unwrap().momentum.is_some()
    };
    assert!(mom(&t, "cls.4.0.weight"));
    for it in 2..4 {
        t.step(&planned(&t, it, &classes)).unwrap();
    }
    let stage2 = snapshot(&t.store);
    check(&stage1, &stage2, source_head, true, "fine-tuning leaves the source classifier");
    check(&stage1, &stage2, target_head, false, "the new classifier trains");
    check(&stage1, &stage2, is_conv, false, "fine-tuning trains every convolution");
    check(&stage1, &stage2, |n| n.ends_with(".gamma"), false, "and the shared BN");
    assert!(!mom(&t, "cls.4.0.weight"), "a new optimiser: the source head's momentum is gone");
    let names: Vec<String> = ["a", "b"].map(String::from).to_vec();
    assert_eq!(mode.evaluation(&names).iter().map(|e| e.0).collect::<Vec<_>>(), [1]);
}

#[test]
fn two_stage_gets_a_new_bn_slice_and_freeze_conv_freezes_every_shared_convolution() {
    let classes = [3, 4];
    for freeze_conv in [true, false] {
        let mode = Mode::TwoStage { source: 0, target: 1, switch_at: 2, freeze_conv };
        let mut t = trainer(&classes, mode, 4);
        assert_eq!(t.model.config.num_bn, 2);
        let init = snapshot(&t.store);
        for it in 0..2 {
            t.step(&planned(&t, it, &classes)).unwrap();
        }
        let stage1 = snapshot(&t.store);
        assert_eq!(bn_rows(&init, 1, 2), bn_rows(&stage1, 1, 2), "the target's slice is untouched in stage 1");
        for it in 2..4 {
            t.step(&planned(&t, it, &classes)).unwrap();
        }
        let stage2 = snapshot(&t.store);
        assert_eq!(bn_rows(&stage1, 0, 2), bn_rows(&stage2, 0, 2), "the source's slice is frozen in stage 2");
        let moved = bn_rows(&stage1, 1, 2).iter().zip(bn_rows(&stage2, 1, 2)).filter(|(a, b)| **a != *b).count();
        assert_eq!(moved, bn_rows(&stage1, 1, 2).len(), "every layer's target slice trains");
        check(&stage1, &stage2, |n| n.starts_with("cls.4.0."), true, "source classifier");
        check(&stage1, &stage2, |n| n.starts_with("cls.4.1."), false, "target classifier");
        check(&stage1, &stage2, is_conv, freeze_conv, "shared convolutions");
        if freeze_conv {
            let frozen = t.store.weights().iter().filter(|w| w.dataset.is_none());
            assert!(frozen.into_iter().all(|w| w.momentum.is_none()), "frozen convolutions get no optimiser state");
        }
    }
}

#[test]
fn label_remap_ignores_ambiguous_classes_and_scores_in_the_targets_classes() {
    let mode = Mode::LabelRemap { target: 0, class_map: vec![vec![], vec![255, 1, 255]] };
    let model = mode.model_config(&[3, 3], tiny_model(vec![3, 3], 0.0)).unwrap();
    assert_eq!((model.num_classes.clone(), model.num_bn), (vec![3], 1));
    let mut t = Trainer::new(&CpuBackend::new(), model, TrainConfig { mode, ..TrainConfig::default() }).unwrap();
    let mut b = batch(1, 1, 2, 2, 3, 1);
    b.labels = vec![0, 1, 2, 255];
    assert_eq!(t.labels_for(&b).unwrap(), [255, 1, 255, 255]);
    b.labels[0] = 3; // dataset 1 has 3 classes
    assert!(matches!(t.labels_for(&b), Err(cdcl::Error::InvalidLabel { dataset: 1, label: 3, .. })));
    assert_eq!(t.plan(0, 2), [0, 1]);
    t.step(&[batch(0, 2, 24, 24, 3, 1), batch(1, 2, 24, 24, 3, 2)]).unwrap();
    let r = evaluate(&mut t, &[batch(0, 1, 24, 24, 3, 3)]).unwrap();
    assert_eq!(r.confusion.num_classes(), [3], "scored in the target's classes");
    let names: Vec<String> = ["a", "b"].map(String::from).to_vec();
    assert_eq!(t.config.mode.evaluation(&names).iter().map(|e| e.0).collect::<Vec<_>>(), [0]);

    // The synthetic domains: coarse classes that hold several fine ones are ignored.
    let data = Synthetic::new(SyntheticConfig::default_three_domains(16, 16, 0)).unwrap();
    let to_city = synthetic_class_map(&data, 0);
    // dusk's flat (road + sidewalk), construction (building + pole), object (car + person).
    assert_eq!(to_city[1], [255, 255, 3, 4, 255]);
    let to_dusk = synthetic_class_map(&data, 1);
    assert_eq!(to_dusk[0], [0, 0, 1, 2, 3, 1, 4, 4], "every fine class has its coarse one");
}

#[test]
fn shared_bn_and_unshared_convolutions() {
    let classes = [3, 4];
    let t = trainer(&classes, Mode::SharedBn, 4);
    assert_eq!((t.model.config.num_bn, t.model.config.conv_sets), (1, 1));
    let mut t = trainer(&classes, Mode::SeparateConv, 4);
    assert_eq!((t.model.config.num_bn, t.model.config.conv_sets), (1, 2));
    let a = snapshot(&t.store);
    t.step(&[batch(0, 2, 24, 24, 3, 1)]).unwrap();
    let b = snapshot(&t.store);
    check(&a, &b, |n| n.contains(".set1."), true, "dataset 1's convolutions without dataset 1");
    check(&a, &b, |n| is_conv(n) && !n.contains(".set1."), false, "dataset 0's convolutions");
    check(&a, &b, |n| n.ends_with(".gamma"), false, "the shared BN");
    t.step(&[batch(0, 2, 24, 24, 3, 2), batch(1, 2, 24, 24, 4, 3)]).unwrap();
    check(&b, &snapshot(&t.store), |n| n.contains(".set1."), false, "dataset 1's convolutions");
    // Its evaluation runs each dataset through its own convolutions.
    let r = evaluate(&mut t, &[batch(1, 1, 24, 24, 4, 4)]).unwrap();
    assert_eq!(r.confusion.num_classes(), [3, 4]);
}

/// Without DAT, an iteration over two datasets is one step per dataset: at a constant learning
/// rate and without dropout, bit for bit two DAT steps of one dataset each.
#[test]
fn no_dat_is_a_step_per_dataset() {
    let classes = [3, 4];
    let data = [batch(0, 2, 24, 24, 3, 1), batch(1, 2, 24, 24, 4, 2)];
    for (no_dat, dat) in [(Mode::SharedBnNoDat, Mode::SharedBn), (Mode::DsbnNoDat, Mode::Dat)] {
        let mk = |mode: Mode| {
            let model = mode.model_config(&classes, tiny_model(classes.to_vec(), 0.0)).unwrap();
            let cfg = TrainConfig { mode, power: 0.0, ..TrainConfig::default() };
            Trainer::new(&CpuBackend::new(), model, cfg).unwrap()
        };
        let (mut a, mut b) = (mk(no_dat.clone()), mk(dat));
        a.step(&data).unwrap();
        b.step(&data[..1]).unwrap();
        b.step(&data[1..]).unwrap();
        assert_eq!(snapshot(&a.store), snapshot(&b.store), "{no_dat:?}");
    }
}

#[test]
fn intervals_across_and_within_iterations_draw_the_right_datasets() {
    let classes = [3, 4, 2];
    let cfg = |interval| TrainConfig { interval, ..TrainConfig::default() };
    let be = CpuBackend::new();
    let t = Trainer::new(&be, tiny_model(classes.to_vec(), 0.0), cfg(Interval::Across { dataset: 1, t: 3 })).unwrap();
    let seq: Vec<Vec<usize>> = (0..10).map(|it| t.plan(it, 3)).collect();
    let want: Vec<Vec<usize>> = [1, 1, 1, 0, 2, 1, 1, 1, 0, 2].iter().map(|&d| vec![d]).collect();
    assert_eq!(seq, want, "t iterations on dataset 1, then one on each other dataset");
    let t = Trainer::new(&be, tiny_model(classes.to_vec(), 0.0), cfg(Interval::Within { dataset: 2, t: 2 })).unwrap();
    assert_eq!(t.plan(7, 3), [2, 2, 0, 1]);
    let t = Trainer::new(&be, tiny_model(classes.to_vec(), 0.0), cfg(Interval::Every)).unwrap();
    assert_eq!(t.plan(7, 3), [0, 1, 2]);
    // An interval naming a dataset the model lacks, or t = 0, or a single-dataset mode.
    assert!(Trainer::new(&be, tiny_model(classes.to_vec(), 0.0), cfg(Interval::Across { dataset: 3, t: 1 })).is_err());
    assert!(Trainer::new(&be, tiny_model(classes.to_vec(), 0.0), cfg(Interval::Across { dataset: 0, t: 0 })).is_err());
    let single = Mode::Single(0);
    let model = single.model_config(&classes, tiny_model(classes.to_vec(), 0.0)).unwrap();
    let c = TrainConfig { mode: single, ..cfg(Interval::Across { dataset: 0, t: 2 }) };
    assert!(Trainer::new(&be, model, c).is_err());
}

#[test]
fn a_model_that_is_not_the_modes_network_is_refused() {
    let be = CpuBackend::new();
    let two_heads = tiny_model(vec![3, 4], 0.0);
    for mode in
        [Mode::Single(0), Mode::SharedBn, Mode::SeparateConv, Mode::Finetune { source: 0, target: 1, switch_at: 2 }]
    {
        let r = Trainer::new(&be, two_heads.clone(), TrainConfig { mode: mode.clone(), ..TrainConfig::default() });
        assert!(matches!(r, Err(cdcl::Error::InvalidArgument(_))), "{mode:?}");
    }
    let bad = Mode::Finetune { source: 0, target: 0, switch_at: 2 };
    assert!(bad.model_config(&[3, 4], two_heads.clone()).is_err(), "source = target");
    let late = Mode::Finetune { source: 0, target: 1, switch_at: 100 };
    let model = late.model_config(&[3, 4], two_heads).unwrap();
    assert!(
        Trainer::new(&be, model, TrainConfig { mode: late, ..TrainConfig::default() }).is_err(),
        "switch past the run"
    );
}
