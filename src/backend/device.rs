//! [`DeviceBackend`]: the [`Backend`] over our kernels, on a GPU or on the CPU emulator.
//!
//! Almost every method is one call of the safe op in [`crate::ops`] whose contract it follows;
//! the exceptions, and what they cost, are:
//!
//! - **Residual DSBN (training).** [`ops::dsbn::forward_train`] has no residual, and the ops offer
//!   no statistics-only pass outside the convolution's fused epilogue. So the residual form runs
//!   the training forward with the ReLU off (batch statistics, running statistics moved once; its
//!   output is dropped) and then [`ops::dsbn::apply`] with the residual and the caller's ReLU,
//!   from the saved statistics (which never touches the running statistics). Cost: one extra
//!   write and read of an activation-sized tensor compared with a fused kernel. The residual is
//!   validated first, so an error leaves the running statistics as they were. The backward is
//!   [`ops::dsbn::backward_train_residual`], whose ReLU mask is `apply`'s expression bit for bit.
//! - **Residual DSBN (inference).** [`ops::dsbn::forward_infer`] with the ReLU off, then
//!   [`ops::elementwise::add_relu`] (or [`ops::elementwise::add`]): two passes.
//! - **Channel and batch slices / concatenations** are device-to-device copies of byte ranges
//!   (strided rows for channels, one contiguous range for samples): bit-exact, any dtype, no
//!   kernel and no host round trip.
//!
//! Every tensor handed in must live on the backend's device ([`Error::DeviceMismatch`]
//! otherwise).

use crate::backend::counters::{ConvProblem, OpCounters, OpTally};
use crate::backend::{Backend, BnGrads, BnTables, SgdTensor};
use crate::device::{CopyRegion, Device};
use crate::error::{Error, Result};
use crate::ops;
use crate::ops::check::{self, nhwc};
use crate::ops::conv::ConvGeometry;
use crate::ops::cross_entropy::{CrossEntropyLoss, CrossEntropyOptions};
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::{DsbnOptions, DsbnSaved, DsbnState};
use crate::ops::maxpool::PoolGeometry;
use crate::ops::sgd::{SgdOptions, SgdParam};
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

    /// Counts `t` if it is activation-sized (rank ≥ 3, batch first: see [`crate::backend::counters`]) and
    /// hands it back.
    fn wrote(&self, t: Tensor) -> Tensor {
        if t.shape().len() >= 3 {
            self.tally.activation(t.buffer().len());
        }
        t
    }

    fn conv(&self, problem: ConvProblem, dtype: DType) {
        self.tally.convolution(problem, dtype);
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

/// The shape of a backward's input from its gradient's batch and channels and a spatial size.
fn input_shape(what: &'static str, dy: &Tensor, input_hw: (usize, usize)) -> Result<[usize; 4]> {
    let [n, _, _, c] = nhwc(what, dy)?;
    Ok([n, input_hw.0, input_hw.1, c])
}

impl Backend for DeviceBackend {
    type Tensor = Tensor;
    type Bn = DsbnState;
    type BnSaved = DsbnSaved;

    fn name(&self) -> String {
        self.device.name()
    }

    fn device_counters(&self) -> Option<crate::DeviceCounters> {
        Some(self.device.counters())
    }

    fn op_counters(&self) -> Option<OpCounters> {
        Some(self.tally.snapshot())
    }

    // ---- tensors ----------------------------------------------------------------------------

    fn tensor_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        Tensor::from_slice(&self.device, shape, data)
    }

    fn tensor_i32(&self, shape: &[usize], data: &[i32]) -> Result<Tensor> {
        Tensor::from_slice(&self.device, shape, data)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Tensor::zeros(&self.device, shape, DType::F32)
    }

    fn to_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.on_device(&[t])?;
        check::dtype("read-back as f32", t, DType::F32)?;
        t.to_vec()
    }

    fn to_i32(&self, t: &Tensor) -> Result<Vec<i32>> {
        self.on_device(&[t])?;
        check::dtype("read-back as i32", t, DType::I32)?;
        t.to_vec()
    }

    fn write_f32(&self, t: &mut Tensor, data: &[f32]) -> Result<()> {
        self.on_device(&[t])?;
        t.copy_from_slice(data)
    }

    fn try_clone(&self, t: &Tensor) -> Result<Tensor> {
        self.on_device(&[t])?;
        let mut out = Tensor::zeros(&self.device, t.shape(), t.dtype())?;
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
        self.conv(ConvProblem::Forward, x.dtype());
        ops::conv::conv2d(x, w, bias, geometry).map(|t| self.wrote(t))
    }

    fn conv2d_backward_data(
        &self,
        dy: &Tensor,
        w: &Tensor,
        input_hw: (usize, usize),
        geometry: &ConvGeometry,
    ) -> Result<Tensor> {
        self.on_device(&[dy, w])?;
        self.conv(ConvProblem::BackwardData, dy.dtype());
        ops::conv::conv2d_backward_data(dy, w, input_hw, geometry).map(|t| self.wrote(t))
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
        self.conv(ConvProblem::BackwardFilter, x.dtype());
        let g = ops::conv::conv2d_backward_filter(dy, x, filter_krs, with_bias, geometry)?;
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
        self.wrote(dropped);
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
        if opts.relu {
            ops::elementwise::add_relu(&bn_out, r).map(|t| self.wrote(t))
        } else {
            ops::elementwise::add(&bn_out, r).map(|t| self.wrote(t))
        }
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
        let mut out = Tensor::zeros(&self.device, &[n, h, w, total], dtype)?;
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
        Ok(self.wrote(out))
    }

    fn slice_channels(&self, x: &Tensor, offset: usize, len: usize) -> Result<Tensor> {
        self.on_device(&[x])?;
        let [n, h, w, c] = nhwc("channel slice input", x)?;
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > c) {
            return Err(Error::InvalidArgument(format!(
                "channel slice {offset}..{} of a tensor with {c} channels (it must be non-empty and inside)",
                offset.saturating_add(len)
            )));
        }
        let es = x.dtype().size();
        let mut out = Tensor::zeros(&self.device, &[n, h, w, len], x.dtype())?;
        let region = CopyRegion {
            src_offset: offset * es,
            src_pitch: c * es,
            dst_offset: 0,
            dst_pitch: len * es,
            width: len * es,
            rows: n * h * w,
        };
        out.buffer_mut().copy_region_from(x.buffer(), region)?;
        Ok(self.wrote(out))
    }

    fn slice_batch(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        self.on_device(&[x])?;
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
        let mut out = Tensor::zeros(&self.device, &shape, x.dtype())?;
        let region = CopyRegion::contiguous(start * sample_bytes, 0, len * sample_bytes);
        out.buffer_mut().copy_region_from(x.buffer(), region)?;
        Ok(self.wrote(out))
    }

    fn concat_batch(&self, parts: &[&Tensor]) -> Result<Tensor> {
        self.on_device(parts)?;
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
                return Err(Error::ShapeMismatch {
                    what: "batch concatenation part",
                    expected,
                    got: p.shape().to_vec(),
                });
            }
            batch += p.shape()[0];
        }
        let mut shape = parts[0].shape().to_vec();
        shape[0] = batch;
        let mut out = Tensor::zeros(&self.device, &shape, dtype)?;
        let mut offset = 0usize;
        for p in parts {
            let bytes = p.buffer().len();
            out.buffer_mut().copy_region_from(p.buffer(), CopyRegion::contiguous(0, offset, bytes))?;
            offset += bytes;
        }
        Ok(self.wrote(out))
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
        opts: &CrossEntropyOptions,
        with_grad: bool,
    ) -> Result<(CrossEntropyLoss, Option<Tensor>)> {
        self.on_device(&[logits, labels, datasets])?;
        if with_grad {
            let (loss, dlogits) = ops::cross_entropy::forward_backward(logits, labels, datasets, num_classes, opts)?;
            Ok((loss, Some(self.wrote(dlogits))))
        } else {
            Ok((ops::cross_entropy::forward(logits, labels, datasets, num_classes, opts)?, None))
        }
    }

    fn argmax(&self, logits: &Tensor, datasets: &Tensor, num_classes: &[usize]) -> Result<Tensor> {
        self.on_device(&[logits, datasets])?;
        ops::metrics::argmax(logits, datasets, num_classes).map(|t| self.wrote(t))
    }

    fn sgd_step(&self, params: &mut [SgdTensor<'_, Tensor>], opts: &SgdOptions, first_step: bool) -> Result<()> {
        for t in params.iter() {
            self.on_device(&[&*t.param, t.grad, &*t.momentum_buffer])?;
        }
        let mut list: Vec<SgdParam<'_>> = params
            .iter_mut()
            .map(|t| SgdParam {
                param: &mut *t.param,
                grad: t.grad,
                momentum_buffer: &mut *t.momentum_buffer,
                lr: t.lr,
                frozen_rows: t.frozen_rows,
            })
            .collect();
        ops::sgd::sgd_step(&mut list, opts, first_step)
    }
}
