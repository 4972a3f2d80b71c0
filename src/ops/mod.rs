//! One safe function per kernel family: validate shapes, dtypes, devices and ranges; launch;
//! turn the kernels' device error record into typed errors.

mod check;
pub mod conv;
pub mod dsbn;
pub mod usss;
