//! Dataset Alternation Training (DAT) and the paper's baselines, over any [`Backend`].
//!
//! One DAT iteration: for each dataset d, forward a batch of d only (its samples carry dataset
//! index d, so every DSBN layer uses slice d, and head d classifies), compute its loss; sum
//! `Σ_d w_d · (loss_d + 0.4 · aux_d)`; run ONE backward and ONE SGD step (momentum 0.9,
//! weight decay 1e-4, poly learning-rate decay with power 0.9, head at 10× the base rate).
//!
//! **One pass for the datasets of an iteration.** The DSBN kernels pick each sample's slice and
//! compute each dataset's statistics from its own samples, so the per-dataset forwards of an
//! iteration run as ONE pass over their concatenated batches whenever that computes the same
//! function: every batch of the pass has its own BN slice and all have one image size
//! ([`TrainConfig::fuse_datasets`], on by default). The trunk's features are then split per
//! dataset for the heads. What differs from separate passes: summation order, and the Dropout2d
//! masks (drawn per pass and sample position: the same distribution, other draws). Baselines
//! with one shared BN slice keep one pass per batch.
//!
//! **One read per step.** Losses stay on the backend; the step reads the objective, the
//! per-dataset losses and (f16) the overflow flag once, after the optimiser step was queued —
//! the SGD kernel itself skips an overflowing f16 step ([`precision`]).
//!
//! The caller supplies the batches each iteration asks for ([`Trainer::plan`]), so the trainer
//! is independent of where data comes from.

mod checkpoint;
mod data_parallel;
mod eval;
pub mod modes;
pub mod precise_bn;
pub mod precision;
pub mod usss;

pub use checkpoint::{first_model_mismatch, DatasetMeta, ModelMeta, MODEL_KEY};
pub use data_parallel::DataParallel;
pub use eval::{evaluate, evaluate_routed, EvalResult};
pub use modes::{mode_for_model, parse_class_map, Interval, Mode, Route};
pub use precise_bn::{precise_bn, PreciseBnOptions, PreciseBnReport};
pub use precision::{LossScaleConfig, LossScaler, Precision};
pub use usss::{Prototypes, SemiStepStats, UnlabeledBatch, UsssConfig};

use crate::autograd::{BackwardOptions, Graph, Group, LossSpec, ParamStore, Scalar, Var};
use crate::backend::{Backend, BnTables, SgdTensor, TensorLike};
use crate::error::{Error, Result};
use crate::nn::{ModelConfig, Outputs, PspNet};
use crate::ops::sgd::{FrozenRows, SgdOptions};
use crate::rng::splitmix64;

/// One dataset's batch, on the host: images `[N, H, W, 3]` f32, labels `[N, H, W]` i32 in the
/// dataset's own label space (255 = ignore).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Which dataset the samples come from.
    pub dataset: usize,
    /// Samples.
    pub n: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// NHWC images.
    pub images: Vec<f32>,
    /// Labels.
    pub labels: Vec<i32>,
}

/// Optimisation and schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// What an iteration does.
    pub mode: Mode,
    /// Which datasets each iteration of a multi-dataset mode draws ([`Interval`]).
    pub interval: Interval,
    /// Base learning rate (backbone).
    pub base_lr: f32,
    /// Head learning rate = base × this.
    pub head_lr_mult: f32,
    /// SGD momentum.
    pub momentum: f32,
    /// L2 weight decay.
    pub weight_decay: f32,
    /// Poly decay power: lr = base · (1 − it / max_iters)^power.
    pub power: f32,
    /// Iterations of the whole run (for the schedule).
    pub max_iters: usize,
    /// Loss weight w_d of each dataset (missing entries are 1).
    pub loss_weights: Vec<f32>,
    /// Weight of the auxiliary loss.
    pub aux_weight: f32,
    /// Seed of the dropout masks.
    pub seed: u64,
    /// Storage of activations and convolution weights ([`Precision`]).
    pub precision: Precision,
    /// Dynamic loss scaling (f16 only).
    pub loss_scale: LossScaleConfig,
    /// Run the per-dataset forwards of an iteration as one pass when that computes the same
    /// function (distinct BN slices, one image size); see the module documentation.
    pub fuse_datasets: bool,
    /// Semi-supervised training with unlabelled images ([`usss`]; off by default).
    pub usss: UsssConfig,
    /// TF32 for the f32 convolutions of a device backend: `Some(on)` sets it on the backend's
    /// device when the trainer is built ([`Backend::set_allow_tf32`]); `None` leaves the
    /// device's setting (on by default, as PyTorch's `allow_tf32`). A host backend stays exact.
    pub tf32: Option<bool>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            mode: Mode::Dat,
            interval: Interval::Every,
            base_lr: 0.01,
            head_lr_mult: 10.0,
            momentum: 0.9,
            weight_decay: 1e-4,
            power: 0.9,
            max_iters: 100,
            loss_weights: Vec::new(),
            aux_weight: 0.4,
            seed: 0,
            precision: Precision::F32,
            loss_scale: LossScaleConfig::default(),
            fuse_datasets: true,
            usss: UsssConfig::default(),
            tf32: None,
        }
    }
}

/// What one iteration measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// The iteration just run (0-based).
    pub iter: usize,
    /// The objective that was minimised.
    pub total: f32,
    /// Main-head loss per dataset (mean over the dataset's passes); NaN for datasets not seen.
    pub per_dataset: Vec<f32>,
    /// Auxiliary-head loss per dataset, likewise (NaN also without an auxiliary head).
    pub aux_per_dataset: Vec<f32>,
    /// Backbone learning rate used.
    pub lr: f32,
    /// f16: the step's gradients overflowed at this loss scale and the optimiser skipped it
    /// (no weight changed; the running statistics moved, as PyTorch's do).
    pub skipped: bool,
    /// The loss scale the step used (1 without loss scaling).
    pub loss_scale: f32,
}

/// A model, its parameters and the optimiser state.
#[derive(Debug)]
pub struct Trainer<B: Backend> {
    backend: B,
    /// The model.
    pub model: PspNet,
    /// Its parameters.
    pub store: ParamStore<B>,
    /// Optimisation settings.
    pub config: TrainConfig,
    iter: usize,
    scaler: LossScaler,
    data_parallel: Option<DataParallel>,
    prototypes: Prototypes,
    /// While a semi-supervised step's labelled forwards run: each batch's trunk features.
    captured: Option<Vec<Var>>,
}

impl<B: Backend> Trainer<B> {
    /// Builds the model on `backend`.
    pub fn new(backend: &B, model: ModelConfig, config: TrainConfig) -> Result<Self> {
        if config.max_iters == 0 {
            return Err(Error::InvalidArgument("max_iters must be at least 1".into()));
        }
        config.mode.check_model(&model)?;
        if config.interval != Interval::Every {
            let trained = match &config.mode {
                Mode::LabelRemap { class_map, .. } => (0..class_map.len()).collect(),
                Mode::Single(_) | Mode::Finetune { .. } | Mode::TwoStage { .. } => {
                    return Err(Error::InvalidArgument(format!(
                        "an interval applies to modes that train several datasets together, not {}",
                        config.mode.name()
                    )))
                }
                m => m.trained_datasets(model.num_classes.len()),
            };
            config.interval.check(&trained)?;
        }
        if let Some((_, _, switch_at)) = config.mode.stages() {
            if switch_at == 0 || switch_at >= config.max_iters {
                return Err(Error::InvalidArgument(format!(
                    "the second stage must start within the run: switch at {switch_at} of {} iterations",
                    config.max_iters
                )));
            }
        }
        if model.num_bn > FrozenRows::MAX_ROWS {
            // The SGD step freezes the DSBN rows of absent datasets with a 64-bit row mask.
            return Err(Error::InvalidArgument(format!(
                "at most {} BN slices (datasets) can be trained, got {}",
                FrozenRows::MAX_ROWS,
                model.num_bn
            )));
        }
        config.loss_scale.check()?;
        config.usss.check_mode(&config.mode)?;
        if let Some(on) = config.tf32 {
            backend.set_allow_tf32(on);
        }
        let mut store = ParamStore::new(backend.clone());
        store.set_precision(config.precision.storage())?;
        let model = PspNet::new(model, &mut store)?;
        let scaler = LossScaler::new(config.loss_scale);
        Ok(Trainer {
            backend: backend.clone(),
            model,
            store,
            config,
            iter: 0,
            scaler,
            data_parallel: None,
            prototypes: Prototypes::default(),
            captured: None,
        })
    }

    /// Makes this trainer one rank of a data-parallel run over `comm`'s group: every rank
    /// takes rank 0's parameters, BN tables and momentum now, and from the next step on the
    /// gradients are averaged over the ranks after each backward (BN statistics stay per rank,
    /// see [`DataParallel`]). Every rank must call it, and then step in lockstep.
    pub fn set_data_parallel(&mut self, comm: std::sync::Arc<dyn crate::dist::Communicator>) -> Result<()> {
        if self.config.mode.steps_per_batch() {
            return Err(Error::InvalidArgument("data-parallel training needs one backward per iteration".into()));
        }
        let dp = DataParallel::new(comm);
        dp.broadcast_state(&mut self.store)?;
        self.data_parallel = Some(dp);
        Ok(())
    }

    /// Per-dataset synchronised BatchNorm for a data-parallel run (after
    /// [`Trainer::set_data_parallel`]; off by default): every rank normalises with the group's
    /// batch statistics of each dataset and moves identical running statistics, so N ranks ×
    /// batch b train as one process with the concatenated batch. Every rank must set the same.
    pub fn set_sync_bn(&mut self, on: bool) -> Result<()> {
        match self.data_parallel.as_mut() {
            Some(dp) => {
                dp.set_sync_bn(on);
                Ok(())
            }
            None => Err(Error::InvalidArgument("SyncBN needs a data-parallel run (set_data_parallel first)".into())),
        }
    }

    /// The loss-scaling state (its scale is 1 and unused unless the precision is f16).
    pub fn loss_scaler(&self) -> &LossScaler {
        &self.scaler
    }

    /// The backward's seed: the loss scale in f16, else 1.
    fn seed(&self) -> f32 {
        if self.config.precision.scales_loss() {
            self.scaler.scale()
        } else {
            1.0
        }
    }

    fn backward_options(&self) -> BackwardOptions {
        BackwardOptions { seed: self.seed(), check_finite: self.config.precision.scales_loss() }
    }

    /// The next iteration's number (0-based).
    pub fn iteration(&self) -> usize {
        self.iter
    }

    pub(crate) fn set_iteration(&mut self, iter: usize) {
        self.iter = iter;
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The datasets of the batches iteration `iter` consumes, in order, for `num_datasets`
    /// (see [`Mode::plan`] and [`Interval`]).
    pub fn plan(&self, iter: usize, num_datasets: usize) -> Vec<usize> {
        self.config.mode.plan(iter, num_datasets, &self.config.interval)
    }

    /// Poly learning rate of iteration `iter` for the backbone (restarted at the second stage
    /// of a two-stage mode: [`Mode::schedule`]).
    pub fn learning_rate(&self, iter: usize) -> f32 {
        let c = &self.config;
        let (it, len) = c.mode.schedule(iter, c.max_iters);
        let frac = (1.0 - it as f64 / len as f64).max(0.0);
        (c.base_lr as f64 * frac.powf(c.power as f64)) as f32
    }

    /// Where dataset `dataset`'s samples go ([`Mode::route`]); an error for a dataset the
    /// mode does not train or evaluate.
    pub fn route(&self, dataset: usize) -> Result<Route> {
        self.config.mode.route(dataset, self.model.num_heads()).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "mode {} has no head for dataset {dataset} (its datasets, in head order: {:?})",
                self.config.mode.name(),
                self.config.mode.head_datasets(self.model.num_heads())
            ))
        })
    }

    fn bn_slice(&self, dataset: usize) -> Result<i32> {
        Ok(self.route(dataset)?.bn as i32)
    }

    fn head_of(&self, dataset: usize) -> Result<usize> {
        Ok(self.route(dataset)?.head)
    }

    /// The labels batch `b` trains and is scored with: its own, or with label remapping
    /// another dataset's mapped into the target's classes (unmapped classes become 255).
    pub fn labels_for(&self, b: &Batch) -> Result<Vec<i32>> {
        match &self.config.mode {
            Mode::LabelRemap { class_map, target } if b.dataset != *target => {
                let map = class_map.get(b.dataset).filter(|m| !m.is_empty()).ok_or_else(|| {
                    Error::InvalidArgument(format!("the class map has no entry for dataset {}", b.dataset))
                })?;
                b.labels
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| match usize::try_from(l).ok().and_then(|l| map.get(l)) {
                        Some(&c) => Ok(c as i32),
                        None if l == 255 => Ok(255),
                        None => Err(Error::InvalidLabel {
                            dataset: b.dataset,
                            label: l as i64,
                            position: i,
                            num_classes: map.len(),
                        }),
                    })
                    .collect()
            }
            _ => Ok(b.labels.clone()),
        }
    }

    fn weight_of(&self, dataset: usize) -> f32 {
        self.config.loss_weights.get(dataset).copied().unwrap_or(1.0)
    }

    /// The forward passes of an iteration's batches: groups of batch indices that run as one
    /// pass (see the module documentation), in order.
    fn passes(&self, batches: &[Batch]) -> Result<Vec<Vec<usize>>> {
        let routes: Vec<Route> = batches.iter().map(|b| self.route(b.dataset)).collect::<Result<_>>()?;
        if self.config.mode == Mode::Mixed {
            return Ok(vec![(0..batches.len()).collect()]);
        }
        let mut passes: Vec<Vec<usize>> = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            // One pass: distinct BN slices, one image size, one set of convolutions.
            let fits = |p: &Vec<usize>| {
                let first = &batches[p[0]];
                self.config.fuse_datasets
                    && (first.h, first.w) == (b.h, b.w)
                    && routes[p[0]].conv_set == routes[i].conv_set
                    && p.iter().all(|&j| routes[j].bn != routes[i].bn)
            };
            match passes.last_mut() {
                Some(p) if fits(p) => p.push(i),
                _ => passes.push(vec![i]),
            }
        }
        Ok(passes)
    }

    /// One forward pass over `batches` (concatenated; one image size) into `g`: the trunk once,
    /// then each batch's head on its samples and its weighted main and auxiliary losses added to
    /// `terms`. Returns each batch's dataset and its main and auxiliary loss scalars.
    fn forward_pass(
        &mut self,
        g: &mut Graph<B>,
        batches: &[&Batch],
        pass: usize,
        terms: &mut Vec<(Scalar, f32)>,
    ) -> Result<Vec<PassLoss>> {
        let first = batches.first().ok_or_else(|| Error::InvalidArgument("no batch".into()))?;
        let (h, w) = (first.h, first.w);
        let mut images = Vec::new();
        let mut ds = Vec::new();
        for b in batches {
            check_batch(b)?;
            if (b.h, b.w) != (h, w) {
                return Err(Error::InvalidArgument("a mixed batch needs one image size".into()));
            }
            images.extend_from_slice(&b.images);
            ds.extend(std::iter::repeat_n(self.bn_slice(b.dataset)?, b.n));
        }
        let set = self.route(first.dataset)?.conv_set;
        let n: usize = batches.iter().map(|b| b.n).sum();
        let x = self.backend.tensor_float(&[n, h, w, 3], &images, self.config.precision.storage())?;
        let x = g.input(x);
        let dsv = g.datasets(&ds)?;
        let seed = splitmix64(self.config.seed, ((self.iter as u64) << 16) | pass as u64);
        let (feat, aux) = self.model.features_in_set(g, &mut self.store, x, dsv, seed, set)?;
        let sizes: Vec<usize> = batches.iter().map(|b| b.n).collect();
        let (feats, auxs) = if batches.len() == 1 {
            (vec![feat], vec![aux])
        } else {
            let f = g.split_batch(feat, &sizes)?;
            let a = match aux {
                Some(a) => g.split_batch(a, &sizes)?.into_iter().map(Some).collect(),
                None => vec![None; sizes.len()],
            };
            (f, a)
        };
        if let Some(c) = self.captured.as_mut() {
            c.extend(&feats);
        }
        let mut losses = Vec::with_capacity(batches.len());
        for ((b, f), a) in batches.iter().zip(feats).zip(auxs) {
            let head = self.head_of(b.dataset)?;
            let out = self.model.classify(g, &self.store, (f, a), head)?;
            let (main, aux) = self.add_losses(g, b, head, out, terms)?;
            losses.push(PassLoss { dataset: b.dataset, main, aux });
        }
        Ok(losses)
    }

    /// Head `head`'s losses of batch `b` — its logits upsampled to the label size inside the
    /// loss op — with their weights added to `terms`; returns the main loss. Each loss computes
    /// its gradient in the forward, for the upstream gradient the backward will send (its weight
    /// times the seed). Returns the main and (with an auxiliary head) the auxiliary loss.
    fn add_losses(
        &self,
        g: &mut Graph<B>,
        b: &Batch,
        head: usize,
        out: Outputs,
        terms: &mut Vec<(Scalar, f32)>,
    ) -> Result<(Scalar, Option<Scalar>)> {
        let host_labels = self.labels_for(b)?;
        // Checked here, once per batch and before anything is queued: the error names the
        // batch's dataset (the loss sees a one-head call) and the device never sees a bad label.
        check_labels(&host_labels, b.dataset, self.model.config.num_classes[head])?;
        let labels = g.input_i32(&[b.n, b.h, b.w], &host_labels)?;
        let zeros = g.input_i32(&[b.n], &vec![0; b.n])?;
        let wd = self.weight_of(b.dataset);
        let spec = |weight: f32| LossSpec {
            num_classes: vec![self.model.config.num_classes[head]],
            weights: None,
            upsample: Some(self.model.config.align_corners),
            expected_grad: Some(weight * self.seed()),
        };
        let loss = g.cross_entropy(out.main, labels, zeros, &spec(wd)).map_err(|e| in_dataset(e, b.dataset))?;
        terms.push((loss, wd));
        let mut aux_loss = None;
        if let Some(aux) = out.aux {
            let wa = wd * self.config.aux_weight;
            let l = g.cross_entropy(aux, labels, zeros, &spec(wa)).map_err(|e| in_dataset(e, b.dataset))?;
            terms.push((l, wa));
            aux_loss = Some(l);
        }
        Ok((loss, aux_loss))
    }

    /// Runs one iteration on `batches` (normally those [`Trainer::plan`] asks for; any batches
    /// of datasets the model has are accepted, e.g. a DAT iteration over a subset).
    pub fn step(&mut self, batches: &[Batch]) -> Result<StepStats> {
        // Device data errors of the step are read with its losses (one wait per step).
        self.backend.begin_step()?;
        let stats = self.step_in_scope(batches);
        self.backend.end_step();
        stats
    }

    fn step_in_scope(&mut self, batches: &[Batch]) -> Result<StepStats> {
        self.num_datasets_of(batches)?;
        if self.config.mode.stages().is_some_and(|(_, _, s)| s == self.iter) {
            self.restart_optimiser();
        }
        let lr = self.learning_rate(self.iter);
        let loss_scale = self.seed();
        self.store.sync_copies()?;
        let stats = if self.config.mode.steps_per_batch() {
            // A backward and an optimiser step after each batch: one read per batch.
            let mut sums = vec![(0.0f64, 0usize); self.num_datasets_of(batches)?];
            let mut aux_sums = sums.clone();
            let (mut total, mut skipped) = (0.0f32, false);
            for (pass, b) in batches.iter().enumerate() {
                let tracked = self.batches_tracked();
                let mut g = Graph::new(&self.backend, true);
                let mut terms = Vec::new();
                let loss = self.forward_pass(&mut g, &[b], pass, &mut terms)?[0];
                let root = g.weighted_sum(&terms);
                let flag = self.optimise(&mut g, root, lr, &tracked)?;
                let mut wanted = vec![root, loss.main];
                wanted.extend(loss.aux);
                let (v, f) = g.read_scalars(&wanted, &flag.iter().collect::<Vec<_>>())?;
                let over = f.first().is_some_and(|&x| x != 0.0);
                self.scale_after(over);
                total += v[0];
                skipped |= over;
                add(&mut sums, b.dataset, v[1]);
                if let Some(&a) = v.get(2) {
                    add(&mut aux_sums, b.dataset, a);
                }
            }
            StepStats {
                iter: self.iter,
                total,
                per_dataset: means(&sums),
                aux_per_dataset: means(&aux_sums),
                lr,
                skipped,
                loss_scale,
            }
        } else {
            let tracked = self.batches_tracked();
            let (mut g, root, mains) = self.forward_all(batches)?;
            let flag = self.optimise(&mut g, root, lr, &tracked)?;
            let stats = self.read_stats(&g, root, &mains, flag.as_ref(), batches)?;
            self.scale_after(stats.skipped);
            stats
        };
        self.iter += 1;
        Ok(stats)
    }

    fn scale_after(&mut self, overflow: bool) {
        if self.config.precision.scales_loss() {
            self.scaler.update(overflow);
        }
    }

    /// The step's figures, with ONE read: the objective, every main loss and the overflow flag.
    fn read_stats(
        &self,
        g: &Graph<B>,
        root: Scalar,
        losses: &[PassLoss],
        flag: Option<&B::Tensor>,
        batches: &[Batch],
    ) -> Result<StepStats> {
        let mut wanted = vec![root];
        for l in losses {
            wanted.push(l.main);
            wanted.extend(l.aux);
        }
        let (v, f) = g.read_scalars(&wanted, &flag.into_iter().collect::<Vec<_>>())?;
        let mut sums = vec![(0.0f64, 0usize); self.num_datasets_of(batches)?];
        let mut aux_sums = sums.clone();
        let mut values = v[1..].iter();
        for l in losses {
            if let Some(&m) = values.next() {
                add(&mut sums, l.dataset, m);
            }
            if l.aux.is_some() {
                if let Some(&a) = values.next() {
                    add(&mut aux_sums, l.dataset, a);
                }
            }
        }
        Ok(StepStats {
            iter: self.iter,
            total: v[0],
            per_dataset: means(&sums),
            aux_per_dataset: means(&aux_sums),
            lr: self.learning_rate(self.iter),
            skipped: f.first().is_some_and(|&x| x != 0.0),
            loss_scale: self.seed(),
        })
    }

    /// The forward and backward of an iteration without the optimiser step: afterwards every
    /// parameter's gradient (f32, unscaled) is in [`Trainer::store`] (for gradient checks and
    /// comparisons of backends). Not for [`Mode::DsbnNoDat`], whose iteration steps after every
    /// forward. In f16, [`StepStats::skipped`] tells that the gradients overflowed.
    pub fn compute_gradients(&mut self, batches: &[Batch]) -> Result<StepStats> {
        Ok(self.trace_gradients(batches)?.0)
    }

    /// [`Trainer::compute_gradients`], also handing back the graph it ran: its values and what
    /// its tape saved ([`Graph::norm_records`]), to inspect a step (e.g. to compare backends).
    pub fn trace_gradients(&mut self, batches: &[Batch]) -> Result<(StepStats, Graph<B>)> {
        if self.config.mode.steps_per_batch() {
            return Err(Error::InvalidArgument("DSBN without DAT steps after each forward".into()));
        }
        self.store.sync_copies()?;
        self.store.zero_grad();
        let (mut g, root, mains) = self.forward_all(batches)?;
        let opts = self.backward_options();
        let grads = g.backward_with(root, &mut self.store, &opts)?;
        let stats = self.read_stats(&g, root, &mains, grads.overflow.as_ref(), batches)?;
        Ok((stats, g))
    }

    /// The length of the per-dataset figures of a step over `batches` (one past the largest
    /// dataset index the mode knows or the batches name); an error for a batch of a dataset the
    /// mode has no head for.
    fn num_datasets_of(&self, batches: &[Batch]) -> Result<usize> {
        if batches.is_empty() {
            return Err(Error::InvalidArgument("an iteration needs at least one batch".into()));
        }
        for b in batches {
            self.route(b.dataset)?;
        }
        let heads = self.model.num_heads();
        let known = match &self.config.mode {
            Mode::LabelRemap { class_map, target } => class_map.len().max(target + 1),
            m => m.head_datasets(heads).into_iter().max().map_or(heads, |d| d + 1).max(heads),
        };
        Ok(batches.iter().map(|b| b.dataset + 1).fold(known, usize::max))
    }

    /// A new optimiser for the second stage of a two-stage mode: every momentum buffer
    /// dropped (the schedule restarts through [`Trainer::learning_rate`]).
    fn restart_optimiser(&mut self) {
        let (weights, bns) = self.store.parts_mut();
        for w in weights.iter_mut() {
            w.momentum = None;
        }
        for l in bns.iter_mut() {
            l.momentum_gamma = None;
            l.momentum_beta = None;
        }
    }

    /// Every forward of a (non-interleaved) iteration into one graph; returns it with the root
    /// and each batch's (dataset, main loss).
    fn forward_all(&mut self, batches: &[Batch]) -> Result<Forward<B>> {
        self.num_datasets_of(batches)?;
        let mut g = Graph::new(&self.backend, true);
        let passes = self.passes(batches)?;
        if let Some(dp) = &self.data_parallel {
            dp.check_passes(passes.len())?;
            g.set_bn_sync(dp.bn_comm())?;
        }
        let mut terms = Vec::new();
        let mut mains = Vec::new();
        for (pass, idx) in passes.into_iter().enumerate() {
            let group: Vec<&Batch> = idx.iter().map(|&i| &batches[i]).collect();
            mains.extend(self.forward_pass(&mut g, &group, pass, &mut terms)?);
        }
        let root = g.weighted_sum(&terms);
        Ok((g, root, mains))
    }

    /// Every BN layer's training-forward count per dataset. Taken before the forwards of a
    /// step, it tells [`Trainer::optimise`] which datasets the step left out (the forwards
    /// count the datasets they see; the backward does not).
    fn batches_tracked(&self) -> Vec<Vec<i64>> {
        self.store.bn_layers().iter().map(|l| l.batches_tracked.clone()).collect()
    }

    /// Backward from `root`, then one SGD step at backbone rate `lr`. Parameters that got no
    /// gradient are skipped (as PyTorch skips `grad is None`), and so are the DSBN rows of
    /// datasets absent from the step, i.e. whose count in `before` (taken by
    /// [`Trainer::batches_tracked`] before the step's forwards) did not move: their γ, β and
    /// momentum stay bit-for-bit unchanged. In f16 the backward's overflow flag is returned (the
    /// SGD kernel already skipped the step if it is set).
    fn optimise(&mut self, g: &mut Graph<B>, root: Scalar, lr: f32, before: &[Vec<i64>]) -> Result<Option<B::Tensor>> {
        let opts = self.backward_options();
        let mut grads = g.backward_with(root, &mut self.store, &opts)?;
        if self.config.mode.convs_frozen(self.iter) {
            // Two-stage with frozen convolutions: every weight shared by the datasets keeps its
            // value (and momentum) bit for bit; the target's BN slice and classifier train.
            for w in self.store.parts_mut().0.iter_mut().filter(|w| w.dataset.is_none()) {
                w.grad = None;
            }
        }
        // Data-parallel: the ranks' mean gradient, and a dataset is absent only if no rank saw it.
        let global_absent = match &self.data_parallel {
            Some(dp) => Some(dp.average(&mut self.store, before, grads.overflow.as_mut())?.absent),
            None => None,
        };
        // Their gradient rows are zero, but weight decay and momentum would still move them:
        // the SGD step leaves them out (Trainer::new bounds the datasets by what a mask holds).
        let mut frozen = Vec::with_capacity(before.len());
        for (li, (layer, before)) in self.store.bn_layers().iter().zip(before).enumerate() {
            let absent: Vec<usize> = (0..layer.num_datasets)
                .filter(|&d| match &global_absent {
                    Some(a) => a[li][d],
                    None => layer.batches_tracked[d] == before[d],
                })
                .collect();
            let empty = absent.is_empty() || layer.channels == 0;
            frozen.push(if empty { None } else { Some(FrozenRows::from_rows(layer.channels, absent)?) });
        }
        self.sgd(lr, &frozen, grads.overflow.as_ref())?;
        self.store.zero_grad();
        Ok(grads.overflow)
    }

    /// One multi-tensor SGD step over every parameter with a gradient, leaving the rows
    /// `frozen[i]` of BN layer i's γ and β (and of their buffers) untouched. Momentum buffers
    /// start at zero, so `buf = momentum · 0 + d = d` on a parameter's first step, as PyTorch;
    /// a frozen row's buffer stays as it was, zero included.
    fn sgd(&mut self, lr: f32, frozen: &[Option<FrozenRows>], skip_if: Option<&B::Tensor>) -> Result<()> {
        let head_lr = lr * self.config.head_lr_mult;
        let rate = |g: Group| if g == Group::Head { head_lr } else { lr };
        let be = self.backend.clone();
        // Through parts_mut, not weights_mut: the masters are only written by the SGD kernel,
        // which keeps the 16-bit copies in step (weights_mut would have them refreshed).
        let (weights, bns) = self.store.parts_mut();
        for w in weights.iter_mut() {
            if w.grad.is_some() && w.momentum.is_none() {
                w.momentum = Some(be.zeros(w.value.shape())?);
            }
        }
        for l in bns.iter_mut() {
            if l.grad_gamma.is_some() && l.momentum_gamma.is_none() {
                l.momentum_gamma = Some(be.zeros(&[l.num_datasets, l.channels])?);
                l.momentum_beta = Some(be.zeros(&[l.num_datasets, l.channels])?);
            }
        }
        let mut list: Vec<SgdTensor<'_, B::Tensor>> = Vec::new();
        for w in weights.iter_mut() {
            if let (Some(grad), Some(buf)) = (w.grad.as_ref(), w.momentum.as_mut()) {
                list.push(SgdTensor {
                    param: &mut w.value,
                    grad,
                    momentum_buffer: buf,
                    lr: rate(w.group),
                    frozen_rows: None,
                    copy: w.half.as_mut(),
                });
            }
        }
        for (li, l) in bns.iter_mut().enumerate() {
            let lr = rate(l.group);
            let frozen_rows = frozen.get(li).copied().flatten();
            if let (Some(gg), Some(gb), Some(mg), Some(mb)) =
                (l.grad_gamma.as_ref(), l.grad_beta.as_ref(), l.momentum_gamma.as_mut(), l.momentum_beta.as_mut())
            {
                let [gamma, beta, ..] = l.tables.tables_mut();
                list.push(SgdTensor { param: gamma, grad: gg, momentum_buffer: mg, lr, frozen_rows, copy: None });
                list.push(SgdTensor { param: beta, grad: gb, momentum_buffer: mb, lr, frozen_rows, copy: None });
            }
        }
        let opts = SgdOptions { momentum: self.config.momentum, weight_decay: self.config.weight_decay };
        be.sgd_step(&mut list, &opts, false, skip_if)
    }
}

/// A step's graph, its objective, and each batch's losses.
type Forward<B> = (Graph<B>, Scalar, Vec<PassLoss>);

/// One batch's loss scalars in a step's graph.
#[derive(Debug, Clone, Copy)]
struct PassLoss {
    dataset: usize,
    main: Scalar,
    aux: Option<Scalar>,
}

fn add(sums: &mut [(f64, usize)], d: usize, v: f32) {
    sums[d].0 += v as f64;
    sums[d].1 += 1;
}

/// The loss sees one head at a time (head index 0 of a one-head call): name the real dataset.
fn in_dataset(e: Error, dataset: usize) -> Error {
    match e {
        Error::InvalidLabel { label, position, num_classes, .. } => {
            Error::InvalidLabel { dataset, label, position, num_classes }
        }
        e => e,
    }
}

fn means(sums: &[(f64, usize)]) -> Vec<f32> {
    sums.iter().map(|&(s, c)| if c == 0 { f32::NAN } else { (s / c as f64) as f32 }).collect()
}

/// Every label is a class of the head (`0..num_classes`) or the ignore label 255.
fn check_labels(labels: &[i32], dataset: usize, num_classes: usize) -> Result<()> {
    let bad = labels.iter().position(|&l| l != 255 && !(0..num_classes as i64).contains(&(l as i64)));
    match bad {
        Some(position) => Err(Error::InvalidLabel { dataset, label: labels[position] as i64, position, num_classes }),
        None => Ok(()),
    }
}

pub(crate) fn check_batch(b: &Batch) -> Result<()> {
    let px = b.n.checked_mul(b.h).and_then(|v| v.checked_mul(b.w));
    match px {
        Some(px) if px > 0 && b.images.len() == px * 3 && b.labels.len() == px => Ok(()),
        _ => Err(Error::InvalidShape {
            what: "training batch",
            shape: vec![b.n, b.h, b.w],
            reason: format!(
                "{} image values and {} labels do not make N×H×W×3 and N×H×W",
                b.images.len(),
                b.labels.len()
            ),
        }),
    }
}
