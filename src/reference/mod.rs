//! CPU reference ("oracle") implementations.
//!
//! Everything in this module is written directly from the mathematical definition of the
//! operation it implements, in plain loops, with all arithmetic (and accumulation) done in
//! `f64`. Nothing here is optimised and nothing here shares code with the CUDA kernels or with
//! the CPU emulator of the CUDA execution model: these functions exist only so that the kernels
//! can be tested against an independent, obviously-correct implementation. They are not meant to
//! be used on a hot path.

pub mod conv;
pub mod cross_entropy;
pub mod dropout;
pub mod dsbn;
pub mod elementwise;
pub mod maxpool;
pub mod metrics;
pub mod pool;
pub mod ppm;
pub mod sgd;
pub mod usss;
