//! `cdcl train --data KIND=PATH ...`: Dataset Alternation Training on datasets on disk.
//!
//! Every split the run will read (the training splits and the evaluation splits) is opened and
//! decoded once before the first iteration, so a missing folder, an empty split, a corrupt
//! image, a label map of the wrong size or a label outside the classes stops the run before it
//! trains, with the file named. Then the loader draws each iteration's batches (one per
//! dataset the iteration's plan names) with the paper's augmentation on `--workers` threads,
//! ahead of the step; at the end every dataset's evaluation split is evaluated whole-image with
//! its own head and BN slice.

use std::sync::Arc;

use indicatif::ProgressBar;

use cdcl::backend::Backend;
use cdcl::data::{verify, AugmentConfig, FileDataset, Loader, LoaderConfig, SegDataset};
use cdcl::eval::{evaluate_dataset, InferOptions, Route};
use cdcl::nn::{Depth, ModelConfig};
use cdcl::train::{Batch, DatasetMeta, TrainConfig, Trainer, UnlabeledBatch};
use cdcl::{Error, Result};

use super::modes::ClassMapSource;
use super::session::{model_for_run, Session};
use super::{bar_style, explicit, parse_floats, parse_size, DataSpec};
use crate::TrainArgs;

/// Opens split `split` of every dataset, named as on the command line.
fn open_all(specs: &[DataSpec], split: &str) -> Result<Vec<FileDataset>> {
    specs
        .iter()
        .map(|s| {
            let mut ds = s.kind.open(&s.path, split)?;
            ds.name = s.name.clone();
            Ok(ds)
        })
        .collect()
}

/// Decodes every sample of every split on `workers` threads, with a progress bar.
pub fn verify_all(sets: &[&FileDataset], workers: usize) -> Result<()> {
    let total: usize = sets.iter().map(|s| s.len()).sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(bar_style());
    for s in sets {
        bar.set_message(format!("checking {} {}", s.name, s.split));
        verify(*s, workers, &|_| bar.inc(1))?;
    }
    bar.finish_and_clear();
    eprintln!("checked {total} images and label maps");
    Ok(())
}

/// The run's datasets as a checkpoint describes them.
pub fn metas(sets: &[FileDataset]) -> Vec<DatasetMeta> {
    sets.iter().map(|s| DatasetMeta { name: s.name.clone(), class_names: s.classes.clone() }).collect()
}

/// Trains on the datasets of `--data`.
pub fn train<B: Backend>(args: &TrainArgs, backend: B, par: super::launch::Parallel) -> Result<()> {
    let specs: Vec<DataSpec> = args.data.data.iter().map(|s| DataSpec::parse(s)).collect::<Result<_>>()?;
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(Error::InvalidArgument(format!(
                "dataset name {:?} given twice: name them with KIND:NAME=PATH",
                s.name
            )));
        }
    }
    let crop = parse_size(&args.data.crop, "--crop")?;
    let scale = match parse_floats(&args.data.scale_range, "--scale-range")?[..] {
        [lo, hi] if lo <= hi => (lo, hi),
        _ => return Err(Error::InvalidArgument("--scale-range takes LO,HI with LO <= HI".into())),
    };
    if explicit("size") || explicit("datasets") {
        return Err(Error::InvalidArgument(
            "--size and --datasets choose the synthetic scenes; with --data use --crop and one --data per dataset"
                .into(),
        ));
    }
    let augment = AugmentConfig { crop, scale, ..AugmentConfig::default() };
    augment.validate()?;
    let train_sets = open_all(&specs, &args.data.train_split)?;
    // `--eval-images 0` skips the evaluation (and needs no evaluation split).
    let skip_eval = explicit("eval_images") && args.eval_images == 0;
    let mut val_sets = if skip_eval { Vec::new() } else { open_all(&specs, &args.data.val_split)? };
    if explicit("eval_images") {
        val_sets.iter_mut().for_each(|v| v.items.truncate(args.eval_images));
    }
    let unlabeled = args.usss.open_unlabeled(&train_sets)?;
    let all: Vec<&FileDataset> = train_sets
        .iter()
        .chain(val_sets.iter().filter(|v| !v.items.is_empty()))
        .chain(unlabeled.iter().map(|(_, u)| u))
        .collect();
    verify_all(&all, args.data.workers)?;

    let d = specs.len();
    let classes: Vec<usize> = train_sets.iter().map(|s| s.num_classes()).collect();
    let names: Vec<String> = train_sets.iter().map(|s| s.name.clone()).collect();
    let class_names: Vec<Vec<String>> = train_sets.iter().map(|s| s.classes.clone()).collect();
    let mode = args.modes.mode(&names, &class_names, args.iters, ClassMapSource::Files)?;
    let base = ModelConfig {
        depth: Depth::parse(&args.depth)?,
        width: args.width,
        deep_stem: args.deep_stem,
        seed: args.seed,
        ..ModelConfig::resnet18(classes.clone())
    };
    let model = mode.model_config(&classes, base)?;
    let all_metas = metas(&train_sets);
    // The network's datasets in head order (what the checkpoint lists).
    let datasets: Vec<DatasetMeta> = mode.head_datasets(d).into_iter().map(|k| all_metas[k].clone()).collect();
    let (model, resume) = model_for_run(args, model, &datasets)?;
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
    let mut session = Session::start_rank(args, datasets.clone(), resume.as_ref(), par.writes())?;
    let mut trainer = Trainer::new(&backend, model, config)?;
    session.prepare(&mut trainer, args, resume)?;
    par.join(&mut trainer)?;
    let sizes: Vec<String> =
        train_sets.iter().map(|s| format!("{} ({} images, {} classes)", s.name, s.len(), s.num_classes())).collect();
    if par.writes() {
        eprintln!(
            "cdcl train: {} | {:?} | PSPNet-ResNet{} width {} | {} parameters | {} | {} | {} iterations of {} × {}×{} crops per dataset, scale {}–{}",
            backend.name(),
            args.precision,
            super::depth_number(trainer.model.config.depth),
            trainer.model.config.width,
            trainer.store.num_parameters(),
            sizes.join(", "),
            mode.name(),
            args.iters,
            args.batch,
            crop.0,
            crop.1,
            scale.0,
            scale.1
        );
    }

    let schedule: Vec<Vec<usize>> = (0..args.iters).map(|it| trainer.plan(it, d)).collect();
    let sets: Vec<Arc<dyn SegDataset>> = train_sets.into_iter().map(|s| Arc::new(s) as Arc<dyn SegDataset>).collect();
    let loader_config = LoaderConfig {
        batch: args.batch,
        augment,
        seed: args.seed,
        workers: args.data.workers,
        prefetch: 2,
        rank: par.rank(),
        world: par.world(),
    };
    // USSS: a second loader over the unlabelled folders, in step with the first: each
    // iteration draws one unlabelled batch for every dataset of its plan that has a folder.
    let owners: Vec<usize> = unlabeled.iter().map(|(d, _)| *d).collect();
    let mut unlabeled_loader = if semi {
        let plan: Vec<Vec<usize>> =
            schedule.iter().map(|p| p.iter().filter_map(|d| owners.iter().position(|o| o == d)).collect()).collect();
        let usets: Vec<Arc<dyn SegDataset>> =
            unlabeled.into_iter().map(|(_, u)| Arc::new(u) as Arc<dyn SegDataset>).collect();
        // Augmentation draws of their own (the seed), the same crops and scales.
        let config = LoaderConfig { seed: args.seed ^ 0x0055_5353, ..loader_config.clone() };
        Some(Loader::new(usets, config, plan, trainer.iteration().min(args.iters))?)
    } else {
        None
    };
    let mut entropies = Vec::new();
    let mut loader = Loader::new(sets, loader_config, schedule, trainer.iteration().min(args.iters))?;
    let bar = if par.writes() { ProgressBar::new(args.iters as u64) } else { ProgressBar::hidden() };
    bar.set_style(bar_style());
    bar.set_position(trainer.iteration() as u64);
    while let Some(loaded) = loader.next_iteration() {
        let batches: Vec<Batch> = loaded?
            .into_iter()
            .map(|b| Batch { dataset: b.dataset, n: b.n, h: b.h, w: b.w, images: b.images, labels: b.labels })
            .collect();
        let images: usize = batches.iter().map(|b| b.n).sum();
        let (it, profile) = (trainer.iteration(), super::profile::StepProfile::start(&backend));
        let stats = match unlabeled_loader.as_mut() {
            Some(ul) => {
                let unl: Vec<UnlabeledBatch> = match ul.next_iteration() {
                    Some(r) => r?
                        .into_iter()
                        .map(|b| UnlabeledBatch {
                            dataset: owners[b.dataset],
                            n: b.n,
                            h: b.h,
                            w: b.w,
                            images: b.images,
                        })
                        .collect(),
                    None => Vec::new(),
                };
                let s = trainer.step_semi(&batches, &unl)?;
                entropies.extend(s.usss.map(|u| (u.within, u.cross)));
                s.step
            }
            None => trainer.step(&batches)?,
        };
        if args.profile && par.writes() {
            let line = profile.line(&backend, it);
            bar.suspend(|| eprintln!("{line}"));
        }
        let rate = session.after_step(&trainer, &stats, images)?;
        let per: Vec<String> = datasets
            .iter()
            .enumerate()
            .filter(|(k, _)| stats.per_dataset.get(*k).is_some_and(|l| l.is_finite()))
            .map(|(k, m)| match stats.aux_per_dataset.get(k).filter(|a| a.is_finite()) {
                Some(a) => format!("{} {:.3}/{a:.3}", m.name, stats.per_dataset[k]),
                None => format!("{} {:.3}", m.name, stats.per_dataset[k]),
            })
            .collect();
        bar.set_message(format!("loss (main/aux) {} | {rate:.1} img/s | lr {:.5}", per.join("  "), stats.lr));
        bar.inc(1);
        // An f16 step that overflowed was skipped (its loss scale shrinks): not a divergence.
        if !stats.total.is_finite() && !stats.skipped {
            bar.abandon();
            return Err(Error::InvalidArgument(format!("loss became {} at iteration {}", stats.total, stats.iter)));
        }
    }
    bar.finish();
    if let Some(line) = crate::entropy_summary(&entropies).filter(|_| par.writes()) {
        eprintln!("{line}");
    }
    session.finish(&trainer)?;
    if !par.writes() {
        return Ok(());
    }
    println!("checkpoint: {}", args.checkpoint.display());

    // Only the datasets the mode has a head for are evaluated, each as the mode defines.
    let evaluated = mode.evaluation(&names);
    for (k, val) in val_sets.into_iter().enumerate() {
        let Some((_, meaning)) = evaluated.iter().find(|(e, _)| *e == k) else { continue };
        if val.items.is_empty() {
            continue;
        }
        let r = trainer.route(k)?;
        let (head, bn) = (r.head, r.bn);
        let route = Route { head, bn, head_name: datasets[head].name.clone(), bn_name: datasets[bn].name.clone() };
        println!("{}: {meaning}", val.name);
        let bar = ProgressBar::new(val.len() as u64);
        bar.set_style(bar_style());
        bar.set_message(format!("evaluating {} {}", val.name, val.split));
        let report =
            evaluate_dataset(&mut trainer, Arc::new(val), &route, &InferOptions::default(), args.data.workers, |_| {
                bar.inc(1);
                Ok(())
            })?;
        bar.finish_and_clear();
        print!("{}", report.table());
        session.log_eval(trainer.iteration(), &report.to_json())?;
    }
    Ok(())
}
