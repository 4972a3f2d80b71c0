//! The NCCL communicator: one process per GPU, collectives on the GPU's stream.

use std::time::Duration;

use super::{rendezvous, Communicator, DistEnv};
use crate::device::nccl::{self, NcclComm};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// A rank of an NCCL group. Collectives are enqueued on the device's stream, in order with the
/// kernels, and do not synchronise the host.
pub struct NcclCommunicator {
    comm: NcclComm,
    rank: usize,
    world_size: usize,
}

impl NcclCommunicator {
    /// Joins the run `env` describes on `device` (normally `Device::cuda(env.local_rank)`):
    /// rank 0 makes NCCL's unique id, the TCP rendezvous hands it to every rank, and every rank
    /// initialises its communicator. Without libnccl this is [`Error::NoNccl`] on every rank
    /// before any network traffic; a rank that does not arrive within `timeout` fails it.
    pub fn init(device: &Device, env: &DistEnv, timeout: Duration) -> Result<Self> {
        // Checked before the rendezvous so a machine without NCCL fails fast on every rank.
        if !matches!(device.kind(), crate::DeviceKind::Cuda) {
            return Err(Error::InvalidArgument(format!("NCCL needs a CUDA device, not {}", device.name())));
        }
        let id = rendezvous::rendezvous(env, || nccl::unique_id().map(|id| id.to_vec()), timeout)?;
        let comm = NcclComm::new(device, env.rank, env.world_size, &id)?;
        Ok(NcclCommunicator { comm, rank: env.rank, world_size: env.world_size })
    }

    fn via_device(&self, data: &mut [f32], op: impl FnOnce(&mut Tensor) -> Result<()>) -> Result<()> {
        if data.is_empty() {
            return Ok(()); // every rank agrees on the length, so every rank skips
        }
        let mut t = Tensor::from_slice(self.comm.device(), &[data.len()], data)?;
        op(&mut t)?;
        data.copy_from_slice(&t.to_vec::<f32>()?);
        Ok(())
    }
}

/// True when libnccl can be loaded on this machine.
pub fn nccl_available() -> bool {
    nccl::present()
}

/// A fresh NCCL unique id, what rank 0 hands every rank in the rendezvous;
/// [`Error::NoNccl`] on a machine without libnccl.
pub fn nccl_unique_id() -> Result<Vec<u8>> {
    nccl::unique_id().map(|id| id.to_vec())
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        self.via_device(data, |t| self.all_reduce_sum_tensor(t))
    }

    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        self.via_device(data, |t| self.broadcast_tensor(t, root))
    }

    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: an all-reduce of one value, waited for, is one.
        let mut one = [0.0f32];
        self.all_reduce_sum(&mut one)
    }

    fn all_reduce_sum_tensor(&self, t: &mut Tensor) -> Result<()> {
        crate::ops::check::dtype("all_reduce_sum_tensor", t, DType::F32)?;
        self.comm.all_reduce_sum_f32(t.buffer_mut())
    }

    fn broadcast_tensor(&self, t: &mut Tensor, root: usize) -> Result<()> {
        crate::ops::check::dtype("broadcast_tensor", t, DType::F32)?;
        if root >= self.world_size {
            return Err(Error::Distributed {
                message: format!("broadcast root {root} is not a rank of {}", self.world_size),
            });
        }
        self.comm.broadcast_f32(t.buffer_mut(), root)
    }
}
