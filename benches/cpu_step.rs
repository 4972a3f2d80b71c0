//! The CPU backend on whole steps: one DAT training step (one forward per dataset, summed loss,
//! one backward, one SGD step) and one eval-mode forward (forward, upsampling, argmax of one
//! dataset's batch, as `cdcl train`'s evaluation runs it) of PSPNet-ResNet-18 on the synthetic
//! scenes, at two shapes:
//!
//! - `defaults`: what `cdcl train` runs by default (width 0.25, 96×96, 4 images per dataset);
//! - `full`: the paper's widths (width 1.0), 256×256, 2 images per dataset.
//!
//! `scripts/torch_cpu_step.py` runs the same model and steps in PyTorch on the CPU;
//! docs/performance.md has both side by side. Threads come from rayon's global pool
//! (`RAYON_NUM_THREADS`).
//!
//! `CDCL_STEP_TIMES=N` skips Criterion and prints, per shape (`CDCL_STEP_SHAPE=defaults|full`
//! picks one), the median of N timed iterations after 2 warm-up ones, in the format of
//! `scripts/torch_cpu_step.py`, so that the two can be run alternately.

use cdcl::backend::CpuBackend;
use cdcl::data::{Synthetic, SyntheticConfig};
use cdcl::nn::ModelConfig;
use cdcl::train::{evaluate, Batch, TrainConfig, Trainer};
use std::time::Instant;

use criterion::{criterion_group, Criterion};

struct Shape {
    name: &'static str,
    width: f32,
    size: usize,
    batch: usize,
    samples: usize,
}

const SHAPES: [Shape; 2] = [
    Shape { name: "defaults", width: 0.25, size: 96, batch: 4, samples: 20 },
    // Seconds per step: the fewest samples Criterion takes.
    Shape { name: "full", width: 1.0, size: 256, batch: 2, samples: 10 },
];

fn setup(s: &Shape) -> (Trainer<CpuBackend>, Vec<Batch>) {
    let data = Synthetic::new(SyntheticConfig::default_two_domains(s.size, s.size, 0)).unwrap();
    let classes = data.num_classes_per_domain();
    let model = ModelConfig { width: s.width, seed: 0, ..ModelConfig::resnet18(classes) };
    let config = TrainConfig { max_iters: 1_000_000, ..Default::default() };
    let trainer = Trainer::new(&CpuBackend::new(), model, config).unwrap();
    let batches = (0..2)
        .map(|ds| {
            let idx: Vec<u64> = (0..s.batch as u64).map(|i| (ds * s.batch) as u64 + i).collect();
            let b = data.batch(ds, &idx).unwrap();
            Batch { dataset: ds, n: b.n, h: b.h, w: b.w, images: b.images, labels: b.labels }
        })
        .collect();
    (trainer, batches)
}

fn cpu_step(c: &mut Criterion) {
    for s in &SHAPES {
        let mut g = c.benchmark_group(format!("cpu_step/{}", s.name));
        g.sample_size(s.samples);
        let (mut trainer, batches) = setup(s);
        g.bench_function("train_step", |b| b.iter(|| trainer.step(&batches).unwrap()));
        g.bench_function("eval_forward", |b| b.iter(|| evaluate(&mut trainer, &batches[..1]).unwrap()));
        g.finish();
    }
}

/// `f` twice to warm up, then `iters` times: (median seconds, every time).
fn times(iters: usize, mut f: impl FnMut()) -> (f64, Vec<f64>) {
    f();
    f();
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    let all = t.clone();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], all)
}

fn quick(iters: usize, only: Option<&str>) {
    for s in SHAPES.iter().filter(|s| only.is_none_or(|o| o == s.name)) {
        let (mut trainer, batches) = setup(s);
        let (train, all_train) = times(iters, || {
            trainer.step(&batches).unwrap();
        });
        let (eval, all_eval) = times(iters, || {
            evaluate(&mut trainer, &batches[..1]).unwrap();
        });
        for (what, med, all) in [("train", train, all_train), ("eval", eval, all_eval)] {
            let all: Vec<String> = all.iter().map(|t| format!("{t:.4}")).collect();
            println!("cdcl {} {what} {med:.4} [{}]", s.name, all.join(" "));
        }
    }
}

criterion_group!(benches, cpu_step);

fn main() {
    if let Some(n) = std::env::var("CDCL_STEP_TIMES").ok().and_then(|v| v.parse::<usize>().ok()) {
        quick(n.max(1), std::env::var("CDCL_STEP_SHAPE").ok().as_deref());
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
