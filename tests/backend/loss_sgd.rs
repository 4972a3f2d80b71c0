//! Dropout, the cross-entropy, argmax and the optimiser against the f64 reference.

use super::*;

// ---- dropout, loss, metrics, optimiser --------------------------------------------------------

pub(crate) fn check_dropout<B: Backend>(
    be: &B,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    p: f32,
    seed: u64,
) -> Result<(), String> {
    let mut r = Rng(seed);
    let shape = [n, h, w, c];
    let x = normals(&mut r, shape.iter().product(), 1.0);
    let opts = Dropout2dOptions { p, seed: r.next_u64() };
    let tx = be.tensor_f32(&shape, &x).unwrap();
    let y = be.dropout2d(&tx, &opts).map_err(|e| e.to_string())?;
    let want = flat(&rdrop::dropout2d(arr4(shape, wide(&x)).view(), p as f64, opts.seed));
    assert_close("dropout2d", &read(be, &y), &want, |i| 4.0 * U * want[i].abs())?;
    let dx = be.dropout2d_backward(&tx, &opts).map_err(|e| e.to_string())?;
    let want = flat(&rdrop::dropout2d_backward(arr4(shape, wide(&x)).view(), p as f64, opts.seed));
    assert_close("dropout2d_backward", &read(be, &dx), &want, |i| 4.0 * U * want[i].abs())
}

#[derive(Debug, Clone)]
pub(crate) struct CeCase {
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) heads: Vec<usize>,
    pub(crate) datasets: Vec<usize>,
    pub(crate) grad_scale: f32,
    pub(crate) seed: u64,
}

pub(crate) fn ce_strategy() -> impl Strategy<Value = CeCase> {
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

pub(crate) fn check_cross_entropy<B: Backend>(be: &B, k: &CeCase) -> Result<(), String> {
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
    let ce = CrossEntropyOptions { weights: Some(weights.clone()), grad_scale: k.grad_scale };
    let opts = |with_grad: bool| LossOptions { ce: ce.clone(), upsample: None, with_grad };
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
    let (loss, none) = be.cross_entropy(&tl, &ty, &tds, &k.heads, &opts(false)).map_err(|e| e.to_string())?;
    if none.is_some() {
        return Err("a gradient without with_grad".into());
    }
    let (loss_g, dl) = be.cross_entropy(&tl, &ty, &tds, &k.heads, &opts(true)).map_err(|e| e.to_string())?;
    for l in [&loss, &loss_g] {
        // [total, per dataset...], left on the backend until read.
        let v = read(be, l);
        assert_close("per-dataset loss", &v[1..], &want.per_dataset, |i| tol(want.per_dataset[i]))?;
        assert_close("total loss", &v[..1], &[want.total], |_| 2.0 * tol(want.total))?;
    }
    let dl = dl.ok_or("no gradient with with_grad")?;
    let wg = flat(
        &rce::multi_head_cross_entropy_grad(l64.view(), y64.view(), &k.datasets, &k.heads, &w64, k.grad_scale as f64)
            .map_err(|e| e.to_string())?,
    );
    let got = read(be, &dl);
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
        match be.cross_entropy(&tl, &tbad, &tds, &k.heads, &opts(with_grad)) {
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
    match be.cross_entropy(&tl, &ty, &tbad_ds, &k.heads, &opts(true)) {
        Err(e) if e == expected => {}
        other => return Err(format!("bad dataset index in cross_entropy: {other:?}")),
    }
    match be.argmax(&tl, &tbad_ds, &k.heads) {
        Err(e) if e == expected => {}
        other => return Err(format!("bad dataset index in argmax: {other:?}")),
    }
    let wrong = be.tensor_i32(&[k.n, k.h + 1, k.w], &vec![0; k.n * (k.h + 1) * k.w]).unwrap();
    match be.cross_entropy(&tl, &wrong, &tds, &k.heads, &opts(false)) {
        Err(Error::ShapeMismatch { .. }) => Ok(()),
        other => Err(format!("labels of the wrong shape: {other:?}")),
    }
}

pub(crate) fn check_sgd<B: Backend>(
    be: &B,
    sizes: &[usize],
    momentum: f32,
    weight_decay: f32,
    seed: u64,
) -> Result<(), String> {
    let mut r = Rng(seed);
    let mut params: Vec<B::Tensor> =
        sizes.iter().map(|&s| be.tensor_f32(&[s], &normals(&mut r, s, 1.0)).unwrap()).collect();
    let mut bufs: Vec<B::Tensor> = sizes.iter().map(|&s| be.tensor_f32(&[s], &vec![f32::NAN; s]).unwrap()).collect();
    let lrs: Vec<f32> = sizes.iter().map(|_| r.uniform(0.001, 0.1) as f32).collect();
    let opts = SgdOptions { momentum, weight_decay };
    for step in 0..2 {
        let first = step == 0;
        let grads: Vec<B::Tensor> =
            sizes.iter().map(|&s| be.tensor_f32(&[s], &normals(&mut r, s, 1.0)).unwrap()).collect();
        let before_p: Vec<Vec<f64>> = params.iter().map(|t| read(be, t)).collect();
        let before_b: Vec<Vec<f64>> = bufs.iter().map(|t| read(be, t)).collect();
        let mut list: Vec<SgdTensor<'_, B::Tensor>> = params
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
                copy: None,
            })
            .collect();
        be.sgd_step(&mut list, &opts, first, None).map_err(|e| e.to_string())?;
        for i in 0..sizes.len() {
            let g = read(be, &grads[i]);
            let (mut p, mut b) = (before_p[i].clone(), before_b[i].clone());
            let (lr, m, wd) = (lrs[i] as f64, momentum as f64, weight_decay as f64);
            rsgd::sgd_step(&mut p, &g, &mut b, lr, m, wd, first);
            let d: Vec<f64> = g.iter().zip(&before_p[i]).map(|(g, p)| (g + wd * p).abs()).collect();
            assert_close(&format!("step {step} buffer {i}"), &read(be, &bufs[i]), &b, |j| {
                4.0 * U * (b[j].abs() + d[j]) + 1e-38
            })?;
            assert_close(&format!("step {step} param {i}"), &read(be, &params[i]), &p, |j| {
                4.0 * U * (p[j].abs() + lr * (b[j].abs() + d[j])) + 1e-38
            })?;
        }
    }
    // A gradient of another shape: typed error, nothing written.
    let before = read(be, &params[0]);
    let wrong = be.zeros(&[sizes[0] + 1]).unwrap();
    let mut list = [SgdTensor {
        param: &mut params[0],
        grad: &wrong,
        momentum_buffer: &mut bufs[0],
        lr: 0.1,
        frozen_rows: None,
        copy: None,
    }];
    match be.sgd_step(&mut list, &opts, false, None) {
        Err(Error::ShapeMismatch { .. }) => {}
        other => return Err(format!("SGD with a wrong gradient shape: {other:?}")),
    }
    assert_close("param after error", &read(be, &params[0]), &before, |_| 0.0)
}

/// The backend hands frozen rows to the kernel: DSBN-shaped [D, C] tables with absent
/// datasets step to the CPU backend's bits (both evaluate the formula with the same FMAs), and
/// frozen rows keep theirs.
pub(crate) fn sgd_frozen_rows_match_cpu_backend<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
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
        let mut ts: Vec<(B::Tensor, B::Tensor, B::Tensor)> = shapes
            .iter()
            .zip(&data)
            .map(|(&(d, c, _), (p, g, b))| (t([d, c], p), t([d, c], g), t([d, c], b)))
            .collect();
        let mut list: Vec<SgdTensor<'_, B::Tensor>> = ts
            .iter_mut()
            .zip(&masks)
            .map(|((p, g, b), &f)| SgdTensor {
                param: p,
                grad: &*g,
                momentum_buffer: b,
                lr: 0.05,
                frozen_rows: Some(f),
                copy: None,
            })
            .collect();
        be.sgd_step(&mut list, &opts, false, None).unwrap();
        drop(list);
        for (p, _, b) in &ts {
            dev_out.push((bits(be, p), bits(be, b)));
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
        .map(|((p, g, b), &f)| SgdTensor {
            param: p,
            grad: &*g,
            momentum_buffer: b,
            lr: 0.05,
            frozen_rows: Some(f),
            copy: None,
        })
        .collect();
    cpu.sgd_step(&mut list, &opts, false, None).unwrap();
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

/// Per group the in-order f32 sum times the scale (both backends add in f32 in order: bit for
/// bit), and the overflow flag: 0 for finite inputs, 1 once a source holds an infinity.
pub(crate) fn check_sum_scaled<B: Backend>(
    be: &B,
    sizes: &[(usize, usize)],
    dtype: DType,
    scale: f32,
    seed: u64,
) -> Result<(), String> {
    let mut r = Rng(seed);
    let round = |x: f32| match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    };
    let host: Vec<Vec<Vec<f32>>> = sizes
        .iter()
        .map(|&(len, parts)| (0..parts).map(|_| normals(&mut r, len, 10.0).into_iter().map(round).collect()).collect())
        .collect();
    let tensors: Vec<Vec<B::Tensor>> = host
        .iter()
        .zip(sizes)
        .map(|(g, &(len, _))| g.iter().map(|v| be.tensor_float(&[len], v, dtype).unwrap()).collect())
        .collect();
    let refs: Vec<Vec<&B::Tensor>> = tensors.iter().map(|g| g.iter().collect()).collect();
    let groups: Vec<&[&B::Tensor]> = refs.iter().map(Vec::as_slice).collect();
    let (sums, flag) = be.sum_scaled(&groups, scale).map_err(|e| e.to_string())?;
    for (i, (g, s)) in host.iter().zip(&sums).enumerate() {
        let want: Vec<u32> =
            (0..g[0].len()).map(|e| (g.iter().fold(0.0f32, |a, p| a + p[e]) * scale).to_bits()).collect();
        if TensorLike::dtype(s) != DType::F32 || bits(be, s) != want {
            return Err(format!("group {i}: not the in-order f32 sum times the scale"));
        }
    }
    if be.to_f32(&flag).unwrap() != [0.0] {
        return Err("overflow flag set for finite inputs".into());
    }
    let mut bad = host[0][0].clone();
    let mid = bad.len() / 2;
    bad[mid] = f32::INFINITY;
    let tb = be.tensor_float(&[bad.len()], &bad, dtype).unwrap();
    let (_, flag) = be.sum_scaled(&[&[&tb][..]], scale).map_err(|e| e.to_string())?;
    if be.to_f32(&flag).unwrap() != [1.0] {
        return Err("overflow flag not set for an infinite input".into());
    }
    Ok(())
}

/// The 16-bit copy of a parameter is exactly the rounded updated parameter, a set skip flag
/// writes nothing at all, and a copy is refused on a tensor with frozen rows (the kernel's copy
/// pass does not track rows; only f32 DSBN tables freeze rows).
pub(crate) fn sgd_copies_and_skip<B: Backend>(be: &B) {
    let mut r = Rng(3);
    for dtype in [DType::BF16, DType::F16] {
        let (d, c) = (3, 1500); // two chunks of the kernel's 4096
        let p0 = normals(&mut r, d * c, 1.0);
        let g0 = normals(&mut r, d * c, 0.5);
        let mut p = be.tensor_f32(&[d, c], &p0).unwrap();
        let g = be.tensor_f32(&[d, c], &g0).unwrap();
        let mut b = be.tensor_f32(&[d, c], &vec![0.0; d * c]).unwrap();
        let stale = vec![7.0f32; d * c];
        let mut copy = be.tensor_float(&[d, c], &stale, dtype).unwrap();
        let opts = SgdOptions::default();
        // Skipped: the flag is set, nothing moves.
        let flag = be.tensor_f32(&[1], &[1.0]).unwrap();
        let mut list = [SgdTensor {
            param: &mut p,
            grad: &g,
            momentum_buffer: &mut b,
            lr: 0.1,
            frozen_rows: None,
            copy: Some(&mut copy),
        }];
        be.sgd_step(&mut list, &opts, false, Some(&flag)).unwrap();
        assert_eq!(be.to_f32(&p).unwrap(), p0, "{dtype}: a skipped step moved a parameter");
        assert_eq!(be.to_f32(&b).unwrap(), vec![0.0; d * c], "{dtype}: a skipped step moved a buffer");
        assert_eq!(be.to_f32(&copy).unwrap(), stale, "{dtype}: a skipped step wrote a copy");
        // Not skipped: the copy is the rounded new parameter.
        let clear = be.tensor_f32(&[1], &[0.0]).unwrap();
        let mut list = [SgdTensor {
            param: &mut p,
            grad: &g,
            momentum_buffer: &mut b,
            lr: 0.1,
            frozen_rows: None,
            copy: Some(&mut copy),
        }];
        be.sgd_step(&mut list, &opts, false, Some(&clear)).unwrap();
        let (pn, cn) = (be.to_f32(&p).unwrap(), be.to_f32(&copy).unwrap());
        for e in 0..d * c {
            let want = if dtype == DType::F16 { f16::from_f32(pn[e]).to_f32() } else { bf16::from_f32(pn[e]).to_f32() };
            assert_eq!(cn[e].to_bits(), want.to_bits(), "{dtype} element {e}");
        }
        assert_ne!(pn, p0, "{dtype}: the step did nothing");
        // Refused: a copy that is not 16-bit, a copy on a tensor with frozen rows.
        let before = be.to_f32(&p).unwrap();
        let mut not_half = be.tensor_f32(&[d, c], &p0).unwrap();
        let mut list = [SgdTensor {
            param: &mut p,
            grad: &g,
            momentum_buffer: &mut b,
            lr: 0.1,
            frozen_rows: None,
            copy: Some(&mut not_half),
        }];
        assert!(matches!(be.sgd_step(&mut list, &opts, false, None), Err(Error::UnsupportedDType { .. })));
        let mut list = [SgdTensor {
            param: &mut p,
            grad: &g,
            momentum_buffer: &mut b,
            lr: 0.1,
            frozen_rows: Some(FrozenRows::from_rows(c, [1]).unwrap()),
            copy: Some(&mut copy),
        }];
        assert!(matches!(be.sgd_step(&mut list, &opts, false, None), Err(Error::InvalidArgument(_))));
        assert_eq!(be.to_f32(&p).unwrap(), before, "{dtype}: a refused step wrote");
    }
}
