//! Element-wise ops of a residual network: the residual add, ReLU, the fused add + ReLU of a
//! ResNet block's tail, and the ReLU backward. Any shape (the tensors are treated as flat),
//! f32 / f16 / bf16 storage, f32 math, one rounding to the storage type.
//!
//! ReLU follows PyTorch: `relu(NaN) = NaN`. The backward mask comes from the forward **output**
//! `y` (PyTorch's `threshold_backward` on the result): `dx = dy` where `y > 0` or `y` is NaN,
//! else 0. Backward of the ops:
//! - [`add`]: both inputs receive `dy` unchanged (no kernel needed);
//! - [`relu`]: `dx = relu_backward(dy, y)`;
//! - [`add_relu`]: `da = db = relu_backward(dy, y)`.
//!
//! Kernels: `kernels/elementwise.cu`. Reference: [`crate::reference::elementwise`].

use crate::device::{launcher, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::tensor::Tensor;

type EltLauncher = Launcher<ffi::cdcl_eltwise_params>;
const ADD: EltLauncher = launcher!(eltwise_add: cdcl_emu_eltwise_add, cdcl_cuda_eltwise_add);
const RELU: EltLauncher = launcher!(eltwise_relu: cdcl_emu_eltwise_relu, cdcl_cuda_eltwise_relu);
const ADD_RELU: EltLauncher = launcher!(eltwise_add_relu: cdcl_emu_eltwise_add_relu, cdcl_cuda_eltwise_add_relu);
const RELU_BACKWARD: EltLauncher =
    launcher!(eltwise_relu_backward: cdcl_emu_eltwise_relu_backward, cdcl_cuda_eltwise_relu_backward);

fn float_storage(what: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::UnsupportedDType { what, dtype: t.dtype() })
    }
}

/// Checks `a` (and `b`, same shape, dtype and device), runs `launcher`, returns `y` like `a`.
fn run(launcher: &EltLauncher, what: &'static str, a: &Tensor, b: Option<(&'static str, &Tensor)>) -> Result<Tensor> {
    float_storage(what, a)?;
    if let Some((bwhat, b)) = b {
        check::dtype(bwhat, b, a.dtype())?;
        check::shape(bwhat, b, a.shape())?;
        check::same_device(a.device(), &[b])?;
    }
    let mut y = Tensor::uninit(a.device(), a.shape(), a.dtype())?;
    let numel = a.numel();
    if numel == 0 {
        return Ok(y);
    }
    if numel > i64::MAX as usize / 8 {
        return Err(Error::InvalidShape { what, shape: a.shape().to_vec(), reason: "too many elements".into() });
    }
    let p = ffi::cdcl_eltwise_params {
        numel: numel as i64,
        dtype: a.dtype().to_ffi(),
        a: a.ptr(),
        b: b.map_or(std::ptr::null(), |(_, b)| b.ptr()),
        y: y.ptr_mut(),
    };
    a.device().launch(launcher, &p)?;
    Ok(y)
}

/// `a + b` (the residual add): same shape, dtype and device.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    run(&ADD, "residual add input", a, Some(("residual add second input", b)))
}

/// `relu(x)`, NaN passing through.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    run(&RELU, "ReLU input", x, None)
}

/// `relu(a + b)` in one pass (the tail of a ResNet block), the sum kept in f32.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    run(&ADD_RELU, "add+ReLU input", a, Some(("add+ReLU second input", b)))
}

/// ReLU backward with the mask from the forward output `y`: `dx = dy` where `y > 0` or `y` is
/// NaN, else 0. Serves [`relu`] and both inputs of [`add_relu`].
pub fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    run(&RELU_BACKWARD, "ReLU output gradient", dy, Some(("ReLU forward output", y)))
}
