//! Adaptive average pooling and bilinear resize kernels through the emulator against the f64
//! reference (`cdcl::reference::pool`): random sizes (1x1 inputs, outputs larger and smaller than
//! inputs, odd sizes, C up to 70), both `align_corners` modes, f32/f16/bf16 storage, forwards
//! writing into a channel slice at a random offset of a larger tensor (every other element checked
//! bit for bit), backwards reading dy from such a slice; typed errors for bad input; bitwise
//! determinism across emulator seeds and worker counts.
//!
//! Tolerances (u = 2^-24, the f32 unit roundoff; u_s that of the storage type; inputs are
//! rounded to the storage type before the reference sees them, so storage adds only the one
//! rounding of the stored result, <= u_s |want|, plus half an f16 subnormal step near zero):
//! - pooling forward: a sum of k = bin area terms in f32 (per-row partial sums, then a merge of at
//!   most 8 rows) and one division: error <= (k + 2) u * mean|x over the bin|, taken from the
//!   reference pooling of |x|.
//! - pooling backward: a sum of at most k = kh * kw terms dy / area, kh = ceil(Out/In) + 1 bins
//!   per axis: error <= (k + 2) u * sum |dy| / area, the reference backward of |dy|.
//! - resize forward: the f32 source index src = fma(scale, d + 0.5, -0.5) is off by at most
//!   ~2u (In + 1), so each weight is off by <= 2u (In + 2), and the value by that times 2 axes
//!   times 2 max|x|, plus ~3u max|x| for the products and fmas: tol = u M (8 (In + 2) + 3), with
//!   M the largest |x| and In the larger input extent.
//! - resize backward: at most k = kh kw terms (kh = ceil(Out/In) + 2 outputs per axis read a
//!   given input with a nonzero weight), each with the weight error above, plus the summation:
//!   tol = u Mdy k (4 (In + 2) + k + 4).
//!
//! Each tolerance is doubled for margin. A wrong tap, bin or weight is off by O(|x|), 10^3 times
//! more.

mod common;

use cdcl::ops::pool;
use cdcl::reference::pool as refp;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, bits, host, quantize, tensor, unit_roundoff, Rng};
use ndarray::{s, Array4, ArrayView4};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    c: usize,
    /// Channels of the outer tensor before and after the op's slice.
    before: usize,
    after: usize,
    align_corners: bool,
    seed: u64,
}

impl Case {
    fn total(&self) -> usize {
        self.before + self.c + self.after
    }
    fn in_shape(&self) -> [usize; 4] {
        [self.n, self.h, self.w, self.c]
    }
    fn outer_shape(&self) -> [usize; 4] {
        [self.n, self.oh, self.ow, self.total()]
    }
}

fn case_strategy(max_c: usize) -> impl Strategy<Value = Case> {
    // Sizes 1..=11 cover 1x1 inputs and outputs, odd sizes, up- and down-sampling, equal sizes,
    // and overlapping adaptive bins (Out not dividing In).
    let size = 1usize..=11;
    (
        (1usize..=2, size.clone(), size.clone(), size.clone(), size),
        (1usize..=max_c, 0usize..=5, 0usize..=3, any::<bool>(), any::<u64>()),
    )
        .prop_map(|((n, h, w, oh, ow), (c, before, after, align_corners, seed))| Case {
            n,
            h,
            w,
            oh,
            ow,
            c,
            before,
            after,
            align_corners,
            seed,
        })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Pool,
    Resize,
}

struct Data {
    x: Vec<f64>,
    /// Gradient of the whole outer tensor; the op's channels are a slice of it.
    dy_outer: Vec<f64>,
    /// Initial content of the outer output tensor (must survive outside the slice).
    sentinel: Vec<f64>,
}

fn make_data(k: &Case, dtype: DType) -> Data {
    let mut r = Rng(k.seed);
    let nx: usize = k.in_shape().iter().product();
    let no: usize = k.outer_shape().iter().product();
    let x: Vec<f64> = (0..nx).map(|_| r.normal()).collect();
    let dy: Vec<f64> = (0..no).map(|_| r.normal()).collect();
    let sentinel: Vec<f64> = (0..no).map(|_| r.uniform(-100.0, 100.0)).collect();
    Data { x: quantize(&x, dtype), dy_outer: quantize(&dy, dtype), sentinel: quantize(&sentinel, dtype) }
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// The storage rounding of a result of magnitude `v` (see the module comment).
fn storage_tol(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => 2.0 * unit_roundoff(dtype) * v.abs() + 2f64.powi(-25),
        _ => 2.0 * unit_roundoff(dtype) * v.abs(),
    }
}

/// The op's channels of the outer dy tensor, as `[N, Ho, Wo, C]`.
fn dy_slice(k: &Case, dy_outer: &[f64]) -> Array4<f64> {
    let outer = ArrayView4::from_shape(k.outer_shape(), dy_outer).unwrap();
    outer.slice(s![.., .., .., k.before..k.before + k.c]).to_owned()
}

fn check_case(op: Op, k: &Case, dtype: DType, dev: &Device) -> Result<(), String> {
    let data = make_data(k, dtype);
    let u = f32::EPSILON as f64 / 2.0;
    let x_view = ArrayView4::from_shape(k.in_shape(), &data.x[..]).unwrap();
    let x = tensor(dev, &k.in_shape(), &data.x, dtype);

    // ---- forward into a channel slice of a larger tensor --------------------------------------
    let mut out = tensor(dev, &k.outer_shape(), &data.sentinel, dtype);
    let before_bits = bits(&out);
    let (want, tol_scale): (Array4<f64>, Vec<f64>) = match op {
        Op::Pool => {
            pool::adaptive_avg_pool_into(&x, &mut out, k.before).map_err(|e| format!("kernel forward: {e}"))?;
            let want = refp::adaptive_avg_pool2d(x_view, k.oh, k.ow);
            let mean_abs =
                refp::adaptive_avg_pool2d(ArrayView4::from_shape(k.in_shape(), &abs(&data.x)[..]).unwrap(), k.oh, k.ow);
            // Per element: (area + 2) u mean|x|, area of that output's bin.
            let mut scale = Vec::with_capacity(want.len());
            for (idx, m) in mean_abs.indexed_iter() {
                let (h0, h1) = refp::pool_bin(idx.1, k.h, k.oh);
                let (w0, w1) = refp::pool_bin(idx.2, k.w, k.ow);
                scale.push(((h1 - h0) * (w1 - w0) + 2) as f64 * u * m);
            }
            (want, scale)
        }
        Op::Resize => {
            pool::resize_bilinear_into(&x, &mut out, k.before, k.align_corners)
                .map_err(|e| format!("kernel forward: {e}"))?;
            let want = refp::resize_bilinear(x_view, k.oh, k.ow, k.align_corners);
            let t = u * max_abs(&data.x) * (8.0 * (k.h.max(k.w) + 2) as f64 + 3.0);
            let n = want.len();
            (want, vec![t; n])
        }
    };
    let got_outer = host(&out);
    let got = dy_slice(k, &got_outer);
    let got: Vec<f64> = got.iter().copied().collect();
    let wv: Vec<f64> = want.iter().copied().collect();
    assert_close("forward", &got, &wv, |i| 2.0 * tol_scale[i] + storage_tol(dtype, wv[i]))?;
    untouched(k, dtype, &before_bits, &bits(&out))?;

    // ---- backward reading dy from the slice ---------------------------------------------------
    let dy_outer = tensor(dev, &k.outer_shape(), &data.dy_outer, dtype);
    let dy = dy_slice(k, &data.dy_outer);
    let dy_abs = dy.mapv(f64::abs);
    let (dx, want, tol): (Tensor, Array4<f64>, Vec<f64>) = match op {
        Op::Pool => {
            let dx = pool::adaptive_avg_pool_backward(&dy_outer, k.before, &k.in_shape())
                .map_err(|e| format!("kernel backward: {e}"))?;
            let want = refp::adaptive_avg_pool2d_backward(dy.view(), k.h, k.w);
            let kk = ((k.oh.div_ceil(k.h) + 1) * (k.ow.div_ceil(k.w) + 1) + 2) as f64;
            let tol = refp::adaptive_avg_pool2d_backward(dy_abs.view(), k.h, k.w).iter().map(|s| kk * u * s).collect();
            (dx, want, tol)
        }
        Op::Resize => {
            let dx = pool::resize_bilinear_backward(&dy_outer, k.before, &k.in_shape(), k.align_corners)
                .map_err(|e| format!("kernel backward: {e}"))?;
            let want = refp::resize_bilinear_backward(dy.view(), k.h, k.w, k.align_corners);
            let kk = ((k.oh.div_ceil(k.h) + 2) * (k.ow.div_ceil(k.w) + 2)) as f64;
            let in_ext = k.h.max(k.w) as f64;
            let t = u * max_abs(dy.as_slice().unwrap()) * kk * (4.0 * (in_ext + 2.0) + kk + 4.0);
            let n = want.len();
            (dx, want, vec![t; n])
        }
    };
    if dx.shape() != k.in_shape() || dx.dtype() != dtype {
        return Err(format!("dx is {:?} {}, expected {:?} {dtype}", dx.shape(), dx.dtype(), k.in_shape()));
    }
    let wv: Vec<f64> = want.iter().copied().collect();
    assert_close("backward", &host(&dx), &wv, |i| 2.0 * tol[i] + storage_tol(dtype, wv[i]))
}

/// Every element of the outer tensor outside the op's channel slice keeps its bits.
fn untouched(k: &Case, dtype: DType, before: &[u8], after: &[u8]) -> Result<(), String> {
    let es = dtype.size();
    let total = k.total();
    for e in 0..before.len() / es {
        let ch = e % total;
        if (k.before..k.before + k.c).contains(&ch) {
            continue;
        }
        if before[e * es..(e + 1) * es] != after[e * es..(e + 1) * es] {
            return Err(format!("element {e} (channel {ch}) outside the slice was overwritten"));
        }
    }
    Ok(())
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn adaptive_avg_pool_matches_reference_f32(k in case_strategy(70)) {
        check_case(Op::Pool, &k, DType::F32, &device()).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn resize_bilinear_matches_reference_f32(k in case_strategy(70)) {
        check_case(Op::Resize, &k, DType::F32, &device()).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn adaptive_avg_pool_matches_reference_half_types(k in case_strategy(40), bf in any::<bool>()) {
        check_case(Op::Pool, &k, if bf { DType::BF16 } else { DType::F16 }, &device()).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn resize_bilinear_matches_reference_half_types(k in case_strategy(40), bf in any::<bool>()) {
        check_case(Op::Resize, &k, if bf { DType::BF16 } else { DType::F16 }, &device()).map_err(TestCaseError::fail)?;
    }
}

/// Shapes the random ones may miss: 1x1 in and out, 1 -> many (every output reads the one
/// input), many -> 1 (one bin is the whole image), In == 1 along one axis only, a PSPNet-like
/// 60 -> 6 and 6 -> 60, C = 1 and C = 70 at the far end of a 75-channel tensor.
#[test]
fn named_edge_shapes() {
    let dev = device();
    let shapes: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
        // (h, w, oh, ow, c, before, after)
        (1, 1, 1, 1, 3, 0, 0),
        (1, 1, 7, 5, 33, 2, 1),
        (9, 7, 1, 1, 70, 5, 0),
        (1, 8, 6, 3, 1, 0, 4),
        (60, 60, 6, 6, 5, 1, 1),
        (6, 6, 60, 60, 2, 0, 1),
        (5, 13, 3, 4, 70, 5, 0),
    ];
    for (i, &(h, w, oh, ow, c, before, after)) in shapes.iter().enumerate() {
        for align_corners in [false, true] {
            let k = Case { n: 1, h, w, oh, ow, c, before, after, align_corners, seed: 500 + i as u64 };
            for op in [Op::Pool, Op::Resize] {
                check_case(op, &k, DType::F32, &dev).unwrap_or_else(|e| panic!("{op:?} {k:?}: {e}"));
            }
        }
    }
}

/// Same-size resize (align_corners false: every source index is exact) and same-size pooling
/// (bins of one pixel) are the identity, bit for bit.
#[test]
fn same_size_is_the_identity_bitwise() {
    let dev = device();
    let mut r = Rng(3);
    let v: Vec<f64> = (0..2 * 5 * 7 * 9).map(|_| r.normal()).collect();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let x = tensor(&dev, &[2, 5, 7, 9], &v, dtype);
        assert_eq!(bits(&pool::adaptive_avg_pool(&x, 5, 7).unwrap()), bits(&x));
        assert_eq!(bits(&pool::resize_bilinear(&x, 5, 7, false).unwrap()), bits(&x));
        assert_eq!(bits(&pool::resize_bilinear(&x, 5, 7, true).unwrap()), bits(&x));
        assert_eq!(bits(&pool::adaptive_avg_pool_backward(&x, 0, &[2, 5, 7, 9]).unwrap()), bits(&x));
        assert_eq!(bits(&pool::resize_bilinear_backward(&x, 0, &[2, 5, 7, 9], false).unwrap()), bits(&x));
    }
}

/// A PSPNet pyramid head: pool the features to bins 1, 2, 3, 6, resize each back, and write all
/// branches and the features themselves into one concatenated tensor without copies.
#[test]
fn pyramid_concatenation_through_channel_slices() {
    let dev = device();
    let (n, h, w, c) = (2, 12, 10, 5);
    let mut r = Rng(11);
    let v: Vec<f64> = quantize(&(0..n * h * w * c).map(|_| r.normal()).collect::<Vec<_>>(), DType::F32);
    let x = tensor(&dev, &[n, h, w, c], &v, DType::F32);
    let bins = [1usize, 2, 3, 6];
    let mut cat = Tensor::zeros(&dev, &[n, h, w, c * (1 + bins.len())], DType::F32).unwrap();
    // The identity branch: a same-size resize is an exact copy.
    pool::resize_bilinear_into(&x, &mut cat, 0, false).unwrap();
    for (b, &bin) in bins.iter().enumerate() {
        let pooled = pool::adaptive_avg_pool(&x, bin, bin).unwrap();
        pool::resize_bilinear_into(&pooled, &mut cat, c * (b + 1), false).unwrap();
    }
    let xv = ArrayView4::from_shape((n, h, w, c), &v[..]).unwrap();
    let got = Array4::from_shape_vec((n, h, w, c * 5), host(&cat)).unwrap();
    assert_eq!(got.slice(s![.., .., .., 0..c]), xv);
    for (b, &bin) in bins.iter().enumerate() {
        let want = refp::resize_bilinear(refp::adaptive_avg_pool2d(xv, bin, bin).view(), h, w, false);
        let part = got.slice(s![.., .., .., c * (b + 1)..c * (b + 2)]);
        for (g, wv) in part.iter().zip(want.iter()) {
            // Pooling of up to 120 values then interpolation: well inside 1e-5.
            assert!((g - wv).abs() <= 1e-5, "bin {bin}: got {g} want {wv}");
        }
    }
}

/// The pyramid's 1x1 and 2x2 bins upsampled to a feature map: every input pixel has thousands of
/// candidate outputs, which the backward splits over 16 row lanes per pixel and adds in lane
/// order (kernels/pool.cu, `resize_bilinear_bwd_wide`: at least 32 candidate rows per input
/// row). The property test's sizes (at most 11) never take that kernel; these cases do, with the
/// property test's tolerances, in f32 and bf16, 45 channels (two 32-channel groups, one partial).
#[test]
fn resize_backward_of_the_pyramid_bins_matches_reference() {
    let dev = device();
    for (i, (h, w, oh, ow, align_corners)) in
        [(1, 1, 40, 37, false), (1, 1, 33, 65, true), (2, 2, 70, 61, true), (2, 1, 64, 40, false)]
            .into_iter()
            .enumerate()
    {
        for dtype in [DType::F32, DType::BF16] {
            let k = Case { n: 2, h, w, oh, ow, c: 45, before: 3, after: 2, align_corners, seed: i as u64 };
            check_case(Op::Resize, &k, dtype, &dev).unwrap_or_else(|e| panic!("{k:?} {dtype}: {e}"));
        }
    }
}

fn run_all_bits(seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let mut out = Vec::new();
    // The last two upsample 1x1 and 2x2 maps 35-70 times: the backward's parallel candidate rows.
    for (h, w, oh, ow, align_corners) in
        [(13, 11, 3, 5, false), (4, 5, 9, 7, true), (17, 17, 1, 1, false), (1, 1, 40, 37, false), (2, 2, 70, 61, true)]
    {
        let k = Case { n: 2, h, w, oh, ow, c: 45, before: 3, after: 2, align_corners, seed: 9 };
        let data = make_data(&k, DType::F32);
        let x = tensor(&dev, &k.in_shape(), &data.x, DType::F32);
        let dy = tensor(&dev, &k.outer_shape(), &data.dy_outer, DType::F32);
        let mut y = tensor(&dev, &k.outer_shape(), &data.sentinel, DType::F32);
        pool::adaptive_avg_pool_into(&x, &mut y, k.before).unwrap();
        out.push(bits(&y));
        pool::resize_bilinear_into(&x, &mut y, k.before, align_corners).unwrap();
        out.push(bits(&y));
        out.push(bits(&pool::adaptive_avg_pool_backward(&dy, k.before, &k.in_shape()).unwrap()));
        out.push(bits(&pool::resize_bilinear_backward(&dy, k.before, &k.in_shape(), align_corners).unwrap()));
    }
    out
}

#[test]
fn bitwise_identical_across_emulator_seeds_and_thread_counts() {
    let base = run_all_bits(0, 1);
    for (seed, threads) in [(1, 2), (0xDEAD_BEEF, 0), (42, 1)] {
        assert!(run_all_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device();
    let x = Tensor::zeros(&dev, &[2, 4, 4, 3], DType::F32).unwrap();
    let mut out = Tensor::zeros(&dev, &[2, 2, 2, 8], DType::F32).unwrap();

    // Rank, zero sizes, dtypes.
    let x3 = Tensor::zeros(&dev, &[2, 4, 12], DType::F32).unwrap();
    assert!(matches!(pool::adaptive_avg_pool(&x3, 2, 2), Err(Error::InvalidShape { .. })));
    assert!(matches!(pool::resize_bilinear_into(&x3, &mut out, 0, false), Err(Error::InvalidShape { .. })));
    let x0 = Tensor::zeros(&dev, &[2, 0, 4, 3], DType::F32).unwrap();
    assert!(matches!(pool::resize_bilinear(&x0, 2, 2, true), Err(Error::InvalidShape { .. })));
    assert!(matches!(pool::adaptive_avg_pool(&x, 0, 2), Err(Error::InvalidShape { .. })));
    assert!(matches!(pool::resize_bilinear(&x, 2, 0, false), Err(Error::InvalidShape { .. })));
    let xi = Tensor::zeros(&dev, &[2, 4, 4, 3], DType::I32).unwrap();
    assert!(matches!(pool::adaptive_avg_pool(&xi, 2, 2), Err(Error::UnsupportedDType { .. })));
    let mut out16 = Tensor::zeros(&dev, &[2, 2, 2, 8], DType::F16).unwrap();
    assert!(matches!(pool::adaptive_avg_pool_into(&x, &mut out16, 0), Err(Error::DTypeMismatch { .. })));

    // Batch mismatch and channel slices out of range.
    let mut out_n = Tensor::zeros(&dev, &[3, 2, 2, 8], DType::F32).unwrap();
    assert!(matches!(pool::resize_bilinear_into(&x, &mut out_n, 0, false), Err(Error::ShapeMismatch { .. })));
    assert!(pool::adaptive_avg_pool_into(&x, &mut out, 5).is_ok());
    for offset in [6, 8, usize::MAX] {
        assert!(matches!(pool::adaptive_avg_pool_into(&x, &mut out, offset), Err(Error::InvalidArgument(_))));
        assert!(matches!(pool::resize_bilinear_into(&x, &mut out, offset, true), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            pool::adaptive_avg_pool_backward(&out, offset, &[2, 4, 4, 3]),
            Err(Error::InvalidArgument(_))
        ));
    }

    // Devices.
    let other = device();
    let mut out_other = Tensor::zeros(&other, &[2, 2, 2, 8], DType::F32).unwrap();
    assert!(matches!(pool::adaptive_avg_pool_into(&x, &mut out_other, 0), Err(Error::DeviceMismatch { .. })));

    // Backward: the requested dx shape and the dy tensor.
    for bad in [&[2usize, 4, 4][..], &[2, 4, 0, 3], &[2, 4, 4, 3, 1]] {
        assert!(matches!(pool::resize_bilinear_backward(&out, 0, bad, false), Err(Error::InvalidShape { .. })));
    }
    assert!(matches!(pool::adaptive_avg_pool_backward(&out, 0, &[1, 4, 4, 3]), Err(Error::ShapeMismatch { .. })));
    let dyi = Tensor::zeros(&dev, &[2, 2, 2, 8], DType::U8).unwrap();
    assert!(matches!(pool::adaptive_avg_pool_backward(&dyi, 0, &[2, 4, 4, 3]), Err(Error::UnsupportedDType { .. })));
    // Resize sizes beyond f32-exact source indices (checked before anything is allocated).
    let big = pool::MAX_RESIZE_DIM + 1;
    assert!(matches!(pool::resize_bilinear_backward(&out, 0, &[2, big, 1, 3], true), Err(Error::InvalidShape { .. })));
}

/// The pyramid's input gradient in one pass (`adaptive_avg_pool_backward_sum`) equals the
/// pooling backward of each level followed by element-wise adds in level order, bit for bit in
/// f32: any number of levels (none, fewer and more than the 8 of one launch), any level sizes
/// (larger than the input too), the base a slice of a larger gradient. In f16 / bf16 the sum
/// runs in f32 on the same values and is rounded once: exactly the f32 result, rounded.
#[test]
fn pyramid_backward_sum_equals_separate_backwards_and_adds() {
    let dev = device();
    let mut r = Rng(11);
    for case in 0..24 {
        let (n, h, w, c) = (1 + r.below(3), 1 + r.below(13), 1 + r.below(13), 1 + r.below(40));
        let total = c + r.below(20);
        let num_levels = [0, 1, 4, 8, 9, 11][case % 6];
        let base_v: Vec<f64> = (0..n * h * w * total).map(|_| r.normal()).collect();
        let level_v: Vec<(usize, usize, Vec<f64>)> = (0..num_levels)
            .map(|_| {
                let (bh, bw) = (1 + r.below(8), 1 + r.below(8));
                (bh, bw, (0..n * bh * bw * c).map(|_| r.normal()).collect())
            })
            .collect();
        let run = |dtype: DType| -> Tensor {
            let base = tensor(&dev, &[n, h, w, total], &quantize(&base_v, dtype), dtype);
            let levels: Vec<Tensor> =
                level_v.iter().map(|(bh, bw, v)| tensor(&dev, &[n, *bh, *bw, c], &quantize(v, dtype), dtype)).collect();
            let refs: Vec<&Tensor> = levels.iter().collect();
            pool::adaptive_avg_pool_backward_sum(&base, &refs, &[n, h, w, c]).unwrap()
        };
        let what = format!("case {case}: {n}x{h}x{w}x{c} of {total}, {num_levels} levels");

        // f32: the separate ops, in order.
        let base = tensor(&dev, &[n, h, w, total], &base_v, DType::F32);
        let mut acc = pool::adaptive_avg_pool_backward(&base, 0, &[n, h, w, c]).unwrap();
        for (bh, bw, v) in &level_v {
            let level = tensor(&dev, &[n, *bh, *bw, c], v, DType::F32);
            let part = pool::adaptive_avg_pool_backward(&level, 0, &[n, h, w, c]).unwrap();
            acc = cdcl::ops::elementwise::add(&acc, &part).unwrap();
        }
        let fused = run(DType::F32);
        assert!(bits(&fused) == bits(&acc), "{what}: fused and separate differ");

        // 16-bit storage: the f32 sum of the same (rounded) values, rounded once — only for up
        // to 8 levels (beyond, each launch rounds its partial sum).
        if num_levels <= 8 {
            for dtype in [DType::F16, DType::BF16] {
                let b = tensor(&dev, &[n, h, w, total], &quantize(&base_v, dtype), DType::F32);
                let levels: Vec<Tensor> = level_v
                    .iter()
                    .map(|(bh, bw, v)| tensor(&dev, &[n, *bh, *bw, c], &quantize(v, dtype), DType::F32))
                    .collect();
                let refs: Vec<&Tensor> = levels.iter().collect();
                let want = pool::adaptive_avg_pool_backward_sum(&b, &refs, &[n, h, w, c]).unwrap();
                let got = run(dtype);
                assert_eq!(got.dtype(), dtype);
                // One rounding of the f32 value (half's f64 conversions may round differently).
                let rounded: Vec<f64> = want
                    .to_vec::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(|v| match dtype {
                        DType::F16 => half::f16::from_f32(v).to_f64(),
                        _ => half::bf16::from_f32(v).to_f64(),
                    })
                    .collect();
                assert!(host(&got) == rounded, "{what}: {dtype} is not the rounded f32 sum");
            }
        }
    }
}

#[test]
fn pyramid_backward_sum_rejects_bad_shapes() {
    let dev = device();
    let base = Tensor::zeros(&dev, &[2, 5, 6, 10], DType::F32).unwrap();
    let good = Tensor::zeros(&dev, &[2, 3, 3, 4], DType::F32).unwrap();
    let ok = pool::adaptive_avg_pool_backward_sum(&base, &[&good], &[2, 5, 6, 4]).unwrap();
    assert_eq!(ok.shape(), [2, 5, 6, 4]);
    let bad_c = Tensor::zeros(&dev, &[2, 3, 3, 5], DType::F32).unwrap();
    let bad_n = Tensor::zeros(&dev, &[1, 3, 3, 4], DType::F32).unwrap();
    let half = Tensor::zeros(&dev, &[2, 3, 3, 4], DType::F16).unwrap();
    for (levels, shape) in [
        (vec![&good, &bad_c], vec![2, 5, 6, 4]),
        (vec![&bad_n], vec![2, 5, 6, 4]),
        (vec![&good], vec![2, 5, 6, 11]),
        (vec![&good], vec![2, 5, 7, 4]),
        (vec![&good], vec![2, 5, 6]),
    ] {
        let e = pool::adaptive_avg_pool_backward_sum(&base, &levels, &shape).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. } | Error::InvalidShape { .. }), "{shape:?}: {e:?}");
    }
    assert!(matches!(
        pool::adaptive_avg_pool_backward_sum(&base, &[&half], &[2, 5, 6, 4]),
        Err(Error::DTypeMismatch { .. })
    ));
}
