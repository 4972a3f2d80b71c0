//! Dropout2d (PyTorch's `nn.Dropout2d` in training mode) over NHWC activations: each channel of
//! each sample is dropped (all its values become 0) with probability `p`, and kept channels are
//! scaled by `1 / (1 − p)`. The decision for (seed, sample n, channel c) is a counter-based hash,
//! the same on every device and in [`crate::reference::dropout::keep`]:
//! `h = splitmix64 output number n·2³² + c of the stream seeded with seed`,
//! dropped ⇔ `(h >> 40) / 2²⁴ < p`. So a (seed, p) pair reproduces the mask exactly, and the
//! backward recomputes it instead of storing it. Dropped channels are exact zeros (also where
//! the input is inf or NaN). f32, f16 and bf16 storage.
//!
//! Kernels: `kernels/dropout.cu`. Reference: [`crate::reference::dropout`].

use crate::device::{launcher, workspace_bytes, DeviceBuffer, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::tensor::Tensor;

/// Drop probability and the seed of the mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout2dOptions {
    /// Probability that a (sample, channel) is dropped, in [0, 1]. Default 0.1.
    pub p: f32,
    /// Seed of the mask: use a fresh one per training step, the same one for the backward.
    pub seed: u64,
}

impl Default for Dropout2dOptions {
    fn default() -> Self {
        Dropout2dOptions { p: 0.1, seed: 0 }
    }
}

const DROPOUT2D: Launcher<ffi::cdcl_dropout_params> = launcher!(dropout2d: cdcl_emu_dropout2d, cdcl_cuda_dropout2d);

fn run(what: &'static str, x: &Tensor, opts: &Dropout2dOptions) -> Result<Tensor> {
    let [n, h, w, c] = check::nhwc(what, x)?;
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType { what, dtype: x.dtype() });
    }
    if !(0.0..=1.0).contains(&opts.p) {
        return Err(Error::InvalidArgument(format!("dropout probability must be in [0, 1], got {}", opts.p)));
    }
    let device = x.device();
    let mut y = Tensor::uninit(device, x.shape(), x.dtype())?;
    let mut p = ffi::cdcl_dropout_params {
        n: n as i32,
        h: h as i32,
        w: w as i32,
        c: c as i32,
        dtype: x.dtype().to_ffi(),
        p: opts.p,
        seed: opts.seed,
        x: x.ptr(),
        y: y.ptr_mut(),
        ..Default::default()
    };
    let mut ws = DeviceBuffer::uninit_words(device, workspace_bytes(ffi::cdcl_emu_dropout_workspace_bytes, &p))?;
    p.workspace = ws.as_mut_ptr().cast();
    device.launch(&DROPOUT2D, &p)?;
    Ok(y)
}

/// Dropout2d forward: `x` `[N, H, W, C]` → `y` like `x`.
pub fn dropout2d(x: &Tensor, opts: &Dropout2dOptions) -> Result<Tensor> {
    run("dropout input", x, opts)
}

/// Dropout2d backward: the same mask and scale applied to `dy` (pass the forward's options).
pub fn dropout2d_backward(dy: &Tensor, opts: &Dropout2dOptions) -> Result<Tensor> {
    run("dropout output gradient", dy, opts)
}
