//! NCCL communicators on a CUDA device, through cudarc's bindings with libnccl loaded at run
//! time. cudarc panics when a symbol's library is missing, so every entry point first checks
//! that libnccl loads and returns [`Error::NoNccl`] otherwise.

use std::sync::Mutex;

use cudarc::nccl::{result, sys};

use super::{Backend, Device, DeviceBuffer};
use crate::error::{Error, Result};

/// The size of NCCL's unique id, the payload of the rendezvous.
pub(crate) const UNIQUE_ID_BYTES: usize = 128;

fn nccl_error(call: &str, e: result::NcclError) -> Error {
    Error::Distributed { message: format!("{call} failed: {:?}", e.0) }
}

/// True when libnccl loads.
pub(crate) fn present() -> bool {
    // SAFETY: only tries to dlopen libnccl; no NCCL call is made.
    unsafe { sys::is_culib_present() }
}

fn require_nccl() -> Result<()> {
    if present() {
        Ok(())
    } else {
        Err(Error::NoNccl)
    }
}

/// A new NCCL unique id (rank 0 makes it and the rendezvous hands it to every rank).
pub(crate) fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    require_nccl()?;
    let id = result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's NCCL communicator, bound to one CUDA device and ordered on its stream.
pub(crate) struct NcclComm {
    /// NCCL calls on one communicator must not run concurrently; the mutex serialises them.
    comm: Mutex<sys::ncclComm_t>,
    device: Device,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap, which the mutex guarantees; the device handle is Send + Sync.
unsafe impl Send for NcclComm {}
// SAFETY: as above, every use of the raw handle goes through the mutex.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    pub(crate) fn new(device: &Device, rank: usize, world_size: usize, id: &[u8]) -> Result<Self> {
        let Backend::Cuda(cuda) = &*device.inner else {
            return Err(Error::InvalidArgument(format!("NCCL needs a CUDA device, not {}", device.name())));
        };
        if rank >= world_size || world_size > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!("rank {rank} of world size {world_size}")));
        }
        let internal: [std::ffi::c_char; UNIQUE_ID_BYTES] =
            id.try_into().map(|b: [u8; UNIQUE_ID_BYTES]| b.map(|c| c as std::ffi::c_char)).map_err(|_| {
                Error::Distributed { message: format!("an NCCL id has {UNIQUE_ID_BYTES} bytes, got {}", id.len()) }
            })?;
        require_nccl()?;
        cuda.bind()?;
        let mut comm = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
        // SAFETY: `comm` is a valid out-pointer; the id is a complete ncclUniqueId; the device's
        // context is current on this thread, so NCCL binds the communicator to that GPU.
        unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), world_size as i32, sys::ncclUniqueId { internal }, rank as i32)
                .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        }
        // SAFETY: ncclCommInitRank succeeded, so it wrote the handle.
        let comm = unsafe { comm.assume_init() };
        Ok(NcclComm { comm: Mutex::new(comm), device: device.clone() })
    }

    fn stream(&self) -> sys::cudaStream_t {
        match &*self.device.inner {
            Backend::Cuda(c) => c.stream_ptr().cast(),
            Backend::Emulator(_) => std::ptr::null_mut(),
        }
    }

    /// Sums `buf` (f32 values) over every rank, in place, ordered on the device's stream.
    pub(crate) fn all_reduce_sum_f32(&self, buf: &mut DeviceBuffer) -> Result<()> {
        self.device.check_same(buf.device())?;
        let count = buf.len() / 4;
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = buf.as_mut_ptr();
        // SAFETY: `ptr` is the buffer's device allocation of `count` f32 values on this
        // communicator's GPU, uniquely borrowed for the call; in-place reduction (send ==
        // receive) is allowed by NCCL; the stream is the device's one stream.
        unsafe {
            result::all_reduce(
                ptr,
                ptr,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                *comm,
                self.stream(),
            )
            .map_err(|e| nccl_error("ncclAllReduce", e))?;
        }
        Ok(())
    }

    /// Copies `root`'s `buf` (f32 values) to every rank, in place.
    pub(crate) fn broadcast_f32(&self, buf: &mut DeviceBuffer, root: usize) -> Result<()> {
        self.device.check_same(buf.device())?;
        let count = buf.len() / 4;
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = buf.as_mut_ptr();
        // SAFETY: as in all_reduce_sum_f32; NCCL broadcasts in place when send == receive.
        unsafe {
            result::broadcast(ptr, ptr, count, sys::ncclDataType_t::ncclFloat32, root as i32, *comm, self.stream())
                .map_err(|e| nccl_error("ncclBroadcast", e))?;
        }
        Ok(())
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let comm = *self.comm.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the handle came from ncclCommInitRank and is destroyed once; a failure here
        // cannot be reported from drop and leaves nothing for us to clean.
        let _ = unsafe { result::comm_destroy(comm) };
    }
}
