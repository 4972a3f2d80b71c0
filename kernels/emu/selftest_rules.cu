// Self-test kernels for the emulator's memory, launch and collective rules (misaligned accesses,
// data races, the preemptive schedule, launch bounds, mismatched shuffles, integer shared-memory
// poison), each
// breaking one rule on purpose, plus correct kernels that must pass them. tests/emulator_rules.rs
// runs them through cdcl_emu_run_selftest (selftest.cu forwards the codes it does not know).
#include "../cdcl_device.cuh"

namespace CDCL_NAMESPACE {

// Thread 0 loads a float4 from out + 1: 4-byte aligned, not 16.
__global__ void misaligned_float4_load(float* out) {
    if (threadIdx.x == 0) {
        const float4 v = *reinterpret_cast<const float4*>(out + 1);
        out[0] = v.x + v.w;
    }
}

// Thread 3 stores a float2 at out + 3: 4-byte aligned, not 8.
__global__ void misaligned_float2_store(float* out) {
    if (threadIdx.x == 3) *reinterpret_cast<float2*>(out + threadIdx.x) = make_float2(1.0f, 2.0f);
}

// Every thread reads a uint4 from shared memory at a byte offset of 8 + 16 t: 8-byte aligned, not 16.
__global__ void misaligned_shared_uint4(float* out) {
    CDCL_SHARED(uint4, s, [9]);
    if (threadIdx.x < 9) s[threadIdx.x] = make_uint4(1u, 2u, 3u, 4u);
    __syncthreads();
    const uint4 v = *reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(s) + 8 + 16 * threadIdx.x);
    out[threadIdx.x] = (float)(v.x + v.y);
}

// A __half2 pair read at an odd __half offset: 2-byte aligned, not 4.
__global__ void misaligned_half2(float* out) {
    CDCL_SHARED(__half, s, [66]);
    for (unsigned i = threadIdx.x; i < 66; i += blockDim.x) s[i] = __float2half(1.0f);
    __syncthreads();
    const __half2 v = *reinterpret_cast<const __half2*>(s + 1 + 2 * threadIdx.x);
    out[threadIdx.x] = __low2float(v) + __high2float(v);
}

// wmma::load_matrix_sync on a pointer 16 bytes past a 32-byte boundary.
__global__ void misaligned_wmma_load(float* out) {
    using namespace nvcuda;
    struct alignas(32) Tile {
        __half a[16 * 32];
    };
    CDCL_SHARED(Tile, t, );
    for (unsigned i = threadIdx.x; i < 16 * 32; i += blockDim.x) t.a[i] = __float2half(1.0f);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, t.a + 8, 32);
    out[threadIdx.x] = __half2float(fa.x[0]);
}

// Thread 0 writes s[0] while the others read it, with no barrier between.
__global__ void shared_read_write_race(float* out) {
    CDCL_SHARED(float, s, [1]);
    if (threadIdx.x == 0) s[0] = 1.0f;
    const float v = s[0];
    __syncthreads();
    out[threadIdx.x] = v;
}

// Every thread of the block increments out[0] with a plain read-modify-write of global memory.
__global__ void global_race(float* out) { out[0] = out[0] + 1.0f; }

// A plain store to a counter that other threads of the block update atomically in the same
// barrier interval.
__global__ void atomic_vs_plain_write(float* out) {
    CDCL_SHARED(int, count, [1]);
    if (threadIdx.x == 0) count[0] = 0;
    if (threadIdx.x != 0) atomicAdd(&count[0], 1);
    __syncthreads();
    if (threadIdx.x == 0) out[0] = (float)count[0];
}

// Lanes exchange values through shared memory. With `synced`, a __syncwarp orders each write
// before the neighbour's read (correct); without, the read races with the write.
template <bool synced>
__global__ void warp_exchange(float* out) {
    CDCL_SHARED(float, s, [64]);
    s[threadIdx.x] = (float)threadIdx.x;
    if (synced) __syncwarp();
    const float v = s[threadIdx.x ^ 1u];
    __syncthreads();
    // Across warps, the barrier orders warp 0's writes before warp 1's reads.
    out[threadIdx.x] = v + s[(threadIdx.x + 32) % 64];
}

// Every thread adds 1 to a shared counter with a plain read-modify-write (a lost-update bug);
// thread 0 reports the total after the barrier. Run under the preemptive schedule without the
// race detector, it loses updates.
__global__ void lost_update(float* out) {
    CDCL_SHARED(int, count, [1]);
    if (threadIdx.x == 0) count[0] = 0;
    __syncthreads();
    count[0] = count[0] + 1;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = (float)count[0];
}

// Half the warp shuffles up, the other half down, in what the lanes take for one shuffle.
__global__ void shuffle_kind_mismatch(float* out) {
    const float v = (float)threadIdx.x;
    const float r = threadIdx.x < 16 ? __shfl_up_sync(0xffffffffu, v, 1) : __shfl_down_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = r;
}

// Half the warp shuffles with width 16, the other half with the default 32.
__global__ void shuffle_width_mismatch(float* out) {
    const float v = (float)threadIdx.x;
    const float r = threadIdx.x < 16 ? __shfl_xor_sync(0xffffffffu, v, 1, 16) : __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = r;
}

// Threads 0..31 fill half of an int array; every thread returns the bits of its own slot.
__global__ void poisoned_shared_int(float* out) {
    CDCL_SHARED(int, s, [64]);
    if (threadIdx.x < 32) s[threadIdx.x] = 7;
    __syncthreads();
    out[threadIdx.x] = __int_as_float(s[threadIdx.x]);
}

// Declares at most 64 threads per block; the self-test launches 128.
__global__ void __launch_bounds__(64) bounded_to_64(float* out) { out[threadIdx.x] = 1.0f; }

// out[3] = out[0] * out[1] + out[2], written as plain C++: nvcc contracts it to one fma (one
// rounding); the emulator is built with -ffp-contract=off and rounds twice. The test picks inputs
// where the two differ (docs/kernels.md, "Bitwise claims").
__global__ void fp_contraction(float* out) {
    if (threadIdx.x == 0) out[3] = out[0] * out[1] + out[2];
}

// Runs `which` with the stream's flags set to `flags` for this launch only.
static int32_t with_flags(void* stream, unsigned flags, int32_t (*run)(float*, void*), float* out) {
    const unsigned old = ::cdcl_emu::set_stream_flags(stream, flags);
    const int32_t st = run(out, stream);
    ::cdcl_emu::set_stream_flags(stream, old);
    return st;
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

int32_t cdcl_emu_run_rule_selftest(int32_t which, float* out, int32_t n, void* stream) {
    (void)n;
    switch (which) {
        case CDCL_SELFTEST_MISALIGNED_FLOAT4_LOAD:
            return CDCL_LAUNCH(misaligned_float4_load, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_MISALIGNED_FLOAT2_STORE:
            return CDCL_LAUNCH(misaligned_float2_store, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_MISALIGNED_SHARED_UINT4:
            return CDCL_LAUNCH(misaligned_shared_uint4, dim3(1), dim3(8), 0, stream, out);
        case CDCL_SELFTEST_MISALIGNED_HALF2: return CDCL_LAUNCH(misaligned_half2, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_MISALIGNED_WMMA_LOAD:
            return CDCL_LAUNCH(misaligned_wmma_load, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_SHARED_READ_WRITE_RACE:
            return CDCL_LAUNCH(shared_read_write_race, dim3(1), dim3(64), 0, stream, out);
        case CDCL_SELFTEST_GLOBAL_RACE: return CDCL_LAUNCH(global_race, dim3(1), dim3(64), 0, stream, out);
        case CDCL_SELFTEST_ATOMIC_VS_PLAIN_WRITE:
            return CDCL_LAUNCH(atomic_vs_plain_write, dim3(1), dim3(64), 0, stream, out);
        case CDCL_SELFTEST_WARP_EXCHANGE_SYNCED:
            return CDCL_LAUNCH(warp_exchange<true>, dim3(1), dim3(64), 0, stream, out);
        case CDCL_SELFTEST_WARP_EXCHANGE_UNSYNCED:
            return CDCL_LAUNCH(warp_exchange<false>, dim3(1), dim3(64), 0, stream, out);
        case CDCL_SELFTEST_LOST_UPDATE_PREEMPTIVE:
            return with_flags(
                stream, ::cdcl_emu::kPreemptive,
                [](float* o, void* s) -> int32_t { return CDCL_LAUNCH(lost_update, dim3(1), dim3(256), 0, s, o); }, out);
        case CDCL_SELFTEST_LOST_UPDATE_RACECHECK:
            return with_flags(
                stream, ::cdcl_emu::kRacecheck | ::cdcl_emu::kPreemptive,
                [](float* o, void* s) -> int32_t { return CDCL_LAUNCH(lost_update, dim3(1), dim3(256), 0, s, o); }, out);
        case CDCL_SELFTEST_SHUFFLE_KIND_MISMATCH:
            return CDCL_LAUNCH(shuffle_kind_mismatch, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_SHUFFLE_WIDTH_MISMATCH:
            return CDCL_LAUNCH(shuffle_width_mismatch, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_POISONED_SHARED_INT: return CDCL_LAUNCH(poisoned_shared_int, dim3(1), dim3(64), 0, stream, out);
        case CDCL_SELFTEST_BEYOND_LAUNCH_BOUNDS: return CDCL_LAUNCH(bounded_to_64, dim3(1), dim3(128), 0, stream, out);
        case CDCL_SELFTEST_WITHIN_LAUNCH_BOUNDS: return CDCL_LAUNCH(bounded_to_64, dim3(2), dim3(64), 0, stream, out);
        case CDCL_SELFTEST_FP_CONTRACTION: return CDCL_LAUNCH(fp_contraction, dim3(1), dim3(32), 0, stream, out);
        default: return CDCL_ERR_INVALID_PARAMS;
    }
}
