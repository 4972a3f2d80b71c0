//! What every `cdcl train` run does around its iterations, synthetic or real data: the model
//! of a resumed run comes from the checkpoint; the checkpoint path (and log folder) are checked
//! before the first iteration; the pretrained backbone or the checkpoint is loaded; each step
//! is logged and the checkpoint rewritten every `--save-every` iterations (atomically); the
//! end writes the checkpoint and the loss chart.

use std::path::PathBuf;
use std::time::Instant;

use cdcl::backend::Backend;
use cdcl::checkpoint::Checkpoint;
use cdcl::nn::pretrained::load_pretrained;
use cdcl::nn::{Depth, ModelConfig};
use cdcl::train::{DatasetMeta, ModelMeta, StepStats, Trainer};
use cdcl::{Error, Result};

use super::explicit;
use super::run_log::RunLog;
use crate::TrainArgs;

/// A checkpoint to resume from, read before the model is built.
#[derive(Debug)]
pub struct Resume {
    path: PathBuf,
    checkpoint: Checkpoint,
    iteration: usize,
}

fn named(e: Error, path: &std::path::Path) -> Error {
    match e {
        Error::Checkpoint { message, .. } => Error::Checkpoint { path: path.display().to_string(), message },
        e => e,
    }
}

/// The model of the run: `model` (built from the flags), or with `--resume` the checkpoint's,
/// rebuilt from its metadata. A resumed run must have the checkpoint's datasets and heads, and
/// any model flag given explicitly (`--depth`, `--width`, `--deep-stem`) must agree with it:
/// otherwise the error names the first difference.
pub fn model_for_run(
    args: &TrainArgs,
    model: ModelConfig,
    datasets: &[DatasetMeta],
) -> Result<(ModelConfig, Option<Resume>)> {
    let Some(path) = &args.resume else { return Ok((model, None)) };
    let checkpoint = Checkpoint::load(path)?;
    let meta = ModelMeta::of(&checkpoint).map_err(|e| named(e, path))?;
    let iteration = checkpoint.metadata.get("iteration").and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut want = meta.model.clone();
    if explicit("depth") {
        want.depth = Depth::parse(&args.depth)?;
    }
    if explicit("width") {
        want.width = args.width;
    }
    if explicit("deep_stem") {
        want.deep_stem = args.deep_stem;
    }
    want.num_classes = model.num_classes.clone();
    want.num_bn = model.num_bn;
    want.conv_sets = model.conv_sets;
    let run = ModelMeta { precision: meta.precision.clone(), ..ModelMeta::new(&want, datasets) };
    if let Some(m) = meta.first_mismatch(&run) {
        return Err(Error::Checkpoint {
            path: path.display().to_string(),
            message: format!("cannot resume this run from it: {m}"),
        });
    }
    Ok((meta.model, Some(Resume { path: path.clone(), checkpoint, iteration })))
}

/// A training run's checkpointing and logging.
#[derive(Debug)]
pub struct Session {
    checkpoint: PathBuf,
    save_every: usize,
    iters: usize,
    datasets: Vec<DatasetMeta>,
    log: Option<RunLog>,
    started: Instant,
    last: Instant,
    rate: Option<f64>,
    /// Rank 0 of a data-parallel run (or a single process): the one that writes.
    writes: bool,
}

impl Session {
    /// Checks that the checkpoint can be written and opens the log, before anything trains —
    /// on the rank that `writes` (rank 0 of a data-parallel run, or the single process); the
    /// other ranks write no checkpoint and keep no log.
    pub fn start_rank(
        args: &TrainArgs,
        datasets: Vec<DatasetMeta>,
        resume: Option<&Resume>,
        writes: bool,
    ) -> Result<Self> {
        if writes {
            Checkpoint::check_writable(&args.checkpoint)?;
        }
        let names: Vec<String> = datasets.iter().map(|d| d.name.clone()).collect();
        let start = resume.map_or(0, |r| r.iteration);
        let log = match writes {
            true => args.data.log_dir.as_deref().map(|dir| RunLog::open(dir, &names, start)).transpose()?,
            false => None,
        };
        let now = Instant::now();
        Ok(Session {
            checkpoint: args.checkpoint.clone(),
            save_every: args.data.save_every,
            iters: args.iters,
            datasets,
            log,
            started: now,
            last: now,
            rate: None,
            writes,
        })
    }

    /// Loads the checkpoint to resume from, or else the pretrained backbone (a resumed run's
    /// checkpoint already holds trained weights: `--pretrained` is then not read).
    pub fn prepare<B: Backend>(
        &mut self,
        trainer: &mut Trainer<B>,
        args: &TrainArgs,
        resume: Option<Resume>,
    ) -> Result<()> {
        match (resume, &args.data.pretrained) {
            (Some(r), pretrained) => {
                trainer.restore(&r.checkpoint).map_err(|e| named(e, &r.path))?;
                eprintln!("resumed from {} at iteration {}", r.path.display(), trainer.iteration());
                if let Some(p) = pretrained {
                    eprintln!("(--pretrained {} not read: the checkpoint holds the weights)", p.display());
                }
            }
            (None, Some(p)) => eprintln!("{}", load_pretrained(&mut trainer.store, p)?),
            (None, None) => {}
        }
        self.started = Instant::now();
        self.last = self.started;
        Ok(())
    }

    /// After a step over `images` images: logs it, rewrites the checkpoint when it is due, and
    /// returns the images per second (smoothed).
    pub fn after_step<B: Backend>(&mut self, trainer: &Trainer<B>, stats: &StepStats, images: usize) -> Result<f64> {
        let now = Instant::now();
        let instant = images as f64 / now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let rate = match self.rate {
            Some(r) => 0.9 * r + 0.1 * instant,
            None => instant,
        };
        self.rate = Some(rate);
        if let Some(log) = &mut self.log {
            log.iteration(stats, instant, now.duration_since(self.started).as_secs_f64())?;
        }
        let it = trainer.iteration();
        if self.writes && self.save_every > 0 && it % self.save_every == 0 && it < self.iters {
            trainer.save_checkpoint_with(&self.checkpoint, &self.datasets)?;
            if let Some(log) = &self.log {
                log.chart()?;
            }
        }
        Ok(rate)
    }

    /// Logs an evaluation report (JSON) at the trainer's iteration.
    pub fn log_eval(&mut self, iteration: usize, report: &serde_json::Value) -> Result<()> {
        match &mut self.log {
            Some(log) => log.eval(iteration, report),
            None => Ok(()),
        }
    }

    /// Writes the final checkpoint and the loss chart.
    pub fn finish<B: Backend>(&mut self, trainer: &Trainer<B>) -> Result<()> {
        if !self.writes {
            return Ok(());
        }
        trainer.save_checkpoint_with(&self.checkpoint, &self.datasets)?;
        if let Some(log) = &self.log {
            log.chart()?;
        }
        Ok(())
    }
}
