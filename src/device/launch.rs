//! Calling the `extern "C"` launchers of either target, and the device error record.

use std::ffi::c_void;

use super::{Backend, Device, DeviceBuffer};
use crate::error::{Error, Result};
use crate::ffi;

type LaunchFn<P> = unsafe extern "C" fn(*const P, *mut c_void) -> i32;

/// One launcher as built for both targets: `cdcl_emu_<name>` and, with nvcc, `cdcl_cuda_<name>`.
pub(crate) struct Launcher<P: 'static> {
    pub(crate) name: &'static str,
    pub(crate) emu: LaunchFn<P>,
    #[cfg(cdcl_cuda)]
    pub(crate) cuda: LaunchFn<P>,
}

/// `launcher!(dsbn_forward_train: cdcl_emu_dsbn_forward_train, cdcl_cuda_dsbn_forward_train)`
/// names both builds of one launcher (the GPU one only exists under `cfg(cdcl_cuda)`).
macro_rules! launcher {
    ($name:ident : $emu:ident, $cuda:ident) => {
        $crate::device::Launcher {
            name: stringify!($name),
            emu: $crate::ffi::$emu,
            #[cfg(cdcl_cuda)]
            cuda: $crate::ffi::$cuda,
        }
    };
}
pub(crate) use launcher;

impl Device {
    /// Runs one launcher with `params`.
    ///
    /// Crate-internal contract (why this is not an `unsafe fn` for the ops layer to call): every
    /// pointer in `params` comes from a live [`DeviceBuffer`] of this device that the calling op
    /// borrowed for the duration of the call, and the op has checked that the shapes in `params`
    /// fit those buffers. The kernels guard every other access themselves.
    pub(crate) fn launch<P>(&self, launcher: &Launcher<P>, params: &P) -> Result<()> {
        let (status, stream_msg) = match &*self.inner {
            Backend::Emulator(s) => {
                // SAFETY: see the contract above; the emulator runs the launch synchronously.
                let st = unsafe { (launcher.emu)(params, s.as_stream_ptr()) };
                (st, if st == ffi::CDCL_ERR_LAUNCH as i32 { s.last_error() } else { String::new() })
            }
            Backend::Cuda(c) => {
                #[cfg(cdcl_cuda)]
                {
                    // The runtime launches into the thread's current context: bind ours on
                    // every thread that launches.
                    c.bind()?;
                    // SAFETY: see the contract above; the launch is ordered on the device's stream.
                    let st = unsafe { (launcher.cuda)(params, c.stream_ptr()) };
                    if st == ffi::CDCL_OK as i32 && c.sync_launches() {
                        // CDCL_SYNC_LAUNCHES=1: an asynchronous fault shows here, named for
                        // the kernel that caused it.
                        self.counters.host_sync();
                        c.synchronize().map_err(|e| match e {
                            Error::Cuda { code, name, message, .. } => {
                                Error::Cuda { code, name, kernel: launcher.name.into(), message }
                            }
                            e => e,
                        })?;
                    }
                    (st, String::new())
                }
                #[cfg(not(cdcl_cuda))]
                {
                    let _ = c;
                    return Err(Error::CudaNotBuilt);
                }
            }
        };
        match status as u32 {
            ffi::CDCL_OK => Ok(()),
            ffi::CDCL_ERR_LAUNCH => Err(match self.kind() {
                super::DeviceKind::Emulator => {
                    Error::EmulatorFault { kernel: launcher.name.into(), message: stream_msg }
                }
                super::DeviceKind::Cuda => cuda_launch_error(launcher.name),
            }),
            ffi::CDCL_ERR_UNSUPPORTED_DTYPE => {
                Err(Error::InvalidArgument(format!("{}: no kernel for this dtype", launcher.name)))
            }
            _ => Err(Error::InvalidArgument(format!(
                "{}: the launcher rejected its parameters (status {status}); this is a bug in cdcl's validation",
                launcher.name
            ))),
        }
    }
}

/// The CUDA runtime's error of this thread's failed launch of `kernel`, by name.
fn cuda_launch_error(kernel: &str) -> Error {
    #[cfg(cdcl_cuda)]
    {
        // SAFETY: reads a thread-local int; the strings are the runtime's static ones (or null).
        let (code, name, message) = unsafe {
            let code = ffi::cdcl_cuda_last_launch_error(std::ptr::null_mut());
            (code, cstr(ffi::cdcl_cuda_error_name(code)), cstr(ffi::cdcl_cuda_error_string(code)))
        };
        Error::Cuda { code, name, kernel: kernel.into(), message }
    }
    #[cfg(not(cdcl_cuda))]
    Error::Cuda {
        code: 0,
        name: "unknown".into(),
        kernel: kernel.into(),
        message: "kernel launch failed in a build without CUDA kernels".into(),
    }
}

/// A static C string as a Rust string (empty for null).
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives for the program.
#[cfg(cdcl_cuda)]
unsafe fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: see the function's contract.
        unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Each slot's first error of one record (`None`: no error of that kind).
pub(crate) type Faults = [Option<DeviceFault>; ffi::CDCL_ERRSLOT_COUNT as usize];

/// The `cdcl_error_record` an op hands to its kernels: every slot starts as "no error". Inside a
/// training step it is a slot of the step's records (see `step.rs`), read with the losses;
/// outside, a record of its own, read right after the op.
pub(crate) struct DeviceErrorRecord {
    device: Device,
    slot: Slot,
}

enum Slot {
    Own(DeviceBuffer),
    Step { index: usize, ptr: *mut ffi::cdcl_error_record },
}

/// The first error of one kind that a kernel recorded: where, and the offending value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceFault {
    pub(crate) position: u32,
    pub(crate) value: i32,
}

impl DeviceErrorRecord {
    pub(crate) fn new(device: &Device) -> Result<Self> {
        let slot = match device.step_record() {
            Some((index, ptr)) => Slot::Step { index, ptr },
            None => {
                let bytes = std::mem::size_of::<ffi::cdcl_error_record>();
                let mut buf = DeviceBuffer::uninit(device, bytes, super::buffer::Poison::Byte)?;
                buf.fill_bytes(0xFF)?; // CDCL_NO_ERROR in every slot
                Slot::Own(buf)
            }
        };
        Ok(DeviceErrorRecord { device: device.clone(), slot })
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut ffi::cdcl_error_record {
        match &mut self.slot {
            Slot::Own(buf) => buf.as_mut_ptr().cast(),
            Slot::Step { ptr, .. } => *ptr,
        }
    }

    /// Turns the record into the op's typed error with `check`, which only runs when some slot
    /// holds an error: now (outside a step: one read of the record), or when the step's
    /// records are read with its losses (inside one). `kept` is handed to `check` as it was at
    /// the launch (inside a step, a device copy of it).
    pub(crate) fn check<F>(self, kept: Option<&crate::tensor::Tensor>, check: F) -> Result<()>
    where
        F: FnOnce(&Faults, Option<&crate::tensor::Tensor>) -> Result<()> + Send + 'static,
    {
        match &self.slot {
            Slot::Own(buf) => {
                let mut bytes = [0u8; std::mem::size_of::<ffi::cdcl_error_record>()];
                buf.copy_to_host(&mut bytes)?;
                let faults = super::step::parse(&bytes);
                if faults.iter().any(Option::is_some) {
                    check(&faults, kept)
                } else {
                    Ok(())
                }
            }
            Slot::Step { index, .. } => self.device.defer_check(*index, kept, Box::new(check)),
        }
    }
}

/// Calls a launcher's workspace-size function.
pub(crate) fn workspace_bytes<P>(size_fn: unsafe extern "C" fn(*const P) -> usize, params: &P) -> usize {
    // SAFETY: the size functions only read scalar fields of the Params they are given, which is a
    // valid reference here; they compute the same value in both builds, so the emulator's is used.
    unsafe { size_fn(params) }
}
