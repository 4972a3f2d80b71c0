//! Universal Semi-Supervised Segmentation (USSS) entropy regularisation.
//!
//! Pixel features `x` `[N, H, W, E]` (f32, f16 or bf16 storage; f32 arithmetic) are compared by
//! dot product with fixed class prototypes of every dataset. Sample `n` belongs to dataset
//! `datasets[n]`. For an included pixel with feature `f` and a dataset `d'` with prototypes
//! `proto_j`, `j ∈ d'`:
//!
//! `s_j = ⟨f, proto_j⟩ / T`, `p = softmax(s)`, `H_d'(f) = −Σ_j p_j log p_j`.
//!
//! With `M` the number of included pixels (all pixels without a mask; those with a nonzero mask
//! byte otherwise) and `d` the pixel's own dataset:
//!
//! - `L_within = (1/M) Σ_pixels H_d(f)`;
//! - `L_cross = (1/M) Σ_pixels (1/(D−1)) Σ_{d'≠d} H_d'(f)`: the mean over the other datasets,
//!   averaged over pixels (with two datasets: the entropy against the one other dataset). With
//!   a single dataset there is no other dataset and `L_cross = 0`;
//! - `loss = α·L_cross + β·L_within`.
//!
//! When no pixel is included (`M = 0`) every value is 0 and so is the gradient.
//!
//! The prototypes of all datasets are one `[Σ_d C_d, E]` f32 table, dataset 0's rows first
//! ([`UsssPrototypes`]). The method uses L2-normalised rows: [`normalize_prototypes`] makes them
//! so. The ops do not re-check the norm (the loss is defined for any finite prototypes); they
//! check that the table is finite when a [`UsssPrototypes`] is built.
//!
//! Kernels: `kernels/usss.cu`. Reference: [`crate::reference::usss`].

use crate::device::{launcher, workspace_bytes, Device, DeviceBuffer, DeviceErrorRecord, Launcher};
use crate::error::{Error, Result};
use crate::ffi;
use crate::ops::check;
use crate::tensor::{DType, Tensor};

/// The kernels stage `E + P + 3·D` f32 values per warp in shared memory (at least one warp
/// within the 40 KiB they budget): this is the largest such sum they accept.
pub const MAX_SHARED_VALUES: usize = 40 * 1024 / 4;

/// Weights and temperature of the USSS loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsssOptions {
    /// Softmax temperature T (> 0): logits are `⟨f, proto⟩ / T`.
    pub temperature: f32,
    /// Weight α of the cross-dataset entropy.
    pub alpha: f32,
    /// Weight β of the within-dataset entropy.
    pub beta: f32,
}

impl Default for UsssOptions {
    /// T = 1, α = β = 1: neutral values, not tuned ones.
    fn default() -> Self {
        UsssOptions { temperature: 1.0, alpha: 1.0, beta: 1.0 }
    }
}

/// The loss and its two parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsssLoss {
    /// `α·cross + β·within`.
    pub total: f32,
    /// `L_cross`: mean entropy against the other datasets' prototypes.
    pub cross: f32,
    /// `L_within`: mean entropy against the pixel's own dataset's prototypes.
    pub within: f32,
}

/// The fixed class prototypes of `D` datasets: one `[Σ_d C_d, E]` f32 table whose first `C_0`
/// rows belong to dataset 0, the next `C_1` to dataset 1, and so on.
#[derive(Debug)]
pub struct UsssPrototypes {
    table: Tensor,
    counts: Vec<usize>,
    offsets: Tensor,
}

impl UsssPrototypes {
    /// Takes the table and the number of classes of every dataset (each ≥ 1, summing to the
    /// table's rows). Reads the table back once to check that every value is finite; it does not
    /// normalise (see [`normalize_prototypes`]).
    pub fn new(table: Tensor, classes_per_dataset: &[usize]) -> Result<Self> {
        check::dtype("USSS prototypes", &table, DType::F32)?;
        let s = table.shape().to_vec();
        if s.len() != 2 || s.contains(&0) {
            return Err(Error::InvalidShape {
                what: "USSS prototypes",
                shape: s,
                reason: "expected [classes, channels] with both at least 1".into(),
            });
        }
        if classes_per_dataset.is_empty() || classes_per_dataset.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "USSS prototypes: every dataset needs at least one class, got {classes_per_dataset:?}"
            )));
        }
        let total = classes_per_dataset.iter().try_fold(0usize, |a, &c| a.checked_add(c));
        if total != Some(s[0]) {
            return Err(Error::ShapeMismatch {
                what: "USSS prototypes",
                expected: vec![total.unwrap_or(usize::MAX), s[1]],
                got: s,
            });
        }
        if s[0] > i32::MAX as usize || s[1] > i32::MAX as usize || classes_per_dataset.len() >= i32::MAX as usize {
            return Err(Error::InvalidShape {
                what: "USSS prototypes",
                shape: s,
                reason: "too large for 32-bit indexing".into(),
            });
        }
        let values = table.to_vec::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "USSS prototypes: row {} column {} is not finite ({})",
                i / s[1],
                i % s[1],
                values[i]
            )));
        }
        let mut offsets = Vec::with_capacity(classes_per_dataset.len() + 1);
        offsets.push(0i32);
        for &c in classes_per_dataset {
            offsets.push(offsets[offsets.len() - 1] + c as i32);
        }
        let offsets = Tensor::from_slice(table.device(), &[offsets.len()], &offsets)?;
        Ok(UsssPrototypes { table, counts: classes_per_dataset.to_vec(), offsets })
    }

    /// The `[Σ_d C_d, E]` table.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// `C_d` for every dataset.
    pub fn classes_per_dataset(&self) -> &[usize] {
        &self.counts
    }

    /// Number of datasets D.
    pub fn num_datasets(&self) -> usize {
        self.counts.len()
    }

    /// Feature channels E.
    pub fn channels(&self) -> usize {
        self.table.shape()[1]
    }

    /// Total number of prototypes `Σ_d C_d`.
    pub fn num_prototypes(&self) -> usize {
        self.table.shape()[0]
    }
}

/// Returns a copy of a `[rows, E]` f32 table with every row scaled to unit L2 norm (computed in
/// f64 on the host: prototypes are small and fixed). A row that is all zeros or not finite is an
/// `InvalidArgument` error.
pub fn normalize_prototypes(table: &Tensor) -> Result<Tensor> {
    check::dtype("USSS prototypes", table, DType::F32)?;
    let s = table.shape();
    if s.len() != 2 || s.contains(&0) {
        return Err(Error::InvalidShape {
            what: "USSS prototypes",
            shape: s.to_vec(),
            reason: "expected [classes, channels] with both at least 1".into(),
        });
    }
    let mut v = table.to_vec::<f32>()?;
    for (r, row) in v.chunks_exact_mut(s[1]).enumerate() {
        let norm = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "USSS prototypes: row {r} has norm {norm} and cannot be normalised"
            )));
        }
        for x in row.iter_mut() {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    Tensor::from_slice(table.device(), s, &v)
}

const FORWARD: Launcher<ffi::cdcl_usss_params> = launcher!(usss_forward: cdcl_emu_usss_forward, cdcl_cuda_usss_forward);
const BACKWARD: Launcher<ffi::cdcl_usss_params> =
    launcher!(usss_backward: cdcl_emu_usss_backward, cdcl_cuda_usss_backward);

fn validate(
    x: &Tensor,
    datasets: &Tensor,
    protos: &UsssPrototypes,
    mask: Option<&Tensor>,
    opts: &UsssOptions,
) -> Result<ffi::cdcl_usss_params> {
    let [n, h, w, e] = check::nhwc("USSS features", x)?;
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType { what: "USSS features", dtype: x.dtype() });
    }
    check::dtype("dataset indices", datasets, DType::I32)?;
    check::shape("dataset indices", datasets, &[n])?;
    if protos.channels() != e {
        return Err(Error::ShapeMismatch {
            what: "USSS prototypes",
            expected: vec![protos.num_prototypes(), e],
            got: protos.table.shape().to_vec(),
        });
    }
    check::same_device(x.device(), &[datasets, &protos.table, &protos.offsets])?;
    if let Some(m) = mask {
        check::dtype("USSS mask", m, DType::U8)?;
        check::shape("USSS mask", m, &[n, h, w])?;
        check::same_device(x.device(), &[m])?;
    }
    check::finite_positive("USSS temperature", opts.temperature)?;
    let inv_temperature = 1.0 / opts.temperature;
    if !inv_temperature.is_finite() {
        return Err(Error::InvalidArgument(format!("USSS temperature {} is too small", opts.temperature)));
    }
    for (what, v) in [("alpha", opts.alpha), ("beta", opts.beta)] {
        if !v.is_finite() {
            return Err(Error::InvalidArgument(format!("USSS {what} must be finite, got {v}")));
        }
    }
    let (d, p) = (protos.num_datasets(), protos.num_prototypes());
    if e + p + 3 * d > MAX_SHARED_VALUES {
        return Err(Error::InvalidShape {
            what: "USSS features and prototypes",
            shape: vec![p, e],
            reason: format!("channels + prototypes + 3 x datasets must be at most {MAX_SHARED_VALUES}"),
        });
    }
    Ok(ffi::cdcl_usss_params {
        n: n as i32,
        h: h as i32,
        w: w as i32,
        e: e as i32,
        num_datasets: d as i32,
        num_protos: p as i32,
        dtype: x.dtype().to_ffi(),
        inv_temperature,
        alpha: opts.alpha,
        beta: opts.beta,
        dataset: datasets.ptr().cast(),
        proto_offset: protos.offsets.ptr().cast(),
        protos: protos.table.ptr().cast(),
        mask: mask.map_or(std::ptr::null(), |m| m.ptr().cast()),
        x: x.ptr(),
        ..Default::default()
    })
}

fn run(device: &Device, launcher: &Launcher<ffi::cdcl_usss_params>, mut p: ffi::cdcl_usss_params) -> Result<()> {
    let mut ws = DeviceBuffer::uninit_words(device, workspace_bytes(ffi::cdcl_emu_usss_workspace_bytes, &p))?;
    let mut record = DeviceErrorRecord::new(device)?;
    p.workspace = ws.as_mut_ptr().cast();
    p.err = record.as_mut_ptr();
    device.launch(launcher, &p)?;
    let num_datasets = p.num_datasets as usize;
    record.check(None, move |faults, _| match faults[ffi::CDCL_ERRSLOT_DATASET_INDEX as usize] {
        Some(f) => {
            Err(Error::DatasetIndexOutOfRange { sample: f.position as usize, index: f.value as i64, num_datasets })
        }
        None => Ok(()),
    })
}

/// The USSS loss of pixel features `x` `[N, H, W, E]` whose samples belong to `datasets`
/// (`[N]` i32 in `0..D`), against `protos`. `mask`: `[N, H, W]` u8, nonzero = the pixel takes
/// part (the unlabeled pixels); `None` = every pixel. A dataset index out of range is
/// `Error::DatasetIndexOutOfRange` (nothing is computed).
pub fn forward(
    x: &Tensor,
    datasets: &Tensor,
    protos: &UsssPrototypes,
    mask: Option<&Tensor>,
    opts: &UsssOptions,
) -> Result<UsssLoss> {
    let v = loss_on_device(x, datasets, protos, mask, opts)?.to_vec::<f32>()?;
    Ok(UsssLoss { total: v[0], cross: v[1], within: v[2] })
}

/// [`forward`] with the loss left on the device: an f32 `[3]` tensor (total, cross, within),
/// for a caller that reads it later with other values (a training step).
pub fn loss_on_device(
    x: &Tensor,
    datasets: &Tensor,
    protos: &UsssPrototypes,
    mask: Option<&Tensor>,
    opts: &UsssOptions,
) -> Result<Tensor> {
    let mut p = validate(x, datasets, protos, mask, opts)?;
    let device = x.device();
    let mut out = Tensor::uninit(device, &[3], DType::F32)?;
    p.out = out.ptr_mut().cast();
    run(device, &FORWARD, p)?;
    Ok(out)
}

/// `grad · d(loss)/dx` for the loss of [`forward`] on the same inputs: a tensor like `x`, zero
/// at excluded pixels.
pub fn backward(
    grad: f32,
    x: &Tensor,
    datasets: &Tensor,
    protos: &UsssPrototypes,
    mask: Option<&Tensor>,
    opts: &UsssOptions,
) -> Result<Tensor> {
    if !grad.is_finite() {
        return Err(Error::InvalidArgument(format!("USSS incoming gradient must be finite, got {grad}")));
    }
    let mut p = validate(x, datasets, protos, mask, opts)?;
    let device = x.device();
    let mut dx = Tensor::uninit(device, x.shape(), x.dtype())?;
    p.grad = grad;
    p.dx = dx.ptr_mut();
    run(device, &BACKWARD, p)?;
    Ok(dx)
}
