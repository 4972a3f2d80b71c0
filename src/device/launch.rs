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
                    // SAFETY: see the contract above; the launch is ordered on the device's stream.
                    let st = unsafe { (launcher.cuda)(params, c.stream_ptr()) };
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
                super::DeviceKind::Cuda => Error::Cuda {
                    code: status,
                    kernel: launcher.name.into(),
                    message: "kernel launch failed (cudaGetLastError)".into(),
                },
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

/// The `cdcl_error_record` an op hands to its kernels: every slot starts as "no error".
pub(crate) struct DeviceErrorRecord {
    buf: DeviceBuffer,
}

/// The first error of one kind that a kernel recorded: where, and the offending value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
pub(crate) struct DeviceFault {
    pub(crate) position: u32,
    pub(crate) value: i32,
}

impl DeviceErrorRecord {
    pub(crate) fn new(device: &Device) -> Result<Self> {
        let mut buf = DeviceBuffer::zeroed(device, std::mem::size_of::<ffi::cdcl_error_record>())?;
        buf.fill_bytes(0xFF)?; // CDCL_NO_ERROR in every slot
        Ok(DeviceErrorRecord { buf })
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut ffi::cdcl_error_record {
        self.buf.as_mut_ptr().cast()
    }

    /// Reads the record back (a synchronising copy on a GPU) and returns each slot's first error.
    pub(crate) fn read(&self) -> Result<[Option<DeviceFault>; ffi::CDCL_ERRSLOT_COUNT as usize]> {
        let mut bytes = [0u8; std::mem::size_of::<ffi::cdcl_error_record>()];
        self.buf.copy_to_host(&mut bytes)?;
        let mut out = [None; ffi::CDCL_ERRSLOT_COUNT as usize];
        for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            let key = u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk"));
            if key != ffi::NO_ERROR {
                *slot = Some(DeviceFault { position: (key >> 32) as u32, value: key as u32 as i32 });
            }
        }
        Ok(out)
    }
}

/// Calls a launcher's workspace-size function.
pub(crate) fn workspace_bytes<P>(size_fn: unsafe extern "C" fn(*const P) -> usize, params: &P) -> usize {
    // SAFETY: the size functions only read scalar fields of the Params they are given, which is a
    // valid reference here; they compute the same value in both builds, so the emulator's is used.
    unsafe { size_fn(params) }
}
