//! Multi-tensor SGD with momentum and weight decay, PyTorch's `torch.optim.SGD` formula
//! (dampening 0, Nesterov off), f32, in place, every tensor of the list in ONE launch:
//!
//! ```text
//! d   = g + weight_decay · p
//! buf = d                          on the first step
//! buf = momentum · buf + d         afterwards
//! p   = p − lr · buf               (lr per tensor: per-parameter-group learning rates)
//! copy = round(p)                  (mixed precision: the 16-bit weights the convolutions read)
//! ```
//!
//! The launch reads a small device table of (pointers, length, lr, frozen rows) per tensor; each
//! block updates one chunk of `CDCL_SGD_CHUNK` elements of one tensor. A tensor may leave up to
//! 64 of its rows untouched ([`FrozenRows`]): the DSBN rows of datasets absent from a step keep
//! their γ, β and momentum bit for bit, without a copy through the host.
//!
//! Mixed precision: a parameter may carry a 16-bit copy ([`SgdParam::copy`]), written from the
//! updated f32 master in the same pass; [`sgd_step_unless`] skips the whole step on the device
//! when a flag is set ([`sum_scaled`]'s overflow flag), so an f16 step with a loss-scaling
//! overflow changes nothing and the host need not look at the flag first. [`sum_scaled`] gathers
//! each parameter's gradient contributions (16-bit or f32) into one unscaled f32 tensor.
//!
//! Kernels: `kernels/sgd.cu`. Reference: [`crate::reference::sgd`].

use crate::device::{launcher, DeviceBuffer, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::tensor::{DType, Tensor};

/// Momentum and weight decay, shared by every tensor of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdOptions {
    /// Momentum factor in [0, 1]. Default 0.9.
    pub momentum: f32,
    /// L2 penalty added to the gradient, ≥ 0. Default 1e-4.
    pub weight_decay: f32,
}

impl Default for SgdOptions {
    fn default() -> Self {
        SgdOptions { momentum: 0.9, weight_decay: 1e-4 }
    }
}

/// Rows of a tensor that an SGD step leaves untouched: the tensor is viewed as
/// `[numel / row_len, row_len]` (row-major), and neither the parameter nor the momentum buffer
/// of a frozen row is read or written. Only rows 0..64 ([`FrozenRows::MAX_ROWS`]) can be
/// frozen, which covers a DSBN table's `[D, C]` rows for up to 64 datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrozenRows {
    /// Elements per row: at least 1, and it divides the tensor's element count.
    pub row_len: usize,
    /// Bit `r` set: row `r` is frozen. Every set bit must name a row the tensor has.
    pub rows: u64,
}

impl FrozenRows {
    /// The most rows a mask can name: rows `0..MAX_ROWS`.
    pub const MAX_ROWS: usize = 64;

    /// The mask of `rows` (indices, in any order, repeats allowed) of `row_len` elements each.
    /// `InvalidArgument` for an index ≥ [`FrozenRows::MAX_ROWS`] or a zero `row_len`.
    pub fn from_rows(row_len: usize, rows: impl IntoIterator<Item = usize>) -> Result<Self> {
        if row_len == 0 {
            return Err(Error::InvalidArgument("frozen rows need a row length of at least 1".into()));
        }
        let mut mask = 0u64;
        for r in rows {
            if r >= Self::MAX_ROWS {
                return Err(Error::InvalidArgument(format!(
                    "row {r} cannot be frozen: only rows 0..{} can",
                    Self::MAX_ROWS
                )));
            }
            mask |= 1 << r;
        }
        Ok(FrozenRows { row_len, rows: mask })
    }

    /// Whether row `row` is frozen.
    pub fn is_frozen(&self, row: usize) -> bool {
        row < Self::MAX_ROWS && (self.rows >> row) & 1 == 1
    }

    /// Checks the mask against a tensor of `numel` elements: `row_len` ≥ 1 divides `numel` and
    /// every frozen row exists. Returns the number of rows.
    pub fn check(&self, numel: usize) -> Result<usize> {
        if self.row_len == 0 || numel % self.row_len != 0 {
            return Err(Error::InvalidArgument(format!(
                "frozen rows of length {} do not tile a tensor of {numel} elements",
                self.row_len
            )));
        }
        let rows = numel / self.row_len;
        if rows < Self::MAX_ROWS && self.rows >> rows != 0 {
            return Err(Error::InvalidArgument(format!(
                "frozen-row mask {:#x} names a row beyond the tensor's {rows}",
                self.rows
            )));
        }
        Ok(rows)
    }
}

/// One parameter tensor of a step, with its gradient, momentum buffer and learning rate.
#[derive(Debug)]
pub struct SgdParam<'a> {
    /// The parameter, f32, updated in place.
    pub param: &'a mut Tensor,
    /// Its gradient: f32, the same shape.
    pub grad: &'a Tensor,
    /// Its momentum buffer: f32, the same shape, updated in place (not read on the first step).
    pub momentum_buffer: &'a mut Tensor,
    /// Learning rate of the tensor's parameter group (finite, ≥ 0).
    pub lr: f32,
    /// Rows the step leaves untouched (`None`: every element is updated).
    pub frozen_rows: Option<FrozenRows>,
    /// A 16-bit copy of the parameter (f16 or bf16, the same shape; one type for every copy of
    /// a step), written as `round(p)` after the update. Not with frozen rows (`InvalidArgument`:
    /// the tensors that freeze rows, DSBN tables, are f32 only).
    pub copy: Option<&'a mut Tensor>,
}

const SGD_STEP: Launcher<ffi::cdcl_sgd_params> = launcher!(sgd_step: cdcl_emu_sgd_step, cdcl_cuda_sgd_step);
const SUM_SCALED: Launcher<ffi::cdcl_sum_params> = launcher!(sum_scaled: cdcl_emu_sum_scaled, cdcl_cuda_sum_scaled);

const CHUNK: usize = ffi::CDCL_SGD_CHUNK as usize;

/// One SGD step over every tensor of `params`, in one launch. `first_step` initialises the
/// momentum buffers (`buf = d`) instead of reading them, as PyTorch does when a parameter has
/// no buffer yet. Validation: every tensor f32, grad and buffer shaped like the parameter, all
/// on one device, no device memory shared between any two of them (gradients may not alias a
/// parameter or buffer), options in range, frozen rows as [`FrozenRows::check`] asks. On an
/// error nothing is written.
pub fn sgd_step(params: &mut [SgdParam<'_>], opts: &SgdOptions, first_step: bool) -> Result<()> {
    step(params, opts, first_step, None)
}

/// [`sgd_step`], unless `skip_if` (an f32 `[1]` flag on the same device, e.g. [`sum_scaled`]'s
/// overflow flag) is nonzero when the kernel runs: then nothing is written. The decision is
/// taken on the device, so the host need not read the flag before launching.
pub fn sgd_step_unless(
    params: &mut [SgdParam<'_>],
    opts: &SgdOptions,
    first_step: bool,
    skip_if: &Tensor,
) -> Result<()> {
    check::dtype("SGD skip flag", skip_if, DType::F32)?;
    check::shape("SGD skip flag", skip_if, &[1])?;
    step(params, opts, first_step, Some(skip_if))
}

/// Device addresses as the bytes of a `void*` array in device memory (the tables' layout).
fn address_table(device: &crate::Device, addresses: &[usize]) -> Result<DeviceBuffer> {
    let bytes: Vec<u8> = addresses.iter().flat_map(|&a| (a as u64).to_ne_bytes()).collect();
    let mut buf = DeviceBuffer::uninit_words(device, bytes.len().max(8))?;
    if !bytes.is_empty() {
        buf.copy_from_host(&bytes)?;
    }
    Ok(buf)
}

fn step(params: &mut [SgdParam<'_>], opts: &SgdOptions, first_step: bool, skip_if: Option<&Tensor>) -> Result<()> {
    if !(opts.momentum.is_finite() && (0.0..=1.0).contains(&opts.momentum)) {
        return Err(Error::InvalidArgument(format!("momentum must be in [0, 1], got {}", opts.momentum)));
    }
    if !(opts.weight_decay.is_finite() && opts.weight_decay >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "weight decay must be finite and non-negative, got {}",
            opts.weight_decay
        )));
    }
    let Some(first) = params.first() else { return Ok(()) };
    let device = first.param.device().clone();
    if let Some(flag) = skip_if {
        check::same_device(&device, &[flag])?;
    }
    let copy_dtype = params.iter().find_map(|sp| sp.copy.as_ref().map(|c| c.dtype()));
    let mut copies: Vec<usize> = Vec::with_capacity(params.len());
    let mut table = Vec::with_capacity(params.len());
    let mut written: Vec<(usize, usize)> = Vec::with_capacity(2 * params.len());
    let mut read: Vec<(usize, usize)> = Vec::with_capacity(params.len());
    let mut chunks: usize = 0;
    for sp in params.iter_mut() {
        check::dtype("SGD parameter", sp.param, DType::F32)?;
        check::dtype("SGD gradient", sp.grad, DType::F32)?;
        check::dtype("SGD momentum buffer", sp.momentum_buffer, DType::F32)?;
        check::shape("SGD gradient", sp.grad, sp.param.shape())?;
        check::shape("SGD momentum buffer", sp.momentum_buffer, sp.param.shape())?;
        check::same_device(&device, &[&*sp.param, sp.grad, &*sp.momentum_buffer])?;
        if let Some(c) = sp.copy.as_deref() {
            if sp.frozen_rows.is_some_and(|f| f.rows != 0) {
                return Err(Error::InvalidArgument(
                    "a tensor with frozen rows cannot carry a 16-bit copy (only f32 DSBN tables freeze rows)".into(),
                ));
            }
            if !matches!(c.dtype(), DType::F16 | DType::BF16) {
                return Err(Error::UnsupportedDType { what: "SGD parameter copy", dtype: c.dtype() });
            }
            check::dtype("SGD parameter copy", c, copy_dtype.unwrap_or(c.dtype()))?;
            check::shape("SGD parameter copy", c, sp.param.shape())?;
            check::same_device(&device, &[c])?;
        }
        if !(sp.lr.is_finite() && sp.lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "learning rate must be finite and non-negative, got {}",
                sp.lr
            )));
        }
        let numel = sp.param.numel();
        let (row_len, frozen, all_frozen) = match sp.frozen_rows {
            Some(f) => {
                let rows = f.check(numel)?;
                (f.row_len, f.rows, f.rows.count_ones() as usize == rows)
            }
            None => (numel, 0, false),
        };
        if numel == 0 {
            continue;
        }
        let span = |t: &Tensor| (t.ptr() as usize, t.buffer().len());
        written.push(span(sp.param));
        written.push(span(sp.momentum_buffer));
        if let Some(c) = sp.copy.as_deref() {
            written.push(span(c));
        }
        read.push(span(sp.grad));
        if all_frozen {
            continue; // no block would touch an element of it
        }
        copies.push(sp.copy.as_deref_mut().map_or(0, |c| c.ptr_mut() as usize));
        table.push(ffi::cdcl_sgd_tensor {
            param: sp.param.ptr_mut().cast(),
            grad: sp.grad.ptr().cast(),
            momentum_buffer: sp.momentum_buffer.ptr_mut().cast(),
            numel: numel as i64,
            first_chunk: chunks as i64,
            row_len: row_len as i64,
            frozen_rows: frozen,
            lr: sp.lr,
            reserved: 0,
        });
        chunks = chunks
            .checked_add(numel.div_ceil(CHUNK))
            .filter(|&c| c <= i32::MAX as usize)
            .ok_or_else(|| Error::InvalidArgument("SGD step over too many elements for one launch".into()))?;
    }
    // Safe Rust cannot hand in the same tensor twice as `&mut`, but distinct tensors must not
    // share memory either: a written range may overlap no other range.
    let overlaps = |a: (usize, usize), b: (usize, usize)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    for (i, &wa) in written.iter().enumerate() {
        if written[i + 1..].iter().chain(read.iter()).any(|&b| overlaps(wa, b)) {
            return Err(Error::InvalidArgument("SGD tensors must be distinct: two of them share device memory".into()));
        }
    }
    if table.is_empty() {
        return Ok(());
    }
    let table_buf = DeviceBuffer::from_sgd_table(&device, &table)?;
    let copies_buf = match copy_dtype {
        Some(_) => Some(address_table(&device, &copies)?),
        None => None,
    };
    let p = ffi::cdcl_sgd_params {
        tensors: table_buf.as_ptr().cast(),
        num_tensors: i32::try_from(table.len())
            .map_err(|_| Error::InvalidArgument("too many tensors for one SGD launch".into()))?,
        first_step: first_step as i32,
        total_chunks: chunks as i64,
        momentum: opts.momentum,
        weight_decay: opts.weight_decay,
        copies: copies_buf.as_ref().map_or(std::ptr::null(), |b| b.as_ptr().cast()),
        copy_dtype: copy_dtype.map_or(0, DType::to_ffi),
        reserved: 0,
        skip_if: skip_if.map_or(std::ptr::null(), |f| f.ptr().cast()),
    };
    device.launch(&SGD_STEP, &p)
}

/// For each group of same-shaped float tensors (f32, f16 or bf16; one type per group), their
/// sum in order in f32 times `scale`, as a new f32 tensor — a parameter's gradient gathered from
/// every pass of a step and unscaled — all in one launch. Also returns an f32 `[1]` flag that is
/// 1 when any input value is infinite or NaN (a loss-scaling overflow), else 0. Every group needs
/// at least one tensor; all tensors live on one device.
pub fn sum_scaled(groups: &[&[&Tensor]], scale: f32) -> Result<(Vec<Tensor>, Tensor)> {
    let Some(first) = groups.iter().find_map(|g| g.first()) else {
        return Err(Error::InvalidArgument("sum_scaled needs at least one tensor".into()));
    };
    if !scale.is_finite() {
        return Err(Error::InvalidArgument(format!("sum_scaled scale must be finite, got {scale}")));
    }
    let device = first.device().clone();
    for g in groups {
        let Some(head) = g.first() else {
            return Err(Error::InvalidArgument("sum_scaled: a group without tensors".into()));
        };
        if !head.dtype().is_float() {
            return Err(Error::UnsupportedDType { what: "sum_scaled input", dtype: head.dtype() });
        }
        for t in g.iter() {
            check::dtype("sum_scaled input", t, head.dtype())?;
            check::shape("sum_scaled input", t, head.shape())?;
            check::same_device(&device, &[t])?;
        }
    }
    let mut flag = Tensor::zeros(&device, &[1], DType::F32)?;
    let mut outs: Vec<Tensor> =
        groups.iter().map(|g| Tensor::uninit(&device, g[0].shape(), DType::F32)).collect::<Result<_>>()?;
    // One address array for every group's sources, each entry pointing at its run of it.
    let addresses: Vec<usize> = groups.iter().flat_map(|g| g.iter().map(|t| t.ptr() as usize)).collect();
    let sources = address_table(&device, &addresses)?;
    let base = sources.as_ptr() as usize;
    let mut entries = Vec::with_capacity(groups.len());
    let (mut chunks, mut at) = (0usize, 0usize);
    for (g, out) in groups.iter().zip(outs.iter_mut()) {
        let numel = out.numel();
        if numel > 0 {
            entries.push(ffi::cdcl_sum_entry {
                dst: out.ptr_mut().cast(),
                srcs: (base + at * 8) as *const *const std::ffi::c_void,
                numel: numel as i64,
                first_chunk: chunks as i64,
                num_srcs: i32::try_from(g.len())
                    .map_err(|_| Error::InvalidArgument("sum_scaled: too many tensors in a group".into()))?,
                src_dtype: g[0].dtype().to_ffi(),
            });
            chunks = chunks
                .checked_add(numel.div_ceil(CHUNK))
                .filter(|&c| c <= i32::MAX as usize)
                .ok_or_else(|| Error::InvalidArgument("sum_scaled over too many elements for one launch".into()))?;
        }
        at += g.len();
    }
    if entries.is_empty() {
        return Ok((outs, flag));
    }
    let bytes: Vec<u8> = entries.iter().flat_map(sum_entry_bytes).collect();
    let mut table = DeviceBuffer::uninit_words(&device, bytes.len())?;
    table.copy_from_host(&bytes)?;
    let p = ffi::cdcl_sum_params {
        entries: table.as_ptr().cast(),
        num_entries: i32::try_from(entries.len())
            .map_err(|_| Error::InvalidArgument("sum_scaled: too many groups for one launch".into()))?,
        reserved: 0,
        total_chunks: chunks as i64,
        scale,
        reserved2: 0,
        nonfinite: flag.ptr_mut().cast(),
    };
    device.launch(&SUM_SCALED, &p)?;
    Ok((outs, flag))
}

/// The bytes of one `cdcl_sum_entry` as the kernel reads it (field by field: the struct has no
/// padding, and the size is checked against the bindings).
fn sum_entry_bytes(e: &ffi::cdcl_sum_entry) -> Vec<u8> {
    const _: () = assert!(std::mem::size_of::<ffi::cdcl_sum_entry>() == 40);
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(&(e.dst as usize as u64).to_ne_bytes());
    v.extend_from_slice(&(e.srcs as usize as u64).to_ne_bytes());
    v.extend_from_slice(&e.numel.to_ne_bytes());
    v.extend_from_slice(&e.first_chunk.to_ne_bytes());
    v.extend_from_slice(&e.num_srcs.to_ne_bytes());
    v.extend_from_slice(&e.src_dtype.to_ne_bytes());
    v
}
