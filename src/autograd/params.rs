//! Named parameters and DSBN layers, with their gradients and momentum buffers.
//!
//! A model registers every trainable tensor here once, under a PyTorch-style name; the graph
//! refers to them by id, collects their gradients in [`Graph::backward`](super::Graph), and
//! the optimiser updates them in place. DSBN layers are registered whole (γ, β and the running
//! statistics of every dataset), because a training forward moves their running statistics.
//!
//! **Mixed precision.** Parameters are f32 (the master weights the optimiser updates and
//! checkpoints save). With [`ParamStore::set_precision`] at f16 or bf16, every convolution
//! weight also gets a 16-bit copy ([`Weight::half`]) that the convolutions of a 16-bit graph
//! read; the SGD step rewrites it from the updated master in the same pass. DSBN tables, biases
//! and every gradient the optimiser reads stay f32.
//!
//! **Gradients** arrive per pass (a weight used by two forwards of a DAT step gets two
//! contributions, in the storage type of its graph) and are gathered at the end of the
//! backward ([`ParamStore::finish_grads`]) into one f32 gradient per tensor — unscaled by the
//! loss scale, and checked for overflow when asked — in one backend call.

use crate::backend::{Backend, BnTables, TensorLike};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Which learning rate a parameter gets: the pretrained-style backbone, or the freshly
/// initialised head (PSPNet trains the head at 10× the base rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// Backbone parameters (ResNet).
    Backbone,
    /// Head parameters (pyramid pooling, classifiers, auxiliary head).
    Head,
}

/// Handle of a plain weight (convolution weight or bias) in a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightId(pub(crate) usize);

/// Handle of a DSBN layer in a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BnId(pub(crate) usize);

/// A weight tensor with its gradient and momentum buffer.
#[derive(Debug)]
pub struct Weight<B: Backend> {
    /// PyTorch-style name (`layer1.0.conv1.weight`).
    pub name: String,
    /// The value (convolution weights KRSC, biases `[K]`).
    pub value: B::Tensor,
    /// The f16 / bf16 copy the convolutions read in mixed precision (4-D weights only).
    pub half: Option<B::Tensor>,
    /// Accumulated gradient (f32) since the last [`ParamStore::zero_grad`]; `None` = zero.
    pub grad: Option<B::Tensor>,
    /// Gradient contributions of the running backward, not yet gathered into `grad`.
    pub(crate) grad_parts: Vec<B::Tensor>,
    /// SGD momentum buffer, created by the first step.
    pub momentum: Option<B::Tensor>,
    /// Its learning-rate group.
    pub group: Group,
    /// True when the weight belongs to one dataset only (a dataset's classifier head).
    pub dataset: Option<usize>,
}

/// A DSBN layer: per-dataset γ, β, running μ and σ², their gradients and momentum buffers.
#[derive(Debug)]
pub struct BnLayer<B: Backend> {
    /// Name prefix (`layer1.0.bn1`); tensors are saved as `{name}.bn.{d}.weight` etc.
    pub name: String,
    /// γ, β, running mean, running variance, each `[D, C]`.
    pub tables: B::Bn,
    /// Accumulated dγ (`[D, C]`), `None` = zero.
    pub grad_gamma: Option<B::Tensor>,
    /// Accumulated dβ.
    pub grad_beta: Option<B::Tensor>,
    /// (dγ, dβ) contributions of the running backward, not yet gathered.
    pub(crate) grad_parts: Vec<(B::Tensor, B::Tensor)>,
    /// Momentum buffer of γ.
    pub momentum_gamma: Option<B::Tensor>,
    /// Momentum buffer of β.
    pub momentum_beta: Option<B::Tensor>,
    /// Training forwards that saw each dataset (PyTorch's `num_batches_tracked`).
    pub batches_tracked: Vec<i64>,
    /// Its learning-rate group.
    pub group: Group,
    /// Number of datasets D.
    pub num_datasets: usize,
    /// Number of channels C.
    pub channels: usize,
}

/// Every parameter of a model.
#[derive(Debug)]
pub struct ParamStore<B: Backend> {
    backend: B,
    pub(crate) weights: Vec<Weight<B>>,
    pub(crate) bns: Vec<BnLayer<B>>,
    precision: DType,
    /// Masters were handed out writable since the copies were last made.
    copies_stale: bool,
}

impl<B: Backend> ParamStore<B> {
    /// An empty store on `backend`.
    pub fn new(backend: B) -> Self {
        ParamStore { backend, weights: Vec::new(), bns: Vec::new(), precision: DType::F32, copies_stale: false }
    }

    /// The backend its tensors live on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        if self.weights.iter().any(|w| w.name == name) || self.bns.iter().any(|b| b.name == name) {
            return Err(Error::InvalidArgument(format!("parameter name {name} registered twice")));
        }
        Ok(())
    }

    /// Registers a weight with the given host values.
    pub fn add_weight(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f32],
        group: Group,
        dataset: Option<usize>,
    ) -> Result<WeightId> {
        let name = name.into();
        self.check_new_name(&name)?;
        let value = self.backend.tensor_f32(shape, data)?;
        let half = match (self.precision, shape.len()) {
            (DType::F16 | DType::BF16, 4) => Some(self.backend.tensor_float(shape, data, self.precision)?),
            _ => None,
        };
        self.weights.push(Weight {
            name,
            value,
            half,
            grad: None,
            grad_parts: Vec::new(),
            momentum: None,
            group,
            dataset,
        });
        Ok(WeightId(self.weights.len() - 1))
    }

    /// Registers a DSBN layer in PyTorch's initial state (γ = 1, β = 0, μ = 0, σ² = 1).
    pub fn add_bn(
        &mut self,
        name: impl Into<String>,
        num_datasets: usize,
        channels: usize,
        group: Group,
    ) -> Result<BnId> {
        let name = name.into();
        self.check_new_name(&name)?;
        let tables = self.backend.bn_new(num_datasets, channels)?;
        self.bns.push(BnLayer {
            name,
            tables,
            grad_gamma: None,
            grad_beta: None,
            grad_parts: Vec::new(),
            momentum_gamma: None,
            momentum_beta: None,
            batches_tracked: vec![0; num_datasets],
            group,
            num_datasets,
            channels,
        });
        Ok(BnId(self.bns.len() - 1))
    }

    /// The weight behind an id.
    pub fn weight(&self, id: WeightId) -> &Weight<B> {
        &self.weights[id.0]
    }

    /// The storage type of the convolution weights' copies (f32: no copies).
    pub fn precision(&self) -> DType {
        self.precision
    }

    /// Keeps a 16-bit copy of every convolution weight for graphs in `precision` (f16 or
    /// bf16), or drops the copies (f32). The copies are rounded from the f32 masters.
    pub fn set_precision(&mut self, precision: DType) -> Result<()> {
        if !precision.is_float() {
            return Err(Error::UnsupportedDType { what: "parameter precision", dtype: precision });
        }
        self.precision = precision;
        self.refresh_copies()
    }

    /// Rewrites every 16-bit copy from its master (after the masters were written from the
    /// host, e.g. by a checkpoint load); a no-op when nothing was handed out writable since.
    pub fn sync_copies(&mut self) -> Result<()> {
        if self.copies_stale {
            self.refresh_copies()?;
        }
        Ok(())
    }

    fn refresh_copies(&mut self) -> Result<()> {
        let (be, dtype) = (self.backend.clone(), self.precision);
        for w in &mut self.weights {
            w.half = match (dtype, w.value.shape().len()) {
                (DType::F16 | DType::BF16, 4) => {
                    Some(be.tensor_float(w.value.shape(), &be.to_f32(&w.value)?, dtype)?)
                }
                _ => None,
            };
        }
        self.copies_stale = false;
        Ok(())
    }

    /// The tensor a convolution of a graph in storage `dtype` reads for weight `id`: the master
    /// in f32, the 16-bit copy in the store's precision (`DTypeMismatch` otherwise).
    pub fn conv_weight(&self, id: WeightId, dtype: DType) -> Result<&B::Tensor> {
        let w = &self.weights[id.0];
        match &w.half {
            Some(h) if h.dtype() == dtype => Ok(h),
            _ if dtype == DType::F32 => Ok(&w.value),
            _ => Err(Error::DTypeMismatch { what: "convolution weight copy", expected: dtype, got: self.precision }),
        }
    }

    /// The pieces one DAB step needs at once: the convolution weight for storage `dtype`, the
    /// block's DSBN layer (writable: its running statistics move) and, for a prologue, the
    /// previous block's layer.
    #[allow(clippy::type_complexity)]
    pub(crate) fn dab_parts(
        &mut self,
        weight: WeightId,
        dtype: DType,
        bn: BnId,
        prev: Option<BnId>,
    ) -> Result<(&B::Tensor, &mut BnLayer<B>, Option<&BnLayer<B>>)> {
        if prev == Some(bn) {
            return Err(Error::InvalidArgument("a block cannot take its own normalisation as its prologue".into()));
        }
        let w = {
            let wt = &self.weights[weight.0];
            match &wt.half {
                Some(h) if h.dtype() == dtype => h,
                _ if dtype == DType::F32 => &wt.value,
                _ => {
                    return Err(Error::DTypeMismatch {
                        what: "convolution weight copy",
                        expected: dtype,
                        got: self.precision,
                    })
                }
            }
        };
        let (layer, other) = match prev {
            None => (&mut self.bns[bn.0], None),
            Some(p) if p.0 < bn.0 => {
                let (lo, hi) = self.bns.split_at_mut(bn.0);
                (&mut hi[0], Some(&lo[p.0]))
            }
            Some(p) => {
                let (lo, hi) = self.bns.split_at_mut(p.0);
                (&mut lo[bn.0], Some(&hi[0]))
            }
        };
        Ok((w, layer, other))
    }

    /// Convolution weights (storage `dtype`) and writable DSBN layers of several blocks at once
    /// (a pyramid pooling module's branches), in the order given.
    #[allow(clippy::type_complexity)]
    pub(crate) fn branch_parts(
        &mut self,
        ids: &[(WeightId, BnId)],
        dtype: DType,
    ) -> Result<(Vec<&B::Tensor>, Vec<&mut BnLayer<B>>)> {
        let mut weights = Vec::with_capacity(ids.len());
        for &(w, _) in ids {
            let wt = &self.weights[w.0];
            weights.push(match &wt.half {
                Some(h) if h.dtype() == dtype => h,
                _ if dtype == DType::F32 => &wt.value,
                _ => {
                    return Err(Error::DTypeMismatch {
                        what: "convolution weight copy",
                        expected: dtype,
                        got: self.precision,
                    })
                }
            });
        }
        let mut slots: Vec<Option<&mut BnLayer<B>>> = ids.iter().map(|_| None).collect();
        for (i, layer) in self.bns.iter_mut().enumerate() {
            let mut hits = ids.iter().enumerate().filter(|(_, (_, b))| b.0 == i);
            if let Some((k, _)) = hits.next() {
                if hits.next().is_some() {
                    return Err(Error::InvalidArgument("two branches share one DSBN layer".into()));
                }
                slots[k] = Some(layer);
            }
        }
        Ok((weights, slots.into_iter().flatten().collect()))
    }

    /// The DSBN layer behind an id.
    pub fn bn(&self, id: BnId) -> &BnLayer<B> {
        &self.bns[id.0]
    }

    pub(crate) fn bn_mut(&mut self, id: BnId) -> &mut BnLayer<B> {
        &mut self.bns[id.0]
    }

    /// Every weight, in registration order.
    pub fn weights(&self) -> &[Weight<B>] {
        &self.weights
    }

    /// Every DSBN layer, in registration order.
    pub fn bn_layers(&self) -> &[BnLayer<B>] {
        &self.bns
    }

    /// Mutable access for loading checkpoints. The 16-bit copies are rewritten from the
    /// masters before the next graph reads them ([`ParamStore::sync_copies`]).
    pub fn weights_mut(&mut self) -> &mut [Weight<B>] {
        self.copies_stale = self.precision != DType::F32;
        &mut self.weights
    }

    /// Mutable access for loading checkpoints.
    pub fn bn_layers_mut(&mut self) -> &mut [BnLayer<B>] {
        &mut self.bns
    }

    /// Weights and DSBN layers at once (the optimiser updates both, copies included, in one
    /// launch). Unlike [`ParamStore::weights_mut`] this does not mark the 16-bit copies stale:
    /// whoever writes a master through it keeps its copy in step.
    pub fn parts_mut(&mut self) -> (&mut [Weight<B>], &mut [BnLayer<B>]) {
        (&mut self.weights, &mut self.bns)
    }

    /// Number of trainable scalars (weights, biases, γ and β of every dataset).
    pub fn num_parameters(&self) -> usize {
        let w: usize =
            self.weights.iter().map(|w| crate::backend::TensorLike::shape(&w.value).iter().product::<usize>()).sum();
        let b: usize = self.bns.iter().map(|b| 2 * b.num_datasets * b.channels).sum();
        w + b
    }

    /// Forgets every accumulated gradient.
    pub fn zero_grad(&mut self) {
        for w in &mut self.weights {
            w.grad = None;
            w.grad_parts.clear();
        }
        for b in &mut self.bns {
            b.grad_gamma = None;
            b.grad_beta = None;
            b.grad_parts.clear();
        }
    }

    pub(crate) fn push_weight_grad(&mut self, id: WeightId, g: B::Tensor) {
        self.weights[id.0].grad_parts.push(g);
    }

    pub(crate) fn push_bn_grad(&mut self, id: BnId, dgamma: B::Tensor, dbeta: B::Tensor) {
        self.bns[id.0].grad_parts.push((dgamma, dbeta));
    }

    /// Gathers every gradient contribution of the backward just run into one f32 gradient per
    /// tensor, times `scale` (the inverse of the loss scale), added to what earlier backwards
    /// left. One backend call ([`Backend::sum_scaled`]) covers every tensor that needs work: a
    /// single f32 contribution at scale 1 is taken as it is. With `check_finite`, every tensor
    /// goes through that call and its overflow flag is returned (f32 `[1]`, 1 = some gradient
    /// was infinite or NaN: the loss scale was too large).
    pub fn finish_grads(&mut self, scale: f32, check_finite: bool) -> Result<Option<B::Tensor>> {
        let be = self.backend.clone();
        let direct = |parts: &Vec<B::Tensor>| {
            !check_finite && scale == 1.0 && parts.len() == 1 && parts[0].dtype() == DType::F32
        };
        // Slots: (weight index or BN (index, γ/β)), in a fixed order.
        let mut slots: Vec<(usize, usize)> = Vec::new();
        let mut groups: Vec<Vec<&B::Tensor>> = Vec::new();
        for (i, w) in self.weights.iter().enumerate() {
            if !w.grad_parts.is_empty() && !direct(&w.grad_parts) {
                slots.push((i, 2));
                groups.push(w.grad_parts.iter().collect());
            }
        }
        for (i, l) in self.bns.iter().enumerate() {
            if l.grad_parts.is_empty() {
                continue;
            }
            let (gs, bs): (Vec<&B::Tensor>, Vec<&B::Tensor>) = l.grad_parts.iter().map(|(g, b)| (g, b)).unzip();
            let need = check_finite || scale != 1.0 || gs.len() != 1;
            if need {
                slots.push((i, 0));
                groups.push(gs);
                slots.push((i, 1));
                groups.push(bs);
            }
        }
        let (sums, flag) = if groups.is_empty() {
            (Vec::new(), None)
        } else {
            let refs: Vec<&[&B::Tensor]> = groups.iter().map(Vec::as_slice).collect();
            let (sums, flag) = be.sum_scaled(&refs, scale)?;
            (sums, Some(flag))
        };
        drop(groups);
        let mut sums = sums.into_iter();
        let mut fresh_w: Vec<Option<B::Tensor>> = self.weights.iter().map(|_| None).collect();
        let mut fresh_b: Vec<[Option<B::Tensor>; 2]> = self.bns.iter().map(|_| [None, None]).collect();
        for &(i, which) in &slots {
            let t = sums.next().ok_or_else(|| Error::InvalidArgument("gradient sum count".into()))?;
            match which {
                2 => fresh_w[i] = Some(t),
                k => fresh_b[i][k] = Some(t),
            }
        }
        for (w, fresh) in self.weights.iter_mut().zip(fresh_w) {
            let g = match fresh {
                Some(t) => t,
                None if w.grad_parts.is_empty() => continue,
                None => w.grad_parts.pop().expect("one part"),
            };
            w.grad_parts.clear();
            w.grad = Some(match w.grad.take() {
                None => g,
                Some(prev) => be.add(&prev, &g)?,
            });
        }
        for (l, [fg, fb]) in self.bns.iter_mut().zip(fresh_b) {
            let (g, b) = match (fg, fb) {
                (Some(g), Some(b)) => (g, b),
                _ if l.grad_parts.is_empty() => continue,
                _ => l.grad_parts.pop().expect("one part"),
            };
            l.grad_parts.clear();
            l.grad_gamma = Some(match l.grad_gamma.take() {
                None => g,
                Some(prev) => be.add(&prev, &g)?,
            });
            l.grad_beta = Some(match l.grad_beta.take() {
                None => b,
                Some(prev) => be.add(&prev, &b)?,
            });
        }
        // Without the check not every tensor went through the call: its flag covers only some.
        Ok(flag.filter(|_| check_finite))
    }

    /// Reads γ, β, running mean and running variance of a DSBN layer back to the host.
    pub fn bn_tables_host(&self, id: BnId) -> Result<[Vec<f32>; 4]> {
        let [g, b, m, v] = self.bns[id.0].tables.tables();
        Ok([self.backend.to_f32(g)?, self.backend.to_f32(b)?, self.backend.to_f32(m)?, self.backend.to_f32(v)?])
    }
}
