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
