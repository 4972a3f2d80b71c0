//! Step accounting: each device call is counted once, where it happens (src/device/counters.rs).

use cdcl::ops::elementwise;
use cdcl::{Device, DeviceCounters, EmulatorConfig, Tensor};

#[test]
fn each_device_call_is_counted_once() {
    let dev = Device::emulator_with(EmulatorConfig { seed: 0, threads: 1 }).unwrap();
    assert_eq!(dev.counters(), DeviceCounters::default(), "a new device has done nothing");
    let x = Tensor::from_slice(&dev, &[2, 3, 3, 5], &[-1.0f32; 90]).unwrap();
    let after_upload = dev.counters();
    assert_eq!(after_upload.allocations, 1);
    // Blocks are rounded up to the cache's 512-byte granule; an upload fills nothing.
    assert_eq!(after_upload.bytes_allocated, 512);
    assert_eq!(after_upload.memsets, 0);
    assert_eq!(after_upload.host_to_device_copies, 1);
    assert_eq!(after_upload.host_to_device_bytes, 360);

    let y = elementwise::relu(&x).unwrap();
    let during = dev.counters() - after_upload;
    assert_eq!(during.kernel_launches, 1, "ReLU is one kernel: {during}");
    assert_eq!(during.allocations, 1, "one output: {during}");
    assert_eq!(during.device_to_host_copies, 0, "{during}");

    let before_read = dev.counters();
    assert_eq!(y.to_vec::<f32>().unwrap(), vec![0.0; 90]);
    let read = dev.counters() - before_read;
    assert_eq!((read.device_to_host_copies, read.device_to_host_bytes, read.host_syncs), (1, 360, 1));
    assert_eq!(read.kernel_launches, 0);

    // Counters belong to one device: another one's work does not show here.
    let other = Device::emulator_with(EmulatorConfig { seed: 0, threads: 1 }).unwrap();
    let z = Tensor::from_slice(&other, &[4], &[1.0f32; 4]).unwrap();
    elementwise::relu(&z).unwrap();
    assert_eq!(dev.counters(), before_read + read);
}

use cdcl::backend::{Backend, DeviceBackend, LossOptions};
use cdcl::nn::{Depth, ModelConfig};
use cdcl::train::{Batch, Precision, TrainConfig, Trainer};
use cdcl::Error;

fn emulator() -> Device {
    Device::emulator_with(EmulatorConfig { seed: 0, threads: 1 }).unwrap()
}

/// A batch whose labels follow the image, with a few ignored pixels.
fn batch(dataset: usize, n: usize, hw: usize, classes: usize) -> Batch {
    let px = n * hw * hw;
    let images = (0..px * 3).map(|i| ((i * 37 + dataset * 11) % 23) as f32 / 11.5 - 1.0).collect();
    let labels = (0..px).map(|i| if i % 19 == 0 { 255 } else { ((i / 7) % classes) as i32 }).collect();
    Batch { dataset, n, h: hw, w: hw, images, labels }
}

fn tiny_model(num_classes: Vec<usize>) -> ModelConfig {
    ModelConfig { depth: Depth::R18, width: 1.0 / 16.0, dropout: 0.1, seed: 7, ..ModelConfig::resnet18(num_classes) }
}

/// A steady-state training step on the device waits for it once (the read of its losses, which
/// brings the ops' error records along), allocates nothing (the cache serves every request)
/// and fills no memory (outputs the kernels write in full are not zeroed), in f32 and bf16.
#[test]
fn a_steady_state_step_waits_once_allocates_nothing_and_fills_nothing() {
    for precision in [Precision::F32, Precision::Bf16] {
        let be = DeviceBackend::new(emulator());
        let cfg = TrainConfig { precision, ..TrainConfig::default() };
        let mut t = Trainer::new(&be, tiny_model(vec![4, 3]), cfg).unwrap();
        let batches = [batch(0, 2, 16, 4), batch(1, 2, 16, 3)];
        t.step(&batches).unwrap(); // momentum buffers and the cache's first blocks
        t.step(&batches).unwrap();
        let before = be.device_counters().unwrap();
        t.step(&batches).unwrap();
        let step = be.device_counters().unwrap() - before;
        eprintln!("{precision:?}: {step}");
        assert_eq!(step.host_syncs, 1, "{precision:?}: {step}");
        assert_eq!(step.allocations, 0, "{precision:?}: {step}");
        // bf16 keeps one fill: the loss-scaling overflow flag that the gradient gather sets.
        let fills = if precision == Precision::F32 { 0 } else { 1 };
        assert_eq!(step.memsets, fills, "{precision:?}: {step}");
        assert!(step.cache_hits > 100, "{precision:?}: {step}");
    }
}

/// Inside a step a bad label is found by the loss kernel and reported by the step's read, named
/// by its dataset (from the sample's dataset index) and element; a bad dataset index likewise,
/// by sample; the optimiser step that follows is skipped on the device.
#[test]
fn device_errors_inside_a_step_are_read_with_the_losses() {
    let dev = emulator();
    let be = DeviceBackend::new(dev.clone());
    let (n, h, w, c) = (3, 4, 5, 4);
    let logits = be.tensor_f32(&[n, h, w, c], &vec![0.25; n * h * w * c]).unwrap();
    let mut labels = vec![0i32; n * h * w];
    let bad_at = 2 * h * w + 7; // sample 2, dataset 1, which has 2 classes
    labels[bad_at] = 3;
    let labels = be.tensor_i32(&[n, h, w], &labels).unwrap();
    let datasets = be.tensor_i32(&[n], &[0, 0, 1]).unwrap();
    let opts = LossOptions { ce: Default::default(), upsample: None, with_grad: true };
    let classes = [4, 2];

    // Good data: the op does not wait, the read waits once and brings the record along.
    let good = be.tensor_i32(&[n, h, w], &vec![1; n * h * w]).unwrap();
    be.begin_step().unwrap();
    let before = dev.counters();
    let (loss, _grad) = be.cross_entropy(&logits, &good, &datasets, &classes, &opts).unwrap();
    assert_eq!(dev.counters().host_syncs, before.host_syncs, "the op returned without waiting");
    assert!(be.to_f32(&loss).unwrap()[0].is_finite());
    let d = dev.counters() - before;
    assert_eq!((d.host_syncs, d.device_to_host_copies), (1, 2), "one wait for the loss and the record: {d}");
    be.end_step();

    be.begin_step().unwrap();
    let (loss, _grad) = be.cross_entropy(&logits, &labels, &datasets, &classes, &opts).unwrap();
    // (Naming the dataset reads the kept indices: one more wait, on the error path only.)
    let err = be.to_f32(&loss).unwrap_err();
    assert_eq!(err, Error::InvalidLabel { dataset: 1, label: 3, position: bad_at, num_classes: 2 });
    be.end_step();

    let bad_ds = be.tensor_i32(&[n], &[0, 5, 1]).unwrap();
    be.begin_step().unwrap();
    let (loss, _grad) = be.cross_entropy(&logits, &labels, &bad_ds, &classes, &opts).unwrap();
    let err = be.to_f32(&loss).unwrap_err();
    assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 1, index: 5, num_datasets: 2 });
    be.end_step();

    // Outside a step the op reports it itself.
    let err = be.cross_entropy(&logits, &labels, &datasets, &classes, &opts).unwrap_err();
    assert_eq!(err, Error::InvalidLabel { dataset: 1, label: 3, position: bad_at, num_classes: 2 });
}

/// The cache serves a freed block again, can be capped and emptied.
#[test]
fn freed_memory_is_reused_and_the_cache_can_be_emptied() {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<Device>();
    let dev = emulator();
    let a = Tensor::zeros(&dev, &[1000], cdcl::DType::F32).unwrap();
    drop(a);
    assert!(dev.cached_bytes() >= 4000);
    let before = dev.counters();
    let b = Tensor::zeros(&dev, &[999], cdcl::DType::F32).unwrap();
    let d = dev.counters() - before;
    assert_eq!((d.allocations, d.cache_hits), (0, 1), "{d}");
    drop(b);
    dev.empty_cache();
    assert_eq!(dev.cached_bytes(), 0);
    dev.set_cache_limit(0);
    drop(Tensor::zeros(&dev, &[10], cdcl::DType::F32).unwrap());
    assert_eq!(dev.cached_bytes(), 0, "nothing is kept beyond the limit");
}

/// Without a GPU (or without a CUDA build) asking for one is a typed error, never a panic, and
/// the fallback says why in one line.
#[test]
fn no_gpu_is_a_typed_error_and_the_fallback_says_why() {
    match Device::cuda(0) {
        Err(Error::CudaNotBuilt | Error::NoDriver | Error::NoDevice { .. } | Error::UnsupportedDevice { .. }) => {}
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(d) => eprintln!("a GPU is present: {}", d.name()),
    }
    let (dev, why) = Device::best_available_why();
    if dev.kind() == cdcl::DeviceKind::Emulator {
        let why = why.expect("a reason");
        assert!(why.starts_with("no usable GPU: "), "{why}");
        assert!(!why.contains('\n'), "{why}");
    }
}
