//! [`CpuTensor`]: a shape and host data, f32 values in f32, f16 or bf16 storage, or i32; and the
//! DSBN tables and saved statistics of the CPU backend.

use std::fmt;

use half::{bf16, f16};

use crate::backend::{BnStats, BnTables, TensorLike};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The elements of a [`CpuTensor`].
#[derive(Clone)]
pub enum CpuData {
    /// Floats (activations, weights, gradients, statistics), held as f32 values that the
    /// tensor's storage type can represent exactly.
    F32(Vec<f32>),
    /// 32-bit integers (dataset indices, labels, max-pooling indices, predictions).
    I32(Vec<i32>),
}

/// A tensor in host memory: a row-major shape, its elements, and their storage type. A 16-bit
/// tensor holds f32 values rounded to f16 or bf16 (what the device would store), so every op
/// computes on f32 and rounds its output once to the storage type, as the kernels do.
#[derive(Clone)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: CpuData,
    dtype: DType,
}

pub(crate) fn numel_of(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| Error::InvalidShape {
        what: "tensor",
        shape: shape.to_vec(),
        reason: "element count overflows usize".into(),
    })
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    let n = numel_of(shape)?;
    if n != len {
        return Err(Error::InvalidShape {
            what: "tensor data",
            shape: shape.to_vec(),
            reason: format!("shape holds {n} elements but {len} were given"),
        });
    }
    Ok(())
}

/// `v` rounded to the nearest value of storage `dtype` (ties to even; overflow to ±∞, as the
/// kernels' `__float2half_rn` / `__float2bfloat16_rn`), back in f32.
pub(crate) fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Rounds every element of `v` to `dtype` in place.
pub(crate) fn round_all(dtype: DType, v: &mut [f32]) {
    use rayon::prelude::*;
    if matches!(dtype, DType::F16 | DType::BF16) {
        v.par_iter_mut().for_each(|x| *x = round_to(dtype, *x));
    }
}

impl CpuTensor {
    /// An f32 tensor owning `data` (`shape.iter().product()` elements, row-major).
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        check_len(shape, data.len())?;
        Ok(CpuTensor { shape: shape.to_vec(), data: CpuData::F32(data), dtype: DType::F32 })
    }

    /// A float tensor of storage `dtype` (f32, f16 or bf16) from f32 values, each rounded to it.
    pub fn from_float(shape: &[usize], data: Vec<f32>, dtype: DType) -> Result<Self> {
        check_len(shape, data.len())?;
        if !dtype.is_float() {
            return Err(Error::UnsupportedDType { what: "float tensor", dtype });
        }
        Ok(CpuTensor::float(shape.to_vec(), data, dtype))
    }

    /// An i32 tensor owning `data` (`shape.iter().product()` elements, row-major).
    pub fn from_i32(shape: &[usize], data: Vec<i32>) -> Result<Self> {
        check_len(shape, data.len())?;
        Ok(CpuTensor { shape: shape.to_vec(), data: CpuData::I32(data), dtype: DType::I32 })
    }

    /// A result of storage `dtype` whose length is right by construction; rounds `data` to it.
    pub(crate) fn float(shape: Vec<usize>, mut data: Vec<f32>, dtype: DType) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        round_all(dtype, &mut data);
        CpuTensor { shape, data: CpuData::F32(data), dtype }
    }

    /// An f32 result whose length is right by construction.
    pub(crate) fn f32_unchecked(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        CpuTensor { shape, data: CpuData::F32(data), dtype: DType::F32 }
    }

    pub(crate) fn i32_unchecked(shape: Vec<usize>, data: Vec<i32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        CpuTensor { shape, data: CpuData::I32(data), dtype: DType::I32 }
    }

    /// The same storage type and values under another shape of as many elements (internal
    /// results whose layout is right by construction).
    pub(crate) fn with_data(&self, shape: Vec<usize>, data: CpuData) -> Self {
        CpuTensor { shape, data, dtype: self.dtype }
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The storage type: [`DType::F32`], [`DType::F16`], [`DType::BF16`] or [`DType::I32`].
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        match &self.data {
            CpuData::F32(v) => v.len(),
            CpuData::I32(v) => v.len(),
        }
    }

    /// The elements.
    pub fn data(&self) -> &CpuData {
        &self.data
    }

    /// The values of a float tensor (any storage type), `None` for an i32 one.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            CpuData::F32(v) => Some(v),
            CpuData::I32(_) => None,
        }
    }

    /// The elements of an i32 tensor, `None` for a float one.
    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            CpuData::I32(v) => Some(v),
            CpuData::F32(_) => None,
        }
    }

    pub(crate) fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.data {
            CpuData::F32(v) => Some(v),
            CpuData::I32(_) => None,
        }
    }
}

impl fmt::Debug for CpuTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuTensor({:?}, {})", self.shape, self.dtype)
    }
}

impl TensorLike for CpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// One DSBN layer's `[D, C]` f32 tables.
#[derive(Clone, Debug)]
pub struct CpuBn {
    /// Scale γ per (dataset, channel).
    pub gamma: CpuTensor,
    /// Shift β per (dataset, channel).
    pub beta: CpuTensor,
    /// Running mean per (dataset, channel).
    pub running_mean: CpuTensor,
    /// Running (unbiased) variance per (dataset, channel).
    pub running_var: CpuTensor,
}

impl BnTables<CpuTensor> for CpuBn {
    fn tables(&self) -> [&CpuTensor; 4] {
        [&self.gamma, &self.beta, &self.running_mean, &self.running_var]
    }

    fn tables_mut(&mut self) -> [&mut CpuTensor; 4] {
        [&mut self.gamma, &mut self.beta, &mut self.running_mean, &mut self.running_var]
    }
}

/// What a DSBN training forward saves: batch mean and `1/sqrt(var + eps)` per (dataset,
/// channel), `[D, C]` f32, zero for the datasets absent from the batch.
#[derive(Clone, Debug)]
pub struct CpuBnSaved {
    /// Batch mean.
    pub mean: CpuTensor,
    /// Inverse standard deviation (biased variance).
    pub invstd: CpuTensor,
}

impl BnStats<CpuTensor> for CpuBnSaved {
    fn mean(&self) -> &CpuTensor {
        &self.mean
    }

    fn invstd(&self) -> &CpuTensor {
        &self.invstd
    }
}
