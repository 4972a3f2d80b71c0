//! Our fused Dataset-Aware Block against the same block built from cuDNN calls, side by side in
//! one Criterion group (`dab_vs_cudnn`, ids `ours/<pass>/<layer>` and `cudnn/<pass>/<layer>`).
//!
//! Shapes: the ResNet-18 3x3 layers of the dilated (output stride 8) network at batch 8 on
//! 512x512 crops, as in benches/dab.rs; 2 datasets; f32.
//!
//! - `train_fwd_bwd`: ours is `dab::forward_train` (materialising the activation) then
//!   `dab::backward_train`. cuDNN is conv forward; per dataset
//!   `cudnnBatchNormalizationForwardTraining` (spatial, exponential average factor 0.1,
//!   eps 1e-5) on that dataset's sub-batch; ReLU forward; ReLU backward; per dataset
//!   `cudnnBatchNormalizationBackward`; conv backward data; conv backward filter.
//! - `infer_fwd`: ours is `dab::forward_infer` (one kernel). cuDNN is conv forward, per dataset
//!   `cudnnBatchNormalizationForwardInference`, ReLU forward.
//!
//! Every iteration ends with a synchronisation on both sides.
//!
//! The batch is ordered in contiguous dataset blocks, `[0, 0, 0, 0, 1, 1, 1, 1]`: this is the
//! ordering most favourable to cuDNN, whose per-dataset split is then only a pointer offset and
//! a descriptor with a smaller N, with no gather before BN nor scatter after it. A mixed batch
//! would cost cuDNN two copies of the activation; it costs our kernels nothing, and they get the
//! same index tensor here.
//!
//! cuDNN setup, all outside the timed loop: NHWC activations and NHWC-format (KRSC) filters, the
//! layouts our kernels use; convolution algorithms from cuDNN's heuristics
//! (`cudnnGetConvolution*Algorithm_v7`); one workspace of the largest size the three chosen
//! algorithms ask for; every activation, gradient and statistics buffer allocated once. The
//! convolutions are pinned to `CUDNN_FMA_MATH`, so cuDNN does not use TF32 tensor cores, and our
//! side runs with TF32 off (`Device::set_allow_tf32(false)`, its FFMA mainloop): both sides
//! should compute the same f32 result. Our side
//! allocates its outputs inside the loop, because that is how our API works.
//!
//! Before timing a layer the bench runs each cuDNN pipeline once from the same inputs and state
//! as ours and prints the largest difference of the outputs and of the gradients, so that a
//! mistake in a descriptor shows up as a number rather than as a fast wrong benchmark.
//!
//! Only f32: for bf16, cudarc's cuDNN data-type mapping needs its `f16` feature and the legacy
//! batch-norm API's bf16 support could not be checked without a GPU.
//!
//! Without a GPU the bench says so and measures the f64 CPU reference of the unfused pipeline
//! (conv, per-dataset BN on each sub-batch, ReLU, and their backward) on a small shape, so
//! `cargo bench` always runs; those numbers describe the oracle, not either GPU pipeline. With a
//! GPU but no usable cuDNN (library missing, not 9.x, or a sub-library failing its version
//! check) it says so and measures our side only.

use std::ops::Range;
use std::time::Duration;

use cdcl::ops::conv::ConvGeometry;
use cdcl::ops::dab::{self, DabOptions};
use cdcl::ops::dsbn::{DsbnOptions, DsbnState};
use cdcl::reference::conv as rconv;
use cdcl::reference::dsbn as refd;
use cdcl::reference::elementwise as relem;
use cdcl::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{s, Array2, Array4, ArrayView2};

mod common;
use common::{values, Layer, LAYERS};

const NUM_DATASETS: usize = 2;
const DATASETS: [i32; 8] = [0, 0, 0, 0, 1, 1, 1, 1];
const MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;

/// The sample range of each dataset, or `None` when some dataset's samples are not contiguous
/// (then a per-dataset call on a sub-batch would need a gather, which this bench does not model).
fn dataset_blocks(datasets: &[i32], num_datasets: usize) -> Option<Vec<Range<usize>>> {
    let mut blocks = Vec::with_capacity(num_datasets);
    for d in 0..num_datasets {
        let first = datasets.iter().position(|&v| v as usize == d)?;
        let len = datasets[first..].iter().take_while(|&&v| v as usize == d).count();
        if datasets[first + len..].iter().any(|&v| v as usize == d) {
            return None;
        }
        blocks.push(first..first + len);
    }
    Some(blocks)
}

/// The largest |a - b| and the largest |b|, to judge the first against the second's scale.
fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    a.iter().zip(b).fold((0.0f32, 0.0f32), |(d, m), (x, y)| (d.max((x - y).abs()), m.max(y.abs())))
}

/// The cuDNN side. cudarc has safe wrappers for the convolutions and the ReLU forward; batch norm
/// and the ReLU backward go through `sys`, on a handle and descriptors of our own, because
/// cudarc's `Cudnn` and its descriptors keep their raw pointers private.
mod vendor {
    use std::ffi::{c_int, c_void};
    use std::ops::Range;
    use std::sync::Arc;

    use cudarc::cudnn::{
        result, sys, ActivationDescriptor, ActivationForward, ConvBackwardData, ConvBackwardFilter, ConvDescriptor,
        ConvForward, Cudnn, CudnnError, FilterDescriptor, TensorDescriptor,
    };
    use cudarc::driver::sys::CUdeviceptr;
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError};

    use cdcl::ops::conv::ConvGeometry;

    use super::{Layer, EPS, MOMENTUM, NUM_DATASETS};

    pub type BoxError = Box<dyn std::error::Error>;

    use sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU;
    use sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL;
    use sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    use sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN;
    use sys::cudnnTensorFormat_t::{CUDNN_TENSOR_NCHW, CUDNN_TENSOR_NHWC};

    // cuDNN reads alpha and beta through pointers, as f32 for f32 data.
    static ONE: f32 = 1.0;
    static ZERO: f32 = 0.0;

    fn scalar(v: &'static f32) -> *const c_void {
        std::ptr::from_ref(v).cast()
    }

    /// Whether cuDNN can be used, and if not, why. cudarc panics when it has to load a library or
    /// a symbol that is not there, so this runs before anything else touches cuDNN.
    pub fn probe() -> Result<(), String> {
        // SAFETY: only tries to dlopen the candidate names and closes what it opened; no cuDNN
        // function runs.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcudnn could not be loaded: not installed, or not on the library path".into());
        }
        // Every cuDNN exports cudnnGetVersion; the symbols used below are those of 9.x (the
        // bindings' version), so any other major version is refused rather than risk a missing
        // symbol.
        let version = result::get_version();
        if !(90_000..100_000).contains(&version) {
            return Err(format!("cuDNN {version} found, these bindings need 9.x"));
        }
        // cuDNN 9 loads its operation and convolution sub-libraries lazily; a missing one would
        // only show up as a failed call inside the timed loop.
        // SAFETY: argument-less queries of a loaded 9.x library, which exports both.
        unsafe { sys::cudnnOpsVersionCheck().result().and_then(|()| sys::cudnnCnnVersionCheck().result()) }
            .map_err(|e| format!("cuDNN {version}: a sub-library failed its version check ({e})"))
    }

    /// cudarc's own context on GPU 0 (the primary context, shared with our `Device`) and its
    /// stream. Only called once `Device::cuda(0)` has succeeded, which means libcuda loads:
    /// cudarc would panic otherwise.
    pub fn stream() -> Result<Arc<CudaStream>, DriverError> {
        Ok(CudaContext::new(0)?.default_stream())
    }

    fn cint(v: usize) -> Result<c_int, BoxError> {
        Ok(c_int::try_from(v)?)
    }

    /// A cuDNN handle whose raw pointer we can pass to `sys` functions.
    struct RawHandle(sys::cudnnHandle_t);

    impl RawHandle {
        fn new(stream: &CudaStream) -> Result<Self, CudnnError> {
            let handle = RawHandle(result::create_handle()?);
            // SAFETY: the handle was just created; the stream is the null stream of the context
            // that `Cudnn::new` made current on this thread, valid for as long as the context.
            unsafe { result::set_stream(handle.0, stream.cu_stream().cast()) }?;
            Ok(handle)
        }
    }

    impl Drop for RawHandle {
        fn drop(&mut self) {
            // SAFETY: created in `new`, destroyed only here. A failure cannot be reported from a
            // drop, and there is nothing left to release.
            let _ = unsafe { result::destroy_handle(self.0) };
        }
    }

    /// A 4-d f32 tensor descriptor, dims given as cuDNN wants them (N, C, H, W) whatever the format.
    struct RawTensor(sys::cudnnTensorDescriptor_t);

    impl RawTensor {
        fn new(format: sys::cudnnTensorFormat_t, [n, c, h, w]: [usize; 4]) -> Result<Self, BoxError> {
            let desc = RawTensor(result::create_tensor_descriptor()?);
            let dims = [cint(n)?, cint(c)?, cint(h)?, cint(w)?];
            // SAFETY: `desc` was just created and lives until Drop.
            unsafe { result::set_tensor4d_descriptor(desc.0, format, CUDNN_DATA_FLOAT, dims) }?;
            Ok(desc)
        }
    }

    impl Drop for RawTensor {
        fn drop(&mut self) {
            // SAFETY: created in `new`, destroyed only here; see RawHandle's drop for the result.
            let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
        }
    }

    /// A ReLU descriptor for `cudnnActivationBackward`, which has no safe wrapper.
    struct RawRelu(sys::cudnnActivationDescriptor_t);

    impl RawRelu {
        fn new() -> Result<Self, CudnnError> {
            let desc = RawRelu(result::create_activation_descriptor()?);
            // SAFETY: `desc` was just created and lives until Drop; the coefficient is unused by
            // ReLU.
            unsafe { result::set_activation_descriptor(desc.0, CUDNN_ACTIVATION_RELU, CUDNN_PROPAGATE_NAN, 0.0) }?;
            Ok(desc)
        }
    }

    impl Drop for RawRelu {
        fn drop(&mut self) {
            // SAFETY: created in `new`, destroyed only here; the status is ignored as in
            // RawHandle's drop.
            let _ = unsafe { sys::cudnnDestroyActivationDescriptor(self.0) };
        }
    }

    /// One dataset's contiguous sub-batch of the conv output and its gradients.
    struct Block {
        dataset: usize,
        /// Elements from the start of an `[N, P, Q, K]` buffer to the block's first sample.
        offset: usize,
        /// `[len, K, P, Q]` in NHWC, f32.
        desc: RawTensor,
    }

    /// Everything that describes the problem; immutable after setup, so it can be borrowed while
    /// the buffers are borrowed mutably.
    struct Plan {
        conv: ConvDescriptor<f32>,
        x: TensorDescriptor<f32>,
        w: FilterDescriptor<f32>,
        y: TensorDescriptor<f32>,
        relu: ActivationDescriptor<f32>,
        relu_raw: RawRelu,
        y_raw: RawTensor,
        /// 1 x K x 1 x 1 f32: one dataset's row of γ, β, running and saved statistics.
        param: RawTensor,
        blocks: Vec<Block>,
        k: usize,
        fwd_algo: sys::cudnnConvolutionFwdAlgo_t,
        bwd_data_algo: sys::cudnnConvolutionBwdDataAlgo_t,
        bwd_filter_algo: sys::cudnnConvolutionBwdFilterAlgo_t,
        raw: RawHandle,
        _cudnn: Arc<Cudnn>,
    }

    impl Plan {
        fn forward(&self) -> ConvForward<'_, f32, f32, f32> {
            ConvForward { conv: &self.conv, x: &self.x, w: &self.w, y: &self.y }
        }

        fn backward_data(&self) -> ConvBackwardData<'_, f32, f32, f32> {
            ConvBackwardData { conv: &self.conv, dx: &self.x, w: &self.w, dy: &self.y }
        }

        fn backward_filter(&self) -> ConvBackwardFilter<'_, f32, f32, f32> {
            ConvBackwardFilter { conv: &self.conv, x: &self.x, dw: &self.w, dy: &self.y }
        }

        fn relu_forward(&self) -> ActivationForward<'_, f32, f32, f32> {
            ActivationForward { act: &self.relu, x: &self.y, y: &self.y }
        }
    }

    struct Buffers {
        x: CudaSlice<f32>,
        w: CudaSlice<f32>,
        dy: CudaSlice<f32>,
        conv_out: CudaSlice<f32>,
        bn_out: CudaSlice<f32>,
        act: CudaSlice<f32>,
        d_bn: CudaSlice<f32>,
        d_conv: CudaSlice<f32>,
        dx: CudaSlice<f32>,
        dw: CudaSlice<f32>,
        // [D, K] each.
        gamma: CudaSlice<f32>,
        beta: CudaSlice<f32>,
        running_mean: CudaSlice<f32>,
        running_var: CudaSlice<f32>,
        save_mean: CudaSlice<f32>,
        save_invvar: CudaSlice<f32>,
        dgamma: CudaSlice<f32>,
        dbeta: CudaSlice<f32>,
        workspace: CudaSlice<u8>,
    }

    /// Device addresses of the buffers the `sys` calls use, taken once: the buffers are owned by
    /// the same `Pipeline` and never reallocated, so the addresses stay valid as long as it lives.
    struct Addrs {
        conv_out: CUdeviceptr,
        bn_out: CUdeviceptr,
        act: CUdeviceptr,
        dy: CUdeviceptr,
        d_bn: CUdeviceptr,
        d_conv: CUdeviceptr,
        gamma: CUdeviceptr,
        beta: CUdeviceptr,
        running_mean: CUdeviceptr,
        running_var: CUdeviceptr,
        save_mean: CUdeviceptr,
        save_invvar: CUdeviceptr,
        dgamma: CUdeviceptr,
        dbeta: CUdeviceptr,
    }

    /// Address of f32 element `index` of the buffer at `base`.
    fn at(base: CUdeviceptr, index: usize) -> *mut c_void {
        (base as usize + index * size_of::<f32>()) as *mut c_void
    }

    /// Host data shared with our side, so both compute the same thing.
    pub struct Inputs<'a> {
        pub x: &'a [f32],
        pub w: &'a [f32],
        pub dy: &'a [f32],
    }

    /// The DAB as cuDNN calls on one layer shape, with everything allocated and chosen up front.
    pub struct Pipeline {
        plan: Plan,
        bufs: Buffers,
        addrs: Addrs,
        stream: Arc<CudaStream>,
    }

    impl Pipeline {
        pub fn new(
            stream: &Arc<CudaStream>,
            layer: &Layer,
            batch: usize,
            blocks: &[Range<usize>],
            inputs: &Inputs<'_>,
        ) -> Result<Self, BoxError> {
            let cudnn = Cudnn::new(stream.clone())?;
            let raw = RawHandle::new(stream)?;
            let (hw, c, k, dil) = (layer.hw, layer.c, layer.k, layer.dilation);
            let (p, q) = ConvGeometry::square(1, dil, dil).output_size(hw, hw, 3, 3)?;

            let mut conv = cudnn.create_conv2d::<f32>(
                [cint(dil)?, cint(dil)?],
                [1, 1],
                [cint(dil)?, cint(dil)?],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )?;
            conv.set_math_type(sys::cudnnMathType_t::CUDNN_FMA_MATH)?;
            let x = cudnn.create_4d_tensor::<f32>(CUDNN_TENSOR_NHWC, [cint(batch)?, cint(c)?, cint(hw)?, cint(hw)?])?;
            // NHWC filter format with dims (K, C, R, S) is the KRSC memory layout.
            let w = cudnn.create_4d_filter::<f32>(CUDNN_TENSOR_NHWC, [cint(k)?, cint(c)?, 3, 3])?;
            let y = cudnn.create_4d_tensor::<f32>(CUDNN_TENSOR_NHWC, [cint(batch)?, cint(k)?, cint(p)?, cint(q)?])?;
            let relu = cudnn.create_activation::<f32>(CUDNN_ACTIVATION_RELU, CUDNN_PROPAGATE_NAN, 0.0)?;

            let blocks = blocks
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.is_empty())
                .map(|(dataset, r)| {
                    let desc = RawTensor::new(CUDNN_TENSOR_NHWC, [r.len(), k, p, q])?;
                    Ok(Block { dataset, offset: r.start * p * q * k, desc })
                })
                .collect::<Result<Vec<_>, BoxError>>()?;

            let fwd_algo = ConvForward { conv: &conv, x: &x, w: &w, y: &y }.pick_algorithm()?;
            let bwd_data_algo = ConvBackwardData { conv: &conv, dx: &x, w: &w, dy: &y }.pick_algorithm()?;
            let bwd_filter_algo = ConvBackwardFilter { conv: &conv, x: &x, dw: &w, dy: &y }.pick_algorithm()?;
            let plan = Plan {
                conv,
                x,
                w,
                y,
                relu,
                relu_raw: RawRelu::new()?,
                y_raw: RawTensor::new(CUDNN_TENSOR_NHWC, [batch, k, p, q])?,
                // The layout of a 1 x K x 1 x 1 tensor does not depend on the format.
                param: RawTensor::new(CUDNN_TENSOR_NCHW, [1, k, 1, 1])?,
                blocks,
                k,
                fwd_algo,
                bwd_data_algo,
                bwd_filter_algo,
                raw,
                _cudnn: cudnn,
            };
            // The three run one after another on one stream, so they can share one workspace.
            let workspace_bytes = [
                plan.forward().get_workspace_size(plan.fwd_algo)?,
                plan.backward_data().get_workspace_size(plan.bwd_data_algo)?,
                plan.backward_filter().get_workspace_size(plan.bwd_filter_algo)?,
            ]
            .into_iter()
            .max()
            .unwrap_or(0);

            let out_len = batch * p * q * k;
            let params = NUM_DATASETS * k;
            let ones = vec![1.0f32; params];
            let zeros = || stream.alloc_zeros::<f32>(out_len);
            let bufs = Buffers {
                x: stream.clone_htod(inputs.x)?,
                w: stream.clone_htod(inputs.w)?,
                dy: stream.clone_htod(inputs.dy)?,
                conv_out: zeros()?,
                bn_out: zeros()?,
                act: zeros()?,
                d_bn: zeros()?,
                d_conv: zeros()?,
                dx: stream.alloc_zeros::<f32>(inputs.x.len())?,
                dw: stream.alloc_zeros::<f32>(inputs.w.len())?,
                // PyTorch's initial state, as DsbnState::new: γ = 1, β = 0, μ = 0, σ² = 1.
                gamma: stream.clone_htod(&ones)?,
                beta: stream.alloc_zeros::<f32>(params)?,
                running_mean: stream.alloc_zeros::<f32>(params)?,
                running_var: stream.clone_htod(&ones)?,
                save_mean: stream.alloc_zeros::<f32>(params)?,
                save_invvar: stream.alloc_zeros::<f32>(params)?,
                dgamma: stream.alloc_zeros::<f32>(params)?,
                dbeta: stream.alloc_zeros::<f32>(params)?,
                // The driver refuses zero-byte allocations; a larger workspace than asked is fine.
                workspace: stream.alloc_zeros::<u8>(workspace_bytes.max(1))?,
            };
            let addr = |s: &CudaSlice<f32>| s.device_ptr(stream).0;
            let addrs = Addrs {
                conv_out: addr(&bufs.conv_out),
                bn_out: addr(&bufs.bn_out),
                act: addr(&bufs.act),
                dy: addr(&bufs.dy),
                d_bn: addr(&bufs.d_bn),
                d_conv: addr(&bufs.d_conv),
                gamma: addr(&bufs.gamma),
                beta: addr(&bufs.beta),
                running_mean: addr(&bufs.running_mean),
                running_var: addr(&bufs.running_var),
                save_mean: addr(&bufs.save_mean),
                save_invvar: addr(&bufs.save_invvar),
                dgamma: addr(&bufs.dgamma),
                dbeta: addr(&bufs.dbeta),
            };
            Ok(Pipeline { plan, bufs, addrs, stream: stream.clone() })
        }

        /// The algorithms cuDNN's heuristics chose, for the log.
        pub fn algorithms(&self) -> String {
            format!("{:?}, {:?}, {:?}", self.plan.fwd_algo, self.plan.bwd_data_algo, self.plan.bwd_filter_algo)
        }

        fn conv_forward(plan: &Plan, bufs: &mut Buffers) -> Result<(), CudnnError> {
            // SAFETY: x, w and conv_out are f32 buffers of exactly the element counts the x, w and
            // y descriptors describe (allocated from the same sizes in `new`); the workspace is
            // at least the size cuDNN asked for with this algorithm; the work is ordered on the
            // handle's stream, on which the buffers are also freed.
            unsafe {
                plan.forward().launch(
                    plan.fwd_algo,
                    Some(&mut bufs.workspace),
                    (1.0, 0.0),
                    &bufs.x,
                    &bufs.w,
                    &mut bufs.conv_out,
                )
            }
        }

        fn relu_forward(plan: &Plan, bufs: &mut Buffers) -> Result<(), CudnnError> {
            // SAFETY: bn_out and act are both N·P·Q·K f32 buffers, the shape of the y descriptor;
            // ordering as in conv_forward.
            unsafe { plan.relu_forward().launch((1.0, 0.0), &bufs.bn_out, &mut bufs.act) }
        }

        /// conv → per-dataset BN (batch statistics) → ReLU, then the backward of all three.
        pub fn train_step(&mut self) -> Result<(), CudnnError> {
            let Pipeline { plan, bufs, addrs: a, .. } = self;
            let (h, one, zero) = (plan.raw.0, scalar(&ONE), scalar(&ZERO));
            let row = |base: CUdeviceptr, b: &Block| at(base, b.dataset * plan.k);

            Self::conv_forward(plan, bufs)?;
            for b in &plan.blocks {
                // SAFETY: `b.desc` is the f32 NHWC sub-batch that starts `b.offset` elements into
                // the N·P·Q·K buffers conv_out and bn_out and ends inside them (the blocks are
                // disjoint sample ranges of the batch); each parameter pointer is dataset
                // `b.dataset`'s K-element row of a D·K f32 buffer, which is what `plan.param`
                // (1 x K x 1 x 1 f32) describes; alpha and beta point to f32, as f32 data
                // requires; eps is at least CUDNN_BN_MIN_EPSILON; the work is ordered on the
                // handle's stream, on which `self`'s buffers are also freed.
                unsafe {
                    sys::cudnnBatchNormalizationForwardTraining(
                        h,
                        CUDNN_BATCHNORM_SPATIAL,
                        one,
                        zero,
                        b.desc.0,
                        at(a.conv_out, b.offset),
                        b.desc.0,
                        at(a.bn_out, b.offset),
                        plan.param.0,
                        row(a.gamma, b),
                        row(a.beta, b),
                        MOMENTUM,
                        row(a.running_mean, b),
                        row(a.running_var, b),
                        EPS,
                        row(a.save_mean, b),
                        row(a.save_invvar, b),
                    )
                }
                .result()?;
            }
            Self::relu_forward(plan, bufs)?;

            // SAFETY: act, dy, bn_out and d_bn are N·P·Q·K f32 buffers, the shape `plan.y_raw`
            // describes, and `plan.relu_raw` is a ReLU descriptor; scalars and ordering as above.
            unsafe {
                sys::cudnnActivationBackward(
                    h,
                    plan.relu_raw.0,
                    one,
                    plan.y_raw.0,
                    at(a.act, 0),
                    plan.y_raw.0,
                    at(a.dy, 0),
                    plan.y_raw.0,
                    at(a.bn_out, 0),
                    zero,
                    plan.y_raw.0,
                    at(a.d_bn, 0),
                )
            }
            .result()?;
            for b in &plan.blocks {
                // SAFETY: as for the forward: the sub-batch at `b.offset` of conv_out, d_bn and
                // d_conv (all N·P·Q·K f32) matches `b.desc`; γ, dγ, dβ and the saved mean and
                // inverse deviation are dataset `b.dataset`'s rows, the saved ones written by
                // this dataset's forward call above on the same stream; beta = 0 overwrites the
                // gradients, as ours do.
                unsafe {
                    sys::cudnnBatchNormalizationBackward(
                        h,
                        CUDNN_BATCHNORM_SPATIAL,
                        one,
                        zero,
                        one,
                        zero,
                        b.desc.0,
                        at(a.conv_out, b.offset),
                        b.desc.0,
                        at(a.d_bn, b.offset),
                        b.desc.0,
                        at(a.d_conv, b.offset),
                        plan.param.0,
                        row(a.gamma, b),
                        row(a.dgamma, b),
                        row(a.dbeta, b),
                        EPS,
                        row(a.save_mean, b),
                        row(a.save_invvar, b),
                    )
                }
                .result()?;
            }

            // SAFETY: dx has the x descriptor's size, w the filter's, d_conv the y descriptor's;
            // workspace and ordering as in conv_forward.
            unsafe {
                plan.backward_data().launch(
                    plan.bwd_data_algo,
                    Some(&mut bufs.workspace),
                    (1.0, 0.0),
                    &mut bufs.dx,
                    &bufs.w,
                    &bufs.d_conv,
                )
            }?;
            // SAFETY: x has the x descriptor's size, dw the filter's, d_conv the y descriptor's;
            // workspace and ordering as in conv_forward.
            unsafe {
                plan.backward_filter().launch(
                    plan.bwd_filter_algo,
                    Some(&mut bufs.workspace),
                    (1.0, 0.0),
                    &bufs.x,
                    &mut bufs.dw,
                    &bufs.d_conv,
                )
            }
        }

        /// conv → per-dataset BN (running statistics) → ReLU.
        pub fn infer_step(&mut self) -> Result<(), CudnnError> {
            let Pipeline { plan, bufs, addrs: a, .. } = self;
            let row = |base: CUdeviceptr, b: &Block| at(base, b.dataset * plan.k);
            Self::conv_forward(plan, bufs)?;
            for b in &plan.blocks {
                // SAFETY: the sub-batch and parameter rows as in train_step's forward; the running
                // statistics are only read.
                unsafe {
                    sys::cudnnBatchNormalizationForwardInference(
                        plan.raw.0,
                        CUDNN_BATCHNORM_SPATIAL,
                        scalar(&ONE),
                        scalar(&ZERO),
                        b.desc.0,
                        at(a.conv_out, b.offset),
                        b.desc.0,
                        at(a.bn_out, b.offset),
                        plan.param.0,
                        row(a.gamma, b),
                        row(a.beta, b),
                        row(a.running_mean, b),
                        row(a.running_var, b),
                        EPS,
                    )
                }
                .result()?;
            }
            Self::relu_forward(plan, bufs)
        }

        pub fn synchronize(&self) -> Result<(), DriverError> {
            self.stream.synchronize()
        }

        /// The block's output (after ReLU) of the last step.
        pub fn output(&self) -> Result<Vec<f32>, DriverError> {
            self.stream.clone_dtoh(&self.bufs.act)
        }

        /// The input and weight gradients of the last training step.
        pub fn grads(&self) -> Result<(Vec<f32>, Vec<f32>), DriverError> {
            Ok((self.stream.clone_dtoh(&self.bufs.dx)?, self.stream.clone_dtoh(&self.bufs.dw)?))
        }
    }
}

/// Runs both cuDNN pipelines once and compares them with ours from the same fresh state; any
/// cuDNN error here means the pipeline is not timed.
fn cross_check(
    p: &mut vendor::Pipeline,
    ours: (&Tensor, &Tensor, &Tensor, &Tensor),
    dev: &Device,
    l: &Layer,
) -> Result<String, vendor::BoxError> {
    let (x, w, dy, ds) = ours;
    let geom = ConvGeometry::square(1, l.dilation, l.dilation);
    let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
    let mut st = DsbnState::new(dev, NUM_DATASETS, l.k)?;

    let y_ours = dab::forward_infer(x, w, ds, &st, &DabOptions { geometry: geom, dsbn: opts, ..Default::default() })?
        .to_vec::<f32>()?;
    p.infer_step()?;
    p.synchronize()?;
    let (d_infer, m_infer) = max_diff(&p.output()?, &y_ours);

    let f = dab::forward_train(
        x,
        w,
        ds,
        &mut st,
        &DabOptions { geometry: geom, dsbn: opts, materialize: true, ..Default::default() },
    )?;
    let g = dab::backward_train(
        dy,
        x,
        w,
        ds,
        &st,
        f.saved(),
        &DabOptions { geometry: geom, dsbn: opts, materialize: true, ..Default::default() },
    )?;
    p.train_step()?;
    p.synchronize()?;
    let (dx, dw) = p.grads()?;
    let (d_dx, m_dx) = max_diff(&dx, &g.dx.as_ref().unwrap().to_vec::<f32>()?);
    let (d_dw, m_dw) = max_diff(&dw, &g.dweight.to_vec::<f32>()?);
    Ok(format!(
        "max |cuDNN - ours|: inference output {d_infer:.3e} (of {m_infer:.3e}), dx {d_dx:.3e} (of {m_dx:.3e}), \
         dw {d_dw:.3e} (of {m_dw:.3e})"
    ))
}

fn gpu_benches(c: &mut Criterion, dev: &Device) {
    // Exact f32 on both sides: cuDNN is pinned to FMA math, so ours runs its FFMA mainloop.
    dev.set_allow_tf32(false);
    let blocks = dataset_blocks(&DATASETS, NUM_DATASETS);
    let stream = match (vendor::probe(), &blocks) {
        (Err(why), _) => {
            eprintln!("cuDNN unavailable ({why}): benchmarking our DAB only");
            None
        }
        (Ok(()), None) => {
            eprintln!("datasets are not in contiguous blocks: benchmarking our DAB only");
            None
        }
        (Ok(()), Some(_)) => match vendor::stream() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("cudarc could not open GPU 0 ({e:?}): benchmarking our DAB only");
                None
            }
        },
    };

    let mut g = c.benchmark_group("dab_vs_cudnn");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let batch = DATASETS.len();
    let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
    for l in &LAYERS {
        let geom = ConvGeometry::square(1, l.dilation, l.dilation);
        let (host_x, host_w, host_dy) =
            (values(batch * l.hw * l.hw * l.c, 1), values(l.k * 9 * l.c, 2), values(batch * l.hw * l.hw * l.k, 3));
        let x = Tensor::from_slice(dev, &[batch, l.hw, l.hw, l.c], &host_x).unwrap();
        let w = Tensor::from_slice(dev, &[l.k, 3, 3, l.c], &host_w).unwrap();
        let dy = Tensor::from_slice(dev, &[batch, l.hw, l.hw, l.k], &host_dy).unwrap();
        let ds = Tensor::from_slice(dev, &[batch], &DATASETS).unwrap();
        let mut st = DsbnState::new(dev, NUM_DATASETS, l.k).unwrap();

        let mut theirs = match (&stream, &blocks) {
            (Some(stream), Some(blocks)) => {
                let inputs = vendor::Inputs { x: &host_x, w: &host_w, dy: &host_dy };
                let built = vendor::Pipeline::new(stream, l, batch, blocks, &inputs)
                    .and_then(|mut p| cross_check(&mut p, (&x, &w, &dy, &ds), dev, l).map(|report| (p, report)));
                match built {
                    Ok((p, report)) => {
                        eprintln!("{}: cuDNN algorithms {}; {report}", l.name, p.algorithms());
                        Some(p)
                    }
                    Err(e) => {
                        eprintln!("{}: cuDNN pipeline failed ({e}): benchmarking our DAB only", l.name);
                        None
                    }
                }
            }
            _ => None,
        };

        let flops = (2 * batch * l.hw * l.hw * l.k * 9 * l.c) as u64;
        // Forward, data gradient and filter gradient: three convolutions' worth of FLOPs.
        g.throughput(Throughput::Elements(3 * flops));
        g.bench_function(BenchmarkId::new("ours/train_fwd_bwd", l.name), |b| {
            b.iter(|| {
                let f = dab::forward_train(
                    &x,
                    &w,
                    &ds,
                    &mut st,
                    &DabOptions { geometry: geom, dsbn: opts, materialize: true, ..Default::default() },
                )
                .unwrap();
                dab::backward_train(
                    &dy,
                    &x,
                    &w,
                    &ds,
                    &st,
                    f.saved(),
                    &DabOptions { geometry: geom, dsbn: opts, materialize: true, ..Default::default() },
                )
                .unwrap();
                dev.synchronize().unwrap();
            })
        });
        if let Some(p) = theirs.as_mut() {
            g.bench_function(BenchmarkId::new("cudnn/train_fwd_bwd", l.name), |b| {
                b.iter(|| {
                    p.train_step().expect("cuDNN training step (it ran once before timing)");
                    p.synchronize().expect("synchronising cuDNN's stream");
                })
            });
        }
        g.throughput(Throughput::Elements(flops));
        g.bench_function(BenchmarkId::new("ours/infer_fwd", l.name), |b| {
            b.iter(|| {
                dab::forward_infer(&x, &w, &ds, &st, &DabOptions { geometry: geom, dsbn: opts, ..Default::default() })
                    .unwrap();
                dev.synchronize().unwrap();
            })
        });
        if let Some(p) = theirs.as_mut() {
            g.bench_function(BenchmarkId::new("cudnn/infer_fwd", l.name), |b| {
                b.iter(|| {
                    p.infer_step().expect("cuDNN inference step (it ran once before timing)");
                    p.synchronize().expect("synchronising cuDNN's stream");
                })
            });
        }
    }
    g.finish();
}

/// The unfused pipeline in the f64 reference, split per dataset exactly as the cuDNN side is.
struct Unfused {
    x: Array4<f64>,
    w: Array4<f64>,
    dy: Array4<f64>,
    blocks: Vec<Range<usize>>,
    gamma: Array2<f64>,
    beta: Array2<f64>,
    running_mean: Array2<f64>,
    running_var: Array2<f64>,
    spec: rconv::ConvSpec,
    cfg: refd::DsbnConfig,
}

/// Dataset `d`'s parameters as the one-dataset table a sub-batch call takes.
fn row(a: &Array2<f64>, d: usize) -> ArrayView2<'_, f64> {
    a.slice(s![d..d + 1, ..])
}

fn contiguous(a: &Array4<f64>) -> &[f64] {
    a.as_slice().expect("arrays built here are in standard layout")
}

impl Unfused {
    fn new(n: usize, hw: usize, c: usize, k: usize, blocks: Vec<Range<usize>>) -> Self {
        let d = blocks.len();
        let from = |v: Vec<f32>, shape: (usize, usize, usize, usize)| {
            Array4::from_shape_vec(shape, v.into_iter().map(f64::from).collect()).expect("length matches shape")
        };
        Unfused {
            x: from(values(n * hw * hw * c, 1), (n, hw, hw, c)),
            w: from(values(k * 9 * c, 2), (k, 3, 3, c)),
            dy: from(values(n * hw * hw * k, 3), (n, hw, hw, k)),
            blocks,
            gamma: Array2::ones((d, k)),
            beta: Array2::zeros((d, k)),
            running_mean: Array2::zeros((d, k)),
            running_var: Array2::ones((d, k)),
            spec: rconv::ConvSpec { stride: (1, 1), padding: (1, 1), dilation: (1, 1) },
            // The ReLU is a separate step, as in the cuDNN pipeline.
            cfg: refd::DsbnConfig { eps: EPS, momentum: MOMENTUM, relu: false },
        }
    }

    /// Per-dataset BN of `y`; with `train`, batch statistics (and the running-statistics update
    /// the reference returns), else running statistics.
    fn batch_norm(&self, y: &Array4<f64>, train: bool) -> Array4<f64> {
        let mut out = Array4::zeros(y.dim());
        for (d, r) in self.blocks.iter().enumerate() {
            let sub = y.slice(s![r.clone(), .., .., ..]);
            let zeros = vec![0usize; r.len()];
            let (g, b) = (row(&self.gamma, d), row(&self.beta, d));
            let (m, v) = (row(&self.running_mean, d), row(&self.running_var, d));
            let bn = if train {
                refd::dsbn_forward_train(sub, &zeros, g, b, m, v, &self.cfg).map(|o| o.y)
            } else {
                refd::dsbn_forward_infer(sub, &zeros, g, b, m, v, &self.cfg)
            };
            out.slice_mut(s![r.clone(), .., .., ..]).assign(&bn.expect("shapes are consistent by construction"));
        }
        out
    }

    fn infer(&self) -> Array4<f64> {
        let y = rconv::conv2d(self.x.view(), self.w.view(), None, &self.spec);
        self.batch_norm(&y, false).mapv(relem::relu_scalar)
    }

    fn train(&self) -> rconv::ConvGrads {
        let y = rconv::conv2d(self.x.view(), self.w.view(), None, &self.spec);
        let bn = self.batch_norm(&y, true);
        let act = bn.mapv(relem::relu_scalar);
        let d_bn = relem::relu_backward(contiguous(&self.dy), contiguous(&act));
        let d_bn = Array4::from_shape_vec(act.dim(), d_bn).expect("length matches shape");
        let mut d_conv = Array4::zeros(y.dim());
        for (d, r) in self.blocks.iter().enumerate() {
            let zeros = vec![0usize; r.len()];
            let grads = refd::dsbn_backward_train(
                d_bn.slice(s![r.clone(), .., .., ..]),
                y.slice(s![r.clone(), .., .., ..]),
                &zeros,
                row(&self.gamma, d),
                row(&self.beta, d),
                &self.cfg,
            )
            .expect("shapes are consistent by construction");
            d_conv.slice_mut(s![r.clone(), .., .., ..]).assign(&grads.dx);
        }
        rconv::conv2d_backward(d_conv.view(), self.x.view(), self.w.view(), &self.spec)
    }
}

fn reference_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("dab_vs_cudnn/cpu-reference");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    let (n, hw, ch) = (4, 16, 16);
    let datasets = [0, 0, 1, 1];
    let blocks = dataset_blocks(&datasets, NUM_DATASETS).expect("contiguous by construction");
    let pipeline = Unfused::new(n, hw, ch, ch, blocks);
    let id = format!("{n}x{hw}x{hw}x{ch}");
    let flops = (2 * n * hw * hw * ch * 9 * ch) as u64;
    g.throughput(Throughput::Elements(3 * flops));
    g.bench_function(BenchmarkId::new("unfused/train_fwd_bwd", &id), |b| b.iter(|| pipeline.train()));
    g.throughput(Throughput::Elements(flops));
    g.bench_function(BenchmarkId::new("unfused/infer_fwd", &id), |b| b.iter(|| pipeline.infer()));
    g.finish();
}

fn benches(c: &mut Criterion) {
    common::on_gpu_or_cpu(
        c,
        "our DAB against cuDNN",
        "the CPU reference of the unfused pipeline",
        gpu_benches,
        reference_benches,
    );
}

criterion_group!(dab_cudnn_benches, benches);
criterion_main!(dab_cudnn_benches);
