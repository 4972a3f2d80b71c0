//! Devices, device memory and kernel launches: with `src/ffi`, the only place that holds
//! `unsafe` code.
//!
//! A [`Device`] is either a CUDA GPU or the CPU emulator; both run the same kernels (see
//! `docs/architecture.md`). Launches on one device are ordered, like a CUDA stream.

mod buffer;
mod counters;
mod cuda;
pub mod emulator;
mod launch;
pub(crate) mod nccl;

pub(crate) use buffer::CopyRegion;
pub use buffer::DeviceBuffer;
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
        Ok(Device { inner: Arc::new(Backend::Emulator(emulator::EmuStream::new(config)?)), counters: Arc::default() })
    }

    /// The CUDA GPU with this ordinal. Returns a typed error, never panics, when the crate was
    /// built without nvcc ([`Error::CudaNotBuilt`]), there is no driver ([`Error::NoDriver`]) or
    /// no such GPU ([`Error::NoDevice`]).
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device { inner: Arc::new(Backend::Cuda(cuda::CudaBackend::new(ordinal)?)), counters: Arc::default() })
    }

    /// The first GPU if there is one, else the emulator.
    pub fn best_available() -> Device {
        Self::cuda(0).unwrap_or_else(|_| Self::emulator())
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

    /// Allocates `bytes` bytes of uninitialised-but-zeroed device memory.
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
