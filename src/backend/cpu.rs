//! [`CpuBackend`]: every op of the [`Backend`] trait in plain Rust on the host, fast enough to
//! train a small PSPNet on a laptop while staying an oracle for the device backend.
//!
//! - Tensors are host vectors ([`CpuTensor`]: a shape and f32 or i32 data).
//! - Convolutions are im2col + GEMM (`matrixmultiply`'s f32 `sgemm`, reached through ndarray's
//!   safe [`general_mat_mul`]). NHWC activations and KRSC weights make both operands plain
//!   row-major matrices: the im2col row of output pixel `(n, p, q)` is the `R·S` input pixels it
//!   reads, `C` contiguous channels each, in the weight's `(r, s, c)` order, so
//!   `y[M, K] = col[M, R·S·C] · Wᵀ`. A 1×1 convolution with stride 1 and no padding uses the
//!   input itself as `col`. The data gradient is `dcol = dy · W` followed by a gather of every
//!   input pixel's taps (col2im); the filter gradient is `dWᵀ = colᵀ · dy`, one tile of output
//!   pixels at a time, each tile's f32 product accumulated into an f64 sum.
//! - Reductions over pixels (DSBN statistics and gradients, bias gradients, average pooling,
//!   resize gradients, the cross-entropy sums) accumulate in f64.
//! - Work is spread over cores with rayon. Results are bitwise identical whatever the thread
//!   count: every output element is computed by exactly one task, work is cut into pieces whose
//!   size depends on the shapes only, and partial sums (per sample, or per fixed chunk of a
//!   sample's pixels) are merged in a fixed order. The f32 GEMM kernel `matrixmultiply` picks at
//!   run time (AVX, FMA, ...) may differ between machines, so bits are reproducible per machine.
//!
//! Semantics, validation and error variants follow the `ops` function each trait method names.
//! Where this backend cannot mirror the device exactly it says so on the method.

use std::fmt;
use std::ops::Range;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};
use rayon::prelude::*;

use super::{Backend, BnGrads, BnTables, SgdTensor, TensorLike};
use crate::error::{Error, Result};
use crate::ops::check::{self, finite_positive};
use crate::ops::conv::ConvGeometry;
use crate::ops::cross_entropy::{check_heads, CrossEntropyLoss, CrossEntropyOptions, IGNORE_LABEL};
use crate::ops::dropout::Dropout2dOptions;
use crate::ops::dsbn::DsbnOptions;
use crate::ops::maxpool::PoolGeometry;
use crate::ops::pool::MAX_RESIZE_DIM;
use crate::ops::sgd::SgdOptions;
use crate::resample::{bilinear_taps, pool_bin};
use crate::rng::dropout_keep as keep;
use crate::tensor::DType;

// ---- tensors ------------------------------------------------------------------------------------

/// The elements of a [`CpuTensor`].
#[derive(Clone)]
pub enum CpuData {
    /// 32-bit floats (activations, weights, gradients, statistics).
    F32(Vec<f32>),
    /// 32-bit integers (dataset indices, labels, max-pooling indices, predictions).
    I32(Vec<i32>),
}

/// A tensor in host memory: a row-major shape and its f32 or i32 elements.
#[derive(Clone)]
pub struct CpuTensor {
    shape: Vec<usize>,
    data: CpuData,
}

fn numel_of(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| Error::InvalidShape {
        what: "tensor",
        shape: shape.to_vec(),
        reason: "element count overflows usize".into(),
    })
}

fn check_len(shape: &[usize], len: usize) -> Result<()> {
    let n = numel_of(shape)?;
    if n != len {
        return Err(Error::InvalidShape {
            what: "tensor data",
            shape: shape.to_vec(),
            reason: format!("shape holds {n} elements but {len} were given"),
        });
    }
    Ok(())
}

impl CpuTensor {
    /// An f32 tensor owning `data` (`shape.iter().product()` elements, row-major).
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        check_len(shape, data.len())?;
        Ok(CpuTensor { shape: shape.to_vec(), data: CpuData::F32(data) })
    }

    /// An i32 tensor owning `data` (`shape.iter().product()` elements, row-major).
    pub fn from_i32(shape: &[usize], data: Vec<i32>) -> Result<Self> {
        check_len(shape, data.len())?;
        Ok(CpuTensor { shape: shape.to_vec(), data: CpuData::I32(data) })
    }

    /// Internal constructor for results whose length is right by construction.
    fn f32_unchecked(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        CpuTensor { shape, data: CpuData::F32(data) }
    }

    fn i32_unchecked(shape: Vec<usize>, data: Vec<i32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        CpuTensor { shape, data: CpuData::I32(data) }
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// [`DType::F32`] or [`DType::I32`].
    pub fn dtype(&self) -> DType {
        match self.data {
            CpuData::F32(_) => DType::F32,
            CpuData::I32(_) => DType::I32,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        match &self.data {
            CpuData::F32(v) => v.len(),
            CpuData::I32(v) => v.len(),
        }
    }

    /// The elements.
    pub fn data(&self) -> &CpuData {
        &self.data
    }

    /// The elements of an f32 tensor, `None` for an i32 one.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            CpuData::F32(v) => Some(v),
            CpuData::I32(_) => None,
        }
    }

    /// The elements of an i32 tensor, `None` for an f32 one.
    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            CpuData::I32(v) => Some(v),
            CpuData::F32(_) => None,
        }
    }

    fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.data {
            CpuData::F32(v) => Some(v),
            CpuData::I32(_) => None,
        }
    }
}

impl fmt::Debug for CpuTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuTensor({:?}, {})", self.shape, self.dtype())
    }
}

impl TensorLike for CpuTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// One DSBN layer's `[D, C]` f32 tables.
#[derive(Clone, Debug)]
pub struct CpuBn {
    /// Scale γ per (dataset, channel).
    pub gamma: CpuTensor,
    /// Shift β per (dataset, channel).
    pub beta: CpuTensor,
    /// Running mean per (dataset, channel).
    pub running_mean: CpuTensor,
    /// Running (unbiased) variance per (dataset, channel).
    pub running_var: CpuTensor,
}

impl BnTables<CpuTensor> for CpuBn {
    fn tables(&self) -> [&CpuTensor; 4] {
        [&self.gamma, &self.beta, &self.running_mean, &self.running_var]
    }

    fn tables_mut(&mut self) -> [&mut CpuTensor; 4] {
        [&mut self.gamma, &mut self.beta, &mut self.running_mean, &mut self.running_var]
    }
}

/// What a DSBN training forward saves: batch mean and `1/sqrt(var + eps)` per (dataset,
/// channel), `[D, C]` f32, zero for the datasets absent from the batch.
#[derive(Clone, Debug)]
pub struct CpuBnSaved {
    /// Batch mean.
    pub mean: CpuTensor,
    /// Inverse standard deviation (biased variance).
    pub invstd: CpuTensor,
}

// ---- argument checks (the ops' error variants and names) ----------------------------------------

/// The elements of an f32 tensor, or `DTypeMismatch`.
fn f32_of<'a>(what: &'static str, t: &'a CpuTensor) -> Result<&'a [f32]> {
    t.as_f32().ok_or(Error::DTypeMismatch { what, expected: DType::F32, got: t.dtype() })
}

/// The elements of an f32 tensor, or `UnsupportedDType` (an op input that has no i32 kernel).
fn float_of<'a>(what: &'static str, t: &'a CpuTensor) -> Result<&'a [f32]> {
    t.as_f32().ok_or(Error::UnsupportedDType { what, dtype: t.dtype() })
}

fn i32_of<'a>(what: &'static str, t: &'a CpuTensor) -> Result<&'a [i32]> {
    t.as_i32().ok_or(Error::DTypeMismatch { what, expected: DType::I32, got: t.dtype() })
}

fn same_dtype(what: &'static str, t: &CpuTensor, expected: DType) -> Result<()> {
    if t.dtype() == expected {
        Ok(())
    } else {
        Err(Error::DTypeMismatch { what, expected, got: t.dtype() })
    }
}

fn shape_is(what: &'static str, t: &CpuTensor, expected: &[usize]) -> Result<()> {
    if t.shape() == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { what, expected: expected.to_vec(), got: t.shape().to_vec() })
    }
}

/// A 4-D NHWC tensor with every dimension in 1..=i32::MAX (as `ops::check::nhwc`).
fn nhwc(what: &'static str, t: &CpuTensor) -> Result<[usize; 4]> {
    check::nhwc_dims(what, t.shape())
}

/// Every index in `0..num_datasets`, else the first bad one (before anything is written).
fn dataset_indices(datasets: &[i32], num_datasets: usize) -> Result<Vec<usize>> {
    datasets
        .iter()
        .enumerate()
        .map(|(sample, &index)| {
            if index >= 0 && (index as usize) < num_datasets {
                Ok(index as usize)
            } else {
                Err(Error::DatasetIndexOutOfRange { sample, index: index as i64, num_datasets })
            }
        })
        .collect()
}

/// PyTorch's ReLU: NaN passes through.
fn relu(v: f64) -> f64 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

fn relu32(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

// ---- work splitting -----------------------------------------------------------------------------

/// Pixels per partial sum of the per-channel reductions: partials are per (sample, chunk of
/// this many pixels), merged in (sample, chunk) order.
const PIXEL_CHUNK: usize = 2048;

/// `f` over every (sample, pixel range) chunk of an `n × hw` batch, in parallel; the results in
/// (sample, chunk) order.
fn per_pixel_chunk<T: Send>(
    n: usize,
    hw: usize,
    f: impl Fn(usize, Range<usize>) -> T + Sync + Send,
) -> Vec<(usize, T)> {
    let chunks = hw.div_ceil(PIXEL_CHUNK);
    (0..n * chunks)
        .into_par_iter()
        .map(|i| {
            let (sample, j) = (i / chunks, i % chunks);
            let range = j * PIXEL_CHUNK..((j + 1) * PIXEL_CHUNK).min(hw);
            (sample, f(sample, range))
        })
        .collect()
}

// ---- GEMM ---------------------------------------------------------------------------------------

/// A strided f32 matrix view: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose of the row-major `rows × cols` matrix in `data`.
    fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows: cols, cols: rows, rs: 1, cs: cols }
    }

    fn view(self) -> ArrayView2<'a, f32> {
        ArrayView2::from_shape((self.rows, self.cols).strides((self.rs, self.cs)), self.data)
            .expect("a GEMM operand lies inside its slice by construction")
    }
}

/// `c = a · b` with `c` row-major `a.rows × b.cols`, f32 products and sums (matrixmultiply).
fn gemm(a: Mat<'_>, b: Mat<'_>, c: &mut [f32]) {
    let c = ArrayViewMut2::from_shape((a.rows, b.cols), c).expect("GEMM output sized by its caller");
    let mut c = c;
    general_mat_mul(1.0, &a.view(), &b.view(), 0.0, &mut c);
}

// ---- convolution geometry -----------------------------------------------------------------------

/// The sizes of one convolution.
#[derive(Clone, Copy)]
struct Conv {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    r: usize,
    s: usize,
    p: usize,
    q: usize,
    g: ConvGeometry,
}

impl Conv {
    /// As `ops::conv::params`: the output size and the 32-bit limits of the kernels.
    #[allow(clippy::too_many_arguments)]
    fn new(n: usize, h: usize, w: usize, c: usize, k: usize, r: usize, s: usize, g: &ConvGeometry) -> Result<Self> {
        let (p, q) = g.output_size(h, w, r, s)?;
        let fits = |v: usize| v <= i32::MAX as usize;
        let all = [g.stride.0, g.stride.1, g.padding.0, g.padding.1, g.dilation.0, g.dilation.1];
        if !all.iter().copied().all(fits) || r * s * c > i32::MAX as usize || r * s * k > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!("convolution too large for 32-bit indexing: {g:?}")));
        }
        // The largest buffers: the output (N·P·Q·K) and the data gradient's dcol (P·Q·R·S·C).
        numel_of(&[n, p, q, r * s * c.max(k)])?;
        Ok(Conv { n, h, w, c, r, s, p, q, g: *g })
    }

    /// Columns of the im2col matrix: R·S·C.
    fn kdim(&self) -> usize {
        self.r * self.s * self.c
    }

    /// Rows of the im2col matrix: N·P·Q.
    fn m(&self) -> usize {
        self.n * self.p * self.q
    }

    /// A 1×1 filter with stride 1 and no padding: the input is its own im2col matrix.
    fn pointwise(&self) -> bool {
        self.r == 1 && self.s == 1 && self.g.stride == (1, 1) && self.g.padding == (0, 0)
    }

    /// Input row (or column) read by output position `o` with tap `t`, if inside the image.
    fn source(o: usize, t: usize, stride: usize, pad: usize, dil: usize, len: usize) -> Option<usize> {
        let pos = (o * stride + t * dil).checked_sub(pad)?;
        (pos < len).then_some(pos)
    }

    /// Writes im2col rows `row0 ..` (as many as `col` holds) of `x`: each row the R·S·C input
    /// values output pixel (n, p, q) reads, zeros for taps in the padding.
    fn im2col(&self, x: &[f32], row0: usize, col: &mut [f32]) {
        let (c, kdim, pq) = (self.c, self.kdim(), self.p * self.q);
        let g = &self.g;
        for (i, row) in col.chunks_exact_mut(kdim).enumerate() {
            let m = row0 + i;
            let (ni, rem) = (m / pq, m % pq);
            let (pi, qi) = (rem / self.q, rem % self.q);
            let plane = &x[ni * self.h * self.w * c..(ni + 1) * self.h * self.w * c];
            for (ri, taps) in row.chunks_exact_mut(self.s * c).enumerate() {
                let Some(hi) = Conv::source(pi, ri, g.stride.0, g.padding.0, g.dilation.0, self.h) else {
                    taps.fill(0.0);
                    continue;
                };
                for (si, dst) in taps.chunks_exact_mut(c).enumerate() {
                    match Conv::source(qi, si, g.stride.1, g.padding.1, g.dilation.1, self.w) {
                        Some(wi) => dst.copy_from_slice(&plane[(hi * self.w + wi) * c..(hi * self.w + wi + 1) * c]),
                        None => dst.fill(0.0),
                    }
                }
            }
        }
    }

    /// Output positions `o` and taps `t` with `o·stride + t·dil − pad = i`, `o < out`.
    fn sources_of(i: usize, taps: usize, stride: usize, pad: usize, dil: usize, out: usize) -> Vec<(usize, usize)> {
        (0..taps)
            .filter_map(|t| {
                let v = (i + pad).checked_sub(t * dil)?;
                (v % stride == 0 && v / stride < out).then_some((v / stride, t))
            })
            .collect()
    }
}

/// Rows of one im2col tile: about 1 MiB of f32, at least 32 rows, at most 512. A function of
/// the shapes only, so the work split never depends on the thread count.
fn tile_rows(kdim: usize, budget: usize) -> usize {
    (budget / kdim.max(1)).clamp(32, 512)
}

fn filter_shape(w: &CpuTensor) -> Result<[usize; 4]> {
    let s = w.shape();
    if s.len() != 4 || s.contains(&0) || s.iter().any(|&d| d > i32::MAX as usize) {
        return Err(Error::InvalidShape {
            what: "convolution weight",
            shape: s.to_vec(),
            reason: "expected 4 dimensions KRSC, each at least 1".into(),
        });
    }
    Ok([s[0], s[1], s[2], s[3]])
}

// ---- DSBN ---------------------------------------------------------------------------------------

/// Validated sizes of one DSBN call.
struct BnDims {
    n: usize,
    hw: usize,
    c: usize,
    d: usize,
}

/// As `ops::dsbn::check_common`.
fn check_bn(x: &CpuTensor, datasets: &CpuTensor, bn: &CpuBn, opts: &DsbnOptions) -> Result<BnDims> {
    let [n, h, w, c] = nhwc("DSBN input", x)?;
    float_of("DSBN input", x)?;
    i32_of("dataset indices", datasets)?;
    shape_is("dataset indices", datasets, &[n])?;
    let gs = bn.gamma.shape();
    let d = gs.first().copied().unwrap_or(0);
    if gs.len() != 2 || d == 0 {
        return Err(Error::InvalidShape {
            what: "DSBN gamma",
            shape: gs.to_vec(),
            reason: "expected [num_datasets, channels]".into(),
        });
    }
    for (what, t) in [
        ("DSBN gamma", &bn.gamma),
        ("DSBN beta", &bn.beta),
        ("DSBN running_mean", &bn.running_mean),
        ("DSBN running_var", &bn.running_var),
    ] {
        same_dtype(what, t, DType::F32)?;
        shape_is(what, t, &[d, c])?;
    }
    finite_positive("eps", opts.eps)?;
    if !(opts.momentum.is_finite() && (0.0..=1.0).contains(&opts.momentum)) {
        return Err(Error::InvalidArgument(format!("momentum must be in [0, 1], got {}", opts.momentum)));
    }
    Ok(BnDims { n, hw: h * w, c, d })
}

fn check_residual<'a>(residual: Option<&'a CpuTensor>, x: &CpuTensor) -> Result<Option<&'a [f32]>> {
    residual
        .map(|r| {
            let v = f32_of("DSBN residual", r)?;
            shape_is("DSBN residual", r, x.shape())?;
            Ok(v)
        })
        .transpose()
}

/// The normalised-and-affine value, the one expression the forward output and the backward's
/// ReLU mask both use (so they agree bit for bit): `(x − mean)·invstd·γ + β` in f64.
fn affine(x: f32, mean: f32, invstd: f64, gamma: f32, beta: f32) -> f64 {
    (x as f64 - mean as f64) * invstd * gamma as f64 + beta as f64
}

/// `relu?(affine(..) + residual)` of every element, or the mask-carrying pre-activation.
#[allow(clippy::too_many_arguments)]
fn bn_apply(
    x: &[f32],
    residual: Option<&[f32]>,
    ds: &[usize],
    g: &BnDims,
    mean: &[f32],
    invstd: &[f64],
    gamma: &[f32],
    beta: &[f32],
    relu_on: bool,
) -> Vec<f32> {
    let (hw, c) = (g.hw, g.c);
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(c).enumerate().for_each(|(pix, out)| {
        let d = ds[pix / hw];
        let base = pix * c;
        for ci in 0..c {
            let s = d * c + ci;
            let mut v = affine(x[base + ci], mean[s], invstd[s], gamma[s], beta[s]);
            if let Some(r) = residual {
                v += r[base + ci] as f64;
            }
            out[ci] = (if relu_on { relu(v) } else { v }) as f32;
        }
    });
    y
}

// ---- the backend --------------------------------------------------------------------------------

/// The host backend: plain Rust, rayon across cores, f32 storage with f64 reductions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuBackend;

impl CpuBackend {
    /// The backend (it holds no state: threads come from rayon's current pool).
    pub fn new() -> Self {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Bn = CpuBn;
    type BnSaved = CpuBnSaved;

    fn name(&self) -> String {
        "cpu".into()
    }

    // ---- tensors --------------------------------------------------------------------------------

    fn tensor_f32(&self, shape: &[usize], data: &[f32]) -> Result<CpuTensor> {
        CpuTensor::from_f32(shape, data.to_vec())
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
            what: "tensor read-back",
            expected: t.dtype(),
            got: DType::F32,
        })
    }

    fn to_i32(&self, t: &CpuTensor) -> Result<Vec<i32>> {
        t.as_i32().map(<[i32]>::to_vec).ok_or(Error::DTypeMismatch {
            what: "tensor read-back",
            expected: t.dtype(),
            got: DType::I32,
        })
    }

    fn write_f32(&self, t: &mut CpuTensor, data: &[f32]) -> Result<()> {
        let (shape, dtype) = (t.shape.clone(), t.dtype());
        let dst =
            t.as_f32_mut().ok_or(Error::DTypeMismatch { what: "tensor write", expected: dtype, got: DType::F32 })?;
        if dst.len() != data.len() {
            return Err(Error::ShapeMismatch { what: "tensor write", expected: shape, got: vec![data.len()] });
        }
        dst.copy_from_slice(data);
        Ok(())
    }

    fn try_clone(&self, t: &CpuTensor) -> Result<CpuTensor> {
        Ok(t.clone())
    }

    // ---- element-wise ---------------------------------------------------------------------------

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        let av = float_of("residual add input", a)?;
        let bv = f32_of("residual add second input", b)?;
        shape_is("residual add second input", b, a.shape())?;
        let y = av.par_iter().zip(bv.par_iter()).map(|(x, y)| x + y).collect();
        Ok(CpuTensor::f32_unchecked(a.shape.clone(), y))
    }

    fn relu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let xv = float_of("ReLU input", x)?;
        Ok(CpuTensor::f32_unchecked(x.shape.clone(), xv.par_iter().map(|&v| relu32(v)).collect()))
    }

    fn relu_backward(&self, dy: &CpuTensor, y: &CpuTensor) -> Result<CpuTensor> {
        let g = float_of("ReLU output gradient", dy)?;
        let yv = f32_of("ReLU forward output", y)?;
        shape_is("ReLU forward output", y, dy.shape())?;
        let dx = g.par_iter().zip(yv.par_iter()).map(|(&g, &o)| if o > 0.0 || o.is_nan() { g } else { 0.0 }).collect();
        Ok(CpuTensor::f32_unchecked(dy.shape.clone(), dx))
    }

    // ---- convolution ----------------------------------------------------------------------------

    fn conv2d(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        geometry: &ConvGeometry,
    ) -> Result<CpuTensor> {
        let [n, h, wd, c] = nhwc("convolution input", x)?;
        let [k, r, s, wc] = filter_shape(w)?;
        let xv = float_of("convolution input", x)?;
        let wv = f32_of("convolution weight", w)?;
        if wc != c {
            return Err(Error::ShapeMismatch {
                what: "convolution weight",
                expected: vec![k, r, s, c],
                got: w.shape().to_vec(),
            });
        }
        let bv = match bias {
            Some(b) => {
                let v = f32_of("convolution bias", b)?;
                shape_is("convolution bias", b, &[k])?;
                Some(v)
            }
            None => None,
        };
        let cv = Conv::new(n, h, wd, c, k, r, s, geometry)?;
        let kdim = cv.kdim();
        let rows = tile_rows(kdim, 1 << 18);
        let mut y = vec![0.0f32; cv.m() * k];
        let wt = Mat::transposed(wv, k, kdim);
        y.par_chunks_mut(rows * k).enumerate().for_each_init(Vec::new, |col, (t, out)| {
            let (row0, nrows) = (t * rows, out.len() / k);
            let a = if cv.pointwise() {
                Mat::row_major(&xv[row0 * kdim..(row0 + nrows) * kdim], nrows, kdim)
            } else {
                col.resize(nrows * kdim, 0.0);
                cv.im2col(xv, row0, &mut col[..nrows * kdim]);
                Mat::row_major(&col[..nrows * kdim], nrows, kdim)
            };
            gemm(a, wt, out);
            if let Some(b) = bv {
                for row in out.chunks_exact_mut(k) {
                    row.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
                }
            }
        });
        Ok(CpuTensor::f32_unchecked(vec![n, cv.p, cv.q, k], y))
    }

    fn conv2d_backward_data(
        &self,
        dy: &CpuTensor,
        w: &CpuTensor,
        input_hw: (usize, usize),
        geometry: &ConvGeometry,
    ) -> Result<CpuTensor> {
        let [n, p_out, q_out, k] = nhwc("convolution output gradient", dy)?;
        let [wk, r, s, c] = filter_shape(w)?;
        let dyv = float_of("convolution output gradient", dy)?;
        let wv = f32_of("convolution weight", w)?;
        if wk != k {
            return Err(Error::ShapeMismatch {
                what: "convolution weight",
                expected: vec![k, r, s, c],
                got: w.shape().to_vec(),
            });
        }
        let (h, wd) = input_hw;
        if h == 0 || wd == 0 {
            return Err(Error::InvalidShape {
                what: "convolution input size",
                shape: vec![h, wd],
                reason: "must be at least 1x1".into(),
            });
        }
        let cv = Conv::new(n, h, wd, c, k, r, s, geometry)?;
        if (cv.p, cv.q) != (p_out, q_out) {
            return Err(Error::ShapeMismatch {
                what: "convolution output gradient",
                expected: vec![n, cv.p, cv.q, k],
                got: dy.shape().to_vec(),
            });
        }
        let kdim = cv.kdim();
        let wm = Mat::row_major(wv, k, kdim);
        let mut dx = vec![0.0f32; n * h * wd * c];
        if cv.pointwise() {
            // dx rows are dcol rows: dx = dy · W, tile by tile.
            let rows = tile_rows(kdim, 1 << 18);
            dx.par_chunks_mut(rows * c).enumerate().for_each(|(t, out)| {
                let nrows = out.len() / c;
                gemm(Mat::row_major(&dyv[t * rows * k..(t * rows + nrows) * k], nrows, k), wm, out);
            });
            return Ok(CpuTensor::f32_unchecked(vec![n, h, wd, c], dx));
        }
        // Per sample: dcol = dy_n · W (tiles in parallel), then every input pixel gathers its
        // taps from dcol in (r, s) order (rows of the image in parallel).
        let pq = cv.p * cv.q;
        let rows = tile_rows(kdim, 1 << 18);
        let g = cv.g;
        let hsrc: Vec<Vec<(usize, usize)>> =
            (0..h).map(|hi| Conv::sources_of(hi, r, g.stride.0, g.padding.0, g.dilation.0, cv.p)).collect();
        let wsrc: Vec<Vec<(usize, usize)>> =
            (0..wd).map(|wi| Conv::sources_of(wi, s, g.stride.1, g.padding.1, g.dilation.1, cv.q)).collect();
        let mut dcol = vec![0.0f32; pq * kdim];
        for (ni, dx_n) in dx.chunks_exact_mut(h * wd * c).enumerate() {
            let dy_n = &dyv[ni * pq * k..(ni + 1) * pq * k];
            dcol.par_chunks_mut(rows * kdim).enumerate().for_each(|(t, out)| {
                let nrows = out.len() / kdim;
                gemm(Mat::row_major(&dy_n[t * rows * k..(t * rows + nrows) * k], nrows, k), wm, out);
            });
            dx_n.par_chunks_mut(wd * c).enumerate().for_each(|(hi, row)| {
                for (wi, px) in row.chunks_exact_mut(c).enumerate() {
                    for &(pi, ri) in &hsrc[hi] {
                        for &(qi, si) in &wsrc[wi] {
                            let at = (pi * cv.q + qi) * kdim + (ri * s + si) * c;
                            px.iter_mut().zip(&dcol[at..at + c]).for_each(|(o, &v)| *o += v);
                        }
                    }
                }
            });
        }
        Ok(CpuTensor::f32_unchecked(vec![n, h, wd, c], dx))
    }

    fn conv2d_backward_filter(
        &self,
        dy: &CpuTensor,
        x: &CpuTensor,
        filter_krs: (usize, usize, usize),
        with_bias: bool,
        geometry: &ConvGeometry,
    ) -> Result<(CpuTensor, Option<CpuTensor>)> {
        let [n, h, wd, c] = nhwc("convolution input", x)?;
        let [dn, p_out, q_out, k] = nhwc("convolution output gradient", dy)?;
        let xv = float_of("convolution input", x)?;
        let dyv = f32_of("convolution output gradient", dy)?;
        let (fk, r, s) = filter_krs;
        if fk != k || r == 0 || s == 0 {
            return Err(Error::ShapeMismatch {
                what: "convolution filter",
                expected: vec![k, r.max(1), s.max(1), c],
                got: vec![fk, r, s, c],
            });
        }
        let cv = Conv::new(n, h, wd, c, k, r, s, geometry)?;
        if (dn, p_out, q_out) != (n, cv.p, cv.q) {
            return Err(Error::ShapeMismatch {
                what: "convolution output gradient",
                expected: vec![n, cv.p, cv.q, k],
                got: dy.shape().to_vec(),
            });
        }
        let (kdim, m) = (cv.kdim(), cv.m());
        // dWᵀ [kdim, K] = colᵀ · dy, over tiles of output pixels in order; within a tile the
        // kdim rows are split in fixed blocks, each owning its rows of the f64 sum.
        let rows = tile_rows(kdim, 1 << 21);
        const JB: usize = 64;
        let mut acc = vec![0.0f64; kdim * k];
        let mut col = if cv.pointwise() { Vec::new() } else { vec![0.0f32; rows * kdim] };
        for row0 in (0..m).step_by(rows) {
            let nrows = rows.min(m - row0);
            let col_t: &[f32] = if cv.pointwise() {
                &xv[row0 * kdim..(row0 + nrows) * kdim]
            } else {
                let buf = &mut col[..nrows * kdim];
                buf.par_chunks_mut(16 * kdim).enumerate().for_each(|(i, part)| cv.im2col(xv, row0 + 16 * i, part));
                buf
            };
            let dy_t = Mat::row_major(&dyv[row0 * k..(row0 + nrows) * k], nrows, k);
            acc.par_chunks_mut(JB * k).enumerate().for_each_init(Vec::new, |part, (jb, acc)| {
                let (j0, jn) = (jb * JB, acc.len() / k);
                part.resize(jn * k, 0.0);
                // Columns j0 .. j0 + jn of the tile, transposed: jn × nrows, strides (1, kdim).
                let a = Mat { data: &col_t[j0..], rows: jn, cols: nrows, rs: 1, cs: kdim };
                gemm(a, dy_t, &mut part[..jn * k]);
                acc.iter_mut().zip(part.iter()).for_each(|(s, &v)| *s += v as f64);
            });
        }
        let mut dw = vec![0.0f32; k * kdim];
        dw.par_chunks_mut(kdim).enumerate().for_each(|(ki, row)| {
            row.iter_mut().enumerate().for_each(|(j, o)| *o = acc[j * k + ki] as f32);
        });
        let dw = CpuTensor::f32_unchecked(vec![k, r, s, c], dw);
        let db = with_bias.then(|| {
            let pq = cv.p * cv.q;
            let parts: Vec<Vec<f64>> = (0..n)
                .into_par_iter()
                .map(|ni| {
                    let mut sum = vec![0.0f64; k];
                    for row in dyv[ni * pq * k..(ni + 1) * pq * k].chunks_exact(k) {
                        sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
                    }
                    sum
                })
                .collect();
            let mut total = vec![0.0f64; k];
            for part in &parts {
                total.iter_mut().zip(part).for_each(|(t, &v)| *t += v);
            }
            CpuTensor::f32_unchecked(vec![k], total.into_iter().map(|v| v as f32).collect())
        });
        Ok((dw, db))
    }

    // ---- DSBN -----------------------------------------------------------------------------------

    fn bn_new(&self, num_datasets: usize, channels: usize) -> Result<CpuBn> {
        if num_datasets == 0 || channels == 0 || num_datasets.saturating_mul(channels) > i32::MAX as usize {
            return Err(Error::InvalidShape {
                what: "DSBN state",
                shape: vec![num_datasets, channels],
                reason: "needs at least one dataset and one channel, and D*C < 2^31".into(),
            });
        }
        let (shape, len) = (vec![num_datasets, channels], num_datasets * channels);
        Ok(CpuBn {
            gamma: CpuTensor::f32_unchecked(shape.clone(), vec![1.0; len]),
            beta: CpuTensor::f32_unchecked(shape.clone(), vec![0.0; len]),
            running_mean: CpuTensor::f32_unchecked(shape.clone(), vec![0.0; len]),
            running_var: CpuTensor::f32_unchecked(shape, vec![1.0; len]),
        })
    }

    /// Statistics in f64 in two passes (mean, then the sum of squared deviations), from
    /// per-(sample, pixel chunk) partials merged in order. The output normalises with the saved
    /// f32 mean and the f32 invstd, exactly what the backward sees.
    fn dsbn_forward_train(
        &self,
        x: &CpuTensor,
        datasets: &CpuTensor,
        bn: &mut CpuBn,
        opts: &DsbnOptions,
        residual: Option<&CpuTensor>,
    ) -> Result<(CpuTensor, CpuBnSaved)> {
        let g = check_bn(x, datasets, bn, opts)?;
        let res = check_residual(residual, x)?;
        let ds = dataset_indices(i32_of("dataset indices", datasets)?, g.d)?;
        let (hw, c, d) = (g.hw, g.c, g.d);
        let mut samples = vec![0usize; d];
        ds.iter().for_each(|&di| samples[di] += 1);
        let counts: Vec<usize> = samples.iter().map(|&s| s * hw).collect();
        if let Some(di) = (0..d).find(|&di| samples[di] > 0 && counts[di] < 2) {
            return Err(Error::TooFewValues { dataset: di, count: counts[di] });
        }
        let xv = float_of("DSBN input", x)?;

        let channel_sums = |center: Option<&[f64]>| {
            let parts = per_pixel_chunk(g.n, hw, |ni, pix| {
                let mut sum = vec![0.0f64; c];
                let off = ds[ni] * c;
                for px in xv[(ni * hw + pix.start) * c..(ni * hw + pix.end) * c].chunks_exact(c) {
                    match center {
                        None => sum.iter_mut().zip(px).for_each(|(s, &v)| *s += v as f64),
                        Some(mu) => sum.iter_mut().zip(px).zip(&mu[off..off + c]).for_each(|((s, &v), &m)| {
                            let dev = v as f64 - m;
                            *s += dev * dev;
                        }),
                    }
                }
                sum
            });
            let mut total = vec![0.0f64; d * c];
            for (ni, part) in &parts {
                let off = ds[*ni] * c;
                total[off..off + c].iter_mut().zip(part).for_each(|(t, &v)| *t += v);
            }
            total
        };
        let per_count = |v: Vec<f64>| -> Vec<f64> {
            v.iter().enumerate().map(|(i, &s)| if counts[i / c] > 0 { s / counts[i / c] as f64 } else { 0.0 }).collect()
        };
        let mean = per_count(channel_sums(None));
        let var = per_count(channel_sums(Some(&mean)));

        let eps = opts.eps as f64;
        let present = |i: usize| counts[i / c] > 0;
        let mean32: Vec<f32> = (0..d * c).map(|i| if present(i) { mean[i] as f32 } else { 0.0 }).collect();
        let invstd32: Vec<f32> =
            (0..d * c).map(|i| if present(i) { (1.0 / (var[i] + eps).sqrt()) as f32 } else { 0.0 }).collect();
        let invstd: Vec<f64> = invstd32.iter().map(|&v| v as f64).collect();
        let gamma = f32_of("DSBN gamma", &bn.gamma)?;
        let beta = f32_of("DSBN beta", &bn.beta)?;
        let y = bn_apply(xv, res, &ds, &g, &mean32, &invstd, gamma, beta, opts.relu);

        // Nothing can fail from here on: move the running statistics of the datasets present.
        let mom = opts.momentum as f64;
        let rm = bn.running_mean.as_f32_mut().ok_or(Error::InvalidArgument("running mean is not f32".into()))?;
        for i in (0..d * c).filter(|&i| present(i)) {
            rm[i] = ((1.0 - mom) * rm[i] as f64 + mom * mean[i]) as f32;
        }
        let rv = bn.running_var.as_f32_mut().ok_or(Error::InvalidArgument("running var is not f32".into()))?;
        for i in (0..d * c).filter(|&i| present(i)) {
            let m = counts[i / c] as f64;
            rv[i] = ((1.0 - mom) * rv[i] as f64 + mom * var[i] * m / (m - 1.0)) as f32;
        }
        let saved = CpuBnSaved {
            mean: CpuTensor::f32_unchecked(vec![d, c], mean32),
            invstd: CpuTensor::f32_unchecked(vec![d, c], invstd32),
        };
        Ok((CpuTensor::f32_unchecked(x.shape.clone(), y), saved))
    }

    fn dsbn_forward_infer(
        &self,
        x: &CpuTensor,
        datasets: &CpuTensor,
        bn: &CpuBn,
        opts: &DsbnOptions,
        residual: Option<&CpuTensor>,
    ) -> Result<CpuTensor> {
        let g = check_bn(x, datasets, bn, opts)?;
        let res = check_residual(residual, x)?;
        let ds = dataset_indices(i32_of("dataset indices", datasets)?, g.d)?;
        let xv = float_of("DSBN input", x)?;
        let rm = f32_of("DSBN running_mean", &bn.running_mean)?;
        let rv = f32_of("DSBN running_var", &bn.running_var)?;
        let invstd: Vec<f64> = rv.iter().map(|&v| 1.0 / (v as f64 + opts.eps as f64).sqrt()).collect();
        let gamma = f32_of("DSBN gamma", &bn.gamma)?;
        let beta = f32_of("DSBN beta", &bn.beta)?;
        let y = bn_apply(xv, res, &ds, &g, rm, &invstd, gamma, beta, opts.relu);
        Ok(CpuTensor::f32_unchecked(x.shape.clone(), y))
    }

    /// `g = dy` behind the ReLU mask of `affine(x) + residual > 0` (recomputed with the forward's
    /// expression); `dβ = Σg`, `dγ = Σg·x̂` per (dataset, channel) in f64 from ordered
    /// partials; `dx = γ·invstd·(g − dβ/M − x̂·dγ/M)`; `dresidual = g`.
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
        let g = check_bn(x, datasets, bn, opts)?;
        let dyv = f32_of("DSBN output gradient", dy)?;
        shape_is("DSBN output gradient", dy, x.shape())?;
        for (what, t) in [("DSBN saved mean", &saved.mean), ("DSBN saved invstd", &saved.invstd)] {
            same_dtype(what, t, DType::F32)?;
            shape_is(what, t, &[g.d, g.c])?;
        }
        let res = check_residual(residual, x)?;
        let ds = dataset_indices(i32_of("dataset indices", datasets)?, g.d)?;
        let (hw, c, d) = (g.hw, g.c, g.d);
        let xv = float_of("DSBN input", x)?;
        let mean = f32_of("DSBN saved mean", &saved.mean)?;
        let invstd: Vec<f64> = f32_of("DSBN saved invstd", &saved.invstd)?.iter().map(|&v| v as f64).collect();
        let gamma = f32_of("DSBN gamma", &bn.gamma)?;
        let beta = f32_of("DSBN beta", &bn.beta)?;
        let masked = |e: usize, s: usize| -> f64 {
            let gv = dyv[e] as f64;
            if !opts.relu {
                return gv;
            }
            let mut v = affine(xv[e], mean[s], invstd[s], gamma[s], beta[s]);
            if let Some(r) = res {
                v += r[e] as f64;
            }
            if v > 0.0 {
                gv
            } else {
                0.0
            }
        };
        let xhat = |e: usize, s: usize| (xv[e] as f64 - mean[s] as f64) * invstd[s];

        let parts = per_pixel_chunk(g.n, hw, |ni, pix| {
            let mut sums = vec![0.0f64; 2 * c];
            let off = ds[ni] * c;
            for p in pix {
                let e0 = (ni * hw + p) * c;
                for ci in 0..c {
                    let gv = masked(e0 + ci, off + ci);
                    sums[ci] += gv;
                    sums[c + ci] += gv * xhat(e0 + ci, off + ci);
                }
            }
            sums
        });
        let mut dbeta = vec![0.0f64; d * c];
        let mut dgamma = vec![0.0f64; d * c];
        for (ni, part) in &parts {
            let off = ds[*ni] * c;
            for ci in 0..c {
                dbeta[off + ci] += part[ci];
                dgamma[off + ci] += part[c + ci];
            }
        }
        let mut samples = vec![0usize; d];
        ds.iter().for_each(|&di| samples[di] += 1);

        let mut dx = vec![0.0f32; xv.len()];
        let mut dres = res.map(|_| vec![0.0f32; xv.len()]);
        let write = |pix: usize, out: &mut [f32], dr: Option<&mut [f32]>| {
            let di = ds[pix / hw];
            let m = (samples[di] * hw) as f64;
            let mut dr = dr;
            for ci in 0..c {
                let (e, s) = (pix * c + ci, di * c + ci);
                let gv = masked(e, s);
                if let Some(dr) = dr.as_deref_mut() {
                    dr[ci] = gv as f32;
                }
                let k = gamma[s] as f64 * invstd[s];
                out[ci] = (k * (gv - dbeta[s] / m - xhat(e, s) * dgamma[s] / m)) as f32;
            }
        };
        match dres.as_mut() {
            Some(dr) => dx
                .par_chunks_mut(c)
                .zip(dr.par_chunks_mut(c))
                .enumerate()
                .for_each(|(pix, (out, dr))| write(pix, out, Some(dr))),
            None => dx.par_chunks_mut(c).enumerate().for_each(|(pix, out)| write(pix, out, None)),
        }
        let table = |v: Vec<f64>| CpuTensor::f32_unchecked(vec![d, c], v.into_iter().map(|x| x as f32).collect());
        Ok(BnGrads {
            dx: CpuTensor::f32_unchecked(x.shape.clone(), dx),
            dgamma: table(dgamma),
            dbeta: table(dbeta),
            dresidual: dres.map(|v| CpuTensor::f32_unchecked(x.shape.clone(), v)),
        })
    }

    // ---- pooling, resizing, slices --------------------------------------------------------------

    fn max_pool2d(&self, x: &CpuTensor, geometry: &PoolGeometry) -> Result<(CpuTensor, CpuTensor)> {
        let [n, h, w, c] = nhwc("max pooling input", x)?;
        let xv = float_of("max pooling input", x)?;
        let (p, q) = geometry.output_size(h, w)?;
        if h.checked_mul(w).is_none_or(|hw| hw > i32::MAX as usize) {
            return Err(Error::InvalidShape {
                what: "max pooling input",
                shape: vec![n, h, w, c],
                reason: "H·W must fit the i32 indices".into(),
            });
        }
        // The in-image rows (columns) of every window: padding never takes part (PyTorch's −∞).
        let window = |o: usize, k: usize, stride: usize, pad: usize, len: usize| -> Vec<usize> {
            (0..k).filter_map(|t| (o * stride + t).checked_sub(pad)).filter(|&v| v < len).collect()
        };
        let g = *geometry;
        let hs: Vec<Vec<usize>> = (0..p).map(|pi| window(pi, g.kernel.0, g.stride.0, g.padding.0, h)).collect();
        let ws: Vec<Vec<usize>> = (0..q).map(|qi| window(qi, g.kernel.1, g.stride.1, g.padding.1, w)).collect();
        let mut y = vec![0.0f32; n * p * q * c];
        let mut idx = vec![0i32; n * p * q * c];
        y.par_chunks_mut(q * c).zip(idx.par_chunks_mut(q * c)).enumerate().for_each(|(row, (yr, ir))| {
            let (ni, pi) = (row / p, row % p);
            let plane = &xv[ni * h * w * c..(ni + 1) * h * w * c];
            for (qi, (yo, io)) in yr.chunks_exact_mut(c).zip(ir.chunks_exact_mut(c)).enumerate() {
                let mut first = true;
                for &hh in &hs[pi] {
                    for &ww in &ws[qi] {
                        let at = hh * w + ww;
                        let src = &plane[at * c..(at + 1) * c];
                        for ci in 0..c {
                            let (v, b) = (src[ci], yo[ci]);
                            // The first position starts the window; then NaN wins (a later NaN
                            // replaces an earlier one), otherwise only a strictly larger value.
                            if first || v.is_nan() || (!b.is_nan() && v > b) {
                                yo[ci] = v;
                                io[ci] = at as i32;
                            }
                        }
                        first = false;
                    }
                }
            }
        });
        let shape = vec![n, p, q, c];
        Ok((CpuTensor::f32_unchecked(shape.clone(), y), CpuTensor::i32_unchecked(shape, idx)))
    }

    /// Scatter of every output gradient to its argmax, in (p, q) order per sample (samples in
    /// parallel). An index outside its output's window sends its gradient nowhere, as the
    /// device kernel does.
    fn max_pool2d_backward(
        &self,
        dy: &CpuTensor,
        indices: &CpuTensor,
        input_hw: (usize, usize),
        geometry: &PoolGeometry,
    ) -> Result<CpuTensor> {
        let [n, p, q, c] = nhwc("max pooling output gradient", dy)?;
        let dyv = float_of("max pooling output gradient", dy)?;
        let iv = i32_of("max pooling indices", indices)?;
        shape_is("max pooling indices", indices, dy.shape())?;
        let (h, w) = input_hw;
        input_hw_check("max pooling input", n, input_hw, c)?;
        if h.checked_mul(w).is_none_or(|hw| hw > i32::MAX as usize) {
            return Err(Error::InvalidShape {
                what: "max pooling input",
                shape: vec![n, h, w, c],
                reason: "H·W must fit the i32 indices".into(),
            });
        }
        let (ep, eq) = geometry.output_size(h, w)?;
        if (ep, eq) != (p, q) {
            return Err(Error::ShapeMismatch {
                what: "max pooling output gradient",
                expected: vec![n, ep, eq, c],
                got: dy.shape().to_vec(),
            });
        }
        // The window of output (pp, qq) on one axis, in padded coordinates shifted back.
        let inside = |o: usize, at: usize, k: usize, s: usize, pad: usize| {
            let start = o * s;
            (start..start + k).contains(&(at + pad))
        };
        let g = geometry;
        let mut dx = vec![0.0f32; n * h * w * c];
        dx.par_chunks_mut(h * w * c).enumerate().for_each(|(ni, plane)| {
            let base = ni * p * q * c;
            for e in 0..p * q * c {
                let (at, ci, pix) = (iv[base + e], e % c, e / c);
                let Ok(at) = usize::try_from(at) else { continue };
                let (hh, ww) = (at / w, at % w);
                if hh < h
                    && inside(pix / q, hh, g.kernel.0, g.stride.0, g.padding.0)
                    && inside(pix % q, ww, g.kernel.1, g.stride.1, g.padding.1)
                {
                    plane[at * c + ci] += dyv[base + e];
                }
            }
        });
        Ok(CpuTensor::f32_unchecked(vec![n, h, w, c], dx))
    }

    fn adaptive_avg_pool(&self, x: &CpuTensor, out_h: usize, out_w: usize) -> Result<CpuTensor> {
        let [n, h, w, c] = nhwc("adaptive_avg_pool input", x)?;
        let xv = float_of("adaptive_avg_pool input", x)?;
        new_output_check("adaptive_avg_pool output", n, out_h, out_w, c)?;
        let hb: Vec<(usize, usize)> = (0..out_h).map(|i| pool_bin(i, h, out_h)).collect();
        let wb: Vec<(usize, usize)> = (0..out_w).map(|j| pool_bin(j, w, out_w)).collect();
        let mut y = vec![0.0f32; n * out_h * out_w * c];
        y.par_chunks_mut(out_w * c).enumerate().for_each(|(row, yr)| {
            let (ni, i) = (row / out_h, row % out_h);
            let (h0, h1) = hb[i];
            let mut sum = vec![0.0f64; c];
            for (j, yo) in yr.chunks_exact_mut(c).enumerate() {
                let (w0, w1) = wb[j];
                sum.fill(0.0);
                for hi in h0..h1 {
                    for wi in w0..w1 {
                        let at = ((ni * h + hi) * w + wi) * c;
                        sum.iter_mut().zip(&xv[at..at + c]).for_each(|(s, &v)| *s += v as f64);
                    }
                }
                let area = ((h1 - h0) * (w1 - w0)) as f64;
                yo.iter_mut().zip(&sum).for_each(|(o, &s)| *o = (s / area) as f32);
            }
        });
        Ok(CpuTensor::f32_unchecked(vec![n, out_h, out_w, c], y))
    }

    /// Gather form: every input pixel sums, in (bin row, bin column) order and in f64, the
    /// gradients of the bins that cover it divided by their areas.
    fn adaptive_avg_pool_backward(&self, dy: &CpuTensor, input_hw: (usize, usize)) -> Result<CpuTensor> {
        let [n, oh, ow, c] = nhwc("adaptive_avg_pool output gradient", dy)?;
        let dyv = float_of("adaptive_avg_pool output gradient", dy)?;
        input_hw_check("adaptive_avg_pool input gradient", n, input_hw, c)?;
        let (h, w) = input_hw;
        let area = |i: usize, j: usize| {
            let ((h0, h1), (w0, w1)) = (pool_bin(i, h, oh), pool_bin(j, w, ow));
            ((h1 - h0) * (w1 - w0)) as f64
        };
        let covers = |inp: usize, out: usize| -> Vec<Vec<usize>> {
            let mut v = vec![Vec::new(); inp];
            for o in 0..out {
                let (a, b) = pool_bin(o, inp, out);
                (a..b).for_each(|i| v[i].push(o));
            }
            v
        };
        let (hc, wc) = (covers(h, oh), covers(w, ow));
        let mut dx = vec![0.0f32; n * h * w * c];
        dx.par_chunks_mut(w * c).enumerate().for_each(|(row, xr)| {
            let (ni, hi) = (row / h, row % h);
            let mut sum = vec![0.0f64; c];
            for (wi, xo) in xr.chunks_exact_mut(c).enumerate() {
                sum.fill(0.0);
                for &i in &hc[hi] {
                    for &j in &wc[wi] {
                        let a = area(i, j);
                        let at = ((ni * oh + i) * ow + j) * c;
                        sum.iter_mut().zip(&dyv[at..at + c]).for_each(|(s, &g)| *s += g as f64 / a);
                    }
                }
                xo.iter_mut().zip(&sum).for_each(|(o, &s)| *o = s as f32);
            }
        });
        Ok(CpuTensor::f32_unchecked(vec![n, h, w, c], dx))
    }

    fn resize_bilinear(&self, x: &CpuTensor, out_h: usize, out_w: usize, align_corners: bool) -> Result<CpuTensor> {
        let [n, h, w, c] = nhwc("resize_bilinear input", x)?;
        let xv = float_of("resize_bilinear input", x)?;
        new_output_check("resize_bilinear output", n, out_h, out_w, c)?;
        resize_limit("resize_bilinear input", [n, h, w, c], out_h, out_w)?;
        let th: Vec<[(usize, f64); 2]> = (0..out_h).map(|i| bilinear_taps(i, h, out_h, align_corners)).collect();
        let tw: Vec<[(usize, f64); 2]> = (0..out_w).map(|j| bilinear_taps(j, w, out_w, align_corners)).collect();
        let mut y = vec![0.0f32; n * out_h * out_w * c];
        y.par_chunks_mut(out_w * c).enumerate().for_each(|(row, yr)| {
            let (ni, i) = (row / out_h, row % out_h);
            for (j, yo) in yr.chunks_exact_mut(c).enumerate() {
                for (ci, o) in yo.iter_mut().enumerate() {
                    let mut v = 0.0f64;
                    for &(hi, wh) in &th[i] {
                        for &(wi, ww) in &tw[j] {
                            v += wh * ww * xv[((ni * h + hi) * w + wi) * c + ci] as f64;
                        }
                    }
                    *o = v as f32;
                }
            }
        });
        Ok(CpuTensor::f32_unchecked(vec![n, out_h, out_w, c], y))
    }

    /// Gather form: every input pixel sums, in f64 and a fixed order, the output gradients of
    /// the taps that read it, times their weights.
    fn resize_bilinear_backward(
        &self,
        dy: &CpuTensor,
        input_hw: (usize, usize),
        align_corners: bool,
    ) -> Result<CpuTensor> {
        let [n, oh, ow, c] = nhwc("resize_bilinear output gradient", dy)?;
        let dyv = float_of("resize_bilinear output gradient", dy)?;
        input_hw_check("resize_bilinear input gradient", n, input_hw, c)?;
        let (h, w) = input_hw;
        resize_limit("resize_bilinear input gradient", [n, h, w, c], oh, ow)?;
        let readers = |inp: usize, out: usize| -> Vec<Vec<(usize, f64)>> {
            let mut v = vec![Vec::new(); inp];
            for o in 0..out {
                for (i, wgt) in bilinear_taps(o, inp, out, align_corners) {
                    v[i].push((o, wgt));
                }
            }
            v
        };
        let (hr, wr) = (readers(h, oh), readers(w, ow));
        let mut dx = vec![0.0f32; n * h * w * c];
        dx.par_chunks_mut(w * c).enumerate().for_each(|(row, xr)| {
            let (ni, hi) = (row / h, row % h);
            let mut sum = vec![0.0f64; c];
            for (wi, xo) in xr.chunks_exact_mut(c).enumerate() {
                sum.fill(0.0);
                for &(i, wh) in &hr[hi] {
                    for &(j, ww) in &wr[wi] {
                        let at = ((ni * oh + i) * ow + j) * c;
                        sum.iter_mut().zip(&dyv[at..at + c]).for_each(|(s, &g)| *s += wh * ww * g as f64);
                    }
                }
                xo.iter_mut().zip(&sum).for_each(|(o, &s)| *o = s as f32);
            }
        });
        Ok(CpuTensor::f32_unchecked(vec![n, h, w, c], dx))
    }

    fn concat_channels(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
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
            total = total.checked_add(tc).filter(|&t| t <= i32::MAX as usize).ok_or_else(|| {
                Error::InvalidArgument("channel concat: too many channels for 32-bit dimensions".into())
            })?;
        }
        let shape = vec![n, h, w, total];
        numel_of(&shape)?;
        fn gather<T: Copy + Default + Send + Sync>(
            parts: &[&[T]],
            widths: &[usize],
            total: usize,
            len: usize,
        ) -> Vec<T> {
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
        let widths: Vec<usize> = parts.iter().map(|t| t.shape[3]).collect();
        let len = n * h * w * total;
        Ok(match first.data {
            CpuData::F32(_) => {
                let v: Vec<&[f32]> = parts.iter().filter_map(|t| t.as_f32()).collect();
                CpuTensor::f32_unchecked(shape, gather(&v, &widths, total, len))
            }
            CpuData::I32(_) => {
                let v: Vec<&[i32]> = parts.iter().filter_map(|t| t.as_i32()).collect();
                CpuTensor::i32_unchecked(shape, gather(&v, &widths, total, len))
            }
        })
    }

    fn slice_channels(&self, x: &CpuTensor, offset: usize, len: usize) -> Result<CpuTensor> {
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
        Ok(match &x.data {
            CpuData::F32(v) => CpuTensor::f32_unchecked(shape, take(v, c, offset, len)),
            CpuData::I32(v) => CpuTensor::i32_unchecked(shape, take(v, c, offset, len)),
        })
    }

    fn slice_batch(&self, x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        let Some(&n) = x.shape.first() else {
            return Err(Error::InvalidShape {
                what: "batch slice input",
                shape: x.shape.clone(),
                reason: "needs at least one dimension".into(),
            });
        };
        if len == 0 || start.checked_add(len).is_none_or(|end| end > n) {
            return Err(Error::InvalidArgument(format!(
                "batch slice {start}..{} of a batch of {n} (it needs 1..={n} samples inside)",
                start.saturating_add(len)
            )));
        }
        let per: usize = x.shape[1..].iter().product();
        let mut shape = x.shape.clone();
        shape[0] = len;
        let range = start * per..(start + len) * per;
        Ok(match &x.data {
            CpuData::F32(v) => CpuTensor::f32_unchecked(shape, v[range].to_vec()),
            CpuData::I32(v) => CpuTensor::i32_unchecked(shape, v[range].to_vec()),
        })
    }

    fn concat_batch(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        let first = parts.first().ok_or_else(|| Error::InvalidArgument("concat_batch of no tensors".into()))?;
        if first.shape.is_empty() {
            return Err(Error::InvalidShape {
                what: "batch concat input",
                shape: vec![],
                reason: "needs at least one dimension".into(),
            });
        }
        let mut n = 0usize;
        for t in parts {
            same_dtype("batch concat input", t, first.dtype())?;
            if t.shape.len() != first.shape.len() || t.shape[1..] != first.shape[1..] {
                let mut expected = first.shape.clone();
                expected[0] = t.shape.first().copied().unwrap_or(0);
                return Err(Error::ShapeMismatch { what: "batch concat input", expected, got: t.shape.clone() });
            }
            n = n
                .checked_add(t.shape[0])
                .ok_or_else(|| Error::InvalidArgument("batch concat: too many samples".into()))?;
        }
        let mut shape = first.shape.clone();
        shape[0] = n;
        numel_of(&shape)?;
        Ok(match first.data {
            CpuData::F32(_) => {
                CpuTensor::f32_unchecked(shape, parts.iter().filter_map(|t| t.as_f32()).flatten().copied().collect())
            }
            CpuData::I32(_) => {
                CpuTensor::i32_unchecked(shape, parts.iter().filter_map(|t| t.as_i32()).flatten().copied().collect())
            }
        })
    }

    // ---- regularisation, loss, metrics, optimiser -----------------------------------------------

    fn dropout2d(&self, x: &CpuTensor, opts: &Dropout2dOptions) -> Result<CpuTensor> {
        dropout("dropout input", x, opts)
    }

    fn dropout2d_backward(&self, dy: &CpuTensor, opts: &Dropout2dOptions) -> Result<CpuTensor> {
        dropout("dropout output gradient", dy, opts)
    }

    /// Per pixel a max-shifted log-sum-exp in f64; per-sample (sum, valid count) partials merged
    /// in sample order; the gradient in f64, rounded once.
    fn cross_entropy(
        &self,
        logits: &CpuTensor,
        labels: &CpuTensor,
        datasets: &CpuTensor,
        num_classes: &[usize],
        opts: &CrossEntropyOptions,
        with_grad: bool,
    ) -> Result<(CrossEntropyLoss, Option<CpuTensor>)> {
        let [n, h, w, cmax] = nhwc("cross-entropy logits", logits)?;
        let xv = float_of("cross-entropy logits", logits)?;
        let lv =
            labels.as_i32().ok_or(Error::UnsupportedDType { what: "cross-entropy labels", dtype: labels.dtype() })?;
        shape_is("cross-entropy labels", labels, &[n, h, w])?;
        if n * h * w > i32::MAX as usize {
            return Err(Error::InvalidShape {
                what: "cross-entropy labels",
                shape: vec![n, h, w],
                reason: "N*H*W must be below 2^31 pixels".into(),
            });
        }
        let dv = i32_of("dataset indices", datasets)?;
        shape_is("dataset indices", datasets, &[n])?;
        check_heads(num_classes, cmax)?;
        let nd = num_classes.len();
        let weights: Vec<f32> = match &opts.weights {
            None => vec![1.0; nd],
            Some(wv) if wv.len() != nd => {
                return Err(Error::InvalidArgument(format!("{} loss weights for {nd} datasets", wv.len())))
            }
            Some(wv) => wv.clone(),
        };
        if let Some(bad) = weights.iter().find(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!("loss weights must be finite, got {bad}")));
        }
        if !opts.grad_scale.is_finite() {
            return Err(Error::InvalidArgument(format!("grad_scale must be finite, got {}", opts.grad_scale)));
        }
        let ds = dataset_indices(dv, nd)?;
        let hw = h * w;
        for (position, &label) in lv.iter().enumerate() {
            let dataset = ds[position / hw];
            if label as i64 != IGNORE_LABEL && !(label >= 0 && (label as usize) < num_classes[dataset]) {
                return Err(Error::InvalidLabel {
                    dataset,
                    label: label as i64,
                    position,
                    num_classes: num_classes[dataset],
                });
            }
        }
        let lse = |pix: usize, classes: usize| -> f64 {
            let x = &xv[pix * cmax..pix * cmax + classes];
            let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max
        };
        let parts: Vec<(f64, usize)> = (0..n)
            .into_par_iter()
            .map(|ni| {
                let classes = num_classes[ds[ni]];
                let (mut sum, mut valid) = (0.0f64, 0usize);
                for pix in ni * hw..(ni + 1) * hw {
                    let label = lv[pix];
                    if label as i64 == IGNORE_LABEL {
                        continue;
                    }
                    sum += lse(pix, classes) - xv[pix * cmax + label as usize] as f64;
                    valid += 1;
                }
                (sum, valid)
            })
            .collect();
        let mut sums = vec![0.0f64; nd];
        let mut valid = vec![0usize; nd];
        for (ni, &(s, v)) in parts.iter().enumerate() {
            sums[ds[ni]] += s;
            valid[ds[ni]] += v;
        }
        let per: Vec<f64> = (0..nd).map(|d| if valid[d] > 0 { sums[d] / valid[d] as f64 } else { 0.0 }).collect();
        let total: f64 = (0..nd).map(|d| weights[d] as f64 * per[d]).sum();
        let loss = CrossEntropyLoss { total: total as f32, per_dataset: per.iter().map(|&v| v as f32).collect() };
        if !with_grad {
            return Ok((loss, None));
        }
        let mut grad = vec![0.0f32; xv.len()];
        grad.par_chunks_mut(cmax).enumerate().for_each(|(pix, gr)| {
            let label = lv[pix];
            if label as i64 == IGNORE_LABEL {
                return;
            }
            let d = ds[pix / hw];
            let scale = weights[d] as f64 / valid[d] as f64 * opts.grad_scale as f64;
            let l = lse(pix, num_classes[d]);
            for (c, g) in gr[..num_classes[d]].iter_mut().enumerate() {
                let soft = (xv[pix * cmax + c] as f64 - l).exp();
                let onehot = if c == label as usize { 1.0 } else { 0.0 };
                *g = ((soft - onehot) * scale) as f32;
            }
        });
        Ok((loss, Some(CpuTensor::f32_unchecked(logits.shape.clone(), grad))))
    }

    fn argmax(&self, logits: &CpuTensor, datasets: &CpuTensor, num_classes: &[usize]) -> Result<CpuTensor> {
        let [n, h, w, cmax] = nhwc("argmax logits", logits)?;
        let xv = float_of("argmax logits", logits)?;
        if n * h * w > i32::MAX as usize {
            return Err(Error::InvalidShape {
                what: "argmax logits",
                shape: logits.shape().to_vec(),
                reason: "N*H*W must be below 2^31 pixels".into(),
            });
        }
        let dv = i32_of("dataset indices", datasets)?;
        shape_is("dataset indices", datasets, &[n])?;
        check_heads(num_classes, cmax)?;
        let ds = dataset_indices(dv, num_classes.len())?;
        let hw = h * w;
        let pred = (0..n * hw)
            .into_par_iter()
            .map(|pix| {
                let x = &xv[pix * cmax..pix * cmax + num_classes[ds[pix / hw]]];
                let mut best = 0usize;
                for (c, &v) in x.iter().enumerate().skip(1) {
                    let b = x[best];
                    if b.is_nan() {
                        break;
                    }
                    if v.is_nan() || v > b {
                        best = c;
                    }
                }
                best as i32
            })
            .collect();
        Ok(CpuTensor::i32_unchecked(vec![n, h, w], pred))
    }

    /// PyTorch's formula in f32 with the kernels' fused multiply-adds (`f32::mul_add` rounds
    /// once, as `fmaf` does), so a step gives the same bits as the device's; frozen rows are
    /// skipped whole, as the kernel skips them.
    fn sgd_step(&self, params: &mut [SgdTensor<'_, CpuTensor>], opts: &SgdOptions, first_step: bool) -> Result<()> {
        if !(opts.momentum.is_finite() && (0.0..=1.0).contains(&opts.momentum)) {
            return Err(Error::InvalidArgument(format!("momentum must be in [0, 1], got {}", opts.momentum)));
        }
        if !(opts.weight_decay.is_finite() && opts.weight_decay >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "weight decay must be finite and non-negative, got {}",
                opts.weight_decay
            )));
        }
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
        }
        let (mom, wd) = (opts.momentum, opts.weight_decay);
        let update = move |lr: f32, p: &mut f32, b: &mut f32, g: f32| {
            let d = wd.mul_add(*p, g);
            *b = if first_step { d } else { mom.mul_add(*b, d) };
            *p = (-lr).mul_add(*b, *p);
        };
        for sp in params.iter_mut() {
            let lr = sp.lr;
            let (Some(p), Some(g), Some(b)) =
                (sp.param.as_f32_mut(), sp.grad.as_f32(), sp.momentum_buffer.as_f32_mut())
            else {
                continue; // not reached: every dtype was checked above
            };
            match sp.frozen_rows.filter(|f| f.rows != 0 && !p.is_empty()) {
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
        }
        Ok(())
    }
}

// ---- helpers of the pooling and dropout ops -----------------------------------------------------

/// A spatial size a backward was asked to produce (or an output size): `[n, h, w, c]` with
/// every dimension in 1..=i32::MAX and an element count that fits 64-bit indexing.
fn input_hw_check(what: &'static str, n: usize, (h, w): (usize, usize), c: usize) -> Result<()> {
    let numel = numel_of(&[n, h, w, c]).ok();
    if h == 0
        || w == 0
        || h > i32::MAX as usize
        || w > i32::MAX as usize
        || numel.is_none_or(|e| e > i64::MAX as usize / 8)
    {
        return Err(Error::InvalidShape {
            what,
            shape: vec![n, h, w, c],
            reason: "every dimension must be in 1..=i32::MAX, and the element count fit in 64-bit indexing".into(),
        });
    }
    Ok(())
}

fn new_output_check(what: &'static str, n: usize, out_h: usize, out_w: usize, c: usize) -> Result<()> {
    if out_h == 0 || out_w == 0 {
        return Err(Error::InvalidShape {
            what,
            shape: vec![n, out_h, out_w, c],
            reason: "every dimension must be at least 1".into(),
        });
    }
    input_hw_check(what, n, (out_h, out_w), c)
}

fn resize_limit(what: &'static str, [n, h, w, c]: [usize; 4], oh: usize, ow: usize) -> Result<()> {
    if [h, w, oh, ow].iter().any(|&d| d > MAX_RESIZE_DIM) {
        return Err(Error::InvalidShape {
            what,
            shape: vec![n, h, w, c, oh, ow],
            reason: format!("bilinear resize supports spatial sizes up to {MAX_RESIZE_DIM} (f32 source indices)"),
        });
    }
    Ok(())
}

/// Dropout2d as the kernels do it: per (sample, channel) a factor, 0 where
/// [`keep`](crate::rng::dropout_keep) says drop, else `1/(1−p)` in f32; dropped
/// channels are exact zeros whatever the input (inf and NaN included).
fn dropout(what: &'static str, x: &CpuTensor, opts: &Dropout2dOptions) -> Result<CpuTensor> {
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
    Ok(CpuTensor::f32_unchecked(vec![n, h, w, c], y))
}
