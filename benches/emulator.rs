//! The emulator's own costs: one fiber switch (design target: well under 100 ns; glibc's
//! swapcontext costs ~600 ns per round trip because of a sigprocmask syscall) and a launch of a
//! barrier- and shuffle-heavy kernel.

use cdcl::device::emulator::{fiber_switch_ns, run_selftest, SelfTest};
use cdcl::{DType, Device, EmulatorConfig, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn fiber_switch(c: &mut Criterion) {
    let mut g = c.benchmark_group("emulator");
    const ROUND_TRIPS: u64 = 10_000;
    g.throughput(Throughput::Elements(2 * ROUND_TRIPS));
    // One element = one switch; criterion's time per element is the switch cost.
    g.bench_function("fiber_switch", |b| b.iter(|| fiber_switch_ns(ROUND_TRIPS)));
    let dev = Device::emulator_with(EmulatorConfig { seed: 0, threads: 1 }).unwrap();
    let mut out = Tensor::zeros(&dev, &[256], DType::F32).unwrap();
    g.throughput(Throughput::Elements(4 * 256));
    // 4 blocks x 256 threads, 5 shuffles + 1 barrier per thread; one element = one thread.
    g.bench_function("warp_reduce_launch", |b| b.iter(|| run_selftest(SelfTest::WarpReduce, &mut out).unwrap()));
    g.finish();
}

criterion_group!(benches, fiber_switch);
criterion_main!(benches);
