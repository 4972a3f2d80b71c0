//! The emulator's strictness rules, each shown firing on a kernel that breaks it
//! (kernels/emu/selftest.cu), and the collectives shown correct on kernels that use them right.

use cdcl::device::emulator::{run_selftest, SelfTest};
use cdcl::{Device, EmulatorConfig, Error, Tensor};

fn device(seed: u64) -> Device {
    Device::emulator_with(EmulatorConfig { seed, threads: 1 }).unwrap()
}

fn run(which: SelfTest, n: usize, seed: u64) -> (cdcl::Result<()>, Vec<f32>) {
    let dev = device(seed);
    let mut out = Tensor::zeros(&dev, &[n], cdcl::DType::F32).unwrap();
    let r = run_selftest(which, &mut out);
    (r, out.to_vec::<f32>().unwrap())
}

fn fault_message(which: SelfTest, n: usize) -> String {
    match run(which, n, 0).0 {
        Err(Error::EmulatorFault { message, .. }) => message,
        other => panic!("{which:?}: expected an emulator fault, got {other:?}"),
    }
}

#[test]
fn divergent_syncthreads_is_a_fault_naming_both_barriers() {
    let m = fault_message(SelfTest::DivergentSyncthreads, 32);
    assert!(m.contains("divergent barrier"), "{m}");
    assert!(
        m.contains("kernel `divergent_syncthreads`") && m.contains("block (0,0,0)") && m.contains("thread ("),
        "{m}"
    );
    assert!(m.matches("selftest.cu:").count() == 2, "both barrier sites named: {m}");
}

#[test]
fn early_return_then_barrier_is_a_fault_whatever_the_schedule() {
    for seed in 0..8 {
        let (r, _) = run(SelfTest::EarlyReturnThenBarrier, 32, seed);
        let m = match r {
            Err(Error::EmulatorFault { message, .. }) => message,
            other => panic!("seed {seed}: expected a fault, got {other:?}"),
        };
        assert!(m.contains("__syncthreads") && m.contains("exited"), "seed {seed}: {m}");
    }
}

#[test]
fn partial_mask_shuffle_is_a_fault() {
    let m = fault_message(SelfTest::PartialMaskShuffle, 32);
    assert!(m.contains("partial-mask"), "{m}");
    assert!(m.contains("__shfl"), "{m}");
}

#[test]
fn poisoned_shared_memory_reaches_the_output_as_nan() {
    let (r, out) = run(SelfTest::PoisonedSharedRead, 64, 0);
    r.unwrap();
    assert!(out[..32].iter().all(|&v| v == 1.0), "written half intact: {out:?}");
    assert!(out[32..].iter().all(|v| v.is_nan()), "unwritten half must read as NaN poison: {out:?}");
}

/// Every thread writes one shared word: the race detector reports it (tests/emulator_rules.rs
/// checks the message on every seed). AddressSanitizer builds have no race detector (see there);
/// the shuffled schedule still makes the survivor depend on the seed.
#[test]
fn a_racy_kernel_is_caught_or_changes_its_result_with_the_seed() {
    if !cfg!(feature = "asan") {
        let m = fault_message(SelfTest::SharedRace, 1);
        assert!(m.contains("data race on shared memory"), "{m}");
        return;
    }
    let results: std::collections::BTreeSet<u32> =
        (0..6).map(|seed| run(SelfTest::SharedRace, 1, seed).1[0] as u32).collect();
    assert!(results.len() > 1, "the survivor of the race should depend on the seed, got {results:?}");
    // The same seed reproduces the same interleaving.
    assert_eq!(run(SelfTest::SharedRace, 1, 3).1, run(SelfTest::SharedRace, 1, 3).1);
}

#[test]
fn launch_configuration_limits_fail_as_cuda_does() {
    let m = fault_message(SelfTest::BlockTooLarge, 4);
    assert!(m.contains("invalid configuration"), "{m}");
    let m = fault_message(SelfTest::ZeroGrid, 4);
    assert!(m.contains("invalid configuration"), "{m}");
    let m = fault_message(SelfTest::TooMuchShared, 32);
    assert!(m.contains("too much shared memory"), "{m}");
}

#[test]
fn warp_shuffle_reduction_is_correct_on_every_seed() {
    for seed in 0..4 {
        let (r, out) = run(SelfTest::WarpReduce, 200, seed);
        r.unwrap();
        // 4 blocks each sum 1..=200.
        assert_eq!(&out[..4], &[20100.0; 4], "seed {seed}");
    }
}

#[test]
fn every_collective_matches_cuda_semantics() {
    let (r, out) = run(SelfTest::Collectives, 256, 1);
    r.unwrap();
    for lane in 0..32usize {
        let l = lane as f32;
        assert_eq!(out[lane], 5.0, "shfl idx");
        assert_eq!(out[32 + lane], if lane >= 3 { l - 3.0 } else { l }, "shfl up");
        // width 8: lanes whose in-segment index + 3 leaves the segment keep their value.
        assert_eq!(out[64 + lane], if lane % 8 + 3 < 8 { l + 3.0 } else { l }, "shfl down width 8");
        assert_eq!(out[96 + lane], (lane ^ 1) as f32, "shfl xor width 16");
        assert_eq!(out[128 + lane], 11.0, "ballot popcount of lanes divisible by 3");
        assert_eq!(out[160 + lane], 1.0, "any");
        assert_eq!(out[192 + lane], 0.0, "all (lane 31 says no)");
        assert_eq!(out[224 + lane], if lane < 16 { 0.0 } else { 16.0 }, "half-warp masks");
    }
}

#[test]
fn out_of_bounds_selftest_is_refused_without_asan() {
    if cfg!(feature = "asan") {
        return;
    }
    let (r, _) = run(SelfTest::OutOfBoundsWrite, 4, 0);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
}

/// Under `--features asan`, a child process runs the out-of-bounds kernel and must die with an
/// AddressSanitizer heap-buffer-overflow report.
#[test]
fn out_of_bounds_write_is_caught_by_address_sanitizer() {
    if !cfg!(feature = "asan") {
        eprintln!("not built with --features asan: the ASan run in CI covers this");
        return;
    }
    if std::env::var_os("CDCL_ASAN_CHILD").is_some() {
        let _ = run(SelfTest::OutOfBoundsWrite, 4, 0);
        return; // not reached under ASan
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "out_of_bounds_write_is_caught_by_address_sanitizer", "--nocapture", "--test-threads=1"])
        .env("CDCL_ASAN_CHILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child should have been stopped by ASan; stderr:\n{stderr}");
    assert!(stderr.contains("AddressSanitizer") && stderr.contains("heap-buffer-overflow"), "{stderr}");
}

#[test]
fn fiber_switch_is_measured() {
    let ns = cdcl::device::emulator::fiber_switch_ns(10_000);
    assert!(ns.is_finite() && ns > 0.0, "{ns}");
}

#[test]
fn atomics_and_dynamic_shared_memory() {
    for seed in 0..3 {
        let (r, out) = run(SelfTest::AtomicsDynamicShared, 8, seed);
        r.unwrap();
        let sum = (512 * 513 / 2) as f32;
        // The float sum of integers below 2^24 is exact in any order.
        assert_eq!(out, vec![sum, sum, 511.0, 0.0, 1.0, 16.0, 128.0, 128.0], "seed {seed}");
    }
}

/// The emulator's 16-bit conversions against the `half` crate (an independent
/// round-to-nearest-even implementation): every f16/bf16 bit pattern back to f32, and f32
/// values around every rounding boundary (ties, subnormals, overflow, NaN, infinities).
#[test]
fn half_and_bfloat16_conversions_round_to_nearest_even() {
    use cdcl::device::emulator::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
    use half::{bf16, f16};
    for b in 0..=u16::MAX {
        let (h, bf) = (f16::from_bits(b), bf16::from_bits(b));
        let same = |a: f32, e: f32| (a.is_nan() && e.is_nan()) || a.to_bits() == e.to_bits();
        assert!(same(f16_bits_to_f32(b), h.to_f32()), "f16 {b:#06x}");
        assert!(same(bf16_bits_to_f32(b), bf.to_f32()), "bf16 {b:#06x}");
        // Every 16-bit value, its neighbours one f32 ulp away, and the midpoints to the next.
        for v in [h.to_f32(), bf.to_f32()] {
            if !v.is_finite() {
                continue;
            }
            let up = f32::from_bits(v.to_bits() + 1);
            let mid_h = (v as f64 + f16::from_bits(b.wrapping_add(1)).to_f64()) / 2.0;
            let mid_b = (v as f64 + bf16::from_bits(b.wrapping_add(1)).to_f64()) / 2.0;
            for x in [v, up, -v, mid_h as f32, mid_b as f32, f32::from_bits(v.to_bits().wrapping_sub(1))] {
                let (gh, eh) = (f32_to_f16_bits(x), f16::from_f32(x).to_bits());
                assert!(
                    gh == eh || (f16::from_bits(gh).is_nan() && f16::from_bits(eh).is_nan()),
                    "f16({x:e}): {gh:#06x} vs {eh:#06x}"
                );
                let (gb, eb) = (f32_to_bf16_bits(x), bf16::from_f32(x).to_bits());
                assert!(
                    gb == eb || (bf16::from_bits(gb).is_nan() && bf16::from_bits(eb).is_nan()),
                    "bf16({x:e}): {gb:#06x} vs {eb:#06x}"
                );
            }
        }
    }
    for x in [f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 65504.0, 65519.99, 65520.0, 1e-8, 2.9802322e-8, 5.9604645e-8]
    {
        assert_eq!(f32_to_f16_bits(x), f16::from_f32(x).to_bits(), "{x:e}");
        assert_eq!(f32_to_bf16_bits(x), bf16::from_f32(x).to_bits(), "{x:e}");
    }
    assert!(f16::from_bits(f32_to_f16_bits(f32::NAN)).is_nan() && bf16::from_bits(f32_to_bf16_bits(f32::NAN)).is_nan());
}

/// `wmma::__float_to_tf32` (`cvt.rna.tf32.f32`) against an independent f64 rounding: the value's
/// ulp at 10 mantissa bits (2^(e - 10), e = max(floor(log2|x|), -126) so that subnormals keep the
/// spacing 2^-136), |x| / ulp rounded to nearest with ties away from zero, overflow to infinity.
/// Inputs: every tie and its neighbours (one f32 ulp either side) over all exponents and a
/// sweep of mantissas, both signs, subnormals, the largest finite values, infinities and NaN.
#[test]
fn tf32_conversion_rounds_to_nearest_ties_away() {
    use cdcl::device::emulator::f32_to_tf32;
    let reference = |x: f32| -> f32 {
        if !x.is_finite() {
            return x;
        }
        let a = (x as f64).abs();
        if a == 0.0 {
            return x;
        }
        let e = (a.log2().floor() as i32).max(-126);
        // log2 of values just below a power of two can round up: fix the exponent exactly.
        let e = if 2f64.powi(e) > a { e - 1 } else { e }.max(-126);
        let ulp = 2f64.powi(e - 10);
        let r = (a / ulp + 0.5).floor() * ulp; // a / ulp is exact; + 0.5 then floor: ties away
        let r = if r >= 2f64.powi(128) { f64::INFINITY } else { r };
        (r as f32).copysign(x)
    };
    let mut checked = 0usize;
    for exp in 0u32..255 {
        for m in (0u32..1 << 10).step_by(7).chain([0, 1, 1022, 1023]) {
            let kept = (exp << 23) | (m << 13);
            for low in [0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF] {
                for sign in [0u32, 1 << 31] {
                    let x = f32::from_bits(sign | kept | low);
                    let (got, want) = (f32_to_tf32(x), reference(x));
                    assert!(
                        got.to_bits() == want.to_bits(),
                        "tf32({x:e} = {:#010x}): {got:e} vs {want:e}",
                        x.to_bits()
                    );
                    assert!(got.is_infinite() || got.to_bits() & 0x1FFF == 0, "{x:e}: low bits left");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100_000);
    for x in [f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX, 0.0, -0.0, f32::MIN_POSITIVE, 1e-45] {
        assert_eq!(f32_to_tf32(x).to_bits(), reference(x).to_bits(), "{x:e}");
    }
    // Ties go away from zero (not to even): 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
    assert_eq!(f32_to_tf32(1.0 + 2f32.powi(-11)), 1.0 + 2f32.powi(-10));
    assert_eq!(f32_to_tf32(-(1.0 + 3.0 * 2f32.powi(-11))), -(1.0 + 2.0 * 2f32.powi(-10)));
    assert!(f32_to_tf32(f32::NAN).is_nan());
}

// ---- nvcuda::wmma ------------------------------------------------------------------------------

/// Deterministic inputs in [-2, 2), rounded on the host to the 16-bit format the kernel rounds
/// them to (round to nearest even on both sides, so the kernel sees exactly these values).
fn wmma_inputs(len: usize, bf16: bool, salt: u64) -> Vec<f32> {
    let mut s = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = ((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32;
            if bf16 {
                half::bf16::from_f32(v).to_f32()
            } else {
                half::f16::from_f32(v).to_f32()
            }
        })
        .collect()
}

/// Runs a wmma GEMM self-test of size `s` (16: D = A·B + C with C read column-major; 32: D = A·B
/// + 0.5) and checks D against an f64 product of the same 16-bit inputs. Returns D.
///
/// Tolerance: each product of two 16-bit values is exact in f32 (at most 11 + 11 significand
/// bits), so the only error is the rounding of the `s` f32 additions into the accumulator: at
/// most s·u·(|C| + Σ|a·b|) to first order, u = 2^-24. The GPU's tensor cores add in another
/// order and may truncate instead of rounding (up to 2u per addition); 2·s·u·(|C| + Σ|a·b|)
/// covers both, and is still far below what a misplaced element would cause (an O(1) change).
fn check_wmma_gemm(which: SelfTest, s: usize, bf16: bool, seed: u64) -> Vec<f32> {
    let dev = device(seed);
    let mut input = wmma_inputs(3 * s * s, bf16, 7 + s as u64 + bf16 as u64);
    input.extend(std::iter::repeat_n(0.0f32, s * s));
    let mut out = Tensor::from_slice(&dev, &[4 * s * s], &input).unwrap();
    run_selftest(which, &mut out).unwrap_or_else(|e| panic!("{which:?}: {e}"));
    let out = out.to_vec::<f32>().unwrap();
    let (a, b, c) = (&input[..s * s], &input[s * s..2 * s * s], &input[2 * s * s..3 * s * s]);
    let u = f64::from(f32::EPSILON) / 2.0;
    for i in 0..s {
        for j in 0..s {
            // s == 16: C(i, j) sits at c[j * 16 + i] (column-major); s == 32: C = 0.5.
            let cij = if s == 16 { f64::from(c[j * 16 + i]) } else { 0.5 };
            let (mut exact, mut mag) = (cij, cij.abs());
            for k in 0..s {
                let p = f64::from(a[i * s + k]) * f64::from(b[k * s + j]);
                exact += p;
                mag += p.abs();
            }
            let got = f64::from(out[3 * s * s + i * s + j]);
            let tol = 2.0 * s as f64 * u * mag;
            assert!((got - exact).abs() <= tol, "{which:?} D({i},{j}) = {got}, expected {exact} ± {tol:e}");
        }
    }
    out[3 * s * s..].to_vec()
}

#[test]
fn wmma_gemm_matches_an_f64_product_and_is_bitwise_the_same_on_every_seed() {
    for (which, s, bf16) in [
        (SelfTest::WmmaGemmF16, 16, false),
        (SelfTest::WmmaGemmBf16, 16, true),
        (SelfTest::WmmaGemmF16Tiled, 32, false),
        (SelfTest::WmmaGemmBf16Tiled, 32, true),
    ] {
        let first = check_wmma_gemm(which, s, bf16, 0);
        for seed in 1..4 {
            let again = check_wmma_gemm(which, s, bf16, seed);
            assert!(
                first.iter().zip(&again).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{which:?}: seed {seed} changed the result"
            );
        }
    }
}

#[test]
fn wmma_lanes_passing_different_pointers_is_a_fault() {
    let m = fault_message(SelfTest::WmmaDivergentPointer, 32);
    assert!(m.contains("wmma::load_matrix_sync") && m.contains("different arguments"), "{m}");
    assert!(m.contains("kernel `wmma_divergent_pointer`") && m.contains("selftest.cu:"), "{m}");
}

#[test]
fn wmma_in_a_partial_warp_is_a_fault() {
    let m = fault_message(SelfTest::WmmaPartialWarp, 32);
    assert!(m.contains("wmma::fill_fragment") && m.contains("does not exist"), "{m}");
}

/// The fragment layout is opaque: a kernel that reads x[] as if lane l held row l / 2 gets every
/// element, but in a scrambled order.
#[test]
fn wmma_fragment_layout_is_scrambled() {
    let (r, out) = run(SelfTest::WmmaAssumedLayout, 256, 0);
    r.unwrap();
    let mut sorted: Vec<u32> = out.iter().map(|&v| v as u32).collect();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..256).collect::<Vec<u32>>(), "every element once: {out:?}");
    let in_place = out.iter().enumerate().filter(|(i, &v)| v as usize == *i).count();
    assert!(in_place < 16, "{in_place} of 256 elements where a row-major layout would put them");
}
