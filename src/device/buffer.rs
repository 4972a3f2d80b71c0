//! Untyped device memory with safe host copies.

use std::ffi::c_void;
use std::ptr::NonNull;

use super::{Backend, Device};
use crate::error::{Error, Result};
use crate::ffi;

pub(crate) enum Mem {
    /// No bytes: nothing allocated.
    Empty,
    /// Emulator memory: host memory from `cdcl_emu_malloc`, exactly `len` bytes.
    Emu(NonNull<u8>),
    /// GPU memory.
    Cuda(super::cuda::CudaMem),
}

/// `len` bytes of memory on one device. Freed on drop.
pub struct DeviceBuffer {
    device: Device,
    len: usize,
    mem: Mem,
}

// SAFETY: the buffer owns its allocation exclusively; emulator memory is plain host memory and
// CUDA memory is addressed through the device's context, which cudarc makes Send + Sync.
unsafe impl Send for DeviceBuffer {}
// SAFETY: shared references only read through `copy_to_host` or hand out const pointers.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    /// `len` zero bytes on `device`.
    pub fn zeroed(device: &Device, len: usize) -> Result<Self> {
        let mem = if len == 0 {
            Mem::Empty
        } else {
            match &*device.inner {
                Backend::Emulator(_) => {
                    // SAFETY: plain allocation; null is handled.
                    let p = unsafe { ffi::cdcl_emu_malloc(len) }.cast::<u8>();
                    let p = NonNull::new(p).ok_or(Error::OutOfMemory { bytes: len })?;
                    // SAFETY: `p` points to `len` writable bytes just allocated.
                    unsafe { std::ptr::write_bytes(p.as_ptr(), 0, len) };
                    Mem::Emu(p)
                }
                Backend::Cuda(c) => Mem::Cuda(c.alloc_zeroed(len)?),
            }
        };
        Ok(DeviceBuffer { device: device.clone(), len, mem })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device the memory lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Copies `src` (exactly `len` bytes) from the host into the buffer.
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        self.check_len(src.len())?;
        match &mut self.mem {
            Mem::Empty => Ok(()),
            // SAFETY: `p` owns `len` bytes; `src` has `len` bytes; they cannot overlap because
            // `src` is a Rust slice and the buffer is uniquely borrowed.
            Mem::Emu(p) => unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), p.as_ptr(), src.len());
                Ok(())
            },
            Mem::Cuda(m) => m.copy_from_host(src),
        }
    }

    /// Copies the buffer (exactly `len` bytes) to the host.
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        self.check_len(dst.len())?;
        match &self.mem {
            Mem::Empty => Ok(()),
            // SAFETY: as in copy_from_host, with the roles swapped.
            Mem::Emu(p) => unsafe {
                std::ptr::copy_nonoverlapping(p.as_ptr(), dst.as_mut_ptr(), dst.len());
                Ok(())
            },
            Mem::Cuda(m) => m.copy_to_host(dst),
        }
    }

    /// Fills the buffer with one byte value.
    pub fn fill_bytes(&mut self, value: u8) -> Result<()> {
        match &mut self.mem {
            Mem::Empty => Ok(()),
            // SAFETY: `p` owns `len` writable bytes.
            Mem::Emu(p) => unsafe {
                std::ptr::write_bytes(p.as_ptr(), value, self.len);
                Ok(())
            },
            Mem::Cuda(m) => m.copy_from_host(&vec![value; self.len]),
        }
    }

    /// Device address for a kernel's Params (null for an empty buffer).
    pub(crate) fn as_ptr(&self) -> *const c_void {
        match &self.mem {
            Mem::Empty => std::ptr::null(),
            Mem::Emu(p) => p.as_ptr().cast_const().cast(),
            Mem::Cuda(m) => m.device_ptr() as *const c_void,
        }
    }

    /// Device address for a kernel's Params, for writing.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut c_void {
        self.as_ptr().cast_mut()
    }

    /// A device copy of a multi-tensor SGD table (the `cdcl_sgd_tensor` entries of one launch).
    pub(crate) fn from_sgd_table(device: &Device, table: &[ffi::cdcl_sgd_tensor]) -> Result<Self> {
        // Three pointers, two i64, one f32 and one i32 fill the struct: it has no padding bytes.
        const _: () = assert!(std::mem::size_of::<ffi::cdcl_sgd_tensor>() == 3 * 8 + 2 * 8 + 4 + 4);
        let bytes = std::mem::size_of_val(table);
        // SAFETY: `cdcl_sgd_tensor` is `#[repr(C)]` without padding (asserted above), so all
        // `bytes` bytes of the slice are initialised; the byte view does not outlive `table`.
        let raw = unsafe { std::slice::from_raw_parts(table.as_ptr().cast::<u8>(), bytes) };
        let mut buf = DeviceBuffer::zeroed(device, bytes)?;
        buf.copy_from_host(raw)?;
        Ok(buf)
    }

    fn check_len(&self, n: usize) -> Result<()> {
        if n == self.len {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!("host copy of {n} bytes into a device buffer of {} bytes", self.len)))
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Mem::Emu(p) = &self.mem {
            // SAFETY: allocated by cdcl_emu_malloc, freed once; emulator launches are synchronous
            // so no kernel still uses it.
            unsafe { ffi::cdcl_emu_free(p.as_ptr().cast()) }
        }
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes on {})", self.len, self.device.name())
    }
}
