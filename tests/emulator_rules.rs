//! The emulator's memory and collective rules (kernels/emu/racecheck.cpp, emu.cpp), each shown
//! firing on a self-test kernel that breaks it (kernels/emu/selftest_rules.cu), on every one of
//! several schedule seeds and with one and two worker threads, with a message that names kernel,
//! block, thread and address or source line; and correct kernels shown passing them.
//!
//! The race detector rides on the kernels' thread instrumentation, which AddressSanitizer builds
//! cannot have (`--features asan`): there the race tests check that the instrumentation is
//! absent instead, and the normal build (CI's `cargo test`) runs them in full.

use cdcl::device::emulator::{run_selftest, SelfTest};
use cdcl::{Device, EmulatorConfig, Error, Tensor};

const SEEDS: [u64; 5] = [0, 1, 2, 7, 12345];

fn run(which: SelfTest, n: usize, seed: u64, threads: u32) -> (cdcl::Result<()>, Vec<f32>) {
    let dev = Device::emulator_with(EmulatorConfig { seed, threads }).unwrap();
    let mut out = Tensor::zeros(&dev, &[n], cdcl::DType::F32).unwrap();
    let r = run_selftest(which, &mut out);
    (r, out.to_vec::<f32>().unwrap())
}

/// Runs `which` on every seed and worker count, expects a fault each time and returns the
/// messages.
fn faults(which: SelfTest, n: usize) -> Vec<String> {
    let mut messages = Vec::new();
    for seed in SEEDS {
        for threads in [1, 2] {
            match run(which, n, seed, threads).0 {
                Err(Error::EmulatorFault { message, .. }) => messages.push(message),
                other => {
                    panic!("{which:?}, seed {seed}, {threads} worker(s): expected an emulator fault, got {other:?}")
                }
            }
        }
    }
    messages
}

/// The parts every rule's message must carry: kernel, block, thread.
fn names_kernel_block_thread(m: &str, kernel: &str) {
    assert!(m.contains(&format!("kernel `{kernel}`")), "kernel named: {m}");
    assert!(m.contains("block (0,0,0)"), "block named: {m}");
    assert!(m.contains(", thread ("), "thread named: {m}");
}

fn names_address(m: &str) {
    assert!(m.contains("at address 0x"), "address named: {m}");
}

// ---- (1) misaligned accesses ------------------------------------------------------------------

#[test]
fn misaligned_vector_accesses_fault_like_the_gpu() {
    for (which, kernel, ty, access, align) in [
        (SelfTest::MisalignedFloat4Load, "misaligned_float4_load", "float4", "load", 16),
        (SelfTest::MisalignedFloat2Store, "misaligned_float2_store", "float2", "store", 8),
        (SelfTest::MisalignedSharedUint4, "misaligned_shared_uint4", "uint4", "load", 16),
        (SelfTest::MisalignedHalf2, "misaligned_half2", "__half2", "load", 4),
    ] {
        for m in faults(which, 64) {
            names_kernel_block_thread(&m, kernel);
            names_address(&m);
            // The compiler describes the access as a load / store or as the binding of a
            // reference to the vector (the copy it makes); either way, of the vector type.
            assert!(
                m.contains(&format!("misaligned {access} of '")) || m.contains("misaligned reference binding of '"),
                "{which:?}: {m}"
            );
            assert!(m.contains(&format!("{ty}'")), "{which:?}: type named: {m}");
            assert!(m.contains(&format!("needs {align}-byte alignment")), "{which:?}: {m}");
            assert!(m.contains("selftest_rules.cu:"), "{which:?}: source line named: {m}");
        }
    }
    // The float2 store is thread 3's alone.
    assert!(faults(SelfTest::MisalignedFloat2Store, 32).iter().all(|m| m.contains("thread (3,0,0)")));
}

#[test]
fn misaligned_wmma_pointer_is_a_fault() {
    for m in faults(SelfTest::MisalignedWmmaLoad, 32) {
        names_kernel_block_thread(&m, "misaligned_wmma_load");
        assert!(m.contains("wmma::load_matrix_sync") && m.contains("not 256-bit (32-byte) aligned"), "{m}");
        assert!(m.contains("pointer 0x"), "address named: {m}");
    }
}

// ---- (2) data races -----------------------------------------------------------------------------

fn race_faults(which: SelfTest, n: usize) -> Option<Vec<String>> {
    if cfg!(feature = "asan") {
        // No thread instrumentation next to AddressSanitizer's: the kernel runs unchecked.
        assert!(run(which, n, 0, 1).0.is_ok(), "{which:?} under ASan");
        return None;
    }
    Some(faults(which, n))
}

#[test]
fn write_write_race_on_shared_memory_is_a_fault() {
    let Some(ms) = race_faults(SelfTest::SharedRace, 1) else { return };
    for m in ms {
        names_kernel_block_thread(&m, "shared_race");
        names_address(&m);
        assert!(m.contains("data race on shared memory") && m.contains("byte 0 of the block's shared memory"), "{m}");
        assert!(m.contains("this thread's write conflicts with a write"), "{m}");
        assert!(m.contains("since the block's start"), "{m}");
    }
}

#[test]
fn read_write_race_on_shared_memory_is_a_fault() {
    let Some(ms) = race_faults(SelfTest::SharedReadWriteRace, 64) else { return };
    for m in ms {
        names_kernel_block_thread(&m, "shared_read_write_race");
        names_address(&m);
        assert!(m.contains("data race on shared memory"), "{m}");
        assert!(
            m.contains("this thread's read conflicts with a write")
                || m.contains("this thread's write conflicts with a read"),
            "{m}"
        );
    }
}

#[test]
fn race_on_global_memory_is_a_fault() {
    let Some(ms) = race_faults(SelfTest::GlobalRace, 1) else { return };
    for m in ms {
        names_kernel_block_thread(&m, "global_race");
        names_address(&m);
        assert!(m.contains("data race on global memory"), "{m}");
    }
}

#[test]
fn plain_write_racing_with_atomics_is_a_fault() {
    let Some(ms) = race_faults(SelfTest::AtomicVsPlainWrite, 1) else { return };
    for m in ms {
        names_kernel_block_thread(&m, "atomic_vs_plain_write");
        assert!(m.contains("data race on shared memory"), "{m}");
        assert!(m.contains("atomic"), "{m}");
    }
}

#[test]
fn lanes_of_a_warp_need_a_syncwarp_between_write_and_read() {
    if let Some(ms) = race_faults(SelfTest::WarpExchangeUnsynced, 64) {
        for m in ms {
            names_kernel_block_thread(&m, "warp_exchange<false>");
            assert!(m.contains("with no __syncthreads or __syncwarp between them"), "{m}");
        }
    }
    // With the __syncwarp (and the barrier across warps) the exchange is correct on every seed.
    for seed in SEEDS {
        let (r, out) = run(SelfTest::WarpExchangeSynced, 64, seed, 1);
        r.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let want: Vec<f32> = (0..64u32).map(|t| ((t ^ 1) + (t + 32) % 64) as f32).collect();
        assert_eq!(out, want, "seed {seed}");
    }
}

/// Correct kernels with atomics, warp collectives and wmma pass the race detector.
#[test]
fn correct_kernels_pass_the_race_detector() {
    for seed in SEEDS {
        for (which, n) in [
            (SelfTest::AtomicsDynamicShared, 8),
            (SelfTest::WarpReduce, 256),
            (SelfTest::Collectives, 256),
            (SelfTest::PoisonedSharedRead, 64),
        ] {
            let (r, _) = run(which, n, seed, 2);
            r.unwrap_or_else(|e| panic!("{which:?}, seed {seed}: {e}"));
        }
    }
}

/// The preemptive schedule switches threads between shared-memory accesses, so a plain
/// read-modify-write loses updates (the count of 256 increments comes out short), differently
/// from seed to seed but reproducibly for one seed.
#[test]
fn preemptive_schedule_makes_lost_updates_visible() {
    if cfg!(feature = "asan") {
        return; // the schedule rides on the thread instrumentation (see the module docs)
    }
    let counts: Vec<f32> = SEEDS
        .iter()
        .map(|&seed| {
            let (r, out) = run(SelfTest::LostUpdatePreemptive, 1, seed, 1);
            r.unwrap();
            out[0]
        })
        .collect();
    assert!(counts.iter().all(|&c| (1.0..256.0).contains(&c)), "every seed loses updates: {counts:?}");
    let distinct: std::collections::BTreeSet<u32> = counts.iter().map(|&c| c as u32).collect();
    assert!(distinct.len() > 1, "the loss depends on the seed: {counts:?}");
    assert_eq!(run(SelfTest::LostUpdatePreemptive, 1, 7, 1).1, run(SelfTest::LostUpdatePreemptive, 1, 7, 1).1);
    // With the race detector on as well, the lost update is reported instead.
    for m in faults(SelfTest::LostUpdateRacecheck, 1) {
        names_kernel_block_thread(&m, "lost_update");
        assert!(m.contains("data race on shared memory") && m.contains("since the __syncthreads at"), "{m}");
    }
}

// ---- (3) launch bounds -------------------------------------------------------------------------

#[test]
fn launch_beyond_the_kernels_launch_bounds_is_refused() {
    for m in faults(SelfTest::BeyondLaunchBounds, 128) {
        assert!(m.contains("kernel `bounded_to_64`"), "{m}");
        assert!(m.contains("128 threads per block") && m.contains("__launch_bounds__(64)"), "{m}");
    }
    let (r, out) = run(SelfTest::WithinLaunchBounds, 64, 0, 1);
    r.unwrap();
    assert!(out.iter().all(|&v| v == 1.0));
}

// ---- (4) shuffles -------------------------------------------------------------------------------

#[test]
fn mismatched_shuffle_kinds_are_a_fault() {
    for m in faults(SelfTest::ShuffleKindMismatch, 32) {
        names_kernel_block_thread(&m, "shuffle_kind_mismatch");
        assert!(m.contains("mismatched shuffle"), "{m}");
        assert!(m.contains("__shfl_up_sync") && m.contains("__shfl_down_sync"), "{m}");
        assert!(m.matches("selftest_rules.cu:").count() == 2, "both call sites: {m}");
    }
}

#[test]
fn mismatched_shuffle_widths_are_a_fault() {
    for m in faults(SelfTest::ShuffleWidthMismatch, 32) {
        names_kernel_block_thread(&m, "shuffle_width_mismatch");
        assert!(m.contains("mismatched shuffle") && m.contains("width 16") && m.contains("width 32"), "{m}");
    }
}

// ---- (6) integer shared-memory poison -------------------------------------------------------------

/// Unwritten shared memory reads as the 16-bit pattern 0x7FF5 repeated: 2146795509 as an i32
/// (not -1 or 0, which kernels produce), NaN as a float.
#[test]
fn unwritten_integer_shared_memory_reads_as_a_loud_pattern() {
    for seed in [0, 3] {
        let (r, out) = run(SelfTest::PoisonedSharedInt, 64, seed, 1);
        r.unwrap();
        for (t, v) in out.iter().enumerate() {
            if t < 32 {
                assert_eq!(v.to_bits(), 7, "written slot {t}");
            } else {
                assert_eq!(v.to_bits(), 0x7FF5_7FF5, "unwritten slot {t}: {:#x}", v.to_bits());
                assert_eq!(v.to_bits() as i32, 2_146_795_509);
                assert!(v.is_nan());
            }
        }
    }
    // The same pattern is NaN in every float format a kernel may keep in shared memory.
    assert!(half::f16::from_bits(0x7FF5).is_nan() && half::bf16::from_bits(0x7FF5).is_nan());
    assert!(f64::from_bits(0x7FF5_7FF5_7FF5_7FF5).is_nan());
}

// ---- floating-point contraction -------------------------------------------------------------------

/// The emulator rounds a*b and then the sum (no contraction, docs/kernels.md "Bitwise claims");
/// nvcc's default contracts to one fma. Inputs where the two differ: a = b = 1 + 2^-12, so
/// a*b = 1 + 2^-11 + 2^-24 rounds (tie to even) to 1 + 2^-11, and c = -(1 + 2^-11).
#[test]
fn the_emulator_does_not_contract_multiply_add() {
    let a = 1.0f32 + 2f32.powi(-12);
    let c = -(1.0f32 + 2f32.powi(-11));
    let dev = Device::emulator_with(EmulatorConfig { seed: 0, threads: 1 }).unwrap();
    let mut out = Tensor::from_slice(&dev, &[4], &[a, a, c, f32::NAN]).unwrap();
    run_selftest(SelfTest::FpContraction, &mut out).unwrap();
    let got = out.to_vec::<f32>().unwrap()[3];
    assert_eq!(got, a * a + c, "two roundings");
    assert_eq!(got, 0.0);
    assert_eq!(a.mul_add(a, c), 2f32.powi(-24), "what a contracting compiler (nvcc -fmad=true) gives");
}

/// The tolerance the kernel tests use for a sum of products, k·u·Σ|a·b| with u = 2^-24, covers
/// both evaluations: rounded products and sums (the emulator) and fma chains (the GPU's
/// contraction). Checked against an f64 sum on random data where cancellation makes the two
/// differ.
#[test]
fn a_k_u_sum_abs_tolerance_covers_fused_and_unfused_dot_products() {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let u = f64::from(f32::EPSILON) / 2.0;
    let mut differ = 0;
    for k in [3usize, 16, 64, 300] {
        for _ in 0..200 {
            let (a, b): (Vec<f32>, Vec<f32>) = (0..k).map(|_| (next(), next())).unzip();
            let (mut unfused, mut fused, mut exact, mut mag) = (0f32, 0f32, 0f64, 0f64);
            for (x, y) in a.iter().zip(&b) {
                unfused += x * y;
                fused = x.mul_add(*y, fused);
                exact += f64::from(*x) * f64::from(*y);
                mag += (f64::from(*x) * f64::from(*y)).abs();
            }
            let tol = k as f64 * u * mag;
            assert!((f64::from(unfused) - exact).abs() <= tol && (f64::from(fused) - exact).abs() <= tol);
            differ += usize::from(unfused.to_bits() != fused.to_bits());
        }
    }
    assert!(differ > 100, "the two evaluations should differ often: {differ}");
}
