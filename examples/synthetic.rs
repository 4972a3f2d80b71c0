//! Writes a few samples of every synthetic domain as PPM images, with their label maps beside.
//!
//! `cargo run --example synthetic -- [OUT_DIR] [HEIGHT] [WIDTH] [SEED]`

use cdcl::data::{label_to_rgb8, to_rgb8, write_ppm, Synthetic, SyntheticConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args.first().map_or("synthetic", String::as_str);
    let h = args.get(1).map_or(Ok(128), |s| s.parse())?;
    let w = args.get(2).map_or(Ok(256), |s| s.parse())?;
    let seed = args.get(3).map_or(Ok(0), |s| s.parse())?;
    let data = Synthetic::new(SyntheticConfig::default_three_domains(h, w, seed))?;
    std::fs::create_dir_all(out)?;
    for d in 0..data.num_domains() {
        for i in 0..4 {
            let s = data.sample(d, i)?;
            let name = &data.info(d).name;
            write_ppm(format!("{out}/{name}_{i}.ppm"), w, h, &to_rgb8(&s.image))?;
            write_ppm(format!("{out}/{name}_{i}_label.ppm"), w, h, &label_to_rgb8(&s.label, data.info(d)))?;
        }
    }
    println!("wrote {} images to {out}", data.num_domains() * 8);
    Ok(())
}
