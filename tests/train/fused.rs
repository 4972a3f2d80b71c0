//! Every fused path of the graph against the unfused composition it replaces, bit for bit in
//! f32, on each backend: a block that leaves its normalisation to the next convolution's
//! prologue against the same chain with the activation written; the one-kernel inference block
//! against convolution → inference DSBN; the PPM op against pool → block → upsample → concat;
//! the loss with the upsampling fused in against resize → loss. Values, running statistics and
//! every gradient (the graph gathers them the same way on both paths).

use super::*;
use cdcl::autograd::{BnId, DabCall, Datasets, Var, WeightId};
use cdcl::backend::TensorLike;
use cdcl::ops::dsbn::DsbnOptions;
use cdcl::ops::ppm::PpmOptions;
use cdcl::train::Interval;

/// Bits of every tensor a graph path produced and of every parameter state and gradient after
/// its backward.
type Bits = Vec<Vec<u32>>;

fn store_bits<B: Backend>(store: &ParamStore<B>) -> Bits {
    snapshot(store)
        .into_iter()
        .flat_map(|(_, v, g)| [Some(v), g].into_iter().flatten())
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

struct Net {
    convs: Vec<Dab>,
    ppm: Vec<Dab>,
    head: Classifier,
}

fn net<B: Backend>(store: &mut ParamStore<B>) -> Net {
    let g3 = ConvGeometry::square(1, 1, 1);
    let convs = vec![
        Dab::new(store, DabSpec::backbone("c0", "b0", 3, 6, 3, ConvGeometry::square(2, 1, 1)), 2, 1).unwrap(),
        Dab::new(store, DabSpec::backbone("c1", "b1", 6, 5, 3, g3), 2, 2).unwrap(),
        Dab::new(store, DabSpec::backbone("c2", "b2", 5, 6, 3, g3), 2, 3).unwrap(),
    ];
    let ppm = [1usize, 2, 3]
        .iter()
        .map(|b| {
            Dab::new(store, DabSpec::head(&format!("p{b}"), &format!("pb{b}"), 6, 2, 1, ConvGeometry::default()), 2, 4)
                .unwrap()
        })
        .collect();
    let head = Classifier::new(store, "cls", 12, 4, 0, 5).unwrap();
    Net { convs, ppm, head }
}

/// conv0 → conv1 → conv2 (+ conv0's output as residual) → PPM → classifier → loss, with each
/// fused op (`fused = true`) or its composition.
fn run<B: Backend>(be: &B, fused: bool) -> Bits {
    let mut store = ParamStore::new(be.clone());
    let m = net(&mut store);
    let (n, h, w) = (4usize, 12usize, 10usize);
    let x: Vec<f32> = (0..n * h * w * 3).map(|i| 2.0 * unit(3, i as u64) - 1.0).collect();
    let labels: Vec<i32> =
        (0..n * h * w).map(|i| if i % 9 == 0 { 255 } else { (unit(4, i as u64) * 4.0) as i32 }).collect();
    let mut g = Graph::new(be, true);
    let xv = g.input(be.tensor_f32(&[n, h, w, 3], &x).unwrap());
    let ds = g.datasets(&[0, 1, 1, 0]).unwrap();
    let relu = DsbnOptions { relu: true, ..DsbnOptions::default() };
    let spec = |d: &Dab, residual: Option<Var>, defer: bool| DabCall {
        weight: d.weight,
        bn: d.bn,
        geometry: d.geometry,
        dsbn: relu,
        residual,
        defer,
    };
    let a0 = g.dab(&mut store, xv, ds, &spec(&m.convs[0], None, false)).unwrap();
    // The chain: conv1 leaves its normalisation to conv2's prologue, or writes it.
    let a1 = g.dab(&mut store, a0, ds, &spec(&m.convs[1], None, fused)).unwrap();
    assert_eq!(g.is_pending(a1), fused);
    let a2 = g.dab(&mut store, a1, ds, &spec(&m.convs[2], Some(a0), false)).unwrap();
    let branches: Vec<(WeightId, BnId)> = m.ppm.iter().map(|d| (d.weight, d.bn)).collect();
    let opts = PpmOptions { bins: vec![1, 2, 3], align_corners: true, dsbn: relu };
    let [_, fh, fw, _] = *TensorLike::shape(g.value(a2)) else { panic!("NHWC") };
    let cat = if fused {
        g.ppm(&mut store, a2, ds, &branches, &opts).unwrap()
    } else {
        // Branches built in reverse bin order, so that the backward visits them in bin order and
        // adds their pooling gradients to the identity's in the order the fused op does.
        let mut ups = vec![None; 3];
        for i in (0..3).rev() {
            let b = opts.bins[i];
            let p = g.adaptive_avg_pool(a2, b, b).unwrap();
            let y = g.dab(&mut store, p, ds, &spec(&m.ppm[i], None, false)).unwrap();
            ups[i] = Some(g.resize_bilinear(y, fh, fw, true).unwrap());
        }
        let mut parts = vec![a2];
        parts.extend(ups.into_iter().flatten());
        g.concat_channels(&parts).unwrap()
    };
    let logits = m.head.forward(&mut g, &store, cat).unwrap();
    let lab = g.input_i32(&[n, h, w], &labels).unwrap();
    let zeros = g.input_i32(&[n], &[0; 4]).unwrap();
    let loss = if fused {
        let s =
            LossSpec { num_classes: vec![4], upsample: Some(true), expected_grad: Some(1.0), ..LossSpec::default() };
        g.cross_entropy(logits, lab, zeros, &s).unwrap()
    } else {
        let up = g.resize_bilinear(logits, h, w, true).unwrap();
        g.cross_entropy(up, lab, zeros, &LossSpec { num_classes: vec![4], ..LossSpec::default() }).unwrap()
    };
    let root = g.weighted_sum(&[(loss, 1.0)]);
    let value = g.scalar(root).unwrap();
    g.backward(root, &mut store).unwrap();
    let mut out = vec![vec![value.to_bits()]];
    out.extend(store_bits(&store));
    out.push(be.to_f32(g.value(cat)).unwrap().iter().map(|v| (v + 0.0).to_bits()).collect());
    out
}

fn check_fused_graph<B: Backend>(be: &B) {
    let (fused, plain) = (run(be, true), run(be, false));
    assert_eq!(fused.len(), plain.len());
    for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
        assert!(a == b, "{}: item {i} differs between the fused graph and its composition", be.name());
    }
}

/// Evaluation: each block as the one-kernel inference DAB against convolution → inference DSBN.
fn check_inference<B: Backend>(be: &B) {
    let mut store = ParamStore::new(be.clone());
    let m = net(&mut store);
    // Train a step first, so that the running statistics are not the initial ones.
    let (n, h, w) = (2usize, 8usize, 8usize);
    let x: Vec<f32> = (0..n * h * w * 3).map(|i| 2.0 * unit(8, i as u64) - 1.0).collect();
    let mut t = Graph::new(be, true);
    let xv = t.input(be.tensor_f32(&[n, h, w, 3], &x).unwrap());
    let ds = t.datasets(&[1, 1]).unwrap();
    m.convs[0].forward(&mut t, &mut store, xv, ds, None, true).unwrap();
    let eval = |fused: bool, store: &mut ParamStore<B>| -> Vec<u32> {
        let mut g = Graph::new(be, false);
        let xv = g.input(be.tensor_f32(&[n, h, w, 3], &x).unwrap());
        let ds: Datasets = g.datasets(&[1, 0]).unwrap();
        let d = &m.convs[0];
        let y = if fused {
            d.forward(&mut g, store, xv, ds, None, true).unwrap()
        } else {
            let c = g.conv2d(store, xv, d.weight, None, d.geometry).unwrap();
            g.dsbn(store, c, ds, d.bn, None, DsbnOptions { relu: true, ..DsbnOptions::default() }).unwrap()
        };
        be.to_f32(g.value(y)).unwrap().iter().map(|v| v.to_bits()).collect()
    };
    assert!(eval(true, &mut store) == eval(false, &mut store), "{}: inference DAB differs", be.name());
}

#[test]
fn fused_graph_paths_equal_their_composition_on_the_cpu_backend() {
    check_fused_graph(&CpuBackend::new());
    check_inference(&CpuBackend::new());
}

#[test]
fn fused_graph_paths_equal_their_composition_on_the_device() {
    check_fused_graph(&device_backend());
    check_inference(&device_backend());
}

/// The fused DAT pass (both datasets' forwards in one pass: the kernels pick each sample's BN
/// slice) against separate passes per dataset: the same per-dataset losses and gradients, up to
/// summation order (dropout off: its masks depend on the sample's position in the batch).
#[test]
fn one_pass_dat_equals_separate_passes() {
    let be = CpuBackend::new();
    let batches = vec![batch(0, 2, 24, 24, 3, 21), batch(1, 3, 24, 24, 4, 22)];
    let mk = |fuse: bool, mode: Mode| {
        let cfg = TrainConfig { fuse_datasets: fuse, mode, ..TrainConfig::default() };
        Trainer::new(&be, tiny_model(vec![3, 4], 0.0), cfg).unwrap()
    };
    let (mut separate, mut fused, mut mixed) = (mk(false, Mode::Dat), mk(true, Mode::Dat), mk(true, Mode::Mixed));
    let a = separate.compute_gradients(&batches).unwrap();
    for t in [&mut fused, &mut mixed] {
        let b = t.compute_gradients(&batches).unwrap();
        for d in 0..2 {
            let (x, y) = (a.per_dataset[d], b.per_dataset[d]);
            // The same samples meet the same BN slices; only summation order differs.
            assert!((x - y).abs() <= 1e-5 * x.abs(), "dataset {d}: {x} vs {y}");
        }
        for ((name, _, ga), (_, _, gb)) in snapshot(&separate.store).iter().zip(&snapshot(&t.store)) {
            if let (Some(ga), Some(gb)) = (ga, gb) {
                assert!(rel_err(gb, ga) <= 1e-3, "{name}: {}", rel_err(gb, ga));
            }
        }
    }
    // A within-iteration interval of 2 has two batches of dataset 0: they cannot share a pass (their BN
    // statistics would merge), so the iteration runs two passes and still trains.
    let cfg = TrainConfig { interval: Interval::Within { dataset: 0, t: 2 }, ..TrainConfig::default() };
    let mut t = Trainer::new(&be, tiny_model(vec![3, 4], 0.0), cfg).unwrap();
    let s = t.step(&[batch(0, 2, 24, 24, 3, 1), batch(0, 2, 24, 24, 3, 2), batch(1, 2, 24, 24, 4, 3)]).unwrap();
    assert!(s.total.is_finite());
}
