//! The `Backend` trait's contract, written once and run on every backend (as candle runs one
//! test body per device): `backend_suite!` instantiates every check below for the CPU backend
//! (`mod cpu`) and for our kernels on the test device (`mod device`: the emulator, or a GPU with
//! `CDCL_TEST_DEVICE=cuda`). Each op is compared with the f64 reference (`cdcl::reference`) on
//! small random shapes (few cases: the emulator is slow, and the kernels themselves are tested
//! at length in their own files), the fused ops with the backend's own primitives, data moves
//! bit for bit, bad input as typed errors.
//!
//! Tolerances hold for any implementation that accumulates in f32 in some fixed order (the
//! CPU backend, which sums in f64, is within them a fortiori). u = 2^-24, the f32 unit
//! roundoff; every input is an f32, so the reference sees exactly what the backend reads:
//! - add: one correctly rounded f32 addition, |err| <= u |want| (2u allowed). ReLU, its backward,
//!   max pooling (values and indices), argmax, slices and concatenations: exact.
//! - convolution: each output is a sum of D products (D = R S C + 1 with the bias, R S K for the
//!   data gradient, N P Q for the filter and bias gradients) accumulated in f32 in some fixed
//!   order: |err| <= gamma_D * sum |terms|, gamma_D = D u / (1 - D u), where sum |terms| is the
//!   reference run on |x|, |w|, |dy|. Allowed: 2 gamma_D sum |terms|.
//! - DSBN: as in tests/dsbn.rs (f32 blocked Welford over <= 5 * 4 * 4 values per (dataset,
//!   channel), |mean| / std <= 6): the statistics are within ~1e-6 relative, so y within
//!   1e-4 (1 + |y|), saved mean and running statistics within 1e-5 (1 + |v|), 1/std within 1e-5
//!   relative (10x margins); the residual adds one f32 rounding (u |v|). Backward: dgamma and
//!   dbeta within 1e-5 S, S = sum |g| (1 + |xhat|) over the group; dx within
//!   1e-4 gamma/std (|g| + S / M (1 + |xhat|)) + 1e-7. dresidual is the masked dy: exact. With
//!   ReLU, dy is zeroed where the pre-activation is within 1e-3 of 0, where f32 and f64 may mask
//!   differently. Datasets absent from the batch: running statistics exactly unchanged.
//! - adaptive average pooling and bilinear resize: the bounds derived in tests/pool.rs (bin
//!   sums of k terms: (k + 2) u times the reference on |x|; resize: u M (8 (In + 2) + 3) forward,
//!   u Mdy k (4 (In + 2) + k + 4) backward), doubled.
//! - max pooling backward: a sum of at most kh kw gradients, (kh kw + 1) u sum |dy| (doubled).
//! - Dropout2d: one f32 scale 1 / (1 - p) and one product: 2u |want| (4u allowed); dropped
//!   channels exactly 0.
//! - cross-entropy: as in tests/cross_entropy.rs, 5e-5 (1 + |L|) for the losses,
//!   5e-5 w / valid * scale + 2u |want| for dlogits, exact zeros where the reference has them.
//! - SGD: three fmas (tests/sgd.rs): 4u (|buf| + |d|) for the buffer, 4u (|p'| + lr (|buf| + |d|))
//!   for the parameter, each step from the backend's own state before it; the 16-bit copy is
//!   exactly the rounded parameter.
//! - The fused ops (DAB, PPM, the loss with the upsampling fused in) against the same backend's
//!   primitives: the convolution part is the same computation; the device DAB takes its
//!   statistics from the convolution's epilogue (another summation order than the DSBN pass,
//!   ~1e-6 relative), so outputs within 1e-4 (1 + |y|), running statistics within 1e-5
//!   (1 + |v|), gradients within 1e-3 of each tensor's largest magnitude (a statistics
//!   difference of 1e-6 is amplified through 1/std and the mean terms of the backward; wrong
//!   formulas are O(1)). tests/fused.rs holds the bit-for-bit f32 comparisons.

#[path = "../common/mod.rs"]
mod common;
mod conv_dsbn;
mod fused;
mod loss_sgd;
mod pool;
mod tensors;

use cdcl::backend::{
    Backend, BnStats, BnTables, CpuBackend, DabInput, DabOptions, DabSaved, DeviceBackend, LossOptions, PpmBranchMut,
    PpmBranchRef, SgdTensor, TensorLike,
};
use cdcl::ops::conv::ConvGeometry;
use cdcl::ops::cross_entropy::CrossEntropyOptions;
use cdcl::ops::dropout::Dropout2dOptions;
use cdcl::ops::dsbn::DsbnOptions;
use cdcl::ops::maxpool::PoolGeometry;
use cdcl::ops::ppm::PpmOptions;
use cdcl::ops::sgd::{FrozenRows, SgdOptions};
use cdcl::reference::{
    conv as rconv, cross_entropy as rce, dropout as rdrop, dsbn as rdsbn, elementwise as relt, maxpool as rmax,
    metrics as rmet, pool as rpool, sgd as rsgd,
};
use cdcl::{DType, Error};
use common::{assert_close, Rng};
use half::{bf16, f16};
use ndarray::{Array1, Array2, Array3, Array4, ArrayView2};
use proptest::prelude::*;

const U: f64 = f32::EPSILON as f64 / 2.0;

fn normals(r: &mut Rng, len: usize, scale: f64) -> Vec<f32> {
    (0..len).map(|_| (scale * r.normal()) as f32).collect()
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn arr4(shape: [usize; 4], v: Vec<f64>) -> Array4<f64> {
    Array4::from_shape_vec(shape, v).unwrap()
}

fn flat<D: ndarray::Dimension>(a: &ndarray::Array<f64, D>) -> Vec<f64> {
    a.iter().copied().collect()
}

fn read<B: Backend>(be: &B, t: &B::Tensor) -> Vec<f64> {
    wide(&be.to_f32(t).unwrap())
}

fn bits<B: Backend>(be: &B, t: &B::Tensor) -> Vec<u32> {
    match TensorLike::dtype(t) {
        DType::F32 => be.to_f32(t).unwrap().iter().map(|v| v.to_bits()).collect(),
        DType::I32 => be.to_i32(t).unwrap().iter().map(|&v| v as u32).collect(),
        d => panic!("unexpected dtype {d}"),
    }
}

/// gamma_D = D u / (1 - D u).
fn gamma(d: usize) -> f64 {
    d as f64 * U / (1.0 - d as f64 * U)
}

/// Every check of this suite as `#[test]`s for one backend: `$ty` built by `$make`.
macro_rules! backend_suite {
    ($ty:ty, $make:expr) => {
        use super::*;

        fn be() -> $ty {
            $make
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

            #[test]
            fn tensors_round_trip_bit_for_bit(shape in tensors::shape_strategy(4, 5), seed in any::<u64>()) {
                tensors::check_tensors(&be(), &shape, seed).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn float_storage_rounds_to_nearest_even(shape in tensors::shape_strategy(3, 6), seed in any::<u64>()) {
                tensors::check_float_storage(&be(), &shape, seed).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn elementwise_matches_reference(shape in tensors::shape_strategy(4, 6), seed in any::<u64>()) {
                tensors::check_elementwise(&be(), &shape, seed).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn convolution_matches_reference(k in conv_dsbn::conv_strategy()) {
                conv_dsbn::check_conv(&be(), &k).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn dsbn_matches_reference(k in conv_dsbn::bn_strategy()) {
                for (relu, residual) in [(false, false), (true, false), (false, true), (true, true)] {
                    let case = conv_dsbn::BnCase { relu, residual, ..k.clone() };
                    conv_dsbn::check_dsbn(&be(), &case).map_err(TestCaseError::fail)?;
                }
            }

            #[test]
            fn pooling_and_resize_match_reference(k in pool::pool_strategy()) {
                pool::check_pool(&be(), &k).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn channel_concat_and_slice_are_exact(
                n in 1usize..=3, h in 1usize..=4, w in 1usize..=4,
                widths in proptest::collection::vec(1usize..=5, 1..=4), seed in any::<u64>(),
            ) {
                tensors::check_channels(&be(), n, h, w, &widths, seed).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn batch_slices_round_trip_exactly(
                shape in tensors::shape_strategy(4, 5),
                cuts in proptest::collection::vec(0usize..8, 0..=3),
                seed in any::<u64>(),
            ) {
                tensors::check_batch(&be(), &shape, &cuts, seed).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn cross_entropy_and_argmax_match_reference(k in loss_sgd::ce_strategy()) {
                loss_sgd::check_cross_entropy(&be(), &k).map_err(TestCaseError::fail)?;
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

            #[test]
            fn max_pooling_matches_reference(k in pool::max_strategy()) {
                pool::check_max_pool(&be(), &k).map_err(TestCaseError::fail)?;
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

            #[test]
            fn dropout_matches_reference(
                n in 1usize..=3, h in 1usize..=3, w in 1usize..=3, c in 1usize..=9,
                p in prop_oneof![Just(0.0f32), Just(0.5), 0.05f32..0.95], seed in any::<u64>(),
            ) {
                loss_sgd::check_dropout(&be(), n, h, w, c, p, seed).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn sum_scaled_matches_host_sums(
                sizes in proptest::collection::vec((1usize..=300, 1usize..=3), 1..=4),
                dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
                scale in prop_oneof![Just(1.0f32), Just(1.0 / 1024.0), 0.01f32..2.0],
                seed in any::<u64>(),
            ) {
                loss_sgd::check_sum_scaled(&be(), &sizes, dtype, scale, seed).map_err(TestCaseError::fail)?;
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

            #[test]
            fn sgd_matches_reference(
                sizes in proptest::collection::vec(1usize..=300, 1..=3),
                momentum in 0.0f32..=0.99, weight_decay in 0.0f32..1e-2, seed in any::<u64>(),
            ) {
                loss_sgd::check_sgd(&be(), &sizes, momentum, weight_decay, seed).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn dab_matches_its_primitives(k in fused::dab_strategy()) {
                fused::check_dab(&be(), &k).map_err(TestCaseError::fail)?;
            }

            #[test]
            fn upsampled_loss_matches_resize_then_loss(k in fused::loss_strategy()) {
                fused::check_upsampled_loss(&be(), &k).map_err(TestCaseError::fail)?;
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

            #[test]
            fn ppm_matches_its_primitives(k in fused::ppm_strategy()) {
                fused::check_ppm(&be(), &k).map_err(TestCaseError::fail)?;
            }
        }

        #[test]
        fn dsbn_residual_named_mixes() {
            conv_dsbn::dsbn_residual_named_mixes(&be());
        }

        #[test]
        fn bn_new_and_tables() {
            conv_dsbn::bn_new_and_tables(&be());
        }

        #[test]
        fn dsbn_errors_leave_running_statistics_alone() {
            conv_dsbn::dsbn_errors_leave_running_statistics_alone(&be());
        }

        #[test]
        fn max_pool_backward_typed_errors_and_foreign_indices() {
            pool::max_pool_backward_typed_errors_and_foreign_indices(&be());
        }

        #[test]
        fn sgd_frozen_rows_match_cpu_backend() {
            loss_sgd::sgd_frozen_rows_match_cpu_backend(&be());
        }

        #[test]
        fn sgd_writes_16_bit_copies_and_skips_on_the_flag() {
            loss_sgd::sgd_copies_and_skip(&be());
        }

        #[test]
        fn dab_errors_move_nothing() {
            fused::dab_errors_move_nothing(&be());
        }

        #[test]
        fn fused_paths_equal_their_composition_bit_for_bit() {
            fused::fused_paths_are_bitwise_compositions(&be());
        }
    };
}

mod cpu {
    backend_suite!(CpuBackend, CpuBackend::new());

    /// The CPU backend's work split depends on the shapes only: the same bits with 1 and 2 rayon
    /// threads, for a forward and backward through every op.
    #[test]
    fn same_bits_with_one_and_two_threads() {
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| fused::pipeline(&be()))
        };
        let one = run(1);
        let two = run(2);
        assert_eq!(one.len(), two.len());
        for (i, (a, b)) in one.iter().zip(&two).enumerate() {
            assert!(a == b, "output {i} differs between 1 and 2 threads");
        }
        assert!(run(2) == two, "two runs with 2 threads differ");
    }
}

mod device {
    backend_suite!(DeviceBackend, DeviceBackend::new(common::test_device()));

    use cdcl::{Device, EmulatorConfig, Tensor};

    #[test]
    fn name_and_device() {
        let dev = Device::emulator_with(EmulatorConfig { seed: 3, threads: 1 }).unwrap();
        let be = DeviceBackend::new(dev.clone());
        assert_eq!(be.name(), dev.name());
        assert!(be.name().contains("emulator"), "{}", be.name());
        assert!(be.device().same_device(&dev));
    }

    #[test]
    fn tensors_of_another_device_are_refused() {
        let be = be();
        let other = Device::emulator_with(EmulatorConfig { seed: 0, threads: 0 }).unwrap();
        let mine = be.tensor_f32(&[2, 3], &[1.0; 6]).unwrap();
        let theirs = Tensor::from_slice(&other, &[2, 3], &[1.0f32; 6]).unwrap();
        assert!(matches!(be.add(&mine, &theirs), Err(Error::DeviceMismatch { .. })));
        assert!(matches!(be.relu(&theirs), Err(Error::DeviceMismatch { .. })));
        assert!(matches!(be.try_clone(&theirs), Err(Error::DeviceMismatch { .. })));
        assert!(matches!(be.slice_batch(&theirs, 0, 1), Err(Error::DeviceMismatch { .. })));
        assert!(matches!(be.concat_batch(&[&mine, &theirs]), Err(Error::DeviceMismatch { .. })));
    }

    /// The device backend's step accounting sees what its ops write.
    #[test]
    fn op_counters_count_activations_and_convolutions() {
        let be = be();
        let before = be.op_counters().unwrap();
        let x = be.tensor_float(&[1, 4, 4, 8], &[0.5; 128], DType::BF16).unwrap();
        let w = be.tensor_float(&[8, 3, 3, 8], &[0.1; 576], DType::BF16).unwrap();
        let y = be.conv2d(&x, &w, None, &ConvGeometry::square(1, 1, 1)).unwrap();
        be.relu(&y).unwrap();
        let d = be.op_counters().unwrap() - before;
        assert_eq!(d.activation_tensors, 2, "{d}");
        assert_eq!(d.activation_bytes, 2 * 128 * 2, "{d}");
        assert_eq!(d.convolution_kinds(), vec![(cdcl::backend::ConvProblem::Forward, DType::BF16)]);
    }
}
