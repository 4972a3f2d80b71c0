//! Typed tensors on a [`Device`]: a shape (row-major; NHWC for activations, KRSC for conv
//! weights), an element type, and the device memory holding them. A tensor owns its memory
//! exclusively: ops that update state in place take `&mut Tensor`.

use std::fmt;

use ndarray::{ArrayD, ArrayView, Dimension, IxDyn};

use crate::device::{Device, DeviceBuffer, Poison};
use crate::error::{Error, Result};
use crate::ffi;

/// Element types a tensor can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer (dataset indices, labels).
    I32,
    /// 8-bit unsigned integer (labels).
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// True for the floating-point storage types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub(crate) fn to_ffi(self) -> i32 {
        (match self {
            DType::F32 => ffi::CDCL_DTYPE_F32,
            DType::F16 => ffi::CDCL_DTYPE_F16,
            DType::BF16 => ffi::CDCL_DTYPE_BF16,
            DType::I32 => ffi::CDCL_DTYPE_I32,
            DType::U8 => ffi::CDCL_DTYPE_U8,
        }) as i32
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::U8 => "u8",
        })
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that is the host representation of a [`DType`].
pub trait Element: bytemuck::Pod + sealed::Sealed + Send + Sync + 'static {
    /// The tensor element type this host type maps to.
    const DTYPE: DType;
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    };
}
element!(f32, F32);
element!(half::f16, F16);
element!(half::bf16, BF16);
element!(i32, I32);
element!(u8, U8);

/// An n-dimensional array on a device.
pub struct Tensor {
    buf: DeviceBuffer,
    shape: Vec<usize>,
    dtype: DType,
}

fn numel_of(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| Error::InvalidShape {
        what: "tensor",
        shape: shape.to_vec(),
        reason: "element count overflows usize".into(),
    })
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let mut t = Self::uninit(device, shape, dtype)?;
        t.buf.fill_bytes(0)?;
        Ok(t)
    }

    /// A tensor whose contents are unspecified, for an output that a kernel writes in full:
    /// no memset. On the emulator it holds a poison pattern (NaN for floats, a value no kernel
    /// produces for integers) so that an element a kernel forgets fails the tests.
    pub(crate) fn uninit(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = numel_of(shape)?.checked_mul(dtype.size()).ok_or_else(|| Error::InvalidShape {
            what: "tensor",
            shape: shape.to_vec(),
            reason: "byte size overflows usize".into(),
        })?;
        let poison = match dtype.size() {
            1 => Poison::Byte,
            2 => Poison::Half,
            _ => Poison::Word,
        };
        Ok(Tensor { buf: DeviceBuffer::uninit(device, bytes, poison)?, shape: shape.to_vec(), dtype })
    }

    /// A copy on the same device, ordered with the launches (no host round trip).
    pub(crate) fn duplicate(&self) -> Result<Tensor> {
        let mut out = Self::uninit(self.device(), &self.shape, self.dtype)?;
        let bytes = self.buf.len();
        out.buf.copy_region_from(&self.buf, crate::device::CopyRegion::contiguous(0, 0, bytes))?;
        Ok(out)
    }

    /// A tensor filled with one value.
    pub fn full<T: Element>(device: &Device, shape: &[usize], value: T) -> Result<Tensor> {
        let n = numel_of(shape)?;
        Self::from_slice(device, shape, &vec![value; n])
    }

    /// Copies host data (row-major, `shape.iter().product()` elements) to the device.
    pub fn from_slice<T: Element>(device: &Device, shape: &[usize], data: &[T]) -> Result<Tensor> {
        let n = numel_of(shape)?;
        if n != data.len() {
            return Err(Error::InvalidShape {
                what: "tensor data",
                shape: shape.to_vec(),
                reason: format!("shape holds {n} elements but {} were given", data.len()),
            });
        }
        let mut t = Self::uninit(device, shape, T::DTYPE)?;
        t.buf.copy_from_host(bytemuck::cast_slice(data))?;
        Ok(t)
    }

    /// Copies an ndarray (any memory layout) to the device.
    pub fn from_array<T: Element, D: Dimension>(device: &Device, array: ArrayView<'_, T, D>) -> Result<Tensor> {
        let std = array.as_standard_layout();
        let data = std.as_slice().expect("standard layout arrays are contiguous");
        Self::from_slice(device, array.shape(), data)
    }

    /// Copies the tensor to the host as a flat row-major vector.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch { what: "tensor read-back", expected: self.dtype, got: T::DTYPE });
        }
        let mut v = vec![T::zeroed(); self.numel()];
        self.buf.copy_to_host(bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }

    /// Copies the tensor to the host as an ndarray of its shape.
    pub fn to_array<T: Element>(&self) -> Result<ArrayD<T>> {
        let v = self.to_vec::<T>()?;
        Ok(ArrayD::from_shape_vec(IxDyn(&self.shape), v).expect("numel matches shape"))
    }

    /// Overwrites the tensor's contents from host data of the same length and type.
    pub fn copy_from_slice<T: Element>(&mut self, data: &[T]) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch { what: "tensor write", expected: self.dtype, got: T::DTYPE });
        }
        if data.len() != self.numel() {
            return Err(Error::ShapeMismatch {
                what: "tensor write",
                expected: self.shape.clone(),
                got: vec![data.len()],
            });
        }
        self.buf.copy_from_host(bytemuck::cast_slice(data))
    }

    /// A deep copy on the same device.
    pub fn try_clone(&self) -> Result<Tensor> {
        let mut bytes = vec![0u8; self.buf.len()];
        self.buf.copy_to_host(&mut bytes)?;
        let mut buf = DeviceBuffer::uninit(self.buf.device(), bytes.len(), Poison::Word)?;
        buf.copy_from_host(&bytes)?;
        Ok(Tensor { buf, shape: self.shape.clone(), dtype: self.dtype })
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The device holding the data.
    pub fn device(&self) -> &Device {
        self.buf.device()
    }

    /// The underlying memory.
    pub fn buffer(&self) -> &DeviceBuffer {
        &self.buf
    }

    pub(crate) fn buffer_mut(&mut self) -> &mut DeviceBuffer {
        &mut self.buf
    }

    pub(crate) fn ptr(&self) -> *const std::ffi::c_void {
        self.buf.as_ptr()
    }

    pub(crate) fn ptr_mut(&mut self) -> *mut std::ffi::c_void {
        self.buf.as_mut_ptr()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape, self.dtype, self.buf.device().name())
    }
}
