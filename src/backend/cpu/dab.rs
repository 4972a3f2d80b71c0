//! The dataset-aware block and the pyramid pooling module on the CPU backend, composed from
//! this backend's own convolution, DSBN, pooling, resizing and slicing (no new arithmetic): the
//! functions the device backend runs as fused kernels, computed the plain way, so that the two
//! backends can be compared on whole training steps.
//!
//! - A **prologue** (the previous block's normalisation applied as the convolution loads its
//!   input) is the separate apply pass here: the normalised input is computed, rounded to the
//!   storage type as the tensor-core kernels round it, convolved, and dropped; the backward
//!   computes it again for the filter gradient, as the device's filter gradient recomputes it.
//! - The **inference** block convolves without rounding its output, normalises, adds the
//!   residual, applies the ReLU and rounds once, as the one-kernel inference DAB does; in f32
//!   the normalisation runs in the convolution's epilogue, tile by tile (one pass, no
//!   intermediate tensor).
//! - The **PPM** runs its branches in increasing bin size (where bad data shows first, before
//!   any other branch moved its running statistics), concatenates `[x, branches…]`, and sums its
//!   input gradient (identity slice and every branch's pooling backward) in f64 with one
//!   rounding, as the device's one-pass gather does.

use std::borrow::Cow;

use super::check::{dataset_indices, f32_of, i32_of, relu};
use super::tensor::numel_of;
use super::tensor::{CpuBn, CpuBnSaved, CpuTensor};
use super::timing::timed;
use super::{conv, dsbn, layout, pool, CpuBackend};
use crate::backend::{
    DabForward, DabGrads, DabInput, DabOptions, DabSaved, PpmBranchGrads, PpmBranchMut, PpmBranchRef, PpmGrads,
    Prologue,
};
use crate::error::{Error, Result};
use crate::ops::check::nhwc_dims;
use crate::ops::conv::ConvGeometry;
use crate::ops::ppm::PpmOptions;
use crate::tensor::DType;

type Opts<'a> = DabOptions<'a, CpuBackend>;

/// The convolution's input as the convolution sees it: `x`, or the previous block's
/// normalisation of it.
fn conv_input<'a>(
    x: &'a CpuTensor,
    datasets: &CpuTensor,
    prologue: Option<&Prologue<'_, CpuBackend>>,
) -> Result<Cow<'a, CpuTensor>> {
    Ok(match prologue {
        None => Cow::Borrowed(x),
        Some(p) => Cow::Owned(dsbn::apply_saved(x, None, datasets, p.bn, p.stats, p.relu)?),
    })
}

pub(crate) fn forward_train(
    input: DabInput<'_, CpuBackend>,
    bn: &mut CpuBn,
    opts: &Opts<'_>,
) -> Result<DabForward<CpuBackend>> {
    if opts.residual.is_some() && !opts.materialize {
        return Err(Error::InvalidArgument("a residual block must materialise its output".into()));
    }
    let a = timed("dab_forward_train: prologue", || conv_input(input.x, input.datasets, opts.prologue.as_ref()))?;
    let conv_out = timed("dab_forward_train: convolution", || conv::conv2d(&a, input.weight, None, &opts.geometry))?;
    // Every check before anything moves: a bad residual leaves the running statistics alone.
    dsbn::check_residual(opts.residual, &conv_out)?;
    let stats =
        timed("dab_forward_train: statistics", || dsbn::batch_statistics(&conv_out, input.datasets, bn, &opts.dsbn))?;
    let output = if opts.materialize {
        Some(timed("dab_forward_train: apply", || {
            dsbn::apply_saved(&conv_out, opts.residual, input.datasets, bn, &stats.saved, opts.dsbn.relu)
        })?)
    } else {
        None
    };
    dsbn::move_running(bn, &stats, &opts.dsbn)?;
    Ok(DabForward { conv_out, stats: stats.saved, output })
}

pub(crate) fn forward_infer(input: DabInput<'_, CpuBackend>, bn: &CpuBn, opts: &Opts<'_>) -> Result<CpuTensor> {
    if opts.prologue.is_some() {
        return Err(Error::InvalidArgument("the inference DAB takes no prologue".into()));
    }
    let dtype = input.x.dtype();
    if dtype == DType::F32 {
        return forward_infer_f32(input, bn, opts);
    }
    let wide =
        |t: &CpuTensor| -> Result<CpuTensor> { CpuTensor::from_f32(t.shape(), t.as_f32().unwrap_or(&[]).to_vec()) };
    // The convolution's f32 result is not rounded before the normalisation (one kernel on the
    // device): compute on f32-tagged copies and round once at the end.
    let (x32, w32) = (wide(input.x)?, wide(input.weight)?);
    super::check::float_as("convolution weight", input.weight, dtype)?;
    let conv_out = conv::conv2d(&x32, &w32, None, &opts.geometry)?;
    let residual = opts.residual.map(wide).transpose()?;
    if let Some(r) = opts.residual {
        super::check::same_dtype("DSBN residual", r, dtype)?;
    }
    let y = dsbn::forward_infer(&conv_out, input.datasets, bn, &opts.dsbn, residual.as_ref())?;
    CpuTensor::from_float(y.shape(), y.as_f32().unwrap_or(&[]).to_vec(), dtype)
}

/// The inference block in f32 storage, in one pass: each tile of the convolution's output is
/// normalised with the running statistics, residual-added and ReLU'd right after its GEMM,
/// while it is in cache, with no intermediate tensor — the device's one-kernel inference DAB.
/// The arithmetic is `dsbn::forward_infer`'s (its f64 `1/sqrt(var + eps)` and
/// `(x − μ)·invstd·γ + β`), so the bits equal the composition's (a test holds them equal).
fn forward_infer_f32(input: DabInput<'_, CpuBackend>, bn: &CpuBn, opts: &Opts<'_>) -> Result<CpuTensor> {
    let (cv, xv, wv) = conv::forward_problem(input.x, input.weight, &opts.geometry)?;
    let shape = cv.out_shape();
    let (k, pq) = (shape[3], shape[1] * shape[2]);
    let len = numel_of(&shape)?;
    let mut out = CpuTensor::f32_unchecked(shape, vec![0.0; len]);
    dsbn::check_bn(&out, input.datasets, bn, &opts.dsbn)?;
    let res = dsbn::check_residual(opts.residual, &out)?;
    let d = bn.gamma.shape()[0];
    let ds = dataset_indices(i32_of("dataset indices", input.datasets)?, d)?;
    let mean = f32_of("DSBN running_mean", &bn.running_mean)?;
    let var = f32_of("DSBN running_var", &bn.running_var)?;
    let gamma = f32_of("DSBN gamma", &bn.gamma)?;
    let beta = f32_of("DSBN beta", &bn.beta)?;
    let eps = opts.dsbn.eps as f64;
    let invstd: Vec<f64> = var.iter().map(|&v| 1.0 / (v as f64 + eps).sqrt()).collect();
    let relu_on = opts.dsbn.relu;
    let Some(y) = out.as_f32_mut() else {
        return Err(Error::InvalidArgument("the inference DAB output is not f32".into()));
    };
    conv::forward_into(&cv, xv, wv, y, &|row0, tile| {
        for (i, px) in tile.chunks_exact_mut(k).enumerate() {
            let pix = row0 + i;
            let off = ds[pix / pq] * k;
            for (ci, o) in px.iter_mut().enumerate() {
                let s = off + ci;
                let mut v = (*o as f64 - mean[s] as f64) * invstd[s] * gamma[s] as f64 + beta[s] as f64;
                if let Some(r) = res {
                    v += r[pix * k + ci] as f64;
                }
                *o = (if relu_on { relu(v) } else { v }) as f32;
            }
        }
    });
    Ok(out)
}

pub(crate) fn backward(
    dy: &CpuTensor,
    input: DabInput<'_, CpuBackend>,
    bn: &CpuBn,
    saved: DabSaved<'_, CpuBackend>,
    opts: &Opts<'_>,
) -> Result<DabGrads<CpuTensor>> {
    let g = timed("dab_backward: DSBN backward", || {
        dsbn::backward_train(dy, saved.conv_out, opts.residual, input.datasets, bn, saved.stats, &opts.dsbn)
    })?;
    let [_, h, w, _] = nhwc_dims("DAB input", input.x.shape())?;
    let ws = input.weight.shape();
    if ws.len() != 4 {
        return Err(Error::InvalidShape { what: "DAB weight", shape: ws.to_vec(), reason: "expected KRSC".into() });
    }
    let dx = match opts.skip_input_grad {
        true => None,
        false => Some(timed("dab_backward: conv data gradient", || {
            conv::backward_data(&g.dx, input.weight, (h, w), &opts.geometry)
        })?),
    };
    let a = timed("dab_backward: prologue", || conv_input(input.x, input.datasets, opts.prologue.as_ref()))?;
    let (dweight, _) = timed("dab_backward: conv filter gradient", || {
        conv::backward_filter(&g.dx, &a, (ws[0], ws[1], ws[2]), false, &opts.geometry)
    })?;
    Ok(DabGrads { dx, dweight, dgamma: g.dgamma, dbeta: g.dbeta, dresidual: g.dresidual })
}

/// What the PPM's training forward keeps per branch (bin order): the pooled input, the
/// branch's convolution output and batch statistics.
#[derive(Debug, Clone)]
pub struct CpuPpmSaved {
    branches: Vec<(CpuTensor, CpuTensor, CpuBnSaved)>,
    in_channels: usize,
}

impl crate::backend::PpmRecords<CpuTensor, CpuBnSaved> for CpuPpmSaved {
    fn branch_records(&self) -> Vec<(&CpuTensor, &CpuBnSaved)> {
        self.branches.iter().map(|(_, conv_out, stats)| (conv_out, stats)).collect()
    }
}

const ONE_BY_ONE: ConvGeometry = ConvGeometry { stride: (1, 1), padding: (0, 0), dilation: (1, 1) };

fn check_ppm(x: &CpuTensor, branches: usize, opts: &PpmOptions) -> Result<[usize; 4]> {
    let dims = nhwc_dims("PPM input", x.shape())?;
    if opts.bins.is_empty() {
        return Err(Error::InvalidArgument("a PPM needs at least one bin".into()));
    }
    if let Some(b) = opts.bins.iter().find(|&&b| b == 0 || b > crate::ops::pool::MAX_RESIZE_DIM) {
        return Err(Error::InvalidArgument(format!(
            "PPM bin {b}: bins must be in 1..={}",
            crate::ops::pool::MAX_RESIZE_DIM
        )));
    }
    if branches != opts.bins.len() {
        return Err(Error::InvalidArgument(format!(
            "{branches} PPM branches for {} bins: one branch per bin",
            opts.bins.len()
        )));
    }
    Ok(dims)
}

fn branch_opts(opts: &PpmOptions) -> Opts<'static> {
    DabOptions::new(ONE_BY_ONE, opts.dsbn)
}

pub(crate) fn ppm_forward_train(
    x: &CpuTensor,
    datasets: &CpuTensor,
    branches: &mut [PpmBranchMut<'_, CpuBackend>],
    opts: &PpmOptions,
) -> Result<(CpuTensor, CpuPpmSaved)> {
    let [_, h, w, c] = check_ppm(x, branches.len(), opts)?;
    let mut order: Vec<usize> = (0..branches.len()).collect();
    order.sort_by_key(|&i| opts.bins[i]);
    let mut ups: Vec<Option<CpuTensor>> = (0..branches.len()).map(|_| None).collect();
    let mut saved: Vec<Option<(CpuTensor, CpuTensor, CpuBnSaved)>> = (0..branches.len()).map(|_| None).collect();
    for i in order {
        let b = opts.bins[i];
        let br = &mut branches[i];
        let pooled = pool::adaptive_avg_pool(x, b, b)?;
        let f = forward_train(DabInput { x: &pooled, weight: br.weight, datasets }, br.bn, &branch_opts(opts))?;
        let low = f.output.ok_or_else(|| Error::InvalidArgument("the DAB did not materialise".into()))?;
        ups[i] = Some(pool::resize_bilinear(&low, h, w, opts.align_corners)?);
        saved[i] = Some((pooled, f.conv_out, f.stats));
    }
    let ups: Vec<CpuTensor> = ups.into_iter().flatten().collect();
    let mut parts: Vec<&CpuTensor> = vec![x];
    parts.extend(ups.iter());
    let out = layout::concat_channels(&parts)?;
    Ok((out, CpuPpmSaved { branches: saved.into_iter().flatten().collect(), in_channels: c }))
}

pub(crate) fn ppm_forward_infer(
    x: &CpuTensor,
    datasets: &CpuTensor,
    branches: &[PpmBranchRef<'_, CpuBackend>],
    opts: &PpmOptions,
) -> Result<CpuTensor> {
    let [_, h, w, _] = check_ppm(x, branches.len(), opts)?;
    let mut ups = Vec::with_capacity(branches.len());
    for (br, &b) in branches.iter().zip(&opts.bins) {
        let pooled = pool::adaptive_avg_pool(x, b, b)?;
        let low = forward_infer(DabInput { x: &pooled, weight: br.weight, datasets }, br.bn, &branch_opts(opts))?;
        ups.push(pool::resize_bilinear(&low, h, w, opts.align_corners)?);
    }
    let mut parts: Vec<&CpuTensor> = vec![x];
    parts.extend(ups.iter());
    layout::concat_channels(&parts)
}

pub(crate) fn ppm_backward(
    dy: &CpuTensor,
    datasets: &CpuTensor,
    branches: &[PpmBranchRef<'_, CpuBackend>],
    saved: &CpuPpmSaved,
    opts: &PpmOptions,
) -> Result<PpmGrads<CpuTensor>> {
    if branches.is_empty() || saved.branches.len() != branches.len() || opts.bins.len() != branches.len() {
        return Err(Error::InvalidArgument(format!(
            "the forward saved {} branches; {} branches and {} bins given",
            saved.branches.len(),
            branches.len(),
            opts.bins.len()
        )));
    }
    let mut offset = saved.in_channels;
    let mut grads = Vec::with_capacity(branches.len());
    let mut dpooled = Vec::with_capacity(branches.len());
    for ((br, (pooled, conv_out, stats)), &b) in branches.iter().zip(&saved.branches).zip(&opts.bins) {
        let k = br.weight.shape().first().copied().unwrap_or(0);
        let dslice = layout::slice_channels(dy, offset, k)?;
        let dlow = pool::resize_bilinear_backward(&dslice, (b, b), opts.align_corners)?;
        let input = DabInput { x: pooled, weight: br.weight, datasets };
        let g = backward(&dlow, input, br.bn, DabSaved { conv_out, stats }, &branch_opts(opts))?;
        dpooled.push(g.dx.ok_or_else(|| Error::InvalidArgument("the branch DAB returned no input gradient".into()))?);
        grads.push(PpmBranchGrads { dweight: g.dweight, dgamma: g.dgamma, dbeta: g.dbeta });
        offset += k;
    }
    let levels: Vec<&CpuTensor> = dpooled.iter().collect();
    let dx = pool::pool_backward_sum(dy, &levels, saved.in_channels)?;
    Ok(PpmGrads { dx, branches: grads })
}
