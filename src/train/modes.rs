//! The paper's training schemes and baselines ([`Mode`]), each as the paper defines it, on any
//! number of datasets: which network each needs ([`Mode::model_config`]), how a dataset reaches
//! its BN slice, convolutions and head ([`Mode::route`]), which datasets an iteration draws
//! ([`Interval`], [`Mode::plan`]) and what the evaluation of each dataset means
//! ([`Mode::evaluation`]).
//!
//! Datasets keep their global index (their position in the run's list) everywhere; a mode that
//! needs fewer heads or BN slices than there are datasets routes each dataset it trains to the
//! ones it has, and refuses the others. The network's own dataset order (its heads, what a
//! checkpoint lists) is [`Mode::head_datasets`].
//!
//! "Without DAT" means what it does in the paper's Table 3: each dataset's batch gets its own
//! backward and optimiser step (the datasets alternate step by step), instead of one step on
//! the summed losses of all datasets.

use crate::data::{Synthetic, IGNORE};
use crate::error::{Error, Result};
use crate::nn::ModelConfig;

/// What an iteration does with the datasets.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Dataset Alternation Training with DSBN: one forward per dataset (each with its own BN
    /// slice and head), summed losses, one backward and one step.
    Dat,
    /// One forward over a batch that mixes every dataset (our kernels pick each sample's BN
    /// slice), then each dataset's head on its samples.
    Mixed,
    /// Baseline: a single-dataset network (one BN, one head) trained and evaluated on dataset
    /// J only.
    Single(usize),
    /// Baseline (Table 3, shared conv + shared BN): DAT, but every BatchNorm is shared by all
    /// datasets; one head per dataset.
    SharedBn,
    /// Baseline (Table 3, shared conv + shared BN without DAT): shared BN, a step per dataset.
    SharedBnNoDat,
    /// Baseline (Table 3, unshared conv + shared BN): each dataset has its own convolutions
    /// (and head); the BatchNorms are shared; DAT.
    SeparateConv,
    /// Baseline (Table 3): DSBN without DAT — backward and SGD step after each dataset's forward.
    DsbnNoDat,
    /// Baseline (Table 1, fine-tuning): a single-dataset network (shared BN) trained on
    /// `source` for `switch_at` iterations; then a new final classifier for `target`, and every
    /// layer fine-tuned on `target` with a restarted schedule (poly decay over the remaining
    /// iterations, fresh momentum).
    Finetune {
        /// Dataset I trained first.
        source: usize,
        /// Dataset J fine-tuned on and evaluated.
        target: usize,
        /// The iteration at which fine-tuning starts.
        switch_at: usize,
    },
    /// Baseline (Table 6, two-stage): as [`Mode::Finetune`], but the second stage also gets a
    /// new BN slice for `target` (the source's slice is kept, frozen), and with `freeze_conv`
    /// every convolution shared by the datasets stays frozen: only the target's BN slice and
    /// classifier train.
    TwoStage {
        /// Dataset I trained first.
        source: usize,
        /// Dataset J of the second stage.
        target: usize,
        /// The iteration at which the second stage starts.
        switch_at: usize,
        /// Freeze every shared convolution in the second stage.
        freeze_conv: bool,
    },
    /// Baseline (Table 2, label remapping): one network in `target`'s label space (one head,
    /// one shared BN) trained on every dataset, each other dataset's labels mapped into the
    /// target's classes by `class_map[d][label]` (255 = ignore the class); evaluated on the
    /// target in its own classes.
    LabelRemap {
        /// Dataset J whose classes the head predicts.
        target: usize,
        /// Per dataset, the target class of each of its classes (255: ignored). The target's
        /// own entry is not read (its labels are its classes).
        class_map: Vec<Vec<u8>>,
    },
}

/// Which datasets the iterations of a multi-dataset mode draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interval {
    /// Every iteration draws one batch of each dataset (the paper's DAT).
    #[default]
    Every,
    /// The authors' iteration interval, across iterations: `t` iterations on `dataset` alone,
    /// then one iteration on each other dataset alone (in index order), and again. Each
    /// iteration steps on its one dataset.
    Across {
        /// Dataset A, trained t times in a row.
        dataset: usize,
        /// t ≥ 1.
        t: usize,
    },
    /// `t` batches of `dataset` and one of every other dataset inside each iteration, under
    /// one backward (weighs `dataset` t times as much in the summed loss).
    Within {
        /// Dataset A.
        dataset: usize,
        /// t ≥ 1.
        t: usize,
    },
}

impl Interval {
    /// The datasets drawn by iteration `iter` among `datasets` (the ones the mode trains).
    pub fn plan(&self, iter: usize, datasets: &[usize]) -> Vec<usize> {
        match *self {
            Interval::Every => datasets.to_vec(),
            Interval::Across { dataset, t } => {
                let others: Vec<usize> = datasets.iter().copied().filter(|&d| d != dataset).collect();
                let pos = iter % (t + others.len());
                if pos < t {
                    vec![dataset]
                } else {
                    vec![others[pos - t]]
                }
            }
            Interval::Within { dataset, t } => {
                let mut p = vec![dataset; t];
                p.extend(datasets.iter().copied().filter(|&d| d != dataset));
                p
            }
        }
    }

    /// Checks t ≥ 1 and that the dataset is among `datasets`.
    pub fn check(&self, datasets: &[usize]) -> Result<()> {
        match *self {
            Interval::Every => Ok(()),
            Interval::Across { dataset, t } | Interval::Within { dataset, t } => {
                if t == 0 {
                    return Err(Error::InvalidArgument("the interval t must be at least 1".into()));
                }
                if !datasets.contains(&dataset) {
                    return Err(Error::InvalidArgument(format!(
                        "the interval names dataset {dataset}, which this mode does not train (it trains {datasets:?})"
                    )));
                }
                Ok(())
            }
        }
    }
}

/// Where a dataset's samples go in the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The BN slice normalising them.
    pub bn: usize,
    /// The head classifying them.
    pub head: usize,
    /// The convolution set computing their features.
    pub conv_set: usize,
}

impl Mode {
    /// The mode's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Dat => "dat",
            Mode::Mixed => "mixed",
            Mode::Single(_) => "single",
            Mode::SharedBn => "shared-bn",
            Mode::SharedBnNoDat => "shared-bn --no-dat",
            Mode::SeparateConv => "separate-conv",
            Mode::DsbnNoDat => "dsbn-no-dat",
            Mode::Finetune { .. } => "finetune",
            Mode::TwoStage { freeze_conv: false, .. } => "two-stage",
            Mode::TwoStage { freeze_conv: true, .. } => "two-stage --freeze-conv",
            Mode::LabelRemap { .. } => "label-remap",
        }
    }

    /// The global indices of the network's datasets in head order (what its checkpoint
    /// lists), for a run over `num_datasets` datasets.
    pub fn head_datasets(&self, num_datasets: usize) -> Vec<usize> {
        match self {
            Mode::Single(j) => vec![*j],
            Mode::Finetune { source, target, .. } | Mode::TwoStage { source, target, .. } => vec![*source, *target],
            Mode::LabelRemap { target, .. } => vec![*target],
            _ => (0..num_datasets).collect(),
        }
    }

    /// The datasets whose batches the mode trains on, over `num_datasets` datasets.
    pub fn trained_datasets(&self, num_datasets: usize) -> Vec<usize> {
        match self {
            Mode::LabelRemap { .. } => (0..num_datasets).collect(),
            m => m.head_datasets(num_datasets),
        }
    }

    /// The BN slices the network needs for `heads` heads.
    pub fn num_bn(&self, heads: usize) -> usize {
        match self {
            Mode::Dat | Mode::Mixed | Mode::DsbnNoDat => heads,
            Mode::TwoStage { .. } => 2,
            _ => 1,
        }
    }

    /// The network of this mode for datasets with `classes[d]` classes: heads in
    /// [`Mode::head_datasets`] order, BN slices, convolution sets; the rest from `base`.
    pub fn model_config(&self, classes: &[usize], base: ModelConfig) -> Result<ModelConfig> {
        self.check_datasets(classes.len())?;
        let heads: Vec<usize> = self.head_datasets(classes.len()).iter().map(|&d| classes[d]).collect();
        let conv_sets = if *self == Mode::SeparateConv { heads.len() } else { 1 };
        Ok(ModelConfig { num_bn: self.num_bn(heads.len()), conv_sets, num_classes: heads, ..base })
    }

    /// Checks the mode's dataset indices against a run of `num_datasets` datasets.
    pub fn check_datasets(&self, num_datasets: usize) -> Result<()> {
        let bad = |what: &str, d: usize| {
            Err(Error::InvalidArgument(format!("{what} is dataset {d}, but the run has {num_datasets} datasets")))
        };
        match self {
            Mode::Single(j) if *j >= num_datasets => bad("the single dataset", *j),
            Mode::Finetune { source, target, .. } | Mode::TwoStage { source, target, .. } => {
                if *source >= num_datasets {
                    bad("the source", *source)
                } else if *target >= num_datasets {
                    bad("the target", *target)
                } else if source == target {
                    Err(Error::InvalidArgument("the source and the target must be different datasets".into()))
                } else {
                    Ok(())
                }
            }
            Mode::LabelRemap { target, .. } if *target >= num_datasets => bad("the target", *target),
            _ => Ok(()),
        }
    }

    /// Checks that `model` is the network this mode trains (heads, BN slices, conv sets).
    pub fn check_model(&self, model: &ModelConfig) -> Result<()> {
        let heads = model.num_classes.len();
        let want_heads = match self {
            Mode::Single(_) | Mode::LabelRemap { .. } => Some(1),
            Mode::Finetune { .. } | Mode::TwoStage { .. } => Some(2),
            _ => None,
        };
        let want_sets = if *self == Mode::SeparateConv { heads } else { 1 };
        let want_bn = self.num_bn(heads);
        if want_heads.is_some_and(|h| h != heads) || model.num_bn != want_bn || model.conv_sets != want_sets {
            return Err(Error::InvalidArgument(format!(
                "mode {} needs a model with {} head(s), {want_bn} BN slice(s) and {want_sets} convolution set(s); \
                 got {heads}, {} and {} (build it with Mode::model_config)",
                self.name(),
                want_heads.map_or("any number of".to_string(), |h| h.to_string()),
                model.num_bn,
                model.conv_sets
            )));
        }
        if let Mode::LabelRemap { target, class_map } = self {
            let c = model.num_classes[0];
            for (d, map) in class_map.iter().enumerate().filter(|(d, _)| d != target) {
                if let Some(&bad) = map.iter().find(|&&t| t != 255 && t as usize >= c) {
                    return Err(Error::InvalidArgument(format!(
                        "the class map sends a class of dataset {d} to {bad}, outside the target's {c} classes"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Where dataset `d` goes; `None` when this mode has no head for it.
    pub fn route(&self, d: usize, heads: usize) -> Option<Route> {
        let r = |bn, head| Some(Route { bn, head, conv_set: 0 });
        match self {
            Mode::Dat | Mode::Mixed | Mode::DsbnNoDat => (d < heads).then_some(Route { bn: d, head: d, conv_set: 0 }),
            Mode::SharedBn | Mode::SharedBnNoDat => (d < heads).then_some(Route { bn: 0, head: d, conv_set: 0 }),
            Mode::SeparateConv => (d < heads).then_some(Route { bn: 0, head: d, conv_set: d }),
            Mode::Single(j) if d == *j => r(0, 0),
            Mode::Finetune { source, .. } if d == *source => r(0, 0),
            Mode::Finetune { target, .. } if d == *target => r(0, 1),
            Mode::TwoStage { source, .. } if d == *source => r(0, 0),
            Mode::TwoStage { target, .. } if d == *target => r(1, 1),
            Mode::LabelRemap { class_map, target } if d == *target || d < class_map.len() => r(0, 0),
            _ => None,
        }
    }

    /// A backward and a step after each batch (the "without DAT" baselines).
    pub fn steps_per_batch(&self) -> bool {
        matches!(self, Mode::DsbnNoDat | Mode::SharedBnNoDat)
    }

    /// The (source, target, switch) of a two-stage mode.
    pub fn stages(&self) -> Option<(usize, usize, usize)> {
        match *self {
            Mode::Finetune { source, target, switch_at } | Mode::TwoStage { source, target, switch_at, .. } => {
                Some((source, target, switch_at))
            }
            _ => None,
        }
    }

    /// Iteration `iter`'s place in its learning-rate schedule: (iterations into the schedule,
    /// its length). A two-stage mode restarts the schedule at the switch.
    pub fn schedule(&self, iter: usize, max_iters: usize) -> (usize, usize) {
        match self.stages() {
            Some((_, _, s)) if iter < s => (iter, s),
            Some((_, _, s)) => (iter - s, max_iters.saturating_sub(s).max(1)),
            None => (iter, max_iters),
        }
    }

    /// Whether iteration `iter` trains with every shared convolution frozen.
    pub fn convs_frozen(&self, iter: usize) -> bool {
        matches!(*self, Mode::TwoStage { freeze_conv: true, switch_at, .. } if iter >= switch_at)
    }

    /// The datasets iteration `iter` draws, for a run over `num_datasets` datasets.
    pub fn plan(&self, iter: usize, num_datasets: usize, interval: &Interval) -> Vec<usize> {
        match self {
            Mode::Single(j) => vec![*j],
            Mode::Finetune { source, target, switch_at } | Mode::TwoStage { source, target, switch_at, .. } => {
                vec![if iter < *switch_at { *source } else { *target }]
            }
            m => interval.plan(iter, &m.trained_datasets(num_datasets)),
        }
    }

    /// The datasets this mode's run evaluates (over `num_datasets` datasets) and what each
    /// evaluation means, given the datasets' names.
    pub fn evaluation(&self, names: &[String]) -> Vec<(usize, String)> {
        let n = |d: usize| names.get(d).cloned().unwrap_or_else(|| format!("dataset{d}"));
        let all = |what: &str| (0..names.len()).map(|d| (d, what.to_string())).collect();
        match self {
            Mode::Dat | Mode::Mixed => all("its own head and BN slice, trained jointly with DAT"),
            Mode::DsbnNoDat => all("its own head and BN slice, datasets stepped in turn (no DAT)"),
            Mode::SharedBn => all("its own head, BN shared by all datasets, DAT"),
            Mode::SharedBnNoDat => all("its own head, BN shared by all datasets, stepped in turn (no DAT)"),
            Mode::SeparateConv => all("its own convolutions and head, BN shared by all datasets"),
            Mode::Single(j) => vec![(*j, format!("a network trained on {} alone", n(*j)))],
            Mode::Finetune { source, target, .. } => vec![(
                *target,
                format!(
                    "trained on {}, then every layer fine-tuned on {} with a new classifier",
                    n(*source),
                    n(*target)
                ),
            )],
            Mode::TwoStage { source, target, freeze_conv, .. } => vec![(
                *target,
                format!(
                    "trained on {}, then a new BN slice and classifier for {}{}",
                    n(*source),
                    n(*target),
                    if *freeze_conv { " with every convolution frozen" } else { ", all layers trained" }
                ),
            )],
            Mode::LabelRemap { target, .. } => {
                vec![(*target, format!("in {}'s classes; the other datasets' labels mapped into them", n(*target)))]
            }
        }
    }
}

/// A mode that runs the network `model` describes, for evaluating a checkpoint of any mode:
/// DSBN when it has a slice per head, unshared convolutions when it has a set per head, else
/// shared BN (a one-head, one-slice network is both).
pub fn mode_for_model(model: &ModelConfig) -> Mode {
    let heads = model.num_classes.len();
    if model.conv_sets > 1 {
        Mode::SeparateConv
    } else if model.num_bn == heads {
        Mode::Dat
    } else {
        Mode::SharedBn
    }
}

/// The class map of label remapping into `target` for the synthetic domains, derived from the
/// generator's fine classes: a class maps to the target class that holds all of its fine
/// classes, and to ignore (255) when they fall into several target classes (a coarse "flat"
/// holds road and sidewalk, which a fine target tells apart) or into none.
pub fn synthetic_class_map(data: &Synthetic, target: usize) -> Vec<Vec<u8>> {
    let t = data.info(target);
    (0..data.num_domains())
        .map(|d| {
            if d == target {
                return Vec::new();
            }
            let info = data.info(d);
            (0..info.num_classes() as i32)
                .map(|c| {
                    let mut to: Vec<i32> = info.fine_classes_of(c).iter().map(|f| t.map_fine(f.label())).collect();
                    to.sort_unstable();
                    to.dedup();
                    match to[..] {
                        [one] if one != IGNORE => one as u8,
                        _ => 255,
                    }
                })
                .collect()
        })
        .collect()
}

/// Parses a class map file for label remapping into `target` (JSON): an object with one entry
/// per other dataset, `"NAME": {"CLASS": "TARGET CLASS" | "ignore", ...}` naming every class of
/// that dataset (classes and target classes by name or by index). The result is indexed by
/// dataset (`names` order); the target's entry is empty.
pub fn parse_class_map(text: &str, names: &[String], classes: &[Vec<String>], target: usize) -> Result<Vec<Vec<u8>>> {
    let bad = |m: String| Error::InvalidArgument(format!("class map: {m}"));
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| bad("expected an object of datasets".into()))?;
    let tc = &classes[target];
    let find = |list: &[String], s: &str| -> Option<usize> {
        list.iter().position(|c| c == s).or_else(|| s.parse::<usize>().ok().filter(|&i| i < list.len()))
    };
    if let Some(k) = obj.keys().find(|k| !names.contains(k)) {
        return Err(bad(format!("{k:?} is not a dataset of this run ({names:?})")));
    }
    let mut out = vec![Vec::new(); names.len()];
    for (d, name) in names.iter().enumerate() {
        if d == target {
            continue;
        }
        let entry = obj.get(name).and_then(|e| e.as_object()).ok_or_else(|| {
            bad(format!("no object for dataset {name:?} (every class of every other dataset must be mapped)"))
        })?;
        let mut map = vec![None; classes[d].len()];
        for (k, t) in entry {
            let c = find(&classes[d], k).ok_or_else(|| bad(format!("{name:?} has no class {k:?}")))?;
            let t = t.as_str().map(str::to_string).or_else(|| t.as_u64().map(|i| i.to_string()));
            let t = t.ok_or_else(|| bad(format!("{name:?}.{k:?}: expected a class name, an index or \"ignore\"")))?;
            map[c] = Some(if t == "ignore" || t == "255" {
                255u8
            } else {
                let i = find(tc, &t).ok_or_else(|| bad(format!("{name:?}.{k:?}: the target has no class {t:?}")))?;
                i as u8
            });
        }
        if let Some(c) = map.iter().position(Option::is_none) {
            return Err(bad(format!(
                "class {:?} of {name:?} is not mapped (map it or write \"ignore\")",
                classes[d][c]
            )));
        }
        out[d] = map.into_iter().flatten().collect();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_draw_the_right_datasets() {
        let across = Interval::Across { dataset: 1, t: 2 };
        let seq: Vec<Vec<usize>> = (0..8).map(|i| across.plan(i, &[0, 1, 2])).collect();
        assert_eq!(seq, [[1], [1], [0], [2], [1], [1], [0], [2]].map(|v| v.to_vec()));
        let within = Interval::Within { dataset: 1, t: 3 };
        assert_eq!(within.plan(5, &[0, 1]), [1, 1, 1, 0]);
        assert_eq!(Interval::Every.plan(3, &[0, 1, 2]), [0, 1, 2]);
        assert!(Interval::Across { dataset: 0, t: 0 }.check(&[0, 1]).is_err());
        assert!(Interval::Across { dataset: 3, t: 1 }.check(&[0, 1]).is_err());
    }

    #[test]
    fn class_maps_parse_by_name_and_index() {
        let names = vec!["city".to_string(), "dusk".to_string()];
        let classes = vec![
            vec!["road".to_string(), "sidewalk".to_string(), "car".to_string()],
            vec!["flat".to_string(), "object".to_string()],
        ];
        let m = parse_class_map(r#"{"dusk": {"flat": "ignore", "1": "car"}}"#, &names, &classes, 0).unwrap();
        assert_eq!(m, vec![vec![], vec![255, 2]]);
        assert!(parse_class_map(r#"{"dusk": {"flat": "road"}}"#, &names, &classes, 0).is_err());
        assert!(parse_class_map(r#"{"dusk": {"flat": "road", "object": "bus"}}"#, &names, &classes, 0).is_err());
        assert!(parse_class_map(r#"{"fog": {}}"#, &names, &classes, 0).is_err());
    }
}
