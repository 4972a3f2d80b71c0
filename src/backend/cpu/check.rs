//! Argument checks of the CPU backend (the `ops` functions' error variants and names), the ReLU
//! it shares between ops, and how it splits per-channel reductions into ordered partials.

use std::ops::Range;

use rayon::prelude::*;

use super::tensor::CpuTensor;
use crate::error::{Error, Result};
use crate::ops::check;
use crate::tensor::DType;

/// The elements of an f32 tensor (tables, biases, optimiser state), or `DTypeMismatch`.
pub(crate) fn f32_of<'a>(what: &'static str, t: &'a CpuTensor) -> Result<&'a [f32]> {
    if t.dtype() != DType::F32 {
        return Err(Error::DTypeMismatch { what, expected: DType::F32, got: t.dtype() });
    }
    t.as_f32().ok_or(Error::DTypeMismatch { what, expected: DType::F32, got: t.dtype() })
}

/// The values of a float tensor of any storage type, or `UnsupportedDType` (an op input that
/// has no integer kernel).
pub(crate) fn float_of<'a>(what: &'static str, t: &'a CpuTensor) -> Result<&'a [f32]> {
    t.as_f32().ok_or(Error::UnsupportedDType { what, dtype: t.dtype() })
}

/// The values of a float tensor that must have the storage type `dtype` (the second operand of
/// an op), or `DTypeMismatch`.
pub(crate) fn float_as<'a>(what: &'static str, t: &'a CpuTensor, dtype: DType) -> Result<&'a [f32]> {
    same_dtype(what, t, dtype)?;
    float_of(what, t)
}

pub(crate) fn i32_of<'a>(what: &'static str, t: &'a CpuTensor) -> Result<&'a [i32]> {
    t.as_i32().ok_or(Error::DTypeMismatch { what, expected: DType::I32, got: t.dtype() })
}

pub(crate) fn same_dtype(what: &'static str, t: &CpuTensor, expected: DType) -> Result<()> {
    if t.dtype() == expected {
        Ok(())
    } else {
        Err(Error::DTypeMismatch { what, expected, got: t.dtype() })
    }
}

pub(crate) fn shape_is(what: &'static str, t: &CpuTensor, expected: &[usize]) -> Result<()> {
    if t.shape() == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { what, expected: expected.to_vec(), got: t.shape().to_vec() })
    }
}

/// A 4-D NHWC tensor with every dimension in 1..=i32::MAX (as `ops::check::nhwc`).
pub(crate) fn nhwc(what: &'static str, t: &CpuTensor) -> Result<[usize; 4]> {
    check::nhwc_dims(what, t.shape())
}

/// Every index in `0..num_datasets`, else the first bad one (before anything is written).
pub(crate) fn dataset_indices(datasets: &[i32], num_datasets: usize) -> Result<Vec<usize>> {
    datasets
        .iter()
        .enumerate()
        .map(|(sample, &index)| {
            if index >= 0 && (index as usize) < num_datasets {
                Ok(index as usize)
            } else {
                Err(Error::DatasetIndexOutOfRange { sample, index: index as i64, num_datasets })
            }
        })
        .collect()
}

/// PyTorch's ReLU: NaN passes through.
pub(crate) fn relu(v: f64) -> f64 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

pub(crate) fn relu32(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

/// Pixels per partial sum of the per-channel reductions: partials are per (sample, chunk of
/// this many pixels), merged in (sample, chunk) order.
pub(crate) const PIXEL_CHUNK: usize = 2048;

/// `f` over every (sample, pixel range) chunk of an `n × hw` batch, in parallel; the results in
/// (sample, chunk) order.
pub(crate) fn per_pixel_chunk<T: Send>(
    n: usize,
    hw: usize,
    f: impl Fn(usize, Range<usize>) -> T + Sync + Send,
) -> Vec<(usize, T)> {
    let chunks = hw.div_ceil(PIXEL_CHUNK);
    (0..n * chunks)
        .into_par_iter()
        .map(|i| {
            let (sample, j) = (i / chunks, i % chunks);
            let range = j * PIXEL_CHUNK..((j + 1) * PIXEL_CHUNK).min(hw);
            (sample, f(sample, range))
        })
        .collect()
}
