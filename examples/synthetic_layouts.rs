//! Writes synthetic street scenes in the Cityscapes and BDD100K layouts, so that the real-data
//! path of `cdcl train --data` and `cdcl eval` can be tried (and timed) without a download:
//! `OUT/cityscapes` (the "city" domain, PNG, label ids as in `gtFine_labelIds.png`) and
//! `OUT/bdd100k` (the "fog" domain, JPEG, train-id masks).
//!
//! `cargo run --release --example synthetic_layouts -- [OUT_DIR] [HxW] [TRAIN] [VAL]`
//! (defaults: `layouts 1024x2048 8 2`), then e.g.
//! `cdcl train --data cityscapes=layouts/cityscapes --data bdd100k=layouts/bdd100k --crop 512`.

use std::path::Path;

use cdcl::data::image::{write_png_gray, write_png_rgb};
use cdcl::data::{to_rgb8, FineClass, RgbImage, Synthetic, SyntheticConfig, HELD_OUT_START};

/// Cityscapes label id and train id of each fine class.
fn ids(f: i32) -> (u8, u8) {
    match FineClass::ALL.get(f as usize) {
        Some(FineClass::Road) => (7, 0),
        Some(FineClass::Sidewalk) => (8, 1),
        Some(FineClass::Building) => (11, 2),
        Some(FineClass::Pole) => (17, 5),
        Some(FineClass::Vegetation) => (21, 8),
        Some(FineClass::Sky) => (23, 10),
        Some(FineClass::Person) => (24, 11),
        Some(FineClass::Car) => (26, 13),
        None => (0, 255), // the ego-vehicle hood: "unlabeled"
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = Path::new(args.first().map_or("layouts", String::as_str));
    let size = args.get(1).map_or("1024x2048", String::as_str);
    let (h, w) = size.split_once('x').ok_or("size must be HxW")?;
    let (h, w): (usize, usize) = (h.parse()?, w.parse()?);
    let train: u64 = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let val: u64 = args.get(3).map_or(Ok(2), |s| s.parse())?;
    let data = Synthetic::new(SyntheticConfig::default_three_domains(h, w, 0))?;
    for (split, n, start) in [("train", train, 0), ("val", val, HELD_OUT_START)] {
        for i in 0..n {
            // Cityscapes: the "city" domain (0) as PNG with label ids.
            let s = data.sample(0, start + i)?;
            let fine = data.fine_labels(0, start + i)?;
            let stem = format!("synth_{i:06}_000019");
            let dir = out.join("cityscapes/leftImg8bit").join(split).join("synth");
            std::fs::create_dir_all(&dir)?;
            write_png_rgb(
                &dir.join(format!("{stem}_leftImg8bit.png")),
                &RgbImage { width: w, height: h, data: to_rgb8(&s.image) },
            )?;
            let dir = out.join("cityscapes/gtFine").join(split).join("synth");
            std::fs::create_dir_all(&dir)?;
            let label_ids: Vec<u8> = fine.iter().map(|&f| ids(f).0).collect();
            write_png_gray(&dir.join(format!("{stem}_gtFine_labelIds.png")), w, h, &label_ids)?;
            // BDD100K: the "fog" domain (2) as JPEG with train-id masks.
            let s = data.sample(2, start + i)?;
            let fine = data.fine_labels(2, start + i)?;
            let name = format!("{:08x}-{:08x}", 0xb1d0_0000u32 + i as u32, i);
            let dir = out.join("bdd100k/images/10k").join(split);
            std::fs::create_dir_all(&dir)?;
            let enc = jpeg_encoder::Encoder::new_file(dir.join(format!("{name}.jpg")), 90)?;
            enc.encode(&to_rgb8(&s.image), w as u16, h as u16, jpeg_encoder::ColorType::Rgb)?;
            let dir = out.join("bdd100k/labels/sem_seg/masks").join(split);
            std::fs::create_dir_all(&dir)?;
            let train_ids: Vec<u8> = fine.iter().map(|&f| ids(f).1).collect();
            write_png_gray(&dir.join(format!("{name}.png")), w, h, &train_ids)?;
        }
    }
    let (t, v, o) = (2 * train, 2 * val, out.display());
    println!("wrote {t} training and {v} validation images of {h}×{w} to {o}/cityscapes and {o}/bdd100k");
    Ok(())
}
