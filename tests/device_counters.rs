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
    assert_eq!(after_upload.bytes_allocated, 360);
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
