// The one include of every kernel file. It selects the target:
//  - nvcc: the CUDA runtime and its fp16/bf16 headers; launchers named cdcl_cuda_*;
//  - host C++ compiler with CDCL_EMULATE: the emulator (emu/emu.h); launchers named cdcl_emu_*.
// Everything after this include is shared, line for line, by both targets.
#pragma once

#include "include/cdcl.h"

#ifdef CDCL_EMULATE
#include "emu/emu.h"
#define CDCL_PREFIX(name) cdcl_emu_##name
// Kernels and helpers live in a target-specific namespace so that the two builds of the same
// source can be linked into one library without symbol clashes.
#define CDCL_NAMESPACE cdcl_emu_kernels
#define CDCL_UNROLL
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define CDCL_PREFIX(name) cdcl_cuda_##name
#define CDCL_NAMESPACE cdcl_cuda_kernels
// Register arrays indexed by loop counters must be fully unrolled or they land in local memory.
#define CDCL_UNROLL _Pragma("unroll")
#define CDCL_SHARED(T, name, dims) __shared__ T name dims
#define CDCL_DYNAMIC_SHARED(T, name)                            \
    extern __shared__ __align__(16) unsigned char cdcl_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(cdcl_dyn_smem_)
#include <atomic>
// Kernels launched by this process (read by cdcl_cuda_kernel_launch_count, kernels/runtime.cu).
inline std::atomic<unsigned long long> cdcl_cuda_launches{0};
// The error of this thread's last failed launch, kept for cdcl_cuda_last_launch_error so that
// Error::Cuda can name it (kernels/runtime.cu).
inline thread_local int cdcl_cuda_last_error = 0;
inline int cdcl_cuda_launch_status(cudaError_t e) {
    if (e != cudaSuccess) cdcl_cuda_last_error = (int)e;
    return e == cudaSuccess ? (int)CDCL_OK : (int)CDCL_ERR_LAUNCH;
}
#define CDCL_LAUNCH(kernel, grid, block, smem, stream, ...)                                        \
    (cdcl_cuda_launches.fetch_add(1, std::memory_order_relaxed),                                  \
     kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__),          \
     cdcl_cuda_launch_status(cudaGetLastError()))
#endif

#define CDCL_API extern "C"

namespace CDCL_NAMESPACE {

// ---- storage types: f32 / f16 / bf16 in memory, f32 in registers -----------------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Four consecutive elements of storage type T read as one naturally aligned vector (16 bytes
// for f32, 8 for f16 / bf16): one memory instruction instead of four.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
    T v[4];
};

template <typename T>
__device__ __forceinline__ bool vec4_aligned(const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % sizeof(Vec4<T>) == 0;
}

// Calls f.template operator()<T>() with T the storage type named by `dtype`.
template <typename F>
__host__ int dispatch_float_dtype(int dtype, F&& f) {
    switch (dtype) {
        case CDCL_DTYPE_F32: return f(float{});
        case CDCL_DTYPE_F16: return f(__half{});
        case CDCL_DTYPE_BF16: return f(__nv_bfloat16{});
        default: return CDCL_ERR_UNSUPPORTED_DTYPE;
    }
}

// ---- device error record ---------------------------------------------------------------------
__device__ __forceinline__ void raise_error(cdcl_error_record* err, int slot, unsigned position, int value) {
    if (err) {
        const unsigned long long key = ((unsigned long long)position << 32) | (unsigned long long)(unsigned)value;
        atomicMin(&err->first[slot], key);
    }
}

// True when an earlier kernel of the same op recorded bad data: the op then writes nothing.
__device__ __forceinline__ bool error_raised(const cdcl_error_record* err) {
    if (!err) return false;
    for (int i = 0; i < CDCL_ERRSLOT_COUNT; ++i)
        if (err->first[i] != CDCL_NO_ERROR) return true;
    return false;
}

__host__ __device__ __forceinline__ unsigned ceil_div(unsigned a, unsigned b) { return (a + b - 1) / b; }

// n / d and n % d for 0 <= n < 2^31 and 1 <= d < 2^31 with a multiply-high, an add and a shift
// instead of the ~20-instruction integer division sequence (or, for 64-bit operands, a call to
// the division routine): q = (umulhi(n, m) + n) >> l with l = ceil(log2 d) and
// m = floor(2^32 (2^l - d) / d) + 1, i.e. the 33-bit multiplier 2^32 + m of Granlund and
// Montgomery, "Division by invariant integers using multiplication" (PLDI 1994), Figure 4.1,
// exact for every n < 2^32; the sum stays below 2^32 because umulhi(n, m) <= n < 2^31.
// The constructor divides once: build divisors before the hot loop, never inside it.
struct FastDiv {
    int d;
    unsigned m;
    unsigned l;
    __host__ __device__ FastDiv() : d(1), m(1), l(0) {}
    __host__ __device__ explicit FastDiv(int divisor) : d(divisor), m(1), l(0) {
        while (l < 31 && (1u << l) < (unsigned)divisor) ++l;
        const unsigned long long span = (1ull << l) - (unsigned)divisor;
        m = (unsigned)((span << 32) / (unsigned)divisor + 1);
    }
    __host__ __device__ __forceinline__ int div(int n) const {
        const unsigned hi = (unsigned)(((unsigned long long)m * (unsigned)n) >> 32);
        return (int)((hi + (unsigned)n) >> l);
    }
    __host__ __device__ __forceinline__ int mod(int n) const { return n - div(n) * d; }
};

}  // namespace CDCL_NAMESPACE
