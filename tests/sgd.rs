//! Multi-tensor SGD through the emulator against the f64 reference (`cdcl::reference::sgd`):
//! random lists of tensors (single elements, sizes around and above the 4096-element chunk,
//! empty tensors), a learning rate per tensor, first and later steps; bitwise agreement with
//! the same formula evaluated on the host with f32 fused multiply-adds; bitwise determinism
//! across emulator seeds; typed errors. Frozen rows: tensors of 1 to ~2000 rows of lengths
//! below, around and above the 256 threads of a block and the 4096-element chunk, with no mask,
//! an empty one, every row (or the first 64), one row, or random rows frozen: frozen rows keep
//! their parameter and buffer bits (NaN garbage included), the others match the reference.
//!
//! Tolerances. Each step is compared with the reference applied to the kernel's own state before
//! the step (so errors do not compound across steps). The kernel forms d = fma(wd, p, g),
//! buf = fma(m, buf, d) and p = fma(-lr, buf, p), one rounding each (u = 2^-24):
//! |buf err| <= u * |buf| + u * |d| and |p err| <= u * |p'| + lr * |buf err|. The tolerance is
//! 4u * (|buf| + |d|) for the buffer and 4u * (|p'| + lr * (|buf| + |d|)) for the parameter.
//! The separate host-fma check then pins the exact bits.

mod common;

use cdcl::ops::sgd::{self, FrozenRows, SgdOptions, SgdParam};
use cdcl::reference::sgd as rsgd;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{assert_close, Rng};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    sizes: Vec<usize>,
    lrs: Vec<f32>,
    /// Per tensor (missing entries: none).
    frozen: Vec<Option<FrozenRows>>,
    momentum: f32,
    weight_decay: f32,
    seed: u64,
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=40, Just(0usize), 4090usize..=4100, 8193usize..=9000]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec((size_strategy(), 0.0f32..0.1), 1..=6),
        prop_oneof![Just(0.9f32), 0.0f32..=1.0],
        prop_oneof![Just(1e-4f32), 0.0f32..0.01],
        any::<u64>(),
    )
        .prop_map(|(t, momentum, weight_decay, seed)| {
            let (sizes, lrs) = t.into_iter().unzip();
            Case { sizes, lrs, frozen: Vec::new(), momentum, weight_decay, seed }
        })
}

/// (row length, rows): rows shorter than a block's 256 threads (a thread crosses rows every
/// iteration), longer (a row spans threads), around a chunk (a row spans blocks); one row;
/// more rows than a mask can name (chunks past row 63 take the unmasked loop).
fn rows_strategy() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        (1usize..=8, prop_oneof![Just(1usize), 1usize..=70, 500usize..=2000]),
        (prop_oneof![100usize..=300, Just(256usize)], prop_oneof![Just(1usize), 1usize..=70]),
        (4090usize..=4100, 1usize..=3),
    ]
}

/// A mask for a tensor of `rows` rows: kind 0 none, 1 empty, 2 every row it can name, 3 one
/// row, 4 random rows.
fn mask_for(kind: u8, rows: usize, row_len: usize, bits: u64) -> Option<FrozenRows> {
    let nameable = rows.min(FrozenRows::MAX_ROWS);
    let all = if nameable == 64 { u64::MAX } else { (1u64 << nameable) - 1 };
    let mask = match kind {
        0 => return None,
        1 => 0,
        2 => all,
        3 => 1u64 << (bits % nameable as u64),
        _ => bits & all,
    };
    Some(FrozenRows { row_len, rows: mask })
}

fn frozen_case_strategy() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec((rows_strategy(), 0u8..=4, any::<u64>(), 0.0f32..0.1), 1..=4),
        prop_oneof![Just(0.9f32), 0.0f32..=1.0],
        prop_oneof![Just(1e-4f32), 0.0f32..0.01],
        any::<u64>(),
    )
        .prop_map(|(t, momentum, weight_decay, seed)| {
            let mut k = Case { sizes: vec![], lrs: vec![], frozen: vec![], momentum, weight_decay, seed };
            for ((row_len, rows), kind, bits, lr) in t {
                k.sizes.push(rows * row_len);
                k.lrs.push(lr);
                k.frozen.push(mask_for(kind, rows, row_len, bits));
            }
            k
        })
}

struct State {
    params: Vec<Tensor>,
    grads: Vec<Tensor>,
    bufs: Vec<Tensor>,
}

fn f32s(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

fn setup(k: &Case, dev: &Device, rng: &mut Rng) -> State {
    let mk = |v: Vec<f32>, n: usize| Tensor::from_slice(dev, &[n], &v).unwrap();
    State {
        params: k.sizes.iter().map(|&n| mk(f32s(rng, n, 1.0), n)).collect(),
        grads: k.sizes.iter().map(|&n| mk(f32s(rng, n, 0.1), n)).collect(),
        // Garbage in the buffers: the first step must not read them.
        bufs: k.sizes.iter().map(|&n| mk(vec![f32::NAN; n], n)).collect(),
    }
}

fn step(k: &Case, st: &mut State, first: bool) -> cdcl::Result<()> {
    let mut list: Vec<SgdParam<'_>> = st
        .params
        .iter_mut()
        .zip(&st.grads)
        .zip(st.bufs.iter_mut())
        .zip(&k.lrs)
        .enumerate()
        .map(|(i, (((param, grad), momentum_buffer), &lr))| SgdParam {
            param,
            grad,
            momentum_buffer,
            lr,
            frozen_rows: k.frozen.get(i).copied().flatten(),
            copy: None,
        })
        .collect();
    sgd::sgd_step(&mut list, &SgdOptions { momentum: k.momentum, weight_decay: k.weight_decay }, first)
}

fn host64(t: &Tensor) -> Vec<f64> {
    t.to_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
}

/// The elements of `v` whose index is in `keep`.
fn pick(v: &[f64], keep: &[usize]) -> Vec<f64> {
    keep.iter().map(|&j| v[j]).collect()
}

fn run_case(k: &Case, dev: &Device) -> Result<(), String> {
    let mut rng = Rng(k.seed);
    let mut st = setup(k, dev, &mut rng);
    let u = 2f64.powi(-24);
    for s in 0..3 {
        let first = s == 0;
        let before_p: Vec<Vec<f64>> = st.params.iter().map(host64).collect();
        let before_b: Vec<Vec<f64>> = st.bufs.iter().map(host64).collect();
        let before_p32: Vec<Vec<f32>> = st.params.iter().map(|t| t.to_vec::<f32>().unwrap()).collect();
        let before_b32: Vec<Vec<f32>> = st.bufs.iter().map(|t| t.to_vec::<f32>().unwrap()).collect();
        step(k, &mut st, first).map_err(|e| e.to_string())?;
        for i in 0..k.sizes.len() {
            let frozen = k.frozen.get(i).copied().flatten();
            let row_len = frozen.map_or(1, |f| f.row_len);
            let frozen_rows: Vec<usize> =
                (0..FrozenRows::MAX_ROWS).filter(|&r| frozen.is_some_and(|f| f.is_frozen(r))).collect();
            let is_frozen = |j: usize| frozen_rows.contains(&(j / row_len));
            let free: Vec<usize> = (0..k.sizes[i]).filter(|&j| !is_frozen(j)).collect();
            let g = host64(&st.grads[i]);
            let (mut p, mut b) = (before_p[i].clone(), before_b[i].clone());
            let (lr, m, wd) = (k.lrs[i] as f64, k.momentum as f64, k.weight_decay as f64);
            rsgd::sgd_step_frozen(&mut p, &g, &mut b, lr, m, wd, first, row_len, &frozen_rows);
            let d: Vec<f64> = g.iter().zip(&before_p[i]).map(|(g, p)| (g + wd * p).abs()).collect();
            // Frozen elements are compared bit for bit below (their buffers may hold the NaN
            // garbage of the setup); the tolerances apply to the others.
            let (p, b, d) = (pick(&p, &free), pick(&b, &free), pick(&d, &free));
            let got_b = pick(&host64(&st.bufs[i]), &free);
            let got_p = pick(&host64(&st.params[i]), &free);
            assert_close(&format!("step {s} tensor {i} buffer"), &got_b, &b, |j| {
                4.0 * u * (b[j].abs() + d[j]) + 1e-38
            })?;
            assert_close(&format!("step {s} tensor {i} param"), &got_p, &p, |j| {
                4.0 * u * (p[j].abs() + lr * (b[j].abs() + d[j])) + 1e-38
            })?;
            // The same formula with host f32 FMAs (correctly rounded, like the device's fmaf).
            let g32 = st.grads[i].to_vec::<f32>().unwrap();
            let p32 = st.params[i].to_vec::<f32>().unwrap();
            let b32 = st.bufs[i].to_vec::<f32>().unwrap();
            for j in 0..k.sizes[i] {
                if is_frozen(j) {
                    if before_p32[i][j].to_bits() != p32[j].to_bits() || before_b32[i][j].to_bits() != b32[j].to_bits()
                    {
                        return Err(format!("step {s} tensor {i} element {j}: a frozen row was written"));
                    }
                    continue;
                }
                let dd = k.weight_decay.mul_add(before_p32[i][j], g32[j]);
                let bb = if first { dd } else { k.momentum.mul_add(before_b32[i][j], dd) };
                let pp = (-k.lrs[i]).mul_add(bb, before_p32[i][j]);
                if bb.to_bits() != b32[j].to_bits() || pp.to_bits() != p32[j].to_bits() {
                    return Err(format!("step {s} tensor {i} element {j}: not the f32 fma formula"));
                }
            }
        }
        // New gradients for the next step.
        for (gt, &n) in st.grads.iter_mut().zip(&k.sizes) {
            gt.copy_from_slice(&f32s(&mut rng, n, 0.1)).unwrap();
        }
    }
    Ok(())
}

fn device() -> Device {
    common::test_device()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn sgd_matches_reference(k in case_strategy()) {
        run_case(&k, &device()).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn frozen_rows_untouched_and_others_match_reference(k in frozen_case_strategy()) {
        run_case(&k, &device()).map_err(TestCaseError::fail)?;
    }
}

/// A model's DSBN γ and β ([D, C] tables) among conv weights, with the rows of absent datasets
/// frozen, in one launch: the frozen-row tables sit between unmasked tensors in the table.
#[test]
fn dsbn_tables_with_absent_datasets_in_one_launch() {
    let sizes = vec![64 * 3 * 7 * 7, 3 * 64, 3 * 64, 9000, 5 * 512, 5 * 512, 64 * 2048];
    let lrs = vec![0.01; sizes.len()];
    let frozen = vec![
        None,
        Some(FrozenRows::from_rows(64, [1]).unwrap()),
        Some(FrozenRows::from_rows(64, [1]).unwrap()),
        None,
        Some(FrozenRows::from_rows(512, [0, 2, 4]).unwrap()),
        Some(FrozenRows::from_rows(512, [0, 1, 2, 3, 4]).unwrap()),
        Some(FrozenRows::from_rows(2048, [63, 0, 17, 17]).unwrap()),
    ];
    let k = Case { sizes, lrs, frozen, momentum: 0.9, weight_decay: 1e-4, seed: 31 };
    run_case(&k, &device()).unwrap();
}

/// Parameter groups as a CDCL model has them: backbone at lr, heads at 10x lr, many small
/// tensors (BN per dataset) between large ones, in one launch.
#[test]
fn parameter_groups_in_one_launch() {
    let mut sizes = vec![64 * 3 * 7 * 7, 64, 64, 9000];
    sizes.extend(std::iter::repeat_n(19, 20));
    let lrs: Vec<f32> = sizes.iter().enumerate().map(|(i, _)| if i % 3 == 0 { 0.1 } else { 0.01 }).collect();
    let k = Case { sizes, lrs, frozen: Vec::new(), momentum: 0.9, weight_decay: 1e-4, seed: 12 };
    run_case(&k, &device()).unwrap();
}

fn all_bits(seed: u64, threads: u32) -> Vec<Vec<u8>> {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let k = Case {
        sizes: vec![5000, 1, 4096, 333, 9000],
        lrs: vec![0.01, 0.02, 0.1, 0.0, 0.05],
        frozen: vec![None, None, None, None, Some(FrozenRows::from_rows(100, [0, 5, 44, 63]).unwrap())],
        momentum: 0.9,
        weight_decay: 1e-4,
        seed: 2,
    };
    let mut rng = Rng(k.seed);
    let mut st = setup(&k, &dev, &mut rng);
    step(&k, &mut st, true).unwrap();
    step(&k, &mut st, false).unwrap();
    st.params.iter().chain(&st.bufs).map(common::bits).collect()
}

#[test]
fn bitwise_identical_across_emulator_seeds() {
    let base = all_bits(0, 1);
    for (seed, threads) in [(1, 2), (0xBEEF, 0), (5, 1)] {
        assert!(all_bits(seed, threads) == base, "seed {seed}, threads {threads} changed the bits");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = device();
    let z = |shape: &[usize], d: DType| Tensor::zeros(&dev, shape, d).unwrap();
    let opts = SgdOptions::default();
    let (mut p, g, mut b) = (z(&[4, 3], DType::F32), z(&[4, 3], DType::F32), z(&[4, 3], DType::F32));
    let run = |p: &mut Tensor, g: &Tensor, b: &mut Tensor, lr: f32, o: &SgdOptions| {
        sgd::sgd_step(
            &mut [SgdParam { param: p, grad: g, momentum_buffer: b, lr, frozen_rows: None, copy: None }],
            o,
            false,
        )
    };
    assert!(run(&mut p, &g, &mut b, 0.01, &opts).is_ok());
    assert!(matches!(run(&mut p, &z(&[3, 4], DType::F32), &mut b, 0.01, &opts), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(run(&mut p, &g, &mut z(&[12], DType::F32), 0.01, &opts), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(run(&mut p, &z(&[4, 3], DType::F16), &mut b, 0.01, &opts), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(run(&mut z(&[4, 3], DType::BF16), &g, &mut b, 0.01, &opts), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(run(&mut p, &g, &mut b, -1.0, &opts), Err(Error::InvalidArgument(_))));
    assert!(matches!(run(&mut p, &g, &mut b, f32::NAN, &opts), Err(Error::InvalidArgument(_))));
    let bad_m = SgdOptions { momentum: 1.5, ..opts };
    assert!(matches!(run(&mut p, &g, &mut b, 0.01, &bad_m), Err(Error::InvalidArgument(_))));
    let bad_wd = SgdOptions { weight_decay: -1.0, ..opts };
    assert!(matches!(run(&mut p, &g, &mut b, 0.01, &bad_wd), Err(Error::InvalidArgument(_))));
    let other = Device::emulator_with(EmulatorConfig { seed: 1, threads: 1 }).unwrap();
    let g_other = Tensor::zeros(&other, &[4, 3], DType::F32).unwrap();
    assert!(matches!(run(&mut p, &g_other, &mut b, 0.01, &opts), Err(Error::DeviceMismatch { .. })));
    // Nothing was written by the failed calls: p is still what the one good step left (zeros).
    assert!(p.to_vec::<f32>().unwrap().iter().all(|v| *v == 0.0));
    // An empty list is a no-op.
    assert!(sgd::sgd_step(&mut [], &opts, true).is_ok());
}

#[test]
fn bad_frozen_rows_are_typed_errors() {
    let dev = device();
    let t = |v: &[f32]| Tensor::from_slice(&dev, &[v.len()], v).unwrap();
    let opts = SgdOptions::default();
    let (mut p1, g1, mut b1) = (t(&[1.0; 12]), t(&[0.5; 12]), t(&[0.0; 12]));
    let (mut p2, g2, mut b2) = (t(&[2.0; 12]), t(&[0.5; 12]), t(&[0.0; 12]));
    let (mut pe, ge, mut be) = (t(&[]), t(&[]), t(&[]));
    let before = common::bits(&p1);
    let bad = [
        FrozenRows { row_len: 0, rows: 1 },        // no row length
        FrozenRows { row_len: 5, rows: 1 },        // 5 does not divide 12
        FrozenRows { row_len: 4, rows: 1 << 3 },   // row 3 of 3
        FrozenRows { row_len: 1, rows: 1 << 12 },  // row 12 of 12
        FrozenRows { row_len: 12, rows: 0b10 },    // row 1 of 1
        FrozenRows { row_len: 1, rows: u64::MAX }, // rows 12..63 of 12
        FrozenRows { row_len: 0, rows: 0 },        // an empty mask still needs a row length
    ];
    for f in bad {
        // A good tensor first: the bad mask of the second must stop the whole step.
        let mut list = [
            SgdParam { param: &mut p1, grad: &g1, momentum_buffer: &mut b1, lr: 0.1, frozen_rows: None, copy: None },
            SgdParam { param: &mut p2, grad: &g2, momentum_buffer: &mut b2, lr: 0.1, frozen_rows: Some(f), copy: None },
        ];
        let r = sgd::sgd_step(&mut list, &opts, false);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{f:?}: {r:?}");
        assert!(common::bits(&p1) == before, "{f:?}: the good tensor was written");
    }
    // An empty tensor has no rows to freeze.
    let r = sgd::sgd_step(
        &mut [SgdParam {
            param: &mut pe,
            grad: &ge,
            momentum_buffer: &mut be,
            lr: 0.1,
            frozen_rows: Some(FrozenRows { row_len: 1, rows: 1 }),
            copy: None,
        }],
        &opts,
        false,
    );
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    // The constructor refuses what a mask cannot hold.
    assert!(matches!(FrozenRows::from_rows(4, [64]), Err(Error::InvalidArgument(_))));
    assert!(matches!(FrozenRows::from_rows(0, [0]), Err(Error::InvalidArgument(_))));
    assert_eq!(FrozenRows::from_rows(3, [0, 63, 0]).unwrap(), FrozenRows { row_len: 3, rows: 1 | 1 << 63 });
    // A good mask freezing every row of p2: the step runs and leaves p2 as it was.
    let p2_before = common::bits(&p2);
    let mut list = [
        SgdParam { param: &mut p1, grad: &g1, momentum_buffer: &mut b1, lr: 0.1, frozen_rows: None, copy: None },
        SgdParam {
            param: &mut p2,
            grad: &g2,
            momentum_buffer: &mut b2,
            lr: 0.1,
            frozen_rows: Some(FrozenRows { row_len: 4, rows: 0b111 }),
            copy: None,
        },
    ];
    sgd::sgd_step(&mut list, &opts, false).unwrap();
    assert!(common::bits(&p1) != before);
    assert!(common::bits(&p2) == p2_before);
}

/// The gradient gather gives the same bits on every emulator schedule and worker count (fixed
/// summation order; the overflow flag is a set-only value), and refuses bad groups with typed
/// errors before launching.
#[test]
fn sum_scaled_is_deterministic_and_checks_its_groups() {
    let mut r = Rng(41);
    let parts: Vec<Vec<f32>> = (0..3).map(|_| (0..9000).map(|_| (r.normal() * 100.0) as f32).collect()).collect();
    let run = |seed: u64, threads: u32| {
        let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
        let ts: Vec<Tensor> = parts
            .iter()
            .map(|p| {
                Tensor::from_slice(&dev, &[9000], &p.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>())
                    .unwrap()
            })
            .collect();
        let mut inf = parts[0].clone();
        inf[4321] = f32::NEG_INFINITY;
        let ti = Tensor::from_slice(&dev, &[9000], &inf).unwrap();
        let (sums, flag) = sgd::sum_scaled(&[&[&ts[0], &ts[1], &ts[2]][..], &[&ti][..]], 1.0 / 1024.0).unwrap();
        (common::bits(&sums[0]), sums[1].to_vec::<f32>().unwrap()[4321], flag.to_vec::<f32>().unwrap())
    };
    let base = run(0, 0);
    assert_eq!(base.2, vec![1.0], "an infinite source sets the flag");
    assert!(base.1.is_infinite());
    for (seed, threads) in [(1, 1), (7, 2), (99, 0)] {
        assert!(run(seed, threads) == base, "seed {seed}, {threads} threads");
    }
    let dev = device();
    let a = Tensor::from_slice(&dev, &[4], &[1.0f32; 4]).unwrap();
    let b = Tensor::from_slice(&dev, &[5], &[1.0f32; 5]).unwrap();
    let h = Tensor::from_slice(&dev, &[4], &[half::f16::ONE; 4]).unwrap();
    assert!(matches!(sgd::sum_scaled(&[&[&a, &b][..]], 1.0), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(sgd::sum_scaled(&[&[&a, &h][..]], 1.0), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(sgd::sum_scaled(&[&[][..]], 1.0), Err(Error::InvalidArgument(_))));
    assert!(matches!(sgd::sum_scaled(&[&[&a][..]], f32::NAN), Err(Error::InvalidArgument(_))));
}
