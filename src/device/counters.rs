//! Step accounting: what a device has been asked to do — kernel launches, allocations, memsets,
//! copies and host synchronisations — counted where it happens, so that a training step's cost
//! in round trips and allocations can be read (and tested) without a GPU or a profiler.
//!
//! The emulator runs every launch and copy synchronously, so for it the counts are those a GPU
//! would make for the same calls: a host synchronisation is counted wherever the GPU path waits
//! for the stream (a device-to-host copy — several read together wait once —,
//! [`Device::synchronize`](super::Device::synchronize), every launch under
//! `CDCL_SYNC_LAUNCHES=1`). Uploads are staged through pinned memory and do not wait.

use std::ops::{Add, Sub};
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a device's counters since it was created. Subtract two snapshots to get what
/// happened in between (`after - before`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Kernels launched (one per `<<<>>>`, not per op: an op may launch several).
    pub kernel_launches: u64,
    /// Device allocations (requests the cache could not serve).
    pub allocations: u64,
    /// Requests served from the device's cache of freed blocks (no allocation).
    pub cache_hits: u64,
    /// Bytes of those allocations.
    pub bytes_allocated: u64,
    /// Fills of device memory with a byte value (zero-filled allocations included).
    pub memsets: u64,
    /// Bytes of those fills.
    pub memset_bytes: u64,
    /// Host-to-device copies.
    pub host_to_device_copies: u64,
    /// Bytes of those copies.
    pub host_to_device_bytes: u64,
    /// Device-to-host copies.
    pub device_to_host_copies: u64,
    /// Bytes of those copies.
    pub device_to_host_bytes: u64,
    /// Device-to-device copies (channel and batch slices, concatenations).
    pub device_to_device_copies: u64,
    /// Times the host waited for the device.
    pub host_syncs: u64,
}

impl Sub for DeviceCounters {
    type Output = DeviceCounters;

    fn sub(self, before: DeviceCounters) -> DeviceCounters {
        DeviceCounters {
            kernel_launches: self.kernel_launches.saturating_sub(before.kernel_launches),
            allocations: self.allocations.saturating_sub(before.allocations),
            cache_hits: self.cache_hits.saturating_sub(before.cache_hits),
            bytes_allocated: self.bytes_allocated.saturating_sub(before.bytes_allocated),
            memsets: self.memsets.saturating_sub(before.memsets),
            memset_bytes: self.memset_bytes.saturating_sub(before.memset_bytes),
            host_to_device_copies: self.host_to_device_copies.saturating_sub(before.host_to_device_copies),
            host_to_device_bytes: self.host_to_device_bytes.saturating_sub(before.host_to_device_bytes),
            device_to_host_copies: self.device_to_host_copies.saturating_sub(before.device_to_host_copies),
            device_to_host_bytes: self.device_to_host_bytes.saturating_sub(before.device_to_host_bytes),
            device_to_device_copies: self.device_to_device_copies.saturating_sub(before.device_to_device_copies),
            host_syncs: self.host_syncs.saturating_sub(before.host_syncs),
        }
    }
}

impl Add for DeviceCounters {
    type Output = DeviceCounters;

    fn add(self, o: DeviceCounters) -> DeviceCounters {
        DeviceCounters {
            kernel_launches: self.kernel_launches + o.kernel_launches,
            allocations: self.allocations + o.allocations,
            cache_hits: self.cache_hits + o.cache_hits,
            bytes_allocated: self.bytes_allocated + o.bytes_allocated,
            memsets: self.memsets + o.memsets,
            memset_bytes: self.memset_bytes + o.memset_bytes,
            host_to_device_copies: self.host_to_device_copies + o.host_to_device_copies,
            host_to_device_bytes: self.host_to_device_bytes + o.host_to_device_bytes,
            device_to_host_copies: self.device_to_host_copies + o.device_to_host_copies,
            device_to_host_bytes: self.device_to_host_bytes + o.device_to_host_bytes,
            device_to_device_copies: self.device_to_device_copies + o.device_to_device_copies,
            host_syncs: self.host_syncs + o.host_syncs,
        }
    }
}

impl std::fmt::Display for DeviceCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        write!(
            f,
            "{} kernel launches | {} allocations ({:.2} MiB), {} from the cache | {} memsets ({:.2} MiB) | \
             H→D {} copies ({:.2} MiB) | D→H {} copies ({:.3} MiB) | D→D {} copies | {} host syncs",
            self.kernel_launches,
            self.allocations,
            mib(self.bytes_allocated),
            self.cache_hits,
            self.memsets,
            mib(self.memset_bytes),
            self.host_to_device_copies,
            mib(self.host_to_device_bytes),
            self.device_to_host_copies,
            mib(self.device_to_host_bytes),
            self.device_to_device_copies,
            self.host_syncs
        )
    }
}

/// The live counters of one device (kernel launches are counted on the C side).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    allocations: AtomicU64,
    cache_hits: AtomicU64,
    bytes_allocated: AtomicU64,
    memsets: AtomicU64,
    memset_bytes: AtomicU64,
    h2d_copies: AtomicU64,
    h2d_bytes: AtomicU64,
    d2h_copies: AtomicU64,
    d2h_bytes: AtomicU64,
    d2d_copies: AtomicU64,
    host_syncs: AtomicU64,
}

fn bump(c: &AtomicU64, by: usize) {
    c.fetch_add(by as u64, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn allocation(&self, bytes: usize) {
        bump(&self.allocations, 1);
        bump(&self.bytes_allocated, bytes);
    }

    pub(crate) fn cache_hit(&self) {
        bump(&self.cache_hits, 1);
    }

    pub(crate) fn memset(&self, bytes: usize) {
        bump(&self.memsets, 1);
        bump(&self.memset_bytes, bytes);
    }

    /// A host-to-device copy, staged through pinned memory: the host does not wait.
    pub(crate) fn host_to_device(&self, bytes: usize) {
        bump(&self.h2d_copies, 1);
        bump(&self.h2d_bytes, bytes);
    }

    /// A device-to-host copy read under another copy's wait (no wait of its own).
    pub(crate) fn device_to_host_unsynced(&self, bytes: usize) {
        bump(&self.d2h_copies, 1);
        bump(&self.d2h_bytes, bytes);
    }

    /// A device-to-host copy, which waits for every launch before it.
    pub(crate) fn device_to_host(&self, bytes: usize) {
        bump(&self.d2h_copies, 1);
        bump(&self.d2h_bytes, bytes);
        bump(&self.host_syncs, 1);
    }

    pub(crate) fn device_to_device(&self) {
        bump(&self.d2d_copies, 1);
    }

    pub(crate) fn host_sync(&self) {
        bump(&self.host_syncs, 1);
    }

    pub(crate) fn snapshot(&self, kernel_launches: u64) -> DeviceCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DeviceCounters {
            kernel_launches,
            allocations: get(&self.allocations),
            cache_hits: get(&self.cache_hits),
            bytes_allocated: get(&self.bytes_allocated),
            memsets: get(&self.memsets),
            memset_bytes: get(&self.memset_bytes),
            host_to_device_copies: get(&self.h2d_copies),
            host_to_device_bytes: get(&self.h2d_bytes),
            device_to_host_copies: get(&self.d2h_copies),
            device_to_host_bytes: get(&self.d2h_bytes),
            device_to_device_copies: get(&self.d2d_copies),
            host_syncs: get(&self.host_syncs),
        }
    }
}
