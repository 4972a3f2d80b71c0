//! The trainer's behaviour users rely on: gradients through the graph, DSBN rows of absent
//! datasets, checkpoints and resume, learning, typed errors, the deep-stem Bottleneck models.

use super::*;

/// Finite differences through the graph: d loss / d input of a DAB → PPM → head graph.
///
/// f32 central differences with step 1e-2 on an O(1) loss: truncation O(h²·L''') ≈ 1e-4 and
/// rounding ≈ 1e-7·|L| / h ≈ 1e-5, so a 2e-2 relative + 2e-3 absolute tolerance per
/// coordinate catches a wrong backward (errors of O(1)) while ReLU kinks crossed by ±h are
/// rare at these random inputs; at most one coordinate of 24 may be such a kink.
#[test]
fn gradient_check_dab_ppm_head() {
    let be = CpuBackend::new();
    let mut store = ParamStore::new(be);
    let dab =
        Dab::new(&mut store, DabSpec::backbone("conv", "bn", 3, 6, 3, ConvGeometry::square(1, 1, 1)), 2, 3).unwrap();
    let ppm: Vec<Dab> = [1usize, 2]
        .iter()
        .map(|b| {
            let (c, n) = (format!("ppm.{b}.conv"), format!("ppm.{b}.bn"));
            Dab::new(&mut store, DabSpec::head(&c, &n, 6, 2, 1, ConvGeometry::default()), 2, 4).unwrap()
        })
        .collect();
    let head = Classifier::new(&mut store, "cls", 10, 4, 0, 5).unwrap();
    let (n, h, w) = (4usize, 5usize, 6usize);
    let x0: Vec<f32> = (0..n * h * w * 3).map(|i| 2.0 * unit(9, i as u64) - 1.0).collect();
    let labels: Vec<i32> = (0..n * h * w).map(|i| (unit(11, i as u64) * 4.0) as i32).collect();
    let ds = [0, 1, 0, 1];
    let loss = |store: &mut ParamStore<CpuBackend>, x: &[f32], want: bool| -> (f32, Option<Vec<f32>>) {
        let mut g = Graph::new(&be, true);
        let xv = be.tensor_f32(&[n, h, w, 3], x).unwrap();
        let xv = if want { g.input_with_grad(xv) } else { g.input(xv) };
        let d = g.datasets(&ds).unwrap();
        let f = dab.forward(&mut g, store, xv, d, None, true).unwrap();
        let mut parts = vec![f];
        for (bin, p) in [1usize, 2].iter().zip(&ppm) {
            let pooled = g.adaptive_avg_pool(f, *bin, *bin).unwrap();
            let y = p.forward(&mut g, store, pooled, d, None, true).unwrap();
            parts.push(g.resize_bilinear(y, h, w, true).unwrap());
        }
        let cat = g.concat_channels(&parts).unwrap();
        let logits = head.forward(&mut g, store, cat).unwrap();
        let lab = g.input_i32(&[n, h, w], &labels).unwrap();
        let zeros = g.input_i32(&[n], &[0; 4]).unwrap();
        let l = g.cross_entropy(logits, lab, zeros, &LossSpec { num_classes: vec![4], ..LossSpec::default() }).unwrap();
        let root = g.weighted_sum(&[(l, 1.0)]);
        let v = g.scalar(root).unwrap();
        if !want {
            return (v, None);
        }
        let grads = g.backward(root, store).unwrap();
        let (_, dx) = grads.into_iter().find(|(var, _)| *var == xv).unwrap();
        (v, Some(be.to_f32(&dx).unwrap()))
    };
    let (_, dx) = loss(&mut store, &x0, true);
    let dx = dx.unwrap();
    let mut bad = 0;
    let step = 1e-2f32;
    for k in 0..24 {
        let i = (splitmix64(13, k) % x0.len() as u64) as usize;
        let mut xp = x0.clone();
        xp[i] += step;
        let mut xm = x0.clone();
        xm[i] -= step;
        let fd = (loss(&mut store, &xp, false).0 as f64 - loss(&mut store, &xm, false).0 as f64) / (2.0 * step as f64);
        let err = (fd - dx[i] as f64).abs();
        if err > 2e-3 + 2e-2 * fd.abs() {
            bad += 1;
            eprintln!("coordinate {i}: finite difference {fd}, backward {}", dx[i]);
        }
    }
    assert!(bad <= 1, "{bad} of 24 coordinates disagree");
    // The parameter gradients were accumulated too.
    assert!(store.weights().iter().all(|w| w.grad.is_some()));
    assert!(store.weights().iter().any(|w| w.group == Group::Head));
}

/// After a DAT step on datasets {0, 2} of three, dataset 1's running statistics, γ and β are
/// bit-for-bit unchanged, while datasets 0 and 2 moved.
#[test]
fn absent_dataset_untouched_end_to_end() {
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, tiny_model(vec![3, 4, 5], 0.1), TrainConfig::default()).unwrap();
    // Give dataset 1 non-initial values first, so "unchanged" is not "still at the default".
    t.step(&[batch(0, 2, 24, 24, 3, 1), batch(1, 2, 24, 24, 4, 2), batch(2, 2, 24, 24, 5, 3)]).unwrap();
    let before = snapshot(&t.store);
    t.step(&[batch(0, 2, 24, 24, 3, 4), batch(2, 2, 24, 24, 5, 5)]).unwrap();
    let after = snapshot(&t.store);
    let mut bn_tensors = 0;
    for ((name, va, _), (_, vb, _)) in before.iter().zip(&after) {
        if !(name.ends_with(".gamma") || name.ends_with(".beta") || name.contains(".running_")) {
            continue;
        }
        bn_tensors += 1;
        let c = va.len() / 3;
        assert_eq!(va[c..2 * c], vb[c..2 * c], "{name}: dataset 1 changed");
        if name.contains(".running_") {
            assert_ne!(va[..c], vb[..c], "{name}: dataset 0 did not move");
            assert_ne!(va[2 * c..], vb[2 * c..], "{name}: dataset 2 did not move");
        }
    }
    assert!(bn_tensors > 80);
    // Dataset 1's classifier did not move either (no gradient: skipped by SGD).
    for ((name, va, _), (_, vb, _)) in before.iter().zip(&after) {
        if name.starts_with("cls.4.1.") || name.starts_with("aux.4.1.") {
            assert_eq!(va, vb, "{name} changed");
        }
    }
}

/// γ and β of the datasets present in a step move, those of an absent dataset do not, and an
/// absent dataset's momentum rows stay as they were: zero while it has never been stepped.
/// Covers DAT over a subset, DSBN without DAT (one step per batch) and mixed batches.
#[test]
fn present_datasets_train_bn_absent_ones_keep_theirs() {
    let be = CpuBackend::new();
    for mode in [Mode::Dat, Mode::DsbnNoDat, Mode::Mixed] {
        let config = TrainConfig { mode: mode.clone(), ..TrainConfig::default() };
        let mut t = Trainer::new(&be, tiny_model(vec![3, 4, 5], 0.0), config).unwrap();
        let rows = |t: &Trainer<CpuBackend>| -> Vec<[Vec<f32>; 4]> {
            t.store
                .bn_layers()
                .iter()
                .map(|l| {
                    let [g, b, ..] = l.tables.tables();
                    let mom = |m: &Option<_>| m.as_ref().map_or_else(Vec::new, |m| be.to_f32(m).unwrap());
                    [be.to_f32(g).unwrap(), be.to_f32(b).unwrap(), mom(&l.momentum_gamma), mom(&l.momentum_beta)]
                })
                .collect()
        };
        let check = |before: &[[Vec<f32>; 4]], after: &[[Vec<f32>; 4]], present: &[usize], step: &str| {
            for (li, (a, b)) in before.iter().zip(after).enumerate() {
                let c = b[0].len() / 3;
                for d in 0..3 {
                    let r = d * c..(d + 1) * c;
                    for (k, what) in ["gamma", "beta"].iter().enumerate() {
                        if present.contains(&d) {
                            assert_ne!(a[k][r.clone()], b[k][r.clone()], "{mode:?} {step}: layer {li} {what} of {d}");
                        } else {
                            assert_eq!(a[k][r.clone()], b[k][r.clone()], "{mode:?} {step}: layer {li} {what} of {d}");
                            // Never stepped: the buffer is zero (or absent before the first step).
                            let was = a[2 + k].get(r.clone()).map_or(vec![0.0; c], <[f32]>::to_vec);
                            assert_eq!(was, b[2 + k][r.clone()], "{mode:?} {step}: layer {li} {what} momentum of {d}");
                        }
                    }
                }
            }
        };
        let r0 = rows(&t);
        t.step(&[batch(0, 2, 24, 24, 3, 1), batch(2, 2, 24, 24, 5, 3)]).unwrap();
        let r1 = rows(&t);
        check(&r0, &r1, &[0, 2], "first step");
        t.step(&[batch(0, 2, 24, 24, 3, 4), batch(1, 2, 24, 24, 4, 5), batch(2, 2, 24, 24, 5, 6)]).unwrap();
        check(&r1, &rows(&t), &[0, 1, 2], "second step");
    }
}

/// A model with more BN slices than the SGD step's frozen-row mask names is refused up front.
#[test]
fn more_than_64_bn_slices_is_a_typed_error() {
    let be = CpuBackend::new();
    let r = Trainer::new(&be, tiny_model(vec![2; 65], 0.0), TrainConfig::default());
    assert!(matches!(r, Err(cdcl::Error::InvalidArgument(_))), "{r:?}");
}

/// Training 4 iterations equals training 2, saving, loading into a fresh trainer and training
/// 2 more: every parameter, running statistic and momentum buffer bit for bit.
/// Our convolution fuses a block's normalisation into the next convolution for at most 8
/// datasets; a model with more trains through the unfused chain, on both backends alike.
#[test]
fn more_datasets_than_the_fused_prologue_holds_train_unfused() {
    let classes = vec![2; 9];
    for (name, losses) in [
        ("cpu", {
            let be = CpuBackend::new();
            let mut t = Trainer::new(&be, tiny_model(classes.clone(), 0.0), TrainConfig::default()).unwrap();
            t.step(&[batch(0, 2, 16, 16, 2, 1), batch(8, 2, 16, 16, 2, 2)]).unwrap().per_dataset
        }),
        ("emulator", {
            let be = device_backend();
            let mut t = Trainer::new(&be, tiny_model(classes.clone(), 0.0), TrainConfig::default()).unwrap();
            t.step(&[batch(0, 2, 16, 16, 2, 1), batch(8, 2, 16, 16, 2, 2)]).unwrap().per_dataset
        }),
    ] {
        assert!(losses[0].is_finite() && losses[8].is_finite(), "{name}: {losses:?}");
    }
}

#[test]
fn resume_is_bitwise() {
    let be = CpuBackend::new();
    let cfg = TrainConfig { max_iters: 4, ..TrainConfig::default() };
    let data = |it: u64| vec![batch(0, 2, 24, 24, 3, 50 + it), batch(1, 2, 24, 24, 2, 60 + it)];
    let mut full = Trainer::new(&be, tiny_model(vec![3, 2], 0.1), cfg.clone()).unwrap();
    for it in 0..4 {
        full.step(&data(it)).unwrap();
    }
    let mut first = Trainer::new(&be, tiny_model(vec![3, 2], 0.1), cfg.clone()).unwrap();
    for it in 0..2 {
        first.step(&data(it)).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("cdcl-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ck.safetensors");
    first.save_checkpoint(&path).unwrap();
    let mut resumed = Trainer::new(&be, tiny_model(vec![3, 2], 0.1), cfg).unwrap();
    resumed.load_checkpoint(&path).unwrap();
    assert_eq!(resumed.iteration(), 2);
    for it in 2..4 {
        resumed.step(&data(it)).unwrap();
    }
    assert_eq!(snapshot(&full.store), snapshot(&resumed.store));
    let (ca, cb) = (full.checkpoint().unwrap(), resumed.checkpoint().unwrap());
    assert_eq!(ca.tensors, cb.tensors, "momentum buffers or batch counters differ");
    std::fs::remove_dir_all(&dir).ok();
}

/// A checkpoint holds PyTorch names and layouts: conv weights `[K, C, R, S]`, one BatchNorm2d
/// per dataset, `num_batches_tracked` as i64 scalars.
#[test]
fn checkpoint_names_and_layouts() {
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, tiny_model(vec![3, 2], 0.1), TrainConfig::default()).unwrap();
    t.step(&[batch(0, 2, 24, 24, 3, 1), batch(1, 2, 24, 24, 2, 2)]).unwrap();
    let ck = t.checkpoint().unwrap();
    let conv1 = ck.get("conv1.weight").unwrap();
    assert_eq!(conv1.shape, vec![4, 3, 7, 7]);
    let ours = t.store.weights().iter().find(|w| w.name == "conv1.weight").unwrap();
    let krsc = be.to_f32(&ours.value).unwrap();
    let cdcl::checkpoint::TensorData::F32(kcrs) = &conv1.data else { panic!("conv1 is not f32") };
    // Element (k=1, c=2, r=3, s=4).
    assert_eq!(kcrs[((3 + 2) * 7 + 3) * 7 + 4], krsc[((7 + 3) * 7 + 4) * 3 + 2]);
    for name in ["layer1.0.bn1.bn.1.running_mean", "layer4.1.conv2.weight", "cls.4.1.bias", "aux.4.0.weight"] {
        assert!(ck.get(name).is_some(), "{name} missing");
    }
    let tracked = ck.get("layer1.0.bn1.bn.0.num_batches_tracked").unwrap();
    assert_eq!(tracked.shape, Vec::<usize>::new());
    assert_eq!(tracked.data, cdcl::checkpoint::TensorData::I64(vec![1]));
    assert!(ck.get("optimizer.conv1.weight.momentum_buffer").is_some());
}

/// A learnable task: each image quadrant has its class's colour (plus noise); the labels are
/// the quadrants' classes.
fn quadrant_batch(dataset: usize, n: usize, hw: usize, classes: usize, seed: u64) -> Batch {
    let mut images = Vec::with_capacity(n * hw * hw * 3);
    let mut labels = Vec::with_capacity(n * hw * hw);
    for s in 0..n {
        for y in 0..hw {
            for x in 0..hw {
                let q = 2 * (y * 2 / hw) + x * 2 / hw;
                let class = (q + s) % classes;
                labels.push(class as i32);
                for ch in 0..3 {
                    let i = (((s * hw + y) * hw + x) * 3 + ch) as u64;
                    let colour = if (class >> ch) & 1 == 1 { 1.0 } else { -1.0 };
                    images.push(colour + 0.3 * (unit(seed, i) - 0.5));
                }
            }
        }
    }
    Batch { dataset, n, h: hw, w: hw, images, labels }
}

/// Training moves the loss down on a learnable task, and the same seed gives the same bits.
#[test]
fn training_learns_and_is_deterministic() {
    let be = CpuBackend::new();
    let run = || {
        let cfg = TrainConfig { max_iters: 30, ..TrainConfig::default() };
        let mut t = Trainer::new(&be, tiny_model(vec![3, 2], 0.1), cfg).unwrap();
        let fixed = vec![quadrant_batch(0, 2, 32, 3, 5), quadrant_batch(1, 2, 32, 2, 6)];
        (0..30).map(|_| t.step(&fixed).unwrap().total).collect::<Vec<f32>>()
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    let first: f32 = a[..3].iter().sum();
    let last: f32 = a[27..].iter().sum();
    assert!(last < 0.7 * first, "loss did not fall: {a:?}");
}

/// Bad batches are typed errors and change nothing.
#[test]
fn bad_input_is_a_typed_error() {
    let be = CpuBackend::new();
    let mut t = Trainer::new(&be, tiny_model(vec![3, 2], 0.1), TrainConfig::default()).unwrap();
    let before = snapshot(&t.store);
    let mut bad_label = batch(1, 2, 24, 24, 2, 1);
    bad_label.labels[17] = 2; // dataset 1 has 2 classes
    let err = t.step(&[batch(0, 2, 24, 24, 3, 1), bad_label]).unwrap_err();
    assert!(matches!(err, cdcl::Error::InvalidLabel { dataset: 1, label: 2, position: 17, num_classes: 2 }), "{err:?}");
    let mut short = batch(0, 2, 24, 24, 3, 1);
    short.images.pop();
    assert!(matches!(t.step(&[short]).unwrap_err(), cdcl::Error::InvalidShape { .. }));
    assert!(t.step(&[batch(2, 2, 24, 24, 3, 1)]).is_err(), "dataset 2 does not exist");
    // Parameters unchanged (running statistics of the forward that failed at the loss are
    // the one exception a PyTorch user knows too; compare only trainable tensors).
    for ((name, va, _), (_, vb, _)) in before.iter().zip(&snapshot(&t.store)) {
        if !name.contains(".running_") {
            assert_eq!(va, vb, "{name} changed");
        }
    }
    assert_eq!(t.iteration(), 0);
}

/// The Bottleneck ResNets with the deep stem build with PyTorch's names and train a step; the
/// feature map is at 1/8 of the input (output stride 8) whatever the depth.
#[test]
fn resnet50_deep_stem_builds_and_steps() {
    let be = CpuBackend::new();
    let model = ModelConfig { depth: Depth::R50, deep_stem: true, ..tiny_model(vec![3, 2], 0.1) };
    let mut t = Trainer::new(&be, model, TrainConfig::default()).unwrap();
    let names: Vec<&str> = t.store.weights().iter().map(|w| w.name.as_str()).collect();
    for n in ["conv3.weight", "layer1.0.downsample.0.weight", "layer3.5.conv3.weight", "layer4.2.conv2.weight"] {
        assert!(names.contains(&n), "{n} missing");
    }
    let s = t.step(&[batch(0, 2, 32, 32, 3, 1), batch(1, 2, 32, 32, 2, 2)]).unwrap();
    assert!(s.total.is_finite());
    let mut g = Graph::new(&be, false);
    let x = g.input(be.tensor_f32(&[1, 40, 48, 3], &vec![0.5; 40 * 48 * 3]).unwrap());
    let ds = g.datasets(&[1]).unwrap();
    let out = t.model.forward(&mut g, &mut t.store, x, ds, 1, 0).unwrap();
    assert_eq!(cdcl::backend::TensorLike::shape(g.value(out.main)), &[1, 5, 6, 2]);
    assert!(out.aux.is_none(), "no auxiliary head in evaluation");
    assert!(matches!(Depth::parse("resnet152"), Err(cdcl::Error::InvalidArgument(_))));
}

/// The CPU backend's work split depends on the shapes only: two DAT steps give the same bits —
/// losses, every parameter, gradient and running statistic — with 1, 2 and 4 rayon threads.
/// The 40×40 images make the stem's and layer1's convolutions span several GEMM tiles.
#[test]
fn cpu_steps_same_bits_for_1_2_and_4_threads() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let be = CpuBackend::new();
            let cfg = TrainConfig { max_iters: 10, ..TrainConfig::default() };
            let mut t = Trainer::new(&be, tiny_model(vec![3, 2], 0.1), cfg).unwrap();
            let fixed = vec![quadrant_batch(0, 2, 40, 3, 5), quadrant_batch(1, 3, 40, 2, 6)];
            let losses: Vec<u32> = (0..2).map(|_| t.step(&fixed).unwrap().total.to_bits()).collect();
            let params: Vec<(String, Vec<u32>)> = snapshot(&t.store)
                .into_iter()
                .flat_map(|(name, v, g)| {
                    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
                    let grad = g.map(|g| (format!("{name}.grad"), bits(g)));
                    std::iter::once((name, bits(v))).chain(grad)
                })
                .collect();
            (losses, params)
        })
    };
    let one = run(1);
    for threads in [2, 4] {
        let other = run(threads);
        assert_eq!(one.0, other.0, "losses differ between 1 and {threads} threads");
        assert_eq!(one.1.len(), other.1.len());
        for ((name, a), (_, b)) in one.1.iter().zip(&other.1) {
            assert!(a == b, "{name} differs between 1 and {threads} threads");
        }
    }
}
