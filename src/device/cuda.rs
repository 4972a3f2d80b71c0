//! The GPU side through cudarc (driver API, libcuda loaded at run time). Our launchers use the
//! CUDA runtime's `<<<>>>` on the same primary context and on the stream cudarc created.
//!
//! cudarc panics inside `CudaContext::new` when libcuda is missing, so the driver library is
//! probed first and its absence becomes [`Error::NoDriver`].

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError};

use crate::error::{Error, Result};

pub(crate) struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

fn driver_error(e: DriverError, what: &str) -> Error {
    Error::Cuda { code: e.0 as i32, kernel: what.to_string(), message: format!("{e:?}") }
}

impl CudaBackend {
    pub(crate) fn new(ordinal: usize) -> Result<Self> {
        if !cfg!(cdcl_cuda) {
            return Err(Error::CudaNotBuilt);
        }
        // SAFETY: only tries to dlopen libcuda; no driver call is made.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count().map_err(|e| driver_error(e, "cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice { ordinal, count: count.max(0) as usize });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error(e, "cuDevicePrimaryCtxRetain"))?;
        // One stream per device: ordering is the stream's, so cudarc's cross-stream events are
        // not needed.
        // SAFETY: no CudaSlice exists yet on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(CudaBackend { ctx, stream })
    }

    pub(crate) fn name(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("cuda:{} ({name})", self.ctx.ordinal())
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_error(e, "cuStreamSynchronize"))
    }

    pub(crate) fn alloc_zeroed(&self, len: usize) -> Result<CudaMem> {
        let slice = self.stream.alloc_zeros::<u8>(len).map_err(|_| Error::OutOfMemory { bytes: len })?;
        Ok(CudaMem { slice, stream: self.stream.clone() })
    }

    /// The raw stream for our launchers (a `cudaStream_t` is a `CUstream`).
    #[cfg_attr(not(cdcl_cuda), allow(dead_code))]
    pub(crate) fn stream_ptr(&self) -> *mut std::ffi::c_void {
        self.stream.cu_stream().cast()
    }
}

pub(crate) struct CudaMem {
    slice: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

impl CudaMem {
    pub(crate) fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        self.stream.memcpy_htod(src, &mut self.slice).map_err(|e| driver_error(e, "cuMemcpyHtoDAsync"))?;
        self.stream.synchronize().map_err(|e| driver_error(e, "cuStreamSynchronize"))
    }

    pub(crate) fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        self.stream.memcpy_dtoh(&self.slice, dst).map_err(|e| driver_error(e, "cuMemcpyDtoHAsync"))?;
        self.stream.synchronize().map_err(|e| driver_error(e, "cuStreamSynchronize"))
    }

    pub(crate) fn device_ptr(&self) -> u64 {
        let (ptr, _sync) = self.slice.device_ptr(&self.stream);
        ptr
    }
}
