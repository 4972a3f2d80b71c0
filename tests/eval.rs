//! `cdcl eval`'s machinery: sliding-window, multi-scale and flip inference against their
//! definitions, the per-dataset report (mIoU leaves out absent classes), and a whole split
//! evaluated from files.

mod fixtures;

use std::sync::Arc;

use cdcl::backend::CpuBackend;
use cdcl::data::augment::hflip;
use cdcl::data::{DatasetKind, SegDataset};
use cdcl::eval::infer::{resize_bilinear, windows};
use cdcl::eval::{evaluate_dataset, predict_probs, to_csv, DatasetReport, ImageRef, InferOptions, Route, Window};
use cdcl::nn::{Depth, ModelConfig};
use cdcl::train::{TrainConfig, Trainer};
use fixtures::*;

fn tiny(classes: Vec<usize>) -> Trainer<CpuBackend> {
    let n = classes.len();
    let model =
        ModelConfig { depth: Depth::R18, width: 1.0 / 16.0, seed: 5, num_bn: n, ..ModelConfig::resnet18(classes) };
    Trainer::new(&CpuBackend::new(), model, TrainConfig::default()).unwrap()
}

fn image(h: usize, w: usize, seed: u64) -> Vec<f32> {
    (0..h * w * 3).map(|i| ((hash(seed, i as u64) >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn probs(t: &mut Trainer<CpuBackend>, img: &[f32], h: usize, w: usize, opts: &InferOptions) -> Vec<f32> {
    predict_probs(t, ImageRef { data: img, height: h, width: w }, 1, 0, opts).unwrap()
}

#[test]
fn sliding_window_flip_and_multiscale_equal_whole_image_when_crop_is_the_image() {
    let mut t = tiny(vec![4, 6]);
    let (h, w) = (21, 30);
    let img = image(h, w, 1);
    for flip in [false, true] {
        let whole = probs(&mut t, &img, h, w, &InferOptions { window: Window::Whole, scales: vec![1.0], flip });
        let slide = InferOptions { window: Window::Slide { crop: (h, w), stride: (7, 9) }, scales: vec![1.0], flip };
        assert_eq!(bits(&probs(&mut t, &img, h, w, &slide)), bits(&whole), "flip {flip}");
        // A crop larger than the image is one window of the image's size.
        let big = InferOptions { window: Window::Slide { crop: (64, 64), stride: (32, 32) }, scales: vec![1.0], flip };
        assert_eq!(bits(&probs(&mut t, &img, h, w, &big)), bits(&whole));
        // Probabilities: every pixel sums to 1.
        assert!(whole.chunks(6).all(|p| (p.iter().sum::<f32>() - 1.0).abs() < 1e-5));
    }
}

#[test]
fn each_option_is_what_its_definition_says() {
    let mut t = tiny(vec![4, 6]);
    let (h, w, c) = (19, 26, 6);
    let img = image(h, w, 2);
    let whole = |t: &mut Trainer<CpuBackend>, img: &[f32], h, w| probs(t, img, h, w, &InferOptions::default());
    // Flip: the mean of the image's and the mirrored image's (mirrored back) probabilities.
    let plain = whole(&mut t, &img, h, w);
    let mirrored = hflip(&whole(&mut t, &hflip(&img, h, w, 3), h, w), h, w, c);
    let want: Vec<f32> = plain.iter().zip(&mirrored).map(|(a, b)| (a + b) * 0.5).collect();
    let flip = InferOptions { flip: true, ..InferOptions::default() };
    assert_eq!(bits(&probs(&mut t, &img, h, w, &flip)), bits(&want));
    // Sliding window: each pixel's mean over the whole-image probabilities of the windows
    // covering it.
    let (ch, cw, sh, sw) = (12, 16, 5, 7);
    let wins = windows(h, w, Window::Slide { crop: (ch, cw), stride: (sh, sw) });
    // ⌈(19 − 12)/5⌉ + 1 = 3 rows, ⌈(26 − 16)/7⌉ + 1 = 3 columns; the last flush with the edge.
    assert_eq!(wins.len(), 9);
    assert_eq!(wins[8], (7, 10, 12, 16));
    let mut sum = vec![0.0f32; h * w * c];
    let mut count = vec![0u32; h * w];
    for &(top, left, wh, ww) in &wins {
        let crop: Vec<f32> =
            (top..top + wh).flat_map(|y| img[(y * w + left) * 3..(y * w + left + ww) * 3].to_vec()).collect();
        let p = whole(&mut t, &crop, wh, ww);
        for y in 0..wh {
            for x in 0..ww {
                count[(top + y) * w + left + x] += 1;
                for k in 0..c {
                    sum[((top + y) * w + left + x) * c + k] += p[(y * ww + x) * c + k];
                }
            }
        }
    }
    assert!(count.iter().all(|&n| n >= 1), "a pixel no window covers");
    let want: Vec<f32> = sum
        .chunks(c)
        .zip(&count)
        .flat_map(|(p, &n)| p.iter().map(move |v| if n > 1 { v * (1.0 / n as f32) } else { *v }).collect::<Vec<_>>())
        .collect();
    let slide = InferOptions { window: Window::Slide { crop: (ch, cw), stride: (sh, sw) }, ..InferOptions::default() };
    assert_eq!(bits(&probs(&mut t, &img, h, w, &slide)), bits(&want));
    // Scales: the mean over scales of the probabilities of the resized image, resized back.
    let half = resize_bilinear(&img, h, w, 3, 10, 13);
    let p_half = resize_bilinear(&whole(&mut t, &half, 10, 13), 10, 13, c, h, w);
    let want: Vec<f32> = p_half.iter().zip(&plain).map(|(a, b)| (a + b) * 0.5).collect();
    let ms = InferOptions { scales: vec![0.5, 1.0], ..InferOptions::default() };
    assert_eq!(bits(&probs(&mut t, &img, h, w, &ms)), bits(&want));
    assert!(InferOptions { scales: vec![], ..InferOptions::default() }.validate().is_err());
}

#[test]
fn miou_leaves_out_classes_absent_from_labels_and_predictions_and_says_so() {
    let names: Vec<String> = ["road", "car", "train", "sky"].iter().map(|s| s.to_string()).collect();
    let mut r = DatasetReport::new("cityscapes", "val", "cityscapes", "cityscapes", names);
    // road: 3 labelled, 2 right, 1 predicted car; car: 2 labelled, 1 right, 1 predicted sky;
    // the ignored pixel's prediction (sky) is not counted; train appears nowhere.
    r.add(&[0, 0, 0, 1, 1, 255], &[0, 0, 1, 1, 3, 3]).unwrap();
    let s = r.scores();
    assert_eq!(s[0].iou, Some(2.0 / 3.0));
    assert_eq!(s[1].iou, Some(1.0 / 3.0)); // tp 1, fp 1 (road→car), fn 1 (car→sky)
    assert_eq!(s[2].iou, None);
    assert_eq!(s[3].iou, Some(0.0)); // predicted, never labelled: counts as 0
    assert_eq!(r.miou(), Some((2.0 / 3.0 + 1.0 / 3.0 + 0.0) / 3.0));
    assert_eq!(r.pixel_accuracy(), Some(3.0 / 5.0));
    assert_eq!(r.absent(), ["train"]);
    let table = r.table();
    assert!(
        table.contains("over 3 of 4 classes") && table.contains("left out of mIoU") && table.contains("train"),
        "{table}"
    );
    let json = r.to_json();
    assert_eq!(json["left_out_of_miou"][0], "train");
    assert!(json["classes"][2]["iou"].is_null());
    let csv = to_csv(&[r.clone()]);
    assert!(csv.lines().any(|l| l == "cityscapes,val,cityscapes,cityscapes,train,,,0,0"), "{csv}");
    assert!(csv.lines().any(|l| l.starts_with("cityscapes,val,cityscapes,cityscapes,mIoU,0.333333")), "{csv}");
    assert!(r.add(&[4], &[0]).is_err());
}

#[test]
fn a_split_on_disk_is_evaluated_with_the_chosen_head_and_slice() {
    let dir = tempfile::tempdir().unwrap();
    cityscapes(dir.path(), "val", &["lindau"], 3, 22, 17, &[7, 8, 26, 0, 23]);
    let ds: Arc<dyn SegDataset> = Arc::new(DatasetKind::Cityscapes.open(dir.path(), "val").unwrap());
    let mut t = tiny(vec![19, 11]);
    let route = Route { head: 0, bn: 1, head_name: "cityscapes".into(), bn_name: "camvid".into() };
    let opts = InferOptions { flip: true, ..InferOptions::default() };
    let mut seen = Vec::new();
    let r = evaluate_dataset(&mut t, ds.clone(), &route, &opts, 2, |p| {
        seen.push((p.index, p.width, p.height, p.classes.len()));
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [(0, 22, 17, 374), (1, 22, 17, 374), (2, 22, 17, 374)]);
    assert_eq!(r.images, 3);
    let labelled: usize =
        (0..3).map(|i| ds.sample(i).unwrap().labels.unwrap().data.iter().filter(|&&l| l != 255).count()).sum();
    assert_eq!(r.confusion.iter().sum::<u64>(), labelled as u64);
    assert_eq!((r.head.as_str(), r.bn.as_str()), ("cityscapes", "camvid"));
    // The same on the calling thread.
    let again = evaluate_dataset(&mut t, ds.clone(), &route, &opts, 0, |_| Ok(())).unwrap();
    assert_eq!(again, r);
    // A head of another label space is refused.
    let wrong = Route { head: 1, ..route };
    let e = evaluate_dataset(&mut t, ds, &wrong, &opts, 1, |_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("19 classes but head 1"), "{e}");
}
