//! The compute backends the model and the trainer are written over, once.
//!
//! - [`DeviceBackend`]: our kernels, on a GPU ([`Device::cuda`](crate::Device::cuda)) or on the
//!   CPU emulator ([`Device::emulator`](crate::Device::emulator)).
//! - [`CpuBackend`]: plain Rust on the host (im2col + GEMM for convolutions, rayon across cores),
//!   fast enough to train a small model on a laptop; it is checked against [`crate::reference`]
//!   and is in turn the oracle a whole training step on the device backend is compared with.
//!
//! **The unit is what the kernels fuse.** Besides the primitives (convolution, DSBN, pooling,
//! resizing, slices, element-wise ops), the trait has the dataset-aware block itself
//! ([`Backend::dab_forward_train`], [`Backend::dab_forward_infer`], [`Backend::dab_backward`]:
//! convolution → DSBN with each sample's dataset slice → optional residual → ReLU, with the
//! *prologue* variant in which the next block's convolution normalises its input as it loads
//! it), the pyramid pooling module ([`Backend::ppm_forward_train`] …) and the loss with the
//! bilinear upsampling of the logits fused in ([`Backend::cross_entropy`] with
//! [`LossOptions::upsample`]). The device backend runs each as the fused kernels; the CPU backend
//! composes its own primitives, so the two compute the same function and can be compared on
//! whole training steps.
//!
//! **Storage.** Activations and their gradients are f32, f16 or bf16 ([`TensorLike::dtype`]);
//! statistics, DSBN tables, their gradients, losses and optimiser state are f32; dataset indices
//! and labels are i32. An op reads 16-bit storage as f32, computes in f32 (or f64 on the CPU
//! backend) and rounds its output once to the storage type — the same rounding points on both
//! backends, so a mixed-precision step is comparable across them. Layouts are the kernels' (NHWC
//! activations, KRSC weights, `[D, C]` DSBN tables), and so are the semantics: each op's doc
//! points at the `ops` function whose contract it follows, errors included.

use std::fmt;

use crate::error::Result;
use crate::ops::conv::ConvGeometry;
use crate::ops::cross_entropy::CrossEntropyOptions;
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::DsbnOptions;
use crate::ops::maxpool::PoolGeometry;
use crate::ops::ppm::PpmOptions;
use crate::ops::sgd::{FrozenRows, SgdOptions};
use crate::ops::usss::UsssOptions;
use crate::tensor::DType;

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
    /// The element (storage) type.
    fn dtype(&self) -> DType;
}

impl TensorLike for crate::Tensor {
    fn shape(&self) -> &[usize] {
        crate::Tensor::shape(self)
    }

    fn dtype(&self) -> DType {
        crate::Tensor::dtype(self)
    }
}

/// The collective a synchronised DSBN op calls on its partial sums: replace the f32 tensor by
/// the element-wise sum of every rank's (see [`Backend::dsbn_forward_train_synced`]).
pub type StatsReduce<'a, T> = dyn FnMut(&mut T) -> Result<()> + 'a;

fn sync_unsupported(backend: &str) -> crate::Error {
    crate::Error::InvalidArgument(format!(
        "per-dataset synchronised BatchNorm is not implemented on the {backend} backend; \
         train with per-rank statistics (SyncBN off)"
    ))
}

/// The four `[D, C]` f32 tables of one DSBN layer, in the order γ, β, running μ, running σ².
pub trait BnTables<T> {
    /// γ, β, running mean, running variance.
    fn tables(&self) -> [&T; 4];
    /// The same, writable (SGD updates γ and β; checkpoints load all four).
    fn tables_mut(&mut self) -> [&mut T; 4];
}

/// The batch statistics a DSBN training forward saved: `[D, C]` f32 mean and 1/std per
/// (dataset, channel), zero for the datasets absent from the batch.
pub trait BnStats<T> {
    /// Batch mean.
    fn mean(&self) -> &T;
    /// `1 / sqrt(var + eps)` of the batch (biased variance).
    fn invstd(&self) -> &T;
}

/// What a pyramid pooling module's training forward saved, as far as inspecting a step needs.
pub trait PpmRecords<T, S> {
    /// Per branch, in bin order: the branch convolution's output and its batch statistics (the
    /// branch's ReLU input is their normalisation).
    fn branch_records(&self) -> Vec<(&T, &S)>;
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

/// The tensors a dataset-aware block reads: its input `[N, H, W, C]`, its convolution weight
/// `[K, R, S, C]` (the input's storage type) and the dataset index of every sample, `[N]` i32.
pub struct DabInput<'a, B: Backend> {
    /// The convolution's input: an activation, or — with a [`Prologue`] — the previous block's
    /// raw convolution output, which this block's convolution normalises as it loads it.
    pub x: &'a B::Tensor,
    /// The convolution weight, KRSC.
    pub weight: &'a B::Tensor,
    /// `[N]` i32 dataset indices (which DSBN slice normalises each sample).
    pub datasets: &'a B::Tensor,
}

impl<B: Backend> Clone for DabInput<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for DabInput<'_, B> {}

/// The previous block's normalisation, applied by a block's convolution to its input as it
/// loads it: `relu?((x − μ)·invstd·γ + β)` with the previous block's batch statistics and
/// tables, per sample's dataset. The normalised activation is then never stored: the forward
/// recomputes it in the convolution, the backward in the filter gradient.
pub struct Prologue<'a, B: Backend> {
    /// The previous block's DSBN tables (γ, β).
    pub bn: &'a B::Bn,
    /// The batch statistics its training forward saved.
    pub stats: &'a B::BnSaved,
    /// Whether the previous block ends in a ReLU.
    pub relu: bool,
}

impl<B: Backend> Clone for Prologue<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Prologue<'_, B> {}

/// How a dataset-aware block computes: `relu?(DSBN(conv(prologue?(x))) + residual)`.
pub struct DabOptions<'a, B: Backend> {
    /// Stride, padding and dilation of the convolution.
    pub geometry: ConvGeometry,
    /// The DSBN's eps, momentum and ReLU.
    pub dsbn: DsbnOptions,
    /// The previous block's normalisation, applied to the input as it is loaded (training only).
    pub prologue: Option<Prologue<'a, B>>,
    /// Added after the normalisation, before the ReLU (ResNet's identity); like the output.
    pub residual: Option<&'a B::Tensor>,
    /// Training forward: write the block's output. Without it only the convolution output and
    /// the statistics exist, and the consumer must be a block that takes them as its prologue
    /// (a residual needs the output written).
    pub materialize: bool,
    /// Backward: leave out the input gradient (the first block of a network, whose input is
    /// the images, needs none).
    pub skip_input_grad: bool,
}

impl<B: Backend> Clone for DabOptions<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for DabOptions<'_, B> {}

impl<'a, B: Backend> DabOptions<'a, B> {
    /// A block with this geometry and DSBN, no prologue, no residual, output written.
    pub fn new(geometry: ConvGeometry, dsbn: DsbnOptions) -> Self {
        DabOptions { geometry, dsbn, prologue: None, residual: None, materialize: true, skip_input_grad: false }
    }
}

/// What a DAB's training forward produced.
#[derive(Debug)]
pub struct DabForward<B: Backend> {
    /// The convolution's output before the DSBN: what the backward reads, and the next block's
    /// input when the next block takes this one's normalisation as its prologue.
    pub conv_out: B::Tensor,
    /// Batch statistics per (dataset, channel).
    pub stats: B::BnSaved,
    /// `relu?(DSBN(conv_out) + residual)`, when [`DabOptions::materialize`] asked for it.
    pub output: Option<B::Tensor>,
}

/// What a DAB's backward reads of its forward.
pub struct DabSaved<'a, B: Backend> {
    /// [`DabForward::conv_out`].
    pub conv_out: &'a B::Tensor,
    /// [`DabForward::stats`].
    pub stats: &'a B::BnSaved,
}

impl<B: Backend> Clone for DabSaved<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for DabSaved<'_, B> {}

/// Gradients of a dataset-aware block.
#[derive(Debug)]
pub struct DabGrads<T> {
    /// Gradient with respect to the convolution's input as the convolution saw it (after the
    /// prologue, if any): the previous block's output gradient. `None` with
    /// [`DabOptions::skip_input_grad`].
    pub dx: Option<T>,
    /// Gradient with respect to the convolution weight (the weight's storage type).
    pub dweight: T,
    /// `[D, K]` f32, zero rows for datasets absent from the batch.
    pub dgamma: T,
    /// `[D, K]` f32.
    pub dbeta: T,
    /// Gradient with respect to the residual, when there was one.
    pub dresidual: Option<T>,
}

/// One branch of a pyramid pooling module, for a training forward: its 1×1 convolution weight
/// `[K, 1, 1, C]` and its DSBN layer (running statistics move).
pub struct PpmBranchMut<'a, B: Backend> {
    /// `[K, 1, 1, C]`, the input's storage type.
    pub weight: &'a B::Tensor,
    /// The branch's DSBN tables.
    pub bn: &'a mut B::Bn,
}

/// One branch of a pyramid pooling module, read only (inference, backward).
pub struct PpmBranchRef<'a, B: Backend> {
    /// `[K, 1, 1, C]`.
    pub weight: &'a B::Tensor,
    /// The branch's DSBN tables.
    pub bn: &'a B::Bn,
}

impl<B: Backend> Clone for PpmBranchRef<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for PpmBranchRef<'_, B> {}

/// Parameter gradients of one PPM branch.
#[derive(Debug)]
pub struct PpmBranchGrads<T> {
    /// `[K, 1, 1, C]`.
    pub dweight: T,
    /// `[D, K]` f32.
    pub dgamma: T,
    /// `[D, K]` f32.
    pub dbeta: T,
}

/// Gradients of a pyramid pooling module.
#[derive(Debug)]
pub struct PpmGrads<T> {
    /// Gradient with respect to the input `[N, H, W, C]` (identity slice included).
    pub dx: T,
    /// Per branch, in bin order.
    pub branches: Vec<PpmBranchGrads<T>>,
}

/// Options of [`Backend::cross_entropy`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LossOptions {
    /// Dataset weights and the gradient scale (see [`CrossEntropyOptions`]).
    pub ce: CrossEntropyOptions,
    /// `Some(align_corners)`: the logits are at a lower resolution than the labels and are
    /// upsampled bilinearly on the fly (the upsampled logits are never stored; the gradient is
    /// with respect to the low-resolution logits).
    pub upsample: Option<bool>,
    /// Also compute the gradient with respect to the logits (scaled by `ce.grad_scale`).
    pub with_grad: bool,
}

/// One parameter tensor of an SGD step (see [`crate::ops::sgd::SgdParam`]).
pub struct SgdTensor<'a, T> {
    /// The parameter (the f32 master), updated in place.
    pub param: &'a mut T,
    /// Its gradient, f32.
    pub grad: &'a T,
    /// Its momentum buffer, updated in place (not read on the first step).
    pub momentum_buffer: &'a mut T,
    /// The learning rate of its parameter group.
    pub lr: f32,
    /// Rows the step leaves untouched, parameter and buffer alike (`None`: none).
    pub frozen_rows: Option<FrozenRows>,
    /// A 16-bit copy of the parameter (what the convolutions read in mixed precision), written
    /// from the updated master in the same pass: `copy = round(param)`. Not together with
    /// frozen rows (`InvalidArgument`).
    pub copy: Option<&'a mut T>,
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
    /// What a DSBN training forward saves for its backward (batch mean and 1/std per
    /// (dataset, channel)).
    type BnSaved: BnStats<Self::Tensor> + fmt::Debug;
    /// What a pyramid pooling module's training forward saves for its backward.
    type PpmSaved: PpmRecords<Self::Tensor, Self::BnSaved> + fmt::Debug;

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

    /// Turns TF32 for f32 convolutions on or off where the device has it
    /// ([`Device::set_allow_tf32`](crate::Device::set_allow_tf32), on by default as PyTorch's
    /// `allow_tf32`). Nothing to do on a host backend: its convolutions stay exact f32.
    fn set_allow_tf32(&self, _on: bool) {}

    /// Starts a training step: from here until [`Backend::end_step`], data errors found on the
    /// device are gathered and reported by the step's first read-back (its losses), and the
    /// SGD step is skipped on the device when there is one. Nothing to do on a host backend.
    fn begin_step(&self) -> Result<()> {
        Ok(())
    }

    /// Ends what [`Backend::begin_step`] started.
    fn end_step(&self) {}

    // ---- tensors ----------------------------------------------------------------------------

    /// An f32 tensor from row-major host data.
    fn tensor_f32(&self, shape: &[usize], data: &[f32]) -> Result<Self::Tensor>;
    /// A float tensor of storage `dtype` (f32, f16 or bf16) from f32 host data, each value
    /// rounded to the nearest representable one (ties to even).
    fn tensor_float(&self, shape: &[usize], data: &[f32], dtype: DType) -> Result<Self::Tensor>;
    /// An i32 tensor (dataset indices, labels) from row-major host data.
    fn tensor_i32(&self, shape: &[usize], data: &[i32]) -> Result<Self::Tensor>;
    /// An f32 tensor of zeros.
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;
    /// Reads a float tensor back to the host as f32 (16-bit values widen exactly;
    /// `DTypeMismatch` for an integer tensor).
    fn to_f32(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// Reads an i32 tensor back to the host (`DTypeMismatch` for another dtype).
    fn to_i32(&self, t: &Self::Tensor) -> Result<Vec<i32>>;
    /// Overwrites a float tensor with host data of the same length, rounded to its storage type.
    fn write_f32(&self, t: &mut Self::Tensor, data: &[f32]) -> Result<()>;
    /// A deep copy.
    fn try_clone(&self, t: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- element-wise (ops::elementwise) -----------------------------------------------------

    /// `a + b`, same shapes and storage.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `max(x, 0)`.
    fn relu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `dy` where the ReLU output `y > 0`, else 0.
    fn relu_backward(&self, dy: &Self::Tensor, y: &Self::Tensor) -> Result<Self::Tensor>;

    // ---- convolution (ops::conv) -------------------------------------------------------------

    /// `conv2d(x, w) + bias`: x `[N,H,W,C]`, w `[K,R,S,C]` (x's storage), bias `[K]` f32 →
    /// `[N,P,Q,K]` in x's storage.
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
    /// Gradient with respect to the `[K, R, S, C]` weight (`filter_krs` = (K, R, S); x's
    /// storage, one rounding of the full sum) and, with `with_bias`, the `[K]` f32 bias.
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
    /// (dataset, channel); moves the running statistics of the datasets present. (A DSBN after a
    /// convolution is better run as [`Backend::dab_forward_train`], which takes the statistics
    /// from the convolution's epilogue.)
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

    // ---- synchronised DSBN (data-parallel training) ------------------------------------------

    /// [`Backend::dsbn_forward_train`] with the batch statistics of a whole data-parallel
    /// group (per-dataset SyncBN): this rank's per-(dataset, channel) partial sums and
    /// per-dataset counts go, as ONE f32 tensor, through `reduce` — an element-wise sum over
    /// the ranks, called exactly once, in place — and every rank then normalises with the
    /// group's statistics of each dataset and moves the running statistics of every dataset
    /// some rank held (identically on every rank). A dataset no rank held is untouched. The
    /// tensor's layout is this backend's (every rank of a group runs the same backend); its
    /// length depends only on the layer's `[D, C]`. The default refuses (a typed error).
    #[allow(clippy::too_many_arguments)]
    fn dsbn_forward_train_synced(
        &self,
        x: &Self::Tensor,
        datasets: &Self::Tensor,
        bn: &mut Self::Bn,
        opts: &DsbnOptions,
        residual: Option<&Self::Tensor>,
        reduce: &mut StatsReduce<'_, Self::Tensor>,
    ) -> Result<(Self::Tensor, Self::BnSaved)> {
        let _ = (x, datasets, bn, opts, residual, reduce);
        Err(sync_unsupported(&self.name()))
    }

    /// Backward of [`Backend::dsbn_forward_train_synced`]: this rank's per-(dataset, channel)
    /// Σdy and Σdy·x̂ (behind the ReLU mask) and per-dataset counts go through `reduce` once,
    /// and `dx` uses the group's sums and counts. `dgamma` and `dbeta` are this rank's own
    /// sums (the data-parallel step averages parameter gradients over the ranks afterwards).
    #[allow(clippy::too_many_arguments)]
    fn dsbn_backward_train_synced(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        residual: Option<&Self::Tensor>,
        datasets: &Self::Tensor,
        bn: &Self::Bn,
        saved: &Self::BnSaved,
        opts: &DsbnOptions,
        reduce: &mut StatsReduce<'_, Self::Tensor>,
    ) -> Result<BnGrads<Self::Tensor>> {
        let _ = (dy, x, residual, datasets, bn, saved, opts, reduce);
        Err(sync_unsupported(&self.name()))
    }

    // ---- the dataset-aware block (ops::dab) --------------------------------------------------

    /// Training forward of `relu?(DSBN(conv(prologue?(x))) + residual)` (ops::dab::forward_train):
    /// batch statistics per (dataset, channel) of the convolution's output (the device backend
    /// takes them from the convolution's epilogue: no separate statistics pass, and with a
    /// residual no thrown-away output); moves the running statistics of the datasets present.
    /// With `opts.materialize` the output is written, else only the convolution output and the
    /// statistics exist (for a consumer that takes them as its [`Prologue`]).
    fn dab_forward_train(
        &self,
        input: DabInput<'_, Self>,
        bn: &mut Self::Bn,
        opts: &DabOptions<'_, Self>,
    ) -> Result<DabForward<Self>>;
    /// Inference forward with the running statistics (ops::dab::forward_infer: ONE kernel on the
    /// device, the normalisation, residual and ReLU folded into the convolution's epilogue).
    /// `opts.prologue` must be `None`; `opts.materialize` is ignored (the output is the result).
    fn dab_forward_infer(
        &self,
        input: DabInput<'_, Self>,
        bn: &Self::Bn,
        opts: &DabOptions<'_, Self>,
    ) -> Result<Self::Tensor>;
    /// Backward of [`Backend::dab_forward_train`] with the same input and options (γ, β
    /// unchanged since): ReLU mask (recomputed from the convolution output), per-dataset DSBN
    /// backward, data and filter gradients; with a prologue the filter gradient recomputes the
    /// normalised input instead of reading a stored one.
    fn dab_backward(
        &self,
        dy: &Self::Tensor,
        input: DabInput<'_, Self>,
        bn: &Self::Bn,
        saved: DabSaved<'_, Self>,
        opts: &DabOptions<'_, Self>,
    ) -> Result<DabGrads<Self::Tensor>>;

    // ---- the pyramid pooling module (ops::ppm) -----------------------------------------------

    /// PSPNet's PPM, training forward: per bin b, adaptive average pooling to b×b → a DAB (1×1
    /// convolution, DSBN, ReLU as `opts.dsbn.relu`) → bilinear upsampling into its channel slice
    /// of `[x, branch_1, …]` (ops::ppm::forward_train). Moves every branch's running statistics.
    fn ppm_forward_train(
        &self,
        x: &Self::Tensor,
        datasets: &Self::Tensor,
        branches: &mut [PpmBranchMut<'_, Self>],
        opts: &PpmOptions,
    ) -> Result<(Self::Tensor, Self::PpmSaved)>;
    /// Inference forward with the running statistics.
    fn ppm_forward_infer(
        &self,
        x: &Self::Tensor,
        datasets: &Self::Tensor,
        branches: &[PpmBranchRef<'_, Self>],
        opts: &PpmOptions,
    ) -> Result<Self::Tensor>;
    /// Backward of [`Backend::ppm_forward_train`]: `dy` of the whole output; `dx` is the identity
    /// slice of `dy` plus every branch's pooling backward, in bin order.
    fn ppm_backward(
        &self,
        dy: &Self::Tensor,
        datasets: &Self::Tensor,
        branches: &[PpmBranchRef<'_, Self>],
        saved: &Self::PpmSaved,
        opts: &PpmOptions,
    ) -> Result<PpmGrads<Self::Tensor>>;

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
    /// Samples `start .. start + len` of a tensor (first axis), any rank and dtype.
    fn slice_batch(&self, x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;
    /// Concatenation along the first axis; the other dimensions and the dtype must agree.
    fn concat_batch(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;

    // ---- regularisation, loss, metrics -------------------------------------------------------

    /// Dropout2d (whole channels), mask from `(seed, sample, channel)` (ops::dropout).
    fn dropout2d(&self, x: &Self::Tensor, opts: &Dropout2dOptions) -> Result<Self::Tensor>;
    /// Backward of [`Backend::dropout2d`] with the same options.
    fn dropout2d_backward(&self, dy: &Self::Tensor, opts: &Dropout2dOptions) -> Result<Self::Tensor>;
    /// Multi-head cross-entropy (ops::cross_entropy): logits `[N,h,w,Cmax]` (any float
    /// storage), labels `[N,H,W]` i32 (`H, W` = `h, w` unless `opts.upsample`), datasets `[N]`
    /// i32. Returns the losses as an f32 tensor `[1 + D]` — the weighted total, then each
    /// dataset's mean — left where the backend computes (read it with [`Backend::to_f32`] when
    /// the step is done), and with `opts.with_grad` the logits' gradient (their storage).
    fn cross_entropy(
        &self,
        logits: &Self::Tensor,
        labels: &Self::Tensor,
        datasets: &Self::Tensor,
        num_classes: &[usize],
        opts: &LossOptions,
    ) -> Result<(Self::Tensor, Option<Self::Tensor>)>;
    /// Per pixel, the class of the largest logit of the sample's own head: `[N,H,W]` i32.
    fn argmax(&self, logits: &Self::Tensor, datasets: &Self::Tensor, num_classes: &[usize]) -> Result<Self::Tensor>;
    /// The USSS entropy loss (ops::usss; every pixel takes part) of pixel features `x`
    /// `[N,H,W,E]` (any float storage) whose samples belong to `datasets` (`[N]` i32, rows of the
    /// prototype table), against fixed class prototypes `protos`: one `[Σ_d C_d, E]` f32 table,
    /// dataset 0's `classes_per_dataset[0]` rows first. Returns an f32 `[3]` tensor —
    /// `α·cross + β·within`, cross, within — left on the backend, and with `grad = Some(g)` the
    /// gradient `g · ∂total/∂x` (x's storage). No gradient flows to the prototypes.
    fn usss_entropy(
        &self,
        x: &Self::Tensor,
        datasets: &Self::Tensor,
        protos: &Self::Tensor,
        classes_per_dataset: &[usize],
        opts: &UsssOptions,
        grad: Option<f32>,
    ) -> Result<(Self::Tensor, Option<Self::Tensor>)>;

    // ---- optimiser (ops::sgd) ----------------------------------------------------------------

    /// Each group's tensors (one shape; f32, f16 or bf16) summed in order in f32 and multiplied
    /// by `scale`, into a new f32 tensor per group — the parameter gradients of a step, gathered
    /// from every forward that used the parameter and unscaled, in one pass. Also returns an f32
    /// `[1]` flag: 1 when any input value is infinite or NaN (a loss-scaling overflow), else 0.
    fn sum_scaled(&self, groups: &[&[&Self::Tensor]], scale: f32) -> Result<(Vec<Self::Tensor>, Self::Tensor)>;
    /// One SGD step (momentum, weight decay, per-tensor lr) over every tensor, PyTorch's formula,
    /// writing each 16-bit [`SgdTensor::copy`] from the updated parameter in the same pass. With
    /// `skip_if`, an f32 `[1]` flag from [`Backend::sum_scaled`], nothing at all is written when
    /// the flag is nonzero (a skipped step, decided where the flag lives: no host round trip).
    fn sgd_step(
        &self,
        params: &mut [SgdTensor<'_, Self::Tensor>],
        opts: &SgdOptions,
        first_step: bool,
        skip_if: Option<&Self::Tensor>,
    ) -> Result<()>;
}
