//! Tests of the CPU reference for the multi-head cross-entropy and the metrics: central finite
//! differences of its own loss (for the gradient), hand-computed values, and structure (padding
//! and other heads do not matter, empty datasets give 0).

mod common;

use cdcl::reference::cross_entropy::*;
use cdcl::reference::metrics;
use common::Rng;
use ndarray::{array, Array3, Array4};

/// Logits, labels, dataset per sample, classes per head, weight per dataset.
type Problem = (Array4<f64>, Array3<i64>, Vec<usize>, Vec<usize>, Vec<f64>);

fn problem(seed: u64) -> Problem {
    let mut r = Rng(seed);
    let heads = vec![5, 2, 7];
    let datasets = vec![0, 2, 1, 2];
    let (n, h, w, cmax) = (4, 3, 2, 8);
    let logits = Array4::from_shape_simple_fn((n, h, w, cmax), || 4.0 * r.unit() - 2.0);
    let mut labels = Array3::<i64>::zeros((n, h, w));
    for ((ni, _, _), l) in labels.indexed_iter_mut() {
        let u = r.unit();
        *l = if u < 0.25 { IGNORE_LABEL } else { (r.unit() * heads[datasets[ni]] as f64) as i64 };
    }
    (logits, labels, datasets, heads, vec![1.0, 0.4, 1.7])
}

#[test]
fn gradient_matches_central_finite_differences() {
    for seed in 1..4 {
        let (logits, labels, ds, heads, w) = problem(seed);
        let scale = 0.7;
        let g = multi_head_cross_entropy_grad(logits.view(), labels.view(), &ds, &heads, &w, scale).unwrap();
        let eps = 1e-6;
        for (idx, &analytic) in g.indexed_iter() {
            let (mut plus, mut minus) = (logits.clone(), logits.clone());
            plus[idx] += eps;
            minus[idx] -= eps;
            let lp = multi_head_cross_entropy(plus.view(), labels.view(), &ds, &heads, &w).unwrap().total;
            let lm = multi_head_cross_entropy(minus.view(), labels.view(), &ds, &heads, &w).unwrap().total;
            let numeric = scale * (lp - lm) / (2.0 * eps);
            // Central differences: truncation O(eps^2) ~ 1e-12, cancellation ~ 1e-16 / eps ~ 1e-10.
            assert!((numeric - analytic).abs() < 1e-8, "{idx:?}: numeric {numeric} vs analytic {analytic}");
        }
    }
}

#[test]
fn hand_computed_values() {
    // One pixel, head of 2 classes: nll = log(e^1 + e^3) - 1 for label 0.
    let logits = Array4::from_shape_vec((1, 1, 1, 3), vec![1.0, 3.0, f64::NAN]).unwrap();
    let labels = Array3::from_shape_vec((1, 1, 1), vec![0i64]).unwrap();
    let r = multi_head_cross_entropy(logits.view(), labels.view(), &[0], &[2], &[2.0]).unwrap();
    let want = (1f64.exp() + 3f64.exp()).ln() - 1.0;
    assert!((r.per_dataset[0] - want).abs() < 1e-15 && (r.total - 2.0 * want).abs() < 1e-15);
    let g = multi_head_cross_entropy_grad(logits.view(), labels.view(), &[0], &[2], &[2.0], 1.0).unwrap();
    let p0 = 1f64.exp() / (1f64.exp() + 3f64.exp());
    assert!((g[[0, 0, 0, 0]] - 2.0 * (p0 - 1.0)).abs() < 1e-15);
    assert!((g[[0, 0, 0, 1]] - 2.0 * (1.0 - p0)).abs() < 1e-15);
    assert_eq!(g[[0, 0, 0, 2]], 0.0); // padding: no gradient (and the NaN was never read)
}

#[test]
fn empty_and_ignored_datasets_contribute_zero() {
    let (logits, mut labels, ds, heads, w) = problem(9);
    labels.fill(IGNORE_LABEL);
    let r = multi_head_cross_entropy(logits.view(), labels.view(), &ds, &heads, &w).unwrap();
    assert_eq!((r.total, r.per_dataset.clone(), r.valid.clone()), (0.0, vec![0.0; 3], vec![0; 3]));
    let g = multi_head_cross_entropy_grad(logits.view(), labels.view(), &ds, &heads, &w, 1.0).unwrap();
    assert!(g.iter().all(|&v| v == 0.0));
}

#[test]
fn invalid_labels_and_datasets_are_reported_first_in_order() {
    let (logits, mut labels, ds, heads, w) = problem(2);
    labels[[2, 1, 0]] = 2; // sample 2 is dataset 1 (2 classes)
    labels[[3, 0, 0]] = 99;
    let e = multi_head_cross_entropy(logits.view(), labels.view(), &ds, &heads, &w).unwrap_err();
    assert_eq!(e, LossReferenceError::InvalidLabel { dataset: 1, label: 2, position: 2 * 6 + 2, num_classes: 2 });
    let e = multi_head_cross_entropy(logits.view(), labels.view(), &[0, 3, 1, 2], &heads, &w).unwrap_err();
    assert_eq!(e, LossReferenceError::DatasetOutOfRange { sample: 1, index: 3, num_datasets: 3 });
}

#[test]
fn metrics_reference_by_hand() {
    let logits =
        Array4::from_shape_vec((1, 1, 4, 3), vec![1., 2., 2., 3., 3., 9., 0., f64::NAN, 5., 4., 1., 7.]).unwrap();
    // Head of 2 classes: [1,2]->1, [3,3]->0 (first max), [0,NaN]->1, [4,1]->0 (7 is padding).
    let p = metrics::argmax(logits.view(), &[0], &[2]).unwrap();
    assert_eq!(p.iter().copied().collect::<Vec<_>>(), vec![1, 0, 1, 0]);
    let labels = Array3::from_shape_vec((1, 1, 4), vec![1i64, 1, 255, 0]).unwrap();
    let m = metrics::confusion(p.view(), labels.view(), &[0], &[2]).unwrap();
    assert_eq!(m[0], array![[1u64, 0], [1, 1]]);
    let iou = metrics::iou(&m[0]);
    assert_eq!(iou, vec![Some(0.5), Some(0.5)]);
    // A class never labelled nor predicted is left out of the mean.
    let m3 = array![[2u64, 1, 0], [0, 3, 0], [0, 0, 0]];
    assert_eq!(metrics::iou(&m3), vec![Some(2.0 / 3.0), Some(0.75), None]);
    assert_eq!(metrics::miou(&m3), Some((2.0 / 3.0 + 0.75) / 2.0));
}

/// The upsampled loss's gradient (the resize backward of the high-resolution gradient) against
/// central differences of the upsampled loss in the low-resolution logits, for integer and
/// non-integer ratios, a 1x1 logit map, and both align_corners modes.
#[test]
fn upsampled_gradient_matches_central_finite_differences() {
    let (_, _, ds, heads, w) = problem(1);
    let mut r = Rng(17);
    for &((h, wd), (lh, lw)) in &[((3, 2), (7, 5)), ((2, 2), (8, 8)), ((1, 1), (3, 4)), ((4, 3), (3, 2))] {
        for align_corners in [false, true] {
            let logits = Array4::from_shape_simple_fn((4, h, wd, 8), || 4.0 * r.unit() - 2.0);
            let mut labels = Array3::<i64>::zeros((4, lh, lw));
            for ((ni, _, _), l) in labels.indexed_iter_mut() {
                let u = r.unit();
                *l = if u < 0.25 { IGNORE_LABEL } else { (r.unit() * heads[ds[ni]] as f64) as i64 };
            }
            let loss = |x: &Array4<f64>| {
                multi_head_cross_entropy_upsampled(x.view(), labels.view(), &ds, &heads, &w, align_corners)
                    .unwrap()
                    .total
            };
            let g = multi_head_cross_entropy_upsampled_grad(
                logits.view(),
                labels.view(),
                &ds,
                &heads,
                &w,
                0.7,
                align_corners,
            )
            .unwrap();
            assert_eq!(g.dim(), logits.dim());
            let eps = 1e-6;
            for (idx, &analytic) in g.indexed_iter() {
                let (mut plus, mut minus) = (logits.clone(), logits.clone());
                plus[idx] += eps;
                minus[idx] -= eps;
                let numeric = 0.7 * (loss(&plus) - loss(&minus)) / (2.0 * eps);
                assert!(
                    (numeric - analytic).abs() < 1e-8,
                    "{h}x{wd} -> {lh}x{lw}, align_corners {align_corners}, {idx:?}: numeric {numeric} vs analytic {analytic}"
                );
            }
        }
    }
}
