//! Distributed training: communicators, the launcher's environment and the rendezvous.
//!
//! One process per GPU, as PyTorch users launch jobs (`torchrun`, Slurm): [`DistEnv`] reads
//! `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; [`rendezvous`] meets
//! the ranks over TCP on the master and hands every rank the master's payload (NCCL's unique
//! id); a [`Communicator`] then runs the collectives of a step.
//!
//! Two communicators implement the same trait:
//! - [`NcclCommunicator`]: NCCL on the GPUs (libnccl loaded at run time; a machine without it
//!   gets [`crate::Error::NoNccl`], never a panic);
//! - [`LocalCommunicator`]: ranks as threads of one process, for the CPU backend and the
//!   emulator, so the distributed code path itself runs in tests on a machine without a GPU.
//!
//! Every collective is a sum or a copy of f32 data; the local one sums in rank order, so its
//! results are bitwise deterministic.

mod env;
mod local;
mod nccl;
pub mod rendezvous;

pub use env::DistEnv;
pub use local::{local_group, LocalCommunicator};
pub use nccl::{nccl_available, nccl_unique_id, NcclCommunicator};

use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// The collectives a data-parallel step needs. Every rank of a group must call the same
/// collectives in the same order with the same lengths; a mismatch is an error on every rank.
pub trait Communicator: Send + Sync {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Replaces `data` on every rank by the element-wise sum of every rank's `data`.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;

    /// Replaces `data` on every rank by `root`'s `data`.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// [`Communicator::all_reduce_sum`] of an f32 tensor, in place. The default goes through
    /// host memory; the NCCL communicator reduces on the device.
    fn all_reduce_sum_tensor(&self, t: &mut Tensor) -> Result<()> {
        crate::ops::check::dtype("all_reduce_sum_tensor", t, DType::F32)?;
        let mut host = t.to_vec::<f32>()?;
        self.all_reduce_sum(&mut host)?;
        t.copy_from_slice(&host)
    }

    /// [`Communicator::broadcast`] of an f32 tensor, in place.
    fn broadcast_tensor(&self, t: &mut Tensor, root: usize) -> Result<()> {
        crate::ops::check::dtype("broadcast_tensor", t, DType::F32)?;
        let mut host = t.to_vec::<f32>()?;
        self.broadcast(&mut host, root)?;
        t.copy_from_slice(&host)
    }
}

pub(crate) fn dist_error(message: impl Into<String>) -> crate::Error {
    crate::Error::Distributed { message: message.into() }
}
