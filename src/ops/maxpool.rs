//! 2-D max pooling over NHWC activations with PyTorch's `max_pool2d(..., return_indices=True)`
//! semantics (floor mode, no dilation): padding never wins (it counts as −∞), the first maximum
//! of a window in row-major order wins a tie, and a NaN in a window propagates (the last NaN
//! gives the index). Indices are `i32`, flat `h·W + w` within each (sample, channel) plane.
//! The backward is a gather: every input element sums the output gradients whose index names
//! it, in a fixed order, so it is deterministic without atomics. f32, f16 and bf16 storage.
//!
//! Kernels: `kernels/maxpool.cu`. Reference: [`crate::reference::maxpool`].

use crate::device::{launcher, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::tensor::{DType, Tensor};

/// Window size, stride and padding of a max pooling, (height, width) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGeometry {
    /// Window size (≥ 1).
    pub kernel: (usize, usize),
    /// Step between windows (≥ 1).
    pub stride: (usize, usize),
    /// Implicit −∞ padding on each side, at most half the window (as PyTorch requires).
    pub padding: (usize, usize),
}

impl Default for PoolGeometry {
    /// The ResNet stem: 3×3, stride 2, padding 1.
    fn default() -> Self {
        PoolGeometry::square(3, 2, 1)
    }
}

impl PoolGeometry {
    /// The same window, stride and padding on both axes.
    pub fn square(kernel: usize, stride: usize, padding: usize) -> Self {
        PoolGeometry { kernel: (kernel, kernel), stride: (stride, stride), padding: (padding, padding) }
    }

    /// Output (P, Q) for an H×W input, or an error for a geometry PyTorch rejects too.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let g = self;
        if g.kernel.0 == 0 || g.kernel.1 == 0 || g.stride.0 == 0 || g.stride.1 == 0 {
            return Err(Error::InvalidArgument(format!("pooling window and stride must be at least 1: {g:?}")));
        }
        if 2 * g.padding.0 > g.kernel.0 || 2 * g.padding.1 > g.kernel.1 {
            return Err(Error::InvalidArgument(format!("pooling padding must be at most half the window: {g:?}")));
        }
        let fits = |v: usize| v <= i32::MAX as usize;
        if ![g.kernel.0, g.kernel.1, g.stride.0, g.stride.1, g.padding.0, g.padding.1].into_iter().all(fits) {
            return Err(Error::InvalidArgument(format!("pooling geometry too large for 32-bit indexing: {g:?}")));
        }
        let axis = |len: usize, k: usize, s: usize, pad: usize| {
            let padded = len.checked_add(2 * pad)?;
            (padded >= k).then(|| (padded - k) / s + 1)
        };
        match (axis(h, g.kernel.0, g.stride.0, g.padding.0), axis(w, g.kernel.1, g.stride.1, g.padding.1)) {
            (Some(p), Some(q)) if fits(p) && fits(q) => Ok((p, q)),
            _ => Err(Error::InvalidShape {
                what: "max pooling",
                shape: vec![h, w],
                reason: format!("a {:?} window does not fit the padded input", g.kernel),
            }),
        }
    }
}

/// Output of [`max_pool2d`].
#[derive(Debug)]
pub struct MaxPoolOutput {
    /// The maxima, `[N, P, Q, C]`, same dtype as the input.
    pub y: Tensor,
    /// `[N, P, Q, C]` i32: flat index `h·W + w` of each maximum within its (sample, channel) plane.
    pub indices: Tensor,
}

const FORWARD: Launcher<ffi::cdcl_maxpool_params> =
    launcher!(maxpool_forward: cdcl_emu_maxpool_forward, cdcl_cuda_maxpool_forward);
const BACKWARD: Launcher<ffi::cdcl_maxpool_params> =
    launcher!(maxpool_backward: cdcl_emu_maxpool_backward, cdcl_cuda_maxpool_backward);

fn params(n: usize, h: usize, w: usize, c: usize, g: &PoolGeometry, dtype: DType) -> Result<ffi::cdcl_maxpool_params> {
    let (p, q) = g.output_size(h, w)?;
    if h.checked_mul(w).is_none_or(|hw| hw > i32::MAX as usize) {
        return Err(Error::InvalidShape {
            what: "max pooling input",
            shape: vec![n, h, w, c],
            reason: "H·W must fit the i32 indices".into(),
        });
    }
    Ok(ffi::cdcl_maxpool_params {
        n: n as i32,
        h: h as i32,
        w: w as i32,
        c: c as i32,
        p: p as i32,
        q: q as i32,
        kernel_h: g.kernel.0 as i32,
        kernel_w: g.kernel.1 as i32,
        stride_h: g.stride.0 as i32,
        stride_w: g.stride.1 as i32,
        pad_h: g.padding.0 as i32,
        pad_w: g.padding.1 as i32,
        dtype: dtype.to_ffi(),
        ..Default::default()
    })
}

fn float_storage(what: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { what, dtype: t.dtype() })
    }
}

/// Max pooling forward: `x` `[N, H, W, C]` f32/f16/bf16 → maxima and their indices.
pub fn max_pool2d(x: &Tensor, geometry: &PoolGeometry) -> Result<MaxPoolOutput> {
    let [n, h, w, c] = check::nhwc("max pooling input", x)?;
    float_storage("max pooling input", x)?;
    let mut p = params(n, h, w, c, geometry, x.dtype())?;
    let out = [n, p.p as usize, p.q as usize, c];
    let mut y = Tensor::uninit(x.device(), &out, x.dtype())?;
    let mut indices = Tensor::uninit(x.device(), &out, DType::I32)?;
    p.x = x.ptr();
    p.y = y.ptr_mut();
    p.indices = indices.ptr_mut().cast();
    x.device().launch(&FORWARD, &p)?;
    Ok(MaxPoolOutput { y, indices })
}

/// Max pooling backward: `dy` `[N, P, Q, C]` and the forward's `indices`, for an input of
/// `input_hw` = (H, W) pooled with `geometry`; returns `dx` `[N, H, W, C]` like `dy`.
///
/// Gather form: `dx[n, h, w, c]` is the sum, in (p, q) order, of `dy[n, p, q, c]` over the
/// outputs whose window covers (h, w) and whose index is `h·W + w`. Indices produced by
/// [`max_pool2d`] always lie in their window; an index that does not (not one the forward wrote)
/// sends its gradient nowhere, where PyTorch's scatter would send it anywhere in the plane.
pub fn max_pool2d_backward(
    dy: &Tensor,
    indices: &Tensor,
    input_hw: (usize, usize),
    geometry: &PoolGeometry,
) -> Result<Tensor> {
    let [n, p_out, q_out, c] = check::nhwc("max pooling output gradient", dy)?;
    float_storage("max pooling output gradient", dy)?;
    check::dtype("max pooling indices", indices, DType::I32)?;
    check::shape("max pooling indices", indices, dy.shape())?;
    check::same_device(dy.device(), &[indices])?;
    let (h, w) = input_hw;
    if h == 0 || w == 0 || h > i32::MAX as usize || w > i32::MAX as usize {
        return Err(Error::InvalidShape {
            what: "max pooling input",
            shape: vec![n, h, w, c],
            reason: "every dimension must be in 1..=i32::MAX".into(),
        });
    }
    let mut p = params(n, h, w, c, geometry, dy.dtype())?;
    if (p.p as usize, p.q as usize) != (p_out, q_out) {
        return Err(Error::ShapeMismatch {
            what: "max pooling output gradient",
            expected: vec![n, p.p as usize, p.q as usize, c],
            got: dy.shape().to_vec(),
        });
    }
    let mut dx = Tensor::uninit(dy.device(), &[n, h, w, c], dy.dtype())?;
    p.dy = dy.ptr();
    // Read-only in the backward kernel.
    p.indices = indices.ptr().cast_mut().cast();
    p.dx = dx.ptr_mut();
    dy.device().launch(&BACKWARD, &p)?;
    Ok(dx)
}
