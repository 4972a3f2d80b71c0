//! 2-D convolution (cross-correlation, as PyTorch's `conv2d`) over NHWC activations and KRSC
//! weights as implicit GEMM: forward with optional bias, data gradient, and filter gradient with
//! optional bias gradient (deterministic split-K). The forward takes f32 storage (tensor cores in
//! TF32 while [`Device::allow_tf32`](crate::Device::allow_tf32) is on, the default; the exact
//! FFMA mainloop when it is off) or f16 / bf16 storage (tensor-core mainloop through `nvcuda::wmma`, f32 accumulation, one
//! rounding of the stored output), in all three passes. A 16-bit filter gradient keeps its
//! split-K slices in f32 and rounds only their sum; the bias gradient is always f32.
//!
//! Kernels: `kernels/conv.cu`. Reference: [`crate::reference::conv`].

use crate::device::{launcher, workspace_bytes, DeviceBuffer, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::tensor::{DType, Tensor};

/// Stride, zero padding and dilation of a convolution, (height, width) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Step between output positions (≥ 1).
    pub stride: (usize, usize),
    /// Zeros added on each side.
    pub padding: (usize, usize),
    /// Spacing between filter taps (≥ 1); the dilated ResNet uses 2 and 4.
    pub dilation: (usize, usize),
}

impl Default for ConvGeometry {
    fn default() -> Self {
        ConvGeometry { stride: (1, 1), padding: (0, 0), dilation: (1, 1) }
    }
}

impl ConvGeometry {
    /// Same stride, padding and dilation on both axes.
    pub fn square(stride: usize, padding: usize, dilation: usize) -> Self {
        ConvGeometry { stride: (stride, stride), padding: (padding, padding), dilation: (dilation, dilation) }
    }

    /// Output (P, Q) for an H×W input and an R×S filter, or an error when the dilated filter
    /// does not fit in the padded input.
    pub fn output_size(&self, h: usize, w: usize, r: usize, s: usize) -> Result<(usize, usize)> {
        if self.stride.0 == 0 || self.stride.1 == 0 || self.dilation.0 == 0 || self.dilation.1 == 0 {
            return Err(Error::InvalidArgument(format!("stride and dilation must be at least 1: {self:?}")));
        }
        let axis = |len: usize, pad: usize, dil: usize, taps: usize, stride: usize| -> Option<usize> {
            let span = dil.checked_mul(taps.checked_sub(1)?)?.checked_add(1)?;
            let padded = len.checked_add(pad.checked_mul(2)?)?;
            (padded >= span).then(|| (padded - span) / stride + 1)
        };
        match (
            axis(h, self.padding.0, self.dilation.0, r, self.stride.0),
            axis(w, self.padding.1, self.dilation.1, s, self.stride.1),
        ) {
            (Some(p), Some(q)) if p <= i32::MAX as usize && q <= i32::MAX as usize => Ok((p, q)),
            _ => Err(Error::InvalidShape {
                what: "convolution",
                shape: vec![h, w, r, s],
                reason: format!("a {r}x{s} filter with {self:?} does not fit a {h}x{w} input"),
            }),
        }
    }
}

const FORWARD: Launcher<ffi::cdcl_conv_params> = launcher!(conv_forward: cdcl_emu_conv_forward, cdcl_cuda_conv_forward);
const BACKWARD_DATA: Launcher<ffi::cdcl_conv_params> =
    launcher!(conv_backward_data: cdcl_emu_conv_backward_data, cdcl_cuda_conv_backward_data);
const BACKWARD_FILTER: Launcher<ffi::cdcl_conv_params> =
    launcher!(conv_backward_filter: cdcl_emu_conv_backward_filter, cdcl_cuda_conv_backward_filter);

/// The storage types the convolution kernels take: f32, f16, bf16.
fn conv_dtype(what: &'static str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        dtype => Err(Error::UnsupportedDType { what, dtype }),
    }
}

fn filter_shape(weight: &Tensor) -> Result<[usize; 4]> {
    let s = weight.shape();
    if s.len() != 4 || s.contains(&0) || s.iter().any(|&d| d > i32::MAX as usize) {
        return Err(Error::InvalidShape {
            what: "convolution weight",
            shape: s.to_vec(),
            reason: "expected 4 dimensions KRSC, each at least 1".into(),
        });
    }
    Ok([s[0], s[1], s[2], s[3]])
}

/// Sizes and geometry in the kernels' Params form.
#[allow(clippy::too_many_arguments)]
fn params(
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    r: usize,
    s: usize,
    g: &ConvGeometry,
) -> Result<ffi::cdcl_conv_params> {
    let (p, q) = g.output_size(h, w, r, s)?;
    let fits = |v: usize| v <= i32::MAX as usize;
    let all = [g.stride.0, g.stride.1, g.padding.0, g.padding.1, g.dilation.0, g.dilation.1];
    if !all.iter().copied().all(fits) || r * s * c > i32::MAX as usize || r * s * k > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("convolution too large for 32-bit indexing: {g:?}")));
    }
    Ok(ffi::cdcl_conv_params {
        n: n as i32,
        h: h as i32,
        w: w as i32,
        c: c as i32,
        k: k as i32,
        r: r as i32,
        s: s as i32,
        p: p as i32,
        q: q as i32,
        stride_h: g.stride.0 as i32,
        stride_w: g.stride.1 as i32,
        pad_h: g.padding.0 as i32,
        pad_w: g.padding.1 as i32,
        dil_h: g.dilation.0 as i32,
        dil_w: g.dilation.1 as i32,
        dtype: DType::F32.to_ffi(),
        ..Default::default()
    })
}

/// The previous block's DSBN (+ ReLU) applied to the convolution's input as it is loaded:
/// `relu?(fma((x − mean[d,c])·invstd[d,c], γ[d,c], β[d,c]))`, d = the sample's dataset. Tables
/// are `[D, C_in]` f32.
pub(crate) struct Prologue<'a> {
    pub(crate) datasets: &'a Tensor,
    pub(crate) mean: &'a Tensor,
    pub(crate) invstd: &'a Tensor,
    pub(crate) gamma: &'a Tensor,
    pub(crate) beta: &'a Tensor,
    pub(crate) relu: bool,
}

/// Inference epilogue: `relu?(BN_running(conv) + residual)` per sample's dataset.
pub(crate) struct InferEpilogue<'a> {
    pub(crate) datasets: &'a Tensor,
    pub(crate) mean: &'a Tensor,
    pub(crate) var: &'a Tensor,
    pub(crate) gamma: &'a Tensor,
    pub(crate) beta: &'a Tensor,
    pub(crate) eps: f32,
    pub(crate) relu: bool,
    pub(crate) residual: Option<&'a Tensor>,
}

/// What a fused forward adds around the plain convolution.
#[derive(Default)]
pub(crate) struct Fusion<'a> {
    pub(crate) prologue: Option<Prologue<'a>>,
    /// Training epilogue: per-(sample tile, channel) statistics partials of the output, with
    /// the dataset indices and the number of datasets of the DSBN that consumes them.
    pub(crate) stats: Option<(&'a mut DeviceBuffer, &'a Tensor, usize)>,
    pub(crate) epilogue: Option<InferEpilogue<'a>>,
}

fn check_table(what: &'static str, t: &Tensor, shape: &[usize], x: &Tensor) -> Result<()> {
    check::dtype(what, t, DType::F32)?;
    check::shape(what, t, shape)?;
    check::same_device(x.device(), &[t])
}

fn set_datasets(p: &mut ffi::cdcl_conv_params, datasets: &Tensor, num_datasets: usize, x: &Tensor) -> Result<()> {
    check::dtype("dataset indices", datasets, DType::I32)?;
    check::shape("dataset indices", datasets, &[p.n as usize])?;
    check::same_device(x.device(), &[datasets])?;
    if num_datasets == 0 || num_datasets > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("number of datasets out of range: {num_datasets}")));
    }
    p.dataset = datasets.ptr().cast();
    p.num_datasets = num_datasets as i32;
    Ok(())
}

/// The most datasets a prologue may have: the convolution stages their tables in shared memory
/// (kernels/conv.cu, `kStageDatasets`).
pub(crate) const PROLOGUE_MAX_DATASETS: usize = 8;

fn set_prologue(p: &mut ffi::cdcl_conv_params, pro: &Prologue<'_>, x: &Tensor) -> Result<()> {
    let d = pro.mean.shape().first().copied().unwrap_or(0);
    if d > PROLOGUE_MAX_DATASETS {
        return Err(Error::InvalidArgument(format!(
            "a fused DSBN prologue supports at most {PROLOGUE_MAX_DATASETS} datasets, got {d}"
        )));
    }
    let shape = [d, p.c as usize];
    for (what, t) in [
        ("prologue mean", pro.mean),
        ("prologue invstd", pro.invstd),
        ("prologue gamma", pro.gamma),
        ("prologue beta", pro.beta),
    ] {
        check_table(what, t, &shape, x)?;
    }
    set_datasets(p, pro.datasets, d, x)?;
    p.pro_mean = pro.mean.ptr().cast();
    p.pro_invstd = pro.invstd.ptr().cast();
    p.pro_gamma = pro.gamma.ptr().cast();
    p.pro_beta = pro.beta.ptr().cast();
    p.pro_relu = pro.relu as i32;
    Ok(())
}

/// `y = conv2d(x, weight) + bias`: x `[N, H, W, C]`, weight `[K, R, S, C]`, bias `[K]` f32,
/// returns `[N, P, Q, K]`.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, geometry: &ConvGeometry) -> Result<Tensor> {
    conv2d_fused(x, weight, bias, geometry, Fusion::default())
}

pub(crate) fn conv2d_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geometry: &ConvGeometry,
    fusion: Fusion<'_>,
) -> Result<Tensor> {
    let [n, h, w, c] = check::nhwc("convolution input", x)?;
    let [k, r, s, wc] = filter_shape(weight)?;
    conv_dtype("convolution input", x)?;
    check::dtype("convolution weight", weight, x.dtype())?;
    if wc != c {
        return Err(Error::ShapeMismatch {
            what: "convolution weight",
            expected: vec![k, r, s, c],
            got: weight.shape().to_vec(),
        });
    }
    check::same_device(x.device(), &[weight])?;
    if let Some(b) = bias {
        check::dtype("convolution bias", b, DType::F32)?;
        check::shape("convolution bias", b, &[k])?;
        check::same_device(x.device(), &[b])?;
    }
    let mut p = params(n, h, w, c, k, r, s, geometry)?;
    p.dtype = x.dtype().to_ffi();
    let out_shape = [n, p.p as usize, p.q as usize, k];
    if let Some(pro) = &fusion.prologue {
        set_prologue(&mut p, pro, x)?;
    }
    if let Some(epi) = &fusion.epilogue {
        let d = epi.mean.shape().first().copied().unwrap_or(0);
        for (what, t) in
            [("BN running mean", epi.mean), ("BN running var", epi.var), ("BN gamma", epi.gamma), ("BN beta", epi.beta)]
        {
            check_table(what, t, &[d, k], x)?;
        }
        set_datasets(&mut p, epi.datasets, d, x)?;
        if let Some(r) = epi.residual {
            check::dtype("residual", r, x.dtype())?;
            check::shape("residual", r, &out_shape)?;
            check::same_device(x.device(), &[r])?;
            p.residual = r.ptr();
        }
        p.epi_mean = epi.mean.ptr().cast();
        p.epi_var = epi.var.ptr().cast();
        p.epi_gamma = epi.gamma.ptr().cast();
        p.epi_beta = epi.beta.ptr().cast();
        p.epi_eps = epi.eps;
        p.epi_relu = epi.relu as i32;
    }
    if let Some((stats, datasets, num_datasets)) = fusion.stats {
        set_datasets(&mut p, datasets, num_datasets, x)?;
        let need = crate::ops::dsbn::partials_bytes(out_shape, p.num_datasets as usize, STATS_CHUNK);
        if stats.len() < need {
            return Err(Error::InvalidArgument("statistics partials buffer too small".into()));
        }
        p.stats = stats.as_mut_ptr().cast();
    }
    p.allow_tf32 = x.device().allow_tf32() as i32;
    let mut y = Tensor::uninit(x.device(), &out_shape, x.dtype())?;
    p.x = x.ptr();
    p.weight = weight.ptr();
    p.bias = bias.map_or(std::ptr::null(), |b| b.ptr().cast());
    p.y = y.ptr_mut();
    x.device().launch(&FORWARD, &p)?;
    Ok(y)
}

/// Rows per output tile of the convolution = pixels per statistics chunk of its epilogue.
pub(crate) const STATS_CHUNK: usize = ffi::CDCL_CONV_STATS_CHUNK as usize;

/// Gradient of [`conv2d`] with respect to its input: `dy` `[N, P, Q, K]`, the weight, and the
/// input's spatial size (several input sizes give the same output size when the stride is > 1).
pub fn conv2d_backward_data(
    dy: &Tensor,
    weight: &Tensor,
    input_hw: (usize, usize),
    geometry: &ConvGeometry,
) -> Result<Tensor> {
    let [n, p_out, q_out, k] = check::nhwc("convolution output gradient", dy)?;
    let [wk, r, s, c] = filter_shape(weight)?;
    conv_dtype("convolution output gradient", dy)?;
    check::dtype("convolution weight", weight, dy.dtype())?;
    check::same_device(dy.device(), &[weight])?;
    if wk != k {
        return Err(Error::ShapeMismatch {
            what: "convolution weight",
            expected: vec![k, r, s, c],
            got: weight.shape().to_vec(),
        });
    }
    let (h, w) = input_hw;
    if h == 0 || w == 0 {
        return Err(Error::InvalidShape {
            what: "convolution input size",
            shape: vec![h, w],
            reason: "must be at least 1x1".into(),
        });
    }
    let mut p = params(n, h, w, c, k, r, s, geometry)?;
    if (p.p as usize, p.q as usize) != (p_out, q_out) {
        return Err(Error::ShapeMismatch {
            what: "convolution output gradient",
            expected: vec![n, p.p as usize, p.q as usize, k],
            got: dy.shape().to_vec(),
        });
    }
    p.dtype = dy.dtype().to_ffi();
    p.allow_tf32 = dy.device().allow_tf32() as i32;
    let mut dx = Tensor::uninit(dy.device(), &[n, h, w, c], dy.dtype())?;
    p.dy = dy.ptr();
    p.weight = weight.ptr();
    p.dx = dx.ptr_mut();
    dy.device().launch(&BACKWARD_DATA, &p)?;
    Ok(dx)
}

/// Filter (and optionally bias) gradients of a convolution.
#[derive(Debug)]
pub struct ConvFilterGrads {
    /// Gradient with respect to the weight, `[K, R, S, C]`.
    pub dweight: Tensor,
    /// Gradient with respect to the bias, `[K]` f32, when requested.
    pub dbias: Option<Tensor>,
}

/// Gradient of [`conv2d`] with respect to the weight (`[K, R, S]` taken from `filter_krs`, in
/// the storage type of `x` and `dy`) and, with `with_bias`, the bias (f32). The reduction over
/// N·P·Q is split into fixed slices summed in a fixed order: the same bits on every run.
pub fn conv2d_backward_filter(
    dy: &Tensor,
    x: &Tensor,
    filter_krs: (usize, usize, usize),
    with_bias: bool,
    geometry: &ConvGeometry,
) -> Result<ConvFilterGrads> {
    conv2d_backward_filter_fused(dy, x, filter_krs, with_bias, geometry, None)
}

/// [`conv2d_backward_filter`] whose input is seen through a prologue (recomputed on the fly
/// instead of reading a saved normalised activation).
pub(crate) fn conv2d_backward_filter_fused(
    dy: &Tensor,
    x: &Tensor,
    filter_krs: (usize, usize, usize),
    with_bias: bool,
    geometry: &ConvGeometry,
    prologue: Option<&Prologue<'_>>,
) -> Result<ConvFilterGrads> {
    let [n, h, w, c] = check::nhwc("convolution input", x)?;
    let [dn, p_out, q_out, k] = check::nhwc("convolution output gradient", dy)?;
    conv_dtype("convolution input", x)?;
    check::dtype("convolution output gradient", dy, x.dtype())?;
    check::same_device(x.device(), &[dy])?;
    let (fk, r, s) = filter_krs;
    if fk != k || r == 0 || s == 0 {
        return Err(Error::ShapeMismatch {
            what: "convolution filter",
            expected: vec![k, r.max(1), s.max(1), c],
            got: vec![fk, r, s, c],
        });
    }
    let mut p = params(n, h, w, c, k, r, s, geometry)?;
    if (dn, p_out, q_out) != (n, p.p as usize, p.q as usize) {
        return Err(Error::ShapeMismatch {
            what: "convolution output gradient",
            expected: vec![n, p.p as usize, p.q as usize, k],
            got: dy.shape().to_vec(),
        });
    }
    if let Some(pro) = prologue {
        set_prologue(&mut p, pro, x)?;
    }
    p.dtype = x.dtype().to_ffi();
    let device = x.device();
    p.allow_tf32 = device.allow_tf32() as i32;
    let mut dweight = Tensor::uninit(device, &[k, r, s, c], x.dtype())?;
    let mut dbias = if with_bias { Some(Tensor::uninit(device, &[k], DType::F32)?) } else { None };
    p.x = x.ptr();
    p.dy = dy.ptr();
    p.dweight = dweight.ptr_mut();
    p.dbias = dbias.as_mut().map_or(std::ptr::null_mut(), |b| b.ptr_mut().cast());
    let mut ws = DeviceBuffer::uninit_words(device, workspace_bytes(ffi::cdcl_emu_conv_workspace_bytes, &p))?;
    p.workspace = ws.as_mut_ptr().cast();
    device.launch(&BACKWARD_FILTER, &p)?;
    Ok(ConvFilterGrads { dweight, dbias })
}
