//! Devices, device memory and kernel launches: with `src/ffi`, the only place that holds
//! `unsafe` code.
//!
//! A [`Device`] is either a CUDA GPU or the CPU emulator; both run the same kernels (see
//! `docs/architecture.md`). Launches on one device are ordered, like a CUDA stream.

mod buffer;
mod cache;
mod counters;
mod cuda;
pub mod emulator;
mod launch;
pub(crate) mod nccl;
mod step;

pub use buffer::DeviceBuffer;
pub(crate) use buffer::{CopyRegion, Poison};
pub use counters::DeviceCounters;
pub(crate) use launch::{launcher, workspace_bytes, DeviceErrorRecord, Launcher};

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Which kind of machine a [`Device`] runs kernels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// An NVIDIA GPU through the CUDA driver.
    Cuda,
    /// The CPU emulator of the CUDA execution model.
    Emulator,
}

/// Settings of an emulator device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmulatorConfig {
    /// Shuffles block order and the resumption order of threads; a correct kernel gives the same
    /// bits for every seed, a racy one does not.
    pub seed: u64,
    /// Worker OS threads that run blocks; 0 uses every core.
    pub threads: u32,
}

impl EmulatorConfig {
    /// The settings `Device::emulator()` uses: `CDCL_EMU_SEED` (default 0) and
    /// `CDCL_EMU_THREADS` (default 0, every core) from the environment.
    pub fn from_env() -> Self {
        let parse = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
        EmulatorConfig {
            seed: parse("CDCL_EMU_SEED").unwrap_or(0),
            threads: parse("CDCL_EMU_THREADS").map(|t| t.min(u32::MAX as u64) as u32).unwrap_or(0),
        }
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self::from_env()
    }
}

pub(crate) enum Backend {
    Emulator(emulator::EmuStream),
    Cuda(cuda::CudaBackend),
}

/// A place where tensors live and kernels run. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<Backend>,
    pub(crate) counters: Arc<counters::Counters>,
    pub(crate) cache: Arc<cache::MemCache>,
    pub(crate) step: Arc<step::StepState>,
    /// f32 convolutions in TF32 on tensor cores ([`Device::set_allow_tf32`]).
    pub(crate) allow_tf32: Arc<std::sync::atomic::AtomicBool>,
}

impl Device {
    /// The CPU emulator with [`EmulatorConfig::from_env`] settings.
    ///
    /// # Panics
    /// Only if the process cannot allocate the emulator's stream object (out of memory).
    pub fn emulator() -> Device {
        Self::emulator_with(EmulatorConfig::from_env()).expect("allocating the emulator stream")
    }

    /// The CPU emulator with explicit settings.
    pub fn emulator_with(config: EmulatorConfig) -> Result<Device> {
        Ok(Self::wrap(Backend::Emulator(emulator::EmuStream::new(config)?)))
    }

    fn wrap(backend: Backend) -> Device {
        Device {
            inner: Arc::new(backend),
            counters: Arc::default(),
            cache: Arc::new(cache::MemCache::new(cache::default_limit())),
            step: Arc::default(),
            allow_tf32: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// Whether f32 convolutions on this device (forward and both gradients) run on tensor cores
    /// in TF32: each operand rounded to nearest (ties away from zero) to 10 mantissa bits, the
    /// products summed in f32 — a relative error of about 2⁻¹¹ per operand instead of f32's
    /// 2⁻²⁴. On by default, as PyTorch's `torch.backends.cudnn.allow_tf32`; the emulator models
    /// the GPU and follows the same setting. f16 / bf16 convolutions are not affected, and
    /// neither is the host CPU backend, which stays exact f32.
    pub fn allow_tf32(&self) -> bool {
        self.allow_tf32.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns TF32 for f32 convolutions on or off ([`Device::allow_tf32`]); off keeps the exact
    /// f32 FFMA kernels. Applies to every handle of this device and to launches made after it.
    pub fn set_allow_tf32(&self, on: bool) {
        self.allow_tf32.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The CUDA GPU with this ordinal, checked to run this build: a typed error, never a panic,
    /// when the crate was built without nvcc ([`Error::CudaNotBuilt`]), there is no driver
    /// ([`Error::NoDriver`]) or no such GPU ([`Error::NoDevice`]), and
    /// [`Error::UnsupportedDevice`] when the driver is older than the CUDA release this build
    /// needs, the GPU's compute capability is not one this build embeds code for, or a test
    /// launch of one of our kernels fails.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        let device = Self::wrap(Backend::Cuda(cuda::CudaBackend::new(ordinal)?));
        device
            .test_launch()
            .map_err(|e| Error::UnsupportedDevice { ordinal, reason: format!("test launch failed: {e}") })?;
        Ok(device)
    }

    /// One of our kernels, run and read back: the step flag over one fresh record (no error)
    /// must read 0.
    fn test_launch(&self) -> Result<()> {
        self.begin_step()?;
        let result = self.test_launch_in_step();
        self.end_step();
        result
    }

    fn test_launch_in_step(&self) -> Result<()> {
        let _record = DeviceErrorRecord::new(self)?;
        let flag = self.step_skip_flag(None)?.ok_or_else(|| Error::InvalidArgument("no step record".into()))?;
        let mut v = [0u8; 4];
        flag.buffer().copy_to_host(&mut v)?;
        match f32::from_ne_bytes(v) {
            0.0 => Ok(()),
            other => Err(Error::InvalidArgument(format!("the test kernel wrote {other}, not 0"))),
        }
    }

    /// The first GPU if this build runs on it (see [`Device::cuda`]), else the emulator.
    pub fn best_available() -> Device {
        Self::best_available_why().0
    }

    /// [`Device::best_available`], with the reason in one line when it is not a GPU.
    pub fn best_available_why() -> (Device, Option<String>) {
        match Self::cuda(0) {
            Ok(d) => (d, None),
            Err(e) => (Self::emulator(), Some(format!("no usable GPU: {e}"))),
        }
    }

    /// Releases every block in this device's cache of freed memory (see `cache.rs`); memory in
    /// use is not affected.
    pub fn empty_cache(&self) {
        drop(self.cache.drain());
    }

    /// Bytes held in the cache of freed memory.
    pub fn cached_bytes(&self) -> usize {
        self.cache.cached_bytes()
    }

    /// The most bytes the cache keeps (default 4 GiB, or `CDCL_CACHE_LIMIT_MIB`); blocks freed
    /// beyond it are released. Lowering it below what is cached empties the cache.
    pub fn set_cache_limit(&self, bytes: usize) {
        drop(self.cache.set_limit(bytes));
    }

    /// GPU or emulator.
    pub fn kind(&self) -> DeviceKind {
        match &*self.inner {
            Backend::Emulator(_) => DeviceKind::Emulator,
            Backend::Cuda(_) => DeviceKind::Cuda,
        }
    }

    /// A human-readable name: the GPU's name, or the emulator with its seed.
    pub fn name(&self) -> String {
        match &*self.inner {
            Backend::Emulator(s) => format!("cpu-emulator(seed={}, threads={})", s.config().seed, s.config().threads),
            Backend::Cuda(c) => c.name(),
        }
    }

    /// True when both handles name the same device (and stream).
    pub fn same_device(&self, other: &Device) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// What this device has been asked to do since it was created (see [`DeviceCounters`]).
    pub fn counters(&self) -> DeviceCounters {
        let launches = match &*self.inner {
            // SAFETY: reads one atomic of the live stream object this device owns.
            Backend::Emulator(s) => unsafe { crate::ffi::cdcl_emu_kernel_launch_count(s.as_stream_ptr()) },
            #[cfg(cdcl_cuda)]
            // SAFETY: reads a process-wide atomic; the stream argument is not used.
            Backend::Cuda(_) => unsafe { crate::ffi::cdcl_cuda_kernel_launch_count(std::ptr::null_mut()) },
            #[cfg(not(cdcl_cuda))]
            Backend::Cuda(_) => 0,
        };
        self.counters.snapshot(launches)
    }

    /// Waits until every launch on this device has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.counters.host_sync();
        match &*self.inner {
            Backend::Emulator(_) => Ok(()), // emulator launches are synchronous
            Backend::Cuda(c) => c.synchronize(),
        }
    }

    /// Allocates `bytes` bytes of zeroed device memory (from the cache when it can).
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceBuffer> {
        DeviceBuffer::zeroed(self, bytes)
    }

    pub(crate) fn check_same(&self, other: &Device) -> Result<()> {
        if self.same_device(other) {
            Ok(())
        } else {
            Err(Error::DeviceMismatch { first: self.name(), second: other.name() })
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.name())
    }
}
