//! The compute backends the model and the trainer are written over, once.
//!
//! - [`DeviceBackend`]: our kernels, on a GPU ([`Device::cuda`](crate::Device::cuda)) or on the
//!   CPU emulator ([`Device::emulator`](crate::Device::emulator)).
//! - [`CpuBackend`]: plain Rust on the host (im2col + GEMM for convolutions, rayon across cores),
//!   fast enough to train a small model on a laptop; it is checked against [`crate::reference`]
//!   and is in turn the oracle a whole training step on the device backend is compared with.
//!
//! Every op is f32 storage with f32 statistics (mixed precision is the kernels' business, not
//! the graph's); dataset indices and labels are i32 tensors. Layouts are the kernels' (NHWC
//! activations, KRSC weights, `[D, C]` DSBN tables), and so are the semantics: each op's doc
//! points at the `ops` function whose contract it follows, errors included.

use std::fmt;

use crate::error::Result;
use crate::ops::conv::ConvGeometry;
use crate::ops::cross_entropy::{CrossEntropyLoss, CrossEntropyOptions};
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::DsbnOptions;
use crate::ops::maxpool::PoolGeometry;
use crate::ops::sgd::{FrozenRows, SgdOptions};

pub mod counters;
pub mod cpu;
pub mod device;
pub use counters::{ConvProblem, OpCounters};
pub use cpu::{CpuBackend, CpuTensor};
pub use device::DeviceBackend;

/// What the graph needs to know of a backend's tensor without asking the backend.
pub trait TensorLike: fmt::Debug {
    /// The dimensions, outermost first.
    fn shape(&self) -> &[usize];
}

impl TensorLike for crate::Tensor {
    fn shape(&self) -> &[usize] {
        crate::Tensor::shape(self)
    }
}

/// The four `[D, C]` f32 tables of one DSBN layer, in the order γ, β, running μ, running σ².
pub trait BnTables<T> {
    /// γ, β, running mean, running variance.
    fn tables(&self) -> [&T; 4];
    /// The same, writable (SGD updates γ and β; checkpoints load all four).
    fn tables_mut(&mut self) -> [&mut T; 4];
}

/// Gradients of a DSBN layer: `dx` like `x`, `dgamma` and `dbeta` `[D, C]` (zero rows for the
/// datasets absent from the batch), `dresidual` when the forward added a residual.
#[derive(Debug)]
pub struct BnGrads<T> {
    /// Gradient with respect to the input.
    pub dx: T,
    /// Gradient with respect to γ.
    pub dgamma: T,
    /// Gradient with respect to β.
    pub dbeta: T,
    /// Gradient with respect to the residual, when there was one.
    pub dresidual: Option<T>,
}

/// One parameter tensor of an SGD step (see [`crate::ops::sgd::SgdParam`]).
pub struct SgdTensor<'a, T> {
    /// The parameter, updated in place.
    pub param: &'a mut T,
    /// Its gradient.
    pub grad: &'a T,
    /// Its momentum buffer, updated in place (not read on the first step).
    pub momentum_buffer: &'a mut T,
    /// The learning rate of its parameter group.
    pub lr: f32,
    /// Rows the step leaves untouched, parameter and buffer alike (`None`: none).
    pub frozen_rows: Option<FrozenRows>,
}

/// The ops a PSPNet with dataset-aware blocks needs, forward and backward.
///
/// Implementations validate their inputs and return the crate's typed errors (never panic);
/// results are deterministic: the same inputs give the same bits on every run.
pub trait Backend: Clone + fmt::Debug + 'static {
    /// A tensor living where this backend computes.
    type Tensor: TensorLike;
    /// One DSBN layer's tables.
    type Bn: BnTables<Self::Tensor> + fmt::Debug;
    /// What a DSBN training forward saves for its backward.
    type BnSaved: fmt::Debug;

    /// A short human-readable name ("cpu", "emulator", "cuda:0 (NVIDIA H100 ...)").
    fn name(&self) -> String;

    /// What the device under this backend has been asked to do so far (launches, allocations,
    /// copies, host synchronisations), for step accounting; `None` for a host backend.
    fn device_counters(&self) -> Option<crate::DeviceCounters> {
        None
    }

    /// What the ops of this backend wrote and ran so far (activation-sized tensors, convolutions
    /// by storage type; see [`counters`]), for step accounting; `None` when it does not count.
    fn op_counters(&self) -> Option<OpCounters> {
        None
    }

    // ---- tensors ----------------------------------------------------------------------------

    /// An f32 tensor from row-major host data.
    fn tensor_f32(&self, shape: &[usize], data: &[f32]) -> Result<Self::Tensor>;
    /// An i32 tensor (dataset indices, labels) from row-major host data.
    fn tensor_i32(&self, shape: &[usize], data: &[i32]) -> Result<Self::Tensor>;
    /// An f32 tensor of zeros.
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;
    /// Reads an f32 tensor back to the host (`DTypeMismatch` for another dtype).
    fn to_f32(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// Reads an i32 tensor back to the host (`DTypeMismatch` for another dtype).
    fn to_i32(&self, t: &Self::Tensor) -> Result<Vec<i32>>;
    /// Overwrites an f32 tensor with host data of the same length.
    fn write_f32(&self, t: &mut Self::Tensor, data: &[f32]) -> Result<()>;
    /// A deep copy.
    fn try_clone(&self, t: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- element-wise (ops::elementwise) -----------------------------------------------------

    /// `a + b`, same shapes.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `max(x, 0)`.
    fn relu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `dy` where the ReLU output `y > 0`, else 0.
    fn relu_backward(&self, dy: &Self::Tensor, y: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- convolution (ops::conv) -------------------------------------------------------------

    /// `conv2d(x, w) + bias`: x `[N,H,W,C]`, w `[K,R,S,C]`, bias `[K]` → `[N,P,Q,K]`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        geometry: &ConvGeometry,
    ) -> Result<Self::Tensor>;
    /// Gradient with respect to the input of spatial size `input_hw`.
    fn conv2d_backward_data(
        &self,
        dy: &Self::Tensor,
        w: &Self::Tensor,
        input_hw: (usize, usize),
        geometry: &ConvGeometry,
    ) -> Result<Self::Tensor>;
    /// Gradient with respect to the `[K, R, S, C]` weight (`filter_krs` = (K, R, S)) and, with
    /// `with_bias`, the `[K]` bias.
    fn conv2d_backward_filter(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        filter_krs: (usize, usize, usize),
        with_bias: bool,
        geometry: &ConvGeometry,
    ) -> Result<(Self::Tensor, Option<Self::Tensor>)>;

    // ---- dataset-specific BatchNorm (ops::dsbn) ----------------------------------------------

    /// PyTorch's initial tables for `num_datasets` × `channels`: γ = 1, β = 0, μ = 0, σ² = 1.
    fn bn_new(&self, num_datasets: usize, channels: usize) -> Result<Self::Bn>;
    /// Training forward `y = relu?(BN_{datasets[n]}(x) + residual)` with batch statistics per
    /// (dataset, channel); moves the running statistics of the datasets present.
    fn dsbn_forward_train(
        &self,
        x: &Self::Tensor,
        datasets: &Self::Tensor,
        bn: &mut Self::Bn,
        opts: &DsbnOptions,
        residual: Option<&Self::Tensor>,
    ) -> Result<(Self::Tensor, Self::BnSaved)>;
    /// Inference forward with the running statistics.
    fn dsbn_forward_infer(
        &self,
        x: &Self::Tensor,
        datasets: &Self::Tensor,
        bn: &Self::Bn,
        opts: &DsbnOptions,
        residual: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// Backward of [`Backend::dsbn_forward_train`] (same `x`, `residual`, `saved`).
    #[allow(clippy::too_many_arguments)]
    fn dsbn_backward_train(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        residual: Option<&Self::Tensor>,
        datasets: &Self::Tensor,
        bn: &Self::Bn,
        saved: &Self::BnSaved,
        opts: &DsbnOptions,
    ) -> Result<BnGrads<Self::Tensor>>;

    // ---- pooling, resizing, channel and batch slices (ops::maxpool, ops::pool) ---------------

    /// Max pooling: the output and the argmax indices its backward needs.
    fn max_pool2d(&self, x: &Self::Tensor, geometry: &PoolGeometry) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Backward of [`Backend::max_pool2d`] to an input of spatial size `input_hw`, pooled with
    /// `geometry`: each output's gradient goes to its argmax. An index that does not lie in its
    /// output's window (not one the forward wrote) sends its gradient nowhere, as
    /// [`crate::ops::maxpool::max_pool2d_backward`] does.
    fn max_pool2d_backward(
        &self,
        dy: &Self::Tensor,
        indices: &Self::Tensor,
        input_hw: (usize, usize),
        geometry: &PoolGeometry,
    ) -> Result<Self::Tensor>;
    /// Adaptive average pooling to `out_h × out_w` bins.
    fn adaptive_avg_pool(&self, x: &Self::Tensor, out_h: usize, out_w: usize) -> Result<Self::Tensor>;
    /// Backward of [`Backend::adaptive_avg_pool`] to an input of spatial size `input_hw`.
    fn adaptive_avg_pool_backward(&self, dy: &Self::Tensor, input_hw: (usize, usize)) -> Result<Self::Tensor>;
    /// Bilinear resize (PyTorch's `interpolate(mode="bilinear")`).
    fn resize_bilinear(
        &self,
        x: &Self::Tensor,
        out_h: usize,
        out_w: usize,
        align_corners: bool,
    ) -> Result<Self::Tensor>;
    /// Backward of [`Backend::resize_bilinear`] to an input of spatial size `input_hw`.
    fn resize_bilinear_backward(
        &self,
        dy: &Self::Tensor,
        input_hw: (usize, usize),
        align_corners: bool,
    ) -> Result<Self::Tensor>;
    /// Concatenation along the channel (last) axis of NHWC tensors with equal N, H, W.
    fn concat_channels(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;
    /// Channels `offset .. offset + len` of an NHWC tensor (the backward of a concat).
    fn slice_channels(&self, x: &Self::Tensor, offset: usize, len: usize) -> Result<Self::Tensor>;
    /// Samples `start .. start + len` of a tensor (first axis), any rank, f32 or i32.
    fn slice_batch(&self, x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;
    /// Concatenation along the first axis; the other dimensions and the dtype must agree.
    fn concat_batch(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;

    // ---- regularisation, loss, metrics, optimiser --------------------------------------------

    /// Dropout2d (whole channels), mask from `(seed, sample, channel)` (ops::dropout).
    fn dropout2d(&self, x: &Self::Tensor, opts: &Dropout2dOptions) -> Result<Self::Tensor>;
    /// Backward of [`Backend::dropout2d`] with the same options.
    fn dropout2d_backward(&self, dy: &Self::Tensor, opts: &Dropout2dOptions) -> Result<Self::Tensor>;
    /// Multi-head cross-entropy (ops::cross_entropy): logits `[N,H,W,Cmax]` f32, labels `[N,H,W]`
    /// i32, datasets `[N]` i32; with `with_grad`, also dlogits scaled by `opts.grad_scale`.
    fn cross_entropy(
        &self,
        logits: &Self::Tensor,
        labels: &Self::Tensor,
        datasets: &Self::Tensor,
        num_classes: &[usize],
        opts: &CrossEntropyOptions,
        with_grad: bool,
    ) -> Result<(CrossEntropyLoss, Option<Self::Tensor>)>;
    /// Per pixel, the class of the largest logit of the sample's own head: `[N,H,W]` i32.
    fn argmax(&self, logits: &Self::Tensor, datasets: &Self::Tensor, num_classes: &[usize]) -> Result<Self::Tensor>;
    /// One SGD step (momentum, weight decay, per-tensor lr) over every tensor, PyTorch's formula.
    fn sgd_step(&self, params: &mut [SgdTensor<'_, Self::Tensor>], opts: &SgdOptions, first_step: bool) -> Result<()>;
}
