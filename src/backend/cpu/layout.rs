//! Channel and batch slices and concatenations on the CPU backend: moves without arithmetic,
//! exact for every storage type.

use rayon::prelude::*;

use super::check::{nhwc, same_dtype};
use super::tensor::{numel_of, CpuData, CpuTensor};
use crate::error::{Error, Result};

pub(crate) fn concat_channels(parts: &[&CpuTensor]) -> Result<CpuTensor> {
    let first = parts.first().ok_or_else(|| Error::InvalidArgument("concat_channels of no tensors".into()))?;
    let [n, h, w, _] = nhwc("channel concat input", first)?;
    let mut total = 0usize;
    for t in parts {
        let [tn, th, tw, tc] = nhwc("channel concat input", t)?;
        same_dtype("channel concat input", t, first.dtype())?;
        if (tn, th, tw) != (n, h, w) {
            return Err(Error::ShapeMismatch {
                what: "channel concat input",
                expected: vec![n, h, w, tc],
                got: t.shape().to_vec(),
            });
        }
        total = total
            .checked_add(tc)
            .filter(|&t| t <= i32::MAX as usize)
            .ok_or_else(|| Error::InvalidArgument("channel concat: too many channels for 32-bit dimensions".into()))?;
    }
    let shape = vec![n, h, w, total];
    numel_of(&shape)?;
    fn gather<T: Copy + Default + Send + Sync>(parts: &[&[T]], widths: &[usize], total: usize, len: usize) -> Vec<T> {
        let mut out = vec![T::default(); len];
        out.par_chunks_mut(total).enumerate().for_each(|(pix, o)| {
            let mut at = 0;
            for (p, &c) in parts.iter().zip(widths) {
                o[at..at + c].copy_from_slice(&p[pix * c..(pix + 1) * c]);
                at += c;
            }
        });
        out
    }
    let widths: Vec<usize> = parts.iter().map(|t| t.shape()[3]).collect();
    let len = n * h * w * total;
    Ok(match first.data() {
        CpuData::F32(_) => {
            let v: Vec<&[f32]> = parts.iter().filter_map(|t| t.as_f32()).collect();
            first.with_data(shape, CpuData::F32(gather(&v, &widths, total, len)))
        }
        CpuData::I32(_) => {
            let v: Vec<&[i32]> = parts.iter().filter_map(|t| t.as_i32()).collect();
            first.with_data(shape, CpuData::I32(gather(&v, &widths, total, len)))
        }
    })
}

pub(crate) fn slice_channels(x: &CpuTensor, offset: usize, len: usize) -> Result<CpuTensor> {
    let [n, h, w, c] = nhwc("channel slice input", x)?;
    if len == 0 || offset.checked_add(len).is_none_or(|end| end > c) {
        return Err(Error::InvalidArgument(format!(
            "channel slice {offset}..{} of a {c}-channel tensor (it needs 1..={c} channels inside)",
            offset.saturating_add(len)
        )));
    }
    fn take<T: Copy + Send + Sync>(v: &[T], c: usize, offset: usize, len: usize) -> Vec<T> {
        v.par_chunks(c).flat_map_iter(|px| px[offset..offset + len].iter().copied()).collect()
    }
    let shape = vec![n, h, w, len];
    Ok(match x.data() {
        CpuData::F32(v) => x.with_data(shape, CpuData::F32(take(v, c, offset, len))),
        CpuData::I32(v) => x.with_data(shape, CpuData::I32(take(v, c, offset, len))),
    })
}

pub(crate) fn slice_batch(x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
    let Some(&n) = x.shape().first() else {
        return Err(Error::InvalidShape {
            what: "batch slice input",
            shape: x.shape().to_vec(),
            reason: "needs at least one dimension".into(),
        });
    };
    if len == 0 || start.checked_add(len).is_none_or(|end| end > n) {
        return Err(Error::InvalidArgument(format!(
            "batch slice {start}..{} of a batch of {n} (it needs 1..={n} samples inside)",
            start.saturating_add(len)
        )));
    }
    let per: usize = x.shape()[1..].iter().product();
    let mut shape = x.shape().to_vec();
    shape[0] = len;
    let range = start * per..(start + len) * per;
    Ok(match x.data() {
        CpuData::F32(v) => x.with_data(shape, CpuData::F32(v[range].to_vec())),
        CpuData::I32(v) => x.with_data(shape, CpuData::I32(v[range].to_vec())),
    })
}

pub(crate) fn concat_batch(parts: &[&CpuTensor]) -> Result<CpuTensor> {
    let first = parts.first().ok_or_else(|| Error::InvalidArgument("concat_batch of no tensors".into()))?;
    if first.shape().is_empty() {
        return Err(Error::InvalidShape {
            what: "batch concat input",
            shape: vec![],
            reason: "needs at least one dimension".into(),
        });
    }
    let mut n = 0usize;
    for t in parts {
        same_dtype("batch concat input", t, first.dtype())?;
        if t.shape().len() != first.shape().len() || t.shape()[1..] != first.shape()[1..] {
            let mut expected = first.shape().to_vec();
            expected[0] = t.shape().first().copied().unwrap_or(0);
            return Err(Error::ShapeMismatch { what: "batch concat input", expected, got: t.shape().to_vec() });
        }
        n = n
            .checked_add(t.shape()[0])
            .ok_or_else(|| Error::InvalidArgument("batch concat: too many samples".into()))?;
    }
    let mut shape = first.shape().to_vec();
    shape[0] = n;
    numel_of(&shape)?;
    Ok(match first.data() {
        CpuData::F32(_) => {
            first.with_data(shape, CpuData::F32(parts.iter().filter_map(|t| t.as_f32()).flatten().copied().collect()))
        }
        CpuData::I32(_) => {
            first.with_data(shape, CpuData::I32(parts.iter().filter_map(|t| t.as_i32()).flatten().copied().collect()))
        }
    })
}
