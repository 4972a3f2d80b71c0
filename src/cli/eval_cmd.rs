//! `cdcl eval`: evaluates a checkpoint on datasets' splits, rebuilding the network from the
//! checkpoint alone. Each dataset is segmented with its own head and BN slice, or a chosen
//! `--head`/`--bn` pair (for a dataset the model never saw, such as KITTI), whole-image or by
//! sliding window, optionally at several scales and with flips; per-class IoU, mIoU, mean and
//! pixel accuracy are printed as a table and written as JSON and CSV; predictions can be saved
//! as colourised PNGs in each dataset's palette. Without `--data`, a checkpoint of the synthetic
//! domains is evaluated on their held-out scenes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::ValueEnum;
use indicatif::ProgressBar;
use serde_json::json;

use cdcl::backend::{Backend, CpuBackend, DeviceBackend};
use cdcl::checkpoint::Checkpoint;
use cdcl::data::image::write_png_rgb;
use cdcl::data::{DomainSpec, RgbImage, SegDataset, Synthetic, SyntheticConfig, SyntheticSplit};
use cdcl::eval::report::write_text;
use cdcl::eval::{colorize, evaluate_dataset, to_csv, InferOptions, Route, Window};
use cdcl::train::{mode_for_model, ModelMeta, TrainConfig, Trainer};
use cdcl::{Device, Error, Result};

use super::{bar_style, parse_floats, parse_size, DataSpec};
use crate::Where;

/// How images are covered.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum WindowArg {
    /// The whole image at once.
    Whole,
    /// Sliding windows of --crop every --stride.
    Slide,
}

/// `cdcl eval` options.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The checkpoint (written by cdcl train; it describes its network).
    #[arg(long, default_value = "cdcl-checkpoint.safetensors")]
    checkpoint: PathBuf,
    /// A dataset to evaluate: KIND=PATH or KIND:NAME=PATH (KIND: cityscapes, bdd100k, camvid,
    /// kitti, list); repeatable. Without it, the synthetic held-out scenes of a checkpoint
    /// trained on the synthetic domains.
    #[arg(long = "data", value_name = "KIND=PATH")]
    data: Vec<String>,
    /// The split to evaluate.
    #[arg(long, default_value = "val")]
    split: String,
    /// Classify with this dataset's head (its name in the checkpoint, or its index) instead of
    /// each dataset's own.
    #[arg(long)]
    head: Option<String>,
    /// Normalise with this dataset's BN slice (name or index) instead of each dataset's own.
    #[arg(long)]
    bn: Option<String>,
    /// Whole-image or sliding-window inference.
    #[arg(long, value_enum, default_value_t = WindowArg::Whole)]
    mode: WindowArg,
    /// Sliding-window size: SIZE or HxW.
    #[arg(long, default_value = "512x1024")]
    crop: String,
    /// Sliding-window step: SIZE or HxW (default: two thirds of the crop).
    #[arg(long)]
    stride: Option<String>,
    /// Scales to average, e.g. 0.5,0.75,1,1.25,1.5,1.75.
    #[arg(long, default_value = "1")]
    scales: String,
    /// Also average with the horizontally flipped image.
    #[arg(long)]
    flip: bool,
    /// Folder for eval.json and eval.csv.
    #[arg(long, default_value = "cdcl-eval")]
    out: PathBuf,
    /// Save each prediction as a colourised PNG in DIR/DATASET/.
    #[arg(long, value_name = "DIR")]
    save_predictions: Option<PathBuf>,
    /// Threads decoding images (0: on the evaluating thread).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// At most this many images per dataset (0: the whole split; synthetic: 8).
    #[arg(long, default_value_t = 0)]
    images: usize,
    /// Synthetic scenes: image size (as cdcl train --size).
    #[arg(long, default_value_t = 96)]
    size: usize,
    /// Synthetic scenes: the data seed (as cdcl train --seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = Where::Auto)]
    device: Where,
}

/// Runs `cdcl eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    match args.device {
        Where::Cpu => eval(args, CpuBackend::new()),
        Where::Emulator => eval(args, DeviceBackend::new(Device::emulator())),
        Where::Cuda => eval(args, DeviceBackend::new(Device::cuda(0)?)),
        Where::Auto => match Device::cuda(0) {
            Ok(dev) => eval(args, DeviceBackend::new(dev)),
            Err(e) => {
                eprintln!("no GPU ({e}); evaluating on the CPU backend");
                eval(args, CpuBackend::new())
            }
        },
    }
}

fn options(args: &EvalArgs) -> Result<InferOptions> {
    let window = match args.mode {
        WindowArg::Whole => Window::Whole,
        WindowArg::Slide => {
            let crop = parse_size(&args.crop, "--crop")?;
            let stride = match &args.stride {
                Some(s) => parse_size(s, "--stride")?,
                None => ((crop.0 * 2).div_ceil(3), (crop.1 * 2).div_ceil(3)),
            };
            Window::Slide { crop, stride }
        }
    };
    let opts = InferOptions { window, scales: parse_floats(&args.scales, "--scales")?, flip: args.flip };
    opts.validate()?;
    Ok(opts)
}

/// The datasets to evaluate, named as the checkpoint should know them.
fn datasets(args: &EvalArgs, meta: &ModelMeta) -> Result<Vec<Arc<dyn SegDataset>>> {
    if args.data.is_empty() {
        let domains: Vec<DomainSpec> = meta
            .datasets
            .iter()
            .map(|d| match d.name.as_str() {
                "city" => Ok(DomainSpec::city()),
                "dusk" => Ok(DomainSpec::dusk()),
                "fog" => Ok(DomainSpec::fog()),
                other => Err(Error::InvalidArgument(format!(
                    "the checkpoint was trained on {other:?}, not on synthetic scenes: name the data with --data KIND=PATH"
                ))),
            })
            .collect::<Result<_>>()?;
        let data = Arc::new(Synthetic::new(SyntheticConfig {
            height: args.size,
            width: args.size,
            seed: args.seed,
            domains,
        })?);
        let n = if args.images == 0 { 8 } else { args.images };
        return (0..data.num_domains())
            .map(|k| Ok(Arc::new(SyntheticSplit::held_out(data.clone(), k, n)?) as Arc<dyn SegDataset>))
            .collect();
    }
    let mut out: Vec<Arc<dyn SegDataset>> = Vec::new();
    for s in &args.data {
        let spec = DataSpec::parse(s)?;
        let mut ds = spec.kind.open(&spec.path, &args.split)?;
        ds.name = spec.name;
        if args.images > 0 {
            ds.items.truncate(args.images);
        }
        out.push(Arc::new(ds));
    }
    Ok(out)
}

/// A dataset of the checkpoint by name or index.
fn pick(meta: &ModelMeta, which: &str, what: &str) -> Result<usize> {
    let names: Vec<&str> = meta.datasets.iter().map(|d| d.name.as_str()).collect();
    meta.dataset_index(which)
        .or_else(|| which.parse::<usize>().ok().filter(|&i| i < names.len()))
        .ok_or_else(|| Error::InvalidArgument(format!("--{what} {which:?}: the checkpoint's datasets are {names:?}")))
}

/// Where the predictions of `dataset` go (created now, so that a bad folder fails at once).
fn prediction_dir(root: Option<&Path>, dataset: &str) -> Result<Option<PathBuf>> {
    let Some(root) = root else { return Ok(None) };
    let dir = root.join(dataset);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Data { path: dir.display().to_string(), message: format!("cannot create: {e}") })?;
    Ok(Some(dir))
}

fn eval<B: Backend>(args: &EvalArgs, backend: B) -> Result<()> {
    let opts = options(args)?;
    let ck = Checkpoint::load(&args.checkpoint)?;
    let meta = ModelMeta::of(&ck).map_err(|e| match e {
        Error::Checkpoint { message, .. } => Error::Checkpoint { path: args.checkpoint.display().to_string(), message },
        e => e,
    })?;
    let sets = datasets(args, &meta)?;
    // Routes first: a dataset the model does not know needs --head and --bn.
    let mut routes = Vec::new();
    for ds in &sets {
        let own = meta.dataset_index(ds.name());
        let head = match (&args.head, own) {
            (Some(h), _) => meta.head_of(pick(&meta, h, "head")?),
            (None, Some(d)) => meta.head_of(d),
            (None, None) => {
                return Err(Error::InvalidArgument(format!(
                    "the checkpoint was not trained on {:?} (its datasets: {:?}): choose --head and --bn",
                    ds.name(),
                    meta.datasets.iter().map(|d| &d.name).collect::<Vec<_>>()
                )))
            }
        };
        let bn = match (&args.bn, own) {
            (Some(b), _) => meta.bn_of(pick(&meta, b, "bn")?),
            (None, Some(d)) => meta.bn_of(d),
            (None, None) => return Err(Error::InvalidArgument(format!("choose --bn for {:?}", ds.name()))),
        };
        routes.push(Route {
            head,
            bn,
            head_name: meta.datasets[head].name.clone(),
            bn_name: meta.datasets[bn].name.clone(),
        });
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::Data { path: args.out.display().to_string(), message: format!("cannot create: {e}") })?;
    let (json_path, csv_path) = (args.out.join("eval.json"), args.out.join("eval.csv"));
    write_text(&json_path, "{}\n")?;

    let mode = mode_for_model(&meta.model);
    let mut trainer = Trainer::new(&backend, meta.model.clone(), TrainConfig { mode, ..TrainConfig::default() })?;
    trainer.restore(&ck).map_err(|e| match e {
        Error::Checkpoint { message, .. } => Error::Checkpoint { path: args.checkpoint.display().to_string(), message },
        e => e,
    })?;
    let window = match opts.window {
        Window::Whole => "whole image".to_string(),
        Window::Slide { crop, stride } => {
            format!("sliding {}×{} windows every {}×{}", crop.0, crop.1, stride.0, stride.1)
        }
    };
    eprintln!(
        "cdcl eval: {} | {} (iteration {}) | {window}, scales {:?}{}",
        backend.name(),
        args.checkpoint.display(),
        trainer.iteration(),
        opts.scales,
        if opts.flip { ", flip" } else { "" }
    );
    let mut reports = Vec::new();
    for (ds, route) in sets.into_iter().zip(&routes) {
        let dir = prediction_dir(args.save_predictions.as_deref(), ds.name())?;
        let palette = ds.palette();
        let bar = ProgressBar::new(ds.len() as u64);
        bar.set_style(bar_style());
        bar.set_message(format!("{} {}", ds.name(), ds.split()));
        let named = ds.clone();
        let report = evaluate_dataset(&mut trainer, ds, route, &opts, args.workers, |p| {
            bar.inc(1);
            if let Some(dir) = &dir {
                let image = RgbImage { width: p.width, height: p.height, data: colorize(p.classes, &palette) };
                write_png_rgb(&dir.join(format!("{}.png", named.sample_name(p.index))), &image)?;
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        print!("{}", report.table());
        reports.push(report);
    }
    let doc = json!({
        "checkpoint": args.checkpoint.display().to_string(),
        "iteration": trainer.iteration(),
        "window": window,
        "scales": opts.scales,
        "flip": opts.flip,
        "datasets": reports.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
    });
    write_text(&json_path, &serde_json::to_string_pretty(&doc).unwrap_or_default())?;
    write_text(&csv_path, &to_csv(&reports))?;
    println!("results: {} and {}", json_path.display(), csv_path.display());
    if let Some(dir) = &args.save_predictions {
        println!("predictions: {}", dir.display());
    }
    Ok(())
}
