//! The emulator's host side: its stream object, its memory, and its diagnostics (the fiber
//! switch cost and the self-test kernels that show each strictness rule firing).

use std::ffi::c_void;
use std::ptr::NonNull;

use super::{Device, EmulatorConfig};
use crate::error::{Error, Result};
use crate::ffi;
use crate::tensor::{DType, Tensor};

/// Owns a `cdcl_emu_stream`: the seed and worker count of the device, plus the message of its
/// last failed launch. The C side serialises launches on it with a mutex.
pub(crate) struct EmuStream {
    raw: NonNull<ffi::cdcl_emu_stream>,
    config: EmulatorConfig,
}

// SAFETY: the C stream object is only touched by launches, which hold its internal mutex, and by
// `last_error`, which is called right after a launch on the same thread while the mutex has been
// released; the object itself has no thread affinity.
unsafe impl Send for EmuStream {}
// SAFETY: see `Send`; shared access goes through the C side's mutex.
unsafe impl Sync for EmuStream {}

impl EmuStream {
    pub(crate) fn new(config: EmulatorConfig) -> Result<Self> {
        // SAFETY: plain constructor; returns null on allocation failure, handled below.
        let raw = unsafe { ffi::cdcl_emu_stream_create(config.seed, config.threads) };
        let raw = NonNull::new(raw).ok_or(Error::OutOfMemory { bytes: 64 })?;
        Ok(EmuStream { raw, config })
    }

    pub(crate) fn config(&self) -> EmulatorConfig {
        self.config
    }

    pub(crate) fn as_stream_ptr(&self) -> *mut c_void {
        self.raw.as_ptr().cast()
    }

    /// The message of the last failed launch on this stream.
    pub(crate) fn last_error(&self) -> String {
        let mut buf = vec![0u8; 1024];
        // SAFETY: `raw` is live; the callee writes at most `buf.len()` bytes, NUL-terminated.
        let n = unsafe { ffi::cdcl_emu_stream_last_error(self.raw.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len()).min(n);
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }
}

impl Drop for EmuStream {
    fn drop(&mut self) {
        // SAFETY: created by cdcl_emu_stream_create and destroyed once.
        unsafe { ffi::cdcl_emu_stream_destroy(self.raw.as_ptr()) }
    }
}

/// Average cost of one fiber switch in nanoseconds, measured over `iters` round trips
/// (each round trip is two switches). Used by the emulator benchmark.
pub fn fiber_switch_ns(iters: u64) -> f64 {
    // SAFETY: self-contained measurement on a private stack.
    unsafe { ffi::cdcl_emu_fiber_switch_ns(iters.max(1)) }
}

/// Kernels that break (or exercise) the CUDA rules on purpose, to show the emulator's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTest {
    /// Half a block waits at one `__syncthreads`, half at another.
    DivergentSyncthreads,
    /// Thread 0 returns, the others wait at a barrier.
    EarlyReturnThenBarrier,
    /// Half a warp calls `__shfl_sync` with the full mask.
    PartialMaskShuffle,
    /// Threads read shared memory that nobody wrote (needs an output of 64 floats).
    PoisonedSharedRead,
    /// 256 threads write one shared word; thread 0 reports the survivor (output of 1 float).
    SharedRace,
    /// Writes one float past the end of the output: only under the `asan` feature, where
    /// AddressSanitizer aborts the process with a report.
    OutOfBoundsWrite,
    /// A block of 2048 threads.
    BlockTooLarge,
    /// 64 KiB of static shared memory.
    TooMuchShared,
    /// A correct warp-shuffle reduction: output[b] = 1 + 2 + ... + n for each of 4 blocks
    /// (n = output length capped at 256, output of at least 4 floats).
    WarpReduce,
    /// A launch with a zero grid dimension.
    ZeroGrid,
    /// Every warp collective once, used correctly (output of 256 floats).
    Collectives,
    /// Integer and float atomics from 512 threads and a histogram in dynamic shared memory
    /// (output of 8 floats; see kernels/emu/selftest.cu for the expected values).
    AtomicsDynamicShared,
    /// A correct `nvcuda::wmma` GEMM D = A·B + C, 16 x 16 x 16, inputs rounded to f16, A
    /// row-major, B column-major. The output (1024 floats) holds A, B and C (16 x 16 each,
    /// row-major f32; C is read as a column-major matrix) and receives D (row-major) in its last
    /// quarter.
    WmmaGemmF16,
    /// As [`SelfTest::WmmaGemmF16`] with bf16 inputs.
    WmmaGemmBf16,
    /// A correct tiled `nvcuda::wmma` GEMM, 32 x 32 x 32 by two warps (two accumulators each,
    /// K in two steps), inputs rounded to f16, A column-major, B row-major, C = 0.5 everywhere.
    /// The output (4096 floats) holds A and B (32 x 32 each, row-major f32) and receives D
    /// (row-major) in its last quarter.
    WmmaGemmF16Tiled,
    /// As [`SelfTest::WmmaGemmF16Tiled`] with bf16 inputs.
    WmmaGemmBf16Tiled,
    /// One lane of a warp passes another pointer to `wmma::load_matrix_sync`.
    WmmaDivergentPointer,
    /// A block of 16 threads (a partial warp) calls `wmma::fill_fragment`.
    WmmaPartialWarp,
    /// Wrong code that assumes a fragment layout: loads M(r, c) = 16 r + c into an accumulator
    /// and writes element e of lane l to output[8 l + e] (256 floats).
    WmmaAssumedLayout,
    /// A `float4` load from a 4-byte aligned address (output of 32 floats).
    MisalignedFloat4Load,
    /// A `float2` store to a 4-byte aligned address (output of 32 floats).
    MisalignedFloat2Store,
    /// A `uint4` read from shared memory at an 8-byte aligned address (output of 32 floats).
    MisalignedSharedUint4,
    /// A `__half2` read at an odd `__half` offset of shared memory (output of 32 floats).
    MisalignedHalf2,
    /// `wmma::load_matrix_sync` from a pointer that is 16- but not 32-byte aligned (32 floats).
    MisalignedWmmaLoad,
    /// One thread writes a shared word that the others read in the same barrier interval.
    SharedReadWriteRace,
    /// Every thread increments output[0] with a plain read-modify-write of global memory.
    GlobalRace,
    /// A plain store and atomic adds to one shared counter in the same barrier interval.
    AtomicVsPlainWrite,
    /// Lanes exchange values through shared memory with a `__syncwarp` between write and read:
    /// correct (output of 64 floats: out[t] = (t ^ 1) + (t + 32) % 64).
    WarpExchangeSynced,
    /// The same exchange without the `__syncwarp`: a race between lanes of one warp.
    WarpExchangeUnsynced,
    /// 256 threads increment a shared counter with a plain read-modify-write, run under the
    /// preemptive schedule without the race detector: output[0] shows the lost updates.
    LostUpdatePreemptive,
    /// The same kernel under the preemptive schedule with the race detector on.
    LostUpdateRacecheck,
    /// Half a warp calls `__shfl_up_sync`, the other half `__shfl_down_sync`.
    ShuffleKindMismatch,
    /// Half a warp shuffles with width 16, the other half with width 32.
    ShuffleWidthMismatch,
    /// Threads read an `int` shared array half of which nobody wrote; output[t] holds the bits
    /// of slot t (output of 64 floats).
    PoisonedSharedInt,
    /// A kernel declared `__launch_bounds__(64)` launched with 128 threads per block.
    BeyondLaunchBounds,
    /// The same kernel launched with 64 threads per block, in 2 blocks (output of 64 floats).
    WithinLaunchBounds,
    /// output[3] = output[0] * output[1] + output[2] as plain code, which nvcc contracts to an
    /// fma and the emulator does not (output of 4 floats).
    FpContraction,
}

/// Runs a self-test kernel writing `out` (f32). The launch result is returned as is: a rule
/// break is an [`Error::EmulatorFault`].
pub fn run_selftest(which: SelfTest, out: &mut Tensor) -> Result<()> {
    if out.dtype() != DType::F32 {
        return Err(Error::DTypeMismatch { what: "self-test output", expected: DType::F32, got: out.dtype() });
    }
    let need = match which {
        SelfTest::PoisonedSharedRead => 64,
        SelfTest::Collectives => 256,
        SelfTest::WarpReduce => 4,
        SelfTest::AtomicsDynamicShared => 8,
        SelfTest::DivergentSyncthreads | SelfTest::EarlyReturnThenBarrier | SelfTest::PartialMaskShuffle => 32,
        SelfTest::TooMuchShared => 32,
        SelfTest::WmmaGemmF16 | SelfTest::WmmaGemmBf16 => 1024,
        SelfTest::WmmaGemmF16Tiled | SelfTest::WmmaGemmBf16Tiled => 4096,
        SelfTest::WmmaDivergentPointer | SelfTest::WmmaPartialWarp => 32,
        SelfTest::WmmaAssumedLayout => 256,
        SelfTest::MisalignedFloat4Load
        | SelfTest::MisalignedFloat2Store
        | SelfTest::MisalignedSharedUint4
        | SelfTest::MisalignedHalf2
        | SelfTest::MisalignedWmmaLoad
        | SelfTest::ShuffleKindMismatch
        | SelfTest::ShuffleWidthMismatch => 32,
        SelfTest::SharedReadWriteRace
        | SelfTest::WarpExchangeSynced
        | SelfTest::WarpExchangeUnsynced
        | SelfTest::PoisonedSharedInt
        | SelfTest::WithinLaunchBounds => 64,
        SelfTest::BeyondLaunchBounds => 128,
        SelfTest::FpContraction => 4,
        _ => 1,
    };
    if out.numel() < need {
        return Err(Error::InvalidShape {
            what: "self-test output",
            shape: out.shape().to_vec(),
            reason: format!("needs at least {need} elements"),
        });
    }
    if which == SelfTest::OutOfBoundsWrite && !cfg!(feature = "asan") {
        return Err(Error::InvalidArgument(
            "the out-of-bounds self-test only runs under the `asan` feature, where it is caught".into(),
        ));
    }
    let device: Device = out.device().clone();
    let stream = match &*device.inner {
        super::Backend::Emulator(s) => s,
        super::Backend::Cuda(_) => {
            return Err(Error::InvalidArgument("self-tests run on the emulator only".into()));
        }
    };
    let code = match which {
        SelfTest::DivergentSyncthreads => ffi::CDCL_SELFTEST_DIVERGENT_SYNCTHREADS,
        SelfTest::EarlyReturnThenBarrier => ffi::CDCL_SELFTEST_EARLY_RETURN_THEN_BARRIER,
        SelfTest::PartialMaskShuffle => ffi::CDCL_SELFTEST_PARTIAL_MASK_SHUFFLE,
        SelfTest::PoisonedSharedRead => ffi::CDCL_SELFTEST_POISONED_SHARED_READ,
        SelfTest::SharedRace => ffi::CDCL_SELFTEST_SHARED_RACE,
        SelfTest::OutOfBoundsWrite => ffi::CDCL_SELFTEST_OUT_OF_BOUNDS_WRITE,
        SelfTest::BlockTooLarge => ffi::CDCL_SELFTEST_BLOCK_TOO_LARGE,
        SelfTest::TooMuchShared => ffi::CDCL_SELFTEST_TOO_MUCH_SHARED,
        SelfTest::WarpReduce => ffi::CDCL_SELFTEST_WARP_REDUCE,
        SelfTest::ZeroGrid => ffi::CDCL_SELFTEST_ZERO_GRID,
        SelfTest::Collectives => ffi::CDCL_SELFTEST_COLLECTIVES,
        SelfTest::AtomicsDynamicShared => ffi::CDCL_SELFTEST_ATOMICS_DYNAMIC_SHARED,
        SelfTest::WmmaGemmF16 => ffi::CDCL_SELFTEST_WMMA_GEMM_F16,
        SelfTest::WmmaGemmBf16 => ffi::CDCL_SELFTEST_WMMA_GEMM_BF16,
        SelfTest::WmmaGemmF16Tiled => ffi::CDCL_SELFTEST_WMMA_GEMM_F16_TILED,
        SelfTest::WmmaGemmBf16Tiled => ffi::CDCL_SELFTEST_WMMA_GEMM_BF16_TILED,
        SelfTest::WmmaDivergentPointer => ffi::CDCL_SELFTEST_WMMA_DIVERGENT_POINTER,
        SelfTest::WmmaPartialWarp => ffi::CDCL_SELFTEST_WMMA_PARTIAL_WARP,
        SelfTest::WmmaAssumedLayout => ffi::CDCL_SELFTEST_WMMA_ASSUMED_LAYOUT,
        SelfTest::MisalignedFloat4Load => ffi::CDCL_SELFTEST_MISALIGNED_FLOAT4_LOAD,
        SelfTest::MisalignedFloat2Store => ffi::CDCL_SELFTEST_MISALIGNED_FLOAT2_STORE,
        SelfTest::MisalignedSharedUint4 => ffi::CDCL_SELFTEST_MISALIGNED_SHARED_UINT4,
        SelfTest::MisalignedHalf2 => ffi::CDCL_SELFTEST_MISALIGNED_HALF2,
        SelfTest::MisalignedWmmaLoad => ffi::CDCL_SELFTEST_MISALIGNED_WMMA_LOAD,
        SelfTest::SharedReadWriteRace => ffi::CDCL_SELFTEST_SHARED_READ_WRITE_RACE,
        SelfTest::GlobalRace => ffi::CDCL_SELFTEST_GLOBAL_RACE,
        SelfTest::AtomicVsPlainWrite => ffi::CDCL_SELFTEST_ATOMIC_VS_PLAIN_WRITE,
        SelfTest::WarpExchangeSynced => ffi::CDCL_SELFTEST_WARP_EXCHANGE_SYNCED,
        SelfTest::WarpExchangeUnsynced => ffi::CDCL_SELFTEST_WARP_EXCHANGE_UNSYNCED,
        SelfTest::LostUpdatePreemptive => ffi::CDCL_SELFTEST_LOST_UPDATE_PREEMPTIVE,
        SelfTest::LostUpdateRacecheck => ffi::CDCL_SELFTEST_LOST_UPDATE_RACECHECK,
        SelfTest::ShuffleKindMismatch => ffi::CDCL_SELFTEST_SHUFFLE_KIND_MISMATCH,
        SelfTest::ShuffleWidthMismatch => ffi::CDCL_SELFTEST_SHUFFLE_WIDTH_MISMATCH,
        SelfTest::PoisonedSharedInt => ffi::CDCL_SELFTEST_POISONED_SHARED_INT,
        SelfTest::BeyondLaunchBounds => ffi::CDCL_SELFTEST_BEYOND_LAUNCH_BOUNDS,
        SelfTest::WithinLaunchBounds => ffi::CDCL_SELFTEST_WITHIN_LAUNCH_BOUNDS,
        SelfTest::FpContraction => ffi::CDCL_SELFTEST_FP_CONTRACTION,
    };
    let n = out.numel().min(256) as i32;
    let ptr = out.buffer_mut().as_mut_ptr().cast::<f32>();
    // SAFETY: `out` is an emulator buffer of at least `need` floats, which covers every write of
    // the self-test kernels except OutOfBoundsWrite, which is only allowed under ASan, where the
    // write past the end is caught before it lands.
    let status = unsafe { ffi::cdcl_emu_run_selftest(code as i32, ptr, n, stream.as_stream_ptr()) };
    if status == ffi::CDCL_OK as i32 {
        Ok(())
    } else {
        Err(Error::EmulatorFault { kernel: format!("{which:?}"), message: stream.last_error() })
    }
}

/// The emulator's `__float2half_rn` (round to nearest even), as bits.
pub fn f32_to_f16_bits(v: f32) -> u16 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::cdcl_emu_f32_to_f16_bits(v) }
}

/// The emulator's `__half2float`.
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::cdcl_emu_f16_bits_to_f32(bits) }
}

/// The emulator's `__float2bfloat16_rn` (round to nearest even), as bits.
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::cdcl_emu_f32_to_bf16_bits(v) }
}

/// The emulator's `__bfloat162float`.
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::cdcl_emu_bf16_bits_to_f32(bits) }
}

/// The emulator's `wmma::__float_to_tf32` (`cvt.rna.tf32.f32`: round to nearest, ties away from
/// zero, to 10 mantissa bits), the rounding of every operand of a TF32 convolution.
pub fn f32_to_tf32(v: f32) -> f32 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::cdcl_emu_f32_to_tf32(v) }
}
