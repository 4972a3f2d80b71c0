//! What the convolution benches share: the layer shapes both time, so that benches/dab.rs and
//! benches/dab_cudnn.rs measure the same problems, the data generator, and the choice between
//! the GPU benches and the CPU-reference stand-ins.
#![allow(dead_code)]

use cdcl::{Device, DeviceKind};
use criterion::Criterion;

pub struct Layer {
    pub name: &'static str,
    pub hw: usize,
    pub c: usize,
    pub k: usize,
    pub dilation: usize,
}

/// The ResNet-18 3x3 layers of a dilated network at output stride 8 on 512x512 crops: layer1 at
/// 128x128, layer2 at 64x64, dilated layer3/4 stay at 64x64 (stride 1, padding = dilation).
pub const LAYERS: [Layer; 4] = [
    Layer { name: "layer1", hw: 128, c: 64, k: 64, dilation: 1 },
    Layer { name: "layer2", hw: 64, c: 128, k: 128, dilation: 1 },
    Layer { name: "layer3", hw: 64, c: 256, k: 256, dilation: 2 },
    Layer { name: "layer4", hw: 64, c: 512, k: 512, dilation: 4 },
];

/// Deterministic values in [-1, 1).
pub fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| (((i + seed) * 7919) % 1000) as f32 * 0.002 - 1.0).collect()
}

/// `gpu` on the first CUDA device; without one, says why and runs `cpu` instead, so that
/// `cargo bench` always measures something (`cpu_what` says what).
pub fn on_gpu_or_cpu(
    c: &mut Criterion,
    gpu_what: &str,
    cpu_what: &str,
    gpu: impl FnOnce(&mut Criterion, &Device),
    cpu: impl FnOnce(&mut Criterion),
) {
    match Device::cuda(0) {
        Ok(dev) if dev.kind() == DeviceKind::Cuda => {
            eprintln!("benchmarking {gpu_what} on {}", dev.name());
            gpu(c, &dev);
        }
        other => {
            let why = other.err().map(|e| e.to_string()).unwrap_or_default();
            eprintln!("no GPU ({why}): measuring {cpu_what} instead");
            cpu(c);
        }
    }
}
