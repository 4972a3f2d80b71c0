//! Element-wise ops on the CPU backend: the residual add, ReLU and its backward, Dropout2d (the
//! kernels' counter-based mask, [`crate::rng::dropout_keep`]). f32 arithmetic, as the kernels;
//! outputs rounded once to the storage type.

use rayon::prelude::*;

use super::check::{float_as, float_of, nhwc, relu32, shape_is};
use super::tensor::CpuTensor;
use crate::error::{Error, Result};
use crate::ops::dropout::Dropout2dOptions;
use crate::rng::dropout_keep as keep;

pub(crate) fn add(a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
    let av = float_of("residual add input", a)?;
    let bv = float_as("residual add second input", b, a.dtype())?;
    shape_is("residual add second input", b, a.shape())?;
    let y = av.par_iter().zip(bv.par_iter()).map(|(x, y)| x + y).collect();
    Ok(CpuTensor::float(a.shape().to_vec(), y, a.dtype()))
}

pub(crate) fn relu(x: &CpuTensor) -> Result<CpuTensor> {
    let xv = float_of("ReLU input", x)?;
    Ok(CpuTensor::float(x.shape().to_vec(), xv.par_iter().map(|&v| relu32(v)).collect(), x.dtype()))
}

pub(crate) fn relu_backward(dy: &CpuTensor, y: &CpuTensor) -> Result<CpuTensor> {
    let g = float_of("ReLU output gradient", dy)?;
    let yv = float_as("ReLU forward output", y, dy.dtype())?;
    shape_is("ReLU forward output", y, dy.shape())?;
    let dx = g.par_iter().zip(yv.par_iter()).map(|(&g, &o)| if o > 0.0 || o.is_nan() { g } else { 0.0 }).collect();
    Ok(CpuTensor::float(dy.shape().to_vec(), dx, dy.dtype()))
}

/// Dropout2d as the kernels do it: per (sample, channel) a factor, 0 where
/// [`keep`](crate::rng::dropout_keep) says drop, else `1/(1−p)` in f32; dropped
/// channels are exact zeros whatever the input (inf and NaN included).
pub(crate) fn dropout(what: &'static str, x: &CpuTensor, opts: &Dropout2dOptions) -> Result<CpuTensor> {
    let [n, h, w, c] = nhwc(what, x)?;
    let xv = float_of(what, x)?;
    if !(0.0..=1.0).contains(&opts.p) {
        return Err(Error::InvalidArgument(format!("dropout probability must be in [0, 1], got {}", opts.p)));
    }
    let scale = 1.0f32 / (1.0f32 - opts.p);
    let factor: Vec<f32> =
        (0..n * c).map(|i| if keep(opts.seed, i / c, i % c, opts.p as f64) { scale } else { 0.0 }).collect();
    let hwc = h * w * c;
    let mut y = vec![0.0f32; xv.len()];
    y.par_chunks_mut(c).enumerate().for_each(|(pix, out)| {
        let ni = pix * c / hwc;
        let f = &factor[ni * c..(ni + 1) * c];
        for ci in 0..c {
            out[ci] = if f[ci] == 0.0 { 0.0 } else { xv[pix * c + ci] * f[ci] };
        }
    });
    Ok(CpuTensor::float(vec![n, h, w, c], y, x.dtype()))
}
