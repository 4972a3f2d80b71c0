//! `--profile`: one line per iteration with its wall time and what the device was asked to do.

use std::time::Instant;

use cdcl::backend::{Backend, OpCounters};
use cdcl::DeviceCounters;

/// The counters at the start of one iteration.
pub struct StepProfile {
    device: Option<DeviceCounters>,
    ops: Option<OpCounters>,
    start: Instant,
}

impl StepProfile {
    /// Reads the backend's counters before the step.
    pub fn start<B: Backend>(backend: &B) -> Self {
        StepProfile { device: backend.device_counters(), ops: backend.op_counters(), start: Instant::now() }
    }

    /// The line for iteration `it`, after its step.
    pub fn line<B: Backend>(&self, backend: &B, it: usize) -> String {
        let ms = self.start.elapsed().as_secs_f64() * 1e3;
        let mut line = match (backend.device_counters(), self.device) {
            (Some(after), Some(before)) => format!("profile: iteration {it}: {ms:.1} ms | {}", after - before),
            _ => format!("profile: iteration {it}: {ms:.1} ms (host backend: no device counters)"),
        };
        if let (Some(after), Some(before)) = (backend.op_counters(), self.ops) {
            line.push_str(&format!(" | {}", after - before));
        }
        line
    }
}

/// The CPU backend's time per op over the `iterations` just run (nothing when no CPU backend
/// op was timed): one line per op, the most expensive first, with its share of the ops' total.
pub fn print_cpu_op_times(iterations: usize) {
    let times = cdcl::backend::CpuBackend::op_times();
    // "op: part" entries are parts of "op", already in its time.
    let total: f64 = times.iter().filter(|t| !t.0.contains(':')).map(|t| t.1).sum();
    if times.is_empty() || iterations == 0 || total <= 0.0 {
        return;
    }
    let per = iterations as f64;
    eprintln!(
        "profile: CPU backend ops, per iteration over {iterations} iterations ({:.1} ms in ops):",
        1e3 * total / per
    );
    for (op, secs, calls) in times {
        eprintln!(
            "profile:   {op:<28} {:>8.2} ms {:>5.1} % {:>6.1} calls",
            1e3 * secs / per,
            100.0 * secs / total,
            calls as f64 / per
        );
    }
}
