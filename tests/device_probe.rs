//! Asking for a GPU on a machine without a usable one: a typed error from `Device::cuda`, never
//! a panic, and `cdcl train --device auto` trains on the CPU backend after saying why in one
//! line. (On a machine with a usable GPU the first assertion names it and the fallback line is
//! absent.)

use std::process::Command;

use cdcl::{Device, DeviceKind, Error};

#[test]
fn cuda_without_a_usable_gpu_is_a_typed_error() {
    for ordinal in [0, 7] {
        match Device::cuda(ordinal) {
            Ok(d) => eprintln!("GPU {ordinal}: {}", d.name()),
            Err(Error::CudaNotBuilt | Error::NoDriver | Error::NoDevice { .. } | Error::UnsupportedDevice { .. }) => {}
            Err(e) => panic!("GPU {ordinal}: unexpected error {e:?}"),
        }
    }
}

#[test]
fn train_device_auto_falls_back_and_says_why() {
    let gpu = Device::cuda(0).is_ok();
    let out = Command::new(env!("CARGO_BIN_EXE_cdcl"))
        .args(["train", "--device", "auto", "--iters", "1", "--size", "16", "--width", "0.0625"])
        .args(["--batch", "2", "--eval-images", "0"])
        .output()
        .expect("the cdcl binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("training on the CPU backend")).collect();
    if gpu {
        assert!(lines.is_empty(), "{err}");
    } else {
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].starts_with("no usable GPU ("), "{}", lines[0]);
        assert_eq!(Device::best_available().kind(), DeviceKind::Emulator);
    }
}
