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

// SAFETY: a `Mem` owns its allocation exclusively (emulator host memory, or a cudarc slice,
// which is Send); moving it to another thread moves that ownership. The device's cache keeps
// freed blocks behind a mutex, which needs this.
unsafe impl Send for Mem {}

/// `len` bytes of memory on one device. Returned to the device's cache on drop (see
/// `cache.rs`).
pub struct DeviceBuffer {
    device: Device,
    len: usize,
    /// The size of the block behind the buffer (`len` rounded up to the cache's granule).
    block: usize,
    /// Changes with every write through this handle (see [`DeviceBuffer::generation`]).
    generation: u64,
    mem: Mem,
}

/// Generations of buffer contents, unique in the process.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

// SAFETY: the buffer owns its allocation exclusively; emulator memory is plain host memory and
// CUDA memory is addressed through the device's context, which cudarc makes Send + Sync.
unsafe impl Send for DeviceBuffer {}
// SAFETY: shared references only read through `copy_to_host` or hand out const pointers.
unsafe impl Sync for DeviceBuffer {}

/// What a fresh allocation holds on the emulator, so that a kernel that leaves part of its
/// output unwritten fails the tests instead of passing on zeros: a NaN in every float element
/// and an integer no kernel produces. On a GPU fresh memory is whatever was there before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Poison {
    /// 4-byte elements (f32, i32) and untyped memory: the word `0xFFBADBAD`, a NaN as f32 and
    /// −4 465 747 as i32.
    Word,
    /// 2-byte elements (f16, bf16): `0x7FFF`, a NaN in both formats.
    Half,
    /// Bytes (u8): `0xBD`.
    Byte,
}

impl Poison {
    /// The 4-byte word of the poison pattern (as stored, little-endian halves repeat).
    pub(crate) const WORD: u32 = 0xFFBA_DBAD;

    fn fill(self, bytes: &mut [u8]) {
        let pattern: [u8; 4] = match self {
            Poison::Word => Self::WORD.to_ne_bytes(),
            Poison::Half => {
                let h = 0x7FFFu16.to_ne_bytes();
                [h[0], h[1], h[0], h[1]]
            }
            Poison::Byte => [0xBD; 4],
        };
        let mut chunks = bytes.chunks_exact_mut(4);
        for c in &mut chunks {
            c.copy_from_slice(&pattern);
        }
        let rest = chunks.into_remainder();
        let n = rest.len();
        rest.copy_from_slice(&pattern[..n]);
    }
}

impl DeviceBuffer {
    /// `len` zero bytes on `device` (one counted memset).
    pub fn zeroed(device: &Device, len: usize) -> Result<Self> {
        let mut buf = Self::uninit(device, len, Poison::Word)?;
        buf.fill_bytes(0)?;
        Ok(buf)
    }

    /// `len` bytes on `device` whose contents are unspecified: for outputs that a kernel writes
    /// in full. From the device's cache when it holds a block of that size (no allocation
    /// then); on the emulator filled with `poison` (not counted as a memset: a GPU would not
    /// write anything).
    pub(crate) fn uninit(device: &Device, len: usize, poison: Poison) -> Result<Self> {
        if len == 0 {
            return Ok(DeviceBuffer {
                device: device.clone(),
                len,
                block: 0,
                generation: next_generation(),
                mem: Mem::Empty,
            });
        }
        let block = super::cache::rounded(len);
        let mem = match device.cache.take(block) {
            Some(mem) => {
                device.counters.cache_hit();
                mem
            }
            None => Self::allocate(device, block)?,
        };
        if let Mem::Emu(p) = &mem {
            // SAFETY: `p` owns `block >= len` writable bytes that nothing else references (a
            // fresh allocation, or a block that its previous buffer gave back on drop).
            poison.fill(unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), len) });
        }
        Ok(DeviceBuffer { device: device.clone(), len, block, generation: next_generation(), mem })
    }

    /// [`DeviceBuffer::uninit`] with the 4-byte poison: workspaces, partials and tables that
    /// are written in full before they are read.
    pub(crate) fn uninit_words(device: &Device, len: usize) -> Result<Self> {
        Self::uninit(device, len, Poison::Word)
    }

    /// A new block from the device (the cache had none of this size). When the device is out
    /// of memory the cache is emptied and the allocation tried once more.
    fn allocate(device: &Device, block: usize) -> Result<Mem> {
        let once = || -> Result<Mem> {
            match &*device.inner {
                Backend::Emulator(_) => {
                    // SAFETY: plain allocation; null is handled.
                    let p = unsafe { ffi::cdcl_emu_malloc(block) }.cast::<u8>();
                    Ok(Mem::Emu(NonNull::new(p).ok_or(Error::OutOfMemory { bytes: block })?))
                }
                Backend::Cuda(c) => Ok(Mem::Cuda(c.alloc(block)?)),
            }
        };
        let mem = once().or_else(|e| match e {
            Error::OutOfMemory { .. } if device.cache.cached_bytes() > 0 => {
                drop(device.cache.drain());
                once()
            }
            e => Err(e),
        })?;
        device.counters.allocation(block);
        Ok(mem)
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

    /// Which contents the buffer holds: a number that changes with every write through this
    /// handle (an upload, a fill, a copy into it, a kernel given its mutable pointer), so that
    /// "these indices were validated" can be remembered safely for a step.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Copies `src` (exactly `len` bytes) from the host into the buffer. On a GPU the bytes are
    /// staged in pinned memory and the copy is queued: the host does not wait for the device.
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        self.check_len(src.len())?;
        self.generation = next_generation();
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
            Mem::Cuda(m) => match &*self.device.inner {
                Backend::Cuda(c) => m.copy_from_host(c, src),
                Backend::Emulator(_) => Err(Error::InvalidArgument("GPU memory on an emulator device".into())),
            },
        }
    }

    /// Copies the buffer (exactly `len` bytes) to the host. Inside a training step this read
    /// also brings the step's error records (under the same wait) and reports the first error
    /// an op of the step recorded (see `step.rs`).
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        self.check_len(dst.len())?;
        if self.device.step.has_pending() {
            return self.device.read_with_step_records(self, dst);
        }
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
            Mem::Cuda(m) => match &*self.device.inner {
                Backend::Cuda(c) => {
                    let v = c.read_many(&[(m, dst.len())])?;
                    dst.copy_from_slice(&v[0]);
                    Ok(())
                }
                Backend::Emulator(_) => Err(Error::InvalidArgument("GPU memory on an emulator device".into())),
            },
        }
    }

    /// Reads this buffer into `dst` and `other`'s first `other_dst.len()` bytes into
    /// `other_dst`, waiting for the device once.
    pub(crate) fn read_with(&self, other: &DeviceBuffer, dst: &mut [u8], other_dst: &mut [u8]) -> Result<()> {
        self.check_len(dst.len())?;
        if other_dst.len() > other.len {
            return Err(Error::InvalidArgument("read-back outside its buffer".into()));
        }
        self.device.counters.device_to_host(dst.len());
        self.device.counters.device_to_host_unsynced(other_dst.len());
        match (&self.mem, &other.mem) {
            (Mem::Empty, Mem::Empty) => Ok(()),
            (Mem::Empty, _) => other.copy_prefix_to_host(other_dst),
            (_, Mem::Empty) => self.copy_prefix_to_host(dst),
            (Mem::Emu(_), Mem::Emu(_)) => {
                self.copy_prefix_to_host(dst)?;
                other.copy_prefix_to_host(other_dst)
            }
            (Mem::Cuda(a), Mem::Cuda(b)) => match &*self.device.inner {
                Backend::Cuda(c) => {
                    let v = c.read_many(&[(a, dst.len()), (b, other_dst.len())])?;
                    dst.copy_from_slice(&v[0]);
                    other_dst.copy_from_slice(&v[1]);
                    Ok(())
                }
                Backend::Emulator(_) => Err(Error::InvalidArgument("GPU memory on an emulator device".into())),
            },
            _ => Err(Error::InvalidArgument("read-back of buffers of different kinds".into())),
        }
    }

    /// The first `dst.len()` bytes to the host, uncounted (the callers count).
    fn copy_prefix_to_host(&self, dst: &mut [u8]) -> Result<()> {
        match &self.mem {
            Mem::Empty => Ok(()),
            // SAFETY: `p` owns at least `len >= dst.len()` bytes (checked by the callers); no
            // kernel runs meanwhile (emulator launches are synchronous).
            Mem::Emu(p) => unsafe {
                std::ptr::copy_nonoverlapping(p.as_ptr(), dst.as_mut_ptr(), dst.len());
                Ok(())
            },
            Mem::Cuda(m) => match &*self.device.inner {
                Backend::Cuda(c) => {
                    let v = c.read_many(&[(m, dst.len())])?;
                    dst.copy_from_slice(&v[0]);
                    Ok(())
                }
                Backend::Emulator(_) => Err(Error::InvalidArgument("GPU memory on an emulator device".into())),
            },
        }
    }

    /// Fills the buffer with one byte value.
    pub fn fill_bytes(&mut self, value: u8) -> Result<()> {
        self.generation = next_generation();
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
            Mem::Cuda(m) => m.fill_bytes(value, self.len),
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
        self.generation = next_generation();
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
        self.generation = next_generation();
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
        let mut buf = DeviceBuffer::uninit(device, bytes, Poison::Word)?;
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

impl Drop for Mem {
    fn drop(&mut self) {
        if let Mem::Emu(p) = self {
            // SAFETY: allocated by cdcl_emu_malloc, freed once (a `Mem` is never copied);
            // emulator launches are synchronous so no kernel still uses it.
            unsafe { ffi::cdcl_emu_free(p.as_ptr().cast()) }
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let mem = std::mem::replace(&mut self.mem, Mem::Empty);
        if !matches!(mem, Mem::Empty) {
            // Beyond the cache's limit the block comes back and is released here. On a GPU a
            // cached block may be handed out again while a kernel queued earlier still reads
            // it: that is safe because every launch and copy is ordered on the device's one
            // stream, as with the stream-ordered allocator.
            drop(self.device.cache.put(self.block, mem));
        }
    }
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({} bytes on {})", self.len, self.device.name())
    }
}
