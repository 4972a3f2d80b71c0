//! [`Graph::usss`]: the USSS entropy loss (Universal Semi-Supervised Segmentation) as a graph
//! op — one node whose value is a loss tensor `[3]` (α·cross + β·within, cross, within) and whose
//! backward sends the features their gradient. The prototypes are constants of the step: no
//! gradient flows to them (they are summaries of labelled features, computed outside the graph).

use super::node::{Node, ScalarDef};
use super::{Graph, Scalar, Var};
use crate::backend::Backend;
use crate::error::Result;
use crate::ops::usss::UsssOptions;

/// The loss of [`Graph::usss`].
#[derive(Debug, Clone, PartialEq)]
pub struct UsssSpec {
    /// Prototypes of each dataset: the table's first `classes_per_dataset[0]` rows are dataset
    /// 0's, and so on.
    pub classes_per_dataset: Vec<usize>,
    /// Temperature and the weights α (cross) and β (within).
    pub options: UsssOptions,
    /// The gradient the backward will send this loss (as [`super::LossSpec::expected_grad`]):
    /// with it the forward also computes the features' gradient.
    pub expected_grad: Option<f32>,
}

impl<B: Backend> Graph<B> {
    /// The USSS entropy loss of features `x` `[N, H, W, E]` whose samples belong to the
    /// prototype table's datasets `datasets` (`[N]` i32), against `protos` (`[Σ_d C_d, E]` f32):
    /// see [`Backend::usss_entropy`]. Returns the scalar α·cross + β·within; the parts are in
    /// [`Graph::loss_tensor`]'s elements 1 and 2.
    pub fn usss(&mut self, x: Var, datasets: Var, protos: B::Tensor, spec: &UsssSpec) -> Result<Scalar> {
        self.ready(x, "USSS entropy")?;
        let grad = spec.expected_grad.filter(|_| self.recording && self.needs_grad[x.0]);
        let (loss, dx) = self.backend.usss_entropy(
            &self.values[x.0],
            &self.values[datasets.0],
            &protos,
            &spec.classes_per_dataset,
            &spec.options,
            grad,
        )?;
        self.losses.push(loss);
        let out = self.push_scalar(ScalarDef::Loss(self.losses.len() - 1));
        self.rec(Node::Usss {
            x,
            datasets,
            protos,
            classes_per_dataset: spec.classes_per_dataset.clone(),
            opts: spec.options,
            pre: grad.zip(dx),
            out,
        });
        Ok(out)
    }
}
