//! The fused ops — the dataset-aware block, the pyramid pooling module, the loss with the
//! upsampling fused in — against the same backend's primitives: with tolerances on random cases
//! (the device DAB takes its statistics from the convolution's epilogue), and bit for bit in f32
//! where the fusion only moves work (the prologue against a separate apply pass, the one-kernel
//! inference block, the PPM, the upsampled loss).

use super::*;

// ---- the dataset-aware block ------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct DabCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    r: usize,
    geom: ConvGeometry,
    d: usize,
    datasets: Vec<i32>,
    relu: bool,
    residual: bool,
    prologue: bool,
    seed: u64,
}

pub(crate) fn dab_strategy() -> impl Strategy<Value = DabCase> {
    (2usize..=4, 3usize..=6, 3usize..=6, 1usize..=6, 1usize..=6, prop_oneof![Just(1usize), Just(3)], 1usize..=2)
        .prop_flat_map(|(n, h, w, c, k, r, stride)| {
            (
                Just((n, h, w, c, k, r, stride)),
                1usize..=3,
                any::<(bool, bool, bool)>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), n),
            )
        })
        .prop_map(|((n, h, w, c, k, r, stride), d, (relu, residual, prologue), seed, raw)| {
            // Every dataset index in range; each dataset present has at least 2 samples' pixels.
            let datasets = raw.iter().map(|&v| (v as usize % d) as i32).collect();
            let pad = r / 2;
            DabCase {
                n,
                h,
                w,
                c,
                k,
                r,
                geom: ConvGeometry::square(stride, pad, 1),
                d,
                datasets,
                relu,
                residual,
                prologue,
                seed,
            }
        })
}

fn random_bn<B: Backend>(be: &B, d: usize, c: usize, r: &mut Rng) -> B::Bn {
    let mut bn = be.bn_new(d, c).unwrap();
    let ranges = [(0.5, 1.5), (-0.5, 0.5), (-0.5, 0.5), (0.5, 2.0)];
    for (t, (lo, hi)) in bn.tables_mut().into_iter().zip(ranges) {
        let v: Vec<f32> = (0..d * c).map(|_| r.uniform(lo, hi) as f32).collect();
        be.write_f32(t, &v).unwrap();
    }
    bn
}

fn copy_bn<B: Backend>(be: &B, bn: &B::Bn, d: usize, c: usize) -> B::Bn {
    let mut out = be.bn_new(d, c).unwrap();
    for (t, s) in out.tables_mut().into_iter().zip(bn.tables()) {
        be.write_f32(t, &be.to_f32(s).unwrap()).unwrap();
    }
    out
}

/// |got − want| ≤ rel · max|want| (+ a floor): for tensors whose error is set by a statistics
/// difference spread over the whole tensor.
fn close_to_scale(what: &str, got: &[f64], want: &[f64], rel: f64) -> Result<(), String> {
    let m = want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    assert_close(what, got, want, |_| rel * m + 1e-6)
}

pub(crate) fn check_dab<B: Backend>(be: &B, k: &DabCase) -> Result<(), String> {
    let Ok((p, q)) = k.geom.output_size(k.h, k.w, k.r, k.r) else { return Ok(()) };
    let mut r = Rng(k.seed);
    let xs = [k.n, k.h, k.w, k.c];
    let ys = [k.n, p, q, k.k];
    // Enough values per (dataset, channel) for batch statistics.
    if p * q < 2 {
        return Ok(());
    }
    let x = be.tensor_f32(&xs, &normals(&mut r, xs.iter().product(), 1.0)).unwrap();
    let w = be.tensor_f32(&[k.k, k.r, k.r, k.c], &normals(&mut r, k.k * k.r * k.r * k.c, 0.5)).unwrap();
    let ds = be.tensor_i32(&[k.n], &k.datasets).unwrap();
    let res = be.tensor_f32(&ys, &normals(&mut r, ys.iter().product(), 1.0)).unwrap();
    let residual = k.residual.then_some(&res);
    let dsbn = DsbnOptions { relu: k.relu, ..DsbnOptions::default() };
    let bn0 = random_bn(be, k.d, k.k, &mut r);
    let (mut bn_f, mut bn_c) = (copy_bn(be, &bn0, k.d, k.k), copy_bn(be, &bn0, k.d, k.k));
    // The previous block's normalisation, for the prologue case: x is its raw output.
    let mut prev = random_bn(be, k.d, k.c, &mut r);
    let (a, prev_stats) = be.dsbn_forward_train(&x, &ds, &mut prev, &DsbnOptions { relu: true, ..dsbn }, None).unwrap();
    let a = if k.prologue { a } else { be.try_clone(&x).unwrap() };
    let opts = DabOptions {
        prologue: k.prologue.then_some(cdcl::backend::Prologue { bn: &prev, stats: &prev_stats, relu: true }),
        residual,
        ..DabOptions::new(k.geom, dsbn)
    };
    let input = DabInput { x: &x, weight: &w, datasets: &ds };
    let f = be.dab_forward_train(input, &mut bn_f, &opts).map_err(|e| e.to_string())?;
    let conv = be.conv2d(&a, &w, None, &k.geom).unwrap();
    let (y, saved) = be.dsbn_forward_train(&conv, &ds, &mut bn_c, &dsbn, residual).unwrap();
    let out = f.output.as_ref().ok_or("no output with materialize")?;
    let (gy, wy) = (read(be, out), read(be, &y));
    assert_close("DAB output", &gy, &wy, |i| 1e-4 * (1.0 + wy[i].abs()))?;
    assert_close("DAB conv output", &read(be, &f.conv_out), &read(be, &conv), |_| 1e-5)?;
    for (i, (tf, tc)) in bn_f.tables().iter().zip(bn_c.tables()).enumerate() {
        let want = read(be, tc);
        assert_close(&format!("table {i}"), &read(be, tf), &want, |j| 1e-5 * (1.0 + want[j].abs()))?;
    }
    // Backward, with dy zeroed where the mask is ambiguous (the two statistics paths may round
    // a pre-activation within 1e-3 of zero to either side).
    let (cv, mean, inv) = (read(be, &conv), read(be, saved.mean()), read(be, saved.invstd()));
    let (gm, bt) = (read(be, bn_c.tables()[0]), read(be, bn_c.tables()[1]));
    let rv = read(be, &res);
    let hwq = p * q;
    let dy: Vec<f32> = normals(&mut r, ys.iter().product(), 1.0)
        .into_iter()
        .enumerate()
        .map(|(e, g)| {
            let s = k.datasets[e / (hwq * k.k)] as usize * k.k + e % k.k;
            let pre = (cv[e] - mean[s]) * inv[s] * gm[s] + bt[s] + if k.residual { rv[e] } else { 0.0 };
            if k.relu && pre.abs() < 1e-3 {
                0.0
            } else {
                g
            }
        })
        .collect();
    let tdy = be.tensor_f32(&ys, &dy).unwrap();
    let g = be
        .dab_backward(&tdy, input, &bn_f, DabSaved { conv_out: &f.conv_out, stats: &f.stats }, &opts)
        .map_err(|e| e.to_string())?;
    let gc = be.dsbn_backward_train(&tdy, &conv, residual, &ds, &bn_c, &saved, &dsbn).unwrap();
    let dx = be.conv2d_backward_data(&gc.dx, &w, (k.h, k.w), &k.geom).unwrap();
    let (dw, _) = be.conv2d_backward_filter(&gc.dx, &a, (k.k, k.r, k.r), false, &k.geom).unwrap();
    let gdx = g.dx.as_ref().ok_or("no input gradient")?;
    close_to_scale("DAB dx", &read(be, gdx), &read(be, &dx), 1e-3)?;
    close_to_scale("DAB dweight", &read(be, &g.dweight), &read(be, &dw), 1e-3)?;
    close_to_scale("DAB dgamma", &read(be, &g.dgamma), &read(be, &gc.dgamma), 1e-3)?;
    close_to_scale("DAB dbeta", &read(be, &g.dbeta), &read(be, &gc.dbeta), 1e-3)?;
    match (&g.dresidual, &gc.dresidual) {
        (Some(a), Some(b)) => close_to_scale("DAB dresidual", &read(be, a), &read(be, b), 1e-3)?,
        (None, None) => {}
        other => return Err(format!("dresidual: {other:?}")),
    }
    // The inference block against conv → inference DSBN (+ residual, ReLU).
    let opts_inf = DabOptions { residual, ..DabOptions::new(k.geom, dsbn) };
    let yi = be.dab_forward_infer(DabInput { x: &a, ..input }, &bn_c, &opts_inf).map_err(|e| e.to_string())?;
    let conv_a = be.conv2d(&a, &w, None, &k.geom).unwrap();
    let wi = be.dsbn_forward_infer(&conv_a, &ds, &bn_c, &dsbn, residual).unwrap();
    let want = read(be, &wi);
    assert_close("inference DAB", &read(be, &yi), &want, |i| 1e-5 * (1.0 + want[i].abs()))
}

/// Bad dataset indices, a residual of the wrong shape, a residual without the output written:
/// typed errors, and the running statistics unmoved.
pub(crate) fn dab_errors_move_nothing<B: Backend>(be: &B) {
    let mut r = Rng(5);
    let x = be.tensor_f32(&[3, 4, 4, 2], &normals(&mut r, 96, 1.0)).unwrap();
    let w = be.tensor_f32(&[3, 3, 3, 2], &normals(&mut r, 54, 1.0)).unwrap();
    let mut bn = be.bn_new(2, 3).unwrap();
    let g = ConvGeometry::square(1, 1, 1);
    let bad = be.tensor_i32(&[3], &[0, 2, 1]).unwrap();
    let good = be.tensor_i32(&[3], &[0, 1, 1]).unwrap();
    let opts = DabOptions::new(g, DsbnOptions { relu: true, ..DsbnOptions::default() });
    let err = be.dab_forward_train(DabInput { x: &x, weight: &w, datasets: &bad }, &mut bn, &opts).unwrap_err();
    assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 1, index: 2, num_datasets: 2 });
    let err = be.dab_forward_infer(DabInput { x: &x, weight: &w, datasets: &bad }, &bn, &opts).unwrap_err();
    assert_eq!(err, Error::DatasetIndexOutOfRange { sample: 1, index: 2, num_datasets: 2 });
    let short = be.tensor_f32(&[3, 4, 3, 3], &[0.0; 108]).unwrap();
    let with_short = DabOptions { residual: Some(&short), ..opts };
    let input = DabInput { x: &x, weight: &w, datasets: &good };
    assert!(matches!(be.dab_forward_train(input, &mut bn, &with_short), Err(Error::ShapeMismatch { .. })));
    let right = be.tensor_f32(&[3, 4, 4, 3], &[0.0; 144]).unwrap();
    let unwritten = DabOptions { residual: Some(&right), materialize: false, ..opts };
    assert!(matches!(be.dab_forward_train(input, &mut bn, &unwritten), Err(Error::InvalidArgument(_))));
    let [_, _, rm, rv] = bn.tables();
    assert_eq!(be.to_f32(rm).unwrap(), vec![0.0; 6]);
    assert_eq!(be.to_f32(rv).unwrap(), vec![1.0; 6]);
    // The same call with good input moves them (so the checks above could fail).
    be.dab_forward_train(input, &mut bn, &opts).unwrap();
    assert_ne!(be.to_f32(bn.tables()[2]).unwrap(), vec![0.0; 6]);
}

// ---- the loss with the upsampling fused in ----------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct LossCase {
    n: usize,
    lh: usize,
    lw: usize,
    h: usize,
    w: usize,
    heads: Vec<usize>,
    datasets: Vec<usize>,
    align: bool,
    seed: u64,
}

pub(crate) fn loss_strategy() -> impl Strategy<Value = LossCase> {
    (1usize..=3, 1usize..=4, 1usize..=4, 1usize..=9, 1usize..=9, proptest::collection::vec(2usize..=5, 1..=3))
        .prop_flat_map(|(n, lh, lw, h, w, heads)| {
            let d = heads.len();
            (Just((n, lh, lw, h, w, heads)), proptest::collection::vec(0..d, n), any::<bool>(), any::<u64>())
        })
        .prop_map(|((n, lh, lw, h, w, heads), datasets, align, seed)| LossCase {
            n,
            lh,
            lw,
            h,
            w,
            heads,
            datasets,
            align,
            seed,
        })
}

/// Bit for bit in f32: loss and dlogits of the fused op equal resize → loss → resize backward.
pub(crate) fn check_upsampled_loss<B: Backend>(be: &B, k: &LossCase) -> Result<(), String> {
    let mut r = Rng(k.seed);
    let cmax = *k.heads.iter().max().unwrap();
    let logits = normals(&mut r, k.n * k.lh * k.lw * cmax, 2.0);
    let labels: Vec<i32> = (0..k.n * k.h * k.w)
        .map(|p| if r.below(6) == 0 { 255 } else { r.below(k.heads[k.datasets[p / (k.h * k.w)]]) as i32 })
        .collect();
    let tl = be.tensor_f32(&[k.n, k.lh, k.lw, cmax], &logits).unwrap();
    let ty = be.tensor_i32(&[k.n, k.h, k.w], &labels).unwrap();
    let ds: Vec<i32> = k.datasets.iter().map(|&d| d as i32).collect();
    let tds = be.tensor_i32(&[k.n], &ds).unwrap();
    let ce = CrossEntropyOptions { weights: None, grad_scale: 0.75 };
    let fused = LossOptions { ce: ce.clone(), upsample: Some(k.align), with_grad: true };
    let (loss, d) = be.cross_entropy(&tl, &ty, &tds, &k.heads, &fused).map_err(|e| e.to_string())?;
    let up = be.resize_bilinear(&tl, k.h, k.w, k.align).unwrap();
    let plain = LossOptions { ce, upsample: None, with_grad: true };
    let (loss_c, d_up) = be.cross_entropy(&up, &ty, &tds, &k.heads, &plain).unwrap();
    let dc = be.resize_bilinear_backward(d_up.as_ref().unwrap(), (k.lh, k.lw), k.align).unwrap();
    if bits(be, &loss) != bits(be, &loss_c) {
        return Err(format!("losses {:?} vs {:?}", read(be, &loss), read(be, &loss_c)));
    }
    if bits(be, d.as_ref().ok_or("no dlogits")?) != bits(be, &dc) {
        return Err("dlogits differ from the composition".into());
    }
    Ok(())
}

// ---- the pyramid pooling module ---------------------------------------------------------------

#[derive(Debug, Clone)]
pub(crate) struct PpmCase {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    bins: Vec<usize>,
    ks: Vec<usize>,
    d: usize,
    datasets: Vec<i32>,
    align: bool,
    seed: u64,
}

pub(crate) fn ppm_strategy() -> impl Strategy<Value = PpmCase> {
    (2usize..=4, 2usize..=7, 2usize..=7, 1usize..=5, proptest::collection::vec((1usize..=4, 1usize..=4), 1..=3))
        .prop_flat_map(|(n, h, w, c, levels)| (Just((n, h, w, c, levels)), 1usize..=2, any::<bool>(), any::<u64>()))
        .prop_map(|((n, h, w, c, levels), d, align, seed)| {
            // Each dataset present has at least two samples: a 1×1 bin then has two values to
            // normalise per (dataset, channel).
            let d = if n >= 2 * d { d } else { 1 };
            PpmCase {
                n,
                h,
                w,
                c,
                bins: levels.iter().map(|l| l.0).collect(),
                ks: levels.iter().map(|l| l.1).collect(),
                d,
                datasets: (0..n).map(|i| (i * d / n) as i32).collect(),
                align,
                seed,
            }
        })
}

fn ppm_opts(k: &PpmCase) -> PpmOptions {
    PpmOptions {
        bins: k.bins.clone(),
        align_corners: k.align,
        dsbn: DsbnOptions { relu: true, ..DsbnOptions::default() },
    }
}

/// The PPM's forward and backward against pool → DAB → resize → concat and its backward; bit
/// for bit (f32: the fused op moves work, it does not change the arithmetic).
pub(crate) fn check_ppm<B: Backend>(be: &B, k: &PpmCase) -> Result<(), String> {
    let mut r = Rng(k.seed);
    let xs = [k.n, k.h, k.w, k.c];
    let x = be.tensor_f32(&xs, &normals(&mut r, xs.iter().product(), 1.0)).unwrap();
    let ds = be.tensor_i32(&[k.n], &k.datasets).unwrap();
    let weights: Vec<B::Tensor> =
        k.ks.iter().map(|&kk| be.tensor_f32(&[kk, 1, 1, k.c], &normals(&mut r, kk * k.c, 0.7)).unwrap()).collect();
    let bn0: Vec<B::Bn> = k.ks.iter().map(|&kk| random_bn(be, k.d, kk, &mut r)).collect();
    let mut bn_f: Vec<B::Bn> = bn0.iter().zip(&k.ks).map(|(b, &kk)| copy_bn(be, b, k.d, kk)).collect();
    let mut bn_c: Vec<B::Bn> = bn0.iter().zip(&k.ks).map(|(b, &kk)| copy_bn(be, b, k.d, kk)).collect();
    let opts = ppm_opts(k);
    let mut views: Vec<PpmBranchMut<'_, B>> =
        weights.iter().zip(bn_f.iter_mut()).map(|(weight, bn)| PpmBranchMut { weight, bn }).collect();
    let (out, saved) = be.ppm_forward_train(&x, &ds, &mut views, &opts).map_err(|e| e.to_string())?;
    drop(views);
    let dab = DabOptions::new(ConvGeometry::default(), opts.dsbn);
    let mut parts = vec![be.try_clone(&x).unwrap()];
    let mut kept = Vec::new();
    for ((w, bn), &b) in weights.iter().zip(bn_c.iter_mut()).zip(&k.bins) {
        let pooled = be.adaptive_avg_pool(&x, b, b).unwrap();
        let f = be.dab_forward_train(DabInput { x: &pooled, weight: w, datasets: &ds }, bn, &dab).unwrap();
        parts.push(be.resize_bilinear(f.output.as_ref().unwrap(), k.h, k.w, k.align).unwrap());
        kept.push((pooled, f));
    }
    let out_c = be.concat_channels(&parts.iter().collect::<Vec<_>>()).unwrap();
    // The identity slice is copied by pooling at the input's size on the device (−0 becomes +0):
    // compare values, which treat the two zeros as equal, then bits elsewhere.
    if read(be, &out) != read(be, &out_c) {
        return Err("PPM output differs from the composition".into());
    }
    for (bf, bc) in bn_f.iter().zip(&bn_c) {
        for (tf, tc) in bf.tables().iter().zip(bc.tables()) {
            if bits(be, tf) != bits(be, tc) {
                return Err("PPM running statistics differ from the composition".into());
            }
        }
    }
    let total = k.c + k.ks.iter().sum::<usize>();
    let dy = be.tensor_f32(&[k.n, k.h, k.w, total], &normals(&mut r, k.n * k.h * k.w * total, 1.0)).unwrap();
    let refs: Vec<PpmBranchRef<'_, B>> =
        weights.iter().zip(&bn_f).map(|(weight, bn)| PpmBranchRef { weight, bn }).collect();
    let g = be.ppm_backward(&dy, &ds, &refs, &saved, &opts).map_err(|e| e.to_string())?;
    let mut dx = be.slice_channels(&dy, 0, k.c).unwrap();
    let mut off = k.c;
    for (i, ((w, bn), (pooled, f))) in weights.iter().zip(&bn_c).zip(&kept).enumerate() {
        let b = k.bins[i];
        let dslice = be.slice_channels(&dy, off, k.ks[i]).unwrap();
        let dlow = be.resize_bilinear_backward(&dslice, (b, b), k.align).unwrap();
        let input = DabInput { x: pooled, weight: w, datasets: &ds };
        let gb = be.dab_backward(&dlow, input, bn, DabSaved { conv_out: &f.conv_out, stats: &f.stats }, &dab).unwrap();
        let dp = be.adaptive_avg_pool_backward(gb.dx.as_ref().unwrap(), (k.h, k.w)).unwrap();
        dx = be.add(&dx, &dp).unwrap();
        for (what, a, c) in [
            ("dweight", &g.branches[i].dweight, &gb.dweight),
            ("dgamma", &g.branches[i].dgamma, &gb.dgamma),
            ("dbeta", &g.branches[i].dbeta, &gb.dbeta),
        ] {
            if bits(be, a) != bits(be, c) {
                return Err(format!("PPM branch {i} {what} differs from the composition"));
            }
        }
        off += k.ks[i];
    }
    if bits(be, &g.dx) != bits(be, &dx) {
        return Err("PPM dx differs from the composition".into());
    }
    Ok(())
}

// ---- fixed bit-for-bit cases --------------------------------------------------------------------

/// Bit for bit in f32: a block leaving its output to the next convolution's prologue, against
/// the same two blocks with the output written (forward values, statistics, every gradient), and
/// the one-kernel inference block against convolution → inference DSBN.
pub(crate) fn fused_paths_are_bitwise_compositions<B: Backend>(be: &B) {
    let mut r = Rng(31);
    let (n, h, w, c, k1, k2) = (3, 7, 6, 5, 6, 4);
    let x = be.tensor_f32(&[n, h, w, c], &normals(&mut r, n * h * w * c, 1.0)).unwrap();
    let w1 = be.tensor_f32(&[k1, 3, 3, c], &normals(&mut r, k1 * 9 * c, 0.4)).unwrap();
    let w2 = be.tensor_f32(&[k2, 3, 3, k1], &normals(&mut r, k2 * 9 * k1, 0.4)).unwrap();
    let ds = be.tensor_i32(&[n], &[1, 0, 1]).unwrap();
    let g = ConvGeometry::square(1, 2, 2);
    let dsbn = DsbnOptions { relu: true, ..DsbnOptions::default() };
    let dy_host = normals(&mut r, n * h * w * k2, 1.0);
    let run = |fused: bool| -> Vec<Vec<u32>> {
        let mut bn1 = be.bn_new(2, k1).unwrap();
        let mut bn2 = be.bn_new(2, k2).unwrap();
        let first = DabOptions { materialize: !fused, ..DabOptions::new(g, dsbn) };
        let b1 = be.dab_forward_train(DabInput { x: &x, weight: &w1, datasets: &ds }, &mut bn1, &first).unwrap();
        let (x2, second) = match &b1.output {
            None => (
                &b1.conv_out,
                DabOptions {
                    prologue: Some(cdcl::backend::Prologue { bn: &bn1, stats: &b1.stats, relu: true }),
                    ..DabOptions::new(g, dsbn)
                },
            ),
            Some(y) => (y, DabOptions::new(g, dsbn)),
        };
        let in2 = DabInput { x: x2, weight: &w2, datasets: &ds };
        let b2 = be.dab_forward_train(in2, &mut bn2, &second).unwrap();
        let dy = be.tensor_f32(b2.output.as_ref().unwrap().shape(), &dy_host).unwrap();
        let g2 =
            be.dab_backward(&dy, in2, &bn2, DabSaved { conv_out: &b2.conv_out, stats: &b2.stats }, &second).unwrap();
        let in1 = DabInput { x: &x, weight: &w1, datasets: &ds };
        let g1 = be
            .dab_backward(
                g2.dx.as_ref().unwrap(),
                in1,
                &bn1,
                DabSaved { conv_out: &b1.conv_out, stats: &b1.stats },
                &first,
            )
            .unwrap();
        let mut out: Vec<Vec<u32>> = vec![bits(be, b2.output.as_ref().unwrap()), bits(be, &b1.conv_out)];
        for t in [
            &g2.dweight,
            &g2.dgamma,
            &g2.dbeta,
            g2.dx.as_ref().unwrap(),
            &g1.dweight,
            &g1.dgamma,
            &g1.dbeta,
            g1.dx.as_ref().unwrap(),
        ] {
            out.push(bits(be, t));
        }
        out.extend(bn1.tables().iter().chain(bn2.tables().iter()).map(|t| bits(be, t)));
        out
    };
    let (fused, separate) = (run(true), run(false));
    for (i, (a, b)) in fused.iter().zip(&separate).enumerate() {
        assert!(a == b, "output {i}: the prologue-fused chain differs from the separate apply pass");
    }
    // Inference: one kernel against convolution → inference DSBN (with and without a residual).
    let mut bn = random_bn(be, 2, k1, &mut r);
    be.dab_forward_train(DabInput { x: &x, weight: &w1, datasets: &ds }, &mut bn, &DabOptions::new(g, dsbn)).unwrap();
    let res = be.tensor_f32(&[n, h, w, k1], &normals(&mut r, n * h * w * k1, 1.0)).unwrap();
    for residual in [None, Some(&res)] {
        let opts = DabOptions { residual, ..DabOptions::new(g, dsbn) };
        let y = be.dab_forward_infer(DabInput { x: &x, weight: &w1, datasets: &ds }, &bn, &opts).unwrap();
        let conv = be.conv2d(&x, &w1, None, &g).unwrap();
        let want = be.dsbn_forward_infer(&conv, &ds, &bn, &dsbn, residual).unwrap();
        assert!(bits(be, &y) == bits(be, &want), "inference DAB (residual {}) differs", residual.is_some());
    }
    // The PPM and the upsampled loss on fixed cases (the proptests above vary them).
    let ppm = PpmCase {
        n: 4,
        h: 6,
        w: 5,
        c: 3,
        bins: vec![1, 2, 3, 6],
        ks: vec![2, 2, 1, 3],
        d: 2,
        datasets: vec![0, 1, 1, 0],
        align: true,
        seed: 9,
    };
    check_ppm(be, &ppm).unwrap();
    let loss =
        LossCase { n: 2, lh: 3, lw: 4, h: 24, w: 32, heads: vec![5, 3], datasets: vec![1, 0], align: true, seed: 4 };
    check_upsampled_loss(be, &loss).unwrap();
}

// ---- determinism pipeline -----------------------------------------------------------------------

/// A forward and backward through every op, fused ones included, with shapes that split into
/// many pieces (several GEMM tiles and column blocks, several pixel chunks per sample); the bits
/// of every output.
pub(crate) fn pipeline<B: Backend>(b: &B) -> Vec<Vec<u32>> {
    let mut rng = Rng(99);
    let mut out = Vec::new();
    let t = |shape: &[usize], rng: &mut Rng, scale: f64| {
        b.tensor_f32(shape, &normals(rng, shape.iter().product(), scale)).unwrap()
    };
    let x = t(&[2, 48, 48, 16], &mut rng, 1.0);
    let w = t(&[24, 3, 3, 16], &mut rng, 0.2);
    let bias = t(&[24], &mut rng, 0.1);
    let g = ConvGeometry::square(1, 2, 2);
    let y = b.conv2d(&x, &w, Some(&bias), &g).unwrap();
    let ds = b.tensor_i32(&[2], &[1, 0]).unwrap();
    let mut bn = b.bn_new(2, 24).unwrap();
    let res = t(&[2, 48, 48, 24], &mut rng, 1.0);
    let opt = DsbnOptions { relu: true, ..DsbnOptions::default() };
    let (z, saved) = b.dsbn_forward_train(&y, &ds, &mut bn, &opt, Some(&res)).unwrap();
    let pooled = b.adaptive_avg_pool(&z, 6, 6).unwrap();
    let up = b.resize_bilinear(&pooled, 48, 48, false).unwrap();
    let logits = b.concat_channels(&[&z, &up]).unwrap();
    let logits = b.slice_channels(&logits, 20, 8).unwrap();
    let labels: Vec<i32> = (0..2 * 48 * 48).map(|i| if i % 7 == 0 { 255 } else { i % 5 }).collect();
    let lopts = LossOptions { with_grad: true, ..LossOptions::default() };
    let (loss, dlogits) =
        b.cross_entropy(&logits, &b.tensor_i32(&[2, 48, 48], &labels).unwrap(), &ds, &[8, 5], &lopts).unwrap();
    out.push(bits(b, &loss));
    let dl = dlogits.unwrap();
    let dz = b.resize_bilinear_backward(&b.adaptive_avg_pool(&dl, 6, 6).unwrap(), (48, 48), true).unwrap();
    let dz = b.add(&dz, &b.dropout2d(&dl, &Dropout2dOptions { p: 0.3, seed: 5 }).unwrap()).unwrap();
    let dz = b.concat_channels(&[&dz, &b.zeros(&[2, 48, 48, 16]).unwrap()]).unwrap();
    let grads = b.dsbn_backward_train(&dz, &y, Some(&res), &ds, &bn, &saved, &opt).unwrap();
    let dx = b.conv2d_backward_data(&grads.dx, &w, (48, 48), &g).unwrap();
    let (dw, db) = b.conv2d_backward_filter(&grads.dx, &x, (24, 3, 3), true, &g).unwrap();
    let (mp, idx) = b.max_pool2d(&z, &PoolGeometry::default()).unwrap();
    let dmp = b.max_pool2d_backward(&mp, &idx, (48, 48), &PoolGeometry::default()).unwrap();
    let pred = b.argmax(&logits, &ds, &[8, 5]).unwrap();
    // The fused ops: a deferred block into a prologue block, the PPM, the upsampled loss.
    let w2 = t(&[8, 3, 3, 24], &mut rng, 0.2);
    let mut bn2 = b.bn_new(2, 8).unwrap();
    let d1 = DabOptions { materialize: false, ..DabOptions::new(g, opt) };
    let f1 = b.dab_forward_train(DabInput { x: &x, weight: &w, datasets: &ds }, &mut bn, &d1).unwrap();
    let d2 = DabOptions {
        prologue: Some(cdcl::backend::Prologue { bn: &bn, stats: &f1.stats, relu: true }),
        ..DabOptions::new(g, opt)
    };
    let in2 = DabInput { x: &f1.conv_out, weight: &w2, datasets: &ds };
    let f2 = b.dab_forward_train(in2, &mut bn2, &d2).unwrap();
    let dy2 = t(&[2, 48, 48, 8], &mut rng, 1.0);
    let g2 = b.dab_backward(&dy2, in2, &bn2, DabSaved { conv_out: &f2.conv_out, stats: &f2.stats }, &d2).unwrap();
    let wp = t(&[3, 1, 1, 8], &mut rng, 0.5);
    let mut bnp = b.bn_new(2, 3).unwrap();
    let popts = PpmOptions { bins: vec![1, 3], ..PpmOptions::default() };
    let wp2 = t(&[2, 1, 1, 8], &mut rng, 0.5);
    let mut bnp2 = b.bn_new(2, 2).unwrap();
    let o2 = f2.output.as_ref().unwrap();
    let mut views = vec![PpmBranchMut { weight: &wp, bn: &mut bnp }, PpmBranchMut { weight: &wp2, bn: &mut bnp2 }];
    // One dataset for the pyramid: its 1×1 bin needs two values per (dataset, channel).
    let ds0 = b.tensor_i32(&[2], &[0, 0]).unwrap();
    let (pout, psaved) = b.ppm_forward_train(o2, &ds0, &mut views, &popts).unwrap();
    drop(views);
    let refs = vec![PpmBranchRef { weight: &wp, bn: &bnp }, PpmBranchRef { weight: &wp2, bn: &bnp2 }];
    let pg = b.ppm_backward(&pout, &ds0, &refs, &psaved, &popts).unwrap();
    let small = b.adaptive_avg_pool(&pout, 6, 6).unwrap();
    let uopts = LossOptions { upsample: Some(true), with_grad: true, ..LossOptions::default() };
    let lab13 = b.tensor_i32(&[2, 48, 48], &labels).unwrap();
    let (uloss, ud) = b.cross_entropy(&b.slice_channels(&small, 0, 8).unwrap(), &lab13, &ds, &[8, 5], &uopts).unwrap();
    for t in [&y, &z, saved.mean(), saved.invstd(), &up, &dl, &grads.dx, &grads.dgamma, &grads.dbeta, &dx, &dw] {
        out.push(bits(b, t));
    }
    for t in [db.as_ref().unwrap(), grads.dresidual.as_ref().unwrap(), &mp, &idx, &dmp, &pred, o2, &f1.conv_out] {
        out.push(bits(b, t));
    }
    for t in
        [&g2.dweight, g2.dx.as_ref().unwrap(), &pout, &pg.dx, &pg.branches[1].dweight, &uloss, ud.as_ref().unwrap()]
    {
        out.push(bits(b, t));
    }
    out.extend(bn.tables().iter().map(|t| bits(b, t)));
    out
}
