//! The GPU side through cudarc (driver API, libcuda loaded at run time). Our launchers use the
//! CUDA runtime's `<<<>>>` on the same primary context and on the stream cudarc created.
//!
//! cudarc panics inside `CudaContext::new` when libcuda is missing, so the driver library is
//! probed first and its absence becomes [`Error::NoDriver`].

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};

use super::buffer::CopyRegion;

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

    /// Makes this device's context current on the calling thread (NCCL and the runtime's
    /// launches use the current context).
    pub(crate) fn bind_to_thread(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(e, "cuCtxSetCurrent"))
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

    /// The GPU side of [`super::DeviceBuffer::copy_region_from`]; `r` is already checked against
    /// both buffers. Ordered on the device's one stream, like the launches.
    pub(crate) fn copy_region_from(&mut self, src: &CudaMem, r: &CopyRegion) -> Result<()> {
        if r.rows == 1 {
            let (Some(s), Some(mut d)) = (
                src.slice.try_slice(r.src_offset..r.src_offset + r.width),
                self.slice.try_slice_mut(r.dst_offset..r.dst_offset + r.width),
            ) else {
                return Err(Error::InvalidArgument("device copy outside its buffers".into()));
            };
            return self.stream.memcpy_dtod(&s, &mut d).map_err(|e| driver_error(e, "cuMemcpyDtoDAsync"));
        }
        self.stream.context().bind_to_thread().map_err(|e| driver_error(e, "cuCtxSetCurrent"))?;
        let (src_ptr, _src_sync) = src.slice.device_ptr(&self.stream);
        let stream = self.stream.clone();
        let (dst_ptr, _dst_sync) = self.slice.device_ptr_mut(&stream);
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src_ptr + r.src_offset as u64,
            srcArray: std::ptr::null_mut(),
            srcPitch: r.src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst_ptr + r.dst_offset as u64,
            dstArray: std::ptr::null_mut(),
            dstPitch: r.dst_pitch,
            WidthInBytes: r.width,
            Height: r.rows,
        };
        // SAFETY: both device ranges were checked to lie inside their allocations, which are
        // distinct and outlive the copy (cudarc frees a CudaSlice in order on this stream, or
        // with cuMemFree, which waits for pending work); the context is current; `copy` is a
        // fully initialised descriptor that the driver reads before returning.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
            .result()
            .map_err(|e| driver_error(e, "cuMemcpy2DAsync"))
    }

    pub(crate) fn device_ptr(&self) -> u64 {
        let (ptr, _sync) = self.slice.device_ptr(&self.stream);
        ptr
    }
}
