//! Argument checks shared by the ops.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

pub(crate) fn dtype(what: &'static str, t: &Tensor, expected: DType) -> Result<()> {
    if t.dtype() == expected {
        Ok(())
    } else {
        Err(Error::DTypeMismatch { what, expected, got: t.dtype() })
    }
}

pub(crate) fn shape(what: &'static str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.shape() == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { what, expected: expected.to_vec(), got: t.shape().to_vec() })
    }
}

pub(crate) fn same_device(device: &Device, tensors: &[&Tensor]) -> Result<()> {
    tensors.iter().try_for_each(|t| device.check_same(t.device()))
}

/// A 4-D NHWC activation with every dimension in 1..=i32::MAX and an element count whose
/// linear index fits in i64 (what the kernels index with).
pub(crate) fn nhwc(what: &'static str, t: &Tensor) -> Result<[usize; 4]> {
    nhwc_dims(what, t.shape())
}

/// [`nhwc`] on a bare shape (for tensors that are not device tensors, as the CPU backend's).
pub(crate) fn nhwc_dims(what: &'static str, s: &[usize]) -> Result<[usize; 4]> {
    let bad = |reason: &str| Err(Error::InvalidShape { what, shape: s.to_vec(), reason: reason.into() });
    if s.len() != 4 {
        return bad("expected 4 dimensions, NHWC");
    }
    if s.contains(&0) {
        return bad("every dimension must be at least 1");
    }
    let numel = s.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if s.iter().any(|&d| d > i32::MAX as usize) || numel.is_none_or(|n| n > i64::MAX as usize / 8) {
        return bad("too large for 32-bit dimensions");
    }
    Ok([s[0], s[1], s[2], s[3]])
}

pub(crate) fn finite_positive(what: &str, v: f32) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} must be finite and positive, got {v}")))
    }
}
