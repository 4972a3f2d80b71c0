//! The paper's augmentation (invariants), the per-dataset samplers and the parallel loader
//! (bitwise the same batches for any number of threads, resumable, shardable by rank).

mod fixtures;

use std::sync::Arc;

use cdcl::data::augment::hflip;
use cdcl::data::sampler::epoch_permutation;
use cdcl::data::{
    AugmentConfig, DatasetKind, LabelMap, LoadedBatch, Loader, LoaderConfig, RgbImage, SampleRef, Sampler, SegDataset,
};
use cdcl::Error;
use fixtures::*;

fn label_map(w: usize, h: usize, data: Vec<u8>) -> LabelMap {
    LabelMap { width: w, height: h, data }
}

/// A `w × h` sample whose label is the pixel's own number (so the output labels say which source
/// pixel they came from).
fn numbered(w: usize, h: usize) -> (RgbImage, LabelMap) {
    assert!(w * h <= 255);
    (rgb(w, h, 3), label_map(w, h, (0..(w * h) as u8).collect()))
}

fn config(crop: (usize, usize), scale: (f32, f32)) -> AugmentConfig {
    AugmentConfig { crop, scale, ..AugmentConfig::default() }
}

#[test]
fn labels_take_only_source_values_or_255_and_are_nearest_neighbours() {
    let (w, h) = (15, 11);
    let (img, lab) = numbered(w, h);
    let cfg = config((9, 13), (0.5, 2.0));
    let mut saw_flip = [false; 2];
    let mut saw_pad = false;
    for index in 0..200 {
        let d = cfg.draw(7, index / 50, 1, index as usize, h, w);
        assert!((0.5..=2.0).contains(&d.scale), "{d:?}");
        saw_flip[d.flip as usize] = true;
        let (out, labels) = cfg.apply(&img, Some(&lab), &d).unwrap();
        let labels = labels.unwrap();
        assert_eq!((out.len(), labels.len()), (9 * 13 * 3, 9 * 13));
        let (sh, sw) = d.scaled;
        let (pad_top, pad_left) = ((sh.max(9) - sh) / 2, (sw.max(13) - sw) / 2);
        for y in 0..9 {
            for x in 0..13 {
                let l = labels[y * 13 + x];
                let xs = if d.flip { 12 - x } else { x };
                let (py, px) =
                    ((y + d.offset.0) as isize - pad_top as isize, (xs + d.offset.1) as isize - pad_left as isize);
                if py < 0 || px < 0 || py >= sh as isize || px >= sw as isize {
                    saw_pad = true;
                    assert_eq!(l, 255, "padding at ({y}, {x}) of {d:?}");
                    assert!(out[(y * 13 + x) * 3..][..3].iter().all(|&v| v == 0.0), "image padding is the mean");
                    continue;
                }
                assert!((l as usize) < w * h, "label {l} is no source value");
                // Nearest neighbour: the source pixel's centre is within half a source pixel of
                // where the output pixel's centre maps.
                let (sy, sx) = (l as usize / w, l as usize % w);
                let cy = (py as f64 + 0.5) * h as f64 / sh as f64;
                let cx = (px as f64 + 0.5) * w as f64 / sw as f64;
                assert!((sy as f64 + 0.5 - cy).abs() <= 0.5 + 1e-9, "row {sy} for centre {cy} ({d:?})");
                assert!((sx as f64 + 0.5 - cx).abs() <= 0.5 + 1e-9, "column {sx} for centre {cx} ({d:?})");
            }
        }
    }
    assert!(saw_flip[0] && saw_flip[1] && saw_pad);
}

#[test]
fn scale_one_copies_pixels_and_normalises_them() {
    let (w, h) = (12, 10);
    let (img, lab) = numbered(w, h);
    let cfg = config((6, 7), (1.0, 1.0));
    let d = cfg.draw(1, 0, 0, 5, h, w);
    assert_eq!(d.scaled, (h, w));
    let (out, labels) = cfg.apply(&img, Some(&lab), &d).unwrap();
    let labels = labels.unwrap();
    for y in 0..6 {
        for x in 0..7 {
            let xs = if d.flip { 6 - x } else { x };
            let (sy, sx) = (y + d.offset.0, xs + d.offset.1);
            assert_eq!(labels[y * 7 + x] as usize, sy * w + sx);
            for k in 0..3 {
                let v = img.data[(sy * w + sx) * 3 + k] as f64 / 255.0;
                let want = (v - cfg.mean[k] as f64) / cfg.std[k] as f64;
                // Bilinear weights are exactly 0 at scale 1; the normalisation is two f32 ops.
                assert!((out[(y * 7 + x) * 3 + k] as f64 - want).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn flip_twice_is_the_identity_and_a_flipped_draw_is_the_mirrored_crop() {
    let (w, h) = (14, 9);
    let (img, lab) = numbered(w, h);
    let data: Vec<u32> = (0..5 * 7 * 3).collect();
    assert_eq!(hflip(&hflip(&data, 5, 7, 3), 5, 7, 3), data);
    assert_ne!(hflip(&data, 5, 7, 3), data);
    let cfg = config((8, 11), (0.7, 1.6));
    for index in 0..40 {
        let d = cfg.draw(3, 0, 0, index, h, w);
        let straight = cfg.apply(&img, Some(&lab), &cdcl::data::AugmentDraw { flip: false, ..d }).unwrap();
        let flipped = cfg.apply(&img, Some(&lab), &cdcl::data::AugmentDraw { flip: true, ..d }).unwrap();
        assert_eq!(hflip(&straight.0, 8, 11, 3), flipped.0);
        assert_eq!(hflip(straight.1.as_ref().unwrap(), 8, 11, 1), flipped.1.unwrap());
    }
}

#[test]
fn small_images_are_padded_with_ignore_labels_centred() {
    let (img, lab) = (rgb(4, 3, 1), label_map(4, 3, vec![7; 12]));
    let cfg = config((9, 10), (1.0, 1.0));
    let d = cfg.draw(0, 0, 0, 0, 3, 4);
    assert_eq!(d.offset, (0, 0));
    let (_, labels) = cfg.apply(&img, Some(&lab), &d).unwrap();
    let labels = labels.unwrap();
    let sevens: Vec<(usize, usize)> =
        (0..9).flat_map(|y| (0..10).map(move |x| (y, x))).filter(|&(y, x)| labels[y * 10 + x] == 7).collect();
    assert_eq!(sevens.len(), 12);
    assert_eq!(sevens[0], (3, 3));
    assert_eq!(labels.iter().filter(|&&l| l == 255).count(), 90 - 12);
}

#[test]
fn draws_are_a_pure_function_of_seed_epoch_dataset_index() {
    let cfg = AugmentConfig::default();
    let a = cfg.draw(5, 2, 1, 17, 1024, 2048);
    assert_eq!(a, cfg.draw(5, 2, 1, 17, 1024, 2048));
    for other in [
        cfg.draw(6, 2, 1, 17, 1024, 2048),
        cfg.draw(5, 3, 1, 17, 1024, 2048),
        cfg.draw(5, 2, 0, 17, 1024, 2048),
        cfg.draw(5, 2, 1, 18, 1024, 2048),
    ] {
        assert_ne!(a, other);
    }
    let bad = AugmentConfig { scale: (2.0, 0.5), ..cfg };
    assert!(matches!(bad.validate(), Err(Error::InvalidArgument(_))));
}

#[test]
fn samplers_visit_every_sample_once_per_epoch_and_shard_disjointly() {
    for len in [1, 2, 7, 10] {
        let p0 = epoch_permutation(3, 1, 0, len);
        let mut sorted = p0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..len).collect::<Vec<_>>());
        let mut s = Sampler::new(1, len, 3, 3, 0, 1, true).unwrap();
        let stream: Vec<SampleRef> = (0..4).flat_map(|k| s.batch(k)).collect();
        for (p, r) in stream.iter().enumerate() {
            assert_eq!(r.epoch, (p / len) as u64);
            assert_eq!(r.index, epoch_permutation(3, 1, r.epoch, len)[p % len]);
        }
    }
    assert_ne!(epoch_permutation(3, 1, 0, 50), epoch_permutation(3, 1, 1, 50));
    assert_ne!(epoch_permutation(3, 1, 0, 50), epoch_permutation(3, 2, 0, 50));
    // Rank shards of a world of 3 are the single-process batch of 3·B, in rank order.
    let mut one = Sampler::new(0, 11, 9, 6, 0, 1, true).unwrap();
    let mut ranks: Vec<Sampler> = (0..3).map(|r| Sampler::new(0, 11, 9, 2, r, 3, true).unwrap()).collect();
    for k in 0..5 {
        let joined: Vec<SampleRef> = ranks.iter_mut().flat_map(|s| s.batch(k)).collect();
        assert_eq!(joined, one.batch(k));
    }
    assert!(Sampler::new(0, 0, 0, 1, 0, 1, true).is_err());
    assert!(Sampler::new(0, 5, 0, 1, 2, 2, true).is_err());
}

/// A Cityscapes split of 4 and a CamVid split of 5, tiny.
fn two_datasets(root: &std::path::Path) -> Vec<Arc<dyn SegDataset>> {
    cityscapes(&root.join("cs"), "train", &["bonn", "ulm"], 2, 20, 12, &[7, 8, 26, 0]);
    camvid(&root.join("cv"), "train", 5, 15, 18, &[0, 3, 11]);
    vec![
        Arc::new(DatasetKind::Cityscapes.open(&root.join("cs"), "train").unwrap()),
        Arc::new(DatasetKind::CamVid.open(&root.join("cv"), "train").unwrap()),
    ]
}

fn run(
    datasets: &[Arc<dyn SegDataset>],
    cfg: LoaderConfig,
    schedule: &[Vec<usize>],
    start: usize,
) -> Vec<Vec<LoadedBatch>> {
    let mut l = Loader::new(datasets.to_vec(), cfg, schedule.to_vec(), start).unwrap();
    let mut out = Vec::new();
    while let Some(it) = l.next_iteration() {
        out.push(it.unwrap());
    }
    out
}

fn bits(b: &[Vec<LoadedBatch>]) -> Vec<(Vec<u32>, Vec<i32>, Vec<SampleRef>)> {
    b.iter()
        .flatten()
        .map(|b| (b.images.iter().map(|v| v.to_bits()).collect(), b.labels.clone(), b.samples.clone()))
        .collect()
}

#[test]
fn batches_are_bitwise_identical_for_any_number_of_loader_threads() {
    let dir = tempfile::tempdir().unwrap();
    let datasets = two_datasets(dir.path());
    // DAT with t = 2: dataset 0 twice per iteration.
    let schedule = vec![vec![0, 0, 1]; 5];
    let cfg = |workers| LoaderConfig {
        batch: 3,
        augment: config((10, 14), (0.5, 2.0)),
        seed: 11,
        workers,
        prefetch: 2,
        rank: 0,
        world: 1,
    };
    let reference = run(&datasets, cfg(1), &schedule, 0);
    assert_eq!(reference.len(), 5);
    for it in &reference {
        assert_eq!(it.iter().map(|b| b.dataset).collect::<Vec<_>>(), [0, 0, 1]);
        for b in it {
            assert_eq!((b.n, b.h, b.w, b.images.len(), b.labels.len()), (3, 10, 14, 3 * 140 * 3, 3 * 140));
            let valid: &[i32] = if b.dataset == 0 { &[0, 1, 13, 255] } else { &[0, 3, 255] };
            assert!(b.labels.iter().all(|l| valid.contains(l)), "{:?}", b.labels);
        }
    }
    // Dataset 0 (4 samples) gives 6 per iteration: its second epoch starts inside iteration 0.
    let d0: Vec<SampleRef> =
        reference.iter().flatten().filter(|b| b.dataset == 0).flat_map(|b| b.samples.clone()).collect();
    assert_eq!(d0[4].epoch, 1);
    for workers in [0, 2, 4] {
        assert!(bits(&run(&datasets, cfg(workers), &schedule, 0)) == bits(&reference), "{workers} workers");
    }
    // A resumed run draws what the uninterrupted one drew.
    assert!(bits(&run(&datasets, cfg(4), &schedule, 3)) == bits(&reference[3..]));
    // Two ranks' shards together are the one-rank batch of twice the size.
    let mut shards = Vec::new();
    for rank in 0..2 {
        shards.push(run(&datasets, LoaderConfig { rank, world: 2, ..cfg(2) }, &schedule, 0));
    }
    let whole = run(&datasets, LoaderConfig { batch: 6, ..cfg(2) }, &schedule, 0);
    for (it, w) in whole.iter().enumerate() {
        for (p, b) in w.iter().enumerate() {
            let (r0, r1) = (&shards[0][it][p], &shards[1][it][p]);
            assert_eq!([r0.samples.clone(), r1.samples.clone()].concat(), b.samples);
            assert!([r0.images.clone(), r1.images.clone()].concat() == b.images);
        }
    }
}

#[test]
fn unlabelled_splits_give_the_same_images_with_every_label_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let labelled = two_datasets(dir.path());
    let unlabelled: Vec<Arc<dyn SegDataset>> = vec![
        Arc::new(DatasetKind::Cityscapes.open(&dir.path().join("cs"), "train").unwrap().without_labels()),
        labelled[1].clone(),
    ];
    assert!(!unlabelled[0].has_labels());
    assert_eq!(unlabelled[0].image(1).unwrap(), labelled[0].sample(1).unwrap().image);
    let cfg = LoaderConfig { batch: 2, augment: config((8, 12), (0.5, 2.0)), workers: 2, ..LoaderConfig::default() };
    let schedule = vec![vec![0, 1]; 3];
    let (a, b) = (run(&labelled, cfg.clone(), &schedule, 0), run(&unlabelled, cfg, &schedule, 0));
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!(x.images == y.images && x.samples == y.samples);
        if x.dataset == 0 {
            assert!(y.labels.iter().all(|&l| l == 255));
        } else {
            assert_eq!(x.labels, y.labels);
        }
    }
}

#[test]
fn a_file_damaged_during_the_run_stops_the_loader_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let datasets = two_datasets(dir.path());
    let cv = dir.path().join("cv/train");
    for f in std::fs::read_dir(&cv).unwrap() {
        std::fs::write(f.unwrap().path(), b"broken").unwrap();
    }
    let cfg = LoaderConfig { batch: 2, augment: config((8, 8), (1.0, 1.0)), workers: 2, ..LoaderConfig::default() };
    let mut l = Loader::new(datasets, cfg, vec![vec![0], vec![0, 1], vec![0, 1]], 0).unwrap();
    assert!(l.next_iteration().unwrap().is_ok());
    match l.next_iteration().unwrap() {
        Err(Error::Data { path, .. }) => assert!(path.contains("cv/train/0001TP_"), "{path}"),
        other => panic!("{other:?}"),
    }
    assert!(l.next_iteration().is_none());
}

#[test]
fn synthetic_domains_load_like_files() {
    let data =
        Arc::new(cdcl::data::Synthetic::new(cdcl::data::SyntheticConfig::default_two_domains(32, 48, 1)).unwrap());
    let ds: Vec<Arc<dyn SegDataset>> = vec![
        Arc::new(cdcl::data::SyntheticSplit::train(data.clone(), 0, 10).unwrap()),
        Arc::new(cdcl::data::SyntheticSplit::train(data.clone(), 1, 3).unwrap()),
    ];
    assert_eq!((ds[1].name(), ds[1].num_classes()), ("dusk", 5));
    let s = ds[0].sample(4).unwrap();
    let direct = data.sample(0, 4).unwrap();
    assert_eq!(s.labels.unwrap().data, direct.label.iter().map(|&l| l as u8).collect::<Vec<_>>());
    let cfg = LoaderConfig { batch: 2, augment: config((16, 16), (0.5, 1.5)), workers: 2, ..LoaderConfig::default() };
    let b = run(&ds, cfg, &[vec![0, 1], vec![0, 1]], 0);
    assert!(b[1][1].labels.iter().all(|&l| (0..5).contains(&l) || l == 255));
}

#[test]
fn the_prefetcher_hands_results_out_in_order_and_reports_a_dead_producer() {
    use cdcl::data::Prefetcher;
    for workers in [0, 1, 3] {
        let mut p = Prefetcher::new(2, 7, workers, 2, |k| Ok(k * 10)).unwrap();
        let got: Vec<usize> = std::iter::from_fn(|| p.next()).map(|r| r.unwrap()).collect();
        assert_eq!(got, [20, 30, 40, 50, 60], "{workers} workers");
    }
    // An error ends the stream after it is handed out.
    let mut p = Prefetcher::new(0, 5, 2, 2, |k| if k == 1 { Err(Error::InvalidArgument("bad".into())) } else { Ok(k) })
        .unwrap();
    assert_eq!(p.next().unwrap().unwrap(), 0);
    assert!(p.next().unwrap().is_err());
    assert!(p.next().is_none());
    // A producer that dies (a panic) is an error, not the end of the schedule.
    let mut p = Prefetcher::new(0, 5, 1, 1, |k| if k == 2 { panic!("deliberate test panic") } else { Ok(k) }).unwrap();
    assert_eq!((p.next().unwrap().unwrap(), p.next().unwrap().unwrap()), (0, 1));
    assert!(matches!(p.next(), Some(Err(Error::InvalidArgument(m))) if m.contains("stopped unexpectedly")));
    assert!(p.next().is_none());
}
