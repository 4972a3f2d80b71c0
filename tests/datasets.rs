//! The real datasets' layouts, written tiny to a temporary directory by the test (PNG and
//! JPEG files made here): files found and paired, label mappings against the published
//! tables, and bad input as typed errors naming the file.

mod fixtures;

use std::path::Path;

use cdcl::data::image::{decode_image, decode_labels};
use cdcl::data::labels::{cityscapes_classes, cityscapes_train_id, LabelMapping};
use cdcl::data::{verify, DatasetKind, SegDataset};
use cdcl::Error;
use fixtures::*;

/// Cityscapes label id → train id as published in cityscapesScripts' `helpers/labels.py`,
/// written out here independently of the crate's table (id: train id; absent ids → 255).
const PUBLISHED: [(u8, u8); 19] = [
    (7, 0),
    (8, 1),
    (11, 2),
    (12, 3),
    (13, 4),
    (17, 5),
    (19, 6),
    (20, 7),
    (21, 8),
    (22, 9),
    (23, 10),
    (24, 11),
    (25, 12),
    (26, 13),
    (27, 14),
    (28, 15),
    (31, 16),
    (32, 17),
    (33, 18),
];

fn published(id: u8) -> u8 {
    PUBLISHED.iter().find(|(i, _)| *i == id).map_or(255, |(_, t)| *t)
}

fn all_ids() -> Vec<u8> {
    (0..=40).chain([200, 255]).collect()
}

/// The error is `Error::Data` and names `file` (its file name is in the message's path).
fn assert_names(e: Error, file: &Path, what: &str) {
    match &e {
        Error::Data { path, message } => {
            let name = file.file_name().unwrap().to_string_lossy();
            assert!(path.contains(&*name), "{what}: error names {path:?}, not {name} ({message})");
            assert!(message.contains(what), "{what}: message {message:?}");
        }
        other => panic!("{what}: expected Error::Data, got {other:?}"),
    }
}

#[test]
fn cityscapes_files_are_found_paired_and_mapped_to_train_ids() {
    let dir = tempfile::tempdir().unwrap();
    let ids = all_ids();
    let images = cityscapes(dir.path(), "val", &["lindau", "frankfurt"], 2, 43, 8, &ids);
    let ds = DatasetKind::Cityscapes.open(dir.path(), "val").unwrap();
    assert_eq!((ds.name(), ds.split(), ds.len(), ds.num_classes()), ("cityscapes", "val", 4, 19));
    // Sorted by city, then file: frankfurt before lindau.
    let mut expected = images.clone();
    expected.sort();
    let found: Vec<_> = ds.items.iter().map(|i| i.image.clone()).collect();
    assert_eq!(found, expected);
    for it in &ds.items {
        let label = it.labels.as_ref().unwrap().0.file_name().unwrap().to_string_lossy().to_string();
        let image = it.image.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(label.replace("_gtFine_labelIds", "_leftImg8bit"), image);
    }
    assert_eq!(ds.sample_name(0), "frankfurt_000001_000000");
    // Every pixel maps as the published table says; the spot checks of the issue too.
    let raw = decode_labels(&ds.items[0].labels.as_ref().unwrap().0).unwrap();
    let s = ds.sample(0).unwrap();
    let mapped = s.labels.unwrap().data;
    for (&r, &m) in raw.data.iter().zip(&mapped) {
        assert_eq!(m, published(r as u8), "label id {r}");
    }
    for (id, train) in [(7, 0), (8, 1), (26, 13), (0, 255), (1, 255), (2, 255), (3, 255), (4, 255), (5, 255), (6, 255)]
    {
        assert_eq!(cityscapes_train_id(id), train, "id {id}");
    }
    for id in 0..=255u16 {
        assert_eq!(cityscapes_train_id(id), published(id as u8), "id {id}");
    }
    assert_eq!(cityscapes_classes()[13], "car");
    assert_eq!(cityscapes_classes()[0], "road");
    assert_eq!(cityscapes_classes()[18], "bicycle");
    verify(&ds, 2, &|_| {}).unwrap();
}

#[test]
fn cityscapes_prefers_label_train_ids_when_present() {
    let dir = tempfile::tempdir().unwrap();
    cityscapes(dir.path(), "train", &["aachen"], 2, 16, 8, &[7, 26]);
    // The second image gets a labelTrainIds file with other content.
    let stem = "aachen_000000_000019";
    let path = dir.path().join(format!("gtFine/train/aachen/{stem}_gtFine_labelTrainIds.png"));
    png_gray(&path, 16, 8, &labels(16, 8, &[18, 255, 3]));
    let ds = DatasetKind::Cityscapes.open(dir.path(), "train").unwrap();
    let first = ds.sample(0).unwrap().labels.unwrap().data;
    assert!(first.iter().all(|&l| l == 0 || l == 13));
    let second = ds.sample(1).unwrap().labels.unwrap().data;
    assert_eq!(second, labels(16, 8, &[18, 255, 3]));
    // A labelTrainIds file must hold train ids.
    png_gray(&path, 16, 8, &labels(16, 8, &[19]));
    assert_names(ds.sample(1).unwrap_err(), &path, "label value 19");
}

#[test]
fn kitti_maps_cityscapes_label_ids() {
    let dir = tempfile::tempdir().unwrap();
    let ids = all_ids();
    kitti(dir.path(), 3, 37, 5, &ids);
    let ds = DatasetKind::Kitti.open(dir.path(), "val").unwrap();
    assert_eq!((ds.name(), ds.len(), ds.num_classes()), ("kitti", 3, 19));
    let raw = decode_labels(&ds.items[1].labels.as_ref().unwrap().0).unwrap();
    let mapped = ds.sample(1).unwrap().labels.unwrap().data;
    for (&r, &m) in raw.data.iter().zip(&mapped) {
        assert_eq!(m, published(r as u8), "label id {r}");
    }
    assert!(matches!(DatasetKind::Kitti.open(dir.path(), "test"), Err(Error::Data { .. })));
}

#[test]
fn camvid_void_is_ignored_and_classes_kept() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<u8> = (0..=11).chain([255]).collect();
    camvid(dir.path(), "train", 2, 26, 6, &values);
    let ds = DatasetKind::CamVid.open(dir.path(), "train").unwrap();
    assert_eq!((ds.name(), ds.len(), ds.num_classes()), ("camvid", 2, 11));
    let raw = decode_labels(&ds.items[0].labels.as_ref().unwrap().0).unwrap();
    let mapped = ds.sample(0).unwrap().labels.unwrap().data;
    for (&r, &m) in raw.data.iter().zip(&mapped) {
        assert_eq!(m, if r >= 11 { 255 } else { r as u8 });
    }
    assert!(mapped.contains(&255) && mapped.contains(&10) && mapped.contains(&0));
    // 12 is no CamVid class.
    let bad = dir.path().join("trainannot").join(ds.items[1].image.file_name().unwrap());
    png_gray(&bad, 26, 6, &labels(26, 6, &[3, 12]));
    assert_names(ds.sample(1).unwrap_err(), &bad, "label value 12");
}

#[test]
fn bdd100k_reads_jpeg_images_and_train_id_masks() {
    let dir = tempfile::tempdir().unwrap();
    let images = bdd100k(dir.path(), "val", 3, 24, 16, &[0, 13, 18, 255]);
    let ds = DatasetKind::Bdd100k.open(dir.path(), "val").unwrap();
    assert_eq!((ds.name(), ds.len(), ds.num_classes()), ("bdd100k", 3, 19));
    let mut expected = images;
    expected.sort();
    assert_eq!(ds.items.iter().map(|i| i.image.clone()).collect::<Vec<_>>(), expected);
    let s = ds.sample(2).unwrap();
    assert_eq!((s.image.width, s.image.height), (24, 16));
    assert_eq!(s.labels.unwrap().data, labels(24, 16, &[0, 13, 18, 255]));
    // JPEG is lossy: the decoded image is close to what was written, not equal.
    let written = rgb(24, 16, 500 + 2);
    let err: f64 = s.image.data.iter().zip(&written.data).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum::<f64>()
        / written.data.len() as f64;
    assert!(err < 12.0, "mean absolute JPEG error {err}");
    verify(&ds, 0, &|_| {}).unwrap();
}

#[test]
fn list_dataset_reads_its_class_names_and_pairs() {
    let dir = tempfile::tempdir().unwrap();
    list(dir.path(), &["background", "lane", "car"], &[("train", 3), ("val", 1)], 12, 9);
    let ds = DatasetKind::List.open(dir.path(), "train").unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.class_names(), ["background", "lane", "car"]);
    let s = ds.sample(1).unwrap();
    assert_eq!(s.image, rgb(12, 9, 1101));
    assert_eq!(s.labels.unwrap().data, labels(12, 9, &[0, 1, 2, 255]));
    std::fs::write(dir.path().join("bad.txt"), "img/train_0.png\n").unwrap();
    assert_names(DatasetKind::List.open(dir.path(), "bad").unwrap_err(), &dir.path().join("bad.txt"), "line 1");
}

#[test]
fn palette_label_maps_are_read_as_indices_and_every_png_kind_decodes() {
    let dir = tempfile::tempdir().unwrap();
    // An indexed PNG whose palette colours are not the indices (as VOC-style label maps).
    let path = dir.path().join("pal.png");
    let (w, h) = (5, 3);
    let idx: Vec<u8> = (0..15).map(|i| (i % 4) as u8).collect();
    {
        let f = std::fs::File::create(&path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]);
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(&idx).unwrap();
    }
    let raw = decode_labels(&path).unwrap();
    assert_eq!(raw.data, idx.iter().map(|&v| v as u16).collect::<Vec<_>>());
    // As a photo, the same file expands to its palette colours.
    let img = decode_image(&path).unwrap();
    assert_eq!(&img.data[3..6], &[40, 50, 60]);
    // 4-bit greyscale labels are unpacked.
    let p4 = dir.path().join("g4.png");
    {
        let f = std::fs::File::create(&p4).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 3, 2);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Four);
        let mut wr = enc.write_header().unwrap();
        wr.write_image_data(&[0x12, 0x30, 0xFE, 0xD0]).unwrap();
    }
    assert_eq!(decode_labels(&p4).unwrap().data, [1, 2, 3, 15, 14, 13]);
    // RGB is not a label map.
    let rgb_path = dir.path().join("rgb.png");
    png_rgb(&rgb_path, &rgb(4, 4, 1));
    assert_names(decode_labels(&rgb_path).unwrap_err(), &rgb_path, "single-channel");
    // An identity mapping rejects values beyond the classes, except 255.
    assert_eq!(LabelMapping::identity(3).map(255), Some(255));
    assert_eq!(LabelMapping::identity(3).map(3), None);
    assert_eq!(LabelMapping::cityscapes_ids().map(1000), Some(255));
}

/// Every kind of bad input is an `Error::Data` naming the file, found by `verify` before
/// anything trains.
#[test]
fn bad_input_is_a_typed_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Missing directory.
    let e = DatasetKind::Cityscapes.open(&root.join("nowhere"), "train").unwrap_err();
    assert_names(e, &root.join("nowhere/leftImg8bit/train"), "no such directory");
    let e = DatasetKind::Bdd100k.open(root, "train").unwrap_err();
    assert_names(e, &root.join("images/10k/train"), "no such directory");
    // Empty split.
    mkdir(&root.join("empty/leftImg8bit/val/ulm"));
    mkdir(&root.join("empty/gtFine/val/ulm"));
    let e = DatasetKind::Cityscapes.open(&root.join("empty"), "val").unwrap_err();
    assert_names(e, &root.join("empty/leftImg8bit/val"), "has no");
    // An image without its label file.
    let imgs = camvid(&root.join("cv"), "val", 3, 10, 6, &[1, 2]);
    let orphan = root.join("cv/valannot").join(imgs[1].file_name().unwrap());
    std::fs::remove_file(&orphan).unwrap();
    assert_names(DatasetKind::CamVid.open(&root.join("cv"), "val").unwrap_err(), &orphan, "no such label file");
    png_gray(&orphan, 10, 6, &labels(10, 6, &[1]));

    let ds = DatasetKind::CamVid.open(&root.join("cv"), "val").unwrap();
    verify(&ds, 2, &|_| {}).unwrap();
    let lab = |i: usize| ds.items[i].labels.as_ref().unwrap().0.clone();

    // A label map of another size.
    png_gray(&lab(2), 10, 5, &labels(10, 5, &[1]));
    assert_names(verify(&ds, 2, &|_| {}).unwrap_err(), &lab(2), "label map is 10×5");
    png_gray(&lab(2), 10, 6, &labels(10, 6, &[1]));

    // A label outside the classes (and not 255).
    png_gray(&lab(0), 10, 6, &labels(10, 6, &[1, 200]));
    assert_names(verify(&ds, 0, &|_| {}).unwrap_err(), &lab(0), "label value 200");
    png_gray(&lab(0), 10, 6, &labels(10, 6, &[1]));

    // A truncated PNG image: the first error in index order is reported, whatever the threads.
    let img1 = ds.items[1].image.clone();
    let bytes = std::fs::read(&img1).unwrap();
    std::fs::write(&img1, &bytes[..bytes.len() - 20]).unwrap();
    for workers in [0, 1, 3] {
        assert_names(verify(&ds, workers, &|_| {}).unwrap_err(), &img1, "PNG");
    }
    // A corrupted one (a flipped byte inside the image data fails its CRC).
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5A;
    std::fs::write(&img1, &bad).unwrap();
    assert_names(verify(&ds, 1, &|_| {}).unwrap_err(), &img1, "PNG");
    // Not an image at all.
    std::fs::write(&img1, b"GIF89a").unwrap();
    assert_names(verify(&ds, 1, &|_| {}).unwrap_err(), &img1, "neither a PNG nor a JPEG");
    std::fs::write(&img1, &bytes).unwrap();
    verify(&ds, 1, &|_| {}).unwrap();

    // A truncated and a corrupted JPEG.
    let b = bdd100k(&root.join("bdd"), "val", 2, 24, 16, &[1, 2]);
    let bds = DatasetKind::Bdd100k.open(&root.join("bdd"), "val").unwrap();
    let jpg = bds.items[0].image.clone();
    assert!(b.contains(&jpg));
    let bytes = std::fs::read(&jpg).unwrap();
    std::fs::write(&jpg, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert_names(verify(&bds, 1, &|_| {}).unwrap_err(), &jpg, "truncated JPEG");
    let mut garbage = bytes[..40].to_vec();
    garbage.extend(std::iter::repeat_n(0x00u8, 200));
    garbage.extend([0xFF, 0xD9]);
    std::fs::write(&jpg, &garbage).unwrap();
    assert_names(verify(&bds, 1, &|_| {}).unwrap_err(), &jpg, "JPEG");
    // A JPEG label map.
    std::fs::write(&jpg, &bytes).unwrap();
    let mask = bds.items[1].labels.as_ref().unwrap().0.clone();
    std::fs::copy(&jpg, &mask).unwrap();
    assert_names(verify(&bds, 1, &|_| {}).unwrap_err(), &mask, "must be a PNG");
}
