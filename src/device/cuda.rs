//! The GPU side through cudarc (driver API, libcuda loaded at run time). Our launchers use the
//! CUDA runtime's `<<<>>>` on the same primary context and on the stream cudarc created.
//!
//! cudarc panics inside `CudaContext::new` when libcuda is missing, so the driver library is
//! probed first and its absence becomes [`Error::NoDriver`]. A GPU is only handed out after it
//! was checked against what this build embeds (compute capability, driver version) and one of
//! our kernels ran on it (see [`CudaBackend::new`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, PinnedHostSlice};

use super::buffer::CopyRegion;

use crate::error::{Error, Result};

/// The architectures whose SASS this build embeds, and the newest, whose PTX it embeds too
/// (build.rs: `CDCL_CUDA_ARCHS`, default sm_80, sm_86, sm_89, sm_90).
pub(crate) fn embedded_archs() -> Vec<u32> {
    option_env!("CDCL_EMBEDDED_ARCHS")
        .unwrap_or("80,86,89,90")
        .split(',')
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// The oldest driver that runs this build: the CUDA runtime is linked statically from the
/// 13.0 toolkit (the nvcc that CI installs), and its PTX is ISA 9.0, which only a 13.0 driver's
/// JIT reads. `cuDriverGetVersion` reports 1000 · major + 10 · minor.
pub(crate) const MIN_DRIVER_VERSION: i32 = 13000;

/// Why a GPU with compute capability `cc` (10 · major + minor) cannot run this build's
/// kernels, or `None` when it can: SASS for sm_XY runs on sm_XZ with Z ≥ Y (same major), and
/// the PTX of the newest embedded architecture is compiled by the driver for any newer GPU.
pub(crate) fn arch_mismatch(cc: u32, archs: &[u32]) -> Option<String> {
    let sass = archs.iter().any(|&a| a / 10 == cc / 10 && a % 10 <= cc % 10);
    let ptx = archs.iter().max().is_some_and(|&newest| cc >= newest);
    if sass || ptx {
        None
    } else {
        let list: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
        Some(format!(
            "compute capability {}.{} is not supported: this build embeds {} (and PTX of the newest)",
            cc / 10,
            cc % 10,
            list.join(", ")
        ))
    }
}

/// Why a driver of version `v` cannot run this build, or `None`.
pub(crate) fn driver_mismatch(v: i32) -> Option<String> {
    (v < MIN_DRIVER_VERSION).then(|| {
        format!(
            "the CUDA driver supports CUDA {}.{}, this build needs {}.{} or newer",
            v / 1000,
            (v % 1000) / 10,
            MIN_DRIVER_VERSION / 1000,
            (MIN_DRIVER_VERSION % 1000) / 10
        )
    })
}

pub(crate) struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Pinned host blocks for uploads that do not wait for the device (see
    /// [`CudaMem::copy_from_host`]) and for the step's one read-back.
    staging: Mutex<Staging>,
    /// `CDCL_SYNC_LAUNCHES=1`: wait after every launch, so that an asynchronous fault is
    /// reported against the kernel that caused it.
    #[cfg_attr(not(cdcl_cuda), allow(dead_code))]
    sync_launches: bool,
}

/// Pinned host blocks: free ones by size, and those that a queued copy may still read, which
/// become free at the next synchronisation of the stream (so that taking a block never waits).
#[derive(Default)]
struct Staging {
    free: HashMap<usize, Vec<PinnedHostSlice<u8>>>,
    in_flight: Vec<PinnedHostSlice<u8>>,
}

/// A driver call's failure as [`Error::Cuda`]: the CUDA error's name and description, and what
/// was being done.
pub(crate) fn driver_error(e: DriverError, what: &str) -> Error {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let message = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Error::Cuda { code: e.0 as i32, name, kernel: what.to_string(), message }
}

/// `CDCL_SYNC_LAUNCHES` is set to something other than 0 or empty.
pub(crate) fn sync_launches_requested() -> bool {
    std::env::var("CDCL_SYNC_LAUNCHES").is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0")
}

impl CudaBackend {
    /// Opens GPU `ordinal` and checks that this build runs on it: driver present, device
    /// present, driver version, compute capability, a context, and one test launch of our
    /// kernels. Each failure is a typed error that says which check failed.
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
        let mut version = 0i32;
        // SAFETY: writes one int; the driver was initialised by cuDeviceGetCount above.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result().map_err(|e| driver_error(e, "cuDriverGetVersion"))?;
        if let Some(why) = driver_mismatch(version) {
            return Err(Error::UnsupportedDevice { ordinal, reason: why });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error(e, "cuDevicePrimaryCtxRetain"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| driver_error(e, "cuDeviceGetAttribute"))?;
        if let Some(why) = arch_mismatch((major.max(0) * 10 + minor.max(0)) as u32, &embedded_archs()) {
            return Err(Error::UnsupportedDevice { ordinal, reason: why });
        }
        // One stream per device: ordering is the stream's, so cudarc's cross-stream events are
        // not needed.
        // SAFETY: no CudaSlice exists yet on this context.
        unsafe { ctx.disable_event_tracking() };
        raise_pool_threshold(&ctx);
        let stream = ctx.default_stream();
        Ok(CudaBackend { ctx, stream, staging: Mutex::default(), sync_launches: sync_launches_requested() })
    }

    pub(crate) fn name(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("cuda:{} ({name})", self.ctx.ordinal())
    }

    #[cfg_attr(not(cdcl_cuda), allow(dead_code))]
    pub(crate) fn sync_launches(&self) -> bool {
        self.sync_launches
    }

    /// Makes the device's context current on the calling thread: our launchers use the runtime
    /// API, which launches into whatever context is current, and a thread that never bound it
    /// would otherwise create or use another one.
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_error(e, "cuCtxSetCurrent"))
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_error(e, "cuStreamSynchronize"))?;
        self.staging_synchronized();
        Ok(())
    }

    /// The stream has drained: every staging block in flight is free again.
    fn staging_synchronized(&self) {
        let mut s = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let done = std::mem::take(&mut s.in_flight);
        for b in done {
            s.free.entry(b.len()).or_default().push(b);
        }
    }

    /// `len` bytes of device memory with unspecified contents (the cache's block size).
    pub(crate) fn alloc(&self, len: usize) -> Result<CudaMem> {
        // SAFETY: the memory is handed out as uninitialised: every user writes before reading
        // (outputs that kernels write in full, or buffers filled or uploaded first).
        let slice = unsafe { self.stream.alloc::<u8>(len) }.map_err(|_| Error::OutOfMemory { bytes: len })?;
        Ok(CudaMem { slice, stream: self.stream.clone() })
    }

    /// A pinned host block of `len` bytes, from the staging cache when it holds one.
    fn staging_block(&self, len: usize) -> Result<PinnedHostSlice<u8>> {
        let cached = self.staging.lock().unwrap_or_else(|e| e.into_inner()).free.get_mut(&len).and_then(Vec::pop);
        match cached {
            Some(b) => Ok(b),
            // SAFETY: the block is written in full before any copy reads it.
            None => unsafe { self.ctx.alloc_pinned::<u8>(len) }.map_err(|e| driver_error(e, "cuMemHostAlloc")),
        }
    }

    /// A block whose copy was queued: free again after the next synchronisation.
    fn staging_queued(&self, block: PinnedHostSlice<u8>) {
        self.staging.lock().unwrap_or_else(|e| e.into_inner()).in_flight.push(block);
    }

    /// The raw stream for our launchers (a `cudaStream_t` is a `CUstream`).
    #[cfg_attr(not(cdcl_cuda), allow(dead_code))]
    pub(crate) fn stream_ptr(&self) -> *mut std::ffi::c_void {
        self.stream.cu_stream().cast()
    }

    /// Reads several device ranges into host vectors with ONE wait for the device: each range
    /// is copied asynchronously into its own pinned block, then the stream is synchronised once.
    pub(crate) fn read_many(&self, srcs: &[(&CudaMem, usize)]) -> Result<Vec<Vec<u8>>> {
        self.bind()?;
        let mut blocks = Vec::with_capacity(srcs.len());
        for &(mem, len) in srcs {
            let mut block = self.staging_block(len)?;
            let view = mem
                .slice
                .try_slice(0..len)
                .ok_or_else(|| Error::InvalidArgument("read-back outside its buffer".into()))?;
            self.stream.memcpy_dtoh(&view, &mut block).map_err(|e| driver_error(e, "cuMemcpyDtoHAsync"))?;
            blocks.push(block);
        }
        self.synchronize()?;
        // The stream has drained, so each block's event has passed: reading it does not wait.
        let mut out = Vec::with_capacity(blocks.len());
        for block in blocks {
            out.push(block.as_slice().map_err(|e| driver_error(e, "cuEventSynchronize"))?.to_vec());
            self.staging_queued(block);
        }
        self.staging_synchronized();
        Ok(out)
    }
}

/// Keeps freed memory in the device's default pool across synchronisations (its release
/// threshold is 0 by default) for allocations that miss our cache. Drivers without memory pools
/// keep the default; nothing depends on this.
fn raise_pool_threshold(ctx: &CudaContext) {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one handle; the device handle is the context's.
    if unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().is_ok() && !pool.is_null() {
        let mut threshold = u64::MAX;
        // SAFETY: the attribute takes a pointer to a cuuint64_t, which `threshold` is.
        let _ = unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        };
    }
}

pub(crate) struct CudaMem {
    slice: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

impl CudaMem {
    /// Uploads `src` without waiting for the device: the bytes go to a pinned staging block
    /// first (a host copy), and the device copies from there in stream order. The block goes
    /// back to the staging cache at once; cudarc records an event on it, and the next upload that
    /// takes the block waits on that event (already passed in steady state: the step's
    /// read-back synchronised after it).
    pub(crate) fn copy_from_host(&mut self, backend: &CudaBackend, src: &[u8]) -> Result<()> {
        backend.bind()?;
        let len = self.slice.len();
        let mut block = backend.staging_block(len)?;
        let host = block.as_mut_slice().map_err(|e| driver_error(e, "cuEventSynchronize"))?;
        host[..src.len()].copy_from_slice(src);
        self.stream.memcpy_htod(&block, &mut self.slice).map_err(|e| driver_error(e, "cuMemcpyHtoDAsync"))?;
        backend.staging_queued(block);
        Ok(())
    }

    /// Fills the first `len` bytes with `value`, ordered on the stream (no wait).
    pub(crate) fn fill_bytes(&mut self, value: u8, len: usize) -> Result<()> {
        self.stream.context().bind_to_thread().map_err(|e| driver_error(e, "cuCtxSetCurrent"))?;
        let stream = self.stream.clone();
        let (ptr, _sync) = self.slice.device_ptr_mut(&stream);
        // SAFETY: `len` is at most the allocation's size (the buffer's length); the context is
        // current; the fill is ordered on the stream like every launch.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, value, len, stream.cu_stream()) }
            .map_err(|e| driver_error(e, "cuMemsetD8Async"))
    }

    /// The GPU side of [`super::DeviceBuffer::copy_region_from`]; `r` is already checked against
    /// both buffers. Ordered on the device's one stream, like the launches.
    pub(crate) fn copy_region_from(&mut self, src: &CudaMem, r: &CopyRegion) -> Result<()> {
        self.stream.context().bind_to_thread().map_err(|e| driver_error(e, "cuCtxSetCurrent"))?;
        if r.rows == 1 {
            let (Some(s), Some(mut d)) = (
                src.slice.try_slice(r.src_offset..r.src_offset + r.width),
                self.slice.try_slice_mut(r.dst_offset..r.dst_offset + r.width),
            ) else {
                return Err(Error::InvalidArgument("device copy outside its buffers".into()));
            };
            return self.stream.memcpy_dtod(&s, &mut d).map_err(|e| driver_error(e, "cuMemcpyDtoDAsync"));
        }
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
        // distinct and outlive the copy (a freed block goes back to the cache and is only reused
        // by work ordered after this copy on the same stream); the context is current; `copy` is
        // a fully initialised descriptor that the driver reads before returning.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
            .result()
            .map_err(|e| driver_error(e, "cuMemcpy2DAsync"))
    }

    pub(crate) fn device_ptr(&self) -> u64 {
        let (ptr, _sync) = self.slice.device_ptr(&self.stream);
        ptr
    }
}

#[cfg(test)]
mod tests {
    use super::{arch_mismatch, driver_mismatch};

    #[test]
    fn compute_capability_against_the_embedded_architectures() {
        let archs = [80, 86, 89, 90];
        // SASS of the same major version with an older or equal minor runs; the newest PTX
        // covers newer GPUs.
        for cc in [80, 86, 87, 89, 90, 100, 120] {
            assert_eq!(arch_mismatch(cc, &archs), None, "sm_{cc}");
        }
        for cc in [35, 61, 70, 75] {
            let why = arch_mismatch(cc, &archs).expect("refused");
            assert!(why.contains(&format!("{}.{}", cc / 10, cc % 10)) && why.contains("sm_80"), "{why}");
        }
        // A build for sm_90 only does not run on an Ampere GPU.
        assert!(arch_mismatch(86, &[90]).is_some());
    }

    #[test]
    fn driver_version_against_the_cuda_release() {
        assert_eq!(driver_mismatch(13000), None);
        assert_eq!(driver_mismatch(13020), None);
        let why = driver_mismatch(12080).expect("refused");
        assert!(why.contains("12.8") && why.contains("13.0"), "{why}");
    }
}
