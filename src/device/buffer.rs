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
            device.counters.allocation(len);
            device.counters.memset(len);
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
        if !src.is_empty() {
            self.device.counters.host_to_device(src.len());
        }
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
        if !dst.is_empty() {
            self.device.counters.device_to_host(dst.len());
        }
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
        if self.len > 0 {
            self.device.counters.memset(self.len);
        }
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

    /// Copies a strided byte region of `src` (same device) into this buffer, ordered with the
    /// device's launches like a kernel: row `i` of `region.width` bytes is read at
    /// `src_offset + i * src_pitch` and written at `dst_offset + i * dst_pitch`. Both regions are
    /// checked against their buffers; rows may not overlap each other (`width <= pitch` when
    /// there is more than one row). The buffers are distinct allocations, so the regions never
    /// alias. On the GPU this is one `cuMemcpy2DAsync` (one `cuMemcpyDtoDAsync` for one row).
    pub(crate) fn copy_region_from(&mut self, src: &DeviceBuffer, region: CopyRegion) -> Result<()> {
        self.device.check_same(&src.device)?;
        let r = region.normalized();
        if r.width == 0 || r.rows == 0 {
            return Ok(());
        }
        if r.rows > 1 && (r.width > r.src_pitch || r.width > r.dst_pitch) {
            return Err(Error::InvalidArgument(format!(
                "device copy: rows of {} bytes overlap in {region:?}",
                r.width
            )));
        }
        let end = |offset: usize, pitch: usize| {
            (r.rows - 1).checked_mul(pitch).and_then(|v| v.checked_add(offset)).and_then(|v| v.checked_add(r.width))
        };
        if end(r.src_offset, r.src_pitch).is_none_or(|e| e > src.len)
            || end(r.dst_offset, r.dst_pitch).is_none_or(|e| e > self.len)
        {
            return Err(Error::InvalidArgument(format!(
                "device copy: {region:?} does not fit a source of {} bytes and a destination of {} bytes",
                src.len, self.len
            )));
        }
        self.device.counters.device_to_device();
        match (&mut self.mem, &src.mem) {
            (Mem::Emu(d), Mem::Emu(s)) => {
                for i in 0..r.rows {
                    // SAFETY: row i lies inside both allocations (checked above: the last row
                    // ends at or before `len`); `self` and `src` are distinct buffers, each the
                    // exclusive owner of its allocation, so the ranges cannot overlap; emulator
                    // launches are synchronous, so no kernel touches either buffer meanwhile.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            s.as_ptr().add(r.src_offset + i * r.src_pitch),
                            d.as_ptr().add(r.dst_offset + i * r.dst_pitch),
                            r.width,
                        )
                    };
                }
                Ok(())
            }
            (Mem::Cuda(d), Mem::Cuda(s)) => d.copy_region_from(s, &r),
            // A non-empty region fits no empty buffer, and one device holds one kind of memory.
            _ => Err(Error::InvalidArgument("device copy between buffers of different kinds".into())),
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
        // Three pointers, three i64, one u64, one f32 and one i32 fill the struct: it has no
        // padding bytes.
        const _: () = assert!(std::mem::size_of::<ffi::cdcl_sgd_tensor>() == 3 * 8 + 3 * 8 + 8 + 4 + 4);
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

/// A strided byte region of a device-to-device copy (see [`DeviceBuffer::copy_region_from`]):
/// `rows` rows of `width` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CopyRegion {
    pub(crate) src_offset: usize,
    pub(crate) src_pitch: usize,
    pub(crate) dst_offset: usize,
    pub(crate) dst_pitch: usize,
    pub(crate) width: usize,
    pub(crate) rows: usize,
}

impl CopyRegion {
    /// `len` contiguous bytes.
    pub(crate) fn contiguous(src_offset: usize, dst_offset: usize, len: usize) -> Self {
        CopyRegion { src_offset, src_pitch: len, dst_offset, dst_pitch: len, width: len, rows: 1 }
    }

    /// The same copy with rows that are contiguous on both sides merged into one.
    fn normalized(self) -> Self {
        if self.rows > 1 && self.width == self.src_pitch && self.width == self.dst_pitch {
            match self.width.checked_mul(self.rows) {
                Some(len) => CopyRegion::contiguous(self.src_offset, self.dst_offset, len),
                None => self,
            }
        } else {
            self
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
