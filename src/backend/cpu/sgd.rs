//! The optimiser on the CPU backend: PyTorch's SGD in f32 with the kernels' fused multiply-adds
//! (`f32::mul_add` rounds once, as `fmaf` does), so a step gives the same bits as the device's,
//! the 16-bit copies of mixed precision, and the scaled gradient sums with their overflow flag.

use rayon::prelude::*;

use super::check::{f32_of, float_as, float_of, same_dtype, shape_is};
use super::tensor::{round_to, CpuTensor};
use crate::backend::SgdTensor;
use crate::error::{Error, Result};
use crate::ops::sgd::SgdOptions;
use crate::tensor::DType;

/// One step over every tensor; frozen rows are skipped whole, as the kernel skips them (a tensor
/// with frozen rows carries no copy); with a nonzero `skip_if` flag nothing is written.
pub(crate) fn sgd_step(
    params: &mut [SgdTensor<'_, CpuTensor>],
    opts: &SgdOptions,
    first_step: bool,
    skip_if: Option<&CpuTensor>,
) -> Result<()> {
    if !(opts.momentum.is_finite() && (0.0..=1.0).contains(&opts.momentum)) {
        return Err(Error::InvalidArgument(format!("momentum must be in [0, 1], got {}", opts.momentum)));
    }
    if !(opts.weight_decay.is_finite() && opts.weight_decay >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "weight decay must be finite and non-negative, got {}",
            opts.weight_decay
        )));
    }
    let skip = match skip_if {
        Some(flag) => {
            shape_is("SGD skip flag", flag, &[1])?;
            f32_of("SGD skip flag", flag)?[0] != 0.0
        }
        None => false,
    };
    let copy_dtype = params.iter().find_map(|sp| sp.copy.as_ref().map(|c| c.dtype()));
    for sp in params.iter() {
        same_dtype("SGD parameter", sp.param, DType::F32)?;
        same_dtype("SGD gradient", sp.grad, DType::F32)?;
        same_dtype("SGD momentum buffer", sp.momentum_buffer, DType::F32)?;
        shape_is("SGD gradient", sp.grad, sp.param.shape())?;
        shape_is("SGD momentum buffer", sp.momentum_buffer, sp.param.shape())?;
        if !(sp.lr.is_finite() && sp.lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "learning rate must be finite and non-negative, got {}",
                sp.lr
            )));
        }
        if let Some(f) = sp.frozen_rows {
            f.check(sp.param.numel())?;
        }
        if let Some(c) = sp.copy.as_deref() {
            if sp.frozen_rows.is_some_and(|f| f.rows != 0) {
                return Err(Error::InvalidArgument(
                    "a tensor with frozen rows cannot carry a 16-bit copy (only f32 DSBN tables freeze rows)".into(),
                ));
            }
            if !matches!(c.dtype(), DType::F16 | DType::BF16) {
                return Err(Error::UnsupportedDType { what: "SGD parameter copy", dtype: c.dtype() });
            }
            float_as("SGD parameter copy", c, copy_dtype.unwrap_or(c.dtype()))?;
            shape_is("SGD parameter copy", c, sp.param.shape())?;
        }
    }
    if skip {
        return Ok(());
    }
    let (mom, wd) = (opts.momentum, opts.weight_decay);
    let update = move |lr: f32, p: &mut f32, b: &mut f32, g: f32| {
        let d = wd.mul_add(*p, g);
        *b = if first_step { d } else { mom.mul_add(*b, d) };
        *p = (-lr).mul_add(*b, *p);
    };
    for sp in params.iter_mut() {
        let lr = sp.lr;
        let (Some(p), Some(g), Some(b)) = (sp.param.as_f32_mut(), sp.grad.as_f32(), sp.momentum_buffer.as_f32_mut())
        else {
            continue; // not reached: every dtype was checked above
        };
        let frozen = sp.frozen_rows.filter(|f| f.rows != 0 && !p.is_empty());
        match frozen {
            None => p.par_iter_mut().zip(b.par_iter_mut()).zip(g.par_iter()).for_each(|((p, b), &g)| {
                update(lr, p, b, g);
            }),
            Some(f) => {
                let n = f.row_len;
                p.par_chunks_mut(n).zip(b.par_chunks_mut(n)).zip(g.par_chunks(n)).enumerate().for_each(
                    |(row, ((p, b), g))| {
                        if !f.is_frozen(row) {
                            p.iter_mut().zip(b).zip(g).for_each(|((p, b), &g)| update(lr, p, b, g));
                        }
                    },
                );
            }
        }
        if let Some(copy) = sp.copy.as_deref_mut() {
            let dtype = copy.dtype();
            let Some(c) = copy.as_f32_mut() else { continue };
            c.par_iter_mut().zip(p.par_iter()).for_each(|(c, &p)| *c = round_to(dtype, p));
        }
    }
    Ok(())
}

/// Each group summed in order in f32 (as the kernel: `acc += x`), times `scale`; the flag is 1
/// when any sum is not finite (an infinite or NaN input).
pub(crate) fn sum_scaled(groups: &[&[&CpuTensor]], scale: f32) -> Result<(Vec<CpuTensor>, CpuTensor)> {
    if groups.iter().all(|g| g.is_empty()) {
        return Err(Error::InvalidArgument("sum_scaled needs at least one tensor".into()));
    }
    if !scale.is_finite() {
        return Err(Error::InvalidArgument(format!("sum_scaled scale must be finite, got {scale}")));
    }
    for g in groups {
        let Some(head) = g.first() else {
            return Err(Error::InvalidArgument("sum_scaled: a group without tensors".into()));
        };
        float_of("sum_scaled input", head)?;
        for t in g.iter() {
            float_as("sum_scaled input", t, head.dtype())?;
            shape_is("sum_scaled input", t, head.shape())?;
        }
    }
    let mut bad = false;
    let mut outs = Vec::with_capacity(groups.len());
    for g in groups {
        let parts: Vec<&[f32]> = g.iter().filter_map(|t| t.as_f32()).collect();
        let sums: Vec<f32> =
            (0..parts[0].len()).into_par_iter().map(|i| parts.iter().fold(0.0f32, |acc, p| acc + p[i])).collect();
        bad |= sums.iter().any(|v| !v.is_finite());
        outs.push(CpuTensor::f32_unchecked(g[0].shape().to_vec(), sums.into_iter().map(|v| v * scale).collect()));
    }
    Ok((outs, CpuTensor::f32_unchecked(vec![1], vec![if bad { 1.0 } else { 0.0 }])))
}
