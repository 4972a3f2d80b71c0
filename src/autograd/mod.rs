//! A minimal tape-based autograd over the [`Backend`] ops.
//!
//! A [`Graph`] lives for one training step (or one evaluation). Each op computes its output on
//! the backend at once and, when recording, pushes a tape node holding what its backward needs
//! (input values, the DSBN statistics it saved, max-pool indices). [`Graph::backward`] walks
//! the tape in reverse: every tensor's gradient is the sum, in tape order, of what its
//! consumers send it (a tensor used twice — a residual, a shared input — gets both), and
//! parameter gradients are accumulated into the [`ParamStore`], across every forward of the
//! step (Dataset Alternation Training runs one forward per dataset and ONE backward).
//!
//! Parameters are not graph values: ops take a [`WeightId`] / [`BnId`] and read the store.
//! Losses are host scalars ([`Scalar`]); a weighted sum of losses is the usual root.
//!
//! Modes: `training` picks batch statistics (and moves running statistics) in DSBN and turns
//! dropout on; [`Graph::set_recording`]`(false)` is PyTorch's `no_grad`. An evaluation graph
//! (`training == false`) records nothing: frozen-statistics BN has no backward here.

mod params;

pub use params::{BnId, BnLayer, Group, ParamStore, Weight, WeightId};

use crate::backend::{Backend, TensorLike};
use crate::error::{Error, Result};
use crate::ops::conv::ConvGeometry;
use crate::ops::cross_entropy::{CrossEntropyLoss, CrossEntropyOptions};
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::DsbnOptions;
use crate::ops::maxpool::PoolGeometry;

/// A tensor value of a [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Var(usize);

/// A host scalar of a [`Graph`] (a loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scalar(usize);

/// Dataset indices of a batch: the device tensor the kernels read and the host copy the graph
/// needs (which datasets are present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datasets(Var);

enum Node<B: Backend> {
    Conv {
        x: Var,
        w: WeightId,
        bias: Option<WeightId>,
        geometry: ConvGeometry,
        out: Var,
    },
    Dsbn {
        x: Var,
        residual: Option<Var>,
        datasets: Var,
        bn: BnId,
        saved: B::BnSaved,
        opts: DsbnOptions,
        out: Var,
    },
    Relu {
        out: Var,
        x: Var,
    },
    Add {
        a: Var,
        b: Var,
        out: Var,
    },
    MaxPool {
        x: Var,
        indices: B::Tensor,
        input_hw: (usize, usize),
        geometry: PoolGeometry,
        out: Var,
    },
    AvgPool {
        x: Var,
        input_hw: (usize, usize),
        out: Var,
    },
    Resize {
        x: Var,
        input_hw: (usize, usize),
        align_corners: bool,
        out: Var,
    },
    Concat {
        parts: Vec<(Var, usize)>,
        out: Var,
    },
    Dropout {
        x: Var,
        opts: Dropout2dOptions,
        out: Var,
    },
    SliceBatch {
        x: Var,
        start: usize,
        len: usize,
        out: Var,
    },
    ConcatBatch {
        parts: Vec<(Var, usize)>,
        out: Var,
    },
    CrossEntropy {
        logits: Var,
        labels: Var,
        datasets: Var,
        num_classes: Vec<usize>,
        weights: Option<Vec<f32>>,
        out: Scalar,
    },
    Sum {
        terms: Vec<(Scalar, f32)>,
        out: Scalar,
    },
}

/// One step's values and tape.
pub struct Graph<B: Backend> {
    backend: B,
    training: bool,
    recording: bool,
    values: Vec<B::Tensor>,
    needs_grad: Vec<bool>,
    host_datasets: Vec<Option<Vec<i32>>>,
    scalars: Vec<f32>,
    tape: Vec<Node<B>>,
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
            scalars: Vec::new(),
            tape: Vec::new(),
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
        Var(self.values.len() - 1)
    }

    fn push_scalar(&mut self, v: f32) -> Scalar {
        self.scalars.push(v);
        Scalar(self.scalars.len() - 1)
    }

    /// The value of a variable.
    pub fn value(&self, v: Var) -> &B::Tensor {
        &self.values[v.0]
    }

    /// The value of a scalar.
    pub fn scalar(&self, s: Scalar) -> f32 {
        self.scalars[s.0]
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

    /// `conv2d(x, w) + bias` with a weight (and bias) of the store.
    pub fn conv2d(
        &mut self,
        store: &ParamStore<B>,
        x: Var,
        w: WeightId,
        bias: Option<WeightId>,
        geometry: ConvGeometry,
    ) -> Result<Var> {
        let y = self.backend.conv2d(
            &self.values[x.0],
            &store.weight(w).value,
            bias.map(|b| &store.weight(b).value),
            &geometry,
        )?;
        let out = self.push(y, true);
        self.rec(Node::Conv { x, w, bias, geometry, out });
        Ok(out)
    }

    /// `relu?(DSBN(x) + residual)` with each sample's dataset slice: batch statistics (moving
    /// the running ones) in training, running statistics in evaluation.
    pub fn dsbn(
        &mut self,
        store: &mut ParamStore<B>,
        x: Var,
        datasets: Datasets,
        bn: BnId,
        residual: Option<Var>,
        opts: DsbnOptions,
    ) -> Result<Var> {
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
        let (y, saved) =
            self.backend.dsbn_forward_train(&self.values[x.0], &self.values[dv.0], &mut layer.tables, &opts, res)?;
        if let Some(host) = &self.host_datasets[dv.0] {
            let mut seen = vec![false; layer.num_datasets];
            for &d in host {
                if let Some(s) = seen.get_mut(d as usize) {
                    *s = true;
                }
            }
            for (count, present) in layer.batches_tracked.iter_mut().zip(seen) {
                *count += present as i64;
            }
        }
        let out = self.push(y, true);
        self.rec(Node::Dsbn { x, residual, datasets: dv, bn, saved, opts, out });
        Ok(out)
    }

    /// `max(x, 0)`.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        let y = self.backend.relu(&self.values[x.0])?;
        let out = self.push(y, true);
        self.rec(Node::Relu { out, x });
        Ok(out)
    }

    /// `a + b`.
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = self.backend.add(&self.values[a.0], &self.values[b.0])?;
        let out = self.push(y, true);
        self.rec(Node::Add { a, b, out });
        Ok(out)
    }

    /// Max pooling.
    pub fn max_pool2d(&mut self, x: Var, geometry: PoolGeometry) -> Result<Var> {
        let [_, h, w, _] = nhwc(&self.values[x.0], "max pooling input")?;
        let (y, indices) = self.backend.max_pool2d(&self.values[x.0], &geometry)?;
        let out = self.push(y, true);
        self.rec(Node::MaxPool { x, indices, input_hw: (h, w), geometry, out });
        Ok(out)
    }

    /// Adaptive average pooling to `out_h × out_w`.
    pub fn adaptive_avg_pool(&mut self, x: Var, out_h: usize, out_w: usize) -> Result<Var> {
        let [_, h, w, _] = nhwc(&self.values[x.0], "pooling input")?;
        let y = self.backend.adaptive_avg_pool(&self.values[x.0], out_h, out_w)?;
        let out = self.push(y, true);
        self.rec(Node::AvgPool { x, input_hw: (h, w), out });
        Ok(out)
    }

    /// Bilinear resize to `out_h × out_w`.
    pub fn resize_bilinear(&mut self, x: Var, out_h: usize, out_w: usize, align_corners: bool) -> Result<Var> {
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
        if !self.training || opts.p == 0.0 {
            return Ok(x);
        }
        let y = self.backend.dropout2d(&self.values[x.0], &opts)?;
        let out = self.push(y, true);
        self.rec(Node::Dropout { x, opts, out });
        Ok(out)
    }

    /// Samples `start .. start + len` of `x`.
    pub fn slice_batch(&mut self, x: Var, start: usize, len: usize) -> Result<Var> {
        let y = self.backend.slice_batch(&self.values[x.0], start, len)?;
        let host = self.host_datasets[x.0].as_ref().map(|h| {
            let per = h.len() / self.values[x.0].shape().first().copied().unwrap_or(1).max(1);
            h[start * per..(start + len) * per].to_vec()
        });
        let out = self.push(y, true);
        self.host_datasets[out.0] = host;
        self.rec(Node::SliceBatch { x, start, len, out });
        Ok(out)
    }

    /// Concatenation along the first axis.
    pub fn concat_batch(&mut self, parts: &[Var]) -> Result<Var> {
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
    /// datasets); returns the loss scalar and the per-dataset values.
    pub fn cross_entropy(
        &mut self,
        logits: Var,
        labels: Var,
        datasets: Var,
        num_classes: &[usize],
        weights: Option<Vec<f32>>,
    ) -> Result<(Scalar, CrossEntropyLoss)> {
        let opts = CrossEntropyOptions { weights: weights.clone(), grad_scale: 1.0 };
        let (loss, _) = self.backend.cross_entropy(
            &self.values[logits.0],
            &self.values[labels.0],
            &self.values[datasets.0],
            num_classes,
            &opts,
            false,
        )?;
        let out = self.push_scalar(loss.total);
        self.rec(Node::CrossEntropy { logits, labels, datasets, num_classes: num_classes.to_vec(), weights, out });
        Ok((out, loss))
    }

    /// `Σ weight · term`.
    pub fn weighted_sum(&mut self, terms: &[(Scalar, f32)]) -> Scalar {
        let v = terms.iter().map(|&(s, w)| w as f64 * self.scalars[s.0] as f64).sum::<f64>() as f32;
        let out = self.push_scalar(v);
        self.rec(Node::Sum { terms: terms.to_vec(), out });
        out
    }

    /// Runs the tape backwards from `root` (seeded with gradient 1), accumulating parameter
    /// gradients into `store` and returning the gradients of the inputs registered with
    /// [`Graph::input_with_grad`] (by `Var`), in ascending order. The tape is consumed.
    pub fn backward(&mut self, root: Scalar, store: &mut ParamStore<B>) -> Result<Vec<(Var, B::Tensor)>> {
        if !self.recording && self.tape.is_empty() {
            return Err(Error::InvalidArgument("backward on a graph that recorded nothing".into()));
        }
        let b = self.backend.clone();
        let mut grads: Vec<Option<B::Tensor>> = (0..self.values.len()).map(|_| None).collect();
        let mut sgrads = vec![0.0f32; self.scalars.len()];
        sgrads[root.0] = 1.0;
        let needs = self.needs_grad.clone();
        let acc = |grads: &mut Vec<Option<B::Tensor>>, v: Var, g: B::Tensor| -> Result<()> {
            if !needs[v.0] {
                return Ok(());
            }
            grads[v.0] = Some(match grads[v.0].take() {
                None => g,
                Some(prev) => b.add(&prev, &g)?,
            });
            Ok(())
        };
        let tape = std::mem::take(&mut self.tape);
        for node in tape.into_iter().rev() {
            match node {
                Node::Sum { terms, out } => {
                    let g = sgrads[out.0];
                    for (s, w) in terms {
                        sgrads[s.0] += g * w;
                    }
                }
                Node::CrossEntropy { logits, labels, datasets, num_classes, weights, out } => {
                    let g = sgrads[out.0];
                    if g == 0.0 || !needs[logits.0] {
                        continue;
                    }
                    let opts = CrossEntropyOptions { weights, grad_scale: g };
                    let (_, d) = b.cross_entropy(
                        &self.values[logits.0],
                        &self.values[labels.0],
                        &self.values[datasets.0],
                        &num_classes,
                        &opts,
                        true,
                    )?;
                    let d = d.ok_or_else(|| Error::InvalidArgument("backend returned no dlogits".into()))?;
                    acc(&mut grads, logits, d)?;
                }
                Node::Conv { x, w, bias, geometry, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let wt = &store.weight(w).value;
                    let [k, r, s, _] = nhwc(wt, "convolution weight")?;
                    if needs[x.0] {
                        let [_, h, wd, _] = nhwc(&self.values[x.0], "convolution input")?;
                        let dx = b.conv2d_backward_data(&dy, wt, (h, wd), &geometry)?;
                        acc(&mut grads, x, dx)?;
                    }
                    let (dw, db) =
                        b.conv2d_backward_filter(&dy, &self.values[x.0], (k, r, s), bias.is_some(), &geometry)?;
                    store.accumulate_weight_grad(w, dw)?;
                    if let (Some(bid), Some(db)) = (bias, db) {
                        store.accumulate_weight_grad(bid, db)?;
                    }
                }
                Node::Dsbn { x, residual, datasets, bn, saved, opts, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let g = b.dsbn_backward_train(
                        &dy,
                        &self.values[x.0],
                        residual.map(|r| &self.values[r.0]),
                        &self.values[datasets.0],
                        &store.bn(bn).tables,
                        &saved,
                        &opts,
                    )?;
                    acc(&mut grads, x, g.dx)?;
                    if let (Some(r), Some(dr)) = (residual, g.dresidual) {
                        acc(&mut grads, r, dr)?;
                    }
                    store.accumulate_bn_grad(bn, g.dgamma, g.dbeta)?;
                }
                Node::Relu { out, x } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let dx = b.relu_backward(&dy, &self.values[out.0])?;
                    acc(&mut grads, x, dx)?;
                }
                Node::Add { a, b: bv, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if needs[a.0] && needs[bv.0] {
                        let copy = b.try_clone(&dy)?;
                        acc(&mut grads, a, copy)?;
                        acc(&mut grads, bv, dy)?;
                    } else if needs[a.0] {
                        acc(&mut grads, a, dy)?;
                    } else {
                        acc(&mut grads, bv, dy)?;
                    }
                }
                Node::MaxPool { x, indices, input_hw, geometry, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if needs[x.0] {
                        let dx = b.max_pool2d_backward(&dy, &indices, input_hw, &geometry)?;
                        acc(&mut grads, x, dx)?;
                    }
                }
                Node::AvgPool { x, input_hw, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if needs[x.0] {
                        let dx = b.adaptive_avg_pool_backward(&dy, input_hw)?;
                        acc(&mut grads, x, dx)?;
                    }
                }
                Node::Resize { x, input_hw, align_corners, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if needs[x.0] {
                        let dx = b.resize_bilinear_backward(&dy, input_hw, align_corners)?;
                        acc(&mut grads, x, dx)?;
                    }
                }
                Node::Concat { parts, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let mut offset = 0;
                    for (p, c) in parts {
                        if needs[p.0] {
                            let dp = b.slice_channels(&dy, offset, c)?;
                            acc(&mut grads, p, dp)?;
                        }
                        offset += c;
                    }
                }
                Node::Dropout { x, opts, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let dx = b.dropout2d_backward(&dy, &opts)?;
                    acc(&mut grads, x, dx)?;
                }
                Node::SliceBatch { x, start, len, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    if !needs[x.0] {
                        continue;
                    }
                    let full = self.values[x.0].shape().to_vec();
                    let mut pieces = Vec::new();
                    if start > 0 {
                        let mut s = full.clone();
                        s[0] = start;
                        pieces.push(b.zeros(&s)?);
                    }
                    let after = full[0] - start - len;
                    let tail = if after > 0 {
                        let mut s = full.clone();
                        s[0] = after;
                        Some(b.zeros(&s)?)
                    } else {
                        None
                    };
                    let mut refs: Vec<&B::Tensor> = pieces.iter().collect();
                    refs.push(&dy);
                    if let Some(t) = &tail {
                        refs.push(t);
                    }
                    let dx = b.concat_batch(&refs)?;
                    acc(&mut grads, x, dx)?;
                }
                Node::ConcatBatch { parts, out } => {
                    let Some(dy) = grads[out.0].take() else { continue };
                    let mut start = 0;
                    for (p, n) in parts {
                        if needs[p.0] {
                            let dp = b.slice_batch(&dy, start, n)?;
                            acc(&mut grads, p, dp)?;
                        }
                        start += n;
                    }
                }
            }
        }
        let mut inputs = Vec::new();
        for (i, g) in grads.into_iter().enumerate() {
            if let Some(g) = g {
                inputs.push((Var(i), g));
            }
        }
        Ok(inputs)
    }
}
