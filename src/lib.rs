//! # cdcl — CUDA kernels for Cross-Dataset Collaborative Learning
//!
//! One segmentation network learns from several datasets at once: convolutions are shared,
//! every BatchNorm keeps statistics and affine parameters per dataset (DSBN), and each sample
//! of a batch carries its dataset index, so a batch mixing datasets is one kernel launch.
//!
//! Every kernel runs from the same source on an NVIDIA GPU ([`Device::cuda`]) or on the CPU
//! through a strict emulator of the CUDA execution model ([`Device::emulator`]), and is tested
//! against the independent f64 oracle in [`reference`].
//!
//! ```
//! use cdcl::{ops::dsbn, Device, Tensor};
//! # fn main() -> cdcl::Result<()> {
//! let dev = Device::emulator();
//! let x = Tensor::from_slice(&dev, &[2, 1, 2, 3], &[1.0f32, 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.])?;
//! let datasets = Tensor::from_slice(&dev, &[2], &[0i32, 1])?; // sample 0: dataset 0, sample 1: dataset 1
//! let mut state = dsbn::DsbnState::new(&dev, 2, 3)?;
//! let (y, _saved) = dsbn::forward_train(&x, &datasets, &mut state, &dsbn::DsbnOptions::default())?;
//! assert_eq!(y.shape(), &[2, 1, 2, 3]);
//! # Ok(()) }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod autograd;
pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod device;
mod error;
pub mod eval;
pub mod ffi;
pub mod nn;
pub mod ops;
pub mod reference;
pub mod tensor;
pub mod train;

pub use device::{Device, DeviceCounters, DeviceKind, EmulatorConfig};
pub use error::{Error, Result};
pub use tensor::{DType, Element, Tensor};
