// Kernels that break the CUDA rules on purpose, one per strictness rule of the emulator, plus
// two that use the warp collectives correctly. Built for the emulator only: tests/emulator.rs
// runs each and checks that the rule fires (or that the result is right).
#include "../cdcl_device.cuh"

namespace CDCL_NAMESPACE {

__global__ void divergent_syncthreads(float* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

__global__ void early_return_then_barrier(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

__global__ void partial_mask_shuffle(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_sync(0xffffffffu, v, 0);
    out[threadIdx.x] = v;
}

// Threads 0..31 fill half of the array; every thread reads its own slot.
__global__ void poisoned_shared_read(float* out) {
    CDCL_SHARED(float, s, [64]);
    if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

// Every thread writes the same shared word before the barrier: the survivor depends on the order
// in which threads run.
__global__ void shared_race(float* out) {
    CDCL_SHARED(int, last, );
    last = (int)threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = (float)last;
}

__global__ void out_of_bounds_write(float* out, int n) { out[n + (int)threadIdx.x] = 1.0f; }

__global__ void too_much_shared(float* out) {
    CDCL_SHARED(float, big, [16384]);  // 64 KiB > 48 KiB
    big[threadIdx.x] = 0.0f;
    __syncthreads();
    out[threadIdx.x] = big[threadIdx.x];
}

// Correct code: a warp-level tree reduction, then a block reduction through shared memory.
__global__ void warp_reduce(float* out, int n) {
    CDCL_SHARED(float, warp_sums, [32]);
    float v = (threadIdx.x < (unsigned)n) ? (float)(threadIdx.x + 1) : 0.0f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (unsigned w = 0; w < blockDim.x / 32; ++w) total += warp_sums[w];
        out[blockIdx.x] = total;
    }
}

// Correct code: each collective once; out[k * 32 + lane] holds result k of `lane` (8 results).
__global__ void collectives(float* out) {
    const unsigned lane = threadIdx.x;
    const float v = (float)lane;
    out[0 * 32 + lane] = __shfl_sync(0xffffffffu, v, 5);
    out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, v, 3);
    out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, v, 3, 8);
    out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, v, 1, 16);
    out[4 * 32 + lane] = (float)__popc(__ballot_sync(0xffffffffu, lane % 3 == 0));
    out[5 * 32 + lane] = __any_sync(0xffffffffu, lane == 7) ? 1.0f : 0.0f;
    out[6 * 32 + lane] = __all_sync(0xffffffffu, lane < 31) ? 1.0f : 0.0f;
    __syncwarp();
    // Two half-warps shuffle independently with disjoint masks.
    const unsigned half_mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    out[7 * 32 + lane] = __shfl_sync(half_mask, v, lane < 16 ? 0 : 16);
}

// Correct code: atomics from every thread of 2 blocks into global memory, and a block-local
// histogram in dynamic shared memory. out[0] = sum of 1..512 (int atomicAdd), out[1] = the same
// in float, out[2] = max thread id, out[3] = min, out[4] = number of successful CAS claims (1),
// out[5] = 8 + 8 (atomicExch returns the previous value), out[6..8] = shared histogram of
// block 0 (threads by tid % 2).
__global__ void atomics_dynamic_shared(float* out, int* scratch) {
    CDCL_DYNAMIC_SHARED(int, hist);
    const int tid = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (threadIdx.x < 2) hist[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&hist[threadIdx.x % 2], 1);
    atomicAdd(&scratch[0], tid + 1);
    atomicAdd(&out[1], (float)(tid + 1));
    atomicMax(&scratch[1], tid);
    atomicMin(&scratch[2], tid);
    if (atomicCAS(&scratch[3], 0, tid + 1) == 0) atomicAdd(&scratch[4], 1);
    __syncthreads();
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        out[6] = (float)hist[0];
        out[7] = (float)hist[1];
    }
}

__global__ void atomics_finish(float* out, int* scratch) {
    out[0] = (float)scratch[0];
    out[2] = (float)scratch[1];
    out[3] = (float)scratch[2];
    out[4] = (float)scratch[4];
    const int prev = atomicExch(&scratch[5], 8);
    out[5] = (float)(prev + scratch[5]);
}

// ---- nvcuda::wmma ------------------------------------------------------------------------------

template <typename T, int S>
struct alignas(32) GemmTiles {
    static constexpr int ldt = S + 8;  // elements of T: a multiple of 16 bytes, rows offset by 16 bytes
    static constexpr int ldd = S + 4;  // floats
    T a[S * ldt];
    T b[S * ldt];
    float d[S * ldd];
};

// Correct code: D = A·B + C with M = N = K = S (16: one warp; 32: two warps, each computing a
// 16 x 32 strip with two accumulators and K in two steps). `out` holds A, B and C (S x S f32,
// row-major, C only read when S == 16, where it is loaded as a column-major matrix) and receives
// D (row-major) after them: out[3·S·S ..]. When S == 32, C is 0.5 everywhere (fill_fragment).
// A and B are rounded to T on the way into shared memory, A stored in layout LA, B in LB; D goes
// back through shared memory in the accumulator layout `dl`.
template <typename T, typename LA, typename LB, int S>
__global__ void wmma_gemm(float* out) {
    using namespace nvcuda;
    using Tiles = GemmTiles<T, S>;
    constexpr int ldt = Tiles::ldt, ldd = Tiles::ldd;
    constexpr bool a_row = std::is_same<LA, wmma::row_major>::value;
    constexpr bool b_row = std::is_same<LB, wmma::row_major>::value;
    CDCL_SHARED(Tiles, t, );
    for (unsigned idx = threadIdx.x; idx < (unsigned)(S * S); idx += blockDim.x) {
        const unsigned r = idx / S, c = idx % S;
        t.a[a_row ? r * ldt + c : c * ldt + r] = from_f32<T>(out[idx]);          // A(r, c)
        t.b[b_row ? r * ldt + c : c * ldt + r] = from_f32<T>(out[S * S + idx]);  // B(r, c)
    }
    __syncthreads();
    const unsigned warp = threadIdx.x / 32;
    constexpr int NT = S / 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NT];
    for (int tj = 0; tj < NT; ++tj) {
        if (S == 16)
            wmma::load_matrix_sync(acc[tj], out + 2 * S * S, S, wmma::mem_col_major);
        else
            wmma::fill_fragment(acc[tj], 0.5f);
    }
    for (int kk = 0; kk < NT; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
        const unsigned i0 = warp * 16, k0 = kk * 16;
        wmma::load_matrix_sync(fa, t.a + (a_row ? i0 * ldt + k0 : k0 * ldt + i0), ldt);
        for (int tj = 0; tj < NT; ++tj) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
            const unsigned j0 = tj * 16;
            wmma::load_matrix_sync(fb, t.b + (b_row ? k0 * ldt + j0 : j0 * ldt + k0), ldt);
            wmma::mma_sync(acc[tj], fa, fb, acc[tj]);
        }
    }
    for (int tj = 0; tj < NT; ++tj) {
        const unsigned i0 = warp * 16, j0 = tj * 16;
        if (S == 16)
            wmma::store_matrix_sync(t.d + i0 * ldd + j0, acc[tj], ldd, wmma::mem_row_major);
        else
            wmma::store_matrix_sync(t.d + j0 * ldd + i0, acc[tj], ldd, wmma::mem_col_major);
    }
    __syncthreads();
    for (unsigned idx = threadIdx.x; idx < (unsigned)(S * S); idx += blockDim.x) {
        const unsigned r = idx / S, c = idx % S;
        out[3 * S * S + idx] = S == 16 ? t.d[r * ldd + c] : t.d[c * ldd + r];
    }
}

using HalfTiles16 = GemmTiles<__half, 16>;

// Misuse: lane 5 loads its fragment from another address than the rest of the warp.
__global__ void wmma_divergent_pointer(float* out) {
    using namespace nvcuda;
    CDCL_SHARED(HalfTiles16, t, );
    for (unsigned idx = threadIdx.x; idx < 16 * HalfTiles16::ldt; idx += blockDim.x) t.a[idx] = __float2half(1.0f);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, t.a + (threadIdx.x == 5 ? 16 : 0), HalfTiles16::ldt);
    out[threadIdx.x] = __half2float(fa.x[0]);
}

// Misuse: a block of 16 threads is a partial warp; wmma needs all 32 lanes.
__global__ void wmma_partial_warp(float* out) {
    using namespace nvcuda;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    out[threadIdx.x] = acc.x[0];
}

// Wrong code that assumes a fragment layout: loads the row-major matrix M(r, c) = 16 r + c into an
// accumulator and writes element e of lane l to out[8 l + e], as if lane l held row l / 2.
__global__ void wmma_assumed_layout(float* out) {
    using namespace nvcuda;
    CDCL_SHARED(HalfTiles16, t, );
    for (unsigned idx = threadIdx.x; idx < 256; idx += blockDim.x) t.d[(idx / 16) * 20 + idx % 16] = (float)idx;
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, t.d, 20, wmma::mem_row_major);
    for (int e = 0; e < acc.num_elements; ++e) out[threadIdx.x * 8 + e] = acc.x[e];
}

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

// The rule self-tests of selftest_rules.cu (codes from CDCL_SELFTEST_MISALIGNED_FLOAT4_LOAD on).
int32_t cdcl_emu_run_rule_selftest(int32_t which, float* out, int32_t n, void* stream);

CDCL_API uint16_t cdcl_emu_f32_to_f16_bits(float v) { return __float2half_rn(v).bits; }
CDCL_API float cdcl_emu_f16_bits_to_f32(uint16_t b) { return __half2float(__half{b}); }
CDCL_API uint16_t cdcl_emu_f32_to_bf16_bits(float v) { return __float2bfloat16_rn(v).bits; }
CDCL_API float cdcl_emu_f32_to_tf32(float v) { return nvcuda::wmma::__float_to_tf32(v); }
CDCL_API float cdcl_emu_bf16_bits_to_f32(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

static int32_t run_atomics(float* out, void* stream) {
    int scratch[6] = {0, -1, 1 << 30, 0, 0, 8};
    for (int i = 0; i < 8; ++i) out[i] = 0.0f;
    int st = CDCL_LAUNCH(atomics_dynamic_shared, dim3(2), dim3(256), 2 * sizeof(int), stream, out, scratch);
    if (st == CDCL_OK) st = CDCL_LAUNCH(atomics_finish, dim3(1), dim3(1), 0, stream, out, scratch);
    return st;
}

CDCL_API int32_t cdcl_emu_run_selftest(int32_t which, float* out, int32_t n, void* stream) {
    switch (which) {
        case CDCL_SELFTEST_DIVERGENT_SYNCTHREADS: return CDCL_LAUNCH(divergent_syncthreads, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_EARLY_RETURN_THEN_BARRIER:
            return CDCL_LAUNCH(early_return_then_barrier, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_PARTIAL_MASK_SHUFFLE: return CDCL_LAUNCH(partial_mask_shuffle, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_POISONED_SHARED_READ: return CDCL_LAUNCH(poisoned_shared_read, dim3(1), dim3(64), 0, stream, out);
        case CDCL_SELFTEST_SHARED_RACE: return CDCL_LAUNCH(shared_race, dim3(1), dim3(256), 0, stream, out);
        case CDCL_SELFTEST_OUT_OF_BOUNDS_WRITE: return CDCL_LAUNCH(out_of_bounds_write, dim3(1), dim3(1), 0, stream, out, n);
        case CDCL_SELFTEST_BLOCK_TOO_LARGE: return CDCL_LAUNCH(warp_reduce, dim3(1), dim3(2048), 0, stream, out, n);
        case CDCL_SELFTEST_TOO_MUCH_SHARED: return CDCL_LAUNCH(too_much_shared, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_WARP_REDUCE: return CDCL_LAUNCH(warp_reduce, dim3(4), dim3(256), 0, stream, out, n);
        case CDCL_SELFTEST_ZERO_GRID: return CDCL_LAUNCH(warp_reduce, dim3(0), dim3(32), 0, stream, out, n);
        case CDCL_SELFTEST_COLLECTIVES: return CDCL_LAUNCH(collectives, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_ATOMICS_DYNAMIC_SHARED: return run_atomics(out, stream);
        case CDCL_SELFTEST_WMMA_GEMM_F16:
            return CDCL_LAUNCH((wmma_gemm<__half, nvcuda::wmma::row_major, nvcuda::wmma::col_major, 16>), dim3(1),
                               dim3(32), 0, stream, out);
        case CDCL_SELFTEST_WMMA_GEMM_BF16:
            return CDCL_LAUNCH((wmma_gemm<__nv_bfloat16, nvcuda::wmma::row_major, nvcuda::wmma::col_major, 16>), dim3(1),
                               dim3(32), 0, stream, out);
        case CDCL_SELFTEST_WMMA_GEMM_F16_TILED:
            return CDCL_LAUNCH((wmma_gemm<__half, nvcuda::wmma::col_major, nvcuda::wmma::row_major, 32>), dim3(1),
                               dim3(64), 0, stream, out);
        case CDCL_SELFTEST_WMMA_GEMM_BF16_TILED:
            return CDCL_LAUNCH((wmma_gemm<__nv_bfloat16, nvcuda::wmma::col_major, nvcuda::wmma::row_major, 32>), dim3(1),
                               dim3(64), 0, stream, out);
        case CDCL_SELFTEST_WMMA_DIVERGENT_POINTER: return CDCL_LAUNCH(wmma_divergent_pointer, dim3(1), dim3(32), 0, stream, out);
        case CDCL_SELFTEST_WMMA_PARTIAL_WARP: return CDCL_LAUNCH(wmma_partial_warp, dim3(1), dim3(16), 0, stream, out);
        case CDCL_SELFTEST_WMMA_ASSUMED_LAYOUT: return CDCL_LAUNCH(wmma_assumed_layout, dim3(1), dim3(32), 0, stream, out);
        default: return cdcl_emu_run_rule_selftest(which, out, n, stream);
    }
}
