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

}  // namespace CDCL_NAMESPACE

using namespace CDCL_NAMESPACE;

CDCL_API uint16_t cdcl_emu_f32_to_f16_bits(float v) { return __float2half_rn(v).bits; }
CDCL_API float cdcl_emu_f16_bits_to_f32(uint16_t b) { return __half2float(__half{b}); }
CDCL_API uint16_t cdcl_emu_f32_to_bf16_bits(float v) { return __float2bfloat16_rn(v).bits; }
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
        default: return CDCL_ERR_INVALID_PARAMS;
    }
}
