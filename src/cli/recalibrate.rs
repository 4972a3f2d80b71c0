//! `cdcl recalibrate`: precise BN of one BN slice of a checkpoint on a whole set (a synthetic
//! domain or a dataset on disk), written as a new checkpoint ([`cdcl::train::precise_bn`]).

use std::path::PathBuf;

use cdcl::backend::{Backend, CpuBackend, DeviceBackend};
use cdcl::checkpoint::Checkpoint;
use cdcl::data::{AugmentConfig, DomainSpec, SegDataset, Synthetic, SyntheticConfig};
use cdcl::train::{mode_for_model, precise_bn, Batch, ModelMeta, PreciseBnOptions, Precision, TrainConfig, Trainer};
use cdcl::{Device, Error, Result};

use super::DataSpec;
use crate::Where;

/// `cdcl recalibrate` options.
#[derive(clap::Args, Debug)]
pub struct RecalibrateArgs {
    /// The checkpoint to recalibrate.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Where to write the recalibrated checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// The BN slice to recalibrate: a dataset of the checkpoint (name or index).
    #[arg(long)]
    bn_slice: String,
    /// The set, on disk: KIND=PATH or KIND:NAME=PATH (its --split, every image whole).
    #[arg(long, value_name = "KIND=PATH", conflicts_with = "synthetic")]
    data: Option<String>,
    /// The split of --data.
    #[arg(long, default_value = "train")]
    split: String,
    /// The set, synthetic: a domain (city, dusk, fog), its training images from index 0.
    #[arg(long, value_name = "DOMAIN")]
    synthetic: Option<String>,
    /// Images of the set (0: the whole split; synthetic: 64).
    #[arg(long, default_value_t = 0)]
    images: usize,
    /// Images per forward, at least 2 (the 1×1 pyramid bin needs two values); with --data,
    /// consecutive images of one size.
    #[arg(long, default_value_t = 4)]
    batch: usize,
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

/// Runs `cdcl recalibrate`.
pub fn run(args: &RecalibrateArgs) -> Result<()> {
    match args.device {
        Where::Cpu => recalibrate(args, CpuBackend::new()),
        Where::Emulator => recalibrate(args, DeviceBackend::new(Device::emulator())),
        Where::Cuda => recalibrate(args, DeviceBackend::new(Device::cuda(0)?)),
        Where::Auto => match Device::cuda(0) {
            Ok(dev) => recalibrate(args, DeviceBackend::new(dev)),
            Err(e) => {
                eprintln!("no GPU ({e}); recalibrating on the CPU backend");
                recalibrate(args, CpuBackend::new())
            }
        },
    }
}

/// The synthetic domain named `name`.
pub fn domain(name: &str) -> Result<DomainSpec> {
    match name {
        "city" => Ok(DomainSpec::city()),
        "dusk" => Ok(DomainSpec::dusk()),
        "fog" => Ok(DomainSpec::fog()),
        other => Err(Error::InvalidArgument(format!("unknown synthetic domain {other:?}: city, dusk or fog"))),
    }
}

/// The set's images as batches (labels unused: empty label maps are ignored).
fn batches(args: &RecalibrateArgs) -> Result<(String, Vec<Batch>)> {
    let batch = args.batch.max(1);
    let as_batch = |n: usize, h: usize, w: usize, images: Vec<f32>| Batch {
        dataset: 0,
        n,
        h,
        w,
        images,
        labels: vec![255; n * h * w],
    };
    match (&args.data, &args.synthetic) {
        (None, Some(name)) => {
            let cfg =
                SyntheticConfig { height: args.size, width: args.size, seed: args.seed, domains: vec![domain(name)?] };
            let data = Synthetic::new(cfg)?;
            let n = if args.images == 0 { 64 } else { args.images };
            let idx: Vec<u64> = (0..n as u64).collect();
            let mut out = Vec::new();
            for chunk in idx.chunks(batch) {
                let b = data.batch(0, chunk)?;
                out.push(as_batch(b.n, b.h, b.w, b.images));
            }
            Ok((format!("synthetic {name}, {n} training images of {}×{}", args.size, args.size), out))
        }
        (Some(spec), None) => {
            let spec = DataSpec::parse(spec)?;
            let mut ds = spec.kind.open(&spec.path, &args.split)?;
            if args.images > 0 {
                ds.items.truncate(args.images);
            }
            let norm = AugmentConfig::default();
            let mut out: Vec<Batch> = Vec::new();
            for i in 0..ds.len() {
                let img = ds.image(i)?;
                let pixels = norm.normalize(&img);
                match out.last_mut() {
                    Some(b) if b.n < batch && (b.h, b.w) == (img.height, img.width) => {
                        b.n += 1;
                        b.images.extend(pixels);
                        b.labels.resize(b.n * b.h * b.w, 255);
                    }
                    _ => out.push(as_batch(1, img.height, img.width, pixels)),
                }
            }
            // A last batch of one image (its 1×1 pyramid bin would hold one value) joins the one
            // before when they have the same size.
            let k = out.len();
            if k >= 2 && out[k - 1].n == 1 && (out[k - 2].h, out[k - 2].w) == (out[k - 1].h, out[k - 1].w) {
                if let (Some(last), Some(b)) = (out.pop(), out.last_mut()) {
                    b.n += 1;
                    b.images.extend(last.images);
                    b.labels.extend(last.labels);
                }
            }
            Ok((format!("{} {} ({} images)", spec.name, args.split, ds.len()), out))
        }
        _ => Err(Error::InvalidArgument("name the set: --data KIND=PATH or --synthetic DOMAIN".into())),
    }
}

fn recalibrate<B: Backend>(args: &RecalibrateArgs, backend: B) -> Result<()> {
    let named = |e: Error| match e {
        Error::Checkpoint { message, .. } => Error::Checkpoint { path: args.checkpoint.display().to_string(), message },
        e => e,
    };
    let ck = Checkpoint::load(&args.checkpoint)?;
    let meta = ModelMeta::of(&ck).map_err(named)?;
    let names: Vec<String> = meta.datasets.iter().map(|d| d.name.clone()).collect();
    let d = super::modes::dataset_index(&args.bn_slice, &names, "--bn-slice")?;
    let slice = meta.bn_of(d);
    Checkpoint::check_writable(&args.out)?;
    let (what, set) = batches(args)?;
    let config = TrainConfig {
        mode: mode_for_model(&meta.model),
        precision: Precision::parse(&meta.precision)?,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&backend, meta.model.clone(), config)?;
    trainer.restore(&ck).map_err(named)?;
    let opts = PreciseBnOptions { bn_slice: slice, conv_set: trainer.model.conv_set_of_head(meta.head_of(d)) };
    let report = precise_bn(&mut trainer, &opts, set.into_iter().map(Ok))?;
    let mut out = trainer.checkpoint_with(&meta.datasets)?;
    out.metadata.insert("precise_bn".into(), format!("BN slice {} ({}) on {what}", slice, names[slice]));
    out.save(&args.out)?;
    println!(
        "recalibrated BN slice {slice} ({}) of {} layers on {what}: {} images in {} batches; weights unchanged\ncheckpoint: {}",
        names[slice],
        report.layers,
        report.images,
        report.batches,
        args.out.display()
    );
    Ok(())
}
