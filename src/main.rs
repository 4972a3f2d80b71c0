//! `cdcl`: Dataset Alternation Training of a PSPNet with dataset-aware blocks on the built-in
//! synthetic multi-domain street scenes or on datasets on disk (`--data`), on a GPU when there
//! is one, else on the CPU; `cdcl eval` evaluates a checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use cdcl::backend::{Backend, CpuBackend, DeviceBackend};
use cdcl::data::{Synthetic, SyntheticConfig};
use cdcl::nn::{Depth, ModelConfig};
use cdcl::train::{evaluate, Batch, DatasetMeta, Precision, TrainConfig, Trainer, UnlabeledBatch};
use cdcl::Device;

mod cli;

#[derive(Parser, Debug)]
#[command(name = "cdcl", version, about = "Cross-Dataset Collaborative Learning for semantic segmentation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Train PSPNet-DAB on the synthetic multi-domain dataset (or on datasets on disk with
    /// --data), report per-dataset loss and held-out mIoU, and save a checkpoint.
    Train(TrainArgs),
    /// Evaluate a checkpoint on datasets' splits: per-class IoU, mIoU and pixel accuracy as a
    /// table, JSON and CSV (sliding window, scales, flips, colourised predictions optional).
    Eval(cli::eval_cmd::EvalArgs),
    /// Precise BN: set one BN slice's running statistics of a checkpoint to the population
    /// statistics of a whole set (no weight changes), written as a new checkpoint.
    Recalibrate(cli::recalibrate::RecalibrateArgs),
    /// The paper's comparison on the synthetic domains: every mode over several seeds, and the
    /// zero-shot domain with precise BN; writes a markdown table and an SVG chart.
    Study(cli::study::StudyArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Where {
    /// A GPU if one is usable, else the CPU backend.
    Auto,
    /// The host CPU backend.
    Cpu,
    /// Our kernels on the CPU emulator of CUDA (slow: for checking, not training).
    Emulator,
    /// Our kernels on GPU 0.
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum PrecisionArg {
    F32,
    Bf16,
    F16,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    On,
    Off,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Training iterations.
    #[arg(long, default_value_t = 300)]
    iters: usize,
    /// Images per dataset per iteration.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Square crop size in pixels (a multiple of 8).
    #[arg(long, default_value_t = 96)]
    size: usize,
    /// ResNet depth: 18, 34, 50 or 101.
    #[arg(long, default_value = "18")]
    depth: String,
    /// Channel multiplier (1.0 = the paper's widths).
    #[arg(long, default_value_t = 0.25)]
    width: f32,
    /// Three 3×3 convolutions as the stem.
    #[arg(long)]
    deep_stem: bool,
    /// Number of synthetic domains (2: city + dusk, 3: + fog).
    #[arg(long, default_value_t = 2)]
    datasets: usize,
    #[command(flatten)]
    modes: cli::modes::ModeArgs,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Seed of the data, the initialisation and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Held-out images per dataset for mIoU (with --data, when given: at most this many images
    /// of each evaluation split; 0 skips the evaluation).
    #[arg(long, default_value_t = 8)]
    eval_images: usize,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = Where::Auto)]
    device: Where,
    /// Checkpoint to write at the end.
    #[arg(long, default_value = "cdcl-checkpoint.safetensors")]
    checkpoint: PathBuf,
    /// Checkpoint to resume from.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Storage of activations and convolution weights: f32, or bf16 / f16 mixed precision
    /// (f32 master weights, statistics and loss; f16 with dynamic loss scaling).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    /// f32 convolutions on tensor cores in TF32 (on: the default, as PyTorch's `allow_tf32`),
    /// or exact f32 (off). GPU and emulator only: the cpu device is always exact f32.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    tf32: OnOff,
    /// Print, per iteration, its wall time and what the device was asked to do (kernel
    /// launches, allocations, memsets, copies, host synchronisations, activation-sized tensors
    /// written, convolutions by storage type).
    #[arg(long)]
    profile: bool,
    /// Ranks to run on this node: one process per GPU with --device cuda (as `torchrun
    /// --nproc-per-node`), threads of this process on the CPU backend or the emulator. Under a
    /// launcher (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT or Slurm's variables
    /// set) this process is one rank and the flag is ignored. --batch is per rank.
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// With several ranks: BatchNorm statistics per rank (plain DDP) instead of the per-dataset
    /// statistics of all ranks together (SyncBN, the default).
    #[arg(long)]
    no_sync_bn: bool,
    #[command(flatten)]
    data: cli::data_args::DataArgs,
    #[command(flatten)]
    usss: cli::usss_args::UsssArgs,
}

impl TrainArgs {
    fn precision(&self) -> Precision {
        match self.precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F16 => Precision::F16,
        }
    }

    fn tf32(&self) -> Option<bool> {
        Some(self.tf32 == OnOff::On)
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    cli::record_explicit(&matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Train(args) => train_auto(&args),
        Command::Eval(args) => cli::eval_cmd::run(&args),
        Command::Recalibrate(args) => cli::recalibrate::run(&args),
        Command::Study(args) => {
            let words: Vec<String> = std::env::args().skip(1).collect();
            cli::study::run(&args, &format!("cdcl {}", words.join(" ")))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn train_auto(args: &TrainArgs) -> cdcl::Result<()> {
    use cli::launch::{self, Launch, Parallel};
    let env = cdcl::dist::DistEnv::from_env()?;
    let several = args.nproc_per_node > 1 || env.as_ref().is_some_and(|e| e.world_size > 1);
    // Auto with several ranks: GPUs if the first one is usable, else CPU threads.
    let device = match args.device {
        Where::Auto if several => match Device::cuda(0) {
            Ok(_) => Where::Cuda,
            Err(e) => {
                eprintln!("no usable GPU ({e}); training on the CPU backend");
                Where::Cpu
            }
        },
        d => d,
    };
    let sync_bn = !args.no_sync_bn;
    match launch::plan(env, args.nproc_per_node, matches!(device, Where::Cpu | Where::Emulator))? {
        Launch::Single => train_on(args, device, Parallel::single()),
        Launch::Threads(n) => launch::in_threads(n, sync_bn, |p| train_on(args, device, p)),
        Launch::Processes(n) => launch::spawn_processes(n),
        Launch::Rank(env) => {
            let dev = Device::cuda(env.local_rank)?;
            let comm = cdcl::dist::NcclCommunicator::init(&dev, &env, launch::TIMEOUT)?;
            run(args, DeviceBackend::new(dev), Parallel { comm: Some(std::sync::Arc::new(comm)), sync_bn })
        }
    }
}

fn train_on(args: &TrainArgs, device: Where, par: cli::launch::Parallel) -> cdcl::Result<()> {
    match device {
        Where::Cpu => run(args, CpuBackend::new(), par),
        Where::Emulator => run(args, DeviceBackend::new(Device::emulator()), par),
        Where::Cuda => run(args, DeviceBackend::new(Device::cuda(par.rank())?), par),
        Where::Auto => match Device::cuda(0) {
            Ok(dev) => run(args, DeviceBackend::new(dev), par),
            Err(e) => {
                eprintln!("no usable GPU ({e}); training on the CPU backend");
                run(args, CpuBackend::new(), par)
            }
        },
    }
}

fn to_train_batch(b: cdcl::data::Batch, dataset: usize) -> Batch {
    Batch { dataset, n: b.n, h: b.h, w: b.w, images: b.images, labels: b.labels }
}

fn run<B: Backend>(args: &TrainArgs, backend: B, par: cli::launch::Parallel) -> cdcl::Result<()> {
    if !args.data.data.is_empty() {
        return cli::real::train(args, backend, par);
    }
    args.data.reject_real_only()?;
    // Labelled and unlabelled images of each dataset per iteration (--unlabeled-fraction).
    let (labelled, unlabelled) = args.usss.synthetic_split(args.batch)?;
    let cfg = match args.datasets {
        2 => SyntheticConfig::default_two_domains(args.size, args.size, args.seed),
        3 => SyntheticConfig::default_three_domains(args.size, args.size, args.seed),
        n => return Err(cdcl::Error::InvalidArgument(format!("--datasets must be 2 or 3, got {n}"))),
    };
    let data = Synthetic::new(cfg)?;
    let d = data.num_domains();
    let classes = data.num_classes_per_domain();
    let names: Vec<String> = (0..d).map(|k| data.info(k).name.clone()).collect();
    let class_names: Vec<Vec<String>> = (0..d).map(|k| data.info(k).class_names.clone()).collect();
    let mode = args.modes.mode(&names, &class_names, args.iters, cli::modes::ClassMapSource::Synthetic(&data))?;
    let base = ModelConfig {
        depth: Depth::parse(&args.depth)?,
        width: args.width,
        deep_stem: args.deep_stem,
        seed: args.seed,
        ..ModelConfig::resnet18(classes.clone())
    };
    let model = mode.model_config(&classes, base)?;
    // The network's datasets in head order (what the checkpoint lists).
    let metas: Vec<DatasetMeta> = mode
        .head_datasets(d)
        .into_iter()
        .map(|k| DatasetMeta { name: data.info(k).name.clone(), class_names: data.info(k).class_names.clone() })
        .collect();
    let (model, resume) = cli::session::model_for_run(args, model, &metas)?;
    let config = TrainConfig {
        interval: args.modes.interval(&names)?,
        mode: mode.clone(),
        base_lr: args.lr,
        max_iters: args.iters,
        seed: args.seed,
        precision: args.precision(),
        usss: args.usss.config()?,
        tf32: args.tf32(),
        ..Default::default()
    };
    let semi = config.usss.active();
    let mut session = cli::session::Session::start_rank(args, metas, resume.as_ref(), par.writes())?;
    let mut trainer = Trainer::new(&backend, model, config)?;
    session.prepare(&mut trainer, args, resume)?;
    par.join(&mut trainer)?;
    let (rank, world) = (par.rank(), par.world());
    if par.writes() {
        eprintln!(
            "cdcl train: {} | {:?} | PSPNet-ResNet{} width {} | {} parameters | {} datasets {:?} | {} | {} iterations of {}×{}×{}",
            backend.name(),
            args.precision,
            cli::depth_number(trainer.model.config.depth),
            trainer.model.config.width,
            trainer.store.num_parameters(),
            d,
            classes,
            mode.name(),
            args.iters,
            args.batch,
            args.size,
            args.size
        );
    }
    if args.profile {
        CpuBackend::set_op_timing(true);
    }
    let bar = if par.writes() { ProgressBar::new(args.iters as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.iteration() as u64);
    let start = Instant::now();
    let mut entropies = Vec::new();
    let first_iter = trainer.iteration();
    // Each iteration's batches are a pure function of (seed, iteration): resume draws the same.
    while trainer.iteration() < args.iters {
        let it = trainer.iteration();
        let plan = trainer.plan(it, d);
        let mut batches = Vec::with_capacity(plan.len());
        let mut unlabeled = Vec::new();
        for (pass, &ds) in plan.iter().enumerate() {
            // Rank r's shard: the r-th run of --batch images of the iteration's world × batch.
            let base = ((it * plan.len() + pass) * args.batch * world + rank * args.batch) as u64;
            let idx: Vec<u64> = (0..args.batch as u64).map(|i| base + i).collect();
            // The same images as a fully labelled run; the last ones' labels are held back.
            batches.push(to_train_batch(data.batch(ds, &idx[..labelled])?, ds));
            if semi && unlabelled > 0 {
                let b = data.batch(ds, &idx[labelled..])?;
                unlabeled.push(UnlabeledBatch { dataset: ds, n: b.n, h: b.h, w: b.w, images: b.images });
            }
        }
        let profile = cli::profile::StepProfile::start(&backend);
        let (stats, usss) = if semi {
            let s = trainer.step_semi(&batches, &unlabeled)?;
            (s.step, s.usss)
        } else {
            (trainer.step(&batches)?, None)
        };
        if args.profile && par.writes() {
            let line = profile.line(&backend, it);
            // Not bar.println: that prints nothing when the bar is hidden (no terminal).
            bar.suspend(|| eprintln!("{line}"));
        }
        let per: Vec<String> = stats
            .per_dataset
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(k, l)| format!("{}={l:.3}", data.info(k).name))
            .collect();
        let scale = if stats.loss_scale != 1.0 { format!(" scale {}", stats.loss_scale) } else { String::new() };
        let skipped = if stats.skipped { " (overflow: step skipped)" } else { "" };
        entropies.extend(usss.map(|u| (u.within, u.cross)));
        let usss = usss.map_or(String::new(), |u| format!(" usss within {:.3} cross {:.3}", u.within, u.cross));
        bar.set_message(format!(
            "loss {:.3} [{}]{usss} lr {:.4}{scale}{skipped}",
            stats.total,
            per.join(" "),
            stats.lr
        ));
        bar.inc(1);
        if !stats.total.is_finite() && !stats.skipped {
            bar.abandon();
            return Err(cdcl::Error::InvalidArgument(format!("loss became {} at iteration {it}", stats.total)));
        }
        session.after_step(&trainer, &stats, batches.iter().map(|b| b.n).sum())?;
    }
    bar.finish();
    let secs = start.elapsed().as_secs_f64();
    session.finish(&trainer)?;
    if !par.writes() {
        return Ok(());
    }
    eprintln!("trained in {secs:.1} s");
    if args.profile {
        cli::profile::print_cpu_op_times(trainer.iteration() - first_iter);
    }
    if let Some(line) = entropy_summary(&entropies) {
        eprintln!("{line}");
    }
    // Held-out images: indices far from any training index. Only the datasets the mode has a
    // head for are evaluated, each as the mode defines (the line says what it means).
    for (ds, meaning) in mode.evaluation(&names) {
        let idx: Vec<u64> = (0..args.eval_images as u64).map(|i| (1u64 << 32) + i).collect();
        let mut batches = Vec::new();
        for chunk in idx.chunks(args.batch.max(1)) {
            batches.push(to_train_batch(data.batch(ds, chunk)?, ds));
        }
        let result = evaluate(&mut trainer, &batches)?;
        let head = trainer.route(ds)?.head;
        println!(
            "held-out {:>5} ({} classes): mIoU {}  pixel accuracy {}  [{meaning}]",
            data.info(ds).name,
            classes[ds],
            result.miou(head).map_or("n/a".into(), |m| format!("{:.1}%", 100.0 * m)),
            result.pixel_accuracy(head).map_or("n/a".into(), |a| format!("{:.1}%", 100.0 * a))
        );
        let json = serde_json::json!({ "dataset": data.info(ds).name, "miou": result.miou(head), "pixel_accuracy": result.pixel_accuracy(head), "meaning": meaning });
        session.log_eval(trainer.iteration(), &json)?;
    }
    println!("checkpoint: {}", args.checkpoint.display());
    Ok(())
}

/// The unlabelled pixels' mean entropies over the first and the last five iterations that had a
/// USSS term (each iteration's own batch, against the prototypes of its time).
fn entropy_summary(e: &[(f32, f32)]) -> Option<String> {
    if e.is_empty() {
        return None;
    }
    let k = e.len().min(5);
    let mean = |s: &[(f32, f32)]| {
        let n = s.len() as f64;
        (s.iter().map(|v| v.0 as f64).sum::<f64>() / n, s.iter().map(|v| v.1 as f64).sum::<f64>() / n)
    };
    let (first, last) = (mean(&e[..k]), mean(&e[e.len() - k..]));
    Some(format!(
        "usss: unlabelled entropy within {:.4} -> {:.4}, cross {:.4} -> {:.4} (means of the first and last {k} of {} USSS iterations)",
        first.0,
        last.0,
        first.1,
        last.1,
        e.len()
    ))
}
