//! Per-head argmax and per-dataset confusion matrices through the emulator against the
//! reference (`cdcl::reference::metrics`). Both are exact integer results, so the comparison is
//! exact: the logits are drawn on a coarse grid (multiples of 1/4, exact in every storage type)
//! so that ties are frequent and the first-maximum rule is exercised; NaN logits and NaN
//! padding appear too. Confusion counts use integer atomics, so they are checked for
//! bitwise-identical results across emulator seeds as well.

mod common;

use cdcl::ops::metrics::{self, ConfusionMatrices};
use cdcl::reference::metrics as refm;
use cdcl::{DType, Device, EmulatorConfig, Error, Tensor};
use common::{tensor, Rng};
use ndarray::{ArrayView3, ArrayView4};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    n: usize,
    h: usize,
    w: usize,
    heads: Vec<usize>,
    pad: usize,
    datasets: Vec<usize>,
    u8_labels: bool,
    nan: bool,
    seed: u64,
}

fn case_strategy(max_classes: usize) -> impl Strategy<Value = Case> {
    (
        1usize..=4,
        1usize..=40,
        1usize..=70,
        proptest::collection::vec(2usize..=max_classes, 1..=3),
        0usize..=2,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_flat_map(|(n, h, w, heads, pad, u8_labels, nan, seed)| {
            let d = heads.len();
            proptest::collection::vec(0..d, n).prop_map(move |datasets| Case {
                n,
                h,
                w,
                heads: heads.clone(),
                pad,
                datasets,
                u8_labels,
                nan,
                seed,
            })
        })
}

fn cmax(k: &Case) -> usize {
    k.heads.iter().copied().max().unwrap() + k.pad
}

/// Logits on a grid of 1/4 in [-2, 2] (ties are common), padding NaN; labels with ~20% ignored.
fn make(k: &Case) -> (Vec<f64>, Vec<i64>) {
    let mut r = Rng(k.seed);
    let (hw, cm) = (k.h * k.w, cmax(k));
    let mut logits = Vec::new();
    let mut labels = Vec::new();
    for n in 0..k.n {
        let classes = k.heads[k.datasets[n]];
        for _ in 0..hw {
            for c in 0..cm {
                logits.push(if c >= classes || (k.nan && r.below(50) == 0) {
                    f64::NAN
                } else {
                    r.below(17) as f64 / 4.0 - 2.0
                });
            }
            labels.push(if r.below(5) == 0 { 255 } else { r.below(classes) as i64 });
        }
    }
    (logits, labels)
}

fn labels_tensor(dev: &Device, k: &Case, labels: &[i64]) -> Tensor {
    let shape = [k.n, k.h, k.w];
    if k.u8_labels {
        Tensor::from_slice(dev, &shape, &labels.iter().map(|&l| l as u8).collect::<Vec<_>>()).unwrap()
    } else {
        Tensor::from_slice(dev, &shape, &labels.iter().map(|&l| l as i32).collect::<Vec<_>>()).unwrap()
    }
}

fn ds_tensor(dev: &Device, ds: &[usize]) -> Tensor {
    Tensor::from_slice(dev, &[ds.len()], &ds.iter().map(|&d| d as i32).collect::<Vec<_>>()).unwrap()
}

fn emulator(seed: u64) -> Device {
    Device::emulator_with(EmulatorConfig { seed, threads: 0 }).unwrap()
}

fn check(k: &Case, dtype: DType, dev: &Device) -> Result<Vec<i32>, String> {
    let (logits, labels) = make(k);
    let lt = tensor(dev, &[k.n, k.h, k.w, cmax(k)], &logits, dtype);
    let ds = ds_tensor(dev, &k.datasets);
    let pred = metrics::argmax(&lt, &ds, &k.heads).map_err(|e| e.to_string())?;
    let lv = ArrayView4::from_shape((k.n, k.h, k.w, cmax(k)), &logits[..]).unwrap();
    let want_pred = refm::argmax(lv, &k.datasets, &k.heads).map_err(|e| e.to_string())?;
    let got_pred = pred.to_vec::<i32>().unwrap();
    if let Some(i) = (0..got_pred.len()).find(|&i| got_pred[i] as i64 != want_pred.as_slice().unwrap()[i]) {
        return Err(format!("argmax pixel {i}: got {} want {}", got_pred[i], want_pred.as_slice().unwrap()[i]));
    }
    let counts =
        metrics::confusion_matrix(&pred, &labels_tensor(dev, k, &labels), &ds, &k.heads).map_err(|e| e.to_string())?;
    let yv = ArrayView3::from_shape((k.n, k.h, k.w), &labels[..]).unwrap();
    let want = refm::confusion(want_pred.view(), yv, &k.datasets, &k.heads).map_err(|e| e.to_string())?;
    let mut acc = ConfusionMatrices::new(&k.heads);
    acc.add(&counts).map_err(|e| e.to_string())?;
    for (d, m) in want.iter().enumerate() {
        if acc.matrix(d) != m.as_slice().unwrap() {
            return Err(format!("confusion matrix of dataset {d} differs"));
        }
        if acc.iou(d) != refm::iou(m) || acc.miou(d) != refm::miou(m) {
            return Err(format!("IoU of dataset {d} differs"));
        }
    }
    Ok(counts.to_vec::<i32>().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn argmax_and_confusion_match_reference(k in case_strategy(40), t in 0usize..3) {
        let dtype = [DType::F32, DType::F16, DType::BF16][t];
        check(&k, dtype, &emulator(0)).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn large_heads_count_in_global_memory() {
    // 100 classes: 10000 bins exceed the shared-memory histogram, so the global path runs.
    let k = Case {
        n: 3,
        h: 33,
        w: 140,
        heads: vec![100, 7],
        pad: 1,
        datasets: vec![0, 1, 0],
        u8_labels: false,
        nan: false,
        seed: 5,
    };
    check(&k, DType::F32, &emulator(0)).unwrap();
}

#[test]
fn counts_are_identical_across_emulator_seeds() {
    let k = Case {
        n: 4,
        h: 70,
        w: 65,
        heads: vec![19, 11],
        pad: 0,
        datasets: vec![0, 1, 1, 0],
        u8_labels: true,
        nan: false,
        seed: 8,
    };
    let base = check(&k, DType::F32, &emulator(0)).unwrap();
    for seed in [1, 99, 0xBEEF] {
        assert_eq!(check(&k, DType::F32, &emulator(seed)).unwrap(), base, "seed {seed}");
    }
}

#[test]
fn bad_data_is_a_typed_error() {
    let dev = emulator(0);
    let heads = [3usize, 2];
    let logits = Tensor::zeros(&dev, &[2, 2, 2, 3], DType::F32).unwrap();
    let bad_ds = Tensor::from_slice(&dev, &[2], &[0i32, 2]).unwrap();
    assert_eq!(
        metrics::argmax(&logits, &bad_ds, &heads).unwrap_err(),
        Error::DatasetIndexOutOfRange { sample: 1, index: 2, num_datasets: 2 }
    );
    let ds = Tensor::from_slice(&dev, &[2], &[0i32, 1]).unwrap();
    let pred = Tensor::from_slice(&dev, &[2, 2, 2], &[0i32, 1, 2, 0, 1, 1, 0, 0]).unwrap();
    let labels = |v: [u8; 8]| Tensor::from_slice(&dev, &[2, 2, 2], &v).unwrap();
    let ok = labels([0, 1, 2, 255, 1, 0, 255, 1]);
    let m = metrics::confusion_matrix(&pred, &ok, &ds, &heads).unwrap().to_vec::<i32>().unwrap();
    assert_eq!(m, vec![1, 0, 0, 0, 1, 0, 0, 0, 1, /* dataset 1 */ 0, 1, 1, 1]);
    assert_eq!(
        metrics::confusion_matrix(&pred, &ok, &bad_ds, &heads).unwrap_err(),
        Error::DatasetIndexOutOfRange { sample: 1, index: 2, num_datasets: 2 }
    );
    // Label 2 at pixel 5 is outside dataset 1's head; 254 later too: the first one is named.
    let bad = labels([0, 1, 2, 255, 1, 2, 254, 1]);
    assert_eq!(
        metrics::confusion_matrix(&pred, &bad, &ds, &heads).unwrap_err(),
        Error::InvalidLabel { dataset: 1, label: 2, position: 5, num_classes: 2 }
    );
    // Prediction 2 at pixel 4 (dataset 1) is invalid; at an ignored pixel it would not matter.
    let bad_pred = Tensor::from_slice(&dev, &[2, 2, 2], &[0i32, 1, 2, 7, 2, 1, 0, 0]).unwrap();
    assert_eq!(
        metrics::confusion_matrix(&bad_pred, &ok, &ds, &heads).unwrap_err(),
        Error::InvalidPrediction { dataset: 1, prediction: 2, position: 4, num_classes: 2 }
    );
    // Host-side checks.
    assert!(matches!(metrics::argmax(&logits, &ds, &[3, 4]), Err(Error::InvalidArgument(_))));
    let f_pred = Tensor::zeros(&dev, &[2, 2, 2], DType::F32).unwrap();
    assert!(matches!(metrics::confusion_matrix(&f_pred, &ok, &ds, &heads), Err(Error::DTypeMismatch { .. })));
    let mut acc = ConfusionMatrices::new(&heads);
    assert!(matches!(acc.add_counts(&[1, 2]), Err(Error::ShapeMismatch { .. })));
    assert_eq!(acc.miou(0), None);
}
