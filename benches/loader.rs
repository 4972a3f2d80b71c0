//! Throughput of the training loader: decode + the paper's augmentation (random scale in
//! [0.5, 2], 512×512 crop, flip, normalisation) + batching, in images per second, for
//! Cityscapes-sized PNGs (2048×1024) and BDD100K-sized JPEGs (1280×720), with 1, 2 and all
//! cores decoding. The files are synthetic street scenes written in the datasets' layouts to a
//! temporary folder (8 of each), so the bench needs no download; real photographs compress
//! less well than rendered scenes, so their PNGs decode somewhat slower.
//!
//! `cargo bench --bench loader`

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use cdcl::data::image::{write_png_gray, write_png_rgb};
use cdcl::data::{
    to_rgb8, AugmentConfig, DatasetKind, Loader, LoaderConfig, RgbImage, SegDataset, Synthetic, SyntheticConfig,
};

const IMAGES: usize = 8;
const BATCH: usize = 8;

/// Writes `IMAGES` scenes of `h × w` in the Cityscapes (PNG) or BDD100K (JPEG) layout.
fn write(root: &Path, kind: DatasetKind, h: usize, w: usize) {
    let data = Synthetic::new(SyntheticConfig::default_two_domains(h, w, 3)).unwrap();
    for i in 0..IMAGES {
        let s = data.sample(0, i as u64).unwrap();
        let img = RgbImage { width: w, height: h, data: to_rgb8(&s.image) };
        let labels: Vec<u8> = s.label.iter().map(|&l| l as u8).collect();
        let (image, label) = match kind {
            DatasetKind::Cityscapes => {
                let stem = format!("bench_{i:06}_000019");
                (
                    root.join(format!("leftImg8bit/train/bench/{stem}_leftImg8bit.png")),
                    root.join(format!("gtFine/train/bench/{stem}_gtFine_labelTrainIds.png")),
                )
            }
            _ => (
                root.join(format!("images/10k/train/{i:08}.jpg")),
                root.join(format!("labels/sem_seg/masks/train/{i:08}.png")),
            ),
        };
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        std::fs::create_dir_all(label.parent().unwrap()).unwrap();
        if image.extension().is_some_and(|e| e == "jpg") {
            let enc = jpeg_encoder::Encoder::new_file(&image, 90).unwrap();
            enc.encode(&img.data, w as u16, h as u16, jpeg_encoder::ColorType::Rgb).unwrap();
        } else {
            write_png_rgb(&image, &img).unwrap();
        }
        write_png_gray(&label, w, h, &labels).unwrap();
    }
}

/// Time to draw `iters` batches of `BATCH` images through a fresh loader.
fn draw(dataset: &Arc<dyn SegDataset>, workers: usize, iters: u64) -> Duration {
    let config = LoaderConfig {
        batch: BATCH,
        augment: AugmentConfig::default(),
        seed: 1,
        workers,
        prefetch: 2,
        rank: 0,
        world: 1,
    };
    let start = Instant::now();
    let mut loader = Loader::new(vec![dataset.clone()], config, vec![vec![0]; iters as usize], 0).unwrap();
    while let Some(b) = loader.next_iteration() {
        std::hint::black_box(b.unwrap());
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1, 2, cores];
    threads.dedup();
    let mut g = c.benchmark_group("loader_512x512_crops");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(BATCH as u64));
    for (kind, name, h, w) in [
        (DatasetKind::Cityscapes, "cityscapes_png_2048x1024", 1024, 2048),
        (DatasetKind::Bdd100k, "bdd100k_jpeg_1280x720", 720, 1280),
    ] {
        let root = dir.path().join(name);
        write(&root, kind, h, w);
        let ds: Arc<dyn SegDataset> = Arc::new(kind.open(&root, "train").unwrap());
        for &t in &threads {
            g.bench_with_input(BenchmarkId::new(name, format!("{t}_workers")), &t, |b, &t| {
                b.iter_custom(|iters| draw(&ds, t, iters))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
