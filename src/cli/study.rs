//! `cdcl study`: the paper's comparison on the synthetic domains. Every mode is trained with
//! several seeds on city (8 fine classes) + dusk (5 coarse classes) and evaluated on each
//! dataset's held-out images as the mode defines; then the zero-shot experiment: DAT on city +
//! dusk, evaluated on the unseen fog domain (in city's classes, with city's head) through each
//! BN slice, before and after precise BN on fog's training images. Writes `study.md` (tables of
//! mean ± std over the seeds, with the command and the seeds) and `study.svg` (the mode table as
//! a bar chart).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use cdcl::backend::{Backend, CpuBackend, DeviceBackend};
use cdcl::data::{Synthetic, SyntheticConfig};
use cdcl::eval::report::write_text;
use cdcl::nn::{Depth, ModelConfig};
use cdcl::train::modes::synthetic_class_map;
use cdcl::train::{
    evaluate, evaluate_routed, precise_bn, Batch, Mode, PreciseBnOptions, Route, TrainConfig, Trainer, UnlabeledBatch,
    UsssConfig,
};
use cdcl::{Device, Error, Result};

use super::chart::{bars_svg, BarGroup};
use crate::Where;

/// `cdcl study` options.
#[derive(clap::Args, Debug)]
pub struct StudyArgs {
    /// The CI variant: a tiny model, few iterations and few images (checks the pipeline; its
    /// numbers say little).
    #[arg(long)]
    quick: bool,
    /// Seeds (data, initialisation, dropout): 0..N.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Iterations per run (default: 100, --quick 6).
    #[arg(long)]
    iters: Option<usize>,
    /// Image size (default: 48, --quick 32).
    #[arg(long)]
    size: Option<usize>,
    /// Channel multiplier (default: 0.125, --quick 0.0625).
    #[arg(long)]
    width: Option<f32>,
    /// Images per dataset per iteration.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Held-out images per dataset (default: 16, --quick 4); fog's precise BN uses as many
    /// training images times four.
    #[arg(long)]
    eval_images: Option<usize>,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Folder for study.md and study.svg.
    #[arg(long, default_value = "cdcl-study")]
    out: PathBuf,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = Where::Cpu)]
    device: Where,
}

struct Setup {
    iters: usize,
    size: usize,
    width: f32,
    batch: usize,
    eval_images: usize,
    lr: f32,
}

/// Runs `cdcl study`.
pub fn run(args: &StudyArgs, command: &str) -> Result<()> {
    match args.device {
        Where::Cpu => study(args, CpuBackend::new(), command),
        Where::Emulator => study(args, DeviceBackend::new(Device::emulator()), command),
        Where::Cuda => study(args, DeviceBackend::new(Device::cuda(0)?), command),
        Where::Auto => match Device::cuda(0) {
            Ok(dev) => study(args, DeviceBackend::new(dev), command),
            Err(_) => study(args, CpuBackend::new(), command),
        },
    }
}

/// USSS weights of the study's semi-supervised row (α = β, not tuned).
const USSS_WEIGHT: f32 = 0.1;

/// The rows of the mode table (city = 0, dusk = 1): a label, the mode and, for the
/// semi-supervised rows, the USSS settings (the labels of the second half of every batch are
/// then held back; α = β = 0 is the supervised baseline on the labelled half).
fn modes(iters: usize, data: &Synthetic) -> Vec<(String, Mode, Option<UsssConfig>)> {
    let s = iters / 2;
    let half = |w: f32| Some(UsssConfig { alpha: w, beta: w, ..UsssConfig::default() });
    let plain: Vec<(String, Mode)> = vec![
        ("single city".into(), Mode::Single(0)),
        ("single dusk".into(), Mode::Single(1)),
        ("finetune city→dusk".into(), Mode::Finetune { source: 0, target: 1, switch_at: s }),
        ("finetune dusk→city".into(), Mode::Finetune { source: 1, target: 0, switch_at: s }),
        ("two-stage city→dusk".into(), Mode::TwoStage { source: 0, target: 1, switch_at: s, freeze_conv: false }),
        (
            "two-stage city→dusk, frozen conv".into(),
            Mode::TwoStage { source: 0, target: 1, switch_at: s, freeze_conv: true },
        ),
        ("label-remap → city".into(), Mode::LabelRemap { target: 0, class_map: synthetic_class_map(data, 0) }),
        ("label-remap → dusk".into(), Mode::LabelRemap { target: 1, class_map: synthetic_class_map(data, 1) }),
        ("shared conv + shared BN, no DAT".into(), Mode::SharedBnNoDat),
        ("shared conv + shared BN, DAT".into(), Mode::SharedBn),
        ("unshared conv + shared BN".into(), Mode::SeparateConv),
        ("DSBN, no DAT".into(), Mode::DsbnNoDat),
        ("DSBN + DAT (CDCL)".into(), Mode::Dat),
    ];
    let mut rows: Vec<(String, Mode, Option<UsssConfig>)> = plain.into_iter().map(|(l, m)| (l, m, None)).collect();
    rows.push(("DSBN + DAT, half the labels".into(), Mode::Dat, half(0.0)));
    rows.push((format!("DSBN + DAT + USSS (α = β = {USSS_WEIGHT}), half the labels"), Mode::Dat, half(USSS_WEIGHT)));
    rows
}

fn batches_of(data: &Synthetic, plan: &[usize], it: usize, batch: usize) -> Result<Vec<Batch>> {
    let mut out = Vec::with_capacity(plan.len());
    for (pass, &ds) in plan.iter().enumerate() {
        let base = ((it * plan.len() + pass) * batch) as u64;
        let idx: Vec<u64> = (0..batch as u64).map(|i| base + i).collect();
        let b = data.batch(ds, &idx)?;
        out.push(Batch { dataset: ds, n: b.n, h: b.h, w: b.w, images: b.images, labels: b.labels });
    }
    Ok(out)
}

/// `n` images of `domain` from index `start`, as batches of `batch` labelled `dataset`.
fn set(data: &Synthetic, domain: usize, dataset: usize, start: u64, n: usize, batch: usize) -> Result<Vec<Batch>> {
    let idx: Vec<u64> = (0..n as u64).map(|i| start + i).collect();
    idx.chunks(batch.max(1))
        .map(|c| {
            let b = data.batch(domain, c)?;
            Ok(Batch { dataset, n: b.n, h: b.h, w: b.w, images: b.images, labels: b.labels })
        })
        .collect()
}

fn train<B: Backend>(
    backend: &B,
    data: &Synthetic,
    (mode, semi): (Mode, Option<UsssConfig>),
    seed: u64,
    s: &Setup,
    datasets: usize,
) -> Result<Trainer<B>> {
    let classes: Vec<usize> = (0..datasets).map(|d| data.num_classes(d)).collect();
    let base = ModelConfig { depth: Depth::R18, width: s.width, seed, ..ModelConfig::resnet18(classes.clone()) };
    let model = mode.model_config(&classes, base)?;
    let usss = semi.unwrap_or_default();
    let config = TrainConfig { mode, base_lr: s.lr, max_iters: s.iters, seed, usss, ..TrainConfig::default() };
    let mut t = Trainer::new(backend, model, config)?;
    // Semi-supervised rows: the same images, the labels of each batch's second half held back.
    let labelled = if semi.is_some() { s.batch - s.batch / 2 } else { s.batch };
    for it in 0..s.iters {
        let mut batches = batches_of(data, &t.plan(it, datasets), it, s.batch)?;
        let mut unlabeled = Vec::new();
        for b in batches.iter_mut().filter(|_| labelled < s.batch) {
            let px = b.h * b.w;
            let images = b.images.split_off(labelled * px * 3);
            b.labels.truncate(labelled * px);
            unlabeled.push(UnlabeledBatch { dataset: b.dataset, n: b.n - labelled, h: b.h, w: b.w, images });
            b.n = labelled;
        }
        let stats = t.step_semi(&batches, &unlabeled)?.step;
        if !stats.total.is_finite() {
            return Err(Error::InvalidArgument(format!("loss became {} at iteration {it}", stats.total)));
        }
    }
    Ok(t)
}

fn mean_std(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    // Sample standard deviation over the seeds (0 for one seed).
    let sd = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    Some((m, sd))
}

fn cell(v: &[f64]) -> String {
    mean_std(v).map_or("—".into(), |(m, sd)| format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * sd))
}

fn study<B: Backend>(args: &StudyArgs, backend: B, command: &str) -> Result<()> {
    let q = args.quick;
    let s = Setup {
        iters: args.iters.unwrap_or(if q { 6 } else { 100 }),
        size: args.size.unwrap_or(if q { 32 } else { 48 }),
        width: args.width.unwrap_or(if q { 0.0625 } else { 0.125 }),
        batch: args.batch,
        eval_images: args.eval_images.unwrap_or(if q { 4 } else { 16 }),
        lr: args.lr,
    };
    if args.seeds == 0 || s.iters < 2 || s.batch == 0 || s.eval_images == 0 {
        return Err(Error::InvalidArgument("the study needs seeds, --iters ≥ 2, --batch and --eval-images ≥ 1".into()));
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::Data { path: args.out.display().to_string(), message: format!("cannot create: {e}") })?;
    let started = Instant::now();
    let probe = Synthetic::new(SyntheticConfig::default_two_domains(s.size, s.size, 0))?;
    let rows = modes(s.iters, &probe);
    let names = [probe.info(0).name.clone(), probe.info(1).name.clone()];
    // results[row][dataset] = mIoU per seed.
    let mut results: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; rows.len()];
    let mut meanings: Vec<String> = vec![String::new(); rows.len()];
    // Zero-shot: [slice][before/after] per seed.
    let mut zero: [[Vec<f64>; 2]; 2] = Default::default();
    for seed in 0..args.seeds {
        let data = Synthetic::new(SyntheticConfig::default_two_domains(s.size, s.size, seed))?;
        for (r, (label, ..)) in rows.iter().enumerate() {
            // The class maps are functions of the label spaces, not of the seed.
            let (_, mode, semi) = modes(s.iters, &data).swap_remove(r);
            let evaluated = mode.evaluation(&names);
            let mut t = train(&backend, &data, (mode, semi), seed, &s, 2)?;
            let mut parts = Vec::new();
            for (d, meaning) in evaluated {
                let held = set(&data, d, d, cdcl::data::HELD_OUT_START, s.eval_images, s.batch)?;
                let head = t.route(d)?.head;
                let miou = evaluate(&mut t, &held)?.miou(head).unwrap_or(f64::NAN);
                results[r][d].push(miou);
                parts.push(format!("{}: {meaning}", names[d]));
                eprintln!("seed {seed} {label:<34} {:>5} mIoU {:.1}%", names[d], 100.0 * miou);
            }
            meanings[r] = parts.join("; ");
        }
        // Zero-shot on fog.
        let three = Synthetic::new(SyntheticConfig::default_three_domains(s.size, s.size, seed))?;
        let mut t = train(&backend, &three, (Mode::Dat, None), seed, &s, 2)?;
        let trained = t.checkpoint()?;
        let fog_held = set(&three, 2, 0, cdcl::data::HELD_OUT_START, s.eval_images, s.batch)?;
        let fog_train = set(&three, 2, 0, 0, 4 * s.eval_images, s.batch)?;
        for slice in 0..2 {
            let route = Route { bn: slice, head: 0, conv_set: 0 };
            let before = evaluate_routed(&mut t, &fog_held, route)?.miou(0).unwrap_or(f64::NAN);
            precise_bn(&mut t, &PreciseBnOptions { bn_slice: slice, conv_set: 0 }, fog_train.iter().cloned().map(Ok))?;
            let after = evaluate_routed(&mut t, &fog_held, route)?.miou(0).unwrap_or(f64::NAN);
            t.restore(&trained)?;
            zero[slice][0].push(before);
            zero[slice][1].push(after);
            eprintln!(
                "seed {seed} zero-shot fog through the {} slice: mIoU {:.1}% → {:.1}% after precise BN",
                names[slice],
                100.0 * before,
                100.0 * after
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();

    let mut md = String::new();
    let _ = writeln!(md, "Command: `{command}` ({:.0} s on {})\n", secs, backend.name());
    let _ = writeln!(
        md,
        "Seeds {} (data, initialisation, dropout); PSPNet-ResNet-18 at width {}, {}×{} images, {} iterations of {} images per dataset, lr {}; mIoU (%) on {} held-out images per dataset, mean ± sample std over the seeds.\n",
        (0..args.seeds).map(|k| k.to_string()).collect::<Vec<_>>().join(", "),
        s.width, s.size, s.size, s.iters, s.batch, s.lr, s.eval_images
    );
    let _ = writeln!(md, "| mode | {} mIoU | {} mIoU | what is evaluated |", names[0], names[1]);
    let _ = writeln!(md, "|---|---|---|---|");
    for (r, (label, ..)) in rows.iter().enumerate() {
        let _ = writeln!(md, "| {label} | {} | {} | {} |", cell(&results[r][0]), cell(&results[r][1]), meanings[r]);
    }
    let _ = writeln!(
        md,
        "\nThe two \"half the labels\" rows train DSBN + DAT on the same images with the labels of the second half of every batch held back: without the unlabelled images, and with the USSS entropy of those images (α = β = {USSS_WEIGHT}, EMA prototypes with momentum 0.9, temperature 1)."
    );
    let _ = writeln!(
        md,
        "\nZero-shot: DAT on {} + {}, evaluated on the unseen fog domain (its held-out images, in {}'s classes with {}'s head) through each BN slice, before and after precise BN on {} fog training images:\n",
        names[0],
        names[1],
        names[0],
        names[0],
        4 * s.eval_images
    );
    let _ = writeln!(md, "| BN slice | fog mIoU | fog mIoU after precise BN |");
    let _ = writeln!(md, "|---|---|---|");
    for (slice, z) in zero.iter().enumerate() {
        let _ = writeln!(md, "| {} | {} | {} |", names[slice], cell(&z[0]), cell(&z[1]));
    }
    let md_path = args.out.join("study.md");
    write_text(&md_path, &md)?;
    let groups: Vec<BarGroup> = rows
        .iter()
        .zip(&results)
        .map(|((label, ..), r)| BarGroup { label: label.clone(), values: r.iter().map(|v| mean_std(v)).collect() })
        .collect();
    let title = format!("held-out mIoU, mean ± std over {} seeds", args.seeds);
    let svg_path = args.out.join("study.svg");
    write_text(&svg_path, &bars_svg(&title, "mIoU", &names, &groups))?;
    print!("{md}");
    println!("\nwritten: {} and {}", md_path.display(), svg_path.display());
    Ok(())
}
