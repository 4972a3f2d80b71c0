//! A training step's error records, read once with the losses.
//!
//! Outside a step every op that validates data on the device (a dataset index, a label) hands
//! its kernels a record and reads it back right after the launch: one host synchronisation per
//! op. Inside a step (between [`Device::begin_step`] and [`Device::end_step`]) the records are
//! slots of one device array instead, and each op leaves a check behind — a closure that turns
//! its slots into the same typed error it would have returned. The first read of device data
//! in the step (normally the read of the losses) copies the records with it, under the same
//! single wait, and runs the checks in the order the ops ran: the step fails with the first
//! op's error, as the immediate path would have. Before the optimiser step,
//! [`Device::step_skip_flag`] folds the records into the flag the SGD kernel's `skip_if`
//! reads, so a step with bad data changes no parameter.
//!
//! Dataset indices are validated once per step and tensor: [`Device::validated_in_step`].

use std::sync::Mutex;

use super::launch::{DeviceFault, Faults};
use super::{launcher, Device, DeviceBuffer, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::tensor::{DType, Tensor};

/// Records one step holds; an op beyond them reads its own record (one wait, still correct).
pub(crate) const STEP_RECORDS: usize = 512;
const RECORD_BYTES: usize = std::mem::size_of::<ffi::cdcl_error_record>();

/// Turns an op's faults into its typed error; `kept` is the tensor the op asked to keep (e.g.
/// the dataset indices, to name the dataset of a bad label).
pub(crate) type Check = Box<dyn FnOnce(&Faults, Option<&Tensor>) -> Result<()> + Send>;

struct Pending {
    index: usize,
    check: Check,
    kept: Option<Tensor>,
}

#[derive(Default)]
struct Inner {
    /// `STEP_RECORDS` records, every slot `CDCL_NO_ERROR` at the step's start; `None` outside a
    /// step.
    records: Option<DeviceBuffer>,
    used: usize,
    pending: Vec<Pending>,
    /// (buffer generation, number of datasets) of the dataset-index tensors validated in this
    /// step.
    validated: Vec<(u64, usize)>,
}

/// The step state of one device.
#[derive(Default)]
pub(crate) struct StepState {
    inner: Mutex<Inner>,
}

impl StepState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.lock().pending.is_empty()
    }
}

static STEP_FLAG: Launcher<ffi::cdcl_step_flag_params> = launcher!(step_flag: cdcl_emu_step_flag, cdcl_cuda_step_flag);

impl Device {
    /// Starts a training step: ops record their device errors in one array read with the
    /// step's first read-back. The records are reset by an upload (no memset, no wait).
    pub fn begin_step(&self) -> Result<()> {
        self.end_step();
        let mut records = DeviceBuffer::uninit(self, STEP_RECORDS * RECORD_BYTES, super::buffer::Poison::Byte)?;
        records.copy_from_host(&vec![0xFF; STEP_RECORDS * RECORD_BYTES])?;
        self.step.lock().records = Some(records);
        Ok(())
    }

    /// Ends the step: checks that no read ran are dropped (the step already failed, or read
    /// nothing), and ops read their own records again.
    pub fn end_step(&self) {
        let old = std::mem::take(&mut *self.step.lock());
        drop(old);
    }

    /// True between [`Device::begin_step`] and [`Device::end_step`].
    pub fn in_step(&self) -> bool {
        self.step.lock().records.is_some()
    }

    /// A slot of the step's records for one op, or `None` outside a step (or when the step's
    /// records are used up).
    pub(crate) fn step_record(&self) -> Option<(usize, *mut ffi::cdcl_error_record)> {
        let mut s = self.step.lock();
        let used = s.used;
        if used >= STEP_RECORDS {
            return None;
        }
        let base = s.records.as_mut()?.as_mut_ptr().cast::<ffi::cdcl_error_record>();
        s.used += 1;
        // SAFETY: `used < STEP_RECORDS`, so the slot lies inside the records buffer.
        Some((used, unsafe { base.add(used) }))
    }

    /// Leaves `check` to run when the step's records are read; `kept` is copied (ordered on
    /// the stream, no wait) so that the check sees it as it was at the launch.
    pub(crate) fn defer_check(&self, index: usize, kept: Option<&Tensor>, check: Check) -> Result<()> {
        let kept = kept.map(Tensor::duplicate).transpose()?;
        self.step.lock().pending.push(Pending { index, check, kept });
        Ok(())
    }

    /// Whether the dataset indices in `datasets` were already validated against
    /// `num_datasets` in this step (then the caller skips its validation launch); marks them
    /// validated otherwise. Always false outside a step. A buffer's generation changes with
    /// every write, so new contents are validated again.
    pub(crate) fn validated_in_step(&self, datasets: &DeviceBuffer, num_datasets: usize) -> bool {
        let mut s = self.step.lock();
        if s.records.is_none() {
            return false;
        }
        let key = (datasets.generation(), num_datasets);
        if s.validated.contains(&key) {
            return true;
        }
        s.validated.push(key);
        false
    }

    /// The flag for the step's SGD kernel: 1 when `in_flag` (e.g. the loss-scaling overflow) is
    /// set or any op of the step recorded an error, else 0 — computed on the device. `None`
    /// outside a step or when no op used a record (then `in_flag` alone decides).
    pub(crate) fn step_skip_flag(&self, in_flag: Option<&Tensor>) -> Result<Option<Tensor>> {
        let (records, used) = {
            let s = self.step.lock();
            match &s.records {
                Some(r) if s.used > 0 => (r.as_ptr().cast::<ffi::cdcl_error_record>(), s.used),
                _ => return Ok(None),
            }
        };
        if let Some(f) = in_flag {
            if f.dtype() != DType::F32 || f.numel() != 1 {
                return Err(Error::InvalidArgument("a skip flag is one f32".into()));
            }
            self.check_same(f.device())?;
        }
        let mut out = Tensor::uninit(self, &[1], DType::F32)?;
        let p = ffi::cdcl_step_flag_params {
            records,
            num_records: used as i32,
            reserved: 0,
            in_flag: in_flag.map_or(std::ptr::null(), |f| f.ptr().cast()),
            out_flag: out.ptr_mut().cast(),
        };
        // The records buffer stays alive until end_step, which the step calls after its read.
        self.launch(&STEP_FLAG, &p)?;
        Ok(Some(out))
    }

    /// Reads `src` into `dst` together with the step's records under one wait, then runs the
    /// checks left by the step's ops: the first error is returned (and `dst` is filled either
    /// way).
    pub(crate) fn read_with_step_records(&self, src: &DeviceBuffer, dst: &mut [u8]) -> Result<()> {
        let (pending, bytes) = {
            let mut s = self.step.lock();
            let pending = std::mem::take(&mut s.pending);
            let upto = pending.iter().map(|p| p.index + 1).max().unwrap_or(0);
            let bytes = match &s.records {
                Some(records) if upto > 0 => {
                    let mut bytes = vec![0u8; upto * RECORD_BYTES];
                    src.read_with(records, dst, &mut bytes)?;
                    bytes
                }
                _ => {
                    drop(s);
                    return src.copy_to_host(dst);
                }
            };
            (pending, bytes)
        };
        for p in pending {
            let faults = parse(&bytes[p.index * RECORD_BYTES..(p.index + 1) * RECORD_BYTES]);
            if faults.iter().any(Option::is_some) {
                (p.check)(&faults, p.kept.as_ref())?;
            }
        }
        Ok(())
    }
}

/// Each slot's first error from a record's bytes.
pub(crate) fn parse(bytes: &[u8]) -> Faults {
    let mut out = [None; ffi::CDCL_ERRSLOT_COUNT as usize];
    for (slot, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        let key = u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk"));
        if key != ffi::NO_ERROR {
            *slot = Some(DeviceFault { position: (key >> 32) as u32, value: key as u32 as i32 });
        }
    }
    out
}
