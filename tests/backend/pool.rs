//! Adaptive average pooling, bilinear resize and max pooling against the f64 reference.

use super::*;

// ---- pooling and resizing ---------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct PoolCase {
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) c: usize,
    pub(crate) align_corners: bool,
    pub(crate) seed: u64,
}

pub(crate) fn pool_strategy() -> impl Strategy<Value = PoolCase> {
    (1usize..=2, 1usize..=7, 1usize..=7, 1usize..=7, 1usize..=7, 1usize..=4, any::<bool>(), any::<u64>())
        .prop_map(|(n, h, w, oh, ow, c, align_corners, seed)| PoolCase { n, h, w, oh, ow, c, align_corners, seed })
}

pub(crate) fn check_pool<B: Backend>(be: &B, k: &PoolCase) -> Result<(), String> {
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
    assert_close("adaptive_avg_pool", &read(be, &y), &want, |i| 2.0 * (kb + 2) as f64 * U * mag[i] + 1e-30)?;
    let kk = (k.oh.div_ceil(k.h) + 1) * (k.ow.div_ceil(k.w) + 1);
    let dx = be.adaptive_avg_pool_backward(&tdy, (k.h, k.w)).map_err(|e| e.to_string())?;
    let want = flat(&rpool::adaptive_avg_pool2d_backward(dy64.view(), k.h, k.w));
    let mag = flat(&rpool::adaptive_avg_pool2d_backward(dya.view(), k.h, k.w));
    assert_close("adaptive_avg_pool_backward", &read(be, &dx), &want, |i| 2.0 * (kk + 2) as f64 * U * mag[i] + 1e-30)?;

    // Bilinear resize.
    let inp = k.h.max(k.w) as f64;
    let y = be.resize_bilinear(&tx, k.oh, k.ow, k.align_corners).map_err(|e| e.to_string())?;
    let want = flat(&rpool::resize_bilinear(x64.view(), k.oh, k.ow, k.align_corners));
    let m = abs(&wide(&x)).into_iter().fold(0.0, f64::max);
    assert_close("resize_bilinear", &read(be, &y), &want, |_| 2.0 * U * m * (8.0 * (inp + 2.0) + 3.0))?;
    let kr = ((k.oh.div_ceil(k.h) + 2) * (k.ow.div_ceil(k.w) + 2)) as f64;
    let mdy = abs(&wide(&dy)).into_iter().fold(0.0, f64::max);
    let dx = be.resize_bilinear_backward(&tdy, (k.h, k.w), k.align_corners).map_err(|e| e.to_string())?;
    let want = flat(&rpool::resize_bilinear_backward(dy64.view(), k.h, k.w, k.align_corners));
    assert_close("resize_bilinear_backward", &read(be, &dx), &want, |_| {
        2.0 * U * mdy * kr * (4.0 * (inp + 2.0) + kr + 4.0)
    })
}

#[derive(Debug, Clone)]
pub(crate) struct MaxCase {
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c: usize,
    pub(crate) geom: PoolGeometry,
    pub(crate) seed: u64,
}

pub(crate) fn max_strategy() -> impl Strategy<Value = MaxCase> {
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

pub(crate) fn check_max_pool<B: Backend>(be: &B, k: &MaxCase) -> Result<(), String> {
    if k.geom.output_size(k.h, k.w).is_err() {
        return Ok(()); // the window does not fit: nothing to compare (ops' own tests cover it)
    }
    let mut rng = Rng(k.seed);
    let xs = [k.n, k.h, k.w, k.c];
    // Few distinct values, so that windows hold ties (the first maximum must win).
    let x: Vec<f32> = (0..xs.iter().product()).map(|_| rng.below(5) as f32 - 2.0).collect();
    let tx = be.tensor_f32(&xs, &x).unwrap();
    let (y, idx) = be.max_pool2d(&tx, &k.geom).map_err(|e| e.to_string())?;
    let spec = rmax::PoolSpec { kernel: k.geom.kernel, stride: k.geom.stride, padding: k.geom.padding };
    let (wy, widx) = rmax::max_pool2d(arr4(xs, wide(&x)).view(), &spec);
    assert_close("max_pool2d", &read(be, &y), &flat(&wy), |_| 0.0)?;
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
    assert_close("max_pool2d_backward", &read(be, &dx), &want, |i| 2.0 * terms * U * mag[i])?;
    Ok(())
}

pub(crate) fn max_pool_backward_typed_errors_and_foreign_indices<B: Backend>(be: &B) {
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
