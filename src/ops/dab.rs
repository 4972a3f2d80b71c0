//! The Dataset-Aware Block (DAB): convolution shared by all datasets → DSBN with each sample's
//! dataset slice → ReLU (optionally with a residual added before the ReLU), fused:
//!
//! - training forward: the convolution's epilogue writes the per-(sample tile, channel)
//!   statistics partials, a tiny finalize turns them into mean and 1/std per (dataset, channel)
//!   and moves the running statistics; the normalised activation is either written by a
//!   separate apply pass (`materialize`) or never written at all, because the next block's
//!   convolution applies BN + ReLU to its input as it loads it (a [`Prologue`]);
//! - inference forward: ONE kernel, convolution + BN from running statistics + residual + ReLU;
//! - backward: ReLU mask and per-dataset BN backward, data-gradient and filter-gradient
//!   convolutions; with a prologue, the filter gradient recomputes the normalised input on the
//!   fly instead of reading a saved activation.
//!
//! The forwards take f32, f16 or bf16 activations and weights (the 16-bit ones through the
//! tensor-core convolution; BN tables stay f32), and so does the backward (16-bit gradients of
//! the activation and weight, f32 gradients of γ and β).

use crate::device::DeviceBuffer;
use crate::error::{Error, Result};
use crate::ops::check;
use crate::ops::conv::{self, ConvGeometry, Fusion, InferEpilogue, STATS_CHUNK};
use crate::ops::dsbn::{self, DsbnGrads, DsbnOptions, DsbnSaved, DsbnState};
use crate::tensor::Tensor;

/// The previous block's normalisation, applied by this block's convolution as it loads its
/// input (which is then the previous block's raw convolution output).
#[derive(Clone, Copy)]
pub struct Prologue<'a> {
    /// The previous block's DSBN state (γ, β).
    pub state: &'a DsbnState,
    /// The statistics its training forward saved.
    pub saved: &'a DsbnSaved,
    /// Whether the previous block ends in a ReLU.
    pub relu: bool,
}

/// How a DAB computes: `relu?(DSBN(conv(prologue?(x))) + residual)`.
#[derive(Clone, Copy, Default)]
pub struct DabOptions<'a> {
    /// Stride, padding and dilation of the convolution.
    pub geometry: ConvGeometry,
    /// The DSBN's eps, momentum and ReLU.
    pub dsbn: DsbnOptions,
    /// The previous block's normalisation, applied to the input as it is loaded (training
    /// forward and backward only).
    pub prologue: Option<Prologue<'a>>,
    /// Added after the normalisation, before the ReLU (ResNet's identity), like the output.
    pub residual: Option<&'a Tensor>,
    /// Training forward: write the activation (needed when the consumer is not a convolution
    /// taking this block's normalisation as its prologue, and always with a residual).
    pub materialize: bool,
    /// Backward: leave out the input gradient (the first block of a network, whose input is
    /// the images, needs none: one data-gradient convolution less).
    pub skip_input_grad: bool,
}

/// What a training forward of a DAB produced.
#[derive(Debug)]
pub struct DabForward {
    /// The convolution's output before BN: the backward's input, and the next block's input
    /// when the next block applies this one's normalisation in its prologue.
    pub conv_out: Tensor,
    /// Batch statistics per (dataset, channel).
    pub saved: DsbnSaved,
    /// `relu?(BN(conv_out) + residual)`, when the forward was asked to materialise it.
    pub output: Option<Tensor>,
}

impl DabForward {
    /// What [`backward_train`] reads of this forward.
    pub fn saved(&self) -> DabSaved<'_> {
        DabSaved { conv_out: &self.conv_out, stats: &self.saved }
    }
}

/// What the backward reads of a training forward: the convolution output and the statistics.
#[derive(Clone, Copy)]
pub struct DabSaved<'a> {
    /// [`DabForward::conv_out`].
    pub conv_out: &'a Tensor,
    /// [`DabForward::saved`].
    pub stats: &'a DsbnSaved,
}

/// Gradients of a DAB.
#[derive(Debug)]
pub struct DabGrads {
    /// Gradient with respect to the convolution's input as the convolution saw it (after the
    /// prologue, if any): feed it as `dy` to the previous block's backward. `None` with
    /// [`DabOptions::skip_input_grad`].
    pub dx: Option<Tensor>,
    /// Gradient with respect to the convolution weight.
    pub dweight: Tensor,
    /// Gradients of the DSBN parameters, `[D, C_out]`.
    pub dgamma: Tensor,
    /// See `dgamma`.
    pub dbeta: Tensor,
    /// Gradient with respect to the residual, when there was one.
    pub dresidual: Option<Tensor>,
}

fn to_conv_prologue<'a>(p: &Prologue<'a>, datasets: &'a Tensor) -> conv::Prologue<'a> {
    conv::Prologue {
        datasets,
        mean: &p.saved.mean,
        invstd: &p.saved.invstd,
        gamma: &p.state.gamma,
        beta: &p.state.beta,
        relu: p.relu,
    }
}

/// Training forward of `relu?(DSBN(conv(prologue(x))) + residual)`.
///
/// `x` `[N, H, W, C]` f32, f16 or bf16 (raw previous conv output when `opts.prologue` is
/// given), `weight` `[K, R, S, C]`, `datasets` `[N]` i32; `state` has `[D, K]` tables and its
/// running statistics move for the datasets present. With `opts.materialize`, the activation is
/// written (needed when the consumer is not a convolution, or with a residual).
#[doc(alias = "conv_dsbn_relu")]
pub fn forward_train(
    x: &Tensor,
    weight: &Tensor,
    datasets: &Tensor,
    state: &mut DsbnState,
    opts: &DabOptions<'_>,
) -> Result<DabForward> {
    if opts.residual.is_some() && !opts.materialize {
        return Err(Error::InvalidArgument("a residual block must materialise its output".into()));
    }
    let [n, h, w, _] = check::nhwc("DAB input", x)?;
    let k = weight.shape().first().copied().unwrap_or(0);
    let (r, s) = (weight.shape().get(1).copied().unwrap_or(0), weight.shape().get(2).copied().unwrap_or(0));
    let (p, q) = opts.geometry.output_size(h, w, r, s)?;
    if let Some(res) = opts.residual {
        // Checked before anything moves: a bad residual leaves the running statistics alone.
        check::dtype("DAB residual", res, x.dtype())?;
        check::shape("DAB residual", res, &[n, p, q, k])?;
        check::same_device(x.device(), &[res])?;
    }
    let mut partials =
        DeviceBuffer::uninit_words(x.device(), dsbn::partials_bytes([n, p, q, k], state.num_datasets(), STATS_CHUNK))?;
    let fusion = Fusion {
        prologue: opts.prologue.as_ref().map(|pro| to_conv_prologue(pro, datasets)),
        stats: Some((&mut partials, datasets, state.num_datasets())),
        epilogue: None,
    };
    let conv_out = conv::conv2d_fused(x, weight, None, &opts.geometry, fusion)?;
    let saved = dsbn::stats_from_partials(&conv_out, datasets, state, &opts.dsbn, &mut partials, STATS_CHUNK)?;
    let output = if opts.materialize {
        Some(dsbn::apply(&conv_out, opts.residual, datasets, state, &saved, &opts.dsbn)?)
    } else {
        None
    };
    Ok(DabForward { conv_out, saved, output })
}

/// Inference forward in one kernel: `relu?(BN_running(conv(x)) + residual)`. A prologue is not
/// supported here (`InvalidArgument`): in inference every block writes its output.
#[doc(alias = "conv_dsbn_relu")]
pub fn forward_infer(
    x: &Tensor,
    weight: &Tensor,
    datasets: &Tensor,
    state: &DsbnState,
    opts: &DabOptions<'_>,
) -> Result<Tensor> {
    if opts.prologue.is_some() {
        return Err(Error::InvalidArgument("the inference DAB takes no prologue".into()));
    }
    check::finite_positive("eps", opts.dsbn.eps)?;
    dsbn::validate_indices_checked(datasets, x, state.num_datasets())?;
    let fusion = Fusion {
        prologue: None,
        stats: None,
        epilogue: Some(InferEpilogue {
            datasets,
            mean: &state.running_mean,
            var: &state.running_var,
            gamma: &state.gamma,
            beta: &state.beta,
            eps: opts.dsbn.eps,
            relu: opts.dsbn.relu,
            residual: opts.residual,
        }),
    };
    conv::conv2d_fused(x, weight, None, &opts.geometry, fusion)
}

/// Backward of [`forward_train`]: `dy` is the gradient of the block's output; `x`, `weight`,
/// `datasets`, `state` (γ and β unchanged since) and `opts` as in the forward, `saved` what it
/// produced ([`DabForward::saved`]).
#[doc(alias = "conv_dsbn_relu")]
pub fn backward_train(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    datasets: &Tensor,
    state: &DsbnState,
    saved: DabSaved<'_>,
    opts: &DabOptions<'_>,
) -> Result<DabGrads> {
    let DsbnGrads { dx: dconv, dgamma, dbeta, dresidual } =
        dsbn::backward_train_residual(dy, saved.conv_out, opts.residual, datasets, state, saved.stats, &opts.dsbn)?;
    let [_, h, w, _] = check::nhwc("DAB input", x)?;
    let ws = weight.shape();
    if ws.len() != 4 {
        return Err(Error::InvalidShape { what: "DAB weight", shape: ws.to_vec(), reason: "expected KRSC".into() });
    }
    let dx = match opts.skip_input_grad {
        true => None,
        false => Some(conv::conv2d_backward_data(&dconv, weight, (h, w), &opts.geometry)?),
    };
    let pro = opts.prologue.as_ref().map(|pro| to_conv_prologue(pro, datasets));
    let fg = conv::conv2d_backward_filter_fused(&dconv, x, (ws[0], ws[1], ws[2]), false, &opts.geometry, pro.as_ref())?;
    Ok(DabGrads { dx, dweight: fg.dweight, dgamma, dbeta, dresidual })
}
