//! # cdcl — CUDA kernels for Cross-Dataset Collaborative Learning
//!
//! One segmentation network learns from several datasets at once: convolutions are shared,
//! every BatchNorm keeps statistics and affine parameters per dataset (DSBN), and each sample
//! of a batch carries its dataset index, so a batch mixing datasets is one kernel launch.
//!
//! Every kernel runs from the same source on an NVIDIA GPU ([`Device::cuda`]) or on the CPU
//! through a strict emulator of the CUDA execution model ([`Device::emulator`]).
//!
//! Where to start:
//! - [`ops`]: one safe function per kernel family on [`Tensor`]s — DSBN, the fused
//!   Dataset-Aware Block ([`ops::dab`]), the pyramid pooling module ([`ops::ppm`]), the
//!   multi-head loss, SGD, …
//! - [`train`], [`nn`], [`backend`], [`autograd`]: PSPNet-DAB and Dataset Alternation Training,
//!   written once over a [`backend::Backend`] (our kernels, or a plain host CPU backend), in
//!   f32, bf16 or f16 ([`train::Precision`]); [`data`] has built-in synthetic multi-domain scenes,
//!   [`checkpoint`] reads and writes safetensors.
//!
//! Not the surface for training code: [`mod@reference`] is the independent f64 oracle the kernels
//! are tested against (slow, obviously right), and `ffi` the raw C ABI of the kernels.
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
pub mod dist;
mod error;
pub mod eval;
#[doc(hidden)]
pub mod ffi;
pub mod nn;
pub mod ops;
pub mod reference;
pub mod resample;
pub mod rng;
pub mod tensor;
pub mod train;

pub use device::{Device, DeviceCounters, DeviceKind, EmulatorConfig};

/// The README's code examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
pub use error::{Error, Result};
pub use tensor::{DType, Element, Tensor};
