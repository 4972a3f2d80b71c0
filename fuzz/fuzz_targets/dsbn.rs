//! `cargo fuzz run dsbn`: the public DSBN API with arbitrary shapes, dtypes, dataset indices
//! and values on the emulator. Every call must return a value or a typed error: a panic, a
//! hang or a sanitizer report is a bug. tests/fuzz_corpus.rs runs the same driver on the seed
//! corpus with the stable toolchain.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../drivers/dsbn.rs"]
mod driver;

fuzz_target!(|data: &[u8]| {
    driver::run(data);
});
