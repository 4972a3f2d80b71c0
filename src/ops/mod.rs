//! One safe function per kernel family: validate shapes, dtypes, devices and ranges; launch;
//! turn the kernels' device error record into typed errors.

pub(crate) mod check;
pub mod conv;
pub mod cross_entropy;
pub mod dab;
pub mod dropout;
pub mod dsbn;
pub mod elementwise;
pub mod maxpool;
pub mod metrics;
pub mod pool;
pub mod ppm;
pub mod sgd;
pub mod usss;
