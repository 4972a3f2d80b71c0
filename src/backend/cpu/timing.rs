//! Wall time per backend op, for profiling (`cdcl train --profile` on the CPU backend): off
//! by default, when a relaxed atomic load is all an op pays. Each trait method of
//! [`CpuBackend`](super::CpuBackend) is one entry; the ops do not call each other through the
//! trait, so the entries do not overlap and add up to the time spent inside the backend. An
//! entry named `op: part` is a part of `op` (the composite ops time their steps), not counted
//! again in the total.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

/// Starts (or stops) accumulating the time of every op, process-wide.
pub(crate) fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// `f()`, its wall time added to `name`'s total when timing is on.
pub(crate) fn timed<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let dt = start.elapsed();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    match totals.iter_mut().find(|(n, _, _)| *n == name) {
        Some(entry) => {
            entry.1 += dt;
            entry.2 += 1;
        }
        None => totals.push((name, dt, 1)),
    }
    out
}

/// (op, total seconds, calls) of every op timed so far, the most expensive first.
pub(crate) fn totals() -> Vec<(&'static str, f64, u64)> {
    let totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = totals.iter().map(|&(n, d, c)| (n, d.as_secs_f64(), c)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
