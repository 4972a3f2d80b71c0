//! Channel and batch slices and concatenations of the device backend: device-to-device copies
//! of byte ranges (strided rows for channels, one contiguous range for samples), bit-exact for
//! any dtype, no kernel and no host round trip.

use crate::device::{CopyRegion, Device};
use crate::error::{Error, Result};
use crate::ops::check::{self, nhwc};
use crate::tensor::{DType, Tensor};

/// Parts of a concatenation: at least one, all of one dtype.
fn check_parts(what: &'static str, parts: &[&Tensor]) -> Result<DType> {
    let Some(first) = parts.first() else {
        return Err(Error::InvalidArgument(format!("{what}: nothing to concatenate")));
    };
    for p in parts {
        check::dtype(what, p, first.dtype())?;
    }
    Ok(first.dtype())
}

pub(super) fn concat_channels(device: &Device, parts: &[&Tensor]) -> Result<Tensor> {
    let dtype = check_parts("channel concatenation part", parts)?;
    let [n, h, w, _] = nhwc("channel concatenation part", parts[0])?;
    let mut total = 0usize;
    for p in parts {
        let [pn, ph, pw, pc] = nhwc("channel concatenation part", p)?;
        if (pn, ph, pw) != (n, h, w) {
            return Err(Error::ShapeMismatch {
                what: "channel concatenation part",
                expected: vec![n, h, w, pc],
                got: p.shape().to_vec(),
            });
        }
        total += pc;
    }
    let es = dtype.size();
    let mut out = Tensor::uninit(device, &[n, h, w, total], dtype)?;
    let mut offset = 0usize;
    for p in parts {
        let pc = p.shape()[3];
        let region = CopyRegion {
            src_offset: 0,
            src_pitch: pc * es,
            dst_offset: offset * es,
            dst_pitch: total * es,
            width: pc * es,
            rows: n * h * w,
        };
        out.buffer_mut().copy_region_from(p.buffer(), region)?;
        offset += pc;
    }
    Ok(out)
}

pub(super) fn slice_channels(device: &Device, x: &Tensor, offset: usize, len: usize) -> Result<Tensor> {
    let [n, h, w, c] = nhwc("channel slice input", x)?;
    if len == 0 || offset.checked_add(len).is_none_or(|end| end > c) {
        return Err(Error::InvalidArgument(format!(
            "channel slice {offset}..{} of a tensor with {c} channels (it must be non-empty and inside)",
            offset.saturating_add(len)
        )));
    }
    let es = x.dtype().size();
    let mut out = Tensor::uninit(device, &[n, h, w, len], x.dtype())?;
    let region = CopyRegion {
        src_offset: offset * es,
        src_pitch: c * es,
        dst_offset: 0,
        dst_pitch: len * es,
        width: len * es,
        rows: n * h * w,
    };
    out.buffer_mut().copy_region_from(x.buffer(), region)?;
    Ok(out)
}

pub(super) fn slice_batch(device: &Device, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let Some((&batch, rest)) = x.shape().split_first() else {
        return Err(Error::InvalidShape {
            what: "batch slice input",
            shape: vec![],
            reason: "a scalar has no batch axis".into(),
        });
    };
    if len == 0 || start.checked_add(len).is_none_or(|end| end > batch) {
        return Err(Error::InvalidArgument(format!(
            "batch slice {start}..{} of a tensor with {batch} samples (it must be non-empty and inside)",
            start.saturating_add(len)
        )));
    }
    let sample_bytes = rest.iter().product::<usize>() * x.dtype().size();
    let mut shape = x.shape().to_vec();
    shape[0] = len;
    let mut out = Tensor::uninit(device, &shape, x.dtype())?;
    let region = CopyRegion::contiguous(start * sample_bytes, 0, len * sample_bytes);
    out.buffer_mut().copy_region_from(x.buffer(), region)?;
    Ok(out)
}

pub(super) fn concat_batch(device: &Device, parts: &[&Tensor]) -> Result<Tensor> {
    let dtype = check_parts("batch concatenation part", parts)?;
    let Some((_, rest)) = parts[0].shape().split_first() else {
        return Err(Error::InvalidShape {
            what: "batch concatenation part",
            shape: vec![],
            reason: "a scalar has no batch axis".into(),
        });
    };
    let mut batch = 0usize;
    for p in parts {
        if p.shape().len() != rest.len() + 1 || &p.shape()[1..] != rest {
            let mut expected = vec![p.shape().first().copied().unwrap_or(0)];
            expected.extend_from_slice(rest);
            return Err(Error::ShapeMismatch { what: "batch concatenation part", expected, got: p.shape().to_vec() });
        }
        batch += p.shape()[0];
    }
    let mut shape = parts[0].shape().to_vec();
    shape[0] = batch;
    let mut out = Tensor::uninit(device, &shape, dtype)?;
    let mut offset = 0usize;
    for p in parts {
        let bytes = p.buffer().len();
        out.buffer_mut().copy_region_from(p.buffer(), CopyRegion::contiguous(0, offset, bytes))?;
        offset += bytes;
    }
    Ok(out)
}
