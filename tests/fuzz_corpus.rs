//! Runs the DSBN fuzz driver (fuzz/drivers/dsbn.rs) on the stable toolchain: every file of the
//! seed corpus (fuzz/corpus/dsbn), then a few thousand inputs from a fixed-seed generator. Any
//! panic fails the test; a typed error is a pass.

#[path = "../fuzz/drivers/dsbn.rs"]
mod driver;

#[test]
fn seed_corpus_never_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dsbn");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.retain(|p| p.is_file());
    files.sort();
    assert!(files.len() >= 16, "the seed corpus in {} is missing", dir.display());
    for f in files {
        let data = std::fs::read(&f).unwrap();
        eprintln!("{}: {:?}", f.display(), driver::run(&data));
    }
}

#[test]
fn generated_inputs_never_panic() {
    let mut s: u64 = 0x5EED;
    let mut counts = std::collections::HashMap::new();
    for len in 0..3000usize {
        let data: Vec<u8> = (0..len % 400)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        let outcome = driver::run(&data);
        let seen = counts.entry(outcome).or_insert(0usize);
        *seen += 1;
        // CDCL_WRITE_CORPUS=1 refreshes the seed corpus from this generator: the first 12
        // inputs of each outcome.
        if std::env::var_os("CDCL_WRITE_CORPUS").is_some() && *seen <= 12 && outcome != driver::Outcome::Skipped {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dsbn");
            std::fs::write(dir.join(format!("gen-{outcome:?}-{seen:02}").to_lowercase()), &data).unwrap();
        }
    }
    eprintln!("{counts:?}");
    // The generator must reach the kernels and the error paths, not only the decoder.
    assert!(counts.get(&driver::Outcome::Ok).copied().unwrap_or(0) >= 30, "{counts:?}");
    assert!(counts.get(&driver::Outcome::Err).copied().unwrap_or(0) >= 30, "{counts:?}");
}
