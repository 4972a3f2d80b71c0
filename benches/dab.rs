//! Convolution and Dataset-Aware Block throughput. On a GPU: our conv forward / data gradient /
//! filter gradient, the fused DAB training forward + backward and the one-kernel inference
//! forward, on the ResNet-18 3x3 layer shapes of a dilated (output stride 8) network at batch 8
//! on 512x512 crops, in f32 (FFMA mainloop, TF32 off), f32 in TF32 (tensor cores, the default)
//! and bf16 (tensor-core mainloop). Without a GPU the
//! bench says so and measures the f64 CPU reference on a small shape, so `cargo bench` always runs (those numbers describe the oracle, not the
//! kernels). The comparison with cuDNN (conv + per-dataset BatchNorm on the split batch + ReLU)
//! is benches/dab_cudnn.rs.

use cdcl::ops::conv::{self, ConvGeometry};
use cdcl::ops::dab::{self, DabOptions};
use cdcl::ops::dsbn::{DsbnOptions, DsbnState};
use cdcl::reference::conv as rconv;
use cdcl::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use ndarray::Array4;

mod common;
use common::{values, LAYERS};

fn filled(dev: &Device, shape: &[usize], seed: usize, dtype: DType) -> Tensor {
    let v = values(shape.iter().product(), seed);
    match dtype {
        DType::BF16 => Tensor::from_slice(dev, shape, &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
        _ => Tensor::from_slice(dev, shape, &v),
    }
    .unwrap()
}

fn gpu_benches(c: &mut Criterion, dev: &Device) {
    let mut g = c.benchmark_group("dab/gpu");
    g.sample_size(10);
    let batch = 8;
    for (l, dtype, tf32) in
        LAYERS.iter().flat_map(|l| [(l, DType::F32, false), (l, DType::F32, true), (l, DType::BF16, false)])
    {
        dev.set_allow_tf32(tf32);
        let name = if tf32 { format!("{}/tf32", l.name) } else { format!("{}/{dtype}", l.name) };
        let geom = ConvGeometry::square(1, l.dilation, l.dilation);
        let x = filled(dev, &[batch, l.hw, l.hw, l.c], 1, dtype);
        let w = filled(dev, &[l.k, 3, 3, l.c], 2, dtype);
        let dy = filled(dev, &[batch, l.hw, l.hw, l.k], 3, dtype);
        let ds = Tensor::from_slice(dev, &[batch], &[0i32, 1, 0, 1, 0, 1, 0, 1]).unwrap();
        let mut st = DsbnState::new(dev, 2, l.k).unwrap();
        let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
        g.throughput(Throughput::Elements((2 * batch * l.hw * l.hw * l.k * 9 * l.c) as u64)); // FLOPs
        g.bench_function(BenchmarkId::new("conv_forward", &name), |b| {
            b.iter(|| {
                conv::conv2d(&x, &w, None, &geom).unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("conv_backward_data", &name), |b| {
            b.iter(|| {
                conv::conv2d_backward_data(&dy, &w, (l.hw, l.hw), &geom).unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("conv_backward_filter", &name), |b| {
            b.iter(|| {
                conv::conv2d_backward_filter(&dy, &x, (l.k, 3, 3), false, &geom).unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("dab_train_forward_backward", &name), |b| {
            b.iter(|| {
                let f = dab::forward_train(
                    &x,
                    &w,
                    &ds,
                    &mut st,
                    &DabOptions { geometry: geom, dsbn: opts, materialize: true, ..Default::default() },
                )
                .unwrap();
                dab::backward_train(
                    &dy,
                    &x,
                    &w,
                    &ds,
                    &st,
                    f.saved(),
                    &DabOptions { geometry: geom, dsbn: opts, materialize: true, ..Default::default() },
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
        g.bench_function(BenchmarkId::new("dab_inference", &name), |b| {
            b.iter(|| {
                dab::forward_infer(&x, &w, &ds, &st, &DabOptions { geometry: geom, dsbn: opts, ..Default::default() })
                    .unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

fn reference_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("dab/cpu-reference");
    g.sample_size(10);
    let (n, hw, ch) = (2, 16, 16);
    let x = Array4::from_shape_fn((n, hw, hw, ch), |(a, b, c, d)| ((a + b * 3 + c * 5 + d * 7) % 11) as f64 * 0.1);
    let w = Array4::from_shape_fn((ch, 3, 3, ch), |(a, b, c, d)| ((a * 2 + b + c * 3 + d) % 7) as f64 * 0.1 - 0.3);
    let spec = rconv::ConvSpec { stride: (1, 1), padding: (1, 1), dilation: (1, 1) };
    g.throughput(Throughput::Elements((2 * n * hw * hw * ch * 9 * ch) as u64));
    g.bench_function("conv_forward_2x16x16x16", |b| b.iter(|| rconv::conv2d(x.view(), w.view(), None, &spec)));
    let y = rconv::conv2d(x.view(), w.view(), None, &spec);
    g.bench_function("conv_backward_2x16x16x16", |b| {
        b.iter(|| rconv::conv2d_backward(y.view(), x.view(), w.view(), &spec))
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    common::on_gpu_or_cpu(c, "convolutions and DABs", "the CPU reference", gpu_benches, reference_benches);
}

criterion_group!(dab_benches, benches);
criterion_main!(dab_benches);
