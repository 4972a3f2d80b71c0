//! The tape's records: one node per op the graph ran, holding what its backward needs.

use super::{BnId, Scalar, Var, WeightId};
use crate::backend::Backend;
use crate::ops::conv::ConvGeometry;
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::DsbnOptions;
use crate::ops::maxpool::PoolGeometry;
use crate::ops::ppm::PpmOptions;
use crate::ops::usss::UsssOptions;

/// A block's normalisation that its consumer applies (the value holds the raw convolution
/// output): the DSBN layer, the index of its saved statistics in the graph, the ReLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    pub(crate) bn: BnId,
    pub(crate) stats: usize,
    pub(crate) relu: bool,
}

/// How a scalar's value is had: element 0 (the weighted total) of a loss tensor, or a
/// weighted sum of scalars (computed on the host when read).
#[derive(Debug, Clone)]
pub(crate) enum ScalarDef {
    Loss(usize),
    Sum(Vec<(Scalar, f32)>),
}

pub(crate) enum Node<B: Backend> {
    Conv {
        x: Var,
        w: WeightId,
        bias: Option<WeightId>,
        geometry: ConvGeometry,
        out: Var,
    },
    Dab {
        x: Var,
        w: WeightId,
        datasets: Var,
        bn: BnId,
        stats: usize,
        /// The convolution output when the block wrote its output (else it is `out`'s value).
        conv_out: Option<B::Tensor>,
        prologue: Option<Pending>,
        residual: Option<Var>,
        geometry: ConvGeometry,
        dsbn: DsbnOptions,
        out: Var,
    },
    Dsbn {
        x: Var,
        residual: Option<Var>,
        datasets: Var,
        bn: BnId,
        stats: usize,
        opts: DsbnOptions,
        out: Var,
        /// Whether the forward used the data-parallel group's statistics (the backward then
        /// reduces its sums over the group too).
        synced: bool,
    },
    Ppm {
        x: Var,
        datasets: Var,
        branches: Vec<(WeightId, BnId)>,
        saved: B::PpmSaved,
        opts: PpmOptions,
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
    /// Consecutive sample ranges of `x` (sizes in order, covering it); the backward
    /// concatenates the parts' gradients.
    SplitBatch {
        x: Var,
        parts: Vec<(Var, usize)>,
    },
    ConcatBatch {
        parts: Vec<(Var, usize)>,
        out: Var,
    },
    Loss {
        logits: Var,
        labels: Var,
        datasets: Var,
        num_classes: Vec<usize>,
        weights: Option<Vec<f32>>,
        upsample: Option<bool>,
        /// The gradient the forward computed with the upstream gradient it was told to expect.
        pre: Option<(f32, B::Tensor)>,
        out: Scalar,
    },
    /// The USSS entropy loss ([`super::Graph::usss`]); the prototypes are constants.
    Usss {
        x: Var,
        datasets: Var,
        protos: B::Tensor,
        classes_per_dataset: Vec<usize>,
        opts: UsssOptions,
        /// The gradient the forward computed with the upstream gradient it was told to expect.
        pre: Option<(f32, B::Tensor)>,
        out: Scalar,
    },
    Sum {
        terms: Vec<(Scalar, f32)>,
        out: Scalar,
    },
}
