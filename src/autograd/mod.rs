//! A minimal tape-based autograd over the [`Backend`] ops.
//!
//! A [`Graph`] lives for one training step (or one evaluation). Each op computes its output on
//! the backend at once and, when recording, pushes a tape node holding what its backward needs
//! (input values, the DSBN statistics it saved, max-pool indices). [`Graph::backward`] walks
//! the tape in reverse: every tensor's gradient is the sum, in tape order, of what its
//! consumers send it (a tensor used twice — a residual, a shared input — gets both), and
//! parameter gradients are collected in the [`ParamStore`], across every forward of the step,
//! then gathered into one f32 gradient per tensor in one backend call.
//!
//! **The tape records what the kernels fuse**: one node per dataset-aware block
//! ([`Graph::dab`]), one for the pyramid pooling module ([`Graph::ppm`]), one for the loss with
//! the upsampling of the logits fused in ([`Graph::cross_entropy`] with
//! [`LossSpec::upsample`]), one for the USSS entropy loss ([`Graph::usss`]). A block may leave
//! its output unwritten ([`DabCall::defer`]): the value is then the block's raw convolution
//! output with its normalisation *pending*, and the only op that accepts it is the next block,
//! which applies the normalisation in its convolution's prologue (forward and backward); any
//! other op refuses it with a typed error.
//!
//! **Nothing is read back mid-step.** Losses stay on the backend as tensors; a [`Scalar`] is a
//! loss or a weighted sum of scalars, evaluated on the host only when read
//! ([`Graph::read_scalars`] gathers every loss a step needs into one read). The backward's
//! seeds are host constants (the loss weights, the loss scale), so the loss op computes its
//! gradient in the forward, in the same launches as the loss, when told what upstream gradient
//! to expect ([`LossSpec::expected_grad`]).
//!
//! Parameters are not graph values: ops take a [`WeightId`] / [`BnId`] and read the store (the
//! f32 master, or the 16-bit copy when the graph's activations are 16-bit).
//!
//! Modes: `training` picks batch statistics (and moves running statistics) in DSBN and turns
//! dropout on; [`Graph::set_recording`]`(false)` is PyTorch's `no_grad`. An evaluation graph
//! (`training == false`) records nothing and runs every block as the one-kernel inference DAB.

mod backward;
mod node;
mod params;
mod sync;
mod usss;

pub use backward::{BackwardOptions, Gradients};
pub use params::{BnId, BnLayer, Group, ParamStore, Weight, WeightId};
pub use usss::UsssSpec;

use crate::backend::{
    Backend, DabInput, DabOptions, LossOptions, PpmBranchMut, PpmBranchRef, PpmRecords, Prologue, TensorLike,
};
use crate::error::{Error, Result};
use crate::ops::conv::ConvGeometry;
use crate::ops::cross_entropy::CrossEntropyOptions;
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::DsbnOptions;
use crate::ops::maxpool::PoolGeometry;
use crate::ops::ppm::PpmOptions;
use crate::tensor::DType;
use node::{Node, Pending, ScalarDef};

/// A tensor value of a [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Var(usize);

/// A scalar of a [`Graph`] (a loss, or a weighted sum of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scalar(usize);

/// Dataset indices of a batch: the device tensor the kernels read and the host copy the graph
/// needs (which datasets are present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datasets(Var);

/// One dataset-aware block of [`Graph::dab`] (its parameters, geometry and options): `relu?(DSBN(conv(x)) + residual)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DabCall {
    /// The convolution weight (no bias).
    pub weight: WeightId,
    /// The DSBN layer.
    pub bn: BnId,
    /// Stride, padding, dilation.
    pub geometry: ConvGeometry,
    /// The DSBN's eps, momentum, ReLU.
    pub dsbn: DsbnOptions,
    /// Added before the ReLU (ResNet's identity).
    pub residual: Option<Var>,
    /// Training: do not write the output; the consumer — which must be the next block — applies
    /// this block's normalisation in its convolution's prologue. Ignored with a residual and in
    /// evaluation (both write the output).
    pub defer: bool,
}

/// The loss of [`Graph::cross_entropy`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LossSpec {
    /// Classes of each head (the logits' first `num_classes[d]` channels for dataset d).
    pub num_classes: Vec<usize>,
    /// Loss weight of each dataset (`None`: 1).
    pub weights: Option<Vec<f32>>,
    /// `Some(align_corners)`: the logits are upsampled bilinearly to the labels' size inside
    /// the loss (never stored).
    pub upsample: Option<bool>,
    /// The gradient the backward will send this loss (its weight in the objective times the
    /// seed, e.g. the loss scale): with it the forward also computes the logits' gradient, in
    /// the same launches. A different value at backward time recomputes it.
    pub expected_grad: Option<f32>,
}

/// What the tape saved of one normalisation with a ReLU — a dataset-aware block, a standalone
/// DSBN, a pyramid pooling branch — for inspecting a step (e.g. where two backends may round a
/// ReLU input to different sides of zero): its input is
/// `(x − mean)·invstd·γ + β + residual`, per (sample's dataset, channel).
#[derive(Debug)]
pub struct NormRecord<'a, B: Backend> {
    /// The layer (γ and β in the store).
    pub bn: BnId,
    /// The normalised tensor (a convolution's output).
    pub x: &'a B::Tensor,
    /// Its batch statistics.
    pub stats: &'a B::BnSaved,
    /// The residual added before the ReLU.
    pub residual: Option<&'a B::Tensor>,
    /// Whether a ReLU follows.
    pub relu: bool,
    /// The dataset index of every sample.
    pub datasets: &'a B::Tensor,
}

/// One step's values and tape.
pub struct Graph<B: Backend> {
    backend: B,
    training: bool,
    recording: bool,
    values: Vec<B::Tensor>,
    needs_grad: Vec<bool>,
    host_datasets: Vec<Option<Vec<i32>>>,
    pending: Vec<Option<Pending>>,
    stats: Vec<B::BnSaved>,
    losses: Vec<B::Tensor>,
    scalars: Vec<ScalarDef>,
    tape: Vec<Node<B>>,
    backward_done: bool,
    bn_sync: Option<std::sync::Arc<dyn crate::dist::Communicator>>,
}

impl<B: Backend> std::fmt::Debug for Graph<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph")
            .field("backend", &self.backend.name())
            .field("training", &self.training)
            .field("values", &self.values.len())
            .field("tape", &self.tape.len())
            .finish()
    }
}

fn nhwc(t: &impl TensorLike, what: &'static str) -> Result<[usize; 4]> {
    match *t.shape() {
        [n, h, w, c] => Ok([n, h, w, c]),
        _ => Err(Error::InvalidShape { what, shape: t.shape().to_vec(), reason: "expected NHWC".into() }),
    }
}

impl<B: Backend> Graph<B> {
    /// A graph for a training step (`training = true`: batch statistics, dropout on, tape on)
    /// or an evaluation (`false`: running statistics, dropout off, nothing recorded).
    pub fn new(backend: &B, training: bool) -> Self {
        Graph {
            backend: backend.clone(),
            training,
            recording: training,
            values: Vec::new(),
            needs_grad: Vec::new(),
            host_datasets: Vec::new(),
            pending: Vec::new(),
            stats: Vec::new(),
            losses: Vec::new(),
            scalars: Vec::new(),
            tape: Vec::new(),
            backward_done: false,
            bn_sync: None,
        }
    }

    /// The backend computing the values.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether DSBN uses batch statistics and dropout is on.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Turns the tape on or off (off = PyTorch's `no_grad`); always off in evaluation.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on && self.training;
    }

    fn push(&mut self, t: B::Tensor, needs_grad: bool) -> Var {
        self.values.push(t);
        self.needs_grad.push(needs_grad && self.recording);
        self.host_datasets.push(None);
        self.pending.push(None);
        Var(self.values.len() - 1)
    }

    fn push_scalar(&mut self, def: ScalarDef) -> Scalar {
        self.scalars.push(def);
        Scalar(self.scalars.len() - 1)
    }

    /// The value of a variable (for a block whose normalisation is pending: its raw
    /// convolution output).
    pub fn value(&self, v: Var) -> &B::Tensor {
        &self.values[v.0]
    }

    /// Whether `v` holds a block's raw convolution output whose normalisation its consumer
    /// must apply ([`DabCall::defer`]).
    pub fn is_pending(&self, v: Var) -> bool {
        self.pending[v.0].is_some()
    }

    /// Refuses a value whose normalisation is pending (only a block can consume it).
    fn ready(&self, v: Var, what: &str) -> Result<()> {
        if self.pending[v.0].is_some() {
            return Err(Error::InvalidArgument(format!(
                "{what}: the input is a block output left unwritten for the next block's prologue"
            )));
        }
        Ok(())
    }

    /// An input that needs no gradient (images).
    pub fn input(&mut self, t: B::Tensor) -> Var {
        self.push(t, false)
    }

    /// An input whose gradient [`Graph::backward`] should compute (tests, feature probes).
    pub fn input_with_grad(&mut self, t: B::Tensor) -> Var {
        self.push(t, true)
    }

    /// An i32 tensor from host data (labels).
    pub fn input_i32(&mut self, shape: &[usize], data: &[i32]) -> Result<Var> {
        let t = self.backend.tensor_i32(shape, data)?;
        Ok(self.push(t, false))
    }

    /// The dataset index of every sample of a batch, kept on the host too (DSBN counts the
    /// batches each dataset saw from it).
    pub fn datasets(&mut self, indices: &[i32]) -> Result<Datasets> {
        let v = self.input_i32(&[indices.len()], indices)?;
        self.host_datasets[v.0] = Some(indices.to_vec());
        Ok(Datasets(v))
    }

    /// The tensor behind a [`Datasets`].
    pub fn datasets_var(&self, d: Datasets) -> Var {
        d.0
    }

    fn rec(&mut self, node: Node<B>) {
        if self.recording {
            self.tape.push(node);
        }
    }

    /// Counts, per dataset a training forward saw, one batch in `counts` (PyTorch's
    /// `num_batches_tracked`).
    fn track(host: Option<&Vec<i32>>, counts: &mut [i64]) {
        if let Some(host) = host {
            let mut seen = vec![false; counts.len()];
            for &d in host {
                if let Some(s) = seen.get_mut(d as usize) {
                    *s = true;
                }
            }
            for (count, present) in counts.iter_mut().zip(seen) {
                *count += present as i64;
            }
        }
    }

    /// `conv2d(x, w) + bias` with a weight (and f32 bias) of the store; the weight in x's
    /// storage type (the 16-bit copy for a 16-bit graph).
    pub fn conv2d(
        &mut self,
        store: &ParamStore<B>,
        x: Var,
        w: WeightId,
        bias: Option<WeightId>,
        geometry: ConvGeometry,
    ) -> Result<Var> {
        self.ready(x, "convolution")?;
        let xv = &self.values[x.0];
        let y = self.backend.conv2d(
            xv,
            store.conv_weight(w, xv.dtype())?,
            bias.map(|b| &store.weight(b).value),
            &geometry,
        )?;
        let out = self.push(y, true);
        self.rec(Node::Conv { x, w, bias, geometry, out });
        Ok(out)
    }

    /// A dataset-aware block `relu?(DSBN(conv(x)) + residual)` with each sample's dataset slice
    /// (one backend op, one tape node): batch statistics (moving the running ones) in training,
    /// the one-kernel inference block with the running statistics in evaluation. When `x` is a
    /// block output whose normalisation is pending, this block's convolution applies it.
    pub fn dab(&mut self, store: &mut ParamStore<B>, x: Var, datasets: Datasets, spec: &DabCall) -> Result<Var> {
        let dv = datasets.0;
        if let Some(r) = spec.residual {
            self.ready(r, "DAB residual")?;
        }
        let dtype = self.values[x.0].dtype();
        let prologue = self.pending[x.0];
        if !self.training {
            self.ready(x, "inference DAB")?;
            let opts = DabOptions {
                residual: spec.residual.map(|r| &self.values[r.0]),
                ..DabOptions::new(spec.geometry, spec.dsbn)
            };
            let input = DabInput {
                x: &self.values[x.0],
                weight: store.conv_weight(spec.weight, dtype)?,
                datasets: &self.values[dv.0],
            };
            let y = self.backend.dab_forward_infer(input, &store.bn(spec.bn).tables, &opts)?;
            return Ok(self.push(y, false));
        }
        if self.bn_synced() {
            // Per-dataset SyncBN: the collective sits between the statistics and the
            // normalisation, i.e. inside the fused op; run the unfused chain instead.
            let c = self.conv2d(store, x, spec.weight, None, spec.geometry)?;
            return self.dsbn(store, c, datasets, spec.bn, spec.residual, spec.dsbn);
        }
        // The convolution stages the prologue's tables in shared memory for a bounded number of
        // datasets; beyond it the block writes its output and the next one reads it plainly.
        let too_many = store.bn(spec.bn).num_datasets > crate::ops::conv::PROLOGUE_MAX_DATASETS;
        let materialize = !spec.defer || spec.residual.is_some() || too_many;
        let (weight, layer, prev) = store.dab_parts(spec.weight, dtype, spec.bn, prologue.map(|p| p.bn))?;
        let opts = DabOptions {
            geometry: spec.geometry,
            dsbn: spec.dsbn,
            prologue: match (prologue, prev) {
                (Some(p), Some(prev)) => Some(Prologue { bn: &prev.tables, stats: &self.stats[p.stats], relu: p.relu }),
                _ => None,
            },
            residual: spec.residual.map(|r| &self.values[r.0]),
            materialize,
            skip_input_grad: false,
        };
        let input = DabInput { x: &self.values[x.0], weight, datasets: &self.values[dv.0] };
        let f = self.backend.dab_forward_train(input, &mut layer.tables, &opts)?;
        Self::track(self.host_datasets[dv.0].as_ref(), &mut layer.batches_tracked);
        self.stats.push(f.stats);
        let stats = self.stats.len() - 1;
        let (value, conv_out) = match f.output {
            Some(y) => (y, Some(f.conv_out)),
            None => (f.conv_out, None),
        };
        let out = self.push(value, true);
        if conv_out.is_none() {
            self.pending[out.0] = Some(Pending { bn: spec.bn, stats, relu: spec.dsbn.relu });
        }
        self.rec(Node::Dab {
            x,
            w: spec.weight,
            datasets: dv,
            bn: spec.bn,
            stats,
            conv_out,
            prologue,
            residual: spec.residual,
            geometry: spec.geometry,
            dsbn: spec.dsbn,
            out,
        });
        Ok(out)
    }

    /// A standalone DSBN `relu?(DSBN(x) + residual)` (a DSBN after a convolution is better a
    /// [`Graph::dab`]): batch statistics in training, running statistics in evaluation.
    pub fn dsbn(
        &mut self,
        store: &mut ParamStore<B>,
        x: Var,
        datasets: Datasets,
        bn: BnId,
        residual: Option<Var>,
        opts: DsbnOptions,
    ) -> Result<Var> {
        self.ready(x, "DSBN")?;
        if let Some(r) = residual {
            self.ready(r, "DSBN residual")?;
        }
        let dv = datasets.0;
        let res = residual.map(|r| &self.values[r.0]);
        if !self.training {
            let y = self.backend.dsbn_forward_infer(
                &self.values[x.0],
                &self.values[dv.0],
                &store.bn(bn).tables,
                &opts,
                res,
            )?;
            return Ok(self.push(y, false));
        }
        let layer = store.bn_mut(bn);
        let sync = self.bn_sync.clone();
        let (y, saved) = match &sync {
            Some(comm) => {
                let mut reduce = sync::host_all_reduce(&self.backend, comm.as_ref());
                self.backend.dsbn_forward_train_synced(
                    &self.values[x.0],
                    &self.values[dv.0],
                    &mut layer.tables,
                    &opts,
                    res,
                    &mut reduce,
                )?
            }
            None => {
                self.backend.dsbn_forward_train(&self.values[x.0], &self.values[dv.0], &mut layer.tables, &opts, res)?
            }
        };
        Self::track(self.host_datasets[dv.0].as_ref(), &mut layer.batches_tracked);
        self.stats.push(saved);
        let stats = self.stats.len() - 1;
        let out = self.push(y, true);
        self.rec(Node::Dsbn { x, residual, datasets: dv, bn, stats, opts, out, synced: sync.is_some() });
        Ok(out)
    }

    /// PSPNet's pyramid pooling module as one op: per bin b, pool to b×b → the branch's DAB
    /// (1×1 convolution `branches[i].0`, DSBN layer `branches[i].1`) → bilinear upsampling into
    /// its channel slice of `[x, branches…]`. Training moves every branch's running statistics.
    pub fn ppm(
        &mut self,
        store: &mut ParamStore<B>,
        x: Var,
        datasets: Datasets,
        branches: &[(WeightId, BnId)],
        opts: &PpmOptions,
    ) -> Result<Var> {
        self.ready(x, "pyramid pooling module")?;
        let dv = datasets.0;
        let dtype = self.values[x.0].dtype();
        if !self.training {
            let mut refs = Vec::with_capacity(branches.len());
            for &(w, b) in branches {
                refs.push(PpmBranchRef { weight: store.conv_weight(w, dtype)?, bn: &store.bn(b).tables });
            }
            let y = self.backend.ppm_forward_infer(&self.values[x.0], &self.values[dv.0], &refs, opts)?;
            return Ok(self.push(y, false));
        }
        if self.bn_synced() {
            return self.ppm_unfused(store, x, datasets, branches, opts);
        }
        let (weights, layers) = store.branch_parts(branches, dtype)?;
        let mut views: Vec<PpmBranchMut<'_, B>> = Vec::with_capacity(branches.len());
        let mut counts = Vec::with_capacity(branches.len());
        for (weight, layer) in weights.into_iter().zip(layers) {
            views.push(PpmBranchMut { weight, bn: &mut layer.tables });
            counts.push(&mut layer.batches_tracked);
        }
        let (y, saved) = self.backend.ppm_forward_train(&self.values[x.0], &self.values[dv.0], &mut views, opts)?;
        for c in counts {
            Self::track(self.host_datasets[dv.0].as_ref(), c);
        }
        let out = self.push(y, true);
        self.rec(Node::Ppm { x, datasets: dv, branches: branches.to_vec(), saved, opts: opts.clone(), out });
        Ok(out)
    }

    /// `max(x, 0)`.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        self.ready(x, "ReLU")?;
        let y = self.backend.relu(&self.values[x.0])?;
        let out = self.push(y, true);
        self.rec(Node::Relu { out, x });
        Ok(out)
    }

    /// `a + b`.
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.ready(a, "add")?;
        self.ready(b, "add")?;
        let y = self.backend.add(&self.values[a.0], &self.values[b.0])?;
        let out = self.push(y, true);
        self.rec(Node::Add { a, b, out });
        Ok(out)
    }

    /// Max pooling.
    pub fn max_pool2d(&mut self, x: Var, geometry: PoolGeometry) -> Result<Var> {
        self.ready(x, "max pooling")?;
        let [_, h, w, _] = nhwc(&self.values[x.0], "max pooling input")?;
        let (y, indices) = self.backend.max_pool2d(&self.values[x.0], &geometry)?;
        let out = self.push(y, true);
        self.rec(Node::MaxPool { x, indices, input_hw: (h, w), geometry, out });
        Ok(out)
    }

    /// Adaptive average pooling to `out_h × out_w`.
    pub fn adaptive_avg_pool(&mut self, x: Var, out_h: usize, out_w: usize) -> Result<Var> {
        self.ready(x, "adaptive average pooling")?;
        let [_, h, w, _] = nhwc(&self.values[x.0], "pooling input")?;
        let y = self.backend.adaptive_avg_pool(&self.values[x.0], out_h, out_w)?;
        let out = self.push(y, true);
        self.rec(Node::AvgPool { x, input_hw: (h, w), out });
        Ok(out)
    }

    /// Bilinear resize to `out_h × out_w`.
    pub fn resize_bilinear(&mut self, x: Var, out_h: usize, out_w: usize, align_corners: bool) -> Result<Var> {
        self.ready(x, "bilinear resize")?;
        let [_, h, w, _] = nhwc(&self.values[x.0], "resize input")?;
        let y = self.backend.resize_bilinear(&self.values[x.0], out_h, out_w, align_corners)?;
        let out = self.push(y, true);
        self.rec(Node::Resize { x, input_hw: (h, w), align_corners, out });
        Ok(out)
    }

    /// Concatenation along channels.
    pub fn concat_channels(&mut self, parts: &[Var]) -> Result<Var> {
        let mut with_c = Vec::with_capacity(parts.len());
        for &p in parts {
            self.ready(p, "channel concatenation")?;
            with_c.push((p, nhwc(&self.values[p.0], "concat input")?[3]));
        }
        let refs: Vec<&B::Tensor> = parts.iter().map(|p| &self.values[p.0]).collect();
        let y = self.backend.concat_channels(&refs)?;
        let out = self.push(y, true);
        self.rec(Node::Concat { parts: with_c, out });
        Ok(out)
    }

    /// Dropout2d in training (the seed decides the mask); the identity in evaluation.
    pub fn dropout2d(&mut self, x: Var, opts: Dropout2dOptions) -> Result<Var> {
        self.ready(x, "dropout")?;
        if !self.training || opts.p == 0.0 {
            return Ok(x);
        }
        let y = self.backend.dropout2d(&self.values[x.0], &opts)?;
        let out = self.push(y, true);
        self.rec(Node::Dropout { x, opts, out });
        Ok(out)
    }

    /// `x` cut along the batch into consecutive parts of `sizes` samples (which must add up to
    /// its batch): each dataset's samples of a pass that ran several datasets at once.
    pub fn split_batch(&mut self, x: Var, sizes: &[usize]) -> Result<Vec<Var>> {
        self.ready(x, "batch split")?;
        let batch = self.values[x.0].shape().first().copied().unwrap_or(0);
        if sizes.is_empty() || sizes.contains(&0) || sizes.iter().sum::<usize>() != batch {
            return Err(Error::InvalidArgument(format!(
                "batch split into {sizes:?}: the parts must be non-empty and add up to the batch of {batch}"
            )));
        }
        let host = self.host_datasets[x.0].clone();
        let mut parts = Vec::with_capacity(sizes.len());
        let mut start = 0;
        for &len in sizes {
            let y = if sizes.len() == 1 {
                self.backend.try_clone(&self.values[x.0])?
            } else {
                self.backend.slice_batch(&self.values[x.0], start, len)?
            };
            let out = self.push(y, true);
            self.host_datasets[out.0] = host.as_ref().map(|h| {
                let per = h.len() / batch.max(1);
                h[start * per..(start + len) * per].to_vec()
            });
            parts.push((out, len));
            start += len;
        }
        self.rec(Node::SplitBatch { x, parts: parts.clone() });
        Ok(parts.into_iter().map(|(v, _)| v).collect())
    }

    /// Concatenation along the first axis.
    pub fn concat_batch(&mut self, parts: &[Var]) -> Result<Var> {
        for &p in parts {
            self.ready(p, "batch concatenation")?;
        }
        let with_n: Vec<(Var, usize)> =
            parts.iter().map(|&p| (p, self.values[p.0].shape().first().copied().unwrap_or(0))).collect();
        let refs: Vec<&B::Tensor> = parts.iter().map(|p| &self.values[p.0]).collect();
        let y = self.backend.concat_batch(&refs)?;
        let host =
            parts.iter().map(|p| self.host_datasets[p.0].clone()).collect::<Option<Vec<_>>>().map(|v| v.concat());
        let out = self.push(y, true);
        self.host_datasets[out.0] = host;
        self.rec(Node::ConcatBatch { parts: with_n, out });
        Ok(out)
    }

    /// Multi-head cross-entropy (mean over each dataset's valid pixels, weighted sum over
    /// datasets) as one op, with the logits' upsampling fused in when `spec.upsample` is set;
    /// returns the loss scalar (the weighted total), which stays on the backend until read.
    pub fn cross_entropy(&mut self, logits: Var, labels: Var, datasets: Var, spec: &LossSpec) -> Result<Scalar> {
        self.ready(logits, "cross-entropy")?;
        let with_grad = self.recording && self.needs_grad[logits.0] && spec.expected_grad.is_some();
        let opts = LossOptions {
            ce: CrossEntropyOptions { weights: spec.weights.clone(), grad_scale: spec.expected_grad.unwrap_or(1.0) },
            upsample: spec.upsample,
            with_grad,
        };
        let (loss, dlogits) = self.backend.cross_entropy(
            &self.values[logits.0],
            &self.values[labels.0],
            &self.values[datasets.0],
            &spec.num_classes,
            &opts,
        )?;
        self.losses.push(loss);
        let out = self.push_scalar(ScalarDef::Loss(self.losses.len() - 1));
        self.rec(Node::Loss {
            logits,
            labels,
            datasets,
            num_classes: spec.num_classes.clone(),
            weights: spec.weights.clone(),
            upsample: spec.upsample,
            pre: dlogits.map(|d| (opts.ce.grad_scale, d)),
            out,
        });
        Ok(out)
    }

    /// `Σ weight · term` (evaluated on the host when read).
    pub fn weighted_sum(&mut self, terms: &[(Scalar, f32)]) -> Scalar {
        let out = self.push_scalar(ScalarDef::Sum(terms.to_vec()));
        self.rec(Node::Sum { terms: terms.to_vec(), out });
        out
    }

    /// The losses tensor `[1 + D]` behind a loss scalar (total, per dataset), for reading
    /// together with other tensors; `None` for a sum.
    pub fn loss_tensor(&self, s: Scalar) -> Option<&B::Tensor> {
        match &self.scalars[s.0] {
            ScalarDef::Loss(i) => Some(&self.losses[*i]),
            ScalarDef::Sum(_) => None,
        }
    }

    /// The values of `scalars`, and of `extra` (f32 rank-1 tensors, e.g. an overflow flag)
    /// flattened in order, with ONE read from the backend: every loss tensor involved is
    /// gathered into one tensor first.
    pub fn read_scalars(&self, scalars: &[Scalar], extra: &[&B::Tensor]) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut used = vec![false; self.losses.len()];
        let mut stack: Vec<Scalar> = scalars.to_vec();
        while let Some(s) = stack.pop() {
            match &self.scalars[s.0] {
                ScalarDef::Loss(i) => used[*i] = true,
                ScalarDef::Sum(terms) => stack.extend(terms.iter().map(|t| t.0)),
            }
        }
        let mut parts: Vec<&B::Tensor> = Vec::new();
        let mut offset = vec![usize::MAX; self.losses.len()];
        let mut at = 0;
        for (i, l) in self.losses.iter().enumerate().filter(|(i, _)| used[*i]) {
            offset[i] = at;
            at += l.shape().iter().product::<usize>();
            parts.push(l);
        }
        let extra_start = at;
        parts.extend(extra.iter().copied());
        let host = match parts.len() {
            0 => Vec::new(),
            1 => self.backend.to_f32(parts[0])?,
            _ => self.backend.to_f32(&self.backend.concat_batch(&parts)?)?,
        };
        let mut values = Vec::with_capacity(scalars.len());
        for &s in scalars {
            values.push(self.eval_scalar(s, &host, &offset));
        }
        Ok((values, host[extra_start..].to_vec()))
    }

    fn eval_scalar(&self, s: Scalar, host: &[f32], offset: &[usize]) -> f32 {
        match &self.scalars[s.0] {
            ScalarDef::Loss(i) => host[offset[*i]],
            ScalarDef::Sum(terms) => {
                terms.iter().map(|&(t, w)| w as f64 * self.eval_scalar(t, host, offset) as f64).sum::<f64>() as f32
            }
        }
    }

    /// The value of one scalar (one read; a step reads its scalars together with
    /// [`Graph::read_scalars`]).
    pub fn scalar(&self, s: Scalar) -> Result<f32> {
        Ok(self.read_scalars(&[s], &[])?.0[0])
    }

    /// Every normalisation the tape recorded, in forward order (the tape is kept after the
    /// backward for this).
    pub fn norm_records(&self) -> Vec<NormRecord<'_, B>> {
        let mut out = Vec::new();
        for node in &self.tape {
            match node {
                Node::Dab { bn, stats, conv_out, residual, dsbn, datasets, out: o, .. } => out.push(NormRecord {
                    bn: *bn,
                    x: conv_out.as_ref().unwrap_or(&self.values[o.0]),
                    stats: &self.stats[*stats],
                    residual: residual.map(|r| &self.values[r.0]),
                    relu: dsbn.relu,
                    datasets: &self.values[datasets.0],
                }),
                Node::Dsbn { x, residual, datasets, bn, stats, opts, .. } => out.push(NormRecord {
                    bn: *bn,
                    x: &self.values[x.0],
                    stats: &self.stats[*stats],
                    residual: residual.map(|r| &self.values[r.0]),
                    relu: opts.relu,
                    datasets: &self.values[datasets.0],
                }),
                Node::Ppm { datasets, branches, saved, opts, .. } => {
                    for (&(_, bn), (x, stats)) in branches.iter().zip(saved.branch_records()) {
                        out.push(NormRecord {
                            bn,
                            x,
                            stats,
                            residual: None,
                            relu: opts.dsbn.relu,
                            datasets: &self.values[datasets.0],
                        });
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The storage type of a value (what the graph's convolutions read their weights in).
    pub fn dtype(&self, v: Var) -> DType {
        self.values[v.0].dtype()
    }
}
