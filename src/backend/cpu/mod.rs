//! [`CpuBackend`]: every op of the [`Backend`] trait in plain Rust on the host, fast enough to
//! train a small PSPNet on a laptop while staying an oracle for the device backend. Each op
//! family sits in the file its name says:
//!
//! | file | ops |
//! |---|---|
//! | `tensor.rs` | [`CpuTensor`] (f32 values in f32 / f16 / bf16 storage, or i32), DSBN tables |
//! | `conv.rs`, `gemm.rs` | convolution forward, data and filter gradients (blocked im2col + GEMM) |
//! | `dsbn.rs` | dataset-specific BatchNorm: statistics, apply, inference, backward |
//! | `dsbn_sync.rs` | its synchronised form (data-parallel SyncBN): partial sums out, the group's in |
//! | `dab.rs` | the dataset-aware block and the pyramid pooling module, composed from the above |
//! | `pool.rs` | max pooling, adaptive average pooling, bilinear resize, the PPM's input gradient |
//! | `layout.rs` | channel and batch slices and concatenations |
//! | `elementwise.rs` | add, ReLU, Dropout2d |
//! | `loss.rs` | multi-head cross-entropy (with the fused upsampling), argmax |
//! | `sgd.rs` | SGD with 16-bit copies, scaled gradient sums |
//! | `usss.rs` | the USSS entropy loss against class prototypes and its gradient |
//!
//! - Convolutions are GEMMs (the `gemm` crate's packed f32 kernels, one single-threaded call
//!   per output block) on tiles of an im2col matrix that is never materialised whole; 1×1
//!   convolutions multiply the input itself; the filter gradient's partials are summed in f64.
//! - Reductions over pixels (DSBN statistics and gradients, bias gradients, average pooling,
//!   resize gradients, the cross-entropy sums) accumulate in f64.
//! - **Mixed precision** follows the kernels' rounding points: an op reads f16 / bf16 values as
//!   f32 and rounds its output once to the storage type; what a fused kernel keeps in f32
//!   registers (the inference DAB's convolution result, the upsampled logits of the fused loss,
//!   the PPM's input-gradient sum) is not rounded here either.
//! - Work is spread over cores with rayon. Results are bitwise identical whatever the thread
//!   count: every output element is computed by exactly one task, work is cut into pieces whose
//!   size depends on the shapes only, and partial sums (per sample, or per fixed chunk of a
//!   sample's pixels) are merged in a fixed order. The f32 GEMM kernel the `gemm` crate picks at
//!   run time (AVX2 + FMA, AVX-512, ...) may differ between machines, so bits are reproducible
//!   per machine.
//! - `timing.rs` accumulates each op's wall time when profiling asks for it
//!   ([`CpuBackend::set_op_timing`]).
//!
//! Semantics, validation and error variants follow the `ops` function each trait method names.
//! Where this backend cannot mirror the device exactly it says so on the method.

mod check;
mod conv;
mod dab;
mod dsbn;
mod dsbn_sync;
mod elementwise;
mod layout;
mod loss;
mod pool;
mod sgd;
mod tensor;
mod timing;
mod usss;

pub use dab::CpuPpmSaved;
pub use tensor::{CpuBn, CpuBnSaved, CpuData, CpuTensor};

use super::{
    Backend, BnGrads, DabForward, DabGrads, DabInput, DabOptions, DabSaved, LossOptions, PpmBranchMut, PpmBranchRef,
    PpmGrads, SgdTensor, StatsReduce,
};
use crate::error::{Error, Result};
use crate::ops::conv::ConvGeometry;
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::DsbnOptions;
use crate::ops::maxpool::PoolGeometry;
use crate::ops::ppm::PpmOptions;
use crate::ops::sgd::SgdOptions;
use crate::ops::usss::UsssOptions;
use crate::tensor::DType;
use tensor::numel_of;

/// The host backend: plain Rust, rayon across cores, f32 arithmetic with f64 reductions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuBackend;

impl CpuBackend {
    /// The backend (it holds no state: threads come from rayon's current pool).
    pub fn new() -> Self {
        CpuBackend
    }

    /// Starts (or stops) accumulating the wall time of every op of every CPU backend in this
    /// process (off by default; `cdcl train --profile` turns it on).
    pub fn set_op_timing(on: bool) {
        timing::enable(on)
    }

    /// (op, total seconds, calls) of the ops timed since [`set_op_timing`](Self::set_op_timing)
    /// turned timing on, the most expensive first.
    pub fn op_times() -> Vec<(&'static str, f64, u64)> {
        timing::totals()
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Bn = CpuBn;
    type BnSaved = CpuBnSaved;
    type PpmSaved = CpuPpmSaved;

    fn name(&self) -> String {
        "cpu".into()
    }

    // ---- tensors --------------------------------------------------------------------------------

    fn tensor_f32(&self, shape: &[usize], data: &[f32]) -> Result<CpuTensor> {
        CpuTensor::from_f32(shape, data.to_vec())
    }

    fn tensor_float(&self, shape: &[usize], data: &[f32], dtype: DType) -> Result<CpuTensor> {
        CpuTensor::from_float(shape, data.to_vec(), dtype)
    }

    fn tensor_i32(&self, shape: &[usize], data: &[i32]) -> Result<CpuTensor> {
        CpuTensor::from_i32(shape, data.to_vec())
    }

    fn zeros(&self, shape: &[usize]) -> Result<CpuTensor> {
        let n = numel_of(shape)?;
        Ok(CpuTensor::f32_unchecked(shape.to_vec(), vec![0.0; n]))
    }

    fn to_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        t.as_f32().map(<[f32]>::to_vec).ok_or(Error::DTypeMismatch {
            what: "read-back as f32",
            expected: DType::F32,
            got: t.dtype(),
        })
    }

    fn to_i32(&self, t: &CpuTensor) -> Result<Vec<i32>> {
        t.as_i32().map(<[i32]>::to_vec).ok_or(Error::DTypeMismatch {
            what: "read-back as i32",
            expected: DType::I32,
            got: t.dtype(),
        })
    }

    fn write_f32(&self, t: &mut CpuTensor, data: &[f32]) -> Result<()> {
        let (shape, dtype) = (t.shape().to_vec(), t.dtype());
        let dst =
            t.as_f32_mut().ok_or(Error::DTypeMismatch { what: "tensor write", expected: dtype, got: DType::F32 })?;
        if dst.len() != data.len() {
            return Err(Error::ShapeMismatch { what: "tensor write", expected: shape, got: vec![data.len()] });
        }
        dst.iter_mut().zip(data).for_each(|(d, &v)| *d = tensor::round_to(dtype, v));
        Ok(())
    }

    fn try_clone(&self, t: &CpuTensor) -> Result<CpuTensor> {
        Ok(t.clone())
    }

    // ---- element-wise ---------------------------------------------------------------------------

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        timing::timed("add", || elementwise::add(a, b))
    }

    fn relu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        timing::timed("relu", || elementwise::relu(x))
    }

    fn relu_backward(&self, dy: &CpuTensor, y: &CpuTensor) -> Result<CpuTensor> {
        timing::timed("relu_backward", || elementwise::relu_backward(dy, y))
    }

    // ---- convolution ----------------------------------------------------------------------------

    fn conv2d(&self, x: &CpuTensor, w: &CpuTensor, bias: Option<&CpuTensor>, g: &ConvGeometry) -> Result<CpuTensor> {
        timing::timed("conv2d", || conv::conv2d(x, w, bias, g))
    }

    fn conv2d_backward_data(
        &self,
        dy: &CpuTensor,
        w: &CpuTensor,
        input_hw: (usize, usize),
        g: &ConvGeometry,
    ) -> Result<CpuTensor> {
        timing::timed("conv2d_backward_data", || conv::backward_data(dy, w, input_hw, g))
    }

    fn conv2d_backward_filter(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        filter_krs: (usize, usize, usize),
        with_bias: bool,
        g: &ConvGeometry,
    ) -> Result<(CpuTensor, Option<CpuTensor>)> {
        timing::timed("conv2d_backward_filter", || conv::backward_filter(dy, x, filter_krs, with_bias, g))
    }

    // ---- DSBN -----------------------------------------------------------------------------------

    fn bn_new(&self, num_datasets: usize, channels: usize) -> Result<CpuBn> {
        timing::timed("bn_new", || dsbn::bn_new(num_datasets, channels))
    }

    fn dsbn_forward_train(
        &self,
        x: &CpuTensor,
        datasets: &CpuTensor,
        bn: &mut CpuBn,
        opts: &DsbnOptions,
        residual: Option<&CpuTensor>,
    ) -> Result<(CpuTensor, CpuBnSaved)> {
        timing::timed("dsbn_forward_train", || dsbn::forward_train(x, datasets, bn, opts, residual))
    }

    fn dsbn_forward_infer(
        &self,
        x: &CpuTensor,
        datasets: &CpuTensor,
        bn: &CpuBn,
        opts: &DsbnOptions,
        residual: Option<&CpuTensor>,
    ) -> Result<CpuTensor> {
        timing::timed("dsbn_forward_infer", || dsbn::forward_infer(x, datasets, bn, opts, residual))
    }

    fn dsbn_backward_train(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        residual: Option<&CpuTensor>,
        datasets: &CpuTensor,
        bn: &CpuBn,
        saved: &CpuBnSaved,
        opts: &DsbnOptions,
    ) -> Result<BnGrads<CpuTensor>> {
        timing::timed("dsbn_backward_train", || dsbn::backward_train(dy, x, residual, datasets, bn, saved, opts))
    }

    fn dsbn_forward_train_synced(
        &self,
        x: &CpuTensor,
        datasets: &CpuTensor,
        bn: &mut CpuBn,
        opts: &DsbnOptions,
        residual: Option<&CpuTensor>,
        reduce: &mut StatsReduce<'_, CpuTensor>,
    ) -> Result<(CpuTensor, CpuBnSaved)> {
        dsbn_sync::forward_train(x, datasets, bn, opts, residual, reduce)
    }

    fn dsbn_backward_train_synced(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        residual: Option<&CpuTensor>,
        datasets: &CpuTensor,
        bn: &CpuBn,
        saved: &CpuBnSaved,
        opts: &DsbnOptions,
        reduce: &mut StatsReduce<'_, CpuTensor>,
    ) -> Result<BnGrads<CpuTensor>> {
        dsbn::backward_with(dy, x, residual, datasets, bn, saved, opts, Some(reduce))
    }

    // ---- the dataset-aware block and the PPM ----------------------------------------------------

    fn dab_forward_train(
        &self,
        input: DabInput<'_, Self>,
        bn: &mut CpuBn,
        opts: &DabOptions<'_, Self>,
    ) -> Result<DabForward<Self>> {
        timing::timed("dab_forward_train", || dab::forward_train(input, bn, opts))
    }

    fn dab_forward_infer(
        &self,
        input: DabInput<'_, Self>,
        bn: &CpuBn,
        opts: &DabOptions<'_, Self>,
    ) -> Result<CpuTensor> {
        timing::timed("dab_forward_infer", || dab::forward_infer(input, bn, opts))
    }

    fn dab_backward(
        &self,
        dy: &CpuTensor,
        input: DabInput<'_, Self>,
        bn: &CpuBn,
        saved: DabSaved<'_, Self>,
        opts: &DabOptions<'_, Self>,
    ) -> Result<DabGrads<CpuTensor>> {
        timing::timed("dab_backward", || dab::backward(dy, input, bn, saved, opts))
    }

    fn ppm_forward_train(
        &self,
        x: &CpuTensor,
        datasets: &CpuTensor,
        branches: &mut [PpmBranchMut<'_, Self>],
        opts: &PpmOptions,
    ) -> Result<(CpuTensor, CpuPpmSaved)> {
        timing::timed("ppm_forward_train", || dab::ppm_forward_train(x, datasets, branches, opts))
    }

    fn ppm_forward_infer(
        &self,
        x: &CpuTensor,
        datasets: &CpuTensor,
        branches: &[PpmBranchRef<'_, Self>],
        opts: &PpmOptions,
    ) -> Result<CpuTensor> {
        timing::timed("ppm_forward_infer", || dab::ppm_forward_infer(x, datasets, branches, opts))
    }

    fn ppm_backward(
        &self,
        dy: &CpuTensor,
        datasets: &CpuTensor,
        branches: &[PpmBranchRef<'_, Self>],
        saved: &CpuPpmSaved,
        opts: &PpmOptions,
    ) -> Result<PpmGrads<CpuTensor>> {
        timing::timed("ppm_backward", || dab::ppm_backward(dy, datasets, branches, saved, opts))
    }

    // ---- pooling, resizing, slices --------------------------------------------------------------

    fn max_pool2d(&self, x: &CpuTensor, geometry: &PoolGeometry) -> Result<(CpuTensor, CpuTensor)> {
        timing::timed("max_pool2d", || pool::max_pool2d(x, geometry))
    }

    fn max_pool2d_backward(
        &self,
        dy: &CpuTensor,
        indices: &CpuTensor,
        input_hw: (usize, usize),
        geometry: &PoolGeometry,
    ) -> Result<CpuTensor> {
        timing::timed("max_pool2d_backward", || pool::max_pool2d_backward(dy, indices, input_hw, geometry))
    }

    fn adaptive_avg_pool(&self, x: &CpuTensor, out_h: usize, out_w: usize) -> Result<CpuTensor> {
        timing::timed("adaptive_avg_pool", || pool::adaptive_avg_pool(x, out_h, out_w))
    }

    fn adaptive_avg_pool_backward(&self, dy: &CpuTensor, input_hw: (usize, usize)) -> Result<CpuTensor> {
        timing::timed("adaptive_avg_pool_backward", || pool::adaptive_avg_pool_backward(dy, input_hw))
    }

    fn resize_bilinear(&self, x: &CpuTensor, out_h: usize, out_w: usize, align_corners: bool) -> Result<CpuTensor> {
        timing::timed("resize_bilinear", || pool::resize_bilinear(x, out_h, out_w, align_corners))
    }

    fn resize_bilinear_backward(
        &self,
        dy: &CpuTensor,
        input_hw: (usize, usize),
        align_corners: bool,
    ) -> Result<CpuTensor> {
        timing::timed("resize_bilinear_backward", || pool::resize_bilinear_backward(dy, input_hw, align_corners))
    }

    fn concat_channels(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        timing::timed("concat_channels", || layout::concat_channels(parts))
    }

    fn slice_channels(&self, x: &CpuTensor, offset: usize, len: usize) -> Result<CpuTensor> {
        timing::timed("slice_channels", || layout::slice_channels(x, offset, len))
    }

    fn slice_batch(&self, x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        timing::timed("slice_batch", || layout::slice_batch(x, start, len))
    }

    fn concat_batch(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        timing::timed("concat_batch", || layout::concat_batch(parts))
    }

    // ---- regularisation, loss, metrics, optimiser -----------------------------------------------

    fn dropout2d(&self, x: &CpuTensor, opts: &Dropout2dOptions) -> Result<CpuTensor> {
        timing::timed("dropout2d", || elementwise::dropout("dropout input", x, opts))
    }

    fn dropout2d_backward(&self, dy: &CpuTensor, opts: &Dropout2dOptions) -> Result<CpuTensor> {
        timing::timed("dropout2d_backward", || elementwise::dropout("dropout output gradient", dy, opts))
    }

    fn cross_entropy(
        &self,
        logits: &CpuTensor,
        labels: &CpuTensor,
        datasets: &CpuTensor,
        num_classes: &[usize],
        opts: &LossOptions,
    ) -> Result<(CpuTensor, Option<CpuTensor>)> {
        timing::timed("cross_entropy", || loss::cross_entropy(logits, labels, datasets, num_classes, opts))
    }

    fn argmax(&self, logits: &CpuTensor, datasets: &CpuTensor, num_classes: &[usize]) -> Result<CpuTensor> {
        timing::timed("argmax", || loss::argmax(logits, datasets, num_classes))
    }

    fn usss_entropy(
        &self,
        x: &CpuTensor,
        datasets: &CpuTensor,
        protos: &CpuTensor,
        classes_per_dataset: &[usize],
        opts: &UsssOptions,
        grad: Option<f32>,
    ) -> Result<(CpuTensor, Option<CpuTensor>)> {
        usss::usss_entropy(x, datasets, protos, classes_per_dataset, opts, grad)
    }

    fn sum_scaled(&self, groups: &[&[&CpuTensor]], scale: f32) -> Result<(Vec<CpuTensor>, CpuTensor)> {
        timing::timed("sum_scaled", || sgd::sum_scaled(groups, scale))
    }

    fn sgd_step(
        &self,
        params: &mut [SgdTensor<'_, CpuTensor>],
        opts: &SgdOptions,
        first_step: bool,
        skip_if: Option<&CpuTensor>,
    ) -> Result<()> {
        timing::timed("sgd_step", || sgd::sgd_step(params, opts, first_step, skip_if))
    }
}
