//! The whole training step end to end: autograd, PSPNet-DAB, DAT, on the CPU backend and on our
//! kernels (the test device), checked against each other (`backends`), against the unfused
//! composition of every fused graph path (`fused`), across precisions (`precision`), and for the
//! DSBN, checkpoint and determinism properties users rely on (`dat`).

#[path = "../common/mod.rs"]
mod common;

mod backends;
mod dat;
mod data_parallel;
mod fused;
mod modes;
mod precise_bn;
mod precision;
mod sync_bn;
mod usss;

use cdcl::autograd::{Graph, Group, LossSpec, ParamStore};
use cdcl::backend::{Backend, BnTables, CpuBackend, DeviceBackend};
use cdcl::nn::{Classifier, Dab, DabSpec, Depth, ModelConfig};
use cdcl::ops::conv::ConvGeometry;
use cdcl::rng::splitmix64;
use cdcl::train::{Batch, Mode, TrainConfig, Trainer};
use common::unit;

/// A batch of smooth random images (so that the model's outputs are not dominated by noise)
/// and labels with a sprinkle of ignored pixels.
fn batch(dataset: usize, n: usize, h: usize, w: usize, classes: usize, seed: u64) -> Batch {
    let images = (0..n * h * w * 3).map(|i| 2.0 * unit(seed, i as u64) - 1.0).collect();
    let labels = (0..n * h * w)
        .map(|i| {
            let u = unit(seed ^ 0xABCD, i as u64);
            if u < 0.05 {
                255
            } else {
                // Labels follow the image's first channel so that there is something to learn.
                ((unit(seed, (i * 3) as u64) * classes as f32) as i32).min(classes as i32 - 1)
            }
        })
        .collect();
    Batch { dataset, n, h, w, images, labels }
}

fn tiny_model(num_classes: Vec<usize>, dropout: f32) -> ModelConfig {
    ModelConfig { depth: Depth::R18, width: 1.0 / 16.0, dropout, seed: 7, ..ModelConfig::resnet18(num_classes) }
}

/// Every parameter and gradient of a store, on the host, by name.
fn snapshot<B: Backend>(store: &ParamStore<B>) -> Vec<(String, Vec<f32>, Option<Vec<f32>>)> {
    let be = store.backend();
    let mut out = Vec::new();
    for w in store.weights() {
        out.push((w.name.clone(), be.to_f32(&w.value).unwrap(), w.grad.as_ref().map(|g| be.to_f32(g).unwrap())));
        if let Some(h) = &w.half {
            out.push((format!("{}.half", w.name), be.to_f32(h).unwrap(), None));
        }
    }
    for l in store.bn_layers() {
        let [g, b, m, v] = l.tables.tables();
        out.push((
            format!("{}.gamma", l.name),
            be.to_f32(g).unwrap(),
            l.grad_gamma.as_ref().map(|t| be.to_f32(t).unwrap()),
        ));
        out.push((
            format!("{}.beta", l.name),
            be.to_f32(b).unwrap(),
            l.grad_beta.as_ref().map(|t| be.to_f32(t).unwrap()),
        ));
        out.push((format!("{}.running_mean", l.name), be.to_f32(m).unwrap(), None));
        out.push((format!("{}.running_var", l.name), be.to_f32(v).unwrap(), None));
    }
    out
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    num / den.max(1e-12)
}

fn device_backend() -> DeviceBackend {
    DeviceBackend::new(common::test_device())
}
