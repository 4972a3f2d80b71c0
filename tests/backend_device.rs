//! `DeviceBackend` on the emulator against the f64 reference (`cdcl::reference`), one group of
//! trait methods per test: small random shapes and few cases (the emulator is slow; the kernels
//! themselves are tested at length in their own files), exact bit patterns where the backend only
//! moves data, typed errors where the input is bad.
//!
//! Tolerances (u = 2^-24, the f32 unit roundoff; every input is an f32, so the reference sees
//! exactly what the device reads):
//! - add: one correctly rounded f32 addition, |err| <= u |want| (2u allowed). ReLU, its backward,
//!   max pooling (values and indices), argmax, slices and concatenations: exact.
//! - convolution: each output is a sum of D products (D = R S C + 1 with the bias, R S K for the
//!   data gradient, N P Q for the filter and bias gradients) accumulated in f32 in some fixed
//!   order: |err| <= gamma_D * sum |terms|, gamma_D = D u / (1 - D u), where sum |terms| is the
//!   reference run on |x|, |w|, |dy|. Allowed: 2 gamma_D sum |terms|.
//! - DSBN: as in tests/dsbn.rs (f32 blocked Welford over <= 5 * 4 * 4 values per (dataset,
//!   channel), |mean| / std <= 6): the statistics are within ~1e-6 relative, so y within
//!   1e-4 (1 + |y|), saved mean and running statistics within 1e-5 (1 + |v|), 1/std within 1e-5
//!   relative (10x margins); the residual adds one f32 rounding (u |v|). Backward: dgamma and
//!   dbeta within 1e-5 S, S = sum |g| (1 + |xhat|) over the group; dx within
//!   1e-4 gamma/std (|g| + S / M (1 + |xhat|)) + 1e-7. dresidual is the masked dy: exact. With
//!   ReLU, dy is zeroed where the pre-activation is within 1e-3 of 0, where f32 and f64 may mask
//!   differently. Datasets absent from the batch: running statistics exactly unchanged.
//! - adaptive average pooling and bilinear resize: the bounds derived in tests/pool.rs (bin
//!   sums of k terms: (k + 2) u times the reference on |x|; resize: u M (8 (In + 2) + 3) forward,
//!   u Mdy k (4 (In + 2) + k + 4) backward), doubled.
//! - max pooling backward: a sum of at most kh kw gradients, (kh kw + 1) u sum |dy| (doubled);
//!   it must also equal the device gather kernel bit for bit.
//! - Dropout2d: one f32 scale 1 / (1 - p) and one product: 2u |want| (4u allowed); dropped
//!   channels exactly 0.
//! - cross-entropy: as in tests/cross_entropy.rs, 5e-5 (1 + |L|) for the losses,
//!   5e-5 w / valid * scale + 2u |want| for dlogits, exact zeros where the reference has them.
//! - SGD: three fmas (tests/sgd.rs): 4u (|buf| + |d|) for the buffer, 4u (|p'| + lr (|buf| + |d|))
//!   for the parameter, each step from the backend's own state before it.

mod common;

use cdcl::backend::{Backend, BnTables, CpuBackend, DeviceBackend, SgdTensor, TensorLike};
use cdcl::ops::conv::ConvGeometry;
use cdcl::ops::cross_entropy::CrossEntropyOptions;
use cdcl::ops::dropout::Dropout2dOptions;
use cdcl::ops::dsbn::{DsbnOptions, DsbnState};
use cdcl::ops::maxpool::{self, PoolGeometry};
use cdcl::ops::sgd::{FrozenRows, SgdOptions};
use cdcl::reference::{
    conv as rconv, cross_entropy as rce, dropout as rdrop, dsbn as rdsbn, elementwise as relt, maxpool as rmax,
    metrics as rmet, pool as rpool, sgd as rsgd,
};
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, Rng};
use ndarray::{Array1, Array2, Array3, Array4, ArrayView2};
use proptest::prelude::*;

const U: f64 = f32::EPSILON as f64 / 2.0;

fn backend() -> DeviceBackend {
    DeviceBackend::new(common::test_device())
}

fn normals(r: &mut Rng, len: usize, scale: f64) -> Vec<f32> {
    (0..len).map(|_| (scale * r.normal()) as f32).collect()
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn arr4(shape: [usize; 4], v: Vec<f64>) -> Array4<f64> {
    Array4::from_shape_vec(shape, v).unwrap()
}

fn flat<D: ndarray::Dimension>(a: &ndarray::Array<f64, D>) -> Vec<f64> {
    a.iter().copied().collect()
}

fn read(be: &DeviceBackend, t: &Tensor) -> Vec<f64> {
    wide(&be.to_f32(t).unwrap())
}

fn bits(be: &DeviceBackend, t: &Tensor) -> Vec<u32> {
    match t.dtype() {
        DType::F32 => be.to_f32(t).unwrap().iter().map(|v| v.to_bits()).collect(),
        DType::I32 => be.to_i32(t).unwrap().iter().map(|&v| v as u32).collect(),
        d => panic!("unexpected dtype {d}"),
    }
}

/// gamma_D = D u / (1 - D u).
fn gamma(d: usize) -> f64 {
    d as f64 * U / (1.0 - d as f64 * U)
}

// ---- tensors ----------------------------------------------------------------------------------

fn shape_strategy(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1..=max_dim, 1..=max_rank)
}

fn check_tensors(shape: &[usize], seed: u64) -> Result<(), String> {
    let be = backend();
    let mut r = Rng(seed);
    let len: usize = shape.iter().product();
    // Any bit pattern, NaN payloads and -0 included: the host copies must not touch them.
    let data: Vec<f32> = (0..len).map(|_| f32::from_bits(r.next_u64() as u32)).collect();
    let ints: Vec<i32> = (0..len).map(|_| r.next_u64() as i32).collect();
    let t = be.tensor_f32(shape, &data).map_err(|e| e.to_string())?;
    let ti = be.tensor_i32(shape, &ints).map_err(|e| e.to_string())?;
    if TensorLike::shape(&t) != shape || ti.dtype() != DType::I32 {
        return Err(format!("shape {:?} / dtype {} after upload", t.shape(), ti.dtype()));
    }
    let want_bits: Vec<u32> = data.iter().map(|v| v.to_bits()).collect();
    if bits(&be, &t) != want_bits {
        return Err("f32 round trip changed bits".into());
    }
    if be.to_i32(&ti).unwrap() != ints {
        return Err("i32 round trip changed values".into());
    }
    let z = be.zeros(shape).unwrap();
    if z.dtype() != DType::F32 || bits(&be, &z) != vec![0; len] {
        return Err("zeros are not +0.0 f32".into());
    }
    // A deep copy: writing the copy leaves the original alone.
    let mut c = be.try_clone(&t).unwrap();
    let ci = be.try_clone(&ti).unwrap();
    if bits(&be, &c) != want_bits || be.to_i32(&ci).unwrap() != ints || c.shape() != shape {
        return Err("try_clone differs from its source".into());
    }
    let other: Vec<f32> = (0..len).map(|i| i as f32 - 0.5).collect();
    be.write_f32(&mut c, &other).unwrap();
    if be.to_f32(&c).unwrap() != other || bits(&be, &t) != want_bits {
        return Err("write_f32 into the copy is not a deep write".into());
    }
    // Typed errors.
    let wrong_len = vec![0.0f32; len + 1];
    match be.write_f32(&mut c, &wrong_len) {
        Err(Error::ShapeMismatch { .. }) => {}
        other => return Err(format!("write_f32 of a wrong length: {other:?}")),
    }
    match be.tensor_f32(shape, &wrong_len) {
        Err(Error::InvalidShape { .. }) => {}
        other => return Err(format!("tensor_f32 of a wrong length: {other:?}")),
    }
    match be.to_f32(&ti) {
        Err(Error::DTypeMismatch { expected: DType::F32, got: DType::I32, .. }) => {}
        other => return Err(format!("to_f32 of an i32 tensor: {other:?}")),
    }
    match be.to_i32(&t) {
        Err(Error::DTypeMismatch { expected: DType::I32, got: DType::F32, .. }) => {}
        other => return Err(format!("to_i32 of an f32 tensor: {other:?}")),
    }
    let mut ti2 = be.try_clone(&ti).unwrap();
    match be.write_f32(&mut ti2, &other) {
        Err(Error::DTypeMismatch { .. }) => Ok(()),
        other => Err(format!("write_f32 into an i32 tensor: {other:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn tensors_round_trip_bit_for_bit(shape in shape_strategy(4, 5), seed in any::<u64>()) {
        check_tensors(&shape, seed).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn name_and_device() {
    let dev = Device::emulator_with(EmulatorConfig { seed: 3, threads: 1 }).unwrap();
    let be = DeviceBackend::new(dev.clone());
    assert_eq!(be.name(), dev.name());
    assert!(be.name().contains("emulator"), "{}", be.name());
    assert!(be.device().same_device(&dev));
}

#[test]
fn tensors_of_another_device_are_refused() {
    let be = backend();
    let other = Device::emulator_with(EmulatorConfig { seed: 0, threads: 0 }).unwrap();
    let mine = be.tensor_f32(&[2, 3], &[1.0; 6]).unwrap();
    let theirs = Tensor::from_slice(&other, &[2, 3], &[1.0f32; 6]).unwrap();
    assert!(matches!(be.add(&mine, &theirs), Err(Error::DeviceMismatch { .. })));
    assert!(matches!(be.relu(&theirs), Err(Error::DeviceMismatch { .. })));
    assert!(matches!(be.try_clone(&theirs), Err(Error::DeviceMismatch { .. })));
    assert!(matches!(be.slice_batch(&theirs, 0, 1), Err(Error::DeviceMismatch { .. })));
    assert!(matches!(be.concat_batch(&[&mine, &theirs]), Err(Error::DeviceMismatch { .. })));
}

// ---- element-wise -----------------------------------------------------------------------------

fn check_elementwise(shape: &[usize], seed: u64) -> Result<(), String> {
    let be = backend();
    let mut r = Rng(seed);
    let len: usize = shape.iter().product();
    let (a, b, dy) = (normals(&mut r, len, 1.0), normals(&mut r, len, 1.0), normals(&mut r, len, 1.0));
    let (ta, tb, tdy) =
        (be.tensor_f32(shape, &a).unwrap(), be.tensor_f32(shape, &b).unwrap(), be.tensor_f32(shape, &dy).unwrap());
    let want = relt::add(&wide(&a), &wide(&b));
    let sum = be.add(&ta, &tb).map_err(|e| e.to_string())?;
    assert_close("add", &read(&be, &sum), &want, |i| 2.0 * U * want[i].abs())?;
    let y = be.relu(&ta).map_err(|e| e.to_string())?;
    let want_y = relt::relu(&wide(&a));
    assert_close("relu", &read(&be, &y), &want_y, |_| 0.0)?;
    let dx = be.relu_backward(&tdy, &y).map_err(|e| e.to_string())?;
    assert_close("relu_backward", &read(&be, &dx), &relt::relu_backward(&wide(&dy), &want_y), |_| 0.0)?;
    let mut longer = shape.to_vec();
    longer[0] += 1;
    let tl = be.zeros(&longer).unwrap();
    match be.add(&ta, &tl) {
        Err(Error::ShapeMismatch { .. }) => Ok(()),
        other => Err(format!("add of different shapes: {other:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn elementwise_matches_reference(shape in shape_strategy(4, 6), seed in any::<u64>()) {
        check_elementwise(&shape, seed).map_err(TestCaseError::fail)?;
    }
}

// ---- convolution ------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ConvCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    r: usize,
    s: usize,
    geom: ConvGeometry,
    bias: bool,
    seed: u64,
}

fn conv_strategy() -> impl Strategy<Value = ConvCase> {
    (1usize..=2, 2usize..=7, 2usize..=7, 1usize..=5, 1usize..=5, prop_oneof![Just(1usize), Just(3)], 1usize..=2)
        .prop_flat_map(|(n, h, w, c, k, r, stride)| {
            (
                Just((n, h, w, c, k, r, stride)),
                prop_oneof![Just(1usize), Just(3)],
                0usize..=1,
                1usize..=2,
                any::<bool>(),
                any::<u64>(),
            )
        })
        .prop_map(|((n, h, w, c, k, r, stride), s, pad, dil, bias, seed)| ConvCase {
            n,
            h,
            w,
            c,
            k,
            r,
            s,
            geom: ConvGeometry { stride: (stride, stride), padding: (pad, pad), dilation: (dil, dil) },
            bias,
            seed,
        })
}

fn check_conv(k: &ConvCase) -> Result<(), String> {
    let Ok((p, q)) = k.geom.output_size(k.h, k.w, k.r, k.s) else {
        return Ok(()); // the filter does not fit: nothing to compare (ops' own tests cover it)
    };
    let be = backend();
    let mut rng = Rng(k.seed);
    let xs = [k.n, k.h, k.w, k.c];
    let ws = [k.k, k.r, k.s, k.c];
    let ys = [k.n, p, q, k.k];
    let x = normals(&mut rng, xs.iter().product(), 1.0);
    let w = normals(&mut rng, ws.iter().product(), 0.5);
    let b = normals(&mut rng, k.k, 1.0);
    let dy = normals(&mut rng, ys.iter().product(), 1.0);
    let (tx, tw, tb, tdy) = (
        be.tensor_f32(&xs, &x).unwrap(),
        be.tensor_f32(&ws, &w).unwrap(),
        be.tensor_f32(&[k.k], &b).unwrap(),
        be.tensor_f32(&ys, &dy).unwrap(),
    );
    let spec = rconv::ConvSpec { stride: k.geom.stride, padding: k.geom.padding, dilation: k.geom.dilation };
    let (x64, w64, b64, dy64) = (arr4(xs, wide(&x)), arr4(ws, wide(&w)), Array1::from(wide(&b)), arr4(ys, wide(&dy)));
    let (xa, wa, ba, dya) = (x64.mapv(f64::abs), w64.mapv(f64::abs), b64.mapv(f64::abs), dy64.mapv(f64::abs));
    let bias = k.bias.then_some(&tb);

    let y = be.conv2d(&tx, &tw, bias, &k.geom).map_err(|e| e.to_string())?;
    let want = rconv::conv2d(x64.view(), w64.view(), k.bias.then(|| b64.view()), &spec);
    let mag = flat(&rconv::conv2d(xa.view(), wa.view(), k.bias.then(|| ba.view()), &spec));
    let g = gamma(k.r * k.s * k.c + 1);
    assert_close("conv2d", &read(&be, &y), &flat(&want), |i| 2.0 * g * mag[i] + 1e-30)?;

    let grads = rconv::conv2d_backward(dy64.view(), x64.view(), w64.view(), &spec);
    let mags = rconv::conv2d_backward(dya.view(), xa.view(), wa.view(), &spec);
    let dx = be.conv2d_backward_data(&tdy, &tw, (k.h, k.w), &k.geom).map_err(|e| e.to_string())?;
    let (mdx, g) = (flat(&mags.dx), gamma(k.r * k.s * k.k));
    assert_close("conv2d_backward_data", &read(&be, &dx), &flat(&grads.dx), |i| 2.0 * g * mdx[i] + 1e-30)?;
    let (dw, db) = be.conv2d_backward_filter(&tdy, &tx, (k.k, k.r, k.s), k.bias, &k.geom).map_err(|e| e.to_string())?;
    let (mdw, g) = (flat(&mags.dw), gamma(k.n * p * q));
    assert_close("conv2d_backward_filter", &read(&be, &dw), &flat(&grads.dw), |i| 2.0 * g * mdw[i] + 1e-30)?;
    match (db, k.bias) {
        (Some(db), true) => {
            let mdb = flat(&mags.dbias);
            assert_close("bias gradient", &read(&be, &db), &flat(&grads.dbias), |i| 2.0 * g * mdb[i] + 1e-30)?;
        }
        (None, false) => {}
        (db, _) => return Err(format!("bias gradient {db:?} for with_bias = {}", k.bias)),
    }
    // A weight with other channels than the input: a typed error.
    let bad_w = be.zeros(&[k.k, k.r, k.s, k.c + 1]).unwrap();
    match be.conv2d(&tx, &bad_w, None, &k.geom) {
        Err(Error::ShapeMismatch { .. }) => Ok(()),
        other => Err(format!("conv2d with a wrong weight: {other:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn convolution_matches_reference(k in conv_strategy()) {
        check_conv(&k).map_err(TestCaseError::fail)?;
    }
}

// ---- DSBN -------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct BnCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    d: usize,
    relu: bool,
    residual: bool,
    datasets: Vec<usize>,
    seed: u64,
}

fn bn_strategy() -> impl Strategy<Value = BnCase> {
    (2usize..=6, 1usize..=5, 1usize..=5, 1usize..=9, 1usize..=3, any::<u64>()).prop_flat_map(|(n, h, w, c, d, seed)| {
        proptest::collection::vec(0..d, n).prop_map(move |datasets| BnCase {
            n,
            h,
            w,
            c,
            d,
            relu: false,
            residual: false,
            datasets,
            seed,
        })
    })
}

/// Host data of a DSBN case: x per (dataset, channel) with offset in [-3, 3] and scale in
/// [0.5, 2]; tables as tests/dsbn.rs draws them.
struct BnData {
    x: Vec<f32>,
    res: Vec<f32>,
    dy: Vec<f32>,
    tables: [Vec<f32>; 4],
}

fn bn_data(k: &BnCase) -> BnData {
    let mut r = Rng(k.seed);
    let dc = k.d * k.c;
    let off: Vec<f64> = (0..dc).map(|_| r.uniform(-3.0, 3.0)).collect();
    let scale: Vec<f64> = (0..dc).map(|_| r.uniform(0.5, 2.0)).collect();
    let hw = k.h * k.w;
    let mut x = Vec::with_capacity(k.n * hw * k.c);
    for n in 0..k.n {
        for _ in 0..hw {
            for c in 0..k.c {
                let s = k.datasets[n] * k.c + c;
                x.push((off[s] + scale[s] * r.normal()) as f32);
            }
        }
    }
    let len = x.len();
    let mut table = |lo: f64, hi: f64| (0..dc).map(|_| r.uniform(lo, hi) as f32).collect::<Vec<f32>>();
    let tables = [table(0.5, 1.5), table(-1.0, 1.0), table(-1.0, 1.0), table(0.5, 2.0)];
    BnData { x, res: normals(&mut r, len, 1.0), dy: normals(&mut r, len, 1.0), tables }
}

fn upload_bn(be: &DeviceBackend, k: &BnCase, data: &BnData) -> DsbnState {
    let mut bn = be.bn_new(k.d, k.c).unwrap();
    for (t, v) in bn.tables_mut().into_iter().zip(&data.tables) {
        be.write_f32(t, v).unwrap();
    }
    bn
}

/// The running statistics after `times` updates with the batch statistics of the reference.
fn moved(start: &[f64], batch: &Array2<f64>, counts: &[usize], c: usize, var: bool, times: usize) -> Vec<f64> {
    let mut v = start.to_vec();
    for _ in 0..times {
        for (i, e) in v.iter_mut().enumerate() {
            let m = counts[i / c];
            if m > 0 {
                let b = if var { batch[[i / c, i % c]] * m as f64 / (m - 1) as f64 } else { batch[[i / c, i % c]] };
                *e = 0.9 * *e + 0.1 * b;
            }
        }
    }
    v
}

fn check_dsbn(k: &BnCase) -> Result<(), String> {
    let be = backend();
    let data = bn_data(k);
    let shape = [k.n, k.h, k.w, k.c];
    let hw = k.h * k.w;
    let x64 = arr4(shape, wide(&data.x));
    let tab: Vec<Vec<f64>> = data.tables.iter().map(|t| wide(t)).collect();
    let view = |v: &[f64]| ArrayView2::from_shape((k.d, k.c), v).unwrap().to_owned();
    let (g64, b64, rm64, rv64) = (view(&tab[0]), view(&tab[1]), view(&tab[2]), view(&tab[3]));
    let cfg = |relu| rdsbn::DsbnConfig { eps: 1e-5, momentum: 0.1, relu };
    let opts = DsbnOptions { relu: k.relu, ..DsbnOptions::default() };
    let ds_i: Vec<i32> = k.datasets.iter().map(|&d| d as i32).collect();
    let tds = be.tensor_i32(&[k.n], &ds_i).unwrap();
    let tx = be.tensor_f32(&shape, &data.x).unwrap();
    let tr = be.tensor_f32(&shape, &data.res).unwrap();
    let residual = k.residual.then_some(&tr);
    let res64: Vec<f64> = if k.residual { wide(&data.res) } else { vec![0.0; data.x.len()] };

    // Inference (before any training step, so with the original running statistics).
    let bn0 = upload_bn(&be, k, &data);
    let yi = be.dsbn_forward_infer(&tx, &tds, &bn0, &opts, residual).map_err(|e| e.to_string())?;
    let wi = rdsbn::dsbn_forward_infer(
        x64.view(),
        &k.datasets,
        g64.view(),
        b64.view(),
        rm64.view(),
        rv64.view(),
        &cfg(false),
    )
    .map_err(|e| e.to_string())?;
    let wyi: Vec<f64> =
        wi.iter().zip(&res64).map(|(b, r)| if k.relu { relt::relu_scalar(b + r) } else { b + r }).collect();
    // One pass of a few f32 roundings, plus the residual add.
    assert_close("infer y", &read(&be, &yi), &wyi, |i| 1e-5 * (1.0 + wyi[i].abs() + res64[i].abs()))?;

    // Training forward. The reference has no residual form: BN without ReLU, then + r, then ReLU.
    let mut bn = upload_bn(&be, k, &data);
    let reference = rdsbn::dsbn_forward_train(
        x64.view(),
        &k.datasets,
        g64.view(),
        b64.view(),
        rm64.view(),
        rv64.view(),
        &cfg(false),
    );
    let result = be.dsbn_forward_train(&tx, &tds, &mut bn, &opts, residual);
    let want = match reference {
        Err(rdsbn::ReferenceError::TooFewValues { dataset, count }) => {
            return match result {
                Err(Error::TooFewValues { dataset: d2, count: c2 }) if (d2, c2) == (dataset, count) => {
                    let [_, _, rm, rv] = bn.tables();
                    assert_close("running_mean after error", &read(&be, rm), &tab[2], |_| 0.0)?;
                    assert_close("running_var after error", &read(&be, rv), &tab[3], |_| 0.0)
                }
                other => Err(format!("expected TooFewValues {{ {dataset}, {count} }}, got {other:?}")),
            };
        }
        Err(e) => return Err(format!("reference: {e}")),
        Ok(w) => w,
    };
    let (y, saved) = result.map_err(|e| format!("forward_train: {e}"))?;
    let pre: Vec<f64> = want.y.iter().zip(&res64).map(|(b, r)| b + r).collect();
    let wy: Vec<f64> = pre.iter().map(|&v| if k.relu { relt::relu_scalar(v) } else { v }).collect();
    assert_close("train y", &read(&be, &y), &wy, |i| 1e-4 * (1.0 + wy[i].abs()))?;
    let (wmean, winv) = (flat(&want.mean), flat(&want.invstd));
    assert_close("saved mean", &read(&be, &saved.mean), &wmean, |i| 1e-5 * (1.0 + wmean[i].abs()))?;
    assert_close("saved invstd", &read(&be, &saved.invstd), &winv, |i| 1e-5 * winv[i])?;
    // Running statistics moved exactly once (absent datasets: bit for bit unchanged). Moving them
    // twice would miss by 0.09 |batch - running|, far outside the tolerance: checked below, so
    // this comparison can tell once from twice.
    let present = |i: usize| want.counts[i / k.c] > 0;
    let tol = |i: usize, v: f64| if present(i) { 1e-5 * (1.0 + v.abs()) } else { 0.0 };
    let [_, _, rm, rv] = bn.tables();
    let (wrm, wrv) = (flat(&want.running_mean), flat(&want.running_var));
    assert_close("running_mean", &read(&be, rm), &wrm, |i| tol(i, wrm[i]))?;
    assert_close("running_var", &read(&be, rv), &wrv, |i| tol(i, wrv[i]))?;
    let twice_m = moved(&tab[2], &want.mean, &want.counts, k.c, false, 2);
    let twice_v = moved(&tab[3], &want.var, &want.counts, k.c, true, 2);
    let once_m = moved(&tab[2], &want.mean, &want.counts, k.c, false, 1);
    assert_close("once-moved model", &once_m, &wrm, |i| 1e-12 * (1.0 + wrm[i].abs()))?;
    let distinguishable = (0..wrm.len()).any(|i| {
        present(i)
            && ((twice_m[i] - wrm[i]).abs() > 10.0 * tol(i, wrm[i])
                || (twice_v[i] - wrv[i]).abs() > 10.0 * tol(i, wrv[i]))
    });
    if !distinguishable {
        return Err("the data cannot tell running statistics moved once from moved twice".into());
    }

    // Backward: dy zeroed where the ReLU mask is ambiguous in f32.
    let dy: Vec<f32> =
        data.dy.iter().zip(&pre).map(|(&g, &v)| if k.relu && v.abs() < 1e-3 { 0.0 } else { g }).collect();
    let tdy = be.tensor_f32(&shape, &dy).unwrap();
    let grads = be.dsbn_backward_train(&tdy, &tx, residual, &tds, &bn, &saved, &opts).map_err(|e| e.to_string())?;
    let g: Vec<f64> = dy.iter().zip(&pre).map(|(&d, &v)| if !k.relu || v > 0.0 { d as f64 } else { 0.0 }).collect();
    let wg = rdsbn::dsbn_backward_train(
        arr4(shape, g.clone()).view(),
        x64.view(),
        &k.datasets,
        g64.view(),
        b64.view(),
        &cfg(false),
    )
    .map_err(|e| e.to_string())?;
    let group = |e: usize| k.datasets[e / (hw * k.c)] * k.c + e % k.c;
    let xhat = |e: usize| {
        let s = group(e);
        (data.x[e] as f64 - wmean[s]) * winv[s]
    };
    let mut sums = vec![0.0f64; k.d * k.c];
    for (e, ge) in g.iter().enumerate() {
        sums[group(e)] += ge.abs() * (1.0 + xhat(e).abs());
    }
    assert_close("dbeta", &read(&be, &grads.dbeta), &flat(&wg.dbeta), |i| 1e-5 * sums[i])?;
    assert_close("dgamma", &read(&be, &grads.dgamma), &flat(&wg.dgamma), |i| 1e-5 * sums[i])?;
    let wdx = flat(&wg.dx);
    assert_close("dx", &read(&be, &grads.dx), &wdx, |e| {
        let s = group(e);
        let m = want.counts[s / k.c] as f64;
        1e-4 * tab[0][s].abs() * winv[s] * (g[e].abs() + sums[s] / m * (1.0 + xhat(e).abs())) + 1e-7
    })?;
    match (&grads.dresidual, k.residual) {
        (Some(dr), true) => assert_close("dresidual", &read(&be, dr), &g, |_| 0.0)?,
        (None, false) => {}
        (dr, _) => return Err(format!("dresidual {dr:?} with residual = {}", k.residual)),
    }

    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn dsbn_matches_reference(k in bn_strategy()) {
        for (relu, residual) in [(false, false), (true, false), (false, true), (true, true)] {
            check_dsbn(&BnCase { relu, residual, ..k.clone() }).map_err(TestCaseError::fail)?;
        }
    }
}

/// The residual form on fixed mixes, both ReLU settings: a dataset absent from the batch, and
/// one with a single sample beside a larger one.
#[test]
fn dsbn_residual_named_mixes() {
    for (i, ds) in [vec![2, 2, 0, 2], vec![1, 0, 0, 0, 0]].into_iter().enumerate() {
        for relu in [false, true] {
            let k = BnCase {
                n: ds.len(),
                h: 3,
                w: 2,
                c: 5,
                d: 3,
                relu,
                residual: true,
                datasets: ds.clone(),
                seed: 77 + i as u64,
            };
            check_dsbn(&k).unwrap_or_else(|e| panic!("{k:?}: {e}"));
        }
    }
}

#[test]
fn bn_new_and_tables() {
    let be = backend();
    let mut bn = be.bn_new(3, 4).unwrap();
    let want = [1.0f32, 0.0, 0.0, 1.0];
    for (t, &v) in bn.tables().iter().zip(&want) {
        assert_eq!(t.shape(), &[3, 4]);
        assert_eq!(be.to_f32(t).unwrap(), vec![v; 12]);
    }
    let [gamma, ..] = bn.tables_mut();
    be.write_f32(gamma, &[2.5; 12]).unwrap();
    assert_eq!(be.to_f32(bn.tables()[0]).unwrap(), vec![2.5; 12]);
    assert!(matches!(be.bn_new(0, 4), Err(Error::InvalidShape { .. })));
}

/// Bad dataset indices, a residual of the wrong shape: typed errors, and the running statistics
/// untouched (the residual is checked before the statistics pass).
#[test]
fn dsbn_errors_leave_running_statistics_alone() {
    let be = backend();
    let shape = [3, 2, 2, 4];
    let x = be.tensor_f32(&shape, &(0..48).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<_>>()).unwrap();
    let r = be.tensor_f32(&shape, &[0.5; 48]).unwrap();
    let mut bn = be.bn_new(2, 4).unwrap();
    let opts = DsbnOptions { relu: true, ..DsbnOptions::default() };
    let bad = be.tensor_i32(&[3], &[0, 2, 1]).unwrap();
    for residual in [None, Some(&r)] {
        let err = be.dsbn_forward_train(&x, &bad, &mut bn, &opts, residual).unwrap_err();
        assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 1, index: 2, num_datasets: 2 });
        let err = be.dsbn_forward_infer(&x, &bad, &bn, &opts, residual).unwrap_err();
        assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 1, index: 2, num_datasets: 2 });
    }
    let good = be.tensor_i32(&[3], &[0, 1, 1]).unwrap();
    let short = be.tensor_f32(&[3, 2, 1, 4], &[0.0; 24]).unwrap();
    assert!(matches!(be.dsbn_forward_train(&x, &good, &mut bn, &opts, Some(&short)), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(be.dsbn_forward_infer(&x, &good, &bn, &opts, Some(&short)), Err(Error::ShapeMismatch { .. })));
    let [_, _, rm, rv] = bn.tables();
    assert_eq!(be.to_f32(rm).unwrap(), vec![0.0; 8]);
    assert_eq!(be.to_f32(rv).unwrap(), vec![1.0; 8]);
    // The same calls with good input do move them (so the checks above could fail).
    be.dsbn_forward_train(&x, &good, &mut bn, &opts, Some(&r)).unwrap();
    assert_ne!(be.to_f32(bn.tables()[2]).unwrap(), vec![0.0; 8]);
    let wrong_ds = be.tensor_i32(&[2], &[0, 1]).unwrap();
    assert!(matches!(be.dsbn_forward_train(&x, &wrong_ds, &mut bn, &opts, None), Err(Error::ShapeMismatch { .. })));
}

// ---- pooling and resizing ---------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PoolCase {
    n: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    c: usize,
    align_corners: bool,
    seed: u64,
}

fn pool_strategy() -> impl Strategy<Value = PoolCase> {
    (1usize..=2, 1usize..=7, 1usize..=7, 1usize..=7, 1usize..=7, 1usize..=4, any::<bool>(), any::<u64>())
        .prop_map(|(n, h, w, oh, ow, c, align_corners, seed)| PoolCase { n, h, w, oh, ow, c, align_corners, seed })
}

fn check_pool(k: &PoolCase) -> Result<(), String> {
    let be = backend();
    let mut rng = Rng(k.seed);
    let (xs, ys) = ([k.n, k.h, k.w, k.c], [k.n, k.oh, k.ow, k.c]);
    let x = normals(&mut rng, xs.iter().product(), 1.0);
    let dy = normals(&mut rng, ys.iter().product(), 1.0);
    let (tx, tdy) = (be.tensor_f32(&xs, &x).unwrap(), be.tensor_f32(&ys, &dy).unwrap());
    let (x64, dy64) = (arr4(xs, wide(&x)), arr4(ys, wide(&dy)));
    let (xa, dya) = (x64.mapv(f64::abs), dy64.mapv(f64::abs));

    // Adaptive average pooling: bins of at most kb values.
    let kb = (k.h.div_ceil(k.oh) + 1) * (k.w.div_ceil(k.ow) + 1);
    let y = be.adaptive_avg_pool(&tx, k.oh, k.ow).map_err(|e| e.to_string())?;
    let want = flat(&rpool::adaptive_avg_pool2d(x64.view(), k.oh, k.ow));
    let mag = flat(&rpool::adaptive_avg_pool2d(xa.view(), k.oh, k.ow));
    assert_close("adaptive_avg_pool", &read(&be, &y), &want, |i| 2.0 * (kb + 2) as f64 * U * mag[i] + 1e-30)?;
    let kk = (k.oh.div_ceil(k.h) + 1) * (k.ow.div_ceil(k.w) + 1);
    let dx = be.adaptive_avg_pool_backward(&tdy, (k.h, k.w)).map_err(|e| e.to_string())?;
    let want = flat(&rpool::adaptive_avg_pool2d_backward(dy64.view(), k.h, k.w));
    let mag = flat(&rpool::adaptive_avg_pool2d_backward(dya.view(), k.h, k.w));
    assert_close("adaptive_avg_pool_backward", &read(&be, &dx), &want, |i| 2.0 * (kk + 2) as f64 * U * mag[i] + 1e-30)?;

    // Bilinear resize.
    let inp = k.h.max(k.w) as f64;
    let y = be.resize_bilinear(&tx, k.oh, k.ow, k.align_corners).map_err(|e| e.to_string())?;
    let want = flat(&rpool::resize_bilinear(x64.view(), k.oh, k.ow, k.align_corners));
    let m = abs(&wide(&x)).into_iter().fold(0.0, f64::max);
    assert_close("resize_bilinear", &read(&be, &y), &want, |_| 2.0 * U * m * (8.0 * (inp + 2.0) + 3.0))?;
    let kr = ((k.oh.div_ceil(k.h) + 2) * (k.ow.div_ceil(k.w) + 2)) as f64;
    let mdy = abs(&wide(&dy)).into_iter().fold(0.0, f64::max);
    let dx = be.resize_bilinear_backward(&tdy, (k.h, k.w), k.align_corners).map_err(|e| e.to_string())?;
    let want = flat(&rpool::resize_bilinear_backward(dy64.view(), k.h, k.w, k.align_corners));
    assert_close("resize_bilinear_backward", &read(&be, &dx), &want, |_| {
        2.0 * U * mdy * kr * (4.0 * (inp + 2.0) + kr + 4.0)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn pooling_and_resize_match_reference(k in pool_strategy()) {
        check_pool(&k).map_err(TestCaseError::fail)?;
    }
}

#[derive(Debug, Clone)]
struct MaxCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    geom: PoolGeometry,
    seed: u64,
}

fn max_strategy() -> impl Strategy<Value = MaxCase> {
    (1usize..=2, 2usize..=8, 2usize..=8, 1usize..=4, 1usize..=3, 1usize..=3, 1usize..=2, 1usize..=2, any::<u64>())
        .prop_flat_map(|(n, h, w, c, kh, kw, sh, sw, seed)| {
            (0..=kh / 2, 0..=kw / 2).prop_map(move |(ph, pw)| MaxCase {
                n,
                h,
                w,
                c,
                geom: PoolGeometry { kernel: (kh, kw), stride: (sh, sw), padding: (ph, pw) },
                seed,
            })
        })
}

fn check_max_pool(k: &MaxCase) -> Result<(), String> {
    if k.geom.output_size(k.h, k.w).is_err() {
        return Ok(()); // the window does not fit: nothing to compare (ops' own tests cover it)
    }
    let be = backend();
    let mut rng = Rng(k.seed);
    let xs = [k.n, k.h, k.w, k.c];
    // Few distinct values, so that windows hold ties (the first maximum must win).
    let x: Vec<f32> = (0..xs.iter().product()).map(|_| rng.below(5) as f32 - 2.0).collect();
    let tx = be.tensor_f32(&xs, &x).unwrap();
    let (y, idx) = be.max_pool2d(&tx, &k.geom).map_err(|e| e.to_string())?;
    let spec = rmax::PoolSpec { kernel: k.geom.kernel, stride: k.geom.stride, padding: k.geom.padding };
    let (wy, widx) = rmax::max_pool2d(arr4(xs, wide(&x)).view(), &spec);
    assert_close("max_pool2d", &read(&be, &y), &flat(&wy), |_| 0.0)?;
    let got_idx: Vec<i64> = be.to_i32(&idx).unwrap().into_iter().map(i64::from).collect();
    if got_idx != widx.iter().copied().collect::<Vec<_>>() {
        return Err("max_pool2d indices differ from the reference".into());
    }
    let ys = y.shape().to_vec();
    let dy = normals(&mut rng, ys.iter().product(), 1.0);
    let tdy = be.tensor_f32(&ys, &dy).unwrap();
    let dx = be.max_pool2d_backward(&tdy, &idx, (k.h, k.w), &k.geom).map_err(|e| e.to_string())?;
    let ys4 = [ys[0], ys[1], ys[2], ys[3]];
    let want = flat(&rmax::max_pool2d_backward(arr4(ys4, wide(&dy)).view(), widx.view(), k.h, k.w));
    let mag = flat(&rmax::max_pool2d_backward(arr4(ys4, abs(&wide(&dy))).view(), widx.view(), k.h, k.w));
    let terms = (k.geom.kernel.0 * k.geom.kernel.1 + 1) as f64;
    assert_close("max_pool2d_backward", &read(&be, &dx), &want, |i| 2.0 * terms * U * mag[i])?;
    // The backend is the device gather kernel: the same bits.
    let kernel = maxpool::max_pool2d_backward(&tdy, &idx, (k.h, k.w), &k.geom).map_err(|e| e.to_string())?;
    if bits(&be, &dx) != bits(&be, &kernel) {
        return Err("max_pool2d_backward differs from the device gather kernel".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn max_pooling_matches_reference(k in max_strategy()) {
        check_max_pool(&k).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn max_pool_backward_typed_errors_and_foreign_indices() {
    let be = backend();
    let g = PoolGeometry::square(2, 2, 0);
    let dy = be.tensor_f32(&[1, 2, 2, 1], &[1.0; 4]).unwrap();
    let short = be.tensor_i32(&[1, 2, 1, 1], &[0, 1]).unwrap();
    assert!(matches!(be.max_pool2d_backward(&dy, &short, (4, 4), &g), Err(Error::ShapeMismatch { .. })));
    let as_f32 = be.tensor_f32(&[1, 2, 2, 1], &[0.0; 4]).unwrap();
    assert!(matches!(be.max_pool2d_backward(&dy, &as_f32, (4, 4), &g), Err(Error::DTypeMismatch { .. })));
    let good = be.tensor_i32(&[1, 2, 2, 1], &[5, 3, 12, 15]).unwrap();
    assert!(matches!(be.max_pool2d_backward(&dy, &good, (0, 4), &g), Err(Error::InvalidShape { .. })));
    assert!(matches!(be.max_pool2d_backward(&dy, &good, (6, 6), &g), Err(Error::ShapeMismatch { .. })));
    let dx = be.max_pool2d_backward(&dy, &good, (4, 4), &g).unwrap();
    let mut want = vec![0.0f32; 16];
    for i in [5, 3, 12, 15] {
        want[i] = 1.0;
    }
    assert_eq!(be.to_f32(&dx).unwrap(), want);
    // Indices the forward cannot have written (outside the plane, negative, or in the plane but
    // outside their output's window) send their gradient nowhere.
    let foreign = be.tensor_i32(&[1, 2, 2, 1], &[16, -1, 3, 15]).unwrap();
    let dx = be.max_pool2d_backward(&dy, &foreign, (4, 4), &g).unwrap();
    let mut want = vec![0.0f32; 16];
    want[15] = 1.0;
    assert_eq!(be.to_f32(&dx).unwrap(), want);
    // Overlapping windows (3x3, stride 1): one input collects every output's gradient, in order.
    let g3 = PoolGeometry::square(3, 1, 0);
    let dy = be.tensor_f32(&[1, 2, 2, 1], &[1.0, 2.0, 4.0, 8.0]).unwrap();
    let same = be.tensor_i32(&[1, 2, 2, 1], &[5; 4]).unwrap();
    let dx = be.max_pool2d_backward(&dy, &same, (4, 4), &g3).unwrap();
    assert_eq!(be.to_f32(&dx).unwrap()[5], 15.0);
}

// ---- channel and batch slices -----------------------------------------------------------------

fn random_bits(r: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| f32::from_bits(r.next_u64() as u32)).collect()
}

fn check_channels(n: usize, h: usize, w: usize, widths: &[usize], seed: u64) -> Result<(), String> {
    let be = backend();
    let mut r = Rng(seed);
    let pix = n * h * w;
    let total: usize = widths.iter().sum();
    let host_parts: Vec<Vec<f32>> = widths.iter().map(|&c| random_bits(&mut r, pix * c)).collect();
    let parts: Vec<Tensor> =
        host_parts.iter().zip(widths).map(|(v, &c)| be.tensor_f32(&[n, h, w, c], v).unwrap()).collect();
    let refs: Vec<&Tensor> = parts.iter().collect();
    let cat = be.concat_channels(&refs).map_err(|e| e.to_string())?;
    if cat.shape() != [n, h, w, total] {
        return Err(format!("concat shape {:?}", cat.shape()));
    }
    let mut want = Vec::with_capacity(pix * total);
    for p in 0..pix {
        for (v, &c) in host_parts.iter().zip(widths) {
            want.extend(v[p * c..(p + 1) * c].iter().map(|x| x.to_bits()));
        }
    }
    if bits(&be, &cat) != want {
        return Err("concat_channels is not the host concatenation bit for bit".into());
    }
    // Slicing each part back out, and one random slice, bit for bit.
    let mut offset = 0;
    for (part, &c) in parts.iter().zip(widths) {
        let s = be.slice_channels(&cat, offset, c).map_err(|e| e.to_string())?;
        if s.shape() != part.shape() || bits(&be, &s) != bits(&be, part) {
            return Err(format!("slice_channels({offset}, {c}) is not the part"));
        }
        offset += c;
    }
    let start = r.below(total);
    let len = 1 + r.below(total - start);
    let s = be.slice_channels(&cat, start, len).map_err(|e| e.to_string())?;
    let want_s: Vec<u32> = (0..pix).flat_map(|p| want[p * total + start..p * total + start + len].to_vec()).collect();
    if bits(&be, &s) != want_s {
        return Err(format!("slice_channels({start}, {len}) differs"));
    }
    // i32 tensors (labels) concatenate the same way.
    let ints: Vec<i32> = (0..pix * 2).map(|i| i as i32 - 7).collect();
    let ti = be.tensor_i32(&[n, h, w, 2], &ints).unwrap();
    let both = be.concat_channels(&[&ti, &ti]).map_err(|e| e.to_string())?;
    let back = be.slice_channels(&both, 2, 2).map_err(|e| e.to_string())?;
    if be.to_i32(&back).unwrap() != ints {
        return Err("i32 channel concat/slice round trip".into());
    }
    // Typed errors.
    match be.slice_channels(&cat, start, total - start + 1) {
        Err(Error::InvalidArgument(_)) => {}
        other => return Err(format!("slice past the channels: {other:?}")),
    }
    let taller = be.zeros(&[n, h + 1, w, 1]).unwrap();
    match be.concat_channels(&[&cat, &taller]) {
        Err(Error::ShapeMismatch { .. }) => {}
        other => return Err(format!("concat of different spatial sizes: {other:?}")),
    }
    match be.concat_channels(&[&cat, &ti]) {
        Err(Error::DTypeMismatch { .. }) => {}
        other => return Err(format!("concat of f32 and i32: {other:?}")),
    }
    match be.concat_channels(&[]) {
        Err(Error::InvalidArgument(_)) => Ok(()),
        other => Err(format!("concat of nothing: {other:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn channel_concat_and_slice_are_exact(
        n in 1usize..=3, h in 1usize..=4, w in 1usize..=4,
        widths in proptest::collection::vec(1usize..=5, 1..=4), seed in any::<u64>(),
    ) {
        check_channels(n, h, w, &widths, seed).map_err(TestCaseError::fail)?;
    }
}

fn check_batch(shape: &[usize], cuts: &[usize], seed: u64) -> Result<(), String> {
    let be = backend();
    let mut r = Rng(seed);
    let len: usize = shape.iter().product();
    let per_sample = len / shape[0];
    let f = random_bits(&mut r, len);
    let i: Vec<i32> = (0..len).map(|_| r.next_u64() as i32).collect();
    // Split points: distinct, sorted, strictly inside the batch.
    let mut points: Vec<usize> = cuts.iter().map(|&c| c % shape[0]).filter(|&c| c > 0).collect();
    points.sort_unstable();
    points.dedup();
    let bounds: Vec<usize> = std::iter::once(0).chain(points).chain(std::iter::once(shape[0])).collect();
    for t in [be.tensor_f32(shape, &f).unwrap(), be.tensor_i32(shape, &i).unwrap()] {
        let all = bits(&be, &t);
        let mut pieces = Vec::new();
        for win in bounds.windows(2) {
            let (start, count) = (win[0], win[1] - win[0]);
            let s = be.slice_batch(&t, start, count).map_err(|e| e.to_string())?;
            let mut want_shape = shape.to_vec();
            want_shape[0] = count;
            if s.shape() != want_shape || s.dtype() != t.dtype() {
                return Err(format!("slice_batch({start}, {count}): {:?} {}", s.shape(), s.dtype()));
            }
            if bits(&be, &s) != all[start * per_sample..(start + count) * per_sample] {
                return Err(format!("slice_batch({start}, {count}) of {} differs", t.dtype()));
            }
            pieces.push(s);
        }
        let refs: Vec<&Tensor> = pieces.iter().collect();
        let back = be.concat_batch(&refs).map_err(|e| e.to_string())?;
        if back.shape() != shape || back.dtype() != t.dtype() || bits(&be, &back) != all {
            return Err(format!("slice_batch / concat_batch round trip of {} differs", t.dtype()));
        }
        match be.slice_batch(&t, shape[0], 1) {
            Err(Error::InvalidArgument(_)) => {}
            other => return Err(format!("slice_batch past the end: {other:?}")),
        }
        match be.slice_batch(&t, 0, 0) {
            Err(Error::InvalidArgument(_)) => {}
            other => return Err(format!("empty slice_batch: {other:?}")),
        }
    }
    let mut other_shape = shape.to_vec();
    other_shape.push(2);
    let (a, b) = (be.zeros(shape).unwrap(), be.zeros(&other_shape).unwrap());
    match be.concat_batch(&[&a, &b]) {
        Err(Error::ShapeMismatch { .. }) => {}
        other => return Err(format!("concat_batch of different sample shapes: {other:?}")),
    }
    let ai = be.tensor_i32(shape, &i).unwrap();
    match be.concat_batch(&[&a, &ai]) {
        Err(Error::DTypeMismatch { .. }) => Ok(()),
        other => Err(format!("concat_batch of f32 and i32: {other:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn batch_slices_round_trip_exactly(
        shape in shape_strategy(4, 5),
        cuts in proptest::collection::vec(0usize..8, 0..=3),
        seed in any::<u64>(),
    ) {
        check_batch(&shape, &cuts, seed).map_err(TestCaseError::fail)?;
    }
}

// ---- dropout, loss, metrics, optimiser --------------------------------------------------------

fn check_dropout(n: usize, h: usize, w: usize, c: usize, p: f32, seed: u64) -> Result<(), String> {
    let be = backend();
    let mut r = Rng(seed);
    let shape = [n, h, w, c];
    let x = normals(&mut r, shape.iter().product(), 1.0);
    let opts = Dropout2dOptions { p, seed: r.next_u64() };
    let tx = be.tensor_f32(&shape, &x).unwrap();
    let y = be.dropout2d(&tx, &opts).map_err(|e| e.to_string())?;
    let want = flat(&rdrop::dropout2d(arr4(shape, wide(&x)).view(), p as f64, opts.seed));
    assert_close("dropout2d", &read(&be, &y), &want, |i| 4.0 * U * want[i].abs())?;
    let dx = be.dropout2d_backward(&tx, &opts).map_err(|e| e.to_string())?;
    let want = flat(&rdrop::dropout2d_backward(arr4(shape, wide(&x)).view(), p as f64, opts.seed));
    assert_close("dropout2d_backward", &read(&be, &dx), &want, |i| 4.0 * U * want[i].abs())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn dropout_matches_reference(
        n in 1usize..=3, h in 1usize..=3, w in 1usize..=3, c in 1usize..=9,
        p in prop_oneof![Just(0.0f32), Just(0.5), 0.05f32..0.95], seed in any::<u64>(),
    ) {
        check_dropout(n, h, w, c, p, seed).map_err(TestCaseError::fail)?;
    }
}

#[derive(Debug, Clone)]
struct CeCase {
    n: usize,
    h: usize,
    w: usize,
    heads: Vec<usize>,
    datasets: Vec<usize>,
    grad_scale: f32,
    seed: u64,
}

fn ce_strategy() -> impl Strategy<Value = CeCase> {
    (1usize..=3, 1usize..=4, 1usize..=4, proptest::collection::vec(2usize..=6, 1..=3), 0.25f32..2.0, any::<u64>())
        .prop_flat_map(|(n, h, w, heads, grad_scale, seed)| {
            let d = heads.len();
            proptest::collection::vec(0..d, n).prop_map(move |datasets| CeCase {
                n,
                h,
                w,
                heads: heads.clone(),
                datasets,
                grad_scale,
                seed,
            })
        })
}

fn check_cross_entropy(k: &CeCase) -> Result<(), String> {
    let be = backend();
    let mut r = Rng(k.seed);
    let cmax = *k.heads.iter().max().unwrap();
    let (hw, shape) = (k.h * k.w, [k.n, k.h, k.w, cmax]);
    // Padding channels hold NaN: a kernel reading them into the loss or the argmax shows it.
    let mut logits = vec![f32::NAN; shape.iter().product()];
    let mut labels = vec![0i32; k.n * hw];
    for (pix, label) in labels.iter_mut().enumerate() {
        let classes = k.heads[k.datasets[pix / hw]];
        for c in 0..classes {
            logits[pix * cmax + c] = (3.0 * r.normal()) as f32;
        }
        *label = if r.below(5) == 0 { 255 } else { r.below(classes) as i32 };
    }
    let weights: Vec<f32> = (0..k.heads.len()).map(|_| r.uniform(0.5, 2.0) as f32).collect();
    let opts = CrossEntropyOptions { weights: Some(weights.clone()), grad_scale: k.grad_scale };
    let ds_i: Vec<i32> = k.datasets.iter().map(|&d| d as i32).collect();
    let (tl, ty, tds) = (
        be.tensor_f32(&shape, &logits).unwrap(),
        be.tensor_i32(&[k.n, k.h, k.w], &labels).unwrap(),
        be.tensor_i32(&[k.n], &ds_i).unwrap(),
    );
    let l64 = arr4(shape, wide(&logits));
    let y64 = Array3::from_shape_vec((k.n, k.h, k.w), labels.iter().map(|&l| l as i64).collect()).unwrap();
    let w64 = wide(&weights);
    let want = rce::multi_head_cross_entropy(l64.view(), y64.view(), &k.datasets, &k.heads, &w64)
        .map_err(|e| e.to_string())?;
    let tol = |v: f64| 5e-5 * (1.0 + v.abs());
    let (loss, none) = be.cross_entropy(&tl, &ty, &tds, &k.heads, &opts, false).map_err(|e| e.to_string())?;
    if none.is_some() {
        return Err("a gradient without with_grad".into());
    }
    let (loss_g, dl) = be.cross_entropy(&tl, &ty, &tds, &k.heads, &opts, true).map_err(|e| e.to_string())?;
    for l in [&loss, &loss_g] {
        let per: Vec<f64> = l.per_dataset.iter().map(|&v| v as f64).collect();
        assert_close("per-dataset loss", &per, &want.per_dataset, |i| tol(want.per_dataset[i]))?;
        assert_close("total loss", &[l.total as f64], &[want.total], |_| 2.0 * tol(want.total))?;
    }
    let dl = dl.ok_or("no gradient with with_grad")?;
    let wg = flat(
        &rce::multi_head_cross_entropy_grad(l64.view(), y64.view(), &k.datasets, &k.heads, &w64, k.grad_scale as f64)
            .map_err(|e| e.to_string())?,
    );
    let got = read(&be, &dl);
    assert_close("dlogits", &got, &wg, |e| {
        let d = k.datasets[e / (hw * cmax)];
        5e-5 * (w64[d] / want.valid[d].max(1) as f64 * k.grad_scale as f64) + 2.0 * U * wg[e].abs()
    })?;
    if let Some(e) = (0..wg.len()).find(|&e| wg[e] == 0.0 && got[e] != 0.0) {
        return Err(format!("dlogits element {e} should be exactly 0, got {}", got[e]));
    }

    let pred = be.argmax(&tl, &tds, &k.heads).map_err(|e| e.to_string())?;
    let want_pred = rmet::argmax(l64.view(), &k.datasets, &k.heads).map_err(|e| e.to_string())?;
    if pred.shape() != [k.n, k.h, k.w]
        || be.to_i32(&pred).unwrap().into_iter().map(i64::from).collect::<Vec<_>>()
            != want_pred.iter().copied().collect::<Vec<_>>()
    {
        return Err("argmax differs from the reference".into());
    }

    // A label outside its head: typed error naming the first one.
    let mut bad = labels.clone();
    let at = r.below(bad.len());
    let d = k.datasets[at / hw];
    bad[at] = k.heads[d] as i32;
    let tbad = be.tensor_i32(&[k.n, k.h, k.w], &bad).unwrap();
    let first = (0..bad.len()).find(|&p| bad[p] != 255 && bad[p] >= k.heads[k.datasets[p / hw]] as i32).unwrap();
    for with_grad in [false, true] {
        match be.cross_entropy(&tl, &tbad, &tds, &k.heads, &opts, with_grad) {
            Err(Error::InvalidLabel { position, label, dataset, num_classes })
                if position == first
                    && label == bad[first] as i64
                    && dataset == k.datasets[first / hw]
                    && num_classes == k.heads[dataset] => {}
            other => return Err(format!("bad label at {first}: {other:?}")),
        }
    }
    // A dataset index past the heads.
    let mut bad_ds = ds_i.clone();
    let s = r.below(k.n);
    bad_ds[s] = k.heads.len() as i32;
    let tbad_ds = be.tensor_i32(&[k.n], &bad_ds).unwrap();
    let first = bad_ds.iter().position(|&v| v as usize >= k.heads.len()).unwrap();
    let expected =
        Error::DatasetIndexOutOfRange { sample: first, index: bad_ds[first] as i64, num_datasets: k.heads.len() };
    match be.cross_entropy(&tl, &ty, &tbad_ds, &k.heads, &opts, true) {
        Err(e) if e == expected => {}
        other => return Err(format!("bad dataset index in cross_entropy: {other:?}")),
    }
    match be.argmax(&tl, &tbad_ds, &k.heads) {
        Err(e) if e == expected => {}
        other => return Err(format!("bad dataset index in argmax: {other:?}")),
    }
    let wrong = be.tensor_i32(&[k.n, k.h + 1, k.w], &vec![0; k.n * (k.h + 1) * k.w]).unwrap();
    match be.cross_entropy(&tl, &wrong, &tds, &k.heads, &opts, false) {
        Err(Error::ShapeMismatch { .. }) => Ok(()),
        other => Err(format!("labels of the wrong shape: {other:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn cross_entropy_and_argmax_match_reference(k in ce_strategy()) {
        check_cross_entropy(&k).map_err(TestCaseError::fail)?;
    }
}

fn check_sgd(sizes: &[usize], momentum: f32, weight_decay: f32, seed: u64) -> Result<(), String> {
    let be = backend();
    let mut r = Rng(seed);
    let mut params: Vec<Tensor> =
        sizes.iter().map(|&s| be.tensor_f32(&[s], &normals(&mut r, s, 1.0)).unwrap()).collect();
    let mut bufs: Vec<Tensor> = sizes.iter().map(|&s| be.tensor_f32(&[s], &vec![f32::NAN; s]).unwrap()).collect();
    let lrs: Vec<f32> = sizes.iter().map(|_| r.uniform(0.001, 0.1) as f32).collect();
    let opts = SgdOptions { momentum, weight_decay };
    for step in 0..2 {
        let first = step == 0;
        let grads: Vec<Tensor> =
            sizes.iter().map(|&s| be.tensor_f32(&[s], &normals(&mut r, s, 1.0)).unwrap()).collect();
        let before_p: Vec<Vec<f64>> = params.iter().map(|t| read(&be, t)).collect();
        let before_b: Vec<Vec<f64>> = bufs.iter().map(|t| read(&be, t)).collect();
        let mut list: Vec<SgdTensor<'_, Tensor>> = params
            .iter_mut()
            .zip(bufs.iter_mut())
            .zip(&grads)
            .zip(&lrs)
            .map(|(((param, momentum_buffer), grad), &lr)| SgdTensor {
                param,
                grad,
                momentum_buffer,
                lr,
                frozen_rows: None,
            })
            .collect();
        be.sgd_step(&mut list, &opts, first).map_err(|e| e.to_string())?;
        for i in 0..sizes.len() {
            let g = read(&be, &grads[i]);
            let (mut p, mut b) = (before_p[i].clone(), before_b[i].clone());
            let (lr, m, wd) = (lrs[i] as f64, momentum as f64, weight_decay as f64);
            rsgd::sgd_step(&mut p, &g, &mut b, lr, m, wd, first);
            let d: Vec<f64> = g.iter().zip(&before_p[i]).map(|(g, p)| (g + wd * p).abs()).collect();
            assert_close(&format!("step {step} buffer {i}"), &read(&be, &bufs[i]), &b, |j| {
                4.0 * U * (b[j].abs() + d[j]) + 1e-38
            })?;
            assert_close(&format!("step {step} param {i}"), &read(&be, &params[i]), &p, |j| {
                4.0 * U * (p[j].abs() + lr * (b[j].abs() + d[j])) + 1e-38
            })?;
        }
    }
    // A gradient of another shape: typed error, nothing written.
    let before = read(&be, &params[0]);
    let wrong = be.zeros(&[sizes[0] + 1]).unwrap();
    let mut list =
        [SgdTensor { param: &mut params[0], grad: &wrong, momentum_buffer: &mut bufs[0], lr: 0.1, frozen_rows: None }];
    match be.sgd_step(&mut list, &opts, false) {
        Err(Error::ShapeMismatch { .. }) => {}
        other => return Err(format!("SGD with a wrong gradient shape: {other:?}")),
    }
    assert_close("param after error", &read(&be, &params[0]), &before, |_| 0.0)
}

/// The backend hands frozen rows to the kernel: DSBN-shaped [D, C] tables with absent
/// datasets step to the CPU backend's bits (both evaluate the formula with the same FMAs), and
/// frozen rows keep theirs.
#[test]
fn sgd_frozen_rows_match_cpu_backend() {
    let (be, cpu) = (backend(), CpuBackend::new());
    let mut r = Rng(77);
    let shapes: [(usize, usize, &[usize]); 4] = [(3, 64, &[1]), (5, 300, &[0, 2, 4]), (2, 8, &[0, 1]), (1, 5000, &[])];
    let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|&(d, c, _)| (normals(&mut r, d * c, 1.0), normals(&mut r, d * c, 0.1), normals(&mut r, d * c, 0.1)))
        .collect();
    let masks: Vec<FrozenRows> =
        shapes.iter().map(|&(_, c, rows)| FrozenRows::from_rows(c, rows.iter().copied()).unwrap()).collect();
    let opts = SgdOptions::default();
    let mut dev_out = Vec::new();
    let mut dev_in = Vec::new();
    {
        let t = |shape: [usize; 2], v: &[f32]| be.tensor_f32(&shape, v).unwrap();
        let mut ts: Vec<(Tensor, Tensor, Tensor)> = shapes
            .iter()
            .zip(&data)
            .map(|(&(d, c, _), (p, g, b))| (t([d, c], p), t([d, c], g), t([d, c], b)))
            .collect();
        let mut list: Vec<SgdTensor<'_, Tensor>> = ts
            .iter_mut()
            .zip(&masks)
            .map(|((p, g, b), &f)| SgdTensor {
                param: p,
                grad: &*g,
                momentum_buffer: b,
                lr: 0.05,
                frozen_rows: Some(f),
            })
            .collect();
        be.sgd_step(&mut list, &opts, false).unwrap();
        drop(list);
        for (p, _, b) in &ts {
            dev_out.push((bits(&be, p), bits(&be, b)));
        }
        for (p, _, b) in &data {
            dev_in.push((
                p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            ));
        }
    }
    let t = |shape: [usize; 2], v: &[f32]| cpu.tensor_f32(&shape, v).unwrap();
    let mut ts: Vec<_> =
        shapes.iter().zip(&data).map(|(&(d, c, _), (p, g, b))| (t([d, c], p), t([d, c], g), t([d, c], b))).collect();
    let mut list: Vec<SgdTensor<'_, _>> = ts
        .iter_mut()
        .zip(&masks)
        .map(|((p, g, b), &f)| SgdTensor { param: p, grad: &*g, momentum_buffer: b, lr: 0.05, frozen_rows: Some(f) })
        .collect();
    cpu.sgd_step(&mut list, &opts, false).unwrap();
    drop(list);
    for (i, ((p, _, b), &(_, c, rows))) in ts.iter().zip(&shapes).enumerate() {
        let cpu_p: Vec<u32> = cpu.to_f32(p).unwrap().iter().map(|v| v.to_bits()).collect();
        let cpu_b: Vec<u32> = cpu.to_f32(b).unwrap().iter().map(|v| v.to_bits()).collect();
        assert!(dev_out[i].0 == cpu_p && dev_out[i].1 == cpu_b, "tensor {i}: device and CPU backends differ");
        for j in 0..cpu_p.len() {
            let frozen = rows.contains(&(j / c));
            let kept = dev_out[i].0[j] == dev_in[i].0[j] && dev_out[i].1[j] == dev_in[i].1[j];
            assert!(!frozen || kept, "tensor {i} element {j}: a frozen row was written");
        }
        assert!(dev_out[i].0 != dev_in[i].0 || rows.len() == shapes[i].0, "tensor {i}: nothing moved");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn sgd_matches_reference(
        sizes in proptest::collection::vec(1usize..=300, 1..=3),
        momentum in 0.0f32..=0.99, weight_decay in 0.0f32..1e-2, seed in any::<u64>(),
    ) {
        check_sgd(&sizes, momentum, weight_decay, seed).map_err(TestCaseError::fail)?;
    }
}
