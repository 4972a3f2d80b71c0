//! Loader throughput (decode + augment); filled in with the loader.
fn main() {}
