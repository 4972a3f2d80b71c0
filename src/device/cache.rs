//! The caching allocator: freed device memory goes back to a per-device cache, keyed by its
//! rounded size, and the next request of that size takes it from there. A training step asks
//! for the same sizes every iteration, so from the second step on it allocates nothing (the
//! step's accounting checks it: tests/device_counters.rs).
//!
//! Why our own cache rather than the CUDA memory pool alone: the pool's default release
//! threshold is 0, so every synchronisation hands freed memory back to the driver and the
//! next `cuMemAllocAsync` maps it again; the cache keeps it, counts what it does (so that the
//! emulator shows the GPU's allocation pattern) and can be emptied. The GPU backend also raises
//! the pool's threshold (src/device/cuda.rs) for whatever misses the cache.
//!
//! The cache holds at most [`CacheLimit`] bytes: memory freed beyond it is released at once.
//! [`Device::empty_cache`](super::Device::empty_cache) releases everything cached.

use std::collections::HashMap;
use std::sync::Mutex;

use super::buffer::Mem;

/// Request sizes are rounded up to this many bytes, so that tensors of nearly equal size share
/// blocks (and every block keeps the 256-byte alignment `cudaMalloc` gives).
pub(crate) const GRANULE: usize = 512;

/// The default most bytes a device's cache keeps: 4 GiB, or `CDCL_CACHE_LIMIT_MIB`.
pub(crate) fn default_limit() -> usize {
    std::env::var("CDCL_CACHE_LIMIT_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(4 << 30, |mib| mib.saturating_mul(1 << 20))
}

/// The block size that serves a request of `len` bytes.
pub(crate) fn rounded(len: usize) -> usize {
    // Under AddressSanitizer every block has its request's exact size, so that a kernel writing
    // past its output faults instead of landing in the rounding's slack.
    if cfg!(feature = "asan") {
        return len;
    }
    len.div_ceil(GRANULE).saturating_mul(GRANULE)
}

/// Freed blocks by size, and what they add up to.
#[derive(Default)]
struct Blocks {
    free: HashMap<usize, Vec<Mem>>,
    bytes: usize,
}

/// One device's cache of freed blocks.
pub(crate) struct MemCache {
    blocks: Mutex<Blocks>,
    limit: std::sync::atomic::AtomicUsize,
}

impl MemCache {
    pub(crate) fn new(limit: usize) -> Self {
        MemCache { blocks: Mutex::default(), limit: std::sync::atomic::AtomicUsize::new(limit) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Blocks> {
        // A panic while the lock was held leaves consistent data (each update is one step).
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cached block of exactly `size` bytes (a rounded size), if there is one.
    pub(crate) fn take(&self, size: usize) -> Option<Mem> {
        let mut b = self.lock();
        let mem = b.free.get_mut(&size)?.pop()?;
        b.bytes -= size;
        Some(mem)
    }

    /// Keeps a freed block of `size` bytes, or hands it back (to be released by the caller's
    /// drop) when the cache would exceed its limit.
    pub(crate) fn put(&self, size: usize, mem: Mem) -> Option<Mem> {
        let mut b = self.lock();
        if b.bytes.saturating_add(size) > self.limit.load(std::sync::atomic::Ordering::Relaxed) {
            return Some(mem);
        }
        b.bytes += size;
        b.free.entry(size).or_default().push(mem);
        None
    }

    /// Every cached block, removed from the cache (the caller releases them).
    pub(crate) fn drain(&self) -> Vec<Mem> {
        let mut b = self.lock();
        b.bytes = 0;
        b.free.drain().flat_map(|(_, v)| v).collect()
    }

    pub(crate) fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }

    pub(crate) fn set_limit(&self, limit: usize) -> Vec<Mem> {
        self.limit.store(limit, std::sync::atomic::Ordering::Relaxed);
        if self.cached_bytes() > limit {
            self.drain()
        } else {
            Vec::new()
        }
    }
}
