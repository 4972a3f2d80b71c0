//! DSBN throughput (and that of Dropout2d and max pooling, the other per-(sample, channel)
//! elementwise passes, tiled the same way). On a GPU: training forward, backward and inference forward on ResNet-18
//! activation shapes at batch 8 (512x512 crops: layer1 is 128x128x64), f32 and bf16, mixed
//! datasets in one batch. Without a GPU the bench says so and measures the emulator and the
//! f64 CPU reference on a small shape, so `cargo bench` always runs; those numbers describe the
//! test infrastructure, not the kernels' GPU speed.

use cdcl::ops::dropout::{self, Dropout2dOptions};
use cdcl::ops::dsbn::{self, DsbnOptions, DsbnState};
use cdcl::ops::maxpool::{self, PoolGeometry};
use cdcl::ops::pool;
use cdcl::reference::dsbn as refd;
use cdcl::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{Array2, Array4};

mod common;

fn inputs(dev: &Device, shape: [usize; 4], dtype: DType) -> (Tensor, Tensor, Tensor, DsbnState) {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.002 - 1.0).collect();
    let x = Tensor::from_slice(dev, &shape, &vals).unwrap();
    let (x, dy) = match dtype {
        DType::F32 => (x.try_clone().unwrap(), x),
        _ => {
            let h: Vec<half::bf16> = vals.iter().map(|&v| half::bf16::from_f32(v)).collect();
            (Tensor::from_slice(dev, &shape, &h).unwrap(), Tensor::from_slice(dev, &shape, &h).unwrap())
        }
    };
    // Three datasets interleaved in one batch.
    let ds: Vec<i32> = (0..shape[0] as i32).map(|i| i % 3).collect();
    let datasets = Tensor::from_slice(dev, &[shape[0]], &ds).unwrap();
    (x, dy, datasets, DsbnState::new(dev, 3, shape[3]).unwrap())
}

fn bench_device(c: &mut Criterion, dev: &Device, shapes: &[[usize; 4]], dtypes: &[DType], label: &str) {
    let mut g = c.benchmark_group(format!("dsbn/{label}"));
    g.sample_size(10);
    let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
    for &shape in shapes {
        for &dtype in dtypes {
            let (x, dy, ds, mut state) = inputs(dev, shape, dtype);
            let elems = shape.iter().product::<usize>() as u64;
            let id = format!("{}x{}x{}x{}/{dtype}", shape[0], shape[1], shape[2], shape[3]);
            g.throughput(Throughput::Elements(elems));
            g.bench_function(BenchmarkId::new("forward_train", &id), |b| {
                b.iter(|| {
                    dsbn::forward_train(&x, &ds, &mut state, &opts).unwrap();
                    dev.synchronize().unwrap();
                })
            });
            let (_, saved) = dsbn::forward_train(&x, &ds, &mut state, &opts).unwrap();
            g.bench_function(BenchmarkId::new("backward_train", &id), |b| {
                b.iter(|| {
                    dsbn::backward_train(&dy, &x, &ds, &state, &saved, &opts).unwrap();
                    dev.synchronize().unwrap();
                })
            });
            g.bench_function(BenchmarkId::new("forward_infer", &id), |b| {
                b.iter(|| {
                    dsbn::forward_infer(&x, &ds, &state, &opts).unwrap();
                    dev.synchronize().unwrap();
                })
            });
            let pool = PoolGeometry::square(3, 2, 1);
            g.bench_function(BenchmarkId::new("max_pool2d_3x3s2", &id), |b| {
                b.iter(|| {
                    maxpool::max_pool2d(&x, &pool).unwrap();
                    dev.synchronize().unwrap();
                })
            });
            let pooled = maxpool::max_pool2d(&x, &pool).unwrap();
            g.bench_function(BenchmarkId::new("max_pool2d_3x3s2_backward", &id), |b| {
                b.iter(|| {
                    maxpool::max_pool2d_backward(&pooled.y, &pooled.indices, (shape[1], shape[2]), &pool).unwrap();
                    dev.synchronize().unwrap();
                })
            });
            // The pyramid pooling module's upsampling backward: dy of the feature map's size back
            // to the 1x1, 2x2, 3x3 and 6x6 bins (PSPNet, align_corners false).
            for bin in [1usize, 2, 3, 6] {
                g.bench_function(BenchmarkId::new(format!("ppm_resize_backward_{bin}x{bin}"), &id), |b| {
                    b.iter(|| {
                        pool::resize_bilinear_backward(&dy, 0, &[shape[0], bin, bin, shape[3]], false).unwrap();
                        dev.synchronize().unwrap();
                    })
                });
            }
            let drop = Dropout2dOptions { p: 0.1, seed: 7 };
            g.bench_function(BenchmarkId::new("dropout2d", &id), |b| {
                b.iter(|| {
                    dropout::dropout2d(&x, &drop).unwrap();
                    dev.synchronize().unwrap();
                })
            });
        }
    }
    g.finish();
}

fn bench_reference(c: &mut Criterion, shape: [usize; 4]) {
    let mut g = c.benchmark_group("dsbn/cpu-reference");
    g.sample_size(10);
    let n: usize = shape.iter().product();
    let x = Array4::from_shape_vec(shape, (0..n).map(|i| ((i * 7919) % 1000) as f64 * 0.002 - 1.0).collect()).unwrap();
    let ds: Vec<usize> = (0..shape[0]).map(|i| i % 3).collect();
    let (ones, zeros) = (Array2::ones((3, shape[3])), Array2::zeros((3, shape[3])));
    let cfg = refd::DsbnConfig { relu: true, ..refd::DsbnConfig::default() };
    g.throughput(Throughput::Elements(n as u64));
    let id = format!("{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
    g.bench_function(BenchmarkId::new("forward_train", &id), |b| {
        b.iter(|| {
            refd::dsbn_forward_train(x.view(), &ds, ones.view(), zeros.view(), zeros.view(), ones.view(), &cfg).unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("backward_train", &id), |b| {
        b.iter(|| refd::dsbn_backward_train(x.view(), x.view(), &ds, ones.view(), zeros.view(), &cfg).unwrap())
    });
    g.finish();
}

fn dsbn_benches(c: &mut Criterion) {
    common::on_gpu_or_cpu(
        c,
        "DSBN",
        "the emulator and the CPU reference",
        |c, gpu| {
            // The activations of the ResNet-18 layers at batch 8 (benches/common: output stride 8).
            let shapes = common::LAYERS.map(|l| [8, l.hw, l.hw, l.k]);
            bench_device(c, gpu, &shapes, &[DType::F32, DType::BF16], "gpu");
        },
        |c| {
            let emu = Device::emulator();
            bench_device(c, &emu, &[[8, 16, 16, 64]], &[DType::F32], "emulator");
            bench_reference(c, [8, 16, 16, 64]);
        },
    );
}

criterion_group!(benches, dsbn_benches);
criterion_main!(benches);
