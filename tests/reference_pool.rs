//! Tests of the CPU reference for adaptive average pooling and bilinear resize: hand-computed
//! values (PyTorch's documented outputs), finite differences of the forward for the backward,
//! the adjoint identity <f(x), dy> = <x, f'(dy)>, and structural properties (constants are
//! preserved, bins cover the input).

mod common;

use cdcl::reference::pool::*;
use common::Rng;
use ndarray::{Array4, ArrayView4};

fn rand4(rng: &mut Rng, shape: (usize, usize, usize, usize)) -> Array4<f64> {
    Array4::from_shape_simple_fn(shape, || rng.uniform(-1.0, 1.0))
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}: {a} vs {b}");
}

/// The forward of one op, as a function of x, for the generic checks.
#[derive(Clone, Copy, Debug)]
enum Op {
    Pool,
    Resize(bool),
}

fn forward(op: Op, x: ArrayView4<'_, f64>, oh: usize, ow: usize) -> Array4<f64> {
    match op {
        Op::Pool => adaptive_avg_pool2d(x, oh, ow),
        Op::Resize(ac) => resize_bilinear(x, oh, ow, ac),
    }
}

fn backward(op: Op, dy: ArrayView4<'_, f64>, h: usize, w: usize) -> Array4<f64> {
    match op {
        Op::Pool => adaptive_avg_pool2d_backward(dy, h, w),
        Op::Resize(ac) => resize_bilinear_backward(dy, h, w, ac),
    }
}

const OPS: [Op; 3] = [Op::Pool, Op::Resize(false), Op::Resize(true)];

/// Sizes covering 1x1, up- and down-sampling, equal and non-dividing extents.
const SIZES: [(usize, usize, usize, usize); 7] =
    [(1, 1, 1, 1), (1, 1, 4, 3), (5, 7, 1, 1), (5, 7, 3, 2), (3, 4, 7, 9), (6, 6, 6, 6), (7, 2, 3, 5)];

#[test]
fn finite_differences_match_the_backward() {
    let mut rng = Rng(1);
    for op in OPS {
        for &(h, w, oh, ow) in &SIZES {
            let x = rand4(&mut rng, (2, h, w, 3));
            let dy = rand4(&mut rng, (2, oh, ow, 3));
            let dx = backward(op, dy.view(), h, w);
            let loss = |x: &Array4<f64>| (&forward(op, x.view(), oh, ow) * &dy).sum();
            // Central differences on a sample of elements (all of them for small inputs).
            let eps = 1e-4;
            for _ in 0..12.min(x.len()) {
                let idx = (rng.below(2), rng.below(h), rng.below(w), rng.below(3));
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[idx] += eps;
                xm[idx] -= eps;
                let fd = (loss(&xp) - loss(&xm)) / (2.0 * eps);
                close(dx[idx], fd, 1e-8, &format!("{op:?} {h}x{w}->{oh}x{ow} at {idx:?}"));
            }
        }
    }
}

#[test]
fn backward_is_the_adjoint_of_the_forward() {
    let mut rng = Rng(2);
    for op in OPS {
        for &(h, w, oh, ow) in &SIZES {
            let x = rand4(&mut rng, (2, h, w, 4));
            let dy = rand4(&mut rng, (2, oh, ow, 4));
            let lhs = (&forward(op, x.view(), oh, ow) * &dy).sum();
            let rhs = (&x * &backward(op, dy.view(), h, w)).sum();
            close(lhs, rhs, 1e-12, &format!("{op:?} {h}x{w}->{oh}x{ow}"));
        }
    }
}

#[test]
fn constants_are_preserved() {
    for op in OPS {
        for &(h, w, oh, ow) in &SIZES {
            let x = Array4::from_elem((1, h, w, 2), 2.5);
            for v in forward(op, x.view(), oh, ow).iter() {
                close(*v, 2.5, 1e-14, &format!("{op:?} {h}x{w}->{oh}x{ow}"));
            }
        }
    }
}

#[test]
fn pool_bins_follow_pytorch() {
    // In = 5, Out = 3: [0, 2), [1, 4), [3, 5) — overlapping bins.
    assert_eq!((0..3).map(|i| pool_bin(i, 5, 3)).collect::<Vec<_>>(), vec![(0, 2), (1, 4), (3, 5)]);
    // In = 2, Out = 5: every output reads one or two inputs.
    assert_eq!((0..5).map(|i| pool_bin(i, 2, 5)).collect::<Vec<_>>(), vec![(0, 1), (0, 1), (0, 2), (1, 2), (1, 2)]);
    // Bins cover the input, in order, for many sizes.
    for inp in 1..20 {
        for out in 1..20 {
            assert_eq!(pool_bin(0, inp, out).0, 0);
            assert_eq!(pool_bin(out - 1, inp, out).1, inp);
            for i in 1..out {
                let (a, b) = (pool_bin(i - 1, inp, out), pool_bin(i, inp, out));
                assert!(b.0 >= a.0 && b.0 <= a.1 && b.1 >= a.1 && b.1 > b.0, "{inp}->{out}: {a:?} {b:?}");
            }
        }
    }
    // [1, 2, 3, 4, 5] pooled to 3: means of [1, 2], [2, 3, 4], [4, 5].
    let x = Array4::from_shape_vec((1, 1, 5, 1), vec![1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let y = adaptive_avg_pool2d(x.view(), 1, 3);
    assert_eq!(y.iter().copied().collect::<Vec<_>>(), vec![1.5, 3.0, 4.5]);
}

#[test]
fn bilinear_matches_pytorch_values() {
    // torch.nn.functional.interpolate(torch.tensor([[[[1., 2.]]]]), size=(1, 4), mode="bilinear",
    // align_corners=False) == [1.0, 1.25, 1.75, 2.0]; with align_corners=True: [1, 4/3, 5/3, 2].
    let x = Array4::from_shape_vec((1, 1, 2, 1), vec![1.0, 2.0]).unwrap();
    let y = resize_bilinear(x.view(), 1, 4, false);
    assert_eq!(y.iter().copied().collect::<Vec<_>>(), vec![1.0, 1.25, 1.75, 2.0]);
    let y = resize_bilinear(x.view(), 1, 4, true);
    for (g, w) in y.iter().zip([1.0, 4.0 / 3.0, 5.0 / 3.0, 2.0]) {
        close(*g, w, 1e-15, "align_corners=True");
    }
    // Downsampling [0..8) to 3 without align_corners: src = (d + 0.5) * 8/3 - 0.5 =
    // 0.8333, 3.5, 6.1667 -> 0.8333, 3.5, 6.1667 (linear data reproduces the source index).
    let x = Array4::from_shape_vec((1, 1, 8, 1), (0..8).map(f64::from).collect()).unwrap();
    let y = resize_bilinear(x.view(), 1, 3, false);
    for (g, w) in y.iter().zip([5.0 / 6.0, 3.5, 37.0 / 6.0]) {
        close(*g, w, 1e-15, "downsample");
    }
    // Out = 1: align_corners=True reads index 0; False reads the centre (In - 1) / 2.
    assert_eq!(resize_bilinear(x.view(), 1, 1, true)[[0, 0, 0, 0]], 0.0);
    assert_eq!(resize_bilinear(x.view(), 1, 1, false)[[0, 0, 0, 0]], 3.5);
    // In = 1: both taps are the one input and their weights sum to 1, either way.
    for ac in [false, true] {
        let [(lo, a), (hi, b)] = bilinear_taps(3, 1, 5, ac);
        assert_eq!((lo, hi), (0, 0));
        close(a + b, 1.0, 1e-15, "In = 1");
    }
    // The clamp below 0 (align_corners=False, upsampling): output 0 of 2 -> 4 reads index 0 only.
    assert_eq!(bilinear_taps(0, 2, 4, false), [(0, 1.0), (1, 0.0)]);
    // The last input index has hi == lo.
    assert_eq!(bilinear_taps(3, 2, 4, false), [(1, 0.75), (1, 0.25)]);
}
