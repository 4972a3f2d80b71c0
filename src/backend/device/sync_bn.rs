//! Per-dataset SyncBN on the device backend, through the host: the layer's tensors are copied to
//! the CPU backend, which computes the synchronised op (src/backend/cpu/dsbn_sync.rs: the same
//! partial sums, the same collective through `reduce`, the same finish), and the results are
//! copied back. Correct and deterministic, but a device → host → device round trip per layer
//! per step: the kernels' own statistics partials (`dsbn_stats_partial`, mean and M2 per tile)
//! reduced over the group before `dsbn_stats_finalize`, and a `dsbn_backward_dx` that takes the
//! group's sums, are what a GPU run wants; until then this keeps SyncBN exact on every backend.

use super::DeviceBackend;
use crate::backend::cpu::{CpuBn, CpuBnSaved};
use crate::backend::{Backend, BnGrads, BnTables, CpuBackend, CpuTensor, StatsReduce};
use crate::error::Result;
use crate::ops::dsbn::{DsbnOptions, DsbnSaved, DsbnState};
use crate::tensor::{DType, Tensor};

fn to_host(be: &DeviceBackend, cpu: &CpuBackend, t: &Tensor) -> Result<CpuTensor> {
    match t.dtype() {
        DType::I32 => cpu.tensor_i32(t.shape(), &be.to_i32(t)?),
        d => cpu.tensor_float(t.shape(), &be.to_f32(t)?, d),
    }
}

fn to_device(be: &DeviceBackend, cpu: &CpuBackend, t: &CpuTensor) -> Result<Tensor> {
    be.tensor_float(t.shape(), &cpu.to_f32(t)?, t.dtype())
}

fn bn_to_host(be: &DeviceBackend, cpu: &CpuBackend, bn: &DsbnState) -> Result<CpuBn> {
    let s = bn.gamma.shape();
    let mut h = cpu.bn_new(s[0], s.get(1).copied().unwrap_or(0))?;
    for (dst, src) in h.tables_mut().into_iter().zip(bn.tables()) {
        cpu.write_f32(dst, &be.to_f32(src)?)?;
    }
    Ok(h)
}

/// `reduce` of device tensors, offered to the CPU op as a reduction of host tensors.
fn host_reduce(
    be: &DeviceBackend,
    cpu: &CpuBackend,
    reduce: &mut StatsReduce<'_, Tensor>,
    t: &mut CpuTensor,
) -> Result<()> {
    let mut d = be.tensor_f32(t.shape(), &cpu.to_f32(t)?)?;
    reduce(&mut d)?;
    cpu.write_f32(t, &be.to_f32(&d)?)
}

pub(crate) fn forward_train(
    be: &DeviceBackend,
    x: &Tensor,
    datasets: &Tensor,
    bn: &mut DsbnState,
    opts: &DsbnOptions,
    residual: Option<&Tensor>,
    reduce: &mut StatsReduce<'_, Tensor>,
) -> Result<(Tensor, DsbnSaved)> {
    let cpu = CpuBackend::new();
    let (hx, hd) = (to_host(be, &cpu, x)?, to_host(be, &cpu, datasets)?);
    let hr = residual.map(|r| to_host(be, &cpu, r)).transpose()?;
    let mut hbn = bn_to_host(be, &cpu, bn)?;
    let mut f = |t: &mut CpuTensor| host_reduce(be, &cpu, reduce, t);
    let (y, saved) = cpu.dsbn_forward_train_synced(&hx, &hd, &mut hbn, opts, hr.as_ref(), &mut f)?;
    let y = to_device(be, &cpu, &y)?;
    let saved = DsbnSaved { mean: to_device(be, &cpu, &saved.mean)?, invstd: to_device(be, &cpu, &saved.invstd)? };
    // Only the running statistics moved.
    let [_, _, m, v] = hbn.tables();
    be.write_f32(&mut bn.running_mean, &cpu.to_f32(m)?)?;
    be.write_f32(&mut bn.running_var, &cpu.to_f32(v)?)?;
    Ok((y, saved))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_train(
    be: &DeviceBackend,
    dy: &Tensor,
    x: &Tensor,
    residual: Option<&Tensor>,
    datasets: &Tensor,
    bn: &DsbnState,
    saved: &DsbnSaved,
    opts: &DsbnOptions,
    reduce: &mut StatsReduce<'_, Tensor>,
) -> Result<BnGrads<Tensor>> {
    let cpu = CpuBackend::new();
    let (hdy, hx, hd) = (to_host(be, &cpu, dy)?, to_host(be, &cpu, x)?, to_host(be, &cpu, datasets)?);
    let hr = residual.map(|r| to_host(be, &cpu, r)).transpose()?;
    let hbn = bn_to_host(be, &cpu, bn)?;
    let hs = CpuBnSaved { mean: to_host(be, &cpu, &saved.mean)?, invstd: to_host(be, &cpu, &saved.invstd)? };
    let mut f = |t: &mut CpuTensor| host_reduce(be, &cpu, reduce, t);
    let g = cpu.dsbn_backward_train_synced(&hdy, &hx, hr.as_ref(), &hd, &hbn, &hs, opts, &mut f)?;
    Ok(BnGrads {
        dx: to_device(be, &cpu, &g.dx)?,
        dgamma: to_device(be, &cpu, &g.dgamma)?,
        dbeta: to_device(be, &cpu, &g.dbeta)?,
        dresidual: g.dresidual.map(|r| to_device(be, &cpu, &r)).transpose()?,
    })
}
