//! [`DeviceBackend`]: the [`Backend`] over our kernels, on a GPU or on the CPU emulator.
//!
//! Every method is one call of the safe op in [`crate::ops`] whose contract it follows — the
//! dataset-aware block is [`ops::dab`] (the convolution with the DSBN statistics in its epilogue,
//! the finalize, the apply pass only when the output is materialised; the next block's
//! convolution applies the normalisation in its prologue otherwise; the one-kernel inference
//! block), the pyramid pooling module is [`ops::ppm`], the loss with the upsampling fused in is
//! [`ops::cross_entropy`]'s upsampled form, and the optimiser is [`ops::sgd`]'s multi-tensor
//! step and gradient sum. The exceptions, and what they cost, are:
//!
//! - **Standalone residual DSBN (training).** [`ops::dsbn::forward_train`] has no residual: the
//!   residual form runs the training forward with the ReLU off (its output is dropped) and then
//!   [`ops::dsbn::apply`] with the residual. The model never takes this path (its DSBN layers
//!   follow convolutions: [`Backend::dab_forward_train`] takes the statistics from the
//!   convolution's epilogue); it stays for callers of the standalone op. The residual is
//!   validated first, so an error leaves the running statistics as they were.
//! - **Standalone residual DSBN (inference).** [`ops::dsbn::forward_infer`] with the ReLU off,
//!   then [`ops::elementwise::add_relu`] (or [`ops::elementwise::add`]).
//! - **Channel and batch slices / concatenations** are device-to-device copies (`layout.rs`).
//!
//! Every tensor handed in must live on the backend's device ([`Error::DeviceMismatch`]
//! otherwise). The backend also counts what its ops write and run
//! ([`crate::backend::counters`]).

mod layout;
mod sync_bn;
mod usss;

use half::{bf16, f16};

use crate::backend::counters::{ConvProblem, OpCounters, OpTally};
use crate::backend::{
    Backend, BnGrads, BnStats, BnTables, DabForward, DabGrads, DabInput, DabOptions, DabSaved, LossOptions,
    PpmBranchGrads, PpmBranchMut, PpmBranchRef, PpmGrads, SgdTensor, StatsReduce,
};
use crate::device::{CopyRegion, Device};
use crate::error::{Error, Result};
use crate::ops;
use crate::ops::check::{self, nhwc};
use crate::ops::conv::ConvGeometry;
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::{DsbnOptions, DsbnSaved, DsbnState};
use crate::ops::maxpool::PoolGeometry;
use crate::ops::ppm::{PpmOptions, PpmSaved};
use crate::ops::sgd::{SgdOptions, SgdParam};
use crate::ops::usss::UsssOptions;
use crate::tensor::{DType, Tensor};

/// Our kernels on one [`Device`] (a GPU, or the CPU emulator).
#[derive(Clone, Debug)]
pub struct DeviceBackend {
    device: Device,
    tally: OpTally,
}

impl DeviceBackend {
    /// A backend computing on `device`.
    pub fn new(device: Device) -> Self {
        DeviceBackend { device, tally: OpTally::default() }
    }

    /// The device every tensor of this backend lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn on_device(&self, tensors: &[&Tensor]) -> Result<()> {
        tensors.iter().try_for_each(|t| self.device.check_same(t.device()))
    }

    /// Counts `t` if it is activation-sized (rank ≥ 3, batch first: see
    /// [`crate::backend::counters`]).
    fn count(&self, t: &Tensor) {
        if t.shape().len() >= 3 {
            self.tally.activation(t.buffer().len());
        }
    }

    /// [`DeviceBackend::count`] and hands `t` back.
    fn wrote(&self, t: Tensor) -> Tensor {
        self.count(&t);
        t
    }

    fn conv(&self, problem: ConvProblem, dtype: DType) {
        self.tally.convolution(problem, dtype);
    }

    fn dab_opts<'a>(&self, opts: &DabOptions<'a, Self>) -> ops::dab::DabOptions<'a> {
        ops::dab::DabOptions {
            geometry: opts.geometry,
            dsbn: opts.dsbn,
            prologue: opts.prologue.map(|p| ops::dab::Prologue { state: p.bn, saved: p.stats, relu: p.relu }),
            residual: opts.residual,
            materialize: opts.materialize,
            skip_input_grad: opts.skip_input_grad,
        }
    }

    fn check_dab(&self, input: &DabInput<'_, Self>, bn: &DsbnState, opts: &DabOptions<'_, Self>) -> Result<()> {
        self.on_device(&[input.x, input.weight, input.datasets])?;
        self.on_device(&bn.tables())?;
        if let Some(r) = opts.residual {
            self.on_device(&[r])?;
        }
        if let Some(p) = &opts.prologue {
            self.on_device(&p.bn.tables())?;
            self.on_device(&[&p.stats.mean, &p.stats.invstd])?;
        }
        Ok(())
    }
}

impl crate::backend::PpmRecords<Tensor, DsbnSaved> for PpmSaved {
    fn branch_records(&self) -> Vec<(&Tensor, &DsbnSaved)> {
        self.branches.iter().map(|b| (&b.dab.conv_out, &b.dab.saved)).collect()
    }
}

impl BnStats<Tensor> for DsbnSaved {
    fn mean(&self) -> &Tensor {
        &self.mean
    }

    fn invstd(&self) -> &Tensor {
        &self.invstd
    }
}

impl BnTables<Tensor> for DsbnState {
    fn tables(&self) -> [&Tensor; 4] {
        [&self.gamma, &self.beta, &self.running_mean, &self.running_var]
    }

    fn tables_mut(&mut self) -> [&mut Tensor; 4] {
        [&mut self.gamma, &mut self.beta, &mut self.running_mean, &mut self.running_var]
    }
}

/// A residual must match the DSBN input exactly (checked before anything is written).
fn check_residual(x: &Tensor, residual: &Tensor) -> Result<()> {
    if residual.shape() != x.shape() {
        return Err(Error::ShapeMismatch {
            what: "DSBN residual",
            expected: x.shape().to_vec(),
            got: residual.shape().to_vec(),
        });
    }
    check::dtype("DSBN residual", residual, x.dtype())?;
    x.device().check_same(residual.device())
}

/// The shape of a backward's input from its gradient's batch and channels and a spatial size.
fn input_shape(what: &'static str, dy: &Tensor, input_hw: (usize, usize)) -> Result<[usize; 4]> {
    let [n, _, _, c] = nhwc(what, dy)?;
    Ok([n, input_hw.0, input_hw.1, c])
}

impl Backend for DeviceBackend {
    type Tensor = Tensor;
    type Bn = DsbnState;
    type BnSaved = DsbnSaved;
    type PpmSaved = PpmSaved;

    fn name(&self) -> String {
        self.device.name()
    }

    fn device_counters(&self) -> Option<crate::DeviceCounters> {
        Some(self.device.counters())
    }

    fn op_counters(&self) -> Option<OpCounters> {
        Some(self.tally.snapshot())
    }

    fn set_allow_tf32(&self, on: bool) {
        self.device.set_allow_tf32(on)
    }

    fn begin_step(&self) -> Result<()> {
        self.device.begin_step()
    }

    fn end_step(&self) {
        self.device.end_step()
    }

    // ---- tensors ----------------------------------------------------------------------------

    fn tensor_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Tensor::from_slice(&self.device, shape, data)
    }

    fn tensor_float(&self, shape: &[usize], data: &[f32], dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => Tensor::from_slice(&self.device, shape, data),
            DType::F16 => {
                Tensor::from_slice(&self.device, shape, &data.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>())
            }
            DType::BF16 => {
                Tensor::from_slice(&self.device, shape, &data.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
            }
            _ => Err(Error::UnsupportedDType { what: "float tensor", dtype }),
        }
    }

    fn tensor_i32(&self, shape: &[usize], data: &[i32]) -> Result<Tensor> {
        Tensor::from_slice(&self.device, shape, data)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Tensor::zeros(&self.device, shape, DType::F32)
    }

    fn to_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.on_device(&[t])?;
        match t.dtype() {
            DType::F32 => t.to_vec(),
            DType::F16 => Ok(t.to_vec::<f16>()?.into_iter().map(f16::to_f32).collect()),
            DType::BF16 => Ok(t.to_vec::<bf16>()?.into_iter().map(bf16::to_f32).collect()),
            got => Err(Error::DTypeMismatch { what: "read-back as f32", expected: DType::F32, got }),
        }
    }

    fn to_i32(&self, t: &Tensor) -> Result<Vec<i32>> {
        self.on_device(&[t])?;
        check::dtype("read-back as i32", t, DType::I32)?;
        t.to_vec()
    }

    fn write_f32(&self, t: &mut Tensor, data: &[f32]) -> Result<()> {
        self.on_device(&[t])?;
        match t.dtype() {
            DType::F16 => t.copy_from_slice(&data.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()),
            DType::BF16 => t.copy_from_slice(&data.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()),
            _ => t.copy_from_slice(data),
        }
    }

    fn try_clone(&self, t: &Tensor) -> Result<Tensor> {
        self.on_device(&[t])?;
        let mut out = Tensor::uninit(&self.device, t.shape(), t.dtype())?;
        let bytes = t.buffer().len();
        out.buffer_mut().copy_region_from(t.buffer(), CopyRegion::contiguous(0, 0, bytes))?;
        Ok(self.wrote(out))
    }

    // ---- element-wise -----------------------------------------------------------------------

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.on_device(&[a, b])?;
        ops::elementwise::add(a, b).map(|t| self.wrote(t))
    }

    fn relu(&self, x: &Tensor) -> Result<Tensor> {
        self.on_device(&[x])?;
        ops::elementwise::relu(x).map(|t| self.wrote(t))
    }

    fn relu_backward(&self, dy: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.on_device(&[dy, y])?;
        ops::elementwise::relu_backward(dy, y).map(|t| self.wrote(t))
    }

    // ---- convolution ------------------------------------------------------------------------

    fn conv2d(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, geometry: &ConvGeometry) -> Result<Tensor> {
        self.on_device(&[x, w])?;
        if let Some(b) = bias {
            self.on_device(&[b])?;
        }
        let y = ops::conv::conv2d(x, w, bias, geometry)?;
        self.conv(ConvProblem::Forward, x.dtype());
        Ok(self.wrote(y))
    }

    fn conv2d_backward_data(
        &self,
        dy: &Tensor,
        w: &Tensor,
        input_hw: (usize, usize),
        geometry: &ConvGeometry,
    ) -> Result<Tensor> {
        self.on_device(&[dy, w])?;
        let dx = ops::conv::conv2d_backward_data(dy, w, input_hw, geometry)?;
        self.conv(ConvProblem::BackwardData, dy.dtype());
        Ok(self.wrote(dx))
    }

    fn conv2d_backward_filter(
        &self,
        dy: &Tensor,
        x: &Tensor,
        filter_krs: (usize, usize, usize),
        with_bias: bool,
        geometry: &ConvGeometry,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.on_device(&[dy, x])?;
        let g = ops::conv::conv2d_backward_filter(dy, x, filter_krs, with_bias, geometry)?;
        self.conv(ConvProblem::BackwardFilter, x.dtype());
        Ok((g.dweight, g.dbias))
    }

    // ---- dataset-specific BatchNorm ---------------------------------------------------------

    fn bn_new(&self, num_datasets: usize, channels: usize) -> Result<DsbnState> {
        DsbnState::new(&self.device, num_datasets, channels)
    }

    fn dsbn_forward_train(
        &self,
        x: &Tensor,
        datasets: &Tensor,
        bn: &mut DsbnState,
        opts: &DsbnOptions,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, DsbnSaved)> {
        self.on_device(&[x, datasets])?;
        self.on_device(&bn.tables())?;
        let Some(r) = residual else {
            return ops::dsbn::forward_train(x, datasets, bn, opts).map(|(y, s)| (self.wrote(y), s));
        };
        self.on_device(&[r])?;
        check_residual(x, r)?;
        // Statistics pass (moves the running statistics, once); its output is not the answer.
        let stats_opts = DsbnOptions { relu: false, ..*opts };
        let (dropped, saved) = ops::dsbn::forward_train(x, datasets, bn, &stats_opts)?;
        self.count(&dropped);
        // The apply pass reads the saved statistics only: the running ones stay as moved.
        let y = ops::dsbn::apply(x, Some(r), datasets, bn, &saved, opts)?;
        Ok((self.wrote(y), saved))
    }

    fn dsbn_forward_infer(
        &self,
        x: &Tensor,
        datasets: &Tensor,
        bn: &DsbnState,
        opts: &DsbnOptions,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.on_device(&[x, datasets])?;
        self.on_device(&bn.tables())?;
        let Some(r) = residual else {
            return ops::dsbn::forward_infer(x, datasets, bn, opts).map(|t| self.wrote(t));
        };
        self.on_device(&[r])?;
        check_residual(x, r)?;
        let bn_out = self.wrote(ops::dsbn::forward_infer(x, datasets, bn, &DsbnOptions { relu: false, ..*opts })?);
        let y = if opts.relu { ops::elementwise::add_relu(&bn_out, r)? } else { ops::elementwise::add(&bn_out, r)? };
        Ok(self.wrote(y))
    }

    fn dsbn_backward_train(
        &self,
        dy: &Tensor,
        x: &Tensor,
        residual: Option<&Tensor>,
        datasets: &Tensor,
        bn: &DsbnState,
        saved: &DsbnSaved,
        opts: &DsbnOptions,
    ) -> Result<BnGrads<Tensor>> {
        self.on_device(&[dy, x, datasets, &saved.mean, &saved.invstd])?;
        self.on_device(&bn.tables())?;
        if let Some(r) = residual {
            self.on_device(&[r])?;
        }
        let g = ops::dsbn::backward_train_residual(dy, x, residual, datasets, bn, saved, opts)?;
        Ok(BnGrads {
            dx: self.wrote(g.dx),
            dgamma: g.dgamma,
            dbeta: g.dbeta,
            dresidual: g.dresidual.map(|t| self.wrote(t)),
        })
    }

    // Through the host for now (see sync_bn.rs).
    fn dsbn_forward_train_synced(
        &self,
        x: &Tensor,
        datasets: &Tensor,
        bn: &mut DsbnState,
        opts: &DsbnOptions,
        residual: Option<&Tensor>,
        reduce: &mut StatsReduce<'_, Tensor>,
    ) -> Result<(Tensor, DsbnSaved)> {
        sync_bn::forward_train(self, x, datasets, bn, opts, residual, reduce)
    }

    fn dsbn_backward_train_synced(
        &self,
        dy: &Tensor,
        x: &Tensor,
        residual: Option<&Tensor>,
        datasets: &Tensor,
        bn: &DsbnState,
        saved: &DsbnSaved,
        opts: &DsbnOptions,
        reduce: &mut StatsReduce<'_, Tensor>,
    ) -> Result<BnGrads<Tensor>> {
        sync_bn::backward_train(self, dy, x, residual, datasets, bn, saved, opts, reduce)
    }

    // ---- the dataset-aware block and the PPM ------------------------------------------------

    fn dab_forward_train(
        &self,
        input: DabInput<'_, Self>,
        bn: &mut DsbnState,
        opts: &DabOptions<'_, Self>,
    ) -> Result<DabForward<Self>> {
        self.check_dab(&input, bn, opts)?;
        let f = ops::dab::forward_train(input.x, input.weight, input.datasets, bn, &self.dab_opts(opts))?;
        self.conv(ConvProblem::Forward, input.x.dtype());
        Ok(DabForward { conv_out: self.wrote(f.conv_out), stats: f.saved, output: f.output.map(|t| self.wrote(t)) })
    }

    fn dab_forward_infer(
        &self,
        input: DabInput<'_, Self>,
        bn: &DsbnState,
        opts: &DabOptions<'_, Self>,
    ) -> Result<Tensor> {
        self.check_dab(&input, bn, opts)?;
        let y = ops::dab::forward_infer(input.x, input.weight, input.datasets, bn, &self.dab_opts(opts))?;
        self.conv(ConvProblem::Forward, input.x.dtype());
        Ok(self.wrote(y))
    }

    fn dab_backward(
        &self,
        dy: &Tensor,
        input: DabInput<'_, Self>,
        bn: &DsbnState,
        saved: DabSaved<'_, Self>,
        opts: &DabOptions<'_, Self>,
    ) -> Result<DabGrads<Tensor>> {
        self.check_dab(&input, bn, opts)?;
        self.on_device(&[dy, saved.conv_out, &saved.stats.mean, &saved.stats.invstd])?;
        let ops_saved = ops::dab::DabSaved { conv_out: saved.conv_out, stats: saved.stats };
        let g =
            ops::dab::backward_train(dy, input.x, input.weight, input.datasets, bn, ops_saved, &self.dab_opts(opts))?;
        if g.dx.is_some() {
            self.conv(ConvProblem::BackwardData, dy.dtype());
        }
        self.conv(ConvProblem::BackwardFilter, dy.dtype());
        // The DSBN backward's output (the convolution output's gradient) is an intermediate.
        self.count(saved.conv_out);
        Ok(DabGrads {
            dx: g.dx.map(|t| self.wrote(t)),
            dweight: g.dweight,
            dgamma: g.dgamma,
            dbeta: g.dbeta,
            dresidual: g.dresidual.map(|t| self.wrote(t)),
        })
    }

    fn ppm_forward_train(
        &self,
        x: &Tensor,
        datasets: &Tensor,
        branches: &mut [PpmBranchMut<'_, Self>],
        opts: &PpmOptions,
    ) -> Result<(Tensor, PpmSaved)> {
        self.on_device(&[x, datasets])?;
        for b in branches.iter() {
            self.on_device(&[b.weight])?;
            self.on_device(&b.bn.tables())?;
        }
        let mut views: Vec<ops::ppm::PpmBranchMut<'_>> =
            branches.iter_mut().map(|b| ops::ppm::PpmBranchMut { weight: b.weight, state: &mut *b.bn }).collect();
        let f = ops::ppm::forward_train(x, datasets, &mut views, opts)?;
        for b in &f.saved.branches {
            self.conv(ConvProblem::Forward, x.dtype());
            self.count(&b.pooled);
            self.count(&b.dab.conv_out);
            if let Some(o) = &b.dab.output {
                self.count(o);
            }
        }
        Ok((self.wrote(f.output), f.saved))
    }

    fn ppm_forward_infer(
        &self,
        x: &Tensor,
        datasets: &Tensor,
        branches: &[PpmBranchRef<'_, Self>],
        opts: &PpmOptions,
    ) -> Result<Tensor> {
        self.on_device(&[x, datasets])?;
        for b in branches {
            self.on_device(&[b.weight])?;
            self.on_device(&b.bn.tables())?;
        }
        let views: Vec<ops::ppm::PpmBranchRef<'_>> =
            branches.iter().map(|b| ops::ppm::PpmBranchRef { weight: b.weight, state: b.bn }).collect();
        let y = ops::ppm::forward_infer(x, datasets, &views, opts)?;
        if let [n, _, _, c] = *x.shape() {
            for (b, &bin) in branches.iter().zip(&opts.bins) {
                // Per branch: the pooled input and the inference DAB's output.
                let k = b.weight.shape().first().copied().unwrap_or(0);
                self.conv(ConvProblem::Forward, x.dtype());
                self.tally.activation(n * bin * bin * c * x.dtype().size());
                self.tally.activation(n * bin * bin * k * x.dtype().size());
            }
        }
        Ok(self.wrote(y))
    }

    fn ppm_backward(
        &self,
        dy: &Tensor,
        datasets: &Tensor,
        branches: &[PpmBranchRef<'_, Self>],
        saved: &PpmSaved,
        opts: &PpmOptions,
    ) -> Result<PpmGrads<Tensor>> {
        self.on_device(&[dy, datasets])?;
        for b in branches {
            self.on_device(&[b.weight])?;
            self.on_device(&b.bn.tables())?;
        }
        let views: Vec<ops::ppm::PpmBranchRef<'_>> =
            branches.iter().map(|b| ops::ppm::PpmBranchRef { weight: b.weight, state: b.bn }).collect();
        let g = ops::ppm::backward_train(dy, datasets, &views, saved, opts)?;
        for b in &saved.branches {
            // Per branch: the resize backward's output, the DSBN backward's, the data gradient.
            self.conv(ConvProblem::BackwardData, dy.dtype());
            self.conv(ConvProblem::BackwardFilter, dy.dtype());
            self.count(&b.dab.conv_out);
            self.count(&b.dab.conv_out);
            self.count(&b.pooled);
        }
        Ok(PpmGrads {
            dx: self.wrote(g.dx),
            branches: g
                .branches
                .into_iter()
                .map(|b| PpmBranchGrads { dweight: b.dweight, dgamma: b.dgamma, dbeta: b.dbeta })
                .collect(),
        })
    }

    // ---- pooling, resizing, channel and batch slices ----------------------------------------

    fn max_pool2d(&self, x: &Tensor, geometry: &PoolGeometry) -> Result<(Tensor, Tensor)> {
        self.on_device(&[x])?;
        let out = ops::maxpool::max_pool2d(x, geometry)?;
        Ok((self.wrote(out.y), self.wrote(out.indices)))
    }

    fn max_pool2d_backward(
        &self,
        dy: &Tensor,
        indices: &Tensor,
        input_hw: (usize, usize),
        geometry: &PoolGeometry,
    ) -> Result<Tensor> {
        self.on_device(&[dy, indices])?;
        ops::maxpool::max_pool2d_backward(dy, indices, input_hw, geometry).map(|t| self.wrote(t))
    }

    fn adaptive_avg_pool(&self, x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
        self.on_device(&[x])?;
        ops::pool::adaptive_avg_pool(x, out_h, out_w).map(|t| self.wrote(t))
    }

    fn adaptive_avg_pool_backward(&self, dy: &Tensor, input_hw: (usize, usize)) -> Result<Tensor> {
        self.on_device(&[dy])?;
        let shape = input_shape("adaptive_avg_pool output gradient", dy, input_hw)?;
        ops::pool::adaptive_avg_pool_backward(dy, 0, &shape).map(|t| self.wrote(t))
    }

    fn resize_bilinear(&self, x: &Tensor, out_h: usize, out_w: usize, align_corners: bool) -> Result<Tensor> {
        self.on_device(&[x])?;
        ops::pool::resize_bilinear(x, out_h, out_w, align_corners).map(|t| self.wrote(t))
    }

    fn resize_bilinear_backward(&self, dy: &Tensor, input_hw: (usize, usize), align_corners: bool) -> Result<Tensor> {
        self.on_device(&[dy])?;
        let shape = input_shape("resize_bilinear output gradient", dy, input_hw)?;
        ops::pool::resize_bilinear_backward(dy, 0, &shape, align_corners).map(|t| self.wrote(t))
    }

    fn concat_channels(&self, parts: &[&Tensor]) -> Result<Tensor> {
        self.on_device(parts)?;
        layout::concat_channels(&self.device, parts).map(|t| self.wrote(t))
    }

    fn slice_channels(&self, x: &Tensor, offset: usize, len: usize) -> Result<Tensor> {
        self.on_device(&[x])?;
        layout::slice_channels(&self.device, x, offset, len).map(|t| self.wrote(t))
    }

    fn slice_batch(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        self.on_device(&[x])?;
        layout::slice_batch(&self.device, x, start, len).map(|t| self.wrote(t))
    }

    fn concat_batch(&self, parts: &[&Tensor]) -> Result<Tensor> {
        self.on_device(parts)?;
        layout::concat_batch(&self.device, parts).map(|t| self.wrote(t))
    }

    // ---- regularisation, loss, metrics, optimiser -------------------------------------------

    fn dropout2d(&self, x: &Tensor, opts: &Dropout2dOptions) -> Result<Tensor> {
        self.on_device(&[x])?;
        ops::dropout::dropout2d(x, opts).map(|t| self.wrote(t))
    }

    fn dropout2d_backward(&self, dy: &Tensor, opts: &Dropout2dOptions) -> Result<Tensor> {
        self.on_device(&[dy])?;
        ops::dropout::dropout2d_backward(dy, opts).map(|t| self.wrote(t))
    }

    fn cross_entropy(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        datasets: &Tensor,
        num_classes: &[usize],
        opts: &LossOptions,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.on_device(&[logits, labels, datasets])?;
        let (loss, d) = ops::cross_entropy::loss_on_device(
            logits,
            labels,
            datasets,
            num_classes,
            &opts.ce,
            opts.upsample,
            opts.with_grad,
        )?;
        Ok((loss, d.map(|t| self.wrote(t))))
    }

    fn argmax(&self, logits: &Tensor, datasets: &Tensor, num_classes: &[usize]) -> Result<Tensor> {
        self.on_device(&[logits, datasets])?;
        ops::metrics::argmax(logits, datasets, num_classes).map(|t| self.wrote(t))
    }

    fn usss_entropy(
        &self,
        x: &Tensor,
        datasets: &Tensor,
        protos: &Tensor,
        classes_per_dataset: &[usize],
        opts: &UsssOptions,
        grad: Option<f32>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.on_device(&[x, datasets, protos])?;
        let (loss, dx) = usss::usss_entropy(self, x, datasets, protos, classes_per_dataset, opts, grad)?;
        Ok((loss, dx.map(|t| self.wrote(t))))
    }

    fn sum_scaled(&self, groups: &[&[&Tensor]], scale: f32) -> Result<(Vec<Tensor>, Tensor)> {
        for g in groups {
            self.on_device(g)?;
        }
        ops::sgd::sum_scaled(groups, scale)
    }

    fn sgd_step(
        &self,
        params: &mut [SgdTensor<'_, Tensor>],
        opts: &SgdOptions,
        first_step: bool,
        skip_if: Option<&Tensor>,
    ) -> Result<()> {
        for t in params.iter() {
            self.on_device(&[&*t.param, t.grad, &*t.momentum_buffer])?;
            if let Some(c) = t.copy.as_deref() {
                self.on_device(&[c])?;
            }
        }
        if let Some(f) = skip_if {
            self.on_device(&[f])?;
        }
        let mut list: Vec<SgdParam<'_>> = params
            .iter_mut()
            .map(|t| SgdParam {
                param: &mut *t.param,
                grad: t.grad,
                momentum_buffer: &mut *t.momentum_buffer,
                lr: t.lr,
                frozen_rows: t.frozen_rows,
                copy: t.copy.as_deref_mut(),
            })
            .collect();
        // Inside a step, an error recorded by any op of the step also skips the update.
        let step_flag = self.device.step_skip_flag(skip_if)?;
        match step_flag.as_ref().or(skip_if) {
            Some(flag) => ops::sgd::sgd_step_unless(&mut list, opts, first_step, flag),
            None => ops::sgd::sgd_step(&mut list, opts, first_step),
        }
    }
}
