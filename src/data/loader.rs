//! The training loader: per iteration, one augmented batch of each dataset the iteration's plan
//! names, decoded and augmented in parallel on a pool of worker threads, several iterations
//! ahead of the training step.
//!
//! A producer thread owns the samplers and a rayon pool of `workers` threads; for each
//! iteration it asks every sampler for its next batch, decodes and augments all of the
//! iteration's samples in parallel, stacks them in order and sends the iteration into a channel
//! that holds `prefetch` finished iterations, so decoding overlaps the training step. Each
//! sample is a pure function of `(seed, epoch, dataset, index)` and batches are stacked in
//! sampler order, so the batches are bitwise the same for any number of workers.
//!
//! The first error (a file that disappeared or was damaged after the run checked it) ends the
//! stream: [`Loader::next_iteration`] returns it, and nothing after it is produced.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rayon::prelude::*;

use super::augment::AugmentConfig;
use super::dataset::SegDataset;
use super::labels::IGNORE_LABEL;
use super::sampler::{SampleRef, Sampler};
use crate::error::{Error, Result};

/// How the loader draws and prepares batches.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Samples per dataset per batch (on this rank).
    pub batch: usize,
    /// The augmentation.
    pub augment: AugmentConfig,
    /// Seed of the shuffles and the augmentation's draws.
    pub seed: u64,
    /// Decoding threads; 0 decodes on the calling thread when an iteration is asked for.
    pub workers: usize,
    /// Finished iterations kept ready ahead of the consumer (at least 1 with workers).
    pub prefetch: usize,
    /// This process's rank, and the number of ranks that share every batch.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch: 8,
            augment: AugmentConfig::default(),
            seed: 0,
            workers: 4,
            prefetch: 2,
            rank: 0,
            world: 1,
        }
    }
}

/// One dataset's augmented batch: NHWC normalised images and labels (class or 255).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedBatch {
    /// Index of the dataset in the loader's list.
    pub dataset: usize,
    /// Samples.
    pub n: usize,
    /// Crop height.
    pub h: usize,
    /// Crop width.
    pub w: usize,
    /// `[n, h, w, 3]`.
    pub images: Vec<f32>,
    /// `[n, h, w]`.
    pub labels: Vec<i32>,
    /// Which samples, in order.
    pub samples: Vec<SampleRef>,
}

/// Decodes and augments one sample. A sample without labels (an unlabelled split, see
/// [`FileDataset::without_labels`](super::FileDataset::without_labels)) comes with every label
/// 255, so that semi-supervised losses can take its images beside labelled batches while the
/// supervised loss ignores it; its image is the one the labelled sample would give.
pub fn load_sample(
    dataset: &dyn SegDataset,
    augment: &AugmentConfig,
    seed: u64,
    s: SampleRef,
) -> Result<(Vec<f32>, Vec<u8>)> {
    let sample = dataset.sample(s.index)?;
    let draw = augment.draw(seed, s.epoch, s.dataset, s.index, sample.image.height, sample.image.width);
    let (image, labels) = augment.apply(&sample.image, sample.labels.as_ref(), &draw)?;
    let labels = labels.unwrap_or_else(|| vec![IGNORE_LABEL; augment.crop.0 * augment.crop.1]);
    Ok((image, labels))
}

/// Runs `make(k)` for `k` in `start..end` on a producer thread inside a rayon pool of
/// `workers` threads (or, with 0 workers, on the consumer's thread inside a one-thread pool),
/// handing the results out in order, up to `depth` ahead. Stops after the first error.
pub struct Prefetcher<T> {
    mode: Mode<T>,
}

type Make<T> = Box<dyn FnMut(usize) -> Result<T> + Send>;

enum Mode<T> {
    Inline { make: Make<T>, pool: rayon::ThreadPool, next: usize, end: usize, failed: bool },
    Thread { rx: Option<Receiver<Result<T>>>, handle: Option<JoinHandle<()>>, remaining: usize, failed: bool },
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cdcl-loader-{i}"))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("cannot start {threads} loader threads: {e}")))
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts producing `make(start)`, `make(start + 1)`, … `make(end - 1)`.
    pub fn new(
        start: usize,
        end: usize,
        workers: usize,
        depth: usize,
        make: impl FnMut(usize) -> Result<T> + Send + 'static,
    ) -> Result<Self> {
        let mut make: Make<T> = Box::new(make);
        if workers == 0 {
            return Ok(Prefetcher { mode: Mode::Inline { make, pool: pool(1)?, next: start, end, failed: false } });
        }
        let pool = pool(workers)?;
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("cdcl-loader".into())
            .spawn(move || {
                for k in start..end {
                    let r = pool.install(|| make(k));
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| Error::InvalidArgument(format!("cannot start the loader thread: {e}")))?;
        let remaining = end.saturating_sub(start);
        Ok(Prefetcher { mode: Mode::Thread { rx: Some(rx), handle: Some(handle), remaining, failed: false } })
    }

    /// The next result in order; `None` after the last (or after an error was returned).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<T>> {
        match &mut self.mode {
            Mode::Inline { make, pool, next, end, failed } => {
                if *failed || *next >= *end {
                    return None;
                }
                let r = pool.install(|| make(*next));
                *next += 1;
                *failed = r.is_err();
                Some(r)
            }
            Mode::Thread { rx, remaining, failed, .. } => {
                if *failed || *remaining == 0 {
                    return None;
                }
                let r = match rx.as_ref()?.recv() {
                    Ok(r) => r,
                    // The producer ended without sending everything: it panicked. Say so rather
                    // than let the consumer take it for the end of the schedule.
                    Err(_) => Err(Error::InvalidArgument("the loader thread stopped unexpectedly".into())),
                };
                *remaining -= 1;
                *failed = r.is_err();
                Some(r)
            }
        }
    }
}

impl<T> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        if let Mode::Thread { rx, handle, .. } = &mut self.mode {
            // Closing the channel makes the producer's next send fail; it stops after the
            // iteration it is working on.
            drop(rx.take());
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// Per iteration, the augmented batches of the datasets its plan names.
pub struct Loader {
    prefetcher: Prefetcher<Vec<LoadedBatch>>,
}

impl Loader {
    /// A loader over `datasets` that produces iterations `start..schedule.len()`, iteration
    /// `it` holding one batch for each entry of `schedule[it]` (dataset indices, in order; a
    /// dataset may appear more than once). Samplers are positioned as if iterations
    /// `0..start` had been drawn, so a resumed run continues the same streams.
    pub fn new(
        datasets: Vec<Arc<dyn SegDataset>>,
        config: LoaderConfig,
        schedule: Vec<Vec<usize>>,
        start: usize,
    ) -> Result<Self> {
        config.augment.validate()?;
        if let Some(d) = schedule.iter().flatten().find(|&&d| d >= datasets.len()) {
            return Err(Error::InvalidArgument(format!(
                "the schedule names dataset {d}; there are {}",
                datasets.len()
            )));
        }
        let mut samplers = datasets
            .iter()
            .enumerate()
            .map(|(d, ds)| Sampler::new(d, ds.len(), config.seed, config.batch, config.rank, config.world, true))
            .collect::<Result<Vec<_>>>()?;
        // Batches each dataset has given before `start`.
        let mut drawn = vec![0u64; datasets.len()];
        for plan in schedule.iter().take(start) {
            for &d in plan {
                drawn[d] += 1;
            }
        }
        let end = schedule.len();
        let workers = config.workers;
        let depth = config.prefetch;
        let make = move |it: usize| -> Result<Vec<LoadedBatch>> {
            let mut refs = Vec::new();
            for &d in &schedule[it] {
                refs.push(samplers[d].batch(drawn[d]));
                drawn[d] += 1;
            }
            let flat: Vec<SampleRef> = refs.iter().flatten().copied().collect();
            let loaded: Vec<Result<(Vec<f32>, Vec<u8>)>> = flat
                .par_iter()
                .map(|s| load_sample(datasets[s.dataset].as_ref(), &config.augment, config.seed, *s))
                .collect();
            let mut loaded = loaded.into_iter();
            let (h, w) = config.augment.crop;
            let mut batches = Vec::with_capacity(refs.len());
            for samples in refs {
                let n = samples.len();
                let mut images = Vec::with_capacity(n * h * w * 3);
                let mut labels = Vec::with_capacity(n * h * w);
                for _ in 0..n {
                    let (img, lab) = loaded.next().expect("one result per sample")?;
                    images.extend_from_slice(&img);
                    labels.extend(lab.iter().map(|&l| l as i32));
                }
                batches.push(LoadedBatch { dataset: samples[0].dataset, n, h, w, images, labels, samples });
            }
            Ok(batches)
        };
        Ok(Loader { prefetcher: Prefetcher::new(start, end, workers, depth, make)? })
    }

    /// The next iteration's batches, in the order of its plan; `None` when the schedule is done
    /// or after an error was returned.
    pub fn next_iteration(&mut self) -> Option<Result<Vec<LoadedBatch>>> {
        self.prefetcher.next()
    }
}
