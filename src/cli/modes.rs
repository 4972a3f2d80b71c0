//! `cdcl train --mode ...`: the training scheme and its datasets, from the command line to a
//! [`Mode`] and an [`Interval`]. Datasets are named by their name in the run or their index.

use std::path::PathBuf;

use clap::ValueEnum;

use cdcl::data::Synthetic;
use cdcl::train::{parse_class_map, Interval, Mode};
use cdcl::{Error, Result};

/// The training schemes of `--mode`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ModeArg {
    /// DSBN + Dataset Alternation Training (the paper's method).
    Dat,
    /// DSBN, every dataset's samples in one mixed batch.
    Mixed,
    /// One dataset alone (--dataset).
    Single,
    /// Shared conv + shared BN (with --no-dat: a step per dataset).
    SharedBn,
    /// Unshared conv + shared BN.
    SeparateConv,
    /// DSBN, a step per dataset instead of DAT.
    DsbnNoDat,
    /// Train on --source, then fine-tune every layer on --target with a new classifier.
    Finetune,
    /// Train on --source, then a new BN slice and classifier for --target (--freeze-conv).
    TwoStage,
    /// One head in --target's classes; the other datasets' labels mapped by --class-map.
    LabelRemap,
}

/// The mode options of `cdcl train`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModeArgs {
    /// Training scheme.
    #[arg(long, value_enum, default_value_t = ModeArg::Dat)]
    pub mode: ModeArg,
    /// The dataset of --mode single (name or index).
    #[arg(long)]
    pub dataset: Option<String>,
    /// The dataset trained first by --mode finetune / two-stage (name or index).
    #[arg(long)]
    pub source: Option<String>,
    /// The target of --mode finetune / two-stage / label-remap (name or index).
    #[arg(long)]
    pub target: Option<String>,
    /// The iteration at which --mode finetune / two-stage starts its second stage (default:
    /// half of --iters).
    #[arg(long)]
    pub switch_at: Option<usize>,
    /// --mode two-stage: freeze every shared convolution in the second stage.
    #[arg(long)]
    pub freeze_conv: bool,
    /// --mode shared-bn: a step per dataset instead of DAT.
    #[arg(long)]
    pub no_dat: bool,
    /// --mode label-remap: JSON file mapping every class of every other dataset to a target
    /// class or "ignore" (optional on the synthetic scenes: derived from their classes).
    #[arg(long, value_name = "FILE")]
    pub class_map: Option<PathBuf>,
    /// Iteration interval across iterations, DATASET:T: T iterations on DATASET, then one on
    /// each other dataset (each iteration steps on its one dataset).
    #[arg(long, value_name = "DATASET:T")]
    pub interval: Option<String>,
    /// The within-iteration variant, DATASET:T: T batches of DATASET and one of each other
    /// dataset in every iteration, under one backward.
    #[arg(long, value_name = "DATASET:T")]
    pub interval_within: Option<String>,
}

/// A dataset of the run by name or index.
pub fn dataset_index(s: &str, names: &[String], what: &str) -> Result<usize> {
    names.iter().position(|n| n == s).or_else(|| s.parse::<usize>().ok().filter(|&i| i < names.len())).ok_or_else(
        || Error::InvalidArgument(format!("{what} {s:?}: not a dataset of this run (its datasets: {names:?})")),
    )
}

fn parse_interval(s: &str, names: &[String], what: &str) -> Result<(usize, usize)> {
    let (d, t) =
        s.rsplit_once(':').ok_or_else(|| Error::InvalidArgument(format!("{what} {s:?}: expected DATASET:T")))?;
    let t = t
        .parse::<usize>()
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| Error::InvalidArgument(format!("{what} {s:?}: T must be a whole number of at least 1")))?;
    Ok((dataset_index(d, names, what)?, t))
}

/// Where the class map of label remapping comes from when no file is given.
pub enum ClassMapSource<'a> {
    /// The synthetic scenes: derived from their fine classes.
    Synthetic(&'a Synthetic),
    /// Datasets on disk: a file is needed.
    Files,
}

impl ModeArgs {
    /// Flags that belong to other modes are refused rather than ignored.
    fn check_flags(&self) -> Result<()> {
        let m = self.mode;
        let wrong = |flag: &str, ok: bool| -> Result<()> {
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!("{flag} does not apply to --mode {m:?}")))
            }
        };
        let staged = matches!(m, ModeArg::Finetune | ModeArg::TwoStage);
        wrong("--dataset", self.dataset.is_none() || m == ModeArg::Single)?;
        wrong("--source", self.source.is_none() || staged)?;
        wrong("--target", self.target.is_none() || staged || m == ModeArg::LabelRemap)?;
        wrong("--switch-at", self.switch_at.is_none() || staged)?;
        wrong("--freeze-conv", !self.freeze_conv || m == ModeArg::TwoStage)?;
        wrong("--no-dat", !self.no_dat || m == ModeArg::SharedBn)?;
        wrong("--class-map", self.class_map.is_none() || m == ModeArg::LabelRemap)?;
        if self.interval.is_some() && self.interval_within.is_some() {
            return Err(Error::InvalidArgument("give --interval or --interval-within, not both".into()));
        }
        Ok(())
    }

    /// The interval of the run.
    pub fn interval(&self, names: &[String]) -> Result<Interval> {
        Ok(match (&self.interval, &self.interval_within) {
            (Some(s), _) => {
                let (dataset, t) = parse_interval(s, names, "--interval")?;
                Interval::Across { dataset, t }
            }
            (None, Some(s)) => {
                let (dataset, t) = parse_interval(s, names, "--interval-within")?;
                Interval::Within { dataset, t }
            }
            (None, None) => Interval::Every,
        })
    }

    /// The mode for datasets `names` (with `classes[d]` their class names) in a run of
    /// `iters` iterations.
    pub fn mode(&self, names: &[String], classes: &[Vec<String>], iters: usize, maps: ClassMapSource) -> Result<Mode> {
        self.check_flags()?;
        let need = |v: &Option<String>, flag: &str| -> Result<usize> {
            let s = v.as_deref().ok_or_else(|| {
                Error::InvalidArgument(format!("--mode {:?} needs {flag} (a dataset name or index)", self.mode))
            })?;
            dataset_index(s, names, flag)
        };
        let switch_at = self.switch_at.unwrap_or(iters / 2);
        let mode = match self.mode {
            ModeArg::Dat => Mode::Dat,
            ModeArg::Mixed => Mode::Mixed,
            ModeArg::Single => Mode::Single(need(&self.dataset, "--dataset")?),
            ModeArg::SharedBn if self.no_dat => Mode::SharedBnNoDat,
            ModeArg::SharedBn => Mode::SharedBn,
            ModeArg::SeparateConv => Mode::SeparateConv,
            ModeArg::DsbnNoDat => Mode::DsbnNoDat,
            ModeArg::Finetune => Mode::Finetune {
                source: need(&self.source, "--source")?,
                target: need(&self.target, "--target")?,
                switch_at,
            },
            ModeArg::TwoStage => Mode::TwoStage {
                source: need(&self.source, "--source")?,
                target: need(&self.target, "--target")?,
                switch_at,
                freeze_conv: self.freeze_conv,
            },
            ModeArg::LabelRemap => {
                let target = need(&self.target, "--target")?;
                let class_map = match (&self.class_map, maps) {
                    (Some(path), _) => {
                        let text = std::fs::read_to_string(path).map_err(|e| Error::Data {
                            path: path.display().to_string(),
                            message: format!("cannot read the class map: {e}"),
                        })?;
                        parse_class_map(&text, names, classes, target)?
                    }
                    (None, ClassMapSource::Synthetic(data)) => cdcl::train::modes::synthetic_class_map(data, target),
                    (None, ClassMapSource::Files) => {
                        return Err(Error::InvalidArgument(
                            "--mode label-remap with --data needs --class-map FILE (see the README)".into(),
                        ))
                    }
                };
                Mode::LabelRemap { target, class_map }
            }
        };
        mode.check_datasets(names.len())?;
        Ok(mode)
    }
}
