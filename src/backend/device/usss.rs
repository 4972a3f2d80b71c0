//! The USSS entropy loss on the device backend: [`ops::usss`]'s forward and backward kernels.
//!
//! The prototype table is copied into a [`UsssPrototypes`] (which checks, with one read-back of
//! the small table, that every value is finite — the CPU backend refuses the same tables), and
//! the loss stays on the device. The gradient, when asked for, is the backward kernel's: the
//! forward kernel computes the loss only.

use super::DeviceBackend;
use crate::backend::Backend;
use crate::error::Result;
use crate::ops;
use crate::ops::usss::{UsssOptions, UsssPrototypes};
use crate::tensor::Tensor;

pub(super) fn usss_entropy(
    backend: &DeviceBackend,
    x: &Tensor,
    datasets: &Tensor,
    protos: &Tensor,
    classes_per_dataset: &[usize],
    opts: &UsssOptions,
    grad: Option<f32>,
) -> Result<(Tensor, Option<Tensor>)> {
    let table = UsssPrototypes::new(backend.try_clone(protos)?, classes_per_dataset)?;
    let loss = ops::usss::loss_on_device(x, datasets, &table, None, opts)?;
    let dx = match grad {
        Some(g) => Some(ops::usss::backward(g, x, datasets, &table, None, opts)?),
        None => None,
    };
    Ok((loss, dx))
}
