//! The building blocks of PSPNet's pyramid pooling module over NHWC activations: adaptive
//! average pooling and bilinear resize, forward and backward.
//!
//! Semantics follow PyTorch's `adaptive_avg_pool2d` (bin `i` of `Out` covers input indices
//! `floor(i·In/Out) .. ceil((i+1)·In/Out)`) and `interpolate(mode="bilinear")` with an output
//! size, `align_corners` either way. Storage is f32, f16 or bf16; arithmetic is f32.
//!
//! Both forwards can write into a **channel slice** of a larger output: the `_into` functions
//! take the output tensor `[N, Ho, Wo, C_total]` and a channel offset, write channels
//! `offset .. offset + C` and leave every other element untouched, so the branches of a pyramid
//! are concatenated without copies. The backwards read `dy` from the same kind of slice.
//! Backwards are gathers with a fixed summation order: results are bitwise reproducible.
//!
//! Kernels: `kernels/pool.cu`. Reference: [`crate::reference::pool`].

use crate::device::{launcher, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::tensor::Tensor;

/// Levels one launch of [`adaptive_avg_pool_backward_sum`] takes (more are chained).
const PPM_MAX_LEVELS: usize = ffi::CDCL_PPM_MAX_LEVELS as usize;

const POOL_FORWARD: Launcher<ffi::cdcl_pool_params> =
    launcher!(adaptive_avg_pool_forward: cdcl_emu_adaptive_avg_pool_forward, cdcl_cuda_adaptive_avg_pool_forward);
const POOL_BACKWARD: Launcher<ffi::cdcl_pool_params> =
    launcher!(adaptive_avg_pool_backward: cdcl_emu_adaptive_avg_pool_backward, cdcl_cuda_adaptive_avg_pool_backward);
const RESIZE_FORWARD: Launcher<ffi::cdcl_pool_params> =
    launcher!(resize_bilinear_forward: cdcl_emu_resize_bilinear_forward, cdcl_cuda_resize_bilinear_forward);
const RESIZE_BACKWARD: Launcher<ffi::cdcl_pool_params> =
    launcher!(resize_bilinear_backward: cdcl_emu_resize_bilinear_backward, cdcl_cuda_resize_bilinear_backward);

const PPM_BACKWARD: Launcher<ffi::cdcl_ppm_backward_params> =
    launcher!(ppm_pool_backward: cdcl_emu_ppm_pool_backward, cdcl_cuda_ppm_pool_backward);

/// Largest spatial size of a bilinear resize: its source indices are f32 (as PyTorch's), exact
/// integers only up to 2^24.
pub const MAX_RESIZE_DIM: usize = 1 << 24;

/// Which op a geometry is checked for (names in errors, the resize size limit).
#[derive(Clone, Copy)]
enum Op {
    Pool,
    Resize,
}

impl Op {
    fn input(self) -> &'static str {
        match self {
            Op::Pool => "adaptive_avg_pool input",
            Op::Resize => "resize_bilinear input",
        }
    }
    fn output(self) -> &'static str {
        match self {
            Op::Pool => "adaptive_avg_pool output",
            Op::Resize => "resize_bilinear output",
        }
    }
    fn input_grad(self) -> &'static str {
        match self {
            Op::Pool => "adaptive_avg_pool input gradient",
            Op::Resize => "resize_bilinear input gradient",
        }
    }
    fn output_grad(self) -> &'static str {
        match self {
            Op::Pool => "adaptive_avg_pool output gradient",
            Op::Resize => "resize_bilinear output gradient",
        }
    }
}

/// Checks the pair (input `[N, H, W, C]`, output `[N, Ho, Wo, C_total]` with the op's channels at
/// `offset`) and fills the Params geometry. `input` is a tensor's shape or the shape a backward
/// was asked to produce; `outer` is the (possibly larger) output or output-gradient tensor.
fn geometry(
    op: Op,
    input_what: &'static str,
    input: [usize; 4],
    outer_what: &'static str,
    outer: &Tensor,
    channel_offset: usize,
) -> Result<ffi::cdcl_pool_params> {
    let [n, h, w, c] = input;
    let [on, oh, ow, total] = check::nhwc(outer_what, outer)?;
    if on != n {
        return Err(Error::ShapeMismatch {
            what: outer_what,
            expected: vec![n, oh, ow, total],
            got: outer.shape().to_vec(),
        });
    }
    if channel_offset.checked_add(c).is_none_or(|end| end > total) {
        return Err(Error::InvalidArgument(format!(
            "{outer_what}: channel slice {channel_offset}..{} of {input_what} does not fit in its {total} channels",
            channel_offset.saturating_add(c)
        )));
    }
    if matches!(op, Op::Resize) && [h, w, oh, ow].iter().any(|&d| d > MAX_RESIZE_DIM) {
        return Err(Error::InvalidShape {
            what: input_what,
            shape: vec![n, h, w, c, oh, ow],
            reason: format!("bilinear resize supports spatial sizes up to {MAX_RESIZE_DIM} (f32 source indices)"),
        });
    }
    Ok(ffi::cdcl_pool_params {
        n: n as i32,
        c: c as i32,
        in_h: h as i32,
        in_w: w as i32,
        out_h: oh as i32,
        out_w: ow as i32,
        out_c_total: total as i32,
        out_c_offset: channel_offset as i32,
        dtype: outer.dtype().to_ffi(),
        ..Default::default()
    })
}

/// A float NHWC input.
fn float_input(what: &'static str, x: &Tensor) -> Result<[usize; 4]> {
    let dims = check::nhwc(what, x)?;
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType { what, dtype: x.dtype() });
    }
    Ok(dims)
}

fn forward_into(
    op: Op,
    launcher: &Launcher<ffi::cdcl_pool_params>,
    x: &Tensor,
    out: &mut Tensor,
    channel_offset: usize,
    align_corners: bool,
) -> Result<()> {
    let dims = float_input(op.input(), x)?;
    check::dtype(op.output(), out, x.dtype())?;
    check::same_device(x.device(), &[out])?;
    let mut p = geometry(op, op.input(), dims, op.output(), out, channel_offset)?;
    p.align_corners = align_corners as i32;
    p.x = x.ptr();
    p.y = out.ptr_mut();
    x.device().launch(launcher, &p)
}

fn backward(
    op: Op,
    launcher: &Launcher<ffi::cdcl_pool_params>,
    dy: &Tensor,
    channel_offset: usize,
    input_shape: &[usize],
    align_corners: bool,
) -> Result<Tensor> {
    float_input(op.output_grad(), dy)?;
    // The shape of dx: checked like a tensor's before anything is allocated.
    let dims: [usize; 4] = input_shape.try_into().map_err(|_| Error::InvalidShape {
        what: op.input_grad(),
        shape: input_shape.to_vec(),
        reason: "expected 4 dimensions, NHWC".into(),
    })?;
    let numel = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if dims.contains(&0)
        || dims.iter().any(|&d| d > i32::MAX as usize)
        || numel.is_none_or(|e| e > i64::MAX as usize / 8)
    {
        return Err(Error::InvalidShape {
            what: op.input_grad(),
            shape: input_shape.to_vec(),
            reason: "every dimension must be in 1..=i32::MAX, and the element count fit in 64-bit indexing".into(),
        });
    }
    let mut p = geometry(op, op.input_grad(), dims, op.output_grad(), dy, channel_offset)?;
    let mut dx = Tensor::uninit(dy.device(), input_shape, dy.dtype())?;
    p.align_corners = align_corners as i32;
    p.dy = dy.ptr();
    p.dx = dx.ptr_mut();
    dy.device().launch(launcher, &p)?;
    Ok(dx)
}

fn new_output(op: Op, x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let [n, _, _, c] = float_input(op.input(), x)?;
    if out_h == 0 || out_w == 0 {
        return Err(Error::InvalidShape {
            what: op.output(),
            shape: vec![n, out_h, out_w, c],
            reason: "every dimension must be at least 1".into(),
        });
    }
    Tensor::uninit(x.device(), &[n, out_h, out_w, c], x.dtype())
}

/// Adaptive average pooling of `x` `[N, H, W, C]` into channels
/// `channel_offset .. channel_offset + C` of `out` `[N, Ho, Wo, C_total]` (same dtype, same
/// device); the output size is `out`'s. Other channels of `out` are left as they are.
pub fn adaptive_avg_pool_into(x: &Tensor, out: &mut Tensor, channel_offset: usize) -> Result<()> {
    forward_into(Op::Pool, &POOL_FORWARD, x, out, channel_offset, false)
}

/// Adaptive average pooling of `x` `[N, H, W, C]` (f32/f16/bf16) to a new `[N, out_h, out_w, C]`.
pub fn adaptive_avg_pool(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let mut out = new_output(Op::Pool, x, out_h, out_w)?;
    adaptive_avg_pool_into(x, &mut out, 0)?;
    Ok(out)
}

/// Backward of [`adaptive_avg_pool_into`]: the gradient `dy` of the whole output tensor
/// `[N, Ho, Wo, C_total]`, of which channels `channel_offset .. channel_offset + C` belong to this
/// pooling; returns `dx` of `input_shape` `[N, H, W, C]` in `dy`'s dtype.
pub fn adaptive_avg_pool_backward(dy: &Tensor, channel_offset: usize, input_shape: &[usize]) -> Result<Tensor> {
    backward(Op::Pool, &POOL_BACKWARD, dy, channel_offset, input_shape, false)
}

/// Bilinear resize of `x` `[N, H, W, C]` into channels `channel_offset .. channel_offset + C` of
/// `out` `[N, Ho, Wo, C_total]` (same dtype, same device); the output size is `out`'s. Other
/// channels of `out` are left as they are. `align_corners` as in PyTorch.
pub fn resize_bilinear_into(x: &Tensor, out: &mut Tensor, channel_offset: usize, align_corners: bool) -> Result<()> {
    forward_into(Op::Resize, &RESIZE_FORWARD, x, out, channel_offset, align_corners)
}

/// Bilinear resize of `x` `[N, H, W, C]` (f32/f16/bf16) to a new `[N, out_h, out_w, C]`.
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize, align_corners: bool) -> Result<Tensor> {
    let mut out = new_output(Op::Resize, x, out_h, out_w)?;
    resize_bilinear_into(x, &mut out, 0, align_corners)?;
    Ok(out)
}

/// Backward of [`resize_bilinear_into`]: the gradient `dy` of the whole output tensor
/// `[N, Ho, Wo, C_total]`, of which channels `channel_offset .. channel_offset + C` belong to this
/// resize; returns `dx` of `input_shape` `[N, H, W, C]` in `dy`'s dtype.
pub fn resize_bilinear_backward(
    dy: &Tensor,
    channel_offset: usize,
    input_shape: &[usize],
    align_corners: bool,
) -> Result<Tensor> {
    backward(Op::Resize, &RESIZE_BACKWARD, dy, channel_offset, input_shape, align_corners)
}

/// The input gradient of a pyramid of adaptive average poolings of one input next to an
/// identity branch (PSPNet's pyramid pooling module), in one pass over the input:
/// `dx = base[.., .., .., 0..C] + Σ_l adaptive_avg_pool_backward(levels[l])`, the levels added in
/// order. `base` is `[N, H, W, C_total]` with `C_total >= C` (the module's output gradient,
/// whose first `C` channels are the identity's), each level `[N, b_h, b_w, C]` (any sizes),
/// `input_shape` `[N, H, W, C]`; one dtype and one device. In f32 storage the result equals
/// [`adaptive_avg_pool_backward`] of each level followed by element-wise adds in level order,
/// bit for bit (in 16-bit storage the sum stays in f32 and is rounded once), while reading each
/// source once and writing `dx` once (per `CDCL_PPM_MAX_LEVELS` = 8 levels; more levels chain
/// launches, each rounding to the storage type).
pub fn adaptive_avg_pool_backward_sum(base: &Tensor, levels: &[&Tensor], input_shape: &[usize]) -> Result<Tensor> {
    const WHAT: &str = "pyramid pooling input gradient";
    let [n, h, w, total] = float_input("pyramid pooling base gradient", base)?;
    let dims: [usize; 4] = input_shape.try_into().map_err(|_| Error::InvalidShape {
        what: WHAT,
        shape: input_shape.to_vec(),
        reason: "expected 4 dimensions, NHWC".into(),
    })?;
    let c = dims[3];
    if dims[..3] != [n, h, w] || c == 0 || c > total {
        return Err(Error::InvalidShape {
            what: WHAT,
            shape: input_shape.to_vec(),
            reason: format!("expected [{n}, {h}, {w}, C] with 1 <= C <= {total} (the base gradient's channels)"),
        });
    }
    for l in levels {
        let [ln, _, _, lc] = float_input("pyramid pooling level gradient", l)?;
        if ln != n || lc != c {
            return Err(Error::ShapeMismatch {
                what: "pyramid pooling level gradient",
                expected: vec![n, l.shape()[1], l.shape()[2], c],
                got: l.shape().to_vec(),
            });
        }
        check::dtype("pyramid pooling level gradient", l, base.dtype())?;
        check::same_device(base.device(), &[l])?;
    }
    let mut dx = Tensor::uninit(base.device(), input_shape, base.dtype())?;
    let mut chunks = levels.chunks(PPM_MAX_LEVELS);
    // The first launch reads the identity slice of `base`; later ones (more than 8 levels) add
    // to the partial result, which is then the base.
    let mut prev: Option<Tensor> = None;
    loop {
        let chunk = chunks.next().unwrap_or(&[]);
        let mut p = ffi::cdcl_ppm_backward_params {
            n: n as i32,
            h: h as i32,
            w: w as i32,
            c: c as i32,
            num_levels: chunk.len() as i32,
            dtype: base.dtype().to_ffi(),
            ..Default::default()
        };
        match &prev {
            None => {
                p.base = base.ptr();
                p.base_c_total = total as i32;
            }
            Some(t) => {
                p.base = t.ptr();
                p.base_c_total = c as i32;
            }
        }
        for (i, l) in chunk.iter().enumerate() {
            p.out_h[i] = l.shape()[1] as i32;
            p.out_w[i] = l.shape()[2] as i32;
            p.dpooled[i] = l.ptr();
        }
        p.dx = dx.ptr_mut();
        base.device().launch(&PPM_BACKWARD, &p)?;
        if chunks.len() == 0 {
            return Ok(dx);
        }
        let next = Tensor::uninit(base.device(), input_shape, base.dtype())?;
        prev = Some(std::mem::replace(&mut dx, next));
    }
}
