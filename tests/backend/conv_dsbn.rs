//! Convolution and DSBN against the f64 reference.

use super::*;

// ---- convolution ------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct ConvCase {
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c: usize,
    pub(crate) k: usize,
    pub(crate) r: usize,
    pub(crate) s: usize,
    pub(crate) geom: ConvGeometry,
    pub(crate) bias: bool,
    pub(crate) seed: u64,
}

pub(crate) fn conv_strategy() -> impl Strategy<Value = ConvCase> {
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

pub(crate) fn check_conv<B: Backend>(be: &B, k: &ConvCase) -> Result<(), String> {
    let Ok((p, q)) = k.geom.output_size(k.h, k.w, k.r, k.s) else {
        return Ok(()); // the filter does not fit: nothing to compare (ops' own tests cover it)
    };
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
    assert_close("conv2d", &read(be, &y), &flat(&want), |i| 2.0 * g * mag[i] + 1e-30)?;

    let grads = rconv::conv2d_backward(dy64.view(), x64.view(), w64.view(), &spec);
    let mags = rconv::conv2d_backward(dya.view(), xa.view(), wa.view(), &spec);
    let dx = be.conv2d_backward_data(&tdy, &tw, (k.h, k.w), &k.geom).map_err(|e| e.to_string())?;
    let (mdx, g) = (flat(&mags.dx), gamma(k.r * k.s * k.k));
    assert_close("conv2d_backward_data", &read(be, &dx), &flat(&grads.dx), |i| 2.0 * g * mdx[i] + 1e-30)?;
    let (dw, db) = be.conv2d_backward_filter(&tdy, &tx, (k.k, k.r, k.s), k.bias, &k.geom).map_err(|e| e.to_string())?;
    let (mdw, g) = (flat(&mags.dw), gamma(k.n * p * q));
    assert_close("conv2d_backward_filter", &read(be, &dw), &flat(&grads.dw), |i| 2.0 * g * mdw[i] + 1e-30)?;
    match (db, k.bias) {
        (Some(db), true) => {
            let mdb = flat(&mags.dbias);
            assert_close("bias gradient", &read(be, &db), &flat(&grads.dbias), |i| 2.0 * g * mdb[i] + 1e-30)?;
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

// ---- DSBN -------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct BnCase {
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) c: usize,
    pub(crate) d: usize,
    pub(crate) relu: bool,
    pub(crate) residual: bool,
    pub(crate) datasets: Vec<usize>,
    pub(crate) seed: u64,
}

pub(crate) fn bn_strategy() -> impl Strategy<Value = BnCase> {
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

fn upload_bn<B: Backend>(be: &B, k: &BnCase, data: &BnData) -> B::Bn {
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

pub(crate) fn check_dsbn<B: Backend>(be: &B, k: &BnCase) -> Result<(), String> {
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
    let bn0 = upload_bn(be, k, &data);
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
    assert_close("infer y", &read(be, &yi), &wyi, |i| 1e-5 * (1.0 + wyi[i].abs() + res64[i].abs()))?;

    // Training forward. The reference has no residual form: BN without ReLU, then + r, then ReLU.
    let mut bn = upload_bn(be, k, &data);
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
                    assert_close("running_mean after error", &read(be, rm), &tab[2], |_| 0.0)?;
                    assert_close("running_var after error", &read(be, rv), &tab[3], |_| 0.0)
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
    assert_close("train y", &read(be, &y), &wy, |i| 1e-4 * (1.0 + wy[i].abs()))?;
    let (wmean, winv) = (flat(&want.mean), flat(&want.invstd));
    assert_close("saved mean", &read(be, saved.mean()), &wmean, |i| 1e-5 * (1.0 + wmean[i].abs()))?;
    assert_close("saved invstd", &read(be, saved.invstd()), &winv, |i| 1e-5 * winv[i])?;
    // Running statistics moved exactly once (absent datasets: bit for bit unchanged). Moving them
    // twice would miss by 0.09 |batch - running|, far outside the tolerance: checked below, so
    // this comparison can tell once from twice.
    let present = |i: usize| want.counts[i / k.c] > 0;
    let tol = |i: usize, v: f64| if present(i) { 1e-5 * (1.0 + v.abs()) } else { 0.0 };
    let [_, _, rm, rv] = bn.tables();
    let (wrm, wrv) = (flat(&want.running_mean), flat(&want.running_var));
    assert_close("running_mean", &read(be, rm), &wrm, |i| tol(i, wrm[i]))?;
    assert_close("running_var", &read(be, rv), &wrv, |i| tol(i, wrv[i]))?;
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
    assert_close("dbeta", &read(be, &grads.dbeta), &flat(&wg.dbeta), |i| 1e-5 * sums[i])?;
    assert_close("dgamma", &read(be, &grads.dgamma), &flat(&wg.dgamma), |i| 1e-5 * sums[i])?;
    let wdx = flat(&wg.dx);
    assert_close("dx", &read(be, &grads.dx), &wdx, |e| {
        let s = group(e);
        let m = want.counts[s / k.c] as f64;
        1e-4 * tab[0][s].abs() * winv[s] * (g[e].abs() + sums[s] / m * (1.0 + xhat(e).abs())) + 1e-7
    })?;
    match (&grads.dresidual, k.residual) {
        (Some(dr), true) => assert_close("dresidual", &read(be, dr), &g, |_| 0.0)?,
        (None, false) => {}
        (dr, _) => return Err(format!("dresidual {dr:?} with residual = {}", k.residual)),
    }

    Ok(())
}

/// The residual form on fixed mixes, both ReLU settings: a dataset absent from the batch, and
/// one with a single sample beside a larger one.
pub(crate) fn dsbn_residual_named_mixes<B: Backend>(be: &B) {
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
            check_dsbn(be, &k).unwrap_or_else(|e| panic!("{k:?}: {e}"));
        }
    }
}

pub(crate) fn bn_new_and_tables<B: Backend>(be: &B) {
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
pub(crate) fn dsbn_errors_leave_running_statistics_alone<B: Backend>(be: &B) {
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
