//! Named parameters and DSBN layers, with their gradients and momentum buffers.
//!
//! A model registers every trainable tensor here once, under a PyTorch-style name; the graph
//! refers to them by id, accumulates their gradients in [`Graph::backward`](super::Graph), and
//! the optimiser updates them in place. DSBN layers are registered whole (γ, β and the running
//! statistics of every dataset), because a training forward moves their running statistics.

use crate::backend::{Backend, BnTables};
use crate::error::{Error, Result};

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
    /// Accumulated gradient since the last [`ParamStore::zero_grad`]; `None` = zero.
    pub grad: Option<B::Tensor>,
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
}

impl<B: Backend> ParamStore<B> {
    /// An empty store on `backend`.
    pub fn new(backend: B) -> Self {
        ParamStore { backend, weights: Vec::new(), bns: Vec::new() }
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
        self.weights.push(Weight { name, value, grad: None, momentum: None, group, dataset });
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

    /// Mutable access for loading checkpoints.
    pub fn weights_mut(&mut self) -> &mut [Weight<B>] {
        &mut self.weights
    }

    /// Mutable access for loading checkpoints.
    pub fn bn_layers_mut(&mut self) -> &mut [BnLayer<B>] {
        &mut self.bns
    }

    /// Weights and DSBN layers at once (the optimiser updates both in one launch).
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
        }
        for b in &mut self.bns {
            b.grad_gamma = None;
            b.grad_beta = None;
        }
    }

    pub(crate) fn accumulate_weight_grad(&mut self, id: WeightId, g: B::Tensor) -> Result<()> {
        let slot = &mut self.weights[id.0].grad;
        *slot = Some(match slot.take() {
            None => g,
            Some(prev) => self.backend.add(&prev, &g)?,
        });
        Ok(())
    }

    pub(crate) fn accumulate_bn_grad(&mut self, id: BnId, dgamma: B::Tensor, dbeta: B::Tensor) -> Result<()> {
        let layer = &mut self.bns[id.0];
        layer.grad_gamma = Some(match layer.grad_gamma.take() {
            None => dgamma,
            Some(prev) => self.backend.add(&prev, &dgamma)?,
        });
        layer.grad_beta = Some(match layer.grad_beta.take() {
            None => dbeta,
            Some(prev) => self.backend.add(&prev, &dbeta)?,
        });
        Ok(())
    }

    /// Reads γ, β, running mean and running variance of a DSBN layer back to the host.
    pub fn bn_tables_host(&self, id: BnId) -> Result<[Vec<f32>; 4]> {
        let [g, b, m, v] = self.bns[id.0].tables.tables();
        Ok([self.backend.to_f32(g)?, self.backend.to_f32(b)?, self.backend.to_f32(m)?, self.backend.to_f32(v)?])
    }
}
